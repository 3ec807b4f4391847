//! Seeded random clusters: namespaces, pods and NetworkPolicies exercising every rule kind.
//!
//! Used by the differential tests (semantics module vs compiled maps vs the kernel program) and
//! by benchmarks that need a synthetic cluster of a given size. Objects are built as the JSON
//! the API server returns and parsed into k8s-openapi types, so they go through the same
//! deserialisation as real input.
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Size knobs of a generated cluster.
#[derive(Clone, Copy, Debug)]
pub struct ScenarioParams {
    pub namespaces: usize,
    pub pods_per_namespace: usize,
    pub policies: usize,
    pub nodes: usize,
}

impl Default for ScenarioParams {
    fn default() -> Self {
        ScenarioParams { namespaces: 3, pods_per_namespace: 4, policies: 4, nodes: 2 }
    }
}

/// A generated cluster.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
    /// Addresses that belong to no pod, inside and outside the pod ranges, for ipBlock tests.
    pub outside_ips: Vec<std::net::IpAddr>,
}

const APPS: &[&str] = &["web", "db", "cache", "api"];
const TIERS: &[&str] = &["front", "back"];
const TEAMS: &[&str] = &["a", "b"];
/// Ports the generator draws from, with neighbours so endPort edges get hit.
pub const INTERESTING_PORTS: &[u16] = &[0, 1, 53, 79, 80, 81, 443, 5432, 6379, 8079, 8080, 8081, 9090, 65535];

/// The IPv4 address of pod `index` on `node`.
pub fn pod_ipv4(node: usize, index: usize) -> String {
    format!("10.240.{}.{}", node % 250, 2 + index % 250)
}

/// The IPv6 address of pod `index` on `node`.
pub fn pod_ipv6(node: usize, index: usize) -> String {
    format!("fd00:10:240:{:x}::{:x}", node, 2 + index)
}

fn labels(rng: &mut StdRng) -> Value {
    let mut map = serde_json::Map::new();
    if let Some(app) = APPS.choose(rng) {
        map.insert("app".into(), json!(app));
    }
    if rng.random_bool(0.6)
        && let Some(tier) = TIERS.choose(rng)
    {
        map.insert("tier".into(), json!(tier));
    }
    Value::Object(map)
}

fn selector(rng: &mut StdRng, keys: &[(&str, &[&str])]) -> Value {
    match rng.random_range(0..6) {
        0 => json!({}),
        1 | 2 => {
            let (key, values) = keys[rng.random_range(0..keys.len())];
            json!({"matchLabels": {key: values.choose(rng).copied().unwrap_or("x")}})
        }
        _ => {
            let (key, values) = keys[rng.random_range(0..keys.len())];
            let op = ["In", "NotIn", "Exists", "DoesNotExist"][rng.random_range(0..4)];
            let expr = match op {
                "In" | "NotIn" => {
                    let count = rng.random_range(1..=values.len());
                    let chosen: Vec<&str> = values.choose_multiple(rng, count).copied().collect();
                    json!({"key": key, "operator": op, "values": chosen})
                }
                _ => json!({"key": key, "operator": op}),
            };
            json!({"matchExpressions": [expr]})
        }
    }
}

fn pod_selector(rng: &mut StdRng) -> Value {
    selector(rng, &[("app", APPS), ("tier", TIERS)])
}

