//! The agent's state machine: object events and manifests polling into the controller,
//! interface changes, reconcile (program, detach, attach), readiness, metrics snapshots and
//! shutdown.
use super::args::{AgentArgs, OnExit};
use super::cni::{ParkedAdd, Registry};
use super::dataplane::{Dataplane, read_drop_counters};
use super::error::AgentError;
use crate::controller::{Controller, KubeObject, ObjectEvent, ObjectKind};
use crate::dataplane::discovery::InterfaceIndex;
use crate::dataplane::maps::KernelMaps;
use crate::dataplane::sync::{Capacity, SyncError};
use crate::dir_watch::DirFingerprint;
use crate::kube_source::Received;
use crate::manifests;
use super::events::ReaderCounters;
use crate::metrics::{AuditSnapshot, DataplaneSnapshot, EndpointCounters, EventPathSnapshot, Metrics, RuleSeries};
use crate::observe::book::EndpointBook;
use crate::observe::hub::EventHub;
use crate::observe::ledger::CounterLedger;
use crate::policy::{ClusterState, PodInfo};
use k8s_openapi::api::core::v1::Pod;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

type StepResult = Result<crate::dataplane::sync::SyncReport, SyncError>;

pub(super) struct Agent {
    pub(super) args: AgentArgs,
    pub(super) dataplane: Dataplane,
    pub(super) controller: Controller,
    pub(super) metrics: Arc<Metrics>,
    /// Kinds whose initial list has been received (API mode).
    pub(super) listed: BTreeSet<ObjectKind>,
    /// Events held until every kind has been listed once.
    pending: Vec<Received>,
    /// When each unplaced bridged pod was last nudged.
    nudged: BTreeMap<String, Instant>,
    /// Manifests mode: the directory as last loaded, and whether one load succeeded.
    last_fingerprint: Option<DirFingerprint>,
    pub(super) manifests_loaded: bool,
    last_resync: Instant,
    /// Sandboxes the CNI plugin registered (see `cni`).
    pub(super) cni: Registry,
    /// CNI ADDs waiting for their Pod object.
    pub(super) parked: Vec<ParkedAdd>,
    /// API mode: the last Pod object of each local pod as the API server sent it, so that a
    /// CNI ADD can re-apply it with the addresses the plugin gave.
    pub(super) pod_objects: BTreeMap<String, Pod>,
    /// Manifests mode: the state as last loaded, before CNI addresses were filled in.
    pub(super) last_loaded: Option<ClusterState>,
    /// The programmings the synchronizer wrote, current and recently retired (names for
    /// events and counters).
    pub(super) book: EndpointBook,
    /// Counters carried over reprogrammings.
    pub(super) ledger: CounterLedger,
    /// When the maps were last written.
    pub(super) last_programmed: Option<SystemTime>,
    /// Subscribers of the verdict event stream.
    pub(super) hub: Arc<EventHub>,
    pub(super) reader_counters: Arc<ReaderCounters>,
}

