//! The `netsieve-cni` chained plugin, as the CNI specification (1.0.0) defines a plugin: the
//! runtime runs it after the main plugin (ptp, bridge, kindnet…) with `CNI_COMMAND`,
//! `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS` and `CNI_PATH` in the environment and
//! the network configuration, with the main plugin's result as `prevResult`, on stdin. It
//! prints a result (ADD), nothing (DEL, CHECK) or a CNI error object on stdout, with a non-zero
//! exit status on error.
//!
//! - ADD: the pod (`K8S_POD_NAMESPACE`/`K8S_POD_NAME` of `CNI_ARGS`), its addresses and its
//!   host-side interface (the interfaces of prevResult without `sandbox`) go to the local
//!   agent over its socket (the `socket` key of the configuration, else
//!   [`DEFAULT_SOCKET`]); once the agent answers that the pod's endpoint is programmed and
//!   attached, prevResult is passed through. The pod's containers start only after ADD
//!   returns, so their first packet is judged by policy. An unreachable agent fails the ADD
//!   (code 11, try again later): the runtime tears the sandbox down and retries, so no pod
//!   runs unenforced. How the agent handles a pod whose Pod object it does not know yet is
//!   its decision (it attaches a fail-closed endpoint; see docs/CNI.md).
//! - DEL: tells the agent to forget the sandbox. Succeeds when the agent has nothing
//!   registered, and when no agent runs (nothing to release then; an agent that starts
//!   later has no registration).
//! - CHECK: asks the agent whether it enforces the pod on that interface with those
//!   addresses; an error when not.
//! - VERSION: the versions below. STATUS (1.1.0): whether the agent answers. GC (1.1.0):
//!   nothing to collect (registrations live in the agent and go with their sandboxes).
use crate::node_api::{self, CniAttachment, CniDetachment, ClientError, DEFAULT_SOCKET, PodRef, Request, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The CNI specification versions this plugin implements (prevResult chaining is 0.3.0+).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version used for output when the configuration does not say one.
const PREFERRED_VERSION: &str = "1.0.0";
/// How long the plugin waits for the agent's answer. The agent answers ADD within its own
/// bounded wait for a late Pod object (seconds), so this only guards against a hung agent.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest configuration read from stdin.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

/// Well-known CNI error codes, and the plugin's own (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The agent refused the request (its message says why).
    pub const AGENT_REFUSED: u32 = 100;
    /// CHECK: the pod is not enforced as prevResult describes.
    pub const NOT_ENFORCED: u32 = 101;
}

/// What the plugin prints and its exit status.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub exit_code: u8,
    pub stdout: String,
}

/// A CNI error object.
#[derive(Debug, Clone, PartialEq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> CniError {
        CniError { code, msg: msg.to_string(), details: details.into() }
    }
}

/// The network configuration fields the plugin reads; others are passed over.
#[derive(Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    /// The agent's socket.
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
}

#[derive(Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<ResultInterface>,
    #[serde(default)]
    ips: Vec<ResultIp>,
}

