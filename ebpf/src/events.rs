//! Verdict events through the `EVENTS` ring buffer, rate-limited per CPU by a token bucket so
//! that a flood of drops costs bounded CPU and memory. Counters are exact whatever happens to
//! events; every event not emitted is counted by why (`EVENT_COUNTERS`).
use crate::maps::{CONFIG, EVENT_BUCKETS, EVENT_COUNTERS, EVENTS};
use crate::packet::Packet;
use crate::verdict::{now_coarse, now_netfilter, now_precise};
use netsieve_common::{EVENTS_EMITTED, EVENTS_RATE_LIMITED, EVENTS_RING_FULL, HOOK_TC, TOKEN_SCALE, VerdictEvent};

/// Everything an event says besides the packet.
pub struct EventInfo {
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub revision: u32,
    pub peer_identity: u32,
    pub rule_index: u32,
    pub reason: u8,
    pub verdict: u8,
    pub direction: u8,
    pub hook: u8,
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = EVENT_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

/// Takes a token from this CPU's bucket: false when events are off or the rate is exhausted.
/// The clock is read only when events are on, and it is `clock`: the per-tick cached clock of
/// the hook (an inlined jiffies load and a per-CPU read on most packets). Within one tick the
/// elapsed time is then 0 and the refill (a division) is skipped: under a flood of drops the
/// bucket is empty on almost every packet, so this is the cost every dropped packet pays.
#[inline(always)]
fn take_token(clock: impl Fn() -> u64) -> bool {
    let Some(config) = CONFIG.get(0) else { return false };
    let rate = config.events_per_second as u64;
    if rate == 0 {
        return false;
    }
    let Some(bucket) = EVENT_BUCKETS.get_ptr_mut(0) else { return false };
    let now = clock();
    let burst = (config.events_burst as u64).max(1) * TOKEN_SCALE;
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        if (*bucket).last_refill_ns == 0 {
            // A bucket starts full.
            (*bucket).tokens = burst;
            (*bucket).last_refill_ns = now;
        }
        // Elapsed time is capped at 1 s so the product cannot overflow (the agent refuses
        // rates above 1,000,000/s). The TC and netfilter clocks differ by at most a tick; a
        // reading behind the last refill counts as no time elapsed.
        let elapsed = now.saturating_sub((*bucket).last_refill_ns).min(1_000_000_000);
        if elapsed > 0 {
            let refill = elapsed * rate * TOKEN_SCALE / 1_000_000_000;
            if refill > 0 {
                (*bucket).tokens = ((*bucket).tokens + refill).min(burst);
                (*bucket).last_refill_ns = now;
            }
        }
        if (*bucket).tokens < TOKEN_SCALE {
            count(EVENTS_RATE_LIMITED);
            return false;
        }
        (*bucket).tokens -= TOKEN_SCALE;
    }
    true
}

/// Emits one event if the rate limit allows; `original_dst` is the pre-DNAT destination of a
/// Service flow.
#[inline(always)]
pub fn emit(info: &EventInfo, packet: &Packet, original_dst: Option<(&[u8; 16], u16)>) {
    // The netfilter programs may not read the coarse clock; `hook` is a constant at every
    // (inlined) call site, so each program keeps one branch.
    let taken = if info.hook == HOOK_TC { take_token(now_coarse) } else { take_token(now_netfilter) };
    if !taken {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<VerdictEvent>(0) else {
        count(EVENTS_RING_FULL);
        return;
    };
    let (original, original_port, translated) = match original_dst {
        Some((addr, port)) => (*addr, port, 1),
        None => ([0u8; 16], 0, 0),
    };
    entry.write(VerdictEvent {
        timestamp_ns: now_precise(),
        ifindex: info.ifindex,
        endpoint_id: info.endpoint_id,
        revision: info.revision,
        peer_identity: info.peer_identity,
        rule_index: info.rule_index,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        original_dst_port: original_port,
        reason: info.reason,
        verdict: info.verdict,
        direction: info.direction,
        protocol: packet.protocol,
        hook: info.hook,
        translated,
        src: packet.src,
        dst: packet.dst,
        original_dst: original,
    });
    entry.submit(0);
    count(EVENTS_EMITTED);
}
