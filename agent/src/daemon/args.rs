//! Command-line arguments of `netsieve agent` and `netsieve cleanup`.
use crate::node_api::DEFAULT_SOCKET;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Highest `--events-per-second` and `--events-burst`: the programs compute a refill as
/// elapsed ns (at most 1e9) x rate x 1000 in 64 bits, exact below 18.4 million per second.
pub const MAX_EVENT_RATE: i64 = 1_000_000;

#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// Name of this node: pods whose spec.nodeName equals it are enforced here.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Directory of manifests to enforce instead of the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API (default: $KUBECONFIG, else the in-cluster service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Where to serve /metrics (Prometheus text), /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Drop traffic between pods and this node's own addresses unless a policy allows it.
    /// Kubernetes documents node-to-pod traffic as always allowed (kubelet probes), so by
    /// default it is.
    #[arg(long)]
    pub deny_node_traffic: bool,
    /// Where to mount a bpffs of our own when /sys/fs/bpf is not one.
    #[arg(long, default_value = "/run/netsieve/bpffs")]
    pub bpffs: PathBuf,
    /// Seconds between drop-counter log lines (0: never).
    #[arg(long, default_value_t = 10)]
    pub counters_interval: u64,
    /// Seconds between full recompile-and-compare passes, a safety net behind the incremental
    /// path (0: never).
    #[arg(long, default_value_t = 300)]
    pub resync_interval: u64,
    /// On SIGTERM: `detach` the programs (traffic flows unfiltered afterwards), or `keep`
    /// them attached through their pins, enforcing the last programmed state until the next
    /// agent takes over (DaemonSet upgrades, restarts). After `keep`, uninstalling needs
    /// `netsieve cleanup`.
    #[arg(long, value_enum, default_value_t = OnExit::Detach)]
    pub on_exit: OnExit,
    /// The node-local API socket (the `netsieve-cni` plugin, node commands): root-only, its
    /// directory is created 0700.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// CNI ADD of a pod whose Pod object the agent does not know yet: milliseconds to wait for
    /// it before answering with a fail-closed endpoint (everything but node traffic dropped
    /// until the object arrives).
    #[arg(long, default_value_t = 2000)]
    pub cni_pod_wait_ms: u64,
    /// Verdict events (`netsieve monitor`) each CPU may emit per second, a token bucket's
    /// refill; 0 turns events off. Events past the limit are not emitted but counted; packet
    /// counters are exact whatever the limit. At most 1,000,000 (the kernel's refill
    /// arithmetic is exact up to there).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=MAX_EVENT_RATE))]
    pub events_per_second: u32,
    /// Events each CPU may emit at once (the token bucket's size), at most 1,000,000.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=MAX_EVENT_RATE))]
    pub events_burst: u32,
    /// Also emit an event for the first packet of every allowed flow (off: drops and audits
    /// only).
    #[arg(long)]
    pub events_allowed: bool,
    /// Audit mode for every pod of this node: what policy would drop passes, is counted and
    /// reported as `audit` events. For some namespaces only, annotate them
    /// `netsieve.io/audit: "true"`. Structural drops (spoofed, malformed) are enforced anyway.
    #[arg(long)]
    pub audit: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    Detach,
    Keep,
}

/// `netsieve cleanup`: detach and remove what `agent --on-exit keep` left on this node.
#[derive(Clone, Debug, clap::Args)]
pub struct CleanupArgs {
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// The agent's `--bpffs` (used when /sys/fs/bpf is not a bpffs).
    #[arg(long, default_value = "/run/netsieve/bpffs")]
    pub bpffs: PathBuf,
    /// Where the `netsieve-cni` plugin binary was installed (removed).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The node's CNI configuration directory (the plugin is removed from its lists).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Leave the plugin binary in place (pods added while netsieve was installed call it on
    /// DEL; without an agent it answers success).
    #[arg(long)]
    pub keep_cni_binary: bool,
}

