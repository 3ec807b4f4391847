use super::*;
use std::collections::{BTreeMap, BTreeSet};

/// Every family the agent exposes, with its type: a stable interface (extend, never rename).
const FAMILIES: &[(&str, &str)] = &[
    ("netsieve_drops_total", "counter"),
    ("netsieve_endpoint_packets_total", "counter"),
    ("netsieve_endpoint_bytes_total", "counter"),
    ("netsieve_policy_programming_duration_seconds", "histogram"),
    ("netsieve_map_entries", "gauge"),
    ("netsieve_map_capacity", "gauge"),
    ("netsieve_endpoints", "gauge"),
    ("netsieve_endpoints_failed_closed", "gauge"),
    ("netsieve_pods_waiting_for_interface", "gauge"),
    ("netsieve_policies", "gauge"),
    ("netsieve_policies_invalid", "gauge"),
    ("netsieve_identities", "gauge"),
    ("netsieve_reconcile_errors_total", "counter"),
    ("netsieve_api_watch_restarts_total", "counter"),
    ("netsieve_api_relists_total", "counter"),
    ("netsieve_api_events_total", "counter"),
    ("netsieve_invalid_objects_total", "counter"),
    ("netsieve_ready", "gauge"),
    ("netsieve_audit_total", "counter"),
    ("netsieve_audit_mode", "gauge"),
    ("netsieve_audit_endpoints", "gauge"),
    ("netsieve_audit_namespace", "gauge"),
    ("netsieve_rule_packets_total", "counter"),
    ("netsieve_rule_bytes_total", "counter"),
    ("netsieve_rules_unmatched", "gauge"),
    ("netsieve_events_emitted_total", "counter"),
    ("netsieve_events_not_emitted_total", "counter"),
    ("netsieve_events_read_total", "counter"),
    ("netsieve_events_dropped_total", "counter"),
    ("netsieve_event_subscribers", "gauge"),
];

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct Exposition {
    /// family -> (type, help), in order of appearance.
    families: BTreeMap<String, (String, String)>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels.len() == labels.len() && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
            .map(|s| s.value)
    }

    fn series(&self) -> BTreeMap<String, f64> {
        self.samples.iter().map(|s| (format!("{}{:?}", s.name, s.labels), s.value)).collect()
    }
}

/// Parses the text format 0.0.4 strictly: HELP then TYPE once per family, then that family's
/// samples (`_bucket`, `_sum`, `_count` for a histogram), label values unescaped.
fn parse(text: &str) -> Exposition {
    let mut out = Exposition::default();
    let mut help: Option<(String, String)> = None;
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or_else(|| panic!("HELP without text: {line}"));
            assert!(help.is_none(), "two HELP lines in a row: {line}");
            help = Some((name.to_string(), text.to_string()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("TYPE without type: {line}"));
            let (help_name, help_text) = help.take().unwrap_or_else(|| panic!("TYPE without HELP: {line}"));
            assert_eq!(help_name, name, "HELP and TYPE of different families");
            let previous = out.families.insert(name.to_string(), (kind.to_string(), help_text));
            assert!(previous.is_none(), "family {name} declared twice");
            current = Some((name.to_string(), kind.to_string()));
        } else {
            assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line {line:?}");
            let sample = parse_sample(line);
            let (family, kind) = current.as_ref().unwrap_or_else(|| panic!("sample before any TYPE: {line}"));
            let suffixes: &[&str] = if kind == "histogram" { &["_bucket", "_sum", "_count"] } else { &[""] };
            assert!(
                suffixes.iter().any(|s| sample.name == format!("{family}{s}")),
                "sample not of the family declared before it ({family}): {line}"
            );
            out.samples.push(sample);
        }
    }
    out
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line}"));
    let name = &line[..name_end];
    assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad name in {line}");
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            let (key, quoted) = body.split_once("=\"").unwrap_or_else(|| panic!("label without value: {line}"));
            assert!(!key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad label name in {line}");
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => panic!("bad escape {other:?} in {line}"),
                    },
                    Some((i, '"')) => break i + 1,
                    Some((_, '\n')) => panic!("raw newline in {line}"),
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value in {line}"),
                }
            };
            labels.push((key.to_string(), value));
            let after = &quoted[end..];
            if let Some(more) = after.strip_prefix(',') {
                body = more;
            } else if let Some(after_labels) = after.strip_prefix('}') {
                rest = after_labels;
                break;
            } else {
                panic!("unexpected text after a label in {line}");
            }
        }
    }
    Sample { name: name.to_string(), labels, value: parse_value(rest, line) }
}

