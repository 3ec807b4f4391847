//! Reading conntrack's table of a node (`conntrack -L`): for a translated connection the
//! original tuple holds the ClusterIP, the reply tuple the backend kube-proxy chose.
use crate::netns::Transport;
use std::net::SocketAddr;

/// One connection tracked by netfilter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConntrackEntry {
    pub transport: Transport,
    /// (source, destination) as the client sent it.
    pub original: (SocketAddr, SocketAddr),
    /// (source, destination) of the replies: the source is the backend after DNAT, the
    /// destination the client, or the node's address after masquerading.
    pub reply: (SocketAddr, SocketAddr),
}

impl ConntrackEntry {
    /// Whether the destination was translated (kube-proxy's DNAT).
    pub fn translated(&self) -> bool {
        self.reply.0 != self.original.1
    }
}

/// Parses `conntrack -L` lines such as
/// `tcp 6 117 TIME_WAIT src=A dst=B sport=1 dport=2 src=B dst=A sport=2 dport=1 [ASSURED] mark=0 use=1`
/// (TCP, UDP and SCTP); other protocols and lines that do not parse are skipped.
pub fn parse(listing: &str) -> Vec<ConntrackEntry> {
    listing.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<ConntrackEntry> {
    let mut words = line.split_whitespace();
    let transport = match words.next()? {
        "tcp" => Transport::Tcp,
        "udp" => Transport::Udp,
        "sctp" => Transport::Sctp,
        _ => return None,
    };
    let mut values: Vec<(&str, &str)> = Vec::new();
    for word in words {
        if let Some((key, value)) = word.split_once('=')
            && ["src", "dst", "sport", "dport"].contains(&key)
        {
            values.push((key, value));
        }
    }
    // Original tuple first, reply tuple second, each as src dst sport dport.
    let tuple = |part: &[(&str, &str)]| -> Option<(SocketAddr, SocketAddr)> {
        let get = |key| part.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let src = format!("{}:{}", get("src")?, get("sport")?).parse().ok()?;
        let dst = format!("{}:{}", get("dst")?, get("dport")?).parse().ok()?;
        Some((src, dst))
    };
    if values.len() < 8 {
        return None;
    }
    Some(ConntrackEntry { transport, original: tuple(&values[..4])?, reply: tuple(&values[4..8])? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_translated_entries() {
        let listing = "tcp      6 117 TIME_WAIT src=10.250.1.10 dst=10.96.0.20 sport=46534 dport=80 src=10.250.0.10 dst=10.250.1.10 sport=8080 dport=46534 [ASSURED] mark=0 use=1\n\
                       udp      17 28 src=10.250.0.12 dst=10.96.0.10 sport=5000 dport=53 [UNREPLIED] src=10.250.1.13 dst=10.250.0.12 sport=53 dport=5000 mark=0 use=1\n\
                       icmp     1 29 src=1.1.1.1 dst=2.2.2.2 type=8 code=0 id=1 src=2.2.2.2 dst=1.1.1.1 type=0 code=0 id=1 mark=0 use=1\n";
        let entries = parse(listing);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].original.1, "10.96.0.20:80".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(entries[0].reply.0, "10.250.0.10:8080".parse().unwrap_or_else(|_| unreachable!()));
        assert!(entries[0].translated() && entries[1].translated());
        assert_eq!(entries[1].transport, Transport::Udp);
    }
}
