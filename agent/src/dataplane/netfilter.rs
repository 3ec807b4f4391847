//! The netfilter program: pod egress judged after kube-proxy's DNAT, on the backend conntrack
//! chose (docs/DATAPATH.md). aya 0.14 cannot load BPF_PROG_TYPE_NETFILTER programs, so this
//! module does the part aya cannot, and nothing more:
//! - parses the program's object with aya-obj (the object parser aya itself uses) and
//!   relocates its map references to the maps of the already loaded TC object, so both hooks
//!   read and write the very same maps;
//! - loads it with `BPF_PROG_LOAD` and attaches it with `BPF_LINK_CREATE` (netfilter links:
//!   IPv4 and IPv6, POST_ROUTING before source NAT and LOCAL_IN), pinning the links so they
//!   outlive an agent restart like the TC links do;
//! - resolves the kernel structure offsets the program reads from the running kernel's BTF
//!   (`NF_OFFSETS`), so one object serves every kernel.
use aya::Ebpf;
use aya::maps::{Array, Map, MapData};
use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_prog_type};
use btf_rs::{Btf, Type};
use netsieve_common::{NfConntrackTuple, NfOffsets, SkbConntrackAndLengths};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// The object built from `ebpf/src/bin/netsieve-netfilter.rs` by `build.rs`.
pub static NETFILTER_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netsieve-netfilter"));
/// The program's function name in that object.
pub const PROGRAM_NETFILTER: &str = "netsieve_netfilter";
/// The name the program is loaded under (the kernel keeps 15 bytes): `bpftool prog` shows it.
pub const KERNEL_NAME_NETFILTER: &str = "netsieve_nf";

const NFPROTO_IPV4: u32 = 2;
const NFPROTO_IPV6: u32 = 10;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_POST_ROUTING: u32 = 4;
/// Just before source NAT (NF_IP_PRI_NAT_SRC = 100): the destination is the backend DNAT
/// chose, the source still the pod's (as kube-network-policies hooks it, for the same reason).
pub const HOOK_PRIORITY: i32 = 95;
/// `BPF_F_NETFILTER_IP_DEFRAG`: whole datagrams, as conntrack sees them.
const NETFILTER_IP_DEFRAG: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error("kernel BTF ({path}): {message}")]
    Btf { path: String, message: String },
    #[error("parsing the netfilter object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("relocating the netfilter object: {0}")]
    Relocate(String),
    #[error("the netfilter object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the netfilter object uses map {0}, which the TC object does not have")]
    MissingMap(String),
    #[error("loading the netfilter program: {source}; verifier log:\n{log}")]
    Load { source: std::io::Error, log: String },
    #[error("attaching the netfilter program ({hook}): {source}")]
    Attach { hook: String, source: std::io::Error },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: std::io::Error },
    #[error("writing NF_OFFSETS: {0}")]
    Offsets(String),
}

/// Offset of `path` (nested member names; anonymous structs and unions are searched through)
/// from the start of struct `name`, in bytes.
fn member_offset(btf: &Btf, name: &str, path: &[&str]) -> Result<u32, String> {
    let mut current = find_struct(btf, name)?;
    let mut offset = 0u32;
    for (depth, member_name) in path.iter().enumerate() {
        let (bits, member_type) = find_member(btf, &current, member_name)?
            .ok_or_else(|| format!("struct {name} has no member {}", path[..=depth].join(".")))?;
        offset += bits / 8;
        if depth + 1 < path.len() {
            current = match resolve(btf, member_type)? {
                Type::Struct(s) | Type::Union(s) => s,
                other => return Err(format!("{} is a {}, not a struct", path[..=depth].join("."), other.name())),
            };
        }
    }
    Ok(offset)
}

fn find_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct, String> {
    let types = btf.resolve_types_by_name(name).map_err(|e| format!("{name}: {e}"))?;
    types
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(|| format!("no struct {name}"))
}

