//! End to end against an API server: the real `netsieve agent --node N --kubeconfig K` (kube-rs
//! watchers, controller, kernel maps, TC programs) on a two-node cluster of network namespaces,
//! fed by an in-process API server that speaks the list/watch protocol over HTTP (see
//! `netsieve_tests::fake_apiserver`). Probes with real TCP/UDP traffic must agree with the
//! semantics module, evaluated on the API server's objects, through a pod label change, a
//! policy edit, a namespace label change, an API outage, a mid-stream disconnect with 410 Gone,
//! and malformed objects. Metrics and health are scraped over HTTP. Needs root; touches nothing
//! outside the namespaces it creates.
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
mod common;
use common::{SEED_PROBES, allowed, probe_pod};
use netsieve::policy::{ClusterState, CompiledPolicy, Protocol, decode_object};
use netsieve_tests::fake_apiserver::{FakeApiServer, Resource};
use netsieve_tests::netns::{Cluster, eventually, namespaces_with_prefix};
use netsieve_tests::seed_cluster::{serve_seed, ACCESS_NGINX, Agents, CACHE_STORE, PODS, layout, remove_mount_root};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const METRICS_PORT: u16 = 9090;

fn yaml(text: &str) -> Value {
    let value: serde_yaml::Value = serde_yaml::from_str(text).expect("yaml");
    serde_json::to_value(value).expect("json")
}

fn pod_object(cluster: &Cluster, name: &str, labels: Value) -> Value {
    let (_, namespace, node, _) = PODS.iter().find(|p| p.0 == name).expect("scenario pod");
    let ip = &cluster.pod(name).ip;
    let host_ip = &cluster.nodes[*node].ip;
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels},
           "spec": {"nodeName": format!("node{node}"), "containers": [{"name": "c", "image": "x"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": host_ip, "hostIPs": [{"ip": host_ip}]}})
}

fn scenario_labels(name: &str) -> Value {
    yaml(PODS.iter().find(|p| p.0 == name).expect("scenario pod").3)
}

/// The semantics module's view of what the API server holds. Policies that do not decode
/// fail closed, as the agent treats them.
fn oracle(api: &FakeApiServer, policies: &[&str]) -> ClusterState {
    let namespaces: Vec<Namespace> = ["default", "secure-middleware"]
        .iter()
        .filter_map(|n| api.get(Resource::Namespaces, n))
        .map(|v| serde_json::from_value(v).expect("namespace"))
        .collect();
    let pods: Vec<Pod> = PODS
        .iter()
        .filter_map(|p| api.get(Resource::Pods, &format!("{}/{}", p.1, p.0)))
        .map(|v| serde_json::from_value(v).expect("pod"))
        .collect();
    let mut state = ClusterState::new(&namespaces, &pods, &[], &[]);
    for key in policies {
        let Some(value) = api.get(Resource::NetworkPolicies, key) else { continue };
        let compiled = match decode_object::<NetworkPolicy>(value) {
            Ok((policy, unknown)) => CompiledPolicy::compile(&policy).with_unknown_fields(&unknown),
            Err(error) => {
                let (ns, name) = key.split_once('/').expect("key");
                CompiledPolicy::undecodable(ns, name, error.to_string())
            }
        };
        state.upsert_policy(compiled);
    }
    state
}

/// Every probe agrees with the semantics module, allowing `settle` for the agents to converge.
fn check(cluster: &Cluster, api: &FakeApiServer, policies: &[&str], stage: &str, settle: Duration) {
    let state = oracle(api, policies);
    let want: Vec<bool> = SEED_PROBES.iter().map(|(f, t, p, pr)| allowed(&state, f, t, *p, *pr)).collect();
    let started = Instant::now();
    let converged = eventually(settle, || {
        SEED_PROBES.iter().zip(&want).all(|((f, t, p, pr), w)| probe_pod(cluster, f, t, *p, *pr, Duration::from_millis(300)) == *w)
    });
    // Re-probe with a generous timeout for a precise message and to rule out flakiness.
    for ((from, to, port, protocol), want) in SEED_PROBES.iter().zip(&want) {
        let got = probe_pod(cluster, from, to, *port, *protocol, Duration::from_millis(800));
        assert_eq!(got, *want, "{stage}: {from} -> {to}:{port}/{protocol} kernel={got} semantics={want} (converged={converged})");
    }
    eprintln!("{stage}: {} probes agree after {:?}", SEED_PROBES.len(), started.elapsed());
}

fn http_get(cluster: &Cluster, node: usize, path: &str) -> Option<(u16, String)> {
    cluster.http_get(node, METRICS_PORT, path)
}

/// Parses the Prometheus text format strictly enough to catch malformed output: every sample
/// line is `name{label="value",...} number`, and every family has HELP and TYPE.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().expect("family name");
            let kind = parts.next().expect("family type");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap_or(series);
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (key, val) = pair.split_once("=\"").unwrap_or_else(|| panic!("label in {line:?}"));
                assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
                assert!(!val.trim_end_matches('"').contains('\n'), "{line}");
            }
        }
        let family = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| {
            if typed.contains(n) { n } else { n.strip_suffix(s).filter(|f| typed.contains(*f)).unwrap_or(n) }
        });
        assert!(typed.contains(family), "sample of an undeclared family: {line}");
        samples.insert(series.to_string(), value);
    }
    samples
}

