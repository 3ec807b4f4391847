//! `netsieve agent`: enforce NetworkPolicies for the pods of one node.
//!
//! Sources: the Kubernetes API (default; kube-runtime watchers, see `kube_source`) or a
//! manifests directory (`--manifests`, polled every
//! [`POLL_INTERVAL`](crate::dir_watch::POLL_INTERVAL)). Either way, events go through the
//! [`Controller`]: only what they affect is recompiled and written, without a window where a
//! pod is unprotected (see `dataplane::sync`). Watch events are drained in bursts: everything
//! queued when the loop wakes is applied as one batch, so bursts coalesce without any added
//! delay. Programs attach to a pod's interface after its endpoint is written.
//!
//! Bad input never opens traffic: an unreadable manifest keeps the last good state, invalid
//! policies fail closed, an API outage keeps enforcing the last known state. Metrics and
//! health are served on `--metrics-addr`.
use crate::controller::{Controller, ObjectEvent, ObjectKind};
use crate::dataplane::attach::{AttachError, Attachments};
use crate::dataplane::bpffs;
use crate::dataplane::discovery::InterfaceIndex;
use crate::dataplane::kernel::{self, KernelError};
use crate::dataplane::maps::{KernelMaps, MapsError};
use crate::dataplane::sync::{Capacity, SyncError};
use crate::dir_watch::{DirFingerprint, POLL_INTERVAL};
use crate::kube_source::{self, KubeSourceError, Received};
use crate::manifests;
use crate::metrics::{DataplaneSnapshot, EndpointCounters, Metrics};
use crate::policy::PodInfo;
use crate::dataplane::netfilter::{NetfilterLinks, NetfilterProgram};
use aya::maps::{MapData, PerCpuArray};
use netsieve_common::{CONFIG_NETFILTER_ACTIVE, EndpointStats, MAX_ENDPOINTS, REASON_COUNT, REASON_NAMES};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

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
}

