//! In-kernel cost per packet of the enforcement programs, measured with `BPF_PROG_TEST_RUN`
//! (large repeat count, the kernel times the loop) beside an empty TC program in the same run
//! (every round runs the empty program and the case back to back; the differences are shown),
//! with a small policy and with 100k rule entries. Run with `cargo xtask bench` (root).
//!
//! Cases (issue 10's goals, in ns above the empty program):
//! - a packet of an established flow, forward and reply (goal 60): the flow cache, and the
//!   conntrack fast path it falls back to when its slot holds another flow (calibration
//!   programs: the enforcement programs with the cache off);
//! - a denied packet (goal 100): a packet of a flow conntrack does not hold (its denial then
//!   cached), a TCP SYN, a flood of SYNs from a new source port each (they share one cached
//!   denial), and the full path (the calibration program without the cache);
//! - the first packet of a new flow (goal 150), twice: a flow conntrack has never seen (a
//!   calibration wrapper adds one to the source port before every run, so each run inserts a
//!   fresh entry; measured against the port change alone), and a repeated TCP SYN (a new
//!   connection on a port pair seen before: the full evaluation plus replacing the entry);
//! - the netfilter program on an established Service flow (the extra hook of the Service path),
//!   and on a node where no pod's egress is enforced (it accepts at once). A test run's packet
//!   has no kernel conntrack entry, so the program parses its headers (five helper calls: the
//!   interface, `_nfct` with the lengths, `head`, `network_header`, one copy of the headers);
//!   on a real node it reads the conntrack entry's two tuples instead (four calls).
//!   `netsieve_cal_probe_read` is the price of one such call.
//!
//! Then the calibration programs (`netsieve_cal_*`, never attached) measure single pieces of
//! the path on this machine: parsing, parsing plus one conntrack lookup, one hash lookup, one
//! clock read. They show the floor any conntrack-first design pays here, against the goals.
use netsieve::dataplane::compile::{DirectionInput, PeerInput, PortSetInput, RuleInput, RuleOrigin, compile_direction};
use netsieve::dataplane::kernel::{self, PROGRAM_FROM_POD, PROGRAM_PASS, PROGRAM_TO_POD};
use netsieve::dataplane::lpm::{CidrSet, to_mapped};
use netsieve::dataplane::maps::KernelMaps;
use netsieve::dataplane::netfilter::{self, KERNEL_NAME_NETFILTER, NetfilterProgram, PROGRAM_NETFILTER, TEST_HOOK_POST_ROUTING};
use netsieve::dataplane::packet::{L4, PacketSpec, TCP_ACK, TCP_SYN};
use netsieve::dataplane::sync::{Capacity, EndpointProgram, NodeProgram, PolicyMaps, Synchronizer};
use netsieve::dataplane::testrun::{RETURN_DROP, RETURN_PASS, run_classifier};
use netsieve_common::{CONFIG_EGRESS_ENFORCED, CONFIG_NETFILTER_ACTIVE, IpcacheValue, PROTO_TCP};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

