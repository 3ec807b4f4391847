//! In-kernel cost per packet of the enforcement programs, measured with `BPF_PROG_TEST_RUN`
//! (large repeat count, the kernel times the loop) beside an empty TC program in the same run.
//! Run with `cargo xtask bench` (root). Prints ns/packet and the ratio to the empty program.
use netsieve::dataplane::compile::{DirectionInput, PeerInput, PortSetInput, RuleInput, compile_direction};
use netsieve::dataplane::kernel::{self, PROGRAM_PASS, PROGRAM_TO_POD};
use netsieve::dataplane::lpm::{CidrSet, to_mapped};
use netsieve::dataplane::maps::KernelMaps;
use netsieve::dataplane::packet::{L4, PacketSpec, TCP_ACK};
use netsieve::dataplane::sync::{Capacity, EndpointProgram, NodeProgram, Synchronizer};
use netsieve::dataplane::testrun::{RETURN_DROP, RETURN_PASS, run_classifier};
use netsieve_common::{IpcacheValue, PROTO_TCP};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    kernel::raise_memlock_rlimit();
    let mut ebpf = kernel::load()?;
    let mut maps = KernelMaps::take_from(&mut ebpf)?;
    let allowed = PacketSpec::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        L4::Tcp { src_port: 40000, dst_port: 80, flags: TCP_ACK },
    )
    .frame();
    let denied = PacketSpec::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3)),
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        L4::Tcp { src_port: 40000, dst_port: 81, flags: TCP_ACK },
    )
    .frame();

    println!("netsieve dataplane benchmark: BPF_PROG_TEST_RUN, {REPEAT} repeats x {ROUNDS} rounds, median round");
    println!("{:<44} {:>10} {:>16}", "case", "ns/packet", "x empty program");
    let mut sync = Synchronizer::with_capacity(Capacity::default());
    for (label, extra) in [("small policy", 9usize), ("100k rule entries", 100_000usize)] {
        let (program, ipcache) = scenario(extra);
        let mut node = NodeProgram { ipcache, ..Default::default() };
        node.endpoints.insert("bench/pod".into(), program);
        sync.sync(&mut maps, &node)?;
        let counts = sync.entry_counts();
        let total = counts.identity + counts.cidr + counts.port;
        let empty = measure(&mut ebpf, PROGRAM_PASS, &allowed, RETURN_PASS)?;
        let pass = measure(&mut ebpf, PROGRAM_TO_POD, &allowed, RETURN_PASS)?;
        let drop = measure(&mut ebpf, PROGRAM_TO_POD, &denied, RETURN_DROP)?;
        println!("{:<44} {:>10.1} {:>16}", format!("empty TC program ({label})"), empty, "1.00");
        println!("{:<44} {:>10.1} {:>16.2}", format!("allowed packet, {total} entries"), pass, pass / empty);
        println!("{:<44} {:>10.1} {:>16.2}", format!("denied packet, {total} entries"), drop, drop / empty);
    }
    Ok(())
}

/// The endpoint on loopback: identity 300 may use TCP 80, plus `extra` filler entries split
/// over the three policy maps (identities, /32 CIDRs, single ports) that never match the probes.
fn scenario(extra: usize) -> (EndpointProgram, std::collections::BTreeMap<ipnet::Ipv6Net, IpcacheValue>) {
    let per_map = extra / 3;
    let identities: BTreeSet<u32> = std::iter::once(300).chain((0..per_map as u32).map(|i| 100_000 + i)).collect();
    let addresses: BTreeSet<IpAddr> =
        (0..per_map as u32).map(|i| IpAddr::V4(Ipv4Addr::from(0xac10_0000u32 + i * 2))).collect();
    let ports: BTreeSet<(u8, u16, u16)> =
        std::iter::once((PROTO_TCP, 80, 80)).chain((0..per_map as u16).map(|i| (PROTO_TCP, 1000 + i * 2, 1000 + i * 2))).collect();
    let mut rules = vec![RuleInput { peers: vec![PeerInput::Identities(identities)], ports: PortSetInput::Ranges(ports) }];
    if per_map > 0 {
        rules.push(RuleInput { peers: vec![PeerInput::Addresses(addresses)], ports: PortSetInput::Ranges([(PROTO_TCP, 9, 9)].into()) });
    } else {
        rules.push(RuleInput {
            peers: vec![PeerInput::Cidr(CidrSet { net: to_mapped("192.168.0.0/16".parse().unwrap_or_default()), except: vec![] })],
            ports: PortSetInput::Ranges([(PROTO_TCP, 443, 443)].into()),
        });
    }
    let ingress = compile_direction(&DirectionInput { isolated: true, rules }).unwrap_or_default();
    let program = EndpointProgram { ifindex: 1, identity: 400, allow_host: true, ingress, ..Default::default() };
    let mut ipcache = std::collections::BTreeMap::new();
    for (ip, identity) in [("10.0.0.2", 300u32), ("10.0.0.3", 301)] {
        let ip: IpAddr = ip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        ipcache.insert(to_mapped(ip.into()), IpcacheValue { identity, flags: 0 });
    }
    (program, ipcache)
}

/// Median over rounds of the kernel-timed average per packet.
fn measure(ebpf: &mut aya::Ebpf, program: &'static str, frame: &[u8], expect: u32) -> Result<f64, Box<dyn std::error::Error>> {
    let classifier = kernel::classifier(ebpf, program)?;
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let result = run_classifier(classifier, frame, 1, REPEAT)?;
        if result.return_value != expect {
            return Err(format!("{program} returned {} instead of {expect}", result.return_value).into());
        }
        // With a repeat count the kernel reports the mean duration of one run.
        rounds.push(result.duration.as_nanos() as f64);
    }
    rounds.sort_by(|a, b| a.total_cmp(b));
    Ok(rounds[ROUNDS / 2])
}
