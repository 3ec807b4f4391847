//! Map keys and values shared by the eBPF programs and the userspace agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so the layout the kernel program reads is
//! exactly the one userspace writes. The `user` feature adds `aya::Pod` so userspace can put
//! them in maps; the eBPF side builds without it.
//!
//! # Per-packet design (docs/DATAPATH.md has the full account)
//!
//! For a packet seen on a local pod's host-side veth (TC) or after kube-proxy's DNAT
//! (netfilter), with `peer` the remote address:
//! 1. `CONNTRACK[canonical flow key]` -> a flow allowed earlier on this interface. While
//!    `REVISIONS[entry.slot]` is the revision the flow was allowed under and the global ipcache
//!    generation is the entry's, every packet of the flow, either direction, passes on this one
//!    lookup (the fast path), without reading the endpoint. Any reprogramming of the endpoint
//!    or any ipcache change makes the entry stale, and its next packet is judged again, so
//!    revoking a rule or relabelling a peer cuts existing flows at their next packet. Before
//!    that lookup, a per-CPU direct-mapped `FLOW_CACHE` ([`FlowCacheEntry`]) may hold what the
//!    entry gave this flow and packet direction in the last [`FLOW_CACHE_WINDOW_NS`]; the same
//!    revision and generation checks apply, so a busy flow's packets skip the hash lookup.
//! 2. Otherwise `ENDPOINTS[ifindex]` -> the endpoint: its slot, flags, revision, own addresses
//!    (anti-spoofing, then the verdict below).
//! 3. A new (or stale) flow: `IPCACHE[peer]` -> the peer's identity (0 = world), then
//!    `POLICY_IDENTITY[(slot, direction, identity)]` | the endpoint's any-peer bits |
//!    (only if the endpoint has ipBlocks) `POLICY_CIDR` LPM -> peer bits;
//!    `POLICY_PORT[(slot, direction, protocol, port)]`, falling back to the protocol's wildcard
//!    entry (port 0) and (only if the endpoint has large port ranges) `POLICY_PORT_RANGE` LPM
//!    -> port bits. The flow is allowed when `peer bits & port bits != 0`; the lowest common
//!    bit names the rule group that admitted it (per-rule counters, events).
//!
//! A rule group is one NetworkPolicy rule (or, past [`MAX_RULE_GROUPS`] rules, the rules that
//! share one port set); more distinct port sets than that fail the endpoint closed.
#![cfg_attr(not(test), no_std)]

/// Direction of a policy check, from the local pod's point of view.
pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;

/// IP protocol numbers used as map key fields.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// Identity of any address the ipcache does not know (outside the cluster, Service IPs).
pub const IDENTITY_WORLD: u32 = 0;
/// Identity of the local node's own addresses (kubelet probes, host-network pods).
pub const IDENTITY_HOST: u32 = 1;
/// First identity number handed out to pod label sets.
pub const IDENTITY_FIRST_POD: u32 = 256;

/// Number of rule groups one endpoint direction can hold (bits of [`RuleMask`]).
pub const MAX_RULE_GROUPS: usize = 64;

/// `EndpointInfo::flags`: ingress to this pod is isolated by at least one policy.
pub const EP_INGRESS_ISOLATED: u32 = 1 << 0;
/// `EndpointInfo::flags`: egress from this pod is isolated by at least one policy.
pub const EP_EGRESS_ISOLATED: u32 = 1 << 1;
/// `EndpointInfo::flags`: the agent could not program this endpoint's policy (map full,
/// too many rule groups, bad input, Pod object not known yet). Everything except host
/// traffic is dropped and counted.
pub const EP_FAIL_CLOSED: u32 = 1 << 2;
/// `EndpointInfo::flags`: traffic between the pod and its own node is allowed
/// (Kubernetes' stated exception, kubelet probes).
pub const EP_ALLOW_HOST: u32 = 1 << 3;
/// `EndpointInfo::flags`: audit mode. Packets policy would drop pass, are counted under
/// `AUDIT_COUNTERS` and reported as `audit` events.
pub const EP_AUDIT: u32 = 1 << 4;
/// `EndpointInfo::flags`: `ipv4` holds the pod's IPv4 address.
pub const EP_HAS_IPV4: u32 = 1 << 5;
/// `EndpointInfo::flags`: `ipv6` holds the pod's IPv6 address.
pub const EP_HAS_IPV6: u32 = 1 << 6;
/// `EndpointInfo::flags`: the direction (shifted by the direction number) has ipBlock or
/// address entries in `POLICY_CIDR`; without it the LPM lookup is skipped.
pub const EP_CIDR_RULES: u32 = 1 << 8;
/// `EndpointInfo::flags`: the direction (shifted by the direction number) has entries in
/// `POLICY_PORT_RANGE`; without it the LPM lookup is skipped.
pub const EP_PORT_RANGES: u32 = 1 << 10;
/// `EndpointInfo::flags`: the direction (shifted by the direction number) has exact entries in
/// `POLICY_PORT`; without it the lookup is skipped.
pub const EP_EXACT_PORTS: u32 = 1 << 12;

