//! The reader of the `EVENTS` ring buffer: a task of its own that sleeps in epoll until the
//! kernel submits events, drains them, and hands them in batches to the agent's loop (which
//! resolves names from its state) only while someone subscribes. It never waits on the loop:
//! a full queue drops the batch, counted. Without a reader draining it the ring would fill
//! and the programs would count `ring_full`; either way neither the kernel nor the loop ever
//! waits for a reader.
use super::error::AgentError;
use crate::observe::decode::decode;
use crate::observe::hub::EventHub;
use aya::maps::{MapData, RingBuf};
use netsieve_common::VerdictEvent;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// Batches queued for the loop.
pub const QUEUE_BATCHES: usize = 64;
/// Events per batch; also how many are drained before the task yields.
pub const BATCH: usize = 512;

/// What happened to the events read from the ring.
#[derive(Debug, Default)]
pub struct ReaderCounters {
    pub read: AtomicU64,
    /// The loop's queue was full: dropped before resolution.
    pub dropped_agent_busy: AtomicU64,
    /// Records of an unexpected size (another object's layout).
    pub undecodable: AtomicU64,
}

/// Starts the reader on the runtime; events go to `to_loop` while `hub` has subscribers.
pub(super) fn spawn_reader(
    ring: RingBuf<MapData>,
    hub: Arc<EventHub>,
    to_loop: mpsc::Sender<Vec<VerdictEvent>>,
    counters: Arc<ReaderCounters>,
) -> Result<tokio::task::JoinHandle<()>, AgentError> {
    // SAFETY: the ring buffer owns its map fd (`MapData` closes it only on drop) and the
    // `AsyncFd` owns the ring, so the fd stays open and the same for the `AsyncFd`'s lifetime.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|error| AgentError::EventRing(error.into()))?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match ring.readable_mut().await {
                Ok(guard) => guard,
                Err(error) => {
                    tracing::error!(%error, "polling the event ring failed: no more verdict events");
                    return;
                }
            };
            let mut batch = Vec::new();
            let mut drained = 0;
            while let Some(record) = guard.get_inner_mut().next() {
                drained += 1;
                match decode(&record) {
                    Some(event) if hub.has_subscribers() => batch.push(event),
                    Some(_) => {}
                    None => {
                        counters.undecodable.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if drained == BATCH {
                    break;
                }
            }
            counters.read.fetch_add(drained as u64, Ordering::Relaxed);
            if drained < BATCH {
                // Empty: sleep until the kernel signals new data.
                guard.clear_ready();
            }
            drop(guard);
            if !batch.is_empty() {
                let size = batch.len() as u64;
                if let Err(mpsc::error::TrySendError::Full(_)) = to_loop.try_send(batch) {
                    counters.dropped_agent_busy.fetch_add(size, Ordering::Relaxed);
                }
            }
            if drained == BATCH {
                // More may be waiting: let other tasks run first.
                tokio::task::yield_now().await;
            }
        }
    }))
}