fn parse_value(rest: &str, line: &str) -> f64 {
    let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("no space before the value: {line}"));
    match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => value.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
    }
}

/// Data that puts a series in every family.
fn representative() -> Metrics {
    let m = Metrics::default();
    m.observe_programming(Duration::from_micros(40));
    m.observe_programming(Duration::from_millis(2));
    m.reconcile_error("sync");
    m.watch_restart("pods");
    m.relist("pods");
    m.event("pods");
    m.invalid_object("Pod", "without_ip");
    m.set_dataplane(snapshot(7, 10));
    m.set_ready(true, "");
    m
}

fn snapshot(denied: u64, allowed: u64) -> DataplaneSnapshot {
    let mut s = DataplaneSnapshot {
        drops: vec![("policy_denied", "ingress", denied), ("policy_denied", "egress", 1)],
        endpoint_count: 1,
        policy_count: 2,
        identity_count: 3,
        ..DataplaneSnapshot::default()
    };
    let counters = EndpointCounters {
        allowed_packets: [allowed, 1],
        allowed_bytes: [allowed * 100, 100],
        denied_packets: [denied, 0],
        denied_bytes: [denied * 60, 0],
        audit_packets: [2, 0],
        audit_bytes: [120, 0],
    };
    s.endpoints.insert("default/nginx-1".into(), counters);
    s.maps.insert("IPCACHE", (6, 65536));
    s.audits = vec![("policy_denied", "ingress", 2)];
    s.rules = vec![
        RuleSeries { namespace: "default".into(), policy: "access-nginx".into(), direction: "ingress", rule: "0".into(), packets: allowed, bytes: allowed * 100 },
        RuleSeries { namespace: "default".into(), policy: "access-nginx".into(), direction: "ingress", rule: "1".into(), packets: 0, bytes: 0 },
    ];
    s.events = EventPathSnapshot {
        emitted: denied,
        rate_limited: 4,
        ring_full: 0,
        read: denied,
        dropped_agent_busy: 0,
        dropped_slow_subscribers: 1,
        subscribers: 1,
    };
    s.audit = AuditSnapshot { active: true, namespaces: vec!["staging".into()], endpoints: 1 };
    s
}

#[test]
fn every_family_is_present_with_help_and_type() {
    let text = representative().render();
    let exposition = parse(&text);
    let got: BTreeSet<(&str, &str)> = exposition.families.iter().map(|(n, (k, _))| (n.as_str(), k.as_str())).collect();
    let want: BTreeSet<(&str, &str)> = FAMILIES.iter().copied().collect();
    assert_eq!(got, want, "{text}");
    for (name, (_, help)) in &exposition.families {
        assert!(help.len() > 10 && help.ends_with('.') && !help.ends_with(".."), "{name}: help {help:?}");
        assert!(exposition.samples.iter().any(|s| s.name.starts_with(name.as_str())), "{name} has no sample");
    }
}

