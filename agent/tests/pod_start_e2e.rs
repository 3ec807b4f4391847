//! Pods starting under a policy: a two-node netns cluster, a deny policy in force in namespace
//! `isolated` before its pods exist (only UDP 7001 to and from namespace `open` allowed), and
//! new pods laid out on node0 the way the ptp CNI plugin lays them out
//! ([`Cluster::add_pod_ptp`]). A new pod starts sending at once to a server in `open` on a
//! denied (7000) and an allowed (7001) port while a client in `open` sends to the new pod on
//! both ports from before it exists; servers count what they receive, by source. Measured:
//! - without the plugin (the agent's netlink discovery alone, the Pod object with its address
//!   known beforehand, the best case): packets leaked in each direction and the time to
//!   enforcement (the highest leaked sequence number × the send interval);
//! - with `netsieve-cni` executed as a container runtime executes it (CNI environment
//!   variables, network configuration with prevResult on stdin, stdout parsed as a CNI result),
//!   the Pod object without addresses yet (as kubelet writes them after ADD): 0 leaked in
//!   either direction, and how long ADD takes;
//! - the late-Pod-object race: ADD before the Pod object exists, the object arriving within
//!   the agent's wait (ADD returns with the policy enforced) and after it (ADD returns with a
//!   fail-closed endpoint; CHECK fails until the object arrives; then the policy applies);
//! - DEL as the spec wants it (idempotent, succeeds without an agent);
//! - the node socket under malformed, oversized and unknown requests: errors, agent still
//!   running and enforcing;
//! - the same late-Pod race against the fake API server (API mode).
//!
//! Needs root; touches nothing outside the namespaces it creates.
use netsieve::node_api::{self, Request, Response};
use netsieve_tests::fake_apiserver::FakeApiServer;
use netsieve_tests::netns::{Cluster, PtpResult, UdpCounter, eventually, namespaces_with_prefix, send_udp_sequence};
use netsieve_tests::seed_cluster::{Agents, agent_socket, remove_mount_root, write_atomically};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DENIED: u16 = 7000;
const ALLOWED: u16 = 7001;
/// Datagrams each sender sends, one per [`INTERVAL`] (0.5 ms): 2 s of traffic.
const COUNT: u32 = 4000;
const INTERVAL: Duration = Duration::from_micros(500);
const METRICS_PORT: u16 = 9090;

const NAMESPACES: &str = "apiVersion: v1\nkind: List\nitems:\n\
    - {apiVersion: v1, kind: Namespace, metadata: {name: open}}\n\
    - {apiVersion: v1, kind: Namespace, metadata: {name: isolated}}\n";

/// Everything in `isolated` is denied but UDP 7001 to and from namespace `open`.
const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-7001, namespace: isolated}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: open}}}]
    ports: [{protocol: UDP, port: 7001}]
  egress:
  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: open}}}]
    ports: [{protocol: UDP, port: 7001}]
";

fn pod_yaml(name: &str, namespace: &str, node: usize, ip: Option<&str>) -> String {
    let status = match ip {
        Some(ip) => format!("{{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}"),
        None => "{phase: Pending}".to_string(),
    };
    format!(
        "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: {name}, namespace: {namespace}, labels: {{app: {name}}}}}\n  spec: {{nodeName: node{node}, containers: [{{name: c, image: x}}]}}\n  status: {status}\n"
    )
}

/// The cluster's pods in manifests form, plus `extra` Pod list items.
fn write_pods(dir: &Path, cluster: &Cluster, extra: &[String]) {
    let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for name in ["server", "client"] {
        let pod = cluster.pod(name);
        text.push_str(&pod_yaml(name, "open", pod.node, Some(&pod.ip)));
    }
    for item in extra {
        text.push_str(item);
    }
    write_atomically(&dir.join("pods.yaml"), &text).expect("pods");
}

