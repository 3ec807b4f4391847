//! Finding a local pod's host-side interface from its IP address.
//!
//! - Routed CNIs (kindnet's ptp, Calico-style): a host route `POD_IP dev vethX scope link`.
//! - Bridged CNIs (bridge plugin, flannel's cni0): the pod's neighbour entry on the bridge gives
//!   its MAC, and the bridge's forwarding database gives the port (the veth) that MAC is on.
//!
//! The tables come from the kernel over rtnetlink ([`Watcher`]): one dump of links, IPv4 and
//! IPv6 routes, neighbours and bridge FDB entries, then the notifications of their multicast
//! groups, applied to a copy of the tables ([`Tables`]) as they arrive, so a new interface is
//! known within milliseconds and nothing is polled. When the kernel drops notifications
//! because the socket's buffer overran (`ENOBUFS`), or a dump was interrupted, the tables are
//! dumped again. Only reads; nothing is changed. [`InterfaceIndex::from_tables`] is a pure
//! function of the tables, with the semantics of the `ip route` / `ip neigh` / `bridge fdb`
//! views: the main routing table, neighbours with a link-layer address.
//!
//! A bridged pod has a neighbour entry only once the node itself has talked to it, and the
//! kernel may garbage-collect the entry later. So the agent asks for resolution of local pods
//! it cannot place (see [`InterfaceIndex::on_bridge_subnet`] and the agent's nudge), and a
//! bridged mapping, once found, is kept while its interface exists
//! ([`InterfaceIndex::keeping_bridged`]).
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("rtnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error("rtnetlink dump of {what}: {source}")]
    Dump { what: &'static str, source: std::io::Error },
    #[error("rtnetlink dump of {what} was interrupted {attempts} times by concurrent changes")]
    Interrupted { what: &'static str, attempts: usize },
    #[error("reading rtnetlink notifications: {0}")]
    Receive(std::io::Error),
}

/// A network interface of this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub ifindex: u32,
    pub name: String,
}

/// A link as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// The bridge (or bond) this link is a port of.
    pub master: Option<u32>,
    pub up: bool,
}

/// A route of the main table, by what identifies it to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteKey {
    pub dst: IpNet,
    pub tos: u8,
    pub priority: u32,
}

/// Where a route leads: an output interface, and whether through a gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteTarget {
    pub oif: Option<u32>,
    pub gateway: bool,
}

/// A copy of the kernel tables discovery looks at, kept up to date from notifications.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub links: BTreeMap<u32, Link>,
    pub routes: BTreeMap<RouteKey, RouteTarget>,
    /// IPv4/IPv6 neighbours with a link-layer address: (ifindex, address) -> MAC.
    pub neighbours: BTreeMap<(u32, IpAddr), Vec<u8>>,
    /// Bridge FDB entries: (port ifindex, MAC, VLAN) -> the bridge they belong to.
    pub fdb: BTreeMap<(u32, Vec<u8>, u16), Option<u32>>,
    /// The node's own addresses (the local table's `local` routes, which the kernel keeps
    /// for every address of every interface).
    pub local_addresses: BTreeSet<IpAddr>,
}

/// What applying one notification asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    Done,
    /// A link went away or down: the kernel drops its IPv4 routes without notifying, so the
    /// routes must be dumped again.
    Redump,
}

impl Tables {
    /// Applies one rtnetlink message (from a dump or a notification).
    fn apply(&mut self, message: RouteNetlinkMessage) -> Applied {
        match message {
            RouteNetlinkMessage::NewLink(link) => {
                let index = link.header.index;
                let entry = link_of(&link);
                let was_up = self.links.get(&index).map(|l| l.up);
                let went_down = was_up == Some(true) && !entry.up;
                self.links.insert(index, entry);
                if went_down {
                    return Applied::Redump;
                }
            }
            RouteNetlinkMessage::DelLink(link) => {
                let index = link.header.index;
                self.links.remove(&index);
                self.neighbours.retain(|(ifindex, _), _| *ifindex != index);
                self.fdb.retain(|(port, _, _), master| *port != index && *master != Some(index));
                self.routes.retain(|_, target| target.oif != Some(index));
                return Applied::Redump;
            }
            RouteNetlinkMessage::NewRoute(route) => {
                if let Some((key, target)) = route_of(&route) {
                    self.routes.insert(key, target);
                }
                if let Some(address) = local_address_of(&route) {
                    self.local_addresses.insert(address);
                }
            }
            RouteNetlinkMessage::DelRoute(route) => {
                if let Some((key, _)) = route_of(&route) {
                    self.routes.remove(&key);
                }
                if let Some(address) = local_address_of(&route) {
                    self.local_addresses.remove(&address);
                }
            }
            RouteNetlinkMessage::NewNeighbour(neighbour) => self.apply_neighbour(&neighbour, true),
            RouteNetlinkMessage::DelNeighbour(neighbour) => self.apply_neighbour(&neighbour, false),
            _ => {}
        }
        Applied::Done
    }

