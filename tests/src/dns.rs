//! A kube-dns stand-in: the DNS messages a pod's resolver sends and what a cluster DNS server
//! answers, over UDP and TCP (RFC 1035 4.2: over TCP each message has a two-byte length
//! prefix). Messages are built and parsed with `simple-dns`.
//!
//! The responder answers `IN A` for the names it was given (Service names → ClusterIPs) and,
//! like CoreDNS's `chaos` plugin, `CH TXT hostname.bind.` with the name of the pod that
//! answered: the probe through the kube-dns ClusterIP learns which backend kube-proxy chose.
use simple_dns::rdata::{A, RData, TXT};
use simple_dns::{CLASS, Name, Packet, PacketFlag, QCLASS, QTYPE, Question, RCODE, ResourceRecord, TYPE};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// The CHAOS-class name whose TXT record names the server (as CoreDNS's `chaos` plugin does).
pub const HOSTNAME_BIND: &str = "hostname.bind";

/// A question a probe asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsQuestion {
    /// `IN A <name>`.
    Address(String),
    /// `CH TXT hostname.bind.`: which server answers.
    ServerName,
}

/// What came back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsAnswer {
    pub name_error: bool,
    pub addresses: Vec<Ipv4Addr>,
    pub texts: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS message: {0}")]
    Message(#[from] simple_dns::SimpleDnsError),
    #[error("DNS exchange with {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("DNS reply from {addr} has id {got}, expected {want}")]
    WrongId { addr: SocketAddr, got: u16, want: u16 },
    #[error("DNS reply to the query came from {from}, not from {addr}")]
    WrongSource { addr: SocketAddr, from: SocketAddr },
}

/// The answer of a server named `server_name` holding `records` to the message `query`; None
/// for what is not a query (never answered, as servers ignore garbage).
pub fn respond(query: &[u8], server_name: &str, records: &BTreeMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    let query = Packet::parse(query).ok()?;
    if query.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    let mut reply = Packet::new_reply(query.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    let mut found = false;
    for question in &query.questions {
        reply.questions.push(question.clone());
        let name = question.qname.to_string().trim_end_matches('.').to_ascii_lowercase();
        let class_is = |class| matches!(question.qclass, QCLASS::CLASS(c) if c == class);
        if class_is(CLASS::CH) && question.qtype == QTYPE::TYPE(TYPE::TXT) && name == HOSTNAME_BIND {
            found = true;
            let rdata = RData::TXT(TXT::new().with_string(server_name).ok()?);
            reply.answers.push(ResourceRecord::new(question.qname.clone(), CLASS::CH, 0, rdata));
        } else if class_is(CLASS::IN)
            && question.qtype == QTYPE::TYPE(TYPE::A)
            && let Some(ip) = records.get(&name)
        {
            found = true;
            let rdata = RData::A(A { address: u32::from(*ip) });
            reply.answers.push(ResourceRecord::new(question.qname.clone(), CLASS::IN, 30, rdata));
        }
    }
    if !found {
        *reply.rcode_mut() = RCODE::NameError;
    }
    reply.build_bytes_vec().ok()
}

fn query_message(id: u16, question: &DnsQuestion) -> Result<Vec<u8>, DnsError> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    let question = match question {
        DnsQuestion::Address(name) => {
            Question::new(Name::new(name)?, QTYPE::TYPE(TYPE::A), QCLASS::CLASS(CLASS::IN), false)
        }
        DnsQuestion::ServerName => {
            Question::new(Name::new(HOSTNAME_BIND)?, QTYPE::TYPE(TYPE::TXT), QCLASS::CLASS(CLASS::CH), false)
        }
    };
    packet.questions.push(question.into_owned());
    Ok(packet.build_bytes_vec()?)
}

fn parse_answer(addr: SocketAddr, id: u16, bytes: &[u8]) -> Result<DnsAnswer, DnsError> {
    let packet = Packet::parse(bytes)?;
    if packet.id() != id {
        return Err(DnsError::WrongId { addr, got: packet.id(), want: id });
    }
    let mut answer = DnsAnswer { name_error: packet.rcode() == RCODE::NameError, ..DnsAnswer::default() };
    for record in &packet.answers {
        match &record.rdata {
            RData::A(a) => answer.addresses.push(Ipv4Addr::from(a.address)),
            RData::TXT(txt) => {
                answer.texts.extend(txt.iter_raw().map(|(key, value)| match value {
                    Some(value) => format!("{}={}", String::from_utf8_lossy(key), String::from_utf8_lossy(value)),
                    None => String::from_utf8_lossy(key).into_owned(),
                }))
            }
            _ => {}
        }
    }
    Ok(answer)
}

