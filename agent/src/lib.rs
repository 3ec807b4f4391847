//! netsieve: a Kubernetes NetworkPolicy enforcer built on TC eBPF.
pub mod dataplane;
pub mod dir_watch;
pub mod scenario;
