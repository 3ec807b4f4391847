//! `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` (Linux 5.6) for hash maps: many entries in
//! one system call. Reprogramming an endpoint writes all of its identity and port entries under
//! a fresh slot and then deletes the old slot's; one call per entry made the system calls
//! themselves (entry, fd lookup, security hook, key and value copies) the larger part of the
//! control plane's latency. aya 0.14 has no batch operations, so the attribute is laid out
//! here, as `netfilter` does for the commands it needs.
//!
//! The kernel's generic batch loops over the entries and stops at the first error, reporting in
//! `count` how many it processed: callers learn exactly where a batch stopped.
use aya_obj::generated::bpf_cmd;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands (`attr.batch`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why a batch stopped: the error, and how many entries were done before it.
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub error: std::io::Error,
}

impl BatchError {
    /// The kernel (older than 5.6) or the map type has no batch operation: nothing was done,
    /// the caller goes entry by entry.
    pub fn unsupported(&self) -> bool {
        self.done == 0 && matches!(self.error.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP))
    }
}

/// The kernel-internal "operation not supported" some map types answer with.
const ENOTSUPP: i32 = 524;

fn run(cmd: bpf_cmd, fd: BorrowedFd<'_>, keys: u64, values: u64, count: usize) -> Result<(), BatchError> {
    let Ok(count32) = u32::try_from(count) else {
        return Err(BatchError { done: 0, error: std::io::Error::from_raw_os_error(libc::E2BIG) });
    };
    let mut attr = BatchAttr { keys, values, count: count32, map_fd: fd.as_raw_fd() as u32, ..Default::default() };
    // SAFETY: `attr` is the batch member of bpf_attr, fully initialised (no implicit padding),
    // and lives across the call; `keys` (and `values`) point at `count` elements of the map's
    // key (value) size, which the callers' slices guarantee.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd as libc::c_long, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>())
    };
    if rc < 0 {
        let error = std::io::Error::last_os_error();
        return Err(BatchError { done: (attr.count as usize).min(count), error });
    }
    Ok(())
}

/// Inserts or replaces `keys[i] -> values[i]` in a hash map whose key and value sizes are those
/// of `K` and `V`.
pub fn update<K: aya::Pod, V: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> Result<(), BatchError> {
    if keys.len() != values.len() {
        return Err(BatchError { done: 0, error: std::io::Error::from_raw_os_error(libc::EINVAL) });
    }
    if keys.is_empty() {
        return Ok(());
    }
    run(bpf_cmd::BPF_MAP_UPDATE_BATCH, fd, keys.as_ptr() as u64, values.as_ptr() as u64, keys.len())
}

/// Deletes `keys` from a hash map whose key size is that of `K`.
pub fn delete<K: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    if keys.is_empty() {
        return Ok(());
    }
    run(bpf_cmd::BPF_MAP_DELETE_BATCH, fd, keys.as_ptr() as u64, 0, keys.len())
}
