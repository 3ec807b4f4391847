//! The upstream Kubernetes NetworkPolicy e2e cases (`tests/conformance/`, transcribed from
//! `test/e2e/network/netpol/`) run against the real agents: upstream's model cluster (pods
//! `a`, `b`, `c` in namespaces `x`, `y`, `z` over two nodes, a ClusterIP Service per pod,
//! kube-proxy emulated), one `netsieve agent` per node, each case's steps in order, and after
//! every probe step every asserted pair probed through the server's ClusterIP and compared with
//! the matrix upstream asserts (see `netsieve_tests::conformance::runner`). The expectations
//! come only from the case files. Prints the table (case, step, upstream expectation, result)
//! and writes it to `target/conformance/`. Needs root; touches nothing outside the namespaces
//! it creates.
use netsieve_tests::conformance::Case;
use netsieve_tests::conformance::runner::{SourceKind, SuiteReport, case_id, run_suite};
use netsieve_tests::kube_proxy::ProxyMode;
use netsieve_tests::netns::namespaces_with_prefix;
use std::path::{Path, PathBuf};

/// The cases also run in API mode: ingress, egress, namespace selectors, pod and namespace
/// selectors together, ipBlock with except and its update, named ports both ways, a policy
/// update, namespace and pod label updates, deletion, TCP+UDP on one protocol's policy, UDP.
const API_SUBSET: &[&str] = &[
    "netpol/02", "netpol/06", "netpol/10", "netpol/17", "netpol/19", "netpol/20", "netpol/21", "netpol/22", "netpol/28",
    "netpol/30", "netpol/33", "netpol/35", "netpol/36", "netpol-udp/02",
];

fn report_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("conformance")
}

fn run(label: &str, tag: &str, mode: ProxyMode, kind: SourceKind, select: &dyn Fn(&Case) -> bool) -> SuiteReport {
    let binary = Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let report = run_suite(label, tag, mode, kind, binary, select).unwrap_or_else(|e| panic!("{label}: {e}"));
    let table = report.markdown();
    eprintln!("{table}");
    let dir = report_dir();
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("{tag}.md")), &table);
    }
    // Every namespace of the test bed is gone (the id ends with the tag, so no other test's
    // clusters match).
    assert!(namespaces_with_prefix(&format!("nsv-{}-{tag}-", std::process::id())).is_empty(), "namespaces left behind");
    report
}

fn assert_passed(report: &SuiteReport) {
    for (index, (clean, stderr)) in report.agents.iter().enumerate() {
        assert!(*clean, "{}: node{index}'s agent did not exit cleanly:\n{stderr}", report.label);
    }
    let failed: Vec<String> = report
        .failed()
        .iter()
        .map(|case| {
            let rows: Vec<String> = case
                .rows
                .iter()
                .filter(|r| matches!(r.result, netsieve_tests::conformance::runner::RowResult::Fail(_)))
                .map(|r| format!("    {}: expects {}; {:?}", r.step, r.expectation, r.result))
                .collect();
            format!("  {} {} ({}):\n{}", case.id, case.it, case.path, rows.join("\n"))
        })
        .collect();
    let logs: Vec<String> = report.agents.iter().map(|(_, stderr)| tail(stderr, 40)).collect();
    assert!(
        failed.is_empty(),
        "{}\n{} cases disagree with upstream:\n{}\n\nagent logs (last lines):\n{}",
        report.summary(),
        failed.len(),
        failed.join("\n"),
        logs.join("\n---\n")
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Every case in manifests mode under iptables-mode kube-proxy. The SCTP cases run only where
/// the kernel has SCTP; elsewhere they are reported as skipped, with the reason.
#[test]
fn upstream_cases_manifests_mode_iptables() {
    let report = run("manifests mode, iptables kube-proxy", "conf-ipt", ProxyMode::Iptables, SourceKind::Manifests, &|_| true);
    assert_eq!(report.cases.len(), 48, "every upstream case is attempted");
    let skipped: Vec<&str> = report.cases.iter().filter(|c| c.outcome() == netsieve_tests::conformance::runner::Outcome::Skipped).map(|c| c.id.as_str()).collect();
    if netsieve_tests::netns::sctp_supported().is_ok() {
        assert!(skipped.is_empty(), "SCTP exists here, yet cases were skipped: {skipped:?}");
    } else {
        assert_eq!(skipped, ["netpol-sctp/01", "netpol-sctp/02", "netpol-sctp/03"], "only the SCTP cases may be skipped");
    }
    assert_passed(&report);
}

/// A representative subset with the agents watching the fake API server, under nftables-mode
/// kube-proxy.
#[test]
fn upstream_subset_api_mode_nftables() {
    let select = |case: &Case| API_SUBSET.contains(&case_id(case).as_str());
    let report = run("API mode, nftables kube-proxy", "conf-api-nft", ProxyMode::Nftables, SourceKind::Api, &select);
    assert_eq!(report.cases.len(), API_SUBSET.len(), "every case of the subset exists");
    assert_passed(&report);
}
