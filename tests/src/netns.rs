//! A kindnet-like cluster made of network namespaces, for end-to-end tests.
//!
//! Nodes are namespaces joined by one veth "wire"; each pod is a namespace with a veth pair
//! whose host side sits in its node's namespace with a /32 route to the pod, and whose pod side
//! (`eth0`) routes everything via a link-local gateway address held by the host side, as
//! kindnet's ptp plugin lays it out. Every link is created directly inside its namespaces, so nothing ever
//! appears in the machine's own namespace, and all addresses exist only inside these
//! namespaces. Dropping the [`Cluster`] deletes every namespace it made (which removes the
//! links), also when a test panics; [`cleanup_stale`] removes leftovers of killed runs.
use crate::dns::{self, DnsQuestion};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Prefix of every namespace this harness creates.
pub const PREFIX: &str = "nsv";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("`{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("entering network namespace {name}: {source}")]
    Enter { name: String, source: std::io::Error },
}

/// Runs `ip ARGS...` (optionally inside a namespace) and fails on a non-zero exit.
pub fn ip(netns: Option<&str>, args: &[&str]) -> Result<(), NetnsError> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["netns", "exec", ns, "ip"]);
    }
    cmd.args(args);
    run(cmd)
}

fn run(mut cmd: Command) -> Result<(), NetnsError> {
    let command = format!("{cmd:?}");
    let output = cmd.stdin(Stdio::null()).output().map_err(|source| NetnsError::Spawn { command: command.clone(), source })?;
    if !output.status.success() {
        return Err(NetnsError::Command { command, stderr: String::from_utf8_lossy(&output.stderr).trim().into() });
    }
    Ok(())
}

/// Runs `program ARGS...` inside network namespace `netns`, feeding it `stdin`; its stdout, or
/// an error with its stderr when it fails.
pub fn run_in(netns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetnsError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, program]).args(args);
    let command = format!("{cmd:?}");
    let spawn = |source| NetnsError::Spawn { command: command.clone(), source };
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn)?;
    }
    let output = child.wait_with_output().map_err(spawn)?;
    if !output.status.success() {
        return Err(NetnsError::Command { command, stderr: String::from_utf8_lossy(&output.stderr).trim().into() });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn sysctl(netns: &str, setting: &str) -> Result<(), NetnsError> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "sysctl", "-qw", setting]);
    run(cmd)
}

/// The next source port of a UDP probe: a process-wide counter over 20000..30000, below the
/// kernel's ephemeral range.
static NEXT_PROBE_PORT: AtomicU16 = AtomicU16::new(PROBE_PORTS.start);
const PROBE_PORTS: std::ops::Range<u16> = 20000..30000;

/// A UDP socket for one probe, bound to a source port no earlier probe of this process used
/// (until the counter wraps). A probe from an ephemeral port may reuse the address and port
/// pair of an earlier probe to the same target whose conntrack entry still lives (30 s
/// unreplied, 120 s assured): the datagram then rides the earlier translation, no DNAT rule
/// counts it, and the kube-proxy emulation's check that every answered probe was translated
/// fails (seen once in a run of `.ci/run`: "coredns-2 answered, but no DNAT rule counted the connection").
/// Ports in use (a server of the pod) are skipped; after 64 the kernel picks one.
pub fn udp_probe_socket(ipv4: bool) -> std::io::Result<UdpSocket> {
    for _ in 0..64 {
        let offset = NEXT_PROBE_PORT.fetch_add(1, Ordering::Relaxed).wrapping_sub(PROBE_PORTS.start) % PROBE_PORTS.len() as u16;
        let port = PROBE_PORTS.start + offset;
        let local: SocketAddr = if ipv4 { (Ipv4Addr::UNSPECIFIED, port).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, port).into() };
        if let Ok(socket) = UdpSocket::bind(local) {
            return Ok(socket);
        }
    }
    UdpSocket::bind(if ipv4 { "0.0.0.0:0" } else { "[::]:0" })
}

/// Runs `f` on a new thread inside network namespace `netns`; sockets it creates belong to
/// that namespace. Only that thread changes namespace.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<Result<T, NetnsError>>, NetnsError> {
    let path = format!("/run/netns/{netns}");
    let name = netns.to_string();
    let file = std::fs::File::open(&path).map_err(|source| NetnsError::Enter { name: name.clone(), source })?;
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace fd we own.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetnsError::Enter { name, source: std::io::Error::last_os_error() });
        }
        Ok(f())
    }))
}

/// A layer-4 protocol of a server, a container port or a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    Tcp,
    Udp,
    /// Needs the kernel's SCTP stack for sockets ([`sctp_supported`]); netfilter's SCTP
    /// conntrack and match work without it.
    Sctp,
}

impl Transport {
    /// As Kubernetes spells it (`protocol: TCP`).
    pub fn kubernetes_name(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
            Transport::Sctp => "SCTP",
        }
    }

    /// As iptables and nftables spell it (`-p tcp`, `meta l4proto tcp`).
    pub fn netfilter_name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
            Transport::Sctp => "sctp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kubernetes_name())
    }
}

/// A port a pod's container declares (`spec.containers[].ports[]`): what a named targetPort
/// of a Service or a named port of a NetworkPolicy resolves against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: String,
    pub transport: Transport,
    pub port: u16,
}

/// What a pod's server speaks, so a probe knows what to send to a port behind a ClusterIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// TCP: answers every connection with `ok <pod name>\n`.
    Tcp,
    /// UDP: echoes every datagram followed by ` <pod name>`.
    UdpEcho,
    /// DNS over UDP or TCP ([`crate::dns`]): `CH TXT hostname.bind.` names the pod.
    Dns(Transport),
    /// SCTP (a one-to-one style socket, which behaves like TCP's): answers every association
    /// with `ok <pod name>\n`.
    Sctp,
}