/// Index in `EndpointInfo::wildcard_bits` of a protocol's wildcard: 0 holds the groups
/// admitting every protocol (what a packet of a protocol without ports, ICMP and the rest,
/// matches), 1 to 3 those admitting every port of TCP, UDP, SCTP (every-protocol groups
/// included).
#[inline(always)]
pub const fn wildcard_index(protocol: u8) -> usize {
    match protocol {
        PROTO_TCP => 1,
        PROTO_UDP => 2,
        PROTO_SCTP => 3,
        _ => WILDCARD_EVERY_PROTOCOL,
    }
}
/// [`wildcard_index`] of the groups admitting every protocol.
pub const WILDCARD_EVERY_PROTOCOL: usize = 0;

/// Map capacities: up to [`MAX_ENDPOINTS`] pods per node, 10k pods and 1k policies in the
/// cluster, 100k rule entries on the node.
pub const MAX_ENDPOINTS: u32 = 1024;
/// Endpoint slots: an endpoint being reprogrammed holds two slots (old and new) for a moment.
pub const MAX_ENDPOINT_SLOTS: u32 = 2 * MAX_ENDPOINTS;
pub const MAX_IPCACHE_ENTRIES: u32 = 65_536;
pub const MAX_POLICY_IDENTITY_ENTRIES: u32 = 262_144;
pub const MAX_POLICY_CIDR_ENTRIES: u32 = 131_072;
pub const MAX_POLICY_PORT_ENTRIES: u32 = 131_072;
pub const MAX_POLICY_PORT_RANGE_ENTRIES: u32 = 65_536;
pub const MAX_CONNTRACK_ENTRIES: u32 = 262_144;
pub const MAX_FRAGMENT_ENTRIES: u32 = 8192;
/// Per-rule-group counters on the node (`RULE_STATS`).
pub const MAX_RULE_COUNTERS: u32 = 16_384;
/// `EndpointInfo::rule_base` of a direction without per-rule counters.
pub const NO_RULE: u32 = u32::MAX;
/// Size of the verdict event ring buffer.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
/// Bytes from the network header the netfilter program copies at once for a packet it parses
/// (IPv4 with options and TCP, IPv6 with a few extension headers); fields beyond are read one
/// helper call each.
pub const NF_HEADER_COPY_BYTES: usize = 128;

/// Key of `IPCACHE` (a hash): the address, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) so one
/// map serves both families.
pub type IpcacheKey = [u8; 16];

/// Value of `IPCACHE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    pub flags: u32,
}

/// `POD_ADDRESSES`: a local pod's address (key form of `IPCACHE`) -> the ifindex of its
/// host-side interface. The netfilter program finds the pod a packet comes from by the
/// interface it entered the node by; where that is a bridge (bridged CNIs pass the packet up
/// through the bridge device), by its source address, which the TC program has already held
/// to the pod's own (anti-spoofing).
pub const MAX_POD_ADDRESSES: u32 = 2 * MAX_ENDPOINTS;

/// Key of `ENDPOINTS`: the ifindex of the pod's host-side interface.
pub type EndpointKey = u32;

/// Value of `ENDPOINTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// Slot (below [`MAX_ENDPOINT_SLOTS`]): the first field of all per-endpoint policy keys
    /// and the index of `ENDPOINT_STATS`. A reprogrammed endpoint moves to a fresh slot.
    pub endpoint_id: u32,
    /// `EP_*` flags.
    pub flags: u32,
    /// The pod's own identity.
    pub identity: u32,
    /// Unique on the node for every programming (random start, so a restarted agent does not
    /// repeat a previous agent's numbers); conntrack entries remember it.
    pub revision: u32,
    /// Per direction: index in `RULE_STATS` of rule group 0 ([`NO_RULE`] if none).
    pub rule_base: [u32; 2],
    /// Per direction: rule groups that admit any peer (`from`/`to` absent or empty).
    pub any_peer_bits: [u64; 2],
    /// Per direction: the rule groups `POLICY_CIDR` entries can grant. The program skips that
    /// lookup (a trie walk) when none of them could change the verdict: none admits the port,
    /// or a lower group already matched.
    pub cidr_group_bits: [u64; 2],
    /// Per direction: the rule groups `POLICY_RANGE` entries can grant (the same use).
    pub range_group_bits: [u64; 2],
    /// Per direction, by [`wildcard_index`]: the groups admitting every port of a protocol.
    /// Held here, not in `POLICY_PORT`: a packet whose port has no exact entry reads a field
    /// instead of doing a second hash lookup.
    pub wildcard_bits: [[u64; 4]; 2],
    /// The pod's addresses (anti-spoofing, the self exception).
    pub ipv4: [u8; 4],
    pub ipv6: [u8; 16],
    pub _pad: [u8; 4],
}

