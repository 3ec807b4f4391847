//! The embedded eBPF objects and loading them. Thin: no policy logic here.
use super::netfilter::{self, NetfilterError, NetfilterProgram};
use aya::programs::{ProgramError, SchedClassifier};
use aya::{Ebpf, EbpfError};

/// The object built from `ebpf/` by `build.rs`; aligned because aya parses it in place.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netsieve"));

/// Program on the veth's TC ingress: traffic the pod sends (egress policy).
pub const PROGRAM_FROM_POD: &str = "netsieve_from_pod";
/// Program on the veth's TC egress: traffic sent to the pod (ingress policy).
pub const PROGRAM_TO_POD: &str = "netsieve_to_pod";
/// Empty program, the benchmarks' baseline.
pub const PROGRAM_PASS: &str = "netsieve_pass";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] Box<EbpfError>),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: Box<ProgramError> },
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK. Newer kernels (this project needs
/// TCX, so 6.6+) use memory cgroups instead, so a container that may not raise the limit is
/// not an error: the soft limit is raised as far as the hard limit allows and a failure is
/// only logged.
pub fn raise_memlock_rlimit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit/getrlimit read or write only the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return;
    }
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: as above.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) == 0 && {
            current.rlim_cur = current.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &current) == 0
        }
    };
    if !raised {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

/// The loaded programs: the TC object (maps and classifiers, through aya) and the netfilter
/// program relocated against its maps, when this kernel can run it.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// `Err`: the kernel cannot load or the agent cannot configure the netfilter program (no
    /// BTF, kernel before 6.4). Egress to Service addresses is then judged by TC on the address
    /// the pod used, which denies what a Service would have allowed: fail closed.
    pub netfilter: Result<NetfilterProgram, NetfilterError>,
}

/// Loads the object (creating its maps) and loads the programs into the kernel.
pub fn load() -> Result<Loaded, KernelError> {
    finish(Ebpf::load(EBPF_OBJECT).map_err(Box::new)?)
}

/// The pin name of the conntrack table. It carries the layout (version and sizes), so an agent
/// whose table has a different layout starts a table of its own instead of misreading the old
/// one.
pub fn conntrack_pin_name() -> String {
    format!(
        "CONNTRACK-l{}k{}v{}n{}",
        netsieve_common::CONNTRACK_LAYOUT,
        std::mem::size_of::<netsieve_common::FlowKey>(),
        std::mem::size_of::<netsieve_common::FlowState>(),
        netsieve_common::MAX_CONNTRACK_ENTRIES
    )
}

/// The pin name of the conntrack epochs (`FLOW_EPOCHS`), which go with the table they count
/// inserts into.
pub fn flow_epochs_pin_name() -> String {
    format!("FLOW_EPOCHS-l{}n{}", netsieve_common::CONNTRACK_LAYOUT, netsieve_common::FLOW_EPOCH_SLOTS)
}

/// Like [`load`], but the conntrack table is the one pinned in `state_dir` if there is one
/// (created and pinned otherwise): connections admitted before an agent restart keep their
/// replies admitted after it. Returns whether an existing table was reused. The conntrack
/// epochs are pinned with it: while a restart replaces the programs hook by hook, an entry
/// the old program inserts on one hook still withdraws the denials the new one caches on the
/// other.
pub fn load_with_state(state_dir: &std::path::Path) -> Result<(Loaded, bool), KernelError> {
    let pin = state_dir.join(conntrack_pin_name());
    let reused = pin.exists();
    let ebpf = aya::EbpfLoader::new()
        .map_pin_path("CONNTRACK", pin)
        .map_pin_path("FLOW_EPOCHS", state_dir.join(flow_epochs_pin_name()))
        .load(EBPF_OBJECT)
        .map_err(Box::new)?;
    Ok((finish(ebpf)?, reused))
}

fn finish(ebpf: Ebpf) -> Result<Loaded, KernelError> {
    let mut ebpf = load_programs(ebpf)?;
    let netfilter = netfilter::kernel_offsets()
        .and_then(|offsets| netfilter::write_offsets(&mut ebpf, offsets))
        .and_then(|()| netfilter::load(&ebpf));
    if let Err(error) = &netfilter {
        tracing::warn!(%error, "netfilter program unavailable: egress to Service addresses is judged on the address the pod used (fail closed)");
    }
    Ok(Loaded { ebpf, netfilter })
}

fn load_programs(mut ebpf: Ebpf) -> Result<Ebpf, KernelError> {
    for name in [PROGRAM_FROM_POD, PROGRAM_TO_POD, PROGRAM_PASS] {
        classifier(&mut ebpf, name)?.load().map_err(|source| KernelError::Program { name, source: Box::new(source) })?;
    }
    Ok(ebpf)
}

/// A program of the object as a TC classifier.
pub fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, KernelError> {
    let program = ebpf.program_mut(name).ok_or(KernelError::MissingProgram(name))?;
    program.try_into().map_err(|source| KernelError::Program { name, source: Box::new(source) })
}
