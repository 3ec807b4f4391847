//! Conntrack of netsieve's own: flows allowed on a pod interface, keyed canonically so that
//! both directions of a flow find one entry with one lookup.
use crate::maps::{CONNTRACK, FLOW_EPOCHS};
use crate::packet::{Packet, TCP_FIN, TCP_RST};
use netsieve_common::{
    CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_NEW, FLOW_INITIATOR_A, FlowCacheEntry, FLOW_REFRESH_NS, FlowKey, FlowState,
    PROTO_TCP, PROTO_UDP, address_from_words, address_words, flow_cache_index, flow_epoch_index,
};

const NS: u64 = 1_000_000_000;
const TIMEOUT_TCP_NEW_NS: u64 = 60 * NS;
const TIMEOUT_TCP_ESTABLISHED_NS: u64 = 6 * 3600 * NS;
const TIMEOUT_TCP_CLOSING_NS: u64 = 10 * NS;
const TIMEOUT_UDP_NS: u64 = 120 * NS;
const TIMEOUT_OTHER_NS: u64 = 60 * NS;

/// A packet's flow key, and whether the packet's source is end `a` of the key. 8-aligned, so
/// the key's addresses are built and hashed from aligned words.
#[repr(C, align(8))]
pub struct FlowRef {
    pub key: FlowKey,
    pub src_is_a: bool,
}

/// The key of the flow `src:src_port -> dst:dst_port` on `ifindex`.
#[inline(always)]
pub fn tuple_key(ifindex: u32, protocol: u8, src: &[u8; 16], src_port: u16, dst: &[u8; 16], dst_port: u16) -> FlowRef {
    // On words: byte-array moves and compares compile to byte loads and stores.
    let (src_hi, src_lo) = address_words(src);
    let (dst_hi, dst_lo) = address_words(dst);
    let src_is_a = if src_hi != dst_hi {
        src_hi < dst_hi
    } else if src_lo != dst_lo {
        src_lo < dst_lo
    } else {
        src_port <= dst_port
    };
    let (a_hi, a_lo, port_a, b_hi, b_lo, port_b) = if src_is_a {
        (src_hi, src_lo, src_port, dst_hi, dst_lo, dst_port)
    } else {
        (dst_hi, dst_lo, dst_port, src_hi, src_lo, src_port)
    };
    let key = FlowKey {
        addr_a: address_from_words(a_hi, a_lo),
        addr_b: address_from_words(b_hi, b_lo),
        ifindex,
        port_a,
        port_b,
        protocol,
        _pad1: 0,
        _pad2: 0,
    };
    FlowRef { key, src_is_a }
}

#[inline(always)]
pub fn packet_key(ifindex: u32, packet: &Packet) -> FlowRef {
    tuple_key(ifindex, packet.protocol, &packet.src, packet.src_port, &packet.dst, packet.dst_port)
}

#[inline(always)]
pub fn timeout_ns(protocol: u8, state: u8) -> u64 {
    match (protocol, state) {
        (PROTO_TCP, CT_STATE_ESTABLISHED) => TIMEOUT_TCP_ESTABLISHED_NS,
        (PROTO_TCP, CT_STATE_CLOSING) => TIMEOUT_TCP_CLOSING_NS,
        (PROTO_TCP, _) => TIMEOUT_TCP_NEW_NS,
        (PROTO_UDP, _) => TIMEOUT_UDP_NS,
        _ => TIMEOUT_OTHER_NS,
    }
}

