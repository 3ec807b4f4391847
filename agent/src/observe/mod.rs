//! Observability of the dataplane, kernel-free (the agent's daemon feeds it, tests drive it
//! directly): what the eBPF programs report is turned into names people know.
//!
//! - [`decode`]: a `VerdictEvent` from the `EVENTS` ring buffer, its protocol and reason
//!   names, and the kernel's monotonic clock turned into wall-clock time.
//! - [`book`]: the endpoint programmings the synchronizer wrote, current and recently
//!   retired, so an event or a counter of an endpoint slot, a revision or a `RULE_STATS`
//!   index is attributed to its pod and NetworkPolicy rule even after a reprogramming.
//! - [`resolve`]: an event with addresses and slots resolved to pods and policy rules.
//! - [`ledger`]: per-pod and per-rule counters carried over reprogrammings (the kernel counts
//!   per slot and per rule counter, both reused), so exported counters stay monotonic.
//! - [`hub`]: the subscribers of the event stream, each with a bounded queue; a slow one
//!   loses events (counted), never slows anyone.
//! - [`render`]: the one-line text form of an event, and the text of `netsieve status`.
pub mod book;
pub mod decode;
pub mod hub;
pub mod ledger;
pub mod render;
pub mod resolve;
