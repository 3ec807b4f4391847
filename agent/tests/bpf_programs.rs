//! The real eBPF programs, loaded into this kernel and run with `BPF_PROG_TEST_RUN` on crafted
//! packets (needs root). Nothing is attached and nothing is sent: the kernel runs the TC
//! programs on an skb built from the frame as if it were on loopback (ifindex 1), and the
//! netfilter program on an IP packet with no conntrack entry, as if it entered by ifindex 0.
use aya::Ebpf;
use aya::maps::{HashMap as AyaHashMap, MapData, PerCpuArray, RingBuf};
use netsieve::dataplane::compile::{
    DirectionEntries, DirectionInput, PeerInput, PortSetInput, RuleInput, RuleOrigin, compile_direction,
};
use netsieve::dataplane::kernel::{self, PROGRAM_FROM_POD, PROGRAM_TO_POD};
use netsieve::dataplane::lpm::{CidrSet, addr_bytes, to_mapped};
use netsieve::dataplane::maps::KernelMaps;
use netsieve::dataplane::netfilter::{self, NetfilterProgram, TEST_HOOK_POST_ROUTING};
use netsieve::dataplane::node::{IdentityAllocator, compile_node};
use netsieve::dataplane::conntrack::flow_key;
use netsieve::dataplane::packet::{Fragment, L4, PacketSpec, TCP_ACK, TCP_FIN, TCP_SYN, arp_frame};
use netsieve::dataplane::sync::{Capacity, EndpointProgram, NodeProgram, PolicyMaps, Synchronizer};
use netsieve::dataplane::testrun::{RETURN_DROP, RETURN_PASS, run_classifier_from};
use netsieve::policy::{ClusterState, Direction, Flow, FlowEndpoint, PodInfo, Protocol, evaluate_direction};
use netsieve_tests::scenario::{INTERESTING_PORTS, Scenario, ScenarioParams};
use netsieve_common::{
    CONFIG_EGRESS_ENFORCED, CONFIG_EVENTS_ALLOWED, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, DIRECTION_EGRESS, DIRECTION_INGRESS,
    CACHED_DENIAL, CACHED_FLOW, CACHED_NEW_FLOW, CT_STATE_NEW, FLOW_DEFERRED, FLOW_CACHE_SLOTS, NO_FLOW_EPOCH, FlowCacheEntry, FlowKey, FlowState, CONFIG_NETFILTER_ACTIVE, EVENTS_EMITTED, EVENTS_RATE_LIMITED, IpcacheValue, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, REASON_FAIL_CLOSED, REASON_FRAGMENT_UNKNOWN, REASON_MALFORMED, REASON_NO_ENDPOINT,
    REASON_POLICY_DENIED, REASON_SPOOFED, VERDICT_ALLOWED, VERDICT_AUDIT, VERDICT_DROPPED, VerdictEvent,
};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Loopback: BPF_PROG_TEST_RUN gives the skb this device when the context names ifindex 1.
const LO: u32 = 1;
/// The interface the netfilter test runner's skb claims to have entered by.
const NF_IFINDEX: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_DROP: u32 = 0;

struct Loaded {
    ebpf: Ebpf,
    maps: KernelMaps,
    netfilter: NetfilterProgram,
    drops: PerCpuArray<MapData, u64>,
    audits: PerCpuArray<MapData, u64>,
    event_counters: PerCpuArray<MapData, u64>,
    events: RingBuf<MapData>,
}

fn load() -> Loaded {
    kernel::raise_memlock_rlimit();
    let loaded = kernel::load().expect("programs load (run as root)");
    let netfilter = loaded.netfilter.expect("the netfilter program loads on this kernel");
    let mut ebpf = loaded.ebpf;
    let maps = KernelMaps::take_from(&mut ebpf).expect("maps");
    let drops = PerCpuArray::try_from(ebpf.take_map("DROP_COUNTERS").expect("map")).expect("type");
    let audits = PerCpuArray::try_from(ebpf.take_map("AUDIT_COUNTERS").expect("map")).expect("type");
    let event_counters = PerCpuArray::try_from(ebpf.take_map("EVENT_COUNTERS").expect("map")).expect("type");
    let events = RingBuf::try_from(ebpf.take_map("EVENTS").expect("map")).expect("type");
    Loaded { ebpf, maps, netfilter, drops, audits, event_counters, events }
}

impl Loaded {
    fn run(&mut self, program: &'static str, frame: &[u8], ingress_ifindex: u32) -> u32 {
        let classifier = kernel::classifier(&mut self.ebpf, program).expect("program");
        run_classifier_from(classifier, frame, LO, ingress_ifindex, 1)
            .unwrap_or_else(|e| panic!("test run of {} bytes: {e}", frame.len()))
            .return_value
    }
    fn run_from_pod(&mut self, spec: &PacketSpec) -> u32 {
        self.run(PROGRAM_FROM_POD, &spec.frame(), 0)
    }
    fn run_to_pod(&mut self, spec: &PacketSpec) -> u32 {
        self.run(PROGRAM_TO_POD, &spec.frame(), 0)
    }
    /// The netfilter program on an un-NATed packet from the endpoint at `ENDPOINTS[0]`.
    fn netfilter(&self, spec: &PacketSpec) -> u32 {
        let ipv6 = spec.src.is_ipv6();
        netfilter::test_run(&self.netfilter, &spec.frame(), ipv6, TEST_HOOK_POST_ROUTING, 1).expect("netfilter test run").verdict
    }
    fn sum(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
        map.get(&index, 0).expect("counter").iter().sum()
    }
    fn drops(&self, reason: u32, direction: u8) -> u64 {
        Self::sum(&self.drops, reason * 2 + direction as u32)
    }
    fn audits(&self, reason: u32, direction: u8) -> u64 {
        Self::sum(&self.audits, reason * 2 + direction as u32)
    }
    fn event_counter(&self, index: u32) -> u64 {
        Self::sum(&self.event_counters, index)
    }
    fn drain_events(&mut self) -> Vec<VerdictEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            assert_eq!(item.len(), std::mem::size_of::<VerdictEvent>());
            // SAFETY: the programs write whole VerdictEvents; read_unaligned copies it out.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) });
        }
        out
    }
    /// Installs one endpoint on loopback (and, for the netfilter program, at ifindex 0)
    /// through the synchronizer.
    fn program_lo(&mut self, sync: &mut Synchronizer, program: EndpointProgram, ipcache: &[(&str, u32)]) {
        let mut node = NodeProgram::default();
        for (ip, identity) in ipcache {
            let ip: IpAddr = ip.parse().expect("ip");
            node.ipcache.insert(to_mapped(ip.into()), IpcacheValue { identity: *identity, flags: 0 });
        }
        node.endpoints.insert("test/pod".into(), EndpointProgram { ifindex: LO, ..program });
        sync.sync(&mut self.maps, &node).expect("sync");
        let info = self.maps.endpoints.get(&LO, 0).expect("endpoint");
        self.maps.set_endpoint(NF_IFINDEX, info).expect("endpoint for the netfilter runner");
    }
    /// Writes the agent's settings; `CONFIG_EGRESS_ENFORCED` stays as the synchronizer left it.
    fn settings(&mut self, flags: u32, events_per_second: u32, burst: u32) {
        let enforced = self.maps.config().flags & CONFIG_EGRESS_ENFORCED;
        self.maps.set_settings(flags | enforced, events_per_second, burst).expect("settings");
    }
    /// The flow cache map, to read what the programs left in it.
    fn take_flow_cache(&mut self) -> PerCpuArray<MapData, FlowCacheEntry> {
        PerCpuArray::try_from(self.ebpf.take_map("FLOW_CACHE").expect("FLOW_CACHE")).expect("type")
    }
    /// The conntrack table.
    fn take_conntrack(&mut self) -> AyaHashMap<MapData, FlowKey, FlowState> {
        AyaHashMap::try_from(self.ebpf.take_map("CONNTRACK").expect("CONNTRACK")).expect("type")
    }
}

/// The live entries of every CPU's flow cache that `keep` selects, by CPU.
fn cache_entries_by_cpu(cache: &PerCpuArray<MapData, FlowCacheEntry>, keep: impl Fn(&FlowCacheEntry) -> bool) -> Vec<Vec<FlowCacheEntry>> {
    let mut by_cpu: Vec<Vec<FlowCacheEntry>> = Vec::new();
    for slot in 0..FLOW_CACHE_SLOTS {
        for (cpu, entry) in cache.get(&slot, 0).expect("cache slot").iter().enumerate() {
            if by_cpu.len() <= cpu {
                by_cpu.resize(cpu + 1, Vec::new());
            }
            if entry.fresh_until_ns != 0 && keep(entry) {
                by_cpu[cpu].push(*entry);
            }
        }
    }
    by_cpu
}

