//! Throughput through an enforced veth, side by side in one run (issue 10): no program,
//! netsieve enforcing a ~1,000-rule policy, nftables with sets and verdict maps, and a linear
//! iptables chain enforcing the same rules ([`policy`]), and an empty TC program attached where
//! netsieve's are (what the attachment alone costs); each on a one-node bed of its own
//! ([`bed`]), measured with the same load generators ([`load`]) in interleaved rounds.
//!
//! Driven by `agent/benches/throughput.rs` (`cargo xtask bench`, or alone with
//! `cargo xtask bench throughput`).
pub mod bed;
pub mod load;
pub mod policy;

use bed::{AttachEmptyProgram, Bed, BedError, Enforcer};
use load::Cpus;
use std::fmt::Write as _;
use std::time::Duration;

/// The measured rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// 64-byte frames (22-byte UDP payload) as fast as one sender sends them: delivered/s.
    SmallUdp,
    /// 1-byte request, 1-byte response, one TCP connection: transactions/s.
    RequestResponse,
    /// connect, 1-byte request and response, close: connections/s.
    Connections,
    /// One iperf3 stream: bits/s.
    Bulk,
}

/// UDP payload of a 64-byte frame: 64 - 14 (Ethernet) - 20 (IPv4) - 8 (UDP).
pub const SMALL_UDP_PAYLOAD: usize = 22;

impl Rate {
    pub const ALL: [Rate; 4] = [Rate::SmallUdp, Rate::RequestResponse, Rate::Connections, Rate::Bulk];

    /// The short name `NETSIEVE_BENCH_RATES` takes.
    pub fn short_name(self) -> &'static str {
        match self {
            Rate::SmallUdp => "udp",
            Rate::RequestResponse => "rr",
            Rate::Connections => "connections",
            Rate::Bulk => "bulk",
        }
    }

    /// The rates a comma-separated list of short names selects; `None` if a name is unknown.
    pub fn parse_list(list: &str) -> Option<Vec<Rate>> {
        list.split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| Rate::ALL.into_iter().find(|rate| rate.short_name() == name))
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Rate::SmallUdp => "UDP, 64-byte frames",
            Rate::RequestResponse => "TCP request/response, 1 byte",
            Rate::Connections => "TCP connect/request/close",
            Rate::Bulk => "TCP bulk, 1 stream (iperf3)",
        }
    }

    /// The unit shown, and the factor from per-second values to it.
    pub fn unit(self) -> (&'static str, f64) {
        match self {
            Rate::SmallUdp => ("kpackets/s", 1e-3),
            Rate::RequestResponse => ("ktrans/s", 1e-3),
            Rate::Connections => ("kconn/s", 1e-3),
            Rate::Bulk => ("Gbit/s", 1e-9),
        }
    }

    /// One measurement on `bed`: the rate per second, and what else it saw.
    pub fn measure(self, bed: &Bed, seconds: u64, cpus: Cpus) -> Result<Sample, BedError> {
        bed.before_measurement()?;
        let duration = Duration::from_secs(seconds);
        let (client, server) = (bed.client_ns(), bed.server_ns());
        Ok(match self {
            Rate::SmallUdp => {
                let outcome = load::udp_flood(client, server, bed.server(bed::UDP_PORT), SMALL_UDP_PAYLOAD, duration, cpus)?;
                let lost = outcome.sent.saturating_sub(outcome.received);
                Sample {
                    per_second: outcome.delivered_per_second(),
                    note: format!("sent {}, delivered {}, lost {lost}", outcome.sent, outcome.received),
                }
            }
            Rate::RequestResponse => {
                let counted = load::tcp_request_response(client, server, bed.server(bed::REQUEST_RESPONSE_PORT), duration, cpus)?;
                Sample { per_second: counted.per_second(), note: format!("{} transactions", counted.count) }
            }
            Rate::Connections => {
                let counted = load::tcp_connect_request_close(client, server, bed.server(bed::CONNECTIONS_PORT), duration, cpus)?;
                Sample { per_second: counted.per_second(), note: format!("{} connections, {} failed", counted.count, counted.failed) }
            }
            Rate::Bulk => {
                // iperf3 runs one omitted second of slow start before the measured ones.
                let bits = load::iperf3_bulk(client, bed.server(bed::IPERF3_PORT), seconds.saturating_sub(1).max(1), cpus)?;
                Sample { per_second: bits, note: String::new() }
            }
        })
    }
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Sample {
    pub per_second: f64,
    pub note: String,
}

/// How the benchmark runs.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub rounds: usize,
    /// Seconds per measurement.
    pub seconds: u64,
    /// Rules that do not admit the client.
    pub decoys: usize,
    /// Where the client's rule sits among them.
    pub client_position: usize,
    /// Which of [`Rate::ALL`] are measured (all by default; a profile of one rate wants only it).
    pub measured: [bool; Rate::ALL.len()],
}

impl Config {
    /// The measured rates with their index in [`Rate::ALL`].
    pub fn measured_rates(&self) -> impl Iterator<Item = (usize, Rate)> + '_ {
        Rate::ALL.into_iter().enumerate().filter(|(r, _)| self.measured[*r])
    }
}

impl Default for Config {
    fn default() -> Config {
        Config { rounds: 3, seconds: 3, decoys: 999, client_position: 500, measured: [true; Rate::ALL.len()] }
    }
}

