//! The benchmark's policy: one NetworkPolicy selecting the server pod whose ~1,000 ingress
//! rules admit the client among many ipBlock/port rules, and the same rules as the two
//! netfilter enforcers of other projects write them:
//! - nftables with sets and verdict maps, as kube-network-policies and Calico's nftables
//!   dataplane do: established/related accepted first, a verdict map from the output interface
//!   to the pod's chain, and in it one lookup of (source, protocol, port) in an interval map;
//! - a linear iptables chain, as kube-router and Calico's iptables dataplane do: conntrack
//!   established first, a jump on the output interface to the pod's chain, one rule per
//!   (CIDR, protocol, port), a final DROP.
//!
//! The rules: `decoys` ipBlock rules that never match the client (distinct /24s of
//! 172.16.0.0/12, and 48 of them 10.0.0.0/8, which holds the client's address, each on one
//! of [`DECOY_PORT_SETS`] ports the client does not use, so prefix matches that fail on the
//! port occur too), and, at position `client_position`, a podSelector rule admitting the
//! client on the measured ports. In the linear chain the client's rules sit where the policy lists them: in
//! the middle, the expected position of a matching rule in a chain of this size.
use crate::netns::Transport;

/// A peer of one ingress rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// An ipBlock.
    Cidr(String),
    /// The client pod, by `podSelector` (the netfilter translations use its address).
    Client,
}

/// One ingress rule: one peer, its ports.
#[derive(Clone, Debug)]
pub struct IngressRule {
    pub peer: Peer,
    pub ports: Vec<(Transport, u16)>,
}

/// The label that selects the client pod, and the one that selects the server pod.
pub const CLIENT_LABEL: (&str, &str) = ("role", "bench-client");
pub const SERVER_LABEL: (&str, &str) = ("app", "bench-server");

/// Distinct (protocol, port) sets of the decoy rules. Real policies with many peers share few
/// port sets, and netsieve's compiler groups an endpoint direction's rules by port set once
/// they are more than `MAX_RULE_GROUPS` (64): with one port set per rule, a 1,000-rule policy
/// would not fit and the endpoint would be programmed fail-closed.
pub const DECOY_PORT_SETS: usize = 48;

/// The server's ingress rules.
#[derive(Clone, Debug)]
pub struct BenchPolicy {
    pub rules: Vec<IngressRule>,
}

impl BenchPolicy {
    /// `decoys` rules that do not admit the client, and the client's rule (admitting
    /// `client_ports`) inserted at `client_position` (clamped to the end).
    pub fn new(decoys: usize, client_position: usize, client_ports: &[(Transport, u16)]) -> BenchPolicy {
        let mut rules: Vec<IngressRule> = (0..decoys)
            .map(|i| {
                // DECOY_PORT_SETS ports from 20000 up (none a measured port), taken in turn.
                let port_index = i % DECOY_PORT_SETS;
                let transport = if port_index % 4 == 3 { Transport::Udp } else { Transport::Tcp };
                // One pass over the ports (the 11th) with 10.0.0.0/8, which holds the client:
                // prefix matches that then fail on the port. No two entries of one (protocol,
                // port) overlap, so the nftables interval map holds them as they are.
                let cidr = if i / DECOY_PORT_SETS == 10 {
                    "10.0.0.0/8".to_string()
                } else {
                    format!("172.{}.{}.0/24", 16 + i / 256, i % 256)
                };
                IngressRule { peer: Peer::Cidr(cidr), ports: vec![(transport, 20000 + port_index as u16)] }
            })
            .collect();
        let client_rule = IngressRule { peer: Peer::Client, ports: client_ports.to_vec() };
        rules.insert(client_position.min(rules.len()), client_rule);
        BenchPolicy { rules }
    }

    /// (source CIDR, protocol, port) of every rule, in order: what the netfilter variants
    /// match, one element or one rule each.
    pub fn entries(&self, client_ip: &str) -> Vec<(String, Transport, u16)> {
        let mut entries = Vec::new();
        for rule in &self.rules {
            let source = match &rule.peer {
                Peer::Cidr(cidr) => cidr.clone(),
                Peer::Client => format!("{client_ip}/32"),
            };
            for (transport, port) in &rule.ports {
                entries.push((source.clone(), *transport, *port));
            }
        }
        entries
    }

