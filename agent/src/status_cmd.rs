//! `netsieve status`: what the local agent enforces: its endpoints (interface, identity,
//! policies, isolation, packet counters, per-rule counters and the rules that never matched),
//! map pressure, last programming, audit mode, the event path.
use crate::explain_cmd::OutputFormat;
use crate::node_api::{self, DEFAULT_SOCKET, MAX_STATUS_BYTES, Request, Response};
use crate::observe::render::status_text;
use std::path::PathBuf;
use std::time::Duration;

pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 2;

#[derive(Clone, Debug, clap::Args)]
pub struct StatusArgs {
    /// The agent's node socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// Runs the command and returns its exit status.
pub fn run(args: &StatusArgs) -> u8 {
    let status = match node_api::call_with_limit(&args.socket, Request::Status, Duration::from_secs(30), MAX_STATUS_BYTES) {
        Ok(Response::Status(status)) => status,
        Ok(Response::Error { code, message }) => {
            eprintln!("netsieve status: the agent refused: {code:?}: {message}");
            return EXIT_ERROR;
        }
        Ok(other) => {
            eprintln!("netsieve status: unexpected answer from the agent: {other:?}");
            return EXIT_ERROR;
        }
        Err(error) => {
            eprintln!("netsieve status: {error}");
            return EXIT_ERROR;
        }
    };
    match args.output {
        OutputFormat::Json => match serde_json::to_string_pretty(&status) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("netsieve status: encoding JSON: {error}");
                return EXIT_ERROR;
            }
        },
        OutputFormat::Text => print!("{}", status_text(&status)),
    }
    EXIT_OK
}
