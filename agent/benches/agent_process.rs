//! The real agent process at 10,000 pods / 1,000 policies: `netsieve agent --kubeconfig` in a
//! node namespace against the in-process API server (`netsieve_tests::fake_apiserver`) holding
//! the synthetic cluster of `common/synthetic.rs`, with the node's ~100 pods as real network
//! namespaces and veths (the agent attaches to each). Measures time to ready, resident memory
//! of the agent process, and the agent's own event-to-maps histogram over a few hundred API
//! events, next to the time of the initial full programming in the same run.
//! Run with `cargo xtask bench` (root).
#[path = "common/synthetic.rs"]
mod synthetic;
use netsieve_tests::fake_apiserver::FakeApiServer;
use netsieve_tests::netns::Cluster;
use netsieve_tests::seed_cluster::{Agents, remove_mount_root};
use serde_json::json;
use std::time::{Duration, Instant};
use synthetic::{DEPLOYMENTS_PER_NAMESPACE, NAMESPACES, POLICIES_PER_NAMESPACE, REPLICAS, namespace_json, pod_json, pod_node, policy_json};

const PORT: u16 = 9090;

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (upper bound in seconds, cumulative count) of the programming latency histogram.
fn histogram(cluster: &Cluster) -> Vec<(f64, f64)> {
    let text = cluster.http_get(0, PORT, "/metrics").map(|r| r.1).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("netsieve_policy_programming_duration_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.parse().ok()?))
        })
        .collect()
}

fn gauge(cluster: &Cluster, name: &str) -> Option<f64> {
    let text = cluster.http_get(0, PORT, "/metrics")?.1;
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok())
}