/// Whether a cache entry's flow has `port` at either end.
fn has_port(entry: &FlowCacheEntry, port: u16) -> bool {
    entry.key.port_a == port || entry.key.port_b == port
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn tcp(src: &str, dst: &str, src_port: u16, dst_port: u16, flags: u8) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), L4::Tcp { src_port, dst_port, flags })
}

fn udp(src: &str, dst: &str, src_port: u16, dst_port: u16) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), L4::Udp { src_port, dst_port })
}

fn origin(rule_index: usize) -> RuleOrigin {
    RuleOrigin { policy: "test/policy".into(), rule_index }
}

fn isolated(rules: Vec<RuleInput>) -> DirectionEntries {
    compile_direction(&DirectionInput { isolated: true, rules }).expect("compiles")
}

fn ranges(list: &[(u8, u16, u16)]) -> PortSetInput {
    PortSetInput::Ranges(list.iter().copied().collect())
}

/// The endpoint under test: 10.0.0.1 / fd00::1.
/// An isolated direction whose one rule admits `identity` on `protocol`/`port`.
fn allow(identity: u32, protocol: u8, port: u16) -> DirectionEntries {
    isolated(vec![RuleInput { peers: vec![PeerInput::Identities([identity].into())], ports: ranges(&[(protocol, port, port)]), origin: origin(0) }])
}

fn pod(ingress: DirectionEntries, egress: DirectionEntries) -> EndpointProgram {
    EndpointProgram {
        identity: 400,
        allow_host: true,
        ipv4: Some(Ipv4Addr::new(10, 0, 0, 1)),
        ipv6: Some("fd00::1".parse::<Ipv6Addr>().expect("ip")),
        ingress,
        egress,
        ..Default::default()
    }
}

#[test]
fn verdicts_counters_conntrack_and_fragments() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());

    // Not programmed: fail closed, counted; ARP passes regardless.
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40000, 80, TCP_SYN)), RETURN_DROP);
    assert_eq!(k.drops(REASON_NO_ENDPOINT, 0), 1);
    assert_eq!(k.run(PROGRAM_TO_POD, &arp_frame(), 0), RETURN_PASS);

    // Ingress: identity 300 on TCP 80, 10.0.0.0/8 except 10.1.0.0/16 on UDP 53,
    // fd00::/64 on SCTP 1000-2000 (a large range: longest-prefix match), everything from
    // identity 301 (ICMP too).
    let ingress = isolated(vec![
        RuleInput { peers: vec![PeerInput::Identities([300].into())], ports: ranges(&[(PROTO_TCP, 80, 80)]), origin: origin(0) },
        RuleInput {
            peers: vec![PeerInput::Cidr(CidrSet {
                net: to_mapped("10.0.0.0/8".parse().expect("cidr")),
                except: vec![to_mapped("10.1.0.0/16".parse().expect("cidr"))],
            })],
            ports: ranges(&[(PROTO_UDP, 53, 53)]),
            origin: origin(1),
        },
        RuleInput {
            peers: vec![PeerInput::Cidr(CidrSet { net: to_mapped("fd00::/64".parse().expect("cidr")), except: vec![] })],
            ports: ranges(&[(PROTO_SCTP, 1000, 2000)]),
            origin: origin(2),
        },
        RuleInput { peers: vec![PeerInput::Identities([301].into())], ports: PortSetInput::AllProtocols, origin: origin(3) },
    ]);
    k.program_lo(&mut sync, pod(ingress, DirectionEntries::default()), &[("10.0.0.2", 300), ("10.0.0.3", 302), ("10.0.0.4", 301), ("10.0.0.9", 1)]);

    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40001, 80, TCP_SYN)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40002, 81, TCP_SYN)), RETURN_DROP);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 40003, 80, TCP_SYN)), RETURN_DROP);
    assert_eq!(k.run_to_pod(&udp("10.0.0.3", "10.0.0.1", 5353, 53)), RETURN_PASS, "CIDR rule admits any pod in the block");
    assert_eq!(k.run_to_pod(&udp("10.1.2.3", "10.0.0.1", 5353, 53)), RETURN_DROP, "except hole");
    assert_eq!(k.run_to_pod(&udp("10.2.2.3", "10.0.0.1", 5353, 54)), RETURN_DROP);
    assert_eq!(k.run_to_pod(&udp("10.2.2.3", "10.0.0.1", 5353, 53)), RETURN_PASS);
    let sctp = |port: u16| PacketSpec::new(ip("fd00::5"), ip("fd00::1"), L4::Sctp { src_port: 9, dst_port: port });
    assert_eq!(k.run_to_pod(&sctp(999)), RETURN_DROP);
    assert_eq!(k.run_to_pod(&sctp(1000)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&sctp(2000)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&sctp(2001)), RETURN_DROP);
    let ping = |src: &str, id: u16| PacketSpec::new(ip(src), ip("10.0.0.1"), L4::Icmp { icmp_type: 8, code: 0, id });
    assert_eq!(k.run_to_pod(&ping("10.0.0.4", 7)), RETURN_PASS, "all-protocols rule admits ICMP");
    assert_eq!(k.run_to_pod(&ping("10.0.0.2", 8)), RETURN_DROP, "ICMP never matches a port rule");
    // The node's own address (identity host) is allowed with allow_host.
    assert_eq!(k.run_to_pod(&tcp("10.0.0.9", "10.0.0.1", 40004, 9999, TCP_SYN)), RETURN_PASS);
    // IPv6 neighbour discovery always passes.
    let ns = PacketSpec::new(ip("fe80::2"), ip("ff02::1:ff00:1"), L4::Icmp { icmp_type: 135, code: 0, id: 0 });
    assert_eq!(k.run_to_pod(&ns), RETURN_PASS);

    // Egress is not isolated: the pod's SYN to anyone passes and is recorded; the reply (on
    // the to-pod hook) passes although ingress policy would deny it; an unrelated packet from
    // the same peer does not.
    assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.3", 45000, 443, TCP_SYN)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 443, 45000, TCP_SYN | TCP_ACK)), RETURN_PASS, "reply");
    assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 443, 45001, TCP_SYN | TCP_ACK)), RETURN_DROP);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 444, 45000, TCP_ACK)), RETURN_DROP);
    // A SYN from the peer is a new connection, never a reply, whatever conntrack holds.
    assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 443, 45000, TCP_SYN)), RETURN_DROP);

    // Malformed: IPv4 and IPv6 packets cut inside the TCP header (their length fields then
    // point past the frame). A frame cut inside the IP header itself is refused by
    // BPF_PROG_TEST_RUN before the program runs, so it cannot be tested this way.
    let before = k.drops(REASON_MALFORMED, 0);
    for spec in [tcp("10.0.0.2", "10.0.0.1", 40005, 80, TCP_SYN), tcp("fd00::5", "fd00::1", 40005, 80, TCP_SYN)] {
        let mut cut = spec;
        cut.payload_len = 0;
        let frame = cut.frame();
        let header = if cut.src.is_ipv4() { 20 } else { 40 };
        assert_eq!(k.run(PROGRAM_TO_POD, &frame[..14 + header + 10], 0), RETURN_DROP);
    }
    assert_eq!(k.drops(REASON_MALFORMED, 0), before + 2);

    // Fragments: a later fragment with no first is dropped and counted; after an allowed
    // first fragment, its later fragments pass; after a denied first, they are denied.
    let mut later = tcp("10.0.0.2", "10.0.0.1", 40006, 80, 0);
    later.fragment = Fragment::Later { id: 77, offset_units: 3 };
    assert_eq!(k.run_to_pod(&later), RETURN_DROP);
    assert_eq!(k.drops(REASON_FRAGMENT_UNKNOWN, 0), 1);
    let mut first = tcp("10.0.0.2", "10.0.0.1", 40006, 80, TCP_SYN);
    first.fragment = Fragment::First { id: 77 };
    assert_eq!(k.run_to_pod(&first), RETURN_PASS);
    assert_eq!(k.run_to_pod(&later), RETURN_PASS);
    let mut denied_first = tcp("10.0.0.3", "10.0.0.1", 40007, 80, TCP_SYN);
    denied_first.fragment = Fragment::First { id: 78 };
    let mut denied_later = denied_first.clone();
    denied_later.fragment = Fragment::Later { id: 78, offset_units: 3 };
    assert_eq!(k.run_to_pod(&denied_first), RETURN_DROP);
    assert_eq!(k.run_to_pod(&denied_later), RETURN_DROP);
    // IPv6 with a hop-by-hop header and a fragment header.
    let mut v6 = sctp(1500);
    v6.ipv6_hop_by_hop = true;
    v6.fragment = Fragment::First { id: 9 };
    assert_eq!(k.run_to_pod(&v6), RETURN_PASS);
    let mut v6_later = v6.clone();
    v6_later.fragment = Fragment::Later { id: 9, offset_units: 2 };
    assert_eq!(k.run_to_pod(&v6_later), RETURN_PASS);

    // Fail-closed endpoints drop everything but host traffic, counted apart.
    let failed = EndpointProgram { fail_closed: true, ..pod(DirectionEntries::default(), DirectionEntries::default()) };
    k.program_lo(&mut sync, failed, &[("10.0.0.2", 300), ("10.0.0.9", 1)]);
    assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.2", 45002, 80, TCP_SYN)), RETURN_DROP);
    assert_eq!(k.drops(REASON_FAIL_CLOSED, 1), 1);
    assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.9", 45003, 10250, TCP_SYN)), RETURN_PASS);

    // Per-endpoint statistics moved (the slot of the current programming).
    let slot = k.maps.endpoints.get(&LO, 0).expect("endpoint").endpoint_id;
    let stats = k.maps.endpoint_stats(slot).expect("stats");
    assert_eq!(stats.denied_packets[1], 1, "{stats:?}");
    assert_eq!(stats.allowed_packets[1], 1, "{stats:?}");
    assert!(k.drops(REASON_POLICY_DENIED, 0) >= 10);
}

