//! Semantics tests: one per rule of `networking.k8s.io/v1`, each asserting verdicts.
use super::*;

fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}})).expect("namespace")
}

fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ips: &[&str], ports: serde_json::Value) -> Pod {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let pod_ips: Vec<_> = ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "ports": ports}]},
        "status": {"podIP": ips.first(), "podIPs": pod_ips},
    }))
    .expect("pod")
}

fn policy(yaml: &str) -> NetworkPolicy {
    serde_yaml::from_str(yaml).expect("policy yaml")
}

struct World {
    state: ClusterState,
}

impl World {
    fn new(policies: &[&str]) -> World {
        let namespaces = vec![
            namespace("default", &[]),
            namespace("prod", &[("team", "ops")]),
            namespace("dev", &[("team", "dev")]),
        ];
        let pods = vec![
            pod("default", "web", &[("app", "web")], &["10.0.0.1", "fd00::1"], serde_json::json!([
                {"name": "http", "containerPort": 8080}
            ])),
            pod("default", "db", &[("app", "db")], &["10.0.0.2", "fd00::2"], serde_json::json!([
                {"name": "http", "containerPort": 9000}, {"name": "dns", "containerPort": 53, "protocol": "UDP"}
            ])),
            pod("default", "client", &[("app", "client")], &["10.0.0.3"], serde_json::json!([])),
            pod("prod", "mon", &[("app", "monitoring")], &["10.0.1.1"], serde_json::json!([])),
            pod("dev", "mon", &[("app", "monitoring")], &["10.0.2.1"], serde_json::json!([])),
        ];
        let policies: Vec<NetworkPolicy> = policies.iter().map(|p| policy(p)).collect();
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]},
        }))
        .expect("node");
        World { state: ClusterState::new(&namespaces, &pods, &policies, &[node]) }
    }

    fn verdict(&self, from: &str, to: &str, protocol: Protocol, port: u16) -> Verdict {
        let src = self.state.resolve(from).expect("from");
        let dst = self.state.resolve(to).expect("to");
        let flow = self.state.flow(src, dst, protocol, port).expect("flow");
        explain(&self.state, &flow)
    }

    fn allowed(&self, from: &str, to: &str, protocol: Protocol, port: u16) -> bool {
        self.verdict(from, to, protocol, port).allowed
    }
}

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

#[test]
fn no_policy_allows_everything() {
    let w = World::new(&[]);
    assert!(w.allowed("default/client", "default/web", TCP, 80));
    assert!(w.allowed("default/client", "8.8.8.8", UDP, 53));
    let v = w.verdict("default/client", "default/web", TCP, 80);
    assert!(!v.ingress.isolated && !v.egress.isolated);
}

#[test]
fn default_deny_ingress_isolates_only_ingress() {
    let w = World::new(&["metadata: {name: deny, namespace: default}\nspec: {podSelector: {}, policyTypes: [Ingress]}"]);
    assert!(!w.allowed("default/client", "default/web", TCP, 80));
    assert!(w.allowed("default/client", "8.8.8.8", TCP, 443), "egress is not isolated");
    let v = w.verdict("default/client", "default/web", TCP, 80);
    assert_eq!(v.ingress.selecting_policies, vec!["default/deny".to_string()]);
    assert!(v.ingress.matched.is_none());
}

#[test]
fn absent_from_admits_any_peer_and_empty_from_too() {
    for from in ["", "  from: []\n"] {
        let yaml = format!(
            "metadata: {{name: p, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - ports: [{{port: 80}}]\n{from}"
        );
        let w = World::new(&[&yaml]);
        assert!(w.allowed("default/client", "default/web", TCP, 80), "from={from:?}");
        assert!(w.allowed("prod/mon", "default/web", TCP, 80), "from={from:?}");
        assert!(w.allowed("203.0.113.9", "default/web", TCP, 80), "from={from:?}");
        assert!(!w.allowed("default/client", "default/web", TCP, 81), "from={from:?}");
    }
}

#[test]
fn empty_ports_admit_every_protocol_and_port() {
    let w = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: []\n",
    ]);
    assert!(w.allowed("default/client", "default/web", TCP, 1));
    assert!(w.allowed("default/client", "default/web", UDP, 65535));
    assert!(w.allowed("default/client", "default/web", Protocol::Sctp, 9));
    assert!(w.allowed("default/client", "default/web", Protocol::Icmp, 0));
    assert!(!w.allowed("default/db", "default/web", TCP, 1));
}

