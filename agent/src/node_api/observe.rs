//! The observability messages of the node API: verdict events (`subscribe`), the node's
//! status (`status`) and the live explanation of a flow (`explain`). Shared by the agent and
//! the `netsieve monitor`, `status` and `explain --agent` commands.
//!
//! A verdict event, as `netsieve monitor --output json` prints it (one object per line; shown
//! wrapped):
//!
//! ```json
//! {"time":"2026-11-30T10:15:02.123456789Z","node":"node0","verdict":"dropped",
//!  "reason":"policy_denied","direction":"ingress","protocol":"TCP",
//!  "src":{"ip":"10.250.0.11","port":40312,"namespace":"default","pod":"interactivetest"},
//!  "dst":{"ip":"10.250.0.10","port":80,"namespace":"default","pod":"nginx-1"},
//!  "endpoint":{"namespace":"default","pod":"nginx-1","interface":"h3f2a1c0","ifindex":7},
//!  "hook":"tc"}
//! ```
//!
//! `rule` (the NetworkPolicy rule that admitted an allowed flow), `service` (the destination
//! before kube-proxy's DNAT, for flows judged after it) and `detail` appear when they apply.
use crate::policy::{DirectionVerdict, Exception, Flow};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// What happened to the packet an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EventVerdict {
    /// Dropped by policy or for a structural reason (malformed, spoofed, ...).
    Dropped,
    /// The first packet of an allowed flow (only with `agent --events-allowed`).
    Allowed,
    /// Policy would have dropped it; passed because the pod is in audit mode.
    Audit,
}

impl EventVerdict {
    pub fn name(self) -> &'static str {
        match self {
            EventVerdict::Dropped => "dropped",
            EventVerdict::Allowed => "allowed",
            EventVerdict::Audit => "audit",
        }
    }
}

/// Direction from the enforced pod's side: `ingress` is traffic to the pod, `egress` traffic
/// it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EventDirection {
    Ingress,
    Egress,
}

impl EventDirection {
    pub fn name(self) -> &'static str {
        match self {
            EventDirection::Ingress => "ingress",
            EventDirection::Egress => "egress",
        }
    }
}

/// One end of a flow: its address and port and, when the agent knows it, its pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPeer {
    pub ip: IpAddr,
    /// TCP/UDP/SCTP port; the echo identifier for ICMP echo; 0 when the packet has none.
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Set when the address is one of this node's own (kubelet, host-network pods).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node: bool,
}

/// The local pod whose policy (or anti-spoofing) judged the packet, and its interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRef {
    pub namespace: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    pub ifindex: u32,
}

/// A NetworkPolicy rule: `policy` is `namespace/name`, `index` the rule's position in the
/// policy's `ingress` or `egress` list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    pub policy: String,
    pub direction: EventDirection,
    pub index: usize,
    /// The rule shares its counter with other rules (past 64 rule groups in one direction of
    /// one pod, rules with the same ports share one): counts are the group's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// An address and port (the Service address a flow was sent to, a conntrack backend).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketRef {
    pub ip: IpAddr,
    pub port: u16,
}

