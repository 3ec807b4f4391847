//! The verdict logic shared by netsieve's eBPF programs: the TC programs on pods' host-side
//! veths (`src/main.rs`) and the netfilter program after kube-proxy's DNAT
//! (`src/bin/netsieve-netfilter.rs`). Both read the same maps through the same functions, so
//! one semantics decides in every hook. Map layouts and the lookup design are in
//! `netsieve-common`; docs/DATAPATH.md explains the whole path.
#![no_std]
// The BPF target's `core` has no atomic read-modify-write methods (no compare-and-swap):
// `flow::insert` adds to a shared counter with the intrinsic, which is BPF's atomic add. (The
// agent's build script also compiles this crate for the host, with a stable toolchain.)
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// Map keys (up to 44 bytes) are passed by reference to the map helpers, which take them by
// reference anyway: no copy.
#![allow(clippy::needless_borrows_for_generic_args)]

pub mod counters;
pub mod events;
pub mod flow;
pub mod maps;
pub mod netfilter;
pub mod packet;
pub mod policy;
pub mod verdict;
