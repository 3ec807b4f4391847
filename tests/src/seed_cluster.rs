//! The seed scenarios (`iamnice`, seed 002; `cache-store`, seed 003) laid out on a two-node
//! [`Cluster`], and the agents that enforce them: shared by the end-to-end test and the demo.
use crate::netns::Cluster;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// Pods of the scenario: name, namespace, node index, labels (a YAML flow map).
pub const PODS: &[(&str, &str, usize, &str)] = &[
    ("nginx-1", "default", 0, "{run: nginx}"),
    ("interactivetest", "default", 0, "{run: interactivetest}"),
    ("nice-client", "default", 1, "{run: interactivetest, iamnice: 'yeah'}"),
    ("cache-store", "secure-middleware", 0, "{app: cache-store}"),
    ("build-code", "default", 0, "{app: build-code}"),
    ("internal-proxy", "default", 1, "{app: internal-proxy}"),
];

/// Seed 002: only pods labelled `iamnice: yeah` may reach nginx.
pub const ACCESS_NGINX: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: access-nginx, namespace: default}
spec:
  podSelector: {matchLabels: {run: nginx}}
  ingress:
  - from:
    - podSelector: {matchLabels: {iamnice: 'yeah'}}
";

/// Seed 003: only internal-proxy pods of `default` may reach the cache, on 6379/TCP.
pub const CACHE_STORE: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: cache-store-allow-ingress, namespace: secure-middleware}
spec:
  podSelector: {matchLabels: {app: cache-store}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: internal-proxy}}
      namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: default}}
    ports:
    - {protocol: TCP, port: 6379}
";

pub const NAMESPACES: &str = "apiVersion: v1\nkind: List\nitems:\n\
    - {apiVersion: v1, kind: Namespace, metadata: {name: default}}\n\
    - {apiVersion: v1, kind: Namespace, metadata: {name: secure-middleware}}\n";

/// The servers the probe matrix targets: nginx-1 on 80/TCP and 5353/UDP (echo), the cache on
/// 6379/TCP.
pub fn serve_seed(cluster: &mut Cluster) -> Result<(), crate::netns::NetnsError> {
    cluster.serve_tcp("nginx-1", 80)?;
    cluster.serve_udp_echo("nginx-1", 5353)?;
    cluster.serve_tcp("cache-store", 6379)
}

/// The (pod, node) layout to build the [`Cluster`] with.
pub fn layout() -> Vec<(&'static str, usize)> {
    PODS.iter().map(|p| (p.0, p.2)).collect()
}

/// The namespace of a scenario pod.
pub fn namespace_of(pod: &str) -> &'static str {
    PODS.iter().find(|p| p.0 == pod).map_or("default", |p| p.1)
}

/// The pods as `kubectl get pods -o yaml` would list them, with the cluster's addresses;
/// `relabel` replaces one pod's labels.
pub fn pods_manifest(cluster: &Cluster, relabel: Option<(&str, &str)>) -> String {
    let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for (name, namespace, node, labels) in PODS {
        let labels = match relabel {
            Some((pod, labels)) if pod == *name => labels,
            _ => labels,
        };
        let ip = &cluster.pod(name).ip;
        let ips = match &cluster.pod(name).ip6 {
            Some(ip6) => format!("[{{ip: {ip}}}, {{ip: '{ip6}'}}]"),
            None => format!("[{{ip: {ip}}}]"),
        };
        text.push_str(&format!(
            "- apiVersion: v1\n  kind: Pod\n  metadata: {{name: {name}, namespace: {namespace}, labels: {labels}}}\n  spec: {{nodeName: node{node}, containers: [{{name: c, image: x}}]}}\n  status: {{phase: Running, podIP: {ip}, podIPs: {ips}}}\n"
        ));
    }
    text
}

/// The nodes with their wire addresses (the node-traffic exception).
pub fn nodes_manifest(cluster: &Cluster) -> String {
    cluster
        .nodes
        .iter()
        .map(|n| format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n", n.name, n.ip))
        .collect()
}

/// Writes via rename so an agent polling the directory never reads a half-written file.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Writes namespaces, nodes, pods and both seed policies into `dir`.
pub fn write_manifests(dir: &Path, cluster: &Cluster) -> std::io::Result<()> {
    write_atomically(&dir.join("namespaces.yaml"), NAMESPACES)?;
    write_atomically(&dir.join("nodes.yaml"), &nodes_manifest(cluster))?;
    write_atomically(&dir.join("pods.yaml"), &pods_manifest(cluster, None))?;
    write_atomically(&dir.join("access-nginx.yaml"), ACCESS_NGINX)?;
    write_atomically(&dir.join("cache-store.yaml"), CACHE_STORE)
}

/// One `netsieve agent --manifests` per node, each inside its node's namespace. Dropping
/// stops them (SIGTERM, then SIGKILL after 5 s).
pub struct Agents(Vec<RunningAgent>);

/// An agent process and the thread that drains its stderr: an undrained pipe fills up and
/// blocks the agent on its next log line.
struct RunningAgent {
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl RunningAgent {
    fn new(mut child: Child) -> RunningAgent {
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
                text
            })
        });
        RunningAgent { child, stderr }
    }
}

