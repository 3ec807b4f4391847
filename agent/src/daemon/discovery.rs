//! The interface discovery thread: follows rtnetlink notifications (see
//! [`crate::dataplane::discovery`]) and reports the interface index to the agent loop when
//! links or placements change, within milliseconds of the kernel's change. Overruns and
//! vanished links trigger a fresh dump. Ends when the agent drops the receiver.
use super::error::AgentError;
use crate::dataplane::discovery::{self, Drained, InterfaceIndex, Watcher};
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long the thread sleeps between checks that the agent still listens, and between
/// retries of a failed dump.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Subscribes and dumps (synchronously, so the agent starts with the current interfaces),
/// then follows changes on a thread of its own.
pub(super) fn spawn_discovery(metrics: Arc<Metrics>) -> Result<(InterfaceIndex, mpsc::UnboundedReceiver<InterfaceIndex>), AgentError> {
    let mut watcher = Watcher::subscribe()?;
    let mut tables = discovery::dump()?;
    let initial = InterfaceIndex::from_tables(&tables);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut last = initial.clone();
    std::thread::Builder::new()
        .name("discovery".into())
        .spawn(move || {
            let mut dump_due = false;
            loop {
                if tx.is_closed() {
                    return;
                }
                match watcher.wait(IDLE_CHECK) {
                    Ok(true) => {}
                    Ok(false) if !dump_due => continue,
                    Ok(false) => {}
                    Err(error) => {
                        metrics.reconcile_error("discovery");
                        tracing::error!(%error, "waiting for rtnetlink notifications");
                        std::thread::sleep(IDLE_CHECK);
                        continue;
                    }
                }
                match watcher.drain(&mut tables) {
                    Ok(Drained::Applied) => {}
                    Ok(Drained::NeedsDump) => dump_due = true,
                    Err(error) => {
                        metrics.reconcile_error("discovery");
                        tracing::error!(%error, "reading rtnetlink notifications; dumping the tables again");
                        dump_due = true;
                    }
                }
                if dump_due {
                    match discovery::dump() {
                        Ok(fresh) => {
                            tracing::debug!("interface tables dumped again");
                            tables = fresh;
                            dump_due = false;
                        }
                        Err(error) => {
                            metrics.reconcile_error("discovery");
                            tracing::error!(%error, "cannot dump the interface tables; keeping the last state, retrying");
                            continue;
                        }
                    }
                }
                let index = InterfaceIndex::from_tables(&tables).keeping_bridged(&last);
                if !index.same_links(&last) {
                    last = index.clone();
                    if tx.send(index).is_err() {
                        return;
                    }
                }
            }
        })
        .map_err(AgentError::Runtime)?;
    Ok((initial, rx))
}
