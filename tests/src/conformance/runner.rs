//! Runs the upstream cases against the real agents in the model cluster ([`super::testbed`]):
//! one `netsieve agent` per node reading a manifests directory or watching the fake API
//! server, the case's steps applied in order, and after each probe step every asserted
//! (client, server) pair probed through the server's ClusterIP and compared with the matrix
//! upstream asserts, as the case file writes it. Expectations come only from the case files;
//! nothing here knows NetworkPolicy semantics.
//!
//! Cases share one cluster: each starts from its own model (its pods, no policy, the
//! namespaces' initial labels, its Services), which is published as a whole, so what an earlier
//! case did cannot leak into it.
//!
//! **Waiting for enforcement.** After every change the runner waits until both agents have
//! programmed it, bounded by [`PROGRAMMED_TIMEOUT`]: each agent observes every manifests reload
//! and every batch of API events in `netsieve_policy_programming_duration_seconds` once the
//! kernel maps reflect it (`Controller::program`), so a change is enforced once that
//! histogram's count has moved on both nodes. In manifests mode a change is one atomic rewrite
//! of the one manifests file (one reload); in API mode each object is created, replaced or
//! deleted on its own, each with its own wait. Then, as upstream's `ValidateOrFail`, the whole
//! matrix is probed, and probed once more if any cell disagrees; the second round decides (the
//! report says when one was needed).
use super::format::{PodRef, Probe, Protocol, Step, Suite};
use super::reachability::Matrix;
use super::state::ModelState;
use super::testbed::{Connectivity, NODES, Testbed, placement};
use super::{Case, ConformanceError};
use crate::fake_apiserver::{FakeApiServer, Resource};
use crate::kube_proxy::ProxyMode;
use crate::netns::eventually;
use crate::seed_cluster::{Agents, remove_mount_root, write_atomically};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Upstream's probe timeout (`agnhost connect --timeout=1s`).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the agents may take to program a change before the step fails (they promise 1 s;
/// the slack is for a loaded 2-core machine). Probing goes on after such a failure.
pub const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(5);
/// `waitForHTTPServers`: up to 10 all-connect rounds, 1 s apart.
const SERVER_WAIT_ROUNDS: usize = 10;
const SERVER_WAIT_PAUSE: Duration = Duration::from_secs(1);
/// Where each agent serves its metrics, on its node's loopback.
pub const METRICS_PORT: u16 = 9090;
const PROGRAMMED_COUNT: &str = "netsieve_policy_programming_duration_seconds_count";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Testbed(#[from] super::testbed::TestbedError),
    #[error(transparent)]
    Conformance(#[from] ConformanceError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("agents: {0}")]
    Agents(String),
    #[error("encoding objects: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

/// Where the agents read the cluster's objects from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// `netsieve agent --manifests DIR`: one file holding every object, rewritten per change.
    Manifests,
    /// `netsieve agent --kubeconfig K` against the fake API server, with only the
    /// DaemonSet's capabilities.
    Api,
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceKind::Manifests => "manifests",
            SourceKind::Api => "API",
        })
    }
}

enum Source {
    Manifests { file: PathBuf },
    Api { server: FakeApiServer, published: BTreeMap<(Resource, String), Value> },
}

/// The agents running on a test bed, fed from one source.
pub struct Session<'a> {
    // Declared first: the agents stop before their API server goes away.
    agents: Agents,
    source: Source,
    testbed: &'a mut Testbed,
    suite: &'a Suite,
    dir: PathBuf,
    kind: SourceKind,
}

/// One row of the report: one step of a case.
#[derive(Clone, Debug)]
pub struct StepRow {
    /// `3: probe 80/TCP`
    pub step: String,
    /// What upstream asserts, or `-` for steps that assert nothing.
    pub expectation: String,
    pub result: RowResult,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowResult {
    /// An assertion held.
    Pass(String),
    /// An assertion failed, or the step could not be carried out.
    Fail(String),
    /// A change applied (and how long the agents took to program it).
    Done(String),
    /// Not runnable here.
    Skip(String),
}

/// Counts of what a case's probe steps checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    pub matrices: usize,
    pub matrices_failed: usize,
    pub cells: usize,
    pub cells_failed: usize,
    /// Matrices that needed upstream's second round.
    pub second_rounds: usize,
}

