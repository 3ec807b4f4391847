//! The real eBPF programs, loaded into this kernel and run with `BPF_PROG_TEST_RUN` on crafted
//! packets (needs root). Nothing is attached and nothing is sent: the kernel runs the program
//! on an skb built from the frame, as if it arrived on loopback (ifindex 1).
use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use netsieve::dataplane::compile::{DirectionEntries, DirectionInput, PeerInput, PortSetInput, RuleInput, compile_direction};
use netsieve::dataplane::kernel::{self, PROGRAM_FROM_POD, PROGRAM_TO_POD};
use netsieve::dataplane::lpm::{CidrSet, to_mapped};
use netsieve::dataplane::maps::KernelMaps;
use netsieve::dataplane::node::{IdentityAllocator, compile_node};
use netsieve::dataplane::packet::{Fragment, L4, PacketSpec, TCP_ACK, TCP_SYN, arp_frame};
use netsieve::dataplane::sync::{Capacity, EndpointProgram, NodeProgram, PolicyMaps, Synchronizer};
use netsieve::dataplane::testrun::{RETURN_DROP, RETURN_PASS, run_classifier};
use netsieve::policy::{ClusterState, Direction, Flow, FlowEndpoint, Protocol, evaluate_direction};
use netsieve_tests::scenario::{INTERESTING_PORTS, Scenario, ScenarioParams};
use netsieve_common::{
    EndpointStats, IpcacheValue, PROTO_SCTP, PROTO_TCP, PROTO_UDP, REASON_FAIL_CLOSED, REASON_FRAGMENT_UNKNOWN,
    REASON_MALFORMED, REASON_NO_ENDPOINT, REASON_POLICY_DENIED,
};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Loopback: BPF_PROG_TEST_RUN gives the skb this device when the context names ifindex 1.
const LO: u32 = 1;

struct Loaded {
    ebpf: Ebpf,
    maps: KernelMaps,
    drops: PerCpuArray<MapData, u64>,
    stats: PerCpuHashMap<MapData, u32, EndpointStats>,
}

fn load() -> Loaded {
    kernel::raise_memlock_rlimit();
    let mut ebpf = kernel::load().expect("programs load (run as root)");
    let maps = KernelMaps::take_from(&mut ebpf).expect("policy maps");
    let drops = PerCpuArray::try_from(ebpf.take_map("DROP_COUNTERS").expect("map")).expect("type");
    let stats = PerCpuHashMap::try_from(ebpf.take_map("ENDPOINT_STATS").expect("map")).expect("type");
    Loaded { ebpf, maps, drops, stats }
}

