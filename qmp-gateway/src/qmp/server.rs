//! The QMP server: unix and TCP listeners, one reader and one writer thread per client, and
//! the event bus that fans events out to every negotiated client.
//!
//! Threads rather than an event loop: a QMP server has a handful of clients, and a handler
//! may block (a forwarded command waits for the core) without holding up anybody else.
//! Everything a client gets — greeting, replies, events — goes through its bounded outbound
//! queue and its writer thread, so replies and events stay in order and a client that stops
//! reading is dropped instead of stalling the others.

use std::collections::HashMap;
use std::io::{self, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::Value;

use super::framing::{Frame, Framer};
use super::handler::{ClientCtx, CommandHandler, Peer};
use super::protocol::{error_line, greeting_line, package_name, Event, QmpError};
use super::ratelimit::DEFAULT_COMMANDS_PER_SECOND;
use super::session::{Registry, Session};

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket at this path; the path must not exist yet (StratoVirt's rule).
    Unix(PathBuf),
    /// A TCP socket, `host:port` (port 0 picks a free one).
    Tcp(String),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::fmt::Display for BoundAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BoundAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            BoundAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A listener's bound address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundAddr {
    /// The unix socket path.
    Unix(PathBuf),
    /// The TCP address, with the actual port.
    Tcp(SocketAddr),
}

/// Tunables; [`ServerConfig::default`] is what `flotilla` uses.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The greeting's `package` string.
    pub package: String,
    /// Longest accepted message in bytes.
    pub max_message: usize,
    /// Commands per second per client (leaky bucket), `None` for no limit.
    pub rate_limit: Option<u32>,
    /// Most clients connected at once; more are told so and closed.
    pub max_clients: usize,
    /// Lines (replies and events) queued for one client before it counts as stuck and is
    /// dropped.
    pub outbound_queue: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            package: package_name(),
            max_message: 256 * 1024,
            rate_limit: Some(DEFAULT_COMMANDS_PER_SECOND),
            max_clients: 64,
            outbound_queue: 1024,
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The unix socket path is taken.
    #[error("QMP socket {0} already exists (remove it first)")]
    SocketExists(PathBuf),
    /// Binding the unix socket failed.
    #[error("cannot listen on unix socket {path}: {source}")]
    BindUnix {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Binding the TCP socket failed.
    #[error("cannot listen on tcp {addr}: {source}")]
    BindTcp {
        /// The `host:port`.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// Starting a thread failed.
    #[error("cannot start QMP thread: {0}")]
    Thread(io::Error),
}

/// A connected socket of either kind.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        // The peer may be gone already; there is nothing left to do about a failure.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn shutdown_read(&self) {
        // As above: failure means the peer is gone already.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Read),
            Stream::Tcp(s) => s.shutdown(Shutdown::Read),
        };
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(data),
            Stream::Tcp(s) => s.write_all(data),
        }
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(timeout),
            Stream::Tcp(s) => s.set_write_timeout(timeout),
        }
    }

    /// Reads into `buf`; fds passed with SCM_RIGHTS on a unix socket are appended to `fds`.
    fn recv(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => recv_with_fds(s.as_raw_fd(), buf, fds),
        }
    }
}

/// Most fds accepted in one message; the kernel closes any beyond (MSG_CTRUNC).
const MAX_FDS_PER_MSG: usize = 16;

fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_MSG]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let bytes = msg.bytes;
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        log::warn!(
            "QMP client passed more than {MAX_FDS_PER_MSG} fds in one message; extra fds dropped"
        );
    }
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            for fd in received {
                // SAFETY: the kernel just installed `fd` in our table for this message;
                // nothing else owns it, so the OwnedFd becomes its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(bytes)
}

struct Subscriber {
    tx: SyncSender<String>,
    stream: Stream,
}

/// Delivers events to every negotiated client. Cheap to clone; create it before the server
/// so the handler can hold one.
#[derive(Clone, Default)]
pub struct EventBus {
    subscribers: Arc<Mutex<HashMap<u64, Subscriber>>>,
}

impl EventBus {
    /// A bus without subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Emits event `name` with `data`, timestamped now, to every negotiated client.
    pub fn emit(&self, name: &str, data: Value) -> Event {
        let event = Event::new(name, data);
        self.send(&event);
        event
    }

    /// Emits an already built event (e.g. one forwarded from the core).
    pub fn send(&self, event: &Event) {
        let line = event.to_line();
        log::debug!("QMP event {}", event.event);
        self.lock()
            .retain(|id, sub| match sub.tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    log::warn!("QMP client {id} does not read its events; disconnecting it");
                    sub.stream.shutdown();
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
    }

    /// How many clients receive events.
    pub fn subscribers(&self) -> usize {
        self.lock().len()
    }

    /// Queues `first` (the reply to `qmp_capabilities`) and subscribes the client, both
    /// under the bus lock, so no event emitted meanwhile is lost or overtakes the reply.
    /// Returns whether the client is still there.
    fn subscribe_after(&self, id: u64, sub: Subscriber, first: String) -> bool {
        let mut subs = self.lock();
        // The queue holds at most a few replies at this point; full means the client is
        // not reading at all.
        if sub.tx.try_send(first).is_err() {
            sub.stream.shutdown();
            return false;
        }
        subs.insert(id, sub);
        true
    }

    fn unsubscribe(&self, id: u64) {
        self.lock().remove(&id);
    }
}

struct Shared {
    registry: Arc<Registry>,
    config: ServerConfig,
    events: EventBus,
    clients: Mutex<HashMap<u64, Stream>>,
    writers: AtomicUsize,
    next_id: AtomicU64,
    stopping: AtomicBool,
}

impl Shared {
    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Stream>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener, SocketAddr),
}

