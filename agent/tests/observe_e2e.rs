//! Observability end to end, on the network-namespace cluster with real agents: verdict events
//! of real denied and allowed probes through `netsieve monitor` (JSON lines, filters, exit
//! when the agent stops), `netsieve status` and live `netsieve explain --agent` against the
//! offline `explain` on the same state, exact counters under the event rate limit, and audit
//! mode (namespace annotation and node-wide). Needs root; touches nothing outside the
//! namespaces it creates.
mod common;
use common::observe::{Monitor, agent_logs, drops, endpoint, event_counter, run, status, try_status, wait_subscribers};
use common::{SEED_PROBES, probe_pod};
use netsieve_tests::netns::{Cluster, eventually, in_netns, namespaces_with_prefix};
use netsieve_tests::seed_cluster::{
    Agents, NAMESPACES, agent_socket, layout, namespace_of, remove_mount_root, serve_seed, write_atomically, write_manifests,
};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn manifests_dir(cluster: &Cluster) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netsieve-observe-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("manifests dir");
    dir
}

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_netsieve"))
}

fn finish(cluster: Cluster, dir: &Path) {
    let prefix = format!("nsv-{}", cluster.id);
    let _ = std::fs::remove_dir_all(dir);
    remove_mount_root(&cluster);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}

fn is_rfc3339(text: &str) -> bool {
    text.parse::<jiff::Timestamp>().is_ok()
}

/// The event of a probe from `src` to `dst` on `port` with `verdict`.
fn probe_event<'a>(events: &'a [serde_json::Value], verdict: &str, src: &str, dst: &str, port: u64) -> Option<&'a serde_json::Value> {
    events.iter().find(|e| e["verdict"] == verdict && e["src"]["pod"] == src && e["dst"]["pod"] == dst && e["dst"]["port"] == port)
}

