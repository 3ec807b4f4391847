//! NetworkPolicy semantics (`networking.k8s.io/v1`), pure and kernel-free.
//!
//! This module is the specification: the map compiler and the eBPF programs are tested against
//! [`explain`]. It decides, for one flow, whether the source's egress policies and the
//! destination's ingress policies allow it, and says which policy, rule, peer and port did.
//!
//! Decisions (see docs/SEMANTICS.md):
//! - `policyTypes` empty or absent defaults as the API server does: Ingress always, Egress only
//!   when `egress` holds at least one rule.
//! - `from`/`to` absent or empty admit any peer; `ports` absent or empty admit every protocol
//!   and port (ICMP included).
//! - A policy that does not validate (bad selector operator, unparsable CIDR, bad port) still
//!   isolates the pods it selects for the directions it declares, but allows nothing: it fails
//!   closed. If its podSelector itself is invalid it selects every pod of its namespace.
//! - A pod can always reach itself, and traffic between a pod and its own node is allowed.
mod selector;

pub use selector::LabelMatcher;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

pub type Labels = BTreeMap<String, String>;

/// Errors of this module; each names the object and field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum PolicyError {
    #[error("{policy}: {field}: {message}")]
    InvalidPolicy { policy: String, field: String, message: String },
    #[error("unknown pod {0}")]
    UnknownPod(String),
    #[error("pod {0} has no IP address{1}")]
    PodWithoutIp(String, String),
    #[error("{0:?} is neither NAMESPACE/POD nor an IP address")]
    BadEndpoint(String),
}

/// Transport protocols a flow can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

impl Protocol {
    /// IP protocol number (ICMP stands for ICMPv6 too; both only match rules without ports).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Icmp => 1,
        }
    }

    pub fn parse(text: &str) -> Option<Protocol> {
        match text.to_ascii_uppercase().as_str() {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            "ICMP" | "ICMPV6" => Some(Protocol::Icmp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMP",
        })
    }
}

/// A container port a pod declares by name, for named-port resolution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// What the semantics needs of a Pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    /// Host-network pods use the node's address; pod selectors never select them.
    pub host_network: bool,
    pub named_ports: Vec<NamedPort>,
    /// Addresses of the pod's node (status.hostIPs): with the Kubernetes API as the source the
    /// agent learns its node's addresses from them, without needing to read Node objects.
    pub host_ips: Vec<IpAddr>,
}

impl PodInfo {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The number a named port resolves to on this pod, if it declares it.
    pub fn resolve_named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports.iter().find(|p| p.name == name && p.protocol == protocol).map(|p| p.port)
    }

    /// A pod a selector-based peer could ever admit: not host-network, with an address.
    pub fn selectable(&self) -> bool {
        !self.host_network && !self.ips.is_empty()
    }

    pub fn from_object(pod: &Pod) -> PodInfo {
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".to_string());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let ips = status.map_or_else(Vec::new, |s| {
            distinct_ips(s.pod_ip.as_deref().into_iter().chain(s.pod_ips.iter().flatten().map(|p| p.ip.as_str())))
        });
        let host_ips = status.map_or_else(Vec::new, |s| {
            distinct_ips(s.host_ip.as_deref().into_iter().chain(s.host_ips.iter().flatten().map(|p| p.ip.as_str())))
        });
        let mut named_ports = Vec::new();
        if let Some(spec) = spec {
            let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
            for port in containers.flat_map(|c| c.ports.iter().flatten()) {
                let protocol = port.protocol.as_deref().and_then(Protocol::parse).unwrap_or(Protocol::Tcp);
                if let (Some(name), Ok(number)) = (&port.name, u16::try_from(port.container_port)) {
                    named_ports.push(NamedPort { name: name.clone(), protocol, port: number });
                }
            }
        }
        PodInfo {
            namespace,
            name,
            labels,
            ips,
            node: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            named_ports,
            host_ips,
        }
    }
}

/// The addresses that parse, first occurrence first (the API lists the primary address both
/// alone and in the list).
fn distinct_ips<'a>(texts: impl Iterator<Item = &'a str>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in texts.filter_map(|t| t.parse::<IpAddr>().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// One allowed peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Peer {
    /// Pods chosen by selectors. `namespaces: None` = the policy's own namespace;
    /// `pods: None` = every pod of the chosen namespaces.
    Pods { namespaces: Option<LabelMatcher>, pods: Option<LabelMatcher> },
    /// An ipBlock: any address in `cidr` and in none of `except`, pod or not.
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

/// Which destination ports of one protocol a port entry admits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PortSpec {
    /// `port` absent: every port of the protocol.
    All,
    /// `port` (and `endPort`), inclusive.
    Range { first: u16, last: u16 },
    /// A named port, resolved against the destination pod's container ports.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: PortSpec,
}

