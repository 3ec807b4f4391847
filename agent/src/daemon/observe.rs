//! What the agent tells about what it enforces: verdict events with names, `status`, live
//! `explain`, and the counters carried over reprogrammings (the pure parts are in
//! [`crate::observe`]).
use super::agent::Agent;
use super::dataplane::{read_drop_counters, read_event_counters};
use crate::dataplane::conntrack::{self, FlowQuery};
use crate::dataplane::lpm::to_mapped;
use crate::node_api::observe::{
    AuditStatus, ConntrackFlow, ConntrackLookup, DirectionStatus, EndpointMode, EndpointStatus, EventSettings, EventStatus,
    ExplainQuery, LiveExplanation, MapPressure, NodeStatus, PacketCounts, ProgrammedCheck, ReasonCount, RuleStatus, SocketRef,
};
use crate::node_api::{ErrorCode, Response};
use crate::observe::book::{EndpointNotes, Programming, direction_of};
use crate::observe::decode::{WallClock, address, monotonic_ns, system_time_rfc3339};
use crate::observe::ledger::RuleKey;
use crate::observe::resolve::Resolver;
use crate::policy::{self, Direction, DirectionVerdict, Flow, Protocol};
use aya::maps::{HashMap, MapData};
use netsieve_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, EVENTS_EMITTED, EVENTS_RATE_LIMITED, EVENTS_RING_FULL, EndpointStats, FlowKey,
    FlowState, IDENTITY_HOST, IDENTITY_WORLD, MAX_CONNTRACK_ENTRIES, MAX_ENDPOINTS, PROTO_ICMPV6, RuleStats, VerdictEvent,
};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use tokio::sync::oneshot;