const REPEAT: u32 = 500_000;
/// Rounds of each case, every round the empty program and the case back to back: the drift of
/// this VM within one run (30-40 ns over a minute) falls on both halves of a pair, not on the
/// difference.
const ROUNDS: usize = 9;
/// Rounds of the cases that insert never-seen flows (each round on ports of its own).
const FRESH_KEY_ROUNDS: usize = 5;
/// Runs per round of the new-flow case: each run takes the next source port, and no port is
/// used twice over both scenarios' rounds (2 scenarios x FRESH_KEY_ROUNDS x 6,000 ports from 1,024), so every run
/// inserts a new conntrack entry.
const NEW_FLOW_REPEAT: u32 = 6_000;
const NEW_FLOW_FIRST_PORT: u16 = 1_024;
const LO: u32 = 1;
const PROGRAM_NEW_FLOWS: &str = "netsieve_cal_new_flows";
const PROGRAM_NEXT_PORT: &str = "netsieve_cal_next_port";
const PROGRAM_NEW_ENTRY: &str = "netsieve_cal_new_entry";
const PROGRAM_TO_POD_UNCACHED: &str = "netsieve_cal_to_pod_uncached";
const PROGRAM_FROM_POD_UNCACHED: &str = "netsieve_cal_from_pod_uncached";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    PacketSpec::new(ip(src), ip(dst), L4::Tcp { src_port: sport, dst_port: dport, flags }).frame()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    kernel::raise_memlock_rlimit();
    let loaded = kernel::load()?;
    let netfilter_program = loaded.netfilter?;
    let mut ebpf = loaded.ebpf;
    let mut maps = KernelMaps::take_from(&mut ebpf)?;
    // The pod 10.0.0.1 admits identity 300 (10.0.0.2) on TCP 80; 10.0.0.3 (identity 301) is
    // denied. Its egress admits identity 300 on TCP 8080 (the Service flow's backend).
    let syn = tcp("10.0.0.2", "10.0.0.1", 40000, 80, TCP_SYN);
    let established = tcp("10.0.0.2", "10.0.0.1", 40000, 80, TCP_ACK);
    let reply = tcp("10.0.0.1", "10.0.0.2", 80, 40000, TCP_ACK);
    let syn_ack = tcp("10.0.0.1", "10.0.0.2", 80, 40000, TCP_SYN | TCP_ACK);
    let denied = tcp("10.0.0.3", "10.0.0.1", 40000, 81, TCP_ACK);
    let denied_syn = tcp("10.0.0.3", "10.0.0.1", 40001, 81, TCP_SYN);
    let service = tcp("10.0.0.1", "10.0.0.2", 41000, 8080, TCP_ACK);

    println!(
        "netsieve dataplane benchmark: BPF_PROG_TEST_RUN, {REPEAT} repeats x {ROUNDS} rounds; each round runs the empty program and the case back to back; \
         the median round (\"above empty\": median of the rounds' differences) and the least disturbed one (min)"
    );
    println!(
        "{:<52} {:>9} {:>13} {:>9} {:>8} {:>6}",
        "case", "ns/packet", "above empty", "min above", "goal", "met"
    );
    for program in [PROGRAM_NEW_FLOWS, PROGRAM_NEXT_PORT, PROGRAM_TO_POD_UNCACHED, PROGRAM_FROM_POD_UNCACHED] {
        kernel::classifier(&mut ebpf, program)?.load().map_err(|e| format!("{program}: {e}"))?;
    }
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    let mut above: Vec<(&str, f64, f64)> = Vec::new();
    for (scenario_index, (label, extra)) in [("small policy", 9usize), ("100k rule entries", 100_000usize)].into_iter().enumerate() {
        let (program, ipcache) = scenario(extra);
        let mut node = NodeProgram { ipcache, ..Default::default() };
        node.endpoints.insert("bench/pod".into(), program);
        sync.sync(&mut maps, &node).map_err(|e| format!("sync: {e}"))?;
        let info = maps.endpoints.get(&LO, 0).map_err(|e| format!("endpoint: {e}"))?;
        // The netfilter test runner's skb enters by interface 0.
        maps.set_endpoint(0, info).map_err(|e| format!("endpoint 0: {e}"))?;
        // The synchronizer set CONFIG_EGRESS_ENFORCED (the endpoint's egress is isolated).
        let enforced = maps.config().flags & CONFIG_EGRESS_ENFORCED;
        maps.set_settings(CONFIG_NETFILTER_ACTIVE | enforced, 0, 0).map_err(|e| format!("settings: {e}"))?;
        let counts = sync.entry_counts();
        let total = counts.identity + counts.cidr + counts.port + counts.port_range;
        let empty = measure(&mut ebpf, PROGRAM_PASS, &established, RETURN_PASS)?;
        // Open the flow (SYN, then the pod's SYN-ACK) so the established cases hit conntrack
        // and, from their second packet on, the flow cache.
        measure_once(&mut ebpf, PROGRAM_TO_POD, &syn, RETURN_PASS)?;
        measure_once(&mut ebpf, PROGRAM_FROM_POD, &syn_ack, RETURN_PASS)?;
        let forward = measure_above(&mut ebpf, PROGRAM_TO_POD, &established, RETURN_PASS)?;
        let backward = measure_above(&mut ebpf, PROGRAM_FROM_POD, &reply, RETURN_PASS)?;
        let forward_uncached = measure_above(&mut ebpf, PROGRAM_TO_POD_UNCACHED, &established, RETURN_PASS)?;
        let backward_uncached = measure_above(&mut ebpf, PROGRAM_FROM_POD_UNCACHED, &reply, RETURN_PASS)?;
        let drop = measure_above(&mut ebpf, PROGRAM_TO_POD, &denied, RETURN_DROP)?;
        let drop_syn = measure_above(&mut ebpf, PROGRAM_TO_POD, &denied_syn, RETURN_DROP)?;
        let drop_uncached = measure_above(&mut ebpf, PROGRAM_TO_POD_UNCACHED, &denied, RETURN_DROP)?;
        // A SYN flood: a new source port at every run (the denied peer, to the denied port).
        let drop_syn_flood = measure_fresh_keys(&mut ebpf, PROGRAM_NEW_FLOWS, ("10.0.0.3", 81), RETURN_DROP, scenario_index)?;
        // The agent's default: events on at 1000/s per CPU. A flood of drops then finds the
        // token bucket empty on almost every packet: what a denied packet costs in production.
        maps.set_settings(CONFIG_NETFILTER_ACTIVE | enforced, 1000, 1000).map_err(|e| format!("settings: {e}"))?;
        let drop_events = measure_above(&mut ebpf, PROGRAM_TO_POD, &denied, RETURN_DROP)?;
        maps.set_settings(CONFIG_NETFILTER_ACTIVE | enforced, 0, 0).map_err(|e| format!("settings: {e}"))?;
        let new_flow = measure_new_flows(&mut ebpf, scenario_index)?;
        let reused_flow = measure_above(&mut ebpf, PROGRAM_TO_POD, &syn, RETURN_PASS)?;
        let nf = measure_netfilter_above(&mut ebpf, &netfilter_program, &service)?;
        // The same packet on a node where no pod's egress is enforced (CONFIG_EGRESS_ENFORCED
        // clear): the program accepts before any helper call.
        maps.set_settings(CONFIG_NETFILTER_ACTIVE, 0, 0).map_err(|e| format!("settings: {e}"))?;
        let nf_idle = measure_netfilter_above(&mut ebpf, &netfilter_program, &service)?;
        maps.set_settings(CONFIG_NETFILTER_ACTIVE | enforced, 0, 0).map_err(|e| format!("settings: {e}"))?;
        println!("{:<52} {:>9.1} {:>13} {:>9} {:>8} {:>6}", format!("empty TC program ({label}, {total} entries)"), empty, "", "", "", "");
        for (case, value, goal) in [
            ("established flow, forward packet", forward, 60.0),
            ("established flow, reply packet", backward, 60.0),
            ("established flow, forward, cache slot taken (conntrack)", forward_uncached, 60.0),
            ("established flow, reply, cache slot taken (conntrack)", backward_uncached, 60.0),
            ("denied packet (no conntrack entry, ACK)", drop, 100.0),
            ("denied TCP SYN (a connection attempt)", drop_syn, 100.0),
            ("denied TCP SYNs, a new source port each (SYN flood)", drop_syn_flood, 100.0),
            ("denied packet, cache slot taken (full path)", drop_uncached, 100.0),
            ("denied packet, events on (1000/s/CPU, default)", drop_events, 100.0),
            ("first packet of a new flow (TCP SYN, new port pair)", new_flow, 150.0),
            ("TCP SYN on a port pair seen before (entry replaced)", reused_flow, 150.0),
            ("netfilter hook, established Service flow (parsed)", nf, f64::NAN),
            ("netfilter hook, no pod's egress enforced on the node", nf_idle, f64::NAN),
        ] {
            let met = if goal.is_nan() { "-" } else if value.median <= goal { "yes" } else { "no" };
            let goal_text = if goal.is_nan() { "-".to_string() } else { format!("<= {goal}") };
            println!(
                "{:<52} {:>9.1} {:>13.1} {:>9.1} {:>8} {:>6}",
                format!("{case}, {total} entries"),
                value.per_packet,
                value.median,
                value.min,
                goal_text,
                met
            );
            above.push((case, value.median, goal));
        }
    }
    // The pieces alone, on the last scenario (the flow of `established` is open).
    println!("\nwhere the time goes: calibration programs doing one piece of the path alone (ns above the empty program: median and min of the paired rounds)");
    for (program, piece) in [
        ("netsieve_cal_parse", "parse the frame"),
        ("netsieve_cal_conntrack", "parse + one conntrack lookup (44-byte key, hit)"),
        ("netsieve_cal_hash", "one hash lookup (4-byte key, hit)"),
        ("netsieve_cal_clock", "one coarse clock read (helper call)"),
        ("netsieve_cal_probe_read", "one bpf_probe_read_kernel (40 bytes; netfilter)"),
        ("netsieve_cal_clock_cached", "the same through the per-CPU jiffies cache"),
    ] {
        kernel::classifier(&mut ebpf, program)?.load().map_err(|e| format!("{program}: {e}"))?;
        let cost = measure_above(&mut ebpf, program, &established, RETURN_PASS)?;
        println!("{piece:<52} {:>9.1} {:>9.1}", cost.median, cost.min);
    }
    // The new-flow case's floor: its conntrack insert alone, on keys no run used (another
    // destination port than the new-flow case's), above the port change alone.
    kernel::classifier(&mut ebpf, PROGRAM_NEW_ENTRY)?.load().map_err(|e| format!("{PROGRAM_NEW_ENTRY}: {e}"))?;
    let insert = measure_fresh_keys(&mut ebpf, PROGRAM_NEW_ENTRY, ("10.0.0.2", 81), RETURN_PASS, 0)?;
    println!("{:<52} {:>9.1} {:>9.1}", "parse + one conntrack insert (a never-seen flow)", insert.median, insert.min);
    print_program_sizes(&mut ebpf)?;
    // Flat in the number of entries: the 100k case within 10% of the small one.
    let half = above.len() / 2;
    println!("\nscaling (100k entries / small policy, goal <= 1.10):");
    for i in 0..half {
        let (case, small, _) = above[i];
        let (_, large, _) = above[half + i];
        println!("{:<52} {:>9.2}", case, (large.max(1.0)) / small.max(1.0));
    }
    Ok(())
}

