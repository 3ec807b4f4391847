//! Throughput through an enforced veth, side by side in one run (issue 10): small-packet UDP,
//! TCP request/response, TCP connection rate and bulk TCP between two pods of one node, with
//! no program, with the real `netsieve agent --manifests` enforcing a ~1,000-rule ingress
//! policy on the server, with an nftables ruleset (sets and verdict maps) and with a linear
//! iptables chain enforcing the same rules, and, as a reference, an empty TC program attached
//! where netsieve attaches its programs. Ratios are to "no program".
//!
//! Run with `cargo xtask bench` (root), or alone with `cargo xtask bench throughput`.
//! `NETSIEVE_BENCH_ROUNDS` and `NETSIEVE_BENCH_SECONDS` override the rounds (3) and the seconds
//! per measurement (3); `NETSIEVE_BENCH_RATES` (a comma-separated list of `udp`, `rr`,
//! `connections`, `bulk`) measures only those rates. The method is in `netsieve_tests::throughput` and docs/BENCHMARKS.md.
use aya::programs::{SchedClassifier, TcAttachType};
use netsieve_tests::throughput::{self, Config, Rate};
use std::time::Instant;

/// The empty program (`netsieve_pass`, from the agent's own object) attached by TCX to both
/// directions of `interfaces` inside `netns`, as the agent attaches its programs. The returned
/// object holds the links.
fn attach_empty_program(netns: &str, interfaces: &[String]) -> Result<Box<dyn std::any::Any>, String> {
    let interfaces = interfaces.to_vec();
    let attached = netsieve_tests::netns::in_netns(netns, move || -> Result<aya::Ebpf, String> {
        // Loads (and verifies) every program of the object, as the agent does.
        let mut ebpf = netsieve::dataplane::kernel::load().map_err(|e| e.to_string())?.ebpf;
        let program: &mut SchedClassifier = ebpf
            .program_mut("netsieve_pass")
            .ok_or("no program netsieve_pass")?
            .try_into()
            .map_err(|e| format!("netsieve_pass: {e}"))?;
        for interface in &interfaces {
            for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                program.attach(interface, hook).map_err(|e| format!("attaching to {interface} ({hook:?}): {e}"))?;
            }
        }
        Ok(ebpf)
    })
    .map_err(|e| e.to_string())?
    .join()
    .map_err(|_| "the attaching thread panicked".to_string())?
    .map_err(|e| e.to_string())??;
    Ok(Box::new(attached))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let defaults = Config::default();
    let mut measured = defaults.measured;
    if let Ok(list) = std::env::var("NETSIEVE_BENCH_RATES") {
        let Some(rates) = Rate::parse_list(&list) else {
            return Err(format!("NETSIEVE_BENCH_RATES={list}: names are {}", Rate::ALL.map(Rate::short_name).join(", ")).into());
        };
        measured = Rate::ALL.map(|rate| rates.contains(&rate));
    }
    let config = Config {
        measured,
        rounds: env_or("NETSIEVE_BENCH_ROUNDS", defaults.rounds).max(1),
        seconds: env_or("NETSIEVE_BENCH_SECONDS", defaults.seconds).max(2),
        ..defaults
    };
    let cpu = read("/proc/cpuinfo").lines().find_map(|l| l.strip_prefix("model name\t: ").map(str::to_string)).unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = read("/proc/sys/kernel/osrelease");
    let load_before = read("/proc/loadavg");
    let started = Instant::now();
    let netsieve = std::path::Path::new(env!("CARGO_BIN_EXE_netsieve"));
    let (results, mut beds) = throughput::run(config, netsieve, &attach_empty_program, |line| eprintln!("throughput: {line}"))?;
    let load_after = read("/proc/loadavg");
    let agent_exit = beds.iter_mut().find_map(|b| b.stop_agent());
    drop(beds);

    println!(
        "netsieve throughput benchmark: one node namespace routing between a client pod and a server pod (veths); \
         the server's ingress policy has {} rules ({} (CIDR, protocol, port) entries as netfilter rules); \
         {} rounds x {} s per measurement, interleaved; medians (ratios: median of per-round ratios)",
        config.decoys + 1,
        config.decoys + netsieve_tests::throughput::bed::client_ports().len(),
        config.rounds,
        config.seconds
    );
    println!(
        "machine: {cpus} x {cpu}, kernel {}; client/sender pinned to CPU {}, server/receiver to CPU {}; load average before {} after {}",
        kernel.trim(),
        results.cpus.client,
        results.cpus.server,
        load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        load_after.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    print!("{}", results.table());
    print!("{}", results.rounds());
    match agent_exit {
        Some((true, _)) => println!("netsieve agent exited cleanly on SIGTERM"),
        Some((false, log)) => {
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            println!("netsieve agent did NOT exit cleanly; log tail:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        None => println!("netsieve agent was not running at the end"),
    }
    println!("throughput benchmark took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
