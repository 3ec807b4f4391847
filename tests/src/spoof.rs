//! Packets with any source address, for the anti-spoofing test: UDP datagrams and TCP SYNs
//! (IPv4 or IPv6) written with etherparse and sent through a raw IP socket (the kernel sends
//! the header as written, source included) from inside a pod's namespace; a capture of what
//! arrives at a pod (a packet socket on all its interfaces, parsed with etherparse). The UDP
//! server recording payloads is the cluster's (`Cluster::record_udp`).
use crate::netns::{NetnsError, in_netns};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SpoofError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("building a packet: {0}")]
    Build(String),
    #[error("source {source_addr} and destination {destination} are of different families")]
    Families { source_addr: IpAddr, destination: IpAddr },
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    #[error("the {0} did not start within 5 s")]
    NotReady(&'static str),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SpoofError {
    move |source| SpoofError::Io { what, source }
}

/// What a crafted packet carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A UDP datagram with this payload.
    Udp(Vec<u8>),
    /// A TCP SYN with this initial sequence number.
    Syn(u32),
}

/// An IP packet (no link header) from `source`:`source_port` to `destination`.
pub fn craft(source: IpAddr, source_port: u16, destination: SocketAddr, probe: &Probe) -> Result<Vec<u8>, SpoofError> {
    let builder = match (source, destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        (source_addr, destination) => return Err(SpoofError::Families { source_addr, destination }),
    };
    let mut packet = Vec::new();
    let written = match probe {
        Probe::Udp(payload) => builder.udp(source_port, destination.port()).write(&mut packet, payload),
        Probe::Syn(sequence) => builder.tcp(source_port, destination.port(), *sequence, 64240).syn().write(&mut packet, &[]),
    };
    written.map_err(|e| SpoofError::Build(e.to_string()))?;
    Ok(packet)
}

/// Sends each (destination, IP packet) once through a raw socket (`IPPROTO_RAW`: the header is
/// the packet's own) from inside `netns`, `interval` apart: how many the kernel took.
pub fn send_raw(netns: &str, packets: Vec<(IpAddr, Vec<u8>)>, interval: Duration) -> Result<usize, SpoofError> {
    let sender = in_netns(netns, move || -> Result<usize, SpoofError> {
        let mut sockets: [Option<socket2::Socket>; 2] = [None, None];
        let mut sent = 0;
        for (destination, packet) in packets {
            let (slot, domain) = match destination {
                IpAddr::V4(_) => (0, socket2::Domain::IPV4),
                IpAddr::V6(_) => (1, socket2::Domain::IPV6),
            };
            let socket = match &mut sockets[slot] {
                Some(socket) => socket,
                empty => empty.insert(
                    socket2::Socket::new(domain, socket2::Type::RAW, Some(socket2::Protocol::from(libc::IPPROTO_RAW)))
                        .map_err(io("opening a raw IP socket"))?,
                ),
            };
            // Raw sockets take port 0 (IPv6 reads the protocol from it, 0 meaning the socket's).
            let target = socket2::SockAddr::from(SocketAddr::new(destination, 0));
            socket.send_to(&packet, &target).map_err(io("sending a crafted packet"))?;
            sent += 1;
            std::thread::sleep(interval);
        }
        Ok(sent)
    })?;
    sender.join().map_err(|_| SpoofError::Panicked("raw sender"))??
}

/// A packet seen arriving at a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub source_port: u16,
    pub destination_port: u16,
    pub what: SeenKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeenKind {
    Udp(Vec<u8>),
    /// A TCP segment with SYN set and ACK clear (a connection request).
    Syn,
    OtherTcp,
}

/// Every IP packet with TCP or UDP on every interface of a namespace, in both directions,
/// from start until dropped.
pub struct Capture {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), NetnsError>>>,
}

impl Capture {
    pub fn start(netns: &str) -> Result<Capture, SpoofError> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (records, stopped) = (seen.clone(), stop.clone());
        let handle = in_netns(netns, move || {
            // ETH_P_ALL in network byte order: every protocol, on every interface.
            let all = i32::from((libc::ETH_P_ALL as u16).to_be());
            let socket = match socket2::Socket::new(socket2::Domain::PACKET, socket2::Type::RAW, Some(all.into()))
                .and_then(|s| s.set_read_timeout(Some(Duration::from_millis(50))).map(|()| s))
            {
                Ok(socket) => socket,
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut frame = vec![0u8; 65536];
            while !stopped.load(Ordering::Relaxed) {
                let Ok(n) = (&socket).read(&mut frame) else { continue };
                if let Some(packet) = parse(&frame[..n])
                    && let Ok(mut list) = records.lock()
                {
                    list.push(packet);
                }
            }
        })?;
        let capture = Capture { seen, stop, handle: Some(handle) };
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(capture),
            Ok(Err(error)) => Err(SpoofError::Io { what: "opening a packet socket", source: error }),
            Err(_) => Err(SpoofError::NotReady("capture")),
        }
    }

    /// How many packets seen so far satisfy `matches`.
    pub fn count(&self, matches: impl Fn(&Seen) -> bool) -> usize {
        self.seen.lock().map_or(0, |list| list.iter().filter(|s| matches(s)).count())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// An Ethernet frame as a [`Seen`], if it is IP with TCP or UDP.
fn parse(frame: &[u8]) -> Option<Seen> {
    let packet = SlicedPacket::from_ethernet(frame).ok()?;
    let (source, destination) = match packet.net? {
        NetSlice::Ipv4(ip) => (IpAddr::V4(ip.header().source_addr()), IpAddr::V4(ip.header().destination_addr())),
        NetSlice::Ipv6(ip) => (IpAddr::V6(ip.header().source_addr()), IpAddr::V6(ip.header().destination_addr())),
        NetSlice::Arp(_) => return None,
    };
    let (source_port, destination_port, what) = match packet.transport? {
        TransportSlice::Udp(udp) => (udp.source_port(), udp.destination_port(), SeenKind::Udp(udp.payload().to_vec())),
        TransportSlice::Tcp(tcp) => {
            let what = if tcp.syn() && !tcp.ack() { SeenKind::Syn } else { SeenKind::OtherTcp };
            (tcp.source_port(), tcp.destination_port(), what)
        }
        _ => return None,
    };
    Some(Seen { source, destination, source_port, destination_port, what })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_packets_parse_back() {
        let v4 = craft("10.0.0.2".parse().unwrap(), 4000, "10.0.0.3:9000".parse().unwrap(), &Probe::Udp(b"hello".to_vec())).unwrap();
        // A raw IP packet behind a zeroed Ethernet header, as a packet socket would show it.
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&v4);
        let seen = parse(&frame).unwrap();
        assert_eq!(seen.source, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!((seen.source_port, seen.destination_port), (4000, 9000));
        assert_eq!(seen.what, SeenKind::Udp(b"hello".to_vec()));
        let v6 = craft("fd00::2".parse().unwrap(), 4001, "[fd00::3]:9001".parse().unwrap(), &Probe::Syn(7)).unwrap();
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x86, 0xdd]);
        frame.extend_from_slice(&v6);
        let seen = parse(&frame).unwrap();
        assert_eq!(seen.destination, "fd00::3".parse::<IpAddr>().unwrap());
        assert_eq!(seen.what, SeenKind::Syn);
        assert!(craft("fd00::2".parse().unwrap(), 1, "10.0.0.3:1".parse().unwrap(), &Probe::Syn(1)).is_err());
    }
}
