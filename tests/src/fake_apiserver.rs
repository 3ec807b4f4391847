//! An in-process Kubernetes API server for the agent's watch code: the real list/watch
//! protocol over HTTP/1.1 for Namespaces, Pods and NetworkPolicies, cluster-wide.
//!
//! - `GET <collection>`: a `<Kind>List` with `metadata.resourceVersion`; items without
//!   kind/apiVersion, as the real server sends them. Like the real server answering from its
//!   watch cache, the whole list comes in one page (`limit` is a hint it may ignore).
//! - `GET <collection>?watch=1&resourceVersion=N`: a chunked stream of JSON lines
//!   (`ADDED`/`MODIFIED`/`DELETED` with the full object, `BOOKMARK` every 100 ms when
//!   `allowWatchBookmarks=true`), starting after N; an `ERROR` event with a `410 Expired`
//!   Status when N has been compacted away; the stream ends after `timeoutSeconds`.
//! - Test controls: [`FakeApiServer::compact`] (expire history), [`FakeApiServer::disconnect_watches`]
//!   (cut every stream mid-flight), [`FakeApiServer::set_available`] (503 on everything, an
//!   outage).
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Namespaces,
    Pods,
    NetworkPolicies,
}

impl Resource {
    fn kind(self) -> &'static str {
        match self {
            Resource::Namespaces => "Namespace",
            Resource::Pods => "Pod",
            Resource::NetworkPolicies => "NetworkPolicy",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::NetworkPolicies => "networking.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The resource of an object by its `kind`.
    pub fn of(object: &Value) -> Option<Resource> {
        match object.get("kind")?.as_str()? {
            "Namespace" => Some(Resource::Namespaces),
            "Pod" => Some(Resource::Pods),
            "NetworkPolicy" => Some(Resource::NetworkPolicies),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Inner {
    resource_version: u64,
    objects: BTreeMap<(Resource, String), Value>,
    /// (resourceVersion, resource, event type, object) for every change.
    history: Vec<(u64, Resource, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_watchable: u64,
    unavailable: bool,
    /// Bumped to end every open watch stream.
    disconnect_generation: u64,
    lists: HashMap<Resource, usize>,
    watches: HashMap<Resource, usize>,
    gone_sent: usize,
    bookmarks_sent: usize,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server; stops when dropped.
pub struct FakeApiServer {
    shared: Shared,
    runtime: Option<tokio::runtime::Runtime>,
    pub addrs: Vec<SocketAddr>,
}

fn object_key(object: &Value) -> String {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

impl FakeApiServer {
    /// Serves on each of `listeners` (which may belong to different network namespaces).
    pub fn start(listeners: Vec<std::net::TcpListener>) -> std::io::Result<FakeApiServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let shared: Shared = Arc::new(Mutex::new(Inner { resource_version: 1000, ..Default::default() }));
        let mut addrs = Vec::new();
        for listener in listeners {
            listener.set_nonblocking(true)?;
            addrs.push(listener.local_addr()?);
            let router = axum::Router::new()
                .route("/api/v1/namespaces", get(|s, q| serve(s, q, Resource::Namespaces)))
                .route("/api/v1/pods", get(|s, q| serve(s, q, Resource::Pods)))
                .route("/apis/networking.k8s.io/v1/networkpolicies", get(|s, q| serve(s, q, Resource::NetworkPolicies)))
                .with_state(shared.clone());
            let _guard = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener)?;
            runtime.spawn(async move {
                let _ = axum::serve(listener, router).await;
            });
        }
        Ok(FakeApiServer { shared, runtime: Some(runtime), addrs })
    }

    /// A kubeconfig (no authentication) for the server at `addr`.
    pub fn kubeconfig(addr: SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{addr}'}}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: agent}}\n\
             current-context: fake\n"
        )
    }

    /// Writes a kubeconfig for each of the server's addresses (one per node) into `dir`, as
    /// `kubeconfig-<index>`: their paths, in node order.
    pub fn write_kubeconfigs(&self, dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        let mut paths = Vec::new();
        for (index, addr) in self.addrs.iter().enumerate() {
            let path = dir.join(format!("kubeconfig-{index}"));
            std::fs::write(&path, FakeApiServer::kubeconfig(*addr))?;
            paths.push(path);
        }
        Ok(paths)
    }

    /// Creates or replaces an object (its `kind` says which collection).
    pub fn apply(&self, mut object: Value) {
        let Some(resource) = Resource::of(&object) else { panic!("unknown kind in {object}") };
        let mut inner = lock(&self.shared);
        inner.resource_version += 1;
        let rv = inner.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{}", object_key(&object)));
        }
        let key = (resource, object_key(&object));
        let kind = if inner.objects.insert(key, object.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        inner.history.push((rv, resource, kind, object));
    }

    pub fn delete(&self, resource: Resource, key: &str) {
        let mut inner = lock(&self.shared);
        let Some(mut object) = inner.objects.remove(&(resource, key.to_string())) else { return };
        inner.resource_version += 1;
        let rv = inner.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.history.push((rv, resource, "DELETED", object));
    }

    /// The current version of an object.
    pub fn get(&self, resource: Resource, key: &str) -> Option<Value> {
        lock(&self.shared).objects.get(&(resource, key.to_string())).cloned()
    }

    /// Forgets all history: a watch resuming from any earlier resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut inner = lock(&self.shared);
        inner.oldest_watchable = inner.resource_version + 1;
        inner.history.clear();
    }

    /// Ends every open watch stream, mid-flight.
    pub fn disconnect_watches(&self) {
        lock(&self.shared).disconnect_generation += 1;
    }

    /// `false`: every request gets 503 and open streams end (an API outage).
    pub fn set_available(&self, available: bool) {
        let mut inner = lock(&self.shared);
        inner.unavailable = !available;
        if !available {
            inner.disconnect_generation += 1;
        }
    }

    /// BOOKMARK events sent so far (only to watches that asked for them).
    pub fn bookmarks_sent(&self) -> usize {
        lock(&self.shared).bookmarks_sent
    }

    /// (lists, watches, 410s sent) so far, all resources.
    pub fn request_counts(&self) -> (usize, usize, usize) {
        let inner = lock(&self.shared);
        (inner.lists.values().sum(), inner.watches.values().sum(), inner.gone_sent)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

async fn serve(State(shared): State<Shared>, Query(query): Query<HashMap<String, String>>, resource: Resource) -> Response {
    let watch = query.get("watch").is_some_and(|v| v == "1" || v == "true");
    let mut inner = lock(&shared);
    if inner.unavailable {
        return json_response(StatusCode::SERVICE_UNAVAILABLE, &status(503, "ServiceUnavailable", "outage"));
    }
    if !watch {
        *inner.lists.entry(resource).or_default() += 1;
        let items: Vec<Value> = inner
            .objects
            .iter()
            .filter(|((r, _), _)| *r == resource)
            .map(|(_, o)| {
                let mut item = o.clone();
                if let Some(map) = item.as_object_mut() {
                    map.remove("kind");
                    map.remove("apiVersion");
                }
                item
            })
            .collect();
        let list = json!({"kind": format!("{}List", resource.kind()), "apiVersion": resource.api_version(),
                          "metadata": {"resourceVersion": inner.resource_version.to_string()}, "items": items});
        return json_response(StatusCode::OK, &list);
    }
    *inner.watches.entry(resource).or_default() += 1;
    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true" || v == "1");
    let timeout = Duration::from_secs(query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(300));
    let generation = inner.disconnect_generation;
    let mut first_lines: Vec<String> = Vec::new();
    let mut cursor = from;
    if from == 0 {
        // Synthetic ADDED events for the current state, as the real server does.
        for ((r, _), object) in &inner.objects {
            if *r == resource {
                first_lines.push(json!({"type": "ADDED", "object": object}).to_string());
            }
        }
        cursor = inner.resource_version;
    } else if from < inner.oldest_watchable {
        inner.gone_sent += 1;
        let line = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}).to_string();
        first_lines.push(line);
        cursor = u64::MAX; // nothing more: the stream ends after the error
    }
    drop(inner);
    let started = Instant::now();
    let state = (shared, cursor, first_lines, Instant::now());
    let stream = futures::stream::unfold(state, move |(shared, mut cursor, mut pending, mut last_bookmark)| async move {
        loop {
            if let Some(line) = pending.pop() {
                return Some((Ok::<_, std::io::Error>(format!("{line}\n")), (shared, cursor, pending, last_bookmark)));
            }
            if cursor == u64::MAX || started.elapsed() >= timeout {
                return None;
            }
            {
                let mut inner = lock(&shared);
                if inner.disconnect_generation != generation || inner.unavailable {
                    return None;
                }
                let from = cursor;
                let mut next: Vec<String> = Vec::new();
                for (rv, _, kind, object) in inner.history.iter().filter(|(rv, r, _, _)| *rv > from && *r == resource) {
                    cursor = cursor.max(*rv);
                    next.push(json!({"type": kind, "object": object}).to_string());
                }
                if !next.is_empty() {
                    pending = next.into_iter().rev().collect();
                    continue;
                }
                if bookmarks && last_bookmark.elapsed() >= Duration::from_millis(100) {
                    last_bookmark = Instant::now();
                    inner.bookmarks_sent += 1;
                    cursor = cursor.max(inner.resource_version);
                    let line = json!({"type": "BOOKMARK", "object": {"kind": resource.kind(), "apiVersion": resource.api_version(),
                                      "metadata": {"resourceVersion": cursor.to_string()}}});
                    return Some((Ok(format!("{line}\n")), (shared.clone(), cursor, pending, last_bookmark)));
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}
