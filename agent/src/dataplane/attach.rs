//! Attaching the programs to pod interfaces. Thin kernel-facing code.
//!
//! TCX links on kernels that have them (6.6 and later), where several programs coexist in a
//! defined order; a clsact qdisc with netlink filters otherwise. aya's `attach` picks the
//! mechanism by kernel version; the clsact qdisc is only added for the fallback.
use super::kernel::{self, KernelError, PROGRAM_FROM_POD, PROGRAM_TO_POD};
use aya::Ebpf;
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::util::KernelVersion;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("attaching {program} to {interface} ({hook}): {source}")]
    Attach { program: &'static str, interface: String, hook: &'static str, source: Box<aya::programs::ProgramError> },
    #[error("adding a clsact qdisc to {interface}: {source}")]
    Qdisc { interface: String, source: tc::TcError },
}

/// Both programs on one interface.
#[derive(Debug)]
struct Attachment {
    interface: String,
    from_pod: SchedClassifierLinkId,
    to_pod: SchedClassifierLinkId,
}

/// Which interfaces carry the programs, by ifindex.
#[derive(Debug, Default)]
pub struct Attachments {
    by_ifindex: BTreeMap<u32, Attachment>,
}

impl Attachments {
    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.by_ifindex.contains_key(&ifindex)
    }

    pub fn ifindexes(&self) -> Vec<u32> {
        self.by_ifindex.keys().copied().collect()
    }

    /// Attaches `netsieve_from_pod` on TC ingress and `netsieve_to_pod` on TC egress of the
    /// interface. The caller has written the endpoint first, so the first packet is judged.
    pub fn attach(&mut self, ebpf: &mut Ebpf, ifindex: u32, interface: &str) -> Result<(), AttachError> {
        if self.is_attached(ifindex) {
            return Ok(());
        }
        // The same test aya's `attach` makes to choose TCX.
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            match tc::qdisc_add_clsact(interface) {
                Ok(()) => {}
                // Already there (another tool, or us before a restart) is fine.
                Err(tc::TcError::AlreadyAttached) => {}
                Err(source) => return Err(AttachError::Qdisc { interface: interface.to_string(), source }),
            }
        }
        let mut attach_one = |program: &'static str, hook: TcAttachType, hook_name: &'static str| {
            kernel::classifier(ebpf, program)?.attach(interface, hook).map_err(|source| AttachError::Attach {
                program,
                interface: interface.to_string(),
                hook: hook_name,
                source: Box::new(source),
            })
        };
        let from_pod = attach_one(PROGRAM_FROM_POD, TcAttachType::Ingress, "tc ingress")?;
        let to_pod = match attach_one(PROGRAM_TO_POD, TcAttachType::Egress, "tc egress") {
            Ok(link) => link,
            Err(e) => {
                // Leave nothing half-attached.
                if let Ok(program) = kernel::classifier(ebpf, PROGRAM_FROM_POD) {
                    let _ = program.detach(from_pod);
                }
                return Err(e);
            }
        };
        tracing::info!(
            interface, ifindex, mechanism = if tcx { "tcx" } else { "clsact" },
            "attached {PROGRAM_FROM_POD} (tc ingress: pod egress) and {PROGRAM_TO_POD} (tc egress: pod ingress)"
        );
        self.by_ifindex.insert(ifindex, Attachment { interface: interface.to_string(), from_pod, to_pod });
        Ok(())
    }

    /// Detaches both programs from an interface (gone, or its pod left the node).
    pub fn detach(&mut self, ebpf: &mut Ebpf, ifindex: u32) {
        let Some(attachment) = self.by_ifindex.remove(&ifindex) else { return };
        for (program, link) in [(PROGRAM_FROM_POD, attachment.from_pod), (PROGRAM_TO_POD, attachment.to_pod)] {
            // An interface that disappeared took its links with it; that is not an error.
            match kernel::classifier(ebpf, program) {
                Ok(classifier) => {
                    if let Err(error) = classifier.detach(link) {
                        tracing::debug!(interface = %attachment.interface, program, %error, "detach");
                    }
                }
                Err(error) => tracing::debug!(interface = %attachment.interface, program, %error, "detach"),
            }
        }
        tracing::info!(interface = %attachment.interface, ifindex, "detached");
    }

    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        for ifindex in self.ifindexes() {
            self.detach(ebpf, ifindex);
        }
    }
}
