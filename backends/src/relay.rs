//! The vhost-user control connection: relayed between the frontend and a
//! private connection the library accepted, with the inflight messages
//! handled on the way.
//!
//! `vhost-user-backend` 0.24 can only serve a connection it accepted from a
//! `Listener` or made itself with `connect()`; it has no constructor taking a
//! connected stream, and its request handler type is private, so it can
//! neither serve flotilla's socketpair (`--fd`) nor be taught messages it
//! does not know (it answers GET/SET_INFLIGHT_FD with an error). So every
//! connection goes through this relay: the library accepts a private
//! connection, and we copy vhost-user control messages, with their
//! SCM_RIGHTS fds, between it and the frontend. Only the control path goes
//! through here; the data path is shared memory and eventfds.
//!
//! On the way the relay implements inflight I/O tracking when the device
//! asked for it (docs/decisions/inflight-tracking.md): it adds
//! VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD to the library's GET_PROTOCOL_FEATURES
//! answer, takes the bit out of SET_PROTOCOL_FEATURES again (the library
//! must not believe it negotiated something it cannot do), and answers
//! GET_INFLIGHT_FD and SET_INFLIGHT_FD itself through the device's
//! [`InflightTracker`]. Both are handled before the next frontend message
//! is forwarded, so the library applies everything after SET_INFLIGHT_FD
//! (the vring set-up) after the region is in place.
//!
//! The rendezvous socket lives in a fresh 0700 directory and is unlinked as
//! soon as our own client has connected, so no other process can take its
//! place. It is made before the sandbox is entered; only accepting the
//! frontend (with `--socket-path` or a listening `--fd`) happens after.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;

use crate::inflight::{InflightError, InflightMsg, InflightTracker};

/// vhost-user allows at most this many fds on one message.
const MAX_FDS: usize = 32;

/// Frontend request codes the relay looks at.
const SET_FEATURES: u32 = 2;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_KICK: u32 = 12;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const SET_VRING_ENABLE: u32 = 18;
/// Most SET_VRING_ENABLE messages held before SET_FEATURES (rings per device).
const MAX_HELD_ENABLES: usize = 64;
/// VHOST_USER_F_PROTOCOL_FEATURES, a bit of SET_FEATURES.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Header flags: protocol version 1, "this is a reply", "reply wanted".
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// What the frontend side of the relay is.
enum FrontendSide {
    /// Already connected (a socketpair end from the supervisor).
    Connected(UnixStream),
    /// A listening socket: the first frontend to connect is served.
    Listening(UnixListener),
}

/// A relay set up but not started: the library's private listener with our
/// own client already queued on it, and the frontend side.
pub(crate) struct Relay {
    library: UnixListener,
    inner: UnixStream,
    frontend: FrontendSide,
    state: Arc<RelayState>,
}

/// What the pumps share with [`crate::daemon::serve`].
pub(crate) struct RelayState {
    tracker: Option<Arc<InflightTracker>>,
    /// Protocol features the frontend acknowledged with SET_PROTOCOL_FEATURES.
    acked: AtomicU64,

    /// Why the relay ended the connection, if it did.
    failure: Mutex<Option<String>>,
}

impl RelayState {
    /// The error that made the relay end the connection, if any.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn fail(&self, why: String) {
        log::error!("{why}");
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(why);
    }

    fn negotiated(&self, feature: VhostUserProtocolFeatures) -> bool {
        self.acked.load(Ordering::Acquire) & feature.bits() != 0
    }
}

impl Relay {
    /// Listens on `path` (replacing a stale socket), accepts the first
    /// frontend and removes the path again, then prepares a relay for it.
    ///
    /// The accept happens here, before the sandbox, because a jailed process
    /// can no longer reach the path to remove it; a backend serves one
    /// frontend, so nothing is lost when the path goes once it connected.
    /// Nothing the frontend sends is read before [`Relay::start`].
    pub(crate) fn accept_on(
        path: &Path,
        tracker: Option<Arc<InflightTracker>>,
    ) -> io::Result<Relay> {
        let listener = crate::socket::listen_atomically(path)?;
        log::info!("listening on {}", path.display());
        let accepted = listener.accept();
        let _ = std::fs::remove_file(path);
        Self::new(FrontendSide::Connected(accepted?.0), tracker)
    }