/// Follows typedefs and qualifiers.
fn resolve(btf: &Btf, mut t: Type) -> Result<Type, String> {
    for _ in 0..16 {
        t = match &t {
            Type::Typedef(x) => btf.resolve_chained_type(x).map_err(|e| e.to_string())?,
            Type::Const(x) => btf.resolve_chained_type(x).map_err(|e| e.to_string())?,
            Type::Volatile(x) => btf.resolve_chained_type(x).map_err(|e| e.to_string())?,
            Type::Restrict(x) => btf.resolve_chained_type(x).map_err(|e| e.to_string())?,
            Type::TypeTag(x) => btf.resolve_chained_type(x).map_err(|e| e.to_string())?,
            _ => return Ok(t),
        };
    }
    Err("type chain too long".into())
}

/// A named member of `s`, looking inside anonymous members: (bit offset, its type).
fn find_member(btf: &Btf, s: &btf_rs::Struct, wanted: &str) -> Result<Option<(u32, Type)>, String> {
    for member in &s.members {
        let name = btf.resolve_name(member).map_err(|e| e.to_string())?;
        let member_type = btf.resolve_chained_type(member).map_err(|e| e.to_string())?;
        if name == wanted {
            return Ok(Some((member.bit_offset(), member_type)));
        }
        if name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = resolve(btf, member_type)?
            && let Some((bits, found)) = find_member(btf, &inner, wanted)?
        {
            return Ok(Some((member.bit_offset() + bits, found)));
        }
    }
    Ok(None)
}

/// The offsets the netfilter program reads, from the running kernel's BTF, once the kernel's
/// `struct nf_conntrack_tuple` is known to be laid out as [`NfConntrackTuple`] and `sk_buff`
/// to start with [`SkbConntrackAndLengths`] at `_nfct` (the program reads each whole).
pub fn kernel_offsets() -> Result<NfOffsets, NetfilterError> {
    let path = "/sys/kernel/btf/vmlinux";
    let err = |message: String| NetfilterError::Btf { path: path.to_string(), message };
    let btf = Btf::from_file(path).map_err(|e| err(e.to_string()))?;
    check_tuple_layout(&btf).map_err(err)?;
    let skb = |field: &str| member_offset(&btf, "sk_buff", &[field]).map_err(err);
    let tuplehash_size = find_struct(&btf, "nf_conntrack_tuple_hash").map_err(err)?.size() as u32;
    let skb_nfct = skb("_nfct")?;
    // The program reads `_nfct`, `len` and `data_len` as one `SkbConntrackAndLengths`.
    for (field, expected) in [
        ("len", std::mem::offset_of!(SkbConntrackAndLengths, len)),
        ("data_len", std::mem::offset_of!(SkbConntrackAndLengths, data_len)),
    ] {
        let found = skb(field)?;
        if found != skb_nfct + expected as u32 {
            return Err(err(format!("sk_buff.{field} is at byte {found}, the program reads it at _nfct + {expected} = {}", skb_nfct + expected as u32)));
        }
    }
    Ok(NfOffsets {
        ready: 1,
        skb_iif: skb("skb_iif")?,
        skb_nfct,
        skb_head: skb("head")?,
        skb_network_header: skb("network_header")?,
        ct_tuplehash: member_offset(&btf, "nf_conn", &["tuplehash"]).map_err(err)?,
        tuplehash_size,
        tuplehash_tuple: member_offset(&btf, "nf_conntrack_tuple_hash", &["tuple"]).map_err(err)?,
    })
}

/// Whether the kernel's `struct nf_conntrack_tuple` has the size and the member offsets of
/// [`NfConntrackTuple`].
fn check_tuple_layout(btf: &Btf) -> Result<(), String> {
    let size = find_struct(btf, "nf_conntrack_tuple")?.size();
    if size != std::mem::size_of::<NfConntrackTuple>() {
        return Err(format!("struct nf_conntrack_tuple is {size} bytes, the program reads {}", std::mem::size_of::<NfConntrackTuple>()));
    }
    for (path, expected) in [
        (["src", "u3"], std::mem::offset_of!(NfConntrackTuple, src_addr)),
        (["src", "u"], std::mem::offset_of!(NfConntrackTuple, src_port)),
        (["src", "l3num"], std::mem::offset_of!(NfConntrackTuple, l3num)),
        (["dst", "u3"], std::mem::offset_of!(NfConntrackTuple, dst_addr)),
        (["dst", "u"], std::mem::offset_of!(NfConntrackTuple, dst_port)),
        (["dst", "protonum"], std::mem::offset_of!(NfConntrackTuple, protonum)),
    ] {
        let found = member_offset(btf, "nf_conntrack_tuple", &path)? as usize;
        if found != expected {
            return Err(format!("nf_conntrack_tuple.{} is at byte {found}, the program reads it at {expected}", path.join(".")));
        }
    }
    Ok(())
}

