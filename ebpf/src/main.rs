//! TC programs enforcing NetworkPolicy on a pod's host-side veth.
//!
//! On that interface TC *ingress* sees what the pod sends (its egress policy applies) and TC
//! *egress* sees what is sent to the pod (its ingress policy applies). The lookup design and
//! every map layout are in `netsieve-common`; the verdict logic (`try_enforce`) is one inlined
//! function so further hooks (e.g. after kube-proxy's DNAT) can call it.
//!
//! Allowed packets return `TC_ACT_UNSPEC` (with TCX: "next"), so programs of other tools on the
//! same hook still run; denied packets return `TC_ACT_SHOT`.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap};
use aya_ebpf::programs::TcContext;
use netsieve_common::*;

#[map(name = "ENDPOINTS")]
static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);
#[map(name = "IPCACHE")]
static IPCACHE: LpmTrie<IpcacheKeyData, IpcacheValue> = LpmTrie::with_max_entries(MAX_IPCACHE_ENTRIES, 0);
#[map(name = "POLICY_IDENTITY")]
static POLICY_IDENTITY: HashMap<PolicyIdentityKey, RuleMask> =
    HashMap::with_max_entries(MAX_POLICY_IDENTITY_ENTRIES, 0);
#[map(name = "POLICY_CIDR")]
static POLICY_CIDR: LpmTrie<PolicyCidrKeyData, RuleMask> = LpmTrie::with_max_entries(MAX_POLICY_CIDR_ENTRIES, 0);
#[map(name = "POLICY_PORT")]
static POLICY_PORT: LpmTrie<PolicyPortKeyData, RuleMask> = LpmTrie::with_max_entries(MAX_POLICY_PORT_ENTRIES, 0);
#[map(name = "CONNTRACK")]
static CONNTRACK: LruHashMap<ConntrackKey, ConntrackValue> = LruHashMap::with_max_entries(MAX_CONNTRACK_ENTRIES, 0);
#[map(name = "FRAGMENTS")]
static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> = LruHashMap::with_max_entries(MAX_FRAGMENT_ENTRIES, 0);
#[map(name = "DROP_COUNTERS")]
static DROP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT * 2, 0);
#[map(name = "ENDPOINT_STATS")]
static ENDPOINT_STATS: PerCpuHashMap<u32, EndpointStats> = PerCpuHashMap::with_max_entries(MAX_ENDPOINTS * 2, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
/// IPv6 extension headers followed before giving up (a defined, counted verdict: malformed).
const MAX_IPV6_EXTENSIONS: usize = 6;

const NS: u64 = 1_000_000_000;
const TIMEOUT_TCP_NEW_NS: u64 = 60 * NS;
const TIMEOUT_TCP_ESTABLISHED_NS: u64 = 6 * 3600 * NS;
const TIMEOUT_TCP_CLOSING_NS: u64 = 10 * NS;
const TIMEOUT_UDP_NS: u64 = 120 * NS;
const TIMEOUT_OTHER_NS: u64 = 60 * NS;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// The L3/L4 facts the verdict needs.
struct Packet {
    src: [u8; 16],
    dst: [u8; 16],
    protocol: u8,
    src_port: u16,
    dst_port: u16,
    tcp_flags: u8,
    /// Part of a fragmented datagram.
    fragment: bool,
    /// A fragment other than the first: carries no L4 header.
    later_fragment: bool,
    fragment_id: u32,
}

enum Parsed {
    /// Not IP (ARP, LLDP, ...): policy is about IP traffic; ARP must work for pods to talk.
    Pass,
    Ip(Packet),
}

/// Parsing failed on a truncated or inconsistent header.
struct Malformed;

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    ctx.load::<T>(offset).map_err(|_| Malformed)
}

