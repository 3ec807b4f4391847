//! The deployment manifests agree with the agent: they parse as the Kubernetes types they
//! claim to be, grant only read access to what the watchers read, pass flags the binary
//! accepts, and probe the endpoints the agent serves; the init container installs the CNI
//! plugin where the runtime finds it, and `netsieve cni install | uninstall` does so
//! idempotently on a kind node's configuration. (No cluster can run here; this is what can be
//! checked without one.)
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use promql_parser::parser::{Expr, LabelModifier, VectorSelector};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
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

/// The agent's exposition with a series in every family, rendered in-process: metric name
/// (as sampled: `_total`, `_bucket`, ...) -> its label names.
fn exposed_metrics() -> BTreeMap<String, BTreeSet<String>> {
    use netsieve::metrics::{AuditSnapshot, DataplaneSnapshot, EndpointCounters, Metrics, RuleSeries};
    use std::time::Duration;
    let metrics = Metrics::default();
    metrics.observe_programming(Duration::from_millis(2));
    metrics.reconcile_error("sync");
    metrics.watch_restart("pods");
    metrics.relist("pods");
    metrics.event("pods");
    metrics.invalid_object("NetworkPolicy", "invalid_policy");
    let mut snapshot = DataplaneSnapshot {
        drops: vec![("policy_denied", "ingress", 3)],
        audits: vec![("policy_denied", "ingress", 2)],
        endpoint_count: 1,
        policy_count: 1,
        rules: vec![RuleSeries {
            namespace: "default".into(),
            policy: "access-nginx".into(),
            direction: "ingress",
            rule: "0".into(),
            packets: 4,
            bytes: 400,
        }],
        audit: AuditSnapshot { active: true, namespaces: vec!["staging".into()], endpoints: 1 },
        ..DataplaneSnapshot::default()
    };
    snapshot.endpoints.insert("default/nginx-1".into(), EndpointCounters { denied_packets: [3, 0], ..Default::default() });
    snapshot.maps.insert("IPCACHE", (6, 65536));
    metrics.set_dataplane(snapshot);
    metrics.set_ready(true, "");
    let text = metrics.render();
    let mut exposed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let series = line.rsplit_once(' ').map(|(s, _)| s).unwrap_or_else(|| panic!("sample without value: {line}"));
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let names = exposed.entry(name.to_string()).or_default();
        // The label values above contain no `",`, so splitting on it is exact.
        for pair in labels.trim_end_matches('}').split("\",").filter(|p| !p.is_empty()) {
            names.insert(pair.split_once('=').map(|(k, _)| k.to_string()).unwrap_or_else(|| panic!("label in {line}")));
        }
    }
    exposed
}

/// Checks PromQL expressions against the agent's exposition with a real PromQL parser.
struct PromqlChecker {
    /// Exposed metric name -> its label names.
    exposed: BTreeMap<String, BTreeSet<String>>,
    /// Labels Prometheus adds to every series of a target.
    target_labels: BTreeSet<String>,
}

impl PromqlChecker {
    /// Parses `expr` (Grafana's interval variables replaced by a duration) and returns the
    /// metrics it selects and the labels its result series carry, or what is wrong with it:
    /// a syntax error, an unknown metric, or a matcher, `by`, `without`, `on` or `ignoring`
    /// on a label its operand does not have.
    fn check(&self, expr: &str) -> Result<(BTreeSet<String>, BTreeSet<String>), String> {
        let mut promql = expr.to_string();
        for variable in ["$__rate_interval", "$__interval", "$__range"] {
            promql = promql.replace(variable, "5m");
        }
        let ast = promql_parser::parser::parse(&promql).map_err(|e| format!("does not parse: {e}"))?;
        let mut metrics = BTreeSet::new();
        let labels = self.result_labels(&ast, &mut metrics)?;
        Ok((metrics, labels))
    }

    fn selector(&self, selector: &VectorSelector, metrics: &mut BTreeSet<String>) -> Result<BTreeSet<String>, String> {
        let name = selector.name.clone().ok_or("a selector without a metric name")?;
        let labels = self.exposed.get(&name).ok_or_else(|| format!("{name} is not exposed by the agent; it exposes {:?}", self.exposed.keys()))?;
        let labels: BTreeSet<String> = labels.union(&self.target_labels).cloned().collect();
        for matcher in selector.matchers.matchers.iter().chain(selector.matchers.or_matchers.iter().flatten()) {
            if matcher.name != "__name__" && !labels.contains(&matcher.name) {
                return Err(format!("{name} has no label {} (it has {labels:?})", matcher.name));
            }
        }
        metrics.insert(name);
        Ok(labels)
    }

