//! Upstream's model turned into Kubernetes objects: the namespaces, one agnhost pod and one
//! Service per case pod (as `model.go` builds them), and the policies of the case decoded into
//! k8s-openapi's `NetworkPolicy` once the run-time pod IPs they mention are known.
use super::ConformanceError;
use super::format::{NamespaceSpec, PodRef, Protocol, Servers};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, Namespace, Pod, PodSpec, SecurityContext, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The label upstream puts on every pod (`podNameLabelKey`), valued with the pod's name.
pub const POD_LABEL_KEY: &str = "pod";
/// The one container of every pod since upstream's single-container change (PR #136474).
pub const CONTAINER_NAME: &str = "agnhost";
/// The image upstream runs (`imageutils.Agnhost`); its tag follows upstream's image manifest.
pub const AGNHOST_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost";

/// `serve-<port>-<protocol>`: the container port name, which named-port policies refer to.
pub fn port_name(port: u16, protocol: Protocol) -> String {
    format!("serve-{port}-{}", protocol.as_str().to_lowercase())
}

/// `s-<namespace>-<pod>`
pub fn service_name(pod: &PodRef) -> String {
    format!("s-{}-{}", pod.namespace, pod.name)
}

/// The labels a pod starts with.
pub fn initial_pod_labels(pod: &PodRef) -> BTreeMap<String, String> {
    BTreeMap::from([(POD_LABEL_KEY.to_string(), pod.name.clone())])
}

/// Every (port, protocol) a pod serves, in upstream's order (protocols outer, ports inner).
pub fn served(servers: &Servers) -> Vec<(u16, Protocol)> {
    servers.protocols.iter().flat_map(|proto| servers.ports.iter().map(move |port| (*port, *proto))).collect()
}

pub fn namespace_object(spec: &NamespaceSpec) -> Namespace {
    Namespace {
        metadata: ObjectMeta { name: Some(spec.name.clone()), labels: Some(spec.labels.clone()), ..Default::default() },
        ..Default::default()
    }
}

