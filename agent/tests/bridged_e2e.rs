//! End to end on a bridged CNI layout (the CNI bridge plugin, flannel's cni0): pods are ports
//! of a bridge, there are no per-pod host routes, so the agent finds each pod's interface
//! through the node's neighbour table and the bridge's forwarding database. Probes (same node
//! through the bridge, and across nodes) must agree with the semantics module. Needs root;
//! touches nothing outside the namespaces it creates.
mod common;
use common::check_matrix;
use netsieve_tests::netns::{Cluster, eventually, namespaces_with_prefix};
use netsieve_tests::seed_cluster::{serve_seed, Agents, layout, remove_mount_root, write_manifests};
use std::path::Path;
use std::time::Duration;

#[test]
fn bridged_cluster_enforces_like_the_semantics() {
    let mut cluster = Cluster::new_bridged("bridge", 2, &layout()).expect("cluster");
    let prefix = format!("nsv-{}", cluster.id);
    serve_seed(&mut cluster).expect("servers");
    let nginx = cluster.pod("nginx-1").ip.clone();
    let t = Duration::from_secs(2);
    assert!(cluster.tcp_connects("interactivetest", &nginx, 80, t), "same-node TCP through the bridge");
    assert!(cluster.tcp_connects("nice-client", &nginx, 80, t), "cross-node TCP");

    let dir = std::env::temp_dir().join(format!("netsieve-bridged-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("dir");
    write_manifests(&dir, &cluster).expect("manifests");
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let mut agents = Agents::start(&cluster, binary, &dir, &["--counters-interval", "0"]).expect("agents");
    let enforced = eventually(Duration::from_secs(15), || {
        !cluster.tcp_connects("interactivetest", &nginx, 80, Duration::from_millis(300))
            && !cluster.tcp_connects("build-code", &cluster.pod("cache-store").ip, 6379, Duration::from_millis(300))
    });
    if !enforced {
        panic!("not enforced on the bridged layout; agents:\n{:#?}", agents.stop());
    }
    check_matrix(&cluster, &dir, "bridged layout");

    // The kernel may drop neighbour entries later (garbage collection): enforcement must not
    // flap. Flush them on both nodes; pods stay enforced, nothing is detached.
    for node in &cluster.nodes {
        netsieve_tests::netns::ip(Some(&node.netns), &["neigh", "flush", "dev", "br0"]).expect("flush");
    }
    std::thread::sleep(Duration::from_millis(800));
    check_matrix(&cluster, &dir, "after the neighbour tables were flushed");
    for (success, stderr) in agents.stop() {
        assert!(success, "{stderr}");
        let before_stop = stderr.split("SIGTERM: stopping").next().unwrap_or_default();
        assert!(!before_stop.contains("detached"), "an interface was detached while its pod lived:\n{stderr}");
    }
    assert!(cluster.tcp_connects("interactivetest", &nginx, 80, t), "programs detached on SIGTERM");
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}
