//! Process lifecycle of a backend: signals, connecting, serving one frontend.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::thread;

use nix::sys::signal::{SigSet, Signal};
use vhost::vhost_user::Error as VuError;
use vhost_user_backend::bitmap::BitmapReplace;
use vhost_user_backend::{Error as DaemonError, VhostUserBackend, VhostUserDaemon};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::cli::{Connection, VhostUserArgs};
use crate::inflight::InflightTracker;
use crate::relay::Relay;
use crate::sandbox::Sandbox;
use crate::{Error, Result};

/// The socket path to unlink when a signal ends the process.
static SOCKET_PATH: OnceLock<PathBuf> = OnceLock::new();

/// Restores the default action (death) for SIGSEGV and SIGBUS.
///
/// Rust's runtime catches both to report stack overflows; for any other fault its handler
/// resets the action and returns, so a signal sent with kill(2) is silently swallowed once. A
/// backend that took a fault, or was told it did, must end at once so that the supervisor
/// replaces it with a fresh process instead of trusting one in an unknown state.
fn die_on_fault_signals() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGSEGV, Signal::SIGBUS] {
        // SAFETY: installing the default action involves no handler code at all.
        unsafe { sigaction(sig, &default) }.map_err(|e| Error::Signals(std::io::Error::from(e)))?;
    }
    Ok(())
}

/// Sets up logging and termination signals; call first thing in `main`,
/// before any thread exists.
///
/// SIGTERM, SIGINT and SIGHUP are blocked in the calling thread (and so in
/// every thread started later) and taken by one thread with `sigwait`, which
/// removes the listening socket and exits with status 0. A plain exit is
/// enough for a clean stop: a backend keeps no state of its own that the
/// frontend cannot recompute, and completed writes are already in the
/// kernel, so there is nothing to flush in user space.
///
/// Before that, while the process still has a single thread, the first half
/// of the jail runs ([`crate::jail::early`]): unless `--sandbox none`, the
/// process forks (into fresh namespaces with `--sandbox namespace`) and this
/// function returns in the child, the parent staying outside as its keeper.
pub fn prepare(program: &'static str, args: &VhostUserArgs) -> Result<()> {
    prepare_with(program, args, || Ok(()))
}

/// [`prepare`], running `open` once logging is set up and before the jail's
/// first half: what a device opens there (a tap by name) belongs to the
/// caller's namespaces, not to the ones the jail makes. Its error is logged
/// like any other and returned as [`Error::Setup`].
pub fn prepare_with<T>(
    program: &'static str,
    args: &VhostUserArgs,
    open: impl FnOnce() -> std::result::Result<T, String>,
) -> Result<T> {
    crate::logger::init(program, args.log_level, args.log_file.as_deref())?;
    // Before the jail forks its keeper, so that both die of a fault signal.
    die_on_fault_signals()?;
    let opened = open().map_err(Error::Setup)?;
    crate::jail::early(args)?;
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block()
        .map_err(|e| Error::Signals(std::io::Error::from(e)))?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || match set.wait() {
            Ok(sig) => {
                log::info!("{sig} received, exiting");
                if let Some(path) = SOCKET_PATH.get() {
                    let _ = std::fs::remove_file(path);
                }
                log::logger().flush();
                std::process::exit(0);
            }
            Err(e) => log::error!("sigwait: {e}"),
        })
        .map_err(Error::Signals)?;
    Ok(opened)
}

/// Serves one vhost-user frontend connection with `backend`, then returns.
///
/// Order: create the daemon (which starts one worker thread per entry of
/// `queues_per_thread`), run `setup` with it (the device registers its extra
/// event fds on the worker epoll loops there), get the connection ready
/// (with `--socket-path`, wait for the frontend to connect and remove the
/// path), enter `sandbox`, then serve until the frontend disconnects.
/// Nothing the frontend sends is read before the sandbox is entered. A
/// disconnect is a normal end and returns `Ok`; the
/// worker threads are told to exit through the backend's `exit_event`.
///
/// Inflight I/O tracking is not offered; see [`serve_tracked`].
pub fn serve<T, F>(
    name: &str,
    backend: T,
    mem: GuestMemoryAtomic<GuestMemoryMmap<T::Bitmap>>,
    connection: &Connection,
    sandbox: &dyn Sandbox,
    setup: F,
) -> Result<()>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
    F: FnOnce(&VhostUserDaemon<T>) -> std::result::Result<(), String>,
{
    serve_tracked(name, backend, mem, connection, sandbox, None, setup)
}

/// [`serve`], with vhost-user inflight I/O tracking when `inflight` is
/// given: the connection then offers VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD
/// and GET/SET_INFLIGHT_FD are answered through `inflight` (by the relay,
/// see docs/decisions/inflight-tracking.md). The device serves each queue
/// through [`InflightTracker::queue`]. A backend that does not track what
/// it has in flight must pass `None`, so that it never offers the feature.
pub fn serve_tracked<T, F>(
    name: &str,
    backend: T,
    mem: GuestMemoryAtomic<GuestMemoryMmap<T::Bitmap>>,
    connection: &Connection,
    sandbox: &dyn Sandbox,
    inflight: Option<Arc<InflightTracker>>,
    setup: F,
) -> Result<()>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
    F: FnOnce(&VhostUserDaemon<T>) -> std::result::Result<(), String>,
{
    let mut daemon = VhostUserDaemon::new(name.to_string(), backend, mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    setup(&daemon).map_err(Error::Setup)?;

    // Every connection goes through the relay (crate::relay says why).
    let relay = match connection {
        Connection::SocketPath(path) => {
            let _ = SOCKET_PATH.set(path.clone());
            Relay::accept_on(path, inflight).map_err(|e| Error::Listen {
                path: path.clone(),
                source: VuError::SocketError(e),
            })?
        }
        Connection::Fd(fd) => {
            Relay::for_fd(*fd, inflight).map_err(|source| Error::BadFd { fd: *fd, source })?
        }
    };

    sandbox.enter()?;

    let (mut listener, relay) = relay.start().map_err(Error::Relay)?;
    let result = daemon.start(&mut listener).and_then(|()| {
        log::info!("frontend connected");
        daemon.wait()
    });
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    if let Some(path) = SOCKET_PATH.get() {
        let _ = std::fs::remove_file(path);
    }
    if let Some(why) = relay.failure() {
        return Err(Error::Inflight(why));
    }
    match result {
        Ok(())
        | Err(DaemonError::HandleRequest(VuError::Disconnected))
        | Err(DaemonError::HandleRequest(VuError::PartialMessage)) => {
            log::info!("frontend disconnected");
            Ok(())
        }
        Err(e) => Err(Error::Daemon(e.to_string())),
    }
}
