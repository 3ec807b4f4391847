//! From the semantics module's view of the cluster to everything one node programs: the
//! ipcache (address -> identity) and, per local pod, the compiled policy of both directions.
//! Pure: the synchronizer writes the result.
//!
//! [`NodeCompiler`] keeps the compiled node up to date change by change. A change recompiles
//! only the local endpoints it can affect (see [`NodeCompiler::apply`]); each of those is
//! compiled from the whole current state, so an incremental result always equals a full
//! recompilation (tested on random change sequences).
use super::compile::{
    CompileError, DirectionInput, PeerInput, PortSetInput, RuleInput, RuleOrigin, compile_direction,
};
use super::lpm::{CidrSet, to_mapped};
pub use super::sync::Dirty;
use super::sync::{EndpointProgram, NodeProgram};
use crate::policy::{ClusterState, CompiledPolicy, Direction, FlowEndpoint, Labels, Peer, PodInfo, PortSpec, Rule};
use ipnet::{IpNet, Ipv6Net};
use netsieve_common::{IDENTITY_FIRST_POD, IDENTITY_HOST, IpcacheValue};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// A label set: what an identity stands for.
pub type LabelSet = (String, Labels);

/// Numeric identities of label sets, stable across recompilations so that an unrelated change
/// does not rewrite every endpoint. Two pods with the same namespace and labels are
/// indistinguishable to every selector, so they share an identity. Each identity counts the
/// selectable pods holding it; an identity lives while that count is positive.
///
/// Keyed by namespace, then labels, so that lookups (one per address on a full recompilation,
/// one per namespace a selector peer scans) borrow the pod's strings instead of cloning them.
#[derive(Debug, Default, Clone)]
pub struct IdentityAllocator {
    by_namespace: BTreeMap<String, BTreeMap<Labels, (u32, usize)>>,
    next: u32,
}

impl IdentityAllocator {
    /// The identity of a pod's label set, allocating one if needed (without counting the pod).
    pub fn identity(&mut self, pod: &PodInfo) -> u32 {
        if let Some(id) = self.get(&pod.namespace, &pod.labels) {
            return id;
        }
        let id = self.allocate();
        self.by_namespace.entry(pod.namespace.clone()).or_default().insert(pod.labels.clone(), (id, 0));
        id
    }

    fn allocate(&mut self) -> u32 {
        let id = self.next.max(IDENTITY_FIRST_POD);
        self.next = id + 1;
        id
    }

    pub fn get(&self, namespace: &str, labels: &Labels) -> Option<u32> {
        self.by_namespace.get(namespace)?.get(labels).map(|(id, _)| *id)
    }

    /// Counts one more selectable pod with this label set; true if the identity is new.
    fn acquire(&mut self, pod: &PodInfo) -> bool {
        if let Some((_, count)) = self.by_namespace.get_mut(&pod.namespace).and_then(|sets| sets.get_mut(&pod.labels)) {
            *count += 1;
            return *count == 1;
        }
        let id = self.allocate();
        self.by_namespace.entry(pod.namespace.clone()).or_default().insert(pod.labels.clone(), (id, 1));
        true
    }

    /// Counts one selectable pod less; true if the identity is gone.
    fn release(&mut self, pod: &PodInfo) -> bool {
        let Some(sets) = self.by_namespace.get_mut(&pod.namespace) else { return false };
        let Some((_, count)) = sets.get_mut(&pod.labels) else { return false };
        *count = count.saturating_sub(1);
        if *count == 0 {
            sets.remove(&pod.labels);
            if sets.is_empty() {
                self.by_namespace.remove(&pod.namespace);
            }
            return true;
        }
        false
    }

    /// Recounts from scratch: keeps the numbers of label sets still in use, forgets the rest.
    pub fn recount(&mut self, state: &ClusterState) {
        for sets in self.by_namespace.values_mut() {
            for (_, count) in sets.values_mut() {
                *count = 0;
            }
        }
        for pod in state.pods.values().filter(|p| p.selectable()) {
            self.acquire(pod);
        }
        for sets in self.by_namespace.values_mut() {
            sets.retain(|_, (_, count)| *count > 0);
        }
        self.by_namespace.retain(|_, sets| !sets.is_empty());
    }

    /// Live identities of one namespace: (labels, identity).
    pub fn live_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = (&'a Labels, u32)> + 'a {
        self.by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .filter(|(_, (_, count))| *count > 0)
            .map(|(labels, (id, _))| (labels, *id))
    }

    pub fn len(&self) -> usize {
        self.by_namespace.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_namespace.is_empty()
    }
}

/// Why a local endpoint was programmed fail-closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointFailure {
    pub pod: String,
    pub direction: Direction,
    pub error: CompileError,
}

/// Result of compiling one node.
#[derive(Debug, Default, Clone)]
pub struct CompiledNode {
    pub program: NodeProgram,
    pub failures: Vec<EndpointFailure>,
    /// Local pods that have no interface yet (not enforced until it appears).
    pub waiting_for_interface: Vec<String>,
}

fn host_net(ip: IpAddr) -> Ipv6Net {
    to_mapped(IpNet::from(ip))
}

fn endpoint_of(pod: &PodInfo, ip: IpAddr) -> FlowEndpoint {
    FlowEndpoint { ip, pod: Some(pod.key()) }
}

/// Pods a selector-based peer could ever admit: not host-network, with an address.
fn selectable(state: &ClusterState) -> impl Iterator<Item = &PodInfo> {
    state.pods.values().filter(|p| p.selectable())
}

