//! Upstream's model cluster in the netns harness: namespaces `x`, `y`, `z` with pods `a`, `b`,
//! `c` each, spread over two nodes, every pod serving 80 and 81 over TCP and UDP (and SCTP
//! where the kernel has it), one ClusterIP Service per pod, and kube-proxy emulated
//! ([`crate::kube_proxy`]).
//!
//! All nine pods exist in the network for the test bed's whole life; which of them exist *for
//! the agents* is up to the runner (a case's pods only, as upstream creates only those), and so
//! are the Services: [`Testbed::set_services`] programs one per case pod, with the case's
//! (port, protocol) pairs, the way upstream's `model.go` builds them. Probes go from a pod to
//! another pod's ClusterIP, as upstream's do ([`Testbed::probe_all`]).
use super::format::{PodRef, Protocol, Servers};
use super::model;
use super::state::PodPlacement;
use crate::kube_proxy::{KubeProxy, KubeProxyError, ProxyMode, ServiceSpec, TargetPort};
use crate::netns::{Cluster, NetnsError, Server, Transport, sctp_supported};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Upstream's namespaces and pod names (`model.go`); every case draws its pods from these.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
/// The ports upstream's servers use; a case serves a subset.
pub const PORTS: [u16; 2] = [80, 81];
pub const NODES: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    KubeProxy(#[from] KubeProxyError),
    #[error("the cluster laid out {pod} at {found}, the test bed's layout says {expected}")]
    Layout { pod: String, found: String, expected: String },
    #[error("{0}")]
    Unsupported(String),
}

/// Every pod of the model in layout order, with its node: alternating over the two nodes, so
/// that each namespace has pods on both and every case has same-node and cross-node pairs.
pub fn layout() -> Vec<(PodRef, usize)> {
    NAMESPACES
        .iter()
        .flat_map(|ns| POD_NAMES.iter().map(move |name| PodRef { namespace: ns.to_string(), name: name.to_string() }))
        .enumerate()
        .map(|(index, pod)| (pod, index % NODES))
        .collect()
}

/// The pod's network namespace name in the [`Cluster`] (`x-a`); its servers answer with it.
pub fn netns_pod(pod: &PodRef) -> String {
    format!("{}-{}", pod.namespace, pod.name)
}

/// Where the cluster puts a pod: [`Cluster::new`] gives pod k of node i 10.250.i.(10+k) and
/// node i 172.31.250.(1+i). A pure function, so that tests without root (the semantics
/// comparison) see the same addresses as the agents.
pub fn placement(pod: &PodRef) -> Option<PodPlacement> {
    let layout = layout();
    let (index, (_, node)) = layout.iter().enumerate().find(|(_, (p, _))| p == pod)?;
    let on_node = layout[..index].iter().filter(|(_, n)| n == node).count();
    Some(PodPlacement {
        node: format!("node{node}"),
        node_ip: IpAddr::V4(Ipv4Addr::new(172, 31, 250, 1 + *node as u8)),
        pod_ip: IpAddr::V4(Ipv4Addr::new(10, 250, *node as u8, 10 + on_node as u8)),
    })
}

/// The ClusterIP of the pod's Service `s-<ns>-<pod>`: 10.96.(1+namespace index).(10+pod index),
/// the same in every case.
pub fn cluster_ip(pod: &PodRef) -> Option<Ipv4Addr> {
    let ns = NAMESPACES.iter().position(|n| *n == pod.namespace)?;
    let name = POD_NAMES.iter().position(|n| *n == pod.name)?;
    Some(Ipv4Addr::new(10, 96, 1 + ns as u8, 10 + name as u8))
}

/// `service-port-<protocol>-<port>`, upstream's Service port name.
pub fn service_port_name(port: u16, protocol: Protocol) -> String {
    format!("service-port-{}-{port}", protocol.as_str().to_lowercase())
}

pub fn transport(protocol: Protocol) -> Transport {
    match protocol {
        Protocol::Tcp => Transport::Tcp,
        Protocol::Udp => Transport::Udp,
        Protocol::Sctp => Transport::Sctp,
    }
}

/// The outcome of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connectivity {
    Connected,
    /// Nothing answered within the timeout.
    Blocked,
    /// Another pod answered: the Service emulation is broken, not the policy.
    WrongBackend(String),
}

/// The model cluster and its kube-proxy. Dropping removes the rules, then every namespace.
pub struct Testbed {
    // Declared first: dropped (its rules removed) before the cluster's namespaces go.
    proxy: KubeProxy,
    pub cluster: Cluster,
    /// Whether SCTP sockets can be opened here, and if not why (see [`sctp_supported`]).
    pub sctp: Result<(), String>,
}

impl Testbed {
    /// Builds the cluster (all nine pods), starts every server, installs kube-proxy with no
    /// Service yet.
    pub fn build(tag: &str, mode: ProxyMode) -> Result<Testbed, TestbedError> {
        let layout = layout();
        let names: Vec<(String, usize)> = layout.iter().map(|(pod, node)| (netns_pod(pod), *node)).collect();
        let pods: Vec<(&str, usize)> = names.iter().map(|(name, node)| (name.as_str(), *node)).collect();
        let mut cluster = Cluster::new(tag, NODES, &pods)?;
        for (pod, _) in &layout {
            let expected = placement(pod).map(|p| p.pod_ip.to_string()).unwrap_or_default();
            let found = &cluster.pod(&netns_pod(pod)).ip;
            if *found != expected {
                return Err(TestbedError::Layout { pod: pod.to_string(), found: found.clone(), expected });
            }
        }
        let sctp = sctp_supported();
        for (pod, _) in &layout {
            let name = netns_pod(pod);
            for port in PORTS {
                cluster.serve_tcp(&name, port)?;
                cluster.serve_udp_echo(&name, port)?;
                if sctp.is_ok() {
                    cluster.serve_sctp(&name, port)?;
                }
            }
        }
        let proxy = KubeProxy::install(&cluster, mode)?;
        Ok(Testbed { proxy, cluster, sctp })
    }

