//! Clients of an agent's node socket for the observability tests: `netsieve monitor`,
//! `status` and `explain --agent` run as the built binary, their output collected.
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_netsieve"))
}

/// A running `netsieve monitor`; its stdout lines are collected as they come. Dropping it
/// kills it.
pub struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stdout: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
}

impl Monitor {
    /// `netsieve monitor --socket SOCKET ARGS...`.
    pub fn start(socket: &Path, args: &[&str]) -> Monitor {
        let mut child = Command::new(binary())
            .arg("monitor")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("netsieve monitor starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = lines.clone();
        let stdout = child.stdout.take().map(|pipe| {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    collected.lock().expect("lines").push(line);
                }
            })
        });
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        });
        Monitor { child, lines, stdout, stderr }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Every line as JSON; panics on a line that is not one JSON object.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(value.is_object(), "not an object: {line}");
                value
            })
            .collect()
    }

    /// Waits until some event satisfies `check` (bounded by `limit`).
    pub fn wait_for(&self, limit: Duration, check: impl Fn(&serde_json::Value) -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.events().iter().any(&check) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits for the monitor to exit by itself (bounded): its status, stdout lines and stderr.
    pub fn wait_exit(mut self, limit: Duration) -> (Option<ExitStatus>, Vec<String>, String) {
        let start = Instant::now();
        let mut status = None;
        while start.elapsed() < limit {
            if let Ok(Some(exited)) = self.child.try_wait() {
                status = Some(exited);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(handle) = self.stdout.take() {
            let _ = handle.join();
        }
        let stderr = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        (status, self.lines(), stderr)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `netsieve ARGS...` to completion (bounded by the commands' own timeouts): (exit code,
/// stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary()).args(args).stdin(Stdio::null()).output().expect("netsieve runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `netsieve status --output json` of the agent on `socket`.
pub fn status(socket: &Path) -> serde_json::Value {
    try_status(socket).unwrap_or_else(|stderr| panic!("status failed: {stderr}"))
}

/// Like [`status`], for an agent that may not listen yet: its error output when it fails.
pub fn try_status(socket: &Path) -> Result<serde_json::Value, String> {
    let socket = socket.to_string_lossy().to_string();
    let (code, stdout, stderr) = run(&["status", "--socket", socket.as_str(), "--output", "json"]);
    if code != 0 {
        return Err(stderr);
    }
    Ok(serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status is not JSON ({e}): {stdout}")))
}

/// Stops the agents and returns their logs, for a failure message.
pub fn agent_logs(agents: &mut netsieve_tests::seed_cluster::Agents) -> String {
    agents.stop().into_iter().map(|(_, log)| log).collect::<Vec<_>>().join("\n----\n")
}

/// The status entry of one endpoint (`namespace/pod`).
pub fn endpoint<'a>(status: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    let (namespace, pod) = key.split_once('/').expect("namespace/pod");
    status["endpoints"]
        .as_array()
        .and_then(|list| list.iter().find(|e| e["namespace"] == namespace && e["pod"] == pod))
        .unwrap_or_else(|| panic!("no endpoint {key} in {status:#}"))
}

/// A counter of the status' event path.
pub fn event_counter(status: &serde_json::Value, name: &str) -> u64 {
    status["events"][name].as_u64().unwrap_or_else(|| panic!("no events.{name} in {status:#}"))
}

/// The drop counter of a reason and direction in a status.
pub fn drops(status: &serde_json::Value, key: &str, reason: &str, direction: &str) -> u64 {
    status[key]
        .as_array()
        .and_then(|list| list.iter().find(|d| d["reason"] == reason && d["direction"] == direction))
        .and_then(|d| d["packets"].as_u64())
        .unwrap_or(0)
}

/// Waits until the agent reports `count` event subscribers.
pub fn wait_subscribers(socket: &Path, count: u64) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if event_counter(&status(socket), "subscribers") == count {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
