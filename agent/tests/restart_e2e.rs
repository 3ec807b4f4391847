//! Agent restarts without a gap (`--on-exit keep`): on the two-node netns cluster, agents exit
//! on SIGTERM leaving their TCX links pinned; with no agent running the kernel keeps
//! enforcing exactly the last state (probes vs the semantics module); restarted agents adopt
//! the pinned conntrack table and replace the old links (a policy change made after the restart
//! is enforced, which it could not be while the old links ran beside the new ones); finally
//! `netsieve cleanup` detaches everything. Needs root.
//!
//! The agents' bpffs must outlive each agent process, as the host's /sys/fs/bpf does for a
//! DaemonSet: the test mounts one per node under its own /run/netsieve-test-<id> directory
//! (unmounted at the end, also on failure) before starting agents, whose private mount
//! namespaces inherit it.
mod common;
use common::{BpffsMounts, check_matrix, pins};
use netsieve_tests::netns::{Cluster, eventually, namespaces_with_prefix};
use netsieve_tests::seed_cluster::{serve_seed, ACCESS_NGINX, Agents, layout, remove_mount_root, write_atomically, write_manifests};
use std::path::Path;
use std::time::Duration;

fn link_pins(path: &Path, node: &str) -> usize {
    pins(path, node, "links")
}

#[test]
fn enforcement_survives_agent_restarts() {
    let mut cluster = Cluster::new("restart", 2, &layout()).expect("cluster");
    let prefix = format!("nsv-{}", cluster.id);
    serve_seed(&mut cluster).expect("servers");
    let (mounts, bpffs) = BpffsMounts::for_nodes(&cluster);

    let dir = std::env::temp_dir().join(format!("netsieve-restart-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("dir");
    write_manifests(&dir, &cluster).expect("manifests");
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let keep = ["--on-exit", "keep", "--counters-interval", "0"];
    let nginx = cluster.pod("nginx-1").ip.clone();
    let mut agents = Agents::start(&cluster, binary, &dir, &keep).expect("agents");
    assert!(eventually(Duration::from_secs(15), || !cluster.tcp_connects("interactivetest", &nginx, 80, Duration::from_millis(300))));
    check_matrix(&cluster, &dir, "first agents");

    // Exit with the links kept: the kernel enforces the last state with no agent running.
    for (success, stderr) in agents.stop() {
        assert!(success, "{stderr}");
        assert!(stderr.contains("programs stay attached"), "{stderr}");
    }
    // node0 holds four local pods, node1 two: two links each.
    assert_eq!((link_pins(&bpffs[0], "node0"), link_pins(&bpffs[1], "node1")), (8, 4));
    check_matrix(&cluster, &dir, "no agent running");

    // Restart: the new agents reuse the conntrack table and replace the old links. A policy
    // change made now is enforced only if the old links are gone (both would have to pass).
    let mut agents = Agents::start(&cluster, binary, &dir, &keep).expect("agents");
    check_matrix(&cluster, &dir, "restarted agents");
    let updated = ACCESS_NGINX.replace(
        "    - podSelector: {matchLabels: {iamnice: 'yeah'}}\n",
        "    - podSelector: {matchLabels: {iamnice: 'yeah'}}\n    - podSelector: {matchLabels: {run: interactivetest}}\n",
    );
    write_atomically(&dir.join("access-nginx.yaml"), &updated).expect("write");
    assert!(
        eventually(Duration::from_secs(5), || cluster.tcp_connects("interactivetest", &nginx, 80, Duration::from_millis(300))),
        "a change after the restart is not enforced: old links still attached?"
    );
    check_matrix(&cluster, &dir, "policy change after restart");
    assert_eq!((link_pins(&bpffs[0], "node0"), link_pins(&bpffs[1], "node1")), (8, 4), "old pins replaced, not added");
    let outputs = agents.stop();
    for (success, stderr) in &outputs {
        assert!(*success, "{stderr}");
        assert!(stderr.contains("adopted links of a previous agent"), "{stderr}");
        assert!(stderr.contains("reusing the pinned conntrack table"), "{stderr}");
    }

    // Uninstall: `netsieve cleanup` on each node detaches everything; traffic flows freely.
    for (index, node) in cluster.nodes.iter().enumerate() {
        let path = bpffs[index].to_string_lossy().to_string();
        // The CNI directories of this test's "node", never the machine's own.
        let cni = std::env::temp_dir().join(format!("netsieve-restart-cni-{}-{index}", cluster.id));
        let (cni_bin, cni_conf) = (cni.join("bin").to_string_lossy().to_string(), cni.join("net.d").to_string_lossy().to_string());
        let mut child = cluster
            .spawn_on_node(
                index,
                binary,
                &["cleanup", "--node", &node.name, "--bpffs", &path, "--cni-bin-dir", &cni_bin, "--cni-conf-dir", &cni_conf],
            )
            .expect("cleanup runs");
        let status = child.wait().expect("cleanup exits");
        assert!(status.success(), "cleanup on {}", node.name);
        assert_eq!(link_pins(&bpffs[index], &node.name), 0);
    }
    assert!(cluster.tcp_connects("cache-store", &nginx, 80, Duration::from_secs(2)), "programs detached by cleanup");
    assert!(cluster.tcp_connects("nice-client", &cluster.pod("cache-store").ip.clone(), 6379, Duration::from_secs(2)));

    drop(mounts);
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}