fn metric(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples.get(series).unwrap_or_else(|| panic!("no series {series} in {samples:#?}"))
}

#[test]
fn agents_follow_the_api_server() {
    let mut cluster = Cluster::new("kube", 2, &layout()).expect("cluster");
    let prefix = format!("nsv-{}", cluster.id);
    serve_seed(&mut cluster).expect("servers");

    // The API server listens on each node's loopback, where that node's agent finds it.
    let listeners = cluster.node_loopback_listeners().expect("API server listeners");
    let api = FakeApiServer::start(listeners).expect("api server");
    api.apply(yaml("{apiVersion: v1, kind: Namespace, metadata: {name: default, labels: {kubernetes.io/metadata.name: default}}}"));
    api.apply(yaml("{apiVersion: v1, kind: Namespace, metadata: {name: secure-middleware, labels: {kubernetes.io/metadata.name: secure-middleware}}}"));
    for (name, ..) in PODS {
        api.apply(pod_object(&cluster, name, scenario_labels(name)));
    }
    api.apply(yaml(ACCESS_NGINX));
    api.apply(yaml(CACHE_STORE));
    let mut policies = vec!["default/access-nginx", "secure-middleware/cache-store-allow-ingress"];

    let dir = std::env::temp_dir().join(format!("netsieve-kube-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfigs = api.write_kubeconfigs(&dir).expect("kubeconfigs");
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let started = Instant::now();
    // With only the DaemonSet's capabilities (BPF, PERFMON, NET_ADMIN).
    let metrics_addr = format!("127.0.0.1:{METRICS_PORT}");
    let mut agents = Agents::against_api(&cluster, binary, &kubeconfigs, &["--metrics-addr", &metrics_addr, "--counters-interval", "0"])
    .expect("agents");

    // Health first, then readiness (initial lists applied, programs attached).
    for node in 0..2 {
        let healthy = eventually(Duration::from_secs(20), || http_get(&cluster, node, "/healthz").is_some_and(|(c, _)| c == 200));
        let ready = healthy
            && eventually(Duration::from_secs(20), || http_get(&cluster, node, "/readyz").is_some_and(|(c, _)| c == 200));
        if !ready {
            let last = http_get(&cluster, node, "/readyz");
            panic!("node{node} healthy={healthy} ready={ready} ({last:?}); agents:\n{:#?}", agents.stop());
        }
    }
    eprintln!("both agents ready after {:?}", started.elapsed());
    check(&cluster, &api, &policies, "initial sync", Duration::from_secs(5));

    // Metrics: the denied probes above were dropped on node0 (nginx-1 and cache-store live
    // there), and show up as counters.
    let samples = parse_metrics(&http_get(&cluster, 0, "/metrics").expect("scrape").1);
    assert!(metric(&samples, "netsieve_drops_total{direction=\"ingress\",reason=\"policy_denied\"}") > 0.0);
    assert!(metric(&samples, "netsieve_endpoint_packets_total{namespace=\"default\",pod=\"nginx-1\",direction=\"ingress\",verdict=\"denied\"}") > 0.0);
    assert!(metric(&samples, "netsieve_endpoint_packets_total{namespace=\"default\",pod=\"nginx-1\",direction=\"ingress\",verdict=\"allowed\"}") > 0.0);
    assert_eq!(metric(&samples, "netsieve_endpoints"), 4.0);
    assert_eq!(metric(&samples, "netsieve_policies"), 2.0);
    assert!(metric(&samples, "netsieve_policy_programming_duration_seconds_count") >= 1.0);
    assert!(metric(&samples, "netsieve_map_entries{map=\"IPCACHE\"}") >= 6.0);
    assert!(metric(&samples, "netsieve_map_capacity{map=\"IPCACHE\"}") >= 65536.0);
    assert_eq!(metric(&samples, "netsieve_ready"), 1.0);
    let denied_before = metric(&samples, "netsieve_drops_total{direction=\"ingress\",reason=\"policy_denied\"}");
    for _ in 0..3 {
        assert!(!probe_pod(&cluster, "interactivetest", "nginx-1", 80, Protocol::Tcp, Duration::from_millis(300)));
    }
    assert!(eventually(Duration::from_secs(3), || {
        let samples = parse_metrics(&http_get(&cluster, 0, "/metrics").map(|r| r.1).unwrap_or_default());
        samples.get("netsieve_drops_total{direction=\"ingress\",reason=\"policy_denied\"}").is_some_and(|v| *v > denied_before)
    }), "drop counter did not move");

    // A pod label change: build-code becomes an internal-proxy and may reach the cache.
    api.apply(pod_object(&cluster, "build-code", json!({"app": "internal-proxy"})));
    check(&cluster, &api, &policies, "pod label change", Duration::from_secs(3));

    // A policy edit: the cache now admits only namespaces labelled team=blue (none yet).
    let cache_team = CACHE_STORE.replace("{kubernetes.io/metadata.name: default}", "{team: blue}");
    api.apply(yaml(&cache_team));
    check(&cluster, &api, &policies, "policy edit", Duration::from_secs(3));

    // A namespace label change: default joins team blue, its proxies reach the cache again.
    api.apply(yaml("{apiVersion: v1, kind: Namespace, metadata: {name: default, labels: {kubernetes.io/metadata.name: default, team: blue}}}"));
    check(&cluster, &api, &policies, "namespace label change", Duration::from_secs(3));

    // An API outage: enforcement stays exactly as it was, and the agents keep running.
    api.set_available(false);
    std::thread::sleep(Duration::from_millis(1500));
    check(&cluster, &api, &policies, "during an API outage", Duration::from_secs(1));
    for node in 0..2 {
        assert_eq!(http_get(&cluster, node, "/healthz").map(|r| r.0), Some(200), "agent {node} alive during outage");
    }
    api.set_available(true);
    // After the outage a change made meanwhile lands (the watch resumes or re-lists).
    let nginx_open = ACCESS_NGINX.replace(
        "    - podSelector: {matchLabels: {iamnice: 'yeah'}}\n",
        "    - podSelector: {matchLabels: {iamnice: 'yeah'}}\n    - podSelector: {matchLabels: {run: interactivetest}}\n",
    );
    api.apply(yaml(&nginx_open));
    check(&cluster, &api, &policies, "after the outage", Duration::from_secs(20));

    // History compacted and every stream cut mid-flight, with a change in between: resuming
    // gets 410 Gone, the watchers re-list and converge.
    let (lists_before, _, _) = api.request_counts();
    api.compact();
    api.disconnect_watches();
    api.apply(pod_object(&cluster, "build-code", scenario_labels("build-code")));
    check(&cluster, &api, &policies, "after 410 Gone and a re-list", Duration::from_secs(20));
    let (lists_after, watches, gone) = api.request_counts();
    assert!(gone > 0, "no watch was answered with 410");
    assert!(api.bookmarks_sent() > 0, "the watchers did not ask for bookmarks");
    assert!(lists_after > lists_before, "no re-list after 410");
    eprintln!("api server: {lists_after} lists, {watches} watches, {gone} answered 410");

    // Malformed objects. An invalid policy allows nothing but still isolates the pods it
    // selects (other policies still allow what they allow): a policy with an unparsable CIDR
    // on nice-client's egress cuts nice-client -> nginx-1; one that does not even decode
    // (podSelector is a number) selects all of its namespace and cuts interactivetest ->
    // nginx-1. An invalid selector operator with unknown fields also fails closed; a pod
    // without IP is harmless.
    assert!(probe_pod(&cluster, "nice-client", "nginx-1", 80, Protocol::Tcp, Duration::from_secs(1)));
    assert!(probe_pod(&cluster, "interactivetest", "nginx-1", 80, Protocol::Tcp, Duration::from_secs(1)));
    api.apply(yaml("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad-cidr, namespace: default}\n\
        spec:\n  podSelector: {matchLabels: {iamnice: 'yeah'}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/33}\n"));
    api.apply(yaml("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad-operator, namespace: default}\n\
        spec:\n  futureField: {x: 1}\n  podSelector: {matchExpressions: [{key: app, operator: Sometimes, values: [build-code]}]}\n  ingress: [{}]\n"));
    api.apply(yaml("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: undecodable, namespace: default}\nspec: {podSelector: 12}\n"));
    api.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pending", "namespace": "default", "labels": {"run": "nginx"}},
                     "spec": {"nodeName": "node0", "containers": [{"name": "c", "image": "x"}]}, "status": {"phase": "Pending"}, "surprise": true}));
    policies.extend(["default/bad-cidr", "default/bad-operator", "default/undecodable"]);
    check(&cluster, &api, &policies, "malformed objects", Duration::from_secs(3));
    assert!(!probe_pod(&cluster, "nice-client", "nginx-1", 80, Protocol::Tcp, Duration::from_millis(500)), "bad CIDR must fail closed");
    assert!(!probe_pod(&cluster, "interactivetest", "nginx-1", 80, Protocol::Tcp, Duration::from_millis(500)), "undecodable policy must fail closed");

    let samples = parse_metrics(&http_get(&cluster, 0, "/metrics").expect("scrape").1);
    assert!(metric(&samples, "netsieve_invalid_objects_total{kind=\"NetworkPolicy\",reason=\"invalid_policy\"}") >= 2.0);
    assert!(metric(&samples, "netsieve_invalid_objects_total{kind=\"NetworkPolicy\",reason=\"undecodable\"}") >= 1.0);
    assert!(metric(&samples, "netsieve_invalid_objects_total{kind=\"NetworkPolicy\",reason=\"unknown_fields\"}") >= 1.0);
    assert!(metric(&samples, "netsieve_invalid_objects_total{kind=\"Pod\",reason=\"unknown_fields\"}") >= 1.0);
    assert!(metric(&samples, "netsieve_invalid_objects_total{kind=\"Pod\",reason=\"without_ip\"}") >= 1.0);
    assert!(metric(&samples, "netsieve_policies_invalid") >= 3.0);
    assert!(metric(&samples, "netsieve_api_watch_restarts_total{resource=\"pods\"}") >= 1.0);
    assert!(metric(&samples, "netsieve_api_relists_total{resource=\"pods\"}") >= 1.0);
    assert!(metric(&samples, "netsieve_endpoints_failed_closed") >= 0.0);
    let latency_count = metric(&samples, "netsieve_policy_programming_duration_seconds_count");
    let under_10ms = metric(&samples, "netsieve_policy_programming_duration_seconds_bucket{le=\"0.01\"}");
    eprintln!("programming latency: {under_10ms} of {latency_count} batches within 10 ms");

    // Deleting the broken policies restores the earlier verdicts.
    for key in ["default/bad-cidr", "default/bad-operator", "default/undecodable"] {
        let (ns, name) = key.split_once('/').expect("key");
        api.delete(Resource::NetworkPolicies, &format!("{ns}/{name}"));
    }
    check(&cluster, &api, &policies, "broken policies deleted", Duration::from_secs(3));

    let outputs = agents.stop();
    for (success, stderr) in &outputs {
        assert!(*success, "agent did not exit cleanly:\n{stderr}");
        assert!(stderr.contains("source: Kubernetes API"), "{stderr}");
    }
    assert!(probe_pod(&cluster, "cache-store", "nginx-1", 80, Protocol::Tcp, Duration::from_secs(2)), "programs detached on SIGTERM");
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}
