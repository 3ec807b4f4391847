//! The maps of a loaded program, as [`PolicyMaps`] for the synchronizer plus the counters and
//! settings the agent reads and writes. Thin: key encoding only, no policy logic.
use super::batch;
use super::lpm::PortPrefix;
use super::netfilter::NetfilterHooks;
use super::sync::PolicyMaps;
use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, PerCpuValues};
use ipnet::Ipv6Net;
use std::os::fd::AsFd;
use netsieve_common::{
    CONFIG_EGRESS_ENFORCED, CONFIG_NETFILTER_ACTIVE, Config, EndpointInfo, EndpointStats, IpcacheKey, IpcacheValue, POLICY_CIDR_FIXED_BITS, POLICY_PORT_FIXED_BITS,
    PolicyCidrKeyData, PolicyIdentityKey, PolicyPortKey, PolicyPortRangeKeyData, RuleMask, RuleStats,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("the eBPF object has no map named {0}")]
    Missing(&'static str),
    #[error("map {name} has an unexpected type or layout: {source}")]
    Layout { name: &'static str, source: MapError },
    #[error("map {name}: {source}")]
    Access { name: &'static str, source: MapError },
}

/// Owned handles to the maps the agent writes and reads.
pub struct KernelMaps {
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    pub ipcache: HashMap<MapData, IpcacheKey, IpcacheValue>,
    pub pod_addresses: HashMap<MapData, IpcacheKey, u32>,
    pub revisions: Array<MapData, u32>,
    pub identity: HashMap<MapData, PolicyIdentityKey, RuleMask>,
    pub cidr: LpmTrie<MapData, PolicyCidrKeyData, RuleMask>,
    pub port: HashMap<MapData, PolicyPortKey, RuleMask>,
    pub port_range: LpmTrie<MapData, PolicyPortRangeKeyData, RuleMask>,
    pub config_map: Array<MapData, Config>,
    pub endpoint_stats: PerCpuArray<MapData, EndpointStats>,
    pub rule_stats: PerCpuArray<MapData, RuleStats>,
    /// What `CONFIG` holds: written whole, so the synchronizer (generation) and the agent
    /// (flags, event rates) never overwrite each other's fields.
    config: Config,
    /// When set, what counters held just before `reset_counters` zeroed them for reuse.
    residue: Option<CounterResidue>,
    /// The netfilter program, when this kernel runs it: attached and detached with
    /// `CONFIG_EGRESS_ENFORCED` (see [`NetfilterHooks`]); `CONFIG_NETFILTER_ACTIVE` says it is
    /// attached. Without it (tests, benchmarks) the flags are the caller's to set.
    netfilter: Option<NetfilterHooks>,
}

/// Counts read from endpoint slots and rule counters just before they were zeroed for reuse:
/// the final counts of a programming the synchronizer retired and reused within one sync,
/// which the agent carries over (`observe::ledger`). Only nonzero counts are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterResidue {
    pub slots: std::collections::BTreeMap<u32, EndpointStats>,
    pub rules: std::collections::BTreeMap<u32, RuleStats>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

impl KernelMaps {
    /// Takes the maps out of a loaded object (the programs keep their references).
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(KernelMaps {
            endpoints: take(ebpf, "ENDPOINTS")?,
            ipcache: take(ebpf, "IPCACHE")?,
            pod_addresses: take(ebpf, "POD_ADDRESSES")?,
            revisions: take(ebpf, "REVISIONS")?,
            identity: take(ebpf, "POLICY_IDENTITY")?,
            cidr: take(ebpf, "POLICY_CIDR")?,
            port: take(ebpf, "POLICY_PORT")?,
            port_range: take(ebpf, "POLICY_RANGE")?,
            config_map: take(ebpf, "CONFIG")?,
            endpoint_stats: take(ebpf, "ENDPOINT_STATS")?,
            rule_stats: take(ebpf, "RULE_STATS")?,
            config: Config::default(),
            residue: None,
            netfilter: None,
        })
    }

    /// From now on, keep what counters held before they are zeroed for reuse, until
    /// [`KernelMaps::take_counter_residue`] takes it (the agent does after every sync).
    pub fn keep_counter_residue(&mut self) {
        self.residue.get_or_insert_with(CounterResidue::default);
    }

    /// What was kept since the last call (empty unless [`KernelMaps::keep_counter_residue`]).
    pub fn take_counter_residue(&mut self) -> CounterResidue {
        match &mut self.residue {
            Some(residue) => std::mem::take(residue),
            None => CounterResidue::default(),
        }
    }

    pub fn config(&self) -> Config {
        self.config
    }

    /// Writes the settings the agent owns (`CONFIG_*` flags, event rate), keeping the
    /// synchronizer's ipcache generation.
    pub fn set_settings(&mut self, flags: u32, events_per_second: u32, events_burst: u32) -> Result<(), MapsError> {
        let config = Config { flags, events_per_second, events_burst, ..self.config };
        self.write_config(config).map_err(|source| MapsError::Access { name: "CONFIG", source })
    }

    /// Hands the netfilter program and its links over: from now on they follow
    /// `set_egress_enforced`.
    pub fn manage_netfilter(&mut self, hooks: NetfilterHooks) {
        self.netfilter = Some(hooks);
    }

    pub fn netfilter_hooks(&mut self) -> Option<&mut NetfilterHooks> {
        self.netfilter.as_mut()
    }

    /// Attaches the netfilter program if some pod's egress is enforced and an earlier attempt
    /// failed (each reconcile retries).
    pub fn retry_netfilter(&mut self) -> Result<(), MapsError> {
        if self.config.flags & CONFIG_EGRESS_ENFORCED == 0 || self.config.flags & CONFIG_NETFILTER_ACTIVE != 0 {
            return Ok(());
        }
        if self.netfilter.is_none() {
            return Ok(());
        }
        self.set_egress_enforced(true).map_err(|source| MapsError::Access { name: "CONFIG", source })
    }

    fn write_config(&mut self, config: Config) -> Result<(), MapError> {
        self.config_map.set(0, config, 0)?;
        self.config = config;
        Ok(())
    }

    /// Packets and bytes of one endpoint slot, summed over CPUs.
    pub fn endpoint_stats(&self, slot: u32) -> Result<EndpointStats, MapsError> {
        let values = self.endpoint_stats.get(&slot, 0).map_err(|source| MapsError::Access { name: "ENDPOINT_STATS", source })?;
        let mut total = EndpointStats::default();
        for v in values.iter() {
            total.add(v);
        }
        Ok(total)
    }

    /// Packets and bytes admitted by one rule counter, summed over CPUs.
    pub fn rule_stats(&self, index: u32) -> Result<RuleStats, MapsError> {
        let values = self.rule_stats.get(&index, 0).map_err(|source| MapsError::Access { name: "RULE_STATS", source })?;
        let mut total = RuleStats::default();
        for v in values.iter() {
            total.add(v);
        }
        Ok(total)
    }
}

fn zeroed<T: aya::Pod + Default>() -> Result<PerCpuValues<T>, MapError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, error)| MapError::SyscallError(aya::sys::SyscallError { call: "nr_cpus", io_error: error }))?;
    PerCpuValues::try_from(vec![T::default(); cpus]).map_err(|error| MapError::SyscallError(aya::sys::SyscallError { call: "per-cpu values", io_error: error }))
}

