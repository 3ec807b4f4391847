//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]
use netsieve::policy::{ClusterState, Protocol, explain};
use netsieve_tests::netns::Cluster;
use netsieve_tests::seed_cluster::namespace_of;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The probe matrix over the seed scenario: (from pod, to pod, port, protocol).
pub const SEED_PROBES: &[(&str, &str, u16, Protocol)] = &[
    ("interactivetest", "nginx-1", 80, Protocol::Tcp),
    ("nice-client", "nginx-1", 80, Protocol::Tcp),
    ("interactivetest", "nginx-1", 5353, Protocol::Udp),
    ("nice-client", "nginx-1", 5353, Protocol::Udp),
    ("build-code", "cache-store", 6379, Protocol::Tcp),
    ("internal-proxy", "cache-store", 6379, Protocol::Tcp),
    ("nice-client", "cache-store", 6379, Protocol::Tcp),
    ("cache-store", "nginx-1", 80, Protocol::Tcp),
];

/// What the semantics module says of a flow from seed pod `from` to `to` (a seed pod name or
/// an address).
pub fn allowed(state: &ClusterState, from: &str, to: &str, port: u16, protocol: Protocol) -> bool {
    let src = state.resolve(&format!("{}/{from}", namespace_of(from))).expect("from");
    let to = if to.parse::<std::net::IpAddr>().is_ok() { to.to_string() } else { format!("{}/{to}", namespace_of(to)) };
    let dst = state.resolve(&to).expect("to");
    explain(state, &state.flow(src, dst, protocol, port).expect("flow")).allowed
}

/// Real traffic from pod `from` to `to_ip`: a TCP connection that gets "ok", or a UDP echo.
pub fn send_probe(cluster: &Cluster, from: &str, to_ip: &str, port: u16, protocol: Protocol, timeout: Duration) -> bool {
    match protocol {
        Protocol::Udp => cluster.udp_echoes(from, to_ip, port, timeout),
        _ => cluster.tcp_connects(from, to_ip, port, timeout),
    }
}

/// [`send_probe`] to a pod's IPv4 address.
pub fn probe_pod(cluster: &Cluster, from: &str, to: &str, port: u16, protocol: Protocol, timeout: Duration) -> bool {
    send_probe(cluster, from, &cluster.pod(to).ip, port, protocol, timeout)
}

/// Probes every pair of the matrix and compares with the semantics module.
pub fn check_matrix(cluster: &Cluster, dir: &Path, stage: &str) {
    let state = netsieve::manifests::load_dir(dir).expect("manifests").cluster_state();
    for (from, to, port, protocol) in SEED_PROBES {
        let expected = allowed(&state, from, to, *port, *protocol);
        let got = probe_pod(cluster, from, to, *port, *protocol, Duration::from_millis(800));
        assert_eq!(got, expected, "{stage}: {from} -> {to}:{port}/{protocol} kernel={got} semantics={expected}");
    }
}

pub mod observe;
pub mod services;

/// bpffs mounts made by a test (one per node, under the cluster's mount root, before its agents
/// start, so that pins outlive an agent process and the test can read them), unmounted on drop.
pub struct BpffsMounts(Vec<PathBuf>);

impl BpffsMounts {
    /// One bpffs per node of `cluster`, where its agent looks for it; their paths in node order.
    pub fn for_nodes(cluster: &Cluster) -> (BpffsMounts, Vec<PathBuf>) {
        let paths: Vec<PathBuf> =
            cluster.nodes.iter().map(|n| PathBuf::from(netsieve_tests::seed_cluster::node_bpffs(cluster, &n.name))).collect();
        (BpffsMounts::mount(paths.clone()), paths)
    }

    pub fn mount(paths: Vec<PathBuf>) -> BpffsMounts {
        let mut mounts = BpffsMounts(Vec::new());
        for path in paths {
            std::fs::create_dir_all(&path).expect("mount point");
            let status = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&path).status().expect("mount runs");
            assert!(status.success(), "mounting bpffs at {}", path.display());
            mounts.0.push(path);
        }
        mounts
    }
}

impl Drop for BpffsMounts {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::process::Command::new("umount").arg(path).status();
        }
    }
}

/// How many pins an agent left in `dir` of its pin directory on the node's bpffs (`links`: TC
/// links, `netfilter-links`).
pub fn pins(bpffs: &Path, node: &str, dir: &str) -> usize {
    std::fs::read_dir(bpffs.join("netsieve").join(node).join(dir)).map_or(0, |d| d.count())
}