#[test]
fn pod_interfaces_drop_spoofed_sources() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    // No policy at all: spoofing is dropped whatever the policies say.
    k.program_lo(&mut sync, pod(DirectionEntries::default(), DirectionEntries::default()), &[("10.0.0.2", 300)]);
    assert_eq!(k.run_from_pod(&udp("10.0.0.1", "10.0.0.2", 5000, 53)), RETURN_PASS, "own address");
    assert_eq!(k.run_from_pod(&udp("10.0.0.7", "10.0.0.2", 5000, 53)), RETURN_DROP, "another pod's address");
    assert_eq!(k.run_from_pod(&tcp("10.0.0.7", "10.0.0.2", 5001, 80, TCP_SYN)), RETURN_DROP, "spoofed SYN");
    assert_eq!(k.run_from_pod(&udp("fd00::1", "fd00::2", 5000, 53)), RETURN_PASS, "own IPv6 address");
    assert_eq!(k.run_from_pod(&udp("fd00::9", "fd00::2", 5000, 53)), RETURN_DROP, "foreign IPv6 address");
    assert_eq!(k.run_from_pod(&udp("fe80::1234", "fe80::1", 5000, 53)), RETURN_PASS, "link-local is the pod's own business");
    assert_eq!(k.drops(REASON_SPOOFED, 1), 3);
    // What the pod receives is not about its own source.
    assert_eq!(k.run_to_pod(&udp("10.0.0.7", "10.0.0.1", 5000, 53)), RETURN_PASS);
    let events = k.drain_events();
    assert!(events.is_empty(), "events are off by default");
    // With events on, a spoofed packet is reported under its reason.
    k.settings(0, 1000, 100);
    assert_eq!(k.run_from_pod(&udp("10.0.0.8", "10.0.0.2", 5002, 53)), RETURN_DROP);
    let events = k.drain_events();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].verdict, events[0].reason as u32, events[0].direction), (VERDICT_DROPPED, REASON_SPOOFED, 1));
    assert_eq!(&events[0].src[12..], &[10, 0, 0, 8]);
}

#[test]
fn established_flows_are_cut_when_their_rule_is_revoked_or_their_peer_relabelled() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &[("10.0.0.2", 300)]);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40001, 80, TCP_SYN)), RETURN_PASS);
    assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.2", 80, 40001, TCP_SYN | TCP_ACK)), RETURN_PASS, "reply");
    for _ in 0..3 {
        assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40001, 80, TCP_ACK)), RETURN_PASS, "established");
    }
    // The peer is relabelled (ipcache: another identity): its flow is cut at the next packet,
    // in both directions.
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &[("10.0.0.2", 305)]);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40001, 80, TCP_ACK)), RETURN_DROP, "relabelled peer");
    assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.2", 80, 40001, TCP_ACK)), RETURN_PASS, "egress is not isolated");
    // Back, then the rule is revoked: cut again.
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &[("10.0.0.2", 300)]);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40002, 80, TCP_SYN)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40002, 80, TCP_ACK)), RETURN_PASS);
    k.program_lo(&mut sync, pod(isolated(vec![]), DirectionEntries::default()), &[("10.0.0.2", 300)]);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40002, 80, TCP_ACK)), RETURN_DROP, "revoked rule");
    // Replies of a flow whose egress is revoked are cut too.
    let egress_to_300 = allow(300, PROTO_UDP, 53);
    k.program_lo(&mut sync, pod(DirectionEntries { isolated: true, ..Default::default() }, egress_to_300), &[("10.0.0.2", 300)]);
    assert_eq!(k.run_from_pod(&udp("10.0.0.1", "10.0.0.2", 7000, 53)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&udp("10.0.0.2", "10.0.0.1", 53, 7000)), RETURN_PASS, "reply admitted");
    k.program_lo(&mut sync, pod(DirectionEntries { isolated: true, ..Default::default() }, isolated(vec![])), &[("10.0.0.2", 300)]);
    assert_eq!(k.run_to_pod(&udp("10.0.0.2", "10.0.0.1", 53, 7000)), RETURN_DROP, "reply of a revoked flow");
}

/// The flow cache (a per-CPU memory of what conntrack gave a busy flow's packets) is used, and
/// never decides differently from conntrack: a spoofed packet on the flow's ports, a FIN (which
/// conntrack must see), a revoked rule and a relabelled peer all find it stale or missed.
#[test]
fn busy_flows_ride_the_flow_cache_and_lose_it_on_every_change() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    let cache = k.take_flow_cache();
    let conntrack = k.take_conntrack();
    let cached = |direction: u8, src_port: u16| -> Vec<FlowCacheEntry> {
        cache_entries_by_cpu(&cache, |e| e.kind == CACHED_FLOW && e.direction == direction && has_port(e, src_port)).concat()
    };
    let peer = ("10.0.0.2", 300);
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &[peer]);
    // The peer's connection from `port` to the pod's port 80: SYN, the pod's SYN-ACK, then
    // three ACKs each way, the later ones served by the cache.
    let open_busy_flow = |k: &mut Loaded, port: u16| {
        assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", port, 80, TCP_SYN)), RETURN_PASS);
        assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.2", 80, port, TCP_SYN | TCP_ACK)), RETURN_PASS);
        for _ in 0..3 {
            assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", port, 80, TCP_ACK)), RETURN_PASS);
            assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.2", 80, port, TCP_ACK)), RETURN_PASS);
        }
    };

    // Half-open, a flow is not cached; busy, it is.
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 41000, 80, TCP_SYN)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 41000, 80, TCP_ACK)), RETURN_PASS);
    assert!(cached(DIRECTION_INGRESS, 41000).is_empty(), "a flow conntrack holds as half-open is not cached");
    open_busy_flow(&mut k, 41001);
    let forward = cached(DIRECTION_INGRESS, 41001);
    assert!(!forward.is_empty(), "the established flow's forward packets are cached");
    assert!(forward.iter().all(|e| e.audit == 0 && e.rule_index != u32::MAX), "cached as allowed by its rule: {forward:?}");
    assert!(!cached(DIRECTION_EGRESS, 41001).is_empty(), "and its replies");

    // The peer's address as the source on the pod's own hook is spoofing, whatever the cache
    // holds for the same ports the other way.
    let spoofed_before = k.drops(REASON_SPOOFED, DIRECTION_EGRESS);
    assert_eq!(k.run_from_pod(&tcp("10.0.0.2", "10.0.0.1", 41001, 80, TCP_ACK)), RETURN_DROP);
    assert_eq!(k.drops(REASON_SPOOFED, DIRECTION_EGRESS), spoofed_before + 1);

    // A FIN goes to conntrack (the entry starts closing) although the flow is cached.
    let key = flow_key(LO, PROTO_TCP, &addr_bytes(ip("10.0.0.2")), 41001, &addr_bytes(ip("10.0.0.1")), 80);
    assert_eq!(conntrack.get(&key, 0).expect("entry").tcp_state, CT_STATE_ESTABLISHED);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 41001, 80, TCP_FIN | TCP_ACK)), RETURN_PASS);
    assert_eq!(conntrack.get(&key, 0).expect("entry").tcp_state, CT_STATE_CLOSING);

    // A second flow, cached, then the rule is revoked: cut at the next packet.
    open_busy_flow(&mut k, 41002);
    assert!(!cached(DIRECTION_INGRESS, 41002).is_empty());
    k.program_lo(&mut sync, pod(isolated(vec![]), DirectionEntries::default()), &[peer]);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 41002, 80, TCP_ACK)), RETURN_DROP, "revoked rule, cached flow");

    // A third, cached, then the peer is relabelled: cut at the next packet.
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &[peer]);
    open_busy_flow(&mut k, 41003);
    assert!(!cached(DIRECTION_INGRESS, 41003).is_empty());
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &[("10.0.0.2", 305)]);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 41003, 80, TCP_ACK)), RETURN_DROP, "relabelled peer, cached flow");

    // An egress UDP flow and its replies, cached, then the egress rule is revoked: the replies
    // are cut too.
    let egress_to_300 = allow(300, PROTO_UDP, 53);
    let ingress_isolated = || DirectionEntries { isolated: true, ..Default::default() };
    k.program_lo(&mut sync, pod(ingress_isolated(), egress_to_300), &[peer]);
    for _ in 0..3 {
        assert_eq!(k.run_from_pod(&udp("10.0.0.1", "10.0.0.2", 7001, 53)), RETURN_PASS);
        assert_eq!(k.run_to_pod(&udp("10.0.0.2", "10.0.0.1", 53, 7001)), RETURN_PASS, "reply admitted");
    }
    assert!(!cached(DIRECTION_INGRESS, 7001).is_empty(), "the replies are cached");
    k.program_lo(&mut sync, pod(ingress_isolated(), isolated(vec![])), &[peer]);
    assert_eq!(k.run_to_pod(&udp("10.0.0.2", "10.0.0.1", 53, 7001)), RETURN_DROP, "cached reply of a revoked flow");
    assert_eq!(k.run_from_pod(&udp("10.0.0.1", "10.0.0.2", 7001, 53)), RETURN_DROP, "cached packet of a revoked flow");
}

