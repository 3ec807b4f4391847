//! Load generators of the throughput benchmark, each a single-threaded client in the client
//! pod's namespace and a single-threaded server in the server pod's, both pinned to a CPU of
//! their own, bounded in time: small-packet UDP (`sendmmsg`/`recvmmsg` batches, so system
//! call overhead does not hide the per-packet path), 1-byte TCP request/response on one
//! connection, TCP connect/request/response/close, and bulk TCP with iperf3.
use crate::netns::{NetnsError, in_netns, run_in};
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    #[error("the {0} did not get ready within 5 s")]
    NotReady(&'static str),
    #[error("iperf3: {0}")]
    Iperf3(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> LoadError {
    move |source| LoadError::Io { what, source }
}

/// Where the two sides run.
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    pub client: usize,
    pub server: usize,
}

impl Cpus {
    /// Client on CPU 0, server on CPU 1 (both on CPU 0 on a one-CPU machine).
    pub fn split() -> Cpus {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        Cpus { client: 0, server: 1 % count }
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<(), LoadError> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it; the call only
    // reads the set and changes the calling thread's affinity.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        return Err(LoadError::Io { what: "pinning a load thread", source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Counted operations over the measured time.
#[derive(Clone, Copy, Debug)]
pub struct Counted {
    pub count: u64,
    pub elapsed: Duration,
    /// Operations that failed (a connection not established within 1 s, for example).
    pub failed: u64,
}

impl Counted {
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Small-packet UDP: what the client sent and what the server received.
#[derive(Clone, Copy, Debug)]
pub struct UdpOutcome {
    pub sent: u64,
    pub received: u64,
    pub elapsed: Duration,
}

impl UdpOutcome {
    /// Datagrams delivered to the server's socket per second of sending.
    pub fn delivered_per_second(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Datagrams per `sendmmsg`/`recvmmsg` call.
const BATCH: usize = 64;

/// A thread in a namespace (outer error: entering it) running a fallible server.
type ServerHandle<T> = JoinHandle<Result<Result<T, LoadError>, NetnsError>>;

/// A server thread in `netns` pinned to `cpu`: `setup` runs first (binding), the caller waits
/// until it has, then `serve` runs until it returns.
fn spawn_server<S, T: Send + 'static>(
    netns: &str,
    cpu: usize,
    what: &'static str,
    setup: impl FnOnce() -> Result<S, LoadError> + Send + 'static,
    serve: impl FnOnce(S) -> Result<T, LoadError> + Send + 'static,
) -> Result<ServerHandle<T>, LoadError> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = in_netns(netns, move || {
        let prepared = pin_current_thread(cpu).and_then(|()| setup());
        match prepared {
            Ok(state) => {
                let _ = ready_tx.send(Ok(()));
                serve(state)
            }
            Err(error) => {
                let _ = ready_tx.send(Err(error.to_string()));
                Err(error)
            }
        }
    })?;
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(_)) => Err(join(handle, what).err().unwrap_or(LoadError::NotReady(what))),
        Err(_) => Err(LoadError::NotReady(what)),
    }
}

fn join<T>(handle: ServerHandle<T>, what: &'static str) -> Result<T, LoadError> {
    handle.join().map_err(|_| LoadError::Panicked(what))??
}

/// Sends `payload`-byte datagrams from `client_ns` to `server` for `duration` while the server
/// counts what it receives.
pub fn udp_flood(
    client_ns: &str,
    server_ns: &str,
    server: SocketAddrV4,
    payload: usize,
    duration: Duration,
    cpus: Cpus,
) -> Result<UdpOutcome, LoadError> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop_server = stop.clone();
    let receiver = spawn_server(
        server_ns,
        cpus.server,
        "UDP sink",
        move || {
            let socket = UdpSocket::bind(server).map_err(io("binding the UDP sink"))?;
            socket2::SockRef::from(&socket).set_recv_buffer_size(8 << 20).map_err(io("SO_RCVBUF of the UDP sink"))?;
            socket.set_read_timeout(Some(Duration::from_millis(50))).map_err(io("read timeout of the UDP sink"))?;
            Ok(socket)
        },
        move |socket| {
            let mut batch = MessageBatch::new(BATCH, 2048);
            let mut received = 0u64;
            while !stop_server.load(Ordering::Relaxed) {
                received += batch.receive(&socket).map_err(io("receiving datagrams"))? as u64;
            }
            Ok(received)
        },
    )?;
    let sender = in_netns(client_ns, move || -> Result<(u64, Duration), LoadError> {
        pin_current_thread(cpus.client)?;
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(io("binding the UDP sender"))?;
        socket.connect(server).map_err(io("connecting the UDP sender"))?;
        let mut batch = MessageBatch::new(BATCH, payload);
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < duration {
            sent += batch.send(&socket).map_err(io("sending datagrams"))? as u64;
        }
        Ok((sent, started.elapsed()))
    })?;
    let sent = sender.join().map_err(|_| LoadError::Panicked("UDP sender"))?;
    // What is still queued at the sink was sent within the window: let it be read.
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let received = join(receiver, "UDP sink")?;
    let (sent, elapsed) = sent??;
    Ok(UdpOutcome { sent, received, elapsed })
}

/// `BATCH` message headers over one buffer each, for `sendmmsg` and `recvmmsg`.
struct MessageBatch {
    buffers: Vec<Vec<u8>>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl MessageBatch {
    fn new(count: usize, size: usize) -> MessageBatch {
        let mut buffers: Vec<Vec<u8>> = (0..count).map(|_| vec![0u8; size]).collect();
        let iovecs: Vec<libc::iovec> =
            buffers.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        let mut batch = MessageBatch { buffers, iovecs, headers: Vec::with_capacity(count) };
        for iov in batch.iovecs.iter_mut() {
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            batch.headers.push(header);
        }
        batch
    }

    /// One `sendmmsg` of the whole batch on a connected socket: datagrams sent.
    fn send(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        debug_assert!(!self.buffers.is_empty());
        // SAFETY: every header points at an iovec of `self`, which points at a buffer of
        // `self`; all outlive the call.
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), self.headers.as_mut_ptr(), self.headers.len() as u32, 0) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            // A full queue loses the batch, as a NIC would; the sink counts what arrives.
            return match error.raw_os_error() {
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::ECONNREFUSED) => Ok(0),
                _ => Err(error),
            };
        }
        Ok(n as usize)
    }

    /// One `recvmmsg`: waits up to the socket's read timeout for the first datagram, then
    /// takes what is queued (up to the batch size). Datagrams received.
    fn receive(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        // SAFETY: as in `send`; the kernel writes at most `iov_len` bytes into each buffer.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                self.headers.len() as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            return match error.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => Ok(0),
                _ => Err(error),
            };
        }
        Ok(n as usize)
    }
}