/// Detaches the links an agent left pinned and removes its pins. Returns the number of links.
pub fn cleanup(args: &CleanupArgs) -> Result<usize, AgentError> {
    let Some(dir) = bpffs::existing_pin_dir(&args.node, &args.bpffs) else {
        tracing::info!(node = %args.node, "nothing pinned for this node");
        return Ok(0);
    };
    let links = crate::dataplane::attach::remove_pinned_links(&dir.join("links"))
        + crate::dataplane::netfilter::remove_pinned_links(&dir.join("netfilter-links"));
    std::fs::remove_dir_all(&dir).map_err(|source| AgentError::Cleanup { path: dir.clone(), source })?;
    tracing::info!(node = %args.node, links, dir = %dir.display(), "detached the programs and removed the pins");
    Ok(links)
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

fn counters_of(stats: &EndpointStats) -> EndpointCounters {
    EndpointCounters {
        allowed_packets: stats.allowed_packets,
        allowed_bytes: stats.allowed_bytes,
        denied_packets: stats.denied_packets,
        denied_bytes: stats.denied_bytes,
    }
}

/// The kernel side: loaded programs, maps, attachments, interfaces.
struct Dataplane {
    ebpf: aya::Ebpf,
    maps: KernelMaps,
    drops: PerCpuArray<MapData, u64>,
    /// The netfilter program judging pod egress after DNAT, if this kernel runs it.
    netfilter: Option<NetfilterProgram>,
    netfilter_links: NetfilterLinks,
    attachments: Attachments,
    interfaces: InterfaceIndex,
    pin_dir: PathBuf,
    /// Endpoint ids seen at the last snapshot, with their pod: the kernel counts per endpoint
    /// id, and an id is retired on every reprogramming, so its final counts are carried over
    /// to the pod to keep the exported counters monotonic.
    counted_ids: BTreeMap<u32, String>,
    retired: BTreeMap<String, EndpointCounters>,
}

impl Dataplane {
    fn load(args: &AgentArgs) -> Result<Dataplane, AgentError> {
        kernel::raise_memlock_rlimit();
        let pin_dir = bpffs::ensure_pin_dir(&args.node, &args.bpffs)?;
        let (loaded, reused) = kernel::load_with_state(&pin_dir)?;
        let mut ebpf = loaded.ebpf;
        if reused {
            tracing::info!("reusing the pinned conntrack table: connections admitted before the restart keep flowing");
        }
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
        Ok(Dataplane {
            ebpf,
            maps,
            drops,
            netfilter: loaded.netfilter.ok(),
            netfilter_links: NetfilterLinks::persistent(&pin_dir.join("netfilter-links")),
            attachments: Attachments::persistent(&pin_dir.join("links")),
            interfaces: InterfaceIndex::default(),
            pin_dir,
            counted_ids: BTreeMap::new(),
            retired: BTreeMap::new(),
        })
    }

    /// Attaches the netfilter program (once) and tells the TC programs they may defer egress
    /// verdicts to it. Without it, TC judges egress on the address the pod used.
    fn enable_netfilter(&mut self) {
        let Some(program) = &self.netfilter else { return };
        if self.netfilter_links.attached() {
            return;
        }
        match self.netfilter_links.attach_all(program) {
            Ok(()) => {
                let config = self.maps.config();
                if let Err(error) = self.maps.set_settings(config.flags | CONFIG_NETFILTER_ACTIVE, config.events_per_second, config.events_burst) {
                    tracing::error!(%error, "cannot enable deferral to the netfilter program");
                }
            }
            Err(error) => tracing::error!(%error, "cannot attach the netfilter program: egress to Service addresses is judged on the address the pod used"),
        }
    }

    fn interface_of(interfaces: &InterfaceIndex) -> impl Fn(&PodInfo) -> Option<u32> + '_ {
        move |pod: &PodInfo| interfaces.interface_for(&pod.ips).map(|i| i.ifindex)
    }

    /// Per-pod counters: live endpoint ids plus the carried-over counts of retired ones.
    fn endpoint_counters(&mut self, live: &BTreeMap<u32, String>) -> BTreeMap<String, EndpointCounters> {
        for (id, pod) in &self.counted_ids {
            if live.contains_key(id) {
                continue;
            }
            if let Ok(stats) = self.maps.endpoint_stats(*id) {
                self.retired.entry(pod.clone()).or_default().add(&counters_of(&stats));
            }
        }
        let pods: BTreeSet<&String> = live.values().collect();
        self.retired.retain(|pod, _| pods.contains(pod));
        let mut out: BTreeMap<String, EndpointCounters> = BTreeMap::new();
        for (id, pod) in live {
            let entry = out.entry(pod.clone()).or_default();
            if let Some(retired) = self.retired.get(pod) {
                *entry = *retired;
            }
            if let Ok(stats) = self.maps.endpoint_stats(*id) {
                entry.add(&counters_of(&stats));
            }
        }
        self.counted_ids = live.clone();
        out
    }
}

type StepResult = Result<crate::dataplane::sync::SyncReport, SyncError>;

struct Agent {
    args: AgentArgs,
    dataplane: Dataplane,
    controller: Controller,
    metrics: Arc<Metrics>,
    /// Kinds whose initial list has been received (API mode).
    listed: BTreeSet<ObjectKind>,
    /// Events held until every kind has been listed once.
    pending: Vec<Received>,
    /// When each unplaced bridged pod was last nudged.
    nudged: BTreeMap<String, Instant>,
    /// Manifests mode: the directory as last loaded, and whether one load succeeded.
    last_fingerprint: Option<DirFingerprint>,
    manifests_loaded: bool,
    last_resync: Instant,
}

