//! The interface discovery thread.
use crate::dataplane::discovery::InterfaceIndex;
use crate::dir_watch::POLL_INTERVAL;
use crate::metrics::Metrics;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Reads the interface tables every [`POLL_INTERVAL`] on a thread of its own and reports
/// them when they differ from the last report. Ends when the agent drops the receiver.
pub(super) fn spawn_discovery(mut last: InterfaceIndex, metrics: Arc<Metrics>) -> mpsc::UnboundedReceiver<InterfaceIndex> {
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