/// A listener whose `accept` returns after `timeout` without a connection (SO_RCVTIMEO
/// applies to accept on Linux), so a server loop can check its stop flag.
fn listener_with_accept_timeout(addr: SocketAddrV4, timeout: Duration) -> Result<TcpListener, LoadError> {
    let listener = TcpListener::bind(addr).map_err(io("binding a TCP server"))?;
    socket2::SockRef::from(&listener).set_read_timeout(Some(timeout)).map_err(io("accept timeout"))?;
    Ok(listener)
}

/// A client connection whose connect gives up after `timeout` (SO_SNDTIMEO bounds a blocking
/// connect on Linux): one SYN retransmission at most within 1 s.
fn connect(server: SocketAddrV4, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_write_timeout(Some(timeout))?;
    socket.connect(&SocketAddr::V4(server).into())?;
    let stream: TcpStream = socket.into();
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// 1-byte requests answered by 1-byte responses on one TCP connection, for `duration`:
/// transactions completed.
pub fn tcp_request_response(
    client_ns: &str,
    server_ns: &str,
    server: SocketAddrV4,
    duration: Duration,
    cpus: Cpus,
) -> Result<Counted, LoadError> {
    let responder = spawn_server(
        server_ns,
        cpus.server,
        "request/response server",
        move || listener_with_accept_timeout(server, Duration::from_secs(5)),
        move |listener| {
            let (mut stream, _) = listener.accept().map_err(io("accepting the request/response connection"))?;
            stream.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
            stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(io("read timeout"))?;
            let mut byte = [0u8; 1];
            loop {
                match stream.read(&mut byte) {
                    Ok(0) => return Ok(()),
                    Ok(_) => stream.write_all(&byte).map_err(io("sending a response"))?,
                    Err(error) => return Err(LoadError::Io { what: "reading a request", source: error }),
                }
            }
        },
    )?;
    let client = in_netns(client_ns, move || -> Result<Counted, LoadError> {
        pin_current_thread(cpus.client)?;
        let mut stream = connect(server, Duration::from_secs(2)).map_err(io("connecting for request/response"))?;
        stream.set_nodelay(true).map_err(io("TCP_NODELAY"))?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(io("read timeout"))?;
        let started = Instant::now();
        let mut count = 0u64;
        let mut byte = [1u8; 1];
        while started.elapsed() < duration {
            stream.write_all(&byte).map_err(io("sending a request"))?;
            stream.read_exact(&mut byte).map_err(io("reading a response"))?;
            count += 1;
        }
        Ok(Counted { count, elapsed: started.elapsed(), failed: 0 })
    })?;
    let counted = client.join().map_err(|_| LoadError::Panicked("request/response client"));
    // The client's socket is closed by now, so the server sees end of file and returns.
    let served = join(responder, "request/response server");
    // The client's error first: a server error follows from it.
    let counted = counted???;
    served?;
    Ok(counted)
}

/// New TCP connections for `duration`, each: connect, a 1-byte request, a 1-byte response, the
/// server closes (as an HTTP/1.0 server does, so TIME_WAIT stays on the server and the client
/// never runs out of ports), the client reads the end of file and closes. Connections
/// completed, and those that failed.
pub fn tcp_connect_request_close(
    client_ns: &str,
    server_ns: &str,
    server: SocketAddrV4,
    duration: Duration,
    cpus: Cpus,
) -> Result<Counted, LoadError> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop_server = stop.clone();
    let acceptor = spawn_server(
        server_ns,
        cpus.server,
        "connection server",
        move || listener_with_accept_timeout(server, Duration::from_millis(50)),
        move |listener| {
            let mut byte = [0u8; 1];
            while !stop_server.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else { continue };
                // A client that fails is the client's failure to count; the server goes on.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                if stream.read_exact(&mut byte).is_ok() {
                    let _ = stream.write_all(&byte);
                }
            }
            Ok(())
        },
    )?;
    let client = in_netns(client_ns, move || -> Result<Counted, LoadError> {
        pin_current_thread(cpus.client)?;
        let started = Instant::now();
        let (mut count, mut failed) = (0u64, 0u64);
        let mut rest = [0u8; 16];
        while started.elapsed() < duration {
            let mut exchange = || -> std::io::Result<()> {
                let mut stream = connect(server, Duration::from_secs(1))?;
                stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                stream.write_all(&[1])?;
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte)?;
                // Until the server's FIN: the client closes second, so no TIME_WAIT here.
                while stream.read(&mut rest)? > 0 {}
                Ok(())
            };
            match exchange() {
                Ok(()) => count += 1,
                Err(_) => failed += 1,
            }
        }
        Ok(Counted { count, elapsed: started.elapsed(), failed })
    })?;
    let counted = client.join().map_err(|_| LoadError::Panicked("connection client"));
    stop.store(true, Ordering::Relaxed);
    join(acceptor, "connection server")?;
    counted??
}

