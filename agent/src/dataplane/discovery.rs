//! Finding a local pod's host-side interface from its IP address.
//!
//! - Routed CNIs (kindnet's ptp, Calico-style): a host route `POD_IP dev vethX scope link`.
//! - Bridged CNIs (bridge plugin, flannel's cni0): the pod's neighbour entry on the bridge gives
//!   its MAC, and the bridge's forwarding database gives the port (the veth) that MAC is on.
//!
//! The tables are read with iproute2's JSON output (`ip -j`, `bridge -j`), a documented
//! dependency of the agent: one snapshot per sync of the whole table, so the cost does not grow
//! with polling frequency per pod. Only reads; nothing is changed.
//!
//! A bridged pod has a neighbour entry only once the node itself has talked to it, and the
//! kernel may garbage-collect the entry later. So the agent asks for resolution of local pods
//! it cannot place (see [`InterfaceIndex::on_bridge_subnet`] and the daemon's nudge), and a
//! bridged mapping, once found, is kept while its interface exists ([`InterfaceIndex::read_after`]).
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("running {command}: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("parsing the output of {command}: {source}")]
    Parse { command: String, source: serde_json::Error },
}

/// A network interface of this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub ifindex: u32,
    pub name: String,
}

#[derive(Deserialize)]
struct LinkJson {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    master: Option<String>,
}

#[derive(Deserialize)]
struct RouteJson {
    dst: String,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
}

#[derive(Deserialize)]
struct NeighJson {
    dst: String,
    dev: String,
    #[serde(default)]
    lladdr: Option<String>,
}

#[derive(Deserialize)]
struct FdbJson {
    mac: String,
    #[serde(default)]
    ifname: Option<String>,
    #[serde(default)]
    master: Option<String>,
}

fn run_json<T: for<'de> Deserialize<'de>>(program: &str, args: &[&str]) -> Result<Vec<T>, DiscoveryError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| DiscoveryError::Spawn { command: command.clone(), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(DiscoveryError::Failed { command, stderr });
    }
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&output.stdout).map_err(|source| DiscoveryError::Parse { command, source })
}

/// A snapshot of the tables that map pod addresses to interfaces.
#[derive(Debug, Default, Clone)]
pub struct InterfaceIndex {
    /// All links by name.
    pub links: BTreeMap<String, Interface>,
    /// Pod address -> host-side interface.
    by_ip: BTreeMap<IpAddr, Interface>,
    /// Addresses placed through a bridge (neighbour + FDB) rather than a host route.
    bridged: std::collections::BTreeSet<IpAddr>,
    /// Subnets directly on a bridge (the pod networks of bridged CNIs).
    bridge_subnets: Vec<ipnet::IpNet>,
}

impl InterfaceIndex {
    /// Reads links, host routes, neighbours and bridge FDBs of the current network namespace.
    pub fn read() -> Result<InterfaceIndex, DiscoveryError> {
        let links: Vec<LinkJson> = run_json("ip", &["-j", "link", "show"])?;
        let mut index = InterfaceIndex::default();
        let bridges: Vec<String> = {
            let masters: std::collections::BTreeSet<String> = links.iter().filter_map(|l| l.master.clone()).collect();
            masters.into_iter().collect()
        };
        for link in &links {
            index.links.insert(link.ifname.clone(), Interface { ifindex: link.ifindex, name: link.ifname.clone() });
        }
        // Routed: host routes straight to a device (no gateway) that is not a bridge.
        for family in ["-4", "-6"] {
            let routes: Vec<RouteJson> = run_json("ip", &["-j", family, "route", "show"])?;
            for route in routes {
                let (Some(dev), None) = (&route.dev, &route.gateway) else { continue };
                if bridges.contains(dev)
                    && let Ok(subnet) = route.dst.parse::<ipnet::IpNet>()
                {
                    index.bridge_subnets.push(subnet);
                }
                let host = route.dst.strip_suffix("/32").or_else(|| route.dst.strip_suffix("/128")).unwrap_or(&route.dst);
                let (Ok(ip), Some(interface)) = (host.parse::<IpAddr>(), index.links.get(dev)) else { continue };
                if !bridges.contains(dev) {
                    index.by_ip.insert(ip, interface.clone());
                }
            }
        }
        // Bridged: neighbour on a bridge -> MAC -> FDB port.
        if !bridges.is_empty() {
            let neighbours: Vec<NeighJson> = run_json("ip", &["-j", "neigh", "show"])?;
            let fdb: Vec<FdbJson> = run_json("bridge", &["-j", "fdb", "show"])?;
            for neighbour in neighbours.iter().filter(|n| bridges.contains(&n.dev)) {
                let (Ok(ip), Some(mac)) = (neighbour.dst.parse::<IpAddr>(), &neighbour.lladdr) else { continue };
                let port = fdb.iter().find(|entry| {
                    entry.mac.eq_ignore_ascii_case(mac)
                        && entry.master.as_deref() == Some(neighbour.dev.as_str())
                        && entry.ifname.as_deref().is_some_and(|n| n != neighbour.dev)
                });
                if let Some(interface) = port.and_then(|p| p.ifname.as_ref()).and_then(|n| index.links.get(n))
                    && !index.by_ip.contains_key(&ip)
                {
                    index.by_ip.insert(ip, interface.clone());
                    index.bridged.insert(ip);
                }
            }
        }
        Ok(index)
    }

    /// Reads the tables, keeping bridged mappings of `previous` whose interface still exists
    /// (same name and ifindex) and that nothing newer overrides: a neighbour entry that the
    /// kernel garbage-collected must not make an enforced pod look gone.
    pub fn read_after(previous: &InterfaceIndex) -> Result<InterfaceIndex, DiscoveryError> {
        let mut index = InterfaceIndex::read()?;
        for ip in &previous.bridged {
            let Some(interface) = previous.by_ip.get(ip) else { continue };
            if index.by_ip.contains_key(ip) || index.links.get(&interface.name) != Some(interface) {
                continue;
            }
            index.by_ip.insert(*ip, interface.clone());
            index.bridged.insert(*ip);
        }
        Ok(index)
    }

    /// Whether `ip` is on a bridged pod network of this node (where a neighbour entry, hence
    /// the pod's interface, appears once the node resolves the address).
    pub fn on_bridge_subnet(&self, ip: &IpAddr) -> bool {
        self.bridge_subnets.iter().any(|net| net.contains(ip))
    }

    /// The host-side interface of the first of `ips` that has one.
    pub fn interface_for(&self, ips: &[IpAddr]) -> Option<&Interface> {
        ips.iter().find_map(|ip| self.by_ip.get(ip))
    }

    /// Whether the set of links changed since `other` (a new pod interface appeared).
    pub fn same_links(&self, other: &InterfaceIndex) -> bool {
        self.links == other.links && self.by_ip == other.by_ip
    }
}