/// Runs `netsieve-cni` as a container runtime does: in the node's network namespace, CNI
/// variables in the environment, the network configuration with prevResult on stdin.
/// Returns (exit status, stdout parsed as JSON or Null, how long it took).
fn run_plugin(cluster: &Cluster, node: usize, command: &str, pod: &str, ptp: &PtpResult, socket: &Path) -> (i32, Value, Duration) {
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "kindnet",
        "type": "netsieve-cni",
        "socket": socket,
        "prevResult": ptp.prev_result(),
    });
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &cluster.nodes[node].netns, env!("CARGO_BIN_EXE_netsieve-cni")])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{pod}"))
        .env("CNI_NETNS", &ptp.netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=isolated;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=sandbox-{pod}"))
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run netsieve-cni");
    child.stdin.take().expect("stdin").write_all(config.to_string().as_bytes()).expect("write config");
    let output = child.wait_with_output().expect("plugin output");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed = if stdout.trim().is_empty() { Value::Null } else { serde_json::from_str(&stdout).expect("stdout is JSON") };
    eprintln!("netsieve-cni {command} {pod}: exit {:?} in {elapsed:?}; stderr: {}", output.status.code(), String::from_utf8_lossy(&output.stderr).trim());
    (output.status.code().unwrap_or(-1), parsed, elapsed)
}

/// What one pod start leaked: datagrams sent at or after the moment the pod's containers
/// start (`t0`: the ptp layout finished without the plugin, ADD returned with it).
#[derive(Debug)]
struct Traffic {
    /// Datagrams of the new pod delivered on the denied / allowed port (egress).
    egress: (u64, u64),
    /// Datagrams of the client delivered to the new pod on the denied / allowed port (ingress).
    ingress: (u64, u64),
    /// The latest send time of a datagram delivered on the denied port, after `t0`, in
    /// microseconds: an upper bound of the time to enforcement (None: nothing leaked).
    enforced_within_us: Option<u64>,
}

/// A gating step between the pod's layout and its containers (the plugin's ADD).
type Gate<'a> = Box<dyn FnOnce(&mut Cluster, &PtpResult) + 'a>;

/// Starts the client sending to the new pod's address (before the pod exists), lays the pod
/// out as ptp does, and starts the pod's "containers" (servers on both ports, a sender to
/// both server ports). Without `gate`, the pod's sender starts before the host route is added
/// (so that the first moment after the layout is covered) and `t0` is when the route is in;
/// with it, `t0` is when the gate returns and the sender starts then. Counts what arrives.
fn pod_start(cluster: &mut Cluster, servers: &(Arc<UdpCounter>, Arc<UdpCounter>), name: &str, gate: Option<Gate<'_>>) -> (Traffic, PtpResult) {
    let base = Instant::now();
    let pod_ip = cluster.next_pod_ip(0);
    let client_ns = cluster.pod("client").netns.clone();
    let targets = [DENIED, ALLOWED].map(|port| SocketAddr::new(pod_ip.parse().expect("ip"), port));
    let mut senders: Vec<_> = targets.iter().map(|t| send_udp_sequence(&client_ns, *t, COUNT, INTERVAL, base).expect("client")).collect();
    let ptp = cluster.add_pod_ptp_without_host_route(name, 0).expect("pod");
    let inbound = [DENIED, ALLOWED].map(|port| cluster.serve_udp_counter(name, port).expect("pod server"));
    let server_ip: std::net::IpAddr = cluster.pod("server").ip.parse().expect("ip");
    let pod_ns = ptp.pod.netns.clone();
    let start_pod = |senders: &mut Vec<_>| {
        for port in [DENIED, ALLOWED] {
            senders.push(send_udp_sequence(&pod_ns, SocketAddr::new(server_ip, port), COUNT, INTERVAL, base).expect("pod sender"));
        }
    };
    let t0 = match gate {
        None => {
            start_pod(&mut senders);
            cluster.add_host_route(&ptp).expect("host route");
            base.elapsed().as_micros() as u64
        }
        Some(gate) => {
            cluster.add_host_route(&ptp).expect("host route");
            gate(cluster, &ptp);
            let t0 = base.elapsed().as_micros() as u64;
            start_pod(&mut senders);
            t0
        }
    };
    for handle in senders {
        handle.join().expect("sender").expect("netns");
    }
    std::thread::sleep(Duration::from_millis(200));
    let client_ip = cluster.pod("client").ip.clone();
    let since = |counter: &UdpCounter, source: &str| counter.sent_since(source, t0).unwrap_or((0, 0));
    let (egress_denied, egress_last) = since(&servers.0, &pod_ip);
    let (ingress_denied, ingress_last) = since(&inbound[0], &client_ip);
    let enforced_within_us = (egress_denied + ingress_denied > 0).then(|| egress_last.max(ingress_last).saturating_sub(t0));
    let traffic = Traffic {
        egress: (egress_denied, since(&servers.1, &pod_ip).0),
        ingress: (ingress_denied, since(&inbound[1], &client_ip).0),
        enforced_within_us,
    };
    (traffic, ptp)
}