/// A compiled ingress or egress rule. `peers: None` = any peer; `ports: None` = every protocol
/// and port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortMatch>>,
}

/// A NetworkPolicy after validation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CompiledPolicy {
    pub namespace: String,
    pub name: String,
    /// `None` when the podSelector did not validate: then the policy selects every pod in its
    /// namespace so that it fails closed.
    pub pod_selector: Option<LabelMatcher>,
    /// `Some(rules)` when the policy covers ingress; rules are empty if the policy has errors.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    pub errors: Vec<PolicyError>,
}

impl CompiledPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn selects(&self, pod: &PodInfo) -> bool {
        pod.namespace == self.namespace
            && !pod.host_network
            && self.pod_selector.as_ref().is_none_or(|s| s.matches(&pod.labels))
    }

    /// The rules for one direction, if the policy covers it.
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// A policy that could not even be decoded: it selects every pod of its namespace and
    /// allows nothing in either direction, so those pods fail closed.
    pub fn undecodable(namespace: &str, name: &str, message: String) -> CompiledPolicy {
        CompiledPolicy {
            namespace: namespace.to_string(),
            name: name.to_string(),
            pod_selector: None,
            ingress: Some(Vec::new()),
            egress: Some(Vec::new()),
            errors: vec![PolicyError::InvalidPolicy {
                policy: format!("{namespace}/{name}"),
                field: "object".into(),
                message,
            }],
        }
    }

    /// Fails the policy closed if the object had fields netsieve does not know under `spec`:
    /// such a field may restrict traffic in a way this version cannot enforce (a newer API),
    /// so ignoring it could open traffic. Unknown fields elsewhere (metadata, status) do not
    /// change what the policy means.
    pub fn with_unknown_fields(mut self, unknown: &[String]) -> CompiledPolicy {
        let in_spec: Vec<&String> = unknown.iter().filter(|p| p.starts_with("spec")).collect();
        if in_spec.is_empty() {
            return self;
        }
        for path in in_spec {
            self.errors.push(PolicyError::InvalidPolicy {
                policy: self.key(),
                field: path.clone(),
                message: "unknown field: its meaning cannot be enforced, so the policy fails closed".into(),
            });
        }
        self.ingress = self.ingress.map(|_| Vec::new());
        self.egress = self.egress.map(|_| Vec::new());
        self
    }

    /// Validates a NetworkPolicy object. Never fails: problems are recorded in `errors` and
    /// make the policy fail closed.
    pub fn compile(policy: &NetworkPolicy) -> CompiledPolicy {
        let namespace = policy.metadata.namespace.clone().unwrap_or_else(|| "default".to_string());
        let name = policy.metadata.name.clone().unwrap_or_default();
        let key = format!("{namespace}/{name}");
        let mut errors = Vec::new();
        let mut error = |field: &str, message: String| {
            errors.push(PolicyError::InvalidPolicy { policy: key.clone(), field: field.to_string(), message })
        };
        let Some(spec) = policy.spec.as_ref() else {
            // No spec: an empty podSelector and no rules, i.e. deny all ingress in the namespace.
            return CompiledPolicy {
                namespace,
                name,
                pod_selector: Some(LabelMatcher::everything()),
                ingress: Some(vec![]),
                egress: None,
                errors,
            };
        };
        // An absent podSelector is the empty selector (the API server requires the field).
        let pod_selector = match LabelMatcher::compile(&spec.pod_selector.clone().unwrap_or_default()) {
            Ok(matcher) => Some(matcher),
            Err(message) => {
                error("spec.podSelector", format!("{message}; the policy now selects every pod of its namespace"));
                None
            }
        };
        let egress_rules = spec.egress.as_deref().unwrap_or_default();
        let (covers_ingress, covers_egress) = match spec.policy_types.as_deref() {
            Some(types) if !types.is_empty() => {
                for t in types {
                    if t != "Ingress" && t != "Egress" {
                        error("spec.policyTypes", format!("unknown policy type {t:?}"));
                    }
                }
                (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress"))
            }
            _ => (true, !egress_rules.is_empty()),
        };
        let mut ingress = Vec::new();
        for (index, rule) in spec.ingress.iter().flatten().enumerate() {
            let NetworkPolicyIngressRule { from, ports } = rule;
            let field = format!("spec.ingress[{index}]");
            ingress.push(compile_rule(from.as_deref(), ports.as_deref(), &field, &mut error));
        }
        let mut egress = Vec::new();
        for (index, rule) in egress_rules.iter().enumerate() {
            let NetworkPolicyEgressRule { to, ports } = rule;
            let field = format!("spec.egress[{index}]");
            egress.push(compile_rule(to.as_deref(), ports.as_deref(), &field, &mut error));
        }
        let failed = !errors.is_empty();
        // Fail closed: a policy with any error keeps isolating but admits nothing.
        let finish = |covers: bool, rules: Vec<Rule>| covers.then(|| if failed { Vec::new() } else { rules });
        CompiledPolicy {
            ingress: finish(covers_ingress, ingress),
            egress: finish(covers_egress, egress),
            namespace,
            name,
            pod_selector,
            errors,
        }
    }
}

