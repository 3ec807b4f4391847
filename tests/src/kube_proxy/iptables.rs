//! kube-proxy's iptables mode, as `pkg/proxy/iptables/proxier.go` writes it (ClusterIP
//! Services, `Cluster` traffic policy, no session affinity): the nat chains KUBE-SERVICES,
//! KUBE-SVC-* (random endpoint choice with `statistic`), KUBE-SEP-* (hairpin mark, DNAT),
//! KUBE-MARK-MASQ and KUBE-POSTROUTING, and the filter chains KUBE-SERVICES (REJECT for a
//! Service without endpoints) and KUBE-FORWARD. NodePorts, external IPs and load balancers are
//! not emulated (the chains for them would stay empty).
//!
//! Programmed with `iptables-legacy-restore --noflush`, as kube-proxy does (it also uses
//! `--noflush`, to keep other owners' rules), plus the jumps from the built-in chains that
//! kube-proxy inserts one by one. The legacy backend is chosen so the two emulations cover
//! both NAT implementations of the kernel: x_tables' `iptable_nat` here, `nft_chain_nat` in
//! the nftables mode (iptables-nft would program nf_tables again). Both register at the same
//! hooks and priorities (NF_IP_PRI_NAT_DST, NF_IP_PRI_NAT_SRC).
use super::service::{Endpoint, Service, ServicePort};
use super::{CLUSTER_CIDR, DnatRule, MASQUERADE_MARK};
use data_encoding::BASE32;
use ring::digest::{SHA256, digest};
use std::collections::BTreeMap;

pub const RESTORE: &str = "iptables-legacy-restore";
pub const SAVE: &str = "iptables-legacy-save";
pub const IPTABLES: &str = "iptables-legacy";

