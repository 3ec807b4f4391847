//! A bpffs for pinning the agent's maps.
//!
//! `/sys/fs/bpf` is used when it is a bpffs (as on a kind node or a DaemonSet with the host's
//! bpffs mounted). Where it is not (a bare network namespace test, a container without the
//! mount), the agent mounts a bpffs of its own rather than failing or skipping pinning.
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("mounting bpffs at {path}: {source}")]
    Mount { path: PathBuf, source: std::io::Error },
    #[error("path {0} contains a NUL byte")]
    BadPath(PathBuf),
}

/// Whether `path` is the root of (or inside) a mounted bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

/// Returns a directory on a bpffs for this agent's pins: `<bpffs>/netsieve/<instance>`.
/// Mounts a bpffs at `fallback_mount` when `/sys/fs/bpf` is not one.
pub fn ensure_pin_dir(instance: &str, fallback_mount: &Path) -> Result<PathBuf, BpffsError> {
    let system = Path::new("/sys/fs/bpf");
    let root = if is_bpffs(system) {
        system.to_path_buf()
    } else {
        if !is_bpffs(fallback_mount) {
            std::fs::create_dir_all(fallback_mount)
                .map_err(|source| BpffsError::CreateDir { path: fallback_mount.to_path_buf(), source })?;
            let target = CString::new(fallback_mount.as_os_str().as_encoded_bytes())
                .map_err(|_| BpffsError::BadPath(fallback_mount.to_path_buf()))?;
            let fstype = c"bpf";
            // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
            let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
            if rc != 0 {
                return Err(BpffsError::Mount {
                    path: fallback_mount.to_path_buf(),
                    source: std::io::Error::last_os_error(),
                });
            }
            tracing::info!(path = %fallback_mount.display(), "/sys/fs/bpf is not a bpffs; mounted one of our own");
        }
        fallback_mount.to_path_buf()
    };
    let dir = root.join("netsieve").join(instance);
    std::fs::create_dir_all(&dir).map_err(|source| BpffsError::CreateDir { path: dir.clone(), source })?;
    Ok(dir)
}

/// The pin directory an agent for `instance` would use, if it exists (without mounting).
pub fn existing_pin_dir(instance: &str, fallback_mount: &Path) -> Option<PathBuf> {
    let system = Path::new("/sys/fs/bpf");
    let root = if is_bpffs(system) { system } else { fallback_mount };
    let dir = root.join("netsieve").join(instance);
    (is_bpffs(root) && dir.is_dir()).then_some(dir)
}