#[test]
fn events_monitor_status_and_live_explain() {
    let mut cluster = Cluster::new("obsev", 2, &layout()).expect("cluster");
    serve_seed(&mut cluster).expect("servers");
    let dir = manifests_dir(&cluster);
    write_manifests(&dir, &cluster).expect("manifests");
    let mut agents = Agents::start(&cluster, binary(), &dir, &["--events-allowed", "--counters-interval", "0"]).expect("agents");
    let socket = agent_socket(&cluster, 0);
    let nginx = cluster.pod("nginx-1").ip.clone();
    if !eventually(Duration::from_secs(15), || !cluster.tcp_connects("interactivetest", &nginx, 80, Duration::from_millis(300))) {
        panic!("agent never started enforcing; agents:\n{}", agent_logs(&mut agents));
    }

    // Three monitors of node0's agent: everything, the cache's drops, and one text line of
    // nginx's drops.
    let all = Monitor::start(&socket, &["--output", "json"]);
    let cache = Monitor::start(&socket, &["--output", "json", "--pod", "secure-middleware/cache-store", "--verdict", "dropped"]);
    let one_line = Monitor::start(&socket, &["--namespace", "default", "--pod", "nginx-1", "--verdict", "dropped", "--direction", "ingress", "--count", "1"]);
    assert!(wait_subscribers(&socket, 3), "three monitors subscribed");

    let t = Duration::from_millis(500);
    assert!(!probe_pod(&cluster, "interactivetest", "nginx-1", 80, netsieve::policy::Protocol::Tcp, t), "denied");
    assert!(!probe_pod(&cluster, "build-code", "cache-store", 6379, netsieve::policy::Protocol::Tcp, t), "denied");
    assert!(probe_pod(&cluster, "nice-client", "nginx-1", 80, netsieve::policy::Protocol::Tcp, t), "allowed");

    // The denied probe: named by pods, the enforced pod's side, the reason.
    assert!(all.wait_for(Duration::from_secs(5), |e| e["verdict"] == "dropped" && e["dst"]["pod"] == "nginx-1"), "no drop event:\n{:#?}", all.lines());
    assert!(all.wait_for(Duration::from_secs(5), |e| e["verdict"] == "allowed" && e["src"]["pod"] == "nice-client"), "no allowed event");
    let events = all.events();
    let denied = probe_event(&events, "dropped", "interactivetest", "nginx-1", 80).unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(denied["reason"], "policy_denied");
    assert_eq!(denied["direction"], "ingress");
    assert_eq!(denied["protocol"], "TCP");
    assert_eq!(denied["node"], "node0");
    assert_eq!(denied["hook"], "tc");
    assert_eq!((&denied["src"]["namespace"], &denied["dst"]["namespace"]), (&"default".into(), &"default".into()));
    assert_eq!(denied["src"]["ip"], cluster.pod("interactivetest").ip.as_str());
    assert_eq!(denied["dst"]["ip"], nginx.as_str());
    assert!(denied["src"]["port"].as_u64().is_some_and(|p| p >= 1024), "the client's port: {denied}");
    assert_eq!(denied["endpoint"]["pod"], "nginx-1");
    assert_eq!(denied["endpoint"]["interface"], cluster.pod("nginx-1").host_veth.as_str());
    assert!(denied["time"].as_str().is_some_and(is_rfc3339), "{denied}");
    assert!(denied.get("rule").is_none(), "a drop names no admitting rule");
    let cache_drop = probe_event(&events, "dropped", "build-code", "cache-store", 6379).expect("the cache drop");
    assert_eq!((&cache_drop["dst"]["namespace"], &cache_drop["reason"]), (&"secure-middleware".into(), &"policy_denied".into()));
    // The allowed flow names the NetworkPolicy rule that admitted it.
    let allowed = probe_event(&events, "allowed", "nice-client", "nginx-1", 80).expect("allowed event");
    assert_eq!(allowed["reason"], "rule");
    assert_eq!(allowed["rule"], serde_json::json!({"policy": "default/access-nginx", "direction": "ingress", "index": 0}));
    // Every line has the documented fields.
    for event in &events {
        for key in ["time", "verdict", "reason", "direction", "protocol", "src", "dst"] {
            assert!(event.get(key).is_some(), "{key} missing: {event}");
        }
        assert!(event["src"]["ip"].is_string() && event["dst"]["port"].is_u64(), "{event}");
        assert!(["dropped", "allowed", "audit"].contains(&event["verdict"].as_str().unwrap_or("")), "{event}");
        assert!(["ingress", "egress"].contains(&event["direction"].as_str().unwrap_or("")), "{event}");
    }

    // Filters: the cache monitor saw the cache's drop and nothing else.
    assert!(cache.wait_for(Duration::from_secs(5), |e| e["src"]["pod"] == "build-code"), "cache monitor: {:#?}", cache.lines());
    for event in cache.events() {
        assert_eq!(event["verdict"], "dropped", "{event}");
        let is_cache = |p: &serde_json::Value| p["namespace"] == "secure-middleware" && p["pod"] == "cache-store";
        assert!(is_cache(&event["src"]) || is_cache(&event["dst"]), "{event}");
    }
    // --count 1, text: one line, then exit 0.
    let (exit, lines, stderr) = one_line.wait_exit(Duration::from_secs(5));
    assert!(exit.is_some_and(|s| s.success()), "monitor --count 1: {exit:?} {stderr}");
    // Shown with --nocapture: the README's sample output comes from here.
    eprintln!("SAMPLE monitor (stderr, stdout):\n{stderr}{}", lines.join("\n"));
    assert_eq!(lines.len(), 1, "{lines:?}");
    let expected_start = format!("DROPPED ingress default/interactivetest {}:", cluster.pod("interactivetest").ip);
    assert!(
        lines[0].contains(&expected_start) && lines[0].contains(&format!("-> default/nginx-1 {nginx}:80 TCP policy_denied")),
        "{}",
        lines[0]
    );

    // Status: the node's endpoints and how they are programmed.
    let node0 = status(&socket);
    assert_eq!(node0["node"], "node0");
    assert_eq!(node0["ready"], true);
    assert_eq!(node0["audit"], serde_json::json!({"node_wide": false, "namespaces": []}));
    assert!(node0["last_programmed"].as_str().is_some_and(is_rfc3339));
    let names: Vec<String> =
        node0["endpoints"].as_array().expect("endpoints").iter().map(|e| format!("{}/{}", e["namespace"].as_str().unwrap_or(""), e["pod"].as_str().unwrap_or(""))).collect();
    let mut expected: Vec<String> = layout().iter().filter(|(_, node)| *node == 0).map(|(pod, _)| format!("{}/{pod}", namespace_of(pod))).collect();
    expected.sort();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "node0's endpoints");
    let nginx_status = endpoint(&node0, "default/nginx-1");
    assert_eq!(nginx_status["interface"], cluster.pod("nginx-1").host_veth.as_str());
    assert_eq!(nginx_status["mode"], "policy");
    assert!(nginx_status["identity"].as_u64().is_some_and(|i| i >= 256));
    assert_eq!(nginx_status["ingress"]["isolated"], true);
    assert_eq!(nginx_status["ingress"]["policies"], serde_json::json!(["default/access-nginx"]));
    assert_eq!(nginx_status["egress"]["isolated"], false);
    assert!(nginx_status["ingress"]["packets"]["denied"].as_u64().is_some_and(|n| n >= 1));
    assert!(nginx_status["ingress"]["packets"]["allowed"].as_u64().is_some_and(|n| n >= 1));
    let nginx_rule = &nginx_status["ingress"]["rules"][0];
    assert_eq!((&nginx_rule["policy"], &nginx_rule["index"]), (&"default/access-nginx".into(), &0.into()));
    assert!(nginx_rule["packets"].as_u64().is_some_and(|n| n >= 3), "the allowed connection's packets: {nginx_rule}");
    // The cache's rule (from internal-proxy) never matched yet; after a probe it has.
    let cache_rule = |s: &serde_json::Value| endpoint(s, "secure-middleware/cache-store")["ingress"]["rules"][0]["packets"].as_u64();
    assert_eq!(cache_rule(&node0), Some(0), "never matched");
    let socket_text = socket.to_string_lossy().to_string();
    let (_, text, _) = run(&["status", "--socket", socket_text.as_str()]);
    eprintln!("SAMPLE status:\n{text}");
    assert!(text.contains("rules that never matched (1):") && text.contains("secure-middleware/cache-store-allow-ingress ingress rule 0"), "{text}");
    let maps = node0["maps"].as_array().expect("maps");
    let endpoints_map = maps.iter().find(|m| m["name"] == "ENDPOINTS").expect("ENDPOINTS");
    assert_eq!(endpoints_map["entries"].as_u64(), Some(expected.len() as u64));
    assert!(maps.iter().all(|m| m["capacity"].as_u64().is_some_and(|c| c > 0)));
    assert!(probe_pod(&cluster, "internal-proxy", "cache-store", 6379, netsieve::policy::Protocol::Tcp, t), "allowed");
    assert!(eventually(Duration::from_secs(3), || cache_rule(&status(&socket)).is_some_and(|n| n > 0)), "the rule matched");

    // Live explain agrees with offline explain on every probe of the matrix, and its
    // programmed maps agree with the semantics.
    let socket_arg = socket.to_string_lossy().to_string();
    let dir_arg = dir.to_string_lossy().to_string();
    for (from, to, port, protocol) in SEED_PROBES {
        let (from, to) = (format!("{}/{from}", namespace_of(from)), format!("{}/{to}", namespace_of(to)));
        let port = port.to_string();
        let protocol = protocol.to_string();
        let flow = ["--from", from.as_str(), "--to", to.as_str(), "--port", port.as_str(), "--protocol", protocol.as_str(), "--output", "json"];
        let (offline_code, offline, _) = run(&[&["explain", "--manifests", dir_arg.as_str()][..], &flow[..]].concat());
        let (live_code, live, stderr) = run(&[&["explain", "--agent", "--socket", socket_arg.as_str()][..], &flow[..]].concat());
        assert_eq!(live_code, offline_code, "{from} -> {to}: exit status; {stderr}");
        let (offline, live): (serde_json::Value, serde_json::Value) =
            (serde_json::from_str(&offline).expect("json"), serde_json::from_str(&live).expect("json"));
        for key in ["allowed", "flow", "exception", "egress", "ingress", "manifest_errors"] {
            assert_eq!(live[key], offline[key], "{from} -> {to}:{port}: {key}");
        }
        for check in live["programmed"].as_array().expect("programmed") {
            assert_eq!(check["agrees"], true, "{from} -> {to}: {check}");
        }
    }
    // Conntrack: the allowed connection is there on nginx's interface, the denied one not.
    let (code, text, _) = run(&["explain", "--agent", "--socket", socket_arg.as_str(), "--from", "default/nice-client", "--to", "default/nginx-1", "--port", "80", "--output", "json"]);
    assert_eq!(code, 0);
    let live: serde_json::Value = serde_json::from_str(&text).expect("json");
    let entries = live["conntrack"]["entries"].as_array().expect("entries");
    assert!(!entries.is_empty(), "the allowed connection is in conntrack: {live:#}");
    let entry = &entries[0];
    assert_eq!(entry["interface"], cluster.pod("nginx-1").host_veth.as_str());
    assert_eq!((&entry["direction"], &entry["current"]), (&"ingress".into(), &true.into()));
    assert_eq!(entry["responder"]["port"], 80);
    assert!(entry["last_seen"].as_str().is_some_and(is_rfc3339));
    assert!(entry["since"].as_str().is_some_and(is_rfc3339));
    let (age, idle) = (entry["age_seconds"].as_u64().expect("age"), entry["idle_seconds"].as_u64().expect("idle"));
    assert!(age >= idle && age < 600, "admitted {age} s ago, last seen {idle} s ago: {entry}");
    assert_eq!(entry["rules"][0]["policy"], "default/access-nginx");
    // The denied connection: the client's egress (not isolated) tracked it, nginx's ingress
    // never did.
    let (code, text, _) = run(&["explain", "--agent", "--socket", socket_arg.as_str(), "--from", "default/interactivetest", "--to", "default/nginx-1", "--port", "80", "--output", "json"]);
    assert_eq!(code, 1);
    let live: serde_json::Value = serde_json::from_str(&text).expect("json");
    let entries = live["conntrack"]["entries"].as_array().expect("entries");
    assert!(!entries.is_empty(), "the client's egress tracked its attempts: {live:#}");
    for entry in entries {
        assert_eq!(entry["interface"], cluster.pod("interactivetest").host_veth.as_str(), "{entry}");
        assert_eq!(entry["direction"], "egress", "{entry}");
    }
    let (code, text, _) = run(&["explain", "--agent", "--socket", socket_arg.as_str(), "--from", "default/interactivetest", "--to", "default/nginx-1", "--port", "80"]);
    assert_eq!(code, 1);
    assert!(text.starts_with("DENIED") && text.contains("the programmed maps deny it"), "{text}");
    // A flow nobody tried: no entry anywhere.
    let (code, text, _) = run(&["explain", "--agent", "--socket", socket_arg.as_str(), "--from", "default/build-code", "--to", "default/nginx-1", "--port", "80"]);
    assert_eq!(code, 1);
    assert!(text.starts_with("DENIED") && text.contains("conntrack: no entry"), "{text}");
    let (code, _, stderr) = run(&["explain", "--agent", "--socket", socket_arg.as_str(), "--from", "default/nobody", "--to", "default/nginx-1", "--port", "80"]);
    assert_eq!(code, 2, "an unknown pod is an error: {stderr}");

    // The agents stop: the monitors say so and exit 0.
    let outputs = agents.stop();
    assert!(outputs.iter().all(|(ok, _)| *ok), "agents stopped cleanly");
    for monitor in [all, cache] {
        let (exit, _, stderr) = monitor.wait_exit(Duration::from_secs(5));
        assert!(exit.is_some_and(|s| s.success()), "monitor exit {exit:?}: {stderr}");
        assert!(stderr.contains("the agent closed the stream"), "{stderr}");
    }
    finish(cluster, &dir);
}

