//! Test harnesses: clusters of network namespaces for end-to-end tests of the agent.
pub mod netns;
pub mod seed_cluster;
pub mod fake_apiserver;
pub mod conformance;
