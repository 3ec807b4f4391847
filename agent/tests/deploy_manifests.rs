//! The deployment manifests agree with the agent: they parse as the Kubernetes types they
//! claim to be, grant only read access to what the watchers read, pass flags the binary
//! accepts, and probe the endpoints the agent serves; the init container installs the CNI
//! plugin where the runtime finds it, and `netsieve cni install | uninstall` does so
//! idempotently on a kind node's configuration. (No cluster can run here; this is what can be
//! checked without one.)
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

    // The node API socket lives in a host directory, where the CNI plugin (run by the
    // container runtime on the host) reaches it.
    let socket = args.iter().skip_while(|a| *a != "--socket").nth(1).expect("--socket").clone();
    let run = mounts.iter().find(|m| socket.starts_with(&format!("{}/", m.mount_path))).expect("socket on a mounted volume");
    let run_host = host_path(&run.name).expect("socket volume is a hostPath");
    assert_eq!(Path::new(&run_host).join(Path::new(&socket).strip_prefix(&run.mount_path).expect("under the mount")), Path::new(&socket));

    // The init container installs the plugin: `netsieve cni install` with flags it accepts,
    // into the host's CNI directories, pointing the plugin at the agent's socket.
    let init = pod.init_containers.as_ref().and_then(|c| c.iter().find(|c| c.name == "install-cni")).expect("install-cni init container");
    assert_eq!(init.image, container.image, "same image as the agent");
    let init_args = init.args.clone().expect("init args");
    assert_eq!(&init_args[..2], ["cni", "install"]);
    let help = Command::new(env!("CARGO_BIN_EXE_netsieve")).args(["cni", "install", "--help"]).output().expect("netsieve runs");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in init_args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "netsieve cni install has no {flag}");
    }
    let value = |flag: &str| init_args.iter().skip_while(|a| *a != flag).nth(1).cloned().unwrap_or_else(|| panic!("{flag}"));
    assert_eq!(value("--socket"), socket, "the plugin talks to the agent's socket");
    assert_eq!(value("--binary"), "/usr/local/bin/netsieve-cni", "the image's plugin binary");
    let init_mounts = init.volume_mounts.clone().unwrap_or_default();
    for (flag, host) in [("--bin-dir", "/opt/cni/bin"), ("--conf-dir", "/etc/cni/net.d")] {
        let dir = value(flag);
        let mount = init_mounts.iter().find(|m| m.mount_path == dir).unwrap_or_else(|| panic!("{flag} {dir} is not mounted"));
        assert_eq!(host_path(&mount.name).as_deref(), Some(host), "{flag}");
    }
    let init_security = init.security_context.as_ref().expect("init securityContext");
    assert_ne!(init_security.privileged, Some(true));
    assert_eq!(init_security.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_string()]));
}

/// kind's kindnet configuration list (kindnetd writes it as /etc/cni/net.d/10-kindnet.conflist),
/// formatting quirks included.
const KINDNET_CONFLIST: &str = r#"
{
	"cniVersion": "0.3.1",
	"name": "kindnet",
	"plugins": [
	{
		"type": "ptp",
		"ipMasq": false,
		"ipam": {
			"type": "host-local",
			"dataDir": "/run/cni-ipam-state",
			"routes": [
				{ "dst": "0.0.0.0/0" }
			],
			"ranges": [
				[ { "subnet": "10.244.1.0/24" } ]
			]
		}
		,
		"mtu": 1500
	},
	{
		"type": "portmap",
		"capabilities": {
			"portMappings": true
		}
	}
	]
}
"#;