impl Agent {
    fn start(args: AgentArgs, metrics: Arc<Metrics>) -> Result<Agent, AgentError> {
        let mut dataplane = Dataplane::load(&args)?;
        dataplane.enable_netfilter();
        let controller = Controller::new(&args.node, !args.deny_node_traffic, Capacity::default(), metrics.clone());
        tracing::info!(node = %args.node, pins = %dataplane.pin_dir.display(), "agent started");
        Ok(Agent {
            args,
            dataplane,
            controller,
            metrics,
            listed: BTreeSet::new(),
            pending: Vec::new(),
            nudged: BTreeMap::new(),
            last_fingerprint: None,
            manifests_loaded: false,
            last_resync: Instant::now(),
        })
    }

    fn record(&self, result: StepResult) {
        match result {
            Ok(report) => {
                if report != Default::default() {
                    tracing::info!(
                        programmed = report.endpoints_programmed,
                        removed = report.endpoints_removed,
                        failed_closed = report.endpoints_failed_closed.len(),
                        ipcache_written = report.ipcache_written,
                        ipcache_removed = report.ipcache_removed,
                        "policy programmed"
                    );
                }
            }
            Err(error) => {
                let error = AgentError::from(error);
                self.metrics.reconcile_error(error.metric_label());
                tracing::error!(%error, "programming failed; the next change retries with a full comparison");
            }
        }
    }

    /// Runs one controller step against the kernel maps, with the current interface table.
    fn run_step(&mut self, step: impl FnOnce(&mut Controller, &mut KernelMaps, &dyn Fn(&PodInfo) -> Option<u32>) -> StepResult) -> StepResult {
        let dp = &mut self.dataplane;
        let interface_of = Dataplane::interface_of(&dp.interfaces);
        step(&mut self.controller, &mut dp.maps, &interface_of)
    }

    /// A step that may change the endpoints: runs and records it, then detaches and attaches
    /// to match. Returns (the step succeeded, every programmed endpoint is attached).
    fn reconcile(&mut self, step: impl FnOnce(&mut Controller, &mut KernelMaps, &dyn Fn(&PodInfo) -> Option<u32>) -> StepResult) -> (bool, bool) {
        let result = self.run_step(step);
        let succeeded = result.is_ok();
        self.record(result);
        self.detach_unwanted();
        (succeeded, self.attach_programmed())
    }

    /// Detaches from interfaces that no longer hold a programmed endpoint, before any new
    /// endpoint could reuse them.
    fn detach_unwanted(&mut self) {
        let wanted: BTreeSet<u32> = self.controller.compiler.program().endpoints.values().map(|e| e.ifindex).collect();
        for ifindex in self.dataplane.attachments.ifindexes() {
            if !wanted.contains(&ifindex) {
                self.dataplane.attachments.detach(&mut self.dataplane.ebpf, ifindex);
            }
        }
    }

    /// Attaches to interfaces whose endpoint is programmed (so the first packet is judged by
    /// policy). Returns whether every programmed endpoint is attached.
    fn attach_programmed(&mut self) -> bool {
        let mut all = true;
        let live: Vec<(String, u32)> =
            self.controller.sync.live_endpoints().map(|(name, _, ifindex)| (name.to_string(), ifindex)).collect();
        for (pod, ifindex) in live {
            if self.dataplane.attachments.is_attached(ifindex) {
                continue;
            }
            let Some(link) = self.dataplane.interfaces.links.values().find(|l| l.ifindex == ifindex) else {
                all = false;
                continue;
            };
            let name = link.name.clone();
            match self.dataplane.attachments.attach(&mut self.dataplane.ebpf, ifindex, &name) {
                Ok(()) => tracing::info!(%pod, interface = %name, "enforcing"),
                Err(error) => {
                    all = false;
                    let error = AgentError::from(error);
                    self.metrics.reconcile_error(error.metric_label());
                    tracing::error!(%pod, interface = %name, %error, "cannot attach; pod not enforced yet, will retry");
                }
            }
        }
        all
    }