    fn result_labels(&self, expr: &Expr, metrics: &mut BTreeSet<String>) -> Result<BTreeSet<String>, String> {
        let known = |labels: &[String], operand: &BTreeSet<String>| match labels.iter().find(|l| !operand.contains(*l)) {
            Some(l) => Err(format!("grouping or matching on {l}, which the operand does not have ({operand:?})")),
            None => Ok(labels.iter().cloned().collect::<BTreeSet<String>>()),
        };
        Ok(match expr {
            Expr::VectorSelector(selector) => self.selector(selector, metrics)?,
            Expr::MatrixSelector(matrix) => self.selector(&matrix.vs, metrics)?,
            Expr::Aggregate(aggregate) => {
                if let Some(param) = &aggregate.param {
                    self.result_labels(param, metrics)?;
                }
                let operand = self.result_labels(&aggregate.expr, metrics)?;
                match &aggregate.modifier {
                    Some(LabelModifier::Include(by)) => known(&by.labels, &operand)?,
                    Some(LabelModifier::Exclude(without)) => &operand - &known(&without.labels, &operand)?,
                    // topk and bottomk keep the series they pick; the others reduce to one.
                    None if ["topk", "bottomk"].contains(&aggregate.op.to_string().as_str()) => operand,
                    None => BTreeSet::new(),
                }
            }
            Expr::Call(call) => {
                let mut args = Vec::new();
                for arg in &call.args.args {
                    args.push(self.result_labels(arg, metrics)?);
                }
                match call.func.name {
                    "histogram_quantile" => args.get(1).map(|a| a - &BTreeSet::from(["le".to_string()])).unwrap_or_default(),
                    _ => args.into_iter().flatten().collect(),
                }
            }
            Expr::Binary(binary) => {
                let lhs = self.result_labels(&binary.lhs, metrics)?;
                let rhs = self.result_labels(&binary.rhs, metrics)?;
                let vector = if matches!(*binary.lhs, Expr::NumberLiteral(_)) { rhs.clone() } else { lhs.clone() };
                match binary.modifier.as_ref().and_then(|m| m.matching.as_ref()) {
                    Some(LabelModifier::Include(on)) => {
                        known(&on.labels, &lhs)?;
                        known(&on.labels, &rhs)?
                    }
                    Some(LabelModifier::Exclude(ignoring)) => &vector - &known(&ignoring.labels, &vector)?,
                    None => vector,
                }
            }
            Expr::Paren(paren) => self.result_labels(&paren.expr, metrics)?,
            Expr::Unary(unary) => self.result_labels(&unary.expr, metrics)?,
            Expr::Subquery(subquery) => self.result_labels(&subquery.expr, metrics)?,
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => BTreeSet::new(),
        })
    }
}

fn checker() -> PromqlChecker {
    PromqlChecker { exposed: exposed_metrics(), target_labels: ["instance", "job"].map(String::from).into() }
}