fn compile_rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    field: &str,
    error: &mut impl FnMut(&str, String),
) -> Rule {
    let peer_key = if field.starts_with("spec.ingress") { "from" } else { "to" };
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .filter_map(|(index, peer)| {
                    let field = format!("{field}.{peer_key}[{index}]");
                    compile_peer(peer, &field, error)
                })
                .collect(),
        ),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .filter_map(|(index, port)| compile_port(port, &format!("{field}.ports[{index}]"), error))
                .collect(),
        ),
    };
    Rule { peers, ports }
}

fn compile_peer(peer: &NetworkPolicyPeer, field: &str, error: &mut impl FnMut(&str, String)) -> Option<Peer> {
    let has_selector = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match (&peer.ip_block, has_selector) {
        (Some(_), true) => {
            error(field, "ipBlock cannot be combined with podSelector or namespaceSelector".into());
            None
        }
        (None, false) => {
            error(field, "a peer needs podSelector, namespaceSelector or ipBlock".into());
            None
        }
        (Some(block), false) => {
            let cidr: IpNet = match block.cidr.parse() {
                Ok(cidr) => cidr,
                Err(e) => {
                    error(&format!("{field}.ipBlock.cidr"), format!("{:?} is not a CIDR: {e}", block.cidr));
                    return None;
                }
            };
            let mut except = Vec::new();
            for (index, text) in block.except.iter().flatten().enumerate() {
                let except_field = format!("{field}.ipBlock.except[{index}]");
                match text.parse::<IpNet>() {
                    Ok(net) if cidr.contains(&net) => except.push(net),
                    Ok(net) => error(&except_field, format!("{net} is not inside {cidr}")),
                    Err(e) => error(&except_field, format!("{text:?} is not a CIDR: {e}")),
                }
            }
            Some(Peer::IpBlock { cidr, except })
        }
        (None, true) => {
            let mut compile = |selector: &Option<_>, name: &str| match selector {
                None => Some(None),
                Some(selector) => match LabelMatcher::compile(selector) {
                    Ok(m) => Some(Some(m)),
                    Err(message) => {
                        error(&format!("{field}.{name}"), message);
                        None
                    }
                },
            };
            let namespaces = compile(&peer.namespace_selector, "namespaceSelector")?;
            let pods = compile(&peer.pod_selector, "podSelector")?;
            Some(Peer::Pods { namespaces, pods })
        }
    }
}

