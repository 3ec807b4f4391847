//! The reconciler shared by both sources (Kubernetes API, manifests directory): applies object
//! events to the cluster state, recompiles what they affect and writes only that to the maps.
//! Generic over [`PolicyMaps`], so tests and benchmarks drive exactly this code against model
//! maps or the real kernel maps.
use crate::dataplane::node::{ClusterChange, Dirty, NodeCompiler, replace_state};
use crate::dataplane::sync::{Capacity, PolicyMaps, SyncError, SyncReport, Synchronizer};
use crate::metrics::Metrics;
use crate::dataplane::node::AuditMode;
use crate::policy::{ClusterState, CompiledPolicy, PodInfo, namespace_audited, namespace_labels};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use std::sync::Arc;
use std::time::Instant;

/// The object kinds the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Namespace,
    Pod,
    NetworkPolicy,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 3] = [ObjectKind::Namespace, ObjectKind::Pod, ObjectKind::NetworkPolicy];

    /// Resource name, used as a metric label.
    pub fn resource(self) -> &'static str {
        match self {
            ObjectKind::Namespace => "namespaces",
            ObjectKind::Pod => "pods",
            ObjectKind::NetworkPolicy => "networkpolicies",
        }
    }
}

/// A decoded object. A NetworkPolicy the source already judged (one that did not decode, see
/// [`CompiledPolicy::undecodable`], or had unknown spec fields) arrives compiled, so that it
/// fails closed instead of vanishing.
#[derive(Clone, Debug)]
pub enum KubeObject {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    NetworkPolicy(Box<NetworkPolicy>),
    CompiledPolicy(Box<CompiledPolicy>),
    /// An object that did not decode and keeps its previous version: (kind, key). In a re-list
    /// it still counts as present.
    Unchanged(ObjectKind, String),
}

/// What a source reports.
#[derive(Clone, Debug)]
pub enum ObjectEvent {
    Applied(KubeObject),
    /// Deleted objects need only their identity: (kind, namespace, name).
    Deleted(ObjectKind, Option<String>, String),
    /// The complete current set of one kind (initial list, or re-list after 410 Gone or a
    /// reconnect): objects not in it are gone.
    Relisted(ObjectKind, Vec<KubeObject>),
}

fn key(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or("default"))
}

/// Applies one event to `state`; returns the changes for the compiler.
pub fn apply_event(state: &mut ClusterState, event: ObjectEvent) -> Vec<ClusterChange> {
    match event {
        ObjectEvent::Applied(object) => apply_object(state, object).into_iter().collect(),
        ObjectEvent::Deleted(kind, namespace, name) => match kind {
            ObjectKind::Namespace => {
                let old = state.remove_namespace(&name);
                old.map(|old| ClusterChange::Namespace { name, old: Some(old), new: None }).into_iter().collect()
            }
            ObjectKind::Pod => state
                .remove_pod(&key(namespace.as_deref(), &name))
                .map(|old| ClusterChange::Pod { old: Some(old), new: None })
                .into_iter()
                .collect(),
            ObjectKind::NetworkPolicy => state
                .remove_policy(&key(namespace.as_deref(), &name))
                .map(|old| ClusterChange::Policy { old: Some(old), new: None })
                .into_iter()
                .collect(),
        },
        ObjectEvent::Relisted(kind, objects) => {
            let mut changes = Vec::new();
            let mut listed = std::collections::BTreeSet::new();
            for object in objects {
                listed.insert(object_key(&object));
                changes.extend(apply_object(state, object));
            }
            let gone: Vec<String> = match kind {
                ObjectKind::Namespace => state.namespaces.keys().filter(|k| !listed.contains(*k)).cloned().collect(),
                ObjectKind::Pod => state.pods.keys().filter(|k| !listed.contains(*k)).cloned().collect(),
                ObjectKind::NetworkPolicy => state.policies.keys().filter(|k| !listed.contains(*k)).cloned().collect(),
            };
            for k in gone {
                let (namespace, name) = match kind {
                    ObjectKind::Namespace => (None, k),
                    _ => match k.split_once('/') {
                        Some((ns, name)) => (Some(ns.to_string()), name.to_string()),
                        None => (None, k),
                    },
                };
                changes.extend(apply_event(state, ObjectEvent::Deleted(kind, namespace, name)));
            }
            changes
        }
    }
}