impl Server {
    pub fn transport(self) -> Transport {
        match self {
            Server::Tcp => Transport::Tcp,
            Server::UdpEcho => Transport::Udp,
            Server::Sctp => Transport::Sctp,
            Server::Dns(transport) => transport,
        }
    }
}

/// An SCTP socket of the family of `addr` (one-to-one style: `SOCK_STREAM`, `IPPROTO_SCTP`).
fn sctp_socket(addr: &SocketAddr) -> std::io::Result<socket2::Socket> {
    socket2::Socket::new(socket2::Domain::for_address(*addr), socket2::Type::STREAM, Some(socket2::Protocol::from(libc::IPPROTO_SCTP)))
}

/// Whether this kernel can open SCTP sockets; the error says why not. Kernels built without
/// `CONFIG_IP_SCTP` (or without the `sctp` module loaded) answer `EPROTONOSUPPORT`. SCTP is
/// not per network namespace, so asking from the test's own namespace is enough.
pub fn sctp_supported() -> Result<(), String> {
    match sctp_socket(&SocketAddr::from(([127, 0, 0, 1], 0))) {
        Ok(_) => Ok(()),
        Err(error) => {
            let config = kernel_config_line("CONFIG_IP_SCTP").unwrap_or_else(|| "CONFIG_IP_SCTP: /proc/config.gz not readable".into());
            Err(format!("socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {error}; {config}"))
        }
    }
}

/// The line of the running kernel's configuration (`/proc/config.gz`, read with `zcat`) that
/// sets `option`, or says it is not set.
fn kernel_config_line(option: &str) -> Option<String> {
    let output = Command::new("zcat").arg("/proc/config.gz").stdin(Stdio::null()).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let found = text.lines().find(|l| l.starts_with(&format!("{option}=")) || *l == format!("# {option} is not set"));
    Some(found.map_or_else(|| format!("{option} absent from /proc/config.gz"), str::to_string))
}

/// A server's answer to [`Cluster::ask`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The client's address and port (to find the connection in conntrack).
    pub local: SocketAddr,
    /// The pod that says it answered.
    pub pod: String,
}

/// A pod of the cluster.
#[derive(Clone, Debug)]
pub struct PodNet {
    pub name: String,
    pub netns: String,
    pub node: usize,
    pub ip: String,
    /// IPv6 address, on dual-stack clusters.
    pub ip6: Option<String>,
    /// Host-side veth, in the node's namespace.
    pub host_veth: String,
    /// Declared container ports ([`Cluster::declare_port`]).
    pub container_ports: Vec<ContainerPort>,
}

/// A node of the cluster.
#[derive(Clone, Debug)]
pub struct NodeNet {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub pod_cidr: String,
}

/// The whole cluster; deleting it removes everything it created.
/// The payloads a [`Cluster::record_udp`] server received.
#[derive(Clone, Default)]
pub struct UdpPayloads(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl UdpPayloads {
    /// How many payloads received so far start with `prefix`.
    pub fn count_prefixed(&self, prefix: &str) -> usize {
        self.0.lock().map_or(0, |list| list.iter().filter(|p| p.starts_with(prefix.as_bytes())).count())
    }
}

pub struct Cluster {
    pub id: String,
    pub nodes: Vec<NodeNet>,
    pub pods: Vec<PodNet>,
    /// Services of the cluster ([`Cluster::add_service`]); kube-proxy emulations program them.
    pub services: Vec<crate::kube_proxy::Service>,
    /// Whether the nodes are laid out like the CNI bridge plugin ([`Cluster::new_bridged`]).
    pub bridged: bool,
    namespaces: Vec<String>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<Result<(), NetnsError>>>,
    /// The run id hashed into link names.
    short: String,
    dual_stack: bool,
    /// Pods created over the cluster's life (names and addresses are never reused).
    pods_created: usize,
    pods_created_on_node: Vec<usize>,
    /// What each (pod, port, transport) serves, and how many connections or datagrams it took.
    served: HashMap<(String, u16, Transport), (Server, Arc<AtomicU64>)>,
}

/// Deletes namespaces left by earlier runs that were killed before their cleanup ran.
pub fn cleanup_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else { continue };
        // Only namespaces of dead test processes: the id starts with the creating pid.
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = ip(None, &["netns", "del", name]);
        }
    }
}

/// Namespaces whose names start with this run's id (to check cleanup).
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else { return Vec::new() };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

impl Cluster {
    /// Builds `nodes` nodes; `pods` lists (pod name, node index). Pod k of node i gets
    /// 10.250.i.(10+k); node i gets 172.31.250.(1+i) on the wire.
    pub fn new(tag: &str, nodes: usize, pods: &[(&str, usize)]) -> Result<Cluster, NetnsError> {
        Cluster::build(tag, nodes, pods, false, false)
    }

    /// Like [`Cluster::new`], but laid out like the CNI bridge plugin (flannel's cni0): each
    /// node has a bridge `br0` holding 10.250.i.1/24, pods' host-side veths are its ports, pods
    /// have /24 addresses with the bridge as their gateway, and there are no per-pod routes.
    pub fn new_bridged(tag: &str, nodes: usize, pods: &[(&str, usize)]) -> Result<Cluster, NetnsError> {
        Cluster::build(tag, nodes, pods, true, false)
    }

    /// Like [`Cluster::new`], dual-stack: pod k of node i also gets fd00:250:i::(10+k)/128
    /// (gateway fe80::1 on the host-side veth), nodes fd00:31:250::(1+i) on the wire. Duplicate
    /// address detection is off in every namespace, so addresses are usable at once.
    pub fn new_dual_stack(tag: &str, nodes: usize, pods: &[(&str, usize)]) -> Result<Cluster, NetnsError> {
        Cluster::build(tag, nodes, pods, false, true)
    }