fn identity_key(slot: u32, direction: u8, peer_identity: u32) -> PolicyIdentityKey {
    PolicyIdentityKey { endpoint_id: slot, direction, _pad1: 0, _pad2: 0, peer_identity }
}

fn cidr_key(slot: u32, direction: u8, net: Ipv6Net) -> Key<PolicyCidrKeyData> {
    let data = PolicyCidrKeyData { endpoint_id: slot, direction, _pad1: 0, _pad2: 0, addr: net.network().octets() };
    Key::new(POLICY_CIDR_FIXED_BITS + u32::from(net.prefix_len()), data)
}

fn port_key(slot: u32, direction: u8, protocol: u8, port: u16) -> PolicyPortKey {
    PolicyPortKey { endpoint_id: slot, direction, protocol, port }
}

fn range_key(slot: u32, direction: u8, protocol: u8, prefix: PortPrefix) -> Key<PolicyPortRangeKeyData> {
    let data = PolicyPortRangeKeyData { endpoint_id: slot, direction, protocol, port_be: prefix.port.to_be_bytes() };
    Key::new(POLICY_PORT_FIXED_BITS + u32::from(prefix.len), data)
}

fn batch_error(call: &'static str, io_error: std::io::Error) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError { call, io_error })
}

/// Writes `keys[i] -> values[i]` with as few system calls as the kernel allows: one batch, or
/// entry by entry where batches are not supported.
fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    keys: &[K],
    values: &[V],
    name: &'static str,
) -> Result<(), MapError> {
    match batch::update(map.map().fd().as_fd(), keys, values) {
        Ok(()) => Ok(()),
        Err(error) if error.unsupported() => {
            keys.iter().zip(values).try_for_each(|(key, value)| map.insert(key, value, 0))
        }
        Err(error) => {
            tracing::debug!(map = name, done = error.done, error = %error.error, "batch update stopped");
            Err(batch_error("bpf_map_update_batch", error.error))
        }
    }
}