/// A cluster with `server` and `client` in namespace `open` on node1, agents on both nodes.
fn setup(tag: &str, agent_args: &[&str]) -> (Cluster, PathBuf, Agents, (Arc<UdpCounter>, Arc<UdpCounter>)) {
    let mut cluster = Cluster::new(tag, 2, &[("server", 1), ("client", 1)]).expect("cluster");
    let servers = (cluster.serve_udp_counter("server", DENIED).expect("server"), cluster.serve_udp_counter("server", ALLOWED).expect("server"));
    let dir = std::env::temp_dir().join(format!("netsieve-podstart-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("dir");
    write_atomically(&dir.join("namespaces.yaml"), NAMESPACES).expect("namespaces");
    write_atomically(&dir.join("policy.yaml"), POLICY).expect("policy");
    let nodes: String = cluster
        .nodes
        .iter()
        .map(|n| format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n", n.name, n.ip))
        .collect();
    write_atomically(&dir.join("nodes.yaml"), &nodes).expect("nodes");
    write_pods(&dir, &cluster, &[]);
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let mut args = vec!["--counters-interval", "0"];
    args.extend_from_slice(agent_args);
    let agents = Agents::start(&cluster, binary, &dir, &args).expect("agents");
    for node in 0..2 {
        assert!(
            eventually(Duration::from_secs(20), || cluster.http_get(node, METRICS_PORT, "/readyz").is_some_and(|(c, _)| c == 200)),
            "agent on node{node} not ready"
        );
    }
    (cluster, dir, agents, servers)
}

#[test]
fn pods_are_enforced_from_their_first_packet_with_the_plugin() {
    let (mut cluster, dir, mut agents, servers) = setup("podstart", &["--cni-pod-wait-ms", "1500"]);
    let prefix = format!("nsv-{}", cluster.id);
    let socket = agent_socket(&cluster, 0);
    let mut extra: Vec<String> = Vec::new();

    // 1. Without the plugin: netlink discovery alone; the Pod object with its address is known
    //    before the interface appears (the best case for discovery).
    extra.push(pod_yaml("netlink-only", "isolated", 0, Some(&cluster.next_pod_ip(0))));
    write_pods(&dir, &cluster, &extra);
    std::thread::sleep(Duration::from_millis(800));
    let (netlink, _) = pod_start(&mut cluster, &servers, "netlink-only", None);
    eprintln!(
        "RESULT without plugin (netlink only): leaked egress {} ingress {}; time to enforcement {}; {netlink:?}",
        netlink.egress.0,
        netlink.ingress.0,
        match netlink.enforced_within_us {
            Some(us) => format!("<= {:.1} ms after the layout", us as f64 / 1000.0),
            None => format!("before the first datagram after the layout (< {INTERVAL:?})"),
        }
    );
    assert!(netlink.egress.1 > 0 && netlink.ingress.1 > 0, "allowed traffic flows: {netlink:?}");

    // 2. With the plugin: the Pod object has no address yet (kubelet writes it after ADD).
    extra.push(pod_yaml("with-plugin", "isolated", 0, None));
    write_pods(&dir, &cluster, &extra);
    std::thread::sleep(Duration::from_millis(800));
    let mut add_times = Vec::new();
    let (plugin, ptp_b) = pod_start(
        &mut cluster,
        &servers,
        "with-plugin",
        Some(Box::new(|cluster: &mut Cluster, ptp: &PtpResult| {
            let (status, result, elapsed) = run_plugin(cluster, 0, "ADD", "with-plugin", ptp, &socket);
            assert_eq!(status, 0, "ADD failed: {result}");
            assert_eq!(result, ptp.prev_result(), "ADD passes prevResult through");
            add_times.push(elapsed);
        })),
    );
    eprintln!("RESULT with plugin: {plugin:?}; ADD took {add_times:?}");
    assert_eq!((plugin.egress.0, plugin.ingress.0), (0, 0), "with the plugin nothing leaks: {plugin:?}");
    assert!(plugin.egress.1 > 0 && plugin.ingress.1 > 0, "allowed traffic flows: {plugin:?}");
    // The kubelet writes the pod's address afterwards: nothing changes.
    extra.pop();
    extra.push(pod_yaml("with-plugin", "isolated", 0, Some(&ptp_b.pod.ip)));
    write_pods(&dir, &cluster, &extra);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(run_plugin(&cluster, 0, "CHECK", "with-plugin", &ptp_b, &socket).0, 0, "CHECK with the Pod's own address");

    // 3. Late Pod object, arriving within the agent's wait: ADD returns once it is enforced.
    let mut with_late = extra.clone();
    with_late.push(pod_yaml("late-pod", "isolated", 0, None));
    let (late_within, _) = pod_start(
        &mut cluster,
        &servers,
        "late-pod",
        Some(Box::new(|cluster: &mut Cluster, ptp: &PtpResult| {
            let (dir, mut text) = (dir.clone(), String::from("apiVersion: v1\nkind: List\nitems:\n"));
            for name in ["server", "client"] {
                let pod = cluster.pod(name);
                text.push_str(&pod_yaml(name, "open", pod.node, Some(&pod.ip)));
            }
            for item in &with_late {
                text.push_str(item);
            }
            let writer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                write_atomically(&dir.join("pods.yaml"), &text).expect("pods");
            });
            let (status, result, elapsed) = run_plugin(cluster, 0, "ADD", "late-pod", ptp, &socket);
            writer.join().expect("writer");
            assert_eq!(status, 0, "ADD failed: {result}");
            eprintln!("RESULT late Pod object (written 300 ms after ADD started): ADD took {elapsed:?}");
            let (status, result, _) = run_plugin(cluster, 0, "CHECK", "late-pod", ptp, &socket);
            assert_eq!((status, result), (0, Value::Null), "CHECK after the Pod object arrived");
        })),
    );
    extra.push(pod_yaml("late-pod", "isolated", 0, None));
    eprintln!("RESULT late Pod within the wait: {late_within:?}");
    assert_eq!((late_within.egress.0, late_within.ingress.0), (0, 0), "{late_within:?}");
    assert!(late_within.egress.1 > 0 && late_within.ingress.1 > 0, "policy, not fail-closed: {late_within:?}");

    // 4. Late Pod object, arriving after the wait: ADD returns with a fail-closed endpoint:
    //    nothing passes, not even what the policy allows; CHECK fails; then the object comes.
    let (fail_closed, ptp_d) = pod_start(
        &mut cluster,
        &servers,
        "very-late",
        Some(Box::new(|cluster: &mut Cluster, ptp: &PtpResult| {
            let (status, result, elapsed) = run_plugin(cluster, 0, "ADD", "very-late", ptp, &socket);
            assert_eq!(status, 0, "ADD failed: {result}");
            assert!(elapsed >= Duration::from_millis(1400), "ADD waited for the Pod object ({elapsed:?})");
            eprintln!("RESULT Pod object unknown: ADD returned fail-closed after {elapsed:?}");
            let (status, result, _) = run_plugin(cluster, 0, "CHECK", "very-late", ptp, &socket);
            assert_eq!(status, 1, "CHECK fails while fail-closed");
            assert_eq!(result["code"], json!(101), "{result}");
        })),
    );
    eprintln!("RESULT fail-closed pod: {fail_closed:?}");
    assert_eq!(fail_closed.egress, (0, 0), "fail-closed drops everything: {fail_closed:?}");
    assert_eq!(fail_closed.ingress, (0, 0), "fail-closed drops everything: {fail_closed:?}");
    extra.push(pod_yaml("very-late", "isolated", 0, None));
    write_pods(&dir, &cluster, &extra);
    assert!(
        eventually(Duration::from_secs(3), || run_plugin(&cluster, 0, "CHECK", "very-late", &ptp_d, &socket).0 == 0),
        "the Pod object arrived: CHECK passes"
    );
    // Now the policy applies: the allowed port is reached, the denied one still not.
    let server_ip: std::net::IpAddr = cluster.pod("server").ip.parse().expect("ip");
    let ip_d = ptp_d.pod.ip.clone();
    let later = Instant::now();
    for port in [DENIED, ALLOWED] {
        send_udp_sequence(&ptp_d.pod.netns, SocketAddr::new(server_ip, port), 50, INTERVAL, later).expect("send").join().expect("join").expect("netns");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(servers.0.from(&ip_d).0, 0, "denied port after the Pod object arrived");
    assert!(servers.1.from(&ip_d).0 > 0, "allowed port after the Pod object arrived");

    // 5. DEL: forgets the sandbox; again succeeds; without an agent succeeds.
    let (status, result, _) = run_plugin(&cluster, 0, "DEL", "very-late", &ptp_d, &socket);
    assert_eq!((status, result), (0, Value::Null));
    let (status, _, _) = run_plugin(&cluster, 0, "DEL", "very-late", &ptp_d, &socket);
    assert_eq!(status, 0, "DEL is idempotent");
    cluster.remove_pod("very-late").expect("remove");

    // 6. The socket under bad input: errors, and the agent keeps running and enforcing.
    socket_abuse(&cluster, &socket, &ptp_b.pod.ip, &servers);

    let outputs = agents.stop();
    for (success, stderr) in &outputs {
        assert!(*success, "agent did not exit cleanly:\n{stderr}");
    }
    let (status, _, _) = run_plugin(&cluster, 0, "DEL", "with-plugin", &ptp_from(&cluster, "with-plugin"), &socket);
    assert_eq!(status, 0, "DEL succeeds without an agent");
    let (status, result, _) = run_plugin(&cluster, 0, "ADD", "with-plugin", &ptp_from(&cluster, "with-plugin"), &socket);
    assert_eq!((status, result["code"].clone()), (1, json!(11)), "ADD fails (try again later) without an agent");

    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}

/// A prevResult for an existing pod (for DEL/ADD without a layout step).
fn ptp_from(cluster: &Cluster, name: &str) -> PtpResult {
    let pod = cluster.pod(name).clone();
    PtpResult { netns_path: format!("/run/netns/{}", pod.netns), host_mac: "00:00:00:00:00:00".into(), container_mac: "00:00:00:00:00:00".into(), pod }
}

/// Sends raw bytes on a fresh connection and reads one response line (None: closed without
/// an answer).
fn raw_exchange(socket: &Path, bytes: &[u8]) -> Option<Value> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.len() < 1 << 20 {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => answer.push(byte[0]),
            _ => break,
        }
    }
    (!answer.is_empty()).then(|| serde_json::from_slice(&answer).expect("answer is JSON"))
}

