//! TC programs enforcing NetworkPolicy on a pod's host-side veth.
//!
//! On that interface TC *ingress* sees what the pod sends (its egress policy applies) and TC
//! *egress* sees what is sent to the pod (its ingress policy applies). The verdict logic is in
//! the library (`verdict`), shared with the netfilter program; these entry points only parse,
//! find the endpoint and turn the verdict into a TC action.
//!
//! Allowed packets return `TC_ACT_UNSPEC` (with TCX: "next"), so programs of other tools on the
//! same hook still run; dropped packets return `TC_ACT_SHOT`.
#![no_std]
#![no_main]
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use netsieve_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, EndpointInfo, FragmentKey, FragmentValue, HOOK_TC, REASON_FRAGMENT_UNKNOWN,
    REASON_MALFORMED, REASON_NO_ENDPOINT, REASON_POLICY_DENIED, REASON_SPOOFED,
};
use netsieve_ebpf::counters::{Counted, count_audit, count_endpoint};
use netsieve_ebpf::maps::{ENDPOINTS, FRAGMENTS};
use netsieve_ebpf::packet::{Malformed, Packet, Parsed, TcFrame, parse_frame};
use netsieve_ebpf::verdict::{
    EndpointTag, Judgement, Lookup, account, account_cached_denial, account_hit, is_spoofed, judge_tc_packet, lookup_flow, open_cached_flow, remember_verdict,
    structural_drop,
};

/// `FragmentValue::allowed`: what the first fragment's verdict was.
const FRAGMENT_DENIED: u8 = 0;
const FRAGMENT_ALLOWED: u8 = 1;
const FRAGMENT_AUDITED: u8 = 2;

/// TC ingress of the pod's host-side veth: traffic the pod sends (its egress policy).
///
/// `inline(always)` applies to the function `#[classifier]` nests in the entry point it
/// generates: left to LLVM, this one was compiled as a BPF-to-BPF call, a call and a return on
/// every packet (the return through the kernel's return thunk where the CPU needs one).
#[classifier]
#[inline(always)]
pub fn netsieve_from_pod(ctx: TcContext) -> i32 {
    action(try_enforce(&ctx, DIRECTION_EGRESS, true))
}

/// TC egress of the pod's host-side veth: traffic sent to the pod (its ingress policy).
#[classifier]
#[inline(always)]
pub fn netsieve_to_pod(ctx: TcContext) -> i32 {
    action(try_enforce(&ctx, DIRECTION_INGRESS, true))
}