    fn build(tag: &str, nodes: usize, pods: &[(&str, usize)], bridged: bool, v6: bool) -> Result<Cluster, NetnsError> {
        cleanup_stale();
        let id = format!("{}-{tag}", std::process::id());
        let mut cluster = Cluster {
            id: id.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            bridged,
            namespaces: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            // Short unique link names (15 characters max): the run id hashed to 6 hex digits.
            short: format!("{:06x}", fnv(&id) & 0xff_ffff),
            dual_stack: v6,
            pods_created: pods.len(),
            pods_created_on_node: (0..nodes).map(|n| pods.iter().filter(|p| p.1 == n).count()).collect(),
            served: HashMap::new(),
        };
        let short = cluster.short.clone();
        for i in 0..nodes {
            let netns = format!("{PREFIX}-{id}-n{i}");
            ip(None, &["netns", "add", &netns])?;
            cluster.namespaces.push(netns.clone());
            ip(Some(&netns), &["link", "set", "lo", "up"])?;
            sysctl(&netns, "net.ipv4.ip_forward=1")?;
            if v6 {
                sysctl(&netns, "net.ipv6.conf.all.forwarding=1")?;
                sysctl(&netns, "net.ipv6.conf.all.accept_dad=0")?;
                sysctl(&netns, "net.ipv6.conf.default.accept_dad=0")?;
            }
            if bridged {
                // Bridged traffic (a pod's reply to a pod on the same bridge) must pass the IP
                // hooks, or a Service's reply to a same-node client skips conntrack's reverse
                // translation and reaches the client from the backend's address: kube-proxy
                // needs br_netfilter, and kubeadm's preflight insists on this setting. It is
                // per network namespace since Linux 5.3, so set it here and not on the machine.
                sysctl(&netns, "net.bridge.bridge-nf-call-iptables=1")?;
                sysctl(&netns, "net.bridge.bridge-nf-call-ip6tables=1")?;
                ip(Some(&netns), &["link", "add", "br0", "type", "bridge"])?;
                ip(Some(&netns), &["addr", "add", &format!("10.250.{i}.1/24"), "dev", "br0"])?;
                ip(Some(&netns), &["link", "set", "br0", "up"])?;
            }
            cluster.nodes.push(NodeNet {
                name: format!("node{i}"),
                netns,
                ip: format!("172.31.250.{}", 1 + i),
                pod_cidr: format!("10.250.{i}.0/24"),
            });
        }
        if nodes == 2 {
            let (a, b) = (&cluster.nodes[0].netns.clone(), &cluster.nodes[1].netns.clone());
            let (wa, wb) = (format!("w{short}a"), format!("w{short}b"));
            ip(None, &["link", "add", &wa, "netns", a, "type", "veth", "peer", "name", &wb, "netns", b])?;
            for (ns, link, node) in [(a, &wa, 0usize), (b, &wb, 1usize)] {
                ip(Some(ns), &["addr", "add", &format!("{}/24", cluster.nodes[node].ip), "dev", link])?;
                if v6 {
                    ip(Some(ns), &["-6", "addr", "add", &format!("fd00:31:250::{}/64", 1 + node), "dev", link, "nodad"])?;
                }
                ip(Some(ns), &["link", "set", link, "up"])?;
                let other = &cluster.nodes[1 - node];
                ip(Some(ns), &["route", "add", &other.pod_cidr, "via", &other.ip])?;
                if v6 {
                    let (subnet, via) = (format!("fd00:250:{}::/64", 1 - node), format!("fd00:31:250::{}", 2 - node));
                    ip(Some(ns), &["-6", "route", "add", &subnet, "via", &via])?;
                }
            }
        }
        let mut per_node = vec![0usize; nodes];
        for (index, (name, node)) in pods.iter().enumerate() {
            let node_ns = cluster.nodes[*node].netns.clone();
            let netns = format!("{PREFIX}-{id}-p{index}");
            ip(None, &["netns", "add", &netns])?;
            cluster.namespaces.push(netns.clone());
            if v6 {
                sysctl(&netns, "net.ipv6.conf.all.accept_dad=0")?;
                sysctl(&netns, "net.ipv6.conf.default.accept_dad=0")?;
            }
            let pod_ip6 = v6.then(|| format!("fd00:250:{node}::{:x}", 10 + per_node[*node]));
            let pod_ip = format!("10.250.{node}.{}", 10 + per_node[*node]);
            per_node[*node] += 1;
            let host_veth = format!("h{short}{index}");
            if bridged {
                ip(None, &["link", "add", &host_veth, "netns", &node_ns, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
                ip(Some(&netns), &["link", "set", "lo", "up"])?;
                ip(Some(&netns), &["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"])?;
                ip(Some(&netns), &["link", "set", "eth0", "up"])?;
                ip(Some(&netns), &["route", "add", "default", "via", &format!("10.250.{node}.1"), "dev", "eth0"])?;
                ip(Some(&node_ns), &["link", "set", &host_veth, "master", "br0"])?;
                // Hairpin mode, as the bridge plugin's `hairpinMode: true` (flannel's default)
                // sets it: a pod reaching itself through its Service is DNATed by br_netfilter
                // and bridged back out of the port it came in on.
                ip(Some(&node_ns), &["link", "set", "dev", &host_veth, "type", "bridge_slave", "hairpin", "on"])?;
                ip(Some(&node_ns), &["link", "set", &host_veth, "up"])?;
            } else {
                lay_out_routed_pod(&node_ns, &netns, &host_veth, &pod_ip, pod_ip6.as_deref())?;
            }
            cluster.pods.push(PodNet {
                name: name.to_string(),
                netns,
                node: *node,
                ip: pod_ip,
                ip6: pod_ip6,
                host_veth,
                container_ports: Vec::new(),
            });
        }
        Ok(cluster)
    }

    pub fn pod(&self, name: &str) -> &PodNet {
        match self.pods.iter().find(|p| p.name == name) {
            Some(pod) => pod,
            None => panic!("no pod {name} in the test cluster"),
        }
    }

    /// Where a pod's servers listen: its address, or every address (both families) on a
    /// dual-stack pod.
    fn server_addr(&self, pod: &str, port: u16) -> String {
        match &self.pod(pod).ip6 {
            Some(_) => format!("[::]:{port}"),
            None => format!("{}:{port}", self.pod(pod).ip),
        }
    }

    /// Declares a container port on a pod, as its manifest's `ports` would.
    pub fn declare_port(&mut self, pod: &str, name: &str, transport: Transport, port: u16) {
        let Some(pod) = self.pods.iter_mut().find(|p| p.name == pod) else { panic!("no pod {pod} in the test cluster") };
        pod.container_ports.push(ContainerPort { name: name.to_string(), transport, port });
    }

    /// A TCP server in the pod that answers every connection with `ok <pod name>\n`.
    pub fn serve_tcp(&mut self, pod: &str, port: u16) -> Result<(), NetnsError> {
        let (netns, addr) = (self.pod(pod).netns.clone(), self.server_addr(pod, port));
        let count = self.register(pod, port, Server::Tcp);
        let greeting = format!("ok {pod}\n");
        self.spawn_tcp_server(&netns, addr, move |mut stream| {
            count.fetch_add(1, Ordering::Relaxed);
            let _ = stream.write_all(greeting.as_bytes());
        })
    }

    /// A TCP listener on 127.0.0.1 (any port) in each node's namespace, in node order: where
    /// each node's agent finds the fake API server (`FakeApiServer::start`).
    pub fn node_loopback_listeners(&self) -> Result<Vec<TcpListener>, NetnsError> {
        let bind_error = |netns: &str, stderr: String| NetnsError::Command { command: format!("bind 127.0.0.1:0 in {netns}"), stderr };
        self.nodes
            .iter()
            .map(|node| {
                in_netns(&node.netns, || TcpListener::bind("127.0.0.1:0"))?
                    .join()
                    .map_err(|_| bind_error(&node.netns, "thread panicked".into()))??
                    .map_err(|e| bind_error(&node.netns, e.to_string()))
            })
            .collect()
    }

    /// Runs a TCP server in `netns` until the cluster is dropped: binds `addr` (reported to
    /// the caller, which waits for it), then hands every accepted connection to
    /// `on_connection`.
    fn spawn_tcp_server(
        &mut self,
        netns: &str,
        addr: String,
        on_connection: impl FnMut(TcpStream) + Send + 'static,
    ) -> Result<(), NetnsError> {
        let bind = move || TcpListener::bind(&addr).and_then(|l| l.set_nonblocking(true).map(|()| l)).map_err(|e| e.to_string());
        self.spawn_accept_loop(netns, bind, |listener| listener.accept().map(|(stream, _)| stream), on_connection)
    }

    /// Runs a connection-oriented server in `netns` until the cluster is dropped: `bind` makes
    /// a non-blocking listener (its error is reported to the caller, which waits for it),
    /// `accept` takes one connection, and `on_connection` serves it.
    fn spawn_accept_loop<L, C>(
        &mut self,
        netns: &str,
        bind: impl FnOnce() -> Result<L, String> + Send + 'static,
        accept: impl Fn(&L) -> std::io::Result<C> + Send + 'static,
        mut on_connection: impl FnMut(C) + Send + 'static,
    ) -> Result<(), NetnsError> {
        let stop = self.stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = in_netns(netns, move || {
            let listener = match bind() {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            while !stop.load(Ordering::Relaxed) {
                match accept(&listener) {
                    Ok(connection) => on_connection(connection),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })?;
        self.wait_ready(handle, ready_rx)
    }

    /// Runs a UDP server in `netns` until the cluster is dropped: binds `addr` (reported to
    /// the caller, which waits for it), then hands every datagram (up to `buffer` bytes) to
    /// `on_datagram` with the socket to answer on.
    fn spawn_udp_server(
        &mut self,
        netns: &str,
        addr: String,
        buffer: usize,
        mut on_datagram: impl FnMut(&UdpSocket, &[u8], SocketAddr) + Send + 'static,
    ) -> Result<(), NetnsError> {
        let stop = self.stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = in_netns(netns, move || {
            let socket = match UdpSocket::bind(&addr) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = socket.set_read_timeout(Some(Duration::from_millis(50)));
            let _ = ready_tx.send(Ok(()));
            let mut buf = vec![0u8; buffer];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    on_datagram(&socket, &buf[..n], from);
                }
            }
        })?;
        self.wait_ready(handle, ready_rx)
    }

    /// A UDP server in the pod that echoes every datagram followed by ` <pod name>`.
    pub fn serve_udp_echo(&mut self, pod: &str, port: u16) -> Result<(), NetnsError> {
        let (netns, addr) = (self.pod(pod).netns.clone(), self.server_addr(pod, port));
        let count = self.register(pod, port, Server::UdpEcho);
        let signature = format!(" {pod}");
        self.spawn_udp_server(&netns, addr, 512, move |socket, datagram, from| {
            count.fetch_add(1, Ordering::Relaxed);
            let mut reply = datagram.to_vec();
            reply.extend_from_slice(signature.as_bytes());
            let _ = socket.send_to(&reply, from);
        })
    }

    /// A UDP server on `[::]:port` of the pod (both families on a dual-stack pod) recording
    /// every payload it receives, until the cluster is dropped: what reached the application,
    /// not only the interface.
    pub fn record_udp(&mut self, pod: &str, port: u16) -> Result<UdpPayloads, NetnsError> {
        let netns = self.pod(pod).netns.clone();
        let payloads = UdpPayloads::default();
        let records = payloads.clone();
        self.spawn_udp_server(&netns, format!("[::]:{port}"), 2048, move |_, datagram, _| {
            if let Ok(mut list) = records.0.lock() {
                list.push(datagram.to_vec());
            }
        })?;
        Ok(payloads)
    }

    /// A DNS server (kube-dns stand-in, [`crate::dns`]) on UDP and TCP port 53 of the pod,
    /// answering `IN A` for `records` and `CH TXT hostname.bind.` with the pod's name.
    pub fn serve_dns(&mut self, pod: &str, records: BTreeMap<String, Ipv4Addr>) -> Result<(), NetnsError> {
        let (netns, addr) = (self.pod(pod).netns.clone(), self.server_addr(pod, 53));
        let records = Arc::new(records);
        let count = self.register(pod, 53, Server::Dns(Transport::Udp));
        let (name, udp_records) = (pod.to_string(), records.clone());
        self.spawn_udp_server(&netns, addr.clone(), 1500, move |socket, query, from| {
            count.fetch_add(1, Ordering::Relaxed);
            if let Some(reply) = dns::respond(query, &name, &udp_records) {
                let _ = socket.send_to(&reply, from);
            }
        })?;
        let count = self.register(pod, 53, Server::Dns(Transport::Tcp));
        let name = pod.to_string();
        self.spawn_tcp_server(&netns, addr, move |stream| {
            count.fetch_add(1, Ordering::Relaxed);
            // Blocking reads (bounded by the connection's read timeout).
            let _ = stream.set_nonblocking(false);
            dns::serve_tcp_connection(stream, &name, &records);
        })
    }

    /// An SCTP server in the pod that answers every association with `ok <pod name>\n`; fails
    /// on a kernel without SCTP ([`sctp_supported`]).
    pub fn serve_sctp(&mut self, pod: &str, port: u16) -> Result<(), NetnsError> {
        let (netns, addr) = (self.pod(pod).netns.clone(), self.server_addr(pod, port));
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| NetnsError::Command { command: format!("bind SCTP {addr}"), stderr: format!("{e}") })?;
        let count = self.register(pod, port, Server::Sctp);
        let greeting = format!("ok {pod}\n");
        let bind = move || {
            sctp_socket(&addr)
                .and_then(|s| {
                    s.set_reuse_address(true)?;
                    s.bind(&addr.into())?;
                    s.listen(64)?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
                .map_err(|e| format!("SCTP {addr}: {e}"))
        };
        let accept = |listener: &socket2::Socket| listener.accept().map(|(association, _)| association);
        self.spawn_accept_loop(&netns, bind, accept, move |mut association: socket2::Socket| {
            count.fetch_add(1, Ordering::Relaxed);
            let _ = association.set_nonblocking(false);
            let _ = association.write_all(greeting.as_bytes());
        })
    }

    fn register(&mut self, pod: &str, port: u16, server: Server) -> Arc<AtomicU64> {
        let count = Arc::new(AtomicU64::new(0));
        self.served.insert((pod.to_string(), port, server.transport()), (server, count.clone()));
        count
    }

    /// What a pod serves on a port, if anything.
    pub fn server(&self, pod: &str, port: u16, transport: Transport) -> Option<Server> {
        self.served.get(&(pod.to_string(), port, transport)).map(|(server, _)| *server)
    }

    /// How many connections (TCP) or datagrams (UDP) a pod's server on `port` has taken so far.
    pub fn served(&self, pod: &str, port: u16, transport: Transport) -> u64 {
        self.served.get(&(pod.to_string(), port, transport)).map_or(0, |(_, count)| count.load(Ordering::Relaxed))
    }

    fn wait_ready(
        &mut self,
        handle: JoinHandle<Result<(), NetnsError>>,
        ready: std::sync::mpsc::Receiver<Result<(), String>>,
    ) -> Result<(), NetnsError> {
        self.servers.push(handle);
        match ready.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(stderr)) => Err(NetnsError::Command { command: "bind".into(), stderr }),
            Err(e) => Err(NetnsError::Command { command: "server start".into(), stderr: e.to_string() }),
        }
    }

    /// Whether a TCP connection from `from` to `to_ip:port` completes and returns "ok" within
    /// `timeout`.
    pub fn tcp_connects(&self, from: &str, to_ip: &str, port: u16, timeout: Duration) -> bool {
        let Ok(ip) = to_ip.parse::<std::net::IpAddr>() else { return false };
        let addr = SocketAddr::new(ip, port);
        let probe = in_netns(&self.pod(from).netns, move || {
            let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else { return false };
            let _ = stream.set_read_timeout(Some(timeout));
            let mut buf = [0u8; 2];
            stream.read_exact(&mut buf).is_ok() && &buf == b"ok"
        });
        matches!(probe.map(|h| h.join()), Ok(Ok(Ok(true))))
    }

    /// Whether a UDP datagram from `from` to `to_ip:port` is echoed back within `timeout`.
    pub fn udp_echoes(&self, from: &str, to_ip: &str, port: u16, timeout: Duration) -> bool {
        let Ok(ip) = to_ip.parse::<std::net::IpAddr>() else { return false };
        let addr = SocketAddr::new(ip, port);
        let probe = in_netns(&self.pod(from).netns, move || {
            let local = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let Ok(socket) = UdpSocket::bind(local) else { return false };
            let _ = socket.set_read_timeout(Some(timeout));
            if socket.send_to(b"ping", addr).is_err() {
                return false;
            }
            let mut buf = [0u8; 512];
            matches!(socket.recv_from(&mut buf), Ok((n, _)) if buf[..n].starts_with(b"ping"))
        });
        matches!(probe.map(|h| h.join()), Ok(Ok(Ok(true))))
    }

    /// One exchange with a `server` at `target` (a pod address or a ClusterIP) from pod `from`:
    /// which pod answered, or None when nothing answered within `timeout`. One connection
    /// attempt or one datagram: with `timeout` below the kernel's initial SYN retransmission
    /// timeout (1 s), a TCP probe sends exactly one SYN, so netfilter translates it once. A reply
    /// must come from `target` itself (a UDP reply from any other address is no answer).
    pub fn ask(&self, from: &str, target: SocketAddr, server: Server, timeout: Duration) -> Option<Answer> {
        let probe = in_netns(&self.pod(from).netns, move || -> Option<Answer> {
            match server {
                Server::Tcp => {
                    let mut stream = TcpStream::connect_timeout(&target, timeout).ok()?;
                    let local = stream.local_addr().ok()?;
                    stream.set_read_timeout(Some(timeout)).ok()?;
                    let mut text = String::new();
                    stream.read_to_string(&mut text).ok()?;
                    let pod = text.strip_prefix("ok ")?.trim_end().to_string();
                    Some(Answer { local, pod })
                }
                Server::UdpEcho => {
                    let socket = udp_probe_socket(target.is_ipv4()).ok()?;
                    socket.set_read_timeout(Some(timeout)).ok()?;
                    // Connected, so the local address is the pod's (for finding the conntrack
                    // entry) and the kernel takes replies from `target` only.
                    socket.connect(target).ok()?;
                    socket.send(b"ping").ok()?;
                    let local = socket.local_addr().ok()?;
                    let mut buf = [0u8; 512];
                    let (n, source) = socket.recv_from(&mut buf).ok()?;
                    let pod = std::str::from_utf8(buf[..n].strip_prefix(b"ping ")?).ok()?.to_string();
                    (source == target).then_some(Answer { local, pod })
                }
                Server::Sctp => {
                    let mut association = sctp_socket(&target).ok()?;
                    association.connect_timeout(&target.into(), timeout).ok()?;
                    let local = association.local_addr().ok()?.as_socket()?;
                    association.set_read_timeout(Some(timeout)).ok()?;
                    let mut text = String::new();
                    association.read_to_string(&mut text).ok()?;
                    let pod = text.strip_prefix("ok ")?.trim_end().to_string();
                    Some(Answer { local, pod })
                }
                Server::Dns(transport) => {
                    let (local, answer) = match transport {
                        Transport::Udp => dns::query_udp(target, &DnsQuestion::ServerName, timeout).ok()?,
                        Transport::Tcp => dns::query_tcp(target, &DnsQuestion::ServerName, timeout).ok()?,
                        Transport::Sctp => return None,
                    };
                    Some(Answer { local, pod: answer.texts.into_iter().next()? })
                }
            }
        });
        probe.ok()?.join().ok()?.ok()?
    }

    /// A DNS `IN A` lookup of `name` from pod `from`, asking `server` (e.g. the kube-dns
    /// ClusterIP) over `transport`.
    pub fn resolve(&self, from: &str, server: SocketAddr, transport: Transport, name: &str, timeout: Duration) -> Result<Vec<Ipv4Addr>, String> {
        let question = DnsQuestion::Address(name.to_string());
        if transport == Transport::Sctp {
            return Err("DNS over SCTP does not exist".into());
        }
        let probe = in_netns(&self.pod(from).netns, move || match transport {
            Transport::Udp => dns::query_udp(server, &question, timeout),
            Transport::Tcp | Transport::Sctp => dns::query_tcp(server, &question, timeout),
        })
        .map_err(|e| e.to_string())?;
        let (_, answer) = probe.join().map_err(|_| "resolver thread panicked".to_string())?.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        Ok(answer.addresses)
    }

    /// HTTP/1.0 GET to 127.0.0.1:`port` inside a node's namespace (an agent's metrics and
    /// health endpoints): (status, body), or None if nothing answered within 2 s.
    pub fn http_get(&self, node: usize, port: u16, path: &str) -> Option<(u16, String)> {
        let path = path.to_string();
        let handle = in_netns(&self.nodes[node].netns, move || -> Option<(u16, String)> {
            use std::io::{Read, Write};
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).ok()?;
            let (head, body) = text.split_once("\r\n\r\n")?;
            let code = head.split_whitespace().nth(1)?.parse().ok()?;
            Some((code, body.to_string()))
        })
        .ok()?;
        handle.join().ok()?.ok()?
    }

    /// Turns reverse-path filtering off in a node's namespace: `all`, `default` and every
    /// interface it has now (the kernel applies the larger of `all` and the interface's
    /// value), so a packet with a forged source is routed on like any other and only an
    /// enforcer can stop it. Returns the interfaces set (`all` and `default` included).
    pub fn disable_rp_filter(&self, node: usize) -> Result<Vec<String>, NetnsError> {
        let netns = &self.nodes[node].netns;
        let listing = run_in(netns, "ls", &["/proc/sys/net/ipv4/conf"], None)?;
        let mut interfaces: Vec<String> = listing.split_whitespace().map(str::to_string).collect();
        // `all` first: a new interface copies `default`, and `all` caps every interface.
        interfaces.sort_by_key(|name| (name != "all", name != "default", name.clone()));
        for name in &interfaces {
            sysctl(netns, &format!("net.ipv4.conf.{name}.rp_filter=0"))?;
        }
        for name in &interfaces {
            let value = run_in(netns, "sysctl", &["-n", &format!("net.ipv4.conf.{name}.rp_filter")], None)?;
            if value.trim() != "0" {
                return Err(NetnsError::Command { command: format!("sysctl net.ipv4.conf.{name}.rp_filter"), stderr: format!("still {}", value.trim()) });
            }
        }
        Ok(interfaces)
    }

    /// Starts a command inside a node's namespace (e.g. the agent).
    pub fn spawn_on_node(&self, node: usize, program: &std::path::Path, args: &[&str]) -> std::io::Result<std::process::Child> {
        Command::new("ip")
            .args(["netns", "exec", &self.nodes[node].netns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    }
}

/// What a CNI main plugin reports after laying out a pod: the `prevResult` the next plugin of
/// the chain receives.
#[derive(Clone, Debug)]
pub struct PtpResult {
    pub pod: PodNet,
    /// The sandbox: the pod's network namespace as a path.
    pub netns_path: String,
    pub host_mac: String,
    pub container_mac: String,
}

impl PtpResult {
    /// The result as the ptp plugin prints it (CNI 1.0.0): the host-side veth (no sandbox),
    /// `eth0` in the sandbox holding the pod's /32 (and /128) with the link-local gateway, and a
    /// default route.
    pub fn prev_result(&self) -> serde_json::Value {
        let mut ips = vec![serde_json::json!({"address": format!("{}/32", self.pod.ip), "gateway": "169.254.1.1", "interface": 1})];
        let mut routes = vec![serde_json::json!({"dst": "0.0.0.0/0"})];
        if let Some(ip6) = &self.pod.ip6 {
            ips.push(serde_json::json!({"address": format!("{ip6}/128"), "gateway": "fe80::1", "interface": 1}));
            routes.push(serde_json::json!({"dst": "::/0"}));
        }
        serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": self.pod.host_veth, "mac": self.host_mac},
                {"name": "eth0", "mac": self.container_mac, "sandbox": self.netns_path},
            ],
            "ips": ips,
            "routes": routes,
            "dns": {},
        })
    }
}

