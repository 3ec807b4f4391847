//! Longest-prefix-match flattening, pure and kernel-free.
//!
//! The kernel answers an LPM lookup with the value of the single longest matching prefix, while
//! NetworkPolicy rules are sets: `cidr` minus `except` lists, and `port..=endPort` ranges, from
//! several rule groups that may overlap. These functions turn such sets into prefix -> bitmask
//! entries where the longest match for any key carries exactly the bits of the groups whose set
//! contains that key.
//!
//! Why it is exact: let P be the longest inserted prefix containing key x, and S a prefix that
//! was inserted (a cidr, an except or a port-range piece). If x ∈ S then S is a candidate, so P is
//! at least as long as S and both contain x, hence P ⊆ S. If P ⊆ S then x ∈ S. So "x ∈ S" equals
//! "P ⊆ S" for every inserted S, and the value stored at P can be computed from P alone.
use ipnet::{IpNet, Ipv6Net};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

/// One CIDR peer of a rule group: `net` minus every prefix in `except`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrSet {
    pub net: Ipv6Net,
    pub except: Vec<Ipv6Net>,
}

/// Maps an IP network onto the 128-bit space the kernel tries use: IPv4 as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d/96+n`), so one trie holds both families.
pub fn to_mapped(net: IpNet) -> Ipv6Net {
    match net {
        IpNet::V4(v4) => {
            let mapped = v4.network().to_ipv6_mapped();
            // 96 + a prefix length of at most 32 is at most 128, which Ipv6Net accepts.
            Ipv6Net::new(mapped, 96 + v4.prefix_len()).unwrap_or_else(|_| Ipv6Net::default())
        }
        IpNet::V6(v6) => v6.trunc(),
    }
}

/// The 16-byte key form of an address (IPv4-mapped for IPv4).
pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn contains(outer: &Ipv6Net, inner: &Ipv6Net) -> bool {
    outer.prefix_len() <= inner.prefix_len() && outer.contains(&inner.network())
}

/// Flattens CIDR sets (each tagged with the rule-group bit it grants) into LPM entries.
pub fn flatten_cidrs(sets: &[(CidrSet, u64)]) -> BTreeMap<Ipv6Net, u64> {
    let mut prefixes: Vec<Ipv6Net> = Vec::new();
    for (set, _) in sets {
        prefixes.push(set.net.trunc());
        prefixes.extend(set.except.iter().map(Ipv6Net::trunc));
    }
    prefixes.sort();
    prefixes.dedup();
    let mut entries = BTreeMap::new();
    for prefix in prefixes {
        let mut bits = 0u64;
        for (set, group_bits) in sets {
            let inside = contains(&set.net, &prefix);
            let excepted = set.except.iter().any(|e| contains(e, &prefix));
            if inside && !excepted {
                bits |= group_bits;
            }
        }
        // A zero entry still matters: it shadows a shorter prefix that would grant bits
        // (an `except` hole), so it is kept.
        entries.insert(prefix, bits);
    }
    entries
}

/// A port prefix: the top `len` bits of `port` (0..=16) are fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    pub port: u16,
    pub len: u8,
}

impl PortPrefix {
    fn first(self) -> u32 {
        u32::from(self.port)
    }
    fn last(self) -> u32 {
        u32::from(self.port) + (1u32 << (16 - u32::from(self.len))) - 1
    }
    pub fn contains(self, port: u16) -> bool {
        (self.first()..=self.last()).contains(&u32::from(port))
    }
}

/// Splits the inclusive range `first..=last` into the fewest aligned prefixes (at most 30).
pub fn range_to_prefixes(first: u16, last: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    if first > last {
        return out;
    }
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        // Largest block aligned at `start` that does not pass `end`.
        let mut size_bits = if start == 0 { 16 } else { start.trailing_zeros().min(16) };
        while start + (1u32 << size_bits) - 1 > end {
            size_bits -= 1;
        }
        // start < 65536 and size_bits <= 16, so both conversions are in range.
        out.push(PortPrefix { port: start as u16, len: (16 - size_bits) as u8 });
        start += 1u32 << size_bits;
    }
    out
}

/// Flattens port ranges (each tagged with the rule-group bit it grants) for one protocol.
pub fn flatten_port_ranges(ranges: &[((u16, u16), u64)]) -> BTreeMap<PortPrefix, u64> {
    let mut prefixes: Vec<PortPrefix> = ranges
        .iter()
        .flat_map(|((first, last), _)| range_to_prefixes(*first, *last))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    let mut entries = BTreeMap::new();
    for prefix in prefixes {
        let mut bits = 0u64;
        for ((first, last), group_bits) in ranges {
            if u32::from(*first) <= prefix.first() && prefix.last() <= u32::from(*last) {
                bits |= group_bits;
            }
        }
        entries.insert(prefix, bits);
    }
    entries
}

/// Software longest-prefix match over flattened CIDR entries (the userspace model of the kernel
/// lookup, used by `explain`-style checks and tests).
pub fn lookup_cidr(entries: &BTreeMap<Ipv6Net, u64>, ip: IpAddr) -> Option<u64> {
    let addr = Ipv6Addr::from(addr_bytes(ip));
    entries
        .iter()
        .filter(|(net, _)| net.contains(&addr))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(_, bits)| *bits)
}

