//! The node-local API server on `--socket` (wire format and request types: [`crate::node_api`]).
//!
//! Every request is untrusted: lines are read with a size bound ([`MAX_REQUEST_BYTES`]) and a
//! time bound, decoded and validated here, and only well-formed requests reach the agent's
//! loop, through a bounded queue. A connection lives at most [`CONNECTION_LIFETIME`]; at most
//! [`MAX_CONNECTIONS`] are served at once (others get an `unavailable` error). The socket is
//! root-only: its directory is created 0700 and the socket set 0600.
//!
//! A `subscribe` request turns its connection into an event stream: it leaves the connection
//! limits above for [`MAX_SUBSCRIBERS`] streams of unlimited lifetime, each fed from a bounded
//! queue the agent never waits on (see [`crate::observe::hub`]). A stream ends when the
//! client closes it or stops reading for [`STREAM_WRITE_TIMEOUT`], or when the agent stops.
use super::error::AgentError;
use crate::node_api::observe::{EventFilter, EventSettings};
use crate::node_api::{self, ErrorCode, MAX_REQUEST_BYTES, Request, Response};
use crate::observe::hub::{EventHub, MAX_SUBSCRIBERS};
use std::sync::atomic::Ordering;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// A request for the agent's loop, with where to send its answer.
pub(super) type NodeRequest = (Request, oneshot::Sender<Response>);

/// How long a client may take to send one request line.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Requests queued for the agent's loop at once.
pub const QUEUE_DEPTH: usize = 64;
/// How long an event stream may wait for its client to take a line before it is closed.
pub const STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a stream tells its client about events it lost while nothing else is sent.
pub const LOST_NOTICE_INTERVAL: Duration = Duration::from_secs(1);

/// What event streams need: the subscribers' hub and the settings a stream announces.
#[derive(Clone)]
pub(super) struct Subscriptions {
    pub hub: Arc<EventHub>,
    pub settings: EventSettings,
}

/// Creates the socket's directory (0700) and removes a stale socket; refuses a socket another
/// agent still answers on.
fn prepare(path: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let socket_error = |source: std::io::Error| AgentError::Socket { path: path.to_path_buf(), source };
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Err(socket_error(std::io::Error::other("the socket path has no directory")));
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(socket_error)?;
    // The socket's own 0600 is what guards it; a 0700 directory also hides it. A directory
    // made by someone else with a looser mode (a DaemonSet's hostPath is created 0755) is
    // tightened, except shared ones (sticky like /tmp, or system directories), which only
    // get a warning.
    let meta = std::fs::metadata(dir).map_err(socket_error)?;
    let shared = meta.permissions().mode() & 0o1000 != 0
        || ["/", "/run", "/var/run", "/tmp", "/var/tmp", "/var", "/etc"].iter().any(|d| Path::new(d) == dir);
    if meta.permissions().mode() & 0o077 != 0 {
        if shared {
            tracing::warn!(dir = %dir.display(), "the socket's directory is shared; only the socket's 0600 mode guards it");
        } else {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(socket_error)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(socket_error(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another agent answers on this socket",
                )));
            }
            std::fs::remove_file(path).map_err(socket_error)?;
        }
        Ok(_) => return Err(socket_error(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists and is not a socket"))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(socket_error(error)),
    }
    Ok(())
}

/// Binds the socket and serves it until the runtime stops. Requests that need the agent's
/// state go to `to_agent`; `answer_timeout` bounds how long a client waits for the loop.
pub(super) fn serve(
    path: &Path,
    node: String,
    to_agent: mpsc::Sender<NodeRequest>,
    answer_timeout: Duration,
    subscriptions: Subscriptions,
) -> Result<SocketFile, AgentError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    prepare(path)?;
    let socket_error = |source: std::io::Error| AgentError::Socket { path: path.to_path_buf(), source };
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_error)?;
    let identity = std::fs::metadata(path).map(|m| (m.dev(), m.ino())).map_err(socket_error)?;
    tracing::info!(socket = %path.display(), "serving the node API");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let path: PathBuf = path.to_path_buf();
    let served = path.clone();
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, socket = %served.display(), "accepting a node API connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tokio::spawn(refuse(stream));
                continue;
            };
            let (node, to_agent, subscriptions) = (node.clone(), to_agent.clone(), subscriptions.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(CONNECTION_LIFETIME, connection(stream, node.clone(), to_agent, answer_timeout)).await {
                    Err(_) => tracing::debug!("node API connection closed at its lifetime limit"),
                    Ok(Some(stream)) => {
                        // A stream leaves the request connections' slots and lifetime.
                        drop(slot);
                        stream_events(stream, node, subscriptions).await;
                    }
                    Ok(None) => {}
                }
            });
        }
    });
    Ok(SocketFile { path, identity })
}

/// The socket file this agent created.
pub(super) struct SocketFile {
    path: PathBuf,
    /// (device, inode): tells our file from one a newer agent put at the same path.
    identity: (u64, u64),
}

impl SocketFile {
    /// Removes the file if it is still ours, so that clients fail fast instead of connecting
    /// to nothing.
    pub(super) fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn refuse(mut stream: UnixStream) {
    let line = node_api::encode_response(Response::error(ErrorCode::Unavailable, "too many connections; retry"));
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&line)).await;
}

/// One line read from a client.
enum Line {
    Complete(Vec<u8>),
    TooLarge,
    Closed,
}