/// A UDP server in a pod that records, per source address, the sequence number and send time
/// of every datagram it receives (as [`send_udp_sequence`] writes them).
#[derive(Default, Debug)]
pub struct UdpCounter {
    received: std::sync::Mutex<std::collections::BTreeMap<std::net::IpAddr, Vec<(u32, u64)>>>,
}

impl UdpCounter {
    /// (datagrams, highest sequence number) received from `source`.
    pub fn from(&self, source: &str) -> (u64, u32) {
        (self.sent_since(source, 0).map_or(0, |(count, _)| count), self.max_seq(source))
    }

    /// Of the datagrams from `source` sent at or after `since_us` (microseconds after the
    /// sender's base instant): how many arrived, and the latest send time among them.
    pub fn sent_since(&self, source: &str, since_us: u64) -> Option<(u64, u64)> {
        let ip = source.parse::<std::net::IpAddr>().ok()?;
        let map = self.received.lock().ok()?;
        let records = map.get(&ip)?;
        let late: Vec<u64> = records.iter().map(|r| r.1).filter(|sent| *sent >= since_us).collect();
        Some((late.len() as u64, late.iter().copied().max().unwrap_or(0)))
    }

    fn max_seq(&self, source: &str) -> u32 {
        let Ok(ip) = source.parse::<std::net::IpAddr>() else { return 0 };
        self.received.lock().ok().and_then(|m| m.get(&ip).and_then(|r| r.iter().map(|r| r.0).max())).unwrap_or(0)
    }
}

