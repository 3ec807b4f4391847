//! The node-local API: what clients on the node (the `netsieve-cni` plugin, node commands)
//! ask the agent over its unix socket (`netsieve agent --socket PATH`, default
//! [`DEFAULT_SOCKET`]), and what it answers. Shared by the agent (server), the CNI plugin and
//! future commands (clients), so both sides use the same types.
//!
//! # Wire format
//!
//! Newline-delimited JSON over a stream socket. A client writes one request per line and reads
//! exactly one response line per request, in order; it may send several requests on one
//! connection. A request line is at most [`MAX_REQUEST_BYTES`] bytes (newline included):
//!
//! ```json
//! {"version":1,"request":{"type":"ping"}}
//! {"version":1,"request":{"type":"cni_add","pod":{"namespace":"default","name":"web-0"},
//!   "container_id":"3f1a…","host_interfaces":["veth1234"],"ips":["10.244.1.7"]}}
//! ```
//!
//! (shown wrapped; on the wire each is one line). Responses have the same envelope:
//!
//! ```json
//! {"version":1,"response":{"type":"pong","agent_version":"0.1.0","node":"node0"}}
//! {"version":1,"response":{"type":"cni_added","enforcement":{"ifindex":12,"mode":"policy","ips":["10.244.1.7"]}}}
//! {"version":1,"response":{"type":"error","code":"unknown_request","message":"…"}}
//! ```
//!
//! - `version` is the protocol version, [`PROTOCOL_VERSION`]. An agent answers a request of a
//!   version it does not speak with an `unsupported_version` error (in its own version).
//! - `type` names the request; an unknown type gets an `unknown_request` error, so a newer
//!   client learns that the agent is older. Unknown fields are ignored, so a later version
//!   can add optional fields without breaking older agents.
//! - Every request is untrusted input: a line that is not JSON, is too large, or does not
//!   decode gets an `error` response (see [`ErrorCode`]) and the connection stays usable (a
//!   too-large line closes it, since the rest of the line cannot be skipped safely).
//!
//! # Adding a request
//!
//! Add a variant to [`Request`] (and its name to [`Request::TYPES`]), the variant it gets
//! back to [`Response`], and its handling in the agent (`daemon/socket.rs` for requests the
//! socket server answers itself, `daemon/agent.rs` for those that need the agent's state).
//! Bump [`PROTOCOL_VERSION`] only for an incompatible change to existing messages.
//!
//! # Streams
//!
//! `subscribe` is the one request answered by more than one line: `subscribed`, then one
//! `event` line per verdict event matching the filter, and a `lost` line whenever events for
//! this connection had to be dropped because the client did not read fast enough (the agent
//! never waits for a reader). The stream ends when either side closes the connection; the
//! connection carries no further requests. The observability messages are in [`observe`].
pub mod observe;

use observe::{EventSettings, EventSubscription, ExplainQuery, FlowEvent, LiveExplanation, NodeStatus};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Where the agent listens unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/netsieve/agent.sock";
/// Largest request line the agent reads, newline included.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest response line a client reads, newline included.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Most addresses one pod may declare (Kubernetes allows one per family).
pub const MAX_POD_IPS: usize = 8;
/// Most host-side interface candidates one attachment may list.
pub const MAX_HOST_INTERFACES: usize = 8;

/// One request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub version: u32,
    pub request: Request,
}

/// One response line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub version: u32,
    pub response: Response,
}

/// What a client can ask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent there, and which node and version is it.
    Ping,
    /// CNI ADD: a pod's sandbox has its network; enforce the pod's policy on its host-side
    /// interface before the pod runs. Answered once the endpoint is programmed and attached.
    CniAdd(CniAttachment),
    /// CNI CHECK: is the pod enforced on this interface with these addresses.
    CniCheck(CniAttachment),
    /// CNI DEL: the sandbox goes away; forget what ADD registered. Succeeds when nothing is
    /// registered.
    CniDel(CniDetachment),
    /// Stream verdict events (see the module documentation on streams).
    Subscribe(EventSubscription),
    /// The endpoints of this node and how they are programmed, counters, map pressure.
    Status,
    /// Judge a flow against the state the agent enforces; look it up in conntrack.
    Explain(ExplainQuery),
}

impl Request {
    /// The `type` of every request this build knows.
    pub const TYPES: &'static [&'static str] =
        &["ping", "cni_add", "cni_check", "cni_del", "subscribe", "status", "explain"];
}

