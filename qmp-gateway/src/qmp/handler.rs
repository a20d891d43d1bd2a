//! What executes commands: the [`CommandHandler`] trait and the per-client context it gets.
//!
//! The server knows the protocol; a handler knows the commands. The gateway's handler answers
//! some commands itself (getfd, quit, later blockdev-add and the other backend commands) and
//! forwards the rest to the core; tests plug in fakes.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use super::protocol::QmpError;
use super::schema::CommandSpec;

/// Most fds a client may have received and not yet handed to a command; older ones are
/// closed beyond this, so a client cannot exhaust our fd table.
pub const MAX_PENDING_FDS: usize = 32;

/// Executes QMP commands. One handler serves every client, from several threads at once.
pub trait CommandHandler: Send + Sync {
    /// The commands this handler implements, with their arguments. The server rejects every
    /// other command (`CommandNotFound`) and checks arguments before calling
    /// [`CommandHandler::execute`]. `qmp_capabilities`, `query-version` and `query-commands`
    /// are answered by the server and need not be listed.
    fn commands(&self) -> Vec<CommandSpec>;

    /// Executes `name` with already-checked `args` for `client`.
    fn execute(
        &self,
        name: &str,
        args: Map<String, Value>,
        client: ClientCtx,
    ) -> Result<Value, QmpError>;

    /// Called once when a client's connection is gone (to drop per-client state).
    fn client_closed(&self, _client: &ClientCtx) {}
}

/// How a client reached us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A unix-domain socket (fds can be passed).
    Unix,
    /// A TCP connection from this address.
    Tcp(SocketAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix => f.write_str("unix"),
            Peer::Tcp(addr) => write!(f, "tcp {addr}"),
        }
    }
}

/// Work to run once a command's reply is queued.
pub type Deferred = Box<dyn FnOnce() + Send>;

/// One client connection as a handler sees it. Cheap to clone; clones share the fd queue.
#[derive(Clone)]
pub struct ClientCtx {
    id: u64,
    peer: Peer,
    fds: Arc<Mutex<Vec<OwnedFd>>>,
    deferred: Arc<Mutex<Vec<Deferred>>>,
}

impl fmt::Debug for ClientCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCtx")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("pending_fds", &self.pending_fds())
            .finish()
    }
}

impl ClientCtx {
    /// A context for client `id`. The server makes these; tests of handlers may too.
    pub fn new(id: u64, peer: Peer) -> Self {
        ClientCtx {
            id,
            peer,
            fds: Arc::default(),
            deferred: Arc::default(),
        }
    }

    /// Runs `work` right after the reply to the current command is queued, so that what it
    /// causes (an event, the process ending) reaches the client after the reply — `quit`
    /// answers `{"return": {}}` and then emits `SHUTDOWN`.
    pub fn defer(&self, work: impl FnOnce() + Send + 'static) {
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(work));
    }

    /// Runs and clears the deferred work (the server calls this after queueing a reply).
    pub fn run_deferred(&self) {
        let work = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|p| p.into_inner()));
        for w in work {
            w();
        }
    }

    /// The client's number, unique for the server's lifetime.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How the client is connected.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<OwnedFd>> {
        self.fds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the fd the client sent last (SCM_RIGHTS), as QEMU's `getfd` does.
    pub fn take_fd(&self) -> Option<OwnedFd> {
        self.queue().pop()
    }

    /// Takes every fd the client sent and no command took yet, oldest first.
    pub fn take_fds(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *self.queue())
    }

    /// How many received fds wait for a command.
    pub fn pending_fds(&self) -> usize {
        self.queue().len()
    }

    /// Queues fds received from the client. Fds stay queued across messages (a client may
    /// send the fd with a lone byte before the command), up to [`MAX_PENDING_FDS`].
    pub fn push_fds(&self, fds: Vec<OwnedFd>) {
        let mut queue = self.queue();
        queue.extend(fds);
        if queue.len() > MAX_PENDING_FDS {
            let excess = queue.len() - MAX_PENDING_FDS;
            log::warn!(
                "QMP client {}: closing {excess} unclaimed passed fds (at most {MAX_PENDING_FDS} wait)",
                self.id
            );
            queue.drain(..excess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .flat_map(|_| {
                let (r, w) = nix::unistd::pipe().unwrap();
                [r, w]
            })
            .collect()
    }

    #[test]
    fn fd_queue_takes_last_and_caps() {
        use std::os::fd::AsRawFd;
        let ctx = ClientCtx::new(1, Peer::Unix);
        let fds = pipe_fds(1);
        let last = fds[1].as_raw_fd();
        ctx.push_fds(fds);
        assert_eq!(ctx.pending_fds(), 2);
        assert_eq!(ctx.clone().take_fd().map(|f| f.as_raw_fd()), Some(last));
        assert_eq!(ctx.take_fds().len(), 1);
        assert!(ctx.take_fd().is_none());
        ctx.push_fds(pipe_fds(MAX_PENDING_FDS));
        assert_eq!(ctx.pending_fds(), MAX_PENDING_FDS);
        assert_eq!(format!("{}", Peer::Unix), "unix");
        assert!(format!("{ctx:?}").contains("pending_fds"));
    }
}