/// The jumps from built-in chains, as kube-proxy's `iptablesJumpChains` lists them: (table,
/// built-in chain, arguments). Inserted at the top, as kube-proxy does (EnsureRule Prepend).
pub const JUMPS: &[(&str, &str, &[&str])] = &[
    ("filter", "FORWARD", &["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]),
    ("filter", "OUTPUT", &["-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]),
    ("filter", "FORWARD", &["-m", "comment", "--comment", "kubernetes forwarding rules", "-j", "KUBE-FORWARD"]),
    ("nat", "OUTPUT", &["-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]),
    ("nat", "PREROUTING", &["-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]),
    ("nat", "POSTROUTING", &["-m", "comment", "--comment", "kubernetes postrouting rules", "-j", "KUBE-POSTROUTING"]),
];

/// `base32(sha256(text))[:16]`: how kube-proxy keeps chain names within iptables' 28
/// characters and stable across restarts.
fn hash16(text: &str) -> String {
    BASE32.encode(digest(&SHA256, text.as_bytes()).as_ref())[..16].to_string()
}

/// KUBE-SVC-<hash of "ns/name:port" + protocol>.
pub fn service_chain(service: &Service, port: &ServicePort) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{}{}", service.port_key(port), port.transport.netfilter_name())))
}

/// KUBE-SEP-<hash of "ns/name:port" + protocol + "ip:port">.
pub fn endpoint_chain(service: &Service, port: &ServicePort, endpoint: &Endpoint) -> String {
    let text = format!("{}{}{}", service.port_key(port), port.transport.netfilter_name(), endpoint.addr());
    format!("KUBE-SEP-{}", hash16(&text))
}

/// The probability of rule `i` of `n` (1/(n-i), printed as kube-proxy's `%0.10f`): each rule
/// takes its share of what the earlier rules left, so every endpoint gets 1/n.
fn probability(i: usize, n: usize) -> String {
    format!("{:.10}", 1.0 / (n - i) as f64)
}

/// The `iptables-restore` input for `services`: filter then nat, as kube-proxy writes them.
pub fn restore_input(services: &[Service]) -> String {
    let mut filter_chains = vec![":KUBE-SERVICES - [0:0]".to_string(), ":KUBE-FORWARD - [0:0]".to_string()];
    let mut filter_rules = Vec::new();
    let mut nat_chains: Vec<String> =
        ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"].iter().map(|c| format!(":{c} - [0:0]")).collect();
    let mut nat_rules = vec![
        // Only marked connections are masqueraded; the mark is cleared so a packet that passes
        // the stack again (bridged, tunnelled) is not masqueraded twice.
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"),
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}"),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_string(),
        format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}"),
    ];
    for service in services {
        for resolved in &service.ports {
            let port = &resolved.port;
            let key = service.port_key(port);
            let protocol = port.transport.netfilter_name();
            let matches = format!("-m {protocol} -p {protocol} -d {}/32 --dport {}", service.cluster_ip, port.port);
            if resolved.endpoints.is_empty() {
                // Nothing to DNAT to: the filter table rejects, so clients fail fast.
                filter_rules.push(format!("-A KUBE-SERVICES -m comment --comment \"{key} has no endpoints\" {matches} -j REJECT"));
                continue;
            }
            let svc_chain = service_chain(service, port);
            nat_chains.push(format!(":{svc_chain} - [0:0]"));
            nat_rules.push(format!("-A KUBE-SERVICES -m comment --comment \"{key} cluster IP\" {matches} -j {svc_chain}"));
            // Traffic from outside the pod network (the node itself, or a route into the
            // Service range from elsewhere) is masqueraded: its replies must come back here.
            nat_rules.push(format!(
                "-A {svc_chain} -m comment --comment \"{key} cluster IP\" {matches} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
            ));
            let count = resolved.endpoints.len();
            for (i, endpoint) in resolved.endpoints.iter().enumerate() {
                let sep_chain = endpoint_chain(service, port, endpoint);
                let statistic = if i + 1 < count {
                    format!(" -m statistic --mode random --probability {}", probability(i, count))
                } else {
                    String::new()
                };
                nat_rules.push(format!("-A {svc_chain} -m comment --comment \"{key} -> {}\"{statistic} -j {sep_chain}", endpoint.addr()));
                nat_chains.push(format!(":{sep_chain} - [0:0]"));
                // Hairpin: a pod that reaches itself through the Service is masqueraded, or its
                // reply would go straight back to itself from its own address.
                nat_rules.push(format!("-A {sep_chain} -m comment --comment {key} -s {}/32 -j KUBE-MARK-MASQ", endpoint.ip));
                nat_rules.push(format!(
                    "-A {sep_chain} -m comment --comment {key} -m {protocol} -p {protocol} -j DNAT --to-destination {}",
                    endpoint.addr()
                ));
            }
        }
    }
    filter_rules.extend([
        // Out-of-window packets would otherwise reach the backend untranslated and be reset.
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".to_string(),
        format!("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j ACCEPT"),
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string(),
    ]);
    let mut text = String::from("*filter\n");
    for line in filter_chains.drain(..).chain(filter_rules) {
        text.push_str(&line);
        text.push('\n');
    }
    text.push_str("COMMIT\n*nat\n");
    for line in nat_chains.into_iter().chain(nat_rules) {
        text.push_str(&line);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    text
}

/// Restore input that flushes and deletes every chain named in `restore_input` (uninstall).
pub fn removal_input(current_save: &str) -> String {
    let mut text = String::new();
    for table in ["filter", "nat"] {
        text.push_str(&format!("*{table}\n"));
        let chains = chains_of(current_save, table);
        for chain in &chains {
            text.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for chain in &chains {
            text.push_str(&format!("-X {chain}\n"));
        }
        text.push_str("COMMIT\n");
    }
    text
}

/// The KUBE-* chains of a table in `iptables-save` output.
fn chains_of(save: &str, table: &str) -> Vec<String> {
    let mut in_table = false;
    let mut chains = Vec::new();
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            in_table = name == table;
        } else if in_table
            && let Some(rest) = line.strip_prefix(":KUBE-")
            && let Some(name) = rest.split_whitespace().next()
        {
            chains.push(format!("KUBE-{name}"));
        }
    }
    chains
}

/// Packet counts of every DNAT rule in `iptables-save -c -t nat` output, by endpoint chain:
/// how many new connections netfilter sent to each endpoint.
pub fn dnat_counts(save: &str, rules: &BTreeMap<String, DnatRule>) -> BTreeMap<DnatRule, u64> {
    let mut counts = BTreeMap::new();
    for line in save.lines() {
        // `[packets:bytes] -A CHAIN ... -j DNAT --to-destination ip:port`
        let Some((counters, rule)) = line.strip_prefix('[').and_then(|l| l.split_once("] ")) else { continue };
        if !rule.contains("-j DNAT") {
            continue;
        }
        let Some(chain) = rule.strip_prefix("-A ").and_then(|r| r.split_whitespace().next()) else { continue };
        let Some(packets) = counters.split(':').next().and_then(|p| p.parse::<u64>().ok()) else { continue };
        if let Some(dnat) = rules.get(chain) {
            counts.insert(dnat.clone(), packets);
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_proxy::service::{ResolvedPort, TargetPort};
    use crate::netns::Transport;
    use std::net::Ipv4Addr;

    fn web() -> Service {
        let endpoint = |pod: &str, last| Endpoint { pod: pod.into(), ip: Ipv4Addr::new(10, 250, 0, last), port: 8080 };
        Service {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
            ports: vec![ResolvedPort {
                port: ServicePort::new("http", Transport::Tcp, 80, TargetPort::Number(8080)),
                endpoints: vec![endpoint("a", 10), endpoint("b", 11), endpoint("c", 12)],
            }],
            backends: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    #[test]
    fn chain_names_are_kube_proxys() {
        // kube-proxy: "KUBE-SVC-" + base32(sha256("ns/name:port" + "tcp"))[:16].
        let service = web();
        let chain = service_chain(&service, &service.ports[0].port);
        assert_eq!(chain.len(), "KUBE-SVC-".len() + 16);
        assert!(chain.len() <= 28, "iptables chain names are at most 28 characters");
        let expected = BASE32.encode(digest(&SHA256, b"shop/web:httptcp").as_ref());
        assert_eq!(&chain["KUBE-SVC-".len()..], &expected[..16]);
    }

    #[test]
    fn endpoints_are_chosen_with_falling_probabilities() {
        let text = restore_input(&[web()]);
        let picks: Vec<&str> = text.lines().filter(|l| l.contains(" -> ")).collect();
        assert_eq!(picks.len(), 3);
        assert!(picks[0].contains("--probability 0.3333333333"), "{}", picks[0]);
        assert!(picks[1].contains("--probability 0.5000000000"), "{}", picks[1]);
        assert!(!picks[2].contains("statistic"), "the last endpoint takes the rest: {}", picks[2]);
        assert_eq!(text.matches("-j DNAT --to-destination 10.250.0.1").count(), 3);
        assert!(text.contains("-s 10.250.0.10/32 -j KUBE-MARK-MASQ"), "hairpin masquerade");
    }

    #[test]
    fn counts_are_read_per_endpoint() {
        let service = web();
        let port = &service.ports[0];
        let rules: BTreeMap<String, DnatRule> = port
            .endpoints
            .iter()
            .map(|e| (endpoint_chain(&service, &port.port, e), DnatRule { service_port: "shop/web:http".into(), endpoint: e.clone() }))
            .collect();
        let chain = endpoint_chain(&service, &port.port, &port.endpoints[1]);
        let save = format!("*nat\n[3:180] -A {chain} -m comment --comment shop/web:http -m tcp -p tcp -j DNAT --to-destination 10.250.0.11:8080\n[9:9] -A {chain} -s 10.250.0.11/32 -j KUBE-MARK-MASQ\nCOMMIT\n");
        let counts = dnat_counts(&save, &rules);
        assert_eq!(counts.len(), 1);
        assert_eq!(counts.values().next(), Some(&3));
        assert_eq!(counts.keys().next().map(|r| r.endpoint.pod.as_str()), Some("b"));
    }
}
