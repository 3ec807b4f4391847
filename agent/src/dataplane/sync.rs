//! Applies compiled node state to the policy maps without a window where a pod is unprotected.
//!
//! Per-endpoint entries are keyed by an endpoint slot, not by the interface. Reprogramming an
//! endpoint writes the complete new state under a fresh slot beside the old one, then switches
//! `ENDPOINTS[ifindex]` to the new slot with one map update (atomic for the kernel program),
//! then deletes the old slot's entries. A packet therefore sees either the old or the new
//! policy, never a mix. Every programming gets a new revision, which makes the conntrack
//! entries allowed under the old one stale: their next packet is judged against the new
//! policy. Endpoints whose compiled state did not change are not touched at all, and the
//! ipcache is synchronised by diff (inserts and updates before deletes), followed by a bump of
//! the ipcache generation, which makes every conntrack entry stale.
//!
//! Capacity is checked before anything is written: if the new state does not fit beside the
//! old, the endpoint is switched to fail-closed (drops everything but host traffic), which is
//! logged and counted, never a silent allow.
use super::compile::{DirectionEntries, EntryCounts, RuleOrigin};
use super::lpm::PortPrefix;
use ipnet::Ipv6Net;
use netsieve_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, EP_ALLOW_HOST, EP_AUDIT, EP_CIDR_RULES, EP_EGRESS_ISOLATED, EP_FAIL_CLOSED,
    EP_HAS_IPV4, EP_HAS_IPV6, EP_EXACT_PORTS, EP_INGRESS_ISOLATED, EP_PORT_RANGES, EndpointInfo, IpcacheValue, MAX_ENDPOINT_SLOTS,
    MAX_IPCACHE_ENTRIES, MAX_POLICY_CIDR_ENTRIES, MAX_POLICY_IDENTITY_ENTRIES, MAX_POLICY_PORT_ENTRIES,
    MAX_POLICY_PORT_RANGE_ENTRIES, MAX_RULE_COUNTERS, NO_REVISION, NO_RULE,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The compiled state of one local endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointProgram {
    pub ifindex: u32,
    pub identity: u32,
    pub allow_host: bool,
    /// Set when compilation failed for this endpoint (bad policy input, too many rule groups)
    /// or its policy is not known yet: the endpoint drops everything but host traffic.
    pub fail_closed: bool,
    /// Audit mode: what policy would drop passes, counted and reported.
    pub audit: bool,
    /// The pod's own addresses: what it may send from (anti-spoofing), and itself.
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub ingress: DirectionEntries,
    pub egress: DirectionEntries,
}

impl EndpointProgram {
    fn flags(&self) -> u32 {
        let mut flags = 0;
        for (direction, entries) in self.directions() {
            let shift = u32::from(direction);
            if entries.isolated {
                flags |= if direction == DIRECTION_INGRESS { EP_INGRESS_ISOLATED } else { EP_EGRESS_ISOLATED };
            }
            if !entries.cidr.is_empty() {
                flags |= EP_CIDR_RULES << shift;
            }
            if !entries.port_ranges.is_empty() {
                flags |= EP_PORT_RANGES << shift;
            }
            if !entries.port.is_empty() {
                flags |= EP_EXACT_PORTS << shift;
            }
        }
        if self.fail_closed {
            flags |= EP_FAIL_CLOSED;
        }
        if self.allow_host {
            flags |= EP_ALLOW_HOST;
        }
        if self.audit {
            flags |= EP_AUDIT;
        }
        if self.ipv4.is_some() {
            flags |= EP_HAS_IPV4;
        }
        if self.ipv6.is_some() {
            flags |= EP_HAS_IPV6;
        }
        flags
    }

    pub fn directions(&self) -> [(u8, &DirectionEntries); 2] {
        [(DIRECTION_INGRESS, &self.ingress), (DIRECTION_EGRESS, &self.egress)]
    }

    /// The fail-closed form of this endpoint: both directions isolated, no rules.
    /// Whether the netfilter programs have anything to judge for this endpoint: its egress is
    /// isolated, or it fails closed.
    pub fn enforces_egress(&self) -> bool {
        self.egress.isolated || self.fail_closed
    }

    pub fn failed_closed(&self) -> EndpointProgram {
        EndpointProgram {
            fail_closed: true,
            ingress: DirectionEntries { isolated: true, ..Default::default() },
            egress: DirectionEntries { isolated: true, ..Default::default() },
            ..self.clone()
        }
    }

    fn entry_counts(&self) -> EntryCounts {
        let mut counts = EntryCounts::default();
        for (_, entries) in self.directions() {
            counts.add(entries.entry_counts());
        }
        counts
    }
}

/// Everything the agent programs on one node: ipcache plus local endpoints by a stable name
/// (`namespace/pod`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeProgram {
    /// Host addresses (/128 in the IPv4-mapped space) -> identity.
    pub ipcache: BTreeMap<Ipv6Net, IpcacheValue>,
    pub endpoints: BTreeMap<String, EndpointProgram>,
}

/// What a compilation step changed in the node program: the synchronizer looks only at these.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub endpoints: BTreeSet<String>,
    pub ipcache: BTreeSet<Ipv6Net>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.ipcache.is_empty()
    }

    pub fn merge(&mut self, other: Dirty) {
        self.endpoints.extend(other.endpoints);
        self.ipcache.extend(other.ipcache);
    }
}

