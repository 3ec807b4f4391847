//! `netsieve agent --manifests DIR`: enforce the policies of a manifests directory for the
//! pods of one node.
//!
//! Every [`POLL_INTERVAL`](crate::dir_watch::POLL_INTERVAL) the agent checks the directory and
//! the node's interfaces; on a change it recompiles, synchronises the maps (no window without
//! protection, see `dataplane::sync`) and attaches the programs to new pod interfaces after
//! their endpoint is written. Bad input never opens traffic: if any document fails to load, the
//! last good state stays in force (logged, counted); invalid policies fail closed through the
//! semantics module.
use crate::dataplane::attach::{AttachError, Attachments};
use crate::dataplane::bpffs;
use crate::dataplane::discovery::InterfaceIndex;
use crate::dataplane::kernel::{self, KernelError};
use crate::dataplane::maps::{KernelMaps, MapsError};
use crate::dataplane::node::{IdentityAllocator, compile_node};
use crate::dataplane::sync::{Capacity, SyncError, Synchronizer};
use crate::dir_watch::{DirFingerprint, POLL_INTERVAL};
use crate::manifests;
use aya::maps::{MapData, PerCpuArray};
use netsieve_common::{REASON_COUNT, REASON_NAMES};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// Name of this node: pods whose spec.nodeName equals it are enforced here.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Directory of manifests to enforce (instead of the Kubernetes API).
    #[arg(long)]
    pub manifests: PathBuf,
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
}

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
    #[error("pinning map {name}: {source}")]
    Pin { name: &'static str, source: aya::pin::PinError },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("async runtime: {0}")]
    Runtime(std::io::Error),
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
            AgentError::Pin { .. } => "pin",
            AgentError::Signal(_) => "signal",
            AgentError::Runtime(_) => "runtime",
        }
    }
}

/// Sums the per-CPU drop counters: (reason, direction, packets).
pub fn read_drop_counters(map: &PerCpuArray<MapData, u64>) -> Vec<(&'static str, &'static str, u64)> {
    let mut out = Vec::new();
    for reason in 0..REASON_COUNT {
        for (direction, name) in [(0u32, "ingress"), (1u32, "egress")] {
            let total = map.get(&(reason * 2 + direction), 0).map(|v| v.iter().sum()).unwrap_or(0);
            out.push((REASON_NAMES[reason as usize], name, total));
        }
    }
    out
}

struct Agent {
    args: AgentArgs,
    ebpf: aya::Ebpf,
    maps: KernelMaps,
    drops: PerCpuArray<MapData, u64>,
    sync: Synchronizer,
    ids: IdentityAllocator,
    attachments: Attachments,
    last_fingerprint: Option<DirFingerprint>,
    last_interfaces: Option<InterfaceIndex>,
    load_errors: u64,
    pin_dir: PathBuf,
}

impl Agent {
    fn start(args: AgentArgs) -> Result<Agent, AgentError> {
        kernel::raise_memlock_rlimit();
        let mut ebpf = kernel::load()?;
        let pin_dir = bpffs::ensure_pin_dir(&args.node, &args.bpffs)?;
        // Pin the counters so operators can read them with bpftool while the agent runs.
        for name in ["DROP_COUNTERS", "ENDPOINT_STATS", "ENDPOINTS"] {
            if let Some(map) = ebpf.map_mut(name) {
                let path = pin_dir.join(name);
                let _ = std::fs::remove_file(&path);
                map.pin(&path).map_err(|source| AgentError::Pin { name, source })?;
            }
        }
        let maps = KernelMaps::take_from(&mut ebpf)?;
        let drops = ebpf
            .take_map("DROP_COUNTERS")
            .ok_or(MapsError::Missing("DROP_COUNTERS"))
            .and_then(|m| PerCpuArray::try_from(m).map_err(|source| MapsError::Layout { name: "DROP_COUNTERS", source }))?;
        tracing::info!(node = %args.node, manifests = %args.manifests.display(), pins = %pin_dir.display(), "agent started");
        Ok(Agent {
            args,
            ebpf,
            maps,
            drops,
            sync: Synchronizer::with_capacity(Capacity::default()),
            ids: IdentityAllocator::default(),
            attachments: Attachments::default(),
            last_fingerprint: None,
            last_interfaces: None,
            load_errors: 0,
            pin_dir,
        })
    }