fn socket_abuse(cluster: &Cluster, socket: &Path, enforced_ip: &str, servers: &(Arc<UdpCounter>, Arc<UdpCounter>)) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket is root-only");
    let dir_mode = std::fs::metadata(socket.parent().expect("dir")).expect("dir").permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "socket directory is root-only");
    let code = |answer: Option<Value>| answer.map(|a| a["response"]["code"].clone()).unwrap_or(Value::Null);
    assert_eq!(code(raw_exchange(socket, b"{this is not json\n")), json!("malformed"));
    assert_eq!(code(raw_exchange(socket, b"[1,2,3]\n")), json!("malformed"));
    assert_eq!(code(raw_exchange(socket, b"{\"version\":1,\"request\":{\"type\":\"delete_everything\"}}\n")), json!("unknown_request"));
    assert_eq!(code(raw_exchange(socket, b"{\"version\":99,\"request\":{\"type\":\"ping\"}}\n")), json!("unsupported_version"));
    let bad_pod = b"{\"version\":1,\"request\":{\"type\":\"cni_add\",\"pod\":{\"namespace\":\"../etc\",\"name\":\"x\"},\"container_id\":\"c\",\"host_interfaces\":[\"lo\"],\"ips\":[\"10.0.0.1\"]}}\n";
    assert_eq!(code(raw_exchange(socket, bad_pod)), json!("invalid"));
    let no_interface = b"{\"version\":1,\"request\":{\"type\":\"cni_add\",\"pod\":{\"namespace\":\"isolated\",\"name\":\"ghost\"},\"container_id\":\"c\",\"host_interfaces\":[\"nosuchif0\"],\"ips\":[\"10.250.0.250\"]}}\n";
    assert_eq!(code(raw_exchange(socket, no_interface)), json!("no_interface"));
    let mut huge = vec![b'x'; 70 * 1024];
    huge.push(b'\n');
    assert_eq!(code(raw_exchange(socket, &huge)), json!("too_large"));
    let binary: Vec<u8> = (0..=255u8).chain(std::iter::once(b'\n')).collect();
    assert_eq!(code(raw_exchange(socket, &binary)), json!("malformed"));
    // Many connections at once: some are served, the rest refused, none crash the agent.
    let held: Vec<_> = (0..48).filter_map(|_| std::os::unix::net::UnixStream::connect(socket).ok()).collect();
    drop(held);
    // Still there, still enforcing: a ping is answered, the enforced pod's denied port still
    // receives nothing from the client.
    // (Held connections release their slots as the server sees them close: retry, as the
    // `unavailable` error tells clients to.)
    assert!(
        eventually(Duration::from_secs(3), || matches!(
            node_api::call(socket, Request::Ping, Duration::from_secs(5)),
            Ok(Response::Pong { ref node, .. }) if node == "node0"
        )),
        "the agent answers after the connection flood"
    );
    let before = servers.0.from(enforced_ip).0;
    let pod = cluster.pods.iter().find(|p| p.ip == enforced_ip).expect("enforced pod");
    let server_ip = cluster.pod("server").ip.clone();
    send_udp_sequence(&pod.netns, SocketAddr::new(server_ip.parse().expect("ip"), DENIED), 50, INTERVAL, Instant::now())
        .expect("send")
        .join()
        .expect("join")
        .expect("netns");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(servers.0.from(enforced_ip).0, before, "still enforcing after the bad requests");
    assert!(cluster.http_get(0, METRICS_PORT, "/readyz").is_some_and(|(c, _)| c == 200), "still ready");
}

