//! Kubernetes Services in the netns cluster, and kube-proxy emulated with the rules it really
//! programs: iptables mode ([`iptables`], x_tables through `iptables-legacy`) or nftables mode
//! ([`nftables`], `table ip kube-proxy`), written into every node's network namespace and
//! nowhere else. Real traffic to a ClusterIP is DNATed by netfilter to a backend chosen at
//! random, replies are translated back (the client sees the ClusterIP), a pod reaching itself
//! is hairpin-masqueraded.
//!
//! Which backend netfilter chose for a connection is read from the packet counter of each
//! endpoint's DNAT rule, before and after a probe that sends exactly one connection attempt
//! ([`KubeProxy::probe`]): that works also for connections that are then dropped, which leave
//! no conntrack entry (an unconfirmed entry dies with its packet). For connections that get
//! through, conntrack's entry ([`KubeProxy::conntrack`]) and the server's answer (its pod name)
//! say the same, and the probe checks that they do.
//!
//! ```text
//! cluster.declare_port("web-a", "http", Transport::Tcp, 8080);
//! cluster.add_service(ServiceSpec::new("shop", "web").port("http", Transport::Tcp, 80, TargetPort::Name("http".into())).backends(&["web-a", "web-b"]))?;
//! let proxy = KubeProxy::iptables(&cluster)?;           // or KubeProxy::nftables
//! let probe = proxy.probe(&cluster, "client", cluster.service("shop", "web")?, "http", timeout)?;
//! // probe.chosen: the endpoint netfilter DNATed to; probe.answer: who answered, if anyone
//! ```
pub mod conntrack;
pub mod iptables;
pub mod nftables;
pub mod service;

use crate::netns::{Answer, Cluster, NetnsError, run_in};
pub use conntrack::ConntrackEntry;
pub use service::{Endpoint, ResolvedPort, SERVICE_CIDR, Service, ServicePort, ServiceSpec, TargetPort};
use std::collections::BTreeMap;
use std::time::Duration;

/// The pods' address range (kube-proxy's `--cluster-cidr`, its local traffic detector): traffic
/// to a ClusterIP from outside it is masqueraded.
pub const CLUSTER_CIDR: &str = "10.250.0.0/16";

/// kube-proxy's masquerade mark: bit 14 (`--iptables-masquerade-bit`'s default).
pub const MASQUERADE_MARK: &str = "0x4000";

#[derive(Debug, thiserror::Error)]
pub enum KubeProxyError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("Service {service}: {reason}")]
    InvalidService { service: String, reason: String },
    #[error("no Service {0}")]
    NoSuchService(String),
    #[error("Service {service} has no port named {port:?}")]
    NoSuchPort { service: String, port: String },
    #[error("reading nft's JSON listing: {0}")]
    Listing(#[from] serde_json::Error),
    #[error("probe {from} -> {service}: {reason}")]
    Probe { from: String, service: String, reason: String },
}

/// Which proxier is emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Iptables,
    Nftables,
}

impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
        })
    }
}

/// The DNAT rule of one endpoint of one Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnatRule {
    /// `namespace/name:port`.
    pub service_port: String,
    pub endpoint: Endpoint,
}

/// What one connection attempt through a ClusterIP did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceProbe {
    /// The endpoint netfilter DNATed the attempt to; None when the packet never reached
    /// kube-proxy's rules (dropped before netfilter's NAT hook).
    pub chosen: Option<Endpoint>,
    /// Who answered, if anyone did.
    pub answer: Option<Answer>,
}

/// kube-proxy's rules in every node of a cluster. Dropping removes them (best effort; deleting
/// the namespaces removes them too).
pub struct KubeProxy {
    mode: ProxyMode,
    nodes: Vec<String>,
    /// Endpoint chain name → its DNAT rule, for reading counters.
    rules: BTreeMap<String, DnatRule>,
    services: Vec<Service>,
}

impl KubeProxy {
    /// iptables mode (`iptables-legacy`) for the cluster's Services, in every node.
    pub fn iptables(cluster: &Cluster) -> Result<KubeProxy, KubeProxyError> {
        KubeProxy::install(cluster, ProxyMode::Iptables)
    }