/// Sends `count` UDP datagrams from pod netns `netns` to `to`, paced over `duration`, from one
/// socket; returns (source port, datagrams the kernel accepted).
fn send_udp_flood(netns: &str, to: SocketAddr, count: u32, duration: Duration) -> (u16, u32) {
    let handle = in_netns(netns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
        let started = Instant::now();
        let mut sent = 0;
        for i in 0..count {
            let due = duration * i / count;
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            if socket.send_to(b"flood", to).is_ok() {
                sent += 1;
            }
        }
        (port, sent)
    })
    .expect("sender");
    handle.join().expect("sender thread").expect("netns")
}

#[test]
fn counters_stay_exact_when_the_rate_limit_drops_events() {
    let cluster = Cluster::new("obsrl", 1, &[("target", 0), ("sender", 0)]).expect("cluster");
    let dir = manifests_dir(&cluster);
    let mut pods = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for name in ["target", "sender"] {
        let ip = &cluster.pod(name).ip;
        pods.push_str(&format!(
            "- {{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}, spec: {{nodeName: node0, containers: [{{name: c, image: x}}]}}, status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}}}\n"
        ));
    }
    write_atomically(&dir.join("pods.yaml"), &pods).expect("pods");
    write_atomically(
        &dir.join("deny.yaml"),
        "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: deny-target, namespace: default}, spec: {podSelector: {matchLabels: {app: target}}, policyTypes: [Ingress]}}\n",
    )
    .expect("policy");
    // Burst 10 and 5 per second per CPU: a flood of thousands emits a few dozen events.
    let mut agents =
        Agents::start(&cluster, binary(), &dir, &["--events-per-second", "5", "--events-burst", "10", "--counters-interval", "0"]).expect("agent");
    let socket = agent_socket(&cluster, 0);
    let target: SocketAddr = format!("{}:9999", cluster.pod("target").ip).parse().expect("addr");
    let sender_ns = cluster.pod("sender").netns.clone();
    assert!(
        eventually(Duration::from_secs(15), || {
            try_status(&socket).is_ok_and(|s| s["endpoints"].as_array().is_some_and(|e| e.len() == 2)) && {
                // Resolves the neighbours on the way; the datagram itself is denied.
                send_udp_flood(&sender_ns, target, 1, Duration::ZERO);
                drops(&status(&socket), "drops", "policy_denied", "ingress") > 0
            }
        }),
        "the agent never enforced"
    );
    let monitor = Monitor::start(&socket, &["--output", "json", "--pod", "default/target"]);
    assert!(wait_subscribers(&socket, 1));
    // Let the buckets refill after the warm-up.
    std::thread::sleep(Duration::from_secs(3));
    let before = status(&socket);
    let started = Instant::now();
    let (port, sent) = send_udp_flood(&sender_ns, target, 3000, Duration::from_secs(1));
    let elapsed = started.elapsed();
    assert_eq!(sent, 3000, "every datagram left the sender");
    std::thread::sleep(Duration::from_millis(1500));
    let after = status(&socket);
    let delta = |f: &dyn Fn(&serde_json::Value) -> u64| f(&after) - f(&before);
    let denied = delta(&|s| endpoint(s, "default/target")["ingress"]["packets"]["denied"].as_u64().unwrap_or(0));
    let dropped = delta(&|s| drops(s, "drops", "policy_denied", "ingress"));
    let emitted = delta(&|s| event_counter(s, "emitted"));
    let rate_limited = delta(&|s| event_counter(s, "rate_limited"));
    let ring_full = delta(&|s| event_counter(s, "ring_full"));
    let flood_events = monitor.events().iter().filter(|e| e["src"]["port"] == port).count() as u64;
    eprintln!(
        "RESULT rate limit 5/s burst 10 per CPU: sent {sent} in {elapsed:?}; denied {denied}, drops {dropped}; events emitted {emitted}, rate limited {rate_limited}, ring full {ring_full}; monitor got {flood_events}"
    );
    assert_eq!(denied, u64::from(sent), "the pod's denied counter counts every packet");
    assert_eq!(dropped, u64::from(sent), "the drop counter counts every packet");
    assert_eq!(emitted + rate_limited + ring_full, u64::from(sent), "every packet is an event emitted or counted as not emitted");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let ceiling = cpus * (10 + 5 * (elapsed.as_secs() + 2));
    assert!(emitted > 0 && emitted <= ceiling, "{emitted} events emitted, at most {ceiling} allowed by the rate limit");
    assert!(rate_limited >= u64::from(sent) - ceiling, "the rest was rate limited");
    assert_eq!(flood_events, emitted, "the monitor received every event emitted");
    assert_eq!(event_counter(&after, "dropped_slow_subscribers"), 0);
    agents.stop();
    drop(monitor);
    finish(cluster, &dir);
}