/// The map form of an address (IPv4 as IPv4-mapped IPv6).
fn key_form(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn direction_number(direction: Direction) -> u8 {
    match direction {
        Direction::Ingress => DIRECTION_INGRESS,
        Direction::Egress => DIRECTION_EGRESS,
    }
}

fn packet_counts(stats: &EndpointStats, direction: usize) -> PacketCounts {
    PacketCounts {
        allowed: stats.allowed_packets[direction],
        denied: stats.denied_packets[direction],
        audited: stats.audit_packets[direction],
    }
}

impl Agent {
    /// The interface name of an ifindex: from discovery, else from a CNI registration.
    pub(super) fn interface_name(&self, ifindex: u32) -> Option<String> {
        self.dataplane
            .interfaces
            .by_ifindex(ifindex)
            .map(|link| link.name.clone())
            .or_else(|| self.cni.interface_name(ifindex).map(str::to_string))
    }

    /// After every programming step: records the programmings the synchronizer now holds and
    /// carries the final counts of those it retired (read now, or, for counters the step
    /// already zeroed for reuse, what the maps read just before).
    pub(super) fn observe_programming(&mut self, wrote: bool) {
        let now = SystemTime::now();
        if wrote {
            self.last_programmed = Some(now);
        }
        let compiler = &self.controller.compiler;
        let failures: BTreeMap<&str, String> = compiler.failures().map(|f| (f.pod.as_str(), f.error.to_string())).collect();
        let notes = |name: &str, live: &crate::dataplane::sync::LiveEndpoint| {
            if compiler.is_placeholder(name) {
                EndpointNotes { mode: EndpointMode::Placeholder, fail_closed_reason: Some("Pod object not known yet".into()) }
            } else if live.program.fail_closed {
                let reason = failures.get(name).cloned().unwrap_or_else(|| "the policy maps are full".into());
                EndpointNotes { mode: EndpointMode::FailClosed, fail_closed_reason: Some(reason) }
            } else {
                EndpointNotes { mode: EndpointMode::Policy, fail_closed_reason: None }
            }
        };
        let retired = self.book.update(self.controller.sync.live(), notes, now);
        let residue = self.dataplane.maps.take_counter_residue();
        let maps = &self.dataplane.maps;
        for programming in &retired {
            let endpoint = match residue.slots.get(&programming.slot) {
                Some(stats) => *stats,
                None => maps.endpoint_stats(programming.slot).unwrap_or_default(),
            };
            let rule = |index: u32| match residue.rules.get(&index) {
                Some(stats) => *stats,
                None => maps.rule_stats(index).unwrap_or_default(),
            };
            self.ledger.retire(programming, &endpoint, rule);
        }
        if !retired.is_empty() {
            self.ledger.prune(&self.book);
        }
    }

    /// Resolves a batch of events from the ring and offers them to the subscribers.
    pub(super) fn publish_events(&self, batch: Vec<VerdictEvent>) {
        let interface_name = |ifindex: u32| self.interface_name(ifindex);
        let resolver = Resolver {
            node: &self.args.node,
            state: &self.controller.state,
            book: &self.book,
            local_addresses: self.controller.compiler.local_addresses(),
            interface_name: &interface_name,
            clock: WallClock::now(),
        };
        for raw in &batch {
            self.hub.publish(&resolver.resolve(raw));
        }
    }

    pub(super) fn event_settings(&self) -> EventSettings {
        EventSettings {
            per_second: self.args.events_per_second,
            burst: self.args.events_burst,
            allowed_flows: self.args.events_allowed,
        }
    }

    pub(super) fn audit_status(&self) -> AuditStatus {
        let audit = self.controller.compiler.audit();
        AuditStatus { node_wide: audit.node_wide, namespaces: audit.namespaces.iter().cloned().collect() }
    }

    fn rule_reader(&self) -> impl Fn(u32) -> RuleStats + '_ {
        |index| self.dataplane.maps.rule_stats(index).unwrap_or_default()
    }

    /// A pod's counters: carried plus its live slot's.
    pub(super) fn endpoint_totals(&self, programming: &Programming) -> EndpointStats {
        let live = self.dataplane.maps.endpoint_stats(programming.slot).unwrap_or_default();
        self.ledger.endpoint_total(&programming.endpoint, &live)
    }

    /// Every rule of the node's pods with what it admitted on this node.
    pub(super) fn node_rule_totals(&self) -> BTreeMap<RuleKey, crate::observe::ledger::RuleCount> {
        self.ledger.node_rules(&self.book, &self.rule_reader())
    }

    /// map name -> (entries, capacity).
    pub(super) fn map_pressure(&self) -> BTreeMap<&'static str, (usize, usize)> {
        let counts = self.controller.sync.entry_counts();
        let capacity = self.controller.sync.capacity();
        let mut maps = BTreeMap::new();
        maps.insert("ENDPOINTS", (self.book.len(), MAX_ENDPOINTS as usize));
        maps.insert("IPCACHE", (self.controller.sync.ipcache_len(), capacity.ipcache));
        maps.insert("POLICY_IDENTITY", (counts.identity, capacity.identity));
        maps.insert("POLICY_CIDR", (counts.cidr, capacity.cidr));
        maps.insert("POLICY_PORT", (counts.port, capacity.port));
        maps.insert("POLICY_RANGE", (counts.port_range, capacity.port_range));
        maps
    }

    pub(super) fn event_status(&self) -> EventStatus {
        let kernel = read_event_counters(&self.dataplane.event_counters);
        EventStatus {
            settings: self.event_settings(),
            emitted: kernel[EVENTS_EMITTED as usize],
            rate_limited: kernel[EVENTS_RATE_LIMITED as usize],
            ring_full: kernel[EVENTS_RING_FULL as usize],
            read: self.reader_counters.read.load(Ordering::Relaxed),
            dropped_agent_busy: self.reader_counters.dropped_agent_busy.load(Ordering::Relaxed),
            dropped_slow_subscribers: self.hub.counters.dropped_slow.load(Ordering::Relaxed),
            subscribers: self.hub.subscribers() as u64,
        }
    }

    fn endpoint_status(&self, programming: &Programming) -> EndpointStatus {
        let (namespace, pod) = programming.namespace_and_pod();
        let totals = self.endpoint_totals(programming);
        let rules = self.ledger.endpoint_rules(programming, &self.rule_reader());
        let pod_info = self.controller.state.pods.get(&programming.endpoint);
        let direction = |direction: Direction| {
            let number = direction_number(direction);
            DirectionStatus {
                isolated: programming.isolated[usize::from(number)],
                policies: pod_info.map(|p| self.controller.state.selecting(p, direction).map(|policy| policy.key()).collect()).unwrap_or_default(),
                packets: packet_counts(&totals, usize::from(number)),
                rules: rules
                    .iter()
                    .filter(|(key, _)| key.direction == number)
                    .map(|(key, count)| RuleStatus {
                        policy: key.policy.clone(),
                        index: key.index,
                        packets: count.stats.packets,
                        bytes: count.stats.bytes,
                        shared: count.shared,
                    })
                    .collect(),
            }
        };
        EndpointStatus {
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            interface: self.interface_name(programming.ifindex),
            ifindex: programming.ifindex,
            identity: programming.identity,
            addresses: programming.addresses.clone(),
            mode: programming.mode,
            fail_closed_reason: programming.fail_closed_reason.clone(),
            audit: programming.audit,
            programmed_at: Some(system_time_rfc3339(programming.programmed_at)),
            ingress: direction(Direction::Ingress),
            egress: direction(Direction::Egress),
        }
    }

    pub(super) fn status(&self) -> NodeStatus {
        let (ready, reason) = self.metrics.readiness();
        let reasons = |counts: Vec<(&'static str, &'static str, u64)>| {
            counts
                .into_iter()
                .map(|(reason, direction, packets)| ReasonCount {
                    reason: reason.to_string(),
                    direction: if direction == "egress" { direction_of(DIRECTION_EGRESS) } else { direction_of(DIRECTION_INGRESS) },
                    packets,
                })
                .collect()
        };
        NodeStatus {
            node: self.args.node.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            ready,
            readiness: if ready { "ready".to_string() } else { reason },
            source: match &self.args.manifests {
                Some(dir) => format!("manifests:{}", dir.display()),
                None => "kubernetes-api".to_string(),
            },
            audit: self.audit_status(),
            last_programmed: self.last_programmed.map(system_time_rfc3339),
            netfilter_hook: self.dataplane.netfilter_active(),
            egress_enforced: self.dataplane.egress_enforced(),
            events: self.event_status(),
            maps: self
                .map_pressure()
                .into_iter()
                .map(|(name, (entries, capacity))| MapPressure { name: name.to_string(), entries: entries as u64, capacity: capacity as u64 })
                .collect(),
            drops: reasons(read_drop_counters(&self.dataplane.drops)),
            audited: reasons(read_drop_counters(&self.dataplane.audits)),
            endpoints: self.book.current().map(|p| self.endpoint_status(p)).collect(),
        }
    }

    /// What the programmed maps of a local endpoint say about one direction of the flow.
    fn programmed_check(&self, flow: &Flow, direction: Direction, semantics: &DirectionVerdict) -> Option<ProgrammedCheck> {
        let (own, peer) = match direction {
            Direction::Egress => (&flow.src, &flow.dst),
            Direction::Ingress => (&flow.dst, &flow.src),
        };
        let pod = own.pod.as_ref()?;
        let programming = self.book.get(pod)?;
        let live = self.controller.sync.live().find(|(name, _)| *name == pod.as_str()).map(|(_, l)| l)?;
        let number = direction_number(direction);
        let entries = if number == DIRECTION_INGRESS { &live.program.ingress } else { &live.program.egress };
        let identity = self
            .controller
            .compiler
            .program()
            .ipcache
            .get(&to_mapped(peer.ip.into()))
            .map_or(IDENTITY_WORLD, |v| v.identity);
        let own_address = programming.addresses.contains(&peer.ip);
        let mut note = None;
        let mut rules = Vec::new();
        let allowed = if own_address {
            note = Some("a pod can always reach itself".to_string());
            true
        } else if identity == IDENTITY_HOST && live.program.allow_host {
            note = Some("traffic with this node is allowed (--deny-node-traffic is off)".to_string());
            true
        } else if live.program.fail_closed {
            false
        } else if !entries.isolated {
            true
        } else {
            if number == DIRECTION_EGRESS && identity == IDENTITY_WORLD && self.dataplane.netfilter_active() {
                note = Some("not a pod or node address: judged by the netfilter hook after kube-proxy's DNAT, on the backend".to_string());
            }
            let protocol = match (flow.protocol, peer.ip) {
                (Protocol::Icmp, IpAddr::V6(_)) => PROTO_ICMPV6,
                (protocol, _) => protocol.number(),
            };
            match entries.matching_group(identity, peer.ip, protocol, flow.port) {
                Some(group) => {
                    if let Some(origins) = entries.groups.get(group as usize) {
                        rules = Programming::rule_refs(origins, number);
                    }
                    true
                }
                None => false,
            }
        };
        // The semantics' verdict for this direction, with the exceptions it applies to the
        // whole flow counted in.
        let semantics_allows = semantics.allowed || own_address || (identity == IDENTITY_HOST && live.program.allow_host);
        Some(ProgrammedCheck {
            pod: pod.clone(),
            direction: direction_of(number),
            interface: self.interface_name(programming.ifindex),
            ifindex: programming.ifindex,
            mode: programming.mode,
            audit: programming.audit,
            isolated: entries.isolated,
            peer_identity: identity,
            allowed,
            rules,
            agrees: allowed == semantics_allows,
            note,
        })
    }

    /// `explain --agent`: the semantics on the enforced state and the programmed maps now; the
    /// conntrack scan (the whole table without a source port) runs on a blocking thread, which
    /// answers.
    pub(super) fn explain_live(&self, query: ExplainQuery, reply: oneshot::Sender<Response>) {
        let state = &self.controller.state;
        let flow = (|| -> Result<Flow, String> {
            let protocol = Protocol::parse(&query.protocol).ok_or_else(|| format!("unknown protocol {:?}", query.protocol))?;
            let src = state.resolve(&query.from).map_err(|e| format!("from: {e}"))?;
            let dst = state.resolve(&query.to).map_err(|e| format!("to: {e}"))?;
            state.flow(src, dst, protocol, query.port).map_err(|e| e.to_string())
        })();
        let flow = match flow {
            Ok(flow) => flow,
            Err(message) => {
                let _ = reply.send(Response::error(ErrorCode::Invalid, message));
                return;
            }
        };
        let verdict = policy::explain(state, &flow);
        let programmed: Vec<ProgrammedCheck> = [(Direction::Egress, &verdict.egress), (Direction::Ingress, &verdict.ingress)]
            .into_iter()
            .filter_map(|(direction, semantics)| self.programmed_check(&flow, direction, semantics))
            .collect();
        let icmp = flow.protocol == Protocol::Icmp;
        let flow_query = FlowQuery {
            ifindexes: programmed.iter().map(|c| c.ifindex).collect(),
            protocol: match (flow.protocol, flow.src.ip) {
                (Protocol::Icmp, IpAddr::V6(_)) => PROTO_ICMPV6,
                (protocol, _) => protocol.number(),
            },
            src: key_form(flow.src.ip),
            src_port: if icmp { None } else { query.source_port },
            dst: key_form(flow.dst.ip),
            dst_port: if icmp { None } else { Some(flow.port) },
        };
        let interfaces: BTreeMap<u32, (String, Option<String>, Programming)> = programmed
            .iter()
            .filter_map(|c| self.book.get(&c.pod).map(|p| (c.ifindex, (c.pod.clone(), c.interface.clone(), p.clone()))))
            .collect();
        let generation = self.dataplane.maps.config().ipcache_generation;
        let table = self.dataplane.conntrack.clone();
        let answer = LiveExplanation {
            allowed: verdict.allowed,
            flow,
            exception: verdict.exception,
            egress: verdict.egress,
            ingress: verdict.ingress,
            node: self.args.node.clone(),
            programmed,
            conntrack: ConntrackLookup::default(),
        };
        tokio::task::spawn_blocking(move || {
            let conntrack = lookup_conntrack(&table, &flow_query, &interfaces, generation);
            let _ = reply.send(Response::Explained(Box::new(LiveExplanation { conntrack, ..answer })));
        });
    }
}