#[derive(Clone, Debug)]
pub struct CaseReport {
    /// `netpol/01`
    pub id: String,
    pub path: String,
    /// The `It` text.
    pub it: String,
    pub full_name: String,
    pub protocols: Vec<Protocol>,
    pub rows: Vec<StepRow>,
    pub checked: BTreeMap<Protocol, Checked>,
    /// How long the agents took to program each change of the case.
    pub programmed_in: Vec<Duration>,
    pub elapsed: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    Skipped,
}

impl CaseReport {
    fn new(case: &Case) -> CaseReport {
        CaseReport {
            id: case_id(case),
            path: case.path.clone(),
            it: case.file.upstream.it.clone(),
            full_name: case.file.upstream.full_name(),
            protocols: case.protocols_probed(),
            rows: Vec::new(),
            checked: BTreeMap::new(),
            programmed_in: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    fn row(&mut self, step: impl Into<String>, expectation: impl Into<String>, result: RowResult) {
        self.rows.push(StepRow { step: step.into(), expectation: expectation.into(), result });
    }

    pub fn outcome(&self) -> Outcome {
        if self.rows.iter().any(|r| matches!(r.result, RowResult::Fail(_))) {
            Outcome::Failed
        } else if self.rows.iter().any(|r| matches!(r.result, RowResult::Skip(_))) {
            Outcome::Skipped
        } else {
            Outcome::Passed
        }
    }
}

/// `cases/netpol-udp/02-ports.yaml` -> `netpol-udp/02`.
pub fn case_id(case: &Case) -> String {
    let relative = case.path.strip_prefix("cases/").unwrap_or(&case.path);
    match relative.split_once('/') {
        Some((group, file)) => format!("{group}/{}", file.split('-').next().unwrap_or(file)),
        None => relative.to_string(),
    }
}

/// The objects the agents read, keyed as the fake API server keys them.
fn objects(state: &ModelState) -> Result<Vec<(Resource, String, Value)>, RunError> {
    let mut objects = Vec::new();
    for namespace in state.namespace_objects() {
        let key = namespace.metadata.name.clone().unwrap_or_default();
        objects.push((Resource::Namespaces, key, serde_json::to_value(namespace)?));
    }
    for pod in state.pod_objects(&placement)? {
        let key = format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or_default(), pod.metadata.name.as_deref().unwrap_or_default());
        objects.push((Resource::Pods, key, serde_json::to_value(pod)?));
    }
    for policy in state.policy_objects(&|pod| placement(pod).map(|p| p.pod_ip))? {
        let key = format!("{}/{}", policy.metadata.namespace.as_deref().unwrap_or_default(), policy.metadata.name.as_deref().unwrap_or_default());
        objects.push((Resource::NetworkPolicies, key, serde_json::to_value(policy)?));
    }
    Ok(objects)
}

impl<'a> Session<'a> {
    /// Starts one agent per node on `kind`'s source, holding the three namespaces and nothing
    /// else, and waits until both are ready.
    pub fn start(testbed: &'a mut Testbed, suite: &'a Suite, kind: SourceKind, binary: &Path) -> Result<Session<'a>, RunError> {
        let cluster = &testbed.cluster;
        let dir = std::env::temp_dir().join(format!("netsieve-conformance-{}", cluster.id));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let empty = ModelState {
            namespaces: suite.namespaces.iter().map(|n| (n.name.clone(), n.labels.clone())).collect(),
            pods: BTreeMap::new(),
            policies: BTreeMap::new(),
            servers: super::format::Servers { ports: Vec::new(), protocols: Vec::new() },
        };
        let metrics = format!("127.0.0.1:{METRICS_PORT}");
        let (agents, source) = match kind {
            SourceKind::Manifests => {
                let file = dir.join("cluster.json");
                write_manifests(&file, &empty, &testbed.cluster)?;
                let agents = Agents::start(cluster, binary, &dir, &["--metrics-addr", &metrics, "--counters-interval", "0"])
                    .map_err(io("starting the agents"))?;
                (agents, Source::Manifests { file })
            }
            SourceKind::Api => {
                // The API server listens on each node's loopback, where that node's agent finds it.
                let listeners = cluster.node_loopback_listeners().map_err(|e| RunError::Agents(e.to_string()))?;
                let server = FakeApiServer::start(listeners).map_err(io("starting the API server"))?;
                let mut published = BTreeMap::new();
                for (resource, key, object) in objects(&empty)? {
                    server.apply(object.clone());
                    published.insert((resource, key), object);
                }
                let kubeconfigs = server.write_kubeconfigs(&dir).map_err(io("writing a kubeconfig"))?;
                let agents = Agents::against_api(cluster, binary, &kubeconfigs, &["--metrics-addr", &metrics, "--counters-interval", "0"])
                    .map_err(io("starting the agents"))?;
                (agents, Source::Api { server, published })
            }
        };
        let mut session = Session { agents, source, testbed, suite, dir, kind };
        for node in 0..NODES {
            let ready = eventually(Duration::from_secs(30), || {
                session.testbed.cluster.http_get(node, METRICS_PORT, "/readyz").is_some_and(|(code, _)| code == 200)
            });
            if !ready {
                let logs = session.agents.stop();
                return Err(RunError::Agents(format!("node{node}'s agent never became ready:\n{logs:#?}")));
            }
        }
        Ok(session)
    }

