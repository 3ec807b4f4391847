//! The verdict for one packet of a local endpoint: the conntrack fast path, the exceptions
//! Kubernetes states, and the policy lookups. Shared by every hook.
use crate::counters::{Counted, count_audit, count_drop, count_endpoint, count_rule};
use crate::events::{EventInfo, emit};
use crate::flow;
use crate::maps::{CLOCK_CACHE, CONFIG, CONNTRACK, FLOW_CACHE, IPCACHE, REVISIONS};
use crate::packet::Packet;
use crate::policy::{matching_group, rule_index};
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use netsieve_common::{
    CACHED_DENIAL, CACHED_FLOW, CACHED_NEW_FLOW, CONFIG_DEFERRAL, HOOK_TC, NO_FLOW_EPOCH, CONFIG_EVENTS_ALLOWED, CT_STATE_ESTABLISHED, FLOW_CACHE_WINDOW_NS, FlowCacheEntry, DIRECTION_EGRESS, DIRECTION_INGRESS, EP_ALLOW_HOST, EP_AUDIT,
    EP_EGRESS_ISOLATED, EP_FAIL_CLOSED, EP_HAS_IPV4, EP_HAS_IPV6, EP_INGRESS_ISOLATED, EndpointInfo,
    FLOW_AUDIT, FLOW_CONFIRMED, FLOW_DEFERRED, FLOW_EGRESS, FLOW_INITIATOR_A, FlowState, IDENTITY_HOST,
    IDENTITY_WORLD, NO_REVISION, NO_RULE, REASON_FAIL_CLOSED, REASON_NONE, REASON_POLICY_DENIED, VERDICT_ALLOWED, VERDICT_AUDIT,
    VERDICT_DROPPED,
};

/// The outcome of judging a flow in one direction of one endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// Allowed; `rule` is the `RULE_STATS` index of the admitting rule group ([`NO_RULE`]
    /// for exceptions and directions that are not isolated).
    Allowed { rule: u32 },
    /// TC only: the egress verdict belongs to the netfilter hook after kube-proxy's DNAT.
    Deferred,
    /// Dropped for `reason`.
    Denied { reason: u32 },
    /// Policy would drop it for `reason`; passes under audit mode.
    Audited { reason: u32 },
}

/// A judgement and what it was taken on, for counters and events.
#[derive(Clone, Copy)]
pub struct Outcome {
    pub judgement: Judgement,
    /// The peer's identity (meaningful when `fresh`).
    pub identity: u32,
    /// Judged now (a new or stale flow), not taken from conntrack: events are emitted only
    /// for fresh judgements, so an allowed or audited flow reports once, not per packet.
    pub fresh: bool,
}

/// The state of the CONFIG map a packet reads first (before any lookup whose result the
/// generation vouches for).
#[derive(Clone, Copy)]
pub struct Settings {
    pub ipcache_generation: u32,
    pub flags: u32,
}

#[inline(always)]
pub fn settings() -> Settings {
    match CONFIG.get(0) {
        Some(config) => Settings { ipcache_generation: config.ipcache_generation, flags: config.flags },
        None => Settings { ipcache_generation: 0, flags: 0 },
    }
}

/// The clock conntrack timestamps use at TC: the coarse monotonic clock, read through the
/// per-CPU [`CLOCK_CACHE`] so that most packets pay an inlined jiffies load instead of a
/// helper call. The cached reading trails the coarse clock by at most a tick (the tick may
/// bump jiffies just before it updates the clock), nothing next to idle timeouts of seconds.
#[inline(always)]
pub fn now_coarse() -> u64 {
    // SAFETY: no preconditions.
    cached_clock(|| unsafe { bpf_ktime_get_coarse_ns() })
}

/// The clock of the netfilter programs, which may not read the coarse one: the precise clock
/// through the same cache. Both are CLOCK_MONOTONIC and the cache holds a reading taken within
/// the current tick, so TC and netfilter timestamps are a tick apart at most, which idle
/// timeouts of seconds do not notice.
#[inline(always)]
pub fn now_netfilter() -> u64 {
    cached_clock(now_precise)
}

