//! Internal consistency of a case: replays its steps over the namespaces, pods and policies
//! they name and reports every place where the data contradicts itself or upstream's harness
//! (a probe naming a pod the case does not create, a matrix that is not complete or does not
//! match the transcribed `Expect*` calls, a policy that does not decode, a named port no server
//! has, ...). It never decides whether traffic should pass: that is what the matrices say.
use super::format::{PodRef, Protocol, Step, Suite};
use super::model;
use super::reachability::Matrix;
use super::{Case, ConformanceError};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Stand-in pod IPs for decoding policies with placeholders: the case data must decode for
/// either address family, as upstream's helpers handle both.
pub fn sample_ip(pod: &PodRef, suite: &Suite, v6: bool) -> Option<IpAddr> {
    let ns = suite.namespaces.iter().position(|n| n.name == pod.namespace)?;
    let host = pod.name.bytes().next().map(|b| u32::from(b) % 200 + 10)?;
    Some(if v6 {
        IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 250, ns as u16, 0, 0, 0, 0, host as u16))
    } else {
        IpAddr::V4(std::net::Ipv4Addr::new(10, 250, ns as u8, host as u8))
    })
}

/// Every problem found in the case; empty when it is consistent.
pub fn check_case(suite: &Suite, case: &Case) -> Vec<String> {
    let mut problems = Vec::new();
    let file = &case.file;

    if file.upstream.describe.is_empty() || file.upstream.context.is_empty() || file.upstream.it.is_empty() {
        problems.push("upstream describe, context and it must all be given".into());
    }
    if !file.upstream.labels.iter().any(|l| l == "Feature:NetworkPolicy") {
        problems.push("every upstream Netpol It carries the Feature:NetworkPolicy label".into());
    }
    if file.servers.ports.is_empty() || file.servers.protocols.is_empty() {
        problems.push("servers need at least one port and one protocol".into());
    }
    if has_duplicates(&file.servers.ports) || has_duplicates(&file.servers.protocols) {
        problems.push("servers list a port or protocol twice".into());
    }
    if file.pods.is_empty() || has_duplicates(&file.pods) {
        problems.push("pods must be given, each once".into());
    }
    let namespaces: BTreeSet<&str> = suite.namespaces.iter().map(|n| n.name.as_str()).collect();
    for pod in &file.pods {
        if !namespaces.contains(pod.namespace.as_str()) {
            problems.push(format!("pod {pod} is in a namespace the suite does not create"));
        }
    }
    let served: BTreeSet<(u16, Protocol)> = model::served(&file.servers).into_iter().collect();
    let served_names: BTreeSet<String> = served.iter().map(|(port, proto)| model::port_name(*port, *proto)).collect();

    // The state the steps act on, as upstream's API server would hold it.
    let mut namespace_labels: BTreeMap<&str, BTreeMap<String, String>> =
        suite.namespaces.iter().map(|n| (n.name.as_str(), n.labels.clone())).collect();
    let mut pod_labels: BTreeMap<&PodRef, BTreeMap<String, String>> =
        file.pods.iter().map(|p| (p, model::initial_pod_labels(p))).collect();
    let mut policies: BTreeMap<(String, String), NetworkPolicy> = BTreeMap::new();

    for (i, step) in file.steps.iter().enumerate() {
        let at = format!("step {}", i + 1);
        match step {
            Step::WaitForServers { probes } => {
                if i != 0 {
                    problems.push(format!("{at}: upstream waits for the servers once, before anything else"));
                }
                let waited: BTreeSet<(u16, Protocol)> = probes.iter().map(|p| (p.port, p.protocol)).collect();
                if waited != served || waited.len() != probes.len() {
                    problems.push(format!(
                        "{at}: upstream waits for each served (port, protocol) once: {served:?}, not {waited:?}"
                    ));
                }
                for probe in probes {
                    if !probe.reachability.default || !probe.reachability.ops.is_empty() {
                        problems.push(format!("{at}: waitForHTTPServers expects every pair to connect (NewReachability(.., true), no calls)"));
                    }
                    check_matrix(&at, probe, &file.pods, &mut problems);
                }
                continue;
            }
            Step::CreatePolicy { policy } | Step::UpdatePolicy { policy } => {
                let creating = matches!(step, Step::CreatePolicy { .. });
                match decode_both_families(suite, file.pods.as_slice(), policy) {
                    Err(e) => problems.push(format!("{at}: {e}")),
                    Ok(decoded) => {
                        let key = (
                            decoded.metadata.namespace.clone().unwrap_or_default(),
                            decoded.metadata.name.clone().unwrap_or_default(),
                        );
                        if !namespaces.contains(key.0.as_str()) || key.1.is_empty() {
                            problems.push(format!(
                                "{at}: the policy needs a name and one of the suite's namespaces, has {key:?}"
                            ));
                        }
                        for cidr in ip_block_cidrs(&decoded) {
                            if !is_cidr(&cidr) {
                                problems.push(format!("{at}: ipBlock {cidr:?} is not a CIDR"));
                            }
                        }
                        for name in named_ports(&decoded) {
                            if !served_names.contains(&name) {
                                problems.push(format!(
                                    "{at}: named port {name:?} is no container port of the case ({served_names:?})"
                                ));
                            }
                        }
                        match (creating, policies.contains_key(&key)) {
                            (true, true) => problems.push(format!("{at}: creates {key:?}, which already exists")),
                            (false, false) => problems.push(format!("{at}: updates {key:?}, which does not exist")),
                            _ => {}
                        }
                        policies.insert(key, decoded);
                    }
                }
            }
            Step::AddNamespaceLabel { namespace, key, value } => match namespace_labels.get_mut(namespace.as_str()) {
                Some(labels) => {
                    labels.insert(key.clone(), value.clone());
                }
                None => problems.push(format!("{at}: labels unknown namespace {namespace}")),
            },
            Step::AddPodLabels { pod, labels } => match pod_labels.get_mut(pod) {
                Some(current) => current.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone()))),
                None => problems.push(format!("{at}: labels pod {pod}, which the case does not create")),
            },
            Step::DeleteAllPolicies { namespaces: targets, .. } => {
                let targets: BTreeSet<&str> = targets.iter().map(String::as_str).collect();
                if targets != namespaces {
                    problems.push(format!(
                        "{at}: upstream's cleanNetworkPolicies empties all of {namespaces:?}, not {targets:?}"
                    ));
                }
                if policies.is_empty() {
                    problems.push(format!("{at}: deletes policies, but none exist"));
                }
                policies.retain(|(ns, _), _| !targets.contains(ns.as_str()));
            }
            Step::Probe(probe) => {
                if !served.contains(&(probe.port, probe.protocol)) {
                    problems.push(format!(
                        "{at}: probes {}/{}, which no server of the case listens on",
                        probe.port, probe.protocol
                    ));
                }
                check_matrix(&at, probe, &file.pods, &mut problems);
            }
        }
    }
    if !matches!(file.steps.first(), Some(Step::WaitForServers { .. })) {
        problems.push("the first step must be wait_for_servers, as upstream's initializeResources".into());
    }
    if !file.steps.iter().any(|s| matches!(s, Step::Probe(_))) {
        problems.push("the case probes nothing".into());
    }
    problems
}

