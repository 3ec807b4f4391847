//! Policy -> map-entry compiler for one endpoint direction, pure and kernel-free.
//!
//! Input is a list of rules already resolved against the cluster (selectors turned into peer
//! identities or addresses, named ports into numbers); output is the exact content of the
//! per-endpoint policy maps for that direction (see `netsieve-common` for the lookup design).
//! [`DirectionEntries::matching_group`] evaluates those entries the way the eBPF program does,
//! so the compiler can be checked against the semantics module without a kernel, and the
//! kernel against both.
//!
//! Rule groups: one per rule (in policy-key and rule order, so the lowest matching bit names
//! the rule `netsieve explain` names), as long as at most [`MAX_RULE_GROUPS`] rules select
//! the endpoint direction; beyond that, rules that share a port set share a group (a group
//! then stands for several rules).
use super::lpm::{self, CidrSet, PortPrefix};
use ipnet::Ipv6Net;
use netsieve_common::{MAX_RULE_GROUPS, PORT_RANGE_EXPAND_LIMIT, PROTO_SCTP, PROTO_TCP, PROTO_UDP, WILDCARD_EVERY_PROTOCOL, wildcard_index};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Who a rule admits, after selectors were resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerInput {
    /// `from`/`to` absent or empty: every address.
    AnyAddress,
    /// Pods whose label set has one of these identities.
    Identities(BTreeSet<u32>),
    /// An ipBlock.
    Cidr(CidrSet),
    /// Individual addresses (used where identity is not precise enough: egress rules with a
    /// named port admit only the destination pods that declare that name).
    Addresses(BTreeSet<IpAddr>),
}

/// Which destination ports a rule admits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSetInput {
    /// `ports` absent or empty: every protocol (ICMP included) and port.
    AllProtocols,
    /// (protocol number, first port, last port) inclusive ranges.
    Ranges(BTreeSet<(u8, u16, u16)>),
}

/// The NetworkPolicy rule a compiled rule comes from: `policy` is `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleOrigin {
    pub policy: String,
    pub rule_index: usize,
}

/// One rule: any of `peers` on any of `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInput {
    pub peers: Vec<PeerInput>,
    pub ports: PortSetInput,
    pub origin: RuleOrigin,
}

/// Everything that decides one direction of one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectionInput {
    /// Some policy selecting the pod covers this direction.
    pub isolated: bool,
    pub rules: Vec<RuleInput>,
}

/// Map contents for one endpoint direction. Keys here are without the endpoint slot and
/// direction, which the kernel-facing sync adds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectionEntries {
    pub isolated: bool,
    /// Groups whose rules admit any peer (kept in the endpoint itself, no lookup).
    pub any_peer: u64,
    pub identity: BTreeMap<u32, u64>,
    /// ipBlocks and individual addresses, flattened for longest-prefix match.
    pub cidr: BTreeMap<Ipv6Net, u64>,
    /// Exact (protocol, port) entries, each with every group admitting that port.
    pub port: BTreeMap<(u8, u16), u64>,
    /// Groups admitting every port of a protocol, by [`wildcard_index`].
    /// Kept in the endpoint itself, no lookup.
    pub wildcard: [u64; 4],
    /// Port ranges too large to expand, flattened for longest-prefix match.
    pub port_ranges: BTreeMap<(u8, PortPrefix), u64>,
    /// The rules each group stands for, by group index.
    pub groups: Vec<Vec<RuleOrigin>>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("{groups} distinct port sets in one direction; at most {MAX_RULE_GROUPS} fit the rule mask")]
    TooManyRuleGroups { groups: usize },
}

/// Protocols whose ports rules can name.
pub const PORT_PROTOCOLS: [u8; 3] = [PROTO_TCP, PROTO_UDP, PROTO_SCTP];

/// A rule group being built: its port set, the peers of its rules, the rules.
type Group<'a> = (PortSetInput, Vec<&'a PeerInput>, Vec<RuleOrigin>);

