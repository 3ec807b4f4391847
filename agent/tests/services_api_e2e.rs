//! End to end through Services with the agents watching an API server (the in-process fake
//! one): the same cluster, kube-proxy emulations and cases as `services_e2e.rs`, with the
//! namespaces, pods (with their container ports, for the named ports) and policies served
//! over list/watch instead of read from files. The agents get no Service objects: kube-proxy's
//! decision is in netfilter, and that is where it must be read. Needs root; touches nothing
//! outside the namespaces it creates.
mod common;
use common::services::{Case, EGRESS_CASES, INGRESS_CASES, check_cases, oracle};
use netsieve_tests::fake_apiserver::FakeApiServer;
use netsieve_tests::kube_proxy::{KubeProxy, ProxyMode};
use netsieve_tests::netns::{eventually, namespaces_with_prefix};
use netsieve_tests::seed_cluster::{Agents, remove_mount_root};
use netsieve_tests::service_cluster::{NAMESPACES, PODS, build, namespace_object, pod_object, policy_objects};
use std::path::Path;
use std::time::Duration;

fn through_services_with_api_agents(tag: &str, mode: ProxyMode, cases: &[Case], stage: &str) {
    let cluster = build(tag, false).expect("cluster");
    let prefix = format!("nsv-{}-", cluster.id);
    let proxy = KubeProxy::install(&cluster, mode).expect("kube-proxy rules");
    // The API server listens on each node's loopback, where that node's agent finds it.
    let listeners = cluster.node_loopback_listeners().expect("API server listeners");
    let api = FakeApiServer::start(listeners).expect("api server");
    for namespace in NAMESPACES {
        api.apply(namespace_object(namespace));
    }
    for pod in PODS {
        api.apply(pod_object(&cluster, pod));
    }
    for policy in policy_objects().expect("policies") {
        api.apply(policy);
    }
    let dir = std::env::temp_dir().join(format!("netsieve-{tag}-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfigs = api.write_kubeconfigs(&dir).expect("kubeconfigs");
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let mut agents = Agents::against_api(&cluster, binary, &kubeconfigs, &["--metrics-addr", "127.0.0.1:9090", "--counters-interval", "0"])
    .expect("agents");
    for node in 0..2 {
        if !eventually(Duration::from_secs(20), || cluster.http_get(node, 9090, "/readyz").is_some_and(|(c, _)| c == 200)) {
            panic!("node{node}'s agent never became ready; agents:\n{:#?}", agents.stop());
        }
    }
    let web_a = cluster.pod("web-a").ip.clone();
    assert!(
        eventually(Duration::from_secs(5), || !cluster.tcp_connects("stranger", &web_a, 8080, Duration::from_millis(300))),
        "the agents did not start enforcing"
    );
    check_cases(&cluster, &proxy, &oracle(&cluster, true), cases, stage);
    for (success, stderr) in agents.stop() {
        assert!(success, "agent did not exit cleanly:\n{stderr}");
    }
    drop(api);
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}

#[test]
fn api_iptables_mode_ingress_on_service_backends() {
    through_services_with_api_agents("svc-api-ipt-in", ProxyMode::Iptables, INGRESS_CASES, "iptables, API, ingress cases");
}

#[test]
fn api_iptables_mode_egress_through_services() {
    through_services_with_api_agents("svc-api-ipt-eg", ProxyMode::Iptables, EGRESS_CASES, "iptables, API, egress cases");
}

#[test]
fn api_nftables_mode_ingress_on_service_backends() {
    through_services_with_api_agents("svc-api-nft-in", ProxyMode::Nftables, INGRESS_CASES, "nftables, API, ingress cases");
}

#[test]
fn api_nftables_mode_egress_through_services() {
    through_services_with_api_agents("svc-api-nft-eg", ProxyMode::Nftables, EGRESS_CASES, "nftables, API, egress cases");
}