    fn apply_events(&mut self, batch: Vec<Received>) {
        for (event, _) in &batch {
            if let ObjectEvent::Relisted(kind, _) = event {
                self.listed.insert(*kind);
            }
        }
        self.pending.extend(batch);
        // Nothing is programmed (or attached) until every kind has been listed once: pods
        // without their policies would be programmed wide open.
        if self.listed.len() < ObjectKind::ALL.len() {
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        let Some(received) = batch.first().map(|(_, at)| *at) else { return };
        let events: Vec<ObjectEvent> = batch.into_iter().map(|(event, _)| event).collect();
        self.reconcile(|controller, maps, interface_of| controller.apply_events(maps, events, received, interface_of));
    }

    /// Manifests mode: reload the directory if it changed.
    fn poll_manifests(&mut self, dir: &std::path::Path) {
        let fingerprint = match DirFingerprint::read(dir) {
            Ok(f) => f,
            Err(error) => {
                self.metrics.invalid_object("Manifests", "unreadable");
                tracing::error!(%error, dir = %dir.display(), "cannot read manifests; keeping the last state");
                return;
            }
        };
        if self.last_fingerprint.as_ref() == Some(&fingerprint) {
            return;
        }
        let received = Instant::now();
        self.last_fingerprint = Some(fingerprint);
        let loaded = match manifests::load_dir(dir) {
            Ok(loaded) => loaded,
            Err(error) => {
                self.metrics.invalid_object("Manifests", "unreadable");
                tracing::error!(%error, "cannot load manifests; keeping the last state");
                return;
            }
        };
        if !loaded.errors.is_empty() {
            // A missing document could be a policy that restricts traffic: applying the rest
            // could open traffic, so the last good state stays until the input is fixed.
            for error in &loaded.errors {
                self.metrics.invalid_object("Manifests", "undecodable");
                tracing::error!(%error, "manifest not loaded; keeping the last good state");
            }
            return;
        }
        let (succeeded, _) =
            self.reconcile(|controller, maps, interface_of| controller.replace(maps, loaded.cluster_state(), received, interface_of));
        self.manifests_loaded |= succeeded;
    }

    /// Interfaces appeared, went or moved (reported by the discovery thread): reprogram the
    /// endpoints concerned.
    fn apply_interfaces(&mut self, interfaces: InterfaceIndex) {
        let received = Instant::now();
        self.dataplane.interfaces = interfaces;
        let (_, attached) =
            self.reconcile(|controller, maps, interface_of| controller.refresh_interfaces(maps, received, interface_of));
        self.update_readiness(attached);
    }

    /// Bridged CNIs: a local pod the node never talked to has no neighbour entry, so its
    /// interface cannot be found. Make the kernel resolve it with an empty UDP datagram to the
    /// discard port (ARP/ND first; the datagram itself is dropped by the pod), at most every
    /// 2 s per pod, only for addresses on a directly attached bridge subnet.
    fn nudge_unplaced_pods(&mut self) {
        let waiting: Vec<String> = self.controller.compiler.waiting_for_interface().cloned().collect();
        self.nudged.retain(|pod, _| waiting.contains(pod));
        for key in waiting {
            if self.nudged.get(&key).is_some_and(|at| at.elapsed() < Duration::from_secs(2)) {
                continue;
            }
            let Some(pod) = self.controller.state.pods.get(&key) else { continue };
            let targets: Vec<IpAddr> =
                pod.ips.iter().filter(|ip| self.dataplane.interfaces.on_bridge_subnet(ip)).copied().collect();
            if targets.is_empty() {
                continue;
            }
            for ip in targets {
                let bind: SocketAddr = if ip.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
                if let Err(error) = std::net::UdpSocket::bind(bind).and_then(|s| s.send_to(&[], (ip, 9))) {
                    tracing::debug!(pod = %key, %ip, %error, "neighbour resolution nudge");
                }
            }
            tracing::debug!(pod = %key, "asked the kernel to resolve a bridged pod's address");
            self.nudged.insert(key, Instant::now());
        }
    }

    /// Every tick: the periodic full resync, attach retries, readiness.
    fn periodic(&mut self) {
        self.nudge_unplaced_pods();
        let resync = Duration::from_secs(self.args.resync_interval);
        if !resync.is_zero() && self.last_resync.elapsed() >= resync {
            self.last_resync = Instant::now();
            let result = self.run_step(|controller, maps, interface_of| controller.full_resync(maps, interface_of));
            if let Ok(report) = &result
                && *report != Default::default()
            {
                tracing::warn!(?report, "full resync found differences the incremental path missed");
            }
            self.record(result);
        }
        let attached = self.attach_programmed();
        self.update_readiness(attached);
    }

    fn update_readiness(&mut self, attached: bool) {
        let synced = match &self.args.manifests {
            Some(_) => self.manifests_loaded,
            None => self.listed.len() == ObjectKind::ALL.len(),
        };
        let reason = if !synced {
            "initial sync not done"
        } else if !attached {
            "programs not attached to every local pod yet"
        } else {
            ""
        };
        self.metrics.set_ready(reason.is_empty(), reason);
        // Once in sync, a previous agent's links on interfaces we did not take over belong to
        // pods that left: detach them.
        if reason.is_empty() && self.dataplane.attachments.previous_links() > 0 {
            self.dataplane.attachments.release_previous();
        }
    }

    fn snapshot(&mut self) -> DataplaneSnapshot {
        let live: BTreeMap<u32, String> =
            self.controller.sync.live_endpoints().map(|(name, id, _)| (id, name.to_string())).collect();
        let endpoints = self.dataplane.endpoint_counters(&live);
        let counts = self.controller.sync.entry_counts();
        let capacity = self.controller.sync.capacity();
        let mut maps = BTreeMap::new();
        maps.insert("ENDPOINTS", (live.len(), MAX_ENDPOINTS as usize));
        maps.insert("IPCACHE", (self.controller.sync.ipcache_len(), capacity.ipcache));
        maps.insert("POLICY_IDENTITY", (counts.identity, capacity.identity));
        maps.insert("POLICY_CIDR", (counts.cidr, capacity.cidr));
        maps.insert("POLICY_PORT", (counts.port, capacity.port));
        maps.insert("POLICY_RANGE", (counts.port_range, capacity.port_range));
        let state = &self.controller.state;
        DataplaneSnapshot {
            drops: read_drop_counters(&self.dataplane.drops),
            endpoints,
            maps,
            endpoint_count: live.len(),
            endpoints_failed_closed: self.controller.compiler.program().endpoints.values().filter(|e| e.fail_closed).count(),
            pods_waiting_for_interface: self.controller.compiler.waiting_for_interface().count(),
            policy_count: state.policies.len(),
            invalid_policy_count: state.policies.values().filter(|p| !p.errors.is_empty()).count(),
            identity_count: self.controller.compiler.identities().len(),
        }
    }

    fn log_counters(&self) {
        let drops: Vec<String> = read_drop_counters(&self.dataplane.drops)
            .into_iter()
            .filter(|(_, _, n)| *n > 0)
            .map(|(reason, direction, n)| format!("{direction}/{reason}={n}"))
            .collect();
        tracing::info!(drops = %drops.join(" "), "drop counters");
    }

    fn shutdown(&mut self) {
        let started = Instant::now();
        let interfaces = self.dataplane.attachments.ifindexes().len();
        match self.args.on_exit {
            OnExit::Detach => {
                self.dataplane.attachments.detach_all(&mut self.dataplane.ebpf);
                self.dataplane.netfilter_links.detach_all();
                let _ = std::fs::remove_dir_all(&self.dataplane.pin_dir);
                tracing::info!(interfaces, elapsed_ms = started.elapsed().as_millis() as u64, "agent stopped: programs detached, pins removed");
            }
            OnExit::Keep => {
                let links = self.dataplane.attachments.keep_pinned(&mut self.dataplane.ebpf)
                    + self.dataplane.netfilter_links.keep_pinned();
                tracing::info!(
                    interfaces, links, pins = %self.dataplane.pin_dir.display(),
                    "agent stopped: programs stay attached and enforce the last programmed state until the next agent takes over"
                );
            }
        }
    }
}

/// Reads the interface tables every [`POLL_INTERVAL`] on a thread of its own and reports
/// them when they differ from the last report. Ends when the agent drops the receiver.
fn spawn_discovery(mut last: InterfaceIndex, metrics: Arc<Metrics>) -> mpsc::UnboundedReceiver<InterfaceIndex> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(POLL_INTERVAL);
            match InterfaceIndex::read_after(&last) {
                Ok(interfaces) => {
                    if !interfaces.same_links(&last) {
                        last = interfaces.clone();
                        if tx.send(interfaces).is_err() {
                            return;
                        }
                    } else if tx.is_closed() {
                        return;
                    }
                }
                Err(error) => {
                    metrics.reconcile_error("discovery");
                    tracing::error!(%error, "cannot read interfaces; keeping the last state");
                }
            }
        }
    });
    rx
}

