//! Parsing the L3/L4 facts a verdict needs, from any hook: the TC programs read the frame
//! through direct packet access (with a helper-load fallback for headers outside the linear
//! area), the netfilter program reads the skb through `bpf_probe_read_kernel`. Both go through
//! [`parse_ip`], so fragments, IPv6 extension headers and truncated packets get the same
//! verdict everywhere.
use aya_ebpf::programs::TcContext;
use netsieve_common::{address_from_words, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6 extension headers followed before giving up (a defined, counted verdict: malformed).
const MAX_IPV6_EXTENSIONS: usize = 6;
/// Headers beyond this offset are not parsed: such a packet is malformed for our purposes.
/// Also bounds every variable offset for the verifier.
const MAX_HEADER_OFFSET: usize = 2048;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Parsing failed on a truncated or inconsistent header.
pub struct Malformed;

/// Bytes of a packet, from its L3 header on.
pub trait PacketBytes {
    /// Reads a `T` at `offset` from the L3 header.
    fn load<T: Copy>(&self, offset: usize) -> Result<T, Malformed>;
    /// Bytes from the L3 header to the end of the packet.
    fn l3_len(&self) -> usize;
}

/// The L3/L4 facts the verdict needs. 8-aligned with the addresses first, so that copying an
/// address (into a map key) is two word moves, not sixteen byte moves.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Packet {
    /// Addresses in the key form of every address map: IPv4 as IPv4-mapped IPv6.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    pub ipv6: bool,
    /// Part of a fragmented datagram.
    pub fragment: bool,
    /// A fragment other than the first: carries no L4 header.
    pub later_fragment: bool,
    pub fragment_id: u32,
}

impl Packet {
    pub const fn empty() -> Packet {
        Packet {
            src: [0; 16],
            dst: [0; 16],
            protocol: 0,
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
            ipv6: false,
            fragment: false,
            later_fragment: false,
            fragment_id: 0,
        }
    }

    /// A TCP segment opening a connection (SYN without ACK): never rides an existing flow.
    #[inline(always)]
    pub fn is_tcp_open(&self) -> bool {
        self.protocol == PROTO_TCP && self.tcp_flags & TCP_SYN != 0 && self.tcp_flags & TCP_ACK == 0
    }

    /// Whether the protocol has ports policy rules can name.
    #[inline(always)]
    pub fn has_ports(&self) -> bool {
        matches!(self.protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
    }
}

pub enum Parsed {
    /// Not policy's business: non-IP frames (ARP must work for pods to talk) and IPv6
    /// neighbour discovery (link plumbing; blocking it would cut allowed flows too).
    Pass,
    Ip(Packet),
}

#[inline(always)]
fn be16<B: PacketBytes>(bytes: &B, offset: usize) -> Result<u16, Malformed> {
    Ok(u16::from_be(bytes.load::<u16>(offset)?))
}

/// Parses from the L3 header. `version` is the family the hook or the frame says (4 or 6);
/// a header whose version nibble disagrees is malformed.
#[inline(always)]
pub fn parse_ip<B: PacketBytes>(bytes: &B, version: u8) -> Result<Parsed, Malformed> {
    let mut packet = Packet::empty();
    if bytes.load::<u8>(0)? >> 4 != version {
        return Err(Malformed);
    }
    let l4_offset = match version {
        4 => parse_ipv4(bytes, &mut packet)?,
        6 => parse_ipv6(bytes, &mut packet)?,
        _ => return Err(Malformed),
    };
    if !packet.later_fragment && parse_l4(bytes, &mut packet, l4_offset)? {
        return Ok(Parsed::Pass);
    }
    Ok(Parsed::Ip(packet))
}

#[inline(always)]
fn parse_ipv4<B: PacketBytes>(bytes: &B, packet: &mut Packet) -> Result<usize, Malformed> {
    let version_ihl = bytes.load::<u8>(0)?;
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if header_len < 20 {
        return Err(Malformed);
    }
    let total_len = be16(bytes, 2)? as usize;
    if total_len < header_len || total_len > bytes.l3_len() {
        return Err(Malformed);
    }
    let flags_offset = be16(bytes, 6)?;
    let more_fragments = flags_offset & 0x2000 != 0;
    let offset = flags_offset & 0x1fff;
    packet.fragment = more_fragments || offset != 0;
    packet.later_fragment = offset != 0;
    packet.fragment_id = be16(bytes, 4)? as u32;
    packet.protocol = bytes.load::<u8>(9)?;
    // IPv4-mapped IPv6 (`::ffff:a.b.c.d`), the key form of every address map, built as two
    // words (byte-wise assembly compiles to a load and a store per byte).
    packet.src = ipv4_mapped(bytes.load::<u32>(12)?);
    packet.dst = ipv4_mapped(bytes.load::<u32>(16)?);
    Ok(header_len)
}

#[inline(always)]
fn parse_ipv6<B: PacketBytes>(bytes: &B, packet: &mut Packet) -> Result<usize, Malformed> {
    packet.ipv6 = true;
    let payload_len = be16(bytes, 4)? as usize;
    if 40 + payload_len > bytes.l3_len() {
        return Err(Malformed);
    }
    packet.src = load_address16(bytes, 8)?;
    packet.dst = load_address16(bytes, 24)?;
    let mut next = bytes.load::<u8>(6)?;
    let mut offset = 40usize;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        if offset > MAX_HEADER_OFFSET {
            return Err(Malformed);
        }
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units.
            0 | 43 | 60 => {
                let len = (bytes.load::<u8>(offset + 1)? as usize + 1) * 8;
                next = bytes.load::<u8>(offset)?;
                offset += len;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let len = (bytes.load::<u8>(offset + 1)? as usize + 2) * 4;
                next = bytes.load::<u8>(offset)?;
                offset += len;
            }
            44 => {
                let frag = be16(bytes, offset + 2)?;
                packet.fragment = true;
                packet.later_fragment = frag >> 3 != 0;
                packet.fragment_id = u32::from_be(bytes.load::<u32>(offset + 4)?);
                next = bytes.load::<u8>(offset)?;
                offset += 8;
            }
            _ => {
                packet.protocol = next;
                return Ok(offset);
            }
        }
    }
    Err(Malformed)
}

