//! The egress verdict after kube-proxy's DNAT, from a BPF_PROG_TYPE_NETFILTER program
//! attached at POST_ROUTING (before source NAT) and LOCAL_IN.
//!
//! The TC program on the pod's veth cannot judge a packet to a Service ClusterIP: the
//! destination is rewritten to the backend kube-proxy picks only later, in netfilter. So TC
//! defers egress flows to unknown addresses (recording them as `FLOW_DEFERRED`) and this
//! program judges them on the backend conntrack chose, with the same maps and the same
//! [`judge_flow`] as TC. It also judges every translated flow (a NodePort on the node's own
//! address, which TC allowed as node traffic). Kernel structures are read with
//! `bpf_probe_read_kernel` at offsets the agent resolves from the running kernel's BTF
//! (`NF_OFFSETS`), so one object serves every kernel.
use crate::counters::{Counted, count_endpoint, count_rule, count_audit};
use crate::maps::{CONNTRACK, ENDPOINTS, HeaderCopy, NF_HEADERS, NF_OFFSETS, POD_ADDRESSES};
use crate::packet::{Malformed, PacketBytes, Parsed, parse_ip};
use crate::verdict::{EndpointTag, Judgement, Outcome, account, judge_flow, now_netfilter, settings, structural_drop};
use crate::{flow, packet::Packet};
use aya_ebpf::helpers::bpf_probe_read_kernel;
use netsieve_common::{
    CONFIG_EGRESS_ENFORCED, CT_STATE_NEW, DIRECTION_EGRESS, FLOW_AUDIT, FLOW_CONFIRMED, FLOW_DEFERRED,
    FLOW_EGRESS, FLOW_INITIATOR_A, FlowState, HOOK_NETFILTER, NF_HEADER_COPY_BYTES, NO_RULE, NfConntrackTuple, NfOffsets, SkbConntrackAndLengths, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, REASON_MALFORMED,
};

pub const NF_DROP: i32 = 0;
pub const NF_ACCEPT: i32 = 1;
/// `enum ip_conntrack_info`: packets related to a connection (ICMP errors).
const IP_CT_RELATED: u64 = 1;
/// `enum ip_conntrack_info`: this value and above are reply-direction packets.
const IP_CT_IS_REPLY: u64 = 3;
const AF_INET: u16 = 2;
/// Kernel structures the program reads are far smaller; bounds every offset for the verifier.
const OFFSET_MASK: usize = 0xffff;

/// `struct bpf_nf_ctx`.
#[repr(C)]
pub struct NfContext {
    pub state: *const u8,
    pub skb: *const u8,
}

#[inline(always)]
fn read<T: Copy>(base: usize, offset: u32) -> Result<T, ()> {
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-tolerant accessor; a bad
    // address yields an error, never a fault.
    unsafe { bpf_probe_read_kernel((base + (offset as usize & OFFSET_MASK)) as *const T) }.map_err(|_| ())
}

/// One direction's tuple of a conntrack entry, in the key form of every address map.
struct Tuple {
    src: [u8; 16],
    src_port: u16,
    dst: [u8; 16],
    dst_port: u16,
    protocol: u8,
}

fn key_form(raw: [u8; 16], l3num: u16) -> [u8; 16] {
    if l3num != AF_INET {
        return raw;
    }
    let mut mapped = [0u8; 16];
    mapped[10] = 0xff;
    mapped[11] = 0xff;
    mapped[12..].copy_from_slice(&raw[..4]);
    mapped
}

/// Reads a `struct nf_conntrack_tuple` at `base`: one helper call for the whole tuple (the
/// agent checked the kernel lays it out as [`NfConntrackTuple`]).
#[inline(always)]
fn read_tuple(base: usize) -> Result<Tuple, ()> {
    let raw: NfConntrackTuple = read(base, 0)?;
    let src_port = u16::from_be(raw.src_port);
    // ICMP echo: the identifier (in the source half) stands for both ports, as in the TC
    // parser; the destination half holds type and code.
    let dst_port = if matches!(raw.protonum, PROTO_ICMP | PROTO_ICMPV6) { src_port } else { u16::from_be(raw.dst_port) };
    Ok(Tuple {
        src: key_form(raw.src_addr, raw.l3num),
        src_port,
        dst: key_form(raw.dst_addr, raw.l3num),
        dst_port,
        protocol: raw.protonum,
    })
}

