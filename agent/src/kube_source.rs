//! The Kubernetes API as a source of object events: one kube-runtime watcher per kind
//! (Namespaces, Pods, NetworkPolicies, all namespaces), with bookmarks, exponential backoff
//! and a re-list whenever the watch cannot resume (410 Gone, disconnect after compaction).
//!
//! Objects are watched as `DynamicObject` and decoded one by one, so a single malformed object
//! cannot wedge a whole watch: a NetworkPolicy that does not decode still selects every pod of
//! its namespace and fails them closed; a Pod or Namespace that does not decode keeps its
//! previous version. Both are logged and counted.
use crate::controller::{KubeObject, ObjectEvent, ObjectKind};
use crate::metrics::Metrics;
use crate::policy::{CompiledPolicy, decode_object};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: String, source: kube::config::KubeconfigError },
    #[error("building client configuration: {0}")]
    Config(String),
    #[error("creating the API client: {0}")]
    Client(#[from] kube::Error),
    #[error("listing {resource}: {source}")]
    List { resource: &'static str, source: kube::Error },
    #[error("async runtime: {0}")]
    Runtime(std::io::Error),
}

/// A client from `--kubeconfig`, else `KUBECONFIG`/in-cluster configuration.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|source| KubeSourceError::Kubeconfig { path: path.display().to_string(), source })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeSourceError::Config(e.to_string()))?
        }
        None => kube::Config::infer().await.map_err(|e| KubeSourceError::Config(e.to_string()))?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// A received event and when it arrived (the start of its programming latency).
pub type Received = (ObjectEvent, Instant);

/// Starts one watcher task per kind; events go to `events` in arrival order per kind.
pub fn spawn_watchers(
    client: kube::Client,
    events: UnboundedSender<Received>,
    metrics: Arc<Metrics>,
) -> Vec<tokio::task::JoinHandle<()>> {
    ObjectKind::ALL
        .into_iter()
        .map(|kind| tokio::spawn(watch_kind(client.clone(), kind, events.clone(), metrics.clone())))
        .collect()
}

fn api_resource(kind: ObjectKind) -> ApiResource {
    match kind {
        ObjectKind::Namespace => ApiResource::erase::<Namespace>(&()),
        ObjectKind::Pod => ApiResource::erase::<Pod>(&()),
        ObjectKind::NetworkPolicy => ApiResource::erase::<NetworkPolicy>(&()),
    }
}

async fn watch_kind(client: kube::Client, kind: ObjectKind, events: UnboundedSender<Received>, metrics: Arc<Metrics>) {
    let api: Api<DynamicObject> = Api::all_with(client, &api_resource(kind));
    let mut stream = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let resource = kind.resource();
    let mut listing: Option<Vec<KubeObject>> = None;
    let mut listed_once = false;
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(Event::Init) => {
                if listed_once {
                    metrics.relist(resource);
                    tracing::info!(resource, "re-listing");
                }
                listing = Some(Vec::new());
                continue;
            }
            Ok(Event::InitApply(object)) => {
                listing.get_or_insert_with(Vec::new).push(decode(kind, object, &metrics).0);
                continue;
            }
            Ok(Event::InitDone) => {
                listed_once = true;
                let objects = listing.take().unwrap_or_default();
                tracing::info!(resource, objects = objects.len(), "listed");
                ObjectEvent::Relisted(kind, objects)
            }
            Ok(Event::Apply(object)) => ObjectEvent::Applied(decode(kind, object, &metrics).0),
            Ok(Event::Delete(object)) => {
                let name = object.metadata.name.clone().unwrap_or_default();
                ObjectEvent::Deleted(kind, object.metadata.namespace.clone(), name)
            }
            Err(error) => {
                // The watcher retries with backoff and re-lists if it cannot resume; until then
                // the last known state stays enforced.
                metrics.watch_restart(resource);
                tracing::warn!(resource, %error, "watch failed; retrying with backoff, enforcing the last known state");
                continue;
            }
        };
        metrics.event(resource);
        if events.send((event, Instant::now())).is_err() {
            return; // The agent is shutting down.
        }
    }
}

