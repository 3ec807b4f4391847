//! A kernel verdict event with names: the pods of its addresses (from the agent's cluster
//! state), the pod whose policy judged it and that pod's NetworkPolicy rule (from the
//! programming it names by slot and revision), the time on the wall clock.
use super::book::{EndpointBook, Programming, direction_of};
use super::decode::{WallClock, address, protocol_name, reason_name};
use crate::node_api::observe::{EndpointMode, EndpointRef, EventVerdict, FlowEvent, FlowPeer, SocketRef};
use crate::policy::ClusterState;
use netsieve_common::{
    HOOK_NETFILTER, NO_RULE, REASON_FAIL_CLOSED, REASON_FRAGMENT_UNKNOWN, REASON_MALFORMED, REASON_NO_ENDPOINT,
    REASON_SPOOFED, VERDICT_ALLOWED, VERDICT_AUDIT, VerdictEvent,
};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// What names are resolved against.
pub struct Resolver<'a> {
    pub node: &'a str,
    pub state: &'a ClusterState,
    pub book: &'a EndpointBook,
    /// The node's own interface addresses.
    pub local_addresses: &'a BTreeSet<IpAddr>,
    /// The name of an interface of this node.
    pub interface_name: &'a dyn Fn(u32) -> Option<String>,
    pub clock: WallClock,
}

impl Resolver<'_> {
    fn peer(&self, bytes: &[u8; 16], port: u16) -> FlowPeer {
        let ip = address(bytes);
        let pod = self.state.pod_by_ip(ip);
        FlowPeer {
            ip,
            port,
            namespace: pod.map(|p| p.namespace.clone()),
            pod: pod.map(|p| p.name.clone()),
            node: pod.is_none() && (self.state.is_node_address(self.node, &ip) || self.local_addresses.contains(&ip)),
        }
    }

    pub fn resolve(&self, raw: &VerdictEvent) -> FlowEvent {
        let programming = self.book.find(raw.endpoint_id, raw.revision).or_else(|| self.book.on_interface(raw.ifindex));
        let endpoint = programming.map(|p| {
            let (namespace, pod) = p.namespace_and_pod();
            EndpointRef {
                namespace: namespace.to_string(),
                pod: pod.to_string(),
                interface: (self.interface_name)(raw.ifindex),
                ifindex: raw.ifindex,
            }
        });
        let verdict = match raw.verdict {
            VERDICT_ALLOWED => EventVerdict::Allowed,
            VERDICT_AUDIT => EventVerdict::Audit,
            _ => EventVerdict::Dropped,
        };
        let rules = match programming {
            Some(p) if raw.rule_index != NO_RULE => p.rules_at(raw.direction, raw.rule_index).map(|o| Programming::rule_refs(o, raw.direction)),
            _ => None,
        };
        let reason = match verdict {
            EventVerdict::Allowed => match (&rules, programming) {
                (Some(_), _) => "rule",
                (None, Some(p)) if !p.isolated[usize::from(raw.direction & 1)] => "not_isolated",
                (None, _) => "exception",
            }
            .to_string(),
            _ => reason_name(raw.reason).to_string(),
        };
        FlowEvent {
            time: self.clock.rfc3339(raw.timestamp_ns),
            node: self.node.to_string(),
            verdict,
            reason,
            direction: direction_of(raw.direction),
            protocol: protocol_name(raw.protocol),
            src: self.peer(&raw.src, raw.src_port),
            dst: self.peer(&raw.dst, raw.dst_port),
            endpoint,
            rule: rules.and_then(|r| r.into_iter().next()),
            service: (raw.translated != 0).then(|| SocketRef { ip: address(&raw.original_dst), port: raw.original_dst_port }),
            hook: if raw.hook == HOOK_NETFILTER { "netfilter" } else { "tc" }.to_string(),
            detail: detail(raw, programming),
        }
    }
}