/// Whether a TCP connection from `client_ns` to `server` (a listener started for the check in
/// `server_ns`) completes and carries one byte each way within `timeout`.
pub fn tcp_reachable(client_ns: &str, server_ns: &str, server: SocketAddrV4, timeout: Duration) -> Result<bool, LoadError> {
    let cpus = Cpus::split();
    let server_timeout = timeout + Duration::from_millis(500);
    let acceptor = spawn_server(
        server_ns,
        cpus.server,
        "reachability server",
        move || listener_with_accept_timeout(server, server_timeout),
        move |listener| {
            // Nothing arriving within the timeout is the expected outcome when enforced.
            if let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).is_ok() {
                    let _ = stream.write_all(&byte);
                }
            }
            Ok(())
        },
    )?;
    let client = in_netns(client_ns, move || -> bool {
        let Ok(mut stream) = connect(server, timeout) else { return false };
        let _ = stream.set_read_timeout(Some(timeout));
        let mut byte = [7u8; 1];
        stream.write_all(&byte).is_ok() && stream.read_exact(&mut byte).is_ok() && byte == [7]
    })?;
    let reached = client.join().map_err(|_| LoadError::Panicked("reachability client"))??;
    join(acceptor, "reachability server")?;
    Ok(reached)
}

/// `iperf3 -s` in a pod's namespace, pinned; killed when dropped.
pub struct Iperf3Server {
    child: Child,
}

impl Iperf3Server {
    pub fn start(netns: &str, port: u16, cpu: usize) -> Result<Iperf3Server, LoadError> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "iperf3", "-s", "-p", &port.to_string(), "-A", &cpu.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting iperf3 -s"))?;
        let server = Iperf3Server { child };
        // Listening once `ss` lists the port (bounded: 5 s).
        let started = Instant::now();
        let filter = format!("sport = :{port}");
        while started.elapsed() < Duration::from_secs(5) {
            if run_in(netns, "ss", &["-Hltn", &filter], None).is_ok_and(|out| !out.trim().is_empty()) {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(LoadError::NotReady("iperf3 server"))
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One bulk TCP stream with iperf3 from `client_ns` to `server` for `seconds` after one omitted
/// second of slow start, client and server pinned: received bits per second.
pub fn iperf3_bulk(client_ns: &str, server: SocketAddrV4, seconds: u64, cpus: Cpus) -> Result<f64, LoadError> {
    let affinity = format!("{},{}", cpus.client, cpus.server);
    let (ip, port, time) = (server.ip().to_string(), server.port().to_string(), seconds.to_string());
    // `timeout` bounds the whole run whatever happens to the server.
    let limit = (seconds + 20).to_string();
    let args =
        [limit.as_str(), "iperf3", "-c", &ip, "-p", &port, "-t", &time, "-O", "1", "-A", &affinity, "-J", "--connect-timeout", "2000"];
    let output = run_in(client_ns, "timeout", &args, None)?;
    let report: serde_json::Value = serde_json::from_str(&output).map_err(|e| LoadError::Iperf3(format!("reading its JSON: {e}")))?;
    if let Some(error) = report.get("error").and_then(|e| e.as_str()) {
        return Err(LoadError::Iperf3(error.to_string()));
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| LoadError::Iperf3("no end.sum_received.bits_per_second in its report".into()))
}
