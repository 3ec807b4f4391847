//! Counters that stay monotonic across reprogrammings.
//!
//! The kernel counts packets per endpoint slot (`ENDPOINT_STATS`) and per rule counter
//! (`RULE_STATS`). A reprogrammed endpoint moves to a fresh slot and fresh rule counters, and
//! the old ones are zeroed when they are reused. So the agent adds the final counts of every
//! retired programming to what it carries for the pod (and for each (pod, rule)), and exports
//! carried + live. The final counts are read right after the step that retired the
//! programming, or, when that same step already reused and zeroed a counter, taken from what
//! the maps read just before zeroing it (`KernelMaps::take_counter_residue`).
//!
//! Per rule, the node's total is the sum over its pods plus what pods that left (or that a
//! policy change no longer selects) counted, kept for as long as some local pod still has the
//! rule: a rule's counter only restarts when the rule disappears from the node.
use super::book::{EndpointBook, Programming};
use crate::dataplane::compile::RuleOrigin;
use netsieve_common::{EndpointStats, RuleStats};
use std::collections::{BTreeMap, BTreeSet};

/// A NetworkPolicy rule: (`namespace/name`, direction number, index in the policy).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey {
    pub policy: String,
    pub direction: u8,
    pub index: usize,
}

impl RuleKey {
    fn of(origin: &RuleOrigin, direction: u8) -> RuleKey {
        RuleKey { policy: origin.policy.clone(), direction, index: origin.rule_index }
    }
}

/// A rule's counts and whether its counter is shared with other rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCount {
    pub stats: RuleStats,
    pub shared: bool,
}

/// Carried counts.
#[derive(Debug, Default)]
pub struct CounterLedger {
    /// Per pod: the final counts of its retired programmings.
    endpoints: BTreeMap<String, EndpointStats>,
    /// Per (pod, rule): the final counts of its retired programmings.
    rules: BTreeMap<(String, RuleKey), RuleStats>,
    /// Per rule: counts of pods that no longer have it.
    departed: BTreeMap<RuleKey, RuleStats>,
}

impl CounterLedger {
    /// Adds the final counts of a retired programming: its endpoint slot's, and each rule
    /// counter's (`rule_stats` by `RULE_STATS` index).
    pub fn retire(&mut self, retired: &Programming, endpoint: &EndpointStats, rule_stats: impl Fn(u32) -> RuleStats) {
        self.endpoints.entry(retired.endpoint.clone()).or_default().add(endpoint);
        for (index, direction, origins) in retired.rule_counters() {
            let stats = rule_stats(index);
            if stats == RuleStats::default() {
                continue;
            }
            for origin in unique(origins) {
                let key = (retired.endpoint.clone(), RuleKey::of(origin, direction));
                self.rules.entry(key).or_default().add(&stats);
            }
        }
    }

    /// Forgets what belongs to nothing live: the carried counts of pods that left (their
    /// series go, as their pods did); a pod's counts of a rule it no longer has move to the
    /// rule's node total, which is dropped once no local pod has the rule.
    pub fn prune(&mut self, book: &EndpointBook) {
        let live_rules: BTreeSet<(String, RuleKey)> = book
            .current()
            .flat_map(|p| {
                p.rule_counters()
                    .flat_map(move |(_, direction, origins)| origins.iter().map(move |o| (p.endpoint.clone(), RuleKey::of(o, direction))))
            })
            .collect();
        self.endpoints.retain(|pod, _| book.get(pod).is_some());
        let gone: Vec<(String, RuleKey)> = self.rules.keys().filter(|k| !live_rules.contains(*k)).cloned().collect();
        for key in gone {
            if let Some(stats) = self.rules.remove(&key) {
                self.departed.entry(key.1).or_default().add(&stats);
            }
        }
        let node_rules: BTreeSet<&RuleKey> = live_rules.iter().map(|(_, rule)| rule).collect();
        self.departed.retain(|rule, _| node_rules.contains(rule));
    }

    /// A pod's counts: carried plus its live slot's.
    pub fn endpoint_total(&self, pod: &str, live: &EndpointStats) -> EndpointStats {
        let mut total = *live;
        if let Some(carried) = self.endpoints.get(pod) {
            total.add(carried);
        }
        total
    }

