//! Applies compiled node state to the policy maps without a window where a pod is unprotected.
//!
//! Per-endpoint entries are keyed by an endpoint id, not by the interface. Reprogramming an
//! endpoint writes the complete new state under a fresh id beside the old one, then switches
//! `ENDPOINTS[ifindex]` to the new id with one map update (atomic for the kernel program), then
//! deletes the old id's entries. A packet therefore sees either the old or the new policy,
//! never a mix. Endpoints whose compiled state did not change are not touched at all, and the
//! ipcache is synchronised by diff (inserts and updates before deletes).
//!
//! Capacity is checked before anything is written: if the new state does not fit beside the
//! old, the endpoint is switched to fail-closed (drops everything but host traffic), which is
//! logged and counted, never a silent allow.
use super::compile::DirectionEntries;
use super::lpm::PortPrefix;
use ipnet::Ipv6Net;
use netsieve_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, EP_ALLOW_HOST, EP_EGRESS_ISOLATED, EP_FAIL_CLOSED, EP_INGRESS_ISOLATED,
    EndpointInfo, IpcacheValue, MAX_IPCACHE_ENTRIES, MAX_POLICY_CIDR_ENTRIES, MAX_POLICY_IDENTITY_ENTRIES, MAX_POLICY_PORT_ENTRIES,
};
use std::collections::{BTreeMap, BTreeSet};

/// The compiled state of one local endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointProgram {
    pub ifindex: u32,
    pub identity: u32,
    pub allow_host: bool,
    /// Set when compilation failed for this endpoint (bad policy input, too many rule groups):
    /// the endpoint drops everything but host traffic.
    pub fail_closed: bool,
    pub ingress: DirectionEntries,
    pub egress: DirectionEntries,
}

impl EndpointProgram {
    fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.ingress.isolated {
            flags |= EP_INGRESS_ISOLATED;
        }
        if self.egress.isolated {
            flags |= EP_EGRESS_ISOLATED;
        }
        if self.fail_closed {
            flags |= EP_FAIL_CLOSED;
        }
        if self.allow_host {
            flags |= EP_ALLOW_HOST;
        }
        flags
    }

    fn directions(&self) -> [(u8, &DirectionEntries); 2] {
        [(DIRECTION_INGRESS, &self.ingress), (DIRECTION_EGRESS, &self.egress)]
    }
}

/// Everything the agent programs on one node: ipcache plus local endpoints by a stable name
/// (`namespace/pod`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeProgram {
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
    fn set_identity(&mut self, endpoint_id: u32, direction: u8, identity: u32, bits: u64) -> Result<(), Self::Error>;
    fn remove_identity(&mut self, endpoint_id: u32, direction: u8, identity: u32) -> Result<(), Self::Error>;
    fn set_cidr(&mut self, endpoint_id: u32, direction: u8, net: Ipv6Net, bits: u64) -> Result<(), Self::Error>;
    fn remove_cidr(&mut self, endpoint_id: u32, direction: u8, net: Ipv6Net) -> Result<(), Self::Error>;
    fn set_port(&mut self, endpoint_id: u32, direction: u8, protocol: u8, prefix: PortPrefix, bits: u64)
    -> Result<(), Self::Error>;
    fn remove_port(&mut self, endpoint_id: u32, direction: u8, protocol: u8, prefix: PortPrefix)
    -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// More addresses than the ipcache holds: nothing is written and the previous state stays
    /// (missing entries would turn pods into "world" peers).
    #[error("{needed} addresses exceed the ipcache capacity of {capacity}")]
    IpcacheFull { needed: usize, capacity: usize },
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

#[derive(Clone, Debug)]
struct LiveEndpoint {
    endpoint_id: u32,
    revision: u32,
    program: EndpointProgram,
}

/// Remembers what is in the maps so the next sync writes only differences.
#[derive(Debug, Default)]
pub struct Synchronizer {
    live: BTreeMap<String, LiveEndpoint>,
    ipcache: BTreeMap<Ipv6Net, IpcacheValue>,
    next_endpoint_id: u32,
    counts: EntryCounts,
    capacity: Capacity,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryCounts {
    pub identity: usize,
    pub cidr: usize,
    pub port: usize,
}

/// Map capacities the synchronizer plans against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub ipcache: usize,
    pub identity: usize,
    pub cidr: usize,
    pub port: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            ipcache: MAX_IPCACHE_ENTRIES as usize,
            identity: MAX_POLICY_IDENTITY_ENTRIES as usize,
            cidr: MAX_POLICY_CIDR_ENTRIES as usize,
            port: MAX_POLICY_PORT_ENTRIES as usize,
        }
    }
}