/// The packet from its network header (untracked packets): the first
/// [`NF_HEADER_COPY_BYTES`] copied into a per-CPU buffer with one `bpf_probe_read_kernel`
/// call, anything beyond read through the helper field by field.
struct KernelBytes {
    base: usize,
    len: usize,
    /// The per-CPU copy (null: none, every load is a helper call), how many of its bytes are
    /// the packet's, and the copy's generation.
    copy: *const HeaderCopy,
    copied: usize,
    generation: u64,
}

impl KernelBytes {
    /// Reads through the helper only.
    #[inline(always)]
    fn uncopied(base: usize, len: usize) -> KernelBytes {
        KernelBytes { base, len, copy: core::ptr::null(), copied: 0, generation: 0 }
    }

    /// Copies the headers first.
    #[inline(always)]
    fn copied(base: usize, len: usize) -> KernelBytes {
        let mut bytes = KernelBytes::uncopied(base, len);
        let Some(buffer) = NF_HEADERS.get_ptr_mut(0) else { return bytes };
        // SAFETY: the per-CPU value; the generation moves before the bytes are written, so a
        // run this one interrupted sees its copy was taken. The helper writes through the
        // kernel's fault-tolerant accessor. A whole buffer's worth whatever the packet's
        // length (a constant size for the verifier); bytes past `len` are never used. A failed
        // copy leaves only the helper path.
        unsafe {
            let generation = (*buffer).generation.wrapping_add(1);
            (*buffer).generation = generation;
            let copied = aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                (*buffer).bytes.as_mut_ptr() as *mut core::ffi::c_void,
                NF_HEADER_COPY_BYTES as u32,
                base as *const core::ffi::c_void,
            );
            if copied == 0 {
                bytes.copy = buffer as *const HeaderCopy;
                bytes.copied = len.min(NF_HEADER_COPY_BYTES);
                bytes.generation = generation;
            }
        }
        bytes
    }

    /// Parses the packet from its network header (the family from the header itself).
    #[inline(always)]
    fn parse(&self) -> Result<Parsed, Malformed> {
        parse_ip(self, self.load::<u8>(0)? >> 4)
    }

    /// Whether every load so far read this packet's bytes: no other run took the copy.
    #[inline(always)]
    fn copy_intact(&self) -> bool {
        // SAFETY: the per-CPU value the copy was taken into.
        self.copy.is_null() || unsafe { core::ptr::read_volatile(&(*self.copy).generation) } == self.generation
    }
}

impl PacketBytes for KernelBytes {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Result<T, Malformed> {
        let end = offset + core::mem::size_of::<T>();
        if end > self.len || offset > OFFSET_MASK {
            return Err(Malformed);
        }
        if end <= NF_HEADER_COPY_BYTES && end <= self.copied {
            // SAFETY: within the per-CPU copy (checked against its size just above) and within
            // the bytes copied from the packet.
            return Ok(unsafe { core::ptr::read_unaligned((*self.copy).bytes.as_ptr().add(offset) as *const T) });
        }
        // SAFETY: as in `read`.
        unsafe { bpf_probe_read_kernel((self.base + offset) as *const T) }.map_err(|_| Malformed)
    }

    #[inline(always)]
    fn l3_len(&self) -> usize {
        self.len
    }
}

/// What the netfilter hook judges: the flow as the pod opened it and where it really goes.
struct Seen {
    original: Tuple,
    backend: [u8; 16],
    backend_port: u16,
}