fn compile_port(port: &NetworkPolicyPort, field: &str, error: &mut impl FnMut(&str, String)) -> Option<PortMatch> {
    let protocol = match port.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(text) => match Protocol::parse(text) {
            Some(p) if p != Protocol::Icmp => p,
            _ => {
                error(&format!("{field}.protocol"), format!("unsupported protocol {text:?} (TCP, UDP or SCTP)"));
                return None;
            }
        },
    };
    let number = |value: i32, what: &str, error: &mut dyn FnMut(&str, String)| match u16::try_from(value) {
        Ok(n) if n >= 1 => Some(n),
        _ => {
            error(&format!("{field}.{what}"), format!("{value} is not a port number (1-65535)"));
            None
        }
    };
    let spec = match (&port.port, port.end_port) {
        (None, None) => PortSpec::All,
        (None, Some(_)) => {
            error(&format!("{field}.endPort"), "endPort requires port".into());
            return None;
        }
        (Some(IntOrString::String(name)), None) => match name.parse::<i32>() {
            // "80" in YAML as a string is still a number to the API server's IntOrString.
            Ok(value) => {
                let n = number(value, "port", error)?;
                PortSpec::Range { first: n, last: n }
            }
            Err(_) if name.is_empty() => {
                error(&format!("{field}.port"), "empty port name".into());
                return None;
            }
            Err(_) => PortSpec::Named(name.clone()),
        },
        (Some(IntOrString::String(_)), Some(_)) => {
            error(&format!("{field}.endPort"), "endPort cannot be used with a named port".into());
            return None;
        }
        (Some(IntOrString::Int(value)), end) => {
            let first = number(*value, "port", error)?;
            let last = match end {
                None => first,
                Some(end) => {
                    let last = number(end, "endPort", error)?;
                    if last < first {
                        error(&format!("{field}.endPort"), format!("endPort {last} is below port {first}"));
                        return None;
                    }
                    last
                }
            };
            PortSpec::Range { first, last }
        }
    };
    Some(PortMatch { protocol, port: spec })
}

/// Direction of a policy check, from the selected pod's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

/// The cluster as the semantics sees it. Keyed and indexed so that the agent can keep one
/// instance up to date event by event (see the `upsert_*`/`remove_*` methods) instead of
/// rebuilding it.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Labels>,
    /// By `namespace/name`.
    pub pods: BTreeMap<String, PodInfo>,
    /// By `namespace/name`.
    pub policies: BTreeMap<String, CompiledPolicy>,
    /// Addresses of each node, by node name (from Node objects' status.addresses).
    pub node_ips: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Pods (not host-network) by address, for `pod_by_ip`.
    pods_by_ip: BTreeMap<IpAddr, BTreeSet<String>>,
    /// Node addresses learnt from pods' hostIPs, with the number of pods reporting each.
    host_ips: BTreeMap<String, BTreeMap<IpAddr, usize>>,
    /// Namespaces annotated [`AUDIT_ANNOTATION`]` = "true"`: the agent runs their pods in audit
    /// mode. Not part of the semantics (a policy's verdict is the same); kept here so both
    /// sources carry it with the namespaces.
    pub audit_namespaces: BTreeSet<String>,
}

/// The Namespace annotation that puts the namespace's pods in audit mode when `"true"`.
pub const AUDIT_ANNOTATION: &str = "netsieve.io/audit";

/// Whether a Namespace object asks for audit mode.
pub fn namespace_audited(ns: &Namespace) -> bool {
    ns.metadata.annotations.as_ref().and_then(|a| a.get(AUDIT_ANNOTATION)).is_some_and(|v| v == "true")
}

/// Decodes a Kubernetes object into its typed form, listing the paths of fields the type does
/// not know (`spec.futureField`), which plain decoding drops silently.
pub fn decode_object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<(T, Vec<String>), serde_json::Error> {
    let mut unknown = Vec::new();
    // serde_ignored renders wrapper levels (Option, newtypes) as `?`; drop them.
    let object = serde_ignored::deserialize(value, |path| unknown.push(path.to_string().replace(".?", "")))?;
    Ok((object, unknown))
}

/// The labels of a Namespace object, with the automatic `kubernetes.io/metadata.name`.
pub fn namespace_labels(ns: &Namespace) -> Option<(String, Labels)> {
    let name = ns.metadata.name.clone()?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    // The API server sets this label on every namespace; manifests may omit it.
    labels.insert("kubernetes.io/metadata.name".into(), name.clone());
    Some((name, labels))
}

impl ClusterState {
    pub fn new(namespaces: &[Namespace], pods: &[Pod], policies: &[NetworkPolicy], nodes: &[Node]) -> ClusterState {
        let mut state = ClusterState::default();
        for ns in namespaces {
            if let Some((name, labels)) = namespace_labels(ns) {
                state.set_namespace_audit(&name, namespace_audited(ns));
                state.namespaces.insert(name, labels);
            }
        }
        for pod in pods {
            state.upsert_pod(PodInfo::from_object(pod));
        }
        for policy in policies {
            state.upsert_policy(CompiledPolicy::compile(policy));
        }
        // Namespaces referenced but not listed still exist with their automatic label.
        let referenced: Vec<String> = state
            .pods
            .values()
            .map(|p| p.namespace.clone())
            .chain(state.policies.values().map(|p| p.namespace.clone()))
            .collect();
        for name in referenced {
            state
                .namespaces
                .entry(name.clone())
                .or_insert_with(|| Labels::from([("kubernetes.io/metadata.name".to_string(), name)]));
        }
        for node in nodes {
            let Some(name) = node.metadata.name.clone() else { continue };
            let addresses = node.status.iter().flat_map(|s| s.addresses.iter().flatten());
            let ips = addresses.filter_map(|a| a.address.parse::<IpAddr>().ok()).collect();
            state.node_ips.insert(name, ips);
        }
        state
    }

