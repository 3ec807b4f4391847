//! netsieve: a Kubernetes NetworkPolicy enforcer built on TC eBPF.
//!
//! - [`policy`]: the pure, kernel-free NetworkPolicy semantics; the specification every other
//!   part (the map compiler, the eBPF programs) is tested against.
//! - [`manifests`]: loads Namespaces, Nodes, Pods and NetworkPolicies from YAML/JSON files.
//! - [`explain_cmd`]: the `netsieve explain` command.
//! - [`dataplane`]: the map compiler, the synchronizer and the kernel-facing code.
pub mod daemon;
pub mod dataplane;
pub mod dir_watch;
pub mod explain_cmd;
pub mod manifests;
pub mod policy;
pub mod scenario;
