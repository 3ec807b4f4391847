//! Per-CPU counters: drops and audited would-be drops by reason and direction, packets and
//! bytes per endpoint slot and per rule group. Array maps only, so every update is an inlined
//! lookup and an add.
use crate::maps::{AUDIT_COUNTERS, DROP_COUNTERS, ENDPOINT_STATS, RULE_STATS};
use netsieve_common::{MAX_RULE_COUNTERS, NO_RULE};

#[inline(always)]
pub fn count_drop(reason: u32, direction: u8) {
    if let Some(counter) = DROP_COUNTERS.get_ptr_mut(reason * 2 + (direction & 1) as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count_audit(reason: u32, direction: u8) {
    if let Some(counter) = AUDIT_COUNTERS.get_ptr_mut(reason * 2 + (direction & 1) as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

/// What happened to a packet, for the per-endpoint statistics.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Allowed,
    Denied,
    Audited,
}

#[inline(always)]
pub fn count_endpoint(slot: u32, direction: u8, counted: Counted, bytes: u64) {
    let Some(stats) = ENDPOINT_STATS.get_ptr_mut(slot) else { return };
    let dir = (direction & 1) as usize;
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        match counted {
            Counted::Allowed => {
                (*stats).allowed_packets[dir] += 1;
                (*stats).allowed_bytes[dir] += bytes;
            }
            Counted::Denied => {
                (*stats).denied_packets[dir] += 1;
                (*stats).denied_bytes[dir] += bytes;
            }
            Counted::Audited => {
                (*stats).audit_packets[dir] += 1;
                (*stats).audit_bytes[dir] += bytes;
            }
        }
    }
}

#[inline(always)]
pub fn count_rule(rule_index: u32, bytes: u64) {
    if rule_index == NO_RULE || rule_index >= MAX_RULE_COUNTERS {
        return;
    }
    if let Some(stats) = RULE_STATS.get_ptr_mut(rule_index) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += bytes;
        }
    }
}
