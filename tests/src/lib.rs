//! Test support: clusters of network namespaces and a fake API server for end-to-end tests of
//! the agent, the upstream NetworkPolicy conformance cases as data, and seeded random clusters
//! for differential tests and benchmarks.
pub mod conformance;
pub mod fake_apiserver;
pub mod netns;
pub mod scenario;
pub mod seed_cluster;