/// Resolves the rules of one direction of one pod into compiler input. Selector peers resolve
/// to the live identities of `ids` (which must be counted for `state`).
pub fn direction_input(state: &ClusterState, ids: &IdentityAllocator, pod: &PodInfo, direction: Direction) -> DirectionInput {
    let mut input = DirectionInput::default();
    for policy in state.selecting(pod, direction) {
        input.isolated = true;
        for (rule_index, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
            let origin = RuleOrigin { policy: policy.key(), rule_index };
            translate_rule(state, ids, pod, direction, &policy.namespace, rule, origin, &mut input.rules);
        }
    }
    input
}

#[allow(clippy::too_many_arguments)]
fn translate_rule(
    state: &ClusterState,
    ids: &IdentityAllocator,
    own: &PodInfo,
    direction: Direction,
    policy_namespace: &str,
    rule: &Rule,
    origin: RuleOrigin,
    out: &mut Vec<RuleInput>,
) {
    let peers: Vec<PeerInput> = match &rule.peers {
        None => vec![PeerInput::AnyAddress],
        Some(list) => list
            .iter()
            .map(|peer| match peer {
                Peer::IpBlock { cidr, except } => PeerInput::Cidr(CidrSet {
                    net: to_mapped(*cidr),
                    except: except.iter().map(|e| to_mapped(*e)).collect(),
                }),
                Peer::Pods { namespaces, .. } => {
                    // Only the namespaces the peer can admit are scanned: its own, or those
                    // its namespaceSelector matches.
                    let candidates: Vec<&str> = match namespaces {
                        None => vec![policy_namespace],
                        Some(selector) => {
                            state.namespaces.iter().filter(|(_, l)| selector.matches(l)).map(|(n, _)| n.as_str()).collect()
                        }
                    };
                    PeerInput::Identities(
                        candidates
                            .into_iter()
                            .flat_map(|namespace| {
                                ids.live_in(namespace)
                                    .filter(move |(labels, _)| {
                                        state.peer_selects_labels(peer, policy_namespace, namespace, labels)
                                    })
                                    .map(|(_, id)| id)
                            })
                            .collect(),
                    )
                }
            })
            .collect(),
    };
    let Some(ports) = &rule.ports else {
        out.push(RuleInput { peers, ports: PortSetInput::AllProtocols, origin });
        return;
    };
    let mut numeric = BTreeSet::new();
    for entry in ports {
        let protocol = entry.protocol.number();
        match &entry.port {
            PortSpec::All => {
                numeric.insert((protocol, 0, u16::MAX));
            }
            PortSpec::Range { first, last } => {
                numeric.insert((protocol, *first, *last));
            }
            PortSpec::Named(name) => match direction {
                // Ingress: the destination is the pod itself.
                Direction::Ingress => {
                    if let Some(port) = own.resolve_named_port(name, entry.protocol) {
                        numeric.insert((protocol, port, port));
                    }
                }
                // Egress: the number depends on the destination pod, so the rule becomes one
                // rule per number, admitting exactly the addresses of the rule's peers that
                // declare the name with that number. Non-pod destinations never match.
                Direction::Egress => {
                    let mut by_number: BTreeMap<u16, BTreeSet<IpAddr>> = BTreeMap::new();
                    for candidate in selectable(state) {
                        let Some(port) = candidate.resolve_named_port(name, entry.protocol) else { continue };
                        for ip in &candidate.ips {
                            let admitted = match &rule.peers {
                                None => true,
                                Some(list) => list
                                    .iter()
                                    .any(|p| state.peer_matches(p, policy_namespace, &endpoint_of(candidate, *ip))),
                            };
                            if admitted {
                                by_number.entry(port).or_default().insert(*ip);
                            }
                        }
                    }
                    for (port, addresses) in by_number {
                        out.push(RuleInput {
                            peers: vec![PeerInput::Addresses(addresses)],
                            ports: PortSetInput::Ranges([(protocol, port, port)].into()),
                            origin: origin.clone(),
                        });
                    }
                }
            },
        }
    }
    if !numeric.is_empty() {
        out.push(RuleInput { peers, ports: PortSetInput::Ranges(numeric), origin });
    }
}

/// One change to the cluster, with the versions before and after (both already applied to the
/// [`ClusterState`] passed alongside).
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterChange {
    Pod { old: Option<PodInfo>, new: Option<PodInfo> },
    Namespace { name: String, old: Option<Labels>, new: Option<Labels> },
    Policy { old: Option<CompiledPolicy>, new: Option<CompiledPolicy> },
    /// Node objects changed (manifests mode): node addresses may have moved.
    Nodes,
}

