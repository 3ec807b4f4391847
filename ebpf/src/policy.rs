//! The policy lookups of one endpoint direction: which rule groups admit a peer, which admit a
//! destination port. `netsieve-common` describes the maps; the agent's
//! `dataplane::compile::DirectionEntries::matching_group` is the userspace model of this file,
//! and the differential tests hold both to the semantics module.
//!
//! Every lookup that cannot change the verdict is skipped (each costs a call, and the tries a
//! walk): the endpoint carries which groups each map can grant, so a packet whose peer no
//! group could admit stops after the identity lookup, and one whose port no CIDR group admits
//! never walks the CIDR trie.
use crate::maps::{POLICY_CIDR, POLICY_IDENTITY, POLICY_PORT, POLICY_RANGE};
use aya_ebpf::maps::lpm_trie::Key;
use netsieve_common::{
    EP_CIDR_RULES, EP_EXACT_PORTS, EP_PORT_RANGES, EndpointInfo, NO_RULE, POLICY_CIDR_FIXED_BITS, POLICY_PORT_FIXED_BITS,
    PolicyCidrKeyData, PolicyIdentityKey, PolicyPortKey, PolicyPortRangeKeyData, WILDCARD_EVERY_PROTOCOL, wildcard_index,
};

/// Rule groups whose peers admit identity `identity` (the CIDR entries aside).
#[inline(always)]
fn identity_bits(endpoint: &EndpointInfo, direction: u8, identity: u32) -> u64 {
    let bits = endpoint.any_peer_bits[(direction & 1) as usize];
    let key = PolicyIdentityKey { endpoint_id: endpoint.endpoint_id, direction, _pad1: 0, _pad2: 0, peer_identity: identity };
    // SAFETY: plain read of a map value.
    match unsafe { POLICY_IDENTITY.get(&key) } {
        Some(mask) => bits | mask.bits,
        None => bits,
    }
}

/// Rule groups whose CIDR entries admit `peer`.
#[inline(always)]
fn cidr_bits(endpoint: &EndpointInfo, direction: u8, peer: &[u8; 16]) -> u64 {
    let key = Key::new(
        POLICY_CIDR_FIXED_BITS + 128,
        PolicyCidrKeyData { endpoint_id: endpoint.endpoint_id, direction, _pad1: 0, _pad2: 0, addr: *peer },
    );
    POLICY_CIDR.get(&key).map_or(0, |mask| mask.bits)
}

/// Rule groups whose ports admit `protocol`/`port`, as far as `wanted` (the groups whose peers
/// may admit the packet) needs: the port-range trie is walked only if it could add one of
/// them. `has_ports`: TCP, UDP or SCTP; every other protocol only matches rules without ports.
#[inline(always)]
fn port_bits(endpoint: &EndpointInfo, direction: u8, protocol: u8, port: u16, has_ports: bool, wanted: u64) -> u64 {
    let dir = (direction & 1) as usize;
    if !has_ports {
        return endpoint.wildcard_bits[dir][WILDCARD_EVERY_PROTOCOL];
    }
    let endpoint_id = endpoint.endpoint_id;
    if endpoint.flags & (EP_EXACT_PORTS << dir) != 0 {
        // An exact entry already carries every group admitting that port.
        let key = PolicyPortKey { endpoint_id, direction, protocol, port };
        // SAFETY: plain read of a map value.
        if let Some(mask) = unsafe { POLICY_PORT.get(&key) } {
            return mask.bits;
        }
    }
    let bits = endpoint.wildcard_bits[dir][wildcard_index(protocol)];
    if endpoint.flags & (EP_PORT_RANGES << dir) != 0 && endpoint.range_group_bits[dir] & wanted & !bits != 0 {
        let key = Key::new(
            POLICY_PORT_FIXED_BITS + 16,
            PolicyPortRangeKeyData { endpoint_id, direction, protocol, port_be: port.to_be_bytes() },
        );
        if let Some(mask) = POLICY_RANGE.get(&key) {
            return bits | mask.bits;
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
    let dir = (direction & 1) as usize;
    let by_identity = identity_bits(endpoint, direction, identity);
    let cidr_groups = if endpoint.flags & (EP_CIDR_RULES << dir) != 0 { endpoint.cidr_group_bits[dir] } else { 0 };
    if by_identity | cidr_groups == 0 {
        return None;
    }
    let ports = port_bits(endpoint, direction, protocol, port, has_ports, by_identity | cidr_groups);
    let mut both = by_identity & ports;
    // The CIDR trie can only change the answer with a group that admits the port and is below
    // the lowest one matched so far (all groups while none matched).
    let below_lowest = (both & both.wrapping_neg()).wrapping_sub(1);
    if ports & cidr_groups & below_lowest != 0 {
        both |= cidr_bits(endpoint, direction, peer) & ports;
    }
    if both == 0 { None } else { Some(both.trailing_zeros()) }
}

/// `RULE_STATS` index of a rule group of the endpoint direction.
#[inline(always)]
pub fn rule_index(endpoint: &EndpointInfo, direction: u8, group: u32) -> u32 {
    let base = endpoint.rule_base[(direction & 1) as usize];
    if base == NO_RULE { NO_RULE } else { base.wrapping_add(group) }
}
