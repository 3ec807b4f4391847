//! The endpoint programmings the synchronizer wrote: the current one of each local pod and
//! the last [`RETIRED_KEPT`] it replaced. The kernel reports endpoints by slot and revision
//! and rules by `RULE_STATS` index, all reused after a reprogramming; an event read just after
//! one, or a counter read before its slot is reused, still names the right pod and rule.
use crate::dataplane::compile::RuleOrigin;
use crate::dataplane::sync::LiveEndpoint;
use crate::node_api::observe::{EndpointMode, EventDirection, RuleRef};
use netsieve_common::{DIRECTION_EGRESS, DIRECTION_INGRESS, NO_RULE};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::SystemTime;

/// Retired programmings remembered for late events.
pub const RETIRED_KEPT: usize = 256;

/// One programming of a local endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Programming {
    /// `namespace/name` of the pod.
    pub endpoint: String,
    pub slot: u32,
    pub revision: u32,
    pub ifindex: u32,
    pub identity: u32,
    /// Per direction (ingress, egress): `RULE_STATS` index of group 0, [`NO_RULE`] if none.
    pub rule_bases: [u32; 2],
    /// Per direction: the rules each rule group stands for.
    pub groups: [Vec<Vec<RuleOrigin>>; 2],
    pub isolated: [bool; 2],
    pub audit: bool,
    pub mode: EndpointMode,
    pub fail_closed_reason: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub programmed_at: SystemTime,
}

/// What the agent knows of an endpoint beyond the synchronizer's record.
pub struct EndpointNotes {
    pub mode: EndpointMode,
    pub fail_closed_reason: Option<String>,
}

pub fn direction_of(direction: u8) -> EventDirection {
    if direction == DIRECTION_EGRESS { EventDirection::Egress } else { EventDirection::Ingress }
}

impl Programming {
    pub fn from_live(name: &str, live: &LiveEndpoint, notes: EndpointNotes, at: SystemTime) -> Programming {
        let program = &live.program;
        Programming {
            endpoint: name.to_string(),
            slot: live.slot,
            revision: live.revision,
            ifindex: program.ifindex,
            identity: program.identity,
            rule_bases: live.rule_bases,
            groups: [program.ingress.groups.clone(), program.egress.groups.clone()],
            isolated: [program.ingress.isolated, program.egress.isolated],
            audit: program.audit,
            mode: notes.mode,
            fail_closed_reason: notes.fail_closed_reason,
            addresses: program.ipv4.map(IpAddr::V4).into_iter().chain(program.ipv6.map(IpAddr::V6)).collect(),
            programmed_at: at,
        }
    }

    /// Every rule counter of the programming: (`RULE_STATS` index, direction, rules of the
    /// group).
    pub fn rule_counters(&self) -> impl Iterator<Item = (u32, u8, &[RuleOrigin])> + '_ {
        [DIRECTION_INGRESS, DIRECTION_EGRESS].into_iter().flat_map(move |direction| {
            let base = self.rule_bases[usize::from(direction)];
            self.groups[usize::from(direction)]
                .iter()
                .enumerate()
                .filter(move |_| base != NO_RULE)
                .map(move |(group, origins)| (base + group as u32, direction, origins.as_slice()))
        })
    }

    /// The rules of the group a `RULE_STATS` index counts, in `direction`.
    pub fn rules_at(&self, direction: u8, index: u32) -> Option<&[RuleOrigin]> {
        let d = usize::from(direction & 1);
        let base = self.rule_bases[d];
        if base == NO_RULE || index < base {
            return None;
        }
        self.groups[d].get((index - base) as usize).map(Vec::as_slice)
    }

    /// The rules of a group as wire references (`shared` when the group stands for several).
    pub fn rule_refs(origins: &[RuleOrigin], direction: u8) -> Vec<RuleRef> {
        let shared = origins.len() > 1;
        origins
            .iter()
            .map(|o| RuleRef { policy: o.policy.clone(), direction: direction_of(direction), index: o.rule_index, shared })
            .collect()
    }

    pub fn namespace_and_pod(&self) -> (&str, &str) {
        self.endpoint.split_once('/').unwrap_or(("", &self.endpoint))
    }
}

/// The programmings of the node's endpoints.
#[derive(Debug, Default)]
pub struct EndpointBook {
    current: BTreeMap<String, Programming>,
    by_slot: HashMap<u32, String>,
    by_ifindex: HashMap<u32, String>,
    retired: VecDeque<Programming>,
}

