//! What the CNI plugin told the agent about the sandboxes of this node's pods.
//!
//! A registration (from CNI ADD) gives a pod's host-side interface and its addresses before
//! the Pod object has them: the kubelet writes `status.podIPs` only after ADD returns. The
//! agent uses the registered interface for the pod (ahead of what discovery finds: the
//! runtime said so) and the registered addresses while the Pod object has none of its own.
//! Registrations live until CNI DEL of the same sandbox, the pod's deletion, or their
//! interface disappearing.
use super::agent::Agent;
use crate::controller::ObjectKind;
use crate::controller::{KubeObject, ObjectEvent};
use crate::dataplane::discovery;
use crate::node_api::{CniAttachment, CniDetachment, Enforcement, EnforcementMode, ErrorCode, Request, Response};
use k8s_openapi::api::core::v1::{Pod, PodIP, PodStatus};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// One pod's sandbox as CNI ADD described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Registration {
    pub container_id: String,
    pub ifindex: u32,
    pub interface: String,
    pub ips: Vec<IpAddr>,
    pub added: Instant,
}

/// A CNI ADD waiting for its Pod object, its endpoint attached fail-closed meanwhile.
pub(super) struct ParkedAdd {
    pub key: String,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Response>,
}

/// Registrations by pod key (`namespace/name`).
#[derive(Debug, Default)]
pub(super) struct Registry {
    pods: BTreeMap<String, Registration>,
}

impl Registry {
    pub fn register(&mut self, key: String, registration: Registration) {
        self.pods.insert(key, registration);
    }

    /// Forgets the pod's registration if it is of this sandbox; whether there was one.
    pub fn remove_sandbox(&mut self, key: &str, container_id: &str) -> bool {
        if self.pods.get(key).is_some_and(|r| r.container_id == container_id) {
            self.pods.remove(key);
            return true;
        }
        false
    }

    pub fn remove(&mut self, key: &str) -> Option<Registration> {
        self.pods.remove(key)
    }

    pub fn get(&self, key: &str) -> Option<&Registration> {
        self.pods.get(key)
    }

    pub fn ifindex_of(&self, key: &str) -> Option<u32> {
        self.pods.get(key).map(|r| r.ifindex)
    }

