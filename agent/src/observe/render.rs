//! Text for people: one line per verdict event (`netsieve monitor`), the node's status
//! (`netsieve status`), and what a live explanation adds to the offline one.
use crate::node_api::observe::{
    DirectionStatus, EndpointMode, EndpointStatus, EventVerdict, FlowEvent, FlowPeer, LiveExplanation, NodeStatus,
    RuleRef,
};
use std::fmt::Write;

/// An RFC 3339 time with its fraction cut to milliseconds.
fn short_time(time: &str) -> String {
    match time.split_once('.') {
        Some((seconds, rest)) => {
            let fraction: String = rest.chars().take_while(char::is_ascii_digit).take(3).collect();
            format!("{seconds}.{fraction:0<3}Z")
        }
        None => time.to_string(),
    }
}

fn socket(ip: &std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
    }
}

fn peer(peer: &FlowPeer) -> String {
    let address = socket(&peer.ip, peer.port);
    match (&peer.namespace, &peer.pod) {
        (Some(namespace), Some(pod)) => format!("{namespace}/{pod} {address}"),
        _ if peer.node => format!("node {address}"),
        _ => address,
    }
}

fn rule(rule: &RuleRef) -> String {
    let shared = if rule.shared { " (shared counter)" } else { "" };
    format!("{} {} rule {}{shared}", rule.policy, rule.direction.name(), rule.index)
}

/// One line: time, verdict, direction from the enforced pod's side, source -> destination,
/// protocol, and why.
pub fn event_line(event: &FlowEvent) -> String {
    let verdict = match event.verdict {
        EventVerdict::Dropped => "DROPPED",
        EventVerdict::Allowed => "ALLOWED",
        EventVerdict::Audit => "AUDIT",
    };
    let mut line = format!(
        "{} {verdict:<7} {:<7} {} -> {}",
        short_time(&event.time),
        event.direction.name(),
        peer(&event.src),
        peer(&event.dst)
    );
    if let Some(service) = &event.service {
        let _ = write!(line, " (service {})", socket(&service.ip, service.port));
    }
    let _ = write!(line, " {}", event.protocol);
    match (&event.verdict, &event.rule) {
        (EventVerdict::Allowed, Some(r)) => {
            let _ = write!(line, " by {}", rule(r));
        }
        (EventVerdict::Allowed, None) => {
            let _ = write!(line, " {}", event.reason.replace('_', " "));
        }
        _ => {
            let _ = write!(line, " {}", event.reason);
        }
    }
    if event.hook == "netfilter" {
        line.push_str(" [after DNAT]");
    }
    if let Some(detail) = &event.detail {
        let _ = write!(line, " ({detail})");
    }
    line
}

fn direction_line(name: &str, direction: &DirectionStatus) -> String {
    let policy = if direction.isolated {
        format!("isolated by {}", if direction.policies.is_empty() { "(no policy)".to_string() } else { direction.policies.join(", ") })
    } else {
        "not isolated".to_string()
    };
    let p = &direction.packets;
    format!("  {name:<8} {policy:<44} allowed {} denied {} audited {}\n", p.allowed, p.denied, p.audited)
}

fn endpoint_block(endpoint: &EndpointStatus, out: &mut String) {
    let interface = match &endpoint.interface {
        Some(name) => format!("{name} (ifindex {})", endpoint.ifindex),
        None => format!("ifindex {}", endpoint.ifindex),
    };
    let mode = match endpoint.mode {
        EndpointMode::Policy => "policy".to_string(),
        EndpointMode::FailClosed => format!("FAIL-CLOSED: {}", endpoint.fail_closed_reason.as_deref().unwrap_or("see the agent's log")),
        EndpointMode::Placeholder => "FAIL-CLOSED until its Pod object is known (CNI placeholder)".to_string(),
    };
    let addresses: Vec<String> = endpoint.addresses.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "{}/{}  {interface}  identity {}  {}  {mode}{}",
        endpoint.namespace,
        endpoint.pod,
        endpoint.identity,
        addresses.join(","),
        if endpoint.audit { "  AUDIT MODE (would-be drops pass)" } else { "" }
    );
    for (name, direction) in [("ingress", &endpoint.ingress), ("egress", &endpoint.egress)] {
        out.push_str(&direction_line(name, direction));
        for r in &direction.rules {
            let shared = if r.shared { " (shared counter)" } else { "" };
            let never = if r.packets == 0 { "  never matched" } else { "" };
            let _ = writeln!(out, "           rule {} #{}: {} packets, {} bytes{shared}{never}", r.policy, r.index, r.packets, r.bytes);
        }
    }
    if let Some(at) = &endpoint.programmed_at {
        let _ = writeln!(out, "  programmed {}", short_time(at));
    }
}

