//! Reading netsieve's conntrack table (`CONNTRACK`) for `netsieve explain --agent`: the
//! canonical key of a flow (what `ebpf/src/flow.rs::tuple_key` computes), and which entries
//! belong to a flow whose source port is not known.
use netsieve_common::{
    CT_STATE_CLOSING, CT_STATE_ESTABLISHED, FLOW_AUDIT, FLOW_CONFIRMED, FLOW_DEFERRED, FLOW_EGRESS, FLOW_INITIATOR_A,
    FlowKey, FlowState, PROTO_TCP, PROTO_UDP, flow_order,
};

/// The key of the flow `src:src_port -> dst:dst_port` on interface `ifindex` (addresses in
/// the key form: IPv4 as IPv4-mapped IPv6), exactly as the programs build it.
pub fn flow_key(ifindex: u32, protocol: u8, src: &[u8; 16], src_port: u16, dst: &[u8; 16], dst_port: u16) -> FlowKey {
    if flow_order(src, src_port, dst, dst_port) {
        FlowKey { ifindex, protocol, _pad1: 0, _pad2: 0, port_a: src_port, port_b: dst_port, addr_a: *src, addr_b: *dst }
    } else {
        FlowKey { ifindex, protocol, _pad1: 0, _pad2: 0, port_a: dst_port, port_b: src_port, addr_a: *dst, addr_b: *src }
    }
}

/// The initiator and responder ends of an entry: ((address, port), (address, port)).
pub fn ends(key: &FlowKey, state: &FlowState) -> (([u8; 16], u16), ([u8; 16], u16)) {
    let a = (key.addr_a, key.port_a);
    let b = (key.addr_b, key.port_b);
    if state.flags & FLOW_INITIATOR_A != 0 { (a, b) } else { (b, a) }
}

/// Idle timeouts of the programs (`ebpf/src/flow.rs`): an entry idle for longer is dead to
/// them, whatever the LRU table still holds.
pub fn timeout_ns(protocol: u8, tcp_state: u8) -> u64 {
    const S: u64 = 1_000_000_000;
    match (protocol, tcp_state) {
        (PROTO_TCP, CT_STATE_ESTABLISHED) => 6 * 3600 * S,
        (PROTO_TCP, CT_STATE_CLOSING) => 10 * S,
        (PROTO_TCP, _) => 60 * S,
        (PROTO_UDP, _) => 120 * S,
        _ => 60 * S,
    }
}

pub fn state_name(tcp_state: u8) -> &'static str {
    match tcp_state {
        CT_STATE_ESTABLISHED => "established",
        CT_STATE_CLOSING => "closing",
        _ => "new",
    }
}

/// A flow as `explain` asks about it: from `src` to `dst:dst_port`, any source port unless
/// given (ICMP: no ports at all); on one of `ifindexes` (the local pods of the flow).
pub struct FlowQuery {
    pub ifindexes: Vec<u32>,
    pub protocol: u8,
    pub src: [u8; 16],
    pub src_port: Option<u16>,
    pub dst: [u8; 16],
    pub dst_port: Option<u16>,
}

impl FlowQuery {
    /// Whether an entry is this flow: opened by `src` towards `dst:dst_port`, or, for a flow
    /// the netfilter hook judged after DNAT, towards a Service address with `dst:dst_port` as
    /// the backend it chose.
    pub fn matches(&self, key: &FlowKey, state: &FlowState) -> bool {
        if !self.ifindexes.contains(&key.ifindex) || key.protocol != self.protocol {
            return false;
        }
        let (initiator, responder) = ends(key, state);
        if initiator.0 != self.src || self.src_port.is_some_and(|p| p != initiator.1) {
            return false;
        }
        let port_ok = |port: u16| self.dst_port.is_none_or(|p| p == port);
        let direct = responder.0 == self.dst && port_ok(responder.1);
        let translated = state.flags & FLOW_DEFERRED != 0
            && state.flags & FLOW_CONFIRMED != 0
            && state.nat_addr == self.dst
            && port_ok(state.nat_port);
        direct || translated
    }

