//! The deployment manifests agree with the agent: they parse as the Kubernetes types they
//! claim to be, grant only read access to what the watchers read, pass flags the binary
//! accepts, and probe the endpoints the agent serves. (No cluster can run here; this is what
//! can be checked without one.)
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

fn documents(file: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(deploy(file)).expect("manifest readable");
    serde_yaml::Deserializer::from_str(&text).map(|d| serde_yaml::Value::deserialize(d).expect("valid YAML")).collect()
}

fn of_kind<T: serde::de::DeserializeOwned>(docs: &[serde_yaml::Value], kind: &str) -> T {
    let doc = docs.iter().find(|d| d["kind"].as_str() == Some(kind)).unwrap_or_else(|| panic!("no {kind}"));
    serde_yaml::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind} does not parse: {e}"))
}

#[test]
fn rbac_grants_only_reads_of_watched_resources() {
    let docs = documents("rbac.yaml");
    let account: ServiceAccount = of_kind(&docs, "ServiceAccount");
    let role: ClusterRole = of_kind(&docs, "ClusterRole");
    let binding: ClusterRoleBinding = of_kind(&docs, "ClusterRoleBinding");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for verb in &rule.verbs {
            assert!(["get", "list", "watch"].contains(&verb.as_str()), "write verb {verb} granted");
        }
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.insert((group.clone(), resource.clone(), rule.verbs.clone()));
            }
        }
    }
    let reads = vec!["get".to_string(), "list".to_string(), "watch".to_string()];
    let expected: BTreeSet<_> = [("", "pods"), ("", "namespaces"), ("networking.k8s.io", "networkpolicies")]
        .into_iter()
        .map(|(g, r)| (g.to_string(), r.to_string(), reads.clone()))
        .collect();
    assert_eq!(granted, expected);
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().expect("role name"));
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!((subject.name.as_str(), subject.namespace.as_deref()), ("netsieve", account.metadata.namespace.as_deref()));
}

#[test]
fn daemonset_matches_the_agent() {
    let docs = documents("daemonset.yaml");
    let ds: DaemonSet = of_kind(&docs, "DaemonSet");
    let pod = ds.spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("netsieve"));
    assert!(pod.tolerations.iter().flatten().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()), "tolerates control-plane taints");
    let container = &pod.containers[0];
    let node_name = container.env.iter().flatten().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    let field = node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("downward API");
    assert_eq!(field.field_path, "spec.nodeName");

    // Flags the DaemonSet passes exist in the binary's CLI, and the metrics port is the one
    // probed and declared.
    let args = container.args.clone().expect("args");
    assert_eq!(args[0], "agent");
    let help = Command::new(env!("CARGO_BIN_EXE_netsieve")).args(["agent", "--help"]).output().expect("netsieve runs");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "netsieve agent has no {flag}");
    }
    let on_exit = args.iter().skip_while(|a| *a != "--on-exit").nth(1).expect("--on-exit");
    assert_eq!(on_exit, "keep", "upgrades must not open traffic");
    let addr = args.iter().skip_while(|a| *a != "--metrics-addr").nth(1).expect("metrics addr");
    let port: i32 = addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().and_then(|p| p.http_get.clone()).expect("httpGet probe");
        let port = match get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n,
            other => panic!("numeric probe port expected, got {other:?}"),
        };
        (get.path.unwrap_or_default(), port)
    };
    assert_eq!(probe(&container.liveness_probe), ("/healthz".to_string(), port));
    assert_eq!(probe(&container.readiness_probe), ("/readyz".to_string(), port));
    assert!(container.ports.iter().flatten().any(|p| p.container_port == port));

    // Least privilege: not privileged, all capabilities dropped but the three it needs.
    let security = container.security_context.as_ref().expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let caps = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.clone().unwrap_or_default(), vec!["ALL".to_string()]);
    let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON"].map(String::from).into());

    // bpffs and /proc from the host; requests set.
    let volumes = pod.volumes.clone().unwrap_or_default();
    let host_path = |name: &str| volumes.iter().find(|v| v.name == name).and_then(|v| v.host_path.clone()).map(|h| h.path);
    assert_eq!(host_path("bpffs").as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(host_path("proc").as_deref(), Some("/proc"));
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    assert!(mounts.iter().any(|m| m.name == "bpffs" && m.mount_path == "/sys/fs/bpf"));
    let requests = container.resources.as_ref().and_then(|r| r.requests.clone()).expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
}

#[test]
fn dockerfile_is_multi_stage_and_kind_config_parses() {
    let dockerfile = std::fs::read_to_string(deploy("Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "multi-stage");
    assert!(dockerfile.contains("cargo xtask build"));
    assert!(dockerfile.contains("COPY --from=build /src/target/release/netsieve"));
    let kind = &documents("kind/cluster.yaml")[0];
    assert_eq!(kind["kind"].as_str(), Some("Cluster"));
    assert_eq!(kind["apiVersion"].as_str(), Some("kind.x-k8s.io/v1alpha4"));
    let script = std::fs::read_to_string(deploy("kind/disable-kindnet-policy.sh")).expect("script");
    assert!(script.contains("--network-policy=false"));
}
