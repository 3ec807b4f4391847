//! The upstream Kubernetes NetworkPolicy e2e cases (`test/e2e/network/netpol/`, the `Netpol`
//! specs), written down as data in `tests/conformance/`: `suite.yaml` and one file per upstream
//! `It` under `cases/`. The expectations are transcribed from the upstream test code, never
//! computed from netsieve's own semantics; `tests/conformance/README.md` describes the format,
//! the upstream version read, and the coverage.
//!
//! This module loads the files ([`load_suite`], [`load_cases`]), checks each case's internal
//! consistency ([`check::check_case`]), builds upstream's model objects ([`model`]) and counts
//! what is there ([`Counts`]).
pub mod check;
pub mod format;
pub mod model;
pub mod reachability;
pub mod runner;
pub mod state;
pub mod testbed;
#[cfg(test)]
mod tests;

use format::{CaseFile, Probe, Protocol, Step, Suite};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Yaml { path: PathBuf, source: serde_yaml::Error },
    #[error("placeholder {text:?} {reason}")]
    Placeholder { text: String, reason: String },
    #[error("policy {0}")]
    Policy(String),
    /// A step the state contradicts (creating an existing policy, labelling a missing pod).
    #[error("{0}")]
    State(String),
}

/// `tests/conformance/` in this repository.
pub fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// One case file, with where it was read from.
#[derive(Debug, Clone)]
pub struct Case {
    /// Relative to [`conformance_dir`], e.g. `cases/netpol/01-default-deny-ingress.yaml`.
    pub path: String,
    pub file: CaseFile,
}

impl Case {
    /// The probes that fail a case upstream (`ValidateOrFail`), in order.
    pub fn probes(&self) -> impl Iterator<Item = &Probe> {
        self.file.steps.iter().filter_map(|s| match s {
            Step::Probe(p) => Some(p),
            _ => None,
        })
    }

    /// The probes of `waitForHTTPServers`, before any policy.
    pub fn server_waits(&self) -> impl Iterator<Item = &Probe> {
        self.file.steps.iter().flat_map(|s| match s {
            Step::WaitForServers { probes } => probes.as_slice(),
            _ => &[],
        })
    }

    /// The protocols the case's assertions probe.
    pub fn protocols_probed(&self) -> Vec<Protocol> {
        let mut protocols: Vec<Protocol> = self.probes().map(|p| p.protocol).collect();
        protocols.sort();
        protocols.dedup();
        protocols
    }
}

fn read(path: &Path) -> Result<String, ConformanceError> {
    std::fs::read_to_string(path).map_err(|source| ConformanceError::Io { path: path.to_path_buf(), source })
}

pub fn load_suite() -> Result<Suite, ConformanceError> {
    let path = conformance_dir().join("suite.yaml");
    serde_yaml::from_str(&read(&path)?).map_err(|source| ConformanceError::Yaml { path, source })
}

/// Every `cases/<group>/*.yaml`, sorted by path (the file names carry upstream's order).
pub fn load_cases() -> Result<Vec<Case>, ConformanceError> {
    let root = conformance_dir();
    let mut paths = Vec::new();
    let cases = root.join("cases");
    let groups = std::fs::read_dir(&cases).map_err(|source| ConformanceError::Io { path: cases.clone(), source })?;
    for group in groups {
        let group = group.map_err(|source| ConformanceError::Io { path: cases.clone(), source })?.path();
        let entries =
            std::fs::read_dir(&group).map_err(|source| ConformanceError::Io { path: group.clone(), source })?;
        for entry in entries {
            paths.push(entry.map_err(|source| ConformanceError::Io { path: group.clone(), source })?.path());
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let file = serde_yaml::from_str(&read(&path)?)
                .map_err(|source| ConformanceError::Yaml { path: path.clone(), source })?;
            let relative = path.strip_prefix(&root).unwrap_or(&path).to_string_lossy().into_owned();
            Ok(Case { path: relative, file })
        })
        .collect()
}

/// What the case files hold, counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Upstream `It`s encoded.
    pub cases: usize,
    /// Cases per upstream describe block (`SIGDescribe` text).
    pub cases_by_describe: BTreeMap<String, usize>,
    /// Cases whose assertions probe this protocol (a case may probe two).
    pub cases_by_protocol: BTreeMap<Protocol, usize>,
    /// Asserted matrices (`ValidateOrFail` calls) per protocol.
    pub matrices_by_protocol: BTreeMap<Protocol, usize>,
    /// Asserted (client, server) cells per protocol, loopback excluded as upstream does.
    pub cells_by_protocol: BTreeMap<Protocol, usize>,
    /// Matrices probed by `waitForHTTPServers` before any policy.
    pub server_wait_matrices: usize,
}

impl Counts {
    pub fn of(cases: &[Case]) -> Self {
        let mut counts = Counts { cases: cases.len(), ..Default::default() };
        for case in cases {
            *counts.cases_by_describe.entry(case.file.upstream.describe.clone()).or_default() += 1;
            for protocol in case.protocols_probed() {
                *counts.cases_by_protocol.entry(protocol).or_default() += 1;
            }
            for probe in case.probes() {
                *counts.matrices_by_protocol.entry(probe.protocol).or_default() += 1;
                let n = case.file.pods.len();
                *counts.cells_by_protocol.entry(probe.protocol).or_default() += n * n - n;
            }
            counts.server_wait_matrices += case.server_waits().count();
        }
        counts
    }
}