    /// nftables mode (`table ip kube-proxy`) for the cluster's Services, in every node.
    pub fn nftables(cluster: &Cluster) -> Result<KubeProxy, KubeProxyError> {
        KubeProxy::install(cluster, ProxyMode::Nftables)
    }

    pub fn install(cluster: &Cluster, mode: ProxyMode) -> Result<KubeProxy, KubeProxyError> {
        let mut proxy = KubeProxy { mode, nodes: cluster.nodes.iter().map(|n| n.netns.clone()).collect(), rules: BTreeMap::new(), services: Vec::new() };
        proxy.sync(cluster)?;
        Ok(proxy)
    }

    pub fn mode(&self) -> ProxyMode {
        self.mode
    }

    /// Programs the cluster's current Services, replacing what was programmed before (as a
    /// kube-proxy sync does).
    pub fn sync(&mut self, cluster: &Cluster) -> Result<(), KubeProxyError> {
        self.services = cluster.services.clone();
        self.rules.clear();
        for service in &self.services {
            for resolved in &service.ports {
                for endpoint in &resolved.endpoints {
                    let chain = match self.mode {
                        ProxyMode::Iptables => iptables::endpoint_chain(service, &resolved.port, endpoint),
                        ProxyMode::Nftables => nftables::endpoint_chain(service, &resolved.port, endpoint),
                    };
                    let rule = DnatRule { service_port: service.port_key(&resolved.port), endpoint: endpoint.clone() };
                    self.rules.insert(chain, rule);
                }
            }
        }
        for netns in &self.nodes {
            match self.mode {
                ProxyMode::Iptables => self.program_iptables(netns)?,
                ProxyMode::Nftables => {
                    run_in(netns, "nft", &["-f", "-"], Some(&nftables::transaction(&self.services)))?;
                }
            }
        }
        Ok(())
    }