/// The precise monotonic clock (event timestamps).
#[inline(always)]
pub fn now_precise() -> u64 {
    // SAFETY: no preconditions.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// `read`'s value from the per-CPU cache while jiffies have not moved; read and cached once
/// per tick and CPU.
#[inline(always)]
fn cached_clock(read: impl Fn() -> u64) -> u64 {
    // SAFETY: no preconditions (inlined by the verifier into a load of `jiffies`).
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK_CACHE.get_ptr_mut(0) else { return read() };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        if (*cache)[0] == jiffies && (*cache)[1] != 0 {
            return (*cache)[1];
        }
        let now = read();
        *cache = [jiffies, now];
        now
    }
}

#[inline(always)]
fn isolated_flag(direction: u8) -> u32 {
    if direction == DIRECTION_EGRESS { EP_EGRESS_ISOLATED } else { EP_INGRESS_ISOLATED }
}

/// Whether `addr` is one of the endpoint's own addresses.
#[inline(always)]
pub fn is_own_address(endpoint: &EndpointInfo, addr: &[u8; 16]) -> bool {
    let mapped = addr[..10] == [0u8; 10] && addr[10] == 0xff && addr[11] == 0xff;
    if mapped {
        endpoint.flags & EP_HAS_IPV4 != 0 && addr[12..] == endpoint.ipv4
    } else {
        endpoint.flags & EP_HAS_IPV6 != 0 && *addr == endpoint.ipv6
    }
}

/// Whether a packet the pod sends carries a source address that is not the pod's: dropped
/// whatever the policies say. IPv6 link-local sources (neighbour and router discovery) and
/// the unspecified address (duplicate address detection) are the pod's own business.
#[inline(always)]
pub fn is_spoofed(endpoint: &EndpointInfo, packet: &Packet) -> bool {
    if packet.ipv6 {
        let link_local = packet.src[0] == 0xfe && packet.src[1] & 0xc0 == 0x80;
        let unspecified = packet.src == [0u8; 16];
        if link_local || unspecified {
            return false;
        }
    }
    !is_own_address(endpoint, &packet.src)
}

#[inline(always)]
fn refuse(endpoint: &EndpointInfo, reason: u32) -> Judgement {
    if endpoint.flags & EP_AUDIT != 0 { Judgement::Audited { reason } } else { Judgement::Denied { reason } }
}

/// Judges a flow of `endpoint` in `direction` with `peer` as the other end and `port` as the
/// destination port: the exceptions, isolation, then the policy maps. `allow_defer`: an egress
/// flow to an unknown address may be left to the netfilter hook. `hairpin`: the packet came
/// back out of the pod's own interface (the pod reaching itself through a Service).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn judge_flow(
    endpoint: &EndpointInfo,
    direction: u8,
    peer: &[u8; 16],
    protocol: u8,
    port: u16,
    has_ports: bool,
    allow_defer: bool,
    hairpin: bool,
) -> (Judgement, u32) {
    // A pod can always reach itself.
    if hairpin || is_own_address(endpoint, peer) {
        return (Judgement::Allowed { rule: NO_RULE }, endpoint.identity);
    }
    // SAFETY: plain read of a map value.
    let identity = unsafe { IPCACHE.get(peer) }.map_or(IDENTITY_WORLD, |v| v.identity);
    if identity == IDENTITY_HOST && endpoint.flags & EP_ALLOW_HOST != 0 {
        return (Judgement::Allowed { rule: NO_RULE }, identity);
    }
    if endpoint.flags & EP_FAIL_CLOSED != 0 {
        return (refuse(endpoint, REASON_FAIL_CLOSED), identity);
    }
    if endpoint.flags & isolated_flag(direction) == 0 {
        return (Judgement::Allowed { rule: NO_RULE }, identity);
    }
    if allow_defer && identity == IDENTITY_WORLD {
        return (Judgement::Deferred, identity);
    }
    match matching_group(endpoint, direction, identity, peer, protocol, port, has_ports) {
        Some(group) => (Judgement::Allowed { rule: rule_index(endpoint, direction, group) }, identity),
        None => (refuse(endpoint, REASON_POLICY_DENIED), identity),
    }
}