/// The conntrack entries of a flow: exact lookups when the source port is known, else a scan
/// of the table. Entries idle past their timeout are dead to the programs and left out.
fn lookup_conntrack(
    table: &HashMap<MapData, FlowKey, FlowState>,
    query: &FlowQuery,
    interfaces: &BTreeMap<u32, (String, Option<String>, Programming)>,
    ipcache_generation: u32,
) -> ConntrackLookup {
    let mut lookup = ConntrackLookup::default();
    if query.ifindexes.is_empty() {
        return lookup;
    }
    let mut found: Vec<(FlowKey, FlowState)> = Vec::new();
    if query.src_port.is_some() && query.dst_port.is_some() {
        for key in query.exact_keys() {
            lookup.scanned += 1;
            if let Ok(state) = table.get(&key, 0)
                && query.matches(&key, &state)
            {
                found.push((key, state));
            }
        }
    } else {
        // A key deleted under the scan makes the kernel restart it from the first key: seen
        // keys are skipped and the scan is bounded.
        let mut seen: HashSet<FlowKey> = HashSet::new();
        for entry in table.iter().take(2 * MAX_CONNTRACK_ENTRIES as usize) {
            match entry {
                Ok((key, state)) => {
                    if !seen.insert(key) {
                        continue;
                    }
                    lookup.scanned += 1;
                    if query.matches(&key, &state) {
                        found.push((key, state));
                    }
                }
                Err(error) => {
                    lookup.error = Some(format!("reading CONNTRACK: {error}"));
                    break;
                }
            }
        }
    }
    let now = monotonic_ns();
    let clock = WallClock::now();
    for (key, state) in found {
        let idle = now.saturating_sub(state.last_seen_ns);
        if idle > conntrack::timeout_ns(key.protocol, state.tcp_state) {
            continue;
        }
        let (initiator, responder) = conntrack::ends(&key, &state);
        let flags = conntrack::flags(&state);
        let direction = if flags.egress { DIRECTION_EGRESS } else { DIRECTION_INGRESS };
        let owner = interfaces.get(&key.ifindex);
        let rules = owner
            .and_then(|(_, _, p)| p.rules_at(direction, state.rule_index).map(|o| Programming::rule_refs(o, direction)))
            .unwrap_or_default();
        lookup.entries.push(ConntrackFlow {
            interface: owner.and_then(|(_, name, _)| name.clone()),
            ifindex: key.ifindex,
            pod: owner.map(|(pod, _, _)| pod.clone()),
            initiator: SocketRef { ip: address(&initiator.0), port: initiator.1 },
            responder: SocketRef { ip: address(&responder.0), port: responder.1 },
            direction: direction_of(direction),
            state: conntrack::state_name(state.tcp_state).to_string(),
            last_seen: clock.rfc3339(state.last_seen_ns),
            idle_seconds: idle / 1_000_000_000,
            since: clock.rfc3339(state.created_ns),
            age_seconds: now.saturating_sub(state.created_ns) / 1_000_000_000,
            current: owner.is_some_and(|(_, _, p)| p.revision == state.revision) && state.ipcache_generation == ipcache_generation,
            audit: flags.audit,
            deferred: flags.deferred,
            backend: (flags.deferred && flags.confirmed).then(|| SocketRef { ip: address(&state.nat_addr), port: state.nat_port }),
            rules,
        });
    }
    lookup
}