/// The smallest bucket bound holding quantile `q` of the observations between two scrapes.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> (f64, f64) {
    let delta: Vec<(f64, f64)> =
        after.iter().zip(before).map(|((le, a), (_, b))| (*le, a - b)).collect();
    let total = delta.last().map_or(0.0, |d| d.1);
    let bound = delta.iter().find(|(_, n)| *n >= q * total).map_or(f64::INFINITY, |d| d.0);
    (bound, total)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut local = Vec::new();
    for ns in 0..NAMESPACES {
        for d in 0..DEPLOYMENTS_PER_NAMESPACE {
            for r in 0..REPLICAS {
                if pod_node(ns, d, r) == 0 {
                    local.push((ns, d, r));
                }
            }
        }
    }
    let names: Vec<String> = local.iter().map(|(ns, d, r)| format!("l{ns}-{d}-{r}")).collect();
    let layout: Vec<(&str, usize)> = names.iter().map(|n| (n.as_str(), 0)).collect();
    let started = Instant::now();
    let cluster = Cluster::new("agentbench", 1, &layout)?;
    eprintln!("{} pod namespaces built in {:?}", layout.len(), started.elapsed());
    let api = FakeApiServer::start(cluster.node_loopback_listeners()?)?;
    for ns in 0..NAMESPACES {
        api.apply(namespace_json(ns, false));
    }
    let local_ip = |ns: usize, d: usize, r: usize| {
        local.iter().position(|l| *l == (ns, d, r)).map(|i| cluster.pods[i].ip.clone())
    };
    let pod = |ns: usize, d: usize, r: usize, version: &str| {
        let mut object = pod_json(ns, d, r, version);
        if let Some(ip) = local_ip(ns, d, r) {
            object["status"]["podIP"] = json!(ip);
            object["status"]["podIPs"] = json!([{"ip": ip}]);
        }
        object
    };
    for ns in 0..NAMESPACES {
        for d in 0..DEPLOYMENTS_PER_NAMESPACE {
            for r in 0..REPLICAS {
                api.apply(pod(ns, d, r, "v1"));
            }
        }
        for i in 0..POLICIES_PER_NAMESPACE {
            api.apply(policy_json(ns, i, 8000));
        }
    }
    let dir = std::env::temp_dir().join(format!("netsieve-agentbench-{}", cluster.id));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, FakeApiServer::kubeconfig(api.addrs[0]))?;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let started = Instant::now();
    let mut agents = Agents::spawn(&cluster, binary, |_| {
        let k = kubeconfig.to_string_lossy().to_string();
        ["--kubeconfig", &k, "--metrics-addr", &format!("127.0.0.1:{PORT}"), "--counters-interval", "0"].map(String::from).to_vec()
    })?;
    let pid = agents.pids()[0];
    let mut ready = None;
    while started.elapsed() < Duration::from_secs(120) {
        if cluster.http_get(0, PORT, "/readyz").is_some_and(|(code, _)| code == 200) {
            ready = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(ready) = ready else {
        return Err(format!("agent not ready after 120 s: {:?}", agents.stop()).into());
    };
    let endpoints = gauge(&cluster, "netsieve_endpoints").unwrap_or(0.0);
    let initial = histogram(&cluster);
    let rss_ready = rss_kib(pid, "VmRSS:");

    // API events, spaced so that each is its own batch: remote pod relabelled, rollout to a
    // new identity, policy edit, namespace changing team; each applied then undone.
    let rounds = 50;
    for i in 0..rounds {
        let (ns, d) = (1 + i % (NAMESPACES - 1), i % DEPLOYMENTS_PER_NAMESPACE);
        let mut moved = pod(ns, d, 1, "v1");
        moved["metadata"]["labels"]["app"] = json!(format!("app{}", (d + 1) % DEPLOYMENTS_PER_NAMESPACE));
        let events = [
            moved,
            pod(ns, d, 1, "v1"),
            pod(ns, d, 2, "v2"),
            pod(ns, d, 2, "v1"),
            policy_json(ns, 4 + i % (POLICIES_PER_NAMESPACE - 4), 9000),
            policy_json(ns, 4 + i % (POLICIES_PER_NAMESPACE - 4), 8000),
            namespace_json(ns, true),
            namespace_json(ns, false),
        ];
        for event in events {
            api.apply(event);
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = histogram(&cluster);
    let rss_after = rss_kib(pid, "VmRSS:");
    let peak = rss_kib(pid, "VmHWM:");
    let (p50, batches) = quantile(&initial, &after, 0.5);
    let (p99, _) = quantile(&initial, &after, 0.99);
    let stopping = Instant::now();
    let outputs = agents.stop_within(Duration::from_secs(60));
    let stop_time = stopping.elapsed();
    let shutdown_line = outputs
        .iter()
        .flat_map(|(_, e)| e.lines())
        .find(|l| l.contains("agent stopped"))
        .unwrap_or("(no shutdown line)")
        .to_string();
    let clean = outputs.iter().all(|(ok, _)| *ok);

    println!("netsieve agent process benchmark: 10000 pods, 1000 policies via the in-process API server; {endpoints} local endpoints attached");
    println!("{:<58} {:>12}", "measure", "value");
    println!("{:<58} {:>12.2}", "start to ready (lists, compile, program, attach) s", ready.as_secs_f64());
    println!("{:<58} {:>12}", "resident memory when ready, MiB", rss_ready / 1024);
    println!("{:<58} {:>12}", "resident memory after events, MiB", rss_after / 1024);
    println!("{:<58} {:>12}", "peak resident memory, MiB", peak / 1024);
    println!("{:<58} {:>12}", "event batches programmed", batches);
    println!("{:<58} {:>12}", "p50 event-to-maps (histogram bucket bound), ms", format!("<= {}", p50 * 1e3));
    println!("{:<58} {:>12}", "p99 event-to-maps (histogram bucket bound), ms", format!("<= {}", p99 * 1e3));
    println!("{:<58} {:>12.0}", "ready time / p50 event (x)", ready.as_secs_f64() / p50.max(1e-9));
    println!("{:<58} {:>12.2}", "SIGTERM to exit (detach every program), s", stop_time.as_secs_f64());
    println!("agent exited cleanly on SIGTERM: {clean}; {shutdown_line}");
    if !clean {
        for (_, stderr) in &outputs {
            let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
            eprintln!("agent log tail:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    Ok(())
}
