//! Probes through ClusterIPs, judged by the semantics module on the backend kube-proxy chose.
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use netsieve::policy::{ClusterState, Protocol, explain};
use netsieve_tests::kube_proxy::{Endpoint, KubeProxy};
use netsieve_tests::netns::{Cluster, Transport};
use netsieve_tests::service_cluster::{NAMESPACES, PODS, namespace_object, node_objects, pod_object, policy_objects, scenario_pod};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// One attempt: a single SYN or datagram, so netfilter decides once per attempt (the kernel's
/// first SYN retransmission comes after 1 s).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// Connections from a pod to a Service port at its ClusterIP.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub from: &'static str,
    pub namespace: &'static str,
    pub service: &'static str,
    pub port: &'static str,
    pub attempts: usize,
    pub what: &'static str,
}

const fn case(from: &'static str, service: (&'static str, &'static str), port: &'static str, attempts: usize, what: &'static str) -> Case {
    Case { from, namespace: service.0, service: service.1, port, attempts, what }
}

/// Clients that no egress policy selects: only the backends' ingress policies decide. The
/// agent got these right before Services mattered; they must stay right.
pub const INGRESS_CASES: &[Case] = &[
    case("frontend", ("shop", "web"), "http", 20, "both backends admit frontends (port 80 -> 8080, cross- and same-node)"),
    case("stranger", ("shop", "web"), "http", 10, "neither backend admits strangers"),
    case("frontend", ("shop", "web"), "echo", 10, "UDP through the ClusterIP, named targetPort"),
    case("frontend", ("shop", "api"), "http", 20, "named targetPort: 8081 on api-1, 8082 on api-2, both admitted by a named ingress port"),
    case("frontend", ("kube-system", "kube-dns"), "dns", 10, "DNS over UDP through the kube-dns ClusterIP"),
    case("stranger", ("kube-system", "kube-dns"), "dns-tcp", 10, "DNS over TCP through the kube-dns ClusterIP"),
    case("frontend", ("prod", "orders"), "http", 10, "prod denies all ingress"),
    case("web-a", ("shop", "web"), "http", 20, "hairpin: web-a reaches itself, but web-b does not admit web-a"),
];

/// Clients whose egress policies decide, on the backend kube-proxy chose.
pub const EGRESS_CASES: &[Case] = &[
    case("client", ("shop", "web"), "http", 20, "egress allows tier=open: web-a (other node) yes, web-b (same node) no"),
    case("client2", ("shop", "web"), "http", 20, "egress allows tier=open: web-a (same node) yes, web-b (other node) no"),
    case("client", ("shop", "web"), "echo", 20, "UDP, named targetPort: web-a yes, web-b no"),
    case("client", ("shop", "api"), "http", 20, "named targetPort, egress allows TCP 8081: api-1 yes, api-2 (8082) no"),
    case("client", ("kube-system", "kube-dns"), "dns", 10, "the clients' DNS rule through the kube-dns ClusterIP"),
    case("worker", ("kube-system", "kube-dns"), "dns", 20, "default deny + allow DNS (seed 001): UDP"),
    case("worker", ("kube-system", "kube-dns"), "dns-tcp", 20, "default deny + allow DNS (seed 001): TCP"),
    case("worker", ("default", "fake-dns"), "dns", 10, "kube-dns label in the wrong namespace: denied"),
    case("worker", ("prod", "orders"), "http", 10, "default deny: denied"),
    case("orders", ("prod", "orders"), "http", 10, "hairpin: a pod can always reach itself, even under default deny"),
];

fn protocol(transport: Transport) -> Protocol {
    match transport {
        Transport::Tcp => Protocol::Tcp,
        Transport::Udp => Protocol::Udp,
        Transport::Sctp => Protocol::Sctp,
    }
}

fn pod_key(name: &str) -> String {
    format!("{}/{name}", scenario_pod(name).namespace)
}

/// What the semantics module says of a direct connection from pod `from` to an endpoint.
pub fn allowed(state: &ClusterState, from: &str, to: &Endpoint, transport: Transport) -> bool {
    let src = state.resolve(&pod_key(from)).expect("client pod in the state");
    let dst = state.resolve(&pod_key(&to.pod)).expect("backend pod in the state");
    explain(state, &state.flow(src, dst, protocol(transport), to.port).expect("flow")).allowed
}

/// The semantics module's view of the scenario as the API server holds it (`policies`: with
/// the policies, or without, for a cluster that enforces none).
pub fn oracle(cluster: &Cluster, policies: bool) -> ClusterState {
    let namespaces: Vec<Namespace> = NAMESPACES.iter().map(|n| serde_json::from_value(namespace_object(n)).expect("namespace")).collect();
    let pods: Vec<Pod> = PODS.iter().map(|p| serde_json::from_value(pod_object(cluster, p)).expect("pod")).collect();
    let nodes: Vec<Node> = node_objects(cluster).into_iter().map(|n| serde_json::from_value(n).expect("node")).collect();
    let policies: Vec<NetworkPolicy> = if policies {
        policy_objects().expect("policies").into_iter().map(|p| serde_json::from_value(p).expect("policy")).collect()
    } else {
        Vec::new()
    };
    ClusterState::new(&namespaces, &pods, &policies, &nodes)
}