    /// Inserts or replaces a pod; returns the previous version.
    pub fn upsert_pod(&mut self, pod: PodInfo) -> Option<PodInfo> {
        let key = pod.key();
        let old = self.remove_pod(&key);
        if !pod.host_network {
            for ip in &pod.ips {
                self.pods_by_ip.entry(*ip).or_default().insert(key.clone());
            }
        }
        if let Some(node) = &pod.node {
            let counts = self.host_ips.entry(node.clone()).or_default();
            for ip in &pod.host_ips {
                *counts.entry(*ip).or_default() += 1;
            }
        }
        self.pods.insert(key, pod);
        old
    }

    pub fn remove_pod(&mut self, key: &str) -> Option<PodInfo> {
        let old = self.pods.remove(key)?;
        for ip in &old.ips {
            if let Some(keys) = self.pods_by_ip.get_mut(ip) {
                keys.remove(key);
                if keys.is_empty() {
                    self.pods_by_ip.remove(ip);
                }
            }
        }
        if let Some(node) = &old.node
            && let Some(counts) = self.host_ips.get_mut(node)
        {
            for ip in &old.host_ips {
                if let Some(count) = counts.get_mut(ip) {
                    *count -= 1;
                    if *count == 0 {
                        counts.remove(ip);
                    }
                }
            }
            if counts.is_empty() {
                self.host_ips.remove(node);
            }
        }
        Some(old)
    }

    pub fn upsert_policy(&mut self, policy: CompiledPolicy) -> Option<CompiledPolicy> {
        self.policies.insert(policy.key(), policy)
    }

    pub fn remove_policy(&mut self, key: &str) -> Option<CompiledPolicy> {
        self.policies.remove(key)
    }

    pub fn upsert_namespace(&mut self, name: String, labels: Labels) -> Option<Labels> {
        self.namespaces.insert(name, labels)
    }

    pub fn remove_namespace(&mut self, name: &str) -> Option<Labels> {
        self.audit_namespaces.remove(name);
        self.namespaces.remove(name)
    }

    /// Records whether a namespace is annotated for audit mode; true if that changed.
    pub fn set_namespace_audit(&mut self, name: &str, audited: bool) -> bool {
        if audited { self.audit_namespaces.insert(name.to_string()) } else { self.audit_namespaces.remove(name) }
    }

    /// The addresses of a node: from its Node object and from the hostIPs its pods report.
    pub fn node_addresses(&self, node: &str) -> BTreeSet<IpAddr> {
        let mut ips = self.node_ips.get(node).cloned().unwrap_or_default();
        ips.extend(self.host_ips.get(node).into_iter().flat_map(|m| m.keys().copied()));
        ips
    }

    pub fn is_node_address(&self, node: &str, ip: &IpAddr) -> bool {
        self.node_ips.get(node).is_some_and(|ips| ips.contains(ip))
            || self.host_ips.get(node).is_some_and(|ips| ips.contains_key(ip))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.get(&format!("{namespace}/{name}"))
    }

    /// The pods (not host-network) that own an address; more than one only if the input is
    /// inconsistent, and then the last by key wins everywhere (semantics and dataplane).
    pub fn pods_with_ip(&self, ip: &IpAddr) -> impl Iterator<Item = &PodInfo> {
        self.pods_by_ip.get(ip).into_iter().flatten().filter_map(|k| self.pods.get(k))
    }