    /// The interface name of a registered ifindex (a new interface may not have reached the
    /// discovery snapshot yet).
    pub fn interface_name(&self, ifindex: u32) -> Option<&str> {
        self.pods.values().find(|r| r.ifindex == ifindex).map(|r| r.interface.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Registration)> {
        self.pods.iter()
    }

    /// Drops registrations whose interface no longer exists (`exists` asks the kernel).
    pub fn retain_existing(&mut self, exists: impl Fn(&Registration) -> bool) -> Vec<String> {
        let gone: Vec<String> = self.pods.iter().filter(|(_, r)| !exists(r)).map(|(k, _)| k.clone()).collect();
        for key in &gone {
            self.pods.remove(key);
        }
        gone
    }

    /// A Pod object with the registered addresses when it has none of its own.
    pub fn patch(&self, pod: &mut Pod) {
        let key = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        let Some(registration) = self.pods.get(&key) else { return };
        let status = pod.status.get_or_insert_with(PodStatus::default);
        let has_own = status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
            || status.pod_ips.as_ref().is_some_and(|ips| !ips.is_empty());
        if has_own {
            return;
        }
        status.pod_ip = registration.ips.first().map(IpAddr::to_string);
        status.pod_ips = Some(registration.ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
    }
}

/// The index of the interface called `name`, if it exists.
pub(super) fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// What a CNI ADD comes to.
enum AddOutcome {
    Answer(Response),
    /// Fail-closed endpoint attached; waiting for the Pod object.
    Park(String),
}

impl Agent {
    /// Answers a request of the node API that needs the agent's state. An ADD waiting for its
    /// Pod object is parked with its reply (answered by [`Agent::resolve_parked`]).
    pub(super) fn handle_node_request(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        let response = match request {
            Request::CniAdd(attachment) => match self.cni_add(attachment) {
                AddOutcome::Answer(response) => response,
                AddOutcome::Park(key) => {
                    let wait = Duration::from_millis(self.args.cni_pod_wait_ms);
                    tracing::info!(pod = %key, ?wait, "CNI ADD waits for the Pod object; fail-closed meanwhile");
                    self.parked.push(ParkedAdd { key, deadline: Instant::now() + wait, reply });
                    return;
                }
            },
            Request::CniCheck(attachment) => self.cni_check(&attachment),
            Request::CniDel(detachment) => self.cni_del(&detachment),
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Explain(query) => {
                // Answered from a blocking thread once conntrack is read.
                self.explain_live(query, reply);
                return;
            }
            // The socket server serves subscriptions itself.
            Request::Subscribe(_) => Response::error(ErrorCode::Invalid, "subscribe is answered by the socket server"),
            // The socket server answers pings itself.
            Request::Ping => Response::Pong { agent_version: env!("CARGO_PKG_VERSION").to_string(), node: self.args.node.clone() },
        };
        let _ = reply.send(response);
    }

    /// The host-side interface of an attachment: the first candidate that exists and is a
    /// veth (the bridge plugin also lists its bridge; anything but a pod's veth, such as the
    /// node's uplink, must never be programmed on a client's word).
    fn resolve_interface(&self, attachment: &CniAttachment) -> Result<(u32, String), Response> {
        let mut seen = Vec::new();
        for name in &attachment.host_interfaces {
            let Some(ifindex) = interface_index(name) else {
                seen.push(format!("{name}: no such interface"));
                continue;
            };
            match discovery::link_kind(ifindex) {
                Ok(Some(kind)) if kind == "veth" => return Ok((ifindex, name.clone())),
                Ok(kind) => seen.push(format!("{name}: {} interface, not a veth", kind.as_deref().unwrap_or("plain"))),
                Err(error) => seen.push(format!("{name}: {error}")),
            }
        }
        Err(Response::error(ErrorCode::NoInterface, format!("no pod veth among the host interfaces ({})", seen.join("; "))))
    }

    fn sources_synced(&self) -> bool {
        match &self.args.manifests {
            Some(_) => self.manifests_loaded,
            None => self.listed.len() == ObjectKind::ALL.len(),
        }
    }

    /// Whether the agent knows `key` as a Pod of this node (with or without addresses).
    fn is_local_pod(&self, key: &str) -> bool {
        match &self.args.manifests {
            Some(_) => self.last_loaded.as_ref().and_then(|s| s.pods.get(key)).is_some_and(|p| p.node.as_deref() == Some(self.args.node.as_str()) && !p.host_network),
            None => self.pod_objects.contains_key(key),
        }
    }

    fn cni_add(&mut self, attachment: CniAttachment) -> AddOutcome {
        let key = attachment.pod.key();
        let (ifindex, interface) = match self.resolve_interface(&attachment) {
            Ok(found) => found,
            Err(response) => return AddOutcome::Answer(response),
        };
        tracing::info!(pod = %key, %interface, ifindex, ips = ?attachment.ips, container = %attachment.container_id, "CNI ADD");
        self.cni.register(
            key.clone(),
            Registration { container_id: attachment.container_id.clone(), ifindex, interface, ips: attachment.ips.clone(), added: Instant::now() },
        );
        if self.sources_synced() && self.is_local_pod(&key) {
            self.reprogram_pod(&key);
            if let Some(enforcement) = self.enforcement(&key).filter(|e| e.mode == EnforcementMode::Policy) {
                self.drop_placeholder(&key);
                return AddOutcome::Answer(Response::CniAdded { enforcement });
            }
        }
        // The Pod object is not known yet (or the sources are not in sync): nothing but node
        // traffic may pass until it is.
        let ips = attachment.ips.clone();
        self.reconcile(|controller, maps, _| {
            let dirty = controller.compiler.set_placeholder(&controller.state, &key, Some(ifindex), &ips);
            controller.sync.sync_dirty(maps, controller.compiler.program(), &dirty)
        });
        if self.enforcement(&key).is_none() {
            return AddOutcome::Answer(Response::error(ErrorCode::Internal, "the pod's endpoint could not be programmed or attached; see the agent's log"));
        }
        AddOutcome::Park(key)
    }

    /// Re-applies a pod whose registration changed (its interface, or its addresses while the
    /// Pod object has none).
    fn reprogram_pod(&mut self, key: &str) {
        let received = Instant::now();
        match &self.args.manifests {
            Some(_) => {
                self.replace_with_loaded(received);
            }
            None => {
                let Some(mut pod) = self.pod_objects.get(key).cloned() else { return };
                self.cni.patch(&mut pod);
                let events = vec![ObjectEvent::Applied(KubeObject::Pod(Box::new(pod)))];
                self.reconcile(|controller, maps, interface_of| controller.apply_events(maps, events, received, interface_of));
            }
        }
        // The interface changed even when the Pod object did not.
        self.reconcile(|controller, maps, interface_of| controller.refresh_interfaces(maps, received, interface_of));
    }

    /// How `key` is enforced now: its endpoint programmed, live in the maps and attached.
    pub(super) fn enforcement(&self, key: &str) -> Option<Enforcement> {
        let program = self.controller.compiler.program().endpoints.get(key)?;
        let live = self.controller.sync.live_endpoints().any(|(name, _, ifindex)| name == key && ifindex == program.ifindex);
        if !live || !self.dataplane.attachments.is_attached(program.ifindex) {
            return None;
        }
        let (mode, ips) = if self.controller.compiler.is_placeholder(key) {
            (EnforcementMode::FailClosed, self.cni.get(key).map(|r| r.ips.clone()).unwrap_or_default())
        } else {
            (EnforcementMode::Policy, self.controller.state.pods.get(key).map(|p| p.ips.clone()).unwrap_or_default())
        };
        Some(Enforcement { ifindex: program.ifindex, mode, ips })
    }

    fn drop_placeholder(&mut self, key: &str) {
        if self.controller.compiler.placeholders().any(|(k, _)| k == key) {
            self.reconcile(|controller, maps, _| {
                let dirty = controller.compiler.set_placeholder(&controller.state, key, None, &[]);
                controller.sync.sync_dirty(maps, controller.compiler.program(), &dirty)
            });
        }
    }

    /// Answers parked ADDs whose pod is now enforced by its policy, or whose wait is over
    /// (with the fail-closed endpoint), and drops placeholders that the pod's own program
    /// replaced.
    pub(super) fn resolve_parked(&mut self) {
        let placeholders: Vec<String> = self.controller.compiler.placeholders().map(|(k, _)| k.clone()).collect();
        for key in placeholders {
            if !self.controller.compiler.is_placeholder(&key) && self.enforcement(&key).is_some() {
                self.drop_placeholder(&key);
            }
        }
        if self.parked.is_empty() {
            return;
        }
        let now = Instant::now();
        for parked in std::mem::take(&mut self.parked) {
            let enforcement = self.enforcement(&parked.key);
            match enforcement {
                Some(enforcement) if enforcement.mode == EnforcementMode::Policy => {
                    tracing::info!(pod = %parked.key, "Pod object arrived: CNI ADD answered with the pod's policy enforced");
                    let _ = parked.reply.send(Response::CniAdded { enforcement });
                }
                Some(enforcement) if now >= parked.deadline => {
                    tracing::warn!(pod = %parked.key, "Pod object still unknown: CNI ADD answered with a fail-closed endpoint (node traffic only until it arrives)");
                    let _ = parked.reply.send(Response::CniAdded { enforcement });
                }
                None if now >= parked.deadline || self.cni.get(&parked.key).is_none() => {
                    let _ = parked.reply.send(Response::error(ErrorCode::Internal, "the pod's endpoint is not attached"));
                }
                _ if parked.reply.is_closed() => {}
                _ => self.parked.push(parked),
            }
        }
    }

    /// CNI CHECK: the pod is enforced by its policy, on this interface, with these addresses.
    fn cni_check(&self, attachment: &CniAttachment) -> Response {
        let key = attachment.pod.key();
        let (ifindex, _) = match self.resolve_interface(attachment) {
            Ok(found) => found,
            Err(response) => return response,
        };
        let Some(enforcement) = self.enforcement(&key) else {
            return Response::error(ErrorCode::NotEnforced, format!("{key} has no attached endpoint"));
        };
        if enforcement.ifindex != ifindex {
            return Response::error(ErrorCode::NotEnforced, format!("{key} is enforced on ifindex {}, not {ifindex}", enforcement.ifindex));
        }
        if enforcement.mode == EnforcementMode::FailClosed {
            return Response::error(ErrorCode::NotEnforced, format!("{key} is fail-closed: its Pod object is not known yet"));
        }
        if let Some(missing) = attachment.ips.iter().find(|ip| !enforcement.ips.contains(ip)) {
            return Response::error(ErrorCode::NotEnforced, format!("{key} is enforced with {:?}, not with {missing}", enforcement.ips));
        }
        Response::CniChecked { enforcement }
    }

    /// CNI DEL: forgets the sandbox's registration and placeholder; the pod, while it exists,
    /// stays enforced through discovery.
    fn cni_del(&mut self, detachment: &CniDetachment) -> Response {
        let key = detachment.pod.key();
        let registered = self.cni.remove_sandbox(&key, &detachment.container_id);
        if registered {
            tracing::info!(pod = %key, container = %detachment.container_id, "CNI DEL");
            self.drop_placeholder(&key);
            let received = Instant::now();
            self.reconcile(|controller, maps, interface_of| controller.refresh_interfaces(maps, received, interface_of));
        }
        Response::CniDeleted { registered }
    }

    /// Drops registrations whose interface is gone (the sandbox went without a DEL).
    pub(super) fn forget_vanished_sandboxes(&mut self) {
        let interfaces = &self.dataplane.interfaces;
        let gone = self.cni.retain_existing(|r| {
            interfaces.by_ifindex(r.ifindex).is_some_and(|i| i.name == r.interface) || interface_index(&r.interface) == Some(r.ifindex)
        });
        for key in gone {
            tracing::info!(pod = %key, "the registered interface is gone: CNI registration dropped");
            self.drop_placeholder(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(ips: &[&str]) -> Registration {
        Registration {
            container_id: "c1".into(),
            ifindex: 7,
            interface: "veth7".into(),
            ips: ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
            added: Instant::now(),
        }
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("pod")
    }

    #[test]
    fn registered_addresses_fill_in_until_the_pod_has_its_own() {
        let mut registry = Registry::default();
        registry.register("default/web".into(), registration(&["10.0.0.7", "fd00::7"]));
        let mut without = pod(serde_json::json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {"containers": []}}));
        registry.patch(&mut without);
        let status = without.status.expect("status");
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(status.pod_ips.expect("ips").len(), 2);
        let mut with = pod(serde_json::json!({"metadata": {"name": "web", "namespace": "default"}, "status": {"podIP": "10.0.0.8", "podIPs": [{"ip": "10.0.0.8"}]}}));
        registry.patch(&mut with);
        assert_eq!(with.status.and_then(|s| s.pod_ip).as_deref(), Some("10.0.0.8"));
        let mut other = pod(serde_json::json!({"metadata": {"name": "db", "namespace": "default"}}));
        registry.patch(&mut other);
        assert!(other.status.is_none());
    }

    #[test]
    fn del_of_an_older_sandbox_keeps_the_newer_registration() {
        let mut registry = Registry::default();
        registry.register("default/web".into(), registration(&["10.0.0.7"]));
        assert!(!registry.remove_sandbox("default/web", "older"));
        assert_eq!(registry.ifindex_of("default/web"), Some(7));
        assert_eq!(registry.interface_name(7), Some("veth7"));
        assert!(registry.remove_sandbox("default/web", "c1"));
        assert_eq!(registry.ifindex_of("default/web"), None);
    }
}
