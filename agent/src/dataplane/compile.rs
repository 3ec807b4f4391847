//! Policy -> map-entry compiler for one endpoint direction, pure and kernel-free.
//!
//! Input is a list of rules already resolved against the cluster (selectors turned into peer
//! identities or addresses, named ports into numbers); output is the exact content of the three
//! per-endpoint policy maps for that direction. [`DirectionEntries::allows`] evaluates those
//! entries the way the eBPF program does, so the compiler can be checked against the semantics
//! module without a kernel, and the kernel against both.
use super::lpm::{self, CidrSet, PortPrefix};
use ipnet::Ipv6Net;
use netsieve_common::{MAX_RULE_GROUPS, PROTO_ANY};
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

/// One rule: any of `peers` on any of `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInput {
    pub peers: Vec<PeerInput>,
    pub ports: PortSetInput,
}

/// Everything that decides one direction of one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectionInput {
    /// Some policy selecting the pod covers this direction.
    pub isolated: bool,
    pub rules: Vec<RuleInput>,
}

/// Map contents for one endpoint direction. Keys here are without the endpoint id and
/// direction, which the kernel-facing sync adds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectionEntries {
    pub isolated: bool,
    pub identity: BTreeMap<u32, u64>,
    pub cidr: BTreeMap<Ipv6Net, u64>,
    /// Keyed by (protocol, port prefix); `PROTO_ANY` entries use the zero-length prefix.
    pub port: BTreeMap<(u8, PortPrefix), u64>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("{groups} distinct port sets in one direction; at most {MAX_RULE_GROUPS} fit the rule mask")]
    TooManyRuleGroups { groups: usize },
}

/// Compiles one direction. Rules that share a port set share a rule group, so the group count
/// is the number of distinct port sets, which is what bounds [`MAX_RULE_GROUPS`].
pub fn compile_direction(input: &DirectionInput) -> Result<DirectionEntries, CompileError> {
    let mut entries = DirectionEntries { isolated: input.isolated, ..Default::default() };
    if !input.isolated {
        return Ok(entries);
    }
    let mut groups: BTreeMap<&PortSetInput, Vec<&PeerInput>> = BTreeMap::new();
    for rule in &input.rules {
        groups.entry(&rule.ports).or_default().extend(rule.peers.iter());
    }
    if groups.len() > MAX_RULE_GROUPS {
        return Err(CompileError::TooManyRuleGroups { groups: groups.len() });
    }
    let mut cidr_sets: Vec<(CidrSet, u64)> = Vec::new();
    let mut port_ranges: BTreeMap<u8, Vec<TaggedRange>> = BTreeMap::new();
    let mut any_protocol_bits = 0u64;
    for (index, (ports, peers)) in groups.into_iter().enumerate() {
        let bit = 1u64 << index;
        match ports {
            PortSetInput::AllProtocols => any_protocol_bits |= bit,
            PortSetInput::Ranges(ranges) => {
                for (protocol, first, last) in ranges {
                    port_ranges.entry(*protocol).or_default().push(((*first, *last), bit));
                }
            }
        }
        for peer in peers {
            match peer {
                PeerInput::AnyAddress => cidr_sets.push((CidrSet { net: Ipv6Net::default(), except: vec![] }, bit)),
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
    if any_protocol_bits != 0 {
        entries.port.insert((PROTO_ANY, PortPrefix { port: 0, len: 0 }), any_protocol_bits);
    }
    for (protocol, ranges) in port_ranges {
        for (prefix, bits) in lpm::flatten_port_ranges(&ranges) {
            entries.port.insert((protocol, prefix), bits);
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
    /// The verdict the eBPF program computes from these entries for a new (non-reply) packet.
    pub fn allows(&self, peer_identity: u32, peer: IpAddr, protocol: u8, port: u16) -> bool {
        if !self.isolated {
            return true;
        }
        let identity_bits = self.identity.get(&peer_identity).copied().unwrap_or(0);
        let cidr_bits = lpm::lookup_cidr(&self.cidr, peer).unwrap_or(0);
        let protocol_entries: BTreeMap<PortPrefix, u64> = self
            .port
            .iter()
            .filter(|((p, _), _)| *p == protocol && protocol != PROTO_ANY)
            .map(|((_, prefix), bits)| (*prefix, *bits))
            .collect();
        let port_bits = lpm::lookup_port(&protocol_entries, port).unwrap_or(0)
            | self.port.get(&(PROTO_ANY, PortPrefix { port: 0, len: 0 })).copied().unwrap_or(0);
        (identity_bits | cidr_bits) & port_bits != 0
    }

    /// Number of entries per map, for capacity checks before anything is written.
    pub fn entry_counts(&self) -> (usize, usize, usize) {
        (self.identity.len(), self.cidr.len(), self.port.len())
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

    #[test]
    fn not_isolated_allows_everything_and_writes_nothing() {
        let entries = compile_direction(&DirectionInput::default()).expect("compiles");
        assert!(entries.allows(0, ip("1.2.3.4"), PROTO_TCP, 1));
        assert_eq!(entries.entry_counts(), (0, 0, 0));
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
                RuleInput { peers: vec![PeerInput::Identities([300].into())], ports: ranges(&[(PROTO_TCP, 80, 80)]) },
                RuleInput {
                    peers: vec![PeerInput::Cidr(CidrSet {
                        net: lpm::to_mapped("192.168.0.0/16".parse().expect("cidr")),
                        except: vec![],
                    })],
                    ports: ranges(&[(PROTO_UDP, 53, 53)]),
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
            rules: vec![RuleInput { peers: vec![PeerInput::Identities([7].into())], ports: PortSetInput::AllProtocols }],
        };
        let entries = compile_direction(&input).expect("compiles");
        assert!(entries.allows(7, ip("fd00::1"), PROTO_ICMP, 0));
        assert!(entries.allows(7, ip("fd00::1"), PROTO_UDP, 65535));
        assert!(!entries.allows(8, ip("fd00::1"), PROTO_UDP, 65535));
    }

    #[test]
    fn too_many_port_sets_is_an_error_not_a_truncation() {
        let rules = (0..=MAX_RULE_GROUPS as u16)
            .map(|port| RuleInput { peers: vec![PeerInput::AnyAddress], ports: ranges(&[(PROTO_TCP, port, port)]) })
            .collect();
        let err = compile_direction(&DirectionInput { isolated: true, rules }).expect_err("too many groups");
        assert_eq!(err, CompileError::TooManyRuleGroups { groups: MAX_RULE_GROUPS + 1 });
    }
}