    /// One poll: reprogram if the manifests or the interfaces changed.
    fn poll(&mut self) -> Result<(), AgentError> {
        let fingerprint = match DirFingerprint::read(&self.args.manifests) {
            Ok(f) => f,
            Err(error) => {
                self.load_errors += 1;
                tracing::error!(%error, dir = %self.args.manifests.display(), "cannot read manifests; keeping the last state");
                return Ok(());
            }
        };
        let interfaces = match InterfaceIndex::read() {
            Ok(i) => i,
            Err(error) => {
                tracing::error!(%error, "cannot read interfaces; keeping the last state");
                return Ok(());
            }
        };
        let unchanged = self.last_fingerprint.as_ref() == Some(&fingerprint)
            && self.last_interfaces.as_ref().is_some_and(|last| last.same_links(&interfaces));
        if unchanged {
            return Ok(());
        }
        let started = Instant::now();
        let loaded = match manifests::load_dir(&self.args.manifests) {
            Ok(loaded) => loaded,
            Err(error) => {
                self.load_errors += 1;
                tracing::error!(%error, "cannot load manifests; keeping the last state");
                return Ok(());
            }
        };
        if !loaded.errors.is_empty() {
            // A missing document could be a policy that restricts traffic: applying the rest
            // could open traffic, so the last good state stays until the input is fixed.
            self.load_errors += loaded.errors.len() as u64;
            for error in &loaded.errors {
                tracing::error!(%error, "manifest not loaded; keeping the last good state");
            }
            self.last_fingerprint = Some(fingerprint);
            self.last_interfaces = Some(interfaces);
            return Ok(());
        }
        let state = loaded.cluster_state();
        for policy in state.policies.iter().filter(|p| !p.errors.is_empty()) {
            for error in &policy.errors {
                tracing::warn!(policy = %policy.key(), %error, "invalid policy: the pods it selects fail closed");
            }
        }
        let compiled = compile_node(&state, &mut self.ids, &self.args.node, !self.args.deny_node_traffic, &|pod| {
            interfaces.interface_for(&pod.ips).map(|i| i.ifindex)
        });
        self.ids.retain_used(&state);
        // Detach from interfaces that no longer hold a local pod before their endpoint goes.
        let wanted: std::collections::BTreeSet<u32> = compiled.program.endpoints.values().map(|e| e.ifindex).collect();
        for ifindex in self.attachments.ifindexes() {
            if !wanted.contains(&ifindex) {
                self.attachments.detach(&mut self.ebpf, ifindex);
            }
        }
        let report = self.sync.sync(&mut self.maps, &compiled.program)?;
        // Attach after the endpoint is in the map, so the first packet is judged by policy.
        for (pod, endpoint) in &compiled.program.endpoints {
            if self.attachments.is_attached(endpoint.ifindex) {
                continue;
            }
            let Some(interface) = interfaces.links.values().find(|l| l.ifindex == endpoint.ifindex) else { continue };
            match self.attachments.attach(&mut self.ebpf, endpoint.ifindex, &interface.name) {
                Ok(()) => tracing::info!(%pod, interface = %interface.name, "enforcing"),
                Err(error) => tracing::error!(%pod, %error, "cannot attach; pod not enforced yet, will retry"),
            }
        }
        for pod in &compiled.waiting_for_interface {
            tracing::debug!(%pod, "local pod has no interface yet");
        }
        tracing::info!(
            endpoints = compiled.program.endpoints.len(),
            policies = state.policies.len(),
            identities = self.ids.len(),
            programmed = report.endpoints_programmed,
            removed = report.endpoints_removed,
            failed_closed = report.endpoints_failed_closed.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "policy programmed"
        );
        self.last_fingerprint = Some(fingerprint);
        self.last_interfaces = Some(interfaces);
        Ok(())
    }

    fn log_counters(&self) {
        let drops: Vec<String> = read_drop_counters(&self.drops)
            .into_iter()
            .filter(|(_, _, n)| *n > 0)
            .map(|(reason, direction, n)| format!("{direction}/{reason}={n}"))
            .collect();
        tracing::info!(drops = %drops.join(" "), load_errors = self.load_errors, "drop counters");
    }

    fn shutdown(&mut self) {
        self.attachments.detach_all(&mut self.ebpf);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        tracing::info!("agent stopped: programs detached, pins removed");
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: AgentArgs) -> Result<(), AgentError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AgentError::Runtime)?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
        let counters_every = Duration::from_secs(args.counters_interval);
        let mut agent = Agent::start(args)?;
        let mut last_counters = Instant::now();
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = ticker.tick() => {
                    if let Err(error) = agent.poll() {
                        tracing::error!(%error, kind = error.metric_label(), "reconcile failed; will retry");
                    }
                    if !counters_every.is_zero() && last_counters.elapsed() >= counters_every {
                        agent.log_counters();
                        last_counters = Instant::now();
                    }
                }
            }
        }
        agent.log_counters();
        agent.shutdown();
        Ok(())
    })
}