    /// The pod (not host-network) that owns an address.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.pods_with_ip(&ip).last()
    }

    /// The policies that select `pod` and cover `direction`.
    pub fn selecting(&self, pod: &PodInfo, direction: Direction) -> impl Iterator<Item = &CompiledPolicy> {
        self.policies.values().filter(move |p| p.selects(pod) && p.rules(direction).is_some())
    }

    /// Whether a peer entry of a policy in `policy_namespace` admits the endpoint.
    pub fn peer_matches(&self, peer: &Peer, policy_namespace: &str, endpoint: &FlowEndpoint) -> bool {
        match peer {
            Peer::IpBlock { cidr, except } => {
                cidr.contains(&endpoint.ip) && !except.iter().any(|e| e.contains(&endpoint.ip))
            }
            Peer::Pods { .. } => {
                let Some(pod) = endpoint.pod.as_ref().and_then(|k| self.pod_by_key(k)) else {
                    return false;
                };
                !pod.host_network && self.peer_selects_labels(peer, policy_namespace, &pod.namespace, &pod.labels)
            }
        }
    }

    /// Whether a selector-based peer admits pods of `namespace` with `labels` (an identity).
    /// Always false for ipBlock peers.
    pub fn peer_selects_labels(&self, peer: &Peer, policy_namespace: &str, namespace: &str, labels: &Labels) -> bool {
        let Peer::Pods { namespaces, pods } = peer else { return false };
        let namespace_ok = match namespaces {
            None => namespace == policy_namespace,
            Some(selector) => self.namespaces.get(namespace).is_some_and(|l| selector.matches(l)),
        };
        namespace_ok && pods.as_ref().is_none_or(|s| s.matches(labels))
    }

    fn pod_by_key(&self, key: &str) -> Option<&PodInfo> {
        self.pods.get(key)
    }

    /// Parses `NS/POD` or an IP address into a flow endpoint. An IP that belongs to a pod
    /// resolves to that pod.
    pub fn resolve(&self, text: &str) -> Result<FlowEndpoint, PolicyError> {
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(FlowEndpoint { ip, pod: self.pod_by_ip(ip).map(PodInfo::key) });
        }
        let (namespace, name) = text.split_once('/').ok_or_else(|| PolicyError::BadEndpoint(text.to_string()))?;
        let pod = self.pod(namespace, name).ok_or_else(|| PolicyError::UnknownPod(text.to_string()))?;
        let ip = *pod.ips.first().ok_or_else(|| PolicyError::PodWithoutIp(text.to_string(), String::new()))?;
        Ok(FlowEndpoint { ip, pod: Some(pod.key()) })
    }

    /// Builds a flow between two endpoints, choosing for pod endpoints the address of the same
    /// family as the other side.
    pub fn flow(
        &self,
        src: FlowEndpoint,
        dst: FlowEndpoint,
        protocol: Protocol,
        port: u16,
    ) -> Result<Flow, PolicyError> {
        let (src_ip, dst_ip) = (src.ip, dst.ip);
        let (src, dst) = (self.align_family(src, dst_ip)?, self.align_family(dst, src_ip)?);
        Ok(Flow { src, dst, protocol, port })
    }

    fn align_family(&self, endpoint: FlowEndpoint, other: IpAddr) -> Result<FlowEndpoint, PolicyError> {
        if endpoint.ip.is_ipv4() == other.is_ipv4() {
            return Ok(endpoint);
        }
        let Some(pod) = endpoint.pod.as_ref().and_then(|k| self.pod_by_key(k)) else {
            return Ok(endpoint);
        };
        let ip = pod.ips.iter().copied().find(|ip| ip.is_ipv4() == other.is_ipv4()).ok_or_else(|| {
            PolicyError::PodWithoutIp(pod.key(), format!(" of the family of {other}"))
        })?;
        Ok(FlowEndpoint { ip, pod: endpoint.pod })
    }
}

/// One side of a flow: an address, and the pod that owns it if any (`namespace/name`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEndpoint {
    pub ip: IpAddr,
    pub pod: Option<String>,
}

/// A connection attempt: `port` is the destination port (ignored for ICMP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub src: FlowEndpoint,
    pub dst: FlowEndpoint,
    pub protocol: Protocol,
    pub port: u16,
}

/// Where in a policy a flow was admitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleMatch {
    pub policy: String,
    pub rule_index: usize,
    /// `None` when the rule admits any peer.
    pub peer_index: Option<usize>,
    /// `None` when the rule admits every port.
    pub port_index: Option<usize>,
}

/// The verdict of one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionVerdict {
    /// The pod this direction is about, if that side of the flow is a pod.
    pub pod: Option<String>,
    pub isolated: bool,
    pub allowed: bool,
    /// Policies that select the pod and cover this direction.
    pub selecting_policies: Vec<String>,
    pub matched: Option<RuleMatch>,
    /// Errors of selecting policies: they made the pod fail closed.
    pub policy_errors: Vec<String>,
}