/// The map operations sync needs; the kernel implementation is thin, and tests use a model.
pub trait PolicyMaps {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), Self::Error>;
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), Self::Error>;
    fn set_ipcache(&mut self, net: Ipv6Net, value: IpcacheValue) -> Result<(), Self::Error>;
    fn remove_ipcache(&mut self, net: Ipv6Net) -> Result<(), Self::Error>;
    /// Makes conntrack entries taken under older ipcache contents stale.
    fn set_ipcache_generation(&mut self, generation: u32) -> Result<(), Self::Error>;
    /// Sets or clears `CONFIG_EGRESS_ENFORCED`, keeping the other settings.
    fn set_egress_enforced(&mut self, on: bool) -> Result<(), Self::Error>;
    /// The revision now programmed in an endpoint slot (`REVISIONS`; `NO_REVISION` = free).
    fn set_slot_revision(&mut self, slot: u32, revision: u32) -> Result<(), Self::Error>;
    /// A local pod's own address and its interface (`POD_ADDRESSES`).
    fn set_pod_address(&mut self, addr: Ipv6Addr, ifindex: u32) -> Result<(), Self::Error>;
    fn remove_pod_address(&mut self, addr: Ipv6Addr) -> Result<(), Self::Error>;
    fn set_identity(&mut self, slot: u32, direction: u8, identity: u32, bits: u64) -> Result<(), Self::Error>;
    fn remove_identity(&mut self, slot: u32, direction: u8, identity: u32) -> Result<(), Self::Error>;
    fn set_cidr(&mut self, slot: u32, direction: u8, net: Ipv6Net, bits: u64) -> Result<(), Self::Error>;
    fn remove_cidr(&mut self, slot: u32, direction: u8, net: Ipv6Net) -> Result<(), Self::Error>;
    fn set_port(&mut self, slot: u32, direction: u8, protocol: u8, port: u16, bits: u64) -> Result<(), Self::Error>;
    fn remove_port(&mut self, slot: u32, direction: u8, protocol: u8, port: u16) -> Result<(), Self::Error>;
    fn set_port_range(&mut self, slot: u32, direction: u8, protocol: u8, prefix: PortPrefix, bits: u64)
    -> Result<(), Self::Error>;
    fn remove_port_range(&mut self, slot: u32, direction: u8, protocol: u8, prefix: PortPrefix)
    -> Result<(), Self::Error>;
    /// Several identity entries of one slot: (direction, peer identity, rule bits). The kernel
    /// maps write them in one system call; this default writes them one by one.
    fn set_identities(&mut self, slot: u32, entries: &[(u8, u32, u64)]) -> Result<(), Self::Error> {
        entries.iter().try_for_each(|(direction, identity, bits)| self.set_identity(slot, *direction, *identity, *bits))
    }
    /// Removes several identity entries of one slot: (direction, peer identity).
    fn remove_identities(&mut self, slot: u32, keys: &[(u8, u32)]) -> Result<(), Self::Error> {
        keys.iter().try_for_each(|(direction, identity)| self.remove_identity(slot, *direction, *identity))
    }
    /// Several port entries of one slot: (direction, protocol, port, rule bits).
    fn set_ports(&mut self, slot: u32, entries: &[(u8, u8, u16, u64)]) -> Result<(), Self::Error> {
        entries.iter().try_for_each(|(direction, protocol, port, bits)| self.set_port(slot, *direction, *protocol, *port, *bits))
    }
    /// Removes several port entries of one slot: (direction, protocol, port).
    fn remove_ports(&mut self, slot: u32, keys: &[(u8, u8, u16)]) -> Result<(), Self::Error> {
        keys.iter().try_for_each(|(direction, protocol, port)| self.remove_port(slot, *direction, *protocol, *port))
    }
    /// Zeroes the counters of a slot and of rule counters `rules` before they are reused.
    fn reset_counters(&mut self, slot: u32, rules: &[std::ops::Range<u32>]) -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// More addresses than the ipcache holds: nothing is written and the previous state stays
    /// (missing entries would turn pods into "world" peers).
    #[error("{needed} addresses exceed the ipcache capacity of {capacity}")]
    IpcacheFull { needed: usize, capacity: usize },
    #[error("no free endpoint slot for {endpoint}: {live} endpoints programmed")]
    NoSlot { endpoint: String, live: usize },
    #[error("map update for endpoint {endpoint}: {source}")]
    Map { endpoint: String, source: Box<dyn std::error::Error + Send + Sync> },
}

/// What one sync did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub endpoints_programmed: usize,
    pub endpoints_removed: usize,
    pub endpoints_failed_closed: Vec<String>,
    pub ipcache_written: usize,
    pub ipcache_removed: usize,
}

/// An endpoint as it is in the maps.
#[derive(Clone, Debug)]
pub struct LiveEndpoint {
    pub slot: u32,
    pub revision: u32,
    /// Per direction (ingress, egress): first `RULE_STATS` index, [`NO_RULE`] if none.
    pub rule_bases: [u32; 2],
    pub program: EndpointProgram,
}

