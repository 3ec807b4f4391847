//! From the semantics module's view of the cluster to everything one node programs: the
//! ipcache (address -> identity) and, per local pod, the compiled policy of both directions.
//! Pure: the synchronizer writes the result.
use super::compile::{CompileError, DirectionInput, PeerInput, PortSetInput, RuleInput, compile_direction};
use super::lpm::{CidrSet, to_mapped};
use super::sync::{EndpointProgram, NodeProgram};
use crate::policy::{ClusterState, Direction, FlowEndpoint, Labels, Peer, PodInfo, PortSpec, Rule};
use ipnet::{IpNet, Ipv6Net};
use netsieve_common::{IDENTITY_FIRST_POD, IDENTITY_HOST, IpcacheValue};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Numeric identities of label sets, stable across recompilations so that an unrelated change
/// does not rewrite every endpoint. Two pods with the same namespace and labels are
/// indistinguishable to every selector, so they share an identity.
#[derive(Debug, Default, Clone)]
pub struct IdentityAllocator {
    by_label_set: BTreeMap<(String, Labels), u32>,
    next: u32,
}

impl IdentityAllocator {
    pub fn identity(&mut self, pod: &PodInfo) -> u32 {
        let key = (pod.namespace.clone(), pod.labels.clone());
        if let Some(id) = self.by_label_set.get(&key) {
            return *id;
        }
        let id = self.next.max(IDENTITY_FIRST_POD);
        self.next = id + 1;
        self.by_label_set.insert(key, id);
        id
    }

    /// Forgets label sets no pod has any more.
    pub fn retain_used(&mut self, state: &ClusterState) {
        let used: BTreeSet<(String, Labels)> =
            state.pods.iter().map(|p| (p.namespace.clone(), p.labels.clone())).collect();
        self.by_label_set.retain(|key, _| used.contains(key));
    }

    pub fn len(&self) -> usize {
        self.by_label_set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_label_set.is_empty()
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
    state.pods.iter().filter(|p| !p.host_network && !p.ips.is_empty())
}

/// Resolves the rules of one direction of one pod into compiler input.
pub fn direction_input(
    state: &ClusterState,
    ids: &mut IdentityAllocator,
    pod: &PodInfo,
    direction: Direction,
) -> DirectionInput {
    let mut input = DirectionInput::default();
    for policy in state.selecting(pod, direction) {
        input.isolated = true;
        for rule in policy.rules(direction).unwrap_or_default() {
            translate_rule(state, ids, pod, direction, &policy.namespace, rule, &mut input.rules);
        }
    }
    input
}

fn translate_rule(
    state: &ClusterState,
    ids: &mut IdentityAllocator,
    own: &PodInfo,
    direction: Direction,
    policy_namespace: &str,
    rule: &Rule,
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
                Peer::Pods { .. } => {
                    let mut set = BTreeSet::new();
                    for candidate in selectable(state) {
                        let probe = endpoint_of(candidate, candidate.ips[0]);
                        if state.peer_matches(peer, policy_namespace, &probe) {
                            set.insert(ids.identity(candidate));
                        }
                    }
                    PeerInput::Identities(set)
                }
            })
            .collect(),
    };
    let Some(ports) = &rule.ports else {
        out.push(RuleInput { peers, ports: PortSetInput::AllProtocols });
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
                        });
                    }
                }
            },
        }
    }
    if !numeric.is_empty() {
        out.push(RuleInput { peers, ports: PortSetInput::Ranges(numeric) });
    }
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
    let mut compiled = CompiledNode::default();
    for pod in selectable(state) {
        let identity = ids.identity(pod);
        for ip in &pod.ips {
            compiled.program.ipcache.insert(host_net(*ip), IpcacheValue { identity, flags: 0 });
        }
    }
    // The node's own addresses last: they win over a (misconfigured) pod claiming one.
    for ip in state.node_ips.get(node).into_iter().flatten() {
        compiled.program.ipcache.insert(host_net(*ip), IpcacheValue { identity: IDENTITY_HOST, flags: 0 });
    }
    for pod in selectable(state).filter(|p| p.node.as_deref() == Some(node)) {
        let Some(ifindex) = interface_of(pod) else {
            compiled.waiting_for_interface.push(pod.key());
            continue;
        };
        let mut program = EndpointProgram { ifindex, identity: ids.identity(pod), allow_host, ..Default::default() };
        for direction in [Direction::Ingress, Direction::Egress] {
            let input = direction_input(state, ids, pod, direction);
            let entries = match compile_direction(&input) {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::error!(pod = %pod.key(), ?direction, %error, "cannot compile policy: endpoint fails closed");
                    compiled.failures.push(EndpointFailure { pod: pod.key(), direction, error });
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
            program.ingress = super::compile::DirectionEntries { isolated: true, ..Default::default() };
            program.egress = super::compile::DirectionEntries { isolated: true, ..Default::default() };
        }
        compiled.program.endpoints.insert(pod.key(), program);
    }
    compiled
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Flow, Protocol, evaluate_direction};
    use crate::scenario::{INTERESTING_PORTS, Scenario, ScenarioParams};
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
                    state.pods.iter().enumerate().map(|(i, p)| (p.key(), 100 + i as u32)).collect();
                let c = compile_node(&state, &mut ids, node, true, &|p| index.get(&p.key()).copied());
                assert!(c.failures.is_empty(), "{:?}", c.failures);
                compiled.push(c);
            }
            let ipcache = &compiled[0].program.ipcache;
            let identity_of = |ip: IpAddr| {
                ipcache.get(&host_net(ip)).map_or(IDENTITY_WORLD, |v| v.identity)
            };
            let mut peers: Vec<FlowEndpoint> = Vec::new();
            for pod in &state.pods {
                for ip in &pod.ips {
                    peers.push(endpoint_of(pod, *ip));
                }
            }
            peers.extend(scenario.outside_ips.iter().map(|ip| FlowEndpoint { ip: *ip, pod: None }));
            for pod in &state.pods {
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
        let first: Vec<u32> = state.pods.iter().map(|p| ids.identity(p)).collect();
        let again: Vec<u32> = state.pods.iter().map(|p| ids.identity(p)).collect();
        assert_eq!(first, again);
        for (a, pa) in first.iter().zip(&state.pods) {
            for (b, pb) in first.iter().zip(&state.pods) {
                assert_eq!(a == b, pa.namespace == pb.namespace && pa.labels == pb.labels);
            }
        }
        assert!(first.iter().all(|id| *id >= IDENTITY_FIRST_POD));
    }
}
