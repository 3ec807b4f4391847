#![no_std]
// This file exists so the agent can name this crate as a build dependency (for cache
// invalidation) without building the eBPF binary for the host; aya-build builds the binary.