#[test]
fn repeated_denials_ride_the_flow_cache_and_yield_to_conntrack_and_policy_changes() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    let cache = k.take_flow_cache();
    // The denials every CPU's cache holds for the flow with source port `src_port`.
    let denials = |direction: u8, src_port: u16| -> Vec<FlowCacheEntry> {
        cache_entries_by_cpu(&cache, |e| e.kind == CACHED_DENIAL && e.direction == direction && has_port(e, src_port)).concat()
    };
    let peers = [("10.0.0.2", 300), ("10.0.0.3", 301)];
    // Ingress admits identity 300 on TCP 80; egress is open.
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &peers);
    k.settings(0, 1000, 1000);

    // A denied peer's UDP packets: every one dropped, counted and reported; the denial is cached
    // with conntrack looked up (no entry).
    let dropped_before = k.drops(REASON_POLICY_DENIED, DIRECTION_INGRESS);
    k.drain_events();
    for _ in 0..5 {
        assert_eq!(k.run_to_pod(&udp("10.0.0.3", "10.0.0.1", 5353, 53)), RETURN_DROP);
    }
    assert_eq!(k.drops(REASON_POLICY_DENIED, DIRECTION_INGRESS), dropped_before + 5, "cached denials are counted");
    let events = k.drain_events();
    assert_eq!(events.len(), 5, "and reported (events on, tokens left)");
    assert!(events.iter().all(|e| e.verdict == VERDICT_DROPPED && e.reason as u32 == REASON_POLICY_DENIED && e.peer_identity == 301), "{events:?}");
    let cached = denials(DIRECTION_INGRESS, 5353);
    assert!(!cached.is_empty(), "the denial is cached");
    assert!(cached.iter().all(|e| e.flow_epoch != NO_FLOW_EPOCH && e.peer_identity == 301), "{cached:?}");
    // The pod then sends to the peer from port 53: conntrack records that flow, and the peer's
    // packets are its replies, admitted at once whatever the cache held.
    assert_eq!(k.run_from_pod(&udp("10.0.0.1", "10.0.0.3", 53, 5353)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&udp("10.0.0.3", "10.0.0.1", 5353, 53)), RETURN_PASS, "a reply, although its denial was cached");

    // A TCP SYN's denial (taken without conntrack) stands for SYNs only: the peer's SYN on the
    // port pair of a connection the pod opened is denied, the connection's replies are not.
    assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.3", 81, 6000, TCP_SYN)), RETURN_PASS);
    for _ in 0..3 {
        assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 6000, 81, TCP_SYN)), RETURN_DROP);
    }
    assert!(denials(DIRECTION_INGRESS, 6000).iter().any(|e| e.flow_epoch == NO_FLOW_EPOCH), "a SYN's denial is cached");
    // SYNs from a new source port each (a SYN flood) take that one cached denial: no CPU's
    // cache holds a second SYN denial from the peer to port 81.
    let syn_denials_per_cpu = || -> Vec<usize> {
        let syn_denial = |e: &FlowCacheEntry| e.kind == CACHED_DENIAL && e.flow_epoch == NO_FLOW_EPOCH && has_port(e, 81);
        cache_entries_by_cpu(&cache, syn_denial).iter().map(Vec::len).collect()
    };
    let dropped_before = k.drops(REASON_POLICY_DENIED, DIRECTION_INGRESS);
    for source_port in 6100..6120 {
        assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", source_port, 81, TCP_SYN)), RETURN_DROP);
    }
    assert_eq!(k.drops(REASON_POLICY_DENIED, DIRECTION_INGRESS), dropped_before + 20);
    assert!(syn_denials_per_cpu().iter().all(|&n| n <= 1), "one cached SYN denial per CPU: {:?}", syn_denials_per_cpu());
    assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 6000, 81, TCP_SYN | TCP_ACK)), RETURN_PASS, "the connection's reply");
    assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 6000, 81, TCP_ACK)), RETURN_PASS);

    // A cached denial yields to a policy change at the next packet...
    for _ in 0..3 {
        assert_eq!(k.run_to_pod(&udp("10.0.0.3", "10.0.0.1", 7000, 53)), RETURN_DROP);
    }
    assert!(!denials(DIRECTION_INGRESS, 7000).is_empty());
    k.program_lo(&mut sync, pod(allow(301, PROTO_UDP, 53), DirectionEntries::default()), &peers);
    assert_eq!(k.run_to_pod(&udp("10.0.0.3", "10.0.0.1", 7000, 53)), RETURN_PASS, "admitted by the new rule");
    // ... and to the peer's relabelling.
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &peers);
    for _ in 0..3 {
        assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 7001, 80, TCP_SYN)), RETURN_DROP);
    }
    assert!(!denials(DIRECTION_INGRESS, 7001).is_empty());
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &[("10.0.0.3", 300)]);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 7001, 80, TCP_SYN)), RETURN_PASS, "the peer now has an admitted identity");

    // An egress packet to an unknown address, judged and denied while nothing defers it, is
    // deferred to the netfilter hook once deferral is on (a cached denial does not outlive it).
    k.program_lo(&mut sync, pod(DirectionEntries::default(), allow(300, PROTO_UDP, 53)), &peers);
    for _ in 0..3 {
        assert_eq!(k.run_from_pod(&udp("10.0.0.1", "192.0.2.1", 9000, 53)), RETURN_DROP);
    }
    assert!(!denials(DIRECTION_EGRESS, 9000).is_empty());
    k.settings(CONFIG_NETFILTER_ACTIVE | CONFIG_EGRESS_ENFORCED, 1000, 1000);
    assert_eq!(k.run_from_pod(&udp("10.0.0.1", "192.0.2.1", 9000, 53)), RETURN_PASS, "deferred to the netfilter hook");
}