/// Sends `count` datagrams, one every `interval`, from inside `netns` to `to`, each carrying
/// its sequence number (from 1, 4 bytes big-endian) and its send time in microseconds after
/// `base` (8 bytes big-endian). Send errors (no route yet, ARP not resolved) are ignored: the
/// datagram is simply not delivered. The thread returns the number sent.
pub fn send_udp_sequence(
    netns: &str,
    to: SocketAddr,
    count: u32,
    interval: Duration,
    base: Instant,
) -> Result<JoinHandle<Result<u32, NetnsError>>, NetnsError> {
    in_netns(netns, move || {
        let local = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let Ok(socket) = UdpSocket::bind(local) else { return 0 };
        let started = Instant::now();
        let mut sent = 0;
        for seq in 1..=count {
            // Paced against the start, so a slow send does not stretch the sequence.
            let due = interval * (seq - 1);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            let mut payload = [0u8; 12];
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            payload[4..].copy_from_slice(&(base.elapsed().as_micros() as u64).to_be_bytes());
            if socket.send_to(&payload, to).is_ok() {
                sent += 1;
            }
        }
        sent
    })
}

impl Cluster {
    /// Adds a pod to a running routed cluster the way the ptp CNI plugin lays it out (as
    /// [`Cluster::new`] does for its pods) but for the host route: a network namespace, a veth
    /// pair with `eth0` in the pod holding the pod's /32 (and /128 on dual-stack clusters) and
    /// routes via the link-local gateway, the gateway address on the host side. Returns what
    /// ptp would report, i.e. the `prevResult` of the next plugin.
    pub fn add_pod_ptp_without_host_route(&mut self, name: &str, node: usize) -> Result<PtpResult, NetnsError> {
        let node_ns = self.nodes[node].netns.clone();
        let index = self.pods_created;
        let netns = format!("{PREFIX}-{}-p{index}", self.id);
        let on_node = self.pods_created_on_node[node];
        self.pods_created += 1;
        self.pods_created_on_node[node] += 1;
        let v6 = self.dual_stack;
        ip(None, &["netns", "add", &netns])?;
        self.namespaces.push(netns.clone());
        if v6 {
            sysctl(&netns, "net.ipv6.conf.all.accept_dad=0")?;
            sysctl(&netns, "net.ipv6.conf.default.accept_dad=0")?;
        }
        let pod_ip = format!("10.250.{node}.{}", 10 + on_node);
        let pod_ip6 = v6.then(|| format!("fd00:250:{node}::{:x}", 10 + on_node));
        let host_veth = format!("h{}{index}", self.short);
        lay_out_pod_side(&node_ns, &netns, &host_veth, &pod_ip, pod_ip6.as_deref())?;
        let pod = PodNet { name: name.to_string(), netns: netns.clone(), node, ip: pod_ip, ip6: pod_ip6, host_veth: host_veth.clone(), container_ports: Vec::new() };
        self.pods.push(pod.clone());
        Ok(PtpResult {
            pod,
            netns_path: format!("/run/netns/{netns}"),
            host_mac: mac_of(&node_ns, &host_veth)?,
            container_mac: mac_of(&netns, "eth0")?,
        })
    }