#[test]
fn egress_rules_without_policy_types_isolate_both_directions() {
    let w = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  egress:\n  - to: [{podSelector: {matchLabels: {app: db}}}]\n",
    ]);
    assert!(w.allowed("default/web", "default/db", TCP, 5432));
    assert!(!w.allowed("default/web", "default/client", TCP, 80), "egress isolated");
    assert!(!w.allowed("default/client", "default/web", TCP, 80), "ingress isolated by default type");
}

#[test]
fn empty_egress_without_policy_types_does_not_isolate_egress() {
    let w = World::new(&["metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  egress: []\n"]);
    assert!(w.allowed("default/web", "8.8.8.8", TCP, 443));
    assert!(!w.allowed("default/client", "default/web", TCP, 80), "ingress isolated");
}

#[test]
fn egress_only_policy_types_ignore_ingress_rules() {
    let w = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: nobody}}}]\n",
    ]);
    assert!(w.allowed("default/client", "default/web", TCP, 80), "ingress not isolated");
    assert!(!w.allowed("default/web", "default/client", TCP, 80), "egress isolated, no rules");
}

#[test]
fn ip_block_except_excludes_a_pod_ip_and_matches_pods_by_ip() {
    let w = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.3/32]}}]\n",
    ]);
    assert!(w.allowed("default/db", "default/web", TCP, 80), "pod IP inside the block");
    assert!(w.allowed("prod/mon", "default/web", TCP, 80));
    assert!(!w.allowed("default/client", "default/web", TCP, 80), "excepted pod IP");
    assert!(!w.allowed("10.1.0.1", "default/web", TCP, 80));
    assert!(w.allowed("10.0.9.9", "default/web", TCP, 80), "non-pod address in the block");
}

#[test]
fn ipv6_ip_block() {
    let w = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{ipBlock: {cidr: 'fd00::/120', except: ['fd00::2/128']}}]\n",
    ]);
    assert!(w.allowed("fd00::7", "default/web", TCP, 80));
    assert!(!w.allowed("default/db", "fd00::1", TCP, 80), "db's v6 address is excepted");
    assert!(!w.allowed("10.0.0.2", "default/web", TCP, 80), "IPv4 is outside an IPv6 block");
    assert!(!w.allowed("fd01::1", "default/web", TCP, 80));
}

#[test]
fn named_port_resolves_against_each_destination_pod() {
    // Ingress: "http" is 8080 on web and 9000 on db.
    let w = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - ports: [{port: http}]\n",
    ]);
    assert!(w.allowed("default/client", "default/web", TCP, 8080));
    assert!(!w.allowed("default/client", "default/web", TCP, 9000));
    assert!(w.allowed("default/client", "default/db", TCP, 9000));
    assert!(!w.allowed("default/web", "default/client", TCP, 8080), "client declares no http port");
    // Egress: the named port only matches destination pods that declare it.
    let w = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: dns, protocol: UDP}]\n",
    ]);
    assert!(w.allowed("default/client", "default/db", UDP, 53));
    assert!(!w.allowed("default/client", "default/web", UDP, 53), "web has no dns port");
    assert!(!w.allowed("default/client", "8.8.8.8", UDP, 53), "non-pod never matches a named port");
    assert!(!w.allowed("default/client", "default/db", TCP, 53), "named port is UDP");
}

#[test]
fn end_port_range_edges() {
    let w = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: 32000, endPort: 32768}]\n",
    ]);
    assert!(!w.allowed("default/client", "default/web", TCP, 31999));
    assert!(w.allowed("default/client", "default/web", TCP, 32000));
    assert!(w.allowed("default/client", "default/web", TCP, 32500));
    assert!(w.allowed("default/client", "default/web", TCP, 32768));
    assert!(!w.allowed("default/client", "default/web", TCP, 32769));
    assert!(!w.allowed("default/client", "default/web", UDP, 32000), "protocol defaults to TCP");
}

#[test]
fn protocol_must_match() {
    let w = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: 53, protocol: UDP}, {protocol: SCTP}]\n",
    ]);
    assert!(w.allowed("default/client", "default/web", UDP, 53));
    assert!(!w.allowed("default/client", "default/web", TCP, 53));
    assert!(w.allowed("default/client", "default/web", Protocol::Sctp, 7), "SCTP without port = all");
    assert!(!w.allowed("default/client", "default/web", Protocol::Icmp, 0), "ICMP needs a rule without ports");
}