#[test]
fn new_connections_open_from_the_flow_cache_as_the_full_path_opens_them() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    let cache = k.take_flow_cache();
    let conntrack = k.take_conntrack();
    // Admitted SYNs cached per CPU for connections to the pod's `port`.
    let admitted_per_cpu = |port: u16| -> Vec<usize> {
        cache_entries_by_cpu(&cache, |e| e.kind == CACHED_NEW_FLOW && has_port(e, port)).iter().map(Vec::len).collect()
    };
    let entry = |src: &str, src_port: u16, dst: &str, dst_port: u16| {
        conntrack.get(&flow_key(LO, PROTO_TCP, &addr_bytes(ip(src)), src_port, &addr_bytes(ip(dst)), dst_port), 0).ok()
    };
    let peers = [("10.0.0.2", 300)];
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &peers);
    k.settings(CONFIG_EVENTS_ALLOWED, 1000, 1000);
    k.drain_events();

    // Twenty connections from new source ports: the first SYN is judged, the others open their
    // flow from its cached admission. Every entry is the one the full path wrote for the first.
    for source_port in 42000..42020 {
        assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", source_port, 80, TCP_SYN)), RETURN_PASS);
    }
    assert!(admitted_per_cpu(80).iter().all(|&n| n <= 1), "one cached admission per CPU: {:?}", admitted_per_cpu(80));
    assert!(admitted_per_cpu(80).iter().sum::<usize>() >= 1, "the admission is cached");
    let first = entry("10.0.0.2", 42000, "10.0.0.1", 80).expect("the first connection's entry");
    assert_eq!(first.tcp_state, CT_STATE_NEW);
    for source_port in 42001..42020 {
        let e = entry("10.0.0.2", source_port, "10.0.0.1", 80).expect("an entry for every connection");
        let same = (e.revision, e.slot, e.ipcache_generation, e.rule_index, e.flags, e.tcp_state, e.nat_port, e.nat_addr);
        let full_path = (first.revision, first.slot, first.ipcache_generation, first.rule_index, first.flags, first.tcp_state, first.nat_port, first.nat_addr);
        assert_eq!(same, full_path, "connection from port {source_port}");
    }
    let events = k.drain_events();
    assert_eq!(events.len(), 20, "one allowed event per connection");
    assert!(events.iter().all(|e| e.verdict == VERDICT_ALLOWED && e.peer_identity == 300 && e.rule_index == first.rule_index));
    // Their replies are admitted (the entries are real), and they become established.
    assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.2", 80, 42019, TCP_SYN | TCP_ACK)), RETURN_PASS);
    assert_eq!(entry("10.0.0.2", 42019, "10.0.0.1", 80).expect("entry").tcp_state, CT_STATE_ESTABLISHED);

    // The rule revoked: the next SYN is judged afresh and dropped.
    k.program_lo(&mut sync, pod(isolated(vec![]), DirectionEntries::default()), &peers);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 42100, 80, TCP_SYN)), RETURN_DROP, "revoked rule");
    // Admitted again and cached, then the peer relabelled: dropped.
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &peers);
    for source_port in 42200..42203 {
        assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", source_port, 80, TCP_SYN)), RETURN_PASS);
    }
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &[("10.0.0.2", 305)]);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 42203, 80, TCP_SYN)), RETURN_DROP, "relabelled peer");

    // A SYN to the pod for an address that is not the pod's is judged and passed but not
    // recorded, from the cache too.
    k.program_lo(&mut sync, pod(allow(300, PROTO_TCP, 80), DirectionEntries::default()), &peers);
    for source_port in 42300..42303 {
        assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.99", source_port, 80, TCP_SYN)), RETURN_PASS);
        assert!(entry("10.0.0.2", source_port, "10.0.0.99", 80).is_none(), "not recorded");
    }
    // An egress connection to an unknown address admitted while nothing defers it is deferred
    // to the netfilter hook once deferral is on.
    let egress_world = isolated(vec![RuleInput { peers: vec![PeerInput::AnyAddress], ports: ranges(&[(PROTO_TCP, 443, 443)]), origin: origin(0) }]);
    k.program_lo(&mut sync, pod(DirectionEntries::default(), egress_world), &peers);
    k.settings(0, 1000, 1000);
    for source_port in 42400..42403 {
        assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "192.0.2.1", source_port, 443, TCP_SYN)), RETURN_PASS);
    }
    k.settings(CONFIG_NETFILTER_ACTIVE | CONFIG_EGRESS_ENFORCED, 1000, 1000);
    assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "192.0.2.1", 42403, 443, TCP_SYN)), RETURN_PASS);
    let deferred = entry("10.0.0.1", 42403, "192.0.2.1", 443).expect("recorded");
    assert_ne!(deferred.flags & FLOW_DEFERRED, 0, "deferred, not opened from the cached admission: {:#x}", deferred.flags);
}

#[test]
fn hairpin_and_self_traffic_are_always_allowed() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    let deny_all = || DirectionEntries { isolated: true, ..Default::default() };
    k.program_lo(&mut sync, pod(deny_all(), deny_all()), &[("10.0.0.9", 1), ("10.0.0.2", 300)]);
    // The pod reaching itself through its Service comes back out of its own interface with a
    // masqueraded source: allowed.
    let hairpin = tcp("172.31.0.1", "10.0.0.1", 40000, 8080, TCP_SYN).frame();
    assert_eq!(k.run(PROGRAM_TO_POD, &hairpin, LO), RETURN_PASS);
    assert_eq!(k.run(PROGRAM_TO_POD, &hairpin, 77), RETURN_DROP, "the same packet from elsewhere");
    assert_eq!(k.run(PROGRAM_TO_POD, &hairpin, 77), RETURN_DROP, "again (its denial cached)");
    assert_eq!(k.run(PROGRAM_TO_POD, &hairpin, LO), RETURN_PASS, "hairpin traffic never takes a cached denial");
    // The netfilter hook sees the pod's packet to itself after DNAT: allowed.
    assert_eq!(k.netfilter(&tcp("10.0.0.1", "10.0.0.1", 40000, 8080, TCP_SYN)), NF_ACCEPT);
    assert_eq!(k.netfilter(&tcp("10.0.0.1", "10.0.0.2", 40000, 8080, TCP_SYN)), NF_DROP);
}

#[test]
fn audit_mode_passes_counts_and_reports() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    let deny_all = || DirectionEntries { isolated: true, ..Default::default() };
    k.settings(0, 1000, 100);
    let audited = EndpointProgram { audit: true, ..pod(deny_all(), deny_all()) };
    k.program_lo(&mut sync, audited, &[("10.0.0.2", 300)]);
    for sport in 0..3u16 {
        assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 41000 + sport, 80, TCP_SYN)), RETURN_PASS);
        assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 41000 + sport, 80, TCP_ACK)), RETURN_PASS);
    }
    assert_eq!(k.audits(REASON_POLICY_DENIED, 0), 6, "every would-be drop is counted");
    assert_eq!(k.drops(REASON_POLICY_DENIED, 0), 0);
    let events = k.drain_events();
    assert_eq!(events.len(), 3, "one audit event per flow");
    assert!(events.iter().all(|e| e.verdict == VERDICT_AUDIT && e.reason as u32 == REASON_POLICY_DENIED));
    // Audit never excuses spoofing.
    assert_eq!(k.run_from_pod(&udp("10.0.0.7", "10.0.0.2", 5000, 53)), RETURN_DROP);
    // Enforcing again: the audited flow is cut at its next packet.
    k.program_lo(&mut sync, pod(deny_all(), deny_all()), &[("10.0.0.2", 300)]);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 41000, 80, TCP_ACK)), RETURN_DROP);
}

#[test]
fn events_are_rate_limited_per_cpu_and_counters_stay_exact() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    k.program_lo(&mut sync, pod(DirectionEntries { isolated: true, ..Default::default() }, DirectionEntries::default()), &[]);
    // A burst of 10 with a trickle of 1 per second: a flood of 500 drops yields about 10.
    k.settings(0, 1, 10);
    for sport in 0..500u16 {
        assert_eq!(k.run_to_pod(&udp("10.9.9.9", "10.0.0.1", 1000 + sport, 53)), RETURN_DROP);
    }
    let emitted = k.drain_events().len() as u64;
    assert!((10..=12).contains(&emitted), "{emitted} events");
    assert_eq!(k.drops(REASON_POLICY_DENIED, 0), 500, "counters are exact whatever happens to events");
    assert_eq!(k.event_counter(EVENTS_EMITTED), emitted);
    assert_eq!(k.event_counter(EVENTS_RATE_LIMITED), 500 - emitted, "every event not emitted is counted");
    // Allowed flows report only when asked to, once per flow.
    let allow_any = isolated(vec![RuleInput { peers: vec![PeerInput::AnyAddress], ports: PortSetInput::AllProtocols, origin: origin(0) }]);
    k.program_lo(&mut sync, pod(allow_any, DirectionEntries::default()), &[]);
    k.settings(CONFIG_EVENTS_ALLOWED, 1000, 1000);
    // The flood emptied the bucket; at 1000 per second it holds tokens again after 20 ms.
    std::thread::sleep(std::time::Duration::from_millis(20));
    for _ in 0..5 {
        assert_eq!(k.run_to_pod(&udp("10.9.9.9", "10.0.0.1", 999, 53)), RETURN_PASS);
    }
    let events = k.drain_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].verdict, VERDICT_ALLOWED);
    assert_ne!(events[0].rule_index, u32::MAX, "the admitting rule is named");
    // Per-rule counters count every packet of the flow.
    let stats = k.maps.rule_stats(events[0].rule_index).expect("rule stats");
    assert_eq!(stats.packets, 5);
}

