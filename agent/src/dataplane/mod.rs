//! The dataplane: the pure compiler from policy to map entries, the synchronizer that writes
//! them without gaps, and thin kernel-facing code (object loading, maps, bpffs).
pub mod attach;
pub mod batch;
pub mod bpffs;
pub mod compile;
pub mod conntrack;
pub mod discovery;
pub mod kernel;
pub mod lpm;
pub mod maps;
pub mod netfilter;
pub mod node;
pub mod packet;
pub mod sync;
pub mod testrun;