#[derive(Deserialize)]
struct ResultInterface {
    name: String,
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Deserialize)]
struct ResultIp {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

/// Runs one invocation. `env` reads the environment; `ask` sends a request to the agent at a
/// socket (the real one is [`node_api::call`]; tests pass a fake agent).
pub fn execute(
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    ask: &mut dyn FnMut(&Path, Request) -> Result<Response, ClientError>,
) -> Outcome {
    // Version of the configuration, for the output; our preferred one until it is known.
    let mut version = PREFERRED_VERSION.to_string();
    match run(env, stdin, ask, &mut version) {
        Ok(stdout) => Outcome { exit_code: 0, stdout },
        Err(error) => {
            let body = json!({ "cniVersion": version, "code": error.code, "msg": error.msg, "details": error.details });
            Outcome { exit_code: 1, stdout: format!("{body}\n") }
        }
    }
}

fn run(
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    ask: &mut dyn FnMut(&Path, Request) -> Result<Response, ClientError>,
    version: &mut String,
) -> Result<String, CniError> {
    let command = env("CNI_COMMAND").ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, "CNI_COMMAND is not set", ""))?;
    if command == "VERSION" {
        // The input carries the runtime's cniVersion; answer in it when we speak it.
        if let Ok(conf) = serde_json::from_slice::<Value>(stdin)
            && let Some(v) = conf.get("cniVersion").and_then(Value::as_str)
            && SUPPORTED_VERSIONS.contains(&v)
        {
            *version = v.to_string();
        }
        let body = json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS });
        return Ok(format!("{body}\n"));
    }
    let conf: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(code::DECODE, "cannot decode the network configuration", e.to_string()))?;
    let Some(conf_version) = conf.cni_version.clone() else {
        return Err(CniError::new(code::INVALID_CONFIG, "the network configuration has no cniVersion", ""));
    };
    if !SUPPORTED_VERSIONS.contains(&conf_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
            format!("{conf_version}; supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    *version = conf_version.clone();
    let socket = conf.socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let required = |name: &str| {
        env(name).filter(|v| !v.is_empty()).ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, &format!("{name} is not set"), ""))
    };
    match command.as_str() {
        "ADD" | "CHECK" => {
            let container_id = required("CNI_CONTAINERID")?;
            required("CNI_NETNS")?;
            required("CNI_IFNAME")?;
            let pod = pod_of(env("CNI_ARGS").as_deref())?;
            let Some(prev) = conf.prev_result.clone() else {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "no prevResult",
                    "netsieve-cni is a chained plugin: list it after the main plugin in a conflist",
                ));
            };
            let (host_interfaces, ips) = describe(&prev)?;
            let attachment = CniAttachment { pod, container_id, host_interfaces, ips };
            let is_add = command == "ADD";
            let request = if is_add { Request::CniAdd(attachment) } else { Request::CniCheck(attachment) };
            match ask(&socket, request) {
                Ok(Response::CniAdded { .. }) if is_add => {
                    let mut result = prev;
                    if let Some(object) = result.as_object_mut() {
                        object.insert("cniVersion".into(), Value::String(conf_version));
                    }
                    Ok(format!("{result}\n"))
                }
                Ok(Response::CniChecked { .. }) if !is_add => Ok(String::new()),
                Ok(Response::Error { code: error_code, message }) => {
                    let code = match error_code {
                        node_api::ErrorCode::Unavailable => code::TRY_AGAIN_LATER,
                        node_api::ErrorCode::NotEnforced => code::NOT_ENFORCED,
                        _ => code::AGENT_REFUSED,
                    };
                    Err(CniError::new(code, "the netsieve agent refused the request", format!("{error_code:?}: {message}")))
                }
                Ok(other) => Err(CniError::new(code::AGENT_REFUSED, "unexpected answer from the netsieve agent", format!("{other:?}"))),
                Err(error) => Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    "the netsieve agent is not reachable; the pod is not started unenforced",
                    error.to_string(),
                )),
            }
        }
        "DEL" => {
            let container_id = required("CNI_CONTAINERID")?;
            required("CNI_IFNAME")?;
            // Without the pod's name there is nothing the agent could have registered.
            let Ok(pod) = pod_of(env("CNI_ARGS").as_deref()) else { return Ok(String::new()) };
            match ask(&socket, Request::CniDel(CniDetachment { pod, container_id })) {
                Ok(Response::CniDeleted { .. }) => Ok(String::new()),
                Ok(Response::Error { code: error_code, message }) => Err(CniError::new(
                    code::AGENT_REFUSED,
                    "the netsieve agent refused the request",
                    format!("{error_code:?}: {message}"),
                )),
                Ok(other) => Err(CniError::new(code::AGENT_REFUSED, "unexpected answer from the netsieve agent", format!("{other:?}"))),
                // No agent: nothing is registered anywhere, so nothing is left to release.
                Err(ClientError::Connect { .. }) => Ok(String::new()),
                Err(error) => Err(CniError::new(code::TRY_AGAIN_LATER, "the netsieve agent did not answer", error.to_string())),
            }
        }
        "STATUS" => match ask(&socket, Request::Ping) {
            Ok(Response::Pong { .. }) => Ok(String::new()),
            Ok(other) => Err(CniError::new(code::NOT_AVAILABLE, "unexpected answer from the netsieve agent", format!("{other:?}"))),
            Err(error) => Err(CniError::new(code::NOT_AVAILABLE, "the netsieve agent is not reachable", error.to_string())),
        },
        "GC" => Ok(String::new()),
        other => Err(CniError::new(code::INVALID_ENVIRONMENT, "unknown CNI_COMMAND", other.to_string())),
    }
}