/// Asks `addr` over UDP from a socket of the calling thread's network namespace; the reply must
/// come from `addr` itself (a resolver drops anything else, which is why kube-proxy's reverse
/// translation matters).
pub fn query_udp(addr: SocketAddr, question: &DnsQuestion, timeout: Duration) -> Result<(SocketAddr, DnsAnswer), DnsError> {
    let io = |source| DnsError::Io { addr, source };
    let id = random_id();
    let message = query_message(id, question)?;
    let socket = crate::netns::udp_probe_socket(addr.is_ipv4()).map_err(io)?;
    socket.set_read_timeout(Some(timeout)).map_err(io)?;
    // Connected: the local address is the pod's, and the kernel takes replies from `addr` only.
    socket.connect(addr).map_err(io)?;
    socket.send(&message).map_err(io)?;
    let local = socket.local_addr().map_err(io)?;
    let mut buf = [0u8; 1500];
    let (len, from) = socket.recv_from(&mut buf).map_err(io)?;
    if from != addr {
        return Err(DnsError::WrongSource { addr, from });
    }
    Ok((local, parse_answer(addr, id, &buf[..len])?))
}

/// Asks `addr` over TCP (length-prefixed messages).
pub fn query_tcp(addr: SocketAddr, question: &DnsQuestion, timeout: Duration) -> Result<(SocketAddr, DnsAnswer), DnsError> {
    let io = |source| DnsError::Io { addr, source };
    let id = random_id();
    let message = query_message(id, question)?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let local = stream.local_addr().map_err(io)?;
    let len = u16::try_from(message.len()).map_err(|_| io(std::io::Error::other("query longer than 64 KiB")))?;
    stream.write_all(&len.to_be_bytes()).map_err(io)?;
    stream.write_all(&message).map_err(io)?;
    let mut prefix = [0u8; 2];
    stream.read_exact(&mut prefix).map_err(io)?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    stream.read_exact(&mut reply).map_err(io)?;
    Ok((local, parse_answer(addr, id, &reply)?))
}

/// Serves one TCP connection: length-prefixed queries until the client closes.
pub fn serve_tcp_connection(mut stream: TcpStream, server_name: &str, records: &BTreeMap<String, Ipv4Addr>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut prefix = [0u8; 2];
    while stream.read_exact(&mut prefix).is_ok() {
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
        if stream.read_exact(&mut query).is_err() {
            return;
        }
        let Some(reply) = respond(&query, server_name, records) else { return };
        let Ok(len) = u16::try_from(reply.len()) else { return };
        if stream.write_all(&len.to_be_bytes()).and_then(|()| stream.write_all(&reply)).is_err() {
            return;
        }
    }
}

/// A query id: clock nanoseconds are random enough for a test resolver.
fn random_id() -> u16 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (nanos ^ (nanos >> 16)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_addresses_and_its_own_name() {
        let records = BTreeMap::from([("web.shop.svc.cluster.local".to_string(), Ipv4Addr::new(10, 96, 0, 20))]);
        let addr: SocketAddr = "10.96.0.10:53".parse().unwrap_or_else(|_| unreachable!());
        let query = query_message(7, &DnsQuestion::Address("web.shop.svc.cluster.local".into())).expect("query");
        let reply = respond(&query, "coredns-1", &records).expect("reply");
        let answer = parse_answer(addr, 7, &reply).expect("answer");
        assert_eq!(answer.addresses, vec![Ipv4Addr::new(10, 96, 0, 20)]);
        assert!(!answer.name_error);

        let query = query_message(8, &DnsQuestion::ServerName).expect("query");
        let answer = parse_answer(addr, 8, &respond(&query, "coredns-1", &records).expect("reply")).expect("answer");
        assert_eq!(answer.texts, vec!["coredns-1".to_string()]);

        let query = query_message(9, &DnsQuestion::Address("nothing.svc.cluster.local".into())).expect("query");
        let answer = parse_answer(addr, 9, &respond(&query, "coredns-1", &records).expect("reply")).expect("answer");
        assert!(answer.name_error && answer.addresses.is_empty());
        assert!(respond(b"garbage", "coredns-1", &records).is_none());
    }
}
