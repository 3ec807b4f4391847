//! Services of the netns cluster: a ClusterIP, ports, and the backend pods whose endpoints the
//! EndpointSlice controller would list (named targetPorts resolved on each backend).
use super::KubeProxyError;
use crate::netns::{Cluster, Transport};
use std::net::{Ipv4Addr, SocketAddr};

/// The Service CIDR (kube-apiserver's `--service-cluster-ip-range`; kind's and kubeadm's default).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);

/// Where [`Cluster::add_service`] allocates ClusterIPs that were not given: above the
/// well-known low addresses (10.96.0.1 is `kubernetes`, 10.96.0.10 is `kube-dns`).
const FIRST_ALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 1);

/// A Service port's `targetPort`: a number, or the name of a container port, looked up on
/// each backend pod (so one Service port can reach different numbers on different pods).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// One entry of a Service's `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub transport: Transport,
    pub port: u16,
    pub target_port: TargetPort,
}

impl ServicePort {
    pub fn new(name: &str, transport: Transport, port: u16, target_port: TargetPort) -> ServicePort {
        ServicePort { name: name.to_string(), transport, port, target_port }
    }
}

/// A Service to add to a cluster. `backends` are the pods its selector selects (the harness
/// has no labels; the scenario that writes the manifests says which pods they are).
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// None: allocate one from [`SERVICE_CIDR`].
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    pub backends: Vec<String>,
}

impl ServiceSpec {
    pub fn new(namespace: &str, name: &str) -> ServiceSpec {
        ServiceSpec { namespace: namespace.into(), name: name.into(), cluster_ip: None, ports: Vec::new(), backends: Vec::new() }
    }

    pub fn cluster_ip(mut self, ip: Ipv4Addr) -> ServiceSpec {
        self.cluster_ip = Some(ip);
        self
    }

    pub fn port(mut self, name: &str, transport: Transport, port: u16, target_port: TargetPort) -> ServiceSpec {
        self.ports.push(ServicePort::new(name, transport, port, target_port));
        self
    }

    pub fn backends(mut self, pods: &[&str]) -> ServiceSpec {
        self.backends = pods.iter().map(|p| p.to_string()).collect();
        self
    }
}

/// One backend of one Service port: what kube-proxy DNATs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl Endpoint {
    /// `ip:port`, as kube-proxy names endpoints.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }
}

/// A Service port with its endpoints resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedPort {
    pub port: ServicePort,
    pub endpoints: Vec<Endpoint>,
}

/// A Service as kube-proxy sees it: ClusterIP, ports, endpoints per port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ResolvedPort>,
    /// The backend pods as the spec listed them (for manifests: the Service selects them).
    pub backends: Vec<String>,
}

impl Service {
    /// A port by name.
    pub fn port(&self, name: &str) -> Result<&ResolvedPort, KubeProxyError> {
        self.ports.iter().find(|p| p.port.name == name).ok_or_else(|| KubeProxyError::NoSuchPort {
            service: format!("{}/{}", self.namespace, self.name),
            port: name.to_string(),
        })
    }

    /// ClusterIP:port of a named port.
    pub fn addr(&self, port_name: &str) -> Result<SocketAddr, KubeProxyError> {
        Ok(SocketAddr::from((self.cluster_ip, self.port(port_name)?.port.port)))
    }

    /// kube-proxy's name of a service port: `namespace/name:port` (`namespace/name` when the
    /// port has no name), the text its chain names hash and its rule comments show.
    pub fn port_key(&self, port: &ServicePort) -> String {
        match port.name.as_str() {
            "" => format!("{}/{}", self.namespace, self.name),
            name => format!("{}/{}:{name}", self.namespace, self.name),
        }
    }
}

fn in_service_cidr(ip: Ipv4Addr) -> bool {
    let (network, prefix) = SERVICE_CIDR;
    u32::from(ip) >> (32 - prefix) == u32::from(network) >> (32 - prefix)
}

impl Cluster {
    /// Adds a Service: checks it, gives it a ClusterIP, and resolves each port's endpoints on
    /// the backends the way the EndpointSlice controller does: a numeric targetPort as is, a
    /// named one through the backend's container ports of the same protocol; a backend that
    /// does not declare the name is left out of that port (Kubernetes does the same), so a
    /// port can end up with no endpoints. Kube-proxy emulations program what is added before
    /// they are created or synced ([`super::KubeProxy::sync`]).
    pub fn add_service(&mut self, spec: ServiceSpec) -> Result<Service, KubeProxyError> {
        let key = format!("{}/{}", spec.namespace, spec.name);
        if self.services.iter().any(|s| s.namespace == spec.namespace && s.name == spec.name) {
            return Err(KubeProxyError::InvalidService { service: key, reason: "already exists".into() });
        }
        let taken = |ip: Ipv4Addr| self.services.iter().any(|s| s.cluster_ip == ip);
        let cluster_ip = match spec.cluster_ip {
            Some(ip) if !in_service_cidr(ip) => {
                return Err(KubeProxyError::InvalidService { service: key, reason: format!("ClusterIP {ip} is outside the Service CIDR") });
            }
            Some(ip) if taken(ip) => {
                return Err(KubeProxyError::InvalidService { service: key, reason: format!("ClusterIP {ip} is taken") });
            }
            Some(ip) => ip,
            None => {
                let mut candidate = u32::from(FIRST_ALLOCATED);
                while taken(Ipv4Addr::from(candidate)) {
                    candidate += 1;
                }
                Ipv4Addr::from(candidate)
            }
        };
        if spec.ports.is_empty() {
            return Err(KubeProxyError::InvalidService { service: key, reason: "no ports".into() });
        }
        for (index, port) in spec.ports.iter().enumerate() {
            let clash = spec.ports[..index].iter().any(|p| p.name == port.name || (p.port == port.port && p.transport == port.transport));
            if clash || (spec.ports.len() > 1 && port.name.is_empty()) {
                return Err(KubeProxyError::InvalidService { service: key, reason: format!("port {:?}: names and port/protocol pairs must be unique, and set when there are several ports", port.name) });
            }
        }
        for backend in &spec.backends {
            if !self.pods.iter().any(|p| &p.name == backend) {
                return Err(KubeProxyError::InvalidService { service: key, reason: format!("backend {backend} is not a pod of the cluster") });
            }
        }
        let ports = spec
            .ports
            .iter()
            .map(|port| {
                let endpoints = spec
                    .backends
                    .iter()
                    .map(|name| self.pod(name))
                    .filter_map(|pod| {
                        let number = match &port.target_port {
                            TargetPort::Number(number) => Some(*number),
                            TargetPort::Name(name) => pod
                                .container_ports
                                .iter()
                                .find(|c| &c.name == name && c.transport == port.transport)
                                .map(|c| c.port),
                        }?;
                        let ip = pod.ip.parse::<Ipv4Addr>().ok()?;
                        Some(Endpoint { pod: pod.name.clone(), ip, port: number })
                    })
                    .collect();
                ResolvedPort { port: port.clone(), endpoints }
            })
            .collect();
        let service = Service { namespace: spec.namespace, name: spec.name, cluster_ip, ports, backends: spec.backends };
        self.services.push(service.clone());
        Ok(service)
    }

    /// A Service by namespace and name.
    pub fn service(&self, namespace: &str, name: &str) -> Result<&Service, KubeProxyError> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
            .ok_or_else(|| KubeProxyError::NoSuchService(format!("{namespace}/{name}")))
    }
}
