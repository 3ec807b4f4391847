//! The demo `cargo xtask demo` runs: a two-node cluster of network namespaces on this machine
//! (laid out like kind's default CNI), one netsieve agent per node, the seed scenarios
//! `iamnice` (seed 002) and `cache-store` (seed 003), real connections that are blocked and
//! allowed, the kernel's drop counters, and cleanup.
//!
//! Usage: netsieve-demo PATH/TO/netsieve
use netsieve_tests::netns::{Cluster, eventually};
use netsieve_tests::seed_cluster::{Agents, PODS, layout, remove_mount_root, write_manifests};
use std::path::PathBuf;
use std::time::Duration;

fn main() {
    if let Err(error) = run() {
        eprintln!("demo failed: {error}");
        std::process::exit(1);
    }
}

fn probe(cluster: &Cluster, from: &str, to: &str, port: u16, expect: bool) -> Result<(), String> {
    let ok = cluster.tcp_connects(from, &cluster.pod(to).ip, port, Duration::from_secs(1));
    println!(
        "  {from:>15} -> {to}:{port:<5} {}",
        if ok { "connected" } else { "blocked (timed out)" }
    );
    if ok != expect {
        return Err(format!("{from} -> {to}:{port} should have been {}", if expect { "allowed" } else { "blocked" }));
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let binary = PathBuf::from(std::env::args().nth(1).ok_or("usage: netsieve-demo PATH/TO/netsieve")?);
    let mut cluster = Cluster::new("demo", 2, &layout()).map_err(|e| e.to_string())?;
    println!("cluster: 2 nodes, {} pods (network namespaces {}-*)", PODS.len(), cluster.id);
    for pod in &cluster.pods {
        println!("  {:<16} node{} {:<12} host veth {}", pod.name, pod.node, pod.ip, pod.host_veth);
    }
    cluster.serve_tcp("nginx-1", 80).map_err(|e| e.to_string())?;
    cluster.serve_tcp("cache-store", 6379).map_err(|e| e.to_string())?;

    println!("\nwithout netsieve (the CNI gives connectivity, no policy):");
    probe(&cluster, "interactivetest", "nginx-1", 80, true)?;
    probe(&cluster, "build-code", "cache-store", 6379, true)?;

    let dir = std::env::temp_dir().join(format!("netsieve-demo-{}", cluster.id));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    write_manifests(&dir, &cluster).map_err(|e| e.to_string())?;
    println!("\nmanifests in {}: seed 002 access-nginx and seed 003 cache-store-allow-ingress", dir.display());
    let mut agents = Agents::start(&cluster, &binary, &dir, &["--counters-interval", "0"]).map_err(|e| e.to_string())?;
    for node in &cluster.nodes {
        println!("started: ip netns exec {} {} agent --node {} --manifests {}", node.netns, binary.display(), node.name, dir.display());
    }
    let nginx = cluster.pod("nginx-1").ip.clone();
    if !eventually(Duration::from_secs(15), || !cluster.tcp_connects("interactivetest", &nginx, 80, Duration::from_millis(300))) {
        return Err("the agents did not start enforcing within 15 s".into());
    }

    println!("\nwith netsieve:");
    println!(" seed 002: only pods labelled iamnice=yeah may reach nginx");
    probe(&cluster, "interactivetest", "nginx-1", 80, false)?;
    probe(&cluster, "nice-client", "nginx-1", 80, true)?;
    println!(" seed 003: only internal-proxy of namespace default may reach the cache, on 6379/TCP");
    probe(&cluster, "build-code", "cache-store", 6379, false)?;
    probe(&cluster, "internal-proxy", "cache-store", 6379, true)?;

    // Each agent serves Prometheus metrics and health on :9090 inside its node's namespace.
    std::thread::sleep(Duration::from_millis(700));
    println!("\nmetrics from node0's agent (curl 127.0.0.1:9090/metrics in its namespace), non-zero series:");
    let ready = cluster.http_get(0, 9090, "/readyz").map(|(code, body)| format!("{code} {}", body.trim()));
    let (_, text) = cluster.http_get(0, 9090, "/metrics").ok_or("node0's agent does not serve /metrics")?;
    let wanted = ["netsieve_drops_total", "netsieve_endpoint_packets_total", "netsieve_endpoints ", "netsieve_policies ",
                  "netsieve_identities ", "netsieve_policy_programming_duration_seconds_count"];
    for line in text.lines().filter(|l| wanted.iter().any(|w| l.starts_with(w)) && !l.ends_with(" 0")) {
        println!("  {line}");
    }
    println!("  /readyz: {}", ready.unwrap_or_else(|| "no answer".into()));

    let logs = agents.stop();
    println!("\ndrop counters from the kernel (per node, direction/reason=packets):");
    for (node, (_, log)) in cluster.nodes.iter().zip(&logs) {
        let counters = log.lines().rev().find(|l| l.contains("drop counters")).unwrap_or("(none)");
        let summary = counters.split("drops=").nth(1).unwrap_or(counters);
        println!("  {}: {}", node.name, summary.trim());
    }
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    println!("\ncleaned up: agents stopped (programs detached), namespaces deleted");
    Ok(())
}