/// Reads the flow of the packet: from its conntrack entry when it has one (original tuple,
/// and the reply tuple's source = the backend DNAT chose), else from the packet itself.
/// `Ok(None)`: nothing to judge here (a reply or related packet, not IP).
#[inline(always)]
fn seen(skb: usize, offsets: &NfOffsets, conntrack: &SkbConntrackAndLengths) -> Result<Option<Seen>, Malformed> {
    let ct = (conntrack.nfct & !7) as usize;
    let ctinfo = conntrack.nfct & 7;
    if ct != 0 {
        // Replies were judged on the pod's side by TC; related packets (ICMP errors) belong to
        // a connection that was judged.
        if ctinfo >= IP_CT_IS_REPLY || ctinfo == IP_CT_RELATED {
            return Ok(None);
        }
        let hashes = ct + (offsets.ct_tuplehash as usize & OFFSET_MASK);
        let original_base = hashes + (offsets.tuplehash_tuple as usize & OFFSET_MASK);
        let reply_base = original_base + (offsets.tuplehash_size as usize & OFFSET_MASK);
        let original = read_tuple(original_base).map_err(|_| Malformed)?;
        let reply = read_tuple(reply_base).map_err(|_| Malformed)?;
        return Ok(Some(Seen { backend: reply.src, backend_port: reply.src_port, original }));
    }
    let head: usize = read(skb, offsets.skb_head).map_err(|_| Malformed)?;
    let network: u16 = read(skb, offsets.skb_network_header).map_err(|_| Malformed)?;
    // Only the linear area is read: at these hooks it starts at the network header.
    let linear = conntrack.len.saturating_sub(conntrack.data_len) as usize;
    let base = head + network as usize;
    let bytes = KernelBytes::copied(base, linear);
    let mut parsed = bytes.parse();
    if !bytes.copy_intact() {
        // Another run on this CPU took the copy while it was parsed: parse the packet itself.
        parsed = KernelBytes::uncopied(base, linear).parse();
    }
    match parsed? {
        Parsed::Pass => Ok(None),
        Parsed::Ip(packet) => Ok(Some(Seen {
            backend: packet.dst,
            backend_port: packet.dst_port,
            original: Tuple {
                src: packet.src,
                src_port: packet.src_port,
                dst: packet.dst,
                dst_port: packet.dst_port,
                protocol: packet.protocol,
            },
        })),
    }
}