fn object_key(object: &KubeObject) -> String {
    match object {
        KubeObject::Namespace(ns) => ns.metadata.name.clone().unwrap_or_default(),
        KubeObject::Pod(pod) => key(pod.metadata.namespace.as_deref(), pod.metadata.name.as_deref().unwrap_or("")),
        KubeObject::NetworkPolicy(p) => key(p.metadata.namespace.as_deref(), p.metadata.name.as_deref().unwrap_or("")),
        KubeObject::CompiledPolicy(p) => p.key(),
        KubeObject::Unchanged(_, key) => key.clone(),
    }
}

fn apply_object(state: &mut ClusterState, object: KubeObject) -> Option<ClusterChange> {
    match object {
        KubeObject::Namespace(ns) => {
            let (name, labels) = namespace_labels(&ns)?;
            // Audit mode is not a label: the controller compares the audited set after the
            // batch (see `Controller::apply_audit`).
            state.set_namespace_audit(&name, namespace_audited(&ns));
            if state.namespaces.get(&name) == Some(&labels) {
                return None;
            }
            let old = state.upsert_namespace(name.clone(), labels.clone());
            Some(ClusterChange::Namespace { name, old, new: Some(labels) })
        }
        KubeObject::Pod(pod) => {
            let info = PodInfo::from_object(&pod);
            if state.pods.get(&info.key()) == Some(&info) {
                return None;
            }
            let old = state.upsert_pod(info.clone());
            Some(ClusterChange::Pod { old, new: Some(info) })
        }
        KubeObject::NetworkPolicy(policy) => upsert_policy(state, CompiledPolicy::compile(&policy)),
        KubeObject::CompiledPolicy(policy) => upsert_policy(state, *policy),
        KubeObject::Unchanged(..) => None,
    }
}

fn upsert_policy(state: &mut ClusterState, policy: CompiledPolicy) -> Option<ClusterChange> {
    if state.policies.get(&policy.key()) == Some(&policy) {
        return None;
    }
    for error in &policy.errors {
        tracing::warn!(policy = %policy.key(), %error, "invalid policy: the pods it selects fail closed");
    }
    let old = state.upsert_policy(policy.clone());
    Some(ClusterChange::Policy { old, new: Some(policy) })
}

/// Cluster state, compiled node and synchronizer of one node.
pub struct Controller {
    pub state: ClusterState,
    pub compiler: NodeCompiler,
    pub sync: Synchronizer,
    metrics: Arc<Metrics>,
    /// Set when a sync failed part-way: the next sync compares everything.
    needs_full_sync: bool,
    /// `agent --audit`: every local pod in audit mode (namespaces annotated for it come
    /// with the state).
    audit_node_wide: bool,
}

impl Controller {
    pub fn new(node: &str, allow_host: bool, capacity: Capacity, metrics: Arc<Metrics>) -> Controller {
        Controller {
            state: ClusterState::default(),
            compiler: NodeCompiler::new(node, allow_host),
            sync: Synchronizer::with_capacity(capacity),
            metrics,
            needs_full_sync: false,
            audit_node_wide: false,
        }
    }

    /// Audit mode for every local pod (`agent --audit`), from the next programming on.
    pub fn set_node_audit(&mut self, on: bool) {
        self.audit_node_wide = on;
    }

    /// Brings the compiler's audit mode to `--audit` and the annotated namespaces; recompiles
    /// the endpoints whose mode changed.
    fn apply_audit(&mut self) -> Dirty {
        let wanted = AuditMode { node_wide: self.audit_node_wide, namespaces: self.state.audit_namespaces.clone() };
        if wanted == *self.compiler.audit() {
            return Dirty::default();
        }
        tracing::info!(node_wide = wanted.node_wide, namespaces = ?wanted.namespaces, "audit mode changed");
        self.compiler.set_audit(&self.state, wanted)
    }

