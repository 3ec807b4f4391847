//! Kernel-facing code and the pure compiler that feeds it.
pub mod bpffs;
pub mod compile;
pub mod lpm;
pub mod maps;
pub mod sync;
