//! The kernel side of the agent: loaded programs, maps, pins, attachments, the interface table
//! and the counters read from the kernel.
use super::args::AgentArgs;
use super::error::AgentError;
use crate::dataplane::attach::Attachments;
use crate::dataplane::bpffs;
use crate::dataplane::discovery::InterfaceIndex;
use crate::dataplane::kernel;
use crate::dataplane::maps::{KernelMaps, MapsError};
use crate::dataplane::netfilter::{NetfilterHooks, NetfilterLinks};
use crate::policy::PodInfo;
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use netsieve_common::{CONFIG_EGRESS_ENFORCED, CONFIG_EVENTS_ALLOWED, CONFIG_NETFILTER_ACTIVE, EVENT_COUNTER_COUNT, FlowKey, FlowState, REASON_COUNT, REASON_NAMES};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the netfilter links are pinned, beside the TC links.
pub(super) const NETFILTER_LINK_DIR: &str = "netfilter-links";

/// Sums the per-CPU drop (or audit) counters: (reason, direction, packets).
pub fn read_drop_counters(map: &PerCpuArray<MapData, u64>) -> Vec<(&'static str, &'static str, u64)> {
    let mut out = Vec::new();
    for reason in 0..REASON_COUNT {
        for (direction, name) in [(0u32, "ingress"), (1u32, "egress")] {
            let total = map.get(&(reason * 2 + direction), 0).map(|v| v.iter().sum()).unwrap_or(0);
            out.push((REASON_NAMES[reason as usize], name, total));
        }
    }
    out
}

/// Sums the per-CPU event counters, by `EVENTS_*` index.
pub fn read_event_counters(map: &PerCpuArray<MapData, u64>) -> [u64; EVENT_COUNTER_COUNT as usize] {
    let mut out = [0; EVENT_COUNTER_COUNT as usize];
    for (index, total) in out.iter_mut().enumerate() {
        *total = map.get(&(index as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
    }
    out
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

/// The kernel side: loaded programs, maps, attachments, interfaces.
pub(super) struct Dataplane {
    pub(super) ebpf: aya::Ebpf,
    pub(super) maps: KernelMaps,
    pub(super) drops: PerCpuArray<MapData, u64>,
    /// Would-be drops passed by audit mode, by reason and direction.
    pub(super) audits: PerCpuArray<MapData, u64>,
    /// Events emitted and not emitted (`EVENTS_*`).
    pub(super) event_counters: PerCpuArray<MapData, u64>,
    /// The verdict event ring, until the reader task takes it.
    pub(super) events: Option<RingBuf<MapData>>,
    /// The conntrack table, read (never written) by live explanations off the loop.
    pub(super) conntrack: Arc<HashMap<MapData, FlowKey, FlowState>>,
    pub(super) attachments: Attachments,
    pub(super) interfaces: InterfaceIndex,
    pub(super) pin_dir: PathBuf,
}

impl Dataplane {
    pub(super) fn load(args: &AgentArgs) -> Result<Dataplane, AgentError> {
        kernel::raise_memlock_rlimit();
        let pin_dir = bpffs::ensure_pin_dir(&args.node, &args.bpffs)?;
        let (loaded, reused) = kernel::load_with_state(&pin_dir)?;
        let mut ebpf = loaded.ebpf;
        if reused {
            tracing::info!("reusing the pinned conntrack table: connections admitted before the restart keep flowing");
        }
        // Pin the counters so operators can read them with bpftool while the agent runs.
        for name in ["DROP_COUNTERS", "ENDPOINT_STATS", "ENDPOINTS"] {
            if let Some(map) = ebpf.map_mut(name) {
                let path = pin_dir.join(name);
                let _ = std::fs::remove_file(&path);
                map.pin(&path).map_err(|source| AgentError::Pin { name, source })?;
            }
        }
        let mut maps = KernelMaps::take_from(&mut ebpf)?;
        // Counters zeroed for reuse are read first, so the agent carries them over.
        maps.keep_counter_residue();
        let drops = take(&mut ebpf, "DROP_COUNTERS")?;
        let audits = take(&mut ebpf, "AUDIT_COUNTERS")?;
        let event_counters = take(&mut ebpf, "EVENT_COUNTERS")?;
        let events = take(&mut ebpf, "EVENTS")?;
        let conntrack = Arc::new(take(&mut ebpf, "CONNTRACK")?);
        // The netfilter program judging pod egress after DNAT, if this kernel runs it: attached
        // while some local pod's egress is enforced (the synchronizer says when).
        let netfilter_links = NetfilterLinks::persistent(&pin_dir.join(NETFILTER_LINK_DIR));
        match loaded.netfilter {
            Ok(program) => maps.manage_netfilter(NetfilterHooks::new(program, netfilter_links)),
            Err(error) => tracing::warn!(%error, "no netfilter program: egress to Service addresses is judged on the address the pod used"),
        }
        Ok(Dataplane {
            ebpf,
            maps,
            drops,
            audits,
            event_counters,
            events: Some(events),
            conntrack,
            attachments: Attachments::persistent(&pin_dir.join("links")),
            interfaces: InterfaceIndex::default(),
            pin_dir,
        })
    }

    /// Writes the event settings (`--events-per-second`, `--events-burst`, `--events-allowed`),
    /// keeping the other flags.
    pub(super) fn set_event_settings(&mut self, per_second: u32, burst: u32, allowed_flows: bool) -> Result<(), MapsError> {
        let config = self.maps.config();
        let flags = if allowed_flows { config.flags | CONFIG_EVENTS_ALLOWED } else { config.flags & !CONFIG_EVENTS_ALLOWED };
        self.maps.set_settings(flags, per_second, burst)
    }

    /// Whether the netfilter program is attached (some local pod's egress is enforced) and
    /// the TC programs defer Service egress to it.
    pub(super) fn netfilter_active(&self) -> bool {
        self.maps.config().flags & CONFIG_NETFILTER_ACTIVE != 0
    }

    /// Whether some local pod's egress is enforced (the synchronizer's flag).
    pub(super) fn egress_enforced(&self) -> bool {
        self.maps.config().flags & CONFIG_EGRESS_ENFORCED != 0
    }

    pub(super) fn interface_of(interfaces: &InterfaceIndex) -> impl Fn(&PodInfo) -> Option<u32> + '_ {
        move |pod: &PodInfo| interfaces.interface_for(&pod.ips).map(|i| i.ifindex)
    }
}