/// Whether a TCP segment with these flags starts closing its connection (FIN or RST; 0 for
/// other protocols).
#[inline(always)]
pub fn closes(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// The lifecycle state after a packet. `reply`: the packet goes from responder to initiator.
#[inline(always)]
pub fn next_state(protocol: u8, current: u8, tcp_flags: u8, reply: bool) -> u8 {
    if protocol != PROTO_TCP {
        return CT_STATE_ESTABLISHED;
    }
    if closes(tcp_flags) || current == CT_STATE_CLOSING {
        CT_STATE_CLOSING
    } else if reply || current == CT_STATE_ESTABLISHED {
        CT_STATE_ESTABLISHED
    } else {
        CT_STATE_NEW
    }
}

/// Idle for longer than its state allows.
#[inline(always)]
pub fn expired(key: &FlowKey, state: &FlowState, now: u64) -> bool {
    now.saturating_sub(state.last_seen_ns) > timeout_ns(key.protocol, state.tcp_state)
}

/// Whether the packet whose source is end `a` (`src_is_a`) goes from the flow's initiator.
#[inline(always)]
pub fn from_initiator(state: &FlowState, src_is_a: bool) -> bool {
    (state.flags & FLOW_INITIATOR_A != 0) == src_is_a
}

/// The responder end of a flow (address, port): the peer of an egress flow, the pod of an
/// ingress flow.
#[inline(always)]
pub fn responder<'a>(key: &'a FlowKey, state: &FlowState) -> (&'a [u8; 16], u16) {
    if state.flags & FLOW_INITIATOR_A != 0 { (&key.addr_b, key.port_b) } else { (&key.addr_a, key.port_a) }
}

/// The initiator end of a flow (address, port).
#[inline(always)]
pub fn initiator<'a>(key: &'a FlowKey, state: &FlowState) -> (&'a [u8; 16], u16) {
    if state.flags & FLOW_INITIATOR_A != 0 { (&key.addr_a, key.port_a) } else { (&key.addr_b, key.port_b) }
}

/// Records a packet of a live flow: writes only when the lifecycle state changes or the
/// timestamp is more than [`FLOW_REFRESH_NS`] old, so an established flow costs no write
/// per packet.
///
/// # Safety
/// `state` must point to a live map value.
#[inline(always)]
pub unsafe fn touch(state: *mut FlowState, protocol: u8, tcp_flags: u8, reply: bool, now: u64) {
    // SAFETY: the caller's pointer is a map value valid for this program run; concurrent
    // writers only move timestamps and lifecycle states forward.
    unsafe {
        let current = (*state).tcp_state;
        let next = next_state(protocol, current, tcp_flags, reply);
        if next != current {
            (*state).tcp_state = next;
        }
        if now.saturating_sub((*state).last_seen_ns) > FLOW_REFRESH_NS {
            (*state).last_seen_ns = now;
        }
    }
}

/// The state of a flow opened by this packet.
#[inline(always)]
pub fn opened_state(packet: &Packet) -> u8 {
    next_state(packet.protocol, CT_STATE_NEW, packet.tcp_flags, false)
}

/// Words of a [`FlowKey`] compared and copied as `u64`s (44 bytes: five words, then one
/// `u32`). Both sides are 8-aligned ([`FlowRef`] and the cache entry are `align(8)` with the
/// key first).
const KEY_WORDS: usize = 5;

/// Whether a cache entry's key is the packet's flow key.
#[inline(always)]
pub fn same_key(entry: &FlowCacheEntry, flow: &FlowRef) -> bool {
    let a = &entry.key as *const FlowKey as *const u64;
    let b = &flow.key as *const FlowKey as *const u64;
    let mut i = 0;
    while i < KEY_WORDS {
        // SAFETY: both keys are 44 bytes at the 8-aligned start of their structs.
        if unsafe { *a.add(i) != *b.add(i) } {
            return false;
        }
        i += 1;
    }
    // SAFETY: as above; the last four bytes.
    unsafe { *(a.add(KEY_WORDS) as *const u32) == *(b.add(KEY_WORDS) as *const u32) }
}

/// Copies the packet's flow key into a cache entry, word by word.
///
/// # Safety
/// `entry` must point to a live map value.
#[inline(always)]
pub unsafe fn copy_key(entry: *mut FlowCacheEntry, flow: &FlowRef) {
    // SAFETY: as in `same_key`; the caller's pointer is a writable map value.
    unsafe {
        let to = &mut (*entry).key as *mut FlowKey as *mut u64;
        let from = &flow.key as *const FlowKey as *const u64;
        let mut i = 0;
        while i < KEY_WORDS {
            *to.add(i) = *from.add(i);
            i += 1;
        }
        *(to.add(KEY_WORDS) as *mut u32) = *(from.add(KEY_WORDS) as *const u32);
    }
}