    /// Prepares a relay for the inherited `fd`: a connected unix stream
    /// socket, or a listening one.
    pub(crate) fn for_fd(fd: RawFd, tracker: Option<Arc<InflightTracker>>) -> io::Result<Relay> {
        // Refuse fds that are not open before taking ownership of the number.
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(io::Error::from)?;
        // SAFETY: the fd is open (checked above) and was handed to this process
        // on its command line for exclusive use; nothing else in the program
        // refers to it, so taking ownership cannot close an fd someone else uses.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let listening = getsockopt(&owned, sockopt::AcceptConn).map_err(io::Error::from)?;
        if listening {
            return Self::new(FrontendSide::Listening(UnixListener::from(owned)), tracker);
        }
        let frontend = UnixStream::from(owned);
        // Fails with ENOTSOCK / EINVAL early if this is not a unix stream socket.
        frontend.peer_addr()?;
        Self::new(FrontendSide::Connected(frontend), tracker)
    }

    fn new(frontend: FrontendSide, tracker: Option<Arc<InflightTracker>>) -> io::Result<Relay> {
        let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("flotilla-relay.XXXXXX"))
            .map_err(io::Error::from)?;
        let path = dir.join("sock");
        let bound = UnixListener::bind(&path);
        let connected = bound
            .as_ref()
            .map_err(|e| io::Error::new(e.kind(), e.to_string()))
            .and_then(|_| UnixStream::connect(&path));
        // The pending connection survives the unlink; nothing else can connect now.
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
        let (library, inner) = (bound?, connected?);
        Ok(Relay {
            library,
            inner,
            frontend,
            state: Arc::new(RelayState {
                tracker,
                acked: AtomicU64::new(0),
                failure: Mutex::new(None),
            }),
        })
    }

    /// Waits for the frontend if it has not connected yet, starts copying,
    /// and returns the listener for `VhostUserDaemon::start` (it has our
    /// connection queued) and the state to ask for failures afterwards.
    pub(crate) fn start(self) -> io::Result<(Listener, Arc<RelayState>)> {
        let frontend = match self.frontend {
            FrontendSide::Connected(s) => s,
            FrontendSide::Listening(l) => l.accept()?.0,
        };
        let writer = Arc::new(Writer {
            stream: frontend.try_clone()?,
            lock: Mutex::new(()),
        });
        let (state_in, state_out) = (self.state.clone(), self.state.clone());
        let (in_from, in_to) = (frontend, self.inner.try_clone()?);
        let writer_in = writer.clone();
        spawn_pump(
            "relay-in",
            in_from.try_clone()?,
            in_to.try_clone()?,
            move || pump_in(&in_from, &in_to, &writer_in, &state_in),
        )?;
        let out_from = self.inner;
        let out_to = writer.stream.try_clone()?;
        spawn_pump("relay-out", out_from.try_clone()?, out_to, move || {
            pump_out(&out_from, &writer, &state_out)
        })?;
        Ok((Listener::from(self.library), self.state))
    }
}

/// The frontend socket, written by both pumps (the out pump forwards the
/// library's replies, the in pump sends the inflight replies), one whole
/// message at a time.
struct Writer {
    stream: UnixStream,
    lock: Mutex<()>,
}

impl Writer {
    fn send(&self, buf: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        send_all(&self.stream, buf, fds)
    }
}

/// Runs `body` on a new thread; when it ends, for whatever reason, both
/// sockets are shut down, so the daemon sees the frontend hang up and the
/// frontend sees a dead backend.
fn spawn_pump<F>(name: &str, a: UnixStream, b: UnixStream, body: F) -> io::Result<()>
where
    F: FnOnce() -> io::Result<()> + Send + 'static,
{
    thread::Builder::new().name(name.into()).spawn(move || {
        if let Err(e) = body() {
            log::debug!("relay: {e}");
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
    })?;
    Ok(())
}

/// Size of the vhost-user message header: request, flags, payload size.
const HEADER_LEN: usize = 12;
/// Larger than any vhost-user payload (the biggest, SET_MEM_TABLE and
/// GET_CONFIG, are a few KiB); a bigger size means a corrupt stream.
const MAX_PAYLOAD: usize = 1 << 20;

/// One framed message: header + payload, and the fds that came with it.
struct Message {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
    }
    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]])
    }
    fn payload(&self) -> &[u8] {
        &self.buf[HEADER_LEN..]
    }
    fn payload_u64(&self) -> Option<u64> {
        let p: [u8; 8] = self.payload().try_into().ok()?;
        Some(u64::from_le_bytes(p))
    }
    fn set_payload_u64(&mut self, v: u64) {
        self.buf[HEADER_LEN..].copy_from_slice(&v.to_le_bytes());
    }
}