    pub fn proxy_mode(&self) -> ProxyMode {
        self.proxy.mode()
    }

    /// One Service per pod of `pods`, with a port per (port, protocol) of `servers` (target
    /// port = port, as upstream's), replacing the Services programmed before. SCTP Services are
    /// programmed also on a kernel without SCTP sockets (netfilter matches SCTP there).
    pub fn set_services(&mut self, pods: &[PodRef], servers: &Servers) -> Result<(), TestbedError> {
        self.cluster.services.clear();
        for pod in pods {
            let ip = cluster_ip(pod).ok_or_else(|| TestbedError::Unsupported(format!("{pod} is not a model pod")))?;
            let mut spec = ServiceSpec::new(&pod.namespace, &model::service_name(pod)).cluster_ip(ip).backends(&[&netns_pod(pod)]);
            for (port, protocol) in model::served(servers) {
                spec = spec.port(&service_port_name(port, protocol), transport(protocol), port, TargetPort::Number(port));
            }
            self.cluster.add_service(spec)?;
        }
        self.proxy.sync(&self.cluster)?;
        Ok(())
    }

    /// Probes every (client, server) cell at once, each from the client pod to the server's
    /// ClusterIP on `port`/`protocol`, bounded by `timeout` (a connection for TCP and SCTP, a
    /// datagram and its echo for UDP), and checks that the answer comes from the server pod.
    pub fn probe_all(&self, cells: &[(PodRef, PodRef)], port: u16, protocol: Protocol, timeout: Duration) -> Vec<Connectivity> {
        let server = match protocol {
            Protocol::Tcp => Server::Tcp,
            Protocol::Udp => Server::UdpEcho,
            Protocol::Sctp => Server::Sctp,
        };
        std::thread::scope(|scope| {
            let probes: Vec<_> = cells
                .iter()
                .map(|(from, to)| {
                    scope.spawn(move || {
                        let Some(ip) = cluster_ip(to) else { return Connectivity::Blocked };
                        let expected = netns_pod(to);
                        match self.cluster.ask(&netns_pod(from), SocketAddr::from((ip, port)), server, timeout) {
                            None => Connectivity::Blocked,
                            Some(answer) if answer.pod == expected => Connectivity::Connected,
                            Some(answer) => Connectivity::WrongBackend(answer.pod),
                        }
                    })
                })
                .collect();
            probes.into_iter().map(|p| p.join().unwrap_or(Connectivity::Blocked)).collect()
        })
    }

    /// The source address the backend sees for one connection from `from` through `to`'s
    /// ClusterIP on TCP port 80 (its Service must be programmed): read from conntrack in the
    /// client's node, the reply tuple's destination. Upstream's ingress rules select clients
    /// by pod, so it must be the client's pod address (kube-proxy masquerades only hairpin and
    /// off-cluster traffic).
    pub fn source_seen_by_backend(&self, from: &PodRef, to: &PodRef) -> Result<(SocketAddr, SocketAddr), TestbedError> {
        let service = self.cluster.service(&to.namespace, &model::service_name(to))?;
        let port = service_port_name(80, Protocol::Tcp);
        let probe = self.proxy.probe(&self.cluster, &netns_pod(from), service, &port, Duration::from_millis(500))?;
        let answer = probe.answer.ok_or_else(|| TestbedError::Unsupported(format!("{from} -> {to}: no answer")))?;
        let node = self.cluster.pod(&netns_pod(from)).node;
        let target = service.addr(&port)?;
        let entry = self
            .proxy
            .conntrack(node)?
            .into_iter()
            .find(|e| e.transport == Transport::Tcp && e.original == (answer.local, target))
            .ok_or_else(|| TestbedError::Unsupported(format!("{from} -> {to}: no conntrack entry for {}", answer.local)))?;
        Ok((answer.local, entry.reply.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_spreads_every_namespace_over_both_nodes() {
        let layout = layout();
        assert_eq!(layout.len(), 9);
        for ns in NAMESPACES {
            let nodes: std::collections::BTreeSet<usize> = layout.iter().filter(|(p, _)| p.namespace == ns).map(|(_, n)| *n).collect();
            assert_eq!(nodes.len(), 2, "{ns}");
        }
        let xa = PodRef { namespace: "x".into(), name: "a".into() };
        let xb = PodRef { namespace: "x".into(), name: "b".into() };
        let xc = PodRef { namespace: "x".into(), name: "c".into() };
        assert_eq!(placement(&xa).map(|p| p.pod_ip.to_string()), Some("10.250.0.10".into()));
        assert_eq!(placement(&xb).map(|p| (p.node, p.pod_ip.to_string())), Some(("node1".into(), "10.250.1.10".into())));
        assert_eq!(placement(&xc).map(|p| p.pod_ip.to_string()), Some("10.250.0.11".into()));
        assert_eq!(cluster_ip(&xc), Some(Ipv4Addr::new(10, 96, 1, 12)));
        assert_eq!(service_port_name(81, Protocol::Udp), "service-port-udp-81");
    }
}