/// Every sample, by rate and enforcer, in round order.
pub struct Results {
    pub config: Config,
    pub cpus: Cpus,
    /// `samples[rate][enforcer]`, indexed as [`Rate::ALL`] and [`Enforcer::ALL`].
    pub samples: Vec<Vec<Vec<Sample>>>,
}

/// Builds a bed per enforcer and runs `config.rounds` rounds; within a round each rate is
/// measured on every bed in turn, the order rotating from round to round and rate to rate, so
/// drift of the machine's load falls on every enforcer alike. `progress` gets a line per
/// measurement.
pub fn run(
    config: Config,
    netsieve: &std::path::Path,
    attach_empty: AttachEmptyProgram,
    mut progress: impl FnMut(&str),
) -> Result<(Results, Vec<Bed>), BedError> {
    let cpus = Cpus::split();
    let policy = policy::BenchPolicy::new(config.decoys, config.client_position, &bed::client_ports());
    let mut beds = Vec::new();
    for enforcer in Enforcer::ALL {
        let started = std::time::Instant::now();
        beds.push(Bed::new(enforcer, &policy, netsieve, attach_empty, cpus)?);
        progress(&format!("{} bed ready and checked in {:.1} s", enforcer.name(), started.elapsed().as_secs_f64()));
    }
    let mut samples = vec![vec![Vec::new(); Enforcer::ALL.len()]; Rate::ALL.len()];
    for round in 0..config.rounds {
        for (r, rate) in config.measured_rates() {
            for turn in 0..beds.len() {
                let e = (turn + round + r) % beds.len();
                let sample = rate.measure(&beds[e], config.seconds, cpus)?;
                let (unit, factor) = rate.unit();
                progress(&format!(
                    "round {} {:<30} {:<10} {:>10.2} {unit}  {}",
                    round + 1,
                    rate.name(),
                    beds[e].enforcer.name(),
                    sample.per_second * factor,
                    sample.note
                ));
                samples[r][e].push(sample);
            }
        }
    }
    // The enforcement still holds after the load (nothing failed open or closed under it).
    for bed in &beds {
        bed.check()?;
    }
    Ok((Results { config, cpus, samples }, beds))
}

pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 }
}

impl Results {
    /// Median rate of an enforcer.
    pub fn median(&self, rate: usize, enforcer: usize) -> f64 {
        median(&mut self.samples[rate][enforcer].iter().map(|s| s.per_second).collect::<Vec<_>>())
    }

    /// Median over rounds of the enforcer's rate divided by "no program"'s in the same round.
    pub fn ratio(&self, rate: usize, enforcer: usize) -> f64 {
        let base = &self.samples[rate][0];
        let mut ratios: Vec<f64> =
            self.samples[rate][enforcer].iter().zip(base).map(|(s, b)| s.per_second / b.per_second).collect();
        median(&mut ratios)
    }

    /// The table: rates (medians) and ratios to no program (medians of per-round ratios),
    /// then whether issue 10's goal holds on each rate.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<30} {:<11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10}",
            "rate", "unit", "no program", "netsieve", "nftables", "iptables", "nsv/none", "nft/none", "ipt/none", "empty prog", "empty/none"
        );
        for (r, rate) in self.config.measured_rates() {
            let (unit, factor) = rate.unit();
            let _ = writeln!(
                out,
                "{:<30} {:<11} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>9.3} {:>9.3} {:>9.3} {:>10.2} {:>10.3}",
                rate.name(),
                unit,
                self.median(r, 0) * factor,
                self.median(r, 1) * factor,
                self.median(r, 2) * factor,
                self.median(r, 3) * factor,
                self.ratio(r, 1),
                self.ratio(r, 2),
                self.ratio(r, 3),
                self.median(r, 4) * factor,
                self.ratio(r, 4)
            );
        }
        let _ = writeln!(out, "goal (issue 10): netsieve >= 0.95 of no program on every rate, and ahead of nftables and iptables");
        for (r, rate) in self.config.measured_rates() {
            let (nsv, nft, ipt) = (self.ratio(r, 1), self.ratio(r, 2), self.ratio(r, 3));
            let mut missed = Vec::new();
            if nsv < 0.95 {
                missed.push(format!("{:.1} points under 95%", (0.95 - nsv) * 100.0));
            }
            if nsv <= nft {
                missed.push(format!("behind nftables by {:.1} points", (nft - nsv) * 100.0));
            }
            if nsv <= ipt {
                missed.push(format!("behind iptables by {:.1} points", (ipt - nsv) * 100.0));
            }
            let verdict = if missed.is_empty() { "met".to_string() } else { format!("missed: {}", missed.join(", ")) };
            let _ = writeln!(out, "  {:<30} {verdict}", rate.name());
        }
        out
    }

    /// Every sample, round by round.
    pub fn rounds(&self) -> String {
        let mut out = String::new();
        for (r, rate) in self.config.measured_rates() {
            let (unit, factor) = rate.unit();
            let _ = writeln!(out, "{} ({unit}), per round:", rate.name());
            for (e, enforcer) in Enforcer::ALL.iter().enumerate() {
                let values: Vec<String> = self.samples[r][e].iter().map(|s| format!("{:.2}", s.per_second * factor)).collect();
                let _ = writeln!(out, "  {:<10} {}", enforcer.name(), values.join("  "));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
