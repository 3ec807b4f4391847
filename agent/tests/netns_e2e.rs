//! End to end: a two-node cluster of network namespaces laid out like kindnet, one
//! `netsieve agent --manifests` per node, real TCP and UDP servers in the pods, and probes that
//! must be allowed or denied exactly as the semantics module predicts, through a policy
//! update, a pod label change and a policy deletion. Needs root; touches nothing outside the
//! namespaces it creates.
use netsieve::policy::{Protocol, explain};
use netsieve_tests::netns::{Cluster, eventually, namespaces_with_prefix};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

const PODS: &[(&str, &str, usize, &str)] = &[
    // name, namespace, node, labels (YAML flow map)
    ("nginx-1", "default", 0, "{run: nginx}"),
    ("interactivetest", "default", 0, "{run: interactivetest}"),
    ("nice-client", "default", 1, "{run: interactivetest, iamnice: 'yeah'}"),
    ("cache-store", "secure-middleware", 0, "{app: cache-store}"),
    ("build-code", "default", 0, "{app: build-code}"),
    ("internal-proxy", "default", 1, "{app: internal-proxy}"),
];

const ACCESS_NGINX: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: access-nginx, namespace: default}
spec:
  podSelector: {matchLabels: {run: nginx}}
  ingress:
  - from:
    - podSelector: {matchLabels: {iamnice: 'yeah'}}
";

const CACHE_STORE: &str = "apiVersion: networking.k8s.io/v1
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

impl Drop for Agents {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for child in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn write_pods(dir: &Path, cluster: &Cluster, labels_override: Option<(&str, &str)>) {
    let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for (name, namespace, node, labels) in PODS {
        let labels = match labels_override {
            Some((pod, labels)) if pod == *name => labels,
            _ => labels,
        };
        let ip = &cluster.pod(name).ip;
        text.push_str(&format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: {name}, namespace: {namespace}, labels: {labels}}}\n  spec: {{nodeName: node{node}, containers: [{{name: c, image: x}}]}}\n  status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
        ));
    }
    write_atomically(&dir.join("pods.yaml"), &text);
}

/// Writes via rename so the agent never reads a half-written file.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, path).expect("rename manifest");
}

fn semantics_allows(dir: &Path, from: &str, to: &str, port: u16, protocol: Protocol) -> bool {
    let state = netsieve::manifests::load_dir(dir).expect("manifests").cluster_state();
    let src = state.resolve(from).expect("from");
    let dst = state.resolve(to).expect("to");
    explain(&state, &state.flow(src, dst, protocol, port).expect("flow")).allowed
}

/// Probes every pair of the matrix and compares with the semantics module.
fn check_matrix(cluster: &Cluster, dir: &Path, stage: &str) {
    let probes: &[(&str, &str, u16, Protocol)] = &[
        ("interactivetest", "nginx-1", 80, Protocol::Tcp),
        ("nice-client", "nginx-1", 80, Protocol::Tcp),
        ("interactivetest", "nginx-1", 5353, Protocol::Udp),
        ("nice-client", "nginx-1", 5353, Protocol::Udp),
        ("build-code", "cache-store", 6379, Protocol::Tcp),
        ("internal-proxy", "cache-store", 6379, Protocol::Tcp),
        ("nice-client", "cache-store", 6379, Protocol::Tcp),
        ("cache-store", "nginx-1", 80, Protocol::Tcp),
    ];
    let namespace_of = |pod: &str| PODS.iter().find(|p| p.0 == pod).map_or("default", |p| p.1);
    for (from, to, port, protocol) in probes {
        let expected = semantics_allows(dir, &format!("{}/{from}", namespace_of(from)), &format!("{}/{to}", namespace_of(to)), *port, *protocol);
        let target = &cluster.pod(to).ip;
        let timeout = Duration::from_millis(800);
        let got = match protocol {
            Protocol::Udp => cluster.udp_echoes(from, target, *port, timeout),
            _ => cluster.tcp_connects(from, target, *port, timeout),
        };
        assert_eq!(got, expected, "{stage}: {from} -> {to}:{port}/{protocol} kernel={got} semantics={expected}");
    }
}

