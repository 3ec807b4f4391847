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
}

fn main() -> ExitCode {
    // clap exits with status 2 on a bad flag, which is the documented error status.
    let cli = Cli::parse();
    match cli.command {
        Command::Explain(args) => ExitCode::from(netsieve::explain_cmd::run(&args)),
    }
}