    /// [`Cluster::add_pod_ptp_without_host_route`] and [`Cluster::add_host_route`]: the whole
    /// layout of the ptp plugin, the host route last, as ptp does.
    pub fn add_pod_ptp(&mut self, name: &str, node: usize) -> Result<PtpResult, NetnsError> {
        let result = self.add_pod_ptp_without_host_route(name, node)?;
        self.add_host_route(&result)?;
        Ok(result)
    }

    /// The host's routes to a pod (the last step of the ptp layout, after which the pod is
    /// reachable and the plugin returns).
    pub fn add_host_route(&self, result: &PtpResult) -> Result<(), NetnsError> {
        let node_ns = &self.nodes[result.pod.node].netns;
        ip(Some(node_ns), &["route", "add", &format!("{}/32", result.pod.ip), "dev", &result.pod.host_veth, "scope", "link"])?;
        if let Some(ip6) = &result.pod.ip6 {
            ip(Some(node_ns), &["-6", "route", "add", &format!("{ip6}/128"), "dev", &result.pod.host_veth])?;
        }
        Ok(())
    }

    /// The IPv4 address the next pod added to `node` gets.
    pub fn next_pod_ip(&self, node: usize) -> String {
        format!("10.250.{node}.{}", 10 + self.pods_created_on_node[node])
    }

