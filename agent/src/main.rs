use clap::Parser;

/// Kubernetes NetworkPolicy enforcer for Linux nodes (TC eBPF).
#[derive(Parser)]
#[command(name = "netsieve", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