/// Assigns rule groups: one per (rule, port set) in input order when they fit, else one per
/// distinct port set in order of first appearance.
fn group_rules(rules: &[RuleInput]) -> Result<Vec<Group<'_>>, CompileError> {
    let mut per_rule: Vec<Group<'_>> = Vec::new();
    for rule in rules {
        match per_rule.iter_mut().find(|(ports, _, origins)| *ports == rule.ports && origins[0] == rule.origin) {
            Some((_, peers, _)) => peers.extend(rule.peers.iter()),
            None => per_rule.push((rule.ports.clone(), rule.peers.iter().collect(), vec![rule.origin.clone()])),
        }
    }
    if per_rule.len() <= MAX_RULE_GROUPS {
        return Ok(per_rule);
    }
    let mut per_port_set: Vec<Group<'_>> = Vec::new();
    for (ports, peers, origins) in per_rule {
        match per_port_set.iter_mut().find(|(p, _, _)| *p == ports) {
            Some((_, all_peers, all_origins)) => {
                all_peers.extend(peers);
                for origin in origins {
                    if !all_origins.contains(&origin) {
                        all_origins.push(origin);
                    }
                }
            }
            None => per_port_set.push((ports, peers, origins)),
        }
    }
    if per_port_set.len() > MAX_RULE_GROUPS {
        return Err(CompileError::TooManyRuleGroups { groups: per_port_set.len() });
    }
    Ok(per_port_set)
}

/// Compiles one direction.
pub fn compile_direction(input: &DirectionInput) -> Result<DirectionEntries, CompileError> {
    let mut entries = DirectionEntries { isolated: input.isolated, ..Default::default() };
    if !input.isolated {
        return Ok(entries);
    }
    let groups = group_rules(&input.rules)?;
    let mut cidr_sets: Vec<(CidrSet, u64)> = Vec::new();
    let mut any_protocol = 0u64;
    let mut all_ports: BTreeMap<u8, u64> = BTreeMap::new();
    let mut exact: BTreeMap<(u8, u16), u64> = BTreeMap::new();
    let mut large_ranges: BTreeMap<u8, Vec<TaggedRange>> = BTreeMap::new();
    for (index, (ports, peers, origins)) in groups.into_iter().enumerate() {
        let bit = 1u64 << index;
        entries.groups.push(origins);
        match ports {
            PortSetInput::AllProtocols => any_protocol |= bit,
            PortSetInput::Ranges(ranges) => {
                for (protocol, first, last) in ranges {
                    let size = u32::from(last) - u32::from(first) + 1;
                    if first == 0 && last == u16::MAX {
                        *all_ports.entry(protocol).or_default() |= bit;
                    } else if size <= PORT_RANGE_EXPAND_LIMIT {
                        for port in first..=last {
                            *exact.entry((protocol, port)).or_default() |= bit;
                        }
                    } else {
                        large_ranges.entry(protocol).or_default().push(((first, last), bit));
                    }
                }
            }
        }
        for peer in peers {
            match peer {
                PeerInput::AnyAddress => entries.any_peer |= bit,
                PeerInput::Identities(ids) => {
                    for id in ids {
                        *entries.identity.entry(*id).or_default() |= bit;
                    }
                }
                PeerInput::Cidr(set) => cidr_sets.push((set.clone(), bit)),
                PeerInput::Addresses(addrs) => {
                    for addr in addrs {
                        let host = Ipv6Net::new(addr_v6(*addr), 128).unwrap_or_default();
                        cidr_sets.push((CidrSet { net: host, except: vec![] }, bit));
                    }
                }
            }
        }
    }
    entries.cidr = lpm::flatten_cidrs(&cidr_sets);
    entries.wildcard[WILDCARD_EVERY_PROTOCOL] = any_protocol;
    let wildcard = |protocol: u8| all_ports.get(&protocol).copied().unwrap_or(0) | any_protocol;
    for protocol in PORT_PROTOCOLS {
        entries.wildcard[wildcard_index(protocol)] = wildcard(protocol);
    }
    // Every exact entry carries all groups admitting its port, so a hit needs no other lookup.
    for ((protocol, port), bits) in exact {
        let ranges = large_ranges.get(&protocol).map_or(0, |list| {
            list.iter().filter(|((first, last), _)| (*first..=*last).contains(&port)).fold(0, |acc, (_, bit)| acc | bit)
        });
        entries.port.insert((protocol, port), bits | wildcard(protocol) | ranges);
    }
    for (protocol, ranges) in large_ranges {
        for (prefix, bits) in lpm::flatten_port_ranges(&ranges) {
            entries.port_ranges.insert((protocol, prefix), bits);
        }
    }
    Ok(entries)
}

