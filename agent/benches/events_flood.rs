//! The cost of the verdict event path under a flood of denied packets: one node of the
//! network-namespace cluster, a pod whose ingress policy denies everything, and a pod on the
//! same node sending it UDP datagrams as fast as one thread can (sendmmsg, 5 s per case). The
//! real `netsieve agent` enforces; each case restarts it with other event settings:
//! - events off (`--events-per-second 0`);
//! - events on at the default rate limit (1000/s per CPU, burst 1000), nobody subscribed;
//! - the same with a `netsieve monitor --output json` reading every event;
//! - a rate limit high enough never to bind (1,000,000/s per CPU) with the monitor: what the
//!   limit saves.
//!
//! Measured in the flood window: packets the target's program judged (the kernel's per-program
//! run count, `BPF_ENABLE_STATS` held for the window only) and its mean run time per packet,
//! the agent's and the monitor's CPU time (/proc/PID/stat, user + system), the kernel's event
//! counters (emitted, rate limited, ring full) and the events the monitor printed. Run with
//! `cargo xtask bench` (root); touches nothing outside the namespaces it creates.
use aya::programs::SchedClassifier;
use aya::programs::tc::TcAttachType;
use netsieve_tests::netns::{Cluster, eventually, in_netns};
use netsieve_tests::seed_cluster::{Agents, agent_socket, remove_mount_root, write_atomically};
use std::io::BufRead;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const FLOOD: Duration = Duration::from_secs(5);
const BATCH: usize = 64;

/// user + system CPU ticks of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some(end) = stat.rfind(')') else { return 0 };
    let fields: Vec<&str> = stat[end + 2..].split_whitespace().collect();
    fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// (run count, run time ns) of the program attached by TCX to `interface` in `netns`.
fn program_stats(netns: &str, interface: &str, attach: TcAttachType) -> (u64, u64) {
    let interface = interface.to_string();
    let handle = in_netns(netns, move || match SchedClassifier::query_tcx(&interface, attach) {
        Ok((_, programs)) => programs
            .iter()
            .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("netsieve")))
            .map(|p| (p.run_count(), p.run_time().as_nanos() as u64))
            .fold((0, 0), |(c, t), (pc, pt)| (c + pc, t + pt)),
        Err(_) => (0, 0),
    });
    handle.ok().and_then(|h| h.join().ok()).and_then(Result::ok).unwrap_or((0, 0))
}

/// Sends 46-byte UDP payloads (64-byte frames... plus headers) from inside `netns` as fast as
/// sendmmsg goes, for `duration`; returns datagrams the kernel accepted.
fn flood(netns: &str, target: SocketAddrV4, duration: Duration) -> u64 {
    let handle = in_netns(netns, move || -> u64 {
        let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else { return 0 };
        if socket.connect(target).is_err() {
            return 0;
        }
        let mut payload = [0u8; 18];
        let mut iovecs: Vec<libc::iovec> =
            (0..BATCH).map(|_| libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() }).collect();
        // SAFETY: zeroed mmsghdr is a valid "no name, no control" header; the iovec pointers
        // stay valid for the loop (iovecs and payload outlive it).
        let mut messages: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (message, iovec) in messages.iter_mut().zip(iovecs.iter_mut()) {
            message.msg_hdr.msg_iov = iovec;
            message.msg_hdr.msg_iovlen = 1;
        }
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < duration {
            // SAFETY: the socket is open and `messages` holds BATCH initialised headers.
            let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), messages.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
            } else {
                std::thread::yield_now();
            }
        }
        sent
    });
    handle.ok().and_then(|h| h.join().ok()).and_then(Result::ok).unwrap_or(0)
}

/// The agent's event counters from `netsieve status --output json`: (emitted, rate limited,
/// ring full, read, denied packets of the target).
fn counters(binary: &Path, socket: &Path) -> (u64, u64, u64, u64, u64) {
    let output = Command::new(binary).args(["status", "--output", "json", "--socket"]).arg(socket).output();
    let Ok(output) = output else { return (0, 0, 0, 0, 0) };
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    let events = &status["events"];
    let get = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let denied = status["endpoints"]
        .as_array()
        .and_then(|list| list.iter().find(|e| e["pod"] == "target"))
        .map_or(0, |e| get(&e["ingress"]["packets"]["denied"]));
    (get(&events["emitted"]), get(&events["rate_limited"]), get(&events["ring_full"]), get(&events["read"]), denied)
}