#[test]
fn policy_in_another_namespace_selects_nothing_here() {
    let w = World::new(&["metadata: {name: p, namespace: prod}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}"]);
    assert!(w.allowed("default/client", "default/web", TCP, 80));
    assert!(!w.allowed("default/client", "prod/mon", TCP, 80));
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_and_separate_peers_is_or() {
    let and = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: ops}}, podSelector: {matchLabels: {app: monitoring}}}]\n",
    ]);
    assert!(and.allowed("prod/mon", "default/web", TCP, 80));
    assert!(!and.allowed("dev/mon", "default/web", TCP, 80));
    assert!(!and.allowed("default/client", "default/web", TCP, 80));
    let or = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: ops}}}, {podSelector: {matchLabels: {app: client}}}]\n",
    ]);
    assert!(or.allowed("prod/mon", "default/web", TCP, 80));
    assert!(!or.allowed("dev/mon", "default/web", TCP, 80));
    assert!(or.allowed("default/client", "default/web", TCP, 80));
    // A podSelector alone means the policy's namespace only.
    let own = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: monitoring}}}]\n",
    ]);
    assert!(!own.allowed("prod/mon", "default/web", TCP, 80));
    // An empty namespaceSelector means every namespace.
    let all = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {}}]\n",
    ]);
    assert!(all.allowed("dev/mon", "default/web", TCP, 80));
    assert!(!all.allowed("10.9.9.9", "default/web", TCP, 80), "selectors admit pods only");
}

#[test]
fn match_expression_operators() {
    let w = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [web, db]}]}\n  policyTypes: [Ingress]\n",
        "metadata: {name: q, namespace: default}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [client]}]}}]\n",
    ]);
    // web and db are selected by p (no rules) and q; q admits non-clients of default.
    assert!(!w.allowed("default/client", "default/web", TCP, 80));
    assert!(w.allowed("default/db", "default/web", TCP, 80), "union of policies");
    let exists = World::new(&[
        "metadata: {name: p, namespace: default}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: Exists}]}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{namespaceSelector: {matchExpressions: [{key: team, operator: DoesNotExist}]}}]\n",
    ]);
    assert!(exists.allowed("default/client", "default/web", TCP, 80), "default has no team label");
    assert!(!exists.allowed("prod/mon", "default/web", TCP, 80));
}

#[test]
fn invalid_selector_fails_closed_without_panicking() {
    let w = World::new(&[
        "metadata: {name: bad, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: app, operator: Foo, values: [x]}]}}]\n",
    ]);
    let v = w.verdict("default/client", "default/web", TCP, 80);
    assert!(!v.allowed);
    assert!(v.ingress.isolated);
    assert!(v.ingress.policy_errors.iter().any(|e| e.contains("Foo")), "{:?}", v.ingress.policy_errors);
    // Invalid podSelector: selects every pod of the namespace.
    let w = World::new(&[
        "metadata: {name: bad, namespace: default}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: In, values: []}]}\n  ingress:\n  - {}\n",
    ]);
    assert!(!w.allowed("prod/mon", "default/client", TCP, 80));
    assert!(w.allowed("default/client", "prod/mon", TCP, 80), "other namespaces untouched");
}

#[test]
fn unparsable_cidr_fails_closed() {
    let w = World::new(&[
        "metadata: {name: bad, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/33}}, {podSelector: {}}]\n",
    ]);
    assert!(!w.allowed("default/client", "default/web", TCP, 80), "valid peer of a broken policy admits nothing");
    assert_eq!(w.state.policies.values().next().expect("policy").errors.len(), 1);
}

#[test]
fn self_and_node_traffic_are_always_allowed() {
    let w = World::new(&["metadata: {name: deny, namespace: default}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}"]);
    let v = w.verdict("default/web", "default/web", TCP, 80);
    assert!(v.allowed);
    assert_eq!(v.exception, Some(Exception::SelfTraffic));
    let v = w.verdict("172.18.0.2", "default/web", TCP, 80);
    assert!(v.allowed);
    assert_eq!(v.exception, Some(Exception::NodeTraffic));
    assert!(w.allowed("default/web", "172.18.0.2", TCP, 10250));
    assert!(!w.allowed("172.18.0.3", "default/web", TCP, 80), "another node's address is not exempt");
}

