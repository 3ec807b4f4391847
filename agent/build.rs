//! Builds the eBPF programs (`ebpf/`) for `bpfel-unknown-none` with the nightly toolchain and
//! `-Z build-std=core` through aya-build; `dataplane::kernel` embeds the object, so the
//! `netsieve` binary is self-contained.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "netsieve-ebpf")
        .ok_or_else(|| anyhow!("netsieve-ebpf package not found"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() };
    // "nightly" is the toolchain `cargo xtask setup` checks: it must carry rust-src and use the
    // LLVM major bpf-linker was built against.
    aya_build::build_ebpf([package], Toolchain::Custom("nightly"))
}
