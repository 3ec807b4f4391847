//! The kernel side of the agent: loaded programs, maps, pins, attachments, the interface table
//! and the counters read from the kernel.
use super::args::AgentArgs;
use super::error::AgentError;
use crate::dataplane::attach::Attachments;
use crate::dataplane::bpffs;
use crate::dataplane::discovery::InterfaceIndex;
use crate::dataplane::kernel;
use crate::dataplane::maps::{KernelMaps, MapsError};
use crate::dataplane::netfilter::{NetfilterLinks, NetfilterProgram};
use crate::metrics::EndpointCounters;
use crate::policy::PodInfo;
use aya::maps::{MapData, PerCpuArray};
use netsieve_common::{CONFIG_NETFILTER_ACTIVE, EndpointStats, REASON_COUNT, REASON_NAMES};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Where the netfilter links are pinned, beside the TC links.
pub(super) const NETFILTER_LINK_DIR: &str = "netfilter-links";

/// Sums the per-CPU drop counters: (reason, direction, packets).
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

fn counters_of(stats: &EndpointStats) -> EndpointCounters {
    EndpointCounters {
        allowed_packets: stats.allowed_packets,
        allowed_bytes: stats.allowed_bytes,
        denied_packets: stats.denied_packets,
        denied_bytes: stats.denied_bytes,
    }
}

/// The kernel side: loaded programs, maps, attachments, interfaces.
pub(super) struct Dataplane {
    pub(super) ebpf: aya::Ebpf,
    pub(super) maps: KernelMaps,
    pub(super) drops: PerCpuArray<MapData, u64>,
    /// The netfilter program judging pod egress after DNAT, if this kernel runs it.
    netfilter: Option<NetfilterProgram>,
    pub(super) netfilter_links: NetfilterLinks,
    pub(super) attachments: Attachments,
    pub(super) interfaces: InterfaceIndex,
    pub(super) pin_dir: PathBuf,
    /// Endpoint ids seen at the last snapshot, with their pod: the kernel counts per endpoint
    /// id, and an id is retired on every reprogramming, so its final counts are carried over
    /// to the pod to keep the exported counters monotonic.
    counted_ids: BTreeMap<u32, String>,
    retired: BTreeMap<String, EndpointCounters>,
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
        let maps = KernelMaps::take_from(&mut ebpf)?;
        let drops = ebpf
            .take_map("DROP_COUNTERS")
            .ok_or(MapsError::Missing("DROP_COUNTERS"))
            .and_then(|m| PerCpuArray::try_from(m).map_err(|source| MapsError::Layout { name: "DROP_COUNTERS", source }))?;
        Ok(Dataplane {
            ebpf,
            maps,
            drops,
            netfilter: loaded.netfilter.ok(),
            netfilter_links: NetfilterLinks::persistent(&pin_dir.join(NETFILTER_LINK_DIR)),
            attachments: Attachments::persistent(&pin_dir.join("links")),
            interfaces: InterfaceIndex::default(),
            pin_dir,
            counted_ids: BTreeMap::new(),
            retired: BTreeMap::new(),
        })
    }

    /// Attaches the netfilter program (once) and tells the TC programs they may defer egress
    /// verdicts to it. Without it, TC judges egress on the address the pod used.
    pub(super) fn enable_netfilter(&mut self) {
        let Some(program) = &self.netfilter else { return };
        if self.netfilter_links.attached() {
            return;
        }
        match self.netfilter_links.attach_all(program) {
            Ok(()) => {
                let config = self.maps.config();
                if let Err(error) =
                    self.maps.set_settings(config.flags | CONFIG_NETFILTER_ACTIVE, config.events_per_second, config.events_burst)
                {
                    tracing::error!(%error, "cannot enable deferral to the netfilter program");
                }
            }
            Err(error) => tracing::error!(
                %error,
                "cannot attach the netfilter program: egress to Service addresses is judged on the address the pod used"
            ),
        }
    }

    pub(super) fn interface_of(interfaces: &InterfaceIndex) -> impl Fn(&PodInfo) -> Option<u32> + '_ {
        move |pod: &PodInfo| interfaces.interface_for(&pod.ips).map(|i| i.ifindex)
    }

    /// Per-pod counters: live endpoint ids plus the carried-over counts of retired ones.
    pub(super) fn endpoint_counters(&mut self, live: &BTreeMap<u32, String>) -> BTreeMap<String, EndpointCounters> {
        for (id, pod) in &self.counted_ids {
            if live.contains_key(id) {
                continue;
            }
            if let Ok(stats) = self.maps.endpoint_stats(*id) {
                self.retired.entry(pod.clone()).or_default().add(&counters_of(&stats));
            }
        }
        let pods: BTreeSet<&String> = live.values().collect();
        self.retired.retain(|pod, _| pods.contains(pod));
        let mut out: BTreeMap<String, EndpointCounters> = BTreeMap::new();
        for (id, pod) in live {
            let entry = out.entry(pod.clone()).or_default();
            if let Some(retired) = self.retired.get(pod) {
                *entry = *retired;
            }
            if let Ok(stats) = self.maps.endpoint_stats(*id) {
                entry.add(&counters_of(&stats));
            }
        }
        self.counted_ids = live.clone();
        out
    }
}
