//! The idle agent's CPU use: one node with two pods under a policy, `netsieve agent
//! --manifests`, nothing changing. Measured from /proc/PID/stat over 10 s once the agent is
//! ready: user + system time of the agent and of the children it waited for (the interface
//! polling of earlier versions ran `ip`/`bridge` subprocesses every 200 ms, whose time is
//! counted there), divided by the wall time. `NETSIEVE_AGENT_BINARY` measures another build the
//! same way (docs/BENCHMARKS.md compares the polling build with this one). Needs root.
use netsieve_tests::netns::{Cluster, eventually, namespaces_with_prefix};
use netsieve_tests::seed_cluster::{agent_socket, node_bpffs, remove_mount_root, write_atomically};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const METRICS_PORT: u16 = 9090;
const WINDOW: Duration = Duration::from_secs(10);

/// utime + stime + cutime + cstime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("agent running");
    // Fields after the command name, which is parenthesised and may contain spaces.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, so index 11.
    fields[11..15].iter().map(|f| f.parse::<u64>().expect("number")).sum()
}

#[test]
fn idle_agent_cpu_with_two_pods() {
    let binary = std::env::var_os("NETSIEVE_AGENT_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_netsieve")));
    let cluster = Cluster::new("idle", 1, &[("a", 0), ("b", 0)]).expect("cluster");
    let prefix = format!("nsv-{}", cluster.id);
    let dir = std::env::temp_dir().join(format!("netsieve-idle-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut pods = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for name in ["a", "b"] {
        let ip = &cluster.pod(name).ip;
        pods.push_str(&format!(
            "- {{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}, spec: {{nodeName: node0, containers: [{{name: c, image: x}}]}}, status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}}}\n"
        ));
    }
    write_atomically(&dir.join("pods.yaml"), &pods).expect("pods");
    write_atomically(
        &dir.join("policy.yaml"),
        "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: a, namespace: default}, spec: {podSelector: {matchLabels: {app: a}}, ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]}}\n",
    )
    .expect("policy");
    let bpffs = node_bpffs(&cluster, "node0");
    let socket = agent_socket(&cluster, 0).to_string_lossy().to_string();
    let mut args = vec!["agent", "--node", "node0", "--manifests", dir.to_str().expect("path"), "--bpffs", &bpffs, "--counters-interval", "0"];
    // A build from before the node socket has no --socket.
    let help = std::process::Command::new(&binary).args(["agent", "--help"]).output().expect("agent binary runs");
    if String::from_utf8_lossy(&help.stdout).contains("--socket") {
        args.extend(["--socket", &socket]);
    }
    let mut agent = cluster.spawn_on_node(0, &binary, &args).expect("agent");
    let stderr = agent.stderr.take().map(|mut pipe| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
            text
        })
    });
    let ready = eventually(Duration::from_secs(20), || cluster.http_get(0, METRICS_PORT, "/readyz").is_some_and(|(c, _)| c == 200));
    // Let start-up settle (first snapshots, attach), then measure an idle window.
    std::thread::sleep(Duration::from_secs(2));
    let pid = agent.id();
    let (ticks_before, started) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(WINDOW);
    let (ticks_after, elapsed) = (cpu_ticks(pid), started.elapsed());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = agent.wait().expect("agent exits");
    let log = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    assert!(ready, "agent never ready:\n{log}");
    assert!(status.success(), "agent did not exit cleanly:\n{log}");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let percent = (ticks_after - ticks_before) as f64 / hz / elapsed.as_secs_f64() * 100.0;
    eprintln!(
        "RESULT idle agent CPU ({}): {percent:.2}% of one CPU over {elapsed:.1?} ({} ticks at {hz} Hz)",
        binary.display(),
        ticks_after - ticks_before
    );
    if std::env::var_os("NETSIEVE_AGENT_BINARY").is_none() {
        // Without polling, an idle agent wakes only for its 200 ms tick: well under 1%.
        assert!(percent < 1.0, "idle agent uses {percent:.2}% of a CPU");
    }
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}