#[test]
fn series_keep_their_names_label_order_and_values() {
    // The exact lines scrapers and the end-to-end tests match on.
    let text = representative().render();
    for line in [
        "# TYPE netsieve_drops_total counter",
        "netsieve_drops_total{direction=\"ingress\",reason=\"policy_denied\"} 7",
        "netsieve_endpoint_packets_total{namespace=\"default\",pod=\"nginx-1\",direction=\"ingress\",verdict=\"allowed\"} 10",
        "netsieve_endpoint_packets_total{namespace=\"default\",pod=\"nginx-1\",direction=\"ingress\",verdict=\"denied\"} 7",
        "netsieve_endpoint_bytes_total{namespace=\"default\",pod=\"nginx-1\",direction=\"egress\",verdict=\"allowed\"} 100",
        "netsieve_map_entries{map=\"IPCACHE\"} 6",
        "netsieve_map_capacity{map=\"IPCACHE\"} 65536",
        "netsieve_endpoints 1",
        "netsieve_policies 2",
        "netsieve_identities 3",
        "netsieve_endpoints_failed_closed 0",
        "netsieve_reconcile_errors_total{kind=\"sync\"} 1",
        "netsieve_api_watch_restarts_total{resource=\"pods\"} 1",
        "netsieve_api_relists_total{resource=\"pods\"} 1",
        "netsieve_api_events_total{resource=\"pods\"} 1",
        "netsieve_invalid_objects_total{kind=\"Pod\",reason=\"without_ip\"} 1",
        "netsieve_policy_programming_duration_seconds_count 2",
        "netsieve_ready 1",
        "netsieve_endpoint_packets_total{namespace=\"default\",pod=\"nginx-1\",direction=\"ingress\",verdict=\"audit\"} 2",
        "netsieve_audit_total{direction=\"ingress\",reason=\"policy_denied\"} 2",
        "netsieve_audit_mode 1",
        "netsieve_audit_endpoints 1",
        "netsieve_audit_namespace{namespace=\"staging\"} 1",
        "netsieve_rule_packets_total{namespace=\"default\",policy=\"access-nginx\",direction=\"ingress\",rule=\"0\"} 10",
        "netsieve_rule_packets_total{namespace=\"default\",policy=\"access-nginx\",direction=\"ingress\",rule=\"1\"} 0",
        "netsieve_rule_bytes_total{namespace=\"default\",policy=\"access-nginx\",direction=\"ingress\",rule=\"0\"} 1000",
        "netsieve_rules_unmatched 1",
        "netsieve_events_emitted_total 7",
        "netsieve_events_not_emitted_total{reason=\"rate_limited\"} 4",
        "netsieve_events_not_emitted_total{reason=\"ring_full\"} 0",
        "netsieve_events_read_total 7",
        "netsieve_events_dropped_total{reason=\"slow_subscriber\"} 1",
        "netsieve_events_dropped_total{reason=\"agent_busy\"} 0",
        "netsieve_event_subscribers 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
    }
    // The text format the daemon declares, not OpenMetrics (which ends with `# EOF` and
    // names counter families without `_total`).
    assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"), "{text}");
    // One endpoint: 2 directions x 3 verdicts (allowed, denied, audit) per family.
    let exposition = parse(&text);
    assert_eq!(exposition.samples.iter().filter(|s| s.name == "netsieve_endpoint_packets_total").count(), 6);
}

#[test]
fn label_values_are_escaped() {
    let m = Metrics::default();
    let mut s = DataplaneSnapshot::default();
    let pod = "we\"ird\\pod\nname";
    s.endpoints.insert(format!("ns/{pod}"), EndpointCounters { denied_packets: [5, 0], ..Default::default() });
    m.set_dataplane(s);
    let text = m.render();
    let line = "netsieve_endpoint_packets_total{namespace=\"ns\",pod=\"we\\\"ird\\\\pod\\nname\",direction=\"ingress\",verdict=\"denied\"} 5";
    assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
    let exposition = parse(&text);
    let value = exposition.value(
        "netsieve_endpoint_packets_total",
        &[("namespace", "ns"), ("pod", pod), ("direction", "ingress"), ("verdict", "denied")],
    );
    assert_eq!(value, Some(5.0), "the escaped value parses back to the pod name");
}

#[test]
fn histogram_buckets_are_cumulative() {
    let m = Metrics::default();
    let observed = [Duration::from_micros(40), Duration::from_micros(50), Duration::from_millis(3), Duration::from_millis(60), Duration::from_secs(10)];
    for d in observed {
        m.observe_programming(d);
    }
    let exposition = parse(&m.render());
    let buckets: Vec<(f64, f64)> = exposition
        .samples
        .iter()
        .filter(|s| s.name == "netsieve_policy_programming_duration_seconds_bucket")
        .map(|s| {
            let le = s.label("le").unwrap_or_else(|| panic!("bucket without le: {s:?}"));
            (parse_value(&format!(" {le}"), le), s.value)
        })
        .collect();
    let bounds: Vec<f64> = buckets.iter().map(|(le, _)| *le).collect();
    let want_bounds: Vec<f64> = LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]).collect();
    assert_eq!(bounds, want_bounds, "the buckets keep their bounds, in order, plus +Inf");
    for pair in buckets.windows(2) {
        assert!(pair[0].1 <= pair[1].1, "not cumulative: {buckets:?}");
    }
    // Each bucket counts the observations at or below its bound (50µs lands in le=0.00005).
    for (le, count) in &buckets {
        let want = observed.iter().filter(|d| d.as_secs_f64() <= *le).count() as f64;
        assert_eq!(*count, want, "le={le}: {buckets:?}");
    }
    assert_eq!(exposition.value("netsieve_policy_programming_duration_seconds_count", &[]), Some(5.0));
    let sum = exposition.value("netsieve_policy_programming_duration_seconds_sum", &[]).unwrap_or(f64::NAN);
    let want_sum: f64 = observed.iter().map(Duration::as_secs_f64).sum();
    assert!((sum - want_sum).abs() < 1e-9, "sum {sum} != {want_sum}");
    assert_eq!(m.programming_latency().count(), 5);
}

