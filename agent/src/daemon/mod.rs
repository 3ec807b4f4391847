//! `netsieve agent`: enforce NetworkPolicies for the pods of one node.
//!
//! Sources: the Kubernetes API (default; kube-runtime watchers, see `kube_source`) or a
//! manifests directory (`--manifests`, polled every
//! [`POLL_INTERVAL`](crate::dir_watch::POLL_INTERVAL)). Either way, events go through the
//! [`Controller`](crate::controller::Controller): only what they affect is recompiled and written, without a window where a
//! pod is unprotected (see `dataplane::sync`). Watch events are drained in bursts: everything
//! queued when the loop wakes is applied as one batch, so bursts coalesce without any added
//! delay. Programs attach to a pod's interface after its endpoint is written.
//!
//! Bad input never opens traffic: an unreadable manifest keeps the last good state, invalid
//! policies fail closed, an API outage keeps enforcing the last known state. Metrics and
//! health are served on `--metrics-addr`, the node-local API (the CNI plugin's requests) on
//! `--socket`.
//!
//! - `args`: the command-line arguments; `error`: the error type.
//! - `dataplane`: the kernel side (loaded programs, maps, pins, attachments, counters).
//! - `agent`: the state machine driven by the loop in [`run`] (events, manifests, interfaces,
//!   reconcile, readiness, shutdown).
//! - `discovery`: the interface discovery thread (rtnetlink notifications); `http`: the
//!   metrics and health server; `socket`: the node API server; `cni`: what the CNI plugin's
//!   requests do to the agent.
//! - `events`: the verdict event ring reader; `observe`: events with names, `status`, live
//!   `explain`, counters carried over reprogrammings.
mod agent;
mod args;
mod cni;
mod dataplane;
mod discovery;
mod error;
mod events;
mod http;
mod observe;
mod socket;

pub use args::{AgentArgs, CleanupArgs, OnExit};
pub use dataplane::read_drop_counters;
pub use error::AgentError;

use crate::dataplane::bpffs;
use crate::dir_watch::POLL_INTERVAL;
use crate::kube_source::{self, Received};
use crate::metrics::Metrics;
use crate::observe::hub::EventHub;
use agent::Agent;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Uninstalls netsieve from this node: removes the CNI plugin from the node's CNI
/// configuration (so no new pod waits for an agent) and its binary, then detaches the links an
/// agent left pinned and removes its pins. Returns the number of links.
pub fn cleanup(args: &CleanupArgs) -> Result<usize, AgentError> {
    let removed = crate::cni::install::uninstall(&args.cni_bin_dir, &args.cni_conf_dir, args.keep_cni_binary)?;
    for conflist in &removed.conflists_changed {
        tracing::info!(conflist = %conflist.display(), "removed the netsieve-cni plugin from the CNI configuration");
    }
    if removed.binary_removed {
        tracing::info!(dir = %args.cni_bin_dir.display(), "removed the netsieve-cni binary");
    }
    let Some(dir) = bpffs::existing_pin_dir(&args.node, &args.bpffs) else {
        tracing::info!(node = %args.node, "nothing pinned for this node");
        return Ok(0);
    };
    let links = crate::dataplane::attach::remove_pinned_links(&dir.join("links"))
        + crate::dataplane::netfilter::remove_pinned_links(&dir.join(dataplane::NETFILTER_LINK_DIR));
    std::fs::remove_dir_all(&dir).map_err(|source| AgentError::Cleanup { path: dir.clone(), source })?;
    tracing::info!(node = %args.node, links, dir = %dir.display(), "detached the programs and removed the pins");
    Ok(links)
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
        http::serve_metrics(args.metrics_addr, metrics.clone()).await?;
        let counters_every = Duration::from_secs(args.counters_interval);
        let hub = Arc::new(EventHub::default());
        let reader_counters = Arc::new(events::ReaderCounters::default());
        let mut agent = Agent::start(args.clone(), metrics.clone(), hub.clone(), reader_counters.clone())?;
        // Verdict events: a task of its own drains the ring; the loop names them, only while
        // someone subscribes.
        let (raw_events_tx, mut raw_events) = mpsc::channel(events::QUEUE_BATCHES);
        let reader = match agent.dataplane.events.take() {
            Some(ring) => Some(events::spawn_reader(ring, hub.clone(), raw_events_tx, reader_counters)?),
            None => None,
        };
        // Interfaces: one dump now, then rtnetlink notifications followed on a thread of their
        // own, so the agent loop never waits on the kernel tables while events queue up.
        let (interfaces, mut links) = discovery::spawn_discovery(metrics.clone())?;
        agent.apply_interfaces(interfaces);
        // Node API requests that need the agent's state come to this loop; the server answers
        // bad input itself. A client waits at most the ADD's wait for a Pod object plus slack.
        let (requests_tx, mut node_requests) = mpsc::channel::<socket::NodeRequest>(socket::QUEUE_DEPTH);
        let answer_timeout = Duration::from_millis(args.cni_pod_wait_ms) + Duration::from_secs(10);
        let subscriptions = socket::Subscriptions { hub: hub.clone(), settings: agent.event_settings() };
        let socket_file = socket::serve(&args.socket, args.node.clone(), requests_tx, answer_timeout, subscriptions)?;
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
                Some(batch) = raw_events.recv() => agent.publish_events(batch),
                Some((request, reply)) = node_requests.recv() => agent.handle_node_request(request, reply),
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
        if let Some(reader) = reader {
            reader.abort();
        }
        agent.log_counters();
        agent.shutdown();
        socket_file.remove();
        Ok(())
    })
}
