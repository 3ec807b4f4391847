//! The Service scenario: pods behind ClusterIP Services on a two-node [`Cluster`], reached
//! through a kube-proxy emulation, with policies whose verdicts depend on which backend
//! kube-proxy picks. Shared by the Service end-to-end tests and the demo.
//!
//! - `shop/web` (10.96.0.20): web-a (node0, `tier: open`) and web-b (node1, `tier: closed`);
//!   port 80 → targetPort 8080 (a service port that differs from its targetPort) and UDP port
//!   7 → named targetPort `echo` (5353). `client` (node1) and `client2` (node0) may reach only
//!   `tier: open` pods (egress), so of their connections exactly those kube-proxy sends to
//!   web-a may pass; each has one backend on its own node and one on the other.
//! - `shop/api` (10.96.0.21): api-1 (node0) declares `http-api` = 8081, api-2 (node1)
//!   `http-api` = 8082; port 80 → named targetPort `http-api`. The clients' egress allows TCP
//!   8081 only: api-1 yes, api-2 no. The api pods' ingress admits frontends on the named port.
//! - `kube-system/kube-dns` (10.96.0.10): coredns-1 (node1), coredns-2 (node0), UDP and TCP
//!   53 (named targetPorts `dns`, `dns-tcp`). `prod` has seed 001's default deny plus "allow
//!   DNS to `k8s-app: kube-dns` in kube-system": `worker` must resolve through the ClusterIP,
//!   and must not reach `default/fake-dns` (10.96.0.11), whose pod has the kube-dns label in
//!   the wrong namespace.
//! - `prod/orders` (10.96.0.30): one backend; `orders` reaching itself through its own Service
//!   is hairpin traffic (always allowed: a pod can reach itself) although `prod` denies all.
//! - Ingress on the backends (already enforced before Services mattered): web admits
//!   `role: frontend` only (`frontend` passes, `stranger` does not), prod admits nothing.
use crate::kube_proxy::{KubeProxyError, ServiceSpec, TargetPort};
use crate::netns::{Cluster, NetnsError, Transport, eventually};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

/// A scenario pod: name, namespace, node, labels, container ports (name, protocol, number).
pub struct ScenarioPod {
    pub name: &'static str,
    pub namespace: &'static str,
    pub node: usize,
    pub labels: &'static [(&'static str, &'static str)],
    pub ports: &'static [(&'static str, Transport, u16)],
}

const WEB_PORTS: &[(&str, Transport, u16)] = &[("http", Transport::Tcp, 8080), ("echo", Transport::Udp, 5353)];
const DNS_PORTS: &[(&str, Transport, u16)] = &[("dns", Transport::Udp, 53), ("dns-tcp", Transport::Tcp, 53)];

pub const PODS: &[ScenarioPod] = &[
    ScenarioPod { name: "client", namespace: "shop", node: 1, labels: &[("app", "client"), ("role", "frontend")], ports: &[] },
    ScenarioPod { name: "client2", namespace: "shop", node: 0, labels: &[("app", "client"), ("role", "frontend")], ports: &[] },
    ScenarioPod { name: "frontend", namespace: "shop", node: 1, labels: &[("role", "frontend")], ports: &[] },
    ScenarioPod { name: "stranger", namespace: "shop", node: 0, labels: &[("app", "stranger")], ports: &[] },
    ScenarioPod { name: "web-a", namespace: "shop", node: 0, labels: &[("app", "web"), ("tier", "open")], ports: WEB_PORTS },
    ScenarioPod { name: "web-b", namespace: "shop", node: 1, labels: &[("app", "web"), ("tier", "closed")], ports: WEB_PORTS },
    ScenarioPod { name: "api-1", namespace: "shop", node: 0, labels: &[("app", "api")], ports: &[("http-api", Transport::Tcp, 8081)] },
    ScenarioPod { name: "api-2", namespace: "shop", node: 1, labels: &[("app", "api")], ports: &[("http-api", Transport::Tcp, 8082)] },
    ScenarioPod { name: "worker", namespace: "prod", node: 0, labels: &[("app", "worker")], ports: &[] },
    ScenarioPod { name: "orders", namespace: "prod", node: 0, labels: &[("app", "orders")], ports: &[("http", Transport::Tcp, 8080)] },
    ScenarioPod { name: "coredns-1", namespace: "kube-system", node: 1, labels: &[("k8s-app", "kube-dns")], ports: DNS_PORTS },
    ScenarioPod { name: "coredns-2", namespace: "kube-system", node: 0, labels: &[("k8s-app", "kube-dns")], ports: DNS_PORTS },
    ScenarioPod { name: "fake-dns", namespace: "default", node: 1, labels: &[("k8s-app", "kube-dns")], ports: DNS_PORTS },
];