/// Applies a whole new state to `state` and returns the changes that lead there: the
/// manifests source reloads everything and still programs only what changed.
pub fn replace_state(state: &mut ClusterState, target: ClusterState) -> Vec<ClusterChange> {
    let mut changes = Vec::new();
    let old_names: Vec<String> = state.namespaces.keys().filter(|k| !target.namespaces.contains_key(*k)).cloned().collect();
    for name in old_names {
        let old = state.remove_namespace(&name);
        changes.push(ClusterChange::Namespace { name, old, new: None });
    }
    for (name, labels) in &target.namespaces {
        if state.namespaces.get(name) != Some(labels) {
            let old = state.upsert_namespace(name.clone(), labels.clone());
            changes.push(ClusterChange::Namespace { name: name.clone(), old, new: Some(labels.clone()) });
        }
    }
    let gone: Vec<String> = state.pods.keys().filter(|k| !target.pods.contains_key(*k)).cloned().collect();
    for key in gone {
        let old = state.remove_pod(&key);
        changes.push(ClusterChange::Pod { old, new: None });
    }
    for (key, pod) in &target.pods {
        if state.pods.get(key) != Some(pod) {
            let old = state.upsert_pod(pod.clone());
            changes.push(ClusterChange::Pod { old, new: Some(pod.clone()) });
        }
    }
    let gone: Vec<String> = state.policies.keys().filter(|k| !target.policies.contains_key(*k)).cloned().collect();
    for key in gone {
        let old = state.remove_policy(&key);
        changes.push(ClusterChange::Policy { old, new: None });
    }
    for (key, policy) in &target.policies {
        if state.policies.get(key) != Some(policy) {
            let old = state.upsert_policy(policy.clone());
            changes.push(ClusterChange::Policy { old, new: Some(policy.clone()) });
        }
    }
    if state.node_ips != target.node_ips {
        state.node_ips = target.node_ips;
        changes.push(ClusterChange::Nodes);
    }
    // Not a change the compiler applies: the controller compares audit modes after it.
    state.audit_namespaces = target.audit_namespaces;
    changes
}

/// Where audit mode applies: would-be policy drops pass, counted and reported as `audit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditMode {
    /// Every local pod (`--audit`).
    pub node_wide: bool,
    /// Pods of these namespaces (annotated `netsieve.io/audit: "true"`).
    pub namespaces: BTreeSet<String>,
}

impl AuditMode {
    pub fn covers(&self, namespace: &str) -> bool {
        self.node_wide || self.namespaces.contains(namespace)
    }
}

/// The compiled state of one node, kept up to date change by change.
#[derive(Debug, Clone)]
pub struct NodeCompiler {
    node: String,
    allow_host: bool,
    audit: AuditMode,
    /// The node's own interface addresses: node addresses besides those the Node object and
    /// pods' hostIPs give.
    local_addresses: BTreeSet<IpAddr>,
    ids: IdentityAllocator,
    program: NodeProgram,
    /// Compilation failures by local pod.
    failures: BTreeMap<String, Vec<EndpointFailure>>,
    /// Local selectable pods, with their interface index once known.
    local: BTreeMap<String, Option<u32>>,
    /// Interfaces attached before their pod is known as a local pod with an address (CNI ADD
    /// ahead of the Pod object), by pod key: programmed fail-closed until it is.
    /// Interfaces (and the addresses the CNI result gave) programmed fail-closed until their
    /// pod is known.
    placeholders: BTreeMap<String, (u32, Vec<IpAddr>)>,
    /// Keys of the policies with an egress rule on a named port: the only ones a change of
    /// pods' named ports can affect. Most pods declare named ports, so without this every pod
    /// event would look at every policy.
    named_port_policies: BTreeSet<String>,
}

/// Whether a policy has an egress rule on a named port (resolved to destination addresses).
fn has_egress_named_port(policy: &CompiledPolicy) -> bool {
    policy.rules(Direction::Egress).unwrap_or_default().iter().any(|rule| {
        rule.ports.iter().flatten().any(|p| matches!(p.port, PortSpec::Named(_)))
    })
}

impl NodeCompiler {
    pub fn new(node: &str, allow_host: bool) -> NodeCompiler {
        NodeCompiler {
            node: node.to_string(),
            allow_host,
            audit: AuditMode::default(),
            local_addresses: BTreeSet::new(),
            ids: IdentityAllocator::default(),
            program: NodeProgram::default(),
            failures: BTreeMap::new(),
            local: BTreeMap::new(),
            placeholders: BTreeMap::new(),
            named_port_policies: BTreeSet::new(),
        }
    }

    /// Programs interface `ifindex` for pod `key` fail-closed (drops everything but node
    /// traffic when node traffic is allowed) for as long as the pod is not a local pod with
    /// an interface; `None` stops. The pod's own program, once it can be compiled, takes over
    /// the same key.
    /// `ips` are the pod's addresses from the CNI result: the placeholder lets the pod send
    /// from them (to the node, its only allowed peer) and nothing else.
    pub fn set_placeholder(&mut self, state: &ClusterState, key: &str, ifindex: Option<u32>, ips: &[IpAddr]) -> Dirty {
        match ifindex {
            Some(ifindex) => self.placeholders.insert(key.to_string(), (ifindex, ips.to_vec())),
            None => self.placeholders.remove(key),
        };
        let mut dirty = Dirty::default();
        self.recompile_endpoint(state, key, &mut dirty);
        dirty
    }

    /// Whether `key` is programmed as a placeholder (not from its pod's policies).
    pub fn is_placeholder(&self, key: &str) -> bool {
        self.placeholders.contains_key(key) && !matches!(self.local.get(key), Some(Some(_)))
    }

    /// Pod keys with a placeholder, and its interface.
    pub fn placeholders(&self) -> impl Iterator<Item = (&String, &u32)> {
        self.placeholders.iter().map(|(key, (ifindex, _))| (key, ifindex))
    }

    pub fn program(&self) -> &NodeProgram {
        &self.program
    }

    pub fn local_addresses(&self) -> &BTreeSet<IpAddr> {
        &self.local_addresses
    }

    /// Replaces the node's own interface addresses; refreshes the ipcache entries concerned.
    pub fn set_local_addresses(&mut self, state: &ClusterState, addresses: &BTreeSet<IpAddr>) -> Dirty {
        let mut dirty = Dirty::default();
        let changed: BTreeSet<IpAddr> = self.local_addresses.symmetric_difference(addresses).copied().collect();
        self.local_addresses = addresses.clone();
        for ip in changed {
            self.refresh_ipcache(state, ip, &mut dirty);
        }
        dirty
    }