/// The raw fd of a map of the loaded TC object.
fn map_fd(map: &Map) -> Option<RawFd> {
    let data: &MapData = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::RingBuf(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

/// A loaded netfilter program.
#[derive(Debug)]
pub struct NetfilterProgram {
    fd: OwnedFd,
}

impl NetfilterProgram {
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type` (the kernel zero-extends
/// shorter attributes).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_LINK_CREATE with `link_create.netfilter`.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    pf: u32,
    hooknum: u32,
    priority: i32,
    netfilter_flags: u32,
}

/// `union bpf_attr` for BPF_OBJ_PIN.
#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN. (Every attribute struct here has no implicit
/// padding: see `_pad`.)
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so it is zero: the kernel refuses non-zero bytes after the command's last
    /// field, and Rust leaves implicit padding uninitialised.
    _pad: u32,
}

fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a properly laid out bpf_attr prefix that lives across the call; the
    // kernel reads (and for test runs writes) at most size_of::<T>() bytes of it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

/// Parses the netfilter object, relocates it against `ebpf`'s maps and loads it.
pub fn load(ebpf: &Ebpf) -> Result<NetfilterProgram, NetfilterError> {
    let mut object = aya_obj::Object::parse(NETFILTER_OBJECT)?;
    let maps: Vec<(String, RawFd, aya_obj::Map)> = object
        .maps
        .iter()
        .map(|(name, map)| {
            let fd = ebpf.map(name).and_then(map_fd).ok_or_else(|| NetfilterError::MissingMap(name.to_string()))?;
            Ok((name.clone(), fd, map.clone()))
        })
        .collect::<Result<_, NetfilterError>>()?;
    let text_sections = object.functions.keys().map(|(section, _)| *section).collect();
    object
        .relocate_maps(maps.iter().map(|(name, fd, map)| (name.as_str(), *fd, map)), &text_sections)
        .map_err(|e| NetfilterError::Relocate(e.to_string()))?;
    object.relocate_calls(&text_sections).map_err(|e| NetfilterError::Relocate(e.to_string()))?;
    let program = object.programs.get(PROGRAM_NETFILTER).ok_or(NetfilterError::MissingProgram(PROGRAM_NETFILTER))?;
    let function =
        object.functions.get(&program.function_key()).ok_or(NetfilterError::MissingProgram(PROGRAM_NETFILTER))?;
    let instructions = &function.instructions;
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..KERNEL_NAME_NETFILTER.len()].copy_from_slice(KERNEL_NAME_NETFILTER.as_bytes());
    let mut log = vec![0u8; 1 << 20];
    let mut attr = ProgLoadAttr {
        prog_type: bpf_prog_type::BPF_PROG_TYPE_NETFILTER as u32,
        insn_cnt: instructions.len() as u32,
        insns: instructions.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: bpf_attach_type::BPF_NETFILTER as u32,
        ..Default::default()
    };
    match bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(NetfilterProgram { fd: owned(fd) }),
        Err(source) => {
            // Load again with the verifier log on, for the error message.
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).map(owned);
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let log = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
            Err(NetfilterError::Load { source, log })
        }
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Writes the kernel offsets the program reads (before any link is attached).
pub fn write_offsets(ebpf: &mut Ebpf, offsets: NfOffsets) -> Result<(), NetfilterError> {
    let map = ebpf.map_mut("NF_OFFSETS").ok_or_else(|| NetfilterError::Offsets("no NF_OFFSETS map".into()))?;
    let mut array: Array<&mut MapData, NfOffsets> = Array::try_from(map).map_err(|e| NetfilterError::Offsets(e.to_string()))?;
    array.set(0, offsets, 0).map_err(|e| NetfilterError::Offsets(e.to_string()))
}

/// One attachment point of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    pub family: u32,
    pub hooknum: u32,
}

impl Hook {
    /// Every hook the program judges at: after DNAT and before SNAT for forwarded traffic
    /// (POST_ROUTING) and for traffic to the node itself (LOCAL_IN: pod to a host-network
    /// backend), for both families.
    pub const ALL: [Hook; 4] = [
        Hook { family: NFPROTO_IPV4, hooknum: NF_INET_POST_ROUTING },
        Hook { family: NFPROTO_IPV4, hooknum: NF_INET_LOCAL_IN },
        Hook { family: NFPROTO_IPV6, hooknum: NF_INET_POST_ROUTING },
        Hook { family: NFPROTO_IPV6, hooknum: NF_INET_LOCAL_IN },
    ];

    fn name(&self) -> String {
        let family = if self.family == NFPROTO_IPV4 { "ipv4" } else { "ipv6" };
        let hook = if self.hooknum == NF_INET_POST_ROUTING { "postrouting" } else { "input" };
        format!("{family}-{hook}")
    }
}

/// Attaches the program at one hook of the calling thread's network namespace.
pub fn attach(program: &NetfilterProgram, hook: Hook) -> Result<OwnedFd, NetfilterError> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.fd() as u32,
        attach_type: bpf_attach_type::BPF_NETFILTER as u32,
        pf: hook.family,
        hooknum: hook.hooknum,
        priority: HOOK_PRIORITY,
        netfilter_flags: NETFILTER_IP_DEFRAG,
        ..Default::default()
    };
    bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map(owned).map_err(|source| NetfilterError::Attach { hook: hook.name(), source })
}

fn pin(fd: &OwnedFd, path: &Path) -> Result<(), NetfilterError> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| NetfilterError::Pin { path: path.to_path_buf(), source: std::io::ErrorKind::InvalidInput.into() })?;
    let mut attr = ObjPinAttr { pathname: c_path.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, file_flags: 0 };
    bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(|_| ()).map_err(|source| NetfilterError::Pin { path: path.to_path_buf(), source })
}

/// The program's links: held by this agent, pinned under `dir` when there is one so that they
/// keep enforcing across a restart, and the links a previous agent left there until ours
/// replace them.
#[derive(Debug, Default)]
pub struct NetfilterLinks {
    dir: Option<PathBuf>,
    generation: String,
    held: Vec<(Hook, OwnedFd, Option<PathBuf>)>,
    previous: Vec<PathBuf>,
}

impl NetfilterLinks {
    /// Links pinned under `dir`; adopts (and keeps, until [`NetfilterLinks::attach_all`]
    /// succeeds) what a previous agent pinned there.
    pub fn persistent(dir: &Path) -> NetfilterLinks {
        let mut links = NetfilterLinks {
            dir: Some(dir.to_path_buf()),
            generation: format!("{}-{}", std::process::id(), unix_nanos()),
            ..Default::default()
        };
        if let Err(error) = std::fs::create_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), %error, "cannot create the netfilter link directory; links will not outlive the agent");
            links.dir = None;
            return links;
        }
        links.previous = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        if !links.previous.is_empty() {
            tracing::info!(links = links.previous.len(), "adopted a previous agent's netfilter links; they judge until ours are attached");
        }
        links
    }

    /// Attaches at every hook, then removes a previous agent's links. On failure nothing of
    /// ours stays attached.
    pub fn attach_all(&mut self, program: &NetfilterProgram) -> Result<(), NetfilterError> {
        if !self.held.is_empty() {
            return Ok(());
        }
        let mut held = Vec::new();
        for hook in Hook::ALL {
            let fd = attach(program, hook)?;
            let path = match &self.dir {
                Some(dir) => {
                    let path = dir.join(format!("{}-{}", hook.name(), self.generation));
                    match pin(&fd, &path) {
                        Ok(()) => Some(path),
                        Err(error) => {
                            tracing::warn!(%error, "cannot pin a netfilter link; it will not outlive the agent");
                            None
                        }
                    }
                }
                None => None,
            };
            held.push((hook, fd, path));
        }
        self.held = held;
        for path in std::mem::take(&mut self.previous) {
            // Removing the pin drops the last reference to the old link: detached.
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(pin = %path.display(), %error, "cannot remove a previous agent's netfilter link");
            }
        }
        tracing::info!(hooks = self.held.len(), priority = HOOK_PRIORITY, "netfilter program attached (pod egress after DNAT)");
        Ok(())
    }

    pub fn attached(&self) -> bool {
        !self.held.is_empty()
    }

    /// Unpins (detaches) a previous agent's links ours did not replace: once this agent is in
    /// sync and every previous TC link is gone, nothing defers to them any more.
    pub fn release_previous(&mut self) {
        for path in std::mem::take(&mut self.previous) {
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(pin = %path.display(), %error, "cannot remove a previous agent's netfilter link");
            }
        }
    }

    /// Detaches ours (unpinned), keeping a previous agent's until
    /// [`NetfilterLinks::release_previous`]. Returns how many were attached.
    pub fn detach_ours(&mut self) -> usize {
        let detached = self.held.len();
        for (_, fd, path) in self.held.drain(..) {
            if let Some(path) = path {
                let _ = std::fs::remove_file(path);
            }
            drop(fd);
        }
        detached
    }

    /// Detaches ours and a previous agent's.
    pub fn detach_all(&mut self) {
        self.detach_ours();
        self.release_previous();
    }

    /// Exits leaving pinned links attached; returns how many stay.
    pub fn keep_pinned(&mut self) -> usize {
        let kept = self.held.iter().filter(|(_, _, path)| path.is_some()).count() + self.previous.len();
        self.held.clear();
        self.previous.clear();
        kept
    }
}

/// The netfilter program and its links, attached only while some local pod's egress is
/// enforced: the program judges nothing else, and its hooks (with the defragmentation they
/// bring) would otherwise cost every packet of the node, host traffic included, for nothing.
/// [`NetfilterHooks::attach`] runs before the first egress-enforcing endpoint is programmed and
/// [`NetfilterHooks::detach`] after the last one is gone (the synchronizer's
/// `set_egress_enforced`), so no packet whose egress is enforced misses the hook.
#[derive(Debug)]
pub struct NetfilterHooks {
    program: NetfilterProgram,
    pub links: NetfilterLinks,
}

impl NetfilterHooks {
    pub fn new(program: NetfilterProgram, links: NetfilterLinks) -> NetfilterHooks {
        NetfilterHooks { program, links }
    }

    /// Attaches at every hook unless attached.
    pub fn attach(&mut self) -> Result<(), NetfilterError> {
        self.links.attach_all(&self.program)
    }

    pub fn detach(&mut self) {
        let hooks = self.links.detach_ours();
        if hooks > 0 {
            tracing::info!(hooks, "netfilter program detached (no local pod's egress is enforced)");
        }
    }
}

/// Removes every netfilter link pinned under `dir` (`netsieve cleanup`).
pub fn remove_pinned_links(dir: &Path) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// The result of one `BPF_PROG_TEST_RUN` of the program.
#[derive(Clone, Copy, Debug)]
pub struct NetfilterRun {
    /// NF_ACCEPT (1) or NF_DROP (0).
    pub verdict: u32,
    /// Mean duration of one run, with `repeat` > 1.
    pub duration_ns: u32,
}

/// Runs the program on an Ethernet frame as the kernel's test runner presents it: an skb on
/// loopback with its network header after the Ethernet header, no conntrack entry, arrived on
/// interface 0 (tests program the endpoint under test at `ENDPOINTS[0]`, which no real
/// interface has).
pub fn test_run(program: &NetfilterProgram, frame: &[u8], ipv6: bool, hooknum: u32, repeat: u32) -> std::io::Result<NetfilterRun> {
    // struct nf_hook_state: hook (u8), pf (u8), then pointers the runner fills in itself.
    let mut state = [0u8; 48];
    state[0] = hooknum as u8;
    state[1] = if ipv6 { NFPROTO_IPV6 as u8 } else { NFPROTO_IPV4 as u8 };
    let mut attr = TestRunAttr {
        prog_fd: program.fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: repeat.max(1),
        ctx_size_in: state.len() as u32,
        ctx_in: state.as_ptr() as u64,
        ..Default::default()
    };
    bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(NetfilterRun { verdict: attr.retval, duration_ns: attr.duration })
}

/// Hook numbers for tests and benchmarks.
pub const TEST_HOOK_POST_ROUTING: u32 = NF_INET_POST_ROUTING;