    /// A programming's rules with carried plus live counts (`rule_stats` by index), in rule
    /// order. A group standing for several rules counts for each of them (`shared`).
    pub fn endpoint_rules(&self, programming: &Programming, rule_stats: &impl Fn(u32) -> RuleStats) -> BTreeMap<RuleKey, RuleCount> {
        let mut out: BTreeMap<RuleKey, RuleCount> = BTreeMap::new();
        for (index, direction, origins) in programming.rule_counters() {
            let stats = rule_stats(index);
            let origins = unique(origins);
            let shared = origins.len() > 1;
            for origin in origins {
                let count = out.entry(RuleKey::of(origin, direction)).or_default();
                count.stats.add(&stats);
                count.shared |= shared;
            }
        }
        for (key, count) in out.iter_mut() {
            if let Some(carried) = self.rules.get(&(programming.endpoint.clone(), key.clone())) {
                count.stats.add(carried);
            }
        }
        out
    }

    /// Every rule of the node's pods with its node total: the pods' counts plus what departed
    /// pods counted.
    pub fn node_rules(&self, book: &EndpointBook, rule_stats: &impl Fn(u32) -> RuleStats) -> BTreeMap<RuleKey, RuleCount> {
        let mut out: BTreeMap<RuleKey, RuleCount> = BTreeMap::new();
        for programming in book.current() {
            for (key, count) in self.endpoint_rules(programming, rule_stats) {
                let total = out.entry(key).or_default();
                total.stats.add(&count.stats);
                total.shared |= count.shared;
            }
        }
        for (key, total) in out.iter_mut() {
            if let Some(departed) = self.departed.get(key) {
                total.stats.add(departed);
            }
        }
        out
    }
}