struct Case {
    name: &'static str,
    args: &'static [&'static str],
    monitor: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let cluster = Cluster::new("flood", 1, &[("target", 0), ("sender", 0)])?;
    let dir = std::env::temp_dir().join(format!("netsieve-flood-{}", cluster.id));
    std::fs::create_dir_all(&dir)?;
    let mut pods = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for name in ["target", "sender"] {
        let ip = &cluster.pod(name).ip;
        pods.push_str(&format!(
            "- {{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}, spec: {{nodeName: node0, containers: [{{name: c, image: x}}]}}, status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}}}\n"
        ));
    }
    write_atomically(&dir.join("pods.yaml"), &pods)?;
    write_atomically(
        &dir.join("deny.yaml"),
        "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: deny-target, namespace: default}, spec: {podSelector: {matchLabels: {app: target}}, policyTypes: [Ingress]}}\n",
    )?;
    let target: SocketAddrV4 = format!("{}:9999", cluster.pod("target").ip).parse()?;
    let node_ns = cluster.nodes[0].netns.clone();
    let (target_veth, sender_veth) = (cluster.pod("target").host_veth.clone(), cluster.pod("sender").host_veth.clone());
    let socket = agent_socket(&cluster, 0);
    let cases = [
        Case { name: "events off", args: &["--events-per-second", "0"], monitor: false },
        Case { name: "events on (1000/s/CPU), no subscriber", args: &[], monitor: false },
        Case { name: "events on (1000/s/CPU), monitor reading", args: &[], monitor: true },
        Case { name: "no effective limit (1M/s/CPU), monitor", args: &["--events-per-second", "1000000", "--events-burst", "1000000"], monitor: true },
    ];
    let hz = clock_ticks();
    println!(
        "netsieve event path under a flood of denied UDP datagrams to one pod (same node, one sender thread, sendmmsg x{BATCH}), {} s per case",
        FLOOD.as_secs()
    );
    println!(
        "{:<42} {:>11} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "case", "judged pps", "ns/pkt", "sender ns", "agent %", "monitor %", "emitted", "rate-lim", "ring full", "delivered"
    );
    for case in &cases {
        let mut args = vec!["--counters-interval", "0"];
        args.extend_from_slice(case.args);
        let mut agents = Agents::start(&cluster, binary, &dir, &args)?;
        let ready = eventually(Duration::from_secs(20), || cluster.http_get(0, 9090, "/readyz").is_some_and(|(c, _)| c == 200));
        if !ready {
            eprintln!("{}: agent not ready", case.name);
            continue;
        }
        let monitor = if case.monitor {
            let mut child = Command::new(binary)
                .args(["monitor", "--output", "json", "--socket"])
                .arg(&socket)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let lines = Arc::new(AtomicU64::new(0));
            let counted = lines.clone();
            let stdout = child.stdout.take();
            let reader = std::thread::spawn(move || {
                if let Some(pipe) = stdout {
                    for line in std::io::BufReader::new(pipe).lines() {
                        if line.is_err() {
                            break;
                        }
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(500));
            Some((child, lines, reader))
        } else {
            None
        };
        // Warm up (neighbours resolved), let the token buckets refill.
        flood(&cluster.pod("sender").netns, target, Duration::from_millis(100));
        std::thread::sleep(Duration::from_secs(2));
        let agent_pid = agents.pids()[0];
        let monitor_pid = monitor.as_ref().map(|(child, _, _)| child.id());
        let before = counters(binary, &socket);
        let delivered_before = monitor.as_ref().map_or(0, |(_, lines, _)| lines.load(Ordering::Relaxed));
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
        let (prog_before, sender_before) =
            (program_stats(&node_ns, &target_veth, TcAttachType::Egress), program_stats(&node_ns, &sender_veth, TcAttachType::Ingress));
        let (agent_ticks, monitor_ticks) = (cpu_ticks(agent_pid), monitor_pid.map_or(0, cpu_ticks));
        let started = Instant::now();
        let sent = flood(&cluster.pod("sender").netns, target, FLOOD);
        let elapsed = started.elapsed().as_secs_f64();
        let (agent_after, monitor_after) = (cpu_ticks(agent_pid), monitor_pid.map_or(0, cpu_ticks));
        let (prog_after, sender_after) =
            (program_stats(&node_ns, &target_veth, TcAttachType::Egress), program_stats(&node_ns, &sender_veth, TcAttachType::Ingress));
        drop(stats);
        std::thread::sleep(Duration::from_millis(1500));
        let after = counters(binary, &socket);
        let delivered = monitor.as_ref().map_or(0, |(_, lines, _)| lines.load(Ordering::Relaxed)) - delivered_before;
        let judged = prog_after.0.saturating_sub(prog_before.0);
        let ns_per_packet = (prog_after.1.saturating_sub(prog_before.1)) as f64 / judged.max(1) as f64;
        let sender_judged = sender_after.0.saturating_sub(sender_before.0);
        let sender_ns = (sender_after.1.saturating_sub(sender_before.1)) as f64 / sender_judged.max(1) as f64;
        let percent = |ticks: u64| ticks as f64 / hz / elapsed * 100.0;
        println!(
            "{:<42} {:>11.0} {:>10.1} {:>10.1} {:>9.2} {:>9} {:>9} {:>10} {:>10} {:>10}",
            case.name,
            judged as f64 / elapsed,
            ns_per_packet,
            sender_ns,
            percent(agent_after - agent_ticks),
            monitor_pid.map_or("-".to_string(), |_| format!("{:.2}", percent(monitor_after - monitor_ticks))),
            after.0 - before.0,
            after.1 - before.1,
            after.2 - before.2,
            if case.monitor { delivered.to_string() } else { "-".to_string() }
        );
        eprintln!(
            "  {}: sent {sent} datagrams, target's program ran {judged} times, its denied counter moved {}, agent read {} events",
            case.name,
            after.4 - before.4,
            after.3 - before.3
        );
        if let Some((mut child, _, reader)) = monitor {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
        }
        agents.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    Ok(())
}