impl Loaded {
    fn run(&mut self, program: &'static str, frame: &[u8]) -> u32 {
        let classifier = kernel::classifier(&mut self.ebpf, program).expect("program");
        run_classifier(classifier, frame, LO, 1).unwrap_or_else(|e| panic!("test run of {} bytes: {e}", frame.len())).return_value
    }
    fn run_from_pod(&mut self, spec: &PacketSpec) -> u32 {
        self.run(PROGRAM_FROM_POD, &spec.frame())
    }
    fn run_to_pod(&mut self, spec: &PacketSpec) -> u32 {
        self.run(PROGRAM_TO_POD, &spec.frame())
    }
    fn drops(&self, reason: u32, direction: u8) -> u64 {
        let values = self.drops.get(&(reason * 2 + direction as u32), 0).expect("counter");
        values.iter().sum()
    }
    /// Installs one endpoint program on loopback through the synchronizer.
    fn program_lo(&mut self, sync: &mut Synchronizer, program: EndpointProgram, ipcache: &[(&str, u32)]) {
        let mut node = NodeProgram::default();
        for (ip, identity) in ipcache {
            let ip: IpAddr = ip.parse().expect("ip");
            node.ipcache.insert(to_mapped(ip.into()), IpcacheValue { identity: *identity, flags: 0 });
        }
        node.endpoints.insert("test/pod".into(), EndpointProgram { ifindex: LO, ..program });
        sync.sync(&mut self.maps, &node).expect("sync");
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn tcp(src: &str, dst: &str, src_port: u16, dst_port: u16, flags: u8) -> PacketSpec {
    PacketSpec::new(ip(src), ip(dst), L4::Tcp { src_port, dst_port, flags })
}

fn isolated(rules: Vec<RuleInput>) -> DirectionEntries {
    compile_direction(&DirectionInput { isolated: true, rules }).expect("compiles")
}

fn ranges(list: &[(u8, u16, u16)]) -> PortSetInput {
    PortSetInput::Ranges(list.iter().copied().collect())
}

#[test]
fn verdicts_counters_conntrack_and_fragments() {
    let mut k = load();
    let mut sync = Synchronizer::with_capacity(Capacity::default());

    // Not programmed: fail closed, counted; ARP passes regardless.
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40000, 80, TCP_SYN)), RETURN_DROP);
    assert_eq!(k.drops(REASON_NO_ENDPOINT, 0), 1);
    assert_eq!(k.run_to_pod(&PacketSpec::new(ip("10.0.0.2"), ip("10.0.0.1"), L4::Udp { src_port: 1, dst_port: 2 }).clone()), RETURN_DROP);
    assert_eq!(k.run(PROGRAM_TO_POD, &arp_frame()), RETURN_PASS);

    // Ingress: identity 300 on TCP 80, 10.0.0.0/8 except 10.1.0.0/16 on UDP 53,
    // fd00::/64 on SCTP 1000-2000; everything from identity 301 (ICMP too).
    let ingress = isolated(vec![
        RuleInput { peers: vec![PeerInput::Identities([300].into())], ports: ranges(&[(PROTO_TCP, 80, 80)]) },
        RuleInput {
            peers: vec![PeerInput::Cidr(CidrSet {
                net: to_mapped("10.0.0.0/8".parse().expect("cidr")),
                except: vec![to_mapped("10.1.0.0/16".parse().expect("cidr"))],
            })],
            ports: ranges(&[(PROTO_UDP, 53, 53)]),
        },
        RuleInput {
            peers: vec![PeerInput::Cidr(CidrSet { net: to_mapped("fd00::/64".parse().expect("cidr")), except: vec![] })],
            ports: ranges(&[(PROTO_SCTP, 1000, 2000)]),
        },
        RuleInput { peers: vec![PeerInput::Identities([301].into())], ports: PortSetInput::AllProtocols },
    ]);
    let program = EndpointProgram { identity: 400, allow_host: true, ingress, ..Default::default() };
    k.program_lo(&mut sync, program, &[("10.0.0.2", 300), ("10.0.0.3", 302), ("10.0.0.4", 301), ("10.0.0.9", 1)]);

    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40001, 80, TCP_SYN)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40002, 81, TCP_SYN)), RETURN_DROP);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.3", "10.0.0.1", 40003, 80, TCP_SYN)), RETURN_DROP);
    let udp = |src: &str, port: u16| PacketSpec::new(ip(src), ip("10.0.0.1"), L4::Udp { src_port: 5353, dst_port: port });
    assert_eq!(k.run_to_pod(&udp("10.0.0.3", 53)), RETURN_PASS, "CIDR rule admits any pod in the block");
    assert_eq!(k.run_to_pod(&udp("10.1.2.3", 53)), RETURN_DROP, "except hole");
    assert_eq!(k.run_to_pod(&udp("10.2.2.3", 54)), RETURN_DROP);
    assert_eq!(k.run_to_pod(&udp("10.2.2.3", 53)), RETURN_PASS);
    let sctp = |port: u16| PacketSpec::new(ip("fd00::5"), ip("fd00::1"), L4::Sctp { src_port: 9, dst_port: port });
    assert_eq!(k.run_to_pod(&sctp(999)), RETURN_DROP);
    assert_eq!(k.run_to_pod(&sctp(1000)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&sctp(2000)), RETURN_PASS);
    assert_eq!(k.run_to_pod(&sctp(2001)), RETURN_DROP);
    let ping = |src: &str| PacketSpec::new(ip(src), ip("10.0.0.1"), L4::Icmp { icmp_type: 8, code: 0, id: 7 });
    assert_eq!(k.run_to_pod(&ping("10.0.0.4")), RETURN_PASS, "all-protocols rule admits ICMP");
    assert_eq!(k.run_to_pod(&ping("10.0.0.2")), RETURN_DROP, "ICMP never matches a port rule");
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

    // Malformed: IPv4 and IPv6 packets cut inside the TCP header (their length fields then
    // point past the frame). A frame cut inside the IP header itself is refused by
    // BPF_PROG_TEST_RUN before the program runs, so it cannot be tested this way.
    let before = k.drops(REASON_MALFORMED, 0);
    for spec in [tcp("10.0.0.2", "10.0.0.1", 40005, 80, TCP_SYN), tcp("fd00::5", "fd00::1", 40005, 80, TCP_SYN)] {
        let mut cut = spec;
        cut.payload_len = 0;
        let frame = cut.frame();
        let header = if cut.src.is_ipv4() { 20 } else { 40 };
        assert_eq!(k.run(PROGRAM_TO_POD, &frame[..14 + header + 10]), RETURN_DROP);
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

    // Revoking the rule cuts new packets of an existing flow at once.
    let revoked = EndpointProgram { identity: 400, allow_host: true, ingress: isolated(vec![]), ..Default::default() };
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40001, 80, TCP_ACK)), RETURN_PASS);
    k.program_lo(&mut sync, revoked, &[("10.0.0.2", 300)]);
    assert_eq!(k.run_to_pod(&tcp("10.0.0.2", "10.0.0.1", 40001, 80, TCP_ACK)), RETURN_DROP);

    // Fail-closed endpoints drop everything but host traffic, counted apart.
    let failed = EndpointProgram { identity: 400, allow_host: true, fail_closed: true, ..Default::default() };
    k.program_lo(&mut sync, failed, &[("10.0.0.2", 300), ("10.0.0.9", 1)]);
    assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.2", 45002, 80, TCP_SYN)), RETURN_DROP);
    assert_eq!(k.drops(REASON_FAIL_CLOSED, 1), 1);
    assert_eq!(k.run_from_pod(&tcp("10.0.0.1", "10.0.0.9", 45003, 10250, TCP_SYN)), RETURN_PASS);

    // Per-endpoint statistics moved.
    let mut total = EndpointStats::default();
    for (_, per_cpu) in k.stats.iter().flatten() {
        for s in per_cpu.iter() {
            for d in 0..2 {
                total.allowed_packets[d] += s.allowed_packets[d];
                total.denied_packets[d] += s.denied_packets[d];
                total.denied_bytes[d] += s.denied_bytes[d];
            }
        }
    }
    assert!(total.allowed_packets[0] >= 10, "{total:?}");
    assert!(total.denied_packets[0] >= 10, "{total:?}");
    assert!(total.denied_bytes[0] > total.denied_packets[0] * 40, "{total:?}");
    assert!(k.drops(REASON_POLICY_DENIED, 0) >= 10);
}

