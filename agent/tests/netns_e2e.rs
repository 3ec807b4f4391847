//! End to end: a two-node cluster of network namespaces laid out like kindnet, one
//! `netsieve agent --manifests` per node, real TCP and UDP servers in the pods, and probes that
//! must be allowed or denied exactly as the semantics module predicts, through a policy
//! update, a pod label change and a policy deletion. Needs root; touches nothing outside the
//! namespaces it creates.
mod common;
use common::check_matrix;
use netsieve_tests::netns::{Cluster, eventually, namespaces_with_prefix};
use netsieve_tests::seed_cluster::{serve_seed, 
    ACCESS_NGINX, Agents, layout, pods_manifest, remove_mount_root, write_atomically, write_manifests,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[test]
fn two_node_cluster_enforces_like_the_semantics() {
    let mut cluster = Cluster::new("e2e", 2, &layout()).expect("cluster");
    let prefix = format!("nsv-{}", cluster.id);
    serve_seed(&mut cluster).expect("servers");

    // Plain connectivity first: without agents everything flows, same node and across nodes.
    let t = Duration::from_secs(2);
    assert!(cluster.tcp_connects("interactivetest", &cluster.pod("nginx-1").ip, 80, t), "same-node TCP");
    assert!(cluster.tcp_connects("nice-client", &cluster.pod("nginx-1").ip, 80, t), "cross-node TCP");
    assert!(cluster.udp_echoes("nice-client", &cluster.pod("nginx-1").ip, 5353, t), "cross-node UDP");
    assert!(!cluster.tcp_connects("interactivetest", &cluster.pod("nginx-1").ip, 81, t), "closed port");

    let dir: PathBuf = std::env::temp_dir().join(format!("netsieve-e2e-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("manifests dir");
    write_manifests(&dir, &cluster).expect("manifests");
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let mut agents = Agents::start(&cluster, binary, &dir, &["--counters-interval", "1"]).expect("agents start");
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
    write_atomically(&dir.join("access-nginx.yaml"), &updated).expect("write");
    let started = Instant::now();
    assert!(eventually(Duration::from_secs(2), || cluster.tcp_connects("interactivetest", &nginx, 80, Duration::from_millis(300))));
    eprintln!("policy update enforced after {:?}", started.elapsed());
    check_matrix(&cluster, &dir, "after policy update");

    // Pod label change: build-code becomes an internal-proxy and may reach the cache.
    write_atomically(&dir.join("pods.yaml"), &pods_manifest(&cluster, Some(("build-code", "{app: internal-proxy}")))).expect("write");
    let cache = cluster.pod("cache-store").ip.clone();
    assert!(eventually(Duration::from_secs(2), || cluster.tcp_connects("build-code", &cache, 6379, Duration::from_millis(300))));
    check_matrix(&cluster, &dir, "after pod label change");

    // Policy deletion: the cache is open again, across nodes too.
    std::fs::remove_file(dir.join("cache-store.yaml")).expect("delete policy");
    assert!(eventually(Duration::from_secs(2), || cluster.tcp_connects("nice-client", &cache, 6379, Duration::from_millis(300))));
    check_matrix(&cluster, &dir, "after policy deletion");

    // A malformed document keeps the last good state (never opens traffic).
    write_atomically(&dir.join("access-nginx.yaml"), "kind: NetworkPolicy\nmetadata: {name: access-nginx, namespace: default}\nspec: {podSelector: 12}\n").expect("write");
    std::thread::sleep(Duration::from_millis(600));
    check_matrix_with(&cluster, "after a malformed update", &[("cache-store", "nginx-1", 80, false)]);

    // SIGTERM: agents stop cleanly and detach; traffic flows again.
    let outputs = agents.stop();
    for (success, stderr) in &outputs {
        assert!(*success, "agent did not exit cleanly:\n{stderr}");
        assert!(stderr.contains("attached netsieve_from_pod"), "{stderr}");
    }
    // node0 holds the isolated pods, so its kernel dropped and counted the denied probes.
    assert!(outputs[0].1.contains("ingress/policy_denied="), "drop counters logged:\n{}", outputs[0].1);
    assert!(cluster.tcp_connects("cache-store", &nginx, 80, Duration::from_secs(2)), "programs detached on SIGTERM");

    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}

fn check_matrix_with(cluster: &Cluster, stage: &str, probes: &[(&str, &str, u16, bool)]) {
    for (from, to, port, expected) in probes {
        let got = cluster.tcp_connects(from, &cluster.pod(to).ip, *port, Duration::from_millis(800));
        assert_eq!(got, *expected, "{stage}: {from} -> {to}:{port}");
    }
}