/// Re-takes a stale flow's verdict in its original direction; on success the entry is
/// brought up to date and the judgement returned, on refusal `None` (the caller judges the
/// packet as a new flow).
///
/// # Safety
/// `state` must point to the live map value of `key`.
#[inline(always)]
unsafe fn rejudge(
    endpoint: &EndpointInfo,
    settings: &Settings,
    key: &netsieve_common::FlowKey,
    state: *mut FlowState,
) -> Option<Judgement> {
    // SAFETY: the caller's pointer is a live map value for this program run.
    let s = unsafe { &mut *state };
    let has_ports = matches!(key.protocol, netsieve_common::PROTO_TCP | netsieve_common::PROTO_UDP | netsieve_common::PROTO_SCTP);
    let (direction, peer, port) = if s.flags & FLOW_DEFERRED != 0 {
        // Only confirmed deferred flows get here: judged on the backend the netfilter hook saw.
        (DIRECTION_EGRESS, s.nat_addr, s.nat_port)
    } else if s.flags & FLOW_EGRESS != 0 {
        let (addr, port) = flow::responder(key, s);
        (DIRECTION_EGRESS, *addr, port)
    } else {
        let (addr, _) = flow::initiator(key, s);
        let (_, port) = flow::responder(key, s);
        (DIRECTION_INGRESS, *addr, port)
    };
    let (judgement, _) = judge_flow(endpoint, direction, &peer, key.protocol, port, has_ports, false, false);
    match judgement {
        Judgement::Allowed { rule } => {
            s.revision = endpoint.revision;
            s.slot = endpoint.endpoint_id;
            s.ipcache_generation = settings.ipcache_generation;
            s.rule_index = rule;
            s.flags &= !FLOW_AUDIT;
            Some(judgement)
        }
        Judgement::Audited { .. } => {
            s.revision = endpoint.revision;
            s.slot = endpoint.endpoint_id;
            s.ipcache_generation = settings.ipcache_generation;
            s.rule_index = NO_RULE;
            s.flags |= FLOW_AUDIT;
            Some(judgement)
        }
        Judgement::Denied { .. } | Judgement::Deferred => None,
    }
}

/// The judgement a live entry gives a packet without any policy lookup.
#[inline(always)]
fn cached(state: &FlowState) -> Judgement {
    remembered(state.flags & FLOW_AUDIT != 0, state.rule_index)
}

/// The judgement of a flow admitted by `rule`, or passed under audit mode.
#[inline(always)]
fn remembered(audit: bool, rule: u32) -> Judgement {
    if audit { Judgement::Audited { reason: REASON_POLICY_DENIED } } else { Judgement::Allowed { rule } }
}

/// What conntrack says of a packet before the endpoint is looked up.
#[derive(Clone, Copy)]
pub enum Lookup {
    /// Decided by conntrack alone (the fast path): the judgement, and the endpoint slot to
    /// count it against.
    Hit { judgement: Judgement, slot: u32 },
    /// A denial the flow cache holds for this flow and direction, still current (the entry):
    /// counted and reported as the full path's drop would be ([`account_cached_denial`]).
    CachedDenial(*const FlowCacheEntry),
    /// A TCP SYN the flow cache admits (the entry: an earlier SYN between the same addresses to
    /// the same port, admitted under the current policy): its flow is opened from the entry
    /// ([`open_cached_flow`]).
    CachedNewFlow(*const FlowCacheEntry),
    /// An entry the endpoint is needed for (stale, or a reply to a deferred flow the netfilter
    /// hook has not confirmed).
    Entry(*mut FlowState),
    Miss,
}