fn check_matrix(at: &str, probe: &super::format::Probe, pods: &[PodRef], problems: &mut Vec<String>) {
    let written = match Matrix::parse(&probe.expected) {
        Ok(m) => m,
        Err(e) => {
            problems.push(format!("{at}: expected matrix: {e}"));
            return;
        }
    };
    if written.pods() != pods {
        problems.push(format!("{at}: the matrix must name the case's pods in order, names {:?}", written.pods()));
        return;
    }
    match Matrix::from_upstream_calls(pods, &probe.reachability) {
        Err(e) => problems.push(format!("{at}: reachability calls: {e}")),
        Ok(built) => {
            let diff = built.differences(&written);
            if !diff.is_empty() {
                problems.push(format!(
                    "{at}: the written matrix disagrees with the transcribed calls at (from, to, calls say): {diff:?}\n{built}"
                ));
            }
        }
    }
}

fn decode_both_families(
    suite: &Suite,
    pods: &[PodRef],
    policy: &serde_yaml::Value,
) -> Result<NetworkPolicy, ConformanceError> {
    for placeholder in model::placeholders(policy)? {
        if !pods.contains(placeholder.pod()) {
            return Err(ConformanceError::Placeholder {
                text: format!("{placeholder:?}"),
                reason: "names a pod the case does not create".into(),
            });
        }
    }
    model::decode_policy(policy, &|p: &PodRef| sample_ip(p, suite, true))?;
    model::decode_policy(policy, &|p: &PodRef| sample_ip(p, suite, false))
}

/// The named ports (`port: serve-80-tcp`) of a policy's rules.
fn named_ports(policy: &NetworkPolicy) -> Vec<String> {
    let Some(spec) = &policy.spec else { return Vec::new() };
    let ingress = spec.ingress.iter().flatten().flat_map(|r| r.ports.iter().flatten());
    let egress = spec.egress.iter().flatten().flat_map(|r| r.ports.iter().flatten());
    ingress
        .chain(egress)
        .filter_map(|p: &NetworkPolicyPort| match &p.port {
            Some(IntOrString::String(name)) => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// Every `ipBlock.cidr` and `except` entry of a policy's peers.
fn ip_block_cidrs(policy: &NetworkPolicy) -> Vec<String> {
    let Some(spec) = &policy.spec else { return Vec::new() };
    let ingress = spec.ingress.iter().flatten().flat_map(|r| r.from.iter().flatten());
    let egress = spec.egress.iter().flatten().flat_map(|r| r.to.iter().flatten());
    ingress
        .chain(egress)
        .filter_map(|peer| peer.ip_block.as_ref())
        .flat_map(|block| std::iter::once(block.cidr.clone()).chain(block.except.iter().flatten().cloned()))
        .collect()
}

/// `address/prefix` with the prefix no longer than the address.
fn is_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else { return false };
    match (address.parse::<IpAddr>(), prefix.parse::<u8>()) {
        (Ok(IpAddr::V4(_)), Ok(p)) => p <= 32,
        (Ok(IpAddr::V6(_)), Ok(p)) => p <= 128,
        _ => false,
    }
}

fn has_duplicates<T: Ord>(items: &[T]) -> bool {
    items.iter().collect::<BTreeSet<_>>().len() != items.len()
}