/// `netsieve status` for people.
pub fn status_text(status: &NodeStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {} (netsieve {}): {}; source {}",
        status.node,
        status.agent_version,
        if status.ready { "ready".to_string() } else { format!("NOT READY: {}", status.readiness) },
        status.source
    );
    let audit = if status.audit.is_active() {
        format!("ON, {} (would-be drops pass and are reported as audit)", status.audit.describe())
    } else {
        "off (policies enforced)".to_string()
    };
    let _ = writeln!(out, "audit mode: {audit}");
    if let Some(at) = &status.last_programmed {
        let _ = writeln!(out, "last programmed: {}", short_time(at));
    }
    let _ = writeln!(
        out,
        "netfilter hook (egress after DNAT): {}",
        match (status.netfilter_hook, status.egress_enforced) {
            (true, _) => "attached",
            (false, false) => "idle, not attached (no local pod's egress is enforced)",
            (false, true) => "not attached (Service egress judged on the ClusterIP, fail closed)",
        }
    );
    let e = &status.events;
    let rate = if e.settings.per_second == 0 {
        "off".to_string()
    } else {
        format!("{}/s per CPU, burst {}", e.settings.per_second, e.settings.burst)
    };
    let _ = writeln!(
        out,
        "events: {rate}, allowed flows {}; emitted {}, not emitted: rate limited {}, ring full {}; read {}; subscribers {} (lost: agent busy {}, slow subscribers {})",
        if e.settings.allowed_flows { "on" } else { "off" },
        e.emitted,
        e.rate_limited,
        e.ring_full,
        e.read,
        e.subscribers,
        e.dropped_agent_busy,
        e.dropped_slow_subscribers
    );
    let maps: Vec<String> = status.maps.iter().map(|m| format!("{} {}/{}", m.name, m.entries, m.capacity)).collect();
    let _ = writeln!(out, "maps: {}", maps.join(", "));
    let drops: Vec<String> =
        status.drops.iter().filter(|d| d.packets > 0).map(|d| format!("{}/{} {}", d.direction.name(), d.reason, d.packets)).collect();
    let _ = writeln!(out, "drops: {}", if drops.is_empty() { "none".to_string() } else { drops.join(", ") });
    let audited: Vec<String> =
        status.audited.iter().filter(|d| d.packets > 0).map(|d| format!("{}/{} {}", d.direction.name(), d.reason, d.packets)).collect();
    if !audited.is_empty() {
        let _ = writeln!(out, "audited (passed by audit mode): {}", audited.join(", "));
    }
    let _ = writeln!(out, "\n{} endpoints:", status.endpoints.len());
    for endpoint in &status.endpoints {
        endpoint_block(endpoint, &mut out);
    }
    let never: Vec<String> = status
        .endpoints
        .iter()
        .flat_map(|e| {
            [("ingress", &e.ingress), ("egress", &e.egress)].into_iter().flat_map(move |(name, d)| {
                d.rules
                    .iter()
                    .filter(|r| r.packets == 0)
                    .map(move |r| format!("  {} {name} rule {} (on {}/{})", r.policy, r.index, e.namespace, e.pod))
            })
        })
        .collect();
    if never.is_empty() {
        out.push_str("\nrules that never matched: none\n");
    } else {
        let _ = writeln!(out, "\nrules that never matched ({}):\n{}", never.len(), never.join("\n"));
    }
    out
}

