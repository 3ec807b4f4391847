//! Prometheus metrics and readiness. The exposition is encoded by the `prometheus-client`
//! crate in the Prometheus text format, version 0.0.4 ([`CONTENT_TYPE`]): what Prometheus
//! has always scraped from this agent, with `# TYPE netsieve_drops_total counter` naming the
//! family by its full sample name.
//!
//! # Two ways a value reaches /metrics
//!
//! - **Live metrics**, for what the agent itself observes as it happens (a watch restart, a
//!   reconcile error, a programming latency): a `prometheus-client` metric (`Family` of
//!   `Counter`s, `Histogram`, `Gauge`) held in [`Metrics`], updated through a method of
//!   [`Metrics`] by whichever task sees the event. Counters and gauges are atomics (a family
//!   takes a read lock to find its series), so writers no longer share one mutex.
//! - **Dataplane snapshot**, for what the kernel counts and the agent loop owns (drop counters,
//!   per-endpoint counters, map occupancy, state sizes): only the agent loop touches kernel
//!   maps, so it copies its readings into a [`DataplaneSnapshot`] and publishes it with
//!   [`Metrics::set_dataplane`]. A custom collector (`dataplane::DataplaneCollector`) encodes
//!   the last published snapshot at scrape time, so a scrape never reads a kernel map, never
//!   waits on the loop (it only clones an `Arc`), and always sees one consistent reading.
//!   Kernel counters are absolute, monotonic values; writing them as const counters avoids
//!   turning them into deltas for `Counter::inc_by` and lets series of departed pods vanish
//!   with the snapshot that no longer lists them.
//!
//! # Adding a metric
//!
//! Decide by who produces the value:
//! - Counted by the agent (an event it handles, an error it logs): add a field to [`Metrics`]
//!   (`Family<YourLabels, Counter>`, `Histogram`, `Gauge`), register it in
//!   `Metrics::default` with `register` (the one place that knows the registry), and add a
//!   method that records it (`pub fn reconcile_error(&self, kind)` is the model). Labels are a
//!   `#[derive(EncodeLabelSet)]` struct: its fields, in order, are the label names.
//! - Read from the kernel or the loop's state: add a field to [`DataplaneSnapshot`] (filled by
//!   the agent loop where it builds the snapshot, `Agent::snapshot` in the daemon) and one
//!   line in `DataplaneCollector::encode` with `counter_family`, `gauge_family` or `gauge`,
//!   mapping each entry to (labels, value). Labels whose values are borrowed from the
//!   snapshot (pod, policy or rule names) are an array of `(name, value)` pairs, as
//!   `EndpointLabels` is, because the derive takes no lifetime parameters; the crate escapes
//!   the values.
//!
//! Either way add the name to `FAMILIES` in this module's tests (the list of exposed families
//! is a stable interface: extend, never rename) and, if it is worth a panel, to
//! `deploy/grafana/netsieve-dashboard.json`; `agent/tests/deploy_manifests.rs` checks every
//! metric the dashboard queries against the exposition.
//!
//! # Conventions
//!
//! Names start with `netsieve_`, carry base units (`_seconds`, `_bytes`) and use labels for
//! dimensions. Counters are registered *without* `_total`: the encoder appends it (the crate
//! panics in debug builds on a counter name ending in `_total`). Help texts passed to
//! `register` have no final full stop (the crate adds one); help texts written by the
//! collector have it. A family with no series yet (a labelled counter nobody incremented) is
//! left out of the exposition, as the Go client does.
mod dataplane;

pub use dataplane::{AuditSnapshot, DataplaneSnapshot, EndpointCounters, EventPathSnapshot, RuleSeries};

use dataplane::DataplaneCollector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use std::sync::Mutex;
use std::time::Duration;

/// The `Content-Type` of what [`Metrics::render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the programming latency histogram buckets.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InvalidObjectLabels {
    kind: &'static str,
    reason: &'static str,
}

/// Shared between the agent's tasks (writers) and the HTTP server (reader).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    programming_latency: Histogram,
    reconcile_errors: Family<KindLabel, Counter>,
    watch_restarts: Family<ResourceLabel, Counter>,
    relists: Family<ResourceLabel, Counter>,
    api_events: Family<ResourceLabel, Counter>,
    invalid_objects: Family<InvalidObjectLabels, Counter>,
    ready: Gauge,
    /// Why the agent is not ready yet, for /readyz. Its lock also orders updates of `ready`.
    not_ready_reason: Mutex<String>,
    /// What /readyz adds in parentheses (audit mode, so nobody mistakes it for enforcement).
    readiness_detail: Mutex<Option<String>>,
    dataplane: DataplaneCollector,
}