#[test]
fn late_pod_object_from_the_api_server() {
    let mut cluster = Cluster::new("cniapi", 2, &[("server", 1), ("client", 1)]).expect("cluster");
    let prefix = format!("nsv-{}", cluster.id);
    let servers = (cluster.serve_udp_counter("server", DENIED).expect("server"), cluster.serve_udp_counter("server", ALLOWED).expect("server"));
    let listeners = cluster.node_loopback_listeners().expect("API server listeners");
    let api = FakeApiServer::start(listeners).expect("api server");
    let yaml = |text: &str| -> Value { serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(text).expect("yaml")).expect("json") };
    for ns in ["open", "isolated"] {
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}));
    }
    api.apply(yaml(POLICY));
    let pod_object = |name: &str, namespace: &str, node: usize, ip: Option<&str>| -> Value {
        let status = match ip {
            Some(ip) => json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}),
            None => json!({"phase": "Pending"}),
        };
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
               "spec": {"nodeName": format!("node{node}"), "containers": [{"name": "c", "image": "x"}]}, "status": status})
    };
    for name in ["server", "client"] {
        let pod = cluster.pod(name).clone();
        api.apply(pod_object(name, "open", pod.node, Some(&pod.ip)));
    }
    let dir = std::env::temp_dir().join(format!("netsieve-cniapi-{}", cluster.id));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfigs = api.write_kubeconfigs(&dir).expect("kubeconfigs");
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let mut agents = Agents::against_api(&cluster, binary, &kubeconfigs, &["--counters-interval", "0", "--cni-pod-wait-ms", "1000"])
    .expect("agents");
    for node in 0..2 {
        assert!(
            eventually(Duration::from_secs(20), || cluster.http_get(node, METRICS_PORT, "/readyz").is_some_and(|(c, _)| c == 200)),
            "agent on node{node} not ready"
        );
    }
    let socket = agent_socket(&cluster, 0);
    // The Pod object reaches the API server (and the agent) only after ADD returned: ADD
    // answers with a fail-closed endpoint after its wait; then the object comes, without an
    // address (kubelet has not written it), and the agent enforces it with the CNI's.
    let (traffic, ptp) = pod_start(
        &mut cluster,
        &servers,
        "api-late",
        Some(Box::new(|cluster: &mut Cluster, ptp: &PtpResult| {
            let (status, out, elapsed) = run_plugin(cluster, 0, "ADD", "api-late", ptp, &socket);
            assert_eq!(status, 0, "ADD failed: {out}");
            eprintln!("RESULT API mode, Pod object after ADD: ADD returned fail-closed after {elapsed:?}");
            api.apply(pod_object("api-late", "isolated", 0, None));
        })),
    );
    eprintln!("RESULT API mode late Pod: {traffic:?}");
    assert_eq!((traffic.egress.0, traffic.ingress.0), (0, 0), "nothing leaks: {traffic:?}");
    assert!(traffic.egress.1 > 0 && traffic.ingress.1 > 0, "the policy applies once the object is known: {traffic:?}");
    let (status, _, _) = run_plugin(&cluster, 0, "CHECK", "api-late", &ptp, &socket);
    assert_eq!(status, 0, "CHECK passes once the Pod object is known");
    // The kubelet writes the address: still enforced, CHECK still passes.
    api.apply(pod_object("api-late", "isolated", 0, Some(&ptp.pod.ip)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(run_plugin(&cluster, 0, "CHECK", "api-late", &ptp, &socket).0, 0);
    let outputs = agents.stop();
    for (success, stderr) in &outputs {
        assert!(*success, "agent did not exit cleanly:\n{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    remove_mount_root(&cluster);
    drop(cluster);
    assert!(namespaces_with_prefix(&prefix).is_empty(), "namespaces left behind");
}
