//! The agent's error type.
use crate::dataplane::attach::AttachError;
use crate::cni::install::InstallError;
use crate::dataplane::bpffs;
use crate::dataplane::discovery::DiscoveryError;
use crate::dataplane::kernel::KernelError;
use crate::dataplane::maps::MapsError;
use crate::dataplane::sync::SyncError;
use crate::kube_source::KubeSourceError;
use std::net::SocketAddr;
use std::path::PathBuf;

/// One error type for the agent, with a metric label per variant.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Api(#[from] KubeSourceError),
    #[error("pinning map {name}: {source}")]
    Pin { name: &'static str, source: aya::pin::PinError },
    #[error("serving metrics on {addr}: {source}")]
    MetricsServer { addr: SocketAddr, source: std::io::Error },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("removing {path}: {source}")]
    Cleanup { path: PathBuf, source: std::io::Error },
    #[error("async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("interface discovery: {0}")]
    Discovery(#[from] DiscoveryError),
    #[error("node API socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("CNI plugin installation: {0}")]
    CniInstall(#[from] InstallError),
    #[error("polling the verdict event ring buffer: {0}")]
    EventRing(std::io::Error),
}

impl AgentError {
    /// Label for the reconcile-errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentError::Kernel(_) => "kernel",
            AgentError::Maps(_) => "maps",
            AgentError::Bpffs(_) => "bpffs",
            AgentError::Sync(_) => "sync",
            AgentError::Attach(_) => "attach",
            AgentError::Api(_) => "api",
            AgentError::Pin { .. } => "pin",
            AgentError::MetricsServer { .. } => "metrics_server",
            AgentError::Signal(_) => "signal",
            AgentError::Cleanup { .. } => "cleanup",
            AgentError::Runtime(_) => "runtime",
            AgentError::Discovery(_) => "discovery",
            AgentError::Socket { .. } => "socket",
            AgentError::CniInstall(_) => "cni_install",
            AgentError::EventRing(_) => "event_ring",
        }
    }
}

