//! Expected-reachability matrices: the written matrix of a probe, and upstream's way of building
//! one (`NewReachability` + `Expect*` calls, from `reachability.go` and `truthtable.go`),
//! re-done here so that each transcribed matrix can be checked against the transcribed calls.
//! Nothing here knows NetworkPolicy semantics: the calls only set cells.
use super::format::{PodRef, ReachabilityBuild, ReachabilityOp};
use std::fmt;

/// An n x n table over the case's pods: `cell(from, to)` is whether `from` must reach `to`'s
/// Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    pods: Vec<PodRef>,
    /// Row-major: `cells[from * n + to]`.
    cells: Vec<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatrixError {
    #[error("the matrix is empty")]
    Empty,
    #[error("the header must start with `-` and name the servers, found {0:?}")]
    BadHeader(String),
    #[error("{0:?} is not a pod (namespace/name)")]
    BadPod(String),
    #[error("row {row}: {found} cells for {expected} columns")]
    RowLength { row: String, found: usize, expected: usize },
    #[error("row {row}, column {column}: {symbol:?} is neither `.` (connects) nor `X` (blocked)")]
    BadSymbol { row: String, column: String, symbol: String },
    #[error("rows name {rows:?} but columns name {columns:?}")]
    RowsAreNotColumns { rows: Vec<String>, columns: Vec<String> },
    #[error("{0} is not in the matrix")]
    UnknownPod(PodRef),
}

impl Matrix {
    /// `NewTruthTableFromItems(pods, &default)`.
    pub fn filled(pods: &[PodRef], value: bool) -> Self {
        Matrix { pods: pods.to_vec(), cells: vec![value; pods.len() * pods.len()] }
    }

    pub fn pods(&self) -> &[PodRef] {
        &self.pods
    }

    fn index(&self, pod: &PodRef) -> Result<usize, MatrixError> {
        self.pods.iter().position(|p| p == pod).ok_or_else(|| MatrixError::UnknownPod(pod.clone()))
    }

    pub fn get(&self, from: &PodRef, to: &PodRef) -> Result<bool, MatrixError> {
        let (f, t) = (self.index(from)?, self.index(to)?);
        Ok(self.cells[f * self.pods.len() + t])
    }

    fn set(&mut self, from: usize, to: usize, value: bool) {
        let n = self.pods.len();
        self.cells[from * n + to] = value;
    }

    /// Every (from, to, expected) cell, row by row.
    pub fn cells(&self) -> impl Iterator<Item = (&PodRef, &PodRef, bool)> {
        let n = self.pods.len();
        self.cells.iter().enumerate().map(move |(i, v)| (&self.pods[i / n], &self.pods[i % n], *v))
    }

    /// Builds the matrix the way the upstream test does: a table filled with `default`, then
    /// each call in order (later calls overwrite earlier ones, as in `TruthTable.Set`). A call
    /// naming a pod outside the table is an error, as it is a `Failf` upstream.
    pub fn from_upstream_calls(pods: &[PodRef], build: &ReachabilityBuild) -> Result<Self, MatrixError> {
        let mut matrix = Matrix::filled(pods, build.default);
        let n = pods.len();
        for op in &build.ops {
            match op {
                ReachabilityOp::Expect { from, to, connected } => {
                    let (f, t) = (matrix.index(from)?, matrix.index(to)?);
                    matrix.set(f, t, *connected);
                }
                ReachabilityOp::ExpectAllIngress { pod, connected } => {
                    let t = matrix.index(pod)?;
                    for f in 0..n {
                        matrix.set(f, t, *connected);
                    }
                }
                ReachabilityOp::ExpectAllEgress { pod, connected } => {
                    let f = matrix.index(pod)?;
                    for t in 0..n {
                        matrix.set(f, t, *connected);
                    }
                }
                ReachabilityOp::ExpectPeer { from, to, connected } => {
                    for f in 0..n {
                        for t in 0..n {
                            if from.matches(&pods[f]) && to.matches(&pods[t]) {
                                matrix.set(f, t, *connected);
                            }
                        }
                    }
                }
            }
        }
        Ok(matrix)
    }

