//! What the agent loop reads from the kernel and its own state, and the collector that
//! encodes the last reading at scrape time (see the parent module for why).
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// Per-endpoint packet and byte counters, by direction (0 ingress, 1 egress): the kernel's
/// per-slot counters summed over CPUs and carried over reprogrammings.
pub type EndpointCounters = netsieve_common::EndpointStats;

/// Packets admitted by one NetworkPolicy rule on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSeries {
    /// The policy's namespace and name.
    pub namespace: String,
    pub policy: String,
    pub direction: &'static str,
    /// The rule's index in the policy's `ingress` or `egress` list.
    pub rule: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The verdict event path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventPathSnapshot {
    pub emitted: u64,
    pub rate_limited: u64,
    pub ring_full: u64,
    pub read: u64,
    pub dropped_agent_busy: u64,
    pub dropped_slow_subscribers: u64,
    pub subscribers: u64,
}

/// Where audit mode applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditSnapshot {
    /// Node-wide or for some namespace.
    pub active: bool,
    /// Namespaces annotated for audit mode.
    pub namespaces: Vec<String>,
    /// Local endpoints in audit mode.
    pub endpoints: usize,
}

/// What the agent loop reads from the kernel and its own state.
#[derive(Clone, Debug, Default)]
pub struct DataplaneSnapshot {
    /// (reason, direction, packets).
    pub drops: Vec<(&'static str, &'static str, u64)>,
    /// Would-be drops passed by audit mode: (reason, direction, packets).
    pub audits: Vec<(&'static str, &'static str, u64)>,
    /// By `namespace/pod`.
    pub endpoints: BTreeMap<String, EndpointCounters>,
    /// Every rule of the node's pods (at 0: never matched).
    pub rules: Vec<RuleSeries>,
    pub events: EventPathSnapshot,
    pub audit: AuditSnapshot,
    /// map name -> (entries, capacity).
    pub maps: BTreeMap<&'static str, (usize, usize)>,
    pub endpoint_count: usize,
    pub endpoints_failed_closed: usize,
    pub pods_waiting_for_interface: usize,
    pub policy_count: usize,
    pub invalid_policy_count: usize,
    pub identity_count: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    direction: &'static str,
    reason: &'static str,
}

/// namespace, pod, direction, verdict: pairs rather than a derived struct because the pod's
/// names are borrowed from the snapshot (the derive takes no lifetime parameters).
type EndpointLabels<'a> = [(&'static str, &'a str); 4];

/// namespace, policy, direction, rule.
type RuleLabels<'a> = [(&'static str, &'a str); 4];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// Holds the last published snapshot. Publishing swaps an `Arc`; a scrape clones it and
/// encodes without holding the lock, so neither side waits on the other's work.
#[derive(Clone, Debug, Default)]
pub(super) struct DataplaneCollector {
    latest: Arc<Mutex<Arc<DataplaneSnapshot>>>,
}

impl DataplaneCollector {
    pub(super) fn publish(&self, snapshot: DataplaneSnapshot) {
        // Replacing an Arc cannot leave it half-written, so a poisoned lock is used as is.
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }

