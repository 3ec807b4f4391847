//! Test support: clusters of network namespaces (with Services and a kube-proxy emulation)
//! and a fake API server for end-to-end tests of the agent, the upstream NetworkPolicy
//! conformance cases as data, and seeded random clusters for differential tests and
//! benchmarks.
pub mod conformance;
pub mod dns;
pub mod fake_apiserver;
pub mod kube_proxy;
pub mod netns;
pub mod scenario;
pub mod seed_cluster;
pub mod service_cluster;
pub mod spoof;
pub mod throughput;
