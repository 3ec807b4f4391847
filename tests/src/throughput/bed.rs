//! One test bed per enforcer: a one-node [`Cluster`] (the node's namespace routes between a
//! client pod and a server pod on veths, as kindnet's ptp plugin lays them out) with the
//! enforcer in the node's namespace. Every bed lives for the whole benchmark, so rounds can
//! interleave the enforcers without reinstalling anything, and no enforcer leaves state (an
//! x_tables table, conntrack hooks, attached programs) in another's path.
use super::load::{Cpus, Iperf3Server, LoadError, tcp_reachable};
use super::policy::{BenchPolicy, CLIENT_LABEL, SERVER_LABEL};
use crate::netns::{Cluster, NetnsError, Transport, run_in};
use crate::seed_cluster::{Agents, nodes_manifest, remove_mount_root, write_atomically};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Ports the client's rule admits: the check port, request/response, connections, UDP, iperf3.
pub const CHECK_PORT: u16 = 7000;
pub const REQUEST_RESPONSE_PORT: u16 = 7001;
pub const CONNECTIONS_PORT: u16 = 7002;
pub const UDP_PORT: u16 = 7003;
pub const IPERF3_PORT: u16 = 5201;
/// A port no rule admits: enforcing beds must drop the client's connection to it.
pub const DENIED_PORT: u16 = 7999;

/// The (protocol, port) pairs of the client's rule.
pub fn client_ports() -> Vec<(Transport, u16)> {
    vec![
        (Transport::Tcp, CHECK_PORT),
        (Transport::Tcp, REQUEST_RESPONSE_PORT),
        (Transport::Tcp, CONNECTIONS_PORT),
        (Transport::Udp, UDP_PORT),
        (Transport::Tcp, IPERF3_PORT),
    ]
}

/// Where the agent serves its metrics inside the node's namespace.
const METRICS_PORT: u16 = 9090;

/// What enforces the server's ingress policy on a bed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcer {
    NoProgram,
    Netsieve,
    Nftables,
    Iptables,
    /// Not an enforcer: an empty TC program attached where netsieve attaches its programs
    /// (both directions of both pods' host-side veths), so the part of netsieve's cost that is
    /// the attachment itself (the TCX hook, the program call) shows apart from its programs'
    /// work.
    EmptyProgram,
}

/// Attaches an empty TC program to both directions of the named interfaces in a node's
/// namespace; what it returns holds the attachments (dropped: detached). The bench provides it
/// (the programs are the agent crate's, which this crate does not depend on).
pub type AttachEmptyProgram<'a> = &'a dyn Fn(&str, &[String]) -> Result<Box<dyn std::any::Any>, String>;

impl Enforcer {
    pub const ALL: [Enforcer; 5] =
        [Enforcer::NoProgram, Enforcer::Netsieve, Enforcer::Nftables, Enforcer::Iptables, Enforcer::EmptyProgram];

    pub fn name(self) -> &'static str {
        match self {
            Enforcer::NoProgram => "no program",
            Enforcer::Netsieve => "netsieve",
            Enforcer::Nftables => "nftables",
            Enforcer::Iptables => "iptables",
            Enforcer::EmptyProgram => "empty prog",
        }
    }

    /// Cluster tag: distinct, and none a prefix of another.
    fn tag(self) -> &'static str {
        match self {
            Enforcer::NoProgram => "tput-none",
            Enforcer::Netsieve => "tput-nsv",
            Enforcer::Nftables => "tput-nft",
            Enforcer::Iptables => "tput-ipt",
            Enforcer::EmptyProgram => "tput-empty",
        }
    }

    /// Whether the bed drops what no rule admits.
    fn enforces(self) -> bool {
        !matches!(self, Enforcer::NoProgram | Enforcer::EmptyProgram)
    }

    /// Whether the enforcer uses the node's conntrack table (flushed before each measurement
    /// so every one starts from the same table).
    fn uses_conntrack(self) -> bool {
        matches!(self, Enforcer::Nftables | Enforcer::Iptables)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BedError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("writing the manifests in {dir}: {source}")]
    Manifests { dir: String, source: std::io::Error },
    #[error("starting the agent: {0}")]
    Agent(String),
    #[error("attaching the empty program: {0}")]
    EmptyProgram(String),
    #[error("{enforcer} bed: {what}")]
    Check { enforcer: &'static str, what: String },
}

/// One bed. Fields drop in order: the agent, the empty program's attachments and iperf3 go
/// before the namespaces.
pub struct Bed {
    agents: Option<Agents>,
    empty_program: Option<Box<dyn std::any::Any>>,
    iperf3: Option<Iperf3Server>,
    manifests: Option<PathBuf>,
    pub enforcer: Enforcer,
    pub cluster: Cluster,
}

impl Bed {
    /// Builds the bed, installs the enforcer, and checks it: the client reaches the server on
    /// an admitted port, and on a port no rule admits only without an enforcer.
    pub fn new(
        enforcer: Enforcer,
        policy: &BenchPolicy,
        netsieve: &Path,
        attach_empty: AttachEmptyProgram,
        cpus: Cpus,
    ) -> Result<Bed, BedError> {
        let cluster = Cluster::new(enforcer.tag(), 1, &[("client", 0), ("server", 0)])?;
        let mut bed = Bed { agents: None, empty_program: None, iperf3: None, manifests: None, enforcer, cluster };
        bed.iperf3 = Some(Iperf3Server::start(&bed.cluster.pod("server").netns, IPERF3_PORT, cpus.server)?);
        let node_ns = bed.cluster.nodes[0].netns.clone();
        let (client_ip, server_veth) = (bed.cluster.pod("client").ip.clone(), bed.cluster.pod("server").host_veth.clone());
        match enforcer {
            Enforcer::NoProgram => {}
            Enforcer::Netsieve => bed.start_agent(policy, netsieve)?,
            Enforcer::Nftables => {
                run_in(&node_ns, "nft", &["-f", "-"], Some(&policy.nftables(&server_veth, &client_ip)))?;
            }
            Enforcer::Iptables => {
                run_in(&node_ns, crate::kube_proxy::iptables::RESTORE, &[], Some(&policy.iptables(&server_veth, &client_ip)))?;
            }
            Enforcer::EmptyProgram => {
                let veths = [bed.cluster.pod("client").host_veth.clone(), server_veth];
                bed.empty_program = Some(attach_empty(&node_ns, &veths).map_err(BedError::EmptyProgram)?);
            }
        }
        bed.check()?;
        Ok(bed)
    }

