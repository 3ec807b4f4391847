//! What upstream's API server holds at each point of a case: the namespaces and their labels,
//! the case's pods and their labels, and the policies created, updated or deleted so far.
//! [`ModelState::apply`] replays one step; the `*_objects` functions render the state as the
//! Kubernetes objects an agent reads (a manifests directory or the fake API server). Nothing
//! here decides whether traffic passes: that is what the case's matrices say.
use super::ConformanceError;
use super::format::{CaseFile, PodRef, Servers, Step, Suite};
use super::model;
use k8s_openapi::api::core::v1::{HostIP, Namespace, Pod, PodIP, PodStatus};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub type Labels = BTreeMap<String, String>;

/// Where a pod runs in the test bed: what the scheduler and the CNI would have decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlacement {
    pub node: String,
    pub node_ip: IpAddr,
    pub pod_ip: IpAddr,
}

/// The objects of one case at one point of its steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelState {
    /// Namespace name -> labels (all three namespaces, as upstream creates them all).
    pub namespaces: BTreeMap<String, Labels>,
    /// The case's pods -> labels.
    pub pods: BTreeMap<PodRef, Labels>,
    /// (namespace, name) -> the policy as the case file writes it (placeholders unfilled).
    pub policies: BTreeMap<(String, String), serde_yaml::Value>,
    /// What every pod serves: its container ports.
    pub servers: Servers,
}

impl ModelState {
    /// The state when a case starts: the suite's namespaces, the case's pods with their
    /// initial labels, no policy.
    pub fn initial(suite: &Suite, case: &CaseFile) -> ModelState {
        ModelState {
            namespaces: suite.namespaces.iter().map(|n| (n.name.clone(), n.labels.clone())).collect(),
            pods: case.pods.iter().map(|p| (p.clone(), model::initial_pod_labels(p))).collect(),
            policies: BTreeMap::new(),
            servers: case.servers.clone(),
        }
    }