/// The endpoint on loopback: identity 300 may use TCP 80 in, TCP 8080 out, plus `extra`
/// filler entries split over the identity, CIDR and port maps that never match the probes.
fn scenario(extra: usize) -> (EndpointProgram, std::collections::BTreeMap<ipnet::Ipv6Net, IpcacheValue>) {
    let per_map = extra / 3;
    let identities: BTreeSet<u32> = std::iter::once(300).chain((0..per_map as u32).map(|i| 100_000 + i)).collect();
    let addresses: BTreeSet<IpAddr> =
        (0..per_map as u32).map(|i| IpAddr::V4(Ipv4Addr::from(0xac10_0000u32 + i * 2))).collect();
    let ports: BTreeSet<(u8, u16, u16)> =
        std::iter::once((PROTO_TCP, 80, 80)).chain((0..per_map as u16).map(|i| (PROTO_TCP, 1000 + i * 2, 1000 + i * 2))).collect();
    let origin = |rule_index: usize| RuleOrigin { policy: "bench/policy".into(), rule_index };
    let mut rules = vec![RuleInput { peers: vec![PeerInput::Identities(identities)], ports: PortSetInput::Ranges(ports), origin: origin(0) }];
    if per_map > 0 {
        rules.push(RuleInput {
            peers: vec![PeerInput::Addresses(addresses)],
            ports: PortSetInput::Ranges([(PROTO_TCP, 9, 9)].into()),
            origin: origin(1),
        });
    } else {
        rules.push(RuleInput {
            peers: vec![PeerInput::Cidr(CidrSet { net: to_mapped("192.168.0.0/16".parse().unwrap_or_default()), except: vec![] })],
            ports: PortSetInput::Ranges([(PROTO_TCP, 443, 443)].into()),
            origin: origin(1),
        });
    }
    let ingress = compile_direction(&DirectionInput { isolated: true, rules }).unwrap_or_default();
    let egress = compile_direction(&DirectionInput {
        isolated: true,
        rules: vec![RuleInput {
            peers: vec![PeerInput::Identities([300].into())],
            ports: PortSetInput::Ranges([(PROTO_TCP, 8080, 8080)].into()),
            origin: origin(2),
        }],
    })
    .unwrap_or_default();
    let program = EndpointProgram {
        ifindex: LO,
        identity: 400,
        allow_host: true,
        ipv4: Some(Ipv4Addr::new(10, 0, 0, 1)),
        ingress,
        egress,
        ..Default::default()
    };
    let mut ipcache = std::collections::BTreeMap::new();
    for (ip, identity) in [("10.0.0.2", 300u32), ("10.0.0.3", 301)] {
        let ip: IpAddr = ip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        ipcache.insert(to_mapped(ip.into()), IpcacheValue { identity, flags: 0 });
    }
    (program, ipcache)
}

