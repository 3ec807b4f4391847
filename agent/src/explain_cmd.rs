//! `netsieve explain`: whether a flow is allowed by the policies in a manifests directory (or
//! of a live cluster, with `--kubeconfig`), and which policy, rule, peer and port decided it.
//! With `--agent`, the local agent answers from the state it enforces, and adds what its
//! programmed maps say and whether conntrack holds the flow.
use crate::manifests;
use crate::node_api::observe::ExplainQuery;
use crate::node_api::{self, DEFAULT_SOCKET, Request, Response};
use crate::observe::render::live_explanation_text;
use crate::policy::{self, ClusterState, DirectionVerdict, Exception, Flow, Protocol, Verdict};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

/// Exit status for an allowed flow.
pub const EXIT_ALLOWED: u8 = 0;
/// Exit status for a denied flow.
pub const EXIT_DENIED: u8 = 1;
/// Exit status for an error (bad flag, unknown pod, unreadable manifests).
pub const EXIT_ERROR: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, clap::Args)]
pub struct ExplainArgs {
    /// Directory of YAML/JSON manifests (Namespaces, Nodes, Pods, NetworkPolicies).
    #[arg(long, required_unless_present_any = ["kubeconfig", "agent"], conflicts_with_all = ["kubeconfig", "agent"])]
    pub manifests: Option<PathBuf>,
    /// Read the objects from the Kubernetes API instead (this kubeconfig; read access to pods,
    /// namespaces and networkpolicies), decoded exactly as the agent decodes them.
    #[arg(long, conflicts_with = "agent")]
    pub kubeconfig: Option<PathBuf>,
    /// Ask the agent of this node (over `--socket`): the verdict on the state it enforces,
    /// what its programmed maps say, and the flow's conntrack entries.
    #[arg(long)]
    pub agent: bool,
    /// The agent's node socket (with `--agent`).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// With `--agent`: look conntrack up for this source port only (without it, every entry of
    /// the flow's addresses and destination port is listed).
    #[arg(long, requires = "agent")]
    pub source_port: Option<u16>,
    /// Source: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub from: String,
    /// Destination: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub to: String,
    /// Destination port (ignored for ICMP).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// TCP, UDP, SCTP or ICMP.
    #[arg(long, default_value = "TCP", value_parser = parse_protocol)]
    pub protocol: Protocol,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    Protocol::parse(text).ok_or_else(|| format!("unknown protocol {text:?} (TCP, UDP, SCTP or ICMP)"))
}

#[derive(Serialize)]
struct JsonReport<'a> {
    allowed: bool,
    flow: &'a Flow,
    exception: Option<Exception>,
    egress: &'a DirectionVerdict,
    ingress: &'a DirectionVerdict,
    manifest_errors: Vec<String>,
}

/// Runs the command and returns its exit status.
pub fn run(args: &ExplainArgs) -> u8 {
    if args.agent {
        return run_live(args);
    }
    match evaluate(args) {
        Ok((state_errors, flow, verdict)) => {
            for error in &state_errors {
                eprintln!("warning: {error}");
            }
            match args.output {
                OutputFormat::Json => {
                    let report = JsonReport {
                        allowed: verdict.allowed,
                        flow: &flow,
                        exception: verdict.exception,
                        egress: &verdict.egress,
                        ingress: &verdict.ingress,
                        manifest_errors: state_errors,
                    };
                    match serde_json::to_string_pretty(&report) {
                        Ok(text) => println!("{text}"),
                        Err(e) => {
                            eprintln!("error: encoding JSON: {e}");
                            return EXIT_ERROR;
                        }
                    }
                }
                OutputFormat::Text => print!("{}", render_text(&flow, &verdict)),
            }
            if verdict.allowed { EXIT_ALLOWED } else { EXIT_DENIED }
        }
        Err(message) => {
            eprintln!("error: {message}");
            EXIT_ERROR
        }
    }
}