#[inline(always)]
fn be16(ctx: &TcContext, offset: usize) -> Result<u16, Malformed> {
    Ok(u16::from_be(load::<u16>(ctx, offset)?))
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, packet: &mut Packet, offset: usize) -> Result<bool, Malformed> {
    match packet.protocol {
        PROTO_TCP => {
            packet.src_port = be16(ctx, offset)?;
            packet.dst_port = be16(ctx, offset + 2)?;
            packet.tcp_flags = load::<u8>(ctx, offset + 13)?;
        }
        PROTO_UDP | PROTO_SCTP => {
            packet.src_port = be16(ctx, offset)?;
            packet.dst_port = be16(ctx, offset + 2)?;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let icmp_type = load::<u8>(ctx, offset)?;
            // Neighbour discovery (router/neighbour solicitation and advertisement, redirect)
            // is link plumbing, not pod traffic: blocking it would cut allowed flows too.
            if packet.protocol == PROTO_ICMPV6 && (133..=137).contains(&icmp_type) {
                return Ok(true);
            }
            // Echo request/reply: the identifier stands in for both ports so a reply finds
            // its request in conntrack. Policy ports never apply to ICMP.
            let echo = matches!((packet.protocol, icmp_type), (PROTO_ICMP, 0 | 8) | (PROTO_ICMPV6, 128 | 129));
            if echo {
                let id = be16(ctx, offset + 4)?;
                packet.src_port = id;
                packet.dst_port = id;
            }
        }
        _ => {}
    }
    Ok(false)
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Parsed, Malformed> {
    let ethertype = be16(ctx, 12)?;
    let mut packet = Packet {
        src: [0; 16],
        dst: [0; 16],
        protocol: 0,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        fragment: false,
        later_fragment: false,
        fragment_id: 0,
    };
    let l4_offset;
    match ethertype {
        ETH_P_IP => {
            let version_ihl = load::<u8>(ctx, ETH_HLEN)?;
            let header_len = ((version_ihl & 0x0f) as usize) * 4;
            if version_ihl >> 4 != 4 || header_len < 20 {
                return Err(Malformed);
            }
            let total_len = be16(ctx, ETH_HLEN + 2)? as usize;
            if total_len < header_len || ETH_HLEN + total_len > ctx.len() as usize {
                return Err(Malformed);
            }
            let flags_offset = be16(ctx, ETH_HLEN + 6)?;
            let more_fragments = flags_offset & 0x2000 != 0;
            let offset = flags_offset & 0x1fff;
            packet.fragment = more_fragments || offset != 0;
            packet.later_fragment = offset != 0;
            packet.fragment_id = be16(ctx, ETH_HLEN + 4)? as u32;
            packet.protocol = load::<u8>(ctx, ETH_HLEN + 9)?;
            let src: [u8; 4] = load(ctx, ETH_HLEN + 12)?;
            let dst: [u8; 4] = load(ctx, ETH_HLEN + 16)?;
            // IPv4-mapped IPv6, the key form of every address map.
            packet.src[10] = 0xff;
            packet.src[11] = 0xff;
            packet.src[12..].copy_from_slice(&src);
            packet.dst[10] = 0xff;
            packet.dst[11] = 0xff;
            packet.dst[12..].copy_from_slice(&dst);
            l4_offset = ETH_HLEN + header_len;
        }
        ETH_P_IPV6 => {
            let version = load::<u8>(ctx, ETH_HLEN)?;
            if version >> 4 != 6 {
                return Err(Malformed);
            }
            let payload_len = be16(ctx, ETH_HLEN + 4)? as usize;
            if ETH_HLEN + 40 + payload_len > ctx.len() as usize {
                return Err(Malformed);
            }
            packet.src = load(ctx, ETH_HLEN + 8)?;
            packet.dst = load(ctx, ETH_HLEN + 24)?;
            let mut next = load::<u8>(ctx, ETH_HLEN + 6)?;
            let mut offset = ETH_HLEN + 40;
            let mut done = false;
            for _ in 0..MAX_IPV6_EXTENSIONS {
                match next {
                    // Hop-by-hop, routing, destination options: length in 8-octet units.
                    0 | 43 | 60 => {
                        let len = (load::<u8>(ctx, offset + 1)? as usize + 1) * 8;
                        next = load::<u8>(ctx, offset)?;
                        offset += len;
                    }
                    // Authentication header: length in 4-octet units, minus 2.
                    51 => {
                        let len = (load::<u8>(ctx, offset + 1)? as usize + 2) * 4;
                        next = load::<u8>(ctx, offset)?;
                        offset += len;
                    }
                    44 => {
                        let frag = be16(ctx, offset + 2)?;
                        packet.fragment = true;
                        packet.later_fragment = frag >> 3 != 0;
                        packet.fragment_id = u32::from_be(load::<u32>(ctx, offset + 4)?);
                        next = load::<u8>(ctx, offset)?;
                        offset += 8;
                    }
                    _ => {
                        done = true;
                        break;
                    }
                }
            }
            if !done {
                return Err(Malformed);
            }
            packet.protocol = next;
            l4_offset = offset;
        }
        ETH_P_ARP => return Ok(Parsed::Pass),
        _ => return Ok(Parsed::Pass),
    }
    if !packet.later_fragment && parse_l4(ctx, &mut packet, l4_offset)? {
        return Ok(Parsed::Pass);
    }
    Ok(Parsed::Ip(packet))
}

#[inline(always)]
fn count_drop(reason: u32, direction: u8) {
    if let Some(counter) = DROP_COUNTERS.get_ptr_mut(reason * 2 + direction as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn count_endpoint(endpoint_id: u32, direction: u8, allowed: bool, bytes: u64) {
    let dir = (direction & 1) as usize;
    let stats = match ENDPOINT_STATS.get_ptr_mut(endpoint_id) {
        Some(stats) => stats,
        None => {
            let _ = ENDPOINT_STATS.insert(endpoint_id, EndpointStats::default(), 0);
            match ENDPOINT_STATS.get_ptr_mut(endpoint_id) {
                Some(stats) => stats,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        if allowed {
            (*stats).allowed_packets[dir] += 1;
            (*stats).allowed_bytes[dir] += bytes;
        } else {
            (*stats).denied_packets[dir] += 1;
            (*stats).denied_bytes[dir] += bytes;
        }
    }
}

#[inline(always)]
fn timeout_ns(protocol: u8, state: u8) -> u64 {
    match (protocol, state) {
        (PROTO_TCP, CT_STATE_ESTABLISHED) => TIMEOUT_TCP_ESTABLISHED_NS,
        (PROTO_TCP, CT_STATE_CLOSING) => TIMEOUT_TCP_CLOSING_NS,
        (PROTO_TCP, _) => TIMEOUT_TCP_NEW_NS,
        (PROTO_UDP, _) => TIMEOUT_UDP_NS,
        _ => TIMEOUT_OTHER_NS,
    }
}

#[inline(always)]
fn next_state(protocol: u8, current: u8, flags: u8, reply: bool) -> u8 {
    if protocol != PROTO_TCP {
        return CT_STATE_ESTABLISHED;
    }
    if flags & (TCP_FIN | TCP_RST) != 0 || current == CT_STATE_CLOSING {
        CT_STATE_CLOSING
    } else if reply || current == CT_STATE_ESTABLISHED {
        CT_STATE_ESTABLISHED
    } else {
        CT_STATE_NEW
    }
}

/// The conntrack key of this packet's flow as seen on `ifindex`; `reversed` gives the key of
/// the flow this packet would be a reply to.
#[inline(always)]
fn flow_key(ifindex: u32, packet: &Packet, reversed: bool) -> ConntrackKey {
    let (src_port, dst_port, src_addr, dst_addr) = if reversed {
        (packet.dst_port, packet.src_port, packet.dst, packet.src)
    } else {
        (packet.src_port, packet.dst_port, packet.src, packet.dst)
    };
    ConntrackKey { ifindex, protocol: packet.protocol, _pad: [0; 3], src_port, dst_port, src_addr, dst_addr }
}

/// Whether this packet answers a flow allowed earlier on the same interface; refreshes it.
#[inline(always)]
fn is_reply(ifindex: u32, packet: &Packet, now: u64) -> bool {
    let key = flow_key(ifindex, packet, true);
    let Some(entry) = CONNTRACK.get_ptr_mut(key) else { return false };
    // SAFETY: the pointer is valid for this program run; racing updates only move timestamps.
    unsafe {
        if now.saturating_sub((*entry).last_seen_ns) > timeout_ns(packet.protocol, (*entry).state) {
            return false;
        }
        (*entry).last_seen_ns = now;
        (*entry).state = next_state(packet.protocol, (*entry).state, packet.tcp_flags, true);
    }
    true
}

#[inline(always)]
fn record_flow(ifindex: u32, packet: &Packet, now: u64) {
    let key = flow_key(ifindex, packet, false);
    let current = match CONNTRACK.get_ptr(key) {
        // SAFETY: read of a valid map value.
        Some(entry) => unsafe { (*entry).state },
        None => CT_STATE_NEW,
    };
    // A SYN restarts the lifecycle (port reuse after a close).
    let base = if packet.tcp_flags & TCP_SYN != 0 && packet.tcp_flags & 0x10 == 0 { CT_STATE_NEW } else { current };
    let value = ConntrackValue {
        last_seen_ns: now,
        state: next_state(packet.protocol, base, packet.tcp_flags, false),
        _pad: [0; 7],
    };
    // An LRU map never fails for lack of room; a failure here only loses the reply fast-path.
    let _ = CONNTRACK.insert(key, value, 0);
}

/// The policy verdict for a new (non-reply) packet of an isolated direction.
#[inline(always)]
fn policy_allows(endpoint_id: u32, direction: u8, identity: u32, peer: &[u8; 16], packet: &Packet) -> bool {
    let identity_key = PolicyIdentityKey { endpoint_id, direction, _pad: [0; 3], peer_identity: identity };
    // SAFETY: plain read of a map value.
    let identity_bits = unsafe { POLICY_IDENTITY.get(identity_key) }.map_or(0, |m| m.bits);
    let cidr_key = Key::new(
        POLICY_CIDR_FIXED_BITS + 128,
        PolicyCidrKeyData { endpoint_id, direction, _pad: [0; 3], addr: *peer },
    );
    let cidr_bits = POLICY_CIDR.get(&cidr_key).map_or(0, |m| m.bits);
    let peer_bits = identity_bits | cidr_bits;
    if peer_bits == 0 {
        return false;
    }
    let any_key = Key::new(
        POLICY_PORT_FIXED_BITS + 16,
        PolicyPortKeyData { endpoint_id, direction, protocol: PROTO_ANY, port_be: [0; 2] },
    );
    let mut port_bits = POLICY_PORT.get(&any_key).map_or(0, |m| m.bits);
    // ICMP and other port-less protocols only match "all protocols" rules.
    if matches!(packet.protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        let port_key = Key::new(
            POLICY_PORT_FIXED_BITS + 16,
            PolicyPortKeyData { endpoint_id, direction, protocol: packet.protocol, port_be: packet.dst_port.to_be_bytes() },
        );
        port_bits |= POLICY_PORT.get(&port_key).map_or(0, |m| m.bits);
    }
    peer_bits & port_bits != 0
}

/// The verdict for one packet on one pod interface. `direction` is the pod's: egress for what
/// it sends, ingress for what it receives. `Err` carries the drop reason.
#[inline(always)]
fn try_enforce(ctx: &TcContext, direction: u8) -> Result<(), u32> {
    let packet = match parse(ctx) {
        Ok(Parsed::Pass) => return Ok(()),
        Ok(Parsed::Ip(packet)) => packet,
        Err(Malformed) => return Err(REASON_MALFORMED),
    };
    // SAFETY: the context pointer is valid for the program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain read of a map value.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(ifindex) }).copied() else {
        // Attached but not programmed: the agent writes the endpoint before attaching, so
        // this is a stale attachment; fail closed.
        return Err(REASON_NO_ENDPOINT);
    };
    let result = decide(ifindex, direction, &endpoint, &packet);
    count_endpoint(endpoint.endpoint_id, direction, result.is_ok(), ctx.len() as u64);
    result
}

/// Turns a verdict into a TC action, counting drops by reason.
#[inline(always)]
fn action(result: Result<(), u32>, direction: u8) -> i32 {
    match result {
        Ok(()) => TC_ACT_UNSPEC,
        Err(reason) => {
            count_drop(reason, direction);
            TC_ACT_SHOT
        }
    }
}

/// `Ok` to pass, `Err(reason)` to drop.
#[inline(always)]
fn decide(ifindex: u32, direction: u8, endpoint: &EndpointInfo, packet: &Packet) -> Result<(), u32> {
    let fragment_key = FragmentKey {
        ifindex,
        id: packet.fragment_id,
        protocol: packet.protocol,
        _pad: [0; 3],
        src_addr: packet.src,
        dst_addr: packet.dst,
    };
    if packet.later_fragment {
        // SAFETY: plain read of a map value.
        return match unsafe { FRAGMENTS.get(fragment_key) } {
            Some(first) if first.allowed != 0 => Ok(()),
            Some(_) => Err(REASON_POLICY_DENIED),
            None => Err(REASON_FRAGMENT_UNKNOWN),
        };
    }
    let result = decide_unfragmented(ifindex, direction, endpoint, packet);
    if packet.fragment {
        let value = FragmentValue {
            allowed: result.is_ok() as u8,
            _pad: [0; 3],
            src_port: packet.src_port,
            dst_port: packet.dst_port,
        };
        let _ = FRAGMENTS.insert(fragment_key, value, 0);
    }
    result
}

#[inline(always)]
fn decide_unfragmented(ifindex: u32, direction: u8, endpoint: &EndpointInfo, packet: &Packet) -> Result<(), u32> {
    let peer = if direction == DIRECTION_EGRESS { &packet.dst } else { &packet.src };
    let ipcache_key = Key::new(128, *peer);
    let identity = IPCACHE.get(&ipcache_key).map_or(IDENTITY_WORLD, |v| v.identity);
    if identity == IDENTITY_HOST && endpoint.flags & EP_ALLOW_HOST != 0 {
        return Ok(());
    }
    if endpoint.flags & EP_FAIL_CLOSED != 0 {
        return Err(REASON_FAIL_CLOSED);
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if is_reply(ifindex, packet, now) {
        return Ok(());
    }
    let isolated_flag = if direction == DIRECTION_EGRESS { EP_EGRESS_ISOLATED } else { EP_INGRESS_ISOLATED };
    // Forward packets are always checked against the live policy, so revoking a rule cuts
    // existing flows at their next packet; conntrack only admits replies.
    if endpoint.flags & isolated_flag != 0 && !policy_allows(endpoint.endpoint_id, direction, identity, peer, packet) {
        return Err(REASON_POLICY_DENIED);
    }
    record_flow(ifindex, packet, now);
    Ok(())
}

/// TC ingress of the pod's host-side veth: traffic the pod sends (its egress policy).
#[classifier]
pub fn netsieve_from_pod(ctx: TcContext) -> i32 {
    action(try_enforce(&ctx, DIRECTION_EGRESS), DIRECTION_EGRESS)
}

/// TC egress of the pod's host-side veth: traffic sent to the pod (its ingress policy).
#[classifier]
pub fn netsieve_to_pod(ctx: TcContext) -> i32 {
    action(try_enforce(&ctx, DIRECTION_INGRESS), DIRECTION_INGRESS)
}

/// An empty program: the baseline the benchmarks compare against.
#[classifier]
pub fn netsieve_pass(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
