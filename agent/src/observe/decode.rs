//! Verdict events as the kernel writes them, and the names and times they carry.
use netsieve_common::{
    PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, REASON_COUNT, REASON_NAMES, VerdictEvent,
};
use std::net::{IpAddr, Ipv6Addr};

/// A ring buffer record as a `VerdictEvent`; `None` if it is not one (wrong size: an object
/// built from another layout).
pub fn decode(record: &[u8]) -> Option<VerdictEvent> {
    if record.len() != std::mem::size_of::<VerdictEvent>() {
        return None;
    }
    // SAFETY: the length is checked above; VerdictEvent is plain old data (#[repr(C)], no
    // pointers, every byte pattern valid) and read_unaligned does not need the record to be
    // aligned.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<VerdictEvent>()) })
}

/// An address of a map key (IPv4 as IPv4-mapped IPv6) as people write it.
pub fn address(bytes: &[u8; 16]) -> IpAddr {
    Ipv6Addr::from(*bytes).to_canonical()
}

/// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, or the number.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        PROTO_ICMP => "ICMP".into(),
        PROTO_ICMPV6 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

/// The drop reason's name, as the metrics label it.
pub fn reason_name(reason: u8) -> &'static str {
    if u32::from(reason) < REASON_COUNT { REASON_NAMES[usize::from(reason)] } else { "unknown" }
}

/// Nanoseconds on a clock (`clock_gettime`); 0 if the clock cannot be read.
fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only the timespec we pass.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return 0;
    }
    i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec)
}

/// CLOCK_MONOTONIC now, the clock of `bpf_ktime_get_ns` (events) and of conntrack timestamps.
pub fn monotonic_ns() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

/// Converts the kernel's monotonic timestamps into wall-clock time. Taken anew for each batch
/// of events: the offset moves when the wall clock is stepped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, in nanoseconds.
    offset_ns: i128,
}

impl WallClock {
    pub fn now() -> WallClock {
        WallClock { offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC) }
    }

    /// A clock with a given offset (tests).
    pub fn with_offset(offset_ns: i128) -> WallClock {
        WallClock { offset_ns }
    }

    /// The RFC 3339 (UTC, nanoseconds) form of a monotonic timestamp.
    pub fn rfc3339(&self, monotonic_ns: u64) -> String {
        rfc3339(i128::from(monotonic_ns) + self.offset_ns)
    }
}

/// RFC 3339 in UTC of nanoseconds since the Unix epoch.
pub fn rfc3339(unix_ns: i128) -> String {
    match jiff::Timestamp::from_nanosecond(unix_ns) {
        Ok(timestamp) => timestamp.to_string(),
        Err(_) => format!("@{unix_ns}ns"),
    }
}

/// The wall-clock time now, RFC 3339.
pub fn now_rfc3339() -> String {
    rfc3339(clock_ns(libc::CLOCK_REALTIME))
}

/// RFC 3339 of a `SystemTime`.
pub fn system_time_rfc3339(time: std::time::SystemTime) -> String {
    match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => rfc3339(since.as_nanos() as i128),
        Err(_) => rfc3339(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_field_by_field_and_wrong_sizes_are_refused() {
        let event = VerdictEvent {
            timestamp_ns: 42,
            ifindex: 7,
            endpoint_id: 3,
            revision: 99,
            peer_identity: 300,
            rule_index: 12,
            src_port: 40000,
            dst_port: 80,
            reason: 0,
            verdict: 0,
            direction: 1,
            protocol: PROTO_TCP,
            src: [7; 16],
            ..Default::default()
        };
        // SAFETY: VerdictEvent is plain old data; its bytes are what the kernel writes.
        let bytes: Vec<u8> = unsafe {
            std::slice::from_raw_parts((&event as *const VerdictEvent).cast::<u8>(), std::mem::size_of::<VerdictEvent>())
        }
        .to_vec();
        assert_eq!(decode(&bytes), Some(event));
        assert_eq!(decode(&bytes[1..]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
        // Unaligned records decode too.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode(&shifted[1..]), Some(event));
    }

    #[test]
    fn names_of_addresses_protocols_reasons() {
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[10, 250, 0, 11]);
        assert_eq!(address(&mapped), "10.250.0.11".parse::<IpAddr>().expect("ip"));
        let v6: Ipv6Addr = "fd00:250::a".parse().expect("ip");
        assert_eq!(address(&v6.octets()), IpAddr::V6(v6));
        assert_eq!(protocol_name(PROTO_TCP), "TCP");
        assert_eq!(protocol_name(PROTO_ICMPV6), "ICMPv6");
        assert_eq!(protocol_name(47), "47");
        assert_eq!(reason_name(0), "policy_denied");
        assert_eq!(reason_name(5), "spoofed");
        assert_eq!(reason_name(200), "unknown");
    }

    #[test]
    fn monotonic_timestamps_become_utc_times() {
        let clock = WallClock::with_offset(1_764_497_702_000_000_000);
        assert_eq!(clock.rfc3339(123_456_789), "2025-11-30T10:15:02.123456789Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // The real clock: a timestamp taken now is within a second of the wall clock.
        let now = WallClock::now().rfc3339(monotonic_ns());
        assert!(now.starts_with("20"), "{now}");
    }
}