/// What a packet's verdict is taken with: its flow key, the settings and clock read first.
pub struct FlowContext {
    pub flow: flow::FlowRef,
    pub settings: Settings,
    pub now: u64,
    /// The packet's flow cache slot (none for fragments and in calibration programs).
    pub cache: Option<*mut FlowCacheEntry>,
    /// The interface's conntrack epoch, read before the conntrack lookup ([`NO_FLOW_EPOCH`]
    /// when conntrack was not looked up: a TCP SYN, a fragment, a flow cache hit; not an
    /// `Option`, as the programs are close to the 512-byte stack limit).
    pub flow_epoch: u64,
}

/// The endpoint slot and revision a verdict is counted and reported against.
#[derive(Clone, Copy)]
pub struct EndpointTag {
    pub slot: u32,
    pub revision: u32,
}

impl EndpointTag {
    #[inline(always)]
    pub fn of(endpoint: &EndpointInfo) -> EndpointTag {
        EndpointTag { slot: endpoint.endpoint_id, revision: endpoint.revision }
    }
}

/// Whether egress deferral to the netfilter hook is on.
#[inline(always)]
fn deferral_on(settings: &Settings) -> bool {
    settings.flags & CONFIG_DEFERRAL == CONFIG_DEFERRAL
}

/// Whether a packet at a hook of `direction` comes from (egress) or goes to (ingress) the
/// pod's end of the flow: conntrack entries are only created with the pod's own address on
/// the pod's end, so such a packet needs no anti-spoofing check.
#[inline(always)]
fn on_pod_side(direction: u8, state: &FlowState, forward: bool) -> bool {
    (direction == DIRECTION_EGRESS) == ((state.flags & FLOW_EGRESS != 0) == forward)
}

/// A packet the flow cache decides: the slot's entry is this flow and direction, fresh, and
/// still current (the same checks as a conntrack hit). A conntrack verdict serves neither a
/// TCP SYN (a new connection, judged afresh) nor a FIN or RST (conntrack records the lifecycle
/// change). A denial serves a SYN always, any other packet only if conntrack held no entry
/// and none was inserted on the interface since; never a hairpin packet (always allowed) nor
/// an egress packet after deferral to the netfilter hook was switched.
#[inline(always)]
fn cache_hit(context: &FlowContext, direction: u8, packet: &Packet, hairpin: bool, opening: bool) -> Option<Lookup> {
    // SAFETY: a per-CPU map value; only TC programs (bottom halves off) write it.
    let entry = unsafe { &*context.cache? };
    if entry.fresh_until_ns < context.now
        || entry.direction != direction
        || entry.src_is_a != context.flow.src_is_a as u8
        || entry.ipcache_generation != context.settings.ipcache_generation
        || !(if opening { flow::same_key_but_source_port(entry, &context.flow) } else { flow::same_key(entry, &context.flow) })
    {
        return None;
    }
    if entry.kind == CACHED_FLOW {
        if opening || flow::closes(packet.tcp_flags) {
            return None;
        }
    } else {
        // Policy verdicts (a denial, an admitted SYN).
        if hairpin || entry.deferral != deferral_on(&context.settings) as u8 {
            return None;
        }
        // An admitted SYN only opens SYNs; a SYN's denial holds `NO_FLOW_EPOCH`, which no
        // epoch reaches.
        if !opening && (entry.kind != CACHED_DENIAL || flow::epoch(context.flow.key.ifindex) != entry.flow_epoch) {
            return None;
        }
    }
    if REVISIONS.get(entry.slot).copied().unwrap_or(NO_REVISION) != entry.revision {
        return None;
    }
    if entry.kind == CACHED_DENIAL {
        return Some(Lookup::CachedDenial(entry));
    }
    if entry.kind == CACHED_NEW_FLOW {
        return Some(Lookup::CachedNewFlow(entry));
    }
    Some(Lookup::Hit { judgement: remembered(entry.audit != 0, entry.rule_index), slot: entry.slot })
}