    fn apply_neighbour(&mut self, message: &NeighbourMessage, present: bool) {
        let header = &message.header;
        let mac = message.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(mac) => Some(mac.clone()),
            _ => None,
        });
        match header.family {
            AddressFamily::Bridge => {
                let Some(mac) = mac else { return };
                let vlan = message.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Vlan(vlan) => Some(*vlan),
                    _ => None,
                });
                let master = message.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Controller(master) => Some(*master),
                    _ => None,
                });
                let key = (header.ifindex, mac, vlan.unwrap_or(0));
                if present {
                    self.fdb.insert(key, master);
                } else {
                    self.fdb.remove(&key);
                }
            }
            AddressFamily::Inet | AddressFamily::Inet6 => {
                let Some(ip) = message.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
                    _ => None,
                }) else {
                    return;
                };
                let key = (header.ifindex, ip);
                // As `ip neigh show`: entries that resolved to an address (not failed,
                // incomplete or no-ARP).
                let resolved = !matches!(header.state, NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::Noarp);
                match mac {
                    Some(mac) if present && resolved => {
                        self.neighbours.insert(key, mac);
                    }
                    _ => {
                        self.neighbours.remove(&key);
                    }
                }
            }
            _ => {}
        }
    }
}

fn link_of(link: &LinkMessage) -> Link {
    let mut entry = Link { name: String::new(), master: None, up: link.header.flags.contains(LinkFlags::Up) };
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(name) => entry.name = name.clone(),
            LinkAttribute::Controller(master) => entry.master = Some(*master),
            _ => {}
        }
    }
    entry
}

/// The kernel's `local` routing table (linux/rtnetlink.h RT_TABLE_LOCAL).
const RT_TABLE_LOCAL: u32 = 255;

/// The address of a `local` route of the local table: one of the node's own addresses
/// (loopback excepted).
fn local_address_of(route: &RouteMessage) -> Option<IpAddr> {
    let mut table = u32::from(route.header.table);
    let mut dst = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
            _ => {}
        }
    }
    let local = table == RT_TABLE_LOCAL
        && route.header.kind == netlink_packet_route::route::RouteType::Local;
    dst.filter(|ip| local && !ip.is_loopback())
}

/// A main-table IPv4/IPv6 route, or None for routes discovery does not look at.
fn route_of(route: &RouteMessage) -> Option<(RouteKey, RouteTarget)> {
    let header = &route.header;
    let mut table = u32::from(header.table);
    let mut dst = None;
    let mut target = RouteTarget { oif: None, gateway: false };
    let mut priority = 0;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(oif) => target.oif = Some(*oif),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) | RouteAttribute::MultiPath(_) => target.gateway = true,
            RouteAttribute::Priority(p) => priority = *p,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let dst = match (dst, header.address_family) {
        (Some(ip), _) => ip,
        // A default route has no destination attribute.
        (None, AddressFamily::Inet) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let dst = IpNet::new(dst, header.destination_prefix_length).ok()?;
    Some((RouteKey { dst, tos: header.tos, priority }, target))
}

/// A subscription to the rtnetlink notifications discovery needs.
pub struct Watcher {
    events: Socket,
    buffer: Vec<u8>,
}

/// Largest datagram read at once; a larger one (never sent by the kernel for these groups)
/// counts as lost notifications.
const RECEIVE_BUFFER: usize = 256 * 1024;
/// Attempts at a consistent dump before giving up for this round.
const DUMP_ATTEMPTS: usize = 5;

/// Outcome of reading the queued notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every queued notification was applied.
    Applied,
    /// Notifications were lost (`ENOBUFS`) or a link went away: dump again.
    NeedsDump,
}

impl Watcher {
    /// Subscribes to link, IPv4/IPv6 route and neighbour (including FDB) notifications.
    /// Subscribe before dumping, so no change falls between the dump and the subscription.
    pub fn subscribe() -> Result<Watcher, DiscoveryError> {
        // A bigger buffer makes overruns rarer on busy nodes; they are handled either way.
        Watcher::subscribe_with_buffer(4 * 1024 * 1024)
    }

