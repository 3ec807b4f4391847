//! kube-proxy's nftables mode, as `pkg/proxy/nftables/proxier.go` writes it through knftables
//! (ClusterIP Services, `Cluster` traffic policy, no session affinity): `table ip kube-proxy`
//! with base chains at the filter and NAT hooks (filter at priority dstnat-10, DNAT at dstnat,
//! masquerade at srcnat), the `service-ips` verdict map from ClusterIP . protocol . port to a
//! per-service chain, `numgen random mod N vmap` choosing a per-endpoint chain, the hairpin
//! mark and the DNAT there, the masquerade mark (`mark-for-masquerade`, `masquerading`), and the
//! `no-endpoint-services` map that rejects connections to Services without endpoints.
//! NodePorts, external IPs and load balancers are not emulated.
//!
//! One addition to kube-proxy's rules: the DNAT rule of each endpoint chain has a `counter`
//! (iptables counts every rule; nftables only where asked), so tests can read how many new
//! connections went to each endpoint. It changes no verdict.
use super::service::{Endpoint, Service, ServicePort};
use super::{CLUSTER_CIDR, DnatRule, MASQUERADE_MARK};
use data_encoding::BASE32;
use ring::digest::{SHA256, digest};
use std::collections::BTreeMap;

pub const TABLE: &str = "kube-proxy";

/// knftables' `NameLengthMax` (256) less the longest chain prefix kube-proxy reserves (16).
const CHAIN_NAME_BASE_MAX: usize = 240;

/// kube-proxy's `hashAndTruncate`: 8 characters of base32(sha256(name)), a dash, the name.
fn hash_and_truncate(name: &str) -> String {
    let hash = BASE32.encode(digest(&SHA256, name.as_bytes()).as_ref());
    let mut text = format!("{}-{name}", &hash[..8]);
    if text.len() > CHAIN_NAME_BASE_MAX {
        text.truncate(CHAIN_NAME_BASE_MAX - 3);
        text.push_str("...");
    }
    text
}

/// `service-<hash>-ns/name/protocol/port`.
pub fn service_chain(service: &Service, port: &ServicePort) -> String {
    let name = format!("{}/{}/{}/{}", service.namespace, service.name, port.transport.netfilter_name(), port.name);
    format!("service-{}", hash_and_truncate(&name))
}

/// `endpoint-<hash>-ns/name/protocol/port__ip/port`.
pub fn endpoint_chain(service: &Service, port: &ServicePort, endpoint: &Endpoint) -> String {
    let name = format!(
        "{}/{}/{}/{}__{}/{}",
        service.namespace,
        service.name,
        port.transport.netfilter_name(),
        port.name,
        endpoint.ip,
        endpoint.port
    );
    format!("endpoint-{}", hash_and_truncate(&name))
}