fn program_counts(program: &EndpointProgram) -> EntryCounts {
    let mut counts = EntryCounts::default();
    for (_, entries) in program.directions() {
        let (identity, cidr, port) = entries.entry_counts();
        counts.identity += identity;
        counts.cidr += cidr;
        counts.port += port;
    }
    counts
}

impl Synchronizer {
    pub fn with_capacity(capacity: Capacity) -> Self {
        Synchronizer { capacity, next_endpoint_id: 1, ..Default::default() }
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
            let previous = self.live.get(name).cloned();
            let revision = previous.as_ref().map_or(1, |p| p.revision.wrapping_add(1));
            let endpoint_id = self.allocate_endpoint_id();
            let mut effective = program.clone();
            let needed = program_counts(program);
            let fits = self.counts.identity + needed.identity <= self.capacity.identity
                && self.counts.cidr + needed.cidr <= self.capacity.cidr
                && self.counts.port + needed.port <= self.capacity.port;
            if !fits && !program.fail_closed {
                tracing::error!(
                    endpoint = %name, ?needed, current = ?self.counts, capacity = ?self.capacity,
                    "policy maps full: endpoint fails closed"
                );
                effective = EndpointProgram {
                    ifindex: program.ifindex,
                    identity: program.identity,
                    allow_host: program.allow_host,
                    fail_closed: true,
                    ingress: DirectionEntries { isolated: true, ..Default::default() },
                    egress: DirectionEntries { isolated: true, ..Default::default() },
                };
            }
            if effective.fail_closed {
                report.endpoints_failed_closed.push(name.clone());
            }
            self.write_entries(maps, endpoint_id, &effective).map_err(map_err(name))?;
            let info = EndpointInfo { endpoint_id, flags: effective.flags(), identity: effective.identity, revision };
            maps.set_endpoint(effective.ifindex, info).map_err(map_err(name))?;
            if let Some(old) = previous {
                if old.program.ifindex != effective.ifindex {
                    maps.remove_endpoint(old.program.ifindex).map_err(map_err(name))?;
                }
                self.delete_entries(maps, old.endpoint_id, &old.program).map_err(map_err(name))?;
            }
            self.live.insert(name.clone(), LiveEndpoint { endpoint_id, revision, program: effective });
            report.endpoints_programmed += 1;
        }

        // 3. Endpoints that are gone.
        for name in dirty.endpoints.iter().filter(|n| !target.endpoints.contains_key(*n)) {
            if let Some(old) = self.live.remove(name) {
                maps.remove_endpoint(old.program.ifindex).map_err(map_err(name))?;
                self.delete_entries(maps, old.endpoint_id, &old.program).map_err(map_err(name))?;
                report.endpoints_removed += 1;
            }
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
        Ok(report)
    }

    /// Entries in the ipcache as last written.
    pub fn ipcache_len(&self) -> usize {
        self.ipcache.len()
    }

    /// Programmed endpoints: (name, endpoint id, ifindex).
    pub fn live_endpoints(&self) -> impl Iterator<Item = (&str, u32, u32)> {
        self.live.iter().map(|(name, l)| (name.as_str(), l.endpoint_id, l.program.ifindex))
    }

    fn allocate_endpoint_id(&mut self) -> u32 {
        // Ids are never reused while live; u32 wrap-around after 4 billion reprogrammings
        // skips ids still in use.
        loop {
            let id = self.next_endpoint_id.max(1);
            self.next_endpoint_id = id.wrapping_add(1);
            if !self.live.values().any(|l| l.endpoint_id == id) {
                return id;
            }
        }
    }

    fn write_entries<M: PolicyMaps>(&mut self, maps: &mut M, id: u32, program: &EndpointProgram) -> Result<(), M::Error> {
        for (direction, entries) in program.directions() {
            for (identity, bits) in &entries.identity {
                maps.set_identity(id, direction, *identity, *bits)?;
                self.counts.identity += 1;
            }
            for (net, bits) in &entries.cidr {
                maps.set_cidr(id, direction, *net, *bits)?;
                self.counts.cidr += 1;
            }
            for ((protocol, prefix), bits) in &entries.port {
                maps.set_port(id, direction, *protocol, *prefix, *bits)?;
                self.counts.port += 1;
            }
        }
        Ok(())
    }

