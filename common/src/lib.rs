//! Map keys and values shared by the eBPF programs and the userspace agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so the layout the kernel program reads is
//! exactly the one userspace writes. The `user` feature adds `aya::Pod` so userspace can put
//! them in maps; the eBPF side builds without it.
//!
//! # Lookup design (fixed number of lookups per packet)
//!
//! For a packet seen on a local pod's host-side veth, with `peer` the remote address:
//! 1. `ENDPOINTS[ifindex]` -> endpoint id, isolation flags.
//! 2. `IPCACHE` (LPM over the peer IP) -> numeric identity of the peer's label set (0 = world).
//! 3. `POLICY_IDENTITY[(endpoint, direction, identity)]` -> bitmask of rule groups whose
//!    pod/namespace selectors admit that identity.
//! 4. `POLICY_CIDR` (LPM over endpoint, direction, peer IP) -> bitmask of rule groups whose
//!    ipBlocks (flattened with their excepts in userspace) or "any peer" admit that IP.
//! 5. `POLICY_PORT` (LPM over endpoint, direction, protocol, port prefix) -> bitmask of rule
//!    groups whose port set contains the destination port (endPort ranges become prefixes).
//!
//! The packet is allowed in a direction when the direction is not isolated, or when
//! `(identity_mask | cidr_mask) & port_mask != 0`. A rule group is a set of NetworkPolicy rules
//! that share one port set, so at most [`MAX_RULE_GROUPS`] distinct port sets per endpoint and
//! direction; more is a compile error that fails the endpoint closed.
#![no_std]

/// Direction of a policy check, from the local pod's point of view.
pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;

/// IP protocol numbers used as map key fields.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// Identity of any address the ipcache does not know (outside the cluster).
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
/// too many rule groups, bad input). Everything except host traffic is dropped and counted.
pub const EP_FAIL_CLOSED: u32 = 1 << 2;
/// `EndpointInfo::flags`: traffic between the pod and its own node is allowed
/// (Kubernetes' stated exception, kubelet probes).
pub const EP_ALLOW_HOST: u32 = 1 << 3;

/// Map capacities, sized for 10k pods, 1k policies and 100k rule entries.
pub const MAX_ENDPOINTS: u32 = 4096;
pub const MAX_IPCACHE_ENTRIES: u32 = 65_536;
pub const MAX_POLICY_IDENTITY_ENTRIES: u32 = 262_144;
pub const MAX_POLICY_CIDR_ENTRIES: u32 = 131_072;
pub const MAX_POLICY_PORT_ENTRIES: u32 = 131_072;
pub const MAX_CONNTRACK_ENTRIES: u32 = 262_144;
pub const MAX_FRAGMENT_ENTRIES: u32 = 8192;

/// Data of an `IPCACHE` LPM key: the address, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) so
/// one trie serves both families. The prefix length counts bits of this 16-byte address.
pub type IpcacheKeyData = [u8; 16];

/// Value of `IPCACHE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    pub flags: u32,
}

/// Key of `ENDPOINTS`: the ifindex of the pod's host-side interface.
pub type EndpointKey = u32;

/// Value of `ENDPOINTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// Agent-chosen id used as the first field of all per-endpoint policy keys.
    pub endpoint_id: u32,
    /// `EP_*` flags.
    pub flags: u32,
    /// The pod's own identity (for counters and debugging).
    pub identity: u32,
    /// Bumped on every reprogramming; lets tools see which policy version is live.
    pub revision: u32,
}

/// Key of `POLICY_IDENTITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyIdentityKey {
    pub endpoint_id: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
    pub peer_identity: u32,
}

/// Value of all three policy maps: which rule groups match.
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
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}
/// Bits of `PolicyCidrKeyData` before `addr` that every key matches exactly.
pub const POLICY_CIDR_FIXED_BITS: u32 = 64;

/// Data of a `POLICY_PORT` LPM key. `prefix_len` = [`POLICY_PORT_FIXED_BITS`] + prefix bits of
/// the port; `port` is big-endian so prefixes run from the most significant bit.
/// A rule with no `ports` at all is stored with `protocol` = [`PROTO_ANY`] and matched by a
/// second lookup, so "all protocols" also covers ICMP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyPortKeyData {
    pub endpoint_id: u32,
    pub direction: u8,
    pub protocol: u8,
    pub port_be: [u8; 2],
}
pub const POLICY_PORT_FIXED_BITS: u32 = 48;
/// `PolicyPortKeyData::protocol` for rules that admit every protocol and port.
pub const PROTO_ANY: u8 = 0;

/// Key of `CONNTRACK`: a flow as first seen on one pod interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConntrackKey {
    /// Interface the flow was allowed on: a spoofed packet on another pod's veth misses.
    pub ifindex: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
    pub src_port: u16,
    pub dst_port: u16,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}

/// TCP-ish lifecycle of a conntrack entry; decides its idle timeout.
pub const CT_STATE_NEW: u8 = 0;
pub const CT_STATE_ESTABLISHED: u8 = 1;
pub const CT_STATE_CLOSING: u8 = 2;

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConntrackValue {
    pub last_seen_ns: u64,
    pub state: u8,
    pub _pad: [u8; 7],
}

/// Key of `FRAGMENTS`: an IP datagram being fragmented, on one interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub ifindex: u32,
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}

/// Value of `FRAGMENTS`: the verdict of the first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentValue {
    pub allowed: u8,
    pub _pad: [u8; 3],
    /// The first fragment's L4 ports, so later fragments are counted against the same flow.
    pub src_port: u16,
    pub dst_port: u16,
}

/// Reasons indexed in the per-CPU `DROP_COUNTERS` array: index = reason * 2 + direction.
pub const REASON_POLICY_DENIED: u32 = 0;
pub const REASON_NO_ENDPOINT: u32 = 1;
pub const REASON_MALFORMED: u32 = 2;
pub const REASON_FRAGMENT_UNKNOWN: u32 = 3;
pub const REASON_FAIL_CLOSED: u32 = 4;
pub const REASON_COUNT: u32 = 5;
pub const REASON_NAMES: [&str; REASON_COUNT as usize] =
    ["policy_denied", "no_endpoint", "malformed", "fragment_unknown", "map_full"];

/// Value of the per-CPU `ENDPOINT_STATS` hash (key: endpoint id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointStats {
    /// Indexed by direction.
    pub allowed_packets: [u64; 2],
    pub allowed_bytes: [u64; 2],
    pub denied_packets: [u64; 2],
    pub denied_bytes: [u64; 2],
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
    unsafe impl aya::Pod for PolicyPortKeyData {}
    unsafe impl aya::Pod for ConntrackKey {}
    unsafe impl aya::Pod for ConntrackValue {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentValue {}
    unsafe impl aya::Pod for EndpointStats {}
}