/// What a reason name alone does not say.
fn detail(raw: &VerdictEvent, programming: Option<&Programming>) -> Option<String> {
    if raw.verdict == VERDICT_ALLOWED {
        return None;
    }
    let text = match u32::from(raw.reason) {
        REASON_FAIL_CLOSED => match programming {
            Some(p) if p.mode == EndpointMode::Placeholder => "the pod is fail-closed until its Pod object is known".to_string(),
            Some(p) => match &p.fail_closed_reason {
                Some(reason) => format!("the pod is fail-closed: {reason}"),
                None => "the pod is fail-closed".to_string(),
            },
            None => "the pod is fail-closed".to_string(),
        },
        REASON_SPOOFED => "the source address is not the pod's".to_string(),
        REASON_MALFORMED => "the packet does not parse (addresses unknown)".to_string(),
        REASON_NO_ENDPOINT => "a program is attached to an interface with no endpoint programmed".to_string(),
        REASON_FRAGMENT_UNKNOWN => "a fragment whose first fragment was not seen".to_string(),
        _ if raw.verdict == VERDICT_AUDIT => "audit mode: the packet passed".to_string(),
        _ => return None,
    };
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::book::tests::{live, notes, origin};
    use crate::policy::PodInfo;
    use netsieve_common::{
        DIRECTION_INGRESS, HOOK_TC, PROTO_TCP, PROTO_UDP, REASON_NONE, REASON_POLICY_DENIED, VERDICT_DROPPED,
    };
    use std::time::SystemTime;

    fn mapped(ip: [u8; 4]) -> [u8; 16] {
        std::net::Ipv4Addr::from(ip).to_ipv6_mapped().octets()
    }

    fn pod(namespace: &str, name: &str, ip: &str) -> PodInfo {
        PodInfo {
            namespace: namespace.into(),
            name: name.into(),
            labels: Default::default(),
            ips: vec![ip.parse().expect("ip")],
            node: Some("node0".into()),
            host_network: false,
            named_ports: vec![],
            host_ips: vec!["172.31.250.1".parse().expect("ip")],
        }
    }

    fn raw(verdict: u8, reason: u8, rule_index: u32) -> VerdictEvent {
        VerdictEvent {
            timestamp_ns: 1_000_000_000,
            ifindex: 7,
            endpoint_id: 1,
            revision: 100,
            peer_identity: 300,
            rule_index,
            src_port: 40000,
            dst_port: 80,
            original_dst_port: 0,
            reason,
            verdict,
            direction: DIRECTION_INGRESS,
            protocol: PROTO_TCP,
            hook: HOOK_TC,
            translated: 0,
            src: mapped([10, 250, 0, 11]),
            dst: mapped([10, 250, 0, 10]),
            original_dst: [0; 16],
        }
    }

    fn fixture() -> (ClusterState, EndpointBook) {
        let mut state = ClusterState::default();
        state.upsert_pod(pod("default", "nginx-1", "10.250.0.10"));
        state.upsert_pod(pod("default", "interactivetest", "10.250.0.11"));
        let mut book = EndpointBook::default();
        let nginx = live(1, 100, 7, vec![vec![origin("default/access-nginx", 0)]]);
        book.update([("default/nginx-1", &nginx)].into_iter(), notes, SystemTime::UNIX_EPOCH);
        (state, book)
    }

    fn resolver<'a>(state: &'a ClusterState, book: &'a EndpointBook, local: &'a BTreeSet<IpAddr>, names: &'a dyn Fn(u32) -> Option<String>) -> Resolver<'a> {
        Resolver { node: "node0", state, book, local_addresses: local, interface_name: names, clock: WallClock::with_offset(1_764_497_702_000_000_000) }
    }

    #[test]
    fn a_denied_probe_is_named_by_pods_and_endpoint() {
        let (state, book) = fixture();
        let local = BTreeSet::new();
        let names = |ifindex: u32| (ifindex == 7).then(|| "h1234560".to_string());
        let event = resolver(&state, &book, &local, &names).resolve(&raw(VERDICT_DROPPED, REASON_POLICY_DENIED as u8, NO_RULE));
        let json = serde_json::to_value(&event).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "time": "2025-11-30T10:15:03Z", "node": "node0", "verdict": "dropped", "reason": "policy_denied",
                "direction": "ingress", "protocol": "TCP",
                "src": {"ip": "10.250.0.11", "port": 40000, "namespace": "default", "pod": "interactivetest"},
                "dst": {"ip": "10.250.0.10", "port": 80, "namespace": "default", "pod": "nginx-1"},
                "endpoint": {"namespace": "default", "pod": "nginx-1", "interface": "h1234560", "ifindex": 7},
                "hook": "tc"
            })
        );
    }

    #[test]
    fn allowed_flows_name_their_rule_and_services_their_address() {
        let (state, book) = fixture();
        let local = BTreeSet::new();
        let names = |_: u32| None;
        let r = resolver(&state, &book, &local, &names);
        let allowed = r.resolve(&raw(VERDICT_ALLOWED, REASON_NONE, 10));
        assert_eq!(allowed.reason, "rule");
        let rule = allowed.rule.expect("rule");
        assert_eq!((rule.policy.as_str(), rule.index, rule.shared), ("default/access-nginx", 0, false));
        assert_eq!(allowed.detail, None);
        // No rule and an isolated direction: an exception (the pod itself, its node).
        assert_eq!(r.resolve(&raw(VERDICT_ALLOWED, REASON_NONE, NO_RULE)).reason, "exception");
        // Judged after DNAT: the Service address it was sent to.
        let mut translated = raw(VERDICT_DROPPED, REASON_POLICY_DENIED as u8, NO_RULE);
        translated.hook = HOOK_NETFILTER;
        translated.translated = 1;
        translated.original_dst = mapped([10, 96, 0, 10]);
        translated.original_dst_port = 53;
        translated.protocol = PROTO_UDP;
        let event = r.resolve(&translated);
        assert_eq!(event.service, Some(SocketRef { ip: "10.96.0.10".parse().expect("ip"), port: 53 }));
        assert_eq!((event.hook.as_str(), event.protocol.as_str()), ("netfilter", "UDP"));
        // Audit and spoofing say what happened.
        assert_eq!(r.resolve(&raw(VERDICT_AUDIT, REASON_POLICY_DENIED as u8, NO_RULE)).detail.as_deref(), Some("audit mode: the packet passed"));
        let spoofed = r.resolve(&raw(VERDICT_DROPPED, REASON_SPOOFED as u8, NO_RULE));
        assert_eq!(spoofed.reason, "spoofed");
        assert!(spoofed.detail.is_some());
    }

    #[test]
    fn unknown_addresses_stay_addresses_and_node_addresses_are_marked() {
        let (state, book) = fixture();
        let local: BTreeSet<IpAddr> = ["169.254.1.1".parse().expect("ip")].into();
        let names = |_: u32| None;
        let r = resolver(&state, &book, &local, &names);
        let mut from_node = raw(VERDICT_DROPPED, REASON_POLICY_DENIED as u8, NO_RULE);
        from_node.src = mapped([172, 31, 250, 1]);
        let event = r.resolve(&from_node);
        assert!(event.src.node && event.src.pod.is_none(), "the pods' hostIP is a node address");
        from_node.src = mapped([8, 8, 8, 8]);
        let event = r.resolve(&from_node);
        assert!(!event.src.node && event.src.pod.is_none() && event.src.namespace.is_none());
        // An event of a programming the book never saw: no endpoint, still an event.
        let mut stray = raw(VERDICT_DROPPED, REASON_NO_ENDPOINT as u8, NO_RULE);
        stray.ifindex = 99;
        stray.endpoint_id = u32::MAX;
        let event = r.resolve(&stray);
        assert!(event.endpoint.is_none());
        assert_eq!(event.reason, "no_endpoint");
    }
}