/// Software longest-prefix match over flattened port entries.
pub fn lookup_port(entries: &BTreeMap<PortPrefix, u64>, port: u16) -> Option<u64> {
    entries
        .iter()
        .filter(|(prefix, _)| prefix.contains(port))
        .max_by_key(|(prefix, _)| prefix.len)
        .map(|(_, bits)| *bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn net(s: &str) -> Ipv6Net {
        to_mapped(s.parse().expect("test CIDR"))
    }

    #[test]
    fn range_prefixes_cover_exactly_the_range() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut cases = vec![(0u16, 65535u16), (0, 0), (65535, 65535), (1, 65534), (80, 80), (8000, 8080)];
        for _ in 0..300 {
            let a: u16 = rng.random();
            let b: u16 = rng.random();
            cases.push((a.min(b), a.max(b)));
        }
        for (first, last) in cases {
            let prefixes = range_to_prefixes(first, last);
            assert!(prefixes.len() <= 30, "{first}-{last}: {} prefixes", prefixes.len());
            let covered: u32 = prefixes.iter().map(|p| p.last() - p.first() + 1).sum();
            assert_eq!(covered, u32::from(last) - u32::from(first) + 1);
            for probe in [first, last, first.saturating_sub(1), last.saturating_add(1)] {
                let inside = (first..=last).contains(&probe);
                assert_eq!(prefixes.iter().any(|p| p.contains(probe)), inside, "{first}-{last} @ {probe}");
            }
        }
    }

    #[test]
    fn overlapping_port_ranges_flatten_to_exact_group_sets() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..50 {
            let ranges: Vec<((u16, u16), u64)> = (0..rng.random_range(1..6))
                .map(|bit| {
                    let a = rng.random_range(0..2000u16);
                    let b = rng.random_range(0..2000u16);
                    ((a.min(b), a.max(b)), 1u64 << bit)
                })
                .collect();
            let entries = flatten_port_ranges(&ranges);
            for port in 0..2100u16 {
                let expected: u64 = ranges
                    .iter()
                    .filter(|((f, l), _)| (*f..=*l).contains(&port))
                    .map(|(_, b)| b)
                    .fold(0, |acc, b| acc | b);
                assert_eq!(lookup_port(&entries, port).unwrap_or(0), expected, "port {port} in {ranges:?}");
            }
        }
    }

    #[test]
    fn except_holes_and_nested_blocks_flatten_exactly() {
        let sets = vec![
            (CidrSet { net: net("10.0.0.0/8"), except: vec![net("10.1.0.0/16"), net("10.2.3.4/32")] }, 0b01),
            (CidrSet { net: net("10.1.2.0/24"), except: vec![] }, 0b10),
            (CidrSet { net: net("fd00::/64"), except: vec![net("fd00::5/128")] }, 0b100),
        ];
        let entries = flatten_cidrs(&sets);
        let check = |ip: &str, bits: u64| {
            let ip: IpAddr = ip.parse().expect("test IP");
            assert_eq!(lookup_cidr(&entries, ip).unwrap_or(0), bits, "{ip}");
        };
        check("10.0.0.1", 0b01);
        check("10.1.0.1", 0);
        check("10.1.2.3", 0b10);
        check("10.2.3.4", 0);
        check("10.2.3.5", 0b01);
        check("11.0.0.1", 0);
        check("fd00::4", 0b100);
        check("fd00::5", 0);
        check("fd00:0:0:1::5", 0);
    }

    #[test]
    fn random_cidr_sets_agree_with_direct_membership() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..40 {
            let mut sets = Vec::new();
            for bit in 0..rng.random_range(1..5) {
                let base = std::net::Ipv4Addr::new(10, rng.random_range(0..4), rng.random(), rng.random());
                let len = rng.random_range(8..=30u8);
                let outer = ipnet::Ipv4Net::new(base, len).expect("len <= 32").trunc();
                let mut except = Vec::new();
                for _ in 0..rng.random_range(0..3) {
                    let host = u32::from(outer.network()) + rng.random_range(0..(1u32 << (32 - len)));
                    let elen = rng.random_range(len..=32);
                    let hole = ipnet::Ipv4Net::new(host.into(), elen).expect("len <= 32").trunc();
                    except.push(to_mapped(IpNet::V4(hole)));
                }
                sets.push((CidrSet { net: to_mapped(IpNet::V4(outer)), except }, 1u64 << bit));
            }
            let entries = flatten_cidrs(&sets);
            for _ in 0..500 {
                let ip = IpAddr::V4(std::net::Ipv4Addr::new(10, rng.random_range(0..4), rng.random(), rng.random()));
                let mapped = Ipv6Addr::from(addr_bytes(ip));
                let expected = sets
                    .iter()
                    .filter(|(s, _)| s.net.contains(&mapped) && !s.except.iter().any(|e| e.contains(&mapped)))
                    .fold(0, |acc, (_, b)| acc | b);
                assert_eq!(lookup_cidr(&entries, ip).unwrap_or(0), expected, "{ip}");
            }
        }
    }
}