    pub fn client_ns(&self) -> &str {
        &self.cluster.pod("client").netns
    }

    pub fn server_ns(&self) -> &str {
        &self.cluster.pod("server").netns
    }

    pub fn server(&self, port: u16) -> SocketAddrV4 {
        let ip = self.cluster.pod("server").ip.parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
        SocketAddrV4::new(ip, port)
    }

    fn start_agent(&mut self, policy: &BenchPolicy, netsieve: &Path) -> Result<(), BedError> {
        let dir = std::env::temp_dir().join(format!("netsieve-bench-{}", self.cluster.id));
        let manifests_error = |source| BedError::Manifests { dir: dir.display().to_string(), source };
        std::fs::create_dir_all(&dir).map_err(manifests_error)?;
        self.manifests = Some(dir.clone());
        write_atomically(&dir.join("namespaces.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n")
            .map_err(manifests_error)?;
        write_atomically(&dir.join("nodes.yaml"), &nodes_manifest(&self.cluster)).map_err(manifests_error)?;
        let pods: String = [("client", CLIENT_LABEL), ("server", SERVER_LABEL)]
            .iter()
            .map(|(name, (key, value))| {
                let ip = &self.cluster.pod(name).ip;
                format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{{key}: {value}}}}}\n\
                     spec: {{nodeName: node0, containers: [{{name: c, image: x}}]}}\n\
                     status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
                )
            })
            .collect();
        write_atomically(&dir.join("pods.yaml"), &pods).map_err(manifests_error)?;
        write_atomically(&dir.join("policy.yaml"), &policy.network_policy("bench")).map_err(manifests_error)?;
        let metrics = format!("127.0.0.1:{METRICS_PORT}");
        let agents = Agents::start(&self.cluster, netsieve, &dir, &["--metrics-addr", &metrics, "--counters-interval", "0"])
            .map_err(|e| BedError::Agent(e.to_string()))?;
        self.agents = Some(agents);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if self.cluster.http_get(0, METRICS_PORT, "/readyz").is_some_and(|(code, _)| code == 200) {
                // Both pods' veths carry the programs, and the 1k-rule policy fit its maps.
                let endpoints = self.gauge("netsieve_endpoints");
                let failed_closed = self.gauge("netsieve_endpoints_failed_closed");
                if endpoints == Some(2.0) && failed_closed == Some(0.0) {
                    return Ok(());
                }
                if failed_closed.is_some_and(|n| n > 0.0) {
                    let logs = self.agents.as_mut().map(|a| a.stop()).unwrap_or_default();
                    return Err(BedError::Agent(format!("{failed_closed:?} endpoints programmed fail-closed: {logs:?}")));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let logs = self.agents.as_mut().map(|a| a.stop()).unwrap_or_default();
        Err(BedError::Agent(format!("not ready with 2 endpoints within 30 s: {logs:?}")))
    }

    /// A gauge of the agent's metrics.
    pub fn gauge(&self, name: &str) -> Option<f64> {
        let text = self.cluster.http_get(0, METRICS_PORT, "/metrics")?.1;
        text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok())
    }

    /// The admitted port is reachable; the denied one is not, unless nothing enforces.
    pub fn check(&self) -> Result<(), BedError> {
        let check_error = |what: String| BedError::Check { enforcer: self.enforcer.name(), what };
        let timeout = Duration::from_millis(500);
        if !tcp_reachable(self.client_ns(), self.server_ns(), self.server(CHECK_PORT), Duration::from_secs(2))? {
            return Err(check_error(format!("the client does not reach the server on admitted port {CHECK_PORT}")));
        }
        let denied_reached = tcp_reachable(self.client_ns(), self.server_ns(), self.server(DENIED_PORT), timeout)?;
        let enforcing = self.enforcer.enforces();
        if denied_reached == enforcing {
            return Err(check_error(format!(
                "the client {} the server on port {DENIED_PORT}, which no rule admits",
                if denied_reached { "reaches" } else { "does not reach" }
            )));
        }
        Ok(())
    }

    /// Before each measurement: an empty conntrack table for the netfilter enforcers (entries
    /// of earlier connection-rate runs would otherwise pile up), in this namespace only.
    pub fn before_measurement(&self) -> Result<(), BedError> {
        if self.enforcer.uses_conntrack() {
            run_in(&self.cluster.nodes[0].netns, "conntrack", &["-F"], None)?;
        }
        Ok(())
    }

    /// Stops the agent (if any) and returns whether it exited cleanly, with its log.
    pub fn stop_agent(&mut self) -> Option<(bool, String)> {
        let mut agents = self.agents.take()?;
        agents.stop().into_iter().next()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.agents = None;
        self.empty_program = None;
        self.iperf3 = None;
        if let Some(dir) = self.manifests.take() {
            let _ = std::fs::remove_dir_all(dir);
            remove_mount_root(&self.cluster);
        }
    }
}