/// One `nft -f` transaction that replaces the whole table atomically: knftables' pattern of
/// `add table` (so `delete` cannot fail), `delete table`, then everything anew. Chains are
/// declared before the rules that jump to them.
pub fn transaction(services: &[Service]) -> String {
    let t = format!("ip {TABLE}");
    let mut lines = vec![
        format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}"),
        format!("delete table {t}"),
        format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}"),
    ];
    // Base chains. Filtering runs before DNAT, so it sees the ClusterIP (rejects for Services
    // without endpoints); DNAT at dstnat in prerouting (pods) and output (the node itself);
    // masquerade at srcnat in postrouting.
    // Priorities as numbers: kube-proxy writes `dstnat-10`, `dstnat` and `srcnat`, but nft
    // before 1.0.7 (Debian 12 has 1.0.6) accepts the names only in the hooks they are defined
    // for (dstnat in prerouting, srcnat in postrouting); -100 and 100 are their values.
    for (name, kind, hook, priority) in [
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("nat-prerouting", "nat", "prerouting", "-100"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "100"),
    ] {
        lines.push(format!("add chain {t} {name} {{ type {kind} hook {hook} priority {priority} ; }}"));
    }
    for name in ["services", "masquerading", "mark-for-masquerade", "endpoints-check", "firewall-check"] {
        lines.push(format!("add chain {t} {name}"));
    }
    lines.push(format!("add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"));
    for (chain, jump) in [
        ("filter-input", "ct state new jump endpoints-check"),
        ("filter-forward", "ct state new jump endpoints-check"),
        ("filter-output", "ct state new jump endpoints-check"),
        ("filter-prerouting", "ct state new jump firewall-check"),
        ("filter-output", "ct state new jump firewall-check"),
        ("nat-output", "jump services"),
        ("nat-prerouting", "jump services"),
        ("nat-postrouting", "jump masquerading"),
    ] {
        lines.push(format!("add rule {t} {chain} {jump}"));
    }
    lines.extend([
        format!("add rule {t} mark-for-masquerade mark set mark or {MASQUERADE_MARK}"),
        // Only marked connections are masqueraded; the mark is cleared so a packet that passes
        // the stack again is not masqueraded twice.
        format!("add rule {t} masquerading mark and {MASQUERADE_MARK} == 0 return"),
        format!("add rule {t} masquerading mark set mark xor {MASQUERADE_MARK}"),
        format!("add rule {t} masquerading masquerade fully-random"),
        format!("add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"),
        format!("add rule {t} reject-chain reject"),
        format!("add rule {t} endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"),
        format!("add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"),
        format!("add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"),
        format!("add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"),
        format!("add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"),
    ]);
    for service in services {
        for resolved in &service.ports {
            let port = &resolved.port;
            let protocol = port.transport.netfilter_name();
            let key = format!("{} . {protocol} . {}", service.cluster_ip, port.port);
            if resolved.endpoints.is_empty() {
                let comment = service.port_key(port);
                lines.push(format!("add element {t} no-endpoint-services {{ {key} comment \"{comment}\" : goto reject-chain }}"));
                continue;
            }
            let svc_chain = service_chain(service, port);
            lines.push(format!("add chain {t} {svc_chain}"));
            let mut choices = Vec::new();
            for (i, endpoint) in resolved.endpoints.iter().enumerate() {
                let ep_chain = endpoint_chain(service, port, endpoint);
                lines.push(format!("add chain {t} {ep_chain}"));
                // Hairpin: a pod reaching itself through the Service is masqueraded.
                lines.push(format!("add rule {t} {ep_chain} ip saddr {} jump mark-for-masquerade", endpoint.ip));
                lines.push(format!("add rule {t} {ep_chain} meta l4proto {protocol} counter dnat to {}", endpoint.addr()));
                choices.push(format!("{i} : goto {ep_chain}"));
            }
            // Traffic from outside the pod network is masqueraded: its replies must come back.
            lines.push(format!(
                "add rule {t} {svc_chain} ip daddr {} {protocol} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
                service.cluster_ip, port.port
            ));
            lines.push(format!("add rule {t} {svc_chain} numgen random mod {} vmap {{ {} }}", choices.len(), choices.join(" , ")));
            lines.push(format!("add element {t} service-ips {{ {key} : goto {svc_chain} }}"));
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// Packet counts of every DNAT rule in `nft -j list table ip kube-proxy` output, by endpoint
/// chain: how many new connections netfilter sent to each endpoint.
pub fn dnat_counts(json: &str, rules: &BTreeMap<String, DnatRule>) -> Result<BTreeMap<DnatRule, u64>, serde_json::Error> {
    let listing: serde_json::Value = serde_json::from_str(json)?;
    let mut counts = BTreeMap::new();
    for object in listing["nftables"].as_array().into_iter().flatten() {
        let rule = &object["rule"];
        let Some(chain) = rule["chain"].as_str() else { continue };
        let Some(exprs) = rule["expr"].as_array() else { continue };
        if !exprs.iter().any(|e| e.get("dnat").is_some()) {
            continue;
        }
        let packets = exprs.iter().find_map(|e| e["counter"]["packets"].as_u64());
        if let (Some(dnat), Some(packets)) = (rules.get(chain), packets) {
            counts.insert(dnat.clone(), packets);
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_proxy::service::{ResolvedPort, TargetPort};
    use crate::netns::Transport;
    use std::net::Ipv4Addr;

    #[test]
    fn names_and_choices_are_kube_proxys() {
        let endpoint = |pod: &str, last| Endpoint { pod: pod.into(), ip: Ipv4Addr::new(10, 250, 0, last), port: 8080 };
        let service = Service {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
            ports: vec![ResolvedPort {
                port: ServicePort::new("http", Transport::Tcp, 80, TargetPort::Number(8080)),
                endpoints: vec![endpoint("a", 10), endpoint("b", 11)],
            }],
            backends: vec!["a".into(), "b".into()],
        };
        let port = &service.ports[0];
        let chain = service_chain(&service, &port.port);
        assert!(chain.starts_with("service-") && chain.ends_with("-shop/web/tcp/http"), "{chain}");
        let first = endpoint_chain(&service, &port.port, &port.endpoints[0]);
        let second = endpoint_chain(&service, &port.port, &port.endpoints[1]);
        assert!(second.ends_with("-shop/web/tcp/http__10.250.0.11/8080"), "{second}");
        let text = transaction(std::slice::from_ref(&service));
        assert!(text.contains(&format!("numgen random mod 2 vmap {{ 0 : goto {first} , 1 : goto {second} }}")), "{text}");
        assert!(text.contains(&format!("add element ip kube-proxy service-ips {{ 10.96.0.20 . tcp . 80 : goto {chain} }}")));
        assert!(text.contains(&format!("add rule ip kube-proxy {second} ip saddr 10.250.0.11 jump mark-for-masquerade")));
    }
}