impl EndpointInfo {
    /// Whether the netfilter programs have anything to judge for this endpoint: its egress is
    /// isolated, or it fails closed.
    #[inline(always)]
    pub fn enforces_egress(&self) -> bool {
        self.flags & (EP_EGRESS_ISOLATED | EP_FAIL_CLOSED) != 0
    }
}

/// Key of `POLICY_IDENTITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyIdentityKey {
    pub endpoint_id: u32,
    pub direction: u8,
    pub _pad1: u8,
    pub _pad2: u16,
    pub peer_identity: u32,
}

/// Value of the policy maps: which rule groups match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleMask {
    pub bits: u64,
}

/// Data of a `POLICY_CIDR` LPM key. `prefix_len` = [`POLICY_CIDR_FIXED_BITS`] + prefix bits of
/// `addr` (IPv4 as IPv4-mapped IPv6, so an IPv4 /n is 96 + n bits of `addr`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyCidrKeyData {
    pub endpoint_id: u32,
    pub direction: u8,
    pub _pad1: u8,
    pub _pad2: u16,
    pub addr: [u8; 16],
}
/// Bits of `PolicyCidrKeyData` before `addr` that every key matches exactly.
pub const POLICY_CIDR_FIXED_BITS: u32 = 64;

/// Key of `POLICY_PORT` (a hash): the exact ports rules name. An exact entry carries every
/// group that admits that port (wildcards and ranges included), so a hit needs no other
/// lookup. Groups admitting every port of a protocol are in `EndpointInfo::wildcard_bits`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyPortKey {
    pub endpoint_id: u32,
    pub direction: u8,
    pub protocol: u8,
    pub port: u16,
}

/// Data of a `POLICY_PORT_RANGE` LPM key (large `endPort` ranges, not expanded into
/// `POLICY_PORT`). `prefix_len` = [`POLICY_PORT_FIXED_BITS`] + prefix bits of the port;
/// `port_be` is big-endian so prefixes run from the most significant bit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyPortRangeKeyData {
    pub endpoint_id: u32,
    pub direction: u8,
    pub protocol: u8,
    pub port_be: [u8; 2],
}
pub const POLICY_PORT_FIXED_BITS: u32 = 48;
/// Ranges up to this many ports are expanded into exact `POLICY_PORT` entries.
pub const PORT_RANGE_EXPAND_LIMIT: u32 = 64;

/// Key of `CONNTRACK`: a flow on one pod interface, in canonical order so that both
/// directions find the same entry: `(addr_a, port_a)` sorts before `(addr_b, port_b)` (see
/// [`flow_order`]).
///
/// The addresses come first, at 8-byte offsets, and the padding is scalar: the programs build
/// the key with word stores into an 8-aligned slot (`[u8; N]` padding and addresses at odd
/// offsets compile to byte stores and `memset` calls).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    /// Interface the flow was allowed on: a packet on another pod's veth misses.
    pub ifindex: u32,
    pub port_a: u16,
    pub port_b: u16,
    pub protocol: u8,
    pub _pad1: u8,
    pub _pad2: u16,
}

/// Version of the [`FlowKey`]/[`FlowState`] layout, part of the conntrack table's pin name (a
/// reordering that keeps the sizes must not reuse a table pinned by an older agent). 2: the
/// addresses first in the key, the endpoint slot in the state. 3: `FlowState::created_ns`.
pub const CONNTRACK_LAYOUT: u32 = 3;

/// Whether `(addr1, port1)` comes first in a [`FlowKey`]. Any total order serves; this one
/// compares the addresses as two native-endian words (cheap in the kernel), then the ports.
#[inline(always)]
pub fn flow_order(addr1: &[u8; 16], port1: u16, addr2: &[u8; 16], port2: u16) -> bool {
    let (hi1, lo1) = address_words(addr1);
    let (hi2, lo2) = address_words(addr2);
    if hi1 != hi2 {
        return hi1 < hi2;
    }
    if lo1 != lo2 {
        return lo1 < lo2;
    }
    port1 <= port2
}

/// An address as two native-endian words (first eight bytes, last eight bytes): the programs
/// compare, order and copy addresses in this form.
#[inline(always)]
pub fn address_words(addr: &[u8; 16]) -> (u64, u64) {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&addr[..8]);
    lo.copy_from_slice(&addr[8..]);
    (u64::from_ne_bytes(hi), u64::from_ne_bytes(lo))
}

/// The inverse of [`address_words`].
#[inline(always)]
pub fn address_from_words(hi: u64, lo: u64) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&hi.to_ne_bytes());
    addr[8..].copy_from_slice(&lo.to_ne_bytes());
    addr
}

/// TCP-ish lifecycle of a flow; decides its idle timeout.
pub const CT_STATE_NEW: u8 = 0;
pub const CT_STATE_ESTABLISHED: u8 = 1;
pub const CT_STATE_CLOSING: u8 = 2;