/// `--agent`: the agent answers; same verdict, reasons and exit status as the offline modes.
fn run_live(args: &ExplainArgs) -> u8 {
    let query = ExplainQuery {
        from: args.from.clone(),
        to: args.to.clone(),
        port: args.port,
        protocol: args.protocol.to_string(),
        source_port: args.source_port,
    };
    let explanation = match node_api::call(&args.socket, Request::Explain(query), Duration::from_secs(30)) {
        Ok(Response::Explained(explanation)) => explanation,
        Ok(Response::Error { code, message }) => {
            eprintln!("error: the agent refused: {code:?}: {message}");
            return EXIT_ERROR;
        }
        Ok(other) => {
            eprintln!("error: unexpected answer from the agent: {other:?}");
            return EXIT_ERROR;
        }
        Err(error) => {
            eprintln!("error: {error}");
            return EXIT_ERROR;
        }
    };
    match args.output {
        OutputFormat::Json => {
            // The offline report's fields first, then what only the agent knows.
            let mut value = match serde_json::to_value(&*explanation) {
                Ok(value) => value,
                Err(e) => {
                    eprintln!("error: encoding JSON: {e}");
                    return EXIT_ERROR;
                }
            };
            if let Some(object) = value.as_object_mut() {
                object.insert("manifest_errors".into(), serde_json::Value::Array(Vec::new()));
            }
            match serde_json::to_string_pretty(&value) {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    eprintln!("error: encoding JSON: {e}");
                    return EXIT_ERROR;
                }
            }
        }
        OutputFormat::Text => {
            let verdict = Verdict {
                allowed: explanation.allowed,
                exception: explanation.exception,
                egress: explanation.egress.clone(),
                ingress: explanation.ingress.clone(),
            };
            print!("{}", render_text(&explanation.flow, &verdict));
            print!("{}", live_explanation_text(&explanation));
        }
    }
    if explanation.allowed { EXIT_ALLOWED } else { EXIT_DENIED }
}

fn evaluate(args: &ExplainArgs) -> Result<(Vec<String>, Flow, Verdict), String> {
    let (state, errors): (ClusterState, Vec<String>) = match (&args.manifests, &args.kubeconfig) {
        (Some(dir), _) => {
            let loaded = manifests::load_dir(dir).map_err(|e| e.to_string())?;
            (loaded.cluster_state(), loaded.errors.iter().map(ToString::to_string).collect())
        }
        (None, kubeconfig) => crate::kube_source::list_cluster(kubeconfig.as_deref()).map_err(|e| e.to_string())?,
    };
    let src = state.resolve(&args.from).map_err(|e| format!("--from: {e}"))?;
    let dst = state.resolve(&args.to).map_err(|e| format!("--to: {e}"))?;
    let flow = state.flow(src, dst, args.protocol, args.port).map_err(|e| e.to_string())?;
    let verdict = policy::explain(&state, &flow);
    Ok((errors, flow, verdict))
}

fn endpoint_name(endpoint: &policy::FlowEndpoint) -> String {
    match &endpoint.pod {
        Some(pod) => format!("{pod} ({})", endpoint.ip),
        None => endpoint.ip.to_string(),
    }
}

fn render_direction(name: &str, verdict: &DirectionVerdict) -> String {
    let subject = verdict.pod.as_deref().unwrap_or("not a pod");
    let detail = if verdict.pod.is_none() {
        "no policy applies to a non-pod address".to_string()
    } else if !verdict.isolated {
        "not isolated: no policy selects this pod for this direction".to_string()
    } else if let Some(m) = &verdict.matched {
        let peer = m.peer_index.map_or("any peer".to_string(), |i| format!("peer {i}"));
        let port = m.port_index.map_or("any port".to_string(), |i| format!("port entry {i}"));
        format!("allowed by {} {name} rule {} ({peer}, {port})", m.policy, m.rule_index)
    } else {
        format!("no rule of [{}] admits the flow", verdict.selecting_policies.join(", "))
    };
    let mut text = format!("  {name:<7} {subject}: {detail}\n");
    for error in &verdict.policy_errors {
        text.push_str(&format!("          fail-closed policy error: {error}\n"));
    }
    text
}

/// The human-readable report: verdict line first, then each direction.
pub fn render_text(flow: &Flow, verdict: &Verdict) -> String {
    let mut text = format!(
        "{} {} -> {} {}/{}\n",
        if verdict.allowed { "ALLOWED" } else { "DENIED" },
        endpoint_name(&flow.src),
        endpoint_name(&flow.dst),
        flow.protocol,
        flow.port
    );
    match verdict.exception {
        Some(Exception::SelfTraffic) => text.push_str("  exception: a pod can always reach itself\n"),
        Some(Exception::NodeTraffic) => text.push_str("  exception: traffic between a pod and its node is allowed\n"),
        None => {}
    }
    text.push_str(&render_direction("egress", &verdict.egress));
    text.push_str(&render_direction("ingress", &verdict.ingress));
    text
}
