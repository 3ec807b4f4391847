//! The demo `cargo xtask demo` runs: a two-node cluster of network namespaces on this machine
//! (laid out like kind's default CNI), one netsieve agent per node, the seed scenarios
//! `iamnice` (seed 002) and `cache-store` (seed 003), real connections that are blocked and
//! allowed, the kernel's drop counters, and cleanup. Then Services: a second cluster with
//! kube-proxy emulated in iptables mode, where seed 001's default deny + "allow DNS to kube-dns"
//! must let a pod resolve names through the kube-dns ClusterIP and nothing else.
//!
//! Usage: netsieve-demo PATH/TO/netsieve
use netsieve_tests::kube_proxy::KubeProxy;
use netsieve_tests::netns::{Cluster, Transport, eventually};
use netsieve_tests::seed_cluster::{Agents, PODS, layout, remove_mount_root, write_manifests};
use netsieve_tests::service_cluster::{self, KUBE_DNS_IP};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn main() {
    let binary = match std::env::args().nth(1) {
        Some(path) => PathBuf::from(path),
        None => {
            eprintln!("usage: netsieve-demo PATH/TO/netsieve");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(&binary).and_then(|()| services(&binary)) {
        eprintln!("demo failed: {error}");
        std::process::exit(1);
    }
}

/// `netsieve explain` on a flow: whether the policies allow it.
fn policy_allows(binary: &Path, dir: &Path, from: &str, to: &str, port: u16, transport: Transport) -> Result<bool, String> {
    let status = Command::new(binary)
        .arg("explain")
        .arg("--manifests")
        .arg(dir)
        .args(["--from", from, "--to", to, "--port", &port.to_string(), "--protocol", transport.kubernetes_name(), "--output", "json"])
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("running netsieve explain: {e}"))?;
    match status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(format!("netsieve explain {from} -> {to}:{port} failed with {status}")),
    }
}

/// Seed 001 through Services: default deny in `prod` plus "allow DNS to k8s-app=kube-dns in
/// kube-system", with kube-proxy's iptables rules in each node's namespace. Each connection is
/// shown with the backend kube-proxy chose and what the policies say of that backend.
fn services(binary: &Path) -> Result<(), String> {
    let cluster = service_cluster::build("demo-svc", false).map_err(|e| e.to_string())?;
    let proxy = KubeProxy::iptables(&cluster).map_err(|e| e.to_string())?;
    let dns = cluster.service("kube-system", "kube-dns").map_err(|e| e.to_string())?;
    println!("\nServices: a second cluster (network namespaces {}-*), kube-proxy in iptables mode", cluster.id);
    println!("(iptables-legacy rules in each node's namespace: KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* -> DNAT)");
    for port in &dns.ports {
        let backends: Vec<String> = port.endpoints.iter().map(|e| format!("{} {}", e.pod, e.addr())).collect();
        println!("  kube-system/kube-dns {}:{}/{} -> {}", dns.cluster_ip, port.port.port, port.port.transport, backends.join(", "));
    }
    let rules = proxy.ruleset(0).map_err(|e| e.to_string())?;
    println!("  node0's rules for kube-dns:dns (iptables-legacy-save -t nat):");
    let svc_chain = rules.lines().find(|l| l.contains("kube-system/kube-dns:dns cluster IP") && l.starts_with("-A KUBE-SERVICES"));
    let chain = svc_chain.and_then(|l| l.split_whitespace().last()).unwrap_or("KUBE-SVC-");
    for line in rules.lines().filter(|l| l.contains("kube-system/kube-dns:dns ") || l.starts_with(&format!("-A {chain}"))) {
        println!("    {line}");
    }

    let dns_addr = SocketAddr::from((KUBE_DNS_IP, 53));
    let lookup = |stage: &str| match cluster.resolve("worker", dns_addr, Transport::Udp, "orders.prod.svc.cluster.local", Duration::from_millis(800)) {
        Ok(ips) => println!("  {stage}: prod/worker resolves orders.prod.svc.cluster.local via {dns_addr}: {ips:?}"),
        Err(error) => println!("  {stage}: prod/worker resolves orders.prod.svc.cluster.local via {dns_addr}: failed ({error})"),
    };
    println!();
    lookup("without netsieve");

    let dir = std::env::temp_dir().join(format!("netsieve-demo-{}", cluster.id));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    service_cluster::write_manifests(&dir, &cluster).map_err(|e| e.to_string())?;
    let mut agents = Agents::start(&cluster, binary, &dir, &["--counters-interval", "0"]).map_err(|e| e.to_string())?;
    service_cluster::wait_until_enforcing(&cluster, Duration::from_secs(20))?;
    println!("\nwith netsieve, prod has default-deny-all + allow-dns-egress (seed 001):");
    let mut mismatches = Vec::new();
    for (service, port, what) in [
        (("kube-system", "kube-dns"), "dns", "DNS over UDP through the kube-dns ClusterIP"),
        (("kube-system", "kube-dns"), "dns-tcp", "DNS over TCP through the kube-dns ClusterIP"),
        (("default", "fake-dns"), "dns", "a kube-dns-labelled pod in the wrong namespace"),
        (("prod", "orders"), "http", "anything else"),
    ] {
        let svc = cluster.service(service.0, service.1).map_err(|e| e.to_string())?;
        let transport = svc.port(port).map_err(|e| e.to_string())?.port.transport;
        for _ in 0..2 {
            let probe = proxy.probe(&cluster, "worker", svc, port, Duration::from_millis(500)).map_err(|e| e.to_string())?;
            let target = svc.addr(port).map_err(|e| e.to_string())?;
            let outcome = if probe.answer.is_some() { "answered" } else { "blocked" };
            let (chosen, expected) = match &probe.chosen {
                Some(endpoint) => {
                    let backend = format!("{}/{}", service_cluster::scenario_pod(&endpoint.pod).namespace, endpoint.pod);
                    let allowed = policy_allows(binary, &dir, "prod/worker", &backend, endpoint.port, transport)?;
                    (format!("kube-proxy chose {} {}", endpoint.pod, endpoint.addr()), Some(allowed))
                }
                None => ("never reached kube-proxy's DNAT".to_string(), None),
            };
            let verdict = match expected {
                Some(true) => "policy: allowed",
                Some(false) => "policy: denied",
                None => "policy: unknown (no backend chosen)",
            };
            println!("  prod/worker -> {target}/{transport} ({what}): {chosen}, {outcome}; {verdict}");
            if expected != Some(probe.answer.is_some()) {
                mismatches.push(format!("prod/worker -> {target}/{transport}: {outcome}, {chosen}, {verdict}"));
            }
        }
    }
    lookup("with netsieve");
    let _ = agents.stop();
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    println!("cleaned up: agents stopped, kube-proxy rules and namespaces deleted");
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} connection(s) through ClusterIPs disagree with the policies (issue 8: egress is judged before kube-proxy's DNAT):\n  {}",
            mismatches.len(),
            mismatches.join("\n  ")
        ))
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

fn run(binary: &Path) -> Result<(), String> {
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
    let mut agents = Agents::start(&cluster, binary, &dir, &["--counters-interval", "0"]).map_err(|e| e.to_string())?;
    for node in &cluster.nodes {
        println!("started: ip netns exec {} {} agent --node {} --manifests {}", node.netns, binary.display(), node.name, dir.display());
    }
    for node in 0..cluster.nodes.len() {
        if !eventually(Duration::from_secs(20), || cluster.http_get(node, 9090, "/readyz").is_some_and(|(code, _)| code == 200)) {
            return Err(format!("node{node}'s agent was not ready within 20 s"));
        }
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