    /// [`Watcher::subscribe`] with a socket receive buffer of about `bytes` (the kernel clamps
    /// it); tests use a tiny one to provoke overruns.
    pub fn subscribe_with_buffer(bytes: usize) -> Result<Watcher, DiscoveryError> {
        let mut events = Socket::new(NETLINK_ROUTE).map_err(DiscoveryError::Socket)?;
        events.bind_auto().map_err(DiscoveryError::Socket)?;
        let _ = events.set_rx_buf_sz(bytes);
        for group in [libc::RTNLGRP_LINK, libc::RTNLGRP_IPV4_ROUTE, libc::RTNLGRP_IPV6_ROUTE, libc::RTNLGRP_NEIGH] {
            events.add_membership(group).map_err(DiscoveryError::Socket)?;
        }
        events.set_non_blocking(true).map_err(DiscoveryError::Socket)?;
        Ok(Watcher { events, buffer: Vec::with_capacity(RECEIVE_BUFFER) })
    }

    /// Waits up to `timeout` for notifications; true when some are queued.
    pub fn wait(&self, timeout: Duration) -> Result<bool, DiscoveryError> {
        let mut poll = libc::pollfd { fd: self.events.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd we own, valid for the call.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(DiscoveryError::Receive(error));
        }
        Ok(ready > 0)
    }

    /// Applies every queued notification to `tables`.
    pub fn drain(&mut self, tables: &mut Tables) -> Result<Drained, DiscoveryError> {
        let mut outcome = Drained::Applied;
        loop {
            match self.receive() {
                Ok(Some(messages)) => {
                    for message in messages {
                        if tables.apply(message) == Applied::Redump {
                            outcome = Drained::NeedsDump;
                        }
                    }
                }
                Ok(None) => return Ok(outcome),
                Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                    // The kernel dropped notifications; what is still queued predates the
                    // loss and must not be replayed over a fresh dump.
                    self.discard()?;
                    return Ok(Drained::NeedsDump);
                }
                Err(error) => return Err(DiscoveryError::Receive(error)),
            }
        }
    }

    /// Throws away everything queued (before a dump that replaces it).
    pub fn discard(&mut self) -> Result<(), DiscoveryError> {
        loop {
            match self.receive() {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(error) => return Err(DiscoveryError::Receive(error)),
            }
        }
    }

    /// One datagram's messages, or None when nothing is queued.
    fn receive(&mut self) -> std::io::Result<Option<Vec<RouteNetlinkMessage>>> {
        self.buffer.clear();
        match self.events.recv(&mut self.buffer, libc::MSG_TRUNC) {
            Ok(length) if length > RECEIVE_BUFFER => Err(std::io::Error::from_raw_os_error(libc::ENOBUFS)),
            Ok(length) => {
                let (messages, _) = parse_datagram(&self.buffer[..length.min(self.buffer.len())]);
                Ok(Some(messages))
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => Ok(Some(Vec::new())),
            Err(error) => Err(error),
        }
    }
}

/// What one datagram of a dump said besides its messages.
#[derive(Default)]
struct DatagramEnd {
    done: bool,
    interrupted: bool,
    error: Option<std::io::Error>,
}

/// Splits a datagram into its route messages; undecodable messages are skipped (logged).
fn parse_datagram(bytes: &[u8]) -> (Vec<RouteNetlinkMessage>, DatagramEnd) {
    let mut messages = Vec::new();
    let mut end = DatagramEnd::default();
    let mut offset = 0;
    while offset < bytes.len() {
        let message = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..]) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "undecodable rtnetlink message; dropping the rest of the datagram");
                break;
            }
        };
        let length = message.header.length as usize;
        if message.header.flags & NLM_F_DUMP_INTR != 0 {
            end.interrupted = true;
        }
        match message.payload {
            NetlinkPayload::InnerMessage(inner) => messages.push(inner),
            NetlinkPayload::Done(_) => end.done = true,
            NetlinkPayload::Error(error) if error.code.is_some() => end.error = Some(error.to_io()),
            _ => {}
        }
        // Messages are 4-byte aligned.
        let aligned = (length + 3) & !3;
        if length == 0 {
            break;
        }
        offset += aligned;
    }
    (messages, end)
}

