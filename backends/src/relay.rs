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
/// Larger than any vhost-user message we relay in one piece; bigger ones are
/// simply relayed in several reads (the stream keeps their order).
const BUF_LEN: usize = 64 * 1024;

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

/// Copies bytes and attached fds from `from` to `to` until EOF or error.
fn pump(from: &UnixStream, to: &UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_LEN];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                from.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let mut fds: Vec<OwnedFd> = Vec::new();
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
            (msg.bytes, fds)
        };
        if len == 0 {
            return Ok(());
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = 0;
        while sent < len {
            let iov = [IoSlice::new(&buf[sent..len])];
            let rights = [ControlMessage::ScmRights(&raw)];
            // Fds travel with the first byte of the chunk they came with.
            let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
                &rights
            } else {
                &[]
            };
            sent += sendmsg::<()>(to.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(io::Error::from)?;
        }
        // Our copies of the fds close here; the receiver holds its own.
        drop(fds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::IntoRawFd;

    #[test]
    fn relays_bytes_and_fds_over_a_socketpair() {
        let (parent_end, child_end) = UnixStream::pair().unwrap();
        let listener = listener_for_fd(child_end.into_raw_fd()).unwrap();
        let mut served = listener.accept().unwrap().unwrap();

        // Parent -> backend, with an fd attached.
        let (probe_a, mut probe_b) = UnixStream::pair().unwrap();
        let iov = [IoSlice::new(b"hello")];
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
        let mut buf = [0u8; 5];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            served.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .unwrap();
        assert_eq!(msg.bytes, 5);
        let mut got = None;
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(v) = c {
                got = v.first().copied();
            }
        }
        assert_eq!(&buf, b"hello");
        // The relayed fd is the same socket: writing to it reaches probe_b.
        // SAFETY: fresh fd from SCM_RIGHTS, owned by nobody else.
        let mut relayed = unsafe { UnixStream::from_raw_fd(got.unwrap()) };
        relayed.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        probe_b.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");

        // Backend -> parent.
        served.write_all(b"reply").unwrap();
        let mut reply = [0u8; 5];
        (&parent_end).read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"reply");

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