/// One `BPF_PROG_TEST_RUN` of `program` on `frame`, `repeat` times: the kernel-timed mean per
/// run, in ns, once the program returned `expect`.
fn timed_run(ebpf: &mut aya::Ebpf, program: &'static str, frame: &[u8], repeat: u32, expect: u32) -> Result<f64, Box<dyn std::error::Error>> {
    let classifier = kernel::classifier(ebpf, program)?;
    let result = run_classifier(classifier, frame, LO, repeat).map_err(|e| format!("{program}: {e}"))?;
    if result.return_value != expect {
        return Err(format!("{program} returned {} instead of {expect}", result.return_value).into());
    }
    Ok(result.duration.as_nanos() as f64)
}

fn measure_once(ebpf: &mut aya::Ebpf, program: &'static str, frame: &[u8], expect: u32) -> Result<(), Box<dyn std::error::Error>> {
    timed_run(ebpf, program, frame, 1, expect).map(|_| ())
}

/// Median over rounds of the kernel-timed average per packet.
fn measure(ebpf: &mut aya::Ebpf, program: &'static str, frame: &[u8], expect: u32) -> Result<f64, Box<dyn std::error::Error>> {
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        rounds.push(timed_run(ebpf, program, frame, REPEAT, expect)?);
    }
    Ok(median(rounds))
}