    /// Applies a batch of events (a coalesced burst) and programs the maps. `received` is when
    /// the oldest event of the batch arrived; the programming latency is measured from it.
    pub fn apply_events<M: PolicyMaps>(
        &mut self,
        maps: &mut M,
        events: Vec<ObjectEvent>,
        received: Instant,
        interface_of: &dyn Fn(&PodInfo) -> Option<u32>,
    ) -> Result<SyncReport, SyncError> {
        let changes: Vec<ClusterChange> = events.into_iter().flat_map(|event| apply_event(&mut self.state, event)).collect();
        self.record_problems(&changes);
        let dirty = self.compiler.apply(&self.state, &changes, interface_of);
        self.program(maps, dirty, received)
    }

    /// Replaces the whole state (the manifests source); programs only what changed.
    pub fn replace<M: PolicyMaps>(
        &mut self,
        maps: &mut M,
        target: ClusterState,
        received: Instant,
        interface_of: &dyn Fn(&PodInfo) -> Option<u32>,
    ) -> Result<SyncReport, SyncError> {
        let changes = replace_state(&mut self.state, target);
        self.record_problems(&changes);
        let dirty = self.compiler.apply(&self.state, &changes, interface_of);
        self.program(maps, dirty, received)
    }

    /// Counts (and logs) what the changes bring in that will not be enforced as written:
    /// invalid policies (fail closed) and pods without an address.
    fn record_problems(&self, changes: &[ClusterChange]) {
        for change in changes {
            match change {
                ClusterChange::Policy { new: Some(policy), .. } if !policy.errors.is_empty() => {
                    self.metrics.invalid_object("NetworkPolicy", "invalid_policy");
                }
                ClusterChange::Pod { new: Some(pod), .. } if !pod.host_network && pod.ips.is_empty() => {
                    // Normal while a pod starts; it is enforced once it has an address.
                    self.metrics.invalid_object("Pod", "without_ip");
                    tracing::info!(pod = %pod.key(), node = ?pod.node, "pod has no IP address yet: not a peer, not enforced");
                }
                _ => {}
            }
        }
    }

    /// The node's own interface addresses changed: they are node addresses (the node-traffic
    /// exception, masqueraded hairpin traffic) whatever the Node object lists.
    pub fn set_local_addresses<M: PolicyMaps>(
        &mut self,
        maps: &mut M,
        received: Instant,
        addresses: &std::collections::BTreeSet<std::net::IpAddr>,
    ) -> Result<SyncReport, SyncError> {
        let dirty = self.compiler.set_local_addresses(&self.state, addresses);
        self.program(maps, dirty, received)
    }

    /// Interfaces appeared, went or moved.
    pub fn refresh_interfaces<M: PolicyMaps>(
        &mut self,
        maps: &mut M,
        received: Instant,
        interface_of: &dyn Fn(&PodInfo) -> Option<u32>,
    ) -> Result<SyncReport, SyncError> {
        let dirty = self.compiler.refresh_interfaces(&self.state, interface_of);
        self.program(maps, dirty, received)
    }

    /// Recompiles and compares everything (periodic safety net, and the benchmark's resync).
    pub fn full_resync<M: PolicyMaps>(
        &mut self,
        maps: &mut M,
        interface_of: &dyn Fn(&PodInfo) -> Option<u32>,
    ) -> Result<SyncReport, SyncError> {
        self.apply_audit();
        self.compiler.full(&self.state, interface_of);
        self.needs_full_sync = false;
        let result = self.sync.sync(maps, self.compiler.program());
        if result.is_err() {
            self.needs_full_sync = true;
        }
        result
    }