pub const KUBE_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// The Services. Their backends are the pods their selectors would select (`app: web`,
/// `app: api`, `app: orders`, `k8s-app: kube-dns` within each Service's namespace).
pub fn service_specs() -> Vec<ServiceSpec> {
    vec![
        ServiceSpec::new("shop", "web")
            .cluster_ip(Ipv4Addr::new(10, 96, 0, 20))
            .port("http", Transport::Tcp, 80, TargetPort::Number(8080))
            .port("echo", Transport::Udp, 7, TargetPort::Name("echo".into()))
            .backends(&["web-a", "web-b"]),
        ServiceSpec::new("shop", "api")
            .cluster_ip(Ipv4Addr::new(10, 96, 0, 21))
            .port("http", Transport::Tcp, 80, TargetPort::Name("http-api".into()))
            .backends(&["api-1", "api-2"]),
        ServiceSpec::new("prod", "orders")
            .cluster_ip(Ipv4Addr::new(10, 96, 0, 30))
            .port("http", Transport::Tcp, 80, TargetPort::Number(8080))
            .backends(&["orders"]),
        ServiceSpec::new("kube-system", "kube-dns")
            .cluster_ip(KUBE_DNS_IP)
            .port("dns", Transport::Udp, 53, TargetPort::Name("dns".into()))
            .port("dns-tcp", Transport::Tcp, 53, TargetPort::Name("dns-tcp".into()))
            .backends(&["coredns-1", "coredns-2"]),
        ServiceSpec::new("default", "fake-dns")
            .cluster_ip(Ipv4Addr::new(10, 96, 0, 11))
            .port("dns", Transport::Udp, 53, TargetPort::Number(53))
            .backends(&["fake-dns"]),
    ]
}

/// The scenario's policies that isolate ingress only (web and api backends).
pub const INGRESS_POLICIES: &str = include_str!("../fixtures/services/ingress-policies.yaml");
/// The scenario's policies that isolate egress: the clients', and the default deny plus DNS of
/// `prod` (seed 001).
pub const EGRESS_POLICIES: &str = include_str!("../fixtures/services/egress-policies.yaml");
/// The files [`write_manifests`] writes them to.
pub const INGRESS_POLICIES_FILE: &str = "policies-ingress.yaml";
pub const EGRESS_POLICIES_FILE: &str = "policies-egress.yaml";

/// The namespaces, with their automatic name label.
pub const NAMESPACES: &[&str] = &["shop", "prod", "kube-system", "default"];

/// Builds the scenario on a cluster (`bridged`: the CNI bridge layout): pods, their declared
/// ports and servers (TCP and UDP that answer with the pod name, DNS on the coredns pods and
/// the fake one), and the Services. Kube-proxy is installed separately.
/// Waits until the agent of every node answers `/readyz` (metrics on 9090 in the node's
/// namespace) and both nodes enforce: a stranger can no longer reach web-a directly (node0, an
/// ingress decision) and client can no longer reach web-b directly (node1, an egress
/// decision). Checking one node only let a loaded machine start probing while the other
/// node's agent was still attaching. Returns what was not reached.
pub fn wait_until_enforcing(cluster: &Cluster, limit: Duration) -> Result<(), String> {
    for node in 0..cluster.nodes.len() {
        if !eventually(limit, || cluster.http_get(node, 9090, "/readyz").is_some_and(|(code, _)| code == 200)) {
            return Err(format!("node{node}'s agent was not ready within {limit:?}"));
        }
    }
    let web_a = cluster.pod("web-a").ip.clone();
    let web_b = cluster.pod("web-b").ip.clone();
    let probe = Duration::from_millis(300);
    let enforcing =
        || !cluster.tcp_connects("stranger", &web_a, 8080, probe) && !cluster.tcp_connects("client", &web_b, 8080, probe);
    if !eventually(limit, enforcing) {
        return Err(format!("the agents did not enforce on both nodes within {limit:?}"));
    }
    Ok(())
}