/// An inclusive port range and the rule-group bit it grants.
type TaggedRange = ((u16, u16), u64);

fn addr_v6(addr: IpAddr) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(lpm::addr_bytes(addr))
}

impl DirectionEntries {
    /// Groups whose peers admit the peer, as the eBPF program computes them.
    pub fn peer_bits(&self, peer_identity: u32, peer: IpAddr) -> u64 {
        let identity = self.identity.get(&peer_identity).copied().unwrap_or(0);
        let cidr = if self.cidr.is_empty() { 0 } else { lpm::lookup_cidr(&self.cidr, peer).unwrap_or(0) };
        self.any_peer | identity | cidr
    }

    /// Groups whose ports admit the destination port, as the eBPF program computes them.
    pub fn port_bits(&self, protocol: u8, port: u16) -> u64 {
        if !PORT_PROTOCOLS.contains(&protocol) {
            return self.wildcard[WILDCARD_EVERY_PROTOCOL];
        }
        if let Some(bits) = self.port.get(&(protocol, port)) {
            return *bits;
        }
        let wildcard = self.wildcard[wildcard_index(protocol)];
        let ranges: BTreeMap<PortPrefix, u64> =
            self.port_ranges.iter().filter(|((p, _), _)| *p == protocol).map(|((_, prefix), bits)| (*prefix, *bits)).collect();
        wildcard | if ranges.is_empty() { 0 } else { lpm::lookup_port(&ranges, port).unwrap_or(0) }
    }

    /// The groups `cidr` entries can grant (the program skips the trie when none of them
    /// could change its verdict).
    pub fn cidr_groups(&self) -> u64 {
        self.cidr.values().fold(0, |acc, bits| acc | bits)
    }

    /// The groups `port_ranges` entries can grant.
    pub fn range_groups(&self) -> u64 {
        self.port_ranges.values().fold(0, |acc, bits| acc | bits)
    }

    /// The rule group that admits a new (non-reply) packet of an isolated direction, as the
    /// eBPF program finds it: the lowest common bit.
    pub fn matching_group(&self, peer_identity: u32, peer: IpAddr, protocol: u8, port: u16) -> Option<u32> {
        let peers = self.peer_bits(peer_identity, peer);
        if peers == 0 {
            return None;
        }
        let both = peers & self.port_bits(protocol, port);
        (both != 0).then(|| both.trailing_zeros())
    }

    /// The verdict the eBPF program computes from these entries for a new (non-reply) packet.
    pub fn allows(&self, peer_identity: u32, peer: IpAddr, protocol: u8, port: u16) -> bool {
        !self.isolated || self.matching_group(peer_identity, peer, protocol, port).is_some()
    }

    /// Number of entries per map, for capacity checks before anything is written.
    pub fn entry_counts(&self) -> EntryCounts {
        EntryCounts {
            identity: self.identity.len(),
            cidr: self.cidr.len(),
            port: self.port.len(),
            port_range: self.port_ranges.len(),
        }
    }
}

/// Entries per policy map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryCounts {
    pub identity: usize,
    pub cidr: usize,
    pub port: usize,
    pub port_range: usize,
}

impl EntryCounts {
    pub fn add(&mut self, other: EntryCounts) {
        self.identity += other.identity;
        self.cidr += other.cidr;
        self.port += other.port;
        self.port_range += other.port_range;
    }

