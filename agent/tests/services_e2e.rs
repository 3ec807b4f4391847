//! End to end through Services: the two-node netns cluster with kube-proxy emulated by the
//! rules it really programs (iptables mode through `iptables-legacy`, nftables mode), one
//! `netsieve agent --manifests` per node, and connections through ClusterIPs, each judged by
//! the semantics module on the backend kube-proxy chose for it (see `common::services`).
//! Without agents first: the emulation must translate real traffic (same- and cross-node
//! backends, replies from the ClusterIP, hairpin, DNS through the kube-dns ClusterIP) on the
//! routed and the bridged layout. Needs root; touches nothing outside its namespaces.
mod common;
use common::{BpffsMounts, pins};
use common::observe::status;
use common::services::{Case, EGRESS_CASES, INGRESS_CASES, check_cases, oracle};
use netsieve_tests::kube_proxy::{KubeProxy, ProxyMode};
use netsieve_tests::netns::{Cluster, Transport, eventually, namespaces_with_prefix, run_in};
use netsieve_tests::seed_cluster::{Agents, agent_socket, remove_mount_root, write_atomically};
use netsieve_tests::service_cluster::{EGRESS_POLICIES, EGRESS_POLICIES_FILE, KUBE_DNS_IP, build, wait_until_enforcing, write_manifests};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Removes the manifests directory and the agents' mount points, also when a test fails.
struct Scratch<'a>(PathBuf, &'a Cluster);

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        remove_mount_root(self.1);
    }
}

fn emulation_translates_real_traffic(tag: &str, mode: ProxyMode, bridged: bool) {
    let cluster = build(tag, bridged).expect("cluster");
    // With the trailing dash: no other test's cluster id starts with this one.
    let prefix = format!("nsv-{}-", cluster.id);
    let mut proxy = KubeProxy::install(&cluster, mode).expect("kube-proxy rules");
    // No agent: nothing is enforced, so every connection to every backend must get through
    // (the semantics module on a state without policies agrees), which exercises DNAT to
    // same- and cross-node backends, replies translated back, hairpin masquerade, UDP and DNS.
    let all: Vec<Case> = INGRESS_CASES.iter().chain(EGRESS_CASES).copied().collect();
    check_cases(&cluster, &proxy, &oracle(&cluster, false), &all, &format!("{tag}: no agent"));

    // A pod's resolver finds a Service through the kube-dns ClusterIP, over UDP and TCP.
    let dns = SocketAddr::from((KUBE_DNS_IP, 53));
    for transport in [Transport::Udp, Transport::Tcp] {
        let found = cluster.resolve("worker", dns, transport, "web.shop.svc.cluster.local", Duration::from_secs(1));
        assert_eq!(found, Ok(vec![Ipv4Addr::new(10, 96, 0, 20)]), "{transport} lookup through the kube-dns ClusterIP");
    }
    // The same rules sit in both nodes: the pod's own node translates.
    for node in 0..2 {
        let rules = proxy.ruleset(node).expect("ruleset");
        match mode {
            ProxyMode::Iptables => {
                assert!(rules.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"), "{rules}");
                assert!(rules.contains("-m statistic --mode random --probability 0.5000000000"), "{rules}");
                assert!(rules.contains("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"), "{rules}");
            }
            ProxyMode::Nftables => {
                assert!(rules.contains("type nat hook prerouting priority dstnat; policy accept;"), "{rules}");
                assert!(rules.contains("type nat hook postrouting priority srcnat; policy accept;"), "{rules}");
                assert!(rules.contains("numgen random mod 2 vmap"), "{rules}");
                assert!(rules.contains("masquerade fully-random"), "{rules}");
            }
        }
    }
    // Removing kube-proxy leaves nothing of it, and ClusterIPs stop working.
    proxy.uninstall().expect("uninstall");
    for node in &cluster.nodes {
        match mode {
            ProxyMode::Iptables => {
                let save = run_in(&node.netns, "iptables-legacy-save", &[], None).expect("save");
                assert!(!save.contains("KUBE-"), "{save}");
            }
            ProxyMode::Nftables => {
                let tables = run_in(&node.netns, "nft", &["list", "tables"], None).expect("nft");
                assert!(!tables.contains("kube-proxy"), "{tables}");
            }
        }
    }
    let web = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 20), 80));
    assert!(!cluster.tcp_connects("frontend", &web.ip().to_string(), web.port(), Duration::from_millis(300)));
    drop(proxy);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}

#[test]
fn iptables_emulation_translates_real_traffic() {
    emulation_translates_real_traffic("emu-ipt-routed", ProxyMode::Iptables, false);
}

#[test]
fn nftables_emulation_translates_real_traffic() {
    emulation_translates_real_traffic("emu-nft-routed", ProxyMode::Nftables, false);
}

#[test]
fn iptables_emulation_on_a_bridged_layout() {
    emulation_translates_real_traffic("emu-ipt-bridged", ProxyMode::Iptables, true);
}

#[test]
fn nftables_emulation_on_a_bridged_layout() {
    emulation_translates_real_traffic("emu-nft-bridged", ProxyMode::Nftables, true);
}