/// `FlowState::flags`: the flow's initiator is `(addr_a, port_a)` of the key.
pub const FLOW_INITIATOR_A: u8 = 1 << 0;
/// `FlowState::flags`: the flow was opened in the pod's egress direction (else ingress).
pub const FLOW_EGRESS: u8 = 1 << 1;
/// `FlowState::flags`: the egress verdict is the netfilter hook's, after kube-proxy's DNAT
/// (the destination was not a known pod or node address, e.g. a Service ClusterIP).
pub const FLOW_DEFERRED: u8 = 1 << 2;
/// `FlowState::flags`: the netfilter hook allowed the flow to `nat_addr:nat_port`.
pub const FLOW_CONFIRMED: u8 = 1 << 3;
/// `FlowState::flags`: the flow passes only because of audit mode.
pub const FLOW_AUDIT: u8 = 1 << 4;

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowState {
    /// Coarse clock (`bpf_ktime_get_coarse_ns`), refreshed at most every
    /// [`FLOW_REFRESH_NS`] so that established flows do not write on every packet.
    pub last_seen_ns: u64,
    /// `EndpointInfo::revision` the verdict was taken under.
    pub revision: u32,
    /// `Config::ipcache_generation` the verdict was taken under.
    pub ipcache_generation: u32,
    /// `RULE_STATS` index of the rule group that admitted the flow, [`NO_RULE`] if none
    /// (direction not isolated, an exception, audit).
    pub rule_index: u32,
    /// `FLOW_*` flags.
    pub flags: u8,
    /// `CT_STATE_*`.
    pub tcp_state: u8,
    /// Deferred flows: the backend port kube-proxy chose.
    pub nat_port: u16,
    /// Deferred flows: the backend address kube-proxy chose.
    pub nat_addr: [u8; 16],
    /// The endpoint slot the verdict was taken for: with `revision` and `REVISIONS[slot]`,
    /// tells whether the verdict is current without looking the endpoint up.
    pub slot: u32,
    pub _pad: u32,
    /// When the verdict of this entry was taken (same coarse clock as `last_seen_ns`): the
    /// flow's admission, or its last re-admission after a policy or ipcache change. Written
    /// only when the entry is inserted; `netsieve explain --agent` reports it as "since".
    pub created_ns: u64,
}
/// `REVISIONS[slot]`: the revision of the endpoint programmed in that slot, 0 when the slot
/// is free (revisions are never 0). The conntrack fast path compares it with the entry's
/// revision instead of looking the endpoint up by interface.
pub const NO_REVISION: u32 = 0;

/// How often an established flow's timestamp is rewritten.
pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// How long a `FLOW_CACHE` entry may decide packets without conntrack: far below every idle
/// timeout (10 s at least) less [`FLOW_REFRESH_NS`], so a flow the cache serves still has its
/// conntrack entry refreshed in time, and short enough that a conntrack entry the LRU evicted
/// is missed within a tenth of a second.
pub const FLOW_CACHE_WINDOW_NS: u64 = 100_000_000;
/// Slots of `FLOW_CACHE` per CPU (a power of two).
pub const FLOW_CACHE_SLOTS: u32 = 1 << FLOW_CACHE_BITS;
pub const FLOW_CACHE_BITS: u32 = 6;

/// `FlowCacheEntry::kind`: the verdict a conntrack hit gave (an established flow).
pub const CACHED_FLOW: u8 = 0;
/// `FlowCacheEntry::kind`: a denial the full path took on a packet no conntrack entry
/// admitted (docs/DATAPATH.md, "Denials in the flow cache").
pub const CACHED_DENIAL: u8 = 1;
/// `FlowCacheEntry::kind`: the full path admitted a TCP SYN by `rule_index`; later SYNs between
/// the same addresses to the same port open their conntrack entry from it (docs/DATAPATH.md,
/// "New connections from the flow cache").
pub const CACHED_NEW_FLOW: u8 = 2;

/// Slots of `FLOW_EPOCHS` (a power of two): an interface's epoch is at `ifindex` modulo this.
/// Interfaces sharing a slot only make each other's cached denials expire sooner.
pub const FLOW_EPOCH_SLOTS: u32 = 1024;

/// The `FLOW_EPOCHS` slot of an interface's conntrack entries.
#[inline(always)]
pub fn flow_epoch_index(ifindex: u32) -> u32 {
    ifindex & (FLOW_EPOCH_SLOTS - 1)
}