/// A running QMP server. Dropping it (or [`QmpServer::shutdown`]) closes the listeners,
/// disconnects every client and removes the unix socket files.
pub struct QmpServer {
    shared: Arc<Shared>,
    addrs: Vec<BoundAddr>,
    acceptors: Vec<JoinHandle<()>>,
}

/// Binds every address and starts serving. Nothing is left bound if any address fails.
pub fn start(
    addrs: &[ListenAddr],
    handler: Arc<dyn CommandHandler>,
    events: EventBus,
    config: ServerConfig,
) -> Result<QmpServer, ServerError> {
    let mut listeners = Vec::new();
    for addr in addrs {
        match bind(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                remove_socket_files(&listeners);
                return Err(e);
            }
        }
    }
    let shared = Arc::new(Shared {
        registry: Arc::new(Registry::new(handler, config.package.clone())),
        config,
        events,
        clients: Mutex::default(),
        writers: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        stopping: AtomicBool::new(false),
    });
    let bound: Vec<BoundAddr> = listeners
        .iter()
        .map(|l| match l {
            Listener::Unix(_, p) => BoundAddr::Unix(p.clone()),
            Listener::Tcp(_, a) => BoundAddr::Tcp(*a),
        })
        .collect();
    let mut server = QmpServer {
        shared: shared.clone(),
        addrs: bound,
        acceptors: Vec::new(),
    };
    for (index, listener) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("qmp-accept-{index}"))
            .spawn(move || accept_loop(listener, shared))
            .map_err(ServerError::Thread)?;
        server.acceptors.push(handle);
    }
    for a in &server.addrs {
        log::info!("QMP listening on {a}");
    }
    Ok(server)
}