/// Deletes `keys`; keys already gone are skipped, as [`ignore_missing`] does for one key.
fn delete_batch<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, keys: &[K], name: &'static str) -> Result<(), MapError> {
    let mut rest = keys;
    while !rest.is_empty() {
        match batch::delete(map.map().fd().as_fd(), rest) {
            Ok(()) => return Ok(()),
            // The kernel stops at a missing key: skip it, go on with the next.
            Err(error) if error.error.raw_os_error() == Some(libc::ENOENT) => rest = &rest[(error.done + 1).min(rest.len())..],
            Err(error) if error.unsupported() => {
                return rest.iter().try_for_each(|key| ignore_missing(map.remove(key)));
            }
            Err(error) => {
                tracing::debug!(map = name, done = error.done, error = %error.error, "batch delete stopped");
                return Err(batch_error("bpf_map_delete_batch", error.error));
            }
        }
    }
    Ok(())
}

/// A delete of a key that is already gone is not an error: sync may retry after a failure.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl PolicyMaps for KernelMaps {
    type Error = MapError;
    fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), MapError> {
        self.endpoints.insert(ifindex, info, 0)
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), MapError> {
        ignore_missing(self.endpoints.remove(&ifindex))
    }
    fn set_ipcache(&mut self, net: Ipv6Net, value: IpcacheValue) -> Result<(), MapError> {
        self.ipcache.insert(net.addr().octets(), value, 0)
    }
    fn remove_ipcache(&mut self, net: Ipv6Net) -> Result<(), MapError> {
        ignore_missing(self.ipcache.remove(&net.addr().octets()))
    }
    fn set_ipcache_generation(&mut self, generation: u32) -> Result<(), MapError> {
        let config = Config { ipcache_generation: generation, ..self.config };
        self.write_config(config)
    }
    /// With the netfilter program managed here: attached before the flag goes on (the TC
    /// programs defer Service egress to it only with both `CONFIG_EGRESS_ENFORCED` and
    /// `CONFIG_NETFILTER_ACTIVE`), detached after both go off. If it cannot be attached, the
    /// TC programs judge egress on the address the pod used (Service egress fails closed).
    fn set_egress_enforced(&mut self, on: bool) -> Result<(), MapError> {
        let mut flags = if on { self.config.flags | CONFIG_EGRESS_ENFORCED } else { self.config.flags & !CONFIG_EGRESS_ENFORCED };
        if let Some(hooks) = &mut self.netfilter {
            flags &= !CONFIG_NETFILTER_ACTIVE;
            if on {
                match hooks.attach() {
                    Ok(()) => flags |= CONFIG_NETFILTER_ACTIVE,
                    Err(error) => tracing::error!(
                        %error,
                        "cannot attach the netfilter program: egress to Service addresses is judged on the address the pod used"
                    ),
                }
            }
        }
        self.write_config(Config { flags, ..self.config })?;
        if let (false, Some(hooks)) = (on, &mut self.netfilter) {
            hooks.detach();
        }
        Ok(())
    }
    fn set_slot_revision(&mut self, slot: u32, revision: u32) -> Result<(), MapError> {
        self.revisions.set(slot, revision, 0)
    }
    fn set_pod_address(&mut self, addr: std::net::Ipv6Addr, ifindex: u32) -> Result<(), MapError> {
        self.pod_addresses.insert(addr.octets(), ifindex, 0)
    }
    fn remove_pod_address(&mut self, addr: std::net::Ipv6Addr) -> Result<(), MapError> {
        ignore_missing(self.pod_addresses.remove(&addr.octets()))
    }
    fn set_identity(&mut self, slot: u32, dir: u8, identity: u32, bits: u64) -> Result<(), MapError> {
        self.identity.insert(identity_key(slot, dir, identity), RuleMask { bits }, 0)
    }
    fn remove_identity(&mut self, slot: u32, dir: u8, identity: u32) -> Result<(), MapError> {
        ignore_missing(self.identity.remove(&identity_key(slot, dir, identity)))
    }
    fn set_cidr(&mut self, slot: u32, dir: u8, net: Ipv6Net, bits: u64) -> Result<(), MapError> {
        self.cidr.insert(&cidr_key(slot, dir, net), RuleMask { bits }, 0)
    }
    fn remove_cidr(&mut self, slot: u32, dir: u8, net: Ipv6Net) -> Result<(), MapError> {
        ignore_missing(self.cidr.remove(&cidr_key(slot, dir, net)))
    }
    fn set_port(&mut self, slot: u32, dir: u8, protocol: u8, port: u16, bits: u64) -> Result<(), MapError> {
        self.port.insert(port_key(slot, dir, protocol, port), RuleMask { bits }, 0)
    }
    fn remove_port(&mut self, slot: u32, dir: u8, protocol: u8, port: u16) -> Result<(), MapError> {
        ignore_missing(self.port.remove(&port_key(slot, dir, protocol, port)))
    }
    fn set_port_range(&mut self, slot: u32, dir: u8, protocol: u8, prefix: PortPrefix, bits: u64) -> Result<(), MapError> {
        self.port_range.insert(&range_key(slot, dir, protocol, prefix), RuleMask { bits }, 0)
    }
    fn remove_port_range(&mut self, slot: u32, dir: u8, protocol: u8, prefix: PortPrefix) -> Result<(), MapError> {
        ignore_missing(self.port_range.remove(&range_key(slot, dir, protocol, prefix)))
    }
    fn set_identities(&mut self, slot: u32, entries: &[(u8, u32, u64)]) -> Result<(), MapError> {
        let keys: Vec<PolicyIdentityKey> = entries.iter().map(|(dir, identity, _)| identity_key(slot, *dir, *identity)).collect();
        let values: Vec<RuleMask> = entries.iter().map(|(_, _, bits)| RuleMask { bits: *bits }).collect();
        update_batch(&mut self.identity, &keys, &values, "POLICY_IDENTITY")
    }
    fn remove_identities(&mut self, slot: u32, keys: &[(u8, u32)]) -> Result<(), MapError> {
        let keys: Vec<PolicyIdentityKey> = keys.iter().map(|(dir, identity)| identity_key(slot, *dir, *identity)).collect();
        delete_batch(&mut self.identity, &keys, "POLICY_IDENTITY")
    }
    fn set_ports(&mut self, slot: u32, entries: &[(u8, u8, u16, u64)]) -> Result<(), MapError> {
        let keys: Vec<PolicyPortKey> =
            entries.iter().map(|(dir, protocol, port, _)| port_key(slot, *dir, *protocol, *port)).collect();
        let values: Vec<RuleMask> = entries.iter().map(|(_, _, _, bits)| RuleMask { bits: *bits }).collect();
        update_batch(&mut self.port, &keys, &values, "POLICY_PORT")
    }
    fn remove_ports(&mut self, slot: u32, keys: &[(u8, u8, u16)]) -> Result<(), MapError> {
        let keys: Vec<PolicyPortKey> = keys.iter().map(|(dir, protocol, port)| port_key(slot, *dir, *protocol, *port)).collect();
        delete_batch(&mut self.port, &keys, "POLICY_PORT")
    }
    fn reset_counters(&mut self, slot: u32, rules: &[std::ops::Range<u32>]) -> Result<(), MapError> {
        if self.residue.is_some() {
            // A counter that cannot be read is zeroed all the same: its counts are lost to the
            // carried totals, which only undercount.
            let slot_stats = self.endpoint_stats(slot).ok().filter(|s| *s != EndpointStats::default());
            let rule_stats: Vec<(u32, RuleStats)> = rules
                .iter()
                .flat_map(|r| r.clone())
                .filter_map(|index| self.rule_stats(index).ok().filter(|s| *s != RuleStats::default()).map(|s| (index, s)))
                .collect();
            if let Some(residue) = &mut self.residue {
                if let Some(stats) = slot_stats {
                    residue.slots.insert(slot, stats);
                }
                residue.rules.extend(rule_stats);
            }
        }
        self.endpoint_stats.set(slot, zeroed::<EndpointStats>()?, 0)?;
        for range in rules {
            for index in range.clone() {
                self.rule_stats.set(index, zeroed::<RuleStats>()?, 0)?;
            }
        }
        Ok(())
    }
}