#[test]
fn counters_are_monotonic_across_snapshots() {
    let m = representative();
    let before = parse(&m.render());
    // The loop publishes a newer reading (the kernel counted more) while the agent counts
    // more events of its own; nothing a new snapshot carries resets the live counters.
    m.set_dataplane(snapshot(9, 25));
    m.reconcile_error("sync");
    m.event("pods");
    let after = parse(&m.render());
    let counters: BTreeSet<&String> = before.families.iter().filter(|(_, (k, _))| k == "counter").map(|(n, _)| n).collect();
    let (before, after) = (before.series(), after.series());
    let mut compared = 0;
    for (series, value) in &before {
        if counters.iter().any(|c| series.starts_with(&format!("{c}["))) {
            let later = after.get(series).unwrap_or_else(|| panic!("{series} vanished"));
            assert!(later >= value, "{series} went from {value} to {later}");
            compared += 1;
        }
    }
    assert!(compared >= 14, "only {compared} counter series compared");
    let grew = |name: &str| before.iter().any(|(s, v)| s.starts_with(name) && after.get(s).is_some_and(|a| a > v));
    for name in ["netsieve_drops_total", "netsieve_endpoint_packets_total", "netsieve_reconcile_errors_total", "netsieve_api_events_total"] {
        assert!(grew(name), "{name} did not grow");
    }
}

#[test]
fn departed_pods_leave_and_empty_families_are_left_out() {
    let text = Metrics::default().render();
    let exposition = parse(&text);
    for family in ["netsieve_drops_total", "netsieve_endpoint_packets_total", "netsieve_map_entries", "netsieve_reconcile_errors_total"] {
        assert!(!exposition.families.contains_key(family), "{family} without series in\n{text}");
    }
    // Unlabelled gauges and the histogram always have their series.
    assert_eq!(exposition.value("netsieve_endpoints", &[]), Some(0.0));
    assert_eq!(exposition.value("netsieve_ready", &[]), Some(0.0));
    assert_eq!(exposition.value("netsieve_policy_programming_duration_seconds_count", &[]), Some(0.0));
    let m = representative();
    m.set_dataplane(DataplaneSnapshot::default());
    let after = parse(&m.render());
    assert!(after.samples.iter().all(|s| s.label("pod").is_none()), "a departed pod's series stays");
    assert_eq!(after.value("netsieve_reconcile_errors_total", &[("kind", "sync")]), Some(1.0));
}

#[test]
fn readiness_follows_set_ready() {
    let m = Metrics::default();
    m.set_ready(false, "initial sync not done");
    assert_eq!(m.readiness(), (false, "initial sync not done".to_string()));
    assert_eq!(parse(&m.render()).value("netsieve_ready", &[]), Some(0.0));
    m.set_ready(true, "");
    assert_eq!(m.readiness(), (true, String::new()));
    assert_eq!(parse(&m.render()).value("netsieve_ready", &[]), Some(1.0));
    assert_eq!(m.readiness_text(), (true, "ready\n".to_string()));
    // Audit mode is said beside readiness, so nobody mistakes it for enforcement.
    m.set_readiness_detail(Some("audit mode: namespaces a, b".into()));
    assert_eq!(m.readiness_text(), (true, "ready (audit mode: namespaces a, b)\n".to_string()));
    m.set_ready(false, "initial sync not done");
    assert_eq!(m.readiness_text(), (false, "not ready: initial sync not done (audit mode: namespaces a, b)\n".to_string()));
}