/// A case's cost, and its cost above a reference measured in pairs with it.
struct Above {
    /// The case's own time per packet (median round).
    per_packet: f64,
    /// Median of the rounds' differences to the reference.
    median: f64,
    /// The smallest difference: the least disturbed round.
    min: f64,
}

impl Above {
    fn from_pairs(pairs: &[(f64, f64)]) -> Self {
        let differences: Vec<f64> = pairs.iter().map(|(case, reference)| case - reference).collect();
        let min = differences.iter().copied().fold(f64::INFINITY, f64::min);
        Above { per_packet: median(pairs.iter().map(|(case, _)| *case).collect()), median: median(differences), min }
    }
}

/// `program` on `frame` above the empty program, each round running the empty program and
/// then the case on the same frame.
fn measure_above(ebpf: &mut aya::Ebpf, program: &'static str, frame: &[u8], expect: u32) -> Result<Above, Box<dyn std::error::Error>> {
    measure_pairs(ebpf, frame, |ebpf| timed_run(ebpf, program, frame, REPEAT, expect))
}

/// `ROUNDS` pairs of the empty TC program on `frame` and then `case` (its time per packet).
fn measure_pairs(
    ebpf: &mut aya::Ebpf,
    frame: &[u8],
    mut case: impl FnMut(&mut aya::Ebpf) -> Result<f64, Box<dyn std::error::Error>>,
) -> Result<Above, Box<dyn std::error::Error>> {
    let mut pairs = Vec::new();
    for _ in 0..ROUNDS {
        let empty = timed_run(ebpf, PROGRAM_PASS, frame, REPEAT, RETURN_PASS)?;
        pairs.push((case(ebpf)?, empty));
    }
    Ok(Above::from_pairs(&pairs))
}