/// Dumps every table discovery needs, each on a fresh socket, retrying dumps the kernel marks
/// as interrupted by concurrent changes.
pub fn dump() -> Result<Tables, DiscoveryError> {
    let mut tables = Tables::default();
    let mut link = LinkMessage::default();
    link.header.interface_family = AddressFamily::Unspec;
    let mut route4 = RouteMessage::default();
    route4.header.address_family = AddressFamily::Inet;
    let mut route6 = RouteMessage::default();
    route6.header.address_family = AddressFamily::Inet6;
    let mut neighbours = NeighbourMessage::default();
    neighbours.header.family = AddressFamily::Unspec;
    let mut fdb = NeighbourMessage::default();
    fdb.header.family = AddressFamily::Bridge;
    let requests = [
        ("links", RouteNetlinkMessage::GetLink(link)),
        ("IPv4 routes", RouteNetlinkMessage::GetRoute(route4)),
        ("IPv6 routes", RouteNetlinkMessage::GetRoute(route6)),
        ("neighbours", RouteNetlinkMessage::GetNeighbour(neighbours)),
        ("bridge FDB", RouteNetlinkMessage::GetNeighbour(fdb)),
    ];
    for (what, request) in requests {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (messages, interrupted) = dump_one(request.clone()).map_err(|source| DiscoveryError::Dump { what, source })?;
            if interrupted && attempt < DUMP_ATTEMPTS {
                continue;
            }
            if interrupted {
                return Err(DiscoveryError::Interrupted { what, attempts: attempt });
            }
            for message in messages {
                tables.apply(message);
            }
            break;
        }
    }
    Ok(tables)
}

/// One dump request: (messages, whether the kernel flagged it as interrupted).
fn dump_one(request: RouteNetlinkMessage) -> std::io::Result<(Vec<RouteNetlinkMessage>, bool)> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
    message.finalize();
    let mut bytes = vec![0; message.header.length as usize];
    message.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    // Bounded: a dump that stalls is an error, not a hang of the discovery thread.
    set_receive_timeout(&socket)?;
    let mut all = Vec::new();
    let mut interrupted = false;
    let mut buffer = Vec::with_capacity(RECEIVE_BUFFER);
    loop {
        buffer.clear();
        let length = socket.recv(&mut buffer, libc::MSG_TRUNC)?;
        if length > buffer.len() {
            return Err(std::io::Error::other("rtnetlink dump datagram larger than the receive buffer"));
        }
        let (messages, end) = parse_datagram(&buffer[..length]);
        all.extend(messages);
        interrupted |= end.interrupted;
        if let Some(error) = end.error {
            return Err(error);
        }
        if end.done {
            return Ok((all, interrupted));
        }
    }
}

/// The kind of link `ifindex` is (`veth`, `bridge`…; None for a plain device such as `lo` or
/// a physical NIC), asked from the kernel directly: a link a client names may be newer than
/// the tables.
pub fn link_kind(ifindex: u32) -> std::io::Result<Option<String>> {
    let mut request = LinkMessage::default();
    request.header.index = ifindex;
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::GetLink(request)));
    message.finalize();
    let mut bytes = vec![0; message.header.length as usize];
    message.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    set_receive_timeout(&socket)?;
    let mut buffer = Vec::with_capacity(RECEIVE_BUFFER);
    let length = socket.recv(&mut buffer, libc::MSG_TRUNC)?;
    if length > buffer.len() {
        return Err(std::io::Error::other("rtnetlink answer larger than the receive buffer"));
    }
    let (messages, end) = parse_datagram(&buffer[..length]);
    if let Some(error) = end.error {
        return Err(error);
    }
    for message in messages {
        if let RouteNetlinkMessage::NewLink(link) = message
            && link.header.index == ifindex
        {
            let kind = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                }),
                _ => None,
            });
            return Ok(kind);
        }
    }
    Err(std::io::Error::other(format!("the kernel did not describe link {ifindex}")))
}