/// Kubernetes' stated exceptions that allow a flow whatever the policies say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exception {
    /// A pod can always reach itself.
    SelfTraffic,
    /// Traffic between a pod and the node it runs on.
    NodeTraffic,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    pub exception: Option<Exception>,
    pub egress: DirectionVerdict,
    pub ingress: DirectionVerdict,
}

/// Whether a port entry admits the flow; `resolver` is the destination pod (named ports).
fn port_matches(entry: &PortMatch, flow: &Flow, destination: Option<&PodInfo>) -> bool {
    if entry.protocol != flow.protocol {
        return false;
    }
    match &entry.port {
        PortSpec::All => true,
        PortSpec::Range { first, last } => (*first..=*last).contains(&flow.port),
        PortSpec::Named(name) => {
            destination.and_then(|pod| pod.resolve_named_port(name, flow.protocol)) == Some(flow.port)
        }
    }
}

/// Evaluates one direction of a flow for `pod` (the source for egress, the destination for
/// ingress).
pub fn evaluate_direction(state: &ClusterState, flow: &Flow, direction: Direction) -> DirectionVerdict {
    let (own, peer) = match direction {
        Direction::Egress => (&flow.src, &flow.dst),
        Direction::Ingress => (&flow.dst, &flow.src),
    };
    let pod = own.pod.as_ref().and_then(|k| state.pod_by_key(k));
    let mut verdict = DirectionVerdict {
        pod: own.pod.clone(),
        isolated: false,
        allowed: true,
        selecting_policies: Vec::new(),
        matched: None,
        policy_errors: Vec::new(),
    };
    let Some(pod) = pod else { return verdict };
    let destination = flow.dst.pod.as_ref().and_then(|k| state.pod_by_key(k));
    for policy in state.selecting(pod, direction) {
        verdict.isolated = true;
        verdict.selecting_policies.push(policy.key());
        verdict.policy_errors.extend(policy.errors.iter().map(ToString::to_string));
        if verdict.matched.is_some() {
            continue;
        }
        for (rule_index, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
            let peer_index = match &rule.peers {
                None => Some(None),
                Some(peers) => {
                    peers.iter().position(|p| state.peer_matches(p, &policy.namespace, peer)).map(Some)
                }
            };
            let port_index = match &rule.ports {
                None => Some(None),
                Some(ports) => ports.iter().position(|p| port_matches(p, flow, destination)).map(Some),
            };
            if let (Some(peer_index), Some(port_index)) = (peer_index, port_index) {
                verdict.matched = Some(RuleMatch { policy: policy.key(), rule_index, peer_index, port_index });
                break;
            }
        }
    }
    verdict.allowed = !verdict.isolated || verdict.matched.is_some();
    verdict
}

/// The exception that applies to a flow, if any.
pub fn exception(state: &ClusterState, flow: &Flow) -> Option<Exception> {
    if flow.src.pod.is_some() && flow.src.pod == flow.dst.pod {
        return Some(Exception::SelfTraffic);
    }
    let on_own_node = |pod: &FlowEndpoint, other: &FlowEndpoint| {
        let node = pod.pod.as_ref().and_then(|k| state.pod_by_key(k)).and_then(|p| p.node.as_ref());
        node.is_some_and(|n| state.is_node_address(n, &other.ip))
    };
    (on_own_node(&flow.src, &flow.dst) || on_own_node(&flow.dst, &flow.src)).then_some(Exception::NodeTraffic)
}

/// Says whether a flow is allowed and why. Replies of an allowed flow are allowed too
/// (NetworkPolicy is stateful); see [`reply_allowed`].
pub fn explain(state: &ClusterState, flow: &Flow) -> Verdict {
    let egress = evaluate_direction(state, flow, Direction::Egress);
    let ingress = evaluate_direction(state, flow, Direction::Ingress);
    let exception = exception(state, flow);
    Verdict { allowed: exception.is_some() || (egress.allowed && ingress.allowed), exception, egress, ingress }
}

/// A reply packet (destination to source) of `original` is allowed exactly when the original
/// flow is: policies are evaluated on connection establishment only.
pub fn reply_allowed(state: &ClusterState, original: &Flow) -> bool {
    explain(state, original).allowed
}

#[cfg(test)]
mod tests;