impl LiveEndpoint {
    /// The rule counters of one direction: (counter index, rules of that group).
    pub fn rule_counters(&self, direction: u8) -> impl Iterator<Item = (u32, &[RuleOrigin])> {
        let base = self.rule_bases[usize::from(direction & 1)];
        let entries = if direction == DIRECTION_INGRESS { &self.program.ingress } else { &self.program.egress };
        entries
            .groups
            .iter()
            .enumerate()
            .filter(move |_| base != NO_RULE)
            .map(move |(group, origins)| (base + group as u32, origins.as_slice()))
    }
}

/// Contiguous ranges of `RULE_STATS`, first fit.
#[derive(Debug)]
struct RangeAllocator {
    /// Free ranges: start -> end (exclusive).
    free: BTreeMap<u32, u32>,
}

impl RangeAllocator {
    fn new(size: u32) -> RangeAllocator {
        RangeAllocator { free: BTreeMap::from([(0, size)]) }
    }

    fn allocate(&mut self, len: u32) -> Option<u32> {
        let (&start, &end) = self.free.iter().find(|(start, end)| **end - **start >= len)?;
        self.free.remove(&start);
        if start + len < end {
            self.free.insert(start + len, end);
        }
        Some(start)
    }

    fn release(&mut self, start: u32, len: u32) {
        let mut start = start;
        let mut end = start + len;
        // Merge with the neighbours so the free list does not fragment.
        if let Some((&before, &before_end)) = self.free.range(..start).next_back()
            && before_end == start
        {
            self.free.remove(&before);
            start = before;
        }
        if let Some(after_end) = self.free.remove(&end) {
            end = after_end;
        }
        self.free.insert(start, end);
    }
}

/// Remembers what is in the maps so the next sync writes only differences.
#[derive(Debug)]
pub struct Synchronizer {
    live: BTreeMap<String, LiveEndpoint>,
    ipcache: BTreeMap<Ipv6Net, IpcacheValue>,
    /// Slots in use; new ones are taken round-robin so a freed slot (whose counters the agent
    /// still has to carry over) is reused as late as possible.
    used_slots: BTreeSet<u32>,
    next_slot: u32,
    rules: RangeAllocator,
    next_revision: u32,
    ipcache_generation: u32,
    /// `POD_ADDRESSES` as written: address (IPv4-mapped) -> ifindex.
    pod_addresses: BTreeMap<Ipv6Addr, u32>,
    /// Set when the programmed endpoints changed since `POD_ADDRESSES` was last brought to
    /// them (they are derived from the live endpoints alone): most syncs touch the ipcache
    /// only and need not look at every endpoint.
    pod_addresses_stale: bool,
    /// `CONFIG_EGRESS_ENFORCED` as written: some programmed endpoint enforces egress (isolated
    /// or fail-closed), so the netfilter programs have work.
    egress_enforced: bool,
    counts: EntryCounts,
    capacity: Capacity,
}

/// Map capacities the synchronizer plans against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub ipcache: usize,
    pub identity: usize,
    pub cidr: usize,
    pub port: usize,
    pub port_range: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            ipcache: MAX_IPCACHE_ENTRIES as usize,
            identity: MAX_POLICY_IDENTITY_ENTRIES as usize,
            cidr: MAX_POLICY_CIDR_ENTRIES as usize,
            port: MAX_POLICY_PORT_ENTRIES as usize,
            port_range: MAX_POLICY_PORT_RANGE_ENTRIES as usize,
        }
    }
}

impl Synchronizer {
    /// Revisions and the ipcache generation start at random values, so that the conntrack
    /// entries a previous agent left in the pinned table can never look current.
    pub fn with_capacity(capacity: Capacity) -> Self {
        Synchronizer {
            live: BTreeMap::new(),
            ipcache: BTreeMap::new(),
            used_slots: BTreeSet::new(),
            next_slot: 0,
            rules: RangeAllocator::new(MAX_RULE_COUNTERS),
            next_revision: rand::random(),
            ipcache_generation: rand::random(),
            pod_addresses: BTreeMap::new(),
            pod_addresses_stale: false,
            egress_enforced: false,
            counts: EntryCounts::default(),
            capacity,
        }
    }