/// The program skips the lookups that cannot change its answer (the CIDR trie when no CIDR
/// group admits the port or a lower group already matched, the port-range trie when no group
/// of it could admit the peer): the rule it names must still be the lowest matching group,
/// the one the userspace model and `netsieve explain` name.
#[test]
fn the_admitting_rule_is_the_lowest_matching_group_whichever_map_holds_it() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    let block = || vec![PeerInput::Cidr(CidrSet { net: to_mapped("10.0.0.0/24".parse().expect("cidr")), except: vec![] })];
    let entries = isolated(vec![
        RuleInput { peers: block(), ports: ranges(&[(PROTO_TCP, 80, 80)]), origin: origin(0) },
        RuleInput {
            peers: vec![PeerInput::Identities([300].into())],
            ports: ranges(&[(PROTO_TCP, 80, 80), (PROTO_TCP, 443, 443)]),
            origin: origin(1),
        },
        RuleInput { peers: vec![PeerInput::Identities([300].into())], ports: ranges(&[(PROTO_TCP, 1000, 2000)]), origin: origin(2) },
        RuleInput { peers: block(), ports: ranges(&[(PROTO_TCP, 1000, 2000)]), origin: origin(3) },
        RuleInput { peers: vec![PeerInput::Identities([301].into())], ports: PortSetInput::AllProtocols, origin: origin(4) },
        RuleInput { peers: vec![PeerInput::Identities([303].into())], ports: ranges(&[(PROTO_UDP, 3000, 4000)]), origin: origin(5) },
    ]);
    assert!(!entries.port_ranges.is_empty() && !entries.cidr.is_empty(), "both tries are in use");
    let ipcache = [("10.0.0.2", 300), ("10.0.0.3", 301), ("10.0.1.5", 302), ("10.0.1.6", 303)];
    k.program_lo(&mut sync, pod(entries.clone(), DirectionEntries::default()), &ipcache);
    let rule_base = k.maps.endpoints.get(&LO, 0).expect("endpoint").rule_base[0];
    k.settings(CONFIG_EVENTS_ALLOWED, 1000, 1000);
    let cases: [(&str, u32, u8, u16, Option<u32>); 10] = [
        // Identity matches group 1; the block's group 0 is lower: the trie must be walked.
        ("10.0.0.2", 300, PROTO_TCP, 80, Some(0)),
        // No CIDR group admits 443: the trie is skipped.
        ("10.0.0.2", 300, PROTO_TCP, 443, Some(1)),
        // A port of the range trie; the block's group 3 is above group 2.
        ("10.0.0.2", 300, PROTO_TCP, 1500, Some(2)),
        // Identity matches group 4 (every port); the block's group 3 is lower.
        ("10.0.0.3", 301, PROTO_TCP, 1500, Some(3)),
        ("10.0.0.3", 301, PROTO_TCP, 9, Some(4)),
        ("10.0.0.3", 301, PROTO_UDP, 3500, Some(4)),
        // In no block and no identity rule: nothing to look up after the identity.
        ("10.0.1.5", 302, PROTO_TCP, 80, None),
        ("10.0.1.5", 302, PROTO_TCP, 1500, None),
        // Only the UDP range admits identity 303.
        ("10.0.1.6", 303, PROTO_UDP, 3500, Some(5)),
        ("10.0.1.6", 303, PROTO_TCP, 3500, None),
    ];
    for (index, (src, identity, protocol, port, expected)) in cases.into_iter().enumerate() {
        let model = entries.matching_group(identity, ip(src), protocol, port);
        assert_eq!(model, expected, "model, case {index}");
        let source_port = 20_000 + index as u16;
        let spec =
            if protocol == PROTO_TCP { tcp(src, "10.0.0.1", source_port, port, TCP_SYN) } else { udp(src, "10.0.0.1", source_port, port) };
        k.drain_events();
        let verdict = k.run_to_pod(&spec);
        let events = k.drain_events();
        assert_eq!(events.len(), 1, "case {index}");
        match expected {
            Some(group) => {
                assert_eq!(verdict, RETURN_PASS, "case {index}");
                assert_eq!(events[0].verdict, VERDICT_ALLOWED, "case {index}");
                assert_eq!(events[0].rule_index, rule_base + group, "case {index}: the lowest matching group is named");
            }
            None => {
                assert_eq!(verdict, RETURN_DROP, "case {index}");
                assert_eq!(events[0].verdict, VERDICT_DROPPED, "case {index}");
            }
        }
    }
}

#[test]
fn deferred_egress_is_judged_by_the_netfilter_program_on_the_backend() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    k.settings(CONFIG_NETFILTER_ACTIVE, 0, 0);
    // Egress allowed to identity 300 on UDP 53 only.
    let egress = isolated(vec![RuleInput {
        peers: vec![PeerInput::Identities([300].into())],
        ports: ranges(&[(PROTO_UDP, 53, 53)]),
        origin: origin(0),
    }]);
    k.program_lo(&mut sync, pod(DirectionEntries { isolated: true, ..Default::default() }, egress), &[("10.0.0.2", 300), ("10.0.0.3", 301)]);
    // To a Service address (unknown to the ipcache): TC defers, passes the packet, counts
    // nothing as denied.
    assert_eq!(k.run_from_pod(&udp("10.0.0.1", "10.96.0.10", 6000, 53)), RETURN_PASS);
    assert_eq!(k.drops(REASON_POLICY_DENIED, 1), 0);
    // To a known pod: TC decides itself.
    assert_eq!(k.run_from_pod(&udp("10.0.0.1", "10.0.0.3", 6001, 53)), RETURN_DROP);
    // Without netfilter, TC judges the Service address as what it is (world): denied.
    k.settings(0, 0, 0);
    assert_eq!(k.run_from_pod(&udp("10.0.0.1", "10.96.0.10", 6002, 53)), RETURN_DROP);
    // The netfilter program on the translated packet: the backend decides.
    assert_eq!(k.netfilter(&udp("10.0.0.1", "10.0.0.2", 6000, 53)), NF_ACCEPT, "allowed backend");
    assert_eq!(k.netfilter(&udp("10.0.0.1", "10.0.0.3", 6000, 53)), NF_DROP, "denied backend");
    assert_eq!(k.netfilter(&udp("10.0.0.1", "10.0.0.2", 6000, 54)), NF_DROP, "allowed backend, other targetPort");
    assert_eq!(k.drops(REASON_POLICY_DENIED, 1), 4);
    // Without CONFIG_EGRESS_ENFORCED (the synchronizer clears it when no endpoint enforces
    // egress) the netfilter program accepts before any lookup, and TC, which then must not
    // defer, judges the Service address itself: a wrong flag fails closed, never open.
    assert_ne!(k.maps.config().flags & CONFIG_EGRESS_ENFORCED, 0, "set by the synchronizer");
    k.maps.set_settings(CONFIG_NETFILTER_ACTIVE, 0, 0).expect("settings");
    assert_eq!(k.netfilter(&udp("10.0.0.1", "10.0.0.3", 6000, 53)), NF_ACCEPT);
    assert_eq!(k.run_from_pod(&udp("10.0.0.1", "10.96.0.10", 6003, 53)), RETURN_DROP);
    assert_eq!(k.drops(REASON_POLICY_DENIED, 1), 5);
}