/// Remembers a policy verdict the full path took on a packet no conntrack entry decided (a
/// miss, not a stale entry), neither a fragment nor hairpin traffic, if later packets may take
/// it from the cache: a denial (a SYN's stands for SYNs only), or a TCP SYN's admission.
#[inline(always)]
pub fn remember_verdict(context: &FlowContext, direction: u8, endpoint: &EndpointInfo, packet: &Packet, outcome: &Outcome, lookup: Lookup, hairpin: bool) {
    let (Some(entry), Lookup::Miss, false) = (context.cache, lookup, hairpin) else { return };
    let (kind, rule, reason) = match outcome.judgement {
        Judgement::Denied { reason } => (CACHED_DENIAL, NO_RULE, reason as u8),
        Judgement::Allowed { rule } if packet.is_tcp_open() => (CACHED_NEW_FLOW, rule, 0),
        _ => return,
    };
    // SAFETY: a per-CPU map value; no other run on this CPU interleaves with a TC program's.
    unsafe {
        claim_slot(entry, context, direction, kind);
        (*entry).audit = 0;
        (*entry).slot = endpoint.endpoint_id;
        (*entry).revision = endpoint.revision;
        (*entry).ipcache_generation = context.settings.ipcache_generation;
        (*entry).rule_index = rule;
        (*entry).flow_epoch = context.flow_epoch;
        (*entry).peer_identity = outcome.identity;
        (*entry).reason = reason;
        (*entry).deferral = deferral_on(&context.settings) as u8;
        (*entry).records = records_flow(direction, endpoint, packet) as u8;
    }
}

/// Whether a new flow's packet is recorded in conntrack: entries keep the pod's own address on
/// the pod's end (the fast path relies on it), so a packet to the pod for another address is
/// judged but not recorded.
#[inline(always)]
fn records_flow(direction: u8, endpoint: &EndpointInfo, packet: &Packet) -> bool {
    direction != DIRECTION_INGRESS || is_own_address(endpoint, &packet.dst)
}

/// The conntrack entry of a new flow recorded for endpoint `slot` at `revision` with
/// `rule_index`; `extra_flags`: `FLOW_DEFERRED` (its egress verdict left to the netfilter hook)
/// or `FLOW_AUDIT` (passed under audit mode), if either.
#[inline(always)]
fn new_flow_state(context: &FlowContext, direction: u8, packet: &Packet, slot: u32, revision: u32, rule_index: u32, extra_flags: u8) -> FlowState {
    let mut flags = extra_flags;
    if context.flow.src_is_a {
        flags |= FLOW_INITIATOR_A;
    }
    if direction == DIRECTION_EGRESS {
        flags |= FLOW_EGRESS;
    }
    FlowState {
        last_seen_ns: context.now,
        revision,
        ipcache_generation: context.settings.ipcache_generation,
        rule_index,
        flags,
        tcp_state: flow::opened_state(packet),
        // Meaningful once the netfilter hook confirms a deferred flow (it writes the backend);
        // until then the destination the pod used. (Not zeros: a zeroed 16-byte array compiles
        // to a byte-loop memset call.)
        nat_port: packet.dst_port,
        nat_addr: packet.dst,
        slot,
        _pad: 0,
        created_ns: context.now,
    }
}

/// Opens the flow of a TCP SYN the flow cache admits, as the full path would have: its
/// conntrack entry, its counters and (if allowed flows are reported) its event.
///
/// # Safety
/// `entry` must point to the packet's live flow cache slot.
#[inline(always)]
pub unsafe fn open_cached_flow(entry: *const FlowCacheEntry, context: &FlowContext, ifindex: u32, direction: u8, packet: &Packet, bytes: u64) {
    // SAFETY: the caller's pointer is a per-CPU map value live for this program run.
    let e = unsafe { &*entry };
    let endpoint = EndpointTag { slot: e.slot, revision: e.revision };
    if e.records != 0 {
        flow::insert(&context.flow.key, &new_flow_state(context, direction, packet, e.slot, e.revision, e.rule_index, 0));
    }
    let outcome = Outcome { judgement: Judgement::Allowed { rule: e.rule_index }, identity: e.peer_identity, fresh: true };
    account(&outcome, ifindex, direction, endpoint, packet, bytes, HOOK_TC, None);
}