/// The value of `FLOW_CACHE`: the judgement a conntrack entry gave one packet direction of
/// its flow, a denial of a packet no entry admitted, or a TCP SYN's admission, and what it was
/// current under.
/// Written only by a TC program, which runs with bottom halves off, so no other run on the
/// CPU sees it half-written.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheEntry {
    /// The conntrack key (the first 44 bytes, 8-aligned: compared and copied as words).
    pub key: FlowKey,
    /// Whether the packet's source is end `a` of the key (its direction in the flow).
    pub src_is_a: u8,
    /// The pod's direction of the hook (`DIRECTION_*`).
    pub direction: u8,
    /// The judgement is audit (would be denied) rather than allowed.
    pub audit: u8,
    /// [`CACHED_FLOW`], [`CACHED_DENIAL`] or [`CACHED_NEW_FLOW`].
    pub kind: u8,
    /// What the verdict was current under: `REVISIONS[slot] == revision` and the ipcache
    /// generation, checked on every hit as the conntrack fast path checks them.
    pub slot: u32,
    pub revision: u32,
    pub ipcache_generation: u32,
    /// `RULE_STATS` index counted on a hit.
    pub rule_index: u32,
    /// Coarse clock after which the entry is not used (0: empty).
    pub fresh_until_ns: u64,
    /// Denials judged after a conntrack miss: `FLOW_EPOCHS` of the interface, read before
    /// that lookup. Any conntrack entry inserted since on the interface moves the epoch, so
    /// the denial stands for a packet other than a SYN only while the epoch holds this value.
    /// [`NO_FLOW_EPOCH`] for a TCP SYN's denial (taken without conntrack, which cannot change
    /// a SYN's verdict): it stands for SYNs only.
    pub flow_epoch: u64,
    /// Denials and admitted SYNs: the peer's identity (for events).
    pub peer_identity: u32,
    /// Denials: the `REASON_*` counted.
    pub reason: u8,
    /// Denials and admitted SYNs: whether egress deferral to the netfilter hook was on
    /// (`CONFIG_DEFERRAL`), which decides whether an egress packet to an unknown address is
    /// judged or deferred.
    pub deferral: u8,
    /// Admitted SYNs: whether the flow is recorded in conntrack (not for a packet to the pod
    /// for an address that is not the pod's).
    pub records: u8,
    pub _pad: u8,
}

/// `FlowCacheEntry::flow_epoch` of a denial taken without a conntrack lookup: an epoch never
/// reaches it (2^64 inserts), so such a denial never stands for a packet conntrack may admit.
pub const NO_FLOW_EPOCH: u64 = u64::MAX;

/// The `FLOW_CACHE` slot of a packet: the hook's direction picks the half of the cache, a
/// multiplicative hash of the interface, the key's ports, the last four bytes of each address
/// (`a_last`, `b_last`: as the program loads them) and the packet's end the slot within it. A
/// flow between two pods of the node runs, on one CPU, the sender's egress hook and the
/// receiver's ingress hook on interfaces whose indexes are usually consecutive: those must not
/// share a slot (with the interface and the direction simply XORed in, `n ^ egress` and
/// `(n + 1) ^ ingress` did, and each evicted the other on every packet).
///
/// `any_source_port`: the packet's source port is left out (taken as 0), so every TCP SYN
/// from one address to one port of another finds one slot, where the denial of the first is
/// cached for all (a SYN flood comes from a new source port each time).
#[inline(always)]
pub fn flow_cache_index(key: &FlowKey, a_last: u32, b_last: u32, src_is_a: bool, direction: u8, any_source_port: bool) -> u32 {
    let (port_a, port_b) = match (any_source_port, src_is_a) {
        (false, _) => (key.port_a, key.port_b),
        (true, true) => (0, key.port_b),
        (true, false) => (key.port_a, 0),
    };
    let mixed = key.ifindex.wrapping_mul(0x9e37_79b1)
        ^ (((port_a as u32) << 16) | port_b as u32)
        ^ a_last.rotate_left(7)
        ^ b_last.rotate_left(13)
        ^ ((src_is_a as u32) << 31);
    let within_half = mixed.wrapping_mul(0x85eb_ca6b) >> (32 - (FLOW_CACHE_BITS - 1));
    ((direction as u32 & 1) << (FLOW_CACHE_BITS - 1)) | within_half
}

// The key is compared and copied as five words and a half (ebpf/src/flow.rs).
const _: () = assert!(core::mem::size_of::<FlowKey>() == 44 && core::mem::size_of::<FlowCacheEntry>() == 88);

/// Key of `FRAGMENTS`: an IP datagram being fragmented, on one interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub ifindex: u32,
    pub id: u32,
    pub protocol: u8,
    pub _pad1: u8,
    pub _pad2: u16,
}

/// Value of `FRAGMENTS`: the verdict of the first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentValue {
    pub allowed: u8,
    pub _pad1: u8,
    pub _pad2: u16,
    /// The first fragment's L4 ports, so later fragments are counted against the same flow.
    pub src_port: u16,
    pub dst_port: u16,
}