/// A reply to `request` carrying `payload`.
fn reply(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// A request the relay makes itself: no reply wanted.
fn request(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_LEN + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&FLAG_VERSION.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// Reads one framed message; `None` at EOF between messages.
///
/// The copy goes message by message: a unix stream socket attaches fds to
/// the bytes they were sent with, but one `recvmsg` may return the end of
/// one message together with the next message and its fds. Forwarding such
/// a read unchanged would move the fds onto the earlier message, so we read
/// exactly one framed message at a time and send it with its own fds.
fn read_message(from: &UnixStream) -> io::Result<Option<Message>> {
    let mut fds = Vec::new();
    let mut buf = vec![0u8; HEADER_LEN];
    if !recv_exact(from, &mut buf, &mut fds, true)? {
        return Ok(None);
    }
    let size = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::other(format!("message payload of {size} bytes")));
    }
    buf.resize(HEADER_LEN + size, 0);
    recv_exact(from, &mut buf[HEADER_LEN..], &mut fds, false)?;
    Ok(Some(Message { buf, fds }))
}

/// Frontend -> library, answering the inflight messages on the way.
fn pump_in(
    from: &UnixStream,
    library: &UnixStream,
    frontend: &Writer,
    state: &RelayState,
) -> io::Result<()> {
    let inflight = VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
    // SET_VRING_ENABLE before SET_FEATURES acknowledged PROTOCOL_FEATURES:
    // QEMU sends one per queue while it attaches a vhost-user NIC, long
    // before it starts the device. The library would take it for a protocol
    // violation and end the connection; the relay answers it (when the
    // frontend wants an answer) and hands it on once the features allow it.
    let mut switchable = false;
    let mut early_enables: Vec<Vec<u8>> = Vec::new();
    while let Some(mut msg) = read_message(from)? {
        match msg.request() {
            SET_PROTOCOL_FEATURES => {
                if let Some(acked) = msg.payload_u64() {
                    state.acked.store(acked, Ordering::Release);
                }
            }
            SET_VRING_ENABLE if !switchable => {
                log::debug!("SET_VRING_ENABLE before SET_FEATURES: held until then");
                if msg.flags() & FLAG_NEED_REPLY != 0
                    && state.negotiated(VhostUserProtocolFeatures::REPLY_ACK)
                {
                    frontend.send(&reply(SET_VRING_ENABLE, &0u64.to_le_bytes()), &[])?;
                }
                // The last word per ring counts; a frontend cannot make the list grow
                // past one entry per ring a device can have.
                let ring = msg.payload().get(..4).map(<[u8]>::to_vec);
                early_enables.retain(|held| held.get(..4).map(<[u8]>::to_vec) != ring);
                if early_enables.len() < MAX_HELD_ENABLES {
                    early_enables.push(msg.payload().to_vec());
                }
                continue;
            }
            SET_FEATURES if msg.payload_u64().unwrap_or(0) & F_PROTOCOL_FEATURES != 0 => {
                switchable = true;
                send_all(library, &msg.buf, &msg.fds)?;
                for payload in early_enables.drain(..) {
                    send_all(library, &request(SET_VRING_ENABLE, &payload), &[])?;
                }
                continue;
            }
            _ => {}
        }
        if let Some(tracker) = &state.tracker {
            match msg.request() {
                SET_PROTOCOL_FEATURES => {
                    if let Some(acked) = msg.payload_u64() {
                        msg.set_payload_u64(acked & !inflight);
                    }
                }
                GET_INFLIGHT_FD => {
                    handle_get_inflight(&msg, tracker, frontend, state)?;
                    continue;
                }
                SET_INFLIGHT_FD => {
                    handle_set_inflight(msg, tracker, frontend, state)?;
                    continue;
                }
                _ => {}
            }
        }
        send_all(library, &msg.buf, &msg.fds)?;
        if msg.request() == SET_VRING_KICK
            && state.negotiated(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            kick_once(&msg.fds);
        }
        // Our copies of the fds close here; the receiver holds its own.
    }
    Ok(())
}

