//! `netsieve-cni`: the chained CNI plugin (see `netsieve::cni::plugin`). Executed by the
//! container runtime; reads the network configuration on stdin, the CNI variables from the
//! environment, prints a CNI result or error on stdout.
use netsieve::cni::plugin::{self, AGENT_TIMEOUT, MAX_CONFIG_BYTES};
use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // Bounded: a configuration is a few kilobytes; more is not one.
    let read = std::io::stdin().take(MAX_CONFIG_BYTES as u64 + 1).read_to_end(&mut stdin);
    if read.is_err() || stdin.len() > MAX_CONFIG_BYTES {
        stdin.clear();
        stdin.extend_from_slice(b"<unreadable or larger than the limit>");
    }
    let env = |name: &str| std::env::var(name).ok();
    let outcome = plugin::execute(&env, &stdin, &mut |socket, request| netsieve::node_api::call(socket, request, AGENT_TIMEOUT));
    let mut stdout = std::io::stdout().lock();
    // Nothing sensible is left to do if stdout is gone; the exit status still tells.
    let _ = stdout.write_all(outcome.stdout.as_bytes());
    let _ = stdout.flush();
    ExitCode::from(outcome.exit_code)
}