/// Bounds how long a request socket waits for the kernel.
fn set_receive_timeout(socket: &Socket) -> std::io::Result<()> {
    let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
    // SAFETY: setsockopt with a timeval we own, on a socket we own.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The map from pod addresses to interfaces, derived from [`Tables`].
#[derive(Debug, Default, Clone)]
pub struct InterfaceIndex {
    /// All links by name.
    pub links: BTreeMap<String, Interface>,
    /// Pod address -> host-side interface.
    by_ip: BTreeMap<IpAddr, Interface>,
    /// Addresses placed through a bridge (neighbour + FDB) rather than a host route.
    bridged: BTreeSet<IpAddr>,
    /// Subnets directly on a bridge (the pod networks of bridged CNIs).
    bridge_subnets: Vec<IpNet>,
    /// The node's own addresses, on any interface (a bridge's gateway address included:
    /// kubelet probes and masqueraded hairpin traffic of bridged CNIs come from it).
    pub local_addresses: BTreeSet<IpAddr>,
}

impl InterfaceIndex {
    /// Reads links, routes, neighbours and bridge FDBs of the current network namespace with
    /// one dump (for callers outside the agent's discovery thread).
    pub fn read() -> Result<InterfaceIndex, DiscoveryError> {
        Ok(InterfaceIndex::from_tables(&dump()?))
    }

    /// The index of `tables`:
    /// - routed: main-table host routes (/32, /128) straight to a device (no gateway) that is
    ///   not a bridge;
    /// - bridged: a neighbour on a bridge, whose MAC the bridge's FDB has on a port other than
    ///   the bridge itself; routes take precedence;
    /// - bridge subnets: non-host routes straight to a bridge.
    pub fn from_tables(tables: &Tables) -> InterfaceIndex {
        let mut index = InterfaceIndex { local_addresses: tables.local_addresses.clone(), ..Default::default() };
        let interface = |ifindex: u32| tables.links.get(&ifindex).map(|l| Interface { ifindex, name: l.name.clone() });
        for (ifindex, link) in &tables.links {
            index.links.insert(link.name.clone(), Interface { ifindex: *ifindex, name: link.name.clone() });
        }
        let bridges: BTreeSet<u32> = tables.links.values().filter_map(|l| l.master).collect();
        for (key, target) in &tables.routes {
            let (Some(oif), false) = (target.oif, target.gateway) else { continue };
            let host = key.dst.prefix_len() == key.dst.max_prefix_len();
            if bridges.contains(&oif) {
                if !host {
                    index.bridge_subnets.push(key.dst);
                }
                continue;
            }
            if let (true, Some(interface)) = (host, interface(oif)) {
                index.by_ip.insert(key.dst.addr(), interface);
            }
        }
        for ((bridge, ip), mac) in &tables.neighbours {
            if !bridges.contains(bridge) || index.by_ip.contains_key(ip) {
                continue;
            }
            let port = tables
                .fdb
                .iter()
                .find(|((port, entry_mac, _), master)| entry_mac == mac && **master == Some(*bridge) && port != bridge)
                .and_then(|((port, _, _), _)| interface(*port));
            if let Some(port) = port {
                index.by_ip.insert(*ip, port);
                index.bridged.insert(*ip);
            }
        }
        index
    }

    /// Keeps the bridged mappings of `previous` whose interface still exists (same name and
    /// ifindex) and that nothing newer overrides: a neighbour entry that the kernel
    /// garbage-collected must not make an enforced pod look gone.
    pub fn keeping_bridged(mut self, previous: &InterfaceIndex) -> InterfaceIndex {
        for ip in &previous.bridged {
            let Some(interface) = previous.by_ip.get(ip) else { continue };
            if self.by_ip.contains_key(ip) || self.links.get(&interface.name) != Some(interface) {
                continue;
            }
            self.by_ip.insert(*ip, interface.clone());
            self.bridged.insert(*ip);
        }
        self
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

    /// The interface with this index, if it exists.
    pub fn by_ifindex(&self, ifindex: u32) -> Option<&Interface> {
        self.links.values().find(|l| l.ifindex == ifindex)
    }

    /// Whether the set of links or placements changed since `other`.
    pub fn same_links(&self, other: &InterfaceIndex) -> bool {
        self.links == other.links && self.by_ip == other.by_ip && self.local_addresses == other.local_addresses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, master: Option<u32>) -> Link {
        Link { name: name.into(), master, up: true }
    }

    fn route(dst: &str, oif: u32, gateway: bool) -> (RouteKey, RouteTarget) {
        (RouteKey { dst: dst.parse().expect("net"), tos: 0, priority: 0 }, RouteTarget { oif: Some(oif), gateway })
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn routed_pods_are_placed_by_host_routes() {
        let mut tables = Tables::default();
        tables.links.insert(1, link("lo", None));
        tables.links.insert(2, link("eth0", None));
        tables.links.insert(7, link("veth7", None));
        tables.routes.extend([
            route("10.250.0.10/32", 7, false),
            route("fd00:250::a/128", 7, false),
            route("10.250.1.0/24", 2, true),
            route("172.31.250.0/24", 2, false),
            route("10.250.0.99/32", 2, true),
        ]);
        let index = InterfaceIndex::from_tables(&tables);
        assert_eq!(index.interface_for(&[ip("10.250.0.10")]).map(|i| i.ifindex), Some(7));
        assert_eq!(index.interface_for(&[ip("fd00:250::a")]).map(|i| i.name.as_str()), Some("veth7"));
        assert_eq!(index.interface_for(&[ip("10.250.0.99")]), None, "via a gateway");
        assert_eq!(index.interface_for(&[ip("172.31.250.5")]), None, "not a host route");
        assert!(!index.on_bridge_subnet(&ip("10.250.0.10")));
    }

    #[test]
    fn bridged_pods_are_placed_by_neighbour_and_fdb_and_stay_while_their_port_lives() {
        let mac = vec![2, 0, 0, 0, 0, 0x11];
        let mut tables = Tables::default();
        tables.links.insert(3, link("br0", None));
        tables.links.insert(8, link("veth8", Some(3)));
        tables.routes.extend([route("10.250.0.0/24", 3, false)]);
        tables.neighbours.insert((3, ip("10.250.0.11")), mac.clone());
        tables.fdb.insert((8, mac.clone(), 0), Some(3));
        // The bridge's own entry for the same MAC is not the pod's port.
        tables.fdb.insert((3, mac.clone(), 0), Some(3));
        let index = InterfaceIndex::from_tables(&tables);
        assert_eq!(index.interface_for(&[ip("10.250.0.11")]).map(|i| i.ifindex), Some(8));
        assert!(index.on_bridge_subnet(&ip("10.250.0.200")));
        assert!(!index.on_bridge_subnet(&ip("10.251.0.1")));

        // The neighbour entry is garbage-collected: the mapping stays while veth8 exists.
        tables.neighbours.clear();
        let next = InterfaceIndex::from_tables(&tables).keeping_bridged(&index);
        assert_eq!(next.interface_for(&[ip("10.250.0.11")]).map(|i| i.ifindex), Some(8));
        assert!(next.same_links(&index));
        // veth8 goes: the mapping goes.
        tables.links.remove(&8);
        let gone = InterfaceIndex::from_tables(&tables).keeping_bridged(&next);
        assert_eq!(gone.interface_for(&[ip("10.250.0.11")]), None);
        assert!(!gone.same_links(&next));
    }

    #[test]
    fn notifications_update_the_tables() {
        let mut tables = Tables::default();
        let mut new_link = LinkMessage::default();
        new_link.header.index = 9;
        new_link.header.flags = LinkFlags::Up;
        new_link.attributes.push(LinkAttribute::IfName("veth9".into()));
        assert_eq!(tables.apply(RouteNetlinkMessage::NewLink(new_link.clone())), Applied::Done);
        let mut new_route = RouteMessage::default();
        new_route.header.address_family = AddressFamily::Inet;
        new_route.header.table = RouteHeader::RT_TABLE_MAIN;
        new_route.header.destination_prefix_length = 32;
        new_route.attributes.push(RouteAttribute::Destination(RouteAddress::Inet("10.1.2.3".parse().expect("ip"))));
        new_route.attributes.push(RouteAttribute::Oif(9));
        tables.apply(RouteNetlinkMessage::NewRoute(new_route.clone()));
        assert_eq!(InterfaceIndex::from_tables(&tables).interface_for(&[ip("10.1.2.3")]).map(|i| i.ifindex), Some(9));
        // A route of another table is not looked at.
        let mut local = new_route.clone();
        local.header.table = 255;
        local.attributes[0] = RouteAttribute::Destination(RouteAddress::Inet("10.9.9.9".parse().expect("ip")));
        tables.apply(RouteNetlinkMessage::NewRoute(local));
        assert_eq!(InterfaceIndex::from_tables(&tables).interface_for(&[ip("10.9.9.9")]), None);
        tables.apply(RouteNetlinkMessage::DelRoute(new_route));
        assert_eq!(InterfaceIndex::from_tables(&tables).interface_for(&[ip("10.1.2.3")]), None);
        // Deleting a link forgets what was on it and asks for a dump.
        assert_eq!(tables.apply(RouteNetlinkMessage::DelLink(new_link)), Applied::Redump);
        assert!(tables.links.is_empty());
    }
}