/// Signals a queue's new kick eventfd once, so the device's first event
/// after a (re)start comes even if neither the guest nor the frontend kicks:
/// that event is where requests the previous backend had in flight are
/// resubmitted (a guest waiting for them would never kick again). The
/// library starts watching the fd when it applies SET_VRING_KICK, and the
/// count we add stays pending until then. A spurious kick is harmless.
fn kick_once(fds: &[OwnedFd]) {
    if let [fd] = fds {
        if let Err(e) = nix::unistd::write(fd, &1u64.to_ne_bytes()) {
            log::warn!("kicking the restarted queue: {e}");
        }
    }
}

/// Library -> frontend, offering INFLIGHT_SHMFD when the device tracks.
fn pump_out(from: &UnixStream, frontend: &Writer, state: &RelayState) -> io::Result<()> {
    while let Some(mut msg) = read_message(from)? {
        if state.tracker.is_some() && msg.request() == GET_PROTOCOL_FEATURES {
            if let Some(offered) = msg.payload_u64() {
                msg.set_payload_u64(offered | VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits());
            }
        }
        frontend.send(&msg.buf, &msg.fds)?;
    }
    Ok(())
}

/// GET_INFLIGHT_FD: allocate the region and send it back. A failure has no
/// way to be reported in the protocol, so it ends the connection (as the
/// library does for requests it cannot serve) after logging why.
fn handle_get_inflight(
    msg: &Message,
    tracker: &InflightTracker,
    frontend: &Writer,
    state: &RelayState,
) -> io::Result<()> {
    let result = if state.negotiated(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
        InflightMsg::parse(msg.payload()).and_then(|m| tracker.get_inflight_fd(&m))
    } else {
        Err(InflightError::NotNegotiated)
    };
    match result {
        Ok((answer, fd)) => frontend.send(&reply(GET_INFLIGHT_FD, &answer.to_bytes()), &[fd]),
        Err(e) => {
            state.fail(format!("GET_INFLIGHT_FD: {e}"));
            Err(io::Error::other(e))
        }
    }
}

/// SET_INFLIGHT_FD: validate and map the region. With REPLY_ACK and
/// NEED_REPLY the frontend learns the outcome and decides; without, a
/// failure ends the connection, since serving on would let the frontend
/// believe requests are tracked when they are not.
fn handle_set_inflight(
    msg: Message,
    tracker: &InflightTracker,
    frontend: &Writer,
    state: &RelayState,
) -> io::Result<()> {
    let want_ack = msg.flags() & FLAG_NEED_REPLY != 0
        && state.negotiated(VhostUserProtocolFeatures::REPLY_ACK);
    let result = if !state.negotiated(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
        Err(InflightError::NotNegotiated)
    } else {
        let m = InflightMsg::parse(msg.payload());
        let mut fds = msg.fds;
        match (m, fds.len()) {
            (Err(e), _) => Err(e),
            (Ok(m), 1) => match fds.pop() {
                Some(fd) => tracker.set_inflight_fd(&m, fd),
                None => Err(InflightError::Fds(0)),
            },
            (Ok(_), n) => Err(InflightError::Fds(n)),
        }
    };
    if want_ack {
        let status = u64::from(result.is_err());
        frontend.send(&reply(SET_INFLIGHT_FD, &status.to_le_bytes()), &[])?;
    }
    match result {
        Ok(()) => Ok(()),
        Err(e) if want_ack => {
            log::error!("SET_INFLIGHT_FD refused: {e}");
            Ok(())
        }
        Err(e) => {
            state.fail(format!("SET_INFLIGHT_FD: {e}"));
            Err(io::Error::other(e))
        }
    }
}