/// An empty program: the baseline the benchmarks compare against.
#[classifier]
pub fn netsieve_pass(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Calibration programs for the benchmarks (never attached): each does one piece of the packet
/// path alone, so `cargo bench --bench dataplane` can show what that piece costs on the machine
/// at hand (a helper call or a hash lookup costs more on a kernel with return-thunk
/// mitigations) beside what the enforcement programs cost. Pass, or drop when the piece
/// failed, so the bench can check the piece ran.
pub mod calibration {
    use super::*;
    use netsieve_ebpf::flow::packet_key;
    use netsieve_ebpf::maps::CONNTRACK;
    use netsieve_ebpf::verdict::now_coarse;

    /// Parsing the frame into a `Packet`.
    #[classifier]
    pub fn netsieve_cal_parse(ctx: TcContext) -> i32 {
        match parse_frame(&TcFrame::new(&ctx)) {
            Ok(Parsed::Ip(packet)) if packet.dst_port != 0 => TC_ACT_UNSPEC,
            _ => TC_ACT_SHOT,
        }
    }

    /// Parsing plus one conntrack lookup of the packet's flow: the floor of a conntrack-first
    /// fast path.
    #[classifier]
    pub fn netsieve_cal_conntrack(ctx: TcContext) -> i32 {
        // SAFETY: the context pointer is valid for the program run.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let Ok(Parsed::Ip(packet)) = parse_frame(&TcFrame::new(&ctx)) else { return TC_ACT_SHOT };
        let flow = packet_key(ifindex, &packet);
        // SAFETY: plain read of a map value.
        match unsafe { CONNTRACK.get(&flow.key) } {
            Some(_) => TC_ACT_UNSPEC,
            None => TC_ACT_SHOT,
        }
    }

    /// One hash-map lookup on a 4-byte key (the endpoint by interface).
    #[classifier]
    pub fn netsieve_cal_hash(ctx: TcContext) -> i32 {
        // SAFETY: the context pointer is valid for the program run.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        // SAFETY: plain read of a map value.
        match unsafe { ENDPOINTS.get(&ifindex) } {
            Some(_) => TC_ACT_UNSPEC,
            None => TC_ACT_SHOT,
        }
    }

    /// Offset of the TCP source port in the benchmark's frames (Ethernet, IPv4 without
    /// options).
    const BENCH_SOURCE_PORT_OFFSET: usize = 14 + 20;

    /// Adds one to the frame's TCP source port in place. A repeated `BPF_PROG_TEST_RUN` runs
    /// every repetition on the same buffer, so each run then sees a flow no earlier run saw.
    #[inline(always)]
    fn next_source_port(ctx: &TcContext) -> bool {
        let start = ctx.data() + BENCH_SOURCE_PORT_OFFSET;
        if start + 2 > ctx.data_end() {
            return false;
        }
        let port = start as *mut u16;
        // SAFETY: bounds checked against data_end just above (the verifier checks it too).
        unsafe { *port = u16::from_be(*port).wrapping_add(1).to_be() };
        true
    }

    /// The baseline of `netsieve_cal_new_flows`: only the port change.
    #[classifier]
    pub fn netsieve_cal_next_port(ctx: TcContext) -> i32 {
        if next_source_port(&ctx) { TC_ACT_UNSPEC } else { TC_ACT_SHOT }
    }

    /// The to-pod program on a new flow at every run: the first packet of a flow conntrack has
    /// never seen (a fresh insert, where repeating one SYN measures replacing its entry).
    #[classifier]
    #[inline(always)]
    pub fn netsieve_cal_new_flows(ctx: TcContext) -> i32 {
        if !next_source_port(&ctx) {
            return TC_ACT_SHOT;
        }
        action(try_enforce(&ctx, DIRECTION_INGRESS, true))
    }

    /// The conntrack insert of a new flow alone (parsing, the key, one insert of a flow
    /// conntrack has never seen, as `netsieve_cal_new_flows` makes them): the part of a new
    /// flow's cost that is the kernel's LRU hash table.
    #[classifier]
    pub fn netsieve_cal_new_entry(ctx: TcContext) -> i32 {
        if !next_source_port(&ctx) {
            return TC_ACT_SHOT;
        }
        let Ok(Parsed::Ip(packet)) = parse_frame(&TcFrame::new(&ctx)) else { return TC_ACT_SHOT };
        // SAFETY: the context pointer is valid for the program run.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let flow = packet_key(ifindex, &packet);
        let state = netsieve_common::FlowState {
            last_seen_ns: 1,
            revision: 1,
            ipcache_generation: 0,
            rule_index: netsieve_common::NO_RULE,
            flags: 0,
            tcp_state: 0,
            nat_port: packet.dst_port,
            nat_addr: packet.dst,
            slot: 0,
            _pad: 0,
            created_ns: 1,
        };
        match CONNTRACK.insert(&flow.key, &state, 0) {
            Ok(()) => TC_ACT_UNSPEC,
            Err(_) => TC_ACT_SHOT,
        }
    }

    /// The to-pod program without the flow cache: what an established flow's packet costs
    /// when its cache slot holds another flow (conntrack decides).
    #[classifier]
    #[inline(always)]
    pub fn netsieve_cal_to_pod_uncached(ctx: TcContext) -> i32 {
        action(try_enforce(&ctx, DIRECTION_INGRESS, false))
    }

    /// The from-pod program without the flow cache.
    #[classifier]
    #[inline(always)]
    pub fn netsieve_cal_from_pod_uncached(ctx: TcContext) -> i32 {
        action(try_enforce(&ctx, DIRECTION_EGRESS, false))
    }

    /// One `bpf_probe_read_kernel` call (of the conntrack tuple's size): how the netfilter
    /// program reads kernel structures.
    #[classifier]
    pub fn netsieve_cal_probe_read(ctx: TcContext) -> i32 {
        // The context is the kernel's sk_buff; any readable kernel address will do.
        let skb = ctx.skb.skb as usize;
        // SAFETY: the helper reads through the kernel's fault-tolerant accessor.
        match unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(skb as *const netsieve_common::NfConntrackTuple) } {
            Ok(_) => TC_ACT_UNSPEC,
            _ => TC_ACT_SHOT,
        }
    }

    /// One read of the coarse clock (a helper call).
    #[classifier]
    pub fn netsieve_cal_clock(_ctx: TcContext) -> i32 {
        // SAFETY: no preconditions.
        if unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() } != 0 { TC_ACT_UNSPEC } else { TC_ACT_SHOT }
    }

    /// One read of the clock the programs use: the coarse clock through the per-CPU jiffies
    /// cache.
    #[classifier]
    pub fn netsieve_cal_clock_cached(_ctx: TcContext) -> i32 {
        if now_coarse() != 0 { TC_ACT_UNSPEC } else { TC_ACT_SHOT }
    }
}

/// A dropped packet: its reason is counted where it is decided.
struct Dropped;

#[inline(always)]
fn action(result: Result<(), Dropped>) -> i32 {
    match result {
        Ok(()) => TC_ACT_UNSPEC,
        Err(Dropped) => TC_ACT_SHOT,
    }
}