    /// Writes what changed. Every batch is observed in the latency histogram, including
    /// those that needed no write (the maps already reflected them).
    fn program<M: PolicyMaps>(&mut self, maps: &mut M, mut dirty: Dirty, received: Instant) -> Result<SyncReport, SyncError> {
        dirty.merge(self.apply_audit());
        if dirty.is_empty() && !self.needs_full_sync {
            self.metrics.observe_programming(received.elapsed());
            return Ok(SyncReport::default());
        }
        let result = if self.needs_full_sync {
            self.sync.sync(maps, self.compiler.program())
        } else {
            self.sync.sync_dirty(maps, self.compiler.program(), &dirty)
        };
        // A failed sync leaves the synchronizer knowing exactly what it wrote, but the dirty
        // set of this round is lost: compare everything next time.
        self.needs_full_sync = result.is_err();
        if result.is_ok() {
            self.metrics.observe_programming(received.elapsed());
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::sync::ModelMaps;
    use netsieve_tests::scenario::{Scenario, ScenarioParams};

    fn objects(s: &Scenario) -> Vec<ObjectEvent> {
        vec![
            ObjectEvent::Relisted(
                ObjectKind::Namespace,
                s.namespaces.iter().map(|n| KubeObject::Namespace(Box::new(n.clone()))).collect(),
            ),
            ObjectEvent::Relisted(ObjectKind::Pod, s.pods.iter().map(|p| KubeObject::Pod(Box::new(p.clone()))).collect()),
            ObjectEvent::Relisted(
                ObjectKind::NetworkPolicy,
                s.policies.iter().map(|p| KubeObject::NetworkPolicy(Box::new(p.clone()))).collect(),
            ),
        ]
    }

    /// A re-list (as after 410 Gone) converges on exactly the listed objects, and the maps on
    /// what a fresh controller would program.
    #[test]
    fn relist_replaces_each_kind_and_converges() {
        let a = Scenario::generate(3, ScenarioParams::default()).expect("scenario");
        let b = Scenario::generate(4, ScenarioParams::default()).expect("scenario");
        let metrics = Arc::new(Metrics::default());
        let ifindex = |p: &PodInfo| Some(p.name.len() as u32 + 100 * p.namespace.len() as u32);
        let mut controller = Controller::new("node0", true, Capacity::default(), metrics.clone());
        let mut maps = ModelMaps::default();
        controller.apply_events(&mut maps, objects(&a), Instant::now(), &ifindex).expect("sync");
        controller.apply_events(&mut maps, objects(&b), Instant::now(), &ifindex).expect("sync");
        let expected = ClusterState::new(&b.namespaces, &b.pods, &b.policies, &[]);
        assert_eq!(controller.state.pods, expected.pods);
        assert_eq!(controller.state.policies, expected.policies);
        assert_eq!(controller.state.namespaces, expected.namespaces);
        let leftover = controller.sync.sync(&mut maps, controller.compiler.program()).expect("sync");
        assert_eq!(leftover, SyncReport::default());
        assert_eq!(metrics.programming_latency().count(), 2);
    }

    #[test]
    fn deleted_objects_leave_the_state() {
        let a = Scenario::generate(5, ScenarioParams::default()).expect("scenario");
        let mut state = ClusterState::default();
        for event in objects(&a) {
            apply_event(&mut state, event);
        }
        let pod = state.pods.values().next().cloned().expect("a pod");
        let changes = apply_event(&mut state, ObjectEvent::Deleted(ObjectKind::Pod, Some(pod.namespace.clone()), pod.name.clone()));
        assert_eq!(changes, vec![ClusterChange::Pod { old: Some(pod.clone()), new: None }]);
        assert!(!state.pods.contains_key(&pod.key()));
        // Deleting again is a no-op, not an error.
        assert!(apply_event(&mut state, ObjectEvent::Deleted(ObjectKind::Pod, Some(pod.namespace), pod.name)).is_empty());
    }

    #[test]
    fn undecodable_policy_fails_its_namespace_closed() {
        let mut state = ClusterState::default();
        let policy = CompiledPolicy::undecodable("ns", "broken", "spec.podSelector: invalid type".into());
        apply_event(&mut state, ObjectEvent::Applied(KubeObject::CompiledPolicy(Box::new(policy))));
        let pod = PodInfo {
            namespace: "ns".into(),
            name: "p".into(),
            labels: Default::default(),
            ips: vec!["10.0.0.1".parse().expect("ip")],
            node: Some("n".into()),
            host_network: false,
            named_ports: vec![],
            host_ips: vec![],
        };
        state.upsert_pod(pod.clone());
        for direction in [crate::policy::Direction::Ingress, crate::policy::Direction::Egress] {
            let selecting: Vec<_> = state.selecting(&pod, direction).collect();
            assert_eq!(selecting.len(), 1);
            assert!(selecting[0].rules(direction).is_some_and(|r| r.is_empty()));
        }
    }

    /// Namespace annotations (`netsieve.io/audit: "true"`) and `--audit` put local pods in
    /// audit mode and take them out again, whichever source delivers the Namespace.
    #[test]
    fn audit_annotation_and_node_flag_switch_audit_mode() {
        use netsieve_common::EP_AUDIT;
        let namespace = |name: &str, audit: bool| -> Namespace {
            let annotations = if audit { serde_json::json!({"netsieve.io/audit": "true"}) } else { serde_json::json!({"other": "x"}) };
            serde_json::from_value(serde_json::json!({"metadata": {"name": name, "annotations": annotations}})).expect("namespace")
        };
        let pod = |namespace: &str, name: &str, ip: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
                "spec": {"nodeName": "node0", "containers": [{"name": "c", "image": "x"}]},
                "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
            }))
            .expect("pod")
        };
        let ifindex = |p: &PodInfo| Some(if p.namespace == "staging" { 10 } else { 11 });
        let mut controller = Controller::new("node0", true, Capacity::default(), Arc::new(Metrics::default()));
        let mut maps = ModelMaps::default();
        let events = vec![
            ObjectEvent::Relisted(
                ObjectKind::Namespace,
                vec![KubeObject::Namespace(Box::new(namespace("staging", true))), KubeObject::Namespace(Box::new(namespace("prod", false)))],
            ),
            ObjectEvent::Relisted(
                ObjectKind::Pod,
                vec![KubeObject::Pod(Box::new(pod("staging", "a", "10.0.0.1"))), KubeObject::Pod(Box::new(pod("prod", "b", "10.0.0.2")))],
            ),
            ObjectEvent::Relisted(ObjectKind::NetworkPolicy, vec![]),
        ];
        controller.apply_events(&mut maps, events, Instant::now(), &ifindex).expect("sync");
        let audited = |maps: &ModelMaps, ifindex: u32| maps.endpoints.get(&ifindex).map(|e| e.flags & EP_AUDIT != 0);
        assert_eq!(controller.compiler.audit().namespaces, ["staging".to_string()].into());
        assert_eq!((audited(&maps, 10), audited(&maps, 11)), (Some(true), Some(false)));

        // The annotation goes (a MODIFIED Namespace, labels unchanged): enforced again.
        let modified = vec![ObjectEvent::Applied(KubeObject::Namespace(Box::new(namespace("staging", false))))];
        controller.apply_events(&mut maps, modified, Instant::now(), &ifindex).expect("sync");
        assert!(controller.compiler.audit().namespaces.is_empty());
        assert_eq!((audited(&maps, 10), audited(&maps, 11)), (Some(false), Some(false)));

        // Node-wide, from the next programming on.
        controller.set_node_audit(true);
        controller.full_resync(&mut maps, &ifindex).expect("sync");
        assert_eq!((audited(&maps, 10), audited(&maps, 11)), (Some(true), Some(true)));

        // Manifests mode: the annotation comes with the loaded state.
        controller.set_node_audit(false);
        let state = ClusterState::new(&[namespace("staging", false), namespace("prod", true)], &[pod("staging", "a", "10.0.0.1"), pod("prod", "b", "10.0.0.2")], &[], &[]);
        controller.replace(&mut maps, state, Instant::now(), &ifindex).expect("sync");
        assert_eq!((audited(&maps, 10), audited(&maps, 11)), (Some(false), Some(true)));
    }
}