    fn latest(&self) -> Arc<DataplaneSnapshot> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = self.latest();
        let e = &mut encoder;
        counter_family(
            e,
            "netsieve_drops",
            "Packets dropped by the eBPF programs on this node.",
            s.drops.iter().map(|&(reason, direction, packets)| (DropLabels { direction, reason }, packets)),
        )?;
        counter_family(
            e,
            "netsieve_audit",
            "Packets policy would have dropped that passed because their pod is in audit mode.",
            s.audits.iter().map(|&(reason, direction, packets)| (DropLabels { direction, reason }, packets)),
        )?;
        counter_family(
            e,
            "netsieve_endpoint_packets",
            "Packets judged per local endpoint (verdict audit: would-be drops passed by audit mode).",
            endpoint_series(&s.endpoints, |c, d| (c.allowed_packets[d], c.denied_packets[d], c.audit_packets[d])),
        )?;
        counter_family(
            e,
            "netsieve_endpoint_bytes",
            "Bytes judged per local endpoint.",
            endpoint_series(&s.endpoints, |c, d| (c.allowed_bytes[d], c.denied_bytes[d], c.audit_bytes[d])),
        )?;
        counter_family(
            e,
            "netsieve_rule_packets",
            "Packets admitted by each NetworkPolicy rule of this node's pods (0: the rule never matched).",
            rule_series(&s.rules, |r| r.packets),
        )?;
        counter_family(e, "netsieve_rule_bytes", "Bytes admitted by each NetworkPolicy rule of this node's pods.", rule_series(&s.rules, |r| r.bytes))?;
        gauge(
            e,
            "netsieve_rules_unmatched",
            "NetworkPolicy rules of this node's pods that never admitted a packet.",
            s.rules.iter().filter(|r| r.packets == 0).count(),
        )?;
        gauge(
            e,
            "netsieve_audit_mode",
            "1 when audit mode applies on this node (node-wide or for annotated namespaces): drops of their pods are not enforced.",
            usize::from(s.audit.active),
        )?;
        gauge(e, "netsieve_audit_endpoints", "Local pods in audit mode.", s.audit.endpoints)?;
        gauge_family(
            e,
            "netsieve_audit_namespace",
            "Namespaces annotated netsieve.io/audit=true (their pods run in audit mode).",
            s.audit.namespaces.iter().map(|namespace| ([("namespace", namespace.as_str())], 1usize)),
        )?;
        let events = &s.events;
        counter(e, "netsieve_events_emitted", "Verdict events the eBPF programs wrote to the ring buffer.", events.emitted)?;
        counter_family(
            e,
            "netsieve_events_not_emitted",
            "Verdict events not emitted: the CPU's rate limit was exhausted (rate_limited) or the ring buffer was full (ring_full). Packet counters are exact either way.",
            [(ReasonLabel { reason: "rate_limited" }, events.rate_limited), (ReasonLabel { reason: "ring_full" }, events.ring_full)],
        )?;
        counter(e, "netsieve_events_read", "Verdict events the agent read from the ring buffer.", events.read)?;
        counter_family(
            e,
            "netsieve_events_dropped",
            "Verdict events read but not delivered: the agent's queue was full (agent_busy) or a subscriber's (slow_subscriber).",
            [
                (ReasonLabel { reason: "agent_busy" }, events.dropped_agent_busy),
                (ReasonLabel { reason: "slow_subscriber" }, events.dropped_slow_subscribers),
            ],
        )?;
        gauge(e, "netsieve_event_subscribers", "Connected event stream subscribers (netsieve monitor).", events.subscribers as usize)?;
        gauge_family(
            e,
            "netsieve_map_entries",
            "Entries in each BPF map as programmed by the agent.",
            s.maps.iter().map(|(&map, &(entries, _))| (MapLabel { map }, entries)),
        )?;
        gauge_family(
            e,
            "netsieve_map_capacity",
            "Maximum entries of each BPF map.",
            s.maps.iter().map(|(&map, &(_, capacity))| (MapLabel { map }, capacity)),
        )?;
        gauge(e, "netsieve_endpoints", "Local pods programmed into the dataplane.", s.endpoint_count)?;
        gauge(
            e,
            "netsieve_endpoints_failed_closed",
            "Local pods programmed fail-closed (invalid policy, full maps).",
            s.endpoints_failed_closed,
        )?;
        gauge(
            e,
            "netsieve_pods_waiting_for_interface",
            "Local pods whose host interface is not found yet.",
            s.pods_waiting_for_interface,
        )?;
        gauge(e, "netsieve_policies", "NetworkPolicies known to the agent.", s.policy_count)?;
        gauge(
            e,
            "netsieve_policies_invalid",
            "NetworkPolicies with errors (the pods they select fail closed).",
            s.invalid_policy_count,
        )?;
        gauge(e, "netsieve_identities", "Distinct pod label sets (security identities).", s.identity_count)
    }
}

/// The per-endpoint series of one family: for each pod, direction and verdict, the value
/// `pick(counters, direction index)` returns as (allowed, denied, audit).
fn endpoint_series<'a>(
    endpoints: &'a BTreeMap<String, EndpointCounters>,
    pick: fn(&EndpointCounters, usize) -> (u64, u64, u64),
) -> impl Iterator<Item = (EndpointLabels<'a>, u64)> + 'a {
    endpoints.iter().flat_map(move |(key, counters)| {
        let (namespace, pod) = key.split_once('/').unwrap_or(("", key));
        ["ingress", "egress"].into_iter().enumerate().flat_map(move |(d, direction)| {
            let (allowed, denied, audit) = pick(counters, d);
            [("allowed", allowed), ("denied", denied), ("audit", audit)]
                .map(|(verdict, value)| ([("namespace", namespace), ("pod", pod), ("direction", direction), ("verdict", verdict)], value))
        })
    })
}

/// The per-rule series of one family.
fn rule_series<'a>(rules: &'a [RuleSeries], pick: fn(&RuleSeries) -> u64) -> impl Iterator<Item = (RuleLabels<'a>, u64)> + 'a {
    rules.iter().map(move |r| {
        (
            [("namespace", r.namespace.as_str()), ("policy", r.policy.as_str()), ("direction", r.direction), ("rule", r.rule.as_str())],
            pick(r),
        )
    })
}

/// A counter family from (labels, value) pairs; `name` without `_total`. A family without
/// series is left out, as `prometheus-client` does for an empty `Family`.
fn counter_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), fmt::Error> {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family from (labels, value) pairs, left out without series.
fn gauge_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, usize)>,
) -> Result<(), fmt::Error> {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter without labels; `name` without `_total`.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), fmt::Error> {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A gauge without labels.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: usize) -> Result<(), fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}
