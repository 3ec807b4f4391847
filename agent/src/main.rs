use clap::{Parser, Subcommand};
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
    /// Say whether a flow is allowed by the NetworkPolicies in a directory, and why.
    /// Exit status: 0 allowed, 1 denied, 2 error.
    Explain(netsieve::explain_cmd::ExplainArgs),
    /// Enforce NetworkPolicies for the pods of one node (runs until SIGTERM).
    Agent(netsieve::daemon::AgentArgs),
    /// Detach the programs and remove the pins an `agent --on-exit keep` left on this node
    /// (uninstalling). Exit status: 0 done, 2 error.
    Cleanup(netsieve::daemon::CleanupArgs),
}

fn main() -> ExitCode {
    // clap exits with status 2 on a bad flag, which is the documented error status.
    let cli = Cli::parse();
    match cli.command {
        Command::Explain(args) => ExitCode::from(netsieve::explain_cmd::run(&args)),
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