/// What `explain --agent` prints after the offline report.
pub fn live_explanation_text(explanation: &LiveExplanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "  enforced on {}:", explanation.node);
    if explanation.programmed.is_empty() {
        out.push_str("    neither end is a pod programmed on this node\n");
    }
    for check in &explanation.programmed {
        let interface = check.interface.clone().unwrap_or_else(|| format!("ifindex {}", check.ifindex));
        let verdict = if check.allowed { "allow" } else { "deny" };
        let mut line = format!("    {} {} on {interface}: the programmed maps {verdict} it", check.pod, check.direction.name());
        if let Some(r) = check.rules.first() {
            let _ = write!(line, " ({})", rule(r));
        }
        if check.audit && !check.allowed {
            line.push_str("; AUDIT MODE: it passes and is reported as audit");
        }
        if check.mode != EndpointMode::Policy {
            line.push_str("; the pod is fail-closed");
        }
        if !check.agrees {
            line.push_str("; DISAGREES with the semantics");
        }
        if let Some(note) = &check.note {
            let _ = write!(line, " ({note})");
        }
        out.push_str(&line);
        out.push('\n');
    }
    let c = &explanation.conntrack;
    match &c.error {
        Some(error) => {
            let _ = writeln!(out, "  conntrack: lookup failed: {error}");
        }
        None if c.entries.is_empty() => {
            let _ = writeln!(out, "  conntrack: no entry ({} entries scanned)", c.scanned);
        }
        None => {
            for entry in &c.entries {
                let state = if entry.current { "current" } else { "stale (judged again at its next packet)" };
                let mut line = format!(
                    "  conntrack: {} -> {} on {} ({}): {}, {} flow, {state}, since {} ({} s), last seen {} ({} s ago)",
                    socket(&entry.initiator.ip, entry.initiator.port),
                    socket(&entry.responder.ip, entry.responder.port),
                    entry.interface.clone().unwrap_or_else(|| format!("ifindex {}", entry.ifindex)),
                    entry.pod.as_deref().unwrap_or("?"),
                    entry.state,
                    entry.direction.name(),
                    short_time(&entry.since),
                    entry.age_seconds,
                    short_time(&entry.last_seen),
                    entry.idle_seconds
                );
                if let Some(backend) = &entry.backend {
                    let _ = write!(line, ", backend {}", socket(&backend.ip, backend.port));
                }
                if entry.audit {
                    line.push_str(", passing by audit mode");
                }
                if let Some(r) = entry.rules.first() {
                    let _ = write!(line, ", admitted by {}", rule(r));
                }
                out.push_str(&line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_api::observe::{EventDirection, SocketRef};

    fn event() -> FlowEvent {
        FlowEvent::dropped_for_tests(
            "2025-11-30T10:15:03.123456789Z",
            FlowPeer::pod_for_tests("10.250.0.11", 40312, "default", "interactivetest"),
            FlowPeer::pod_for_tests("10.250.0.10", 80, "default", "nginx-1"),
        )
    }

    #[test]
    fn event_lines_say_who_what_and_why() {
        assert_eq!(
            event_line(&event()),
            "2025-11-30T10:15:03.123Z DROPPED ingress default/interactivetest 10.250.0.11:40312 -> default/nginx-1 10.250.0.10:80 TCP policy_denied"
        );
        let allowed = FlowEvent {
            verdict: EventVerdict::Allowed,
            reason: "rule".into(),
            rule: Some(RuleRef { policy: "default/access-nginx".into(), direction: EventDirection::Ingress, index: 0, shared: false }),
            ..event()
        };
        assert!(event_line(&allowed).ends_with("TCP by default/access-nginx ingress rule 0"), "{}", event_line(&allowed));
        let audit = FlowEvent { verdict: EventVerdict::Audit, detail: Some("audit mode: the packet passed".into()), ..event() };
        assert!(event_line(&audit).contains(" AUDIT   ingress ") && event_line(&audit).ends_with("policy_denied (audit mode: the packet passed)"));
        let world = FlowEvent {
            dst: FlowPeer { ip: "fd00::1".parse().expect("ip"), port: 53, namespace: None, pod: None, node: false },
            service: Some(SocketRef { ip: "10.96.0.10".parse().expect("ip"), port: 53 }),
            hook: "netfilter".into(),
            direction: EventDirection::Egress,
            ..event()
        };
        assert!(event_line(&world).contains("-> [fd00::1]:53 (service 10.96.0.10:53) TCP policy_denied [after DNAT]"), "{}", event_line(&world));
        assert_eq!(short_time("2025-11-30T10:15:03Z"), "2025-11-30T10:15:03Z");
        assert_eq!(short_time("2025-11-30T10:15:03.5Z"), "2025-11-30T10:15:03.500Z");
    }
}