/// The agents in manifests mode, then `cases` through the ClusterIPs.
fn through_services_with_agents(tag: &str, mode: ProxyMode, bridged: bool, cases: &[Case], stage: &str) {
    let cluster = build(tag, bridged).expect("cluster");
    // With the trailing dash: no other test's cluster id starts with this one.
    let prefix = format!("nsv-{}-", cluster.id);
    let proxy = KubeProxy::install(&cluster, mode).expect("kube-proxy rules");
    let dir = std::env::temp_dir().join(format!("netsieve-{tag}-{}", cluster.id));
    let scratch = Scratch(dir.clone(), &cluster);
    std::fs::create_dir_all(&dir).expect("manifests dir");
    write_manifests(&dir, &cluster).expect("manifests");
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let mut agents = Agents::start(&cluster, binary, &dir, &["--counters-interval", "0"]).expect("agents");
    if let Err(error) = wait_until_enforcing(&cluster, Duration::from_secs(20)) {
        panic!("{error}; agents:\n{:#?}", agents.stop());
    }
    let state = netsieve::manifests::load_dir(&dir).expect("manifests").cluster_state();
    check_cases(&cluster, &proxy, &state, cases, stage);
    for (success, stderr) in agents.stop() {
        assert!(success, "agent did not exit cleanly:\n{stderr}");
    }
    drop(proxy);
    drop(scratch);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}

#[test]
fn iptables_mode_ingress_on_service_backends() {
    through_services_with_agents("svc-ipt-in", ProxyMode::Iptables, false, INGRESS_CASES, "iptables, manifests, ingress cases");
}

#[test]
fn iptables_mode_egress_through_services() {
    through_services_with_agents("svc-ipt-eg", ProxyMode::Iptables, false, EGRESS_CASES, "iptables, manifests, egress cases");
}

#[test]
fn nftables_mode_ingress_on_service_backends() {
    through_services_with_agents("svc-nft-in", ProxyMode::Nftables, false, INGRESS_CASES, "nftables, manifests, ingress cases");
}

#[test]
fn nftables_mode_egress_through_services() {
    through_services_with_agents("svc-nft-eg", ProxyMode::Nftables, false, EGRESS_CASES, "nftables, manifests, egress cases");
}

#[test]
fn bridged_iptables_mode_through_services() {
    let all: Vec<Case> = INGRESS_CASES.iter().chain(EGRESS_CASES).copied().collect();
    through_services_with_agents("svc-br", ProxyMode::Iptables, true, &all, "bridged layout, iptables, manifests, all cases");
}

/// The netfilter program follows egress enforcement: on nodes where no pod's egress is
/// isolated it is not attached (no hooks, no defragmentation for the node's packets) and
/// ingress through Services is enforced without it; once a policy isolates a local pod's egress
/// it is attached before that pod's egress is enforced and judges Service egress after DNAT;
/// when the last such policy goes, it is detached again.
#[test]
fn netfilter_program_attached_only_while_egress_is_enforced() {
    let tag = "svc-nf-idle";
    let cluster = build(tag, false).expect("cluster");
    let prefix = format!("nsv-{}-", cluster.id);
    let proxy = KubeProxy::install(&cluster, ProxyMode::Nftables).expect("kube-proxy rules");
    let dir = std::env::temp_dir().join(format!("netsieve-{tag}-{}", cluster.id));
    let scratch = Scratch(dir.clone(), &cluster);
    let (mounts, bpffs) = BpffsMounts::for_nodes(&cluster);
    std::fs::create_dir_all(&dir).expect("manifests dir");
    write_manifests(&dir, &cluster).expect("manifests");
    // The scenario without its egress policies first.
    let egress_policies = dir.join(EGRESS_POLICIES_FILE);
    std::fs::remove_file(&egress_policies).expect("egress policies removed");
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let mut agents = Agents::start(&cluster, binary, &dir, &["--counters-interval", "0"]).expect("agents");
    let nodes: Vec<(usize, &str)> = cluster.nodes.iter().enumerate().map(|(i, n)| (i, n.name.as_str())).collect();
    // (egress enforced, netfilter program attached, its pinned links) on each node.
    let hooks = |index: usize, node: &str| {
        let status = status(&agent_socket(&cluster, index));
        (status["egress_enforced"] == true, status["netfilter_hook"] == true, pins(&bpffs[index], node, "netfilter-links"))
    };
    for &(index, _) in &nodes {
        let ready = eventually(Duration::from_secs(20), || cluster.http_get(index, 9090, "/readyz").is_some_and(|(code, _)| code == 200));
        assert!(ready, "node{index}'s agent was not ready; agents:\n{:#?}", agents.stop());
    }
    for &(index, node) in &nodes {
        assert_eq!(hooks(index, node), (false, false, 0), "{node}: no pod's egress is isolated, the netfilter program is idle");
    }
    let state = netsieve::manifests::load_dir(&dir).expect("manifests").cluster_state();
    check_cases(&cluster, &proxy, &state, INGRESS_CASES, "netfilter program not attached, ingress cases");

    // A policy isolating egress: attached on the nodes of the pods it selects, before their
    // egress is enforced.
    write_atomically(&egress_policies, EGRESS_POLICIES).expect("egress policies");
    if let Err(error) = wait_until_enforcing(&cluster, Duration::from_secs(20)) {
        panic!("{error}; agents:\n{:#?}", agents.stop());
    }
    for &(index, node) in &nodes {
        assert_eq!(hooks(index, node), (true, true, 4), "{node}: egress enforced, the netfilter program attached at its four hooks");
    }
    let state = netsieve::manifests::load_dir(&dir).expect("manifests").cluster_state();
    check_cases(&cluster, &proxy, &state, EGRESS_CASES, "netfilter program attached when needed, egress cases");

    // The last egress policy gone: detached.
    std::fs::remove_file(&egress_policies).expect("egress policies removed");
    for &(index, node) in &nodes {
        let idle = eventually(Duration::from_secs(5), || hooks(index, node) == (false, false, 0));
        assert!(idle, "{node}: the netfilter program stays attached after the last egress policy went: {:?}", hooks(index, node));
    }
    for (success, stderr) in agents.stop() {
        assert!(success, "agent did not exit cleanly:\n{stderr}");
        assert!(stderr.contains("netfilter program detached"), "{stderr}");
    }
    drop(proxy);
    drop(mounts);
    drop(scratch);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}