/// A pod by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    /// `namespace/name`, the agent's key for pods.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A pod's sandbox as the CNI runtime and the main plugin describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAttachment {
    pub pod: PodRef,
    pub container_id: String,
    /// Candidates for the pod's interface on the node's side: the interfaces of prevResult
    /// without `sandbox`, in order (the bridge plugin lists the bridge too; the agent takes
    /// the first that exists and is not a bridge).
    pub host_interfaces: Vec<String>,
    /// The pod's addresses (prevResult's `ips`, without prefix length).
    pub ips: Vec<IpAddr>,
}

/// A sandbox going away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniDetachment {
    pub pod: PodRef,
    pub container_id: String,
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Pong { agent_version: String, node: String },
    CniAdded { enforcement: Enforcement },
    CniChecked { enforcement: Enforcement },
    CniDeleted { registered: bool },
    /// The subscription is live; events follow.
    Subscribed { node: String, settings: EventSettings },
    Event(Box<FlowEvent>),
    /// This many events matching the filter were dropped since the last line because the
    /// client did not keep up.
    Lost { events: u64 },
    Status(Box<NodeStatus>),
    Explained(Box<LiveExplanation>),
    Error { code: ErrorCode, message: String },
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error { code, message: message.into() }
    }
}

/// How a pod is enforced on its interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforcement {
    pub ifindex: u32,
    pub mode: EnforcementMode,
    /// The addresses the agent enforces the pod with (the Pod object's, else the CNI's).
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforcementMode {
    /// The pod's NetworkPolicies.
    Policy,
    /// The Pod object is not known yet: everything but node traffic is dropped until it is.
    FailClosed,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not a request envelope.
    Malformed,
    /// Longer than [`MAX_REQUEST_BYTES`].
    TooLarge,
    UnsupportedVersion,
    UnknownRequest,
    /// Decoded, but a field is missing or out of range.
    Invalid,
    /// The pod's interface does not exist on this node.
    NoInterface,
    /// The pod is known but not enforced as asked (CHECK), or is scheduled on another node.
    NotEnforced,
    /// The agent cannot take the request now (busy, shutting down); retry.
    Unavailable,
    /// Programming or attaching failed.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the agent at {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent closed the connection without answering")]
    NoAnswer,
    #[error("the agent's answer is longer than {MAX_RESPONSE_BYTES} bytes")]
    AnswerTooLarge,
    #[error("the agent's answer does not decode: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the agent speaks protocol version {0}, this client {PROTOCOL_VERSION}")]
    Version(u32),
}

/// Sends one request and waits for its response, at most `timeout` for each step.
pub fn call(socket: &Path, request: Request, timeout: Duration) -> Result<Response, ClientError> {
    call_with_limit(socket, request, timeout, MAX_RESPONSE_BYTES)
}

/// Largest `status` answer a client reads: a node's endpoints with their rules can exceed
/// [`MAX_RESPONSE_BYTES`].
pub const MAX_STATUS_BYTES: usize = 64 * 1024 * 1024;

/// [`call`] reading an answer of at most `limit` bytes.
pub fn call_with_limit(socket: &Path, request: Request, timeout: Duration, limit: usize) -> Result<Response, ClientError> {
    let stream = connect(socket, timeout)?;
    send(&stream, request)?;
    let mut reader = BufReader::new(stream);
    read_response(&mut reader, limit)?.ok_or(ClientError::NoAnswer)
}

fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let stream =
        UnixStream::connect(socket).map_err(|source| ClientError::Connect { path: socket.display().to_string(), source })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

fn send(mut stream: &UnixStream, request: Request) -> Result<(), ClientError> {
    let mut line = serde_json::to_vec(&RequestEnvelope { version: PROTOCOL_VERSION, request })?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(())
}

/// Reads one response line of at most `limit` bytes; `None` when the agent closed the
/// connection between lines.
fn read_response<R: BufRead>(reader: &mut R, limit: usize) -> Result<Option<Response>, ClientError> {
    let mut answer = Vec::new();
    reader.take(limit as u64).read_until(b'\n', &mut answer)?;
    if answer.is_empty() {
        return Ok(None);
    }
    if answer.last() != Some(&b'\n') {
        return Err(if answer.len() >= limit { ClientError::AnswerTooLarge } else { ClientError::NoAnswer });
    }
    let envelope: ResponseEnvelope = serde_json::from_slice(&answer)?;
    if envelope.version != PROTOCOL_VERSION {
        return Err(ClientError::Version(envelope.version));
    }
    Ok(Some(envelope.response))
}

