//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]
use netsieve::policy::{Protocol, explain};
use netsieve_tests::netns::Cluster;
use netsieve_tests::seed_cluster::namespace_of;
use std::path::Path;
use std::time::Duration;

pub fn semantics_allows(dir: &Path, from: &str, to: &str, port: u16, protocol: Protocol) -> bool {
    let state = netsieve::manifests::load_dir(dir).expect("manifests").cluster_state();
    let src = state.resolve(from).expect("from");
    let dst = state.resolve(to).expect("to");
    explain(&state, &state.flow(src, dst, protocol, port).expect("flow")).allowed
}

/// Probes every pair of the matrix and compares with the semantics module.
pub fn check_matrix(cluster: &Cluster, dir: &Path, stage: &str) {
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

