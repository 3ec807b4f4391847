//! Prometheus metrics in the text exposition format (version 0.0.4), rendered by hand: the
//! set is small and fixed, and a hand-written encoder keeps the binary free of a metrics
//! framework. Conventions: `_total` counters, base units (seconds, bytes), labels for
//! dimensions.
//!
//! The agent loop owns the kernel maps, so dataplane readings (drop counters, per-endpoint
//! counters, map occupancy) are copied into a [`DataplaneSnapshot`] by that loop; scrapes only
//! read the last snapshot.
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the programming latency histogram buckets.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A cumulative histogram with fixed buckets.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, value: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BUCKETS.len()];
        }
        let seconds = value.as_secs_f64();
        for (bound, count) in LATENCY_BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Per-endpoint packet and byte counters, by direction (0 ingress, 1 egress).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    pub allowed_packets: [u64; 2],
    pub allowed_bytes: [u64; 2],
    pub denied_packets: [u64; 2],
    pub denied_bytes: [u64; 2],
}

impl EndpointCounters {
    pub fn add(&mut self, other: &EndpointCounters) {
        for d in 0..2 {
            self.allowed_packets[d] += other.allowed_packets[d];
            self.allowed_bytes[d] += other.allowed_bytes[d];
            self.denied_packets[d] += other.denied_packets[d];
            self.denied_bytes[d] += other.denied_bytes[d];
        }
    }
}

/// What the agent loop reads from the kernel and its own state.
#[derive(Clone, Debug, Default)]
pub struct DataplaneSnapshot {
    /// (reason, direction, packets).
    pub drops: Vec<(&'static str, &'static str, u64)>,
    /// By `namespace/pod`.
    pub endpoints: BTreeMap<String, EndpointCounters>,
    /// map name -> (entries, capacity).
    pub maps: BTreeMap<&'static str, (usize, usize)>,
    pub endpoint_count: usize,
    pub endpoints_failed_closed: usize,
    pub pods_waiting_for_interface: usize,
    pub policy_count: usize,
    pub invalid_policy_count: usize,
    pub identity_count: usize,
}

#[derive(Debug, Default)]
struct Counters {
    programming_latency: Histogram,
    reconcile_errors: BTreeMap<&'static str, u64>,
    watch_restarts: BTreeMap<&'static str, u64>,
    relists: BTreeMap<&'static str, u64>,
    invalid_objects: BTreeMap<(&'static str, &'static str), u64>,
    events: BTreeMap<&'static str, u64>,
    dataplane: DataplaneSnapshot,
}