/// The [`crate::maps::FLOW_CACHE`] slot of a packet's flow and direction
/// ([`flow_cache_index`], with the addresses' last four bytes loaded as words).
/// `any_source_port`: the slot every TCP SYN of the flow's addresses and destination port
/// shares.
#[inline(always)]
pub fn cache_index(flow: &FlowRef, direction: u8, any_source_port: bool) -> u32 {
    let words = &flow.key as *const FlowKey as *const u64;
    // SAFETY: as in `same_key`: words 1 and 3 are the low halves of the two addresses.
    let (a_lo, b_lo) = unsafe { (*words.add(1), *words.add(3)) };
    flow_cache_index(&flow.key, (a_lo >> 32) as u32, (b_lo >> 32) as u32, flow.src_is_a, direction, any_source_port)
}

/// Whether a cache entry's key is the packet's flow key but for the packet's source port
/// (the entry's `src_is_a` is compared by the caller): the same interface, addresses,
/// protocol and destination port, which is all a TCP SYN's verdict depends on. (Kept apart
/// from `same_key`: one compare taking the ignored bits as a parameter pushed the TC programs
/// over the 512-byte stack limit.)
#[inline(always)]
pub fn same_key_but_source_port(entry: &FlowCacheEntry, flow: &FlowRef) -> bool {
    let a = &entry.key as *const FlowKey as *const u64;
    let b = &flow.key as *const FlowKey as *const u64;
    // Word 4 is the interface (bytes 0-3) and `port_a`, `port_b` (bytes 4-5, 6-7; little
    // endian, so bits 32-47 and 48-63): the source port's bits are masked out.
    let source_port_bits: u64 = if flow.src_is_a { 0xffff << 32 } else { 0xffff << 48 };
    let mut i = 0;
    while i < KEY_WORDS - 1 {
        // SAFETY: both keys are 44 bytes at the 8-aligned start of their structs.
        if unsafe { *a.add(i) != *b.add(i) } {
            return false;
        }
        i += 1;
    }
    // SAFETY: as above.
    unsafe {
        (*a.add(KEY_WORDS - 1) | source_port_bits) == (*b.add(KEY_WORDS - 1) | source_port_bits)
            && *(a.add(KEY_WORDS) as *const u32) == *(b.add(KEY_WORDS) as *const u32)
    }
}

/// The conntrack epoch of an interface (`FLOW_EPOCHS`): read before a conntrack lookup whose
/// miss a cached denial will vouch for.
#[inline(always)]
pub fn epoch(ifindex: u32) -> u64 {
    FLOW_EPOCHS.get(flow_epoch_index(ifindex)).copied().unwrap_or(0)
}

/// Inserts a conntrack entry, then moves its interface's epoch: a denial cached after a
/// lookup that missed this entry (its epoch read before that lookup, so before this move)
/// no longer stands. An LRU map makes room by itself; a failed insert only loses the fast path.
#[inline(always)]
pub fn insert(key: &FlowKey, state: &FlowState) {
    let _ = CONNTRACK.insert(key, state, 0);
    if let Some(epoch) = FLOW_EPOCHS.get_ptr_mut(flow_epoch_index(key.ifindex)) {
        // SAFETY: an array value, valid and 8-aligned for the program run; every CPU updates
        // it only through this atomic add.
        unsafe { add_one_atomically(epoch) };
    }
}

/// Adds one to `*counter` with an atomic add (BPF's `lock xadd`).
///
/// # Safety
/// `counter` must be valid and 8-aligned.
#[inline(always)]
unsafe fn add_one_atomically(counter: *mut u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's pointer is valid and aligned.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(counter, 1);
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above.
    unsafe {
        core::sync::atomic::AtomicU64::from_ptr(counter).fetch_add(1, core::sync::atomic::Ordering::SeqCst);
    }
}