/// The distinct rules of a group (a rule split over several groups, e.g. an egress named
/// port, appears once per group, not twice in one).
fn unique(origins: &[RuleOrigin]) -> Vec<&RuleOrigin> {
    let mut seen: Vec<&RuleOrigin> = Vec::new();
    for origin in origins {
        if !seen.contains(&origin) {
            seen.push(origin);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::sync::LiveEndpoint;
    use crate::observe::book::tests::{live, notes, origin};
    use std::collections::HashMap;
    use std::time::SystemTime;

    /// RULE_STATS as a model: index -> packets.
    fn reader(counts: &HashMap<u32, u64>) -> impl Fn(u32) -> RuleStats + '_ {
        move |index| RuleStats { packets: counts.get(&index).copied().unwrap_or(0), bytes: 0 }
    }

    fn key(policy: &str, index: usize) -> RuleKey {
        RuleKey { policy: policy.into(), direction: 0, index }
    }

    #[test]
    fn counts_survive_reprogramming_and_departure_and_stay_monotonic() {
        let mut book = EndpointBook::default();
        let mut ledger = CounterLedger::default();
        let mut kernel: HashMap<u32, u64> = HashMap::new();
        // Pod a (slot 1, rule counters 10, 11) and pod b (slot 2, counter 20) both have rule
        // p/0; a also has p/1, which never matches.
        let a1 = live(1, 100, 7, vec![vec![origin("ns/p", 0)], vec![origin("ns/p", 1)]]);
        let b1 = live(2, 200, 8, vec![vec![origin("ns/p", 0)]]);
        book.update([("ns/a", &a1), ("ns/b", &b1)].into_iter(), notes, SystemTime::UNIX_EPOCH);
        kernel.insert(10, 5);
        kernel.insert(20, 3);
        let totals = ledger.node_rules(&book, &reader(&kernel));
        assert_eq!(totals[&key("ns/p", 0)].stats.packets, 8);
        assert_eq!(totals[&key("ns/p", 1)].stats.packets, 0, "a rule that never matched is listed at 0");

        // a is reprogrammed to slot 3 with counters 30, 31; b to slot 4 with its counter at
        // index 10, a's old one: reused in the same step and zeroed, the maps having read 5
        // just before. b's old counter 20 still holds 3 when read after the step.
        let a2 = live(3, 101, 7, vec![vec![origin("ns/p", 0)], vec![origin("ns/p", 1)]]);
        let b2 = LiveEndpoint { rule_bases: [10, netsieve_common::NO_RULE], ..live(4, 201, 8, vec![vec![origin("ns/p", 0)]]) };
        let residue: HashMap<u32, u64> = HashMap::from([(10, 5)]);
        kernel.insert(10, 0);
        let retired = book.update([("ns/a", &a2), ("ns/b", &b2)].into_iter(), notes, SystemTime::UNIX_EPOCH);
        assert_eq!(retired.len(), 2);
        for programming in &retired {
            // Residue first (zeroed in this step), else the counter as it stands.
            let read = |index: u32| RuleStats { packets: residue.get(&index).or(kernel.get(&index)).copied().unwrap_or(0), bytes: 0 };
            ledger.retire(programming, &EndpointStats::default(), read);
        }
        ledger.prune(&book);
        let totals = ledger.node_rules(&book, &reader(&kernel));
        assert_eq!(totals[&key("ns/p", 0)].stats.packets, 8, "nothing lost in the reprogramming");
        kernel.insert(30, 2);
        kernel.insert(10, 1);
        let totals = ledger.node_rules(&book, &reader(&kernel));
        assert_eq!(totals[&key("ns/p", 0)].stats.packets, 11);
        let per_pod = ledger.endpoint_rules(book.get("ns/a").expect("a"), &reader(&kernel));
        assert_eq!(per_pod[&key("ns/p", 0)].stats.packets, 7, "a: 5 carried + 2 live");

        // a leaves the node: its counts stay in the node total while b still has the rule.
        let retired = book.update([("ns/b", &b2)].into_iter(), notes, SystemTime::UNIX_EPOCH);
        for programming in &retired {
            ledger.retire(programming, &EndpointStats::default(), reader(&kernel));
        }
        ledger.prune(&book);
        kernel.remove(&30);
        let totals = ledger.node_rules(&book, &reader(&kernel));
        assert_eq!(totals[&key("ns/p", 0)].stats.packets, 11, "monotonic after a pod left");
        assert!(!totals.contains_key(&key("ns/p", 1)), "no pod has rule p/1 any more");

        // b leaves too: the rule is gone from the node, and so are its carried counts.
        let retired = book.update(std::iter::empty(), notes, SystemTime::UNIX_EPOCH);
        for programming in &retired {
            ledger.retire(programming, &EndpointStats::default(), reader(&kernel));
        }
        ledger.prune(&book);
        assert!(ledger.rules.is_empty() && ledger.departed.is_empty() && ledger.endpoints.is_empty());
    }

    #[test]
    fn endpoint_counts_are_carried_per_pod() {
        let mut book = EndpointBook::default();
        let mut ledger = CounterLedger::default();
        let a1 = live(1, 100, 7, vec![]);
        book.update([("ns/a", &a1)].into_iter(), notes, SystemTime::UNIX_EPOCH);
        let a2 = live(2, 101, 7, vec![]);
        let old = EndpointStats { denied_packets: [4, 1], audit_packets: [2, 0], ..Default::default() };
        for programming in book.update([("ns/a", &a2)].into_iter(), notes, SystemTime::UNIX_EPOCH) {
            ledger.retire(&programming, &old, |_| RuleStats::default());
        }
        ledger.prune(&book);
        let live_now = EndpointStats { denied_packets: [1, 0], ..Default::default() };
        let total = ledger.endpoint_total("ns/a", &live_now);
        assert_eq!(total.denied_packets, [5, 1]);
        assert_eq!(total.audit_packets, [2, 0]);
    }

    #[test]
    fn a_shared_group_counts_for_each_of_its_rules() {
        let mut book = EndpointBook::default();
        let ledger = CounterLedger::default();
        let a = live(1, 100, 7, vec![vec![origin("ns/p", 0), origin("ns/q", 2)], vec![origin("ns/p", 0)]]);
        book.update([("ns/a", &a)].into_iter(), notes, SystemTime::UNIX_EPOCH);
        let kernel = HashMap::from([(10, 4), (11, 1)]);
        let rules = ledger.endpoint_rules(book.get("ns/a").expect("a"), &reader(&kernel));
        assert_eq!(rules[&key("ns/p", 0)], RuleCount { stats: RuleStats { packets: 5, bytes: 0 }, shared: true });
        assert_eq!(rules[&key("ns/q", 2)], RuleCount { stats: RuleStats { packets: 4, bytes: 0 }, shared: true });
    }
}