/// Shared between the agent loop (writer) and the HTTP server (reader).
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
    ready: AtomicBool,
    /// Why the agent is not ready yet, for /readyz.
    not_ready_reason: Mutex<String>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Counters) -> T) -> T {
        // A panic while holding the lock cannot leave counters inconsistent in a way that
        // matters for monitoring, so a poisoned lock is used as is.
        let mut guard = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    pub fn observe_programming(&self, latency: Duration) {
        self.with(|c| c.programming_latency.observe(latency));
    }

    pub fn programming_latency(&self) -> Histogram {
        self.with(|c| c.programming_latency.clone())
    }

    pub fn reconcile_error(&self, kind: &'static str) {
        self.with(|c| *c.reconcile_errors.entry(kind).or_default() += 1);
    }

    pub fn watch_restart(&self, resource: &'static str) {
        self.with(|c| *c.watch_restarts.entry(resource).or_default() += 1);
    }

    pub fn relist(&self, resource: &'static str) {
        self.with(|c| *c.relists.entry(resource).or_default() += 1);
    }

    pub fn invalid_object(&self, kind: &'static str, reason: &'static str) {
        self.with(|c| *c.invalid_objects.entry((kind, reason)).or_default() += 1);
    }

    pub fn event(&self, resource: &'static str) {
        self.with(|c| *c.events.entry(resource).or_default() += 1);
    }

    pub fn set_dataplane(&self, snapshot: DataplaneSnapshot) {
        self.with(|c| c.dataplane = snapshot);
    }

    pub fn set_ready(&self, ready: bool, reason: &str) {
        self.ready.store(ready, Ordering::SeqCst);
        *self.not_ready_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.to_string();
    }

    /// (ready, reason if not).
    pub fn readiness(&self) -> (bool, String) {
        let ready = self.ready.load(Ordering::SeqCst);
        (ready, self.not_ready_reason.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let ready = self.ready.load(Ordering::SeqCst);
        self.with(|c| render(c, ready))
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn render(c: &Counters, ready: bool) -> String {
    let mut out = String::new();
    let d = &c.dataplane;
    header(&mut out, "netsieve_drops_total", "counter", "Packets dropped by the eBPF programs on this node.");
    for (reason, direction, n) in &d.drops {
        let _ = writeln!(out, "netsieve_drops_total{{direction=\"{direction}\",reason=\"{reason}\"}} {n}");
    }
    type Pick = fn(&EndpointCounters, usize) -> (u64, u64);
    let families: [(&str, &str, Pick); 2] = [
        ("netsieve_endpoint_packets_total", "Packets judged per local endpoint.", |e, i| (e.allowed_packets[i], e.denied_packets[i])),
        ("netsieve_endpoint_bytes_total", "Bytes judged per local endpoint.", |e, i| (e.allowed_bytes[i], e.denied_bytes[i])),
    ];
    for (name, help, pick) in families {
        header(&mut out, name, "counter", help);
        for (key, e) in &d.endpoints {
            let (namespace, pod) = key.split_once('/').unwrap_or(("", key));
            let (namespace, pod) = (escape(namespace), escape(pod));
            for (i, direction) in ["ingress", "egress"].iter().enumerate() {
                let (allowed, denied) = pick(e, i);
                for (verdict, n) in [("allowed", allowed), ("denied", denied)] {
                    let _ = writeln!(
                        out,
                        "{name}{{namespace=\"{namespace}\",pod=\"{pod}\",direction=\"{direction}\",verdict=\"{verdict}\"}} {n}"
                    );
                }
            }
        }
    }
    let h = &c.programming_latency;
    header(
        &mut out,
        "netsieve_policy_programming_duration_seconds",
        "histogram",
        "From a change received (API event or manifest change) to the kernel maps updated.",
    );
    for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
        let n = h.counts.get(i).copied().unwrap_or(0);
        let _ = writeln!(out, "netsieve_policy_programming_duration_seconds_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "netsieve_policy_programming_duration_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "netsieve_policy_programming_duration_seconds_sum {}", h.sum);
    let _ = writeln!(out, "netsieve_policy_programming_duration_seconds_count {}", h.count);
    header(&mut out, "netsieve_map_entries", "gauge", "Entries in each BPF map as programmed by the agent.");
    for (map, (entries, _)) in &d.maps {
        let _ = writeln!(out, "netsieve_map_entries{{map=\"{map}\"}} {entries}");
    }
    header(&mut out, "netsieve_map_capacity", "gauge", "Maximum entries of each BPF map.");
    for (map, (_, capacity)) in &d.maps {
        let _ = writeln!(out, "netsieve_map_capacity{{map=\"{map}\"}} {capacity}");
    }
    let gauges: [(&str, &str, usize); 6] = [
        ("netsieve_endpoints", "Local pods programmed into the dataplane.", d.endpoint_count),
        ("netsieve_endpoints_failed_closed", "Local pods programmed fail-closed (invalid policy, full maps).", d.endpoints_failed_closed),
        ("netsieve_pods_waiting_for_interface", "Local pods whose host interface is not found yet.", d.pods_waiting_for_interface),
        ("netsieve_policies", "NetworkPolicies known to the agent.", d.policy_count),
        ("netsieve_policies_invalid", "NetworkPolicies with errors (the pods they select fail closed).", d.invalid_policy_count),
        ("netsieve_identities", "Distinct pod label sets (security identities).", d.identity_count),
    ];
    for (name, help, value) in gauges {
        header(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    header(&mut out, "netsieve_reconcile_errors_total", "counter", "Failed reconciliations, by error kind.");
    for (kind, n) in &c.reconcile_errors {
        let _ = writeln!(out, "netsieve_reconcile_errors_total{{kind=\"{kind}\"}} {n}");
    }
    header(&mut out, "netsieve_api_watch_restarts_total", "counter", "Watch streams that failed and were restarted.");
    for (resource, n) in &c.watch_restarts {
        let _ = writeln!(out, "netsieve_api_watch_restarts_total{{resource=\"{resource}\"}} {n}");
    }
    header(&mut out, "netsieve_api_relists_total", "counter", "Full re-lists after the initial one (410 Gone, desync).");
    for (resource, n) in &c.relists {
        let _ = writeln!(out, "netsieve_api_relists_total{{resource=\"{resource}\"}} {n}");
    }
    header(&mut out, "netsieve_api_events_total", "counter", "Watch events received.");
    for (resource, n) in &c.events {
        let _ = writeln!(out, "netsieve_api_events_total{{resource=\"{resource}\"}} {n}");
    }
    header(&mut out, "netsieve_invalid_objects_total", "counter", "Objects that were malformed or invalid, by kind and reason.");
    for ((kind, reason), n) in &c.invalid_objects {
        let _ = writeln!(out, "netsieve_invalid_objects_total{{kind=\"{kind}\",reason=\"{reason}\"}} {n}");
    }
    header(&mut out, "netsieve_ready", "gauge", "1 once the initial sync is done and programs are attached.");
    let _ = writeln!(out, "netsieve_ready {}", u8::from(ready));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        assert_eq!(h.count(), 3);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[LATENCY_BUCKETS.iter().position(|b| *b == 0.005).unwrap_or(0)], 2);
        assert_eq!(*h.counts.last().unwrap_or(&0), 2);
    }

    #[test]
    fn render_has_every_family_and_escapes_labels() {
        let m = Metrics::default();
        m.observe_programming(Duration::from_millis(2));
        m.reconcile_error("sync");
        let mut snapshot = DataplaneSnapshot::default();
        snapshot.endpoints.insert("ns/we\"ird".into(), EndpointCounters::default());
        snapshot.drops.push(("policy_denied", "ingress", 7));
        m.set_dataplane(snapshot);
        let text = m.render();
        assert!(text.contains("netsieve_drops_total{direction=\"ingress\",reason=\"policy_denied\"} 7"), "{text}");
        assert!(text.contains("pod=\"we\\\"ird\""), "{text}");
        assert!(text.contains("netsieve_policy_programming_duration_seconds_count 1"), "{text}");
        assert!(text.contains("netsieve_reconcile_errors_total{kind=\"sync\"} 1"), "{text}");
        assert!(text.contains("netsieve_ready 0"), "{text}");
    }
}
