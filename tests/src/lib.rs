//! Test harnesses: clusters of network namespaces for end-to-end tests of the agent.
pub mod dns;
pub mod fake_apiserver;
pub mod kube_proxy;
pub mod netns;
pub mod seed_cluster;
pub mod service_cluster;