/// Reasons indexed in the per-CPU `DROP_COUNTERS` and `AUDIT_COUNTERS` arrays:
/// index = reason * 2 + direction.
pub const REASON_POLICY_DENIED: u32 = 0;
pub const REASON_NO_ENDPOINT: u32 = 1;
pub const REASON_MALFORMED: u32 = 2;
pub const REASON_FRAGMENT_UNKNOWN: u32 = 3;
pub const REASON_FAIL_CLOSED: u32 = 4;
pub const REASON_SPOOFED: u32 = 5;
pub const REASON_COUNT: u32 = 6;
pub const REASON_NAMES: [&str; REASON_COUNT as usize] =
    ["policy_denied", "no_endpoint", "malformed", "fragment_unknown", "map_full", "spoofed"];
/// `VerdictEvent::reason` of an allowed flow.
pub const REASON_NONE: u8 = 0xff;

/// Value of the per-CPU `ENDPOINT_STATS` array (index: endpoint slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointStats {
    /// Indexed by direction.
    pub allowed_packets: [u64; 2],
    pub allowed_bytes: [u64; 2],
    pub denied_packets: [u64; 2],
    pub denied_bytes: [u64; 2],
    /// Would-be drops that passed under audit mode.
    pub audit_packets: [u64; 2],
    pub audit_bytes: [u64; 2],
}

impl EndpointStats {
    /// Adds `other`'s counts, field by field and direction by direction.
    pub fn add(&mut self, other: &EndpointStats) {
        for d in 0..2 {
            self.allowed_packets[d] += other.allowed_packets[d];
            self.allowed_bytes[d] += other.allowed_bytes[d];
            self.denied_packets[d] += other.denied_packets[d];
            self.denied_bytes[d] += other.denied_bytes[d];
            self.audit_packets[d] += other.audit_packets[d];
            self.audit_bytes[d] += other.audit_bytes[d];
        }
    }
}

/// Value of the per-CPU `RULE_STATS` array (index: `EndpointInfo::rule_base[dir] + group`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
}

impl RuleStats {
    /// Adds `other`'s counts (per-CPU values summed, carried counts merged).
    pub fn add(&mut self, other: &RuleStats) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// `Config::flags`: the netfilter hooks are attached, so the TC programs may defer the egress
/// verdict of flows to unknown addresses (Service ClusterIPs) to them. Without it, TC judges
/// those flows on the address it sees (fail closed: a ClusterIP is "world").
pub const CONFIG_NETFILTER_ACTIVE: u32 = 1 << 0;
/// `Config::flags`: emit an event for the first packet of every allowed flow.
pub const CONFIG_EVENTS_ALLOWED: u32 = 1 << 1;
/// `Config::flags`: some local endpoint has an isolated egress or is fail-closed, so the
/// netfilter programs have something to judge. Clear, they accept every packet before any
/// helper call (an ingress-only node pays almost nothing for them). The TC programs defer only
/// while this and [`CONFIG_NETFILTER_ACTIVE`] are both set, so a flag wrongly clear fails
/// closed (TC judges the Service address), never open. The synchronizer sets it before it
/// writes the first such endpoint and clears it after the last one is gone.
pub const CONFIG_EGRESS_ENFORCED: u32 = 1 << 2;
/// The flags under which TC defers egress verdicts to the netfilter programs.
pub const CONFIG_DEFERRAL: u32 = CONFIG_NETFILTER_ACTIVE | CONFIG_EGRESS_ENFORCED;

/// The single value of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config {
    /// Bumped after every ipcache change: conntrack entries taken under an older generation
    /// are judged again.
    pub ipcache_generation: u32,
    /// `CONFIG_*` flags.
    pub flags: u32,
    /// Verdict events per second each CPU may emit (token bucket refill); 0 = none.
    pub events_per_second: u32,
    /// Token bucket size per CPU.
    pub events_burst: u32,
}

/// Index of [`EventCounters`]-style per-CPU `EVENT_COUNTERS`.
pub const EVENTS_EMITTED: u32 = 0;
/// Not emitted: the CPU's rate limit was exhausted.
pub const EVENTS_RATE_LIMITED: u32 = 1;
/// Not emitted: the ring buffer was full (the agent is not reading fast enough).
pub const EVENTS_RING_FULL: u32 = 2;
pub const EVENT_COUNTER_COUNT: u32 = 3;

/// Per-CPU token bucket of the event rate limit (value of `EVENT_BUCKETS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TokenBucket {
    /// Tokens scaled by [`TOKEN_SCALE`].
    pub tokens: u64,
    pub last_refill_ns: u64,
}
pub const TOKEN_SCALE: u64 = 1000;

/// `VerdictEvent::verdict`.
pub const VERDICT_DROPPED: u8 = 0;
pub const VERDICT_ALLOWED: u8 = 1;
pub const VERDICT_AUDIT: u8 = 2;

/// `VerdictEvent::hook`.
pub const HOOK_TC: u8 = 0;
pub const HOOK_NETFILTER: u8 = 1;