/// Serves /metrics, /healthz and /readyz until the runtime stops.
async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| AgentError::MetricsServer { addr, source })?;
    let for_metrics = metrics.clone();
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = for_metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], metrics.render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    match metrics.readiness() {
                        (true, _) => (StatusCode::OK, "ready\n".to_string()),
                        (false, reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
                    }
                }
            }),
        );
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "metrics server stopped");
        }
    });
    Ok(())
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: AgentArgs) -> Result<(), AgentError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
        let metrics = Arc::new(Metrics::default());
        metrics.set_ready(false, "starting");
        serve_metrics(args.metrics_addr, metrics.clone()).await?;
        let counters_every = Duration::from_secs(args.counters_interval);
        let mut agent = Agent::start(args.clone(), metrics.clone())?;
        // Interface tables are read by `ip`/`bridge` subprocesses on their own thread, so the
        // agent loop never waits on them while events queue up.
        match InterfaceIndex::read() {
            Ok(interfaces) => agent.apply_interfaces(interfaces),
            Err(error) => tracing::error!(%error, "cannot read interfaces yet; retrying"),
        }
        let mut links = spawn_discovery(agent.dataplane.interfaces.clone(), metrics.clone());
        let (events_tx, mut events) = mpsc::unbounded_channel::<Received>();
        let mut watchers = Vec::new();
        match &args.manifests {
            Some(dir) => {
                tracing::info!(manifests = %dir.display(), "source: manifests directory");
                agent.poll_manifests(dir);
            }
            None => {
                let client = kube_source::client(args.kubeconfig.as_deref()).await?;
                tracing::info!("source: Kubernetes API");
                watchers = kube_source::spawn_watchers(client, events_tx.clone(), metrics.clone());
            }
        }
        // Keeps the channel open in manifests mode, where no watcher holds a sender.
        let _keep_open = events_tx;
        let mut last_counters = Instant::now();
        let mut last_snapshot = Instant::now();
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        loop {
            tokio::select! {
                _ = terminate.recv() => {
                    tracing::info!("SIGTERM: stopping");
                    break;
                }
                _ = interrupt.recv() => {
                    tracing::info!("SIGINT: stopping");
                    break;
                }
                Some(first) = events.recv() => {
                    let mut batch = vec![first];
                    while let Ok(more) = events.try_recv() {
                        batch.push(more);
                    }
                    agent.apply_events(batch);
                }
                Some(interfaces) = links.recv() => agent.apply_interfaces(interfaces),
                _ = ticker.tick() => {
                    if let Some(dir) = args.manifests.clone() {
                        agent.poll_manifests(&dir);
                    }
                    agent.periodic();
                    if last_snapshot.elapsed() >= Duration::from_millis(500) {
                        let snapshot = agent.snapshot();
                        metrics.set_dataplane(snapshot);
                        last_snapshot = Instant::now();
                    }
                    if !counters_every.is_zero() && last_counters.elapsed() >= counters_every {
                        agent.log_counters();
                        last_counters = Instant::now();
                    }
                }
            }
        }
        for watcher in watchers {
            watcher.abort();
        }
        agent.log_counters();
        agent.shutdown();
        Ok(())
    })
}
