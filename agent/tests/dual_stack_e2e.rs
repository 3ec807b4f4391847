//! End to end on a dual-stack cluster: every pod has an IPv4 and an IPv6 address, host routes
//! for both (routed CNI), and the same probes over both families must agree with the semantics
//! module: IPv6 discovery, identities of IPv6 addresses, ND passing through the programs, and
//! IPv6 verdicts on real traffic. Needs root; touches nothing outside its namespaces.
mod common;
use common::{SEED_PROBES, allowed, send_probe};
use netsieve_tests::netns::{Cluster, eventually, namespaces_with_prefix};
use netsieve_tests::seed_cluster::{serve_seed, Agents, layout, remove_mount_root, write_manifests};
use std::path::Path;
use std::time::Duration;

fn check_both_families(cluster: &Cluster, dir: &Path, stage: &str) {
    let state = netsieve::manifests::load_dir(dir).expect("manifests").cluster_state();
    for (from, to, port, protocol) in SEED_PROBES {
        let target = cluster.pod(to);
        for ip in [Some(&target.ip), target.ip6.as_ref()].into_iter().flatten() {
            let expected = allowed(&state, from, ip, *port, *protocol);
            let got = send_probe(cluster, from, ip, *port, *protocol, Duration::from_millis(800));
            assert_eq!(got, expected, "{stage}: {from} -> {to} [{ip}]:{port}/{protocol} kernel={got} semantics={expected}");
        }
    }
}

#[test]
fn dual_stack_cluster_enforces_both_families() {
    let mut cluster = Cluster::new_dual_stack("dual", 2, &layout()).expect("cluster");
    let prefix = format!("nsv-{}", cluster.id);
    serve_seed(&mut cluster).expect("servers");
    let nginx6 = cluster.pod("nginx-1").ip6.clone().expect("dual-stack pod");
    let t = Duration::from_secs(2);
    assert!(cluster.tcp_connects("interactivetest", &nginx6, 80, t), "same-node TCP over IPv6");
    assert!(cluster.tcp_connects("nice-client", &nginx6, 80, t), "cross-node TCP over IPv6");

    let dir = std::env::temp_dir().join(format!("netsieve-dual-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("dir");
    write_manifests(&dir, &cluster).expect("manifests");
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let mut agents = Agents::start(&cluster, binary, &dir, &["--counters-interval", "0"]).expect("agents");
    let enforced =
        eventually(Duration::from_secs(15), || !cluster.tcp_connects("interactivetest", &nginx6, 80, Duration::from_millis(300)));
    if !enforced {
        panic!("IPv6 not enforced; agents:\n{:#?}", agents.stop());
    }
    check_both_families(&cluster, &dir, "dual stack");
    for (success, stderr) in agents.stop() {
        assert!(success, "{stderr}");
    }
    assert!(cluster.tcp_connects("interactivetest", &nginx6, 80, t), "programs detached on SIGTERM");
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}