/// A verdict event in the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub revision: u32,
    pub peer_identity: u32,
    /// `RULE_STATS` index of the admitting rule group, [`NO_RULE`] if none.
    pub rule_index: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// Service flows: the destination port before kube-proxy's DNAT (0 if none).
    pub original_dst_port: u16,
    /// `REASON_*` as u8, [`REASON_NONE`] for allowed flows.
    pub reason: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    pub direction: u8,
    pub protocol: u8,
    /// `HOOK_*`.
    pub hook: u8,
    /// 1 when `original_dst` is set.
    pub translated: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Service flows: the destination before kube-proxy's DNAT (the ClusterIP).
    pub original_dst: [u8; 16],
}

/// Offsets in kernel structures the netfilter program reads, resolved by the agent from the
/// running kernel's BTF (the program is not compiled against one kernel's headers). The
/// single value of `NF_OFFSETS`; `ready` = 1 once written.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NfOffsets {
    pub ready: u32,
    /// `sk_buff.skb_iif`: the interface the packet entered the node on.
    pub skb_iif: u32,
    /// `sk_buff._nfct`, followed by `len` and `data_len` ([`SkbConntrackAndLengths`]).
    pub skb_nfct: u32,
    /// `sk_buff.head`.
    pub skb_head: u32,
    /// `sk_buff.network_header` (u16 offset from head).
    pub skb_network_header: u32,
    /// `nf_conn.tuplehash` (array of two `nf_conntrack_tuple_hash`).
    pub ct_tuplehash: u32,
    /// `sizeof(struct nf_conntrack_tuple_hash)`.
    pub tuplehash_size: u32,
    /// `nf_conntrack_tuple_hash.tuple`.
    pub tuplehash_tuple: u32,
}

/// `sk_buff` from `_nfct` on (unchanged since `_nfct` was introduced): read with one
/// `bpf_probe_read_kernel` call where the three fields took three. The agent checks the
/// running kernel's BTF puts `len` and `data_len` right after `_nfct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbConntrackAndLengths {
    /// `_nfct`: the conntrack entry pointer, low 3 bits = ctinfo.
    pub nfct: u64,
    /// `len`: the packet's length.
    pub len: u32,
    /// `data_len`: bytes outside the linear area.
    pub data_len: u32,
}