    fn program_iptables(&self, netns: &str) -> Result<(), KubeProxyError> {
        let before = run_in(netns, iptables::SAVE, &[], None)?;
        run_in(netns, iptables::RESTORE, &["--noflush"], Some(&iptables::restore_input(&self.services)))?;
        for (table, chain, args) in iptables::JUMPS {
            let check: Vec<&str> = ["-w", "-t", table, "-C", chain].iter().copied().chain(args.iter().copied()).collect();
            if run_in(netns, iptables::IPTABLES, &check, None).is_err() {
                let insert: Vec<&str> = ["-w", "-t", table, "-I", chain].iter().copied().chain(args.iter().copied()).collect();
                run_in(netns, iptables::IPTABLES, &insert, None)?;
            }
        }
        // Chains of Services or endpoints that are gone: nothing jumps to them any more.
        let current = iptables::restore_input(&self.services);
        let stale: Vec<&str> = before
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| (c.starts_with("KUBE-SVC-") || c.starts_with("KUBE-SEP-")) && !current.contains(&format!(":{c} ")))
            .collect();
        if !stale.is_empty() {
            let mut text = String::from("*nat\n");
            for chain in &stale {
                text.push_str(&format!(":{chain} - [0:0]\n"));
            }
            for chain in &stale {
                text.push_str(&format!("-X {chain}\n"));
            }
            text.push_str("COMMIT\n");
            run_in(netns, iptables::RESTORE, &["--noflush"], Some(&text))?;
        }
        Ok(())
    }

    /// The rules as the tools list them in node `node` (`iptables-legacy-save` or `nft list`).
    pub fn ruleset(&self, node: usize) -> Result<String, KubeProxyError> {
        Ok(match self.mode {
            ProxyMode::Iptables => run_in(&self.nodes[node], iptables::SAVE, &[], None)?,
            ProxyMode::Nftables => run_in(&self.nodes[node], "nft", &["list", "table", "ip", nftables::TABLE], None)?,
        })
    }

    /// How many new connections each endpoint's DNAT rule has translated in node `node`.
    pub fn dnat_counts(&self, node: usize) -> Result<BTreeMap<DnatRule, u64>, KubeProxyError> {
        let netns = &self.nodes[node];
        Ok(match self.mode {
            ProxyMode::Iptables => iptables::dnat_counts(&run_in(netns, iptables::SAVE, &["-c", "-t", "nat"], None)?, &self.rules),
            ProxyMode::Nftables => {
                nftables::dnat_counts(&run_in(netns, "nft", &["-j", "list", "table", "ip", nftables::TABLE], None)?, &self.rules)?
            }
        })
    }

    /// Node `node`'s conntrack table (TCP and UDP entries).
    pub fn conntrack(&self, node: usize) -> Result<Vec<ConntrackEntry>, KubeProxyError> {
        Ok(conntrack::parse(&run_in(&self.nodes[node], "conntrack", &["-L"], None)?))
    }

    /// One connection attempt (or one datagram) from pod `from` to `service`'s port
    /// `port_name` at its ClusterIP, bounded by `timeout` (keep it under 1 s: one SYN), and
    /// which endpoint netfilter chose for it (from the DNAT counters of `from`'s node, where
    /// the translation happens). Probes through one node must not run concurrently. When the
    /// probe gets an answer, the answering pod must be the chosen endpoint and conntrack must
    /// show the translation; otherwise the emulation is broken and this is an error.
    pub fn probe(&self, cluster: &Cluster, from: &str, service: &Service, port_name: &str, timeout: Duration) -> Result<ServiceProbe, KubeProxyError> {
        let error = |reason: String| KubeProxyError::Probe { from: from.to_string(), service: format!("{}/{}:{port_name}", service.namespace, service.name), reason };
        let resolved = service.port(port_name)?;
        let key = service.port_key(&resolved.port);
        let transport = resolved.port.transport;
        let mut servers = resolved.endpoints.iter().map(|e| cluster.server(&e.pod, e.port, transport));
        let server = match servers.next() {
            Some(Some(server)) if servers.all(|s| s == Some(server)) => server,
            _ => return Err(error("its endpoints do not all run the same kind of server".into())),
        };
        let node = cluster.pod(from).node;
        let counts = |proxy: &KubeProxy| -> Result<BTreeMap<DnatRule, u64>, KubeProxyError> {
            Ok(proxy.dnat_counts(node)?.into_iter().filter(|(rule, _)| rule.service_port == key).collect())
        };
        let target = service.addr(port_name)?;
        let before = counts(self)?;
        let answer = cluster.ask(from, target, server, timeout);
        let after = counts(self)?;
        let mut chosen = Vec::new();
        for (rule, count) in &after {
            let delta = count - before.get(rule).copied().unwrap_or(0);
            chosen.extend(std::iter::repeat_n(rule.endpoint.clone(), delta as usize));
        }
        if chosen.len() > 1 {
            return Err(error(format!("{} translations during one attempt (concurrent probes through node {node}?): {chosen:?}", chosen.len())));
        }
        let chosen = chosen.pop();
        if let Some(answer) = &answer {
            let Some(endpoint) = &chosen else {
                return Err(error(format!("{} answered, but no DNAT rule counted the connection", answer.pod)));
            };
            if endpoint.pod != answer.pod {
                return Err(error(format!("netfilter chose {endpoint:?}, but {} answered", answer.pod)));
            }
            let entries = self.conntrack(node)?;
            let tracked = entries.iter().any(|e| {
                e.transport == transport && e.original == (answer.local, target) && e.reply.0 == endpoint.addr()
            });
            if !tracked {
                return Err(error(format!("conntrack has no entry {} -> {} translated to {}", answer.local, service.cluster_ip, endpoint.addr())));
            }
        }
        Ok(ServiceProbe { chosen, answer })
    }

    /// Removes the rules from every node.
    pub fn uninstall(&mut self) -> Result<(), KubeProxyError> {
        for netns in &self.nodes {
            match self.mode {
                ProxyMode::Iptables => {
                    for (table, chain, args) in iptables::JUMPS {
                        let delete: Vec<&str> = ["-w", "-t", table, "-D", chain].iter().copied().chain(args.iter().copied()).collect();
                        let _ = run_in(netns, iptables::IPTABLES, &delete, None);
                    }
                    let save = run_in(netns, iptables::SAVE, &[], None)?;
                    run_in(netns, iptables::RESTORE, &["--noflush"], Some(&iptables::removal_input(&save)))?;
                }
                ProxyMode::Nftables => {
                    run_in(netns, "nft", &["delete", "table", "ip", nftables::TABLE], None)?;
                }
            }
        }
        self.nodes.clear();
        Ok(())
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        let _ = self.uninstall();
    }
}