/// The pod of `CNI_ARGS` (`K8S_POD_NAMESPACE=ns;K8S_POD_NAME=name;…`).
fn pod_of(args: Option<&str>) -> Result<PodRef, CniError> {
    let mut namespace = None;
    let mut name = None;
    for pair in args.unwrap_or_default().split(';') {
        match pair.split_once('=') {
            Some(("K8S_POD_NAMESPACE", value)) => namespace = Some(value.to_string()),
            Some(("K8S_POD_NAME", value)) => name = Some(value.to_string()),
            _ => {}
        }
    }
    match (namespace, name) {
        (Some(namespace), Some(name)) if !namespace.is_empty() && !name.is_empty() => Ok(PodRef { namespace, name }),
        _ => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_ARGS lacks K8S_POD_NAMESPACE or K8S_POD_NAME",
            "netsieve-cni enforces Kubernetes pods; the runtime must pass the pod's identity",
        )),
    }
}

/// The host-side interfaces (those without `sandbox`) and the pod's addresses of a prevResult.
fn describe(prev: &Value) -> Result<(Vec<String>, Vec<IpAddr>), CniError> {
    let result: PrevResult = serde_json::from_value(prev.clone())
        .map_err(|e| CniError::new(code::DECODE, "cannot decode prevResult", e.to_string()))?;
    let host: Vec<String> = result
        .interfaces
        .iter()
        .filter(|i| i.sandbox.as_deref().is_none_or(str::is_empty))
        .map(|i| i.name.clone())
        .collect();
    if host.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult has no host-side interface",
            "the main plugin must report the pod's host-side interface (an interface without sandbox)",
        ));
    }
    let mut ips = Vec::new();
    for ip in &result.ips {
        // Addresses of interfaces in the sandbox (or unattributed ones) are the pod's.
        let on_host = ip.interface.and_then(|i| result.interfaces.get(i)).is_some_and(|i| i.sandbox.as_deref().is_none_or(str::is_empty));
        if on_host {
            continue;
        }
        let address = ip.address.split('/').next().unwrap_or_default();
        let parsed: IpAddr = address
            .parse()
            .map_err(|_| CniError::new(code::DECODE, "prevResult has an invalid address", ip.address.clone()))?;
        if !ips.contains(&parsed) {
            ips.push(parsed);
        }
    }
    if ips.is_empty() {
        return Err(CniError::new(code::INVALID_CONFIG, "prevResult has no pod address", "nothing to enforce the pod with"));
    }
    Ok((host, ips))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_api::{Enforcement, EnforcementMode, ErrorCode};
    use std::collections::BTreeMap;

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth1234","mac":"aa:bb:cc:dd:ee:ff"},{"name":"eth0","mac":"02:00:00:00:00:01","sandbox":"/var/run/netns/cni-1"}],"ips":[{"address":"10.244.1.7/24","gateway":"10.244.1.1","interface":1},{"address":"fd00::7/64","interface":1}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name: &str| map.get(name).cloned()
    }

    fn add_env(command: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", "c0ffee".to_string()),
            ("CNI_NETNS", "/var/run/netns/cni-1".to_string()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee".to_string()),
            ("CNI_PATH", "/opt/cni/bin".to_string()),
        ]
    }

    fn invoke(command: &str, conf: &str, answer: Result<Response, ()>) -> (Outcome, Vec<(PathBuf, Request)>) {
        let vars = add_env(command);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let env = env_of(&vars);
        let mut asked = Vec::new();
        let outcome = execute(&env, conf.as_bytes(), &mut |socket, request| {
            asked.push((socket.to_path_buf(), request));
            answer.clone().map_err(|()| ClientError::Connect {
                path: socket.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        });
        (outcome, asked)
    }

    fn conf(extra: &str) -> String {
        format!(r#"{{"cniVersion":"1.0.0","name":"kindnet","type":"netsieve-cni"{extra},"prevResult":{PREV}}}"#)
    }

    fn enforced() -> Enforcement {
        Enforcement { ifindex: 7, mode: EnforcementMode::Policy, ips: vec![] }
    }

    #[test]
    fn add_asks_the_agent_and_passes_prev_result_through() {
        let (outcome, asked) =
            invoke("ADD", &conf(r#","socket":"/tmp/a.sock""#), Ok(Response::CniAdded { enforcement: enforced() }));
        assert_eq!(outcome.exit_code, 0, "{}", outcome.stdout);
        let printed: Value = serde_json::from_str(&outcome.stdout).expect("JSON result");
        assert_eq!(printed, serde_json::from_str::<Value>(PREV).expect("prev"));
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].0, PathBuf::from("/tmp/a.sock"));
        let Request::CniAdd(attachment) = &asked[0].1 else { panic!("not an ADD: {:?}", asked[0].1) };
        assert_eq!(attachment.pod, PodRef { namespace: "default".into(), name: "web-0".into() });
        assert_eq!(attachment.host_interfaces, vec!["veth1234".to_string()]);
        assert_eq!(attachment.ips, vec!["10.244.1.7".parse::<IpAddr>().expect("ip"), "fd00::7".parse().expect("ip")]);
        assert_eq!(attachment.container_id, "c0ffee");
    }

    #[test]
    fn add_fails_when_the_agent_is_unreachable_or_refuses() {
        let (outcome, asked) = invoke("ADD", &conf(""), Err(()));
        assert_eq!(asked[0].0, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(outcome.exit_code, 1);
        let error: Value = serde_json::from_str(&outcome.stdout).expect("JSON error");
        assert_eq!(error["code"], json!(code::TRY_AGAIN_LATER));
        assert_eq!(error["cniVersion"], json!("1.0.0"));
        assert!(error["msg"].as_str().is_some_and(|m| !m.is_empty()));
        let refused = Response::error(ErrorCode::NoInterface, "no veth1234");
        let (outcome, _) = invoke("ADD", &conf(""), Ok(refused));
        let error: Value = serde_json::from_str(&outcome.stdout).expect("JSON error");
        assert_eq!((outcome.exit_code, error["code"].clone()), (1, json!(code::AGENT_REFUSED)));
    }

    #[test]
    fn bad_input_gets_cni_errors() {
        let code_of = |outcome: Outcome| -> u64 {
            assert_eq!(outcome.exit_code, 1);
            serde_json::from_str::<Value>(&outcome.stdout).expect("JSON")["code"].as_u64().expect("code")
        };
        let ok = || Ok(Response::CniAdded { enforcement: enforced() });
        assert_eq!(code_of(invoke("ADD", "{not json", ok()).0), u64::from(code::DECODE));
        assert_eq!(code_of(invoke("ADD", r#"{"cniVersion":"9.9.9","name":"x"}"#, ok()).0), u64::from(code::INCOMPATIBLE_VERSION));
        assert_eq!(code_of(invoke("ADD", r#"{"cniVersion":"1.0.0","name":"x"}"#, ok()).0), u64::from(code::INVALID_CONFIG));
        let sandbox_only = conf("").replace(r#"{"name":"veth1234","mac":"aa:bb:cc:dd:ee:ff"},"#, "").replace(r#""interface":1"#, r#""interface":0"#);
        assert_eq!(code_of(invoke("ADD", &sandbox_only, ok()).0), u64::from(code::INVALID_CONFIG));
        assert_eq!(code_of(invoke("FROB", &conf(""), ok()).0), u64::from(code::INVALID_ENVIRONMENT));
        let env = env_of(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c"), ("CNI_NETNS", "/n"), ("CNI_IFNAME", "eth0")]);
        let outcome = execute(&env, conf("").as_bytes(), &mut |_, _| panic!("must not reach the agent"));
        assert_eq!(code_of(outcome), u64::from(code::INVALID_ENVIRONMENT), "no K8S_POD_* in CNI_ARGS");
    }

    #[test]
    fn del_succeeds_without_an_agent_and_check_reports_not_enforced() {
        let (outcome, _) = invoke("DEL", &conf(""), Err(()));
        assert_eq!(outcome, Outcome { exit_code: 0, stdout: String::new() });
        let (outcome, asked) = invoke("DEL", &conf(""), Ok(Response::CniDeleted { registered: false }));
        assert_eq!(outcome.exit_code, 0);
        assert!(matches!(asked[0].1, Request::CniDel(_)));
        let (outcome, _) = invoke("CHECK", &conf(""), Ok(Response::CniChecked { enforcement: enforced() }));
        assert_eq!(outcome, Outcome { exit_code: 0, stdout: String::new() });
        let (outcome, _) = invoke("CHECK", &conf(""), Ok(Response::error(ErrorCode::NotEnforced, "not attached")));
        assert_eq!(serde_json::from_str::<Value>(&outcome.stdout).expect("JSON")["code"], json!(code::NOT_ENFORCED));
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let env = env_of(&[("CNI_COMMAND", "VERSION")]);
        let outcome = execute(&env, br#"{"cniVersion":"0.4.0"}"#, &mut |_, _| panic!("no agent needed"));
        let printed: Value = serde_json::from_str(&outcome.stdout).expect("JSON");
        assert_eq!(printed["cniVersion"], json!("0.4.0"));
        assert_eq!(printed["supportedVersions"], json!(SUPPORTED_VERSIONS));
    }
}