/// Remembers what a conntrack hit decided, if later packets may take it from the cache: an
/// entry whose touch has nothing left to record (established, not deferred) and a packet that
/// changes nothing (no FIN or RST).
///
/// # Safety
/// `state` must point to the live conntrack value the packet hit.
#[inline(always)]
unsafe fn remember(context: &FlowContext, direction: u8, packet: &Packet, state: *const FlowState) {
    let Some(entry) = context.cache else { return };
    // SAFETY: the caller's pointer is live for this program run.
    let s = unsafe { &*state };
    if s.flags & FLOW_DEFERRED != 0 || s.tcp_state != CT_STATE_ESTABLISHED || flow::closes(packet.tcp_flags) {
        return;
    }
    // SAFETY: a per-CPU map value; no other run on this CPU interleaves with a TC program's.
    unsafe {
        claim_slot(entry, context, direction, CACHED_FLOW);
        (*entry).audit = (s.flags & FLOW_AUDIT != 0) as u8;
        (*entry).slot = s.slot;
        (*entry).revision = s.revision;
        (*entry).ipcache_generation = s.ipcache_generation;
        (*entry).rule_index = s.rule_index;
    }
}

/// Gives the packet's flow cache slot to its flow and hook direction for the window, as an
/// entry of `kind`; the caller writes the verdict and what it is current under.
///
/// # Safety
/// `entry` must point to the packet's flow cache slot, written only by TC programs.
#[inline(always)]
unsafe fn claim_slot(entry: *mut FlowCacheEntry, context: &FlowContext, direction: u8, kind: u8) {
    // SAFETY: the caller's pointer is a per-CPU map value live for this program run.
    unsafe {
        flow::copy_key(entry, &context.flow);
        (*entry).src_is_a = context.flow.src_is_a as u8;
        (*entry).direction = direction;
        (*entry).kind = kind;
        (*entry).fresh_until_ns = context.now + FLOW_CACHE_WINDOW_NS;
    }
}

/// The fast path: the flow cache, then one conntrack lookup. A live, current entry decides
/// the packet without the endpoint: the entry's slot and revision are checked against
/// `REVISIONS`. `hairpin`: the packet leaves the interface it entered by. `use_cache`: false
/// only in the benchmark's calibration programs, which measure the path a packet takes when
/// its cache slot holds another flow.
#[inline(always)]
pub fn lookup_flow(ifindex: u32, direction: u8, packet: &Packet, hairpin: bool, use_cache: bool) -> (FlowContext, Lookup) {
    let flow = flow::packet_key(ifindex, packet);
    // A TCP SYN opens a new connection: it never rides an existing entry (port reuse), and its
    // cache slot is the one of every SYN between its addresses to its port.
    let opening = packet.is_tcp_open();
    // A fragment needs the endpoint (its verdict is recorded for the later fragments).
    let cache =
        if use_cache && !packet.fragment { FLOW_CACHE.get_ptr_mut(flow::cache_index(&flow, direction, opening)) } else { None };
    let mut context = FlowContext { flow, settings: settings(), now: now_coarse(), cache, flow_epoch: NO_FLOW_EPOCH };
    if packet.fragment {
        return (context, Lookup::Miss);
    }
    if let Some(hit) = cache_hit(&context, direction, packet, hairpin, opening) {
        return (context, hit);
    }
    if opening {
        return (context, Lookup::Miss);
    }
    context.flow_epoch = flow::epoch(ifindex);
    let Some(state) = CONNTRACK.get_ptr_mut(&context.flow.key) else { return (context, Lookup::Miss) };
    // SAFETY: a live map value for this program run.
    let s = unsafe { &*state };
    if flow::expired(&context.flow.key, s, context.now) {
        return (context, Lookup::Miss);
    }
    let forward = flow::from_initiator(s, context.flow.src_is_a);
    if !on_pod_side(direction, s, forward) {
        return (context, Lookup::Entry(state));
    }
    if s.flags & FLOW_DEFERRED != 0 {
        if forward {
            // Forward packets of a deferred flow are the netfilter hook's to judge.
            if !deferral_on(&context.settings) {
                return (context, Lookup::Entry(state));
            }
            // SAFETY: as above.
            unsafe { flow::touch(state, packet.protocol, packet.tcp_flags, false, context.now) };
            return (context, Lookup::Hit { judgement: Judgement::Deferred, slot: s.slot });
        }
        // Replies are admitted once the netfilter hook confirmed the flow.
        if s.flags & FLOW_CONFIRMED == 0 {
            return (context, Lookup::Entry(state));
        }
    }
    let revision = REVISIONS.get(s.slot).copied().unwrap_or(NO_REVISION);
    if revision != s.revision || s.ipcache_generation != context.settings.ipcache_generation {
        return (context, Lookup::Entry(state));
    }
    // SAFETY: as above.
    unsafe {
        flow::touch(state, packet.protocol, packet.tcp_flags, !forward, context.now);
        remember(&context, direction, packet, state);
    }
    (context, Lookup::Hit { judgement: cached(s), slot: s.slot })
}