/// Registers `metric` under `name` and returns it: the registry encodes a clone, and clones of
/// `prometheus-client` metrics share their value, so the returned handle is the one to update.
/// `name` of a counter has no `_total`; `help` has no final full stop (both are added).
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::default();
        let r = &mut registry;
        let programming_latency = register(
            r,
            "netsieve_policy_programming_duration_seconds",
            "From a change received (API event or manifest change) to the kernel maps updated",
            Histogram::new(LATENCY_BUCKETS.iter().copied()),
        );
        let reconcile_errors =
            register(r, "netsieve_reconcile_errors", "Failed reconciliations, by error kind", Family::default());
        let watch_restarts = register(
            r,
            "netsieve_api_watch_restarts",
            "Watch streams that failed and were restarted",
            Family::default(),
        );
        let relists = register(
            r,
            "netsieve_api_relists",
            "Full re-lists after the initial one (410 Gone, desync)",
            Family::default(),
        );
        let api_events = register(r, "netsieve_api_events", "Watch events received", Family::default());
        let invalid_objects = register(
            r,
            "netsieve_invalid_objects",
            "Objects that were malformed or invalid, by kind and reason",
            Family::default(),
        );
        let ready = register(r, "netsieve_ready", "1 once the initial sync is done and programs are attached", Gauge::default());
        let dataplane = DataplaneCollector::default();
        registry.register_collector(Box::new(dataplane.clone()));
        Metrics {
            registry,
            programming_latency,
            reconcile_errors,
            watch_restarts,
            relists,
            api_events,
            invalid_objects,
            ready,
            not_ready_reason: Mutex::new(String::new()),
            readiness_detail: Mutex::new(None),
            dataplane,
        }
    }
}

impl Metrics {
    pub fn observe_programming(&self, latency: Duration) {
        self.programming_latency.observe(latency.as_secs_f64());
    }

    /// The programming latency histogram (a handle sharing the live values).
    pub fn programming_latency(&self) -> Histogram {
        self.programming_latency.clone()
    }

    pub fn reconcile_error(&self, kind: &'static str) {
        self.reconcile_errors.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn watch_restart(&self, resource: &'static str) {
        self.watch_restarts.get_or_create(&ResourceLabel { resource }).inc();
    }

    pub fn relist(&self, resource: &'static str) {
        self.relists.get_or_create(&ResourceLabel { resource }).inc();
    }

    pub fn invalid_object(&self, kind: &'static str, reason: &'static str) {
        self.invalid_objects.get_or_create(&InvalidObjectLabels { kind, reason }).inc();
    }

    pub fn event(&self, resource: &'static str) {
        self.api_events.get_or_create(&ResourceLabel { resource }).inc();
    }

    /// Publishes the agent loop's latest reading; scrapes encode it until the next one.
    pub fn set_dataplane(&self, snapshot: DataplaneSnapshot) {
        self.dataplane.publish(snapshot);
    }

    pub fn set_ready(&self, ready: bool, reason: &str) {
        // A panic while holding the lock cannot leave a string inconsistent in a way that
        // matters for a health endpoint, so a poisoned lock is used as is.
        let mut not_ready_reason = self.not_ready_reason.lock().unwrap_or_else(|e| e.into_inner());
        reason.clone_into(&mut not_ready_reason);
        self.ready.set(i64::from(ready));
    }

    /// (ready, reason if not).
    pub fn readiness(&self) -> (bool, String) {
        let not_ready_reason = self.not_ready_reason.lock().unwrap_or_else(|e| e.into_inner());
        (self.ready.get() == 1, not_ready_reason.clone())
    }

    /// What /readyz says beside readiness (e.g. `audit mode: namespaces a, b`).
    pub fn set_readiness_detail(&self, detail: Option<String>) {
        *self.readiness_detail.lock().unwrap_or_else(|e| e.into_inner()) = detail;
    }

    /// The body of /readyz: `ready`, `not ready: REASON`, with the detail in parentheses.
    pub fn readiness_text(&self) -> (bool, String) {
        let (ready, reason) = self.readiness();
        let detail = self.readiness_detail.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let head = if ready { "ready".to_string() } else { format!("not ready: {reason}") };
        match detail {
            Some(detail) => (ready, format!("{head} ({detail})\n")),
            None => (ready, format!("{head}\n")),
        }
    }

    /// The exposition text, in the format [`CONTENT_TYPE`] names.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail and the collector only fails when the writer
        // does, so an error here is a bug in an encoder: log it and serve an empty page
        // rather than a truncated one that would look like vanished series.
        if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "encoding the metrics failed");
            text.clear();
        }
        text
    }
}

#[cfg(test)]
mod tests;