/// Fills `buf` from `from`, collecting any fds; returns false on EOF before
/// the first byte when `eof_ok`.
fn recv_exact(
    from: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    eof_ok: bool,
) -> io::Result<bool> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut got = 0;
    while got < buf.len() {
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = recvmsg::<()>(
            from.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match msg {
            Err(nix::errno::Errno::EINTR) => continue,
            other => other.map_err(io::Error::from)?,
        };
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed these fds in our
                    // table for this message; we are their only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("too many fds on one message"));
        }
        if msg.bytes == 0 {
            if got == 0 && eof_ok {
                return Ok(false);
            }
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        got += msg.bytes;
    }
    Ok(true)
}

/// Sends `buf` with `fds` attached to its first byte.
fn send_all(to: &UnixStream, buf: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < buf.len() {
        let iov = [IoSlice::new(&buf[sent..])];
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
            &rights
        } else {
            &[]
        };
        match sendmsg::<()>(to.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::IntoRawFd;

    fn message(request: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = request.to_le_bytes().to_vec();
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// Receives one framed message the way vhost does: header, then body.
    fn recv_one(sock: &UnixStream) -> (Vec<u8>, Option<RawFd>) {
        let mut fds = Vec::new();
        let mut buf = vec![0u8; HEADER_LEN];
        assert!(recv_exact(sock, &mut buf, &mut fds, false).unwrap());
        let size = u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize;
        buf.resize(HEADER_LEN + size, 0);
        recv_exact(sock, &mut buf[HEADER_LEN..], &mut fds, false).unwrap();
        (buf, fds.pop().map(IntoRawFd::into_raw_fd))
    }

    #[test]
    fn relays_messages_and_fds_over_a_socketpair() {
        let (parent_end, child_end) = UnixStream::pair().unwrap();
        let (listener, _) = Relay::for_fd(child_end.into_raw_fd(), None)
            .unwrap()
            .start()
            .unwrap();
        let mut served = listener.accept().unwrap().unwrap();

        // Parent -> backend: a message without fds immediately followed by
        // one with an fd; the fd must arrive with the second message.
        (&parent_end).write_all(&message(1, b"first")).unwrap();
        let (probe_a, mut probe_b) = UnixStream::pair().unwrap();
        let second = message(2, b"hello");
        let iov = [IoSlice::new(&second)];
        let fds = [probe_a.as_raw_fd()];
        sendmsg::<()>(
            parent_end.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(probe_a);
        let (buf, got) = recv_one(&served);
        assert_eq!(buf, message(1, b"first"));
        assert!(got.is_none(), "fd arrived with the wrong message");
        let (buf, got) = recv_one(&served);
        assert_eq!(buf, second);
        // The relayed fd is the same socket: writing to it reaches probe_b.
        // SAFETY: fresh fd from SCM_RIGHTS, owned by nobody else.
        let mut relayed = unsafe { UnixStream::from_raw_fd(got.unwrap()) };
        relayed.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        probe_b.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");

        // Backend -> parent.
        served.write_all(&message(3, b"reply")).unwrap();
        let mut reply = [0u8; 17];
        (&parent_end).read_exact(&mut reply).unwrap();
        assert_eq!(reply.to_vec(), message(3, b"reply"));

        // Parent hangs up: the backend side sees EOF.
        drop(parent_end);
        let mut rest = Vec::new();
        served.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn rejects_a_closed_fd() {
        assert!(Relay::for_fd(987_654, None).is_err());
    }

    fn send_with_fd(sock: &UnixStream, buf: &[u8], fd: Option<RawFd>) {
        let iov = [IoSlice::new(buf)];
        let fds: Vec<RawFd> = fd.into_iter().collect();
        let rights = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    }

    fn u64_of(buf: &[u8]) -> u64 {
        u64::from_le_bytes(buf[HEADER_LEN..HEADER_LEN + 8].try_into().unwrap())
    }

    fn inflight_msg(queue_size: u16) -> InflightMsg {
        InflightMsg {
            num_queues: 1,
            queue_size,
            ..Default::default()
        }
    }

    #[test]
    fn answers_the_inflight_messages_for_a_tracking_device() {
        let inflight = VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
        let reply_ack = VhostUserProtocolFeatures::REPLY_ACK.bits();
        let (fe, child_end) = UnixStream::pair().unwrap();
        let tracker = InflightTracker::new(1, 8);
        let (listener, state) = Relay::for_fd(child_end.into_raw_fd(), Some(tracker))
            .unwrap()
            .start()
            .unwrap();
        let lib = listener.accept().unwrap().unwrap();

        // The library's feature answer gains INFLIGHT_SHMFD...
        (&fe)
            .write_all(&message(GET_PROTOCOL_FEATURES, b""))
            .unwrap();
        let (buf, _) = recv_one(&lib);
        assert_eq!(buf, message(GET_PROTOCOL_FEATURES, b""));
        (&lib)
            .write_all(&reply(GET_PROTOCOL_FEATURES, &reply_ack.to_le_bytes()))
            .unwrap();
        let (buf, _) = recv_one(&fe);
        assert_eq!(u64_of(&buf), reply_ack | inflight);
        // ... and the library never sees it acknowledged.
        let acked = (reply_ack | inflight).to_le_bytes();
        (&fe)
            .write_all(&message(SET_PROTOCOL_FEATURES, &acked))
            .unwrap();
        let (buf, _) = recv_one(&lib);
        assert_eq!(u64_of(&buf), reply_ack);

        // GET_INFLIGHT_FD is answered by the relay, with a sealed memfd.
        let get = message(GET_INFLIGHT_FD, &inflight_msg(8).to_bytes());
        (&fe).write_all(&get).unwrap();
        let (buf, fd) = recv_one(&fe);
        let answer = InflightMsg::parse(&buf[HEADER_LEN..]).unwrap();
        assert_eq!(
            answer.mmap_size,
            crate::inflight::queue_region_size(8) as u64
        );
        // SAFETY: fresh fd from SCM_RIGHTS, owned by nobody else.
        let region = unsafe { OwnedFd::from_raw_fd(fd.expect("fd with the reply")) };

        // SET_INFLIGHT_FD with NEED_REPLY: a bad one is refused and the
        // connection goes on; a good one is accepted.
        let mut set = message(SET_INFLIGHT_FD, &inflight_msg(9).to_bytes());
        set[4] |= FLAG_NEED_REPLY as u8;
        let mut bad = answer;
        bad.queue_size = 9;
        set[HEADER_LEN..].copy_from_slice(&bad.to_bytes());
        send_with_fd(&fe, &set, Some(region.as_raw_fd()));
        let (buf, _) = recv_one(&fe);
        assert_eq!(u64_of(&buf), 1, "bad region refused");
        set[HEADER_LEN..].copy_from_slice(&answer.to_bytes());
        send_with_fd(&fe, &set, Some(region.as_raw_fd()));
        let (buf, _) = recv_one(&fe);
        assert_eq!(u64_of(&buf), 0, "region accepted");

        // The next message reaches the library: none of the above did.
        (&fe).write_all(&message(1, b"")).unwrap();
        let (buf, _) = recv_one(&lib);
        assert_eq!(buf, message(1, b""));
        assert_eq!(state.failure(), None);

        // Without NEED_REPLY a refused region ends the connection.
        let mut set = message(SET_INFLIGHT_FD, &answer.to_bytes());
        set[HEADER_LEN + 16] = 2; // num_queues 2 > 1
        send_with_fd(&fe, &set, Some(region.as_raw_fd()));
        let mut rest = Vec::new();
        (&fe).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(state.failure().unwrap().contains("SET_INFLIGHT_FD"));
    }

    /// A started relay for a device without inflight tracking: the
    /// frontend's end, the library's end, the shared state.
    fn relay_without_tracking() -> (UnixStream, UnixStream, Arc<RelayState>) {
        let (fe, child_end) = UnixStream::pair().unwrap();
        let (listener, state) = Relay::for_fd(child_end.into_raw_fd(), None)
            .unwrap()
            .start()
            .unwrap();
        let lib = listener.accept().unwrap().unwrap();
        (fe, lib, state)
    }

    #[test]
    fn a_device_without_tracking_gets_the_messages_unchanged() {
        let (fe, lib, _) = relay_without_tracking();
        (&fe)
            .write_all(&message(GET_PROTOCOL_FEATURES, b""))
            .unwrap();
        let _ = recv_one(&lib);
        (&lib)
            .write_all(&reply(GET_PROTOCOL_FEATURES, &8u64.to_le_bytes()))
            .unwrap();
        assert_eq!(u64_of(&recv_one(&fe).0), 8);
        let get = message(GET_INFLIGHT_FD, &inflight_msg(8).to_bytes());
        (&fe).write_all(&get).unwrap();
        assert_eq!(recv_one(&lib).0, get);
    }

    #[test]
    fn rings_enabled_before_the_features_are_held_until_then() {
        let reply_ack = VhostUserProtocolFeatures::REPLY_ACK.bits();
        let (fe, lib, state) = relay_without_tracking();
        let set_protocol = message(SET_PROTOCOL_FEATURES, &reply_ack.to_le_bytes());
        (&fe).write_all(&set_protocol).unwrap();
        assert_eq!(recv_one(&lib).0, set_protocol);
        // As QEMU attaching a NIC: enable ring 0, reply wanted, then ring 1
        // without; neither reaches the library yet, the first is acknowledged.
        let enable = |index: u32| {
            let mut state = index.to_le_bytes().to_vec();
            state.extend_from_slice(&1u32.to_le_bytes());
            message(SET_VRING_ENABLE, &state)
        };
        let mut first = enable(0);
        first[4] |= FLAG_NEED_REPLY as u8;
        (&fe).write_all(&first).unwrap();
        let (buf, _) = recv_one(&fe);
        assert_eq!(buf, reply(SET_VRING_ENABLE, &0u64.to_le_bytes()));
        (&fe).write_all(&enable(1)).unwrap();
        (&fe).write_all(&enable(1)).unwrap();
        // Features without PROTOCOL_FEATURES change nothing...
        let plain = message(SET_FEATURES, &(1u64 << 32).to_le_bytes());
        (&fe).write_all(&plain).unwrap();
        assert_eq!(recv_one(&lib).0, plain, "nothing came before");
        // ... with it, the library gets them, then the held enables in order
        // (no reply wanted), then what follows.
        let features = message(SET_FEATURES, &(F_PROTOCOL_FEATURES | 1 << 32).to_le_bytes());
        (&fe).write_all(&features).unwrap();
        assert_eq!(recv_one(&lib).0, features);
        assert_eq!(recv_one(&lib).0, enable(0));
        assert_eq!(
            recv_one(&lib).0,
            enable(1),
            "ring 1's two enables held as one"
        );
        (&fe).write_all(&enable(2)).unwrap();
        assert_eq!(recv_one(&lib).0, enable(2), "then passed on as they come");
        assert_eq!(state.failure(), None);
    }

    #[test]
    fn serves_the_first_frontend_on_a_socket_path() {
        let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("relay-test.XXXXXX")).unwrap();
        let path = dir.join("s");
        std::fs::write(&path, b"stale").unwrap();
        let accepting = {
            let path = path.clone();
            thread::spawn(move || Relay::accept_on(&path, None).unwrap())
        };
        let fe = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(_) => thread::sleep(std::time::Duration::from_millis(5)),
            }
        };
        let relay = accepting.join().unwrap();
        assert!(!path.exists(), "path removed once the frontend connected");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "no private name left"
        );
        let (listener, _) = relay.start().unwrap();
        let lib = listener.accept().unwrap().unwrap();
        (&fe).write_all(&message(1, b"x")).unwrap();
        assert_eq!(recv_one(&lib).0, message(1, b"x"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A frontend that connects the moment the path appears is never
    /// refused (the path used to exist between bind and listen).
    #[test]
    fn the_socket_path_appears_only_once_it_accepts() {
        let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("relay-test.XXXXXX")).unwrap();
        let path = dir.join("s");
        for round in 0..300 {
            let accepting = {
                let path = path.clone();
                thread::spawn(move || Relay::accept_on(&path, None).map(|_| ()))
            };
            while !path.exists() {
                std::hint::spin_loop();
            }
            let connected = UnixStream::connect(&path);
            assert!(connected.is_ok(), "round {round}: {connected:?}");
            accepting.join().unwrap().unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