/// Counts a packet the fast path decided (no events: the flow reported when it was judged).
#[inline(always)]
pub fn account_hit(judgement: Judgement, slot: u32, direction: u8, bytes: u64) {
    match judgement {
        Judgement::Allowed { rule } => {
            count_endpoint(slot, direction, Counted::Allowed, bytes);
            count_rule(rule, bytes);
        }
        Judgement::Audited { reason } => {
            count_audit(reason, direction);
            count_endpoint(slot, direction, Counted::Audited, bytes);
        }
        // Counted by the netfilter hook, which takes the verdict.
        Judgement::Deferred | Judgement::Denied { .. } => {}
    }
}

/// Judges a packet at a TC hook of an endpoint's interface that the fast path did not decide.
#[inline(always)]
pub fn judge_tc_packet(
    direction: u8,
    endpoint: &EndpointInfo,
    packet: &Packet,
    hairpin: bool,
    context: &FlowContext,
    lookup: Lookup,
) -> Outcome {
    let settings = &context.settings;
    let now = context.now;
    let flow = &context.flow;
    let netfilter_active = deferral_on(settings);
    // A packet answering a deferred flow the netfilter hook has not confirmed is judged on its
    // own, without replacing that flow's entry.
    let mut may_record = true;
    if let Lookup::Entry(state) = lookup {
        // SAFETY: a live map value for this program run.
        let s = unsafe { &*state };
        let forward = flow::from_initiator(s, flow.src_is_a);
        let deferred = s.flags & FLOW_DEFERRED != 0;
        let usable = on_pod_side(direction, s, forward)
            && if deferred {
                (forward && netfilter_active) || (!forward && s.flags & FLOW_CONFIRMED != 0)
            } else {
                true
            };
        if deferred && !forward {
            may_record = usable;
        }
        if usable {
            if deferred && forward {
                return Outcome { judgement: Judgement::Deferred, identity: IDENTITY_WORLD, fresh: false };
            }
            if s.revision == endpoint.revision && s.ipcache_generation == settings.ipcache_generation {
                // SAFETY: as above.
                unsafe { flow::touch(state, packet.protocol, packet.tcp_flags, !forward, now) };
                return Outcome { judgement: cached(s), identity: IDENTITY_WORLD, fresh: false };
            }
            // SAFETY: as above.
            if let Some(judgement) = unsafe { rejudge(endpoint, settings, &flow.key, state) } {
                // SAFETY: as above.
                unsafe { flow::touch(state, packet.protocol, packet.tcp_flags, !forward, now) };
                return Outcome { judgement, identity: IDENTITY_WORLD, fresh: false };
            }
            // Revoked: the entry goes and the packet is judged as a new flow.
            let _ = CONNTRACK.remove(&flow.key);
        }
    }
    let peer = if direction == DIRECTION_EGRESS { &packet.dst } else { &packet.src };
    let allow_defer = direction == DIRECTION_EGRESS && netfilter_active;
    let (judgement, identity) = judge_flow(
        endpoint,
        direction,
        peer,
        packet.protocol,
        packet.dst_port,
        packet.has_ports(),
        allow_defer,
        hairpin,
    );
    let record = match judgement {
        Judgement::Allowed { rule } => Some((0, rule)),
        Judgement::Deferred => Some((FLOW_DEFERRED, NO_RULE)),
        Judgement::Audited { .. } => Some((FLOW_AUDIT, NO_RULE)),
        Judgement::Denied { .. } => None,
    };
    if let Some((flags, rule_index)) = record.filter(|_| may_record && records_flow(direction, endpoint, packet)) {
        let state = new_flow_state(context, direction, packet, endpoint.endpoint_id, endpoint.revision, rule_index, flags);
        flow::insert(&flow.key, &state);
    }
    Outcome { judgement, identity, fresh: true }
}