/// `::ffff:a.b.c.d` from the address as read from the header (network order in memory).
#[inline(always)]
fn ipv4_mapped(address: u32) -> [u8; 16] {
    let mut low = [0u8; 8];
    low[2] = 0xff;
    low[3] = 0xff;
    low[4..].copy_from_slice(&address.to_ne_bytes());
    address_from_words(0, u64::from_ne_bytes(low))
}

/// A 16-byte address, as two word loads.
#[inline(always)]
fn load_address16<B: PacketBytes>(bytes: &B, offset: usize) -> Result<[u8; 16], Malformed> {
    Ok(address_from_words(bytes.load::<u64>(offset)?, bytes.load::<u64>(offset + 8)?))
}

/// Reads ports (TCP flags); returns true for packets that pass without a verdict (neighbour
/// discovery).
#[inline(always)]
fn parse_l4<B: PacketBytes>(bytes: &B, packet: &mut Packet, offset: usize) -> Result<bool, Malformed> {
    if offset > MAX_HEADER_OFFSET {
        return Err(Malformed);
    }
    match packet.protocol {
        PROTO_TCP => {
            packet.src_port = be16(bytes, offset)?;
            packet.dst_port = be16(bytes, offset + 2)?;
            packet.tcp_flags = bytes.load::<u8>(offset + 13)?;
        }
        PROTO_UDP | PROTO_SCTP => {
            packet.src_port = be16(bytes, offset)?;
            packet.dst_port = be16(bytes, offset + 2)?;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let icmp_type = bytes.load::<u8>(offset)?;
            // Neighbour discovery (router/neighbour solicitation and advertisement, redirect).
            if packet.protocol == PROTO_ICMPV6 && (133..=137).contains(&icmp_type) {
                return Ok(true);
            }
            // Echo request/reply: the identifier stands in for both ports so a reply finds its
            // request in conntrack. Policy ports never apply to ICMP.
            let echo = matches!((packet.protocol, icmp_type), (PROTO_ICMP, 0 | 8) | (PROTO_ICMPV6, 128 | 129));
            if echo {
                let id = be16(bytes, offset + 4)?;
                packet.src_port = id;
                packet.dst_port = id;
            }
        }
        _ => {}
    }
    Ok(false)
}

/// A TC frame: direct packet access on the linear area, `bpf_skb_load_bytes` beyond it.
pub struct TcFrame<'a> {
    ctx: &'a TcContext,
    data: usize,
    data_end: usize,
    len: usize,
}

impl<'a> TcFrame<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> TcFrame<'a> {
        TcFrame { ctx, data: ctx.data(), data_end: ctx.data_end(), len: ctx.len() as usize }
    }

    /// The frame's ethertype.
    #[inline(always)]
    pub fn ethertype(&self) -> Result<u16, Malformed> {
        Ok(u16::from_be(self.load_raw::<u16>(12)?))
    }

    #[inline(always)]
    fn load_raw<T: Copy>(&self, offset: usize) -> Result<T, Malformed> {
        if offset > MAX_HEADER_OFFSET + ETH_HLEN {
            return Err(Malformed);
        }
        let start = self.data + offset;
        // At least two bytes are checked: for a one-byte read LLVM turns `start + 1 <= end`
        // into `start < end`, which the verifier does not accept as a bounds check. A byte at
        // the very end of the linear area takes the helper path below, which is exact.
        if start + core::mem::size_of::<T>().max(2) <= self.data_end {
            // SAFETY: bounds checked against data_end just above (the verifier checks it too).
            // A plain (not byte-wise) load even where the header is not aligned: BPF has no
            // alignment faults, and the verifier allows misaligned packet access unless
            // BPF_F_STRICT_ALIGNMENT is set or the architecture lacks efficient unaligned access
            // (then the load is refused at load time, never wrong at run time).
            return Ok(unsafe { core::ptr::read(start as *const T) });
        }
        self.ctx.load::<T>(offset).map_err(|_| Malformed)
    }
}

impl PacketBytes for TcFrame<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Result<T, Malformed> {
        self.load_raw(ETH_HLEN + offset)
    }

    #[inline(always)]
    fn l3_len(&self) -> usize {
        self.len.saturating_sub(ETH_HLEN)
    }
}

/// Parses a TC frame (Ethernet on a veth).
#[inline(always)]
pub fn parse_frame(frame: &TcFrame<'_>) -> Result<Parsed, Malformed> {
    match frame.ethertype()? {
        ETH_P_IP => parse_ip(frame, 4),
        ETH_P_IPV6 => parse_ip(frame, 6),
        // ARP and every other non-IP frame: NetworkPolicy is about IP traffic.
        _ => Ok(Parsed::Pass),
    }
}
