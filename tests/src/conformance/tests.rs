//! Every case file parses, is consistent, and is listed in the README with the counts it states.
use super::check::{check_case, sample_ip};
use super::format::{Protocol, Step};
use super::model;
use super::*;
use std::collections::BTreeSet;

fn suite_and_cases() -> (Suite, Vec<Case>) {
    let suite = load_suite().unwrap_or_else(|e| panic!("suite.yaml: {e}"));
    let cases = load_cases().unwrap_or_else(|e| panic!("case files: {e}"));
    (suite, cases)
}

#[test]
fn suite_describes_the_three_upstream_namespaces() {
    let (suite, _) = suite_and_cases();
    let names: Vec<&str> = suite.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["x", "y", "z"]);
    for ns in &suite.namespaces {
        // The API server sets this label on every namespace; upstream's selectors rely on it.
        assert_eq!(ns.labels.get("kubernetes.io/metadata.name"), Some(&ns.name), "{}", ns.name);
    }
    assert!(suite.ignore_loopback, "upstream's ignoreLoopback is true");
    assert_eq!(suite.probe.target, "service-cluster-ip");
    assert!(suite.upstream.files.contains_key("network_policy.go"));
}

#[test]
fn every_case_is_internally_consistent() {
    let (suite, cases) = suite_and_cases();
    assert!(!cases.is_empty(), "no case files found under {}", conformance_dir().display());
    let mut failures = Vec::new();
    for case in &cases {
        for problem in check_case(&suite, case) {
            failures.push(format!("{}: {problem}", case.path));
        }
    }
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_policy_decodes_into_a_network_policy_with_real_pod_ips() {
    let (suite, cases) = suite_and_cases();
    let mut decoded = 0;
    for case in &cases {
        for step in &case.file.steps {
            if let Step::CreatePolicy { policy } | Step::UpdatePolicy { policy } = step {
                for v6 in [false, true] {
                    let policy = model::decode_policy(policy, &|p: &format::PodRef| sample_ip(p, &suite, v6))
                        .unwrap_or_else(|e| panic!("{}: {e}", case.path));
                    assert_eq!(policy.metadata.namespace.as_deref().map(|ns| ns.len()), Some(1), "{}", case.path);
                }
                decoded += 1;
            }
        }
    }
    println!("{decoded} policy objects decode as networking.k8s.io/v1 NetworkPolicy (IPv4 and IPv6 pod IPs)");
    assert!(decoded > 0);
}

#[test]
fn model_objects_exist_for_every_case_pod() {
    let (suite, cases) = suite_and_cases();
    for ns in &suite.namespaces {
        assert_eq!(model::namespace_object(ns).metadata.name.as_deref(), Some(ns.name.as_str()));
    }
    for case in &cases {
        for pod in &case.file.pods {
            let object = model::pod_object(pod, &case.file.servers);
            let ports = object.spec.map(|s| s.containers[0].ports.clone().unwrap_or_default()).unwrap_or_default();
            assert_eq!(ports.len(), case.file.servers.ports.len() * case.file.servers.protocols.len(), "{}", case.path);
            assert_eq!(model::service_object(pod, &case.file.servers).metadata.name, Some(model::service_name(pod)));
        }
    }
}

/// The counts the README states, so that a case lost or added shows here and there.
#[test]
fn counts_match_the_readme() {
    let (_, cases) = suite_and_cases();
    let counts = Counts::of(&cases);
    println!("{counts:#?}");
    assert_eq!(counts.cases, 48);
    assert_eq!(
        counts.cases_by_describe,
        BTreeMap::from([
            ("[sig-network] Netpol".to_string(), 42),
            ("[sig-network] Netpol [LinuxOnly]".to_string(), 3),
            ("[sig-network] Netpol [Feature:SCTPConnectivity] [LinuxOnly]".to_string(), 3),
        ])
    );
    assert_eq!(
        counts.cases_by_protocol,
        BTreeMap::from([(Protocol::Tcp, 42), (Protocol::Udp, 4), (Protocol::Sctp, 3)])
    );
    assert_eq!(
        counts.matrices_by_protocol,
        BTreeMap::from([(Protocol::Tcp, 58), (Protocol::Udp, 4), (Protocol::Sctp, 3)])
    );
    assert_eq!(counts.server_wait_matrices, 55);
    let readme = std::fs::read_to_string(conformance_dir().join("README.md")).expect("README.md");
    for (protocol, cells) in &counts.cells_by_protocol {
        let line = format!(
            "| {protocol} | {} | {} | {cells} |",
            counts.cases_by_protocol[protocol], counts.matrices_by_protocol[protocol]
        );
        assert!(readme.contains(&line), "README.md lacks the row {line:?}");
    }
}

#[test]
fn readme_lists_every_case_with_its_upstream_name() {
    let (_, cases) = suite_and_cases();
    let readme = std::fs::read_to_string(conformance_dir().join("README.md")).expect("README.md");
    for case in &cases {
        assert!(
            readme.contains(&format!("[{}]({})", case.file.upstream.it, case.path)),
            "README.md does not list {}",
            case.path
        );
    }
    let names: BTreeSet<String> = cases.iter().map(|c| c.file.upstream.full_name()).collect();
    assert_eq!(names.len(), cases.len(), "two case files encode the same upstream spec");
}