/// Counts and reports a packet dropped by a denial the flow cache holds, as [`account`] does
/// the full path's.
///
/// # Safety
/// `entry` must point to the packet's live flow cache slot.
#[inline(always)]
pub unsafe fn account_cached_denial(entry: *const FlowCacheEntry, ifindex: u32, direction: u8, packet: &Packet, bytes: u64) {
    // SAFETY: the caller's pointer is a per-CPU map value live for this program run.
    let (reason, identity, endpoint) =
        unsafe { ((*entry).reason as u32, (*entry).peer_identity, EndpointTag { slot: (*entry).slot, revision: (*entry).revision }) };
    let outcome = Outcome { judgement: Judgement::Denied { reason }, identity, fresh: true };
    account(&outcome, ifindex, direction, endpoint, packet, bytes, HOOK_TC, None);
}

/// Counts a judged packet and emits its event. `original_dst`: the pre-DNAT destination of a
/// Service flow (netfilter).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn account(
    outcome: &Outcome,
    ifindex: u32,
    direction: u8,
    endpoint: EndpointTag,
    packet: &Packet,
    bytes: u64,
    hook: u8,
    original_dst: Option<(&[u8; 16], u16)>,
) {
    let slot = endpoint.slot;
    let (verdict, reason, rule) = match outcome.judgement {
        Judgement::Allowed { rule } => {
            count_endpoint(slot, direction, Counted::Allowed, bytes);
            count_rule(rule, bytes);
            if !outcome.fresh || settings().flags & CONFIG_EVENTS_ALLOWED == 0 {
                return;
            }
            (VERDICT_ALLOWED, REASON_NONE, rule)
        }
        // Counted where the verdict is taken.
        Judgement::Deferred => return,
        Judgement::Denied { reason } => {
            count_drop(reason, direction);
            count_endpoint(slot, direction, Counted::Denied, bytes);
            (VERDICT_DROPPED, reason as u8, NO_RULE)
        }
        Judgement::Audited { reason } => {
            count_audit(reason, direction);
            count_endpoint(slot, direction, Counted::Audited, bytes);
            if !outcome.fresh {
                return;
            }
            (VERDICT_AUDIT, reason as u8, NO_RULE)
        }
    };
    let info = EventInfo {
        ifindex,
        endpoint_id: slot,
        revision: endpoint.revision,
        peer_identity: outcome.identity,
        rule_index: rule,
        reason,
        verdict,
        direction,
        hook,
    };
    emit(&info, packet, original_dst);
}

/// A drop before any endpoint verdict (malformed, no endpoint, spoofed, unknown fragment):
/// counted and reported whatever audit mode says.
#[inline(always)]
pub fn structural_drop(reason: u32, ifindex: u32, direction: u8, endpoint: Option<&EndpointInfo>, packet: &Packet, bytes: u64, hook: u8) {
    count_drop(reason, direction);
    let (slot, revision) = match endpoint {
        Some(endpoint) => {
            count_endpoint(endpoint.endpoint_id, direction, Counted::Denied, bytes);
            (endpoint.endpoint_id, endpoint.revision)
        }
        None => (u32::MAX, 0),
    };
    let info = EventInfo {
        ifindex,
        endpoint_id: slot,
        revision,
        peer_identity: IDENTITY_WORLD,
        rule_index: NO_RULE,
        reason: reason as u8,
        verdict: VERDICT_DROPPED,
        direction,
        hook,
    };
    emit(&info, packet, None);
}