/// Namespaces with `secure-middleware` annotated for audit mode.
fn audited_namespaces(audit: bool) -> String {
    if !audit {
        return NAMESPACES.to_string();
    }
    NAMESPACES.replace(
        "metadata: {name: secure-middleware}",
        "metadata: {name: secure-middleware, annotations: {netsieve.io/audit: 'true'}}",
    )
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[test]
fn audit_mode_passes_traffic_and_reports_it() {
    let mut cluster = Cluster::new("obsau", 2, &layout()).expect("cluster");
    serve_seed(&mut cluster).expect("servers");
    let dir = manifests_dir(&cluster);
    write_manifests(&dir, &cluster).expect("manifests");
    write_atomically(&dir.join("namespaces.yaml"), &audited_namespaces(true)).expect("namespaces");
    let mut agents = Agents::start(&cluster, binary(), &dir, &["--counters-interval", "0"]).expect("agents");
    let socket = agent_socket(&cluster, 0);
    let nginx = cluster.pod("nginx-1").ip.clone();
    let cache = cluster.pod("cache-store").ip.clone();
    let t = Duration::from_millis(500);
    if !eventually(Duration::from_secs(15), || !cluster.tcp_connects("interactivetest", &nginx, 80, t)) {
        panic!("never enforcing; agents:\n{}", agent_logs(&mut agents));
    }
    let monitor = Monitor::start(&socket, &["--output", "json", "--verdict", "audit"]);
    assert!(wait_subscribers(&socket, 1));

    // The cache's namespace is in audit mode: what its policy denies passes, and is reported.
    assert!(cluster.tcp_connects("build-code", &cache, 6379, t), "audit mode passes the would-be drop");
    assert!(!cluster.tcp_connects("interactivetest", &nginx, 80, t), "other namespaces are enforced");
    assert!(monitor.wait_for(Duration::from_secs(5), |e| e["src"]["pod"] == "build-code"), "no audit event: {:#?}", monitor.lines());
    let events = monitor.events();
    let audit = probe_event(&events, "audit", "build-code", "cache-store", 6379).expect("audit event");
    assert_eq!((&audit["reason"], &audit["direction"]), (&"policy_denied".into(), &"ingress".into()));
    assert!(events.iter().all(|e| e["verdict"] == "audit"), "the filter: {events:#?}");

    let node0 = status(&socket);
    assert_eq!(node0["audit"], serde_json::json!({"node_wide": false, "namespaces": ["secure-middleware"]}));
    let cache_status = endpoint(&node0, "secure-middleware/cache-store");
    assert_eq!(cache_status["audit"], true);
    assert!(cache_status["ingress"]["packets"]["audited"].as_u64().is_some_and(|n| n >= 1), "{cache_status}");
    assert_eq!(endpoint(&node0, "default/nginx-1")["audit"], false);
    assert!(drops(&node0, "audited", "policy_denied", "ingress") >= 1);
    let socket_text = socket.to_string_lossy().to_string();
    let (_, text, _) = run(&["status", "--socket", socket_text.as_str()]);
    assert!(text.contains("audit mode: ON, namespaces secure-middleware"), "{text}");
    // Metrics and /readyz say it, so nobody mistakes it for enforcement.
    // The agent refreshes its metrics from the kernel counters every 500 ms, while status read
    // them just now: wait (bounded) for the snapshot that includes the audited packet.
    let audited_metric = "netsieve_audit_total{direction=\"ingress\",reason=\"policy_denied\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let body = cluster.http_get(0, 9090, "/metrics").map(|(_, body)| body).unwrap_or_default();
        if metric(&body, audited_metric).is_some_and(|n| n >= 1.0) || Instant::now() >= deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(metric(&metrics, "netsieve_audit_mode"), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, "netsieve_audit_namespace{namespace=\"secure-middleware\"}"), Some(1.0));
    assert!(metric(&metrics, audited_metric).is_some_and(|n| n >= 1.0), "{metrics}");
    assert_eq!(metric(&metrics, "netsieve_drops_total{direction=\"ingress\",reason=\"policy_denied\"}").map(|n| n >= 1.0), Some(true));
    let ready = cluster.http_get(0, 9090, "/readyz");
    assert_eq!(ready, Some((200, "ready (audit mode: namespaces secure-middleware)\n".to_string())));
    // Live explain says what policy says (denied) and that audit mode passes it.
    let (code, text, _) = run(&["explain", "--agent", "--socket", socket_text.as_str(), "--from", "default/build-code", "--to", "secure-middleware/cache-store", "--port", "6379"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("AUDIT MODE: it passes and is reported as audit"), "{text}");

    // The annotation goes: enforced again.
    write_atomically(&dir.join("namespaces.yaml"), &audited_namespaces(false)).expect("namespaces");
    assert!(eventually(Duration::from_secs(3), || !cluster.tcp_connects("build-code", &cache, 6379, t)), "enforced again");
    assert_eq!(cluster.http_get(0, 9090, "/readyz"), Some((200, "ready\n".to_string())));
    assert_eq!(status(&socket)["audit"]["namespaces"], serde_json::json!([]));
    agents.stop();
    drop(monitor);

    // Node-wide: --audit.
    let mut agents = Agents::start(&cluster, binary(), &dir, &["--audit", "--counters-interval", "0"]).expect("agents");
    assert!(
        eventually(Duration::from_secs(15), || cluster.http_get(0, 9090, "/readyz").is_some_and(|(c, _)| c == 200)),
        "agents ready"
    );
    assert!(cluster.tcp_connects("interactivetest", &nginx, 80, t), "node-wide audit passes the would-be drop");
    assert_eq!(cluster.http_get(0, 9090, "/readyz"), Some((200, "ready (audit mode: node-wide)\n".to_string())));
    assert_eq!(status(&socket)["audit"]["node_wide"], true);
    agents.stop();
    finish(cluster, &dir);
}