#[test]
fn two_node_cluster_enforces_like_the_semantics() {
    let mut cluster = Cluster::new("e2e", 2, &PODS.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>()).expect("cluster");
    let prefix = format!("nsv-{}", cluster.id);
    cluster.serve_tcp("nginx-1", 80).expect("server");
    cluster.serve_udp_echo("nginx-1", 5353).expect("server");
    cluster.serve_tcp("cache-store", 6379).expect("server");

    // Plain connectivity first: without agents everything flows, same node and across nodes.
    let t = Duration::from_secs(2);
    assert!(cluster.tcp_connects("interactivetest", &cluster.pod("nginx-1").ip, 80, t), "same-node TCP");
    assert!(cluster.tcp_connects("nice-client", &cluster.pod("nginx-1").ip, 80, t), "cross-node TCP");
    assert!(cluster.udp_echoes("nice-client", &cluster.pod("nginx-1").ip, 5353, t), "cross-node UDP");
    assert!(!cluster.tcp_connects("interactivetest", &cluster.pod("nginx-1").ip, 81, t), "closed port");

    let dir: PathBuf = std::env::temp_dir().join(format!("netsieve-e2e-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("manifests dir");
    let namespaces = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: default}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: secure-middleware}}\n";
    write_atomically(&dir.join("namespaces.yaml"), namespaces);
    let nodes: String = cluster
        .nodes
        .iter()
        .map(|n| format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n", n.name, n.ip))
        .collect();
    write_atomically(&dir.join("nodes.yaml"), &nodes);
    write_pods(&dir, &cluster, None);
    write_atomically(&dir.join("access-nginx.yaml"), ACCESS_NGINX);
    write_atomically(&dir.join("cache-store.yaml"), CACHE_STORE);

    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let dir_arg = dir.to_string_lossy().to_string();
    let mut agents = Agents(Vec::new());
    for (index, node) in cluster.nodes.iter().enumerate() {
        let bpffs = format!("/run/netsieve-test-{}/bpffs-{}", cluster.id, node.name);
        let args = ["agent", "--node", &node.name, "--manifests", &dir_arg, "--bpffs", &bpffs, "--counters-interval", "1"];
        agents.0.push(cluster.spawn_on_node(index, binary, &args).expect("agent starts"));
    }
    // Enforcement starts within a bounded time.
    let nginx = cluster.pod("nginx-1").ip.clone();
    assert!(
        eventually(Duration::from_secs(15), || !cluster.tcp_connects("interactivetest", &nginx, 80, Duration::from_millis(300))),
        "agent never started enforcing"
    );
    check_matrix(&cluster, &dir, "initial policies");

    // Policy update: nginx also admits run=interactivetest. Enforced within 1 s (the probe
    // loop adds its own latency on top, so the bound checked here is 2 s).
    let updated = ACCESS_NGINX.replace("    - podSelector: {matchLabels: {iamnice: 'yeah'}}\n", "    - podSelector: {matchLabels: {iamnice: 'yeah'}}\n    - podSelector: {matchLabels: {run: interactivetest}}\n");
    write_atomically(&dir.join("access-nginx.yaml"), &updated);
    let started = Instant::now();
    assert!(eventually(Duration::from_secs(2), || cluster.tcp_connects("interactivetest", &nginx, 80, Duration::from_millis(300))));
    eprintln!("policy update enforced after {:?}", started.elapsed());
    check_matrix(&cluster, &dir, "after policy update");

    // Pod label change: build-code becomes an internal-proxy and may reach the cache.
    write_pods(&dir, &cluster, Some(("build-code", "{app: internal-proxy}")));
    let cache = cluster.pod("cache-store").ip.clone();
    assert!(eventually(Duration::from_secs(2), || cluster.tcp_connects("build-code", &cache, 6379, Duration::from_millis(300))));
    check_matrix(&cluster, &dir, "after pod label change");

    // Policy deletion: the cache is open again, across nodes too.
    std::fs::remove_file(dir.join("cache-store.yaml")).expect("delete policy");
    assert!(eventually(Duration::from_secs(2), || cluster.tcp_connects("nice-client", &cache, 6379, Duration::from_millis(300))));
    check_matrix(&cluster, &dir, "after policy deletion");

    // A malformed document keeps the last good state (never opens traffic).
    write_atomically(&dir.join("access-nginx.yaml"), "kind: NetworkPolicy\nmetadata: {name: access-nginx, namespace: default}\nspec: {podSelector: 12}\n");
    std::thread::sleep(Duration::from_millis(600));
    check_matrix_with(&cluster, "after a malformed update", &[("cache-store", "nginx-1", 80, false)]);

    // SIGTERM: agents stop cleanly and detach; traffic flows again.
    let stopped = std::mem::take(&mut agents.0);
    let mut outputs = Vec::new();
    for child in stopped {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let output = child.wait_with_output().expect("agent exits");
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(output.status.success(), "agent exit {:?}\n{stderr}", output.status);
        assert!(stderr.contains("attached netsieve_from_pod"), "{stderr}");
        outputs.push(stderr);
    }
    // node0 holds the isolated pods, so its kernel dropped and counted the denied probes.
    assert!(outputs[0].contains("ingress/policy_denied="), "drop counters logged:\n{}", outputs[0]);
    assert!(cluster.tcp_connects("cache-store", &nginx, 80, Duration::from_secs(2)), "programs detached on SIGTERM");

    let _ = std::fs::remove_dir_all(&dir);
    // The agents mounted their bpffs inside `ip netns exec`'s private mount namespace, gone
    // with them; only the empty mount points remain.
    let _ = std::fs::remove_dir_all(format!("/run/netsieve-test-{}", cluster.id));
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}

fn check_matrix_with(cluster: &Cluster, stage: &str, probes: &[(&str, &str, u16, bool)]) {
    for (from, to, port, expected) in probes {
        let got = cluster.tcp_connects(from, &cluster.pod(to).ip, *port, Duration::from_millis(800));
        assert_eq!(got, *expected, "{stage}: {from} -> {to}:{port}");
    }
}