    pub fn audit(&self) -> &AuditMode {
        &self.audit
    }

    /// Changes where audit mode applies; recompiles the local endpoints whose mode changed.
    pub fn set_audit(&mut self, state: &ClusterState, audit: AuditMode) -> Dirty {
        let mut dirty = Dirty::default();
        let changed: Vec<String> = self
            .local
            .keys()
            .filter(|key| {
                state.pods.get(*key).is_some_and(|pod| self.audit.covers(&pod.namespace) != audit.covers(&pod.namespace))
            })
            .cloned()
            .collect();
        self.audit = audit;
        for key in changed {
            self.recompile_endpoint(state, &key, &mut dirty);
        }
        dirty
    }

    pub fn identities(&self) -> &IdentityAllocator {
        &self.ids
    }

    pub fn failures(&self) -> impl Iterator<Item = &EndpointFailure> {
        self.failures.values().flatten()
    }

    /// Local pods that have no interface yet (not enforced until it appears).
    pub fn waiting_for_interface(&self) -> impl Iterator<Item = &String> {
        self.local.iter().filter(|(_, i)| i.is_none()).map(|(k, _)| k)
    }

    /// Local pods with an address, whether or not their interface is known.
    pub fn local_pods(&self) -> impl Iterator<Item = &String> {
        self.local.keys()
    }

    fn is_local(&self, pod: &PodInfo) -> bool {
        pod.selectable() && pod.node.as_deref() == Some(self.node.as_str())
    }

    /// Compiles everything from scratch (identity numbers of label sets still in use are kept).
    pub fn full(&mut self, state: &ClusterState, interface_of: &dyn Fn(&PodInfo) -> Option<u32>) -> Dirty {
        self.ids.recount(state);
        self.named_port_policies =
            state.policies.iter().filter(|(_, p)| has_egress_named_port(p)).map(|(key, _)| key.clone()).collect();
        let mut dirty = Dirty::default();
        let mut addresses: BTreeSet<IpAddr> = self.program.ipcache.keys().filter_map(|n| from_host_net(*n)).collect();
        addresses.extend(selectable(state).flat_map(|p| p.ips.iter().copied()));
        addresses.extend(state.node_addresses(&self.node));
        addresses.extend(self.local_addresses.iter().copied());
        for ip in addresses {
            self.refresh_ipcache(state, ip, &mut dirty);
        }
        let mut endpoints: BTreeSet<String> = self.local.keys().cloned().collect();
        self.local = selectable(state).filter(|p| self.is_local(p)).map(|p| (p.key(), interface_of(p))).collect();
        endpoints.extend(self.local.keys().cloned());
        endpoints.extend(self.placeholders.keys().cloned());
        for key in endpoints {
            self.recompile_endpoint(state, &key, &mut dirty);
        }
        dirty
    }

    /// Re-reads the interface of every local pod; recompiles those whose interface changed.
    pub fn refresh_interfaces(&mut self, state: &ClusterState, interface_of: &dyn Fn(&PodInfo) -> Option<u32>) -> Dirty {
        let mut dirty = Dirty::default();
        let changed: Vec<(String, Option<u32>)> = self
            .local
            .iter()
            .filter_map(|(key, current)| {
                let now = state.pods.get(key).and_then(interface_of);
                (now != *current).then(|| (key.clone(), now))
            })
            .collect();
        for (key, interface) in changed {
            self.local.insert(key.clone(), interface);
            self.recompile_endpoint(state, &key, &mut dirty);
        }
        dirty
    }