impl EndpointBook {
    /// Brings the book to the synchronizer's live endpoints; returns the programmings that
    /// were replaced or removed since the last call. `notes` describes a programming seen for
    /// the first time.
    pub fn update<'a>(
        &mut self,
        live: impl Iterator<Item = (&'a str, &'a LiveEndpoint)>,
        notes: impl Fn(&str, &LiveEndpoint) -> EndpointNotes,
        at: SystemTime,
    ) -> Vec<Programming> {
        let mut retired = Vec::new();
        let mut seen: BTreeMap<String, Programming> = BTreeMap::new();
        for (name, endpoint) in live {
            let programming = match self.current.remove(name) {
                Some(known) if known.slot == endpoint.slot && known.revision == endpoint.revision => known,
                previous => {
                    retired.extend(previous);
                    Programming::from_live(name, endpoint, notes(name, endpoint), at)
                }
            };
            seen.insert(name.to_string(), programming);
        }
        retired.extend(std::mem::take(&mut self.current).into_values());
        self.current = seen;
        self.by_slot = self.current.values().map(|p| (p.slot, p.endpoint.clone())).collect();
        self.by_ifindex = self.current.values().map(|p| (p.ifindex, p.endpoint.clone())).collect();
        for old in &retired {
            if self.retired.len() == RETIRED_KEPT {
                self.retired.pop_front();
            }
            self.retired.push_back(old.clone());
        }
        retired
    }

    /// The programming an event names by slot and revision: the current one, else a recently
    /// retired one.
    pub fn find(&self, slot: u32, revision: u32) -> Option<&Programming> {
        let current = self.by_slot.get(&slot).and_then(|name| self.current.get(name));
        if let Some(p) = current.filter(|p| p.revision == revision) {
            return Some(p);
        }
        self.retired.iter().rev().find(|p| p.slot == slot && p.revision == revision)
    }

    /// The current programming on an interface.
    pub fn on_interface(&self, ifindex: u32) -> Option<&Programming> {
        self.by_ifindex.get(&ifindex).and_then(|name| self.current.get(name))
    }

    pub fn get(&self, endpoint: &str) -> Option<&Programming> {
        self.current.get(endpoint)
    }

    pub fn current(&self) -> impl Iterator<Item = &Programming> {
        self.current.values()
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dataplane::compile::DirectionEntries;
    use crate::dataplane::sync::EndpointProgram;

    pub(crate) fn origin(policy: &str, rule_index: usize) -> RuleOrigin {
        RuleOrigin { policy: policy.into(), rule_index }
    }

    pub(crate) fn live(slot: u32, revision: u32, ifindex: u32, ingress_groups: Vec<Vec<RuleOrigin>>) -> LiveEndpoint {
        let ingress = DirectionEntries { isolated: true, groups: ingress_groups, ..Default::default() };
        LiveEndpoint {
            slot,
            revision,
            rule_bases: [slot * 10, NO_RULE],
            program: EndpointProgram { ifindex, identity: 300, ingress, ..Default::default() },
        }
    }

    pub(crate) fn notes(_: &str, _: &LiveEndpoint) -> EndpointNotes {
        EndpointNotes { mode: EndpointMode::Policy, fail_closed_reason: None }
    }

    #[test]
    fn reprogrammings_retire_the_old_and_late_events_still_resolve() {
        let mut book = EndpointBook::default();
        let a1 = live(1, 100, 7, vec![vec![origin("ns/p", 0)], vec![origin("ns/p", 1)]]);
        let b = live(2, 200, 8, vec![]);
        let retired = book.update([("ns/a", &a1), ("ns/b", &b)].into_iter(), notes, SystemTime::UNIX_EPOCH);
        assert!(retired.is_empty());
        assert_eq!(book.find(1, 100).map(|p| p.endpoint.as_str()), Some("ns/a"));
        assert_eq!(book.on_interface(8).map(|p| p.endpoint.as_str()), Some("ns/b"));
        // The rule counter of group 1 is base 10 + 1.
        assert_eq!(book.get("ns/a").and_then(|p| p.rules_at(DIRECTION_INGRESS, 11)), Some(&[origin("ns/p", 1)][..]));
        assert_eq!(book.get("ns/a").and_then(|p| p.rules_at(DIRECTION_EGRESS, 11)), None);
        let counters: Vec<u32> = book.get("ns/a").map(|p| p.rule_counters().map(|(i, _, _)| i).collect()).unwrap_or_default();
        assert_eq!(counters, [10, 11]);

        // a is reprogrammed (new slot and revision), b removed.
        let a2 = live(3, 101, 7, vec![]);
        let retired = book.update([("ns/a", &a2)].into_iter(), notes, SystemTime::UNIX_EPOCH);
        let names: Vec<(&str, u32)> = retired.iter().map(|p| (p.endpoint.as_str(), p.revision)).collect();
        assert_eq!(names, [("ns/a", 100), ("ns/b", 200)]);
        assert_eq!(book.find(1, 100).map(|p| p.revision), Some(100), "a late event of the old programming");
        assert_eq!(book.find(3, 101).map(|p| p.revision), Some(101));
        assert_eq!(book.find(3, 100), None, "a slot with another revision is not the same programming");
        assert_eq!(book.on_interface(8), None);
        // Unchanged endpoints are not retired again.
        assert!(book.update([("ns/a", &a2)].into_iter(), notes, SystemTime::UNIX_EPOCH).is_empty());
    }

    #[test]
    fn only_the_last_retired_programmings_are_kept() {
        let mut book = EndpointBook::default();
        for revision in 0..(RETIRED_KEPT as u32 + 10) {
            let endpoint = live(revision, revision, 7, vec![]);
            book.update([("ns/a", &endpoint)].into_iter(), notes, SystemTime::UNIX_EPOCH);
        }
        assert_eq!(book.retired.len(), RETIRED_KEPT);
        assert!(book.find(0, 0).is_none());
        assert!(book.find(20, 20).is_some());
    }
}