    /// Parses the written form:
    ///
    /// ```text
    /// -    x/a  x/b
    /// x/a  X    .
    /// x/b  X    .
    /// ```
    ///
    /// The header names the servers, each row starts with its client; the rows must name the
    /// same pods as the columns, in the same order.
    pub fn parse(text: &str) -> Result<Self, MatrixError> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let header = lines.next().ok_or(MatrixError::Empty)?;
        let mut header_words = header.split_whitespace();
        if header_words.next() != Some("-") {
            return Err(MatrixError::BadHeader(header.to_string()));
        }
        let columns: Vec<String> = header_words.map(str::to_string).collect();
        if columns.is_empty() {
            return Err(MatrixError::BadHeader(header.to_string()));
        }
        let mut rows = Vec::new();
        let mut cells = Vec::new();
        for line in lines {
            let mut words = line.split_whitespace();
            let row = words.next().unwrap_or_default().to_string();
            let symbols: Vec<&str> = words.collect();
            if symbols.len() != columns.len() {
                return Err(MatrixError::RowLength { row, found: symbols.len(), expected: columns.len() });
            }
            for (symbol, column) in symbols.iter().zip(&columns) {
                cells.push(match *symbol {
                    "." => true,
                    "X" => false,
                    other => {
                        return Err(MatrixError::BadSymbol {
                            row: row.clone(),
                            column: column.clone(),
                            symbol: other.to_string(),
                        });
                    }
                });
            }
            rows.push(row);
        }
        if rows != columns {
            return Err(MatrixError::RowsAreNotColumns { rows, columns });
        }
        let pods = columns
            .iter()
            .map(|c| PodRef::try_from(c.clone()).map_err(|_| MatrixError::BadPod(c.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Matrix { pods, cells })
    }

    /// The cells where two matrices over the same pods differ: (from, to, self's value).
    pub fn differences<'a>(&'a self, other: &'a Matrix) -> Vec<(PodRef, PodRef, bool)> {
        if self.pods != other.pods {
            return self.cells().map(|(f, t, v)| (f.clone(), t.clone(), v)).collect();
        }
        self.cells()
            .zip(other.cells.iter())
            .filter(|((_, _, mine), theirs)| mine != *theirs)
            .map(|((f, t, v), _)| (f.clone(), t.clone(), v))
            .collect()
    }
}

/// The written form [`Matrix::parse`] reads.
impl fmt::Display for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.pods.iter().map(|p| p.to_string().len()).max().unwrap_or(1) + 2;
        write!(f, "{:width$}", "-")?;
        for pod in &self.pods {
            write!(f, "{:width$}", pod.to_string())?;
        }
        writeln!(f)?;
        let n = self.pods.len();
        for (i, from) in self.pods.iter().enumerate() {
            write!(f, "{:width$}", from.to_string())?;
            for t in 0..n {
                write!(f, "{:width$}", if self.cells[i * n + t] { "." } else { "X" })?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::format::Peer;

    fn pod(s: &str) -> PodRef {
        PodRef::try_from(s.to_string()).expect("test pod")
    }

    #[test]
    fn parse_reads_rows_as_clients_and_columns_as_servers() {
        let m = Matrix::parse("-  x/a  y/a\nx/a  .  X\ny/a  .  .\n").expect("parses");
        assert!(!m.get(&pod("x/a"), &pod("y/a")).expect("cell"));
        assert!(m.get(&pod("y/a"), &pod("x/a")).expect("cell"));
        assert_eq!(Matrix::parse(&m.to_string()).expect("round trip"), m);
    }

    #[test]
    fn parse_rejects_malformed_matrices() {
        assert_eq!(Matrix::parse(""), Err(MatrixError::Empty));
        assert!(matches!(Matrix::parse("x/a\nx/a ."), Err(MatrixError::BadHeader(_))));
        assert!(matches!(Matrix::parse("- x/a\nx/a . ."), Err(MatrixError::RowLength { .. })));
        assert!(matches!(Matrix::parse("- x/a\nx/a 1"), Err(MatrixError::BadSymbol { .. })));
        assert!(matches!(Matrix::parse("- x/a y/a\ny/a . .\nx/a . ."), Err(MatrixError::RowsAreNotColumns { .. })));
        assert!(matches!(Matrix::parse("- xa\nxa ."), Err(MatrixError::BadPod(_))));
    }

    #[test]
    fn upstream_calls_apply_in_order_like_truth_table_set() {
        let pods = [pod("x/a"), pod("x/b"), pod("y/a")];
        let build = ReachabilityBuild {
            default: true,
            ops: vec![
                ReachabilityOp::ExpectPeer {
                    from: Peer::default(),
                    to: Peer { namespace: Some("x".into()), pod: None },
                    connected: false,
                },
                ReachabilityOp::ExpectAllEgress { pod: pod("y/a"), connected: false },
                ReachabilityOp::Expect { from: pod("y/a"), to: pod("x/b"), connected: true },
                ReachabilityOp::ExpectAllIngress { pod: pod("y/a"), connected: true },
            ],
        };
        let m = Matrix::from_upstream_calls(&pods, &build).expect("builds");
        let written = Matrix::parse(
            "-   x/a x/b y/a
             x/a X   X   .
             x/b X   X   .
             y/a X   .   .",
        )
        .expect("parses");
        assert_eq!(m.differences(&written), vec![]);
    }

    #[test]
    fn upstream_calls_naming_unknown_pods_fail() {
        let build = ReachabilityBuild {
            default: true,
            ops: vec![ReachabilityOp::ExpectAllIngress { pod: pod("z/c"), connected: false }],
        };
        assert_eq!(Matrix::from_upstream_calls(&[pod("x/a")], &build), Err(MatrixError::UnknownPod(pod("z/c"))));
    }
}