    /// Applies changes already made to `state`. Which local endpoints are recompiled:
    /// - a local pod that changed (its labels decide its policies; its named ports its ingress);
    /// - every endpoint selected by a policy before or after its change;
    /// - when a label set gains its first or loses its last pod (an identity appears or goes),
    ///   the endpoints selected by a policy with a selector peer that admits that label set;
    /// - when namespace labels change, the endpoints selected by a policy with a
    ///   namespaceSelector whose verdict on that namespace changed;
    /// - when a pod declaring named ports changes in a way that matters to them, the endpoints
    ///   selected by a policy with egress named-port rules (those resolve to pod addresses,
    ///   not identities).
    ///
    /// A pod that only changes address keeps its identity: only the ipcache changes.
    pub fn apply(
        &mut self,
        state: &ClusterState,
        changes: &[ClusterChange],
        interface_of: &dyn Fn(&PodInfo) -> Option<u32>,
    ) -> Dirty {
        let mut dirty = Dirty::default();
        let mut recompile: BTreeSet<String> = BTreeSet::new();
        let mut churn = Churn::default();
        let mut addresses: BTreeSet<IpAddr> = BTreeSet::new();
        for change in changes {
            match change {
                ClusterChange::Pod { old, new } => {
                    for pod in old.iter().filter(|p| p.selectable()) {
                        if self.ids.release(pod) {
                            churn.identities.push((pod.namespace.clone(), pod.labels.clone()));
                        }
                    }
                    for pod in new.iter().filter(|p| p.selectable()) {
                        if self.ids.acquire(pod) {
                            churn.identities.push((pod.namespace.clone(), pod.labels.clone()));
                        }
                    }
                    // Egress named ports resolve to the addresses of the pods declaring them.
                    let resolution = |p: &PodInfo| (p.selectable(), p.ips.clone(), p.named_ports.clone(), p.labels.clone());
                    let declares = old.iter().chain(new.iter()).any(|p| !p.named_ports.is_empty());
                    if declares && old.as_ref().map(resolution) != new.as_ref().map(resolution) {
                        churn.named_ports = true;
                    }
                    for pod in old.iter().chain(new.iter()) {
                        addresses.extend(pod.ips.iter().copied());
                        addresses.extend(pod.host_ips.iter().copied());
                        recompile.insert(pod.key());
                    }
                    if let Some(pod) = new.as_ref().filter(|p| self.is_local(p)) {
                        let interface = interface_of(pod);
                        self.local.insert(pod.key(), interface);
                    } else if let Some(pod) = old.as_ref().or(new.as_ref()) {
                        self.local.remove(&pod.key());
                    }
                }
                ClusterChange::Namespace { old, new, .. } => {
                    if old != new {
                        churn.namespaces.push((old.clone(), new.clone()));
                    }
                }
                ClusterChange::Policy { old, new } => {
                    if let Some(policy) = old {
                        self.named_port_policies.remove(&policy.key());
                    }
                    if let Some(policy) = new.as_ref().filter(|p| has_egress_named_port(p)) {
                        self.named_port_policies.insert(policy.key());
                    }
                    for policy in old.iter().chain(new.iter()) {
                        for key in self.local.keys() {
                            if state.pods.get(key).is_some_and(|p| policy.selects(p)) {
                                recompile.insert(key.clone());
                            }
                        }
                    }
                }
                ClusterChange::Nodes => {
                    addresses.extend(self.program.ipcache.keys().filter_map(|n| from_host_net(*n)));
                    addresses.extend(state.node_addresses(&self.node));
                }
            }
        }
        if !churn.is_empty() {
            // Policies first (their number bounds the work), then the local pods they select.
            // A change of named ports alone (a pod declaring them came, went or moved) can only
            // affect the policies with egress named-port rules.
            let affected: Vec<&CompiledPolicy> = if churn.identities.is_empty() && churn.namespaces.is_empty() {
                self.named_port_policies.iter().filter_map(|key| state.policies.get(key)).filter(|p| churn.affects(state, p)).collect()
            } else {
                state.policies.values().filter(|p| churn.affects(state, p)).collect()
            };
            if !affected.is_empty() {
                for key in self.local.keys() {
                    if recompile.contains(key) {
                        continue;
                    }
                    if state.pods.get(key).is_some_and(|pod| affected.iter().any(|p| p.selects(pod))) {
                        recompile.insert(key.clone());
                    }
                }
            }
        }
        for ip in addresses {
            self.refresh_ipcache(state, ip, &mut dirty);
        }
        for key in recompile {
            self.recompile_endpoint(state, &key, &mut dirty);
        }
        dirty
    }

    /// Sets the ipcache entry of one address from the current state: the node's own addresses
    /// are the host identity (they win over a misconfigured pod claiming one), else the last
    /// selectable pod by key owning it, else no entry (world).
    fn refresh_ipcache(&mut self, state: &ClusterState, ip: IpAddr, dirty: &mut Dirty) {
        let net = host_net(ip);
        let value = if state.is_node_address(&self.node, &ip) || self.local_addresses.contains(&ip) {
            Some(IpcacheValue { identity: IDENTITY_HOST, flags: 0 })
        } else {
            state
                .pods_with_ip(&ip)
                .filter(|p| p.selectable())
                .last()
                .and_then(|p| self.ids.get(&p.namespace, &p.labels))
                .map(|identity| IpcacheValue { identity, flags: 0 })
        };
        let changed = match value {
            Some(value) => self.program.ipcache.insert(net, value) != Some(value),
            None => self.program.ipcache.remove(&net).is_some(),
        };
        if changed {
            dirty.ipcache.insert(net);
        }
    }

    /// Recompiles one endpoint from the whole state; removes it if it is no longer a local pod
    /// with an interface.
    fn recompile_endpoint(&mut self, state: &ClusterState, key: &str, dirty: &mut Dirty) {
        let ifindex = self.local.get(key).copied().flatten();
        let pod = state.pods.get(key).filter(|p| self.is_local(p));
        let (Some(pod), Some(ifindex)) = (pod, ifindex) else {
            self.failures.remove(key);
            if let Some((ifindex, ips)) = self.placeholders.get(key) {
                let (ipv4, ipv6) = own_addresses(ips);
                let program = EndpointProgram {
                    ifindex: *ifindex,
                    allow_host: self.allow_host,
                    ipv4,
                    ipv6,
                    ..Default::default()
                }
                .failed_closed();
                if self.program.endpoints.get(key) != Some(&program) {
                    self.program.endpoints.insert(key.to_string(), program);
                    dirty.endpoints.insert(key.to_string());
                }
                return;
            }
            if self.program.endpoints.remove(key).is_some() {
                dirty.endpoints.insert(key.to_string());
            }
            return;
        };
        let Some(identity) = self.ids.get(&pod.namespace, &pod.labels) else {
            // Unreachable while counts are consistent; failing closed is the safe answer.
            tracing::error!(pod = %key, "local pod has no identity: endpoint fails closed");
            return;
        };
        let mut program = EndpointProgram {
            ifindex,
            identity,
            allow_host: self.allow_host,
            audit: self.audit.covers(&pod.namespace),
            ipv4: own_addresses(&pod.ips).0,
            ipv6: own_addresses(&pod.ips).1,
            ..Default::default()
        };
        let mut failures = Vec::new();
        for direction in [Direction::Ingress, Direction::Egress] {
            let input = direction_input(state, &self.ids, pod, direction);
            let entries = match compile_direction(&input) {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::error!(pod = %key, ?direction, %error, "cannot compile policy: endpoint fails closed");
                    failures.push(EndpointFailure { pod: key.to_string(), direction, error });
                    program.fail_closed = true;
                    Default::default()
                }
            };
            match direction {
                Direction::Ingress => program.ingress = entries,
                Direction::Egress => program.egress = entries,
            }
        }
        if program.fail_closed {
            program = program.failed_closed();
        }
        if failures.is_empty() {
            self.failures.remove(key);
        } else {
            self.failures.insert(key.to_string(), failures);
        }
        if self.program.endpoints.get(key) != Some(&program) {
            self.program.endpoints.insert(key.to_string(), program);
            dirty.endpoints.insert(key.to_string());
        }
    }
}