/// The outcome of one case.
pub struct CaseResult {
    pub case: Case,
    /// Per chosen backend pod: (attempts kube-proxy sent there, answered, the semantics' verdict).
    pub per_backend: BTreeMap<String, (usize, usize, bool)>,
    /// Attempts that never reached kube-proxy's DNAT.
    pub untranslated: usize,
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

/// Runs a case: every attempt's outcome must equal the semantics module's verdict on the
/// backend kube-proxy chose for it; a backend the semantics deny must not have taken a single
/// connection or datagram (its server's counter); with 20 or more attempts, kube-proxy must
/// have chosen every backend at least once (else the case proved nothing about one of them;
/// with two backends, 20 attempts all on one happen with probability 2 * 2^-20).
pub fn run_case(cluster: &Cluster, proxy: &KubeProxy, state: &ClusterState, case: Case) -> CaseResult {
    let started = Instant::now();
    let service = cluster.service(case.namespace, case.service).expect("service");
    let port = service.port(case.port).expect("port");
    let transport = port.port.transport;
    let served_before: Vec<u64> = port.endpoints.iter().map(|e| cluster.served(&e.pod, e.port, transport)).collect();
    let mut result = CaseResult { case, per_backend: BTreeMap::new(), untranslated: 0, failures: Vec::new(), elapsed: Duration::ZERO };
    for attempt in 0..case.attempts {
        let probe = match proxy.probe(cluster, case.from, service, case.port, ATTEMPT_TIMEOUT) {
            Ok(probe) => probe,
            Err(error) => {
                result.failures.push(format!("attempt {attempt}: {error}"));
                continue;
            }
        };
        let Some(endpoint) = &probe.chosen else {
            result.untranslated += 1;
            if probe.answer.is_some() {
                result.failures.push(format!("attempt {attempt}: answered without a translation"));
            }
            continue;
        };
        let expected = allowed(state, case.from, endpoint, transport);
        let got = probe.answer.is_some();
        let entry = result.per_backend.entry(endpoint.pod.clone()).or_insert((0, 0, expected));
        entry.0 += 1;
        entry.1 += usize::from(got);
        if got != expected {
            result.failures.push(format!(
                "attempt {attempt}: kube-proxy chose {} ({}), connection {} but the semantics say {}",
                endpoint.pod,
                endpoint.addr(),
                if got { "succeeded" } else { "failed" },
                if expected { "allowed" } else { "denied" }
            ));
        }
    }
    if result.untranslated > 0 {
        result.failures.push(format!(
            "{} of {} attempts never reached kube-proxy's DNAT (dropped before netfilter translated them), so no backend was chosen to judge them by",
            result.untranslated, case.attempts
        ));
    }
    for (endpoint, before) in port.endpoints.iter().zip(served_before) {
        let taken = cluster.served(&endpoint.pod, endpoint.port, transport) - before;
        let answered = result.per_backend.get(&endpoint.pod).map_or(0, |r| r.1) as u64;
        if taken != answered {
            result.failures.push(format!("{} took {taken} connections/datagrams but answered {answered} probes", endpoint.pod));
        }
        if case.attempts >= 20 && result.untranslated == 0 && !result.per_backend.contains_key(&endpoint.pod) {
            result.failures.push(format!("kube-proxy never chose {} in {} attempts", endpoint.pod, case.attempts));
        }
    }
    result.elapsed = started.elapsed();
    result
}

/// Runs every case (all of them, also after a failure), prints a table, and fails listing
/// every case that failed.
pub fn check_cases(cluster: &Cluster, proxy: &KubeProxy, state: &ClusterState, cases: &[Case], stage: &str) {
    let results: Vec<CaseResult> = cases.iter().map(|c| run_case(cluster, proxy, state, *c)).collect();
    let mut table = format!("{stage} ({} kube-proxy):\n", proxy.mode());
    let mut failed = Vec::new();
    for result in &results {
        let c = result.case;
        let backends: Vec<String> = result
            .per_backend
            .iter()
            .map(|(pod, (sent, answered, allowed))| format!("{pod}: {answered}/{sent} answered ({})", if *allowed { "allowed" } else { "denied" }))
            .collect();
        let verdict = if result.failures.is_empty() { "PASS" } else { "FAIL" };
        let _ = writeln!(
            table,
            "  {verdict} {} -> {}/{}:{} x{} [{}] {:.1}s  {}{}",
            c.from,
            c.namespace,
            c.service,
            c.port,
            c.attempts,
            backends.join(", "),
            result.elapsed.as_secs_f64(),
            c.what,
            if result.untranslated > 0 { format!("; {} untranslated", result.untranslated) } else { String::new() }
        );
        if !result.failures.is_empty() {
            failed.push(format!("{} -> {}/{}:{}: {}", c.from, c.namespace, c.service, c.port, result.failures.join("; ")));
        }
    }
    eprintln!("{table}");
    assert!(failed.is_empty(), "{stage}: {} of {} cases failed:\n{}\n\n{table}", failed.len(), cases.len(), failed.join("\n"));
}
