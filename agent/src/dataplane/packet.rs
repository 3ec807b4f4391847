//! Crafted Ethernet frames for running the programs with `BPF_PROG_TEST_RUN` (tests and
//! benchmarks). Checksums are left zero: the programs do not verify them.
use std::net::IpAddr;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_ARP: u16 = 0x0806;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;

/// Layer 4 of a crafted packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp { src_port: u16, dst_port: u16, flags: u8 },
    Udp { src_port: u16, dst_port: u16 },
    Sctp { src_port: u16, dst_port: u16 },
    /// ICMP (IPv4) or ICMPv6 (IPv6) with type, code and echo identifier.
    Icmp { icmp_type: u8, code: u8, id: u16 },
}

impl L4 {
    fn protocol(&self, ipv6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Sctp { .. } => 132,
            L4::Icmp { .. } if ipv6 => 58,
            L4::Icmp { .. } => 1,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match *self {
            L4::Tcp { src_port, dst_port, flags } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = flags;
                h
            }
            L4::Udp { src_port, dst_port } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..6].copy_from_slice(&8u16.to_be_bytes());
                h
            }
            L4::Sctp { src_port, dst_port } => {
                let mut h = vec![0u8; 12];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h
            }
            L4::Icmp { icmp_type, code, id } => {
                let mut h = vec![0u8; 8];
                h[0] = icmp_type;
                h[1] = code;
                h[4..6].copy_from_slice(&id.to_be_bytes());
                h
            }
        }
    }
}

/// IP fragmentation of a crafted packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fragment {
    #[default]
    None,
    /// First fragment (offset 0, more fragments follow): carries the L4 header.
    First { id: u32 },
    /// A later fragment: no L4 header.
    Later { id: u32, offset_units: u16 },
}

/// A packet to craft.
#[derive(Clone, Debug)]
pub struct PacketSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub fragment: Fragment,
    /// IPv6 only: a hop-by-hop options header before the payload.
    pub ipv6_hop_by_hop: bool,
    pub payload_len: usize,
}

impl PacketSpec {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> PacketSpec {
        PacketSpec { src, dst, l4, fragment: Fragment::None, ipv6_hop_by_hop: false, payload_len: 16 }
    }

    /// The Ethernet frame. Mixed address families are a caller bug and produce an IPv6 frame
    /// with IPv4-mapped addresses.
    pub fn frame(&self) -> Vec<u8> {
        let ipv6 = self.src.is_ipv6() || self.dst.is_ipv6();
        let mut payload = match self.fragment {
            Fragment::Later { .. } => Vec::new(),
            _ => self.l4.bytes(),
        };
        payload.extend(std::iter::repeat_n(0xabu8, self.payload_len));
        let protocol = self.l4.protocol(ipv6);
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        if ipv6 {
            frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let mut extensions = Vec::new();
            let mut next = protocol;
            if let Fragment::First { id } | Fragment::Later { id, .. } = self.fragment {
                let offset_units = match self.fragment {
                    Fragment::Later { offset_units, .. } => offset_units,
                    _ => 0,
                };
                let more = matches!(self.fragment, Fragment::First { .. }) as u16;
                let mut h = vec![next, 0];
                h.extend_from_slice(&((offset_units << 3) | more).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                extensions = h;
                next = 44;
            }
            if self.ipv6_hop_by_hop {
                let mut h = vec![next, 0, 1, 4, 0, 0, 0, 0];
                h.extend_from_slice(&extensions);
                extensions = h;
                next = 0;
            }
            let payload_len = (extensions.len() + payload.len()) as u16;
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&payload_len.to_be_bytes());
            frame.push(next);
            frame.push(64);
            frame.extend_from_slice(&v6_octets(self.src));
            frame.extend_from_slice(&v6_octets(self.dst));
            frame.extend_from_slice(&extensions);
        } else {
            frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let total = (20 + payload.len()) as u16;
            let (id, flags_offset) = match self.fragment {
                Fragment::None => (0u16, 0x4000u16),
                Fragment::First { id } => (id as u16, 0x2000),
                Fragment::Later { id, offset_units } => (id as u16, offset_units & 0x1fff),
            };
            frame.extend_from_slice(&[0x45, 0]);
            frame.extend_from_slice(&total.to_be_bytes());
            frame.extend_from_slice(&id.to_be_bytes());
            frame.extend_from_slice(&flags_offset.to_be_bytes());
            frame.extend_from_slice(&[64, protocol, 0, 0]);
            frame.extend_from_slice(&v4_octets(self.src));
            frame.extend_from_slice(&v4_octets(self.dst));
        }
        frame.extend_from_slice(&payload);
        frame
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn v4_octets(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or([0; 4], |v4| v4.octets()),
    }
}

/// An ARP request frame.
pub fn arp_frame() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend(std::iter::repeat_n(0u8, 20));
    frame
}