fn namespace_selector(rng: &mut StdRng, namespaces: usize) -> Value {
    let names: Vec<String> = (0..namespaces).map(|i| format!("ns{i}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    if rng.random_bool(0.3) {
        let name = name_refs.choose(rng).copied().unwrap_or("ns0");
        return json!({"matchLabels": {"kubernetes.io/metadata.name": name}});
    }
    selector(rng, &[("team", TEAMS)])
}

fn ip_block(rng: &mut StdRng, nodes: usize) -> Value {
    let node = rng.random_range(0..nodes.max(1));
    match rng.random_range(0..5) {
        0 => json!({"cidr": "0.0.0.0/0", "except": [format!("10.240.{node}.0/24")]}),
        1 => json!({"cidr": format!("10.240.{node}.0/24"),
                    "except": [format!("{}/32", pod_ipv4(node, rng.random_range(0..4)))]}),
        2 => json!({"cidr": format!("10.240.{node}.0/28")}),
        3 => json!({"cidr": format!("fd00:10:240:{node:x}::/64"),
                    "except": [format!("{}/128", pod_ipv6(node, rng.random_range(0..4)))]}),
        _ => json!({"cidr": "192.0.2.0/24"}),
    }
}

fn peers(rng: &mut StdRng, params: &ScenarioParams) -> Option<Value> {
    match rng.random_range(0..8) {
        0 => None,
        1 => Some(json!([])),
        _ => {
            let count = rng.random_range(1..=2);
            let list: Vec<Value> = (0..count)
                .map(|_| match rng.random_range(0..4) {
                    0 => json!({"podSelector": pod_selector(rng)}),
                    1 => json!({"namespaceSelector": namespace_selector(rng, params.namespaces)}),
                    2 => json!({"podSelector": pod_selector(rng),
                                "namespaceSelector": namespace_selector(rng, params.namespaces)}),
                    _ => json!({"ipBlock": ip_block(rng, params.nodes)}),
                })
                .collect();
            Some(Value::Array(list))
        }
    }
}

fn ports(rng: &mut StdRng) -> Option<Value> {
    match rng.random_range(0..6) {
        0 => None,
        1 => Some(json!([])),
        _ => {
            let count = rng.random_range(1..=2);
            let list: Vec<Value> = (0..count)
                .map(|_| {
                    let mut port = serde_json::Map::new();
                    match rng.random_range(0..4) {
                        0 => {}
                        1 => {
                            port.insert("protocol".into(), json!("UDP"));
                        }
                        2 => {
                            port.insert("protocol".into(), json!("SCTP"));
                        }
                        _ => {
                            port.insert("protocol".into(), json!("TCP"));
                        }
                    }
                    match rng.random_range(0..5) {
                        0 => {}
                        1 => {
                            let name = ["http", "dns", "metrics"].choose(rng).copied().unwrap_or("http");
                            port.insert("port".into(), json!(name));
                        }
                        2 => {
                            let start = *INTERESTING_PORTS[1..].choose(rng).unwrap_or(&80);
                            let end = start.saturating_add(rng.random_range(0..3000));
                            port.insert("port".into(), json!(start));
                            port.insert("endPort".into(), json!(end));
                        }
                        _ => {
                            let number = *INTERESTING_PORTS[1..].choose(rng).unwrap_or(&80);
                            port.insert("port".into(), json!(number));
                        }
                    }
                    Value::Object(port)
                })
                .collect();
            Some(Value::Array(list))
        }
    }
}

fn rules(rng: &mut StdRng, params: &ScenarioParams, peer_key: &str) -> Option<Value> {
    match rng.random_range(0..5) {
        0 => None,
        1 => Some(json!([])),
        _ => {
            let count = rng.random_range(1..=2);
            let list: Vec<Value> = (0..count)
                .map(|_| {
                    let mut rule = serde_json::Map::new();
                    if let Some(p) = peers(rng, params) {
                        rule.insert(peer_key.into(), p);
                    }
                    if let Some(p) = ports(rng) {
                        rule.insert("ports".into(), p);
                    }
                    Value::Object(rule)
                })
                .collect();
            Some(Value::Array(list))
        }
    }
}

/// Container ports: each pod may declare some named ports, with different numbers on
/// different pods so that named-port resolution per destination pod matters.
fn container_ports(rng: &mut StdRng) -> Value {
    let mut list = Vec::new();
    if rng.random_bool(0.6) {
        list.push(json!({"name": "http", "containerPort": if rng.random_bool(0.5) { 80 } else { 8080 }, "protocol": "TCP"}));
    }
    if rng.random_bool(0.3) {
        list.push(json!({"name": "dns", "containerPort": 53, "protocol": "UDP"}));
    }
    if rng.random_bool(0.3) {
        list.push(json!({"name": "metrics", "containerPort": 9090}));
    }
    Value::Array(list)
}

/// Errors from generation are programming errors in this generator (it builds JSON the
/// types accept), reported rather than panicking.
#[derive(Debug, thiserror::Error)]
#[error("generated object does not deserialize: {0}")]
pub struct ScenarioError(#[from] serde_json::Error);

impl Scenario {
    pub fn generate(seed: u64, params: ScenarioParams) -> Result<Scenario, ScenarioError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut namespaces = Vec::new();
        let mut pods = Vec::new();
        let mut policies = Vec::new();
        let mut pod_index = vec![0usize; params.nodes.max(1)];
        for ns in 0..params.namespaces {
            let name = format!("ns{ns}");
            let team = TEAMS.choose(&mut rng).copied().unwrap_or("a");
            namespaces.push(serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, "team": team}},
            }))?);
            for p in 0..params.pods_per_namespace {
                let node = rng.random_range(0..params.nodes.max(1));
                let index = pod_index[node];
                pod_index[node] += 1;
                let (v4, v6) = (pod_ipv4(node, index), pod_ipv6(node, index));
                pods.push(serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("pod{p}"), "namespace": name, "labels": labels(&mut rng)},
                    "spec": {"nodeName": format!("node{node}"),
                             "containers": [{"name": "main", "image": "registry.invalid/app", "ports": container_ports(&mut rng)}]},
                    "status": {"phase": "Running", "podIP": v4, "podIPs": [{"ip": v4}, {"ip": v6}]},
                }))?);
            }
        }
        for index in 0..params.policies {
            let ns = format!("ns{}", rng.random_range(0..params.namespaces.max(1)));
            let mut spec = serde_json::Map::new();
            spec.insert("podSelector".into(), pod_selector(&mut rng));
            if let Some(r) = rules(&mut rng, &params, "from") {
                spec.insert("ingress".into(), r);
            }
            if let Some(r) = rules(&mut rng, &params, "to") {
                spec.insert("egress".into(), r);
            }
            match rng.random_range(0..4) {
                0 => {}
                1 => {
                    spec.insert("policyTypes".into(), json!(["Ingress"]));
                }
                2 => {
                    spec.insert("policyTypes".into(), json!(["Egress"]));
                }
                _ => {
                    spec.insert("policyTypes".into(), json!(["Ingress", "Egress"]));
                }
            }
            policies.push(serde_json::from_value(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("policy{index}"), "namespace": ns},
                "spec": Value::Object(spec),
            }))?);
        }
        let outside_ips = ["10.240.0.200", "10.240.1.201", "192.0.2.10", "198.51.100.7", "fd00:10:240::99", "2001:db8::1"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        Ok(Scenario { namespaces, pods, policies, outside_ips })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_sized() {
        let params = ScenarioParams { namespaces: 4, pods_per_namespace: 5, policies: 7, nodes: 2 };
        let a = Scenario::generate(42, params).expect("generates");
        let b = Scenario::generate(42, params).expect("generates");
        assert_eq!(a.pods.len(), 20);
        assert_eq!(a.policies.len(), 7);
        assert_eq!(a.namespaces.len(), 4);
        assert_eq!(serde_json::to_string(&a.policies).ok(), serde_json::to_string(&b.policies).ok());
    }
}
