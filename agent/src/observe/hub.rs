//! The subscribers of the event stream. Each has a bounded queue of encoded event lines; the
//! agent only ever `try_send`s into it, so a subscriber that does not read loses events (each
//! counted, and told with a `lost` line when it catches up) and slows down nobody.
use crate::node_api::observe::{EventFilter, FlowEvent};
use crate::node_api::{self, Response};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Events queued per subscriber.
pub const SUBSCRIBER_QUEUE: usize = 1024;
/// Subscribers at once (each holds a node API connection).
pub const MAX_SUBSCRIBERS: usize = 8;

/// One encoded `event` line, shared by every subscriber it goes to.
pub type EventLine = Arc<Vec<u8>>;

struct Subscriber {
    id: u64,
    filter: EventFilter,
    queue: mpsc::Sender<EventLine>,
    lost: Arc<AtomicU64>,
}

/// Counters of the hub, for metrics and status.
#[derive(Debug, Default)]
pub struct HubCounters {
    /// Events dropped because a subscriber's queue was full.
    pub dropped_slow: AtomicU64,
    /// Events delivered into a subscriber's queue.
    pub delivered: AtomicU64,
}

#[derive(Default)]
pub struct EventHub {
    subscribers: Mutex<Vec<Subscriber>>,
    count: AtomicUsize,
    next_id: AtomicU64,
    pub counters: HubCounters,
}

/// A live subscription: events arrive on `events`; dropping it unsubscribes.
pub struct Subscription {
    pub events: mpsc::Receiver<EventLine>,
    /// Events lost since the last time this was taken.
    pub lost: Arc<AtomicU64>,
    id: u64,
    hub: Arc<EventHub>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct TooManySubscribers;

impl EventHub {
    /// Whether anyone listens: without subscribers the agent does not resolve events at all.
    pub fn has_subscribers(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    pub fn subscribers(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn subscribe(self: &Arc<Self>, filter: EventFilter) -> Result<Subscription, TooManySubscribers> {
        let mut subscribers = self.lock();
        if subscribers.len() >= MAX_SUBSCRIBERS {
            return Err(TooManySubscribers);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (queue, events) = mpsc::channel(SUBSCRIBER_QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        subscribers.push(Subscriber { id, filter, queue, lost: lost.clone() });
        self.count.store(subscribers.len(), Ordering::Relaxed);
        Ok(Subscription { events, lost, id, hub: self.clone() })
    }

    fn remove(&self, id: u64) {
        let mut subscribers = self.lock();
        subscribers.retain(|s| s.id != id);
        self.count.store(subscribers.len(), Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        // The list stays consistent whatever panicked while holding the lock.
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers an event to every subscriber whose filter matches; never waits. The line is
    /// encoded once, only if someone wants it.
    pub fn publish(&self, event: &FlowEvent) {
        let subscribers = self.lock();
        let mut line: Option<EventLine> = None;
        for subscriber in subscribers.iter().filter(|s| s.filter.matches(event)) {
            let encoded = line
                .get_or_insert_with(|| Arc::new(node_api::encode_response(Response::Event(Box::new(event.clone())))))
                .clone();
            match subscriber.queue.try_send(encoded) {
                Ok(()) => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    subscriber.lost.fetch_add(1, Ordering::Relaxed);
                    self.counters.dropped_slow.fetch_add(1, Ordering::Relaxed);
                }
                // The connection is going away; its Subscription's drop removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_api::observe::FlowPeer;

    fn event(pod: &str) -> FlowEvent {
        FlowEvent::dropped_for_tests("t", FlowPeer::pod_for_tests("10.0.0.1", 80, "ns", "client"), FlowPeer::pod_for_tests("10.0.0.1", 80, "ns", pod))
    }

    #[test]
    fn a_slow_subscriber_loses_events_and_the_others_do_not() {
        let hub = Arc::new(EventHub::default());
        let mut fast = hub.subscribe(EventFilter::default()).expect("subscribe");
        let slow = hub.subscribe(EventFilter::default()).expect("subscribe");
        let mut web_only = hub.subscribe(EventFilter { pod: Some("web".into()), ..Default::default() }).expect("subscribe");
        assert_eq!(hub.subscribers(), 3);
        let total = SUBSCRIBER_QUEUE + 100;
        let mut received = 0;
        for i in 0..total {
            hub.publish(&event(if i % 2 == 0 { "web" } else { "db" }));
            // The fast one reads as it goes.
            while fast.events.try_recv().is_ok() {
                received += 1;
            }
        }
        assert_eq!(received, total, "a reader that keeps up gets everything");
        assert_eq!(slow.lost.load(Ordering::Relaxed), 100, "the slow one lost what did not fit");
        assert_eq!(hub.counters.dropped_slow.load(Ordering::Relaxed), 100);
        let mut web = 0;
        while let Ok(line) = web_only.events.try_recv() {
            let text = String::from_utf8(line.to_vec()).expect("utf8");
            assert!(text.contains("\"pod\":\"web\"") && text.ends_with('\n'), "{text}");
            web += 1;
        }
        assert_eq!(web, total / 2, "the filter applies before the queue");
        assert_eq!(web_only.lost.load(Ordering::Relaxed), 0);
        drop(slow);
        assert_eq!(hub.subscribers(), 2, "dropping a subscription unsubscribes");
    }

    #[test]
    fn subscribers_are_bounded() {
        let hub = Arc::new(EventHub::default());
        let held: Vec<Subscription> = (0..MAX_SUBSCRIBERS).map(|_| hub.subscribe(EventFilter::default()).expect("subscribe")).collect();
        assert!(hub.subscribe(EventFilter::default()).is_err());
        drop(held);
        assert!(!hub.has_subscribers());
        assert!(hub.subscribe(EventFilter::default()).is_ok());
    }
}