/// Lists every object once and builds the cluster state from them (`netsieve explain
/// --kubeconfig`): the same decoding and the same rules for malformed objects as the agent.
/// Returns the state and a warning per object that did not decode or had unknown fields.
pub fn list_cluster(kubeconfig: Option<&Path>) -> Result<(crate::policy::ClusterState, Vec<String>), KubeSourceError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(KubeSourceError::Runtime)?;
    runtime.block_on(async {
        let client = client(kubeconfig).await?;
        let metrics = Metrics::default();
        let mut state = crate::policy::ClusterState::default();
        let mut warnings = Vec::new();
        for kind in ObjectKind::ALL {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &api_resource(kind));
            let list = api
                .list(&kube::api::ListParams::default())
                .await
                .map_err(|source| KubeSourceError::List { resource: kind.resource(), source })?;
            let mut objects = Vec::new();
            for object in list.items {
                let (decoded, warning) = decode(kind, object, &metrics);
                warnings.extend(warning);
                objects.push(decoded);
            }
            crate::controller::apply_event(&mut state, ObjectEvent::Relisted(kind, objects));
        }
        Ok((state, warnings))
    })
}

/// Decodes one object; the second value describes what was wrong with it, if anything.
fn decode(kind: ObjectKind, object: DynamicObject, metrics: &Metrics) -> (KubeObject, Option<String>) {
    let namespace = object.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = object.metadata.name.clone().unwrap_or_default();
    let key = match kind {
        ObjectKind::Namespace => name.clone(),
        _ => format!("{namespace}/{name}"),
    };
    let decoded = serde_json::to_value(&object).and_then(|value| match kind {
        ObjectKind::Namespace => decode_object::<Namespace>(value).map(|(o, u)| (KubeObject::Namespace(Box::new(o)), u)),
        ObjectKind::Pod => decode_object::<Pod>(value).map(|(o, u)| (KubeObject::Pod(Box::new(o)), u)),
        ObjectKind::NetworkPolicy => decode_object::<NetworkPolicy>(value).map(|(o, u)| {
            if u.iter().any(|p| p.starts_with("spec")) {
                let compiled = CompiledPolicy::compile(&o).with_unknown_fields(&u);
                (KubeObject::CompiledPolicy(Box::new(compiled)), u)
            } else {
                (KubeObject::NetworkPolicy(Box::new(o)), u)
            }
        }),
    });
    match decoded {
        Ok((decoded, unknown)) => {
            if unknown.is_empty() {
                return (decoded, None);
            }
            metrics.invalid_object(kind_name(kind), "unknown_fields");
            if kind == ObjectKind::NetworkPolicy {
                tracing::warn!(object = %key, ?unknown, "unknown fields in NetworkPolicy (under spec: the policy fails closed)");
            } else {
                tracing::debug!(kind = kind_name(kind), object = %key, ?unknown, "unknown fields ignored");
            }
            (decoded, Some(format!("{} {key}: unknown fields {}", kind_name(kind), unknown.join(", "))))
        }
        Err(error) => {
            metrics.invalid_object(kind_name(kind), "undecodable");
            let warning = Some(format!("{} {key} does not decode: {error}", kind_name(kind)));
            let object = match kind {
                ObjectKind::NetworkPolicy => {
                    tracing::error!(policy = %key, %error, "policy does not decode: pods of its namespace fail closed");
                    KubeObject::CompiledPolicy(Box::new(CompiledPolicy::undecodable(&namespace, &name, error.to_string())))
                }
                ObjectKind::Pod | ObjectKind::Namespace => {
                    tracing::error!(kind = kind_name(kind), object = %key, %error, "object does not decode: keeping its previous version");
                    KubeObject::Unchanged(kind, key)
                }
            };
            (object, warning)
        }
    }
}

fn kind_name(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Namespace => "Namespace",
        ObjectKind::Pod => "Pod",
        ObjectKind::NetworkPolicy => "NetworkPolicy",
    }
}