impl Agent {
    pub(super) fn start(
        args: AgentArgs,
        metrics: Arc<Metrics>,
        hub: Arc<EventHub>,
        reader_counters: Arc<ReaderCounters>,
    ) -> Result<Agent, AgentError> {
        let mut dataplane = Dataplane::load(&args)?;
        dataplane.set_event_settings(args.events_per_second, args.events_burst, args.events_allowed)?;
        let mut controller = Controller::new(&args.node, !args.deny_node_traffic, Capacity::default(), metrics.clone());
        controller.set_node_audit(args.audit);
        if args.audit {
            tracing::warn!("audit mode for every pod of this node: policy drops pass and are reported as audit, nothing is enforced but anti-spoofing");
        }
        tracing::info!(
            node = %args.node, pins = %dataplane.pin_dir.display(), events_per_second = args.events_per_second,
            events_burst = args.events_burst, events_allowed = args.events_allowed, "agent started"
        );
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
            cni: Registry::default(),
            parked: Vec::new(),
            pod_objects: BTreeMap::new(),
            last_loaded: None,
            book: EndpointBook::default(),
            ledger: CounterLedger::default(),
            last_programmed: None,
            hub,
            reader_counters,
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
    /// A pod's interface is the one its CNI ADD registered (the runtime said so), else the one
    /// discovery finds for its addresses.
    pub(super) fn run_step(
        &mut self,
        step: impl FnOnce(&mut Controller, &mut KernelMaps, &dyn Fn(&PodInfo) -> Option<u32>) -> StepResult,
    ) -> StepResult {
        let result = {
            let dp = &mut self.dataplane;
            let discovered = Dataplane::interface_of(&dp.interfaces);
            let cni = &self.cni;
            let interface_of = |pod: &PodInfo| cni.ifindex_of(&pod.key()).or_else(|| discovered(pod));
            step(&mut self.controller, &mut dp.maps, &interface_of)
        };
        let wrote = result.as_ref().map_or(true, |report| *report != Default::default());
        self.observe_programming(wrote);
        result
    }

    /// A step that may change the endpoints: runs and records it, then detaches and attaches
    /// to match. Returns (the step succeeded, every programmed endpoint is attached).
    pub(super) fn reconcile(&mut self, step: impl FnOnce(&mut Controller, &mut KernelMaps, &dyn Fn(&PodInfo) -> Option<u32>) -> StepResult) -> (bool, bool) {
        let result = self.run_step(step);
        let succeeded = result.is_ok();
        self.record(result);
        if let Err(error) = self.dataplane.maps.retry_netfilter() {
            tracing::error!(%error, "cannot record the netfilter program's state");
        }
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
    pub(super) fn attach_programmed(&mut self) -> bool {
        let mut all = true;
        let live: Vec<(String, u32)> =
            self.controller.sync.live_endpoints().map(|(name, _, ifindex)| (name.to_string(), ifindex)).collect();
        for (pod, ifindex) in live {
            if self.dataplane.attachments.is_attached(ifindex) {
                continue;
            }
            // A registered interface may be newer than the last discovery report.
            let name = match self.dataplane.interfaces.by_ifindex(ifindex) {
                Some(link) => link.name.clone(),
                None => match self.cni.interface_name(ifindex) {
                    Some(name) => name.to_string(),
                    None => {
                        all = false;
                        continue;
                    }
                },
            };
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

    pub(super) fn apply_events(&mut self, batch: Vec<Received>) {
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
        let mut events: Vec<ObjectEvent> = batch.into_iter().map(|(event, _)| event).collect();
        for event in &mut events {
            self.track_pods(event);
        }
        self.reconcile(|controller, maps, interface_of| controller.apply_events(maps, events, received, interface_of));
        self.resolve_parked();
    }

    /// Keeps the last Pod object of each local pod, fills in the addresses a CNI ADD gave to
    /// Pod objects that have none yet, and forgets the registrations of deleted pods.
    fn track_pods(&mut self, event: &mut ObjectEvent) {
        let node = self.args.node.clone();
        let track = |pods: &mut BTreeMap<String, Pod>, cni: &Registry, pod: &mut Pod| {
            let key = format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or("default"),
                pod.metadata.name.as_deref().unwrap_or_default()
            );
            if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()) {
                pods.insert(key, pod.clone());
            } else {
                pods.remove(&key);
            }
            cni.patch(pod);
        };
        match event {
            ObjectEvent::Applied(KubeObject::Pod(pod)) => track(&mut self.pod_objects, &self.cni, pod),
            ObjectEvent::Relisted(ObjectKind::Pod, objects) => {
                let mut listed = BTreeSet::new();
                for object in objects.iter_mut() {
                    if let KubeObject::Pod(pod) = object {
                        listed.insert(format!(
                            "{}/{}",
                            pod.metadata.namespace.as_deref().unwrap_or("default"),
                            pod.metadata.name.as_deref().unwrap_or_default()
                        ));
                        track(&mut self.pod_objects, &self.cni, pod);
                    }
                }
                self.pod_objects.retain(|key, _| listed.contains(key));
            }
            ObjectEvent::Deleted(ObjectKind::Pod, namespace, name) => {
                let key = format!("{}/{name}", namespace.as_deref().unwrap_or("default"));
                self.pod_objects.remove(&key);
                if self.cni.remove(&key).is_some() {
                    tracing::info!(pod = %key, "pod deleted: its CNI registration goes too");
                }
            }
            _ => {}
        }
    }

    /// Manifests mode: the last loaded state with CNI addresses filled in, programmed.
    pub(super) fn replace_with_loaded(&mut self, received: Instant) -> bool {
        let Some(mut state) = self.last_loaded.clone() else { return false };
        for (key, registration) in self.cni.iter() {
            if let Some(pod) = state.pods.get(key).filter(|p| p.ips.is_empty() && !p.host_network) {
                let mut pod = pod.clone();
                pod.ips = registration.ips.clone();
                state.upsert_pod(pod);
            }
        }
        let (succeeded, _) = self.reconcile(|controller, maps, interface_of| controller.replace(maps, state, received, interface_of));
        succeeded
    }

    /// Manifests mode: reload the directory if it changed.
    pub(super) fn poll_manifests(&mut self, dir: &std::path::Path) {
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
        self.last_loaded = Some(loaded.cluster_state());
        let succeeded = self.replace_with_loaded(received);
        self.manifests_loaded |= succeeded;
        self.resolve_parked();
    }

    /// Interfaces appeared, went or moved (reported by the discovery thread): reprogram the
    /// endpoints concerned.
    pub(super) fn apply_interfaces(&mut self, interfaces: InterfaceIndex) {
        let received = Instant::now();
        let addresses = interfaces.local_addresses.clone();
        self.dataplane.interfaces = interfaces;
        self.forget_vanished_sandboxes();
        if *self.controller.compiler.local_addresses() != addresses {
            let _ = self.reconcile(|controller, maps, _| controller.set_local_addresses(maps, received, &addresses));
        }
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

    /// Every tick: the periodic full resync, attach retries, readiness, CNI ADDs whose wait
    /// for their Pod object is over.
    pub(super) fn periodic(&mut self) {
        self.resolve_parked();
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

    pub(super) fn update_readiness(&mut self, attached: bool) {
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
        // Nobody should mistake audit for enforcement: /readyz says so.
        let audit = self.audit_status();
        self.metrics.set_readiness_detail(audit.is_active().then(|| format!("audit mode: {}", audit.describe())));
        // Once in sync, a previous agent's links on interfaces we did not take over belong to
        // pods that left: detach them.
        if reason.is_empty() && self.dataplane.attachments.previous_links() > 0 {
            self.dataplane.attachments.release_previous();
        }
        // A previous agent's netfilter links go when ours replace them; if no local pod's
        // egress is enforced, ours never attach, and theirs serve no TC link of theirs once
        // those are gone.
        if let (true, Some(hooks)) = (reason.is_empty(), self.dataplane.maps.netfilter_hooks()) {
            hooks.links.release_previous();
        }
    }

    pub(super) fn snapshot(&mut self) -> DataplaneSnapshot {
        let endpoints: BTreeMap<String, EndpointCounters> =
            self.book.current().map(|p| (p.endpoint.clone(), self.endpoint_totals(p))).collect();
        let rules = self
            .node_rule_totals()
            .into_iter()
            .map(|(key, count)| {
                let (namespace, policy) = key.policy.split_once('/').unwrap_or(("", key.policy.as_str()));
                RuleSeries {
                    namespace: namespace.to_string(),
                    policy: policy.to_string(),
                    direction: if key.direction == netsieve_common::DIRECTION_EGRESS { "egress" } else { "ingress" },
                    rule: key.index.to_string(),
                    packets: count.stats.packets,
                    bytes: count.stats.bytes,
                }
            })
            .collect();
        let events = self.event_status();
        let audit = self.audit_status();
        let state = &self.controller.state;
        DataplaneSnapshot {
            drops: read_drop_counters(&self.dataplane.drops),
            audits: read_drop_counters(&self.dataplane.audits),
            endpoints,
            rules,
            maps: self.map_pressure(),
            endpoint_count: self.book.len(),
            endpoints_failed_closed: self.controller.compiler.program().endpoints.values().filter(|e| e.fail_closed).count(),
            pods_waiting_for_interface: self.controller.compiler.waiting_for_interface().count(),
            policy_count: state.policies.len(),
            invalid_policy_count: state.policies.values().filter(|p| !p.errors.is_empty()).count(),
            identity_count: self.controller.compiler.identities().len(),
            events: EventPathSnapshot {
                emitted: events.emitted,
                rate_limited: events.rate_limited,
                ring_full: events.ring_full,
                read: events.read,
                dropped_agent_busy: events.dropped_agent_busy,
                dropped_slow_subscribers: events.dropped_slow_subscribers,
                subscribers: events.subscribers,
            },
            audit: AuditSnapshot {
                active: audit.is_active(),
                namespaces: audit.namespaces.clone(),
                endpoints: self.book.current().filter(|p| p.audit).count(),
            },
        }
    }

    pub(super) fn log_counters(&self) {
        let drops: Vec<String> = read_drop_counters(&self.dataplane.drops)
            .into_iter()
            .filter(|(_, _, n)| *n > 0)
            .map(|(reason, direction, n)| format!("{direction}/{reason}={n}"))
            .collect();
        tracing::info!(drops = %drops.join(" "), "drop counters");
    }

    pub(super) fn shutdown(&mut self) {
        let started = Instant::now();
        let interfaces = self.dataplane.attachments.ifindexes().len();
        match self.args.on_exit {
            OnExit::Detach => {
                self.dataplane.attachments.detach_all(&mut self.dataplane.ebpf);
                if let Some(hooks) = self.dataplane.maps.netfilter_hooks() {
                    hooks.links.detach_all();
                }
                let _ = std::fs::remove_dir_all(&self.dataplane.pin_dir);
                tracing::info!(interfaces, elapsed_ms = started.elapsed().as_millis() as u64, "agent stopped: programs detached, pins removed");
            }
            OnExit::Keep => {
                let links = self.dataplane.attachments.keep_pinned(&mut self.dataplane.ebpf)
                    + self.dataplane.maps.netfilter_hooks().map_or(0, |hooks| hooks.links.keep_pinned());
                tracing::info!(
                    interfaces, links, pins = %self.dataplane.pin_dir.display(),
                    "agent stopped: programs stay attached and enforce the last programmed state until the next agent takes over"
                );
            }
        }
    }
}
