//! Serving a vhost-user connection the parent already established.
//!
//! `vhost-user-backend` 0.24 can only serve a connection it accepted from a
//! `Listener` or made itself with `connect()`; it has no constructor taking a
//! connected stream (its request handler type is private). flotilla's
//! supervisor hands each backend one end of a socketpair, so for `--fd` we
//! make the library accept a private connection and copy the vhost-user
//! control messages, with their SCM_RIGHTS fds, between that connection and
//! the inherited socket. Only the control path goes through the relay; the
//! data path is shared memory and eventfds and never touches it.
//!
//! The rendezvous socket lives in a fresh 0700 directory and is unlinked as
//! soon as our own client has connected, so no other process can take its
//! place. When the shared crate grows its own request handler (needed anyway
//! for inflight tracking, see [`crate::daemon::serve`]), this module goes.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use vhost::vhost_user::Listener;

/// vhost-user allows at most this many fds on one message.
const MAX_FDS: usize = 32;

/// Turns the inherited fd into a `Listener` the daemon can `start()` on.
///
/// A listening socket is used as it is; a connected one gets a relay.
pub(crate) fn listener_for_fd(fd: RawFd) -> io::Result<Listener> {
    // Refuse fds that are not open before taking ownership of the number.
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(io::Error::from)?;
    // SAFETY: the fd is open (checked above) and was handed to this process
    // on its command line for exclusive use; nothing else in the program
    // refers to it, so taking ownership cannot close an fd someone else uses.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listening = getsockopt(&owned, sockopt::AcceptConn).map_err(io::Error::from)?;
    if listening {
        return Ok(Listener::from(UnixListener::from(owned)));
    }
    let frontend = UnixStream::from(owned);
    // Fails with ENOTSOCK / EINVAL early if this is not a unix stream socket.
    frontend.peer_addr()?;

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
    let (listener, inner) = (bound?, connected?);

    spawn_pump("relay-in", frontend.try_clone()?, inner.try_clone()?)?;
    spawn_pump("relay-out", inner, frontend)?;
    Ok(Listener::from(listener))
}

fn spawn_pump(name: &str, from: UnixStream, to: UnixStream) -> io::Result<()> {
    thread::Builder::new().name(name.into()).spawn(move || {
        if let Err(e) = pump(&from, &to) {
            log::debug!("relay: {e}");
        }
        // Either side closing ends both directions, so the daemon sees the
        // frontend hang up and the frontend sees a dead backend.
        let _ = from.shutdown(std::net::Shutdown::Both);
        let _ = to.shutdown(std::net::Shutdown::Both);
    })?;
    Ok(())
}

/// Size of the vhost-user message header: request, flags, payload size.
const HEADER_LEN: usize = 12;
/// Larger than any vhost-user payload (the biggest, SET_MEM_TABLE and
/// GET_CONFIG, are a few KiB); a bigger size means a corrupt stream.
const MAX_PAYLOAD: usize = 1 << 20;

/// Copies vhost-user messages and their fds from `from` to `to` until EOF
/// or error.
///
/// The copy goes message by message: a unix stream socket attaches fds to
/// the bytes they were sent with, but one `recvmsg` may return the end of
/// one message together with the next message and its fds. Forwarding such
/// a read unchanged would move the fds onto the earlier message, so we read
/// exactly one framed message at a time and send it with its own fds.
fn pump(from: &UnixStream, to: &UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; HEADER_LEN];
    loop {
        let mut fds = Vec::new();
        buf.resize(HEADER_LEN, 0);
        if !recv_exact(from, &mut buf, &mut fds, true)? {
            return Ok(());
        }
        let size = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        if size > MAX_PAYLOAD {
            return Err(io::Error::other(format!("message payload of {size} bytes")));
        }
        buf.resize(HEADER_LEN + size, 0);
        recv_exact(from, &mut buf[HEADER_LEN..], &mut fds, false)?;
        send_all(to, &buf, &fds)?;
        // Our copies of the fds close here; the receiver holds its own.
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
        let listener = listener_for_fd(child_end.into_raw_fd()).unwrap();
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
        assert!(listener_for_fd(987_654).is_err());
    }
}