/// The loaded program agrees with the semantics module on every packet of many random
/// clusters: IPv4 and IPv6, TCP, UDP, SCTP and ICMP, every rule kind.
#[test]
fn kernel_agrees_with_semantics_on_random_clusters() {
    let mut k = load();
    let mut packets = 0usize;
    let mut disagreements = Vec::new();
    let mut source_port: u16 = 40000;
    for seed in 0..40u64 {
        let params = ScenarioParams { namespaces: 3, pods_per_namespace: 4, policies: 6, nodes: 2 };
        let scenario = Scenario::generate(1000 + seed, params).expect("scenario");
        let state = ClusterState::new(&scenario.namespaces, &scenario.pods, &scenario.policies, &[]);
        let mut ids = IdentityAllocator::default();
        // Every pod is programmed under a stand-in ifindex; the one under test is pointed at
        // loopback before its packets run (endpoints are keyed by id, so this is one update).
        let stand_in: BTreeMap<String, u32> =
            state.pods.values().enumerate().map(|(i, p)| (p.key(), 1000 + i as u32)).collect();
        let mut node = NodeProgram::default();
        for name in ["node0", "node1"] {
            let compiled = compile_node(&state, &mut ids, name, true, &|p| stand_in.get(&p.key()).copied());
            assert!(compiled.failures.is_empty());
            node.ipcache.extend(compiled.program.ipcache);
            node.endpoints.extend(compiled.program.endpoints);
        }
        let mut sync = Synchronizer::with_capacity(Capacity::default());
        sync.sync(&mut k.maps, &node).expect("sync");

        let mut peers: Vec<FlowEndpoint> = Vec::new();
        for pod in state.pods.values() {
            for ip in &pod.ips {
                peers.push(FlowEndpoint { ip: *ip, pod: Some(pod.key()) });
            }
        }
        peers.extend(scenario.outside_ips.iter().map(|ip| FlowEndpoint { ip: *ip, pod: None }));
        for pod in state.pods.values() {
            let fake = stand_in[&pod.key()];
            let info = k.maps.endpoints.get(&fake, 0).expect("endpoint programmed");
            k.maps.set_endpoint(LO, info).expect("point loopback at the pod");
            for own_ip in &pod.ips {
                let own = FlowEndpoint { ip: *own_ip, pod: Some(pod.key()) };
                for peer in peers.iter().filter(|p| p.ip.is_ipv4() == own_ip.is_ipv4()) {
                    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Icmp] {
                        let ports: &[u16] = if protocol == Protocol::Icmp { &[0] } else { INTERESTING_PORTS };
                        for &port in ports {
                            for direction in [Direction::Egress, Direction::Ingress] {
                                let (src, dst) = match direction {
                                    Direction::Egress => (own.clone(), peer.clone()),
                                    Direction::Ingress => (peer.clone(), own.clone()),
                                };
                                // Unique source ports keep earlier flows from looking like
                                // replies (conntrack is part of the program under test).
                                source_port = if source_port >= 60000 { 40000 } else { source_port + 1 };
                                let l4 = match protocol {
                                    Protocol::Tcp => L4::Tcp { src_port: source_port, dst_port: port, flags: TCP_SYN },
                                    Protocol::Udp => L4::Udp { src_port: source_port, dst_port: port },
                                    Protocol::Sctp => L4::Sctp { src_port: source_port, dst_port: port },
                                    Protocol::Icmp => L4::Icmp {
                                        icmp_type: if own_ip.is_ipv4() { 8 } else { 128 },
                                        code: 0,
                                        id: source_port,
                                    },
                                };
                                let spec = PacketSpec::new(src.ip, dst.ip, l4);
                                let flow = Flow { src, dst, protocol, port };
                                let expected = evaluate_direction(&state, &flow, direction).allowed;
                                let got = match direction {
                                    Direction::Egress => k.run_from_pod(&spec),
                                    Direction::Ingress => k.run_to_pod(&spec),
                                };
                                let got = match got {
                                    RETURN_PASS => true,
                                    RETURN_DROP => false,
                                    other => panic!("unexpected return value {other}"),
                                };
                                packets += 1;
                                if got != expected {
                                    disagreements.push(format!("seed {seed} {direction:?} {flow:?}: kernel {got}"));
                                }
                            }
                        }
                    }
                }
            }
        }
        // Clean maps for the next cluster: an empty node program removes every entry.
        sync.sync(&mut k.maps, &NodeProgram::default()).expect("clear");
    }
    println!("differential: {packets} packets run in the kernel, {} disagreements", disagreements.len());
    assert!(disagreements.is_empty(), "{} disagreements, first: {:?}", disagreements.len(), &disagreements[..disagreements.len().min(5)]);
    assert!(packets >= 100_000, "only {packets} packets");
}