#[test]
fn cni_install_and_uninstall_are_idempotent_on_a_kind_node() {
    let root = std::env::temp_dir().join(format!("netsieve-cni-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (bin_dir, conf_dir) = (root.join("opt/cni/bin"), root.join("etc/cni/net.d"));
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    std::fs::write(conf_dir.join("10-kindnet.conflist"), KINDNET_CONFLIST).expect("conflist");
    // Not the active configuration (sorted after): left alone.
    std::fs::write(conf_dir.join("99-other.conflist"), r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#).expect("other");
    let plugin = Path::new(env!("CARGO_BIN_EXE_netsieve-cni"));
    let netsieve = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_netsieve")).args(args).output().expect("netsieve runs");
        assert!(output.status.success(), "netsieve {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    let install = [
        "cni", "install", "--binary", plugin.to_str().expect("path"), "--bin-dir", bin_dir.to_str().expect("path"),
        "--conf-dir", conf_dir.to_str().expect("path"), "--socket", "/run/netsieve/agent.sock",
    ];
    let printed = netsieve(&install);
    assert!(printed.contains("now chains netsieve-cni"), "{printed}");
    let conflist: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf_dir.join("10-kindnet.conflist")).expect("read")).expect("valid JSON");
    let original: serde_json::Value = serde_json::from_str(KINDNET_CONFLIST).expect("kindnet conflist");
    let plugins = conflist["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), 3);
    assert_eq!(&plugins[..2], original["plugins"].as_array().expect("plugins").as_slice(), "main plugins untouched");
    assert_eq!(plugins[2], serde_json::json!({"type": "netsieve-cni", "socket": "/run/netsieve/agent.sock"}));
    assert_eq!((conflist["name"].clone(), conflist["cniVersion"].clone()), (original["name"].clone(), original["cniVersion"].clone()));
    let installed = bin_dir.join("netsieve-cni");
    assert_eq!(std::fs::read(&installed).expect("installed"), std::fs::read(plugin).expect("plugin"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&installed).expect("meta").permissions().mode() & 0o777, 0o755);
    // The installed binary is a working plugin: VERSION as a runtime asks it.
    let mut child = Command::new(&installed)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run plugin");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), br#"{"cniVersion":"0.3.1"}"#).expect("stdin");
    let version: serde_json::Value = serde_json::from_slice(&child.wait_with_output().expect("output").stdout).expect("VERSION JSON");
    assert!(version["supportedVersions"].as_array().expect("versions").contains(&serde_json::json!("0.3.1")));

    // Twice: nothing changes, byte for byte; no leftover temporary files.
    let snapshot = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .map(|p| (p.file_name().expect("name").to_string_lossy().to_string(), std::fs::read(&p).expect("read")))
            .collect();
        files.sort();
        files
    };
    let before = (snapshot(&conf_dir), snapshot(&bin_dir));
    let printed = netsieve(&install);
    assert!(printed.contains("already up to date") && printed.contains("already chains"), "{printed}");
    assert_eq!((snapshot(&conf_dir), snapshot(&bin_dir)), before, "a second install changed something");
    assert_eq!(before.0.len(), 2, "only the two configuration files: {:?}", before.0.iter().map(|f| &f.0).collect::<Vec<_>>());

    // Uninstall: the plugin leaves the list, the binary goes; again is a no-op.
    netsieve(&["cni", "uninstall", "--bin-dir", bin_dir.to_str().expect("path"), "--conf-dir", conf_dir.to_str().expect("path")]);
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf_dir.join("10-kindnet.conflist")).expect("read")).expect("valid JSON");
    assert_eq!(after, original, "uninstall restores the configuration");
    assert!(!installed.exists(), "binary removed");
    netsieve(&["cni", "uninstall", "--bin-dir", bin_dir.to_str().expect("path"), "--conf-dir", conf_dir.to_str().expect("path")]);
    // `netsieve cleanup` uninstalls too.
    netsieve(&install);
    netsieve(&[
        "cleanup", "--node", "no-such-node", "--bpffs", root.join("bpffs").to_str().expect("path"),
        "--cni-bin-dir", bin_dir.to_str().expect("path"), "--cni-conf-dir", conf_dir.to_str().expect("path"),
    ]);
    let cleaned: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf_dir.join("10-kindnet.conflist")).expect("read")).expect("valid JSON");
    assert_eq!(cleaned, original, "cleanup removes the plugin");
    assert!(!installed.exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn dockerfile_is_multi_stage_and_kind_config_parses() {
    let dockerfile = std::fs::read_to_string(deploy("Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "multi-stage");
    assert!(dockerfile.contains("cargo xtask build"));
    assert!(dockerfile.contains("COPY --from=build /src/target/release/netsieve /usr/local/bin/netsieve"));
    assert!(dockerfile.contains("COPY --from=build /src/target/release/netsieve-cni /usr/local/bin/netsieve-cni"));
    // Discovery speaks rtnetlink: the image needs no iproute2.
    assert!(
        !dockerfile.lines().filter(|l| !l.trim_start().starts_with('#')).any(|l| l.contains("iproute2")),
        "the agent no longer runs ip/bridge"
    );
    let kind = &documents("kind/cluster.yaml")[0];
    assert_eq!(kind["kind"].as_str(), Some("Cluster"));
    assert_eq!(kind["apiVersion"].as_str(), Some("kind.x-k8s.io/v1alpha4"));
    let script = std::fs::read_to_string(deploy("kind/disable-kindnet-policy.sh")).expect("script");
    assert!(script.contains("--network-policy=false"));
}