#[test]
fn union_of_policies_and_the_match_report() {
    let w = World::new(&[
        "metadata: {name: a, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 5432}]\n",
        "metadata: {name: b, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: nobody}}}]\n  - from: [{ipBlock: {cidr: 10.0.0.0/24}}, {podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 1, protocol: UDP}, {port: 6379}]\n",
    ]);
    assert!(w.allowed("default/web", "default/db", TCP, 5432));
    let v = w.verdict("default/client", "default/db", TCP, 6379);
    assert!(v.allowed);
    assert_eq!(v.ingress.selecting_policies, vec!["default/a".to_string(), "default/b".to_string()]);
    assert_eq!(
        v.ingress.matched,
        Some(RuleMatch { policy: "default/b".into(), rule_index: 1, peer_index: Some(0), port_index: Some(1) })
    );
    assert!(!w.allowed("default/client", "default/db", TCP, 5432));
}

#[test]
fn both_directions_must_allow() {
    let w = World::new(&[
        "metadata: {name: out, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: web}}}]\n",
        "metadata: {name: in, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: db}}}]\n",
    ]);
    let v = w.verdict("default/client", "default/web", TCP, 80);
    assert!(v.egress.allowed && !v.ingress.allowed && !v.allowed);
    assert!(w.allowed("default/db", "default/web", TCP, 80));
    assert!(!w.allowed("default/client", "default/db", TCP, 80));
}

#[test]
fn bad_ports_and_peers_are_errors() {
    for spec in [
        "  - ports: [{port: 0}]\n",
        "  - ports: [{port: 90, endPort: 80}]\n",
        "  - ports: [{port: http, endPort: 90}]\n",
        "  - ports: [{protocol: ICMP}]\n",
        "  - from: [{}]\n",
        "  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]\n",
        "  - from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n",
    ] {
        let yaml = format!("metadata: {{name: bad, namespace: default}}\nspec:\n  podSelector: {{}}\n  ingress:\n{spec}");
        let w = World::new(&[&yaml]);
        assert_eq!(w.state.policies.values().next().expect("policy").errors.len(), 1, "{spec}");
        assert!(!w.allowed("default/client", "default/web", TCP, 80), "{spec}");
    }
}

#[test]
fn resolve_and_family_alignment() {
    let w = World::new(&[]);
    assert!(matches!(w.state.resolve("default/nope"), Err(PolicyError::UnknownPod(_))));
    assert!(matches!(w.state.resolve("nonsense"), Err(PolicyError::BadEndpoint(_))));
    let by_ip = w.state.resolve("10.0.0.1").expect("ip");
    assert_eq!(by_ip.pod.as_deref(), Some("default/web"));
    let web = w.state.resolve("default/web").expect("pod");
    let flow = w.state.flow(by_ip, web.clone(), TCP, 1).expect("flow");
    assert_eq!(flow.dst.ip, "10.0.0.1".parse::<IpAddr>().expect("ip"));
    let v6 = w.state.resolve("fd00::9").expect("ip");
    let flow = w.state.flow(v6.clone(), web, TCP, 1).expect("flow");
    assert_eq!(flow.dst.ip, "fd00::1".parse::<IpAddr>().expect("ip"));
    let client = w.state.resolve("default/client").expect("pod");
    assert!(w.state.flow(v6, client, TCP, 1).is_err(), "client has no IPv6 address");
}

/// Fields the NetworkPolicy type does not know are found (plain decoding drops them); under
/// `spec` they fail the policy closed, elsewhere they change nothing.
#[test]
fn unknown_fields_are_reported_and_fail_closed_only_under_spec() {
    let object = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "default", "futureMeta": 1},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}, "futurePeer": {"x": 1}}]}], "futureSpec": true},
    });
    let (policy, mut unknown) = decode_object::<NetworkPolicy>(object).expect("decodes");
    unknown.sort();
    assert_eq!(unknown, vec!["metadata.futureMeta", "spec.futureSpec", "spec.ingress.0.from.0.futurePeer"]);
    let compiled = CompiledPolicy::compile(&policy);
    assert!(compiled.errors.is_empty());
    assert_eq!(compiled.ingress.as_ref().map(Vec::len), Some(1));
    let judged = compiled.clone().with_unknown_fields(&unknown);
    assert_eq!(judged.errors.len(), 2, "{:?}", judged.errors);
    assert_eq!(judged.ingress, Some(Vec::new()), "fails closed: isolated, admits nothing");
    assert_eq!(judged.egress, None, "directions it does not declare stay untouched");
    let metadata_only = compiled.clone().with_unknown_fields(&["metadata.futureMeta".to_string()]);
    assert_eq!(metadata_only, compiled);
}