/// The size of each enforcement program as the kernel holds it: instructions after the
/// verifier's rewrites, bytes of machine code, and instructions the verifier processed
/// (every path it walked; the programs' complexity budget is a million).
fn print_program_sizes(ebpf: &mut aya::Ebpf) -> Result<(), Box<dyn std::error::Error>> {
    println!("\nprogram sizes (kernel's view): instructions after verification, bytes of machine code, instructions the verifier processed");
    let mut rows = Vec::new();
    for program in [PROGRAM_TO_POD, PROGRAM_FROM_POD, PROGRAM_PASS] {
        rows.push((program, kernel::classifier(ebpf, program)?.info()?));
    }
    // The netfilter program is loaded outside aya: the newest loaded program of its name is
    // this process's.
    let netfilter = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| info.name_as_str() == Some(KERNEL_NAME_NETFILTER))
        .max_by_key(|info| info.id());
    if let Some(info) = netfilter {
        rows.push((PROGRAM_NETFILTER, info));
    }
    for (program, info) in rows {
        let instructions = info.size_translated().map_or("-".to_string(), |bytes| (bytes / 8).to_string());
        let processed = info.verified_instruction_count().map_or("-".to_string(), |n| n.to_string());
        println!("{program:<52} {instructions:>9} {:>9} {processed:>9}", info.size_jitted());
    }
    Ok(())
}

/// The first packet of a flow conntrack has never seen, above the port change alone: median
/// over rounds, each round on its own source ports.
fn measure_new_flows(ebpf: &mut aya::Ebpf, scenario_index: usize) -> Result<Above, Box<dyn std::error::Error>> {
    measure_fresh_keys(ebpf, PROGRAM_NEW_FLOWS, ("10.0.0.2", 80), RETURN_PASS, scenario_index)
}

/// `program` (a calibration wrapper moving the source port before every run) on TCP SYNs of
/// flows conntrack has never seen, from `source` to `dst_port`, above the port change alone
/// (each round pairs the wrapper with the port change on the same ports; its time per packet
/// is the wrapper's, port change included).
fn measure_fresh_keys(
    ebpf: &mut aya::Ebpf,
    program: &'static str,
    (source, dst_port): (&str, u16),
    expected: u32,
    scenario_index: usize,
) -> Result<Above, Box<dyn std::error::Error>> {
    let mut pairs = Vec::new();
    for round in 0..FRESH_KEY_ROUNDS {
        let first = NEW_FLOW_FIRST_PORT as usize + (scenario_index * FRESH_KEY_ROUNDS + round) * NEW_FLOW_REPEAT as usize;
        let port = u16::try_from(first).map_err(|_| "new-flow ports exhausted")?;
        // The program adds one before judging: the first run sees `port`.
        let frame = tcp(source, "10.0.0.1", port.wrapping_sub(1), dst_port, TCP_SYN);
        let new_flows = timed_run(ebpf, program, &frame, NEW_FLOW_REPEAT, expected)?;
        let port_change = timed_run(ebpf, PROGRAM_NEXT_PORT, &frame, NEW_FLOW_REPEAT, RETURN_PASS)?;
        pairs.push((new_flows, port_change));
    }
    Ok(Above::from_pairs(&pairs))
}

/// The netfilter program on `frame` above the empty TC program, in pairs as [`measure_above`].
fn measure_netfilter_above(ebpf: &mut aya::Ebpf, program: &NetfilterProgram, frame: &[u8]) -> Result<Above, Box<dyn std::error::Error>> {
    measure_pairs(ebpf, frame, |_| {
        let run = netfilter::test_run(program, frame, false, TEST_HOOK_POST_ROUTING, REPEAT)
            .map_err(|e| format!("netfilter test run: {e}"))?;
        if run.verdict != 1 {
            return Err(format!("the netfilter program returned {} instead of NF_ACCEPT", run.verdict).into());
        }
        Ok(f64::from(run.duration_ns))
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}
