//! netsieve: a Kubernetes NetworkPolicy enforcer built on TC eBPF.
//!
//! - [`policy`]: the pure, kernel-free NetworkPolicy semantics; the specification every other
//!   part (the map compiler, the eBPF programs) is tested against.
//! - [`manifests`]: loads Namespaces, Nodes, Pods and NetworkPolicies from YAML/JSON files.
//! - [`explain_cmd`]: the `netsieve explain` command.
//! - [`dataplane`]: the map compiler, the synchronizer and the kernel-facing code.
//! - [`controller`]: applies object events to the state and programs what they affect.
//! - [`kube_source`]: kube-runtime watchers feeding the controller.
//! - [`metrics`]: Prometheus text metrics and readiness.
//! - [`daemon`]: `netsieve agent`, wiring sources, controller, kernel and metrics server.
//! - [`node_api`]: the requests of the agent's node-local unix socket.
//! - [`observe`]: verdict events, status and counters with names (kernel-free parts).
//! - [`monitor_cmd`], [`status_cmd`]: `netsieve monitor` and `netsieve status`, clients of the
//!   node socket.
//! - [`cni`]: the chained CNI plugin `netsieve-cni` and its installation.
pub mod cni;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod dir_watch;
pub mod explain_cmd;
pub mod kube_source;
pub mod manifests;
pub mod metrics;
pub mod monitor_cmd;
pub mod node_api;
pub mod observe;
pub mod policy;
pub mod status_cmd;