    /// Removes a pod: deletes its namespace, which deletes its veth pair and host route.
    pub fn remove_pod(&mut self, name: &str) -> Result<(), NetnsError> {
        let Some(position) = self.pods.iter().position(|p| p.name == name) else { return Ok(()) };
        let pod = self.pods.remove(position);
        ip(None, &["netns", "del", &pod.netns])?;
        self.namespaces.retain(|n| *n != pod.netns);
        Ok(())
    }

    /// A UDP server in the pod counting what it receives (see [`UdpCounter`]).
    pub fn serve_udp_counter(&mut self, pod: &str, port: u16) -> Result<Arc<UdpCounter>, NetnsError> {
        let (netns, addr) = (self.pod(pod).netns.clone(), self.server_addr(pod, port));
        let counter = Arc::new(UdpCounter::default());
        let counts = counter.clone();
        self.spawn_udp_server(&netns, addr, 512, move |_, datagram, from| {
            let seq = datagram.get(..4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            let sent = datagram.get(4..12).map_or(0, |b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
            if let Ok(mut map) = counts.received.lock() {
                map.entry(from.ip()).or_default().push((seq, sent));
            }
        })?;
        Ok(counter)
    }
}

/// The routed (kindnet ptp) layout of one pod whose namespace exists.
fn lay_out_routed_pod(node_ns: &str, netns: &str, host_veth: &str, pod_ip: &str, pod_ip6: Option<&str>) -> Result<(), NetnsError> {
    lay_out_pod_side(node_ns, netns, host_veth, pod_ip, pod_ip6)?;
    ip(Some(node_ns), &["route", "add", &format!("{pod_ip}/32"), "dev", host_veth, "scope", "link"])?;
    if let Some(ip6) = pod_ip6 {
        ip(Some(node_ns), &["-6", "route", "add", &format!("{ip6}/128"), "dev", host_veth])?;
    }
    Ok(())
}

/// The routed layout without the host's routes to the pod.
fn lay_out_pod_side(node_ns: &str, netns: &str, host_veth: &str, pod_ip: &str, pod_ip6: Option<&str>) -> Result<(), NetnsError> {
    ip(None, &["link", "add", host_veth, "netns", node_ns, "type", "veth", "peer", "name", "eth0", "netns", netns])?;
    ip(Some(netns), &["link", "set", "lo", "up"])?;
    ip(Some(netns), &["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
    ip(Some(netns), &["link", "set", "eth0", "up"])?;
    ip(Some(netns), &["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
    ip(Some(netns), &["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
    // The pod's gateway address lives on every host-side veth (as kindnet's ptp plugin gives
    // the host side the gateway address), so the pod's ARP for it is answered.
    ip(Some(node_ns), &["addr", "add", "169.254.1.1/32", "dev", host_veth, "scope", "link"])?;
    ip(Some(node_ns), &["link", "set", host_veth, "up"])?;
    if let Some(ip6) = pod_ip6 {
        ip(Some(netns), &["-6", "addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"])?;
        ip(Some(netns), &["-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"])?;
        ip(Some(node_ns), &["-6", "addr", "add", "fe80::1/64", "dev", host_veth, "nodad"])?;
    }
    Ok(())
}

/// The MAC address of `dev` in `netns`.
fn mac_of(netns: &str, dev: &str) -> Result<String, NetnsError> {
    let command = format!("ip netns exec {netns} cat /sys/class/net/{dev}/address");
    let output = Command::new("ip")
        .args(["netns", "exec", netns, "cat", &format!("/sys/class/net/{dev}/address")])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn { command: command.clone(), source })?;
    if !output.status.success() {
        return Err(NetnsError::Command { command, stderr: String::from_utf8_lossy(&output.stderr).trim().into() });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Retries `check` until it returns true or `deadline` passes; bounded in time and count.
pub fn eventually(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    for _ in 0..1000 {
        if check() {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
        for netns in self.namespaces.iter().rev() {
            let _ = ip(None, &["netns", "del", netns]);
        }
    }
}

/// FNV-1a, to shorten run ids into interface names.
fn fnv(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}
