//! Project orchestration: `cargo xtask setup | build | test | bench | demo`.
//!
//! Everything a fresh Debian 12 machine needs is installed by `setup`, idempotently, so that
//! `cargo xtask test` (what CI runs) works on a machine that has never seen this project.
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian packages: LLVM 22 to build bpf-linker against the same LLVM major as the nightly
/// rustc, plus the tools the network-namespace tests and benchmarks use: `iptables` (its
/// `iptables-legacy` backend programs the iptables-mode kube-proxy emulation), `nftables` (the
/// nftables-mode one) and `conntrack` (which backend each translated connection went to).
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iperf3",
    "nftables",
    "iptables",
    "conntrack",
];

/// The toolchain that builds the eBPF crate. It must be a nightly (for `-Z build-std=core`)
/// whose LLVM major matches the LLVM bpf-linker is built against ([`LLVM_MAJOR`]); `setup`
/// checks that instead of trusting the reader's memory.
const EBPF_TOOLCHAIN: &str = "nightly";
const LLVM_MAJOR: &str = "22";

#[derive(Parser)]
#[command(name = "xtask", about = "netsieve build, test and demo orchestration")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install toolchain components, Debian packages and bpf-linker (idempotent).
    Setup,
    /// Build the eBPF programs, the agent and the CNI plugin in release mode:
    /// target/release/netsieve and target/release/netsieve-cni.
    Build,
    /// Run setup, then every test (unit, semantics, BPF, CLI) and clippy.
    Test,
    /// Run the benchmarks and print side-by-side ratios: every one, or only those named
    /// (`cargo xtask bench throughput`; names of agent/benches/*.rs).
    Bench {
        /// Benchmarks to run (all when none is named).
        names: Vec<String>,
    },
    /// Set up, build and run the demo.
    Demo,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Task::Setup => setup(),
        Task::Build => build(&root),
        Task::Test => test(&root),
        Task::Bench { names } => bench(&root, &names),
        Task::Demo => demo(&root),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask manifest directory has no parent")
}

/// Runs a command, failing with the command line in the error if it does not succeed.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: running {shown}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, or None when it cannot run or fails.
fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> Result<()> {
    // 1. rust-src for the nightly that builds the eBPF crate with -Z build-std=core.
    let installed = output_of(
        Command::new("rustup").args(["component", "list", "--installed", "--toolchain", EBPF_TOOLCHAIN]),
    )
    .unwrap_or_default();
    if !installed.lines().any(|line| line.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", EBPF_TOOLCHAIN]))
            .context("installing rust-src for the eBPF toolchain")?;
    }
    let rustc_info = output_of(Command::new("rustc").args([&format!("+{EBPF_TOOLCHAIN}"), "-vV"]))
        .context("the nightly toolchain is missing: `rustc +nightly -vV` failed")?;
    let llvm = rustc_info
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if !llvm.starts_with(&format!("{LLVM_MAJOR}.")) {
        bail!(
            "the {EBPF_TOOLCHAIN} toolchain uses LLVM {llvm}, but bpf-linker is built against \
             LLVM {LLVM_MAJOR}; install a nightly with LLVM {LLVM_MAJOR}"
        );
    }

    // 2. Debian packages, installed only when one is missing.
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            output_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("installing Debian packages {missing:?}"))?;
    }

    // 3. bpf-linker, built against Debian's LLVM 22 (about 4 minutes the first time).
    if output_of(Command::new("bpf-linker").arg("--version")).is_none() {
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--no-default-features", "--features"])
            .arg(format!("llvm-{LLVM_MAJOR}"))
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")))
        .context("building bpf-linker")?;
    }
    eprintln!("xtask: setup complete (nightly LLVM {llvm}, bpf-linker present)");
    Ok(())
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root);
    // `cargo xtask` runs us with xtask's own CARGO_PKG_* / CARGO_MANIFEST_DIR etc. set; build
    // scripts that watch them (ring's) would then see a changed environment and rebuild, with
    // everything depending on them, every time plain `cargo` and `cargo xtask` alternate.
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("CARGO_PKG_")
            || ["CARGO_MANIFEST_DIR", "CARGO_MANIFEST_PATH", "CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_BIN_NAME"]
                .contains(&name_text.as_ref())
        {
            cmd.env_remove(&name);
        }
    }
    cmd
}

fn build(root: &Path) -> Result<()> {
    run(cargo(root).args(["build", "--release", "--package", "netsieve", "--bin", "netsieve", "--bin", "netsieve-cni"]))?;
    for name in ["netsieve", "netsieve-cni"] {
        let binary = root.join("target/release").join(name);
        if !binary.is_file() {
            bail!("build finished but {} is missing", binary.display());
        }
        eprintln!("xtask: built {}", binary.display());
    }
    Ok(())
}

fn test(root: &Path) -> Result<()> {
    setup()?;
    // Clippy first: it is quick once the build is warm and keeps the tree warning-free.
    run(cargo(root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The eBPF crate only builds for the BPF target with nightly, so it is linted there.
    run(cargo(&root.join("ebpf"))
        .arg(format!("+{EBPF_TOOLCHAIN}"))
        .args(["clippy", "--target", "bpfel-unknown-none", "-Z", "build-std=core", "--", "-D", "warnings"]))?;
    // Release mode: the differential BPF test runs many packets and the netns tests time probes.
    run(cargo(root).args(["test", "--release"]))?;
    Ok(())
}

fn bench(root: &Path, names: &[String]) -> Result<()> {
    setup()?;
    let started = std::time::Instant::now();
    let mut cmd = cargo(root);
    cmd.args(["bench", "--package", "netsieve"]);
    for name in names {
        cmd.args(["--bench", name]);
    }
    run(&mut cmd)?;
    eprintln!("xtask: benchmarks took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn demo(root: &Path) -> Result<()> {
    setup()?;
    build(root)?;
    let binary = root.join("target/release/netsieve");
    // 1. What the policies say, from the seed scenarios' manifests.
    let fixtures = root.join("agent/tests/fixtures");
    let cases = [
        ("iamnice", "default/interactivetest", "default/nginx-1", "80"),
        ("iamnice", "default/nice-client", "default/nginx-1", "80"),
        ("cache-store", "default/build-code", "secure-middleware/cache-store", "6379"),
        ("cache-store", "default/internal-proxy", "secure-middleware/cache-store", "6379"),
    ];
    for (dir, from, to, port) in cases {
        println!("\n$ netsieve explain --manifests {dir} --from {from} --to {to} --port {port} --protocol TCP");
        let status = Command::new(&binary)
            .arg("explain")
            .arg("--manifests")
            .arg(fixtures.join(dir))
            .args(["--from", from, "--to", to, "--port", port, "--protocol", "TCP"])
            .status()
            .context("running netsieve explain")?;
        match status.code() {
            Some(0) | Some(1) => {}
            _ => bail!("netsieve explain failed with {status}"),
        }
    }
    // 2. The kernel enforcing it: a two-node cluster of network namespaces on this machine.
    println!();
    run(cargo(root).args(["build", "--release", "--package", "netsieve-tests", "--bin", "netsieve-demo"]))?;
    run(Command::new(root.join("target/release/netsieve-demo")).arg(&binary))
}