/// What a batch of changes did to the inputs that selector peers resolve against.
#[derive(Default)]
struct Churn {
    /// Label sets that gained their first or lost their last pod.
    identities: Vec<LabelSet>,
    /// Namespace labels before and after.
    namespaces: Vec<(Option<Labels>, Option<Labels>)>,
    named_ports: bool,
}

impl Churn {
    fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.namespaces.is_empty() && !self.named_ports
    }

    /// Whether the resolved peers of `policy` can differ because of this churn.
    fn affects(&self, state: &ClusterState, policy: &CompiledPolicy) -> bool {
        [Direction::Ingress, Direction::Egress].into_iter().any(|direction| {
            policy.rules(direction).unwrap_or_default().iter().any(|rule| {
                let named = self.named_ports
                    && direction == Direction::Egress
                    && rule.ports.iter().flatten().any(|p| matches!(p.port, PortSpec::Named(_)));
                named
                    || rule.peers.iter().flatten().any(|peer| {
                        let Peer::Pods { namespaces, .. } = peer else { return false };
                        let namespace_flipped = namespaces.as_ref().is_some_and(|selector| {
                            self.namespaces.iter().any(|(old, new)| {
                                old.as_ref().is_some_and(|l| selector.matches(l))
                                    != new.as_ref().is_some_and(|l| selector.matches(l))
                            })
                        });
                        namespace_flipped
                            || self.identities.iter().any(|(namespace, labels)| {
                                state.peer_selects_labels(peer, &policy.namespace, namespace, labels)
                            })
                    })
            })
        })
    }
}

/// A pod's IPv4 and IPv6 address (Kubernetes gives a pod at most one of each family).
fn own_addresses(ips: &[IpAddr]) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
    let ipv4 = ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let ipv6 = ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    (ipv4, ipv6)
}

fn from_host_net(net: Ipv6Net) -> Option<IpAddr> {
    let ip = net.addr();
    Some(match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    })
}