/// One verdict event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// When the kernel judged the packet (RFC 3339, UTC).
    pub time: String,
    pub node: String,
    pub verdict: EventVerdict,
    /// Why: for drops and audits the drop reason of the metrics (`policy_denied`, `spoofed`,
    /// `malformed`, `no_endpoint`, `fragment_unknown`, `map_full` = the pod is programmed
    /// fail-closed, see `detail`); for allowed flows `rule` (a policy rule admitted it),
    /// `not_isolated` (no policy covers this direction) or `exception` (the pod itself, its
    /// node).
    pub reason: String,
    pub direction: EventDirection,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, or the IP protocol number.
    pub protocol: String,
    pub src: FlowPeer,
    pub dst: FlowPeer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<EndpointRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
    /// The destination before kube-proxy's DNAT (a Service ClusterIP and port); `dst` is the
    /// backend the verdict was taken on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<SocketRef>,
    /// `tc` (the pod's veth) or `netfilter` (after kube-proxy's DNAT).
    pub hook: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Which events a subscriber wants; every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFilter {
    /// Either end of the flow is a pod of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Either end is this pod: `name` (with `namespace`, or in any namespace) or
    /// `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Any of these verdicts (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<EventVerdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<EventDirection>,
    /// Any of these reasons (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

/// Most entries a filter list may have.
pub const MAX_FILTER_VALUES: usize = 16;

impl EventFilter {
    pub fn matches(&self, event: &FlowEvent) -> bool {
        let peers = [&event.src, &event.dst];
        if let Some(namespace) = &self.namespace
            && !peers.iter().any(|p| p.namespace.as_deref() == Some(namespace.as_str()))
        {
            return false;
        }
        if let Some(pod) = &self.pod {
            let (namespace, name) = match pod.split_once('/') {
                Some((namespace, name)) => (Some(namespace), name),
                None => (self.namespace.as_deref(), pod.as_str()),
            };
            let is_pod = |p: &FlowPeer| {
                p.pod.as_deref() == Some(name) && namespace.is_none_or(|ns| p.namespace.as_deref() == Some(ns))
            };
            if !peers.iter().any(|p| is_pod(p)) {
                return false;
            }
        }
        if !self.verdicts.is_empty() && !self.verdicts.contains(&event.verdict) {
            return false;
        }
        if self.direction.is_some_and(|d| d != event.direction) {
            return false;
        }
        self.reasons.is_empty() || self.reasons.contains(&event.reason)
    }

    /// Bounds on what a client may ask for.
    pub fn validate(&self) -> Result<(), String> {
        let short = |what: &str, value: &str, max: usize| {
            if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
                Err(format!("filter {what} must have 1 to {max} printable characters"))
            } else {
                Ok(())
            }
        };
        if let Some(namespace) = &self.namespace {
            short("namespace", namespace, 63)?;
        }
        if let Some(pod) = &self.pod {
            short("pod", pod, 63 + 1 + 253)?;
        }
        if self.verdicts.len() > MAX_FILTER_VALUES || self.reasons.len() > MAX_FILTER_VALUES {
            return Err(format!("at most {MAX_FILTER_VALUES} verdicts and reasons"));
        }
        for reason in &self.reasons {
            short("reason", reason, 64)?;
        }
        Ok(())
    }
}

/// How the agent emits events (its flags).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSettings {
    /// Events each CPU may emit per second (0: events off).
    pub per_second: u32,
    pub burst: u32,
    /// Allowed flows are reported (their first packet).
    pub allowed_flows: bool,
}

/// `subscribe`: stream verdict events matching `filter`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSubscription {
    #[serde(default)]
    pub filter: EventFilter,
}

/// `explain`: a flow to judge against the state the agent enforces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainQuery {
    /// `NAMESPACE/POD` or an IP address.
    pub from: String,
    pub to: String,
    /// Destination port (ignored for ICMP).
    #[serde(default)]
    pub port: u16,
    /// `TCP`, `UDP`, `SCTP` or `ICMP`.
    pub protocol: String,
    /// With it, conntrack is looked up for exactly this source port; without, every entry of
    /// the flow's addresses and destination port is listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
}

/// Audit mode on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditStatus {
    /// `agent --audit`: every local pod.
    pub node_wide: bool,
    /// Namespaces annotated `netsieve.io/audit: "true"`.
    pub namespaces: Vec<String>,
}

impl AuditStatus {
    pub fn is_active(&self) -> bool {
        self.node_wide || !self.namespaces.is_empty()
    }

    /// One phrase for people: `node-wide`, `namespaces a, b`.
    pub fn describe(&self) -> String {
        match (self.node_wide, self.namespaces.is_empty()) {
            (true, _) => "node-wide".to_string(),
            (false, false) => format!("namespaces {}", self.namespaces.join(", ")),
            (false, true) => "off".to_string(),
        }
    }
}

/// Packets per verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketCounts {
    pub allowed: u64,
    pub denied: u64,
    /// Would-be drops passed by audit mode.
    pub audited: u64,
}

/// A rule of a policy selecting the endpoint, with the packets it admitted there since the
/// agent started (carried over reprogrammings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStatus {
    pub policy: String,
    pub index: usize,
    pub packets: u64,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// One direction of a local endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStatus {
    /// Some policy covers this direction.
    pub isolated: bool,
    /// The policies selecting the pod for this direction.
    pub policies: Vec<String>,
    pub packets: PacketCounts,
    /// The rules the pod is programmed with, and what each admitted. A rule at 0 packets
    /// never matched.
    pub rules: Vec<RuleStatus>,
}