    fn delete_entries<M: PolicyMaps>(&mut self, maps: &mut M, id: u32, program: &EndpointProgram) -> Result<(), M::Error> {
        for (direction, entries) in program.directions() {
            for identity in entries.identity.keys() {
                maps.remove_identity(id, direction, *identity)?;
                self.counts.identity = self.counts.identity.saturating_sub(1);
            }
            for net in entries.cidr.keys() {
                maps.remove_cidr(id, direction, *net)?;
                self.counts.cidr = self.counts.cidr.saturating_sub(1);
            }
            for (protocol, prefix) in entries.port.keys() {
                maps.remove_port(id, direction, *protocol, *prefix)?;
                self.counts.port = self.counts.port.saturating_sub(1);
            }
        }
        Ok(())
    }
}

/// In-memory model of the kernel maps, recording every operation; used by tests to check
/// ordering (no window without protection) and by benchmarks to cost the compiler alone.
#[derive(Debug, Default)]
pub struct ModelMaps {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub ipcache: BTreeMap<Ipv6Net, IpcacheValue>,
    pub identity: BTreeMap<(u32, u8, u32), u64>,
    pub cidr: BTreeMap<(u32, u8, Ipv6Net), u64>,
    pub port: BTreeMap<(u32, u8, u8, PortPrefix), u64>,
    /// Called after every operation with the maps' state, to assert invariants mid-sync.
    pub operations: usize,
}

impl PolicyMaps for ModelMaps {
    type Error = std::convert::Infallible;
    fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), Self::Error> {
        self.operations += 1;
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
    fn set_identity(&mut self, id: u32, dir: u8, identity: u32, bits: u64) -> Result<(), Self::Error> {
        self.operations += 1;
        self.identity.insert((id, dir, identity), bits);
        Ok(())
    }
    fn remove_identity(&mut self, id: u32, dir: u8, identity: u32) -> Result<(), Self::Error> {
        self.operations += 1;
        self.identity.remove(&(id, dir, identity));
        Ok(())
    }
    fn set_cidr(&mut self, id: u32, dir: u8, net: Ipv6Net, bits: u64) -> Result<(), Self::Error> {
        self.operations += 1;
        self.cidr.insert((id, dir, net), bits);
        Ok(())
    }
    fn remove_cidr(&mut self, id: u32, dir: u8, net: Ipv6Net) -> Result<(), Self::Error> {
        self.operations += 1;
        self.cidr.remove(&(id, dir, net));
        Ok(())
    }
    fn set_port(&mut self, id: u32, dir: u8, protocol: u8, prefix: PortPrefix, bits: u64) -> Result<(), Self::Error> {
        self.operations += 1;
        self.port.insert((id, dir, protocol, prefix), bits);
        Ok(())
    }
    fn remove_port(&mut self, id: u32, dir: u8, protocol: u8, prefix: PortPrefix) -> Result<(), Self::Error> {
        self.operations += 1;
        self.port.remove(&(id, dir, protocol, prefix));
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
            }],
        };
        EndpointProgram {
            ifindex,
            identity: 500,
            allow_host: true,
            fail_closed: false,
            ingress: compile_direction(&input).expect("compiles"),
            egress: DirectionEntries::default(),
        }
    }

    #[test]
    fn unchanged_endpoints_are_not_rewritten_and_changes_switch_ids() {
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

        let old_id = maps.endpoints[&10].endpoint_id;
        node.endpoints.insert("a/x".into(), program(10, 302, 80));
        let changed = sync.sync(&mut maps, &node).expect("sync");
        assert_eq!(changed.endpoints_programmed, 1);
        let new_id = maps.endpoints[&10].endpoint_id;
        assert_ne!(old_id, new_id);
        assert!(maps.identity.keys().all(|(id, _, _)| *id != old_id), "old entries left behind");
        assert_eq!(maps.identity.get(&(new_id, DIRECTION_INGRESS, 302)), Some(&1));
        assert_eq!(maps.endpoints[&10].revision, 2);

        node.endpoints.remove("a/y");
        let removed = sync.sync(&mut maps, &node).expect("sync");
        assert_eq!(removed.endpoints_removed, 1);
        assert!(!maps.endpoints.contains_key(&11));
        assert_eq!(sync.entry_counts().identity, 1);
    }

    #[test]
    fn a_full_map_fails_the_endpoint_closed() {
        let mut maps = ModelMaps::default();
        let mut sync = Synchronizer::with_capacity(Capacity { ipcache: 10, identity: 1, cidr: 10, port: 10 });
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
}