/// Judges one packet at a netfilter hook; returns NF_ACCEPT or NF_DROP.
///
/// # Safety
/// `ctx` must be the context the kernel passed to the program.
#[inline(always)]
pub unsafe fn judge_netfilter(ctx: *const NfContext) -> i32 {
    let Some(offsets) = NF_OFFSETS.get(0) else { return NF_ACCEPT };
    if offsets.ready == 0 {
        return NF_ACCEPT;
    }
    // No local pod whose egress is enforced: nothing here can be dropped, and this check is an
    // array read, before any helper call.
    if settings().flags & CONFIG_EGRESS_ENFORCED == 0 {
        return NF_ACCEPT;
    }
    // SAFETY: the caller passes the kernel's context; `skb` is its second field.
    let skb = unsafe { (*ctx).skb } as usize;
    let Ok(entered_by) = read::<u32>(skb, offsets.skb_iif) else { return NF_ACCEPT };
    // Only packets a local pod sent: the interface they entered the node by is its veth ...
    // SAFETY: plain read of a map value.
    let direct = unsafe { ENDPOINTS.get(&entered_by) };
    if let Some(endpoint) = direct
        && !endpoint.enforces_egress()
    {
        return NF_ACCEPT;
    }
    let conntrack = read::<SkbConntrackAndLengths>(skb, offsets.skb_nfct).map_err(|_| Malformed);
    let bytes = conntrack.as_ref().map_or(0, |c| c.len as u64);
    let seen = match conntrack.and_then(|c| seen(skb, offsets, &c)) {
        Ok(Some(seen)) => seen,
        Ok(None) => return NF_ACCEPT,
        Err(Malformed) => {
            if let Some(endpoint) = direct {
                structural_drop(REASON_MALFORMED, entered_by, DIRECTION_EGRESS, Some(endpoint), &Packet::empty(), bytes, HOOK_NETFILTER);
                return NF_DROP;
            }
            return NF_ACCEPT;
        }
    };
    // ... or, behind a bridge, the pod whose address is the source.
    let (ifindex, endpoint) = match direct {
        Some(endpoint) => (entered_by, endpoint),
        None => {
            // SAFETY: plain reads of map values.
            let Some(&ifindex) = (unsafe { POD_ADDRESSES.get(&seen.original.src) }) else { return NF_ACCEPT };
            let Some(endpoint) = (unsafe { ENDPOINTS.get(&ifindex) }) else { return NF_ACCEPT };
            if !endpoint.enforces_egress() {
                return NF_ACCEPT;
            }
            (ifindex, endpoint)
        }
    };
    let original = &seen.original;
    let translated = seen.backend != original.dst || seen.backend_port != original.dst_port;
    let settings = settings();
    let now = now_netfilter();
    let flow = flow::tuple_key(ifindex, original.protocol, &original.src, original.src_port, &original.dst, original.dst_port);
    let entry = CONNTRACK.get_ptr_mut(&flow.key);
    let packet = Packet {
        src: original.src,
        dst: seen.backend,
        protocol: original.protocol,
        src_port: original.src_port,
        dst_port: seen.backend_port,
        ..Packet::empty()
    };
    if let Some(state) = entry {
        // SAFETY: a live map value for this program run.
        let s = unsafe { &*state };
        if s.flags & FLOW_DEFERRED == 0 && !translated {
            // TC judged this flow on its real destination.
            return NF_ACCEPT;
        }
        let current = s.revision == endpoint.revision && s.ipcache_generation == settings.ipcache_generation;
        if s.flags & FLOW_CONFIRMED != 0 && current && s.nat_addr == seen.backend && s.nat_port == seen.backend_port {
            if s.flags & FLOW_AUDIT != 0 {
                count_audit(netsieve_common::REASON_POLICY_DENIED, DIRECTION_EGRESS);
                count_endpoint(endpoint.endpoint_id, DIRECTION_EGRESS, Counted::Audited, bytes);
            } else {
                count_endpoint(endpoint.endpoint_id, DIRECTION_EGRESS, Counted::Allowed, bytes);
                count_rule(s.rule_index, bytes);
            }
            return NF_ACCEPT;
        }
    }
    let has_ports = matches!(original.protocol, PROTO_TCP | PROTO_UDP | PROTO_SCTP);
    let (judgement, identity) = judge_flow(
        endpoint,
        DIRECTION_EGRESS,
        &seen.backend,
        original.protocol,
        seen.backend_port,
        has_ports,
        false,
        false,
    );
    let confirm = match judgement {
        Judgement::Allowed { rule } => Some((rule, 0)),
        Judgement::Audited { .. } => Some((NO_RULE, FLOW_AUDIT)),
        Judgement::Denied { .. } | Judgement::Deferred => None,
    };
    match (entry, confirm) {
        (Some(state), Some((rule, audit))) => {
            // SAFETY: a live map value for this program run.
            unsafe {
                (*state).nat_addr = seen.backend;
                (*state).nat_port = seen.backend_port;
                (*state).revision = endpoint.revision;
                (*state).slot = endpoint.endpoint_id;
                (*state).ipcache_generation = settings.ipcache_generation;
                (*state).rule_index = rule;
                (*state).flags = ((*state).flags & !FLOW_AUDIT) | FLOW_CONFIRMED | audit;
            }
        }
        (None, Some((rule, audit))) => {
            let mut flags = FLOW_EGRESS | FLOW_DEFERRED | FLOW_CONFIRMED | audit;
            if flow.src_is_a {
                flags |= FLOW_INITIATOR_A;
            }
            let state = FlowState {
                last_seen_ns: now,
                revision: endpoint.revision,
                ipcache_generation: settings.ipcache_generation,
                rule_index: rule,
                flags,
                tcp_state: CT_STATE_NEW,
                nat_port: seen.backend_port,
                nat_addr: seen.backend,
                slot: endpoint.endpoint_id,
                _pad: 0,
                created_ns: now,
            };
            flow::insert(&flow.key, &state);
        }
        (Some(state), None) => {
            // Revoked or never allowed: replies are no longer admitted either.
            // SAFETY: a live map value for this program run.
            unsafe { (*state).flags &= !FLOW_CONFIRMED };
        }
        (None, None) => {}
    }
    let outcome = Outcome { judgement, identity, fresh: true };
    let original_dst = if translated { Some((&original.dst, original.dst_port)) } else { None };
    account(&outcome, ifindex, DIRECTION_EGRESS, EndpointTag::of(endpoint), &packet, bytes, HOOK_NETFILTER, original_dst);
    match judgement {
        Judgement::Denied { .. } => NF_DROP,
        _ => NF_ACCEPT,
    }
}