/// How an endpoint is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointMode {
    /// Its NetworkPolicies.
    Policy,
    /// Everything but node traffic dropped: a policy that does not compile, full maps.
    FailClosed,
    /// Registered by CNI ADD before its Pod object is known: fail-closed until it is.
    Placeholder,
}

/// A local endpoint as programmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub namespace: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    pub ifindex: u32,
    /// The pod's security identity (its namespace and label set).
    pub identity: u32,
    pub addresses: Vec<IpAddr>,
    pub mode: EndpointMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_closed_reason: Option<String>,
    pub audit: bool,
    /// When this programming was written (RFC 3339); reprogrammed on every change that
    /// affects the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed_at: Option<String>,
    pub ingress: DirectionStatus,
    pub egress: DirectionStatus,
}

/// Entries and capacity of a BPF map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapPressure {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
}

/// Packets counted for a reason and direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub reason: String,
    pub direction: EventDirection,
    pub packets: u64,
}

/// The event path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventStatus {
    pub settings: EventSettings,
    /// Events the programs wrote to the ring buffer.
    pub emitted: u64,
    /// Events not emitted: the CPU's rate limit was exhausted, or the ring was full.
    pub rate_limited: u64,
    pub ring_full: u64,
    /// Events the agent read from the ring.
    pub read: u64,
    /// Events not delivered: the agent's queue was full, or a subscriber's.
    pub dropped_agent_busy: u64,
    pub dropped_slow_subscribers: u64,
    pub subscribers: u64,
}

/// `status`: what the agent enforces on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub agent_version: String,
    pub ready: bool,
    /// `ready`, or why not.
    pub readiness: String,
    /// `kubernetes-api` or `manifests:DIR`.
    pub source: String,
    pub audit: AuditStatus,
    /// When the maps were last written (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_programmed: Option<String>,
    /// Whether the netfilter program is attached: while some local pod's egress is enforced
    /// (`egress_enforced`), unless attaching it failed.
    pub netfilter_hook: bool,
    /// Whether some local pod's egress is enforced.
    #[serde(default)]
    pub egress_enforced: bool,
    pub events: EventStatus,
    pub maps: Vec<MapPressure>,
    pub drops: Vec<ReasonCount>,
    pub audited: Vec<ReasonCount>,
    pub endpoints: Vec<EndpointStatus>,
}

/// What the programmed maps of one local endpoint say about a flow, besides the semantics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgrammedCheck {
    /// `namespace/name` of the local pod.
    pub pod: String,
    pub direction: EventDirection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    pub ifindex: u32,
    pub mode: EndpointMode,
    pub audit: bool,
    pub isolated: bool,
    /// The peer's identity in the programmed ipcache (0: world, 1: this node).
    pub peer_identity: u32,
    /// The verdict the programmed entries give a new flow.
    pub allowed: bool,
    /// The rule(s) of the admitting group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleRef>,
    /// Whether `allowed` is the semantics' verdict for this direction.
    pub agrees: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One conntrack entry of the flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackFlow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    pub ifindex: u32,
    /// The pod the entry belongs to (whose interface it is keyed on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub initiator: SocketRef,
    pub responder: SocketRef,
    /// The direction, from that pod's side, the flow was opened in.
    pub direction: EventDirection,
    /// `new`, `established` or `closing`.
    pub state: String,
    /// When a packet of the flow was last seen (RFC 3339; refreshed at most once a second).
    pub last_seen: String,
    pub idle_seconds: u64,
    /// Since when the entry holds its verdict (RFC 3339): the flow's admission, or its last
    /// re-admission after a policy or ipcache change.
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub age_seconds: u64,
    /// Under the endpoint's current programming and ipcache; otherwise its next packet is
    /// judged again.
    pub current: bool,
    pub audit: bool,
    /// The egress verdict was left to the netfilter hook after DNAT, which chose `backend`.
    pub deferred: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<SocketRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleRef>,
}

/// The conntrack lookup of a live explanation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackLookup {
    /// Entries read (the whole table is scanned without `source_port`).
    pub scanned: u64,
    pub entries: Vec<ConntrackFlow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `explain`: the verdict of the semantics on the state the agent enforces (the fields of
/// `netsieve explain --output json`), what the programmed maps say, and conntrack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveExplanation {
    pub allowed: bool,
    pub flow: Flow,
    pub exception: Option<Exception>,
    pub egress: DirectionVerdict,
    pub ingress: DirectionVerdict,
    pub node: String,
    /// The local endpoints of the flow on this node.
    pub programmed: Vec<ProgrammedCheck>,
    pub conntrack: ConntrackLookup,
}

