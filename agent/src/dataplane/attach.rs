//! Attaching the programs to pod interfaces. Thin kernel-facing code.
//!
//! TCX links on kernels that have them (6.6 and later), where several programs coexist in a
//! defined order; a clsact qdisc with netlink filters otherwise. aya's `attach` picks the
//! mechanism by kernel version; the clsact qdisc is only added for the fallback.
//!
//! Restarts without a gap: with a link directory (on a bpffs), each TCX link is pinned there,
//! so it outlives the agent process when the agent exits with `--on-exit keep`: the programs
//! keep enforcing the last programmed state while no agent runs (an upgrade, a crash). The
//! next agent adopts the pins it finds, attaches its own programs beside them (TCX runs both;
//! both must pass, so the handover can only be stricter, never open), then unpins the old
//! links of that interface, which detaches them.
use super::kernel::{self, KernelError, PROGRAM_FROM_POD, PROGRAM_TO_POD};
use aya::Ebpf;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::util::KernelVersion;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("attaching {program} to {interface} ({hook}): {source}")]
    Attach { program: &'static str, interface: String, hook: &'static str, source: Box<aya::programs::ProgramError> },
    #[error("adding a clsact qdisc to {interface}: {source}")]
    Qdisc { interface: String, source: tc::TcError },
    #[error("link of {program} on {interface}: {source}")]
    Link { program: &'static str, interface: String, source: aya::programs::links::LinkError },
    #[error("pinning the link of {program} on {interface}: {source}")]
    Pin { program: &'static str, interface: String, source: aya::pin::PinError },
}

/// How we hold one attached program.
#[derive(Debug)]
enum Held {
    /// A TCX link pinned in the link directory: survives the process unless unpinned.
    Pinned(PinnedLink),
    /// A TCX link owned by this process only (pinning failed or no link directory).
    Owned(FdLink),
    /// A clsact filter, owned by the program (the fallback cannot be pinned).
    Filter(&'static str, SchedClassifierLinkId),
}

#[derive(Debug)]
struct Attachment {
    interface: String,
    held: Vec<Held>,
}

/// Which interfaces carry the programs, by ifindex.
#[derive(Debug, Default)]
pub struct Attachments {
    by_ifindex: BTreeMap<u32, Attachment>,
    /// Where links are pinned, if anywhere.
    link_dir: Option<PathBuf>,
    /// Distinguishes this agent's pins from a previous agent's.
    generation: String,
    /// Links a previous agent left pinned, by ifindex, until ours replace them.
    previous: BTreeMap<u32, Vec<(PathBuf, PinnedLink)>>,
}

impl Attachments {
    /// Attachments whose TCX links are pinned under `link_dir`, adopting the links a previous
    /// agent left there.
    pub fn persistent(link_dir: &Path) -> Attachments {
        let mut attachments = Attachments {
            link_dir: Some(link_dir.to_path_buf()),
            generation: format!("{}-{}", std::process::id(), unix_nanos()),
            ..Default::default()
        };
        if let Err(error) = std::fs::create_dir_all(link_dir) {
            tracing::warn!(dir = %link_dir.display(), %error, "cannot create the link directory; links will not outlive the agent");
            attachments.link_dir = None;
            return attachments;
        }
        let entries = std::fs::read_dir(link_dir).into_iter().flatten().flatten();
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(ifindex) = name.split('-').next().and_then(|i| i.parse::<u32>().ok()) else { continue };
            match PinnedLink::from_pin(&path) {
                Ok(link) => attachments.previous.entry(ifindex).or_default().push((path, link)),
                Err(error) => {
                    tracing::warn!(pin = %path.display(), %error, "unusable link pin; removing it");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let adopted: usize = attachments.previous.values().map(Vec::len).sum();
        if adopted > 0 {
            tracing::info!(links = adopted, interfaces = attachments.previous.len(), "adopted links of a previous agent; they enforce until ours replace them");
        }
        attachments
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.by_ifindex.contains_key(&ifindex)
    }

    pub fn ifindexes(&self) -> Vec<u32> {
        self.by_ifindex.keys().copied().collect()
    }

    /// Links of a previous agent still enforcing.
    pub fn previous_links(&self) -> usize {
        self.previous.values().map(Vec::len).sum()
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
        let mut held = Vec::new();
        for (program, hook, hook_name) in [
            (PROGRAM_FROM_POD, TcAttachType::Ingress, "tc ingress"),
            (PROGRAM_TO_POD, TcAttachType::Egress, "tc egress"),
        ] {
            match self.attach_one(ebpf, program, interface, ifindex, hook, hook_name, tcx) {
                Ok(h) => held.push(h),
                Err(error) => {
                    // Leave nothing half-attached.
                    for h in held {
                        release(ebpf, h, true);
                    }
                    return Err(error);
                }
            }
        }
        tracing::info!(
            interface, ifindex, mechanism = if tcx { "tcx" } else { "clsact" },
            pinned = held.iter().all(|h| matches!(h, Held::Pinned(_))),
            "attached {PROGRAM_FROM_POD} (tc ingress: pod egress) and {PROGRAM_TO_POD} (tc egress: pod ingress)"
        );
        self.by_ifindex.insert(ifindex, Attachment { interface: interface.to_string(), held });
        // Ours run now: the previous agent's links on this interface can go.
        if let Some(old) = self.previous.remove(&ifindex) {
            for (path, link) in old {
                unpin_and_drop(&path, link);
            }
            tracing::info!(interface, ifindex, "replaced the previous agent's links");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn attach_one(
        &mut self,
        ebpf: &mut Ebpf,
        program: &'static str,
        interface: &str,
        ifindex: u32,
        hook: TcAttachType,
        hook_name: &'static str,
        tcx: bool,
    ) -> Result<Held, AttachError> {
        let classifier = kernel::classifier(ebpf, program)?;
        let id = classifier.attach(interface, hook).map_err(|source| AttachError::Attach {
            program,
            interface: interface.to_string(),
            hook: hook_name,
            source: Box::new(source),
        })?;
        if !tcx {
            return Ok(Held::Filter(program, id));
        }
        let link = match classifier.take_link(id) {
            Ok(link) => link,
            Err(error) => {
                // Cannot happen for an id we just got; fail the attach rather than guess.
                return Err(AttachError::Attach { program, interface: interface.to_string(), hook: hook_name, source: Box::new(error) });
            }
        };
        let fd_link = match FdLink::try_from(link) {
            Ok(fd_link) => fd_link,
            Err(source) => return Err(AttachError::Link { program, interface: interface.to_string(), source }),
        };
        let Some(dir) = &self.link_dir else { return Ok(Held::Owned(fd_link)) };
        let path = dir.join(format!("{ifindex}-{program}-{}", self.generation));
        match fd_link.pin(&path) {
            Ok(pinned) => Ok(Held::Pinned(pinned)),
            Err(source) => {
                // The failed pin consumed (and detached) the link. Stop pinning, so the retry
                // attaches links owned by this process: enforcing without surviving restarts
                // beats not enforcing.
                tracing::error!(pin = %path.display(), error = %source, "cannot pin links; they will not outlive the agent");
                self.link_dir = None;
                Err(AttachError::Pin { program, interface: interface.to_string(), source })
            }
        }
    }

    /// Detaches both programs from an interface (gone, or its pod left the node).
    pub fn detach(&mut self, ebpf: &mut Ebpf, ifindex: u32) {
        let Some(attachment) = self.by_ifindex.remove(&ifindex) else { return };
        for held in attachment.held {
            release(ebpf, held, true);
        }
        tracing::info!(interface = %attachment.interface, ifindex, "detached");
    }

    /// Detaches everything, ours and any previous agent's.
    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        for ifindex in self.ifindexes() {
            self.detach(ebpf, ifindex);
        }
        self.release_previous();
    }

    /// Unpins (detaches) the previous agent's links that ours did not replace: their
    /// interfaces hold no local pod any more. Called once the initial sync is done.
    pub fn release_previous(&mut self) {
        for (ifindex, links) in std::mem::take(&mut self.previous) {
            for (path, link) in links {
                unpin_and_drop(&path, link);
            }
            tracing::info!(ifindex, "detached a previous agent's links (no local pod there now)");
        }
    }

    /// Exits leaving pinned links attached: they keep enforcing the last programmed state
    /// until the next agent replaces them (or `netsieve cleanup` removes them). Links that
    /// could not be pinned are detached.
    pub fn keep_pinned(&mut self, ebpf: &mut Ebpf) -> usize {
        let mut kept = 0;
        for (_, attachment) in std::mem::take(&mut self.by_ifindex) {
            for held in attachment.held {
                if matches!(held, Held::Pinned(_)) {
                    kept += 1;
                }
                release(ebpf, held, false);
            }
        }
        // A previous agent's links that we never replaced stay too: they are still the only
        // enforcement on their interfaces.
        kept + self.previous_links()
    }
}

/// Lets go of one attached program. `detach`: remove it from the interface; otherwise a
/// pinned link stays attached through its pin.
fn release(ebpf: &mut Ebpf, held: Held, detach: bool) {
    match held {
        Held::Pinned(link) => {
            if detach {
                match link.unpin() {
                    Ok(fd_link) => drop(fd_link),
                    Err(error) => tracing::warn!(%error, "cannot unpin link"),
                }
            }
        }
        Held::Owned(fd_link) => drop(fd_link),
        Held::Filter(program, id) => match kernel::classifier(ebpf, program) {
            Ok(classifier) => {
                // An interface that disappeared took its filters with it; not an error.
                if let Err(error) = classifier.detach(id) {
                    tracing::debug!(program, %error, "detach");
                }
            }
            Err(error) => tracing::debug!(program, %error, "detach"),
        },
    }
}

fn unpin_and_drop(path: &Path, link: PinnedLink) {
    match link.unpin() {
        Ok(fd_link) => drop(fd_link),
        Err(error) => {
            tracing::warn!(pin = %path.display(), %error, "cannot unpin a previous agent's link");
            let _ = std::fs::remove_file(path);
        }
    }
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Removes every link pinned under `link_dir` (detaching them): `netsieve cleanup`.
pub fn remove_pinned_links(link_dir: &Path) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(link_dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match PinnedLink::from_pin(&path) {
            Ok(link) => {
                unpin_and_drop(&path, link);
                removed += 1;
            }
            Err(_) => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    removed
}
