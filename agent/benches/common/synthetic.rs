//! The synthetic 10,000-pod / 1,000-policy cluster shared by the benchmarks, built as the JSON
//! the API server returns.
#![allow(dead_code)]
use serde_json::{Value, json};

pub const NAMESPACES: usize = 100;
pub const DEPLOYMENTS_PER_NAMESPACE: usize = 10;
pub const REPLICAS: usize = 10;
pub const POLICIES_PER_NAMESPACE: usize = 10;
pub const NODES: usize = 100;

pub fn pod_json(ns: usize, deployment: usize, replica: usize, version: &str) -> Value {
    let index = (ns * DEPLOYMENTS_PER_NAMESPACE + deployment) * REPLICAS + replica;
    let node = pod_node(ns, deployment, replica);
    let ip = format!("10.{}.{}.{}", 64 + index / 65536, (index / 256) % 256, index % 256);
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("app{deployment}-{replica}"), "namespace": format!("ns{ns}"),
                     "labels": {"app": format!("app{deployment}"), "tier": if deployment < 5 {"front"} else {"back"}, "version": version}},
        "spec": {"nodeName": format!("node{node}"),
                 "containers": [{"name": "main", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": format!("172.16.0.{}", node + 1)}})
}

/// Ten policies per namespace, the shapes real clusters use: default deny, same-namespace
/// app-to-app on a port, from other namespaces by label, from monitoring, egress to DNS and to
/// an external range, one named port.
pub fn policy_json(ns: usize, index: usize, port: u16) -> Value {
    let meta = json!({"name": format!("policy{index}"), "namespace": format!("ns{ns}")});
    let target = index % DEPLOYMENTS_PER_NAMESPACE;
    let spec = match index {
        0 => json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        1 => json!({"podSelector": {}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns0"}},
                                         "podSelector": {"matchLabels": {"app": "app0"}}}],
                                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
        2 => json!({"podSelector": {"matchLabels": {"tier": "back"}}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "169.254.0.0/16"]}}],
                                "ports": [{"protocol": "TCP", "port": 443}]},
                               {"to": [{"podSelector": {}}]}]}),
        3 => json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"role": "monitoring"}}}],
                                                   "ports": [{"port": "http"}]}]}),
        _ => json!({"podSelector": {"matchLabels": {"app": format!("app{target}")}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app{}", (target + 1) % DEPLOYMENTS_PER_NAMESPACE)}}},
                                          {"namespaceSelector": {"matchLabels": {"team": format!("t{}", ns % 7)}},
                                           "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]}}],
                                 "ports": [{"protocol": "TCP", "port": port, "endPort": port + 10}]}]}),
    };
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec})
}

/// `moved`: the namespace changes team, which flips the namespaceSelectors of two teams'
/// policies for it.
pub fn namespace_json(ns: usize, moved: bool) -> Value {
    let team = if moved { (ns + 1) % 7 } else { ns % 7 };
    let mut labels = json!({"kubernetes.io/metadata.name": format!("ns{ns}"), "team": format!("t{team}")});
    if ns == 0 {
        labels["role"] = json!("monitoring");
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns{ns}"), "labels": labels}})
}

pub fn decode<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("synthetic object does not decode: {e}"))
}

/// The node of a pod: deployments spread over nodes the way a scheduler does (not by replica
/// number).
pub fn pod_node(ns: usize, deployment: usize, replica: usize) -> usize {
    let index = (ns * DEPLOYMENTS_PER_NAMESPACE + deployment) * REPLICAS + replica;
    (index.wrapping_mul(2_654_435_761) >> 7) % NODES
}