#[cfg(test)]
impl FlowPeer {
    /// A pod's end of a flow (tests).
    pub(crate) fn pod_for_tests(ip: &str, port: u16, namespace: &str, pod: &str) -> FlowPeer {
        FlowPeer { ip: ip.parse().expect("ip"), port, namespace: Some(namespace.into()), pod: Some(pod.into()), node: false }
    }
}

#[cfg(test)]
impl FlowEvent {
    /// A TCP packet from `src` to `dst` dropped by ingress policy at TC on node0 (tests).
    pub(crate) fn dropped_for_tests(time: &str, src: FlowPeer, dst: FlowPeer) -> FlowEvent {
        FlowEvent {
            time: time.into(),
            node: "node0".into(),
            verdict: EventVerdict::Dropped,
            reason: "policy_denied".into(),
            direction: EventDirection::Ingress,
            protocol: "TCP".into(),
            src,
            dst,
            endpoint: None,
            rule: None,
            service: None,
            hook: "tc".into(),
            detail: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> FlowEvent {
        FlowEvent::dropped_for_tests(
            "2026-11-30T10:15:02.123456789Z",
            FlowPeer::pod_for_tests("10.0.0.2", 40000, "default", "client"),
            FlowPeer::pod_for_tests("10.0.0.1", 80, "web", "nginx"),
        )
    }

    #[test]
    fn filters_match_either_end_and_every_field() {
        let e = event();
        let filter = |f: EventFilter| f.matches(&e);
        assert!(filter(EventFilter::default()));
        assert!(filter(EventFilter { namespace: Some("web".into()), ..Default::default() }));
        assert!(filter(EventFilter { namespace: Some("default".into()), ..Default::default() }));
        assert!(!filter(EventFilter { namespace: Some("kube-system".into()), ..Default::default() }));
        assert!(filter(EventFilter { pod: Some("nginx".into()), ..Default::default() }));
        assert!(filter(EventFilter { pod: Some("web/nginx".into()), ..Default::default() }));
        assert!(!filter(EventFilter { pod: Some("default/nginx".into()), ..Default::default() }));
        // A bare pod name with a namespace filter is that namespace's pod.
        assert!(!filter(EventFilter { namespace: Some("default".into()), pod: Some("nginx".into()), ..Default::default() }));
        assert!(filter(EventFilter { verdicts: vec![EventVerdict::Audit, EventVerdict::Dropped], ..Default::default() }));
        assert!(!filter(EventFilter { verdicts: vec![EventVerdict::Allowed], ..Default::default() }));
        assert!(filter(EventFilter { direction: Some(EventDirection::Ingress), ..Default::default() }));
        assert!(!filter(EventFilter { direction: Some(EventDirection::Egress), ..Default::default() }));
        assert!(filter(EventFilter { reasons: vec!["spoofed".into(), "policy_denied".into()], ..Default::default() }));
        assert!(!filter(EventFilter { reasons: vec!["spoofed".into()], ..Default::default() }));
    }

    #[test]
    fn an_event_serialises_with_the_documented_keys_only() {
        let value = serde_json::to_value(event()).expect("encode");
        let mut keys: Vec<&str> = value.as_object().expect("object").keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["direction", "dst", "hook", "node", "protocol", "reason", "src", "time", "verdict"]);
        assert_eq!(value["src"], serde_json::json!({"ip": "10.0.0.2", "port": 40000, "namespace": "default", "pod": "client"}));
        assert_eq!(value["verdict"], "dropped");
        assert_eq!(value["direction"], "ingress");
        let back: FlowEvent = serde_json::from_value(value).expect("decode");
        assert_eq!(back, event());
    }

    #[test]
    fn filters_refuse_unbounded_input() {
        assert!(EventFilter { pod: Some(String::new()), ..Default::default() }.validate().is_err());
        assert!(EventFilter { reasons: vec!["x".into(); 17], ..Default::default() }.validate().is_err());
        assert!(EventFilter { namespace: Some("a\nb".into()), ..Default::default() }.validate().is_err());
        assert!(EventFilter { namespace: Some("a".into()), pod: Some("a/b".into()), ..Default::default() }.validate().is_ok());
    }
}