/// A `subscribe` stream: the agent's `subscribed` answer, then its lines one by one.
pub struct EventStream {
    reader: BufReader<UnixStream>,
}

impl EventStream {
    /// Subscribes; returns the stream and the agent's answer (`subscribed`, or an error
    /// response the caller reports). `timeout` bounds connecting and the first answer; event
    /// lines are then awaited without a limit.
    pub fn open(socket: &Path, subscription: EventSubscription, timeout: Duration) -> Result<(EventStream, Response), ClientError> {
        let stream = connect(socket, timeout)?;
        send(&stream, Request::Subscribe(subscription))?;
        let mut reader = BufReader::new(stream);
        let first = read_response(&mut reader, MAX_RESPONSE_BYTES)?.ok_or(ClientError::NoAnswer)?;
        reader.get_ref().set_read_timeout(None)?;
        Ok((EventStream { reader }, first))
    }

    /// The next line; `None` when the agent closed the stream (it stopped).
    pub fn next_response(&mut self) -> Result<Option<Response>, ClientError> {
        read_response(&mut self.reader, MAX_RESPONSE_BYTES)
    }
}

/// Why a request line was refused before reaching the agent's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
}

/// Decodes and validates one request line (without its newline).
pub fn decode_request(line: &[u8]) -> Result<Request, Rejection> {
    let reject = |code, message: String| Rejection { code, message };
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| reject(ErrorCode::Malformed, format!("not JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(reject(ErrorCode::Malformed, "a request is a JSON object".into()));
    };
    let version = object.get("version").and_then(serde_json::Value::as_u64);
    match version {
        None => return Err(reject(ErrorCode::Malformed, "missing numeric field `version`".into())),
        Some(v) if v != u64::from(PROTOCOL_VERSION) => {
            return Err(reject(ErrorCode::UnsupportedVersion, format!("version {v} requested; this agent speaks {PROTOCOL_VERSION}")));
        }
        Some(_) => {}
    }
    let Some(request) = object.get("request") else {
        return Err(reject(ErrorCode::Malformed, "missing field `request`".into()));
    };
    let Some(kind) = request.get("type").and_then(serde_json::Value::as_str) else {
        return Err(reject(ErrorCode::Malformed, "missing string field `request.type`".into()));
    };
    if !Request::TYPES.contains(&kind) {
        let shown: String = kind.chars().take(64).collect();
        return Err(reject(ErrorCode::UnknownRequest, format!("unknown request type {shown:?}; known: {}", Request::TYPES.join(", "))));
    }
    let request: Request =
        serde_json::from_value(request.clone()).map_err(|e| reject(ErrorCode::Invalid, format!("{kind}: {e}")))?;
    validate(&request).map_err(|message| reject(ErrorCode::Invalid, format!("{kind}: {message}")))?;
    Ok(request)
}

/// Field checks beyond decoding: names as Kubernetes and Linux allow them, bounded lists.
fn validate(request: &Request) -> Result<(), String> {
    let pod = |pod: &PodRef| -> Result<(), String> {
        for (what, value, max) in [("namespace", &pod.namespace, 63), ("name", &pod.name, 253)] {
            if value.is_empty() || value.len() > max {
                return Err(format!("pod {what} must have 1 to {max} characters"));
            }
            if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
                return Err(format!("pod {what} {value:?} is not a Kubernetes name"));
            }
        }
        Ok(())
    };
    let container = |id: &str| -> Result<(), String> {
        if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
            return Err("container_id must have 1 to 256 printable characters".into());
        }
        Ok(())
    };
    match request {
        Request::Ping => Ok(()),
        Request::CniAdd(a) | Request::CniCheck(a) => {
            pod(&a.pod)?;
            container(&a.container_id)?;
            if a.host_interfaces.is_empty() || a.host_interfaces.len() > MAX_HOST_INTERFACES {
                return Err(format!("host_interfaces must list 1 to {MAX_HOST_INTERFACES} names"));
            }
            // Linux interface names: 1 to 15 bytes, no '/', no whitespace.
            for name in &a.host_interfaces {
                if name.is_empty() || name.len() > 15 || name.contains('/') || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(format!("host interface {name:?} is not a Linux interface name"));
                }
            }
            if a.ips.is_empty() || a.ips.len() > MAX_POD_IPS {
                return Err(format!("ips must list 1 to {MAX_POD_IPS} addresses"));
            }
            Ok(())
        }
        Request::CniDel(d) => {
            pod(&d.pod)?;
            container(&d.container_id)
        }
        Request::Status => Ok(()),
        Request::Subscribe(subscription) => subscription.filter.validate(),
        Request::Explain(query) => {
            for (what, value) in [("from", &query.from), ("to", &query.to)] {
                if value.is_empty() || value.len() > 320 || value.chars().any(char::is_control) {
                    return Err(format!("{what} must have 1 to 320 printable characters"));
                }
            }
            if crate::policy::Protocol::parse(&query.protocol).is_none() {
                return Err(format!("unknown protocol {:?} (TCP, UDP, SCTP or ICMP)", query.protocol.chars().take(16).collect::<String>()));
            }
            Ok(())
        }
    }
}