    pub fn sub(&mut self, other: EntryCounts) {
        self.identity = self.identity.saturating_sub(other.identity);
        self.cidr = self.cidr.saturating_sub(other.cidr);
        self.port = self.port.saturating_sub(other.port);
        self.port_range = self.port_range.saturating_sub(other.port_range);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netsieve_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    fn ranges(list: &[(u8, u16, u16)]) -> PortSetInput {
        PortSetInput::Ranges(list.iter().copied().collect())
    }

    fn origin(rule_index: usize) -> RuleOrigin {
        RuleOrigin { policy: "ns/p".into(), rule_index }
    }

    #[test]
    fn not_isolated_allows_everything_and_writes_nothing() {
        let entries = compile_direction(&DirectionInput::default()).expect("compiles");
        assert!(entries.allows(0, ip("1.2.3.4"), PROTO_TCP, 1));
        assert_eq!(entries.entry_counts(), EntryCounts::default());
    }

    #[test]
    fn isolated_without_rules_denies_everything() {
        let entries = compile_direction(&DirectionInput { isolated: true, rules: vec![] }).expect("compiles");
        assert!(!entries.allows(300, ip("10.0.0.1"), PROTO_TCP, 80));
        assert!(!entries.allows(300, ip("10.0.0.1"), PROTO_ICMP, 0));
    }

    #[test]
    fn peers_and_ports_of_different_rules_do_not_mix() {
        // Rule 1: identity 300 on TCP 80. Rule 2: 192.168.0.0/16 on UDP 53.
        let input = DirectionInput {
            isolated: true,
            rules: vec![
                RuleInput { peers: vec![PeerInput::Identities([300].into())], ports: ranges(&[(PROTO_TCP, 80, 80)]), origin: origin(0) },
                RuleInput {
                    peers: vec![PeerInput::Cidr(CidrSet {
                        net: lpm::to_mapped("192.168.0.0/16".parse().expect("cidr")),
                        except: vec![],
                    })],
                    ports: ranges(&[(PROTO_UDP, 53, 53)]),
                    origin: origin(1),
                },
            ],
        };
        let entries = compile_direction(&input).expect("compiles");
        assert!(entries.allows(300, ip("10.0.0.1"), PROTO_TCP, 80));
        assert!(!entries.allows(300, ip("10.0.0.1"), PROTO_UDP, 53));
        assert!(entries.allows(0, ip("192.168.1.1"), PROTO_UDP, 53));
        assert!(!entries.allows(0, ip("192.168.1.1"), PROTO_TCP, 80));
        // A pod inside the block with identity 300 gets both.
        assert!(entries.allows(300, ip("192.168.1.1"), PROTO_TCP, 80));
        assert!(entries.allows(300, ip("192.168.1.1"), PROTO_UDP, 53));
    }

    #[test]
    fn all_protocols_rule_admits_icmp_and_any_port() {
        let input = DirectionInput {
            isolated: true,
            rules: vec![RuleInput { peers: vec![PeerInput::Identities([7].into())], ports: PortSetInput::AllProtocols, origin: origin(0) }],
        };
        let entries = compile_direction(&input).expect("compiles");
        assert!(entries.allows(7, ip("fd00::1"), PROTO_ICMP, 0));
        assert!(entries.allows(7, ip("fd00::1"), PROTO_UDP, 65535));
        assert!(!entries.allows(8, ip("fd00::1"), PROTO_UDP, 65535));
    }

    #[test]
    fn too_many_port_sets_is_an_error_not_a_truncation() {
        let rules = (0..=MAX_RULE_GROUPS as u16)
            .map(|port| RuleInput { peers: vec![PeerInput::AnyAddress], ports: ranges(&[(PROTO_TCP, port, port)]), origin: origin(port as usize) })
            .collect();
        let err = compile_direction(&DirectionInput { isolated: true, rules }).expect_err("too many groups");
        assert_eq!(err, CompileError::TooManyRuleGroups { groups: MAX_RULE_GROUPS + 1 });
    }

    #[test]
    fn each_rule_is_its_own_group_and_the_first_matching_rule_wins() {
        let rule = |index: usize, id: u32, port: u16| RuleInput {
            peers: vec![PeerInput::Identities([id].into())],
            ports: ranges(&[(PROTO_TCP, port, port)]),
            origin: origin(index),
        };
        // Rules 0 and 2 share a port set but stay distinct groups; both admit identity 5.
        let input = DirectionInput { isolated: true, rules: vec![rule(0, 5, 80), rule(1, 6, 81), rule(2, 5, 80)] };
        let entries = compile_direction(&input).expect("compiles");
        assert_eq!(entries.groups, vec![vec![origin(0)], vec![origin(1)], vec![origin(2)]]);
        assert_eq!(entries.matching_group(5, ip("10.0.0.1"), PROTO_TCP, 80), Some(0));
        assert_eq!(entries.matching_group(6, ip("10.0.0.1"), PROTO_TCP, 81), Some(1));
        assert_eq!(entries.matching_group(6, ip("10.0.0.1"), PROTO_TCP, 80), None);
    }

    #[test]
    fn more_rules_than_groups_merge_by_port_set() {
        let rules: Vec<RuleInput> = (0..100)
            .map(|index| RuleInput {
                peers: vec![PeerInput::Identities([index as u32].into())],
                ports: ranges(&[(PROTO_TCP, 1000 + (index % 10) as u16, 1000 + (index % 10) as u16)]),
                origin: origin(index),
            })
            .collect();
        let entries = compile_direction(&DirectionInput { isolated: true, rules }).expect("compiles");
        assert_eq!(entries.groups.len(), 10);
        assert_eq!(entries.groups[3].len(), 10);
        for index in 0..100u32 {
            let port = 1000 + (index % 10) as u16;
            assert!(entries.allows(index, ip("10.0.0.1"), PROTO_TCP, port), "rule {index}");
            assert!(!entries.allows(index, ip("10.0.0.1"), PROTO_TCP, port + 1), "rule {index} on another port");
        }
    }

    #[test]
    fn small_ranges_expand_large_ranges_use_prefixes_and_wildcards_fill_the_rest() {
        let input = DirectionInput {
            isolated: true,
            rules: vec![
                RuleInput { peers: vec![PeerInput::AnyAddress], ports: ranges(&[(PROTO_TCP, 8000, 8010)]), origin: origin(0) },
                RuleInput { peers: vec![PeerInput::AnyAddress], ports: ranges(&[(PROTO_TCP, 30000, 32767)]), origin: origin(1) },
                RuleInput { peers: vec![PeerInput::AnyAddress], ports: ranges(&[(PROTO_UDP, 0, u16::MAX)]), origin: origin(2) },
                RuleInput { peers: vec![PeerInput::Identities([9].into())], ports: PortSetInput::AllProtocols, origin: origin(3) },
            ],
        };
        let entries = compile_direction(&input).expect("compiles");
        assert!(entries.port.contains_key(&(PROTO_TCP, 8005)));
        assert!(!entries.port.contains_key(&(PROTO_TCP, 31000)));
        assert!(!entries.port_ranges.is_empty());
        assert_eq!(entries.any_peer, 0b111);
        let any = ip("192.0.2.1");
        for (protocol, port, identity, expected) in [
            (PROTO_TCP, 8000, 0, Some(0)),
            (PROTO_TCP, 8011, 0, None),
            (PROTO_TCP, 8011, 9, Some(3)),
            (PROTO_TCP, 31000, 0, Some(1)),
            (PROTO_TCP, 29999, 0, None),
            (PROTO_UDP, 0, 0, Some(2)),
            (PROTO_UDP, 65535, 0, Some(2)),
            (PROTO_ICMP, 0, 0, None),
            (PROTO_ICMP, 0, 9, Some(3)),
        ] {
            assert_eq!(entries.matching_group(identity, any, protocol, port), expected, "{protocol}/{port} id {identity}");
        }
    }
}