    /// The NetworkPolicy (YAML) in `namespace`.
    pub fn network_policy(&self, namespace: &str) -> String {
        let mut text = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bench-server-ingress, namespace: {namespace}}}\n\
             spec:\n  podSelector: {{matchLabels: {{{}: {}}}}}\n  policyTypes: [Ingress]\n  ingress:\n",
            SERVER_LABEL.0, SERVER_LABEL.1
        );
        for rule in &self.rules {
            let peer = match &rule.peer {
                Peer::Cidr(cidr) => format!("{{ipBlock: {{cidr: {cidr}}}}}"),
                Peer::Client => format!("{{podSelector: {{matchLabels: {{{}: {}}}}}}}", CLIENT_LABEL.0, CLIENT_LABEL.1),
            };
            let ports: Vec<String> =
                rule.ports.iter().map(|(t, p)| format!("{{protocol: {}, port: {p}}}", t.kubernetes_name())).collect();
            text.push_str(&format!("  - from: [{peer}]\n    ports: [{}]\n", ports.join(", ")));
        }
        text
    }

    /// An `nft -f` ruleset enforcing the policy on traffic forwarded to `server_veth` (the
    /// server pod's host-side veth).
    pub fn nftables(&self, server_veth: &str, client_ip: &str) -> String {
        let elements: Vec<String> = self
            .entries(client_ip)
            .iter()
            .map(|(cidr, transport, port)| format!("{cidr} . {} . {port} : accept", transport.netfilter_name()))
            .collect();
        format!(
            "table inet {NFT_TABLE} {{\n\
             \x20 map ingress_server {{\n\
             \x20   type ipv4_addr . inet_proto . inet_service : verdict\n\
             \x20   flags interval\n\
             \x20   elements = {{ {} }}\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             \x20   ct state established,related accept\n\
             \x20   oifname vmap {{ \"{server_veth}\" : jump pod_server_ingress }}\n\
             \x20 }}\n\
             \x20 chain pod_server_ingress {{\n\
             \x20   ip saddr . meta l4proto . th dport vmap @ingress_server\n\
             \x20   drop\n\
             \x20 }}\n\
             }}\n",
            elements.join(",\n      ")
        )
    }

    /// An `iptables-restore` input (filter table) enforcing the policy with a linear chain.
    pub fn iptables(&self, server_veth: &str, client_ip: &str) -> String {
        let mut lines = vec![
            "*filter".to_string(),
            ":FORWARD ACCEPT [0:0]".to_string(),
            format!(":{IPTABLES_CHAIN} - [0:0]"),
            "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string(),
            format!("-A FORWARD -o {server_veth} -j {IPTABLES_CHAIN}"),
        ];
        for (cidr, transport, port) in self.entries(client_ip) {
            let p = transport.netfilter_name();
            lines.push(format!("-A {IPTABLES_CHAIN} -s {cidr} -p {p} -m {p} --dport {port} -j ACCEPT"));
        }
        lines.push(format!("-A {IPTABLES_CHAIN} -j DROP"));
        lines.push("COMMIT".to_string());
        lines.join("\n") + "\n"
    }
}

/// The nftables variant's table.
pub const NFT_TABLE: &str = "nsvbench";
/// The iptables variant's per-pod chain.
pub const IPTABLES_CHAIN: &str = "NSV-INGRESS-SERVER";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_rule_sits_where_asked_and_translations_have_every_entry() {
        let ports = [(Transport::Tcp, 7001), (Transport::Udp, 7003)];
        let policy = BenchPolicy::new(999, 500, &ports);
        assert_eq!(policy.rules.len(), 1000);
        assert_eq!(policy.rules[500].peer, Peer::Client);
        let entries = policy.entries("10.250.0.10");
        assert_eq!(entries.len(), 1001);
        assert!(entries.contains(&("10.250.0.10/32".to_string(), Transport::Udp, 7003)));
        // No decoy admits a measured port.
        assert!(entries.iter().filter(|e| e.0 != "10.250.0.10/32").all(|e| e.2 >= 20000));
        let nft = policy.nftables("hveth1", "10.250.0.10");
        assert_eq!(nft.matches(" : accept").count(), 1001);
        assert!(nft.contains("10.250.0.10/32 . udp . 7003 : accept"));
        let ipt = policy.iptables("hveth1", "10.250.0.10");
        assert_eq!(ipt.lines().filter(|l| l.ends_with("-j ACCEPT") && l.contains(IPTABLES_CHAIN)).count(), 1001);
        // The port sets fit netsieve's rule groups (64 per endpoint direction).
        let port_sets: std::collections::BTreeSet<_> = policy.rules.iter().map(|r| r.ports.clone()).collect();
        assert_eq!(port_sets.len(), DECOY_PORT_SETS + 1);
        assert!(port_sets.len() <= 64);
        // No two entries are equal (an nftables set rejects duplicates).
        assert_eq!(entries.iter().collect::<std::collections::BTreeSet<_>>().len(), entries.len());
        assert_eq!(entries.iter().filter(|e| e.0 == "10.0.0.0/8").count(), DECOY_PORT_SETS);
        let yaml = policy.network_policy("bench");
        let parsed: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("policy YAML");
        assert_eq!(parsed["spec"]["ingress"].as_sequence().map(Vec::len), Some(1000));
    }
}
