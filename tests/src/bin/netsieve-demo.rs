//! The demo `cargo xtask demo` runs: a two-node cluster of network namespaces on this machine
//! (laid out like kind's default CNI), one netsieve agent per node, the seed scenarios
//! `iamnice` (seed 002) and `cache-store` (seed 003), real connections that are blocked and
//! allowed, the kernel's drop counters, and cleanup.
//!
//! Usage: netsieve-demo PATH/TO/netsieve
use netsieve_tests::netns::{Cluster, eventually};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

const PODS: &[(&str, &str, usize, &str)] = &[
    ("nginx-1", "default", 0, "{run: nginx}"),
    ("interactivetest", "default", 0, "{run: interactivetest}"),
    ("nice-client", "default", 1, "{run: interactivetest, iamnice: 'yeah'}"),
    ("cache-store", "secure-middleware", 0, "{app: cache-store}"),
    ("build-code", "default", 0, "{app: build-code}"),
    ("internal-proxy", "default", 1, "{app: internal-proxy}"),
];

const POLICIES: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: access-nginx, namespace: default}
spec:
  podSelector: {matchLabels: {run: nginx}}
  ingress:
  - from:
    - podSelector: {matchLabels: {iamnice: 'yeah'}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: cache-store-allow-ingress, namespace: secure-middleware}
spec:
  podSelector: {matchLabels: {app: cache-store}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: internal-proxy}}
      namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}
    ports:
    - {protocol: TCP, port: 6379}
";

struct Agents(Vec<Child>);

impl Agents {
    /// SIGTERM, then collect each agent's log.
    fn stop(&mut self) -> Vec<String> {
        let mut logs = Vec::new();
        for child in self.0.drain(..) {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if let Ok(output) = child.wait_with_output() {
                logs.push(String::from_utf8_lossy(&output.stderr).into_owned());
            }
        }
        logs
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

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
    let layout: Vec<(&str, usize)> = PODS.iter().map(|p| (p.0, p.2)).collect();
    let mut cluster = Cluster::new("demo", 2, &layout).map_err(|e| e.to_string())?;
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
    write_manifests(&dir, &cluster)?;
    println!("\nmanifests in {}: seed 002 access-nginx and seed 003 cache-store-allow-ingress", dir.display());

    let mut agents = Agents(Vec::new());
    let dir_arg = dir.to_string_lossy().to_string();
    for (index, node) in cluster.nodes.iter().enumerate() {
        let bpffs = format!("/run/netsieve-demo-{}/bpffs-{}", cluster.id, node.name);
        let args = ["agent", "--node", &node.name, "--manifests", &dir_arg, "--bpffs", &bpffs, "--counters-interval", "0"];
        let child = cluster.spawn_on_node(index, &binary, &args).map_err(|e| e.to_string())?;
        println!("started: ip netns exec {} {} {}", node.netns, binary.display(), args.join(" "));
        agents.0.push(child);
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

    let logs = agents.stop();
    println!("\ndrop counters from the kernel (per node, direction/reason=packets):");
    for (node, log) in cluster.nodes.iter().zip(&logs) {
        let counters = log.lines().rev().find(|l| l.contains("drop counters")).unwrap_or("(none)");
        let summary = counters.split("drops=").nth(1).unwrap_or(counters);
        println!("  {}: {}", node.name, summary.trim());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(format!("/run/netsieve-demo-{}", cluster.id));
    drop(cluster);
    println!("\ncleaned up: agents stopped (programs detached), namespaces deleted");
    Ok(())
}

fn write_manifests(dir: &Path, cluster: &Cluster) -> Result<(), String> {
    let mut pods = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for (name, namespace, node, labels) in PODS {
        let ip = &cluster.pod(name).ip;
        pods.push_str(&format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: {name}, namespace: {namespace}, labels: {labels}}}\n  spec: {{nodeName: node{node}, containers: [{{name: c, image: x}}]}}\n  status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
        ));
    }
    let nodes: String = cluster
        .nodes
        .iter()
        .map(|n| format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n", n.name, n.ip))
        .collect();
    for (file, text) in [("pods.yaml", pods.as_str()), ("nodes.yaml", nodes.as_str()), ("policies.yaml", POLICIES)] {
        std::fs::write(dir.join(file), text).map_err(|e| e.to_string())?;
    }
    Ok(())
}