/// Encodes a response line, newline included.
pub fn encode_response(response: Response) -> Vec<u8> {
    let envelope = ResponseEnvelope { version: PROTOCOL_VERSION, response };
    // Serialising these plain types cannot fail; an empty line would still be an answer.
    let mut line = serde_json::to_vec(&envelope).unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add() -> Request {
        Request::CniAdd(CniAttachment {
            pod: PodRef { namespace: "default".into(), name: "web-0".into() },
            container_id: "abc".into(),
            host_interfaces: vec!["veth1".into()],
            ips: vec!["10.0.0.1".parse().expect("ip"), "fd00::1".parse().expect("ip")],
        })
    }

    #[test]
    fn requests_round_trip_through_the_wire_format() {
        for request in [Request::Ping, add()] {
            let line = serde_json::to_vec(&RequestEnvelope { version: PROTOCOL_VERSION, request: request.clone() }).expect("encode");
            assert_eq!(decode_request(&line), Ok(request));
        }
        let line = br#"{"version":1,"request":{"type":"ping"}}"#;
        assert_eq!(decode_request(line), Ok(Request::Ping));
        let text = String::from_utf8(encode_response(Response::Pong { agent_version: "1".into(), node: "n".into() })).expect("utf8");
        assert_eq!(text, "{\"version\":1,\"response\":{\"type\":\"pong\",\"agent_version\":\"1\",\"node\":\"n\"}}\n");
    }

    #[test]
    fn bad_requests_get_their_error_code() {
        let code = |line: &str| decode_request(line.as_bytes()).map_err(|r| r.code);
        assert_eq!(code("not json"), Err(ErrorCode::Malformed));
        assert_eq!(code("[1,2]"), Err(ErrorCode::Malformed));
        assert_eq!(code(r#"{"request":{"type":"ping"}}"#), Err(ErrorCode::Malformed));
        assert_eq!(code(r#"{"version":2,"request":{"type":"ping"}}"#), Err(ErrorCode::UnsupportedVersion));
        assert_eq!(code(r#"{"version":1,"request":{"type":"format_disk"}}"#), Err(ErrorCode::UnknownRequest));
        assert_eq!(code(r#"{"version":1,"request":{"type":"cni_add"}}"#), Err(ErrorCode::Invalid));
        let bad_name = r#"{"version":1,"request":{"type":"cni_add","pod":{"namespace":"Default","name":"a"},"container_id":"c","host_interfaces":["v"],"ips":["10.0.0.1"]}}"#;
        assert_eq!(code(bad_name), Err(ErrorCode::Invalid));
        let no_ips = r#"{"version":1,"request":{"type":"cni_add","pod":{"namespace":"d","name":"a"},"container_id":"c","host_interfaces":["v"],"ips":[]}}"#;
        assert_eq!(code(no_ips), Err(ErrorCode::Invalid));
        let long_if = r#"{"version":1,"request":{"type":"cni_add","pod":{"namespace":"d","name":"a"},"container_id":"c","host_interfaces":["0123456789abcdef"],"ips":["10.0.0.1"]}}"#;
        assert_eq!(code(long_if), Err(ErrorCode::Invalid));
        // Unknown fields are ignored (forward compatibility).
        let extra = r#"{"version":1,"request":{"type":"ping","since":"later"},"trace":"x"}"#;
        assert_eq!(code(extra), Ok(Request::Ping));
    }
}
