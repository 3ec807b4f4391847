//! Change detection for the manifests directory.
//!
//! Polling a fingerprint of the directory (names, sizes, modification times) every
//! [`POLL_INTERVAL`] is simpler and more robust than inotify here: it sees editors' rename-over
//! writes, `kubectl get -o yaml > file` truncate-then-write, and files on any filesystem, and
//! it keeps the "enforced within 1 s" promise with a wide margin.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What the directory looked like at one poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirFingerprint {
    files: BTreeMap<PathBuf, (u64, Option<SystemTime>)>,
}

impl DirFingerprint {
    /// Reads the fingerprint; an unreadable directory is an error (the caller keeps the last
    /// good state rather than enforcing an empty one).
    pub fn read(dir: &Path) -> std::io::Result<Self> {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let relevant = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            if !relevant {
                continue;
            }
            // A file removed between read_dir and metadata simply drops out of this poll.
            if let Ok(meta) = entry.metadata() {
                files.insert(path, (meta.len(), meta.modified().ok()));
            }
        }
        Ok(DirFingerprint { files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_on_write_add_and_remove_only() {
        let dir = std::env::temp_dir().join(format!("netsieve-dirwatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let a = DirFingerprint::read(&dir).expect("read");
        std::fs::write(dir.join("x.txt"), "ignored").expect("write");
        assert_eq!(a, DirFingerprint::read(&dir).expect("read"), "non-manifest file counted");
        std::fs::write(dir.join("p.yaml"), "a: 1").expect("write");
        let b = DirFingerprint::read(&dir).expect("read");
        assert_ne!(a, b);
        std::fs::write(dir.join("p.yaml"), "a: 12").expect("write");
        let c = DirFingerprint::read(&dir).expect("read");
        assert_ne!(b, c);
        std::fs::remove_file(dir.join("p.yaml")).expect("remove");
        assert_eq!(a, DirFingerprint::read(&dir).expect("read"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