/// What one random cluster asks of the kernel: for every pod, every peer, protocol, port and
/// direction, the TC verdict (and for egress the netfilter program's) against the semantics
/// module; then sequences of packets of allowed flows across a policy change and a peer
/// relabel.
#[test]
fn kernel_agrees_with_semantics_on_random_clusters_and_flow_sequences() {
    let mut k = load();
    let mut packets = 0usize;
    let mut netfilter_packets = 0usize;
    let mut sequences = 0usize;
    let mut disagreements = Vec::new();
    let mut source_port: u16 = 40000;
    let mut next_port = || {
        source_port = if source_port >= 60000 { 40000 } else { source_port + 1 };
        source_port
    };
    for seed in 0..40u64 {
        let params = ScenarioParams { namespaces: 3, pods_per_namespace: 4, policies: 6, nodes: 2 };
        let scenario = Scenario::generate(1000 + seed, params).expect("scenario");
        let other = Scenario::generate(5000 + seed, params).expect("scenario");
        let state = ClusterState::new(&scenario.namespaces, &scenario.pods, &scenario.policies, &[]);
        let mut ids = IdentityAllocator::default();
        let mut sync = Synchronizer::with_capacity(Capacity::default());
        let program_all = |state: &ClusterState, ids: &mut IdentityAllocator, sync: &mut Synchronizer, maps: &mut KernelMaps| {
            // Every pod is programmed under a stand-in ifindex; the one under test is pointed at
            // loopback (and ifindex 0) before its packets run.
            let stand_in: BTreeMap<String, u32> =
                state.pods.values().enumerate().map(|(i, p)| (p.key(), 1000 + i as u32)).collect();
            let mut node = NodeProgram::default();
            for name in ["node0", "node1"] {
                let compiled = compile_node(state, ids, name, true, &|p| stand_in.get(&p.key()).copied());
                assert!(compiled.failures.is_empty());
                node.ipcache.extend(compiled.program.ipcache);
                node.endpoints.extend(compiled.program.endpoints);
            }
            sync.sync(maps, &node).expect("sync");
            stand_in
        };
        let stand_in = program_all(&state, &mut ids, &mut sync, &mut k.maps);
        let point_at = |k: &mut Loaded, fake: u32| {
            let info = k.maps.endpoints.get(&fake, 0).expect("endpoint programmed");
            k.maps.set_endpoint(LO, info).expect("loopback");
            k.maps.set_endpoint(NF_IFINDEX, info).expect("netfilter stand-in");
        };
        let mut peers: Vec<FlowEndpoint> = Vec::new();
        for pod in state.pods.values() {
            for ip in &pod.ips {
                peers.push(FlowEndpoint { ip: *ip, pod: Some(pod.key()) });
            }
        }
        peers.extend(scenario.outside_ips.iter().map(|ip| FlowEndpoint { ip: *ip, pod: None }));
        // Allowed flows, for the sequences below: (pod, direction, spec).
        let mut allowed_flows: Vec<(String, Direction, PacketSpec, Flow)> = Vec::new();
        // Denied flows, likewise: their repeated packets ride the flow cache's denials.
        let mut denied_flows: Vec<(String, Direction, PacketSpec, Flow)> = Vec::new();
        for pod in state.pods.values() {
            point_at(&mut k, stand_in[&pod.key()]);
            for own_ip in &pod.ips {
                let own = FlowEndpoint { ip: *own_ip, pod: Some(pod.key()) };
                for peer in peers.iter().filter(|p| p.ip.is_ipv4() == own_ip.is_ipv4()) {
                    if peer.pod == own.pod {
                        continue;
                    }
                    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Icmp] {
                        let ports: &[u16] = if protocol == Protocol::Icmp { &[0] } else { INTERESTING_PORTS };
                        for &port in ports {
                            for direction in [Direction::Egress, Direction::Ingress] {
                                let (src, dst) = match direction {
                                    Direction::Egress => (own.clone(), peer.clone()),
                                    Direction::Ingress => (peer.clone(), own.clone()),
                                };
                                let sport = next_port();
                                let spec = PacketSpec::new(src.ip, dst.ip, l4(protocol, sport, port, own_ip.is_ipv4(), TCP_SYN));
                                let flow = Flow { src, dst, protocol, port };
                                let expected = evaluate_direction(&state, &flow, direction).allowed;
                                let got = verdict(match direction {
                                    Direction::Egress => k.run_from_pod(&spec),
                                    Direction::Ingress => k.run_to_pod(&spec),
                                });
                                packets += 1;
                                if got != expected {
                                    disagreements.push(format!("seed {seed} TC {direction:?} {flow:?}: kernel {got}"));
                                }
                                // Another connection attempt from a new source port: its
                                // verdict (a denial, or an admission that opens the flow) is
                                // now taken from the flow cache, and its flow is the one the
                                // sequences below follow.
                                let mut spec = spec;
                                if protocol == Protocol::Tcp {
                                    let again = PacketSpec::new(flow.src.ip, flow.dst.ip, l4(protocol, next_port(), port, own_ip.is_ipv4(), TCP_SYN));
                                    let got = run_on(&mut k, direction, &again);
                                    packets += 1;
                                    if got != expected {
                                        disagreements.push(format!("seed {seed} TC {direction:?} {flow:?}, second SYN: kernel {got}"));
                                    }
                                    spec = again;
                                }
                                if direction == Direction::Egress {
                                    // The same flow as the netfilter hook sees it after DNAT.
                                    let nf = k.netfilter(&PacketSpec::new(flow.src.ip, flow.dst.ip, l4(protocol, next_port(), port, own_ip.is_ipv4(), TCP_SYN))) == NF_ACCEPT;
                                    netfilter_packets += 1;
                                    if nf != expected {
                                        disagreements.push(format!("seed {seed} netfilter {flow:?}: kernel {nf}"));
                                    }
                                }
                                if protocol != Protocol::Icmp && port % 2 == 0 {
                                    let sample = if expected { &mut allowed_flows } else { &mut denied_flows };
                                    if sample.len() < 40 {
                                        sample.push((pod.key(), direction, spec, flow));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // Sequences: each allowed flow exchanges packets (conntrack and the flow cache hold
        // it), then its next packets, after the cluster changes to `other`'s labels and
        // policies (pods keep their addresses), are judged against the new state.
        packets += exchange_packets(&mut k, &allowed_flows, &stand_in, point_at, |what| {
            disagreements.push(format!("seed {seed} sequence {what}"))
        });
        let (denied_packets, denied_held) = exchange_denied_packets(&mut k, &denied_flows, &state, &stand_in, point_at, |what| {
            disagreements.push(format!("seed {seed} denied sequence {what}"))
        });
        packets += denied_packets;
        let sequence_flows: Vec<_> = allowed_flows.iter().chain(denied_flows.iter()).cloned().collect();
        let mut changed = state.clone();
        for (key, pod) in state.pods.iter() {
            if let Some(twin) = other.pods.iter().map(PodInfo::from_object).find(|p| p.key() == *key) {
                let mut relabelled = pod.clone();
                relabelled.labels = twin.labels;
                changed.upsert_pod(relabelled);
            }
        }
        for policy in other.policies.iter().take(3) {
            changed.upsert_policy(netsieve::policy::CompiledPolicy::compile(policy));
        }
        let changed_stand_in = program_all(&changed, &mut ids, &mut sync, &mut k.maps);
        assert_eq!(stand_in, changed_stand_in);
        let mut held: Vec<Held> = vec![Held::Forward; allowed_flows.len()];
        held.extend(denied_held);
        sequences += replay_next_packets(&mut k, &sequence_flows, &mut held, &changed, &changed_stand_in, point_at, |what| {
            disagreements.push(format!("seed {seed} sequence {what} after the change"))
        });
        // A restart: a new agent (new synchronizer, its own revisions) programs the same state;
        // the flows' next packets are judged again and still agree.
        sync.sync(&mut k.maps, &NodeProgram::default()).expect("clear");
        let mut sync = Synchronizer::with_capacity(Capacity::default());
        let restarted_stand_in = program_all(&changed, &mut ids, &mut sync, &mut k.maps);
        sequences += replay_next_packets(&mut k, &sequence_flows, &mut held, &changed, &restarted_stand_in, point_at, |what| {
            disagreements.push(format!("seed {seed} sequence {what} after a restart"))
        });
        // Clean maps for the next cluster: an empty node program removes every entry.
        sync.sync(&mut k.maps, &NodeProgram::default()).expect("clear");
    }
    // Straight to the process's stderr, past libtest's capture: `cargo xtask test` shows the
    // counts on every run, not only when the test fails.
    let _ = writeln!(
        std::io::stderr().lock(),
        "differential: {packets} TC packets, {netfilter_packets} netfilter packets, {sequences} flow sequences run in the kernel, {} disagreements",
        disagreements.len()
    );
    assert!(disagreements.is_empty(), "{} disagreements, first: {:#?}", disagreements.len(), &disagreements[..disagreements.len().min(5)]);
    assert!(packets >= 100_000, "only {packets} packets");
    assert!(sequences >= 400, "only {sequences} sequences");
}

/// The packets of one flow at its pod's interface: the next forward packet (an ACK, not a new
/// connection) and a reply (destination to source, on the pod's other hook).
fn next_packets(spec: &PacketSpec, reply_flags: u8) -> (PacketSpec, PacketSpec) {
    let mut forward = spec.clone();
    if let L4::Tcp { flags, .. } = &mut forward.l4 {
        *flags = TCP_ACK;
    }
    let mut reply = PacketSpec::new(spec.dst, spec.src, spec.l4);
    reply.l4 = match spec.l4 {
        L4::Tcp { src_port, dst_port, .. } => L4::Tcp { src_port: dst_port, dst_port: src_port, flags: reply_flags },
        L4::Udp { src_port, dst_port } => L4::Udp { src_port: dst_port, dst_port: src_port },
        L4::Sctp { src_port, dst_port } => L4::Sctp { src_port: dst_port, dst_port: src_port },
        other => other,
    };
    (forward, reply)
}

fn run_on(k: &mut Loaded, direction: Direction, spec: &PacketSpec) -> bool {
    verdict(match direction {
        Direction::Egress => k.run_from_pod(spec),
        Direction::Ingress => k.run_to_pod(spec),
    })
}

fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::Egress => Direction::Ingress,
        Direction::Ingress => Direction::Egress,
    }
}

/// Before a change: each allowed flow's reply (a SYN-ACK for TCP, so conntrack holds it as
/// established), then its forward packets and replies twice more, which the flow cache then
/// serves. All are allowed (the flows are). Returns the packets run.
fn exchange_packets(
    k: &mut Loaded,
    flows: &[(String, Direction, PacketSpec, Flow)],
    stand_in: &BTreeMap<String, u32>,
    point_at: impl Fn(&mut Loaded, u32),
    mut disagree: impl FnMut(String),
) -> usize {
    let mut packets = 0;
    for (key, direction, spec, flow) in flows {
        point_at(k, stand_in[key]);
        let (_, opening_reply) = next_packets(spec, TCP_SYN | TCP_ACK);
        let (forward, reply) = next_packets(spec, TCP_ACK);
        let mut run = |k: &mut Loaded, hook: Direction, packet: &PacketSpec, what: &str| {
            packets += 1;
            if !run_on(k, hook, packet) {
                disagree(format!("{direction:?} {flow:?}: {what} dropped before any change"));
            }
        };
        run(k, opposite(*direction), &opening_reply, "opening reply");
        for _ in 0..2 {
            run(k, *direction, &forward, "forward packet");
            run(k, opposite(*direction), &reply, "reply");
        }
    }
    packets
}

/// Before a change: each denied flow's next forward packet twice (the second one decided by
/// the denial the flow cache holds), its reply (judged as a flow of its own, and recorded if
/// admitted), then the forward packet again, a reply to that flow if it was admitted whatever
/// the cache held. Returns the packets run and how conntrack holds each flow.
fn exchange_denied_packets(
    k: &mut Loaded,
    flows: &[(String, Direction, PacketSpec, Flow)],
    state: &ClusterState,
    stand_in: &BTreeMap<String, u32>,
    point_at: impl Fn(&mut Loaded, u32),
    mut disagree: impl FnMut(String),
) -> (usize, Vec<Held>) {
    let mut packets = 0;
    let mut held_by_flow = Vec::with_capacity(flows.len());
    for (key, direction, spec, flow) in flows {
        point_at(k, stand_in[key]);
        let (forward, reply) = next_packets(spec, TCP_ACK);
        let reverse = Flow { src: flow.dst.clone(), dst: flow.src.clone(), protocol: flow.protocol, port: source_port(spec) };
        let forward_allowed = evaluate_direction(state, flow, *direction).allowed;
        let reverse_allowed = evaluate_direction(state, &reverse, opposite(*direction)).allowed;
        let mut held = Held::Nothing;
        let steps = [
            (true, &forward, "forward packet"),
            (true, &forward, "forward packet again"),
            (false, &reply, "reply"),
            (true, &forward, "forward packet after the reply"),
        ];
        for (forward_packet, packet, what) in steps {
            let (hook, own, other) = if forward_packet {
                (*direction, forward_allowed, reverse_allowed)
            } else {
                (opposite(*direction), reverse_allowed, forward_allowed)
            };
            let before = held;
            let expected = expect_packet(&mut held, forward_packet, own, other);
            let got = run_on(k, hook, packet);
            packets += 1;
            if got != expected {
                disagree(format!("{direction:?} {flow:?} (held {before:?}): {what}: kernel {got}"));
            }
        }
        held_by_flow.push(held);
    }
    (packets, held_by_flow)
}

/// Which way conntrack holds a flow at its pod's interface: as opened (the forward packets'
/// source initiated it), reversed (a reply was admitted as a flow of its own after the flow's
/// entry went), or not at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Forward,
    Reverse,
    Nothing,
}

/// The kernel's expected verdict for one packet of a flow at the pod's interface, and what
/// conntrack holds after it. `own_allowed`: the policy admits the packet as a flow of its own
/// (in its hook's direction); `other_allowed`: it admits the packet's reverse. A packet of the
/// flow conntrack holds the other way is a reply, admitted while that flow is; a stale entry
/// whose flow is no longer admitted goes, and the packet is judged (and recorded) as a new
/// flow.
fn expect_packet(held: &mut Held, forward_packet: bool, own_allowed: bool, other_allowed: bool) -> bool {
    let (own, other) = if forward_packet { (Held::Forward, Held::Reverse) } else { (Held::Reverse, Held::Forward) };
    if *held == other && other_allowed {
        return true;
    }
    if *held == own && own_allowed {
        return true;
    }
    *held = if own_allowed { own } else { Held::Nothing };
    own_allowed
}

/// After a change: each allowed flow's next forward packet, then a reply, judged against
/// `state` with what conntrack holds of the flow (`held`, updated). Returns the number of
/// flows replayed.
#[allow(clippy::too_many_arguments)]
fn replay_next_packets(
    k: &mut Loaded,
    flows: &[(String, Direction, PacketSpec, Flow)],
    held: &mut [Held],
    state: &ClusterState,
    stand_in: &BTreeMap<String, u32>,
    point_at: impl Fn(&mut Loaded, u32),
    mut disagree: impl FnMut(String),
) -> usize {
    for ((key, direction, spec, flow), held) in flows.iter().zip(held.iter_mut()) {
        point_at(k, stand_in[key]);
        let (forward, reply) = next_packets(spec, TCP_ACK);
        let reverse = Flow { src: flow.dst.clone(), dst: flow.src.clone(), protocol: flow.protocol, port: source_port(spec) };
        let forward_allowed = evaluate_direction(state, flow, *direction).allowed;
        let reverse_allowed = evaluate_direction(state, &reverse, opposite(*direction)).allowed;
        let before = *held;
        let expected = expect_packet(held, true, forward_allowed, reverse_allowed);
        let got = run_on(k, *direction, &forward);
        if got != expected {
            disagree(format!("{direction:?} {flow:?} (held {before:?}): forward packet: kernel {got}"));
        }
        let before = *held;
        let expected = expect_packet(held, false, reverse_allowed, forward_allowed);
        let got = run_on(k, opposite(*direction), &reply);
        if got != expected {
            disagree(format!("{direction:?} {flow:?} (held {before:?}): reply: kernel {got}"));
        }
    }
    flows.len()
}

fn source_port(spec: &PacketSpec) -> u16 {
    match spec.l4 {
        L4::Tcp { src_port, .. } | L4::Udp { src_port, .. } | L4::Sctp { src_port, .. } => src_port,
        L4::Icmp { id, .. } => id,
    }
}

fn l4(protocol: Protocol, sport: u16, port: u16, ipv4: bool, tcp_flags: u8) -> L4 {
    match protocol {
        Protocol::Tcp => L4::Tcp { src_port: sport, dst_port: port, flags: tcp_flags },
        Protocol::Udp => L4::Udp { src_port: sport, dst_port: port },
        Protocol::Sctp => L4::Sctp { src_port: sport, dst_port: port },
        Protocol::Icmp => L4::Icmp { icmp_type: if ipv4 { 8 } else { 128 }, code: 0, id: sport },
    }
}

fn verdict(return_value: u32) -> bool {
    match return_value {
        RETURN_PASS => true,
        RETURN_DROP => false,
        other => panic!("unexpected return value {other}"),
    }
}

/// Identity and port entries go to the kernel in batches: every entry of a batch lands, and a
/// batch delete skips keys that are already gone (as the one-key delete does) and still removes
/// the others, wherever the missing keys are.
#[test]
fn batched_entry_writes_land_and_batched_deletes_skip_missing_keys() {
    use netsieve_common::{DIRECTION_EGRESS, DIRECTION_INGRESS, PolicyIdentityKey, PolicyPortKey};
    let mut loaded = load();
    let maps = &mut loaded.maps;
    let slot = 7;
    let identity_key = |direction: u8, peer_identity: u32| PolicyIdentityKey {
        endpoint_id: slot,
        direction,
        _pad1: 0,
        _pad2: 0,
        peer_identity,
    };
    let identities: Vec<(u8, u32, u64)> = (0..300u32).map(|i| (if i % 2 == 0 { DIRECTION_INGRESS } else { DIRECTION_EGRESS }, 1000 + i, u64::from(i) + 1)).collect();
    maps.set_identities(slot, &identities).expect("batch update");
    for (direction, identity, bits) in &identities {
        assert_eq!(maps.identity.get(&identity_key(*direction, *identity), 0).expect("entry written").bits, *bits);
    }
    let ports = vec![(DIRECTION_INGRESS, PROTO_TCP, 80u16, 1u64), (DIRECTION_EGRESS, PROTO_UDP, 53, 2)];
    maps.set_ports(slot, &ports).expect("batch update");
    let port_key = |direction: u8, protocol: u8, port: u16| PolicyPortKey { endpoint_id: slot, direction, protocol, port };
    assert_eq!(maps.port.get(&port_key(DIRECTION_EGRESS, PROTO_UDP, 53), 0).expect("port entry").bits, 2);

    // Missing keys first, in the middle and last.
    let mut keys: Vec<(u8, u32)> = vec![(DIRECTION_INGRESS, 1)];
    keys.extend(identities.iter().take(150).map(|(d, i, _)| (*d, *i)));
    keys.push((DIRECTION_EGRESS, 2));
    keys.push((DIRECTION_EGRESS, 3));
    keys.extend(identities.iter().skip(150).map(|(d, i, _)| (*d, *i)));
    keys.push((DIRECTION_INGRESS, 4));
    maps.remove_identities(slot, &keys).expect("batch delete skips missing keys");
    for (direction, identity, _) in &identities {
        assert!(maps.identity.get(&identity_key(*direction, *identity), 0).is_err(), "identity {identity} left behind");
    }
    maps.remove_ports(slot, &[(DIRECTION_INGRESS, PROTO_TCP, 80), (DIRECTION_INGRESS, PROTO_TCP, 81), (DIRECTION_EGRESS, PROTO_UDP, 53)])
        .expect("batch delete");
    assert!(maps.port.get(&port_key(DIRECTION_INGRESS, PROTO_TCP, 80), 0).is_err());
    assert!(maps.port.get(&port_key(DIRECTION_EGRESS, PROTO_UDP, 53), 0).is_err());
    // An empty batch is no call at all.
    maps.set_identities(slot, &[]).expect("empty batch");
    maps.remove_identities(slot, &[]).expect("empty batch");
}