/// `struct nf_conntrack_tuple` as the kernel lays it out (the same on every kernel with BPF
/// netfilter programs): the netfilter program reads a whole tuple with one
/// `bpf_probe_read_kernel` call, where reading it field by field took five (each a helper
/// call, paid by every packet of a Service flow). The agent checks the running kernel's BTF
/// against this layout before loading the program; a kernel laid out otherwise gets no
/// netfilter program, and TC then judges Service traffic on the address the pod used (fail
/// closed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NfConntrackTuple {
    /// `src.u3`: the source address (IPv4 in the first four bytes).
    pub src_addr: [u8; 16],
    /// `src.u`: the source port or ICMP echo identifier, network order.
    pub src_port: u16,
    /// `src.l3num`: the address family.
    pub l3num: u16,
    /// `dst.u3`.
    pub dst_addr: [u8; 16],
    /// `dst.u`: the destination port (ICMP: type and code), network order.
    pub dst_port: u16,
    /// `dst.protonum`.
    pub protonum: u8,
    /// `dst.dir`.
    pub dir: u8,
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, with explicit padding fields and no pointers,
    // so any byte pattern the kernel hands back is a valid value.
    unsafe impl aya::Pod for IpcacheValue {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PolicyIdentityKey {}
    unsafe impl aya::Pod for RuleMask {}
    unsafe impl aya::Pod for PolicyCidrKeyData {}
    unsafe impl aya::Pod for PolicyPortKey {}
    unsafe impl aya::Pod for PolicyPortRangeKeyData {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for FlowCacheEntry {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentValue {}
    unsafe impl aya::Pod for EndpointStats {}
    unsafe impl aya::Pod for RuleStats {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for TokenBucket {}
    unsafe impl aya::Pod for VerdictEvent {}
    unsafe impl aya::Pod for NfOffsets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the cache-index tests need no crate.
    struct Xorshift(u64);
    impl Xorshift {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u32
        }
    }

    fn cache_key(ifindex: u32, port_a: u16, port_b: u16) -> FlowKey {
        FlowKey { ifindex, port_a, port_b, protocol: PROTO_TCP, ..Default::default() }
    }

    #[test]
    fn the_flow_cache_direction_picks_the_half() {
        let mut random = Xorshift(0x1234_5678_9abc_def1);
        for _ in 0..10_000 {
            let key = cache_key(random.next() % 5000, random.next() as u16, random.next() as u16);
            let (a, b, src_is_a) = (random.next(), random.next(), random.next().is_multiple_of(2));
            let any_source_port = random.next().is_multiple_of(2);
            let ingress = flow_cache_index(&key, a, b, src_is_a, DIRECTION_INGRESS, any_source_port);
            let egress = flow_cache_index(&key, a, b, src_is_a, DIRECTION_EGRESS, any_source_port);
            assert!(ingress < FLOW_CACHE_SLOTS / 2, "{ingress}");
            assert!((FLOW_CACHE_SLOTS / 2..FLOW_CACHE_SLOTS).contains(&egress), "{egress}");
        }
    }

    /// Every SYN from one address to one port of another takes one slot whatever its source
    /// port (either end of the key may be the source), and distinct destination ports spread.
    #[test]
    fn syns_share_a_slot_whatever_their_source_port() {
        let mut random = Xorshift(0x5555_aaaa_1234_4321);
        for _ in 0..1_000 {
            let (ifindex, a, b, src_is_a) = (random.next() % 5000, random.next(), random.next(), random.next().is_multiple_of(2));
            let destination_port = random.next() as u16;
            let key_from = |source_port: u16| {
                if src_is_a { cache_key(ifindex, source_port, destination_port) } else { cache_key(ifindex, destination_port, source_port) }
            };
            let first = flow_cache_index(&key_from(random.next() as u16), a, b, src_is_a, DIRECTION_INGRESS, true);
            for _ in 0..10 {
                assert_eq!(flow_cache_index(&key_from(random.next() as u16), a, b, src_is_a, DIRECTION_INGRESS, true), first);
            }
        }
        let mut load = [0u32; FLOW_CACHE_SLOTS as usize / 2];
        for destination_port in 0..3_200u16 {
            load[flow_cache_index(&cache_key(7, 40_000, destination_port), 1, 2, true, DIRECTION_INGRESS, true) as usize] += 1;
        }
        assert!(load.iter().all(|&n| n > 50 && n < 150), "uneven slots: {load:?}");
    }

    /// A flow between two pods of the node on consecutive interfaces takes four slots on a CPU
    /// that runs all its hooks: the sender's egress and ingress, the receiver's ingress and
    /// egress. The first two of each half (sender egress and receiver ingress are in different
    /// halves by construction) share a slot only by chance, one flow in 32 per pair.
    #[test]
    fn a_same_node_flow_rarely_shares_a_slot_with_itself_and_flows_spread() {
        let mut random = Xorshift(0x0fed_cba9_8765_4321);
        let flows = 10_000;
        let mut sharing = 0;
        let mut load = [0u32; FLOW_CACHE_SLOTS as usize];
        for _ in 0..flows {
            let sender = 2 + random.next() % 5000;
            let (a, b, src_is_a) = (random.next(), random.next(), random.next().is_multiple_of(2));
            let (port_a, port_b) = (random.next() as u16, random.next() as u16);
            let on = |ifindex: u32, src_is_a: bool, direction: u8| {
                flow_cache_index(&cache_key(ifindex, port_a, port_b), a, b, src_is_a, direction, false)
            };
            let slots = [
                on(sender, src_is_a, DIRECTION_EGRESS),
                on(sender + 1, src_is_a, DIRECTION_INGRESS),
                on(sender + 1, !src_is_a, DIRECTION_EGRESS),
                on(sender, !src_is_a, DIRECTION_INGRESS),
            ];
            assert_ne!(slots[0], slots[1], "the sender's egress and the receiver's ingress");
            if slots[0] == slots[2] || slots[1] == slots[3] {
                sharing += 1;
            }
            for slot in slots {
                load[slot as usize] += 1;
            }
        }
        // Two pairs at 1/32 each: about 6% of flows.
        assert!(sharing < flows / 10, "{sharing} of {flows} flows share a slot with themselves");
        let mean = 4 * flows / FLOW_CACHE_SLOTS;
        assert!(load.iter().all(|&n| n > mean / 2 && n < mean * 3 / 2), "uneven slots: {load:?}");
    }

    /// The layouts have no implicit padding (every byte is a named field), so both sides agree
    /// on every offset.
    #[test]
    fn layouts_are_packed_as_declared() {
        assert_eq!(core::mem::size_of::<EndpointInfo>(), 4 * 4 + 8 + 16 + 16 + 16 + 64 + 4 + 16 + 4);
        assert_eq!(core::mem::size_of::<FlowKey>(), 32 + 4 + 4 + 4);
        assert_eq!(core::mem::size_of::<FlowState>(), 8 + 4 * 3 + 4 + 16 + 8 + 8);
        assert_eq!(core::mem::size_of::<PolicyPortKey>(), 8);
        assert_eq!(core::mem::size_of::<NfConntrackTuple>(), 40);
        assert_eq!(core::mem::size_of::<VerdictEvent>(), 8 + 4 * 5 + 2 * 3 + 6 + 48);
    }

    #[test]
    fn flow_order_is_total_and_antisymmetric() {
        let a = [1u8; 16];
        let mut b = [1u8; 16];
        b[15] = 2;
        assert!(flow_order(&a, 5, &b, 1) != flow_order(&b, 1, &a, 5));
        assert!(flow_order(&a, 1, &a, 2) && !flow_order(&a, 2, &a, 1));
        assert!(flow_order(&a, 3, &a, 3));
    }
}
