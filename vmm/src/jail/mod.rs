//! The core's jail: what `flotilla-vmm` gives up once the VM is set up.
//!
//! DESIGN.md ("Sandboxing"): the core opens everything it needs (/dev/kvm, kernel, initrd,
//! serial file, `-D` log, guest memory) and then shrinks its world before the guest runs.
//! Two kernel rules fix where each step goes:
//!
//! - `unshare(CLONE_NEWUSER)` fails in a multithreaded process, and `unshare(CLONE_NEWNS)`
//!   implies `CLONE_FS`, which fails once threads share the filesystem context: namespaces
//!   and pivot_root happen at [`isolate`], called by the builder while the core is still
//!   single-threaded (after the files are open and guest memory exists, before the first
//!   vhost-user, vCPU, event or control thread);
//! - a seccomp filter applies to the thread that installs it and to threads it creates
//!   later: every thread installs the filter of its role at its start ([`enter_thread`]).
//!   The main thread installs its own last, after it has started every other thread, so
//!   that no thread inherits the main thread's list instead of its own. Threads the control
//!   thread starts later (a hot-plugged backend's request channel) run under the control
//!   filter and their own.
//!
//! [`arm`] (from `main`) decides whether any of this happens: a library user of the builder
//! (the unit tests) gets no jail.
//!
//! The primitives (seccomp building and installing, the SIGSYS reporter, capabilities,
//! rlimits, namespaces, the empty root, the test-only escape attempts) are shared with the
//! backends and the gateway in `flotilla_backend::jail`; this module is the core's order and
//! its per-thread policy.
//!
//! What the core keeps: no pid namespace (it never forks, so unsharing one would change
//! nothing for it, and QMP reports vCPU thread ids the gateway's namespace must understand);
//! kill and ptrace are refused by seccomp instead, and `/proc` is out of reach.

pub mod seccomp;
mod setup;

use std::sync::OnceLock;

pub use seccomp::Role;

/// Errors of the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// [`isolate`] found more than one thread.
    #[error("the core jail must be entered while single-threaded ({0} threads)")]
    Threaded(usize),
    /// A system call of the jail failed.
    #[error("jail: {what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
}

impl From<flotilla_backend::jail::Error> for JailError {
    fn from(e: flotilla_backend::jail::Error) -> Self {
        use flotilla_backend::jail::Error;
        match e {
            Error::Threaded(n) => JailError::Threaded(n),
            Error::Sys { what, source } => JailError::Sys { what, source },
            Error::Seccomp(s) => JailError::Seccomp(s),
        }
    }
}

/// How the core is to be jailed (decided by `main` from its command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailConfig {
    /// Install the per-thread seccomp filters (`-disable-seccomp` turns them off; the rest of
    /// the jail stays).
    pub seccomp: bool,
}

static CONFIG: OnceLock<JailConfig> = OnceLock::new();
static PROGRAMS: OnceLock<seccomp::Programs> = OnceLock::new();

/// Asks for the jail: [`isolate`] and [`enter_thread`] do nothing until this is called.
pub fn arm(config: JailConfig) {
    let _ = CONFIG.set(config);
}

/// Whether seccomp filters are installed (the jail is armed and seccomp is on).
pub fn seccomp_enabled() -> bool {
    CONFIG.get().is_some_and(|c| c.seccomp)
}

/// The single-threaded step: rlimits, namespaces (user when not root, mount, ipc, uts, net),
/// pivot_root into an empty read-only tmpfs (Landlock where namespaces are refused), every
/// capability dropped (a root-started core becomes `nobody`), not dumpable, no_new_privs,
/// and the SIGSYS reporter. Does nothing unless [`arm`]ed.
pub fn isolate() -> Result<(), JailError> {
    let Some(config) = CONFIG.get() else {
        return Ok(());
    };
    let threads = setup::thread_count();
    if threads > 1 {
        return Err(JailError::Threaded(threads));
    }
    setup::limit_resources()?;
    let namespaces = setup::enter_namespaces();
    match &namespaces {
        Ok(()) => setup::pivot_into_empty_root()?,
        Err(e) => {
            log::warn!("jail: no namespaces ({e}); Landlock denies every path instead");
            setup::landlock_deny_all();
        }
    }
    setup::drop_privileges()?;
    if config.seccomp {
        PROGRAMS.get_or_init(|| seccomp::Programs::build().unwrap_or_else(|e| fatal(&e)));
        seccomp::install_reporter()?;
    }
    log::info!(
        "jail: {}, seccomp {}",
        if namespaces.is_ok() {
            "namespaces and an empty root"
        } else {
            "Landlock"
        },
        if config.seccomp { "on" } else { "off" }
    );
    Ok(())
}

/// Installs the calling thread's seccomp filter for `role`; call first thing in every thread
/// of the core. A thread that cannot be fenced ends the process: it must not run unfenced.
pub fn enter_thread(role: Role) {
    if !seccomp_enabled() {
        return;
    }
    let Some(programs) = PROGRAMS.get() else {
        // Armed, but the thread started before `isolate` (never in the builder's order).
        fatal(&JailError::Seccomp(format!(
            "{role:?} thread started before the jail"
        )));
    };
    if let Err(e) = programs.apply(role) {
        fatal(&e);
    }
}

fn fatal(e: &JailError) -> ! {
    log::error!("{e}");
    log::logger().flush();
    eprintln!("flotilla-vmm: {e}");
    std::process::exit(1)
}

/// Connects every vhost-user backend given by socket path and hands it on as an inherited
/// descriptor instead, so that the builder finds nothing left to open once the jail is
/// entered. (Under the gateway every backend already arrives as a descriptor.)
pub fn connect_backend_paths(config: &mut crate::config::VmConfig) -> Result<(), String> {
    use crate::config::BackendSocket;
    use std::os::fd::IntoRawFd;
    for device in &mut config.vhost_user {
        if let BackendSocket::Path(path) = &device.socket {
            let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
                format!(
                    "device '{}': cannot connect to '{}': {e}",
                    device.id,
                    path.display()
                )
            })?;
            device.socket = BackendSocket::Fd(stream.into_raw_fd());
        }
    }
    Ok(())
}
