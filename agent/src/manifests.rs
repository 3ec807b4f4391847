//! Loads Namespaces, Nodes, Pods and NetworkPolicies from a directory of manifests.
//!
//! Accepts what `kubectl get ... -o yaml` (or `-o json`) prints: single objects, multi-document
//! YAML, and `kind: List` wrappers. Every document is first read as generic JSON, so YAML and
//! JSON go through the same typed deserialisation. A document that fails is reported with its
//! file and index and the others still load; kinds netsieve does not use (Services,
//! Deployments, ...) are skipped.
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One document that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: document {document}: {message}", file.display())]
pub struct ManifestError {
    pub file: PathBuf,
    /// 0-based index of the document in the file (items of a List count as their List's).
    pub document: usize,
    pub message: String,
    /// The document's kind, when it could be read: a broken NetworkPolicy matters more than a
    /// broken Service.
    pub kind: Option<String>,
}

/// Everything loaded from a directory.
#[derive(Debug, Default, Clone)]
pub struct Manifests {
    pub namespaces: Vec<Namespace>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
    /// Fields of a policy (by `namespace/name`) that the NetworkPolicy type does not know.
    pub policy_unknown_fields: std::collections::BTreeMap<String, Vec<String>>,
    pub errors: Vec<ManifestError>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading manifests directory {}: {source}", path.display())]
    Directory { path: PathBuf, source: std::io::Error },
}

impl Manifests {
    /// Builds the semantics' view of the loaded objects.
    pub fn cluster_state(&self) -> crate::policy::ClusterState {
        let mut state = crate::policy::ClusterState::new(&self.namespaces, &self.pods, &self.policies, &self.nodes);
        for (key, unknown) in &self.policy_unknown_fields {
            if let Some(policy) = state.remove_policy(key) {
                state.upsert_policy(policy.with_unknown_fields(unknown));
            }
        }
        state
    }

    fn add(&mut self, value: Value, file: &Path, document: usize) {
        let kind = value.get("kind").and_then(Value::as_str).map(str::to_string);
        let error = |message: String| ManifestError { file: file.to_path_buf(), document, message, kind: kind.clone() };
        match kind.as_deref() {
            Some("List") | Some("NamespaceList") | Some("PodList") | Some("NetworkPolicyList") | Some("NodeList") => {
                match value.get("items").and_then(Value::as_array) {
                    Some(items) => {
                        for item in items.clone() {
                            self.add(item, file, document);
                        }
                    }
                    None => self.errors.push(error("a List without an items array".into())),
                }
            }
            Some("Namespace") => match Namespace::deserialize(value) {
                Ok(ns) => self.namespaces.push(ns),
                Err(e) => self.errors.push(error(format!("Namespace: {e}"))),
            },
            Some("Node") => match Node::deserialize(value) {
                Ok(node) => self.nodes.push(node),
                Err(e) => self.errors.push(error(format!("Node: {e}"))),
            },
            Some("Pod") => match Pod::deserialize(value) {
                Ok(pod) => self.pods.push(pod),
                Err(e) => self.errors.push(error(format!("Pod: {e}"))),
            },
            Some("NetworkPolicy") => match crate::policy::decode_object::<NetworkPolicy>(value) {
                Ok((policy, unknown)) => {
                    if !unknown.is_empty() {
                        let key = format!(
                            "{}/{}",
                            policy.metadata.namespace.as_deref().unwrap_or("default"),
                            policy.metadata.name.as_deref().unwrap_or_default()
                        );
                        tracing::warn!(file = %file.display(), document, policy = %key, ?unknown, "unknown fields in NetworkPolicy");
                        self.policy_unknown_fields.insert(key, unknown);
                    }
                    self.policies.push(policy)
                }
                Err(e) => self.errors.push(error(format!("NetworkPolicy: {e}"))),
            },
            Some(other) => tracing::debug!(file = %file.display(), document, kind = other, "skipping kind"),
            None if value.is_null() => {}
            None => self.errors.push(error("document has no kind".into())),
        }
    }

    /// Parses one file's text (YAML or JSON; JSON is YAML).
    pub fn add_text(&mut self, text: &str, file: &Path) {
        for (document, deserializer) in serde_yaml::Deserializer::from_str(text).enumerate() {
            match serde_yaml::Value::deserialize(deserializer) {
                Ok(yaml) => match serde_json::to_value(yaml) {
                    Ok(value) => self.add(value, file, document),
                    Err(e) => self.errors.push(ManifestError {
                        file: file.to_path_buf(),
                        document,
                        message: format!("not representable as JSON: {e}"),
                        kind: None,
                    }),
                },
                Err(e) => {
                    self.errors.push(ManifestError {
                        file: file.to_path_buf(),
                        document,
                        message: format!("YAML: {e}"),
                        kind: None,
                    });
                    // serde_yaml cannot resynchronise after a syntax error in a stream.
                    break;
                }
            }
        }
    }
}

/// Loads every `*.yaml`, `*.yml` and `*.json` file of `dir` (not recursive), in name order.
pub fn load_dir(dir: &Path) -> Result<Manifests, LoadError> {
    let directory_error = |source| LoadError::Directory { path: dir.to_path_buf(), source };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(directory_error)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.is_file()
                && path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    let mut manifests = Manifests::default();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => manifests.add_text(&text, &file),
            Err(e) => manifests.errors.push(ManifestError {
                file: file.clone(),
                document: 0,
                message: format!("unreadable: {e}"),
                kind: None,
            }),
        }
    }
    Ok(manifests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_list_and_unknown_kinds() {
        let mut m = Manifests::default();
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                    apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: p, namespace: a}}\n\
                    - {apiVersion: v1, kind: Service, metadata: {name: s}}\n---\n\
                    {\"apiVersion\": \"networking.k8s.io/v1\", \"kind\": \"NetworkPolicy\", \"metadata\": {\"name\": \"n\"}, \"spec\": {}}\n";
        m.add_text(text, Path::new("x.yaml"));
        assert_eq!((m.namespaces.len(), m.pods.len(), m.policies.len()), (1, 1, 1));
        assert!(m.errors.is_empty(), "{:?}", m.errors);
    }

    #[test]
    fn a_bad_document_names_file_and_index_and_others_load() {
        let mut m = Manifests::default();
        let text = "kind: Pod\nmetadata: {name: ok}\n---\nkind: NetworkPolicy\nmetadata: {name: bad}\nspec: {podSelector: 7}\n---\nkind: Pod\nmetadata: {name: ok2}\n";
        m.add_text(text, Path::new("dir/f.yaml"));
        assert_eq!(m.pods.len(), 2);
        assert_eq!(m.errors.len(), 1);
        let err = &m.errors[0];
        assert_eq!((err.document, err.kind.as_deref()), (1, Some("NetworkPolicy")));
        assert!(err.to_string().starts_with("dir/f.yaml: document 1:"), "{err}");
    }
}