/// The verdict for one packet on one pod interface. `direction` is the pod's: egress for what
/// it sends, ingress for what it receives. `use_cache`: the flow cache (off only in
/// calibration programs).
#[inline(always)]
fn try_enforce(ctx: &TcContext, direction: u8, use_cache: bool) -> Result<(), Dropped> {
    // SAFETY: the context pointer is valid for the program run.
    let (ifindex, ingress_ifindex) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    let bytes = ctx.len() as u64;
    let frame = TcFrame::new(ctx);
    let parsed = parse_frame(&frame);
    let packet = match parsed {
        Ok(Parsed::Pass) => return Ok(()),
        Ok(Parsed::Ip(packet)) => packet,
        Err(Malformed) => {
            // SAFETY: plain read of a map value.
            let endpoint = unsafe { ENDPOINTS.get(&ifindex) };
            structural_drop(REASON_MALFORMED, ifindex, direction, endpoint, &Packet::empty(), bytes, HOOK_TC);
            return Err(Dropped);
        }
    };
    // A packet leaving the interface it entered by: the pod reaching itself through a Service
    // (hairpin, source masqueraded).
    let hairpin = direction == DIRECTION_INGRESS && ingress_ifindex == ifindex;
    // The fast path: a packet of a flow judged earlier, under the current policy.
    let (context, lookup) = lookup_flow(ifindex, direction, &packet, hairpin, use_cache);
    match lookup {
        Lookup::Hit { judgement, slot } => {
            account_hit(judgement, slot, direction, bytes);
            return Ok(());
        }
        Lookup::CachedDenial(entry) => {
            // SAFETY: the packet's flow cache slot, live for this program run.
            unsafe { account_cached_denial(entry, ifindex, direction, &packet, bytes) };
            return Err(Dropped);
        }
        Lookup::CachedNewFlow(entry) => {
            // SAFETY: as above.
            unsafe { open_cached_flow(entry, &context, ifindex, direction, &packet, bytes) };
            return Ok(());
        }
        Lookup::Entry(_) | Lookup::Miss => {}
    }
    // SAFETY: plain read of a map value.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(&ifindex) }) else {
        // Attached but not programmed: the agent writes the endpoint before attaching, so this
        // is a stale attachment; fail closed.
        structural_drop(REASON_NO_ENDPOINT, ifindex, direction, None, &packet, bytes, HOOK_TC);
        return Err(Dropped);
    };
    if direction == DIRECTION_EGRESS && is_spoofed(endpoint, &packet) {
        structural_drop(REASON_SPOOFED, ifindex, direction, Some(endpoint), &packet, bytes, HOOK_TC);
        return Err(Dropped);
    }
    if packet.later_fragment {
        return later_fragment(ifindex, direction, endpoint, &packet, bytes);
    }
    let outcome = judge_tc_packet(direction, endpoint, &packet, hairpin, &context, lookup);
    if packet.fragment {
        let allowed = match outcome.judgement {
            Judgement::Denied { .. } => FRAGMENT_DENIED,
            Judgement::Audited { .. } => FRAGMENT_AUDITED,
            Judgement::Allowed { .. } | Judgement::Deferred => FRAGMENT_ALLOWED,
        };
        let value = FragmentValue { allowed, _pad1: 0, _pad2: 0, src_port: packet.src_port, dst_port: packet.dst_port };
        let _ = FRAGMENTS.insert(&fragment_key(ifindex, &packet), &value, 0);
    }
    remember_verdict(&context, direction, endpoint, &packet, &outcome, lookup, hairpin);
    account(&outcome, ifindex, direction, EndpointTag::of(endpoint), &packet, bytes, HOOK_TC, None);
    match outcome.judgement {
        Judgement::Denied { .. } => Err(Dropped),
        _ => Ok(()),
    }
}

#[inline(always)]
fn fragment_key(ifindex: u32, packet: &Packet) -> FragmentKey {
    FragmentKey {
        src_addr: packet.src,
        dst_addr: packet.dst,
        ifindex,
        id: packet.fragment_id,
        protocol: packet.protocol,
        _pad1: 0,
        _pad2: 0,
    }
}

/// A fragment other than the first has no ports: it takes its first fragment's verdict.
#[inline(always)]
fn later_fragment(ifindex: u32, direction: u8, endpoint: &EndpointInfo, packet: &Packet, bytes: u64) -> Result<(), Dropped> {
    // SAFETY: plain read of a map value.
    let Some(first) = (unsafe { FRAGMENTS.get(&fragment_key(ifindex, packet)) }).copied() else {
        structural_drop(REASON_FRAGMENT_UNKNOWN, ifindex, direction, Some(endpoint), packet, bytes, HOOK_TC);
        return Err(Dropped);
    };
    let mut packet = *packet;
    packet.src_port = first.src_port;
    packet.dst_port = first.dst_port;
    match first.allowed {
        FRAGMENT_ALLOWED => {
            count_endpoint(endpoint.endpoint_id, direction, Counted::Allowed, bytes);
            Ok(())
        }
        FRAGMENT_AUDITED => {
            count_audit(REASON_POLICY_DENIED, direction);
            count_endpoint(endpoint.endpoint_id, direction, Counted::Audited, bytes);
            Ok(())
        }
        _ => {
            structural_drop(REASON_POLICY_DENIED, ifindex, direction, Some(endpoint), &packet, bytes, HOOK_TC);
            Err(Dropped)
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