/// The pod `model.go` builds: labels `pod: <name>`, one `agnhost porter` container serving every
/// (port, protocol) of the case through `SERVE_<PROTOCOL>_PORT_<port>` variables.
pub fn pod_object(pod: &PodRef, servers: &Servers) -> Pod {
    let served = served(servers);
    Pod {
        metadata: ObjectMeta {
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            labels: Some(initial_pod_labels(pod)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            termination_grace_period_seconds: Some(0),
            containers: vec![Container {
                name: CONTAINER_NAME.to_string(),
                image: Some(AGNHOST_IMAGE.to_string()),
                image_pull_policy: Some("IfNotPresent".to_string()),
                command: Some(vec!["/agnhost".to_string(), "porter".to_string()]),
                security_context: Some(SecurityContext::default()),
                env: Some(
                    served
                        .iter()
                        .map(|(port, proto)| EnvVar {
                            name: format!("SERVE_{}_PORT_{port}", proto.as_str()),
                            value: Some("foo".to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ports: Some(
                    served
                        .iter()
                        .map(|(port, proto)| ContainerPort {
                            container_port: i32::from(*port),
                            name: Some(port_name(*port, *proto)),
                            protocol: Some(proto.as_str().to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Service upstream puts in front of each pod; probes go to its ClusterIP.
pub fn service_object(pod: &PodRef, servers: &Servers) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(pod)),
            namespace: Some(pod.namespace.clone()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(initial_pod_labels(pod)),
            ports: Some(
                served(servers)
                    .iter()
                    .map(|(port, proto)| ServicePort {
                        name: Some(format!("service-port-{}-{port}", proto.as_str().to_lowercase())),
                        protocol: Some(proto.as_str().to_string()),
                        port: i32::from(*port),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A run-time value a policy mentions: upstream reads a pod's `status.podIP` before building
/// the ipBlock tests' policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// `${host_cidr:ns/pod}`: `<podIP>/32`, or `/128` for IPv6 (upstream's `hostMask`).
    HostCidr(PodRef),
    /// `${large_cidr:ns/pod}`: the /4 holding the pod IP (upstream's `makeLargeCIDRForIP`).
    LargeCidr(PodRef),
}

impl Placeholder {
    pub fn pod(&self) -> &PodRef {
        match self {
            Placeholder::HostCidr(p) | Placeholder::LargeCidr(p) => p,
        }
    }

    fn parse(text: &str) -> Result<Option<Placeholder>, ConformanceError> {
        let Some(inner) = text.strip_prefix("${") else {
            return if text.contains("${") {
                Err(placeholder_error(text, "must be the whole string"))
            } else {
                Ok(None)
            };
        };
        let inner = inner.strip_suffix('}').ok_or_else(|| placeholder_error(text, "is not closed by `}`"))?;
        let (kind, pod) = inner.split_once(':').ok_or_else(|| placeholder_error(text, "has no `:pod`"))?;
        let pod = PodRef::try_from(pod.to_string()).map_err(|e| placeholder_error(text, &e))?;
        match kind {
            "host_cidr" => Ok(Some(Placeholder::HostCidr(pod))),
            "large_cidr" => Ok(Some(Placeholder::LargeCidr(pod))),
            other => Err(placeholder_error(text, &format!("has unknown kind {other:?}"))),
        }
    }

    /// The CIDR text upstream would have put in the policy for this pod IP.
    pub fn render(&self, ip: IpAddr) -> String {
        match self {
            Placeholder::HostCidr(_) => match ip {
                IpAddr::V4(_) => format!("{ip}/32"),
                IpAddr::V6(_) => format!("{ip}/128"),
            },
            Placeholder::LargeCidr(_) => {
                // podIP.Mask(net.CIDRMask(4, 8*len(podIP))): keep the first 4 bits.
                let base = match ip {
                    IpAddr::V4(v4) => IpAddr::from((u32::from(v4) & 0xf000_0000).to_be_bytes()),
                    IpAddr::V6(v6) => IpAddr::from((u128::from(v6) & (0xf_u128 << 124)).to_be_bytes()),
                };
                format!("{base}/4")
            }
        }
    }
}

fn placeholder_error(text: &str, reason: &str) -> ConformanceError {
    ConformanceError::Placeholder { text: text.to_string(), reason: reason.to_string() }
}

/// Every placeholder in a policy as written.
pub fn placeholders(policy: &serde_yaml::Value) -> Result<Vec<Placeholder>, ConformanceError> {
    let mut found = Vec::new();
    visit_strings(policy, &mut |s| {
        if let Some(p) = Placeholder::parse(s)? {
            found.push(p);
        }
        Ok(())
    })?;
    Ok(found)
}

fn visit_strings(
    value: &serde_yaml::Value,
    f: &mut dyn FnMut(&str) -> Result<(), ConformanceError>,
) -> Result<(), ConformanceError> {
    match value {
        serde_yaml::Value::String(s) => f(s),
        serde_yaml::Value::Sequence(items) => items.iter().try_for_each(|v| visit_strings(v, f)),
        serde_yaml::Value::Mapping(map) => map.values().try_for_each(|v| visit_strings(v, f)),
        serde_yaml::Value::Tagged(tagged) => visit_strings(&tagged.value, f),
        _ => Ok(()),
    }
}

fn substitute(
    value: &mut serde_json::Value,
    ip_of: &dyn Fn(&PodRef) -> Option<IpAddr>,
) -> Result<(), ConformanceError> {
    match value {
        serde_json::Value::String(s) => {
            if let Some(p) = Placeholder::parse(s)? {
                let ip = ip_of(p.pod()).ok_or_else(|| placeholder_error(s, "names a pod without an IP"))?;
                *s = p.render(ip);
            }
            Ok(())
        }
        serde_json::Value::Array(items) => items.iter_mut().try_for_each(|v| substitute(v, ip_of)),
        serde_json::Value::Object(map) => map.values_mut().try_for_each(|v| substitute(v, ip_of)),
        _ => Ok(()),
    }
}

/// The policy of a step as the API server would hold it, its placeholders filled in with the
/// pods' IPs. Decoding must lose nothing: the decoded object, encoded again, must equal what the
/// case file says (so a misspelt or misplaced field is an error rather than a dropped rule).
pub fn decode_policy(
    policy: &serde_yaml::Value,
    ip_of: &dyn Fn(&PodRef) -> Option<IpAddr>,
) -> Result<NetworkPolicy, ConformanceError> {
    let mut json = serde_json::to_value(policy)
        .map_err(|e| ConformanceError::Policy(format!("not representable as JSON: {e}")))?;
    substitute(&mut json, ip_of)?;
    let decoded: NetworkPolicy = serde_json::from_value(json.clone())
        .map_err(|e| ConformanceError::Policy(format!("not a NetworkPolicy: {e}")))?;
    let again = serde_json::to_value(&decoded)
        .map_err(|e| ConformanceError::Policy(format!("cannot be encoded again: {e}")))?;
    if again != json {
        return Err(ConformanceError::Policy(format!(
            "decoding changed it (unknown or misplaced field?):\n  written: {json}\n  decoded: {again}"
        )));
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(s: &str) -> PodRef {
        PodRef::try_from(s.to_string()).expect("test pod")
    }

    #[test]
    fn placeholders_render_like_upstream_helpers() {
        let v4: IpAddr = "10.250.1.11".parse().expect("ip");
        let v6: IpAddr = "fd00:250:1::b".parse().expect("ip");
        assert_eq!(Placeholder::HostCidr(pod("x/b")).render(v4), "10.250.1.11/32");
        assert_eq!(Placeholder::HostCidr(pod("x/b")).render(v6), "fd00:250:1::b/128");
        assert_eq!(Placeholder::LargeCidr(pod("x/b")).render(v4), "0.0.0.0/4");
        assert_eq!(Placeholder::LargeCidr(pod("x/b")).render("192.168.1.1".parse().expect("ip")), "192.0.0.0/4");
        assert_eq!(Placeholder::LargeCidr(pod("x/b")).render(v6), "f000::/4");
    }

    #[test]
    fn placeholder_syntax_errors_are_reported() {
        assert!(Placeholder::parse("${host_cidr:x/b}").expect("valid").is_some());
        assert!(Placeholder::parse("10.0.0.0/8").expect("plain").is_none());
        for bad in ["${host_cidr:x/b", "${host_cidr}", "${mask:x/b}", "${host_cidr:xb}", "a${host_cidr:x/b}"] {
            assert!(Placeholder::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn decode_policy_rejects_fields_the_type_does_not_have() {
        let ok: serde_yaml::Value = serde_yaml::from_str(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: x},
              spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: '${host_cidr:x/b}'}}]}], policyTypes: [Egress]}}",
        )
        .expect("yaml");
        let ip = |_: &PodRef| Some("10.250.0.10".parse().expect("ip"));
        let decoded = decode_policy(&ok, &ip).expect("decodes");
        let cidr =
            decoded.spec.and_then(|s| s.egress).and_then(|e| e[0].to.clone()).and_then(|t| t[0].ip_block.clone());
        assert_eq!(cidr.map(|b| b.cidr), Some("10.250.0.10/32".to_string()));

        let misspelt: serde_yaml::Value = serde_yaml::from_str(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: x},
              spec: {podSelector: {}, ingres: [{}]}}",
        )
        .expect("yaml");
        assert!(matches!(decode_policy(&misspelt, &ip), Err(ConformanceError::Policy(_))));
    }

    #[test]
    fn pods_and_services_follow_upstream_naming() {
        let servers = Servers { ports: vec![80, 81], protocols: vec![Protocol::Tcp, Protocol::Udp] };
        let p = pod_object(&pod("x/a"), &servers);
        let container = &p.spec.as_ref().expect("spec").containers[0];
        let names: Vec<_> = container.ports.iter().flatten().filter_map(|p| p.name.clone()).collect();
        assert_eq!(names, ["serve-80-tcp", "serve-81-tcp", "serve-80-udp", "serve-81-udp"]);
        let env: Vec<_> = container.env.iter().flatten().map(|e| e.name.clone()).collect();
        assert_eq!(env, ["SERVE_TCP_PORT_80", "SERVE_TCP_PORT_81", "SERVE_UDP_PORT_80", "SERVE_UDP_PORT_81"]);
        let s = service_object(&pod("x/a"), &servers);
        assert_eq!(s.metadata.name.as_deref(), Some("s-x-a"));
        let ports: Vec<_> =
            s.spec.iter().flat_map(|s| s.ports.iter().flatten()).filter_map(|p| p.name.clone()).collect();
        assert_eq!(ports, ["service-port-tcp-80", "service-port-tcp-81", "service-port-udp-80", "service-port-udp-81"]);
    }
}