    /// The exact keys to look up when the source port is known.
    pub fn exact_keys(&self) -> Vec<FlowKey> {
        let (Some(src_port), Some(dst_port)) = (self.src_port, self.dst_port) else { return Vec::new() };
        self.ifindexes.iter().map(|i| flow_key(*i, self.protocol, &self.src, src_port, &self.dst, dst_port)).collect()
    }
}

/// Flags of an entry in words.
pub struct EntryFlags {
    pub egress: bool,
    pub deferred: bool,
    pub confirmed: bool,
    pub audit: bool,
}

pub fn flags(state: &FlowState) -> EntryFlags {
    EntryFlags {
        egress: state.flags & FLOW_EGRESS != 0,
        deferred: state.flags & FLOW_DEFERRED != 0,
        confirmed: state.flags & FLOW_CONFIRMED != 0,
        audit: state.flags & FLOW_AUDIT != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(ip: [u8; 4]) -> [u8; 16] {
        std::net::Ipv4Addr::from(ip).to_ipv6_mapped().octets()
    }

    #[test]
    fn both_directions_have_one_key_and_queries_find_the_initiators_flows() {
        let (pod, peer) = (v4([10, 0, 0, 1]), v4([10, 0, 0, 2]));
        let forward = flow_key(7, PROTO_TCP, &peer, 40000, &pod, 80);
        let reply = flow_key(7, PROTO_TCP, &pod, 80, &peer, 40000);
        assert_eq!(forward, reply, "canonical");
        // The peer opened it: the initiator is whichever end of the key the peer is.
        let initiator_a = forward.addr_a == peer;
        let state = FlowState { flags: if initiator_a { FLOW_INITIATOR_A } else { 0 }, ..Default::default() };
        let query = FlowQuery { ifindexes: vec![7], protocol: PROTO_TCP, src: peer, src_port: None, dst: pod, dst_port: Some(80) };
        assert!(query.matches(&forward, &state));
        assert!(!FlowQuery { dst_port: Some(81), ..query_clone(&query) }.matches(&forward, &state));
        assert!(!FlowQuery { ifindexes: vec![8], ..query_clone(&query) }.matches(&forward, &state));
        assert!(FlowQuery { src_port: Some(40000), ..query_clone(&query) }.matches(&forward, &state));
        assert!(!FlowQuery { src_port: Some(40001), ..query_clone(&query) }.matches(&forward, &state));
        // The reverse flow (pod -> peer:40000) is another question.
        let reverse = FlowQuery { src: pod, dst: peer, dst_port: Some(40000), ..query_clone(&query) };
        assert!(!reverse.matches(&forward, &state));
        assert_eq!(FlowQuery { src_port: Some(40000), ..query_clone(&query) }.exact_keys(), vec![forward]);
    }

    #[test]
    fn a_service_flow_is_found_by_its_backend() {
        let (pod, service, backend) = (v4([10, 0, 0, 1]), v4([10, 96, 0, 10]), v4([10, 0, 1, 5]));
        let key = flow_key(7, PROTO_UDP, &pod, 5000, &service, 53);
        let mut state = FlowState {
            flags: FLOW_EGRESS | FLOW_DEFERRED | FLOW_CONFIRMED | if key.addr_a == pod { FLOW_INITIATOR_A } else { 0 },
            nat_addr: backend,
            nat_port: 53,
            ..Default::default()
        };
        let query = FlowQuery { ifindexes: vec![7], protocol: PROTO_UDP, src: pod, src_port: None, dst: backend, dst_port: Some(53) };
        assert!(query.matches(&key, &state));
        state.flags &= !FLOW_CONFIRMED;
        assert!(!query.matches(&key, &state), "not confirmed: the netfilter hook did not admit it");
    }

    fn query_clone(q: &FlowQuery) -> FlowQuery {
        FlowQuery { ifindexes: q.ifindexes.clone(), protocol: q.protocol, src: q.src, src_port: q.src_port, dst: q.dst, dst_port: q.dst_port }
    }
}