#[test]
fn promql_checker_catches_wrong_metrics_and_labels() {
    let checker = checker();
    let (metrics, labels) = checker
        .check(r#"sum by (reason, direction) (rate(netsieve_drops_total{instance=~"$instance"}[$__rate_interval]))"#)
        .expect("valid");
    assert_eq!(metrics, ["netsieve_drops_total".to_string()].into());
    assert_eq!(labels, ["direction", "reason"].map(String::from).into());
    let (_, labels) = checker
        .check(r#"histogram_quantile(0.9, sum by (le, instance) (rate(netsieve_policy_programming_duration_seconds_bucket[5m])))"#)
        .expect("valid");
    assert_eq!(labels, ["instance".to_string()].into());
    for (wrong, why) in [
        ("sum(rate(netsieve_drop_total[5m]))", "not exposed"),
        ("sum by (cause) (rate(netsieve_drops_total[5m]))", "grouping or matching on cause"),
        (r#"netsieve_endpoint_packets_total{verdikt="denied"}"#, "no label verdikt"),
        ("netsieve_map_entries / on (table) netsieve_map_capacity", "grouping or matching on table"),
        ("sum(rate(netsieve_drops_total[5m])", "does not parse"),
    ] {
        let error = checker.check(wrong).expect_err(wrong);
        assert!(error.contains(why), "{wrong}: {error}");
    }
}

#[test]
fn grafana_dashboard_queries_metrics_the_agent_exposes() {
    let text = std::fs::read_to_string(deploy("grafana/netsieve-dashboard.json")).expect("dashboard readable");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string() && dashboard["schemaVersion"].is_u64());

    // Importable anywhere: the data source is a variable of type datasource, and every panel
    // and query uses it rather than a data source of the machine it was made on.
    let variables = dashboard["templating"]["list"].as_array().expect("templating.list");
    let datasource = variables.iter().find(|v| v["type"] == "datasource").expect("a datasource variable");
    assert_eq!(datasource["query"], "prometheus");
    let uses_variable = |ds: &serde_json::Value| ds["uid"] == format!("${{{}}}", datasource["name"].as_str().unwrap_or(""));

    let checker = checker();
    let mut used = BTreeSet::new();
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let name = &variable["name"];
        assert!(uses_variable(&variable["datasource"]), "variable {name} has its own data source");
        let query = variable["query"]["query"].as_str().or(variable["query"].as_str()).expect("variable query");
        // Grafana's label_values(selector, label).
        let (selector, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .unwrap_or_else(|| panic!("variable {name}: label_values(selector, label) expected, got {query}"));
        let (metrics, labels) = checker.check(selector).unwrap_or_else(|e| panic!("variable {name}: {selector}: {e}"));
        let label = label.trim();
        assert!(labels.contains(label), "variable {name}: {selector} has no label {label}");
        used.extend(metrics);
    }

    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = &panel["title"];
        assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "duplicate panel id {}", panel["id"]);
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_u64(), "panel {title} has no gridPos.{key}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert!(uses_variable(&panel["datasource"]), "panel {title} has its own data source");
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("panel {title} queries nothing"));
        for target in targets {
            assert!(uses_variable(&target["datasource"]), "a query of {title} has its own data source");
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("panel {title} has a query without expr"));
            let (metrics, labels) = checker.check(expr).unwrap_or_else(|e| panic!("panel {title}: {expr}: {e}"));
            assert!(!metrics.is_empty(), "panel {title}: {expr} queries no netsieve metric");
            used.extend(metrics);
            queries += 1;
            // `{{label}}` in the legend must be a label of the result.
            let legend = target["legendFormat"].as_str().unwrap_or("");
            for label in legend.split("{{").skip(1).filter_map(|s| s.split_once("}}")).map(|(l, _)| l.trim()) {
                assert!(labels.contains(label), "panel {title}: legend {{{{{label}}}}} is not a label of {expr} ({labels:?})");
            }
        }
    }
    assert!(queries >= 15, "only {queries} queries");
    // What the dashboard is for: drops, per-pod verdicts, latency, map fill, state,
    // control-plane errors and readiness.
    for metric in [
        "netsieve_drops_total",
        "netsieve_endpoint_packets_total",
        "netsieve_policy_programming_duration_seconds_bucket",
        "netsieve_map_entries",
        "netsieve_map_capacity",
        "netsieve_endpoints",
        "netsieve_endpoints_failed_closed",
        "netsieve_pods_waiting_for_interface",
        "netsieve_policies",
        "netsieve_policies_invalid",
        "netsieve_reconcile_errors_total",
        "netsieve_api_watch_restarts_total",
        "netsieve_api_relists_total",
        "netsieve_ready",
        "netsieve_audit_mode",
        "netsieve_audit_total",
        "netsieve_audit_endpoints",
        "netsieve_audit_namespace",
        "netsieve_rule_packets_total",
        "netsieve_rules_unmatched",
        "netsieve_events_emitted_total",
        "netsieve_events_not_emitted_total",
        "netsieve_events_dropped_total",
        "netsieve_events_read_total",
        "netsieve_event_subscribers",
    ] {
        assert!(used.contains(metric), "the dashboard shows no {metric}");
    }
}