/// Compiles everything `node` enforces. `interface_of` gives the host-side ifindex of a local
/// pod, or None while its interface is not known.
pub fn compile_node(
    state: &ClusterState,
    ids: &mut IdentityAllocator,
    node: &str,
    allow_host: bool,
    interface_of: &dyn Fn(&PodInfo) -> Option<u32>,
) -> CompiledNode {
    let mut compiler = NodeCompiler::new(node, allow_host);
    compiler.ids = std::mem::take(ids);
    compiler.full(state, interface_of);
    *ids = compiler.ids.clone();
    CompiledNode {
        failures: compiler.failures().cloned().collect(),
        waiting_for_interface: compiler.waiting_for_interface().cloned().collect(),
        program: compiler.program,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Flow, Protocol, evaluate_direction};
    use netsieve_tests::scenario::{INTERESTING_PORTS, Scenario, ScenarioParams};
    use netsieve_common::IDENTITY_WORLD;

    /// The compiled entries, evaluated as the kernel does, agree with the semantics module on
    /// every (endpoint, direction, peer, protocol, port) of many random clusters.
    #[test]
    fn compiled_entries_agree_with_semantics_on_random_clusters() {
        let mut checked = 0usize;
        for seed in 0..60u64 {
            let params = ScenarioParams { namespaces: 3, pods_per_namespace: 4, policies: 6, nodes: 2 };
            let scenario = Scenario::generate(seed, params).expect("scenario");
            let state = ClusterState::new(&scenario.namespaces, &scenario.pods, &scenario.policies, &[]);
            let mut ids = IdentityAllocator::default();
            let mut compiled = Vec::new();
            for node in ["node0", "node1"] {
                let index: BTreeMap<String, u32> =
                    state.pods.values().enumerate().map(|(i, p)| (p.key(), 100 + i as u32)).collect();
                let c = compile_node(&state, &mut ids, node, true, &|p| index.get(&p.key()).copied());
                assert!(c.failures.is_empty(), "{:?}", c.failures);
                compiled.push(c);
            }
            let ipcache = &compiled[0].program.ipcache;
            let identity_of = |ip: IpAddr| {
                ipcache.get(&host_net(ip)).map_or(IDENTITY_WORLD, |v| v.identity)
            };
            let mut peers: Vec<FlowEndpoint> = Vec::new();
            for pod in state.pods.values() {
                for ip in &pod.ips {
                    peers.push(endpoint_of(pod, *ip));
                }
            }
            peers.extend(scenario.outside_ips.iter().map(|ip| FlowEndpoint { ip: *ip, pod: None }));
            for pod in state.pods.values() {
                let endpoint = compiled
                    .iter()
                    .find_map(|c| c.program.endpoints.get(&pod.key()))
                    .expect("every pod is local to one node");
                for own_ip in &pod.ips {
                    let own = endpoint_of(pod, *own_ip);
                    for peer in peers.iter().filter(|p| p.ip.is_ipv4() == own_ip.is_ipv4()) {
                        for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Icmp] {
                            for &port in INTERESTING_PORTS {
                                for (direction, entries) in
                                    [(Direction::Egress, &endpoint.egress), (Direction::Ingress, &endpoint.ingress)]
                                {
                                    let (src, dst) = match direction {
                                        Direction::Egress => (own.clone(), peer.clone()),
                                        Direction::Ingress => (peer.clone(), own.clone()),
                                    };
                                    let flow = Flow { src, dst, protocol, port };
                                    let expected = evaluate_direction(&state, &flow, direction).allowed;
                                    let policy_port = if protocol == Protocol::Icmp { 0 } else { port };
                                    let got = entries.allows(identity_of(peer.ip), peer.ip, protocol.number(), policy_port);
                                    assert_eq!(got, expected, "seed {seed} {direction:?} {flow:?}");
                                    checked += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 100_000, "only {checked} checks");
    }

    #[test]
    fn identities_are_shared_by_equal_label_sets_and_stable() {
        let scenario = Scenario::generate(1, ScenarioParams::default()).expect("scenario");
        let state = ClusterState::new(&scenario.namespaces, &scenario.pods, &scenario.policies, &[]);
        let mut ids = IdentityAllocator::default();
        let first: Vec<u32> = state.pods.values().map(|p| ids.identity(p)).collect();
        let again: Vec<u32> = state.pods.values().map(|p| ids.identity(p)).collect();
        assert_eq!(first, again);
        for (a, pa) in first.iter().zip(state.pods.values()) {
            for (b, pb) in first.iter().zip(state.pods.values()) {
                assert_eq!(a == b, pa.namespace == pb.namespace && pa.labels == pb.labels);
            }
        }
        assert!(first.iter().all(|id| *id >= IDENTITY_FIRST_POD));
    }

    fn random_change(rng: &mut rand::rngs::StdRng, state: &mut ClusterState, other: &ClusterState) -> ClusterChange {
        use rand::Rng;
        use rand::seq::IteratorRandom;
        let pick = |rng: &mut rand::rngs::StdRng, keys: Vec<&String>| keys.into_iter().choose(rng).cloned();
        match rng.random_range(0..7) {
            // A pod takes the labels (or the addresses) of its namesake in the other cluster.
            0 | 1 => {
                let Some(key) = pick(rng, state.pods.keys().collect()) else { return ClusterChange::Nodes };
                let mut pod = state.pods[&key].clone();
                if let Some(twin) = other.pods.get(&key) {
                    if rng.random_bool(0.7) {
                        pod.labels = twin.labels.clone();
                    } else {
                        pod.ips = twin.ips.clone();
                    }
                }
                if rng.random_bool(0.2) {
                    pod.labels.insert("fresh".into(), rng.random_range(0..3).to_string());
                }
                let old = state.upsert_pod(pod.clone());
                ClusterChange::Pod { old, new: Some(pod) }
            }
            // A pod goes, or comes back.
            2 => {
                let key = pick(rng, other.pods.keys().collect()).unwrap_or_default();
                if let Some(old) = state.remove_pod(&key) {
                    ClusterChange::Pod { old: Some(old), new: None }
                } else {
                    let pod = other.pods[&key].clone();
                    let old = state.upsert_pod(pod.clone());
                    ClusterChange::Pod { old, new: Some(pod) }
                }
            }
            // Namespace labels change.
            3 => {
                let Some(name) = pick(rng, state.namespaces.keys().collect()) else { return ClusterChange::Nodes };
                let mut labels = other.namespaces.get(&name).cloned().unwrap_or_default();
                if rng.random_bool(0.5) {
                    labels.insert("team".into(), ["a", "b", "c"][rng.random_range(0..3)].into());
                }
                let old = state.upsert_namespace(name.clone(), labels.clone());
                ClusterChange::Namespace { name, old, new: Some(labels) }
            }
            // A policy is edited (takes the other cluster's version), deleted or restored.
            4 | 5 => {
                let key = pick(rng, other.policies.keys().chain(state.policies.keys()).collect()).unwrap_or_default();
                match (state.policies.contains_key(&key), other.policies.get(&key)) {
                    (true, Some(twin)) if rng.random_bool(0.5) => {
                        let old = state.upsert_policy(twin.clone());
                        ClusterChange::Policy { old, new: Some(twin.clone()) }
                    }
                    (true, _) => ClusterChange::Policy { old: state.remove_policy(&key), new: None },
                    (false, Some(twin)) => {
                        let old = state.upsert_policy(twin.clone());
                        ClusterChange::Policy { old, new: Some(twin.clone()) }
                    }
                    (false, None) => ClusterChange::Nodes,
                }
            }
            // A pod moves to the other node.
            _ => {
                let Some(key) = pick(rng, state.pods.keys().collect()) else { return ClusterChange::Nodes };
                let mut pod = state.pods[&key].clone();
                pod.node = Some(if pod.node.as_deref() == Some("node0") { "node1" } else { "node0" }.to_string());
                let old = state.upsert_pod(pod.clone());
                ClusterChange::Pod { old, new: Some(pod) }
            }
        }
    }

    /// Random change sequences: after every batch the incrementally maintained program equals a
    /// full recompilation, and syncing only what the compiler reported dirty leaves nothing for
    /// a full sync to do.
    #[test]
    fn incremental_compilation_equals_full_recompilation() {
        use crate::dataplane::sync::{ModelMaps, Synchronizer};
        use rand::{Rng, SeedableRng};
        let mut batches = 0;
        let mut recompiled = 0usize;
        let mut possible = 0usize;
        for seed in 0..40u64 {
            let params = ScenarioParams { namespaces: 3, pods_per_namespace: 5, policies: 6, nodes: 2 };
            let a = Scenario::generate(seed, params).expect("scenario");
            let b = Scenario::generate(seed + 1000, params).expect("scenario");
            let mut state = ClusterState::new(&a.namespaces, &a.pods, &a.policies, &[]);
            let other = ClusterState::new(&b.namespaces, &b.pods, &b.policies, &[]);
            let ifindex: BTreeMap<String, u32> =
                state.pods.keys().chain(other.pods.keys()).enumerate().map(|(i, k)| (k.clone(), 10 + i as u32)).collect();
            let interface_of = |p: &PodInfo| ifindex.get(&p.key()).copied();
            let mut compiler = NodeCompiler::new("node0", true);
            let mut sync = Synchronizer::with_capacity(Default::default());
            let mut maps = ModelMaps::default();
            let dirty = compiler.full(&state, &interface_of);
            sync.sync_dirty(&mut maps, compiler.program(), &dirty).expect("sync");
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for _ in 0..30 {
                let changes: Vec<ClusterChange> =
                    (0..rng.random_range(1..4)).map(|_| random_change(&mut rng, &mut state, &other)).collect();
                let dirty = compiler.apply(&state, &changes, &interface_of);
                recompiled += dirty.endpoints.len();
                possible += compiler.local_pods().count();
                let mut fresh = NodeCompiler::new("node0", true);
                fresh.ids = compiler.ids.clone();
                fresh.full(&state, &interface_of);
                assert_eq!(compiler.program(), fresh.program(), "seed {seed}: {changes:#?}");
                sync.sync_dirty(&mut maps, compiler.program(), &dirty).expect("sync");
                let leftover = sync.sync(&mut maps, compiler.program()).expect("sync");
                assert_eq!(leftover, Default::default(), "seed {seed}: dirty set missed something");
                let enforces_egress = compiler.program().endpoints.values().any(|e| e.enforces_egress());
                assert_eq!(maps.egress_enforced, enforces_egress, "seed {seed}: CONFIG_EGRESS_ENFORCED");
                assert_eq!(maps.unguarded_egress_writes, 0, "seed {seed}: an egress-enforcing endpoint before the flag");
                batches += 1;
            }
        }
        // Incremental means something: far fewer endpoint recompilations than a full pass.
        assert!(recompiled * 2 < possible, "{recompiled} of {possible} endpoints rewritten over {batches} batches");
    }

    #[test]
    fn replace_state_yields_changes_that_reach_the_target() {
        let a = Scenario::generate(7, ScenarioParams::default()).expect("scenario");
        let b = Scenario::generate(8, ScenarioParams::default()).expect("scenario");
        let mut state = ClusterState::new(&a.namespaces, &a.pods, &a.policies, &[]);
        let target = ClusterState::new(&b.namespaces, &b.pods, &b.policies, &[]);
        let changes = replace_state(&mut state, target.clone());
        assert!(!changes.is_empty());
        assert_eq!(state.pods, target.pods);
        assert_eq!(state.policies, target.policies);
        assert_eq!(state.namespaces, target.namespaces);
        assert!(replace_state(&mut state, target).is_empty());
    }

    /// A placeholder programs its interface fail-closed until the pod is a local pod with an
    /// interface; the pod's own program replaces it under the same key, and the placeholder
    /// comes back if the pod goes while the placeholder stays.
    #[test]
    fn placeholders_fail_closed_until_the_pod_is_known() {
        let mut state = ClusterState::default();
        let mut compiler = NodeCompiler::new("node0", true);
        let dirty = compiler.set_placeholder(&state, "ns/late", Some(42), &[]);
        assert!(dirty.endpoints.contains("ns/late"));
        let program = compiler.program().endpoints.get("ns/late").cloned().expect("placeholder programmed");
        assert!(program.fail_closed && program.allow_host && program.ingress.isolated && program.egress.isolated);
        assert_eq!(program.ifindex, 42);
        assert!(compiler.is_placeholder("ns/late"));
        // A full recompilation keeps it.
        compiler.full(&state, &|_| None);
        assert_eq!(compiler.program().endpoints.get("ns/late"), Some(&program));

        let pod = PodInfo {
            namespace: "ns".into(),
            name: "late".into(),
            labels: Default::default(),
            ips: vec!["10.0.0.9".parse().expect("ip")],
            node: Some("node0".into()),
            host_network: false,
            named_ports: vec![],
            host_ips: vec![],
        };
        state.upsert_pod(pod.clone());
        compiler.apply(&state, &[ClusterChange::Pod { old: None, new: Some(pod.clone()) }], &|_| Some(42));
        let own = compiler.program().endpoints.get("ns/late").cloned().expect("pod programmed");
        assert!(!own.fail_closed, "no policy selects the pod: its own program allows");
        assert!(!compiler.is_placeholder("ns/late"));

        let old = state.remove_pod("ns/late");
        compiler.apply(&state, &[ClusterChange::Pod { old, new: None }], &|_| None);
        assert_eq!(compiler.program().endpoints.get("ns/late"), Some(&program), "back to the placeholder");
        compiler.set_placeholder(&state, "ns/late", None, &[]);
        assert!(!compiler.program().endpoints.contains_key("ns/late"));
    }
}
