//! The policy lookups of one endpoint direction: which rule groups admit a peer, which admit a
//! destination port. `netsieve-common` describes the maps; the agent's
//! `dataplane::compile::DirectionEntries::matching_group` is the userspace model of this file,
//! and the differential tests hold both to the semantics module.
use crate::maps::{POLICY_CIDR, POLICY_IDENTITY, POLICY_PORT, POLICY_RANGE};
use aya_ebpf::maps::lpm_trie::Key;
use netsieve_common::{
    EP_CIDR_RULES, EP_PORT_RANGES, EndpointInfo, NO_RULE, POLICY_CIDR_FIXED_BITS, POLICY_PORT_FIXED_BITS, PORT_WILDCARD,
    PROTO_ANY, PolicyCidrKeyData, PolicyIdentityKey, PolicyPortKey, PolicyPortRangeKeyData,
};

/// Rule groups whose peers admit `peer` (with ipcache identity `identity`).
#[inline(always)]
pub fn peer_bits(endpoint: &EndpointInfo, direction: u8, identity: u32, peer: &[u8; 16]) -> u64 {
    let dir = (direction & 1) as usize;
    let mut bits = endpoint.any_peer_bits[dir];
    let key = PolicyIdentityKey { endpoint_id: endpoint.endpoint_id, direction, _pad1: 0, _pad2: 0, peer_identity: identity };
    // SAFETY: plain read of a map value.
    if let Some(mask) = unsafe { POLICY_IDENTITY.get(&key) } {
        bits |= mask.bits;
    }
    if endpoint.flags & (EP_CIDR_RULES << dir) != 0 {
        let key = Key::new(
            POLICY_CIDR_FIXED_BITS + 128,
            PolicyCidrKeyData { endpoint_id: endpoint.endpoint_id, direction, _pad1: 0, _pad2: 0, addr: *peer },
        );
        if let Some(mask) = POLICY_CIDR.get(&key) {
            bits |= mask.bits;
        }
    }
    bits
}

/// Rule groups whose ports admit `protocol`/`port`. `has_ports`: TCP, UDP or SCTP; every
/// other protocol only matches rules without ports.
#[inline(always)]
pub fn port_bits(endpoint: &EndpointInfo, direction: u8, protocol: u8, port: u16, has_ports: bool) -> u64 {
    let endpoint_id = endpoint.endpoint_id;
    if !has_ports {
        let key = PolicyPortKey { endpoint_id, direction, protocol: PROTO_ANY, port: PORT_WILDCARD };
        // SAFETY: plain read of a map value.
        return unsafe { POLICY_PORT.get(&key) }.map_or(0, |m| m.bits);
    }
    // An exact entry already carries every group admitting that port.
    let key = PolicyPortKey { endpoint_id, direction, protocol, port };
    // SAFETY: plain read of a map value.
    if let Some(mask) = unsafe { POLICY_PORT.get(&key) } {
        return mask.bits;
    }
    let wildcard = PolicyPortKey { endpoint_id, direction, protocol, port: PORT_WILDCARD };
    // SAFETY: plain read of a map value.
    let mut bits = unsafe { POLICY_PORT.get(&wildcard) }.map_or(0, |m| m.bits);
    if endpoint.flags & (EP_PORT_RANGES << (direction & 1)) != 0 {
        let key = Key::new(
            POLICY_PORT_FIXED_BITS + 16,
            PolicyPortRangeKeyData { endpoint_id, direction, protocol, port_be: port.to_be_bytes() },
        );
        if let Some(mask) = POLICY_RANGE.get(&key) {
            bits |= mask.bits;
        }
    }
    bits
}

/// The rule group that admits the flow (the lowest common bit: groups are numbered in policy
/// and rule order, so this is the rule `netsieve explain` names), if any.
#[inline(always)]
pub fn matching_group(
    endpoint: &EndpointInfo,
    direction: u8,
    identity: u32,
    peer: &[u8; 16],
    protocol: u8,
    port: u16,
    has_ports: bool,
) -> Option<u32> {
    let peers = peer_bits(endpoint, direction, identity, peer);
    if peers == 0 {
        return None;
    }
    let both = peers & port_bits(endpoint, direction, protocol, port, has_ports);
    if both == 0 { None } else { Some(both.trailing_zeros()) }
}

/// `RULE_STATS` index of a rule group of the endpoint direction.
#[inline(always)]
pub fn rule_index(endpoint: &EndpointInfo, direction: u8, group: u32) -> u32 {
    let base = endpoint.rule_base[(direction & 1) as usize];
    if base == NO_RULE { NO_RULE } else { base.wrapping_add(group) }
}