pub fn build(tag: &str, bridged: bool) -> Result<Cluster, KubeProxyError> {
    let layout: Vec<(&str, usize)> = PODS.iter().map(|p| (p.name, p.node)).collect();
    let mut cluster = if bridged { Cluster::new_bridged(tag, 2, &layout)? } else { Cluster::new(tag, 2, &layout)? };
    for pod in PODS {
        for (name, transport, port) in pod.ports {
            cluster.declare_port(pod.name, name, *transport, *port);
        }
    }
    for spec in service_specs() {
        cluster.add_service(spec)?;
    }
    serve(&mut cluster)?;
    Ok(cluster)
}

fn serve(cluster: &mut Cluster) -> Result<(), NetnsError> {
    let records: BTreeMap<String, Ipv4Addr> = cluster
        .services
        .iter()
        .map(|s| (format!("{}.{}.svc.cluster.local", s.name, s.namespace), s.cluster_ip))
        .chain([("kubernetes.default.svc.cluster.local".to_string(), Ipv4Addr::new(10, 96, 0, 1))])
        .collect();
    for pod in PODS {
        if pod.ports == DNS_PORTS {
            cluster.serve_dns(pod.name, records.clone())?;
            continue;
        }
        for (_, transport, port) in pod.ports {
            match transport {
                Transport::Tcp => cluster.serve_tcp(pod.name, *port)?,
                Transport::Udp => cluster.serve_udp_echo(pod.name, *port)?,
                Transport::Sctp => cluster.serve_sctp(pod.name, *port)?,
            }
        }
    }
    Ok(())
}

pub fn scenario_pod(name: &str) -> &'static ScenarioPod {
    match PODS.iter().find(|p| p.name == name) {
        Some(pod) => pod,
        None => panic!("no scenario pod {name}"),
    }
}

/// A pod as the API server holds it, with its container ports and the cluster's addresses.
pub fn pod_object(cluster: &Cluster, pod: &ScenarioPod) -> Value {
    let ip = &cluster.pod(pod.name).ip;
    let host_ip = &cluster.nodes[pod.node].ip;
    let labels: serde_json::Map<String, Value> = pod.labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|(name, transport, port)| json!({"name": name, "containerPort": port, "protocol": transport.kubernetes_name()}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": labels},
           "spec": {"nodeName": cluster.nodes[pod.node].name, "containers": [{"name": "c", "image": "x", "ports": ports}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": host_ip, "hostIPs": [{"ip": host_ip}]}})
}

pub fn namespace_object(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

pub fn node_objects(cluster: &Cluster) -> Vec<Value> {
    cluster
        .nodes
        .iter()
        .map(|n| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name}, "status": {"addresses": [{"type": "InternalIP", "address": n.ip}]}}))
        .collect()
}

/// The policies as objects.
pub fn policy_objects() -> Result<Vec<Value>, serde_yaml::Error> {
    [INGRESS_POLICIES, EGRESS_POLICIES]
        .into_iter()
        .flat_map(serde_yaml::Deserializer::from_str)
        .map(Value::deserialize)
        .collect()
}

/// Writes what the agent reads in manifests mode: namespaces, nodes, pods (one JSON list) and
/// the policies (YAML, one file for the ingress-only ones and one for those isolating egress).
pub fn write_manifests(dir: &Path, cluster: &Cluster) -> std::io::Result<()> {
    let mut items: Vec<Value> = NAMESPACES.iter().map(|n| namespace_object(n)).collect();
    items.extend(node_objects(cluster));
    items.extend(PODS.iter().map(|p| pod_object(cluster, p)));
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    crate::seed_cluster::write_atomically(&dir.join("cluster.json"), &list.to_string())?;
    crate::seed_cluster::write_atomically(&dir.join(INGRESS_POLICIES_FILE), INGRESS_POLICIES)?;
    crate::seed_cluster::write_atomically(&dir.join(EGRESS_POLICIES_FILE), EGRESS_POLICIES)
}
