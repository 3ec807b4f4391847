use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Kubernetes NetworkPolicy enforcer for Linux nodes (TC eBPF).
#[derive(Parser)]
#[command(name = "netsieve", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Say whether a flow is allowed by the NetworkPolicies in a directory (or the cluster, or
    /// as the local agent enforces them, with --agent), and why.
    /// Exit status: 0 allowed, 1 denied, 2 error.
    Explain(netsieve::explain_cmd::ExplainArgs),
    /// Stream the local agent's verdict events (drops, audits, allowed flows) as they happen.
    /// Exit status: 0 when the agent goes away or --count is reached, 2 error.
    Monitor(netsieve::monitor_cmd::MonitorArgs),
    /// What the local agent enforces: endpoints, policies, counters, rules that never matched,
    /// map pressure, audit mode. Exit status: 0 done, 2 error.
    Status(netsieve::status_cmd::StatusArgs),
    /// Enforce NetworkPolicies for the pods of one node (runs until SIGTERM).
    Agent(netsieve::daemon::AgentArgs),
    /// Detach the programs and remove the pins an `agent --on-exit keep` left on this node
    /// (uninstalling). Exit status: 0 done, 2 error.
    Cleanup(netsieve::daemon::CleanupArgs),
    /// Install or remove the `netsieve-cni` chained plugin on this node (the DaemonSet's init
    /// container). Exit status: 0 done, 2 error.
    #[command(subcommand)]
    Cni(CniCommand),
}

#[derive(Subcommand)]
enum CniCommand {
    /// Copy the plugin binary into the CNI binary directory and append the plugin to the
    /// node's CNI configuration list (idempotent).
    Install(CniInstallArgs),
    /// Remove the plugin from every CNI configuration list, then its binary.
    Uninstall(CniUninstallArgs),
}

#[derive(clap::Args)]
struct CniInstallArgs {
    /// The plugin binary to install (default: `netsieve-cni` next to this executable).
    #[arg(long)]
    binary: Option<PathBuf>,
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The agent's socket, written into the plugin's configuration.
    #[arg(long, default_value = netsieve::node_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Seconds to wait for the main plugin's configuration to appear.
    #[arg(long, default_value_t = 0)]
    wait: u64,
}

#[derive(clap::Args)]
struct CniUninstallArgs {
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// Leave the binary (pods added while installed call it on DEL; without an agent it
    /// answers success).
    #[arg(long)]
    keep_binary: bool,
}

fn main() -> ExitCode {
    // clap exits with status 2 on a bad flag, which is the documented error status.
    let cli = Cli::parse();
    match cli.command {
        Command::Explain(args) => ExitCode::from(netsieve::explain_cmd::run(&args)),
        Command::Monitor(args) => ExitCode::from(netsieve::monitor_cmd::run(&args)),
        Command::Status(args) => ExitCode::from(netsieve::status_cmd::run(&args)),
        Command::Agent(args) => {
            init_logging();
            match netsieve::daemon::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, kind = error.metric_label(), "agent failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cleanup(args) => {
            init_logging();
            match netsieve::daemon::cleanup(&args) {
                Ok(links) => {
                    println!("detached {links} program links and removed the pins of node {}", args.node);
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("netsieve cleanup: {error}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Cni(command) => cni(command),
    }
}

fn cni(command: CniCommand) -> ExitCode {
    use netsieve::cni::install;
    match command {
        CniCommand::Install(args) => {
            let binary = match args.binary {
                Some(binary) => binary,
                None => match std::env::current_exe() {
                    Ok(exe) => exe.with_file_name(install::PLUGIN_TYPE),
                    Err(error) => {
                        eprintln!("netsieve cni install: cannot locate this executable: {error}");
                        return ExitCode::from(2);
                    }
                },
            };
            let wait = std::time::Duration::from_secs(args.wait);
            match install::install(&binary, &args.bin_dir, &args.conf_dir, &args.socket, wait) {
                Ok(done) => {
                    println!(
                        "{} {} ({}); {} {}",
                        done.binary.display(),
                        if done.binary_written { "written" } else { "already up to date" },
                        binary.display(),
                        done.conflist.display(),
                        if done.conflist_written { "now chains netsieve-cni" } else { "already chains netsieve-cni" }
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("netsieve cni install: {error}");
                    ExitCode::from(2)
                }
            }
        }
        CniCommand::Uninstall(args) => match install::uninstall(&args.bin_dir, &args.conf_dir, args.keep_binary) {
            Ok(done) => {
                for path in &done.conflists_changed {
                    println!("{}: netsieve-cni removed", path.display());
                }
                if done.binary_removed {
                    println!("{}: removed", args.bin_dir.join(install::PLUGIN_TYPE).display());
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("netsieve cni uninstall: {error}");
                ExitCode::from(2)
            }
        },
    }
}

/// Logs to stderr; `RUST_LOG` filters (default: info).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