    /// Replays a step that changes objects; `wait_for_servers` and `probe` change nothing.
    /// A step that contradicts the state (creating an existing policy, updating a missing one,
    /// labelling an unknown pod) is an error, as the API server would refuse it.
    pub fn apply(&mut self, step: &Step) -> Result<(), ConformanceError> {
        match step {
            Step::WaitForServers { .. } | Step::Probe(_) => {}
            Step::CreatePolicy { policy } | Step::UpdatePolicy { policy } => {
                let key = policy_key(policy)?;
                let exists = self.policies.contains_key(&key);
                match (step, exists) {
                    (Step::CreatePolicy { .. }, true) => {
                        return Err(ConformanceError::State(format!("policy {}/{} already exists", key.0, key.1)));
                    }
                    (Step::UpdatePolicy { .. }, false) => {
                        return Err(ConformanceError::State(format!("policy {}/{} does not exist", key.0, key.1)));
                    }
                    _ => {}
                }
                // An update replaces the whole object (upstream's UpdatePolicy sends it all).
                self.policies.insert(key, policy.clone());
            }
            Step::AddNamespaceLabel { namespace, key, value } => {
                let labels = self
                    .namespaces
                    .get_mut(namespace)
                    .ok_or_else(|| ConformanceError::State(format!("namespace {namespace} does not exist")))?;
                labels.insert(key.clone(), value.clone());
            }
            Step::AddPodLabels { pod, labels } => {
                let current =
                    self.pods.get_mut(pod).ok_or_else(|| ConformanceError::State(format!("pod {pod} does not exist")))?;
                current.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            Step::DeleteAllPolicies { namespaces, .. } => {
                self.policies.retain(|(ns, _), _| !namespaces.contains(ns));
            }
        }
        Ok(())
    }

    pub fn namespace_objects(&self) -> Vec<Namespace> {
        self.namespaces
            .iter()
            .map(|(name, labels)| {
                let mut namespace = Namespace::default();
                namespace.metadata.name = Some(name.clone());
                namespace.metadata.labels = Some(labels.clone());
                namespace
            })
            .collect()
    }

    /// The pods as the API server holds them once scheduled and running: upstream's pod
    /// (`model::pod_object`) with the state's labels, its node, and its addresses.
    pub fn pod_objects(&self, place: &dyn Fn(&PodRef) -> Option<PodPlacement>) -> Result<Vec<Pod>, ConformanceError> {
        self.pods
            .iter()
            .map(|(pod, labels)| {
                let placement = place(pod).ok_or_else(|| ConformanceError::State(format!("pod {pod} has no placement in the test bed")))?;
                let mut object = model::pod_object(pod, &self.servers);
                object.metadata.labels = Some(labels.clone());
                if let Some(spec) = object.spec.as_mut() {
                    spec.node_name = Some(placement.node.clone());
                }
                let (pod_ip, node_ip) = (placement.pod_ip.to_string(), placement.node_ip.to_string());
                object.status = Some(PodStatus {
                    phase: Some("Running".into()),
                    pod_ip: Some(pod_ip.clone()),
                    pod_ips: Some(vec![PodIP { ip: pod_ip }]),
                    host_ip: Some(node_ip.clone()),
                    host_ips: Some(vec![HostIP { ip: node_ip }]),
                    ..Default::default()
                });
                Ok(object)
            })
            .collect()
    }

    /// The policies, their placeholders filled in with the pods' addresses.
    pub fn policy_objects(&self, ip_of: &dyn Fn(&PodRef) -> Option<IpAddr>) -> Result<Vec<NetworkPolicy>, ConformanceError> {
        self.policies.values().map(|policy| model::decode_policy(policy, ip_of)).collect()
    }
}

/// (namespace, name) of a policy as written.
pub fn policy_key(policy: &serde_yaml::Value) -> Result<(String, String), ConformanceError> {
    let field = |name: &str| {
        policy
            .get("metadata")
            .and_then(|m| m.get(name))
            .and_then(serde_yaml::Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ConformanceError::Policy(format!("has no metadata.{name}")))
    };
    Ok((field("namespace")?, field("name")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{load_cases, load_suite};

    #[test]
    fn replaying_every_case_never_contradicts_the_state() {
        let suite = load_suite().expect("suite");
        for case in load_cases().expect("cases") {
            let mut state = ModelState::initial(&suite, &case.file);
            for (index, step) in case.file.steps.iter().enumerate() {
                state.apply(step).unwrap_or_else(|e| panic!("{} step {}: {e}", case.path, index + 1));
            }
            let place = |p: &PodRef| {
                Some(PodPlacement {
                    node: "node0".into(),
                    node_ip: "172.31.250.1".parse().ok()?,
                    pod_ip: crate::conformance::check::sample_ip(p, &suite, false)?,
                })
            };
            let pods = state.pod_objects(&place).expect("pods");
            assert_eq!(pods.len(), case.file.pods.len());
            state.policy_objects(&|p| place(p).map(|pl| pl.pod_ip)).unwrap_or_else(|e| panic!("{}: {e}", case.path));
        }
    }

    #[test]
    fn updates_replace_labels_merge_and_deletion_empties() {
        let suite = load_suite().expect("suite");
        let cases = load_cases().expect("cases");
        let find = |suffix: &str| cases.iter().find(|c| c.path.ends_with(suffix)).expect("case").clone();

        // Case 36: the update replaces the policy of the same name (never two policies).
        let case = find("36-ip-in-both-cidr-and-except.yaml");
        let mut state = ModelState::initial(&suite, &case.file);
        let mut seen = Vec::new();
        for step in &case.file.steps {
            state.apply(step).expect("step");
            seen.push(state.policies.len());
        }
        assert_eq!(seen.iter().max(), Some(&1), "{seen:?}");

        // Case 22: pod labels are merged into the existing ones.
        let case = find("22-ingress-from-updated-pod.yaml");
        let mut state = ModelState::initial(&suite, &case.file);
        for step in &case.file.steps {
            state.apply(step).expect("step");
        }
        let xb = PodRef { namespace: "x".into(), name: "b".into() };
        assert_eq!(state.pods[&xb].get("pod2").map(String::as_str), Some("updated"));
        assert_eq!(state.pods[&xb].get("pod").map(String::as_str), Some("b"));

        // Case 33: deleting every policy.
        let case = find("33-stop-enforcing-after-delete.yaml");
        let mut state = ModelState::initial(&suite, &case.file);
        for step in &case.file.steps {
            state.apply(step).expect("step");
        }
        assert!(state.policies.is_empty());
    }
}