    /// Each agent's count of programmed changes.
    fn programmed_counts(&self) -> Result<Vec<u64>, RunError> {
        (0..NODES)
            .map(|node| {
                let (code, body) = self
                    .testbed
                    .cluster
                    .http_get(node, METRICS_PORT, "/metrics")
                    .ok_or_else(|| RunError::Agents(format!("node{node}'s agent does not serve its metrics")))?;
                if code != 200 {
                    return Err(RunError::Agents(format!("node{node}'s metrics: HTTP {code}")));
                }
                programmed_count(&body).ok_or_else(|| RunError::Agents(format!("node{node}'s metrics lack {PROGRAMMED_COUNT}")))
            })
            .collect()
    }

    /// Waits until every agent has programmed a change made after `before` was read.
    fn await_programmed(&self, before: &[u64], started: Instant) -> Result<Duration, RunError> {
        loop {
            let now = self.programmed_counts()?;
            if now.iter().zip(before).all(|(now, before)| now > before) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > PROGRAMMED_TIMEOUT {
                return Err(RunError::Agents(format!(
                    "the change was not programmed by every agent within {PROGRAMMED_TIMEOUT:?} (programmed counts {before:?} -> {now:?})"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes the agents' source hold `state` and waits until both agents have programmed it;
    /// returns how long the slowest change took.
    fn publish(&mut self, state: &ModelState) -> Result<Duration, RunError> {
        let target: BTreeMap<(Resource, String), Value> =
            objects(state)?.into_iter().map(|(resource, key, object)| ((resource, key), object)).collect();
        match &mut self.source {
            Source::Manifests { file } => {
                let file = file.clone();
                let before = self.programmed_counts()?;
                let started = Instant::now();
                write_manifests(&file, state, &self.testbed.cluster)?;
                self.await_programmed(&before, started)
            }
            Source::Api { published, .. } => {
                // Taken out while objects are sent one by one, and put back whatever happens,
                // so it always says what the server holds.
                let mut sent = std::mem::take(published);
                let result = self.send_to_api(&mut sent, &target);
                if let Source::Api { published, .. } = &mut self.source {
                    *published = sent;
                }
                result
            }
        }
    }

    /// API mode: deletes, creates and replaces objects one at a time until the server holds
    /// `target`, each time waiting until both agents have programmed the change. Deletions
    /// come first (policies, then pods, then namespaces), then creations and replacements
    /// (namespaces, then pods, then policies).
    fn send_to_api(
        &self,
        sent: &mut BTreeMap<(Resource, String), Value>,
        target: &BTreeMap<(Resource, String), Value>,
    ) -> Result<Duration, RunError> {
        let Source::Api { server, .. } = &self.source else {
            return Err(RunError::Agents("not in API mode".into()));
        };
        let deletions: Vec<(Resource, String)> = sent.keys().filter(|k| !target.contains_key(*k)).rev().cloned().collect();
        let mut slowest = Duration::ZERO;
        for (resource, key) in deletions {
            let before = self.programmed_counts()?;
            let started = Instant::now();
            server.delete(resource, &key);
            sent.remove(&(resource, key));
            slowest = slowest.max(self.await_programmed(&before, started)?);
        }
        for (key, object) in target {
            if sent.get(key) == Some(object) {
                continue;
            }
            let before = self.programmed_counts()?;
            let started = Instant::now();
            server.apply(object.clone());
            sent.insert(key.clone(), object.clone());
            slowest = slowest.max(self.await_programmed(&before, started)?);
        }
        Ok(slowest)
    }

    /// Runs one case from its model; every step is reported, also after a failure.
    pub fn run_case(&mut self, case: &Case) -> CaseReport {
        let started = Instant::now();
        let mut report = CaseReport::new(case);
        let file = &case.file;
        let serves_sctp = file.servers.protocols.contains(&Protocol::Sctp);
        if let (true, Err(reason)) = (serves_sctp, self.testbed.sctp.clone()) {
            // The Services are programmed anyway: both proxiers must accept SCTP Services.
            let services = match self.testbed.set_services(&file.pods, &file.servers) {
                Ok(()) => format!("its SCTP Services were programmed ({} kube-proxy)", self.testbed.proxy_mode()),
                Err(error) => format!("programming its SCTP Services failed too: {error}"),
            };
            report.row("-", "-", RowResult::Skip(format!("not runnable on this kernel ({reason}); {services}")));
            report.elapsed = started.elapsed();
            return report;
        }
        let mut state = ModelState::initial(self.suite, file);
        let start = self.testbed.set_services(&file.pods, &file.servers).map_err(RunError::from).and_then(|()| self.publish(&state));
        match start {
            Ok(took) => {
                report.programmed_in.push(took);
                let pods: Vec<String> = file.pods.iter().map(ToString::to_string).collect();
                report.row("0: model", "-", RowResult::Done(format!("pods {}, no policy; programmed in {}", pods.join(", "), ms(took))));
            }
            Err(error) => {
                report.row("0: model", "-", RowResult::Fail(format!("could not set up the case: {error}")));
                report.elapsed = started.elapsed();
                return report;
            }
        }
        for (index, step) in file.steps.iter().enumerate() {
            let number = index + 1;
            match step {
                Step::WaitForServers { probes } => {
                    for probe in probes {
                        self.wait_for_servers(&mut report, number, &file.pods, probe);
                    }
                }
                Step::Probe(probe) => self.check_probe(&mut report, number, probe),
                change => {
                    let label = format!("{number}: {}", describe_change(change));
                    let result = state.apply(change).map_err(RunError::from).and_then(|()| self.publish(&state));
                    match result {
                        Ok(took) => {
                            report.programmed_in.push(took);
                            report.row(label, "-", RowResult::Done(format!("programmed in {}", ms(took))));
                        }
                        Err(error) => report.row(label, "-", RowResult::Fail(error.to_string())),
                    }
                }
            }
        }
        report.elapsed = started.elapsed();
        report
    }

    /// Upstream's `waitForHTTPServers`: before any policy, the whole matrix must connect within
    /// 10 rounds.
    fn wait_for_servers(&self, report: &mut CaseReport, number: usize, pods: &[PodRef], probe: &Probe) {
        let cells = off_diagonal(pods);
        let label = format!("{number}: wait for servers {}/{}", probe.port, probe.protocol);
        let expectation = format!("all {} connect", cells.len());
        let mut last = Vec::new();
        for round in 1..=SERVER_WAIT_ROUNDS {
            let results = self.testbed.probe_all(&cells, probe.port, probe.protocol, PROBE_TIMEOUT);
            last = cells.iter().zip(&results).filter(|(_, r)| **r != Connectivity::Connected).map(|((f, t), r)| cell_text(f, t, r)).collect();
            if last.is_empty() {
                report.row(label, expectation, RowResult::Pass(format!("round {round}")));
                return;
            }
            std::thread::sleep(SERVER_WAIT_PAUSE);
        }
        report.row(label, expectation, RowResult::Fail(format!("after {SERVER_WAIT_ROUNDS} rounds: {}", last.join(", "))));
    }

    /// Upstream's `ValidateOrFail`: probes the matrix; if a cell disagrees, probes it all
    /// once more and the second round decides. The diagonal is not asserted (upstream's
    /// `ignoreLoopback`), so it is not probed.
    fn check_probe(&self, report: &mut CaseReport, number: usize, probe: &Probe) {
        let label = format!("{number}: probe {}/{}", probe.port, probe.protocol);
        let expected = match Matrix::parse(&probe.expected) {
            Ok(m) => m,
            Err(error) => {
                report.row(label, "-", RowResult::Fail(format!("the case's matrix does not parse: {error}")));
                return;
            }
        };
        let cells: Vec<(PodRef, PodRef, bool)> =
            expected.cells().filter(|(f, t, _)| f != t).map(|(f, t, v)| (f.clone(), t.clone(), v)).collect();
        let pairs: Vec<(PodRef, PodRef)> = cells.iter().map(|(f, t, _)| (f.clone(), t.clone())).collect();
        let wrong = |results: &[Connectivity]| -> Vec<String> {
            cells
                .iter()
                .zip(results)
                .filter(|((_, _, want), got)| **got != if *want { Connectivity::Connected } else { Connectivity::Blocked })
                .map(|((f, t, want), got)| format!("{} (upstream: {})", cell_text(f, t, got), if *want { "connects" } else { "blocked" }))
                .collect()
        };
        let first = wrong(&self.testbed.probe_all(&pairs, probe.port, probe.protocol, PROBE_TIMEOUT));
        let (last, rounds) = if first.is_empty() {
            (first.clone(), 1)
        } else {
            (wrong(&self.testbed.probe_all(&pairs, probe.port, probe.protocol, PROBE_TIMEOUT)), 2)
        };
        let checked = report.checked.entry(probe.protocol).or_default();
        checked.matrices += 1;
        checked.cells += cells.len();
        checked.second_rounds += usize::from(rounds == 2);
        let expectation = describe_expectation(&cells);
        if last.is_empty() {
            let note = if rounds == 2 { format!("; 2nd round needed, 1st: {}", first.join(", ")) } else { String::new() };
            report.row(label, expectation, RowResult::Pass(format!("{}/{} cells{note}", cells.len(), cells.len())));
        } else {
            checked.matrices_failed += 1;
            checked.cells_failed += last.len();
            report.row(label, expectation, RowResult::Fail(format!("{} of {} cells wrong in both rounds: {}", last.len(), cells.len(), last.join(", "))));
        }
    }

    /// Stops the agents (SIGTERM), removes the scratch files; (exited cleanly, stderr) per
    /// agent.
    pub fn finish(mut self) -> Vec<(bool, String)> {
        let logs = self.agents.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        remove_mount_root(&self.testbed.cluster);
        logs
    }

    pub fn kind(&self) -> SourceKind {
        self.kind
    }
}

/// The count of programmed changes in an agent's metrics exposition.
fn programmed_count(exposition: &str) -> Option<u64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(PROGRAMMED_COUNT)?.trim();
        value.parse::<f64>().ok().map(|v| v as u64)
    })
}

/// Writes every object into one file, atomically: the agent reloads it as one change.
fn write_manifests(file: &Path, state: &ModelState, cluster: &crate::netns::Cluster) -> Result<(), RunError> {
    let mut items: Vec<Value> = objects(state)?.into_iter().map(|(_, _, object)| object).collect();
    // Nodes: the agent's node-traffic exception needs their addresses (the API mode learns
    // them from the pods' hostIPs).
    items.extend(crate::service_cluster::node_objects(cluster));
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    write_atomically(file, &serde_json::to_string_pretty(&list)?).map_err(io(format!("writing {}", file.display())))
}

fn off_diagonal(pods: &[PodRef]) -> Vec<(PodRef, PodRef)> {
    pods.iter().flat_map(|f| pods.iter().filter(move |t| *t != f).map(move |t| (f.clone(), t.clone()))).collect()
}

fn cell_text(from: &PodRef, to: &PodRef, got: &Connectivity) -> String {
    match got {
        Connectivity::Connected => format!("{from}->{to} connected"),
        Connectivity::Blocked => format!("{from}->{to} blocked"),
        Connectivity::WrongBackend(pod) => format!("{from}->{to} answered by {pod}"),
    }
}

/// The asserted cells in a line: all connect, all blocked, or the smaller of the two sets.
fn describe_expectation(cells: &[(PodRef, PodRef, bool)]) -> String {
    let total = cells.len();
    let blocked: Vec<String> = cells.iter().filter(|c| !c.2).map(|(f, t, _)| format!("{f}->{t}")).collect();
    let connected: Vec<String> = cells.iter().filter(|c| c.2).map(|(f, t, _)| format!("{f}->{t}")).collect();
    if blocked.is_empty() {
        format!("all {total} connect")
    } else if connected.is_empty() {
        format!("all {total} blocked")
    } else if blocked.len() <= connected.len() {
        format!("{total} cells; blocked: {}", blocked.join(", "))
    } else {
        format!("{total} cells; only these connect: {}", connected.join(", "))
    }
}

fn describe_change(step: &Step) -> String {
    let name = |policy: &serde_yaml::Value| {
        super::state::policy_key(policy).map_or_else(|_| "?".to_string(), |(ns, name)| format!("{ns}/{name}"))
    };
    match step {
        Step::CreatePolicy { policy } => format!("create policy {}", name(policy)),
        Step::UpdatePolicy { policy } => format!("update policy {}", name(policy)),
        Step::AddNamespaceLabel { namespace, key, value } => format!("label namespace {namespace} {key}={value}"),
        Step::AddPodLabels { pod, labels } => {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("label pod {pod} {}", labels.join(","))
        }
        Step::DeleteAllPolicies { namespaces, sleep_seconds } => {
            format!("delete all policies in {} (upstream then sleeps {sleep_seconds} s; here: until programmed)", namespaces.join(", "))
        }
        Step::WaitForServers { .. } | Step::Probe(_) => String::new(),
    }
}

fn ms(duration: Duration) -> String {
    format!("{} ms", duration.as_millis())
}

/// The result of running a set of cases on one test bed and source.
pub struct SuiteReport {
    /// e.g. `manifests mode, iptables kube-proxy`
    pub label: String,
    pub cases: Vec<CaseReport>,
    /// Checks of the test bed itself, before the agents started.
    pub preamble: Vec<String>,
    /// (exited cleanly, stderr) of each agent.
    pub agents: Vec<(bool, String)>,
    pub elapsed: Duration,
}

impl SuiteReport {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.cases.iter().filter(|c| c.outcome() == outcome).count()
    }

    pub fn failed(&self) -> Vec<&CaseReport> {
        self.cases.iter().filter(|c| c.outcome() == Outcome::Failed).collect()
    }

    /// What was checked, per protocol, over every case.
    pub fn checked(&self) -> BTreeMap<Protocol, (usize, Checked)> {
        let mut by_protocol: BTreeMap<Protocol, (usize, Checked)> = BTreeMap::new();
        for case in &self.cases {
            for (protocol, checked) in &case.checked {
                let entry = by_protocol.entry(*protocol).or_default();
                entry.0 += 1;
                entry.1.matrices += checked.matrices;
                entry.1.matrices_failed += checked.matrices_failed;
                entry.1.cells += checked.cells;
                entry.1.cells_failed += checked.cells_failed;
                entry.1.second_rounds += checked.second_rounds;
            }
        }
        by_protocol
    }

    pub fn summary(&self) -> String {
        let run = self.cases.len() - self.count(Outcome::Skipped);
        let mut text = format!(
            "{}: {} cases, {run} run: {} passed, {} failed; {} skipped",
            self.label,
            self.cases.len(),
            self.count(Outcome::Passed),
            self.count(Outcome::Failed),
            self.count(Outcome::Skipped),
        );
        for (protocol, (cases, checked)) in self.checked() {
            let _ = write!(
                text,
                "; {protocol}: {cases} cases, {} matrices ({} failed, {} needed a 2nd round), {} cells ({} wrong)",
                checked.matrices, checked.matrices_failed, checked.second_rounds, checked.cells, checked.cells_failed
            );
        }
        let mut programmed: Vec<Duration> = self.cases.iter().flat_map(|c| c.programmed_in.iter().copied()).collect();
        programmed.sort();
        if let (Some(max), Some(median)) = (programmed.last(), programmed.get(programmed.len() / 2)) {
            let _ = write!(text, "; {} changes programmed by both agents in {} median, {} max", programmed.len(), ms(*median), ms(*max));
        }
        let _ = write!(text, "; wall time {:.1} s", self.elapsed.as_secs_f64());
        text
    }

    /// The table: case, step, upstream expectation, result; a case's first row names it.
    pub fn markdown(&self) -> String {
        let mut text = format!("### {}\n\n", self.label);
        for line in &self.preamble {
            let _ = writeln!(text, "- {line}");
        }
        text.push_str("\n| case | upstream `It` | step | upstream expects | result |\n|---|---|---|---|---|\n");
        for case in &self.cases {
            let outcome = match case.outcome() {
                Outcome::Passed => "PASS",
                Outcome::Failed => "**FAIL**",
                Outcome::Skipped => "SKIP",
            };
            for (index, row) in case.rows.iter().enumerate() {
                let (case_cell, it_cell) = if index == 0 {
                    (format!("{} {outcome} ({:.1} s)", case.id, case.elapsed.as_secs_f64()), case.it.replace('|', "\\|"))
                } else {
                    (String::new(), String::new())
                };
                let result = match &row.result {
                    RowResult::Pass(detail) => format!("pass: {detail}"),
                    RowResult::Fail(detail) => format!("**FAIL**: {detail}"),
                    RowResult::Done(detail) => detail.clone(),
                    RowResult::Skip(detail) => format!("SKIP: {detail}"),
                };
                let _ = writeln!(text, "| {case_cell} | {it_cell} | {} | {} | {} |", row.step, row.expectation, result.replace('|', "\\|"));
            }
        }
        let _ = writeln!(text, "\n{}", self.summary());
        text
    }
}

/// Builds the test bed, checks that the Service path keeps client addresses, starts the
/// agents on `kind`'s source, runs every case `select` picks, in file order, and stops the
/// agents. Errors only when the test bed or the agents cannot be set up; case failures are in
/// the report.
pub fn run_suite(
    label: &str,
    tag: &str,
    mode: ProxyMode,
    kind: SourceKind,
    binary: &Path,
    select: &dyn Fn(&Case) -> bool,
) -> Result<SuiteReport, RunError> {
    let started = Instant::now();
    let suite = super::load_suite()?;
    let cases: Vec<Case> = super::load_cases()?.into_iter().filter(|c| select(c)).collect();
    let mut testbed = Testbed::build(tag, mode)?;
    let mut preamble = vec![format!(
        "test bed: 2 nodes, pods {} ({} kube-proxy); SCTP sockets: {}",
        super::testbed::layout().iter().map(|(p, n)| format!("{p}@node{n}")).collect::<Vec<_>>().join(", "),
        mode,
        match &testbed.sctp {
            Ok(()) => "available".to_string(),
            Err(reason) => format!("unavailable ({reason})"),
        }
    )];
    preamble.extend(check_client_addresses(&mut testbed)?);
    let mut session = Session::start(&mut testbed, &suite, kind, binary)?;
    let reports: Vec<CaseReport> = cases.iter().map(|case| session.run_case(case)).collect();
    let agents = session.finish();
    drop(testbed);
    Ok(SuiteReport { label: label.to_string(), cases: reports, preamble, agents, elapsed: started.elapsed() })
}

/// Upstream's ingress rules select clients by pod and namespace labels through ClusterIPs, so
/// kube-proxy must not masquerade pod-to-Service traffic: checked on a same-node and a
/// cross-node pair before the agents start.
fn check_client_addresses(testbed: &mut Testbed) -> Result<Vec<String>, RunError> {
    let pod = |ns: &str, name: &str| PodRef { namespace: ns.into(), name: name.into() };
    let (client, same_node, other_node) = (pod("x", "a"), pod("x", "c"), pod("x", "b"));
    let servers = super::format::Servers { ports: vec![80], protocols: vec![Protocol::Tcp] };
    testbed.set_services(&[client.clone(), same_node.clone(), other_node.clone()], &servers)?;
    let mut lines = Vec::new();
    for server in [same_node, other_node] {
        let (client_addr, seen) = testbed.source_seen_by_backend(&client, &server)?;
        if client_addr.ip() != seen.ip() {
            return Err(RunError::Agents(format!(
                "kube-proxy masqueraded {client} -> {server}'s ClusterIP: the backend sees {seen}, not {client_addr}"
            )));
        }
        lines.push(format!("no masquerade on the Service path: {client} -> ClusterIP of {server}, the backend sees {seen} (the client's pod address)"));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programmed_count_is_read_from_the_exposition() {
        let text = "# TYPE netsieve_policy_programming_duration_seconds histogram\n\
                    netsieve_policy_programming_duration_seconds_bucket{le=\"0.001\"} 3\n\
                    netsieve_policy_programming_duration_seconds_sum 0.02\n\
                    netsieve_policy_programming_duration_seconds_count 7\n";
        assert_eq!(programmed_count(text), Some(7));
        assert_eq!(programmed_count("netsieve_ready 1\n"), None);
    }

    #[test]
    fn expectations_list_the_smaller_set() {
        let p = |s: &str| PodRef::try_from(s.to_string()).expect("pod");
        let cells = vec![(p("x/a"), p("x/b"), false), (p("x/b"), p("x/a"), true), (p("y/a"), p("x/a"), true)];
        assert_eq!(describe_expectation(&cells), "3 cells; blocked: x/a->x/b");
        assert_eq!(describe_expectation(&cells[1..]), "all 2 connect");
        assert_eq!(describe_expectation(&cells[..1]), "all 1 blocked");
    }

    #[test]
    fn case_ids_are_group_and_number() {
        let cases = crate::conformance::load_cases().expect("cases");
        let ids: Vec<String> = cases.iter().map(case_id).collect();
        assert!(ids.contains(&"netpol/01".to_string()) && ids.contains(&"netpol-udp/02".to_string()), "{ids:?}");
        let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }
}