async fn read_line(reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> std::io::Result<Line> {
    let mut line = Vec::new();
    // One byte over the limit tells a too-long line from one of exactly the limit.
    let read = (&mut *reader).take(MAX_REQUEST_BYTES as u64 + 1).read_until(b'\n', &mut line).await?;
    if read == 0 {
        return Ok(Line::Closed);
    }
    if line.len() > MAX_REQUEST_BYTES || (line.last() != Some(&b'\n') && line.len() == MAX_REQUEST_BYTES + 1) {
        return Ok(Line::TooLarge);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(Line::Complete(line))
}

/// A connection that asked for an event stream.
struct StreamRequest {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
    filter: EventFilter,
}

/// Serves request lines until the client closes, a limit is hit, or it subscribes (returned).
async fn connection(
    stream: UnixStream,
    node: String,
    to_agent: mpsc::Sender<NodeRequest>,
    answer_timeout: Duration,
) -> Option<StreamRequest> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let line = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_line(&mut reader)).await {
            Ok(Ok(Line::Complete(line))) => line,
            Ok(Ok(Line::TooLarge)) => {
                let message = format!("request longer than {MAX_REQUEST_BYTES} bytes");
                let _ = write.write_all(&node_api::encode_response(Response::error(ErrorCode::TooLarge, message))).await;
                return None;
            }
            Ok(Ok(Line::Closed)) | Ok(Err(_)) => return None,
            Err(_) => {
                let message = format!("no complete request within {REQUEST_READ_TIMEOUT:?}");
                let _ = write.write_all(&node_api::encode_response(Response::error(ErrorCode::Malformed, message))).await;
                return None;
            }
        };
        let response = match node_api::decode_request(&line) {
            Err(rejection) => {
                tracing::warn!(code = ?rejection.code, message = %rejection.message, "node API request refused");
                Response::Error { code: rejection.code, message: rejection.message }
            }
            Ok(Request::Ping) => Response::Pong { agent_version: env!("CARGO_PKG_VERSION").to_string(), node: node.clone() },
            Ok(Request::Subscribe(subscription)) => return Some(StreamRequest { reader, write, filter: subscription.filter }),
            Ok(request) => ask_agent(&to_agent, request, answer_timeout).await,
        };
        let written = tokio::time::timeout(REQUEST_READ_TIMEOUT, write.write_all(&node_api::encode_response(response))).await;
        if !matches!(written, Ok(Ok(()))) {
            return None;
        }
    }
}

/// Writes one line to a stream's client, at most [`STREAM_WRITE_TIMEOUT`]; false when the
/// client is gone or does not read.
async fn write_line(write: &mut tokio::net::unix::OwnedWriteHalf, line: &[u8]) -> bool {
    matches!(tokio::time::timeout(STREAM_WRITE_TIMEOUT, write.write_all(line)).await, Ok(Ok(())))
}

/// An event stream: `subscribed`, then every event of the subscription's queue, and `lost`
/// when the queue overflowed, until the client goes.
async fn stream_events(request: StreamRequest, node: String, subscriptions: Subscriptions) {
    let StreamRequest { mut reader, mut write, filter } = request;
    let mut subscription = match subscriptions.hub.subscribe(filter) {
        Ok(subscription) => subscription,
        Err(_) => {
            let message = format!("{MAX_SUBSCRIBERS} event streams are open already; retry later");
            let _ = write_line(&mut write, &node_api::encode_response(Response::error(ErrorCode::Unavailable, message))).await;
            return;
        }
    };
    tracing::info!(subscribers = subscriptions.hub.subscribers(), "event stream opened");
    let subscribed = Response::Subscribed { node, settings: subscriptions.settings.clone() };
    if !write_line(&mut write, &node_api::encode_response(subscribed)).await {
        return;
    }
    let mut notices = tokio::time::interval(LOST_NOTICE_INTERVAL);
    let mut ignored = [0u8; 512];
    loop {
        let line = tokio::select! {
            line = subscription.events.recv() => match line {
                Some(line) => line,
                None => break,
            },
            // The client sends nothing more; reading tells when it has gone.
            read = reader.read(&mut ignored) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            _ = notices.tick() => {
                let lost = subscription.lost.swap(0, Ordering::Relaxed);
                if lost > 0 && !write_line(&mut write, &node_api::encode_response(Response::Lost { events: lost })).await {
                    break;
                }
                continue;
            }
        };
        let lost = subscription.lost.swap(0, Ordering::Relaxed);
        if lost > 0 && !write_line(&mut write, &node_api::encode_response(Response::Lost { events: lost })).await {
            break;
        }
        if !write_line(&mut write, &line).await {
            break;
        }
    }
    drop(subscription);
    tracing::info!(subscribers = subscriptions.hub.subscribers(), "event stream closed");
}

async fn ask_agent(to_agent: &mpsc::Sender<NodeRequest>, request: Request, answer_timeout: Duration) -> Response {
    let (reply, answer) = oneshot::channel();
    match to_agent.try_send((request, reply)) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => return Response::error(ErrorCode::Unavailable, "the agent is busy; retry"),
        Err(mpsc::error::TrySendError::Closed(_)) => return Response::error(ErrorCode::Unavailable, "the agent is stopping"),
    }
    match tokio::time::timeout(answer_timeout, answer).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => Response::error(ErrorCode::Unavailable, "the agent stopped before answering"),
        Err(_) => Response::error(ErrorCode::Unavailable, format!("no answer from the agent within {answer_timeout:?}")),
    }
}
