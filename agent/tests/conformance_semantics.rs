//! The semantics module (`netsieve::policy::explain`) against every matrix of the upstream
//! conformance cases (`tests/conformance/`), cell by cell, without any kernel: each case's
//! steps are replayed on the objects upstream's API server would hold (pods at the addresses
//! the netns test bed gives them), and at each probe step `explain` judges every (client,
//! server) pair on the probed port and protocol. Upstream probes Service ClusterIPs; with one
//! backend pod per Service, the flow that policy applies to is client pod -> server pod.
//!
//! This is the comparison, not the runner: the end-to-end runner (`conformance_e2e.rs`) takes
//! its expectations from the case files only. Every disagreement is listed; the asserted cells
//! (off the diagonal) must agree, and the diagonal's disagreements must all be the one
//! explained in docs/SEMANTICS.md ("Upstream conformance cases"): upstream writes `X` where a
//! pod probes its own Service under isolation, never asserts it, and this module allows a pod
//! to reach itself.
use netsieve::policy::{ClusterState, Exception, Protocol, explain};
use netsieve_tests::conformance::format::{self, PodRef, Step};
use netsieve_tests::conformance::reachability::Matrix;
use netsieve_tests::conformance::runner::case_id;
use netsieve_tests::conformance::state::ModelState;
use netsieve_tests::conformance::testbed::placement;
use netsieve_tests::conformance::{load_cases, load_suite};

fn protocol(p: format::Protocol) -> Protocol {
    match p {
        format::Protocol::Tcp => Protocol::Tcp,
        format::Protocol::Udp => Protocol::Udp,
        format::Protocol::Sctp => Protocol::Sctp,
    }
}

/// One cell where upstream and the semantics module disagree.
#[derive(Debug)]
struct Disagreement {
    case: String,
    step: usize,
    from: PodRef,
    to: PodRef,
    upstream: bool,
    semantics: bool,
    exception: Option<Exception>,
    why: String,
}

fn semantics_state(state: &ModelState) -> ClusterState {
    let namespaces = state.namespace_objects();
    let pods = state.pod_objects(&placement).expect("pods placed");
    let policies = state.policy_objects(&|pod| placement(pod).map(|p| p.pod_ip)).expect("policies decode");
    ClusterState::new(&namespaces, &pods, &policies, &[])
}

#[test]
fn semantics_module_agrees_with_every_asserted_upstream_cell() {
    let suite = load_suite().expect("suite");
    let cases = load_cases().expect("cases");
    let mut disagreements = Vec::new();
    let (mut matrices, mut cells, mut diagonal_cells) = (0, 0, 0);
    for case in &cases {
        let mut model = ModelState::initial(&suite, &case.file);
        for (index, step) in case.file.steps.iter().enumerate() {
            model.apply(step).expect("the case replays");
            let Step::Probe(probe) = step else { continue };
            let expected = Matrix::parse(&probe.expected).expect("matrix");
            let state = semantics_state(&model);
            matrices += 1;
            for (from, to, upstream) in expected.cells() {
                let src = state.resolve(&from.to_string()).expect("client pod");
                let dst = state.resolve(&to.to_string()).expect("server pod");
                let verdict = explain(&state, &state.flow(src, dst, protocol(probe.protocol), probe.port).expect("flow"));
                if from == to {
                    diagonal_cells += 1;
                } else {
                    cells += 1;
                }
                if verdict.allowed != upstream {
                    let why = format!(
                        "egress: isolated={} allowed={} by {:?}; ingress: isolated={} allowed={} by {:?}",
                        verdict.egress.isolated,
                        verdict.egress.allowed,
                        verdict.egress.matched.as_ref().map(|m| &m.policy),
                        verdict.ingress.isolated,
                        verdict.ingress.allowed,
                        verdict.ingress.matched.as_ref().map(|m| &m.policy),
                    );
                    disagreements.push(Disagreement {
                        case: case_id(case),
                        step: index + 1,
                        from: from.clone(),
                        to: to.clone(),
                        upstream,
                        semantics: verdict.allowed,
                        exception: verdict.exception,
                        why,
                    });
                }
            }
        }
    }
    let word = |b: bool| if b { "connects" } else { "blocked" };
    let (diagonal, asserted): (Vec<&Disagreement>, Vec<&Disagreement>) = disagreements.iter().partition(|d| d.from == d.to);
    eprintln!("{} cases, {matrices} matrices: {cells} asserted cells, {diagonal_cells} diagonal (not asserted) cells", cases.len());
    eprintln!("asserted cells where upstream and the semantics module disagree: {}", asserted.len());
    for d in &asserted {
        eprintln!("  {} step {}: {} -> {}: upstream {}, semantics {} ({})", d.case, d.step, d.from, d.to, word(d.upstream), word(d.semantics), d.why);
    }
    let mut diagonal_cases: Vec<&str> = diagonal.iter().map(|d| d.case.as_str()).collect();
    diagonal_cases.dedup();
    eprintln!(
        "diagonal cells (a pod probing its own Service; not asserted upstream) that disagree: {} of {diagonal_cells}, in {} cases: {}",
        diagonal.len(),
        diagonal_cases.len(),
        diagonal_cases.join(", ")
    );
    assert!(asserted.is_empty(), "{} asserted cells disagree:\n{asserted:#?}", asserted.len());
    // The diagonal: upstream writes `X` for an isolated pod probing itself; the module allows
    // a pod to reach itself (docs/SEMANTICS.md). Anything else there would be a new finding.
    for d in &diagonal {
        assert!(
            !d.upstream && d.semantics && d.exception == Some(Exception::SelfTraffic),
            "a diagonal disagreement not explained in docs/SEMANTICS.md: {d:#?}"
        );
    }
    assert!(matrices >= 65 && cells > 500, "{matrices} matrices, {cells} cells: cases missing?");
}
