//! The on-disk format of the conformance cases: `conformance/suite.yaml` (what every case shares)
//! and one YAML file per upstream `It` under `conformance/cases/`. README.md in
//! `tests/conformance/` documents every field; the types here are that description made strict
//! (`deny_unknown_fields` everywhere, so a misspelt key is an error, not a silently lost fact).
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// `suite.yaml`: where the cases come from and the parts of upstream's model that no case
/// changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    pub upstream: UpstreamSource,
    /// The three namespaces every upstream case creates (also when it puts no pod in one).
    pub namespaces: Vec<NamespaceSpec>,
    /// Upstream's `ignoreLoopback` constant: a pod's probe of its own Service never fails a case.
    pub ignore_loopback: bool,
    pub probe: ProbeRules,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSource {
    pub repository: String,
    /// Directory of the suite in that repository.
    pub directory: String,
    /// File (relative to `directory`) -> the commit of the stored version that was read.
    pub files: BTreeMap<String, UpstreamFile>,
    /// Pull requests whose effect on the files matters to the encoding.
    #[serde(default)]
    pub pull_requests: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub commit: String,
    pub role: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    /// The name the cases use (`x`, `y`, `z`); policies refer to namespaces by this name.
    pub name: String,
    /// How upstream names it (`<framework base name>-x-<random suffix>`), for the record.
    pub upstream_name: String,
    /// The labels the namespace carries when a case starts.
    pub labels: BTreeMap<String, String>,
}

/// How upstream probes: documented here so the runner (phase 2) can follow it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeRules {
    /// What the client connects to: `service-cluster-ip`.
    pub target: String,
    pub command: String,
    pub timeout_seconds: u32,
    pub retries: String,
}

/// One upstream `It`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    pub upstream: UpstreamTest,
    /// The servers every pod of the case runs (upstream's `ports` and `protocols`).
    pub servers: Servers,
    /// The pods upstream creates for the case (`initializeResources(..., "x/a", ...)`).
    pub pods: Vec<PodRef>,
    /// Written as one-key maps (`- create_policy: {...}`), here and in nested enums.
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub steps: Vec<Step>,
    /// Anything about the case a reader should know that the data cannot say.
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTest {
    /// The `SIGDescribe` text with its arguments, e.g. `[sig-network] Netpol [LinuxOnly]`.
    pub describe: String,
    /// The `ginkgo.Context` text.
    pub context: String,
    /// The `It` text.
    pub it: String,
    /// Ginkgo labels on the `It` (`feature.NetworkPolicy` -> `Feature:NetworkPolicy`).
    pub labels: Vec<String>,
}

impl UpstreamTest {
    /// The spec's full text as ginkgo joins it: describe, context, It, then the labels.
    pub fn full_name(&self) -> String {
        let labels: String = self.labels.iter().map(|l| format!(" [{l}]")).collect();
        format!("{} {} {}{labels}", self.describe, self.context, self.it)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Servers {
    pub ports: Vec<u16>,
    pub protocols: Vec<Protocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pod as upstream writes it: `namespace/name` (`x/a`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl TryFrom<String> for PodRef {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        match text.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(PodRef { namespace: namespace.to_string(), name: name.to_string() })
            }
            _ => Err(format!("pod {text:?} is not of the form namespace/name")),
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a case does, in upstream's order.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Upstream's `waitForHTTPServers`: before any policy, every (port, protocol) the servers
    /// use is probed between all pods until the whole matrix connects (up to 10 rounds).
    WaitForServers { probes: Vec<Probe> },
    /// `CreatePolicy`: the policy as `kubectl get -o yaml` prints it (server-set metadata left
    /// out); may hold `${host_cidr:ns/pod}` / `${large_cidr:ns/pod}` (see `model`).
    CreatePolicy { policy: serde_yaml::Value },
    /// `UpdatePolicy`: replaces the named policy with this object.
    UpdatePolicy { policy: serde_yaml::Value },
    /// `AddNamespaceLabel`: sets one label on a namespace (the others stay).
    AddNamespaceLabel { namespace: String, key: String, value: String },
    /// `AddPodLabels`: sets these labels on the pod (the others stay).
    AddPodLabels { pod: PodRef, labels: BTreeMap<String, String> },
    /// `k8s.cleanNetworkPolicies`: deletes every policy in these namespaces, then upstream
    /// sleeps `sleep_seconds` before probing.
    DeleteAllPolicies { namespaces: Vec<String>, sleep_seconds: u32 },
    /// `ValidateOrFail`: probes every pod's Service from every pod on one port and protocol and
    /// compares with the expected matrix.
    Probe(Probe),
}

/// One probed matrix: upstream's `TestCase{ToPort, Protocol, Reachability}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
    /// How upstream builds the expectation, transcribed call by call.
    pub reachability: ReachabilityBuild,
    /// The expectation written out: rows are clients, columns servers, `.` connects, `X` does
    /// not (upstream's `TruthTable.PrettyPrint` symbols).
    pub expected: String,
}

/// `NewReachability(pods, default)` followed by `ops` in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReachabilityBuild {
    pub default: bool,
    #[serde(default)]
    pub ops: Vec<ReachabilityOp>,
}

/// Upstream's `Reachability` methods, by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReachabilityOp {
    /// `Expect(from, to, connected)`
    Expect { from: PodRef, to: PodRef, connected: bool },
    /// `ExpectAllIngress(pod, connected)`: every client -> `pod`.
    ExpectAllIngress { pod: PodRef, connected: bool },
    /// `ExpectAllEgress(pod, connected)`: `pod` -> every server.
    ExpectAllEgress { pod: PodRef, connected: bool },
    /// `ExpectPeer(&Peer{...}, &Peer{...}, connected)`: empty fields match everything.
    ExpectPeer { from: Peer, to: Peer, connected: bool },
}

/// Upstream's `Peer`: an empty namespace or pod matches every one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub pod: Option<String>,
}

impl Peer {
    pub fn matches(&self, pod: &PodRef) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == pod.namespace)
            && self.pod.as_ref().is_none_or(|name| *name == pod.name)
    }
}
