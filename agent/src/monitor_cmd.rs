//! `netsieve monitor`: the verdict events of the local agent as they happen, one line each
//! (text for people, JSON objects for tools), filtered by the agent.
use crate::explain_cmd::OutputFormat;
use crate::node_api::observe::{EventDirection, EventFilter, EventSubscription, EventVerdict};
use crate::node_api::{DEFAULT_SOCKET, EventStream, Response};
use crate::observe::render::event_line;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Exit status when the stream ended normally (the agent went away, `--count` reached).
pub const EXIT_OK: u8 = 0;
/// Exit status when the agent could not be reached or refused.
pub const EXIT_ERROR: u8 = 2;

#[derive(Clone, Debug, clap::Args)]
pub struct MonitorArgs {
    /// The agent's node socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// `text`: one line per event for people; `json`: one JSON object per line.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Only flows with a pod of this namespace at either end.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only flows with this pod at either end: NAME (in `--namespace` if given, else any) or
    /// NAMESPACE/NAME.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only these verdicts (repeat the flag for several).
    #[arg(long, value_enum)]
    pub verdict: Vec<EventVerdict>,
    /// Only this direction, from the enforced pod's side.
    #[arg(long, value_enum)]
    pub direction: Option<EventDirection>,
    /// Only these reasons (repeatable): policy_denied, spoofed, malformed, no_endpoint,
    /// fragment_unknown, map_full; for allowed flows rule, not_isolated, exception.
    #[arg(long)]
    pub reason: Vec<String>,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

impl MonitorArgs {
    pub fn filter(&self) -> EventFilter {
        EventFilter {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            verdicts: self.verdict.clone(),
            direction: self.direction,
            reasons: self.reason.clone(),
        }
    }
}

/// Runs the command and returns its exit status.
pub fn run(args: &MonitorArgs) -> u8 {
    let subscription = EventSubscription { filter: args.filter() };
    let (mut stream, first) = match EventStream::open(&args.socket, subscription, Duration::from_secs(10)) {
        Ok(opened) => opened,
        Err(error) => {
            eprintln!("netsieve monitor: {error}");
            return EXIT_ERROR;
        }
    };
    match first {
        Response::Subscribed { node, settings } => {
            let rate = if settings.per_second == 0 {
                "events are OFF on this agent (--events-per-second 0): nothing will be shown".to_string()
            } else {
                format!(
                    "up to {}/s per CPU (burst {}), allowed flows {}",
                    settings.per_second,
                    settings.burst,
                    if settings.allowed_flows { "on" } else { "off (agent --events-allowed)" }
                )
            };
            eprintln!("netsieve monitor: node {node}, {rate}");
        }
        Response::Error { code, message } => {
            eprintln!("netsieve monitor: the agent refused: {code:?}: {message}");
            return EXIT_ERROR;
        }
        other => {
            eprintln!("netsieve monitor: unexpected answer from the agent: {other:?}");
            return EXIT_ERROR;
        }
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut shown: u64 = 0;
    loop {
        if args.count.is_some_and(|count| shown >= count) {
            return EXIT_OK;
        }
        let line = match stream.next_response() {
            Ok(Some(Response::Event(event))) => {
                shown += 1;
                match args.output {
                    OutputFormat::Json => match serde_json::to_string(&event) {
                        Ok(json) => json,
                        Err(error) => {
                            eprintln!("netsieve monitor: encoding an event: {error}");
                            continue;
                        }
                    },
                    OutputFormat::Text => event_line(&event),
                }
            }
            Ok(Some(Response::Lost { events })) => {
                eprintln!("netsieve monitor: {events} events lost: this monitor did not read fast enough");
                continue;
            }
            Ok(Some(other)) => {
                eprintln!("netsieve monitor: unexpected line from the agent: {other:?}");
                continue;
            }
            Ok(None) => {
                eprintln!("netsieve monitor: the agent closed the stream (it stopped); {shown} events shown");
                return EXIT_OK;
            }
            Err(error) => {
                eprintln!("netsieve monitor: the stream ended: {error}; {shown} events shown");
                return EXIT_OK;
            }
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // Whoever read our output is gone (`| head`): nothing left to do.
            return EXIT_OK;
        }
    }
}