fn bind(addr: &ListenAddr) -> Result<Listener, ServerError> {
    match addr {
        ListenAddr::Unix(path) => {
            if path.symlink_metadata().is_ok() {
                return Err(ServerError::SocketExists(path.clone()));
            }
            // Clients wait for the path and connect at once: it must accept then.
            let l = flotilla_backend::socket::listen_atomically(path).map_err(|source| {
                ServerError::BindUnix {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok(Listener::Unix(l, path.clone()))
        }
        ListenAddr::Tcp(text) => {
            let err = |source| ServerError::BindTcp {
                addr: text.clone(),
                source,
            };
            let l = TcpListener::bind(text.as_str()).map_err(err)?;
            let local = l.local_addr().map_err(err)?;
            Ok(Listener::Tcp(l, local))
        }
    }
}

fn remove_socket_files(listeners: &[Listener]) {
    for l in listeners {
        if let Listener::Unix(_, path) = l {
            remove_socket(path);
        }
    }
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        log::warn!("cannot remove QMP socket {}: {e}", path.display());
    }
}

fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    loop {
        let accepted = match &listener {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| (Stream::Unix(s), Peer::Unix)),
            Listener::Tcp(l, _) => l.accept().map(|(s, a)| (Stream::Tcp(s), Peer::Tcp(a))),
        };
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        match accepted {
            Ok((stream, peer)) => {
                if let Err(e) = admit(stream, peer, &shared) {
                    log::warn!("QMP: cannot serve a new client: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("QMP accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn admit(mut stream: Stream, peer: Peer, shared: &Arc<Shared>) -> io::Result<()> {
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    {
        let mut clients = shared.clients();
        if clients.len() >= shared.config.max_clients {
            drop(clients);
            log::warn!("QMP: refusing client {id} ({peer}): too many clients");
            stream.set_write_timeout(Some(Duration::from_secs(1)))?;
            let line = error_line(
                &QmpError::generic(format!(
                    "too many QMP clients (at most {})",
                    shared.config.max_clients
                )),
                None,
            );
            // Best effort: the connection is closed either way.
            let _ = stream.write_all(line.as_bytes());
            stream.shutdown();
            return Ok(());
        }
        clients.insert(id, stream.try_clone()?);
    }
    log::info!("QMP client {id} connected ({peer})");
    let (tx, rx) = sync_channel::<String>(shared.config.outbound_queue);
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            shared.clients().remove(&id);
            return Err(e);
        }
    };
    shared.writers.fetch_add(1, Ordering::SeqCst);
    let writer_shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("qmp-writer-{id}"))
        .spawn(move || {
            write_loop(writer, rx);
            writer_shared.writers.fetch_sub(1, Ordering::SeqCst);
        })
        .inspect_err(|_| {
            shared.writers.fetch_sub(1, Ordering::SeqCst);
        })
        .and_then(|_| {
            let shared = shared.clone();
            let ctx = ClientCtx::new(id, peer);
            std::thread::Builder::new()
                .name(format!("qmp-client-{id}"))
                .spawn(move || serve_client(stream, ctx, tx, shared))
        });
    if let Err(e) = spawned {
        if let Some(s) = shared.clients().remove(&id) {
            s.shutdown();
        }
        return Err(e);
    }
    Ok(())
}

/// How long [`QmpServer::shutdown`] lets clients' queued lines drain.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long a write may block before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

fn write_loop(mut stream: Stream, rx: Receiver<String>) {
    if let Err(e) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
        log::warn!("QMP: cannot set a write timeout: {e}");
    }
    for line in rx {
        if let Err(e) = stream.write_all(line.as_bytes()) {
            log::debug!("QMP write failed: {e}");
            stream.shutdown();
            return;
        }
    }
}

fn serve_client(mut stream: Stream, ctx: ClientCtx, tx: SyncSender<String>, shared: Arc<Shared>) {
    let id = ctx.id();
    let mut session = Session::new(
        shared.registry.clone(),
        ctx.clone(),
        shared.config.rate_limit,
    );
    let mut framer = Framer::new(shared.config.max_message);
    let mut buf = vec![0u8; 8192];
    let mut frames = Vec::new();
    let mut fds = Vec::new();
    let mut open = tx.send(greeting_line(shared.registry.package())).is_ok();
    while open {
        let n = match stream.recv(&mut buf, &mut fds) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("QMP client {id}: read failed: {e}");
                break;
            }
        };
        if !fds.is_empty() {
            log::debug!("QMP client {id}: received {} fds", fds.len());
            ctx.push_fds(std::mem::take(&mut fds));
        }
        let data = buf.get(..n).unwrap_or_default();
        framer.push(data, &mut frames);
        for frame in frames.drain(..) {
            let was_negotiated = session.negotiated();
            let reply = match frame {
                Frame::Message(text) => session.handle(&text),
                Frame::TooLong => error_line(
                    &QmpError::generic(format!(
                        "QMP input exceeds {} bytes; skipped up to the next newline",
                        shared.config.max_message
                    )),
                    None,
                ),
            };
            let sent = if !was_negotiated && session.negotiated() {
                // Negotiation succeeded: from here on the client gets events, and the first
                // one must come after this reply.
                match stream.try_clone() {
                    Ok(s) => shared.events.subscribe_after(
                        id,
                        Subscriber {
                            tx: tx.clone(),
                            stream: s,
                        },
                        reply,
                    ),
                    Err(e) => {
                        log::warn!("QMP client {id}: no events: {e}");
                        tx.send(reply).is_ok()
                    }
                }
            } else {
                tx.send(reply).is_ok()
            };
            ctx.run_deferred();
            if !sent {
                open = false;
                break;
            }
        }
    }
    // The writer still sends what is queued (replies to the last commands before EOF), then
    // closes the socket when it drops the last clone.
    shared.events.unsubscribe(id);
    shared.clients().remove(&id);
    drop(tx);
    drop(stream);
    shared.registry.handler().client_closed(&ctx);
    log::info!("QMP client {id} disconnected");
}

impl QmpServer {
    /// The bound addresses, in the order given to [`start`].
    pub fn local_addrs(&self) -> &[BoundAddr] {
        &self.addrs
    }

    /// The event bus the server delivers through.
    pub fn events(&self) -> &EventBus {
        &self.shared.events
    }

    /// How many clients are connected.
    pub fn client_count(&self) -> usize {
        self.shared.clients().len()
    }

    /// Stops accepting, disconnects every client and removes the unix socket files.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake each blocked accept() with a connection of our own.
        for addr in &self.addrs {
            let woke = match addr {
                BoundAddr::Unix(p) => UnixStream::connect(p).map(drop),
                BoundAddr::Tcp(a) => wake_addr(*a)
                    .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).map(drop)),
            };
            if let Err(e) = woke {
                log::warn!("QMP: cannot wake listener {addr}: {e}");
            }
        }
        for handle in self.acceptors.drain(..) {
            if handle.join().is_err() {
                log::error!("QMP accept thread panicked");
            }
        }
        // Stop reading from every client; each writer still sends what is queued (the reply
        // to `quit`, the SHUTDOWN event), then closes. Wait a little for that.
        for stream in self.shared.clients().values() {
            stream.shutdown_read();
        }
        let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
        while self.shared.writers.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        for stream in self.shared.clients().values() {
            stream.shutdown();
        }
        for addr in &self.addrs {
            if let BoundAddr::Unix(p) = addr {
                remove_socket(p);
            }
        }
    }
}

/// The address to connect to in order to wake a listener bound to `a` (a wildcard address
/// is reached through loopback).
fn wake_addr(a: SocketAddr) -> io::Result<SocketAddr> {
    if !a.ip().is_unspecified() {
        return Ok(a);
    }
    let host = if a.is_ipv4() { "127.0.0.1" } else { "::1" };
    (host, a.port())
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("no loopback address"))
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop();
    }
}