    pub fn entry_counts(&self) -> EntryCounts {
        self.counts
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Brings the maps from the last synced state to `target`, looking at everything.
    pub fn sync<M: PolicyMaps>(&mut self, maps: &mut M, target: &NodeProgram) -> Result<SyncReport, SyncError> {
        let dirty = Dirty {
            endpoints: target.endpoints.keys().chain(self.live.keys()).cloned().collect(),
            ipcache: target.ipcache.keys().chain(self.ipcache.keys()).copied().collect(),
        };
        self.sync_dirty(maps, target, &dirty)
    }

    /// Brings the maps to `target`, looking only at the endpoints and ipcache entries named in
    /// `dirty` (the compiler reports what it changed): the cost follows the change, not the
    /// cluster.
    pub fn sync_dirty<M: PolicyMaps>(
        &mut self,
        maps: &mut M,
        target: &NodeProgram,
        dirty: &Dirty,
    ) -> Result<SyncReport, SyncError> {
        let mut report = SyncReport::default();
        if target.ipcache.len() > self.capacity.ipcache {
            return Err(SyncError::IpcacheFull { needed: target.ipcache.len(), capacity: self.capacity.ipcache });
        }
        let map_err = |endpoint: &str| {
            let endpoint = endpoint.to_string();
            move |e: M::Error| SyncError::Map { endpoint, source: Box::new(e) }
        };

        // 1. ipcache additions and changes first, so new peers are known before policies that
        //    name them; a new identity under an old policy is denied, never allowed.
        for net in &dirty.ipcache {
            let Some(value) = target.ipcache.get(net) else { continue };
            if self.ipcache.get(net) != Some(value) {
                maps.set_ipcache(*net, *value).map_err(map_err("ipcache"))?;
                self.ipcache.insert(*net, *value);
                report.ipcache_written += 1;
            }
        }

        // 2. Endpoints that are new or changed: write beside, switch, delete old.
        for name in &dirty.endpoints {
            let Some(program) = target.endpoints.get(name) else { continue };
            if let Some(live) = self.live.get(name)
                && live.program == *program
            {
                continue;
            }
            let needed = program.entry_counts();
            let fits = self.counts.identity + needed.identity <= self.capacity.identity
                && self.counts.cidr + needed.cidr <= self.capacity.cidr
                && self.counts.port + needed.port <= self.capacity.port
                && self.counts.port_range + needed.port_range <= self.capacity.port_range;
            let effective = if !fits && !program.fail_closed {
                tracing::error!(
                    endpoint = %name, ?needed, current = ?self.counts, capacity = ?self.capacity,
                    "policy maps full: endpoint fails closed"
                );
                program.failed_closed()
            } else {
                program.clone()
            };
            if effective.fail_closed {
                report.endpoints_failed_closed.push(name.clone());
            }
            // The netfilter programs must be on before an endpoint that needs them is.
            if effective.enforces_egress() && !self.egress_enforced {
                maps.set_egress_enforced(true).map_err(map_err(name))?;
                self.egress_enforced = true;
            }
            self.program_endpoint(maps, name, effective).map_err(|e| match e {
                ProgramError::Map(source) => SyncError::Map { endpoint: name.clone(), source: Box::new(source) },
                ProgramError::NoSlot => SyncError::NoSlot { endpoint: name.clone(), live: self.live.len() },
            })?;
            report.endpoints_programmed += 1;
        }

        // 3. Endpoints that are gone.
        for name in dirty.endpoints.iter().filter(|n| !target.endpoints.contains_key(*n)) {
            if let Some(old) = self.live.remove(name) {
                self.pod_addresses_stale = true;
                maps.remove_endpoint(old.program.ifindex).map_err(map_err(name))?;
                self.retire(maps, &old).map_err(map_err(name))?;
                report.endpoints_removed += 1;
            }
        }

        // The netfilter programs off once no endpoint needs them (after the last one is gone
        // or no longer enforces egress); only a sync that changed endpoints can change that.
        let endpoints_changed = report.endpoints_programmed + report.endpoints_removed > 0;
        if self.egress_enforced && endpoints_changed && !self.live.values().any(|live| live.program.enforces_egress()) {
            maps.set_egress_enforced(false).map_err(map_err("settings"))?;
            self.egress_enforced = false;
        }

        // 4. ipcache deletions last.
        for net in dirty.ipcache.iter().filter(|n| !target.ipcache.contains_key(*n)) {
            if !self.ipcache.contains_key(net) {
                continue;
            }
            maps.remove_ipcache(*net).map_err(map_err("ipcache"))?;
            self.ipcache.remove(net);
            report.ipcache_removed += 1;
        }

        // 5. The local pods' addresses, for the netfilter program behind bridges.
        self.sync_pod_addresses(maps).map_err(map_err("pod addresses"))?;

        // 6. Flows allowed under the old ipcache are judged again at their next packet.
        if report.ipcache_written + report.ipcache_removed > 0 {
            self.ipcache_generation = self.ipcache_generation.wrapping_add(1);
            maps.set_ipcache_generation(self.ipcache_generation).map_err(map_err("ipcache"))?;
        }
        Ok(report)
    }

    /// Writes an endpoint under a fresh slot and revision, switches its interface to it, and
    /// retires what it replaces.
    fn program_endpoint<M: PolicyMaps>(&mut self, maps: &mut M, name: &str, program: EndpointProgram) -> Result<(), ProgramError<M::Error>> {
        let previous = self.live.get(name).cloned();
        let slot = self.allocate_slot().ok_or(ProgramError::NoSlot)?;
        let revision = self.allocate_revision();
        let mut rule_bases = [NO_RULE; 2];
        let mut rule_ranges = Vec::new();
        for (direction, entries) in program.directions() {
            let groups = entries.groups.len() as u32;
            if groups == 0 {
                continue;
            }
            match self.rules.allocate(groups) {
                Some(base) => {
                    rule_bases[usize::from(direction)] = base;
                    rule_ranges.push(base..base + groups);
                }
                None => tracing::warn!(endpoint = %name, "rule counters exhausted: no per-rule counts for this endpoint"),
            }
        }
        let result = (|| {
            maps.reset_counters(slot, &rule_ranges)?;
            self.write_entries(maps, slot, &program)?;
            maps.set_slot_revision(slot, revision)?;
            maps.set_endpoint(program.ifindex, endpoint_info(&program, slot, revision, rule_bases))
        })();
        if let Err(error) = result {
            // Nothing points at the new slot; the retry of the whole sync starts over.
            let live = LiveEndpoint { slot, revision, rule_bases, program };
            let _ = self.retire(maps, &live);
            return Err(ProgramError::Map(error));
        }
        if let Some(old) = &previous
            && old.program.ifindex != program.ifindex
        {
            maps.remove_endpoint(old.program.ifindex).map_err(ProgramError::Map)?;
        }
        self.live.insert(name.to_string(), LiveEndpoint { slot, revision, rule_bases, program });
        self.pod_addresses_stale = true;
        if let Some(old) = previous {
            self.retire(maps, &old).map_err(ProgramError::Map)?;
        }
        Ok(())
    }

    /// Deletes an endpoint programming's entries and frees its slot and rule counters.
    fn retire<M: PolicyMaps>(&mut self, maps: &mut M, old: &LiveEndpoint) -> Result<(), M::Error> {
        // Conntrack entries of this programming are stale from now on.
        maps.set_slot_revision(old.slot, NO_REVISION)?;
        self.delete_entries(maps, old.slot, &old.program)?;
        self.used_slots.remove(&old.slot);
        for (direction, entries) in old.program.directions() {
            let base = old.rule_bases[usize::from(direction)];
            if base != NO_RULE {
                self.rules.release(base, entries.groups.len() as u32);
            }
        }
        Ok(())
    }

    fn sync_pod_addresses<M: PolicyMaps>(&mut self, maps: &mut M) -> Result<(), M::Error> {
        if !self.pod_addresses_stale {
            return Ok(());
        }
        let mut target: BTreeMap<Ipv6Addr, u32> = BTreeMap::new();
        for live in self.live.values() {
            let program = &live.program;
            let own = program.ipv4.map(|v4| v4.to_ipv6_mapped()).into_iter().chain(program.ipv6);
            for addr in own {
                target.insert(addr, program.ifindex);
            }
        }
        for (addr, ifindex) in &target {
            if self.pod_addresses.get(addr) != Some(ifindex) {
                maps.set_pod_address(*addr, *ifindex)?;
                self.pod_addresses.insert(*addr, *ifindex);
            }
        }
        let gone: Vec<Ipv6Addr> = self.pod_addresses.keys().filter(|a| !target.contains_key(*a)).copied().collect();
        for addr in gone {
            maps.remove_pod_address(addr)?;
            self.pod_addresses.remove(&addr);
        }
        self.pod_addresses_stale = false;
        Ok(())
    }

    /// Entries in the ipcache as last written.
    pub fn ipcache_len(&self) -> usize {
        self.ipcache.len()
    }

    /// Programmed endpoints: (name, slot, ifindex).
    pub fn live_endpoints(&self) -> impl Iterator<Item = (&str, u32, u32)> {
        self.live.iter().map(|(name, l)| (name.as_str(), l.slot, l.program.ifindex))
    }

    /// Programmed endpoints with everything known about them.
    pub fn live(&self) -> impl Iterator<Item = (&str, &LiveEndpoint)> {
        self.live.iter().map(|(name, l)| (name.as_str(), l))
    }

    /// The next revision; never `NO_REVISION`.
    fn allocate_revision(&mut self) -> u32 {
        if self.next_revision == NO_REVISION {
            self.next_revision = 1;
        }
        let revision = self.next_revision;
        self.next_revision = self.next_revision.wrapping_add(1);
        revision
    }

    fn allocate_slot(&mut self) -> Option<u32> {
        for offset in 0..MAX_ENDPOINT_SLOTS {
            let slot = (self.next_slot + offset) % MAX_ENDPOINT_SLOTS;
            if self.used_slots.insert(slot) {
                self.next_slot = (slot + 1) % MAX_ENDPOINT_SLOTS;
                return Some(slot);
            }
        }
        None
    }

    /// Writes every entry of a programming under `slot`. Identity and port entries (nearly all
    /// of them) go to the maps one batch per map, not one system call per entry.
    fn write_entries<M: PolicyMaps>(&mut self, maps: &mut M, slot: u32, program: &EndpointProgram) -> Result<(), M::Error> {
        let mut identities = Vec::new();
        let mut ports = Vec::new();
        for (direction, entries) in program.directions() {
            identities.extend(entries.identity.iter().map(|(identity, bits)| (direction, *identity, *bits)));
            ports.extend(entries.port.iter().map(|((protocol, port), bits)| (direction, *protocol, *port, *bits)));
        }
        // Counted before the write, so that retiring a programming whose write failed part-way
        // takes off exactly what it added.
        self.counts.identity += identities.len();
        maps.set_identities(slot, &identities)?;
        self.counts.port += ports.len();
        maps.set_ports(slot, &ports)?;
        for (direction, entries) in program.directions() {
            for (net, bits) in &entries.cidr {
                maps.set_cidr(slot, direction, *net, *bits)?;
                self.counts.cidr += 1;
            }
            for ((protocol, prefix), bits) in &entries.port_ranges {
                maps.set_port_range(slot, direction, *protocol, *prefix, *bits)?;
                self.counts.port_range += 1;
            }
        }
        Ok(())
    }

    fn delete_entries<M: PolicyMaps>(&mut self, maps: &mut M, slot: u32, program: &EndpointProgram) -> Result<(), M::Error> {
        let mut identities = Vec::new();
        let mut ports = Vec::new();
        for (direction, entries) in program.directions() {
            identities.extend(entries.identity.keys().map(|identity| (direction, *identity)));
            ports.extend(entries.port.keys().map(|(protocol, port)| (direction, *protocol, *port)));
        }
        maps.remove_identities(slot, &identities)?;
        self.counts.identity = self.counts.identity.saturating_sub(identities.len());
        maps.remove_ports(slot, &ports)?;
        self.counts.port = self.counts.port.saturating_sub(ports.len());
        for (direction, entries) in program.directions() {
            for net in entries.cidr.keys() {
                maps.remove_cidr(slot, direction, *net)?;
                self.counts.cidr = self.counts.cidr.saturating_sub(1);
            }
            for (protocol, prefix) in entries.port_ranges.keys() {
                maps.remove_port_range(slot, direction, *protocol, *prefix)?;
                self.counts.port_range = self.counts.port_range.saturating_sub(1);
            }
        }
        Ok(())
    }
}

enum ProgramError<E> {
    Map(E),
    NoSlot,
}

/// The `ENDPOINTS` value of a programmed endpoint.
pub fn endpoint_info(program: &EndpointProgram, slot: u32, revision: u32, rule_bases: [u32; 2]) -> EndpointInfo {
    EndpointInfo {
        endpoint_id: slot,
        flags: program.flags(),
        identity: program.identity,
        revision,
        rule_base: rule_bases,
        any_peer_bits: [program.ingress.any_peer, program.egress.any_peer],
        cidr_group_bits: [program.ingress.cidr_groups(), program.egress.cidr_groups()],
        range_group_bits: [program.ingress.range_groups(), program.egress.range_groups()],
        wildcard_bits: [program.ingress.wildcard, program.egress.wildcard],
        ipv4: program.ipv4.map_or([0; 4], |ip| ip.octets()),
        ipv6: program.ipv6.map_or([0; 16], |ip| ip.octets()),
        _pad: [0; 4],
    }
}

/// In-memory model of the kernel maps, recording every operation; used by tests to check
/// ordering (no window without protection) and by benchmarks to cost the compiler alone.
#[derive(Debug, Default)]
pub struct ModelMaps {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ipcache: BTreeMap<Ipv6Net, IpcacheValue>,
    pub ipcache_generation: u32,
    pub egress_enforced: bool,
    /// Endpoints written with an enforced egress (isolated or fail-closed) while
    /// `egress_enforced` was off: each is a window where the netfilter programs would let that
    /// pod's Service traffic through unjudged. Must stay 0.
    pub unguarded_egress_writes: usize,
    pub pod_addresses: BTreeMap<Ipv6Addr, u32>,
    pub revisions: BTreeMap<u32, u32>,
    pub identity: BTreeMap<(u32, u8, u32), u64>,
    pub cidr: BTreeMap<(u32, u8, Ipv6Net), u64>,
    pub port: BTreeMap<(u32, u8, u8, u16), u64>,
    pub port_range: BTreeMap<(u32, u8, u8, PortPrefix), u64>,
    /// Slots whose counters were reset.
    pub counter_resets: Vec<u32>,
    pub operations: usize,
}

impl PolicyMaps for ModelMaps {
    type Error = std::convert::Infallible;
    fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), Self::Error> {
        self.operations += 1;
        if info.enforces_egress() && !self.egress_enforced {
            self.unguarded_egress_writes += 1;
        }
        self.endpoints.insert(ifindex, info);
        Ok(())
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), Self::Error> {
        self.operations += 1;
        self.endpoints.remove(&ifindex);
        Ok(())
    }
    fn set_ipcache(&mut self, net: Ipv6Net, value: IpcacheValue) -> Result<(), Self::Error> {
        self.operations += 1;
        self.ipcache.insert(net, value);
        Ok(())
    }
    fn remove_ipcache(&mut self, net: Ipv6Net) -> Result<(), Self::Error> {
        self.operations += 1;
        self.ipcache.remove(&net);
        Ok(())
    }
    fn set_ipcache_generation(&mut self, generation: u32) -> Result<(), Self::Error> {
        self.operations += 1;
        self.ipcache_generation = generation;
        Ok(())
    }
    fn set_egress_enforced(&mut self, on: bool) -> Result<(), Self::Error> {
        self.operations += 1;
        self.egress_enforced = on;
        Ok(())
    }
    fn set_slot_revision(&mut self, slot: u32, revision: u32) -> Result<(), Self::Error> {
        self.operations += 1;
        self.revisions.insert(slot, revision);
        Ok(())
    }
    fn set_pod_address(&mut self, addr: Ipv6Addr, ifindex: u32) -> Result<(), Self::Error> {
        self.operations += 1;
        self.pod_addresses.insert(addr, ifindex);
        Ok(())
    }
    fn remove_pod_address(&mut self, addr: Ipv6Addr) -> Result<(), Self::Error> {
        self.operations += 1;
        self.pod_addresses.remove(&addr);
        Ok(())
    }
    fn set_identity(&mut self, slot: u32, dir: u8, identity: u32, bits: u64) -> Result<(), Self::Error> {
        self.operations += 1;
        self.identity.insert((slot, dir, identity), bits);
        Ok(())
    }
    fn remove_identity(&mut self, slot: u32, dir: u8, identity: u32) -> Result<(), Self::Error> {
        self.operations += 1;
        self.identity.remove(&(slot, dir, identity));
        Ok(())
    }
    fn set_cidr(&mut self, slot: u32, dir: u8, net: Ipv6Net, bits: u64) -> Result<(), Self::Error> {
        self.operations += 1;
        self.cidr.insert((slot, dir, net), bits);
        Ok(())
    }
    fn remove_cidr(&mut self, slot: u32, dir: u8, net: Ipv6Net) -> Result<(), Self::Error> {
        self.operations += 1;
        self.cidr.remove(&(slot, dir, net));
        Ok(())
    }
    fn set_port(&mut self, slot: u32, dir: u8, protocol: u8, port: u16, bits: u64) -> Result<(), Self::Error> {
        self.operations += 1;
        self.port.insert((slot, dir, protocol, port), bits);
        Ok(())
    }
    fn remove_port(&mut self, slot: u32, dir: u8, protocol: u8, port: u16) -> Result<(), Self::Error> {
        self.operations += 1;
        self.port.remove(&(slot, dir, protocol, port));
        Ok(())
    }
    fn set_port_range(&mut self, slot: u32, dir: u8, protocol: u8, prefix: PortPrefix, bits: u64) -> Result<(), Self::Error> {
        self.operations += 1;
        self.port_range.insert((slot, dir, protocol, prefix), bits);
        Ok(())
    }
    fn remove_port_range(&mut self, slot: u32, dir: u8, protocol: u8, prefix: PortPrefix) -> Result<(), Self::Error> {
        self.operations += 1;
        self.port_range.remove(&(slot, dir, protocol, prefix));
        Ok(())
    }
    fn reset_counters(&mut self, slot: u32, _rules: &[std::ops::Range<u32>]) -> Result<(), Self::Error> {
        self.operations += 1;
        self.counter_resets.push(slot);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::compile::{DirectionInput, PeerInput, PortSetInput, RuleInput, compile_direction};
    use netsieve_common::PROTO_TCP;

    fn program(ifindex: u32, allowed_identity: u32, port: u16) -> EndpointProgram {
        let input = DirectionInput {
            isolated: true,
            rules: vec![RuleInput {
                peers: vec![PeerInput::Identities([allowed_identity].into())],
                ports: PortSetInput::Ranges([(PROTO_TCP, port, port)].into()),
                origin: Default::default(),
            }],
        };
        EndpointProgram {
            ifindex,
            identity: 500,
            allow_host: true,
            ipv4: Some(Ipv4Addr::new(10, 0, 0, ifindex as u8)),
            ingress: compile_direction(&input).expect("compiles"),
            ..Default::default()
        }
    }

    #[test]
    fn unchanged_endpoints_are_not_rewritten_and_changes_switch_slots() {
        let mut maps = ModelMaps::default();
        let mut sync = Synchronizer::with_capacity(Capacity::default());
        let mut node = NodeProgram::default();
        node.endpoints.insert("a/x".into(), program(10, 300, 80));
        node.endpoints.insert("a/y".into(), program(11, 301, 81));
        let first = sync.sync(&mut maps, &node).expect("sync");
        assert_eq!(first.endpoints_programmed, 2);
        let before = maps.operations;
        let again = sync.sync(&mut maps, &node).expect("sync");
        assert_eq!(again.endpoints_programmed, 0);
        assert_eq!(maps.operations, before, "no-op sync wrote to the maps");

        let old = maps.endpoints[&10];
        node.endpoints.insert("a/x".into(), program(10, 302, 80));
        let changed = sync.sync(&mut maps, &node).expect("sync");
        assert_eq!(changed.endpoints_programmed, 1);
        let new = maps.endpoints[&10];
        assert_ne!(old.endpoint_id, new.endpoint_id);
        assert_ne!(old.revision, new.revision, "a new programming must make conntrack entries stale");
        assert!(maps.identity.keys().all(|(slot, _, _)| *slot != old.endpoint_id), "old entries left behind");
        assert_eq!(maps.identity.get(&(new.endpoint_id, DIRECTION_INGRESS, 302)), Some(&1));
        assert_eq!(new.ipv4, [10, 0, 0, 10]);
        assert_ne!(new.flags & EP_HAS_IPV4, 0);
        assert!(maps.counter_resets.contains(&new.endpoint_id), "a reused slot starts from zero");
        assert_ne!(new.rule_base[0], NO_RULE);

        node.endpoints.remove("a/y");
        let removed = sync.sync(&mut maps, &node).expect("sync");
        assert_eq!(removed.endpoints_removed, 1);
        assert!(!maps.endpoints.contains_key(&11));
        assert_eq!(sync.entry_counts().identity, 1);
    }

    #[test]
    fn ipcache_changes_bump_the_generation_once_per_sync() {
        let mut maps = ModelMaps::default();
        let mut sync = Synchronizer::with_capacity(Capacity::default());
        let mut node = NodeProgram::default();
        let net = |i: u8| crate::dataplane::lpm::to_mapped(std::net::IpAddr::from([10, 0, 0, i]).into());
        node.ipcache.insert(net(1), IpcacheValue { identity: 300, flags: 0 });
        node.ipcache.insert(net(2), IpcacheValue { identity: 301, flags: 0 });
        sync.sync(&mut maps, &node).expect("sync");
        let first = maps.ipcache_generation;
        sync.sync(&mut maps, &node).expect("sync");
        assert_eq!(maps.ipcache_generation, first, "no change, no bump");
        node.ipcache.remove(&net(2));
        sync.sync(&mut maps, &node).expect("sync");
        assert_eq!(maps.ipcache_generation, first.wrapping_add(1));
    }

    #[test]
    fn slots_are_reused_round_robin_and_rule_counters_are_freed() {
        let mut maps = ModelMaps::default();
        let mut sync = Synchronizer::with_capacity(Capacity::default());
        let mut node = NodeProgram::default();
        let mut seen = BTreeSet::new();
        for round in 0..(MAX_ENDPOINT_SLOTS + 10) {
            node.endpoints.insert("a/x".into(), program(10, 300 + round % 2, 80));
            sync.sync(&mut maps, &node).expect("sync");
            seen.insert(maps.endpoints[&10].endpoint_id);
        }
        assert_eq!(seen.len() as u32, MAX_ENDPOINT_SLOTS, "every slot used before any is reused");
        let free: u32 = sync.rules.free.iter().map(|(start, end)| end - start).sum();
        assert_eq!(free, MAX_RULE_COUNTERS - 1, "only the live endpoint's one group holds a counter");
        assert_eq!(sync.live.len(), 1);
    }

    #[test]
    fn a_full_map_fails_the_endpoint_closed() {
        let mut maps = ModelMaps::default();
        let mut sync =
            Synchronizer::with_capacity(Capacity { ipcache: 10, identity: 1, cidr: 10, port: 10, port_range: 10 });
        let mut node = NodeProgram::default();
        node.endpoints.insert("a/x".into(), program(10, 300, 80));
        node.endpoints.insert("a/y".into(), program(11, 301, 81));
        let report = sync.sync(&mut maps, &node).expect("sync");
        assert_eq!(report.endpoints_failed_closed, vec!["a/y".to_string()]);
        let flags = maps.endpoints[&11].flags;
        assert_ne!(flags & EP_FAIL_CLOSED, 0);
        assert_ne!(flags & EP_INGRESS_ISOLATED, 0);
        assert_ne!(flags & EP_EGRESS_ISOLATED, 0);

        // An ipcache that does not fit is refused before anything is written.
        let before = maps.operations;
        for i in 0..11u8 {
            let ip = std::net::IpAddr::from([10, 0, 0, i]);
            node.ipcache.insert(crate::dataplane::lpm::to_mapped(ip.into()), IpcacheValue::default());
        }
        assert!(matches!(sync.sync(&mut maps, &node), Err(SyncError::IpcacheFull { needed: 11, capacity: 10 })));
        assert_eq!(maps.operations, before);
    }

    #[test]
    fn the_netfilter_programs_are_on_exactly_while_an_endpoint_enforces_egress() {
        let mut maps = ModelMaps::default();
        let mut sync = Synchronizer::with_capacity(Capacity::default());
        let mut node = NodeProgram::default();
        node.endpoints.insert("a/ingress-only".into(), program(10, 300, 80));
        sync.sync(&mut maps, &node).expect("sync");
        assert!(!maps.egress_enforced, "an ingress-only node leaves the netfilter programs idle");
        let mut egress = program(11, 301, 81);
        egress.egress = egress.ingress.clone();
        node.endpoints.insert("a/egress".into(), egress);
        sync.sync(&mut maps, &node).expect("sync");
        assert!(maps.egress_enforced);
        node.endpoints.remove("a/egress");
        sync.sync(&mut maps, &node).expect("sync");
        assert!(!maps.egress_enforced, "cleared once the last egress-isolated endpoint is gone");
        node.endpoints.insert("a/placeholder".into(), program(12, 302, 82).failed_closed());
        sync.sync(&mut maps, &node).expect("sync");
        assert!(maps.egress_enforced, "a fail-closed endpoint enforces egress too");
        node.endpoints.insert("a/placeholder".into(), program(12, 302, 82));
        sync.sync(&mut maps, &node).expect("sync");
        assert!(!maps.egress_enforced, "cleared when the last one stops enforcing egress");
        assert_eq!(maps.unguarded_egress_writes, 0, "the flag is on before any endpoint that needs it");
    }

    #[test]
    fn rule_counter_ranges_merge_when_freed() {
        let mut ranges = RangeAllocator::new(100);
        let a = ranges.allocate(10).expect("a");
        let b = ranges.allocate(20).expect("b");
        let c = ranges.allocate(30).expect("c");
        assert_eq!((a, b, c), (0, 10, 30));
        ranges.release(b, 20);
        ranges.release(a, 10);
        assert_eq!(ranges.allocate(25), Some(0), "a and b merged");
        ranges.release(0, 25);
        ranges.release(c, 30);
        assert_eq!(ranges.free, BTreeMap::from([(0, 100)]));
        assert_eq!(ranges.allocate(101), None);
    }
}
