//! The kernel side of the agent: loaded programs, maps, pins, attachments, the interface table
//! and the counters read from the kernel.
use super::args::AgentArgs;
use super::error::AgentError;
use crate::dataplane::attach::Attachments;
use crate::dataplane::bpffs;
use crate::dataplane::discovery::InterfaceIndex;
use crate::dataplane::kernel;
use crate::dataplane::maps::{KernelMaps, MapsError};
use crate::metrics::EndpointCounters;
use crate::policy::PodInfo;
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use netsieve_common::{EndpointStats, REASON_COUNT, REASON_NAMES};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

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

fn sum_stats(values: &aya::maps::PerCpuValues<EndpointStats>) -> EndpointCounters {
    let mut total = EndpointCounters::default();
    for v in values.iter() {
        total.add(&EndpointCounters {
            allowed_packets: v.allowed_packets,
            allowed_bytes: v.allowed_bytes,
            denied_packets: v.denied_packets,
            denied_bytes: v.denied_bytes,
        });
    }
    total
}

/// The kernel side: loaded programs, maps, attachments, interfaces.
pub(super) struct Dataplane {
    pub(super) ebpf: aya::Ebpf,
    pub(super) maps: KernelMaps,
    pub(super) drops: PerCpuArray<MapData, u64>,
    pub(super) stats: PerCpuHashMap<MapData, u32, EndpointStats>,
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
        let (mut ebpf, reused) = kernel::load_with_state(&pin_dir)?;
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
        let stats = ebpf
            .take_map("ENDPOINT_STATS")
            .ok_or(MapsError::Missing("ENDPOINT_STATS"))
            .and_then(|m| PerCpuHashMap::try_from(m).map_err(|source| MapsError::Layout { name: "ENDPOINT_STATS", source }))?;
        Ok(Dataplane {
            ebpf,
            maps,
            drops,
            stats,
            attachments: Attachments::persistent(&pin_dir.join("links")),
            interfaces: InterfaceIndex::default(),
            pin_dir,
            counted_ids: BTreeMap::new(),
            retired: BTreeMap::new(),
        })
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
            if let Ok(values) = self.stats.get(id, 0) {
                self.retired.entry(pod.clone()).or_default().add(&sum_stats(&values));
            }
            let _ = self.stats.remove(id);
        }
        let pods: BTreeSet<&String> = live.values().collect();
        self.retired.retain(|pod, _| pods.contains(pod));
        let mut out: BTreeMap<String, EndpointCounters> = BTreeMap::new();
        for (id, pod) in live {
            let entry = out.entry(pod.clone()).or_default();
            if let Some(retired) = self.retired.get(pod) {
                *entry = *retired;
            }
            if let Ok(values) = self.stats.get(id, 0) {
                entry.add(&sum_stats(&values));
            }
        }
        self.counted_ids = live.clone();
        out
    }
}