impl Agents {
    pub fn start(cluster: &Cluster, binary: &Path, manifests: &Path, extra: &[&str]) -> std::io::Result<Agents> {
        let dir = manifests.to_string_lossy().to_string();
        Agents::spawn(cluster, binary, |_| {
            let mut args = vec!["--manifests".to_string(), dir.clone()];
            args.extend(extra.iter().map(|a| a.to_string()));
            args
        })
    }

    /// Like [`Agents::spawn`], but each agent runs with only the capabilities the DaemonSet
    /// grants (BPF, PERFMON, NET_ADMIN: `setpriv` limits root's bounding set) on a bpffs
    /// mounted beforehand, as the host's bpffs is in a DaemonSet.
    pub fn spawn_least_privileged(
        cluster: &Cluster,
        binary: &Path,
        source_args: impl Fn(usize) -> Vec<String>,
    ) -> std::io::Result<Agents> {
        let mut agents = Agents(Vec::new());
        let quote = |a: &str| format!("'{}'", a.replace('\'', "'\\''"));
        for (index, node) in cluster.nodes.iter().enumerate() {
            let bpffs = node_bpffs(cluster, &node.name);
            let socket = agent_socket(cluster, index).to_string_lossy().to_string();
            let mut args: Vec<String> =
                ["agent", "--node", &node.name, "--bpffs", &bpffs, "--socket", &socket].map(String::from).to_vec();
            args.extend(source_args(index));
            let command: Vec<String> = args.iter().map(|a| quote(a)).collect();
            let script = format!(
                "mkdir -p {b} && mount -t bpf bpf {b} && exec setpriv --bounding-set -all,+bpf,+perfmon,+net_admin --inh-caps -all -- {bin} {args}",
                b = quote(&bpffs),
                bin = quote(&binary.to_string_lossy()),
                args = command.join(" ")
            );
            agents.0.push(RunningAgent::new(cluster.spawn_on_node(index, Path::new("/bin/sh"), &["-c", &script])?));
        }
        Ok(agents)
    }

    /// [`Agents::spawn_least_privileged`] against the API server of `kubeconfigs` (one per node,
    /// in node order), each with `extra` arguments.
    pub fn against_api(cluster: &Cluster, binary: &Path, kubeconfigs: &[std::path::PathBuf], extra: &[&str]) -> std::io::Result<Agents> {
        Agents::spawn_least_privileged(cluster, binary, |index| {
            let mut args = vec!["--kubeconfig".to_string(), kubeconfigs[index].to_string_lossy().to_string()];
            args.extend(extra.iter().map(|a| a.to_string()));
            args
        })
    }

    /// `netsieve agent --node NODE --bpffs ... --socket ... <source_args(node index)>` on every
    /// node.
    pub fn spawn(cluster: &Cluster, binary: &Path, source_args: impl Fn(usize) -> Vec<String>) -> std::io::Result<Agents> {
        let mut agents = Agents(Vec::new());
        for (index, node) in cluster.nodes.iter().enumerate() {
            let bpffs = node_bpffs(cluster, &node.name);
            let socket = agent_socket(cluster, index).to_string_lossy().to_string();
            let mut args: Vec<String> =
                ["agent", "--node", &node.name, "--bpffs", &bpffs, "--socket", &socket].map(String::from).to_vec();
            args.extend(source_args(index));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            agents.0.push(RunningAgent::new(cluster.spawn_on_node(index, binary, &args)?));
        }
        Ok(agents)
    }

    /// Process ids of the agents, in node order (the `ip netns exec`/`setpriv` wrappers exec
    /// into the agent, so these are the agents themselves).
    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(|a| a.child.id()).collect()
    }

    /// SIGTERM to every agent; returns (success, stderr) of each, in node order.
    pub fn stop(&mut self) -> Vec<(bool, String)> {
        self.stop_within(Duration::from_secs(5))
    }

    /// SIGTERM to every agent, SIGKILL after `limit`; returns (success, stderr) of each.
    pub fn stop_within(&mut self, limit: Duration) -> Vec<(bool, String)> {
        let mut results = Vec::new();
        for mut agent in self.0.drain(..) {
            let pid = agent.child.id();
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let exited = wait_bounded(&mut agent.child, limit);
            let stderr = agent.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
            match exited {
                Some(status) => results.push((status.success(), stderr)),
                None => results.push((false, format!("{stderr}\nagent {pid} did not stop within {limit:?}; killed"))),
            }
        }
        results
    }
}

/// Waits for the child up to `limit`, then kills it (None).
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl Drop for Agents {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Where the agents mount their own bpffs: inside `ip netns exec`'s private mount namespace,
/// so only the empty directories remain on the machine; [`remove_mount_root`] deletes them.
pub fn mount_root(cluster: &Cluster) -> String {
    format!("/run/netsieve-test-{}", cluster.id)
}

/// Where the agent of node `node` mounts (or finds) its bpffs: under the cluster's mount root.
pub fn node_bpffs(cluster: &Cluster, node: &str) -> String {
    format!("{}/bpffs-{node}", mount_root(cluster))
}

/// The node API socket of the agent of node `index`: one per agent, since several agents run
/// on this machine (the default path would be shared).
pub fn agent_socket(cluster: &Cluster, index: usize) -> std::path::PathBuf {
    Path::new(&mount_root(cluster)).join(format!("sock-{index}")).join("agent.sock")
}

pub fn remove_mount_root(cluster: &Cluster) {
    let _ = std::fs::remove_dir_all(mount_root(cluster));
}
