//! The policy maps of a loaded program, as [`PolicyMaps`] for the synchronizer. Thin: key
//! encoding only, no policy logic.
use super::lpm::PortPrefix;
use super::sync::PolicyMaps;
use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, MapError};
use ipnet::Ipv6Net;
use netsieve_common::{
    EndpointInfo, IpcacheKeyData, IpcacheValue, POLICY_CIDR_FIXED_BITS, POLICY_PORT_FIXED_BITS, PolicyCidrKeyData,
    PolicyIdentityKey, PolicyPortKeyData, RuleMask,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("the eBPF object has no map named {0}")]
    Missing(&'static str),
    #[error("map {name} has an unexpected type or layout: {source}")]
    Layout { name: &'static str, source: MapError },
}

/// Owned handles to the maps the synchronizer writes.
pub struct KernelMaps {
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    pub ipcache: LpmTrie<MapData, IpcacheKeyData, IpcacheValue>,
    pub identity: HashMap<MapData, PolicyIdentityKey, RuleMask>,
    pub cidr: LpmTrie<MapData, PolicyCidrKeyData, RuleMask>,
    pub port: LpmTrie<MapData, PolicyPortKeyData, RuleMask>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

impl KernelMaps {
    /// Takes the policy maps out of a loaded object (the programs keep their references).
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(KernelMaps {
            endpoints: take(ebpf, "ENDPOINTS")?,
            ipcache: take(ebpf, "IPCACHE")?,
            identity: take(ebpf, "POLICY_IDENTITY")?,
            cidr: take(ebpf, "POLICY_CIDR")?,
            port: take(ebpf, "POLICY_PORT")?,
        })
    }
}

fn identity_key(endpoint_id: u32, direction: u8, peer_identity: u32) -> PolicyIdentityKey {
    PolicyIdentityKey { endpoint_id, direction, _pad: [0; 3], peer_identity }
}

fn cidr_key(endpoint_id: u32, direction: u8, net: Ipv6Net) -> Key<PolicyCidrKeyData> {
    let data = PolicyCidrKeyData { endpoint_id, direction, _pad: [0; 3], addr: net.network().octets() };
    Key::new(POLICY_CIDR_FIXED_BITS + u32::from(net.prefix_len()), data)
}

fn port_key(endpoint_id: u32, direction: u8, protocol: u8, prefix: PortPrefix) -> Key<PolicyPortKeyData> {
    let data = PolicyPortKeyData { endpoint_id, direction, protocol, port_be: prefix.port.to_be_bytes() };
    Key::new(POLICY_PORT_FIXED_BITS + u32::from(prefix.len), data)
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
        self.ipcache.insert(&Key::new(u32::from(net.prefix_len()), net.network().octets()), value, 0)
    }
    fn remove_ipcache(&mut self, net: Ipv6Net) -> Result<(), MapError> {
        ignore_missing(self.ipcache.remove(&Key::new(u32::from(net.prefix_len()), net.network().octets())))
    }
    fn set_identity(&mut self, id: u32, dir: u8, identity: u32, bits: u64) -> Result<(), MapError> {
        self.identity.insert(identity_key(id, dir, identity), RuleMask { bits }, 0)
    }
    fn remove_identity(&mut self, id: u32, dir: u8, identity: u32) -> Result<(), MapError> {
        ignore_missing(self.identity.remove(&identity_key(id, dir, identity)))
    }
    fn set_cidr(&mut self, id: u32, dir: u8, net: Ipv6Net, bits: u64) -> Result<(), MapError> {
        self.cidr.insert(&cidr_key(id, dir, net), RuleMask { bits }, 0)
    }
    fn remove_cidr(&mut self, id: u32, dir: u8, net: Ipv6Net) -> Result<(), MapError> {
        ignore_missing(self.cidr.remove(&cidr_key(id, dir, net)))
    }
    fn set_port(&mut self, id: u32, dir: u8, protocol: u8, prefix: PortPrefix, bits: u64) -> Result<(), MapError> {
        self.port.insert(&port_key(id, dir, protocol, prefix), RuleMask { bits }, 0)
    }
    fn remove_port(&mut self, id: u32, dir: u8, protocol: u8, prefix: PortPrefix) -> Result<(), MapError> {
        ignore_missing(self.port.remove(&port_key(id, dir, protocol, prefix)))
    }
}
