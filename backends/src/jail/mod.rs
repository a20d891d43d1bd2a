//! The backend jail: what a flotilla backend gives up before it reads
//! anything a guest controls.
//!
//! DESIGN.md ("Sandboxing") fixes the order, which follows crosvm, virtiofsd
//! and Firecracker's jailer: the parent opens what the child needs, the child
//! then shrinks its world. It happens in two steps because some kernel
//! operations only work while the process has a single thread:
//!
//! 1. [`early`], from [`crate::daemon::prepare`] before any thread exists:
//!    note the inherited descriptors, unshare the user (when not root), pid,
//!    ipc, uts and net namespaces, fork, and unshare the mount namespace in
//!    the child. The parent stays outside
//!    as a *keeper* that forwards termination signals and hands the jailed
//!    child's exit status on ([`namespaces`]); the child, pid 1 of its own
//!    pid namespace, goes on. It still sees the host's files (a private copy
//!    of the mount table), so the device can open its image and bind its
//!    socket as usual.
//! 2. [`Jail::enter`] (the [`Sandbox`] hook of [`crate::daemon::serve`]), once
//!    the device's fds are open and the frontend connection is ready: close
//!    inherited fds nobody claimed ([`fds`]), set rlimits ([`rlimits`]),
//!    pivot_root into an empty read-only tmpfs (or chroot into an empty
//!    directory, plus Landlock — [`filesystem`]), drop every capability in
//!    every thread ([`caps`]), set no_new_privs, and install the seccomp
//!    allowlist on all threads ([`seccomp`]).
//!
//! Each backend supplies only its [`SeccompPolicy`] (the syscalls its device
//! needs beyond [`seccomp::BASE`]) and the inherited fds it keeps.

pub mod caps;
#[cfg(feature = "escape-test")]
pub mod escape;
pub mod fds;
pub mod filesystem;
pub mod namespaces;
pub mod rlimits;
pub mod seccomp;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU8, Ordering};

pub use seccomp::{SeccompPolicy, Syscall};

use crate::cli::VhostUserArgs;
use crate::sandbox::Sandbox;

/// How a backend confines its filesystem and process view (`--sandbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// New user (when not root), pid, mount, ipc, uts and net namespaces and
    /// pivot_root into an empty tmpfs. The default.
    Namespace,
    /// No namespaces: chroot into an empty directory, plus Landlock.
    Chroot,
    /// Neither (debugging only); capabilities, rlimits and seccomp still apply.
    None,
}

/// What happens on a syscall outside the allowlist (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// The process dies with SIGSYS after logging the syscall. The default.
    Kill,
    /// The kernel logs the syscall (audit/dmesg) and lets it run: for
    /// finding out what a new device needs.
    Log,
    /// No seccomp filter at all (`-disable-seccomp`).
    None,
}

/// Errors of the jail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A step that needs a single-threaded process found threads.
    #[error("the jail must be prepared before any thread starts ({0} threads)")]
    Threaded(usize),
    /// A system call of the jail failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The seccomp filter could not be built or installed.
    #[error("seccomp: {0}")]
    Seccomp(String),
}

impl Error {
    pub(crate) fn sys(what: &'static str, source: impl Into<std::io::Error>) -> Self {
        Error::Sys {
            what,
            source: source.into(),
        }
    }

    /// The same error for the last failing libc call.
    pub(crate) fn last(what: &'static str) -> Self {
        Error::sys(what, std::io::Error::last_os_error())
    }
}

/// Result alias of the jail.
pub type Result<T> = std::result::Result<T, Error>;

/// The sandbox actually in force after [`early`]: `--sandbox namespace`
/// falls back to `chroot` where the kernel refuses namespaces.
static EFFECTIVE: AtomicU8 = AtomicU8::new(MODE_UNSET);
const MODE_UNSET: u8 = 0;
const MODE_NAMESPACE: u8 = 1;
const MODE_CHROOT: u8 = 2;
const MODE_NONE: u8 = 3;

/// The filesystem confinement in force (what `--sandbox` became after
/// [`early`]); `None` if [`early`] has not run.
pub fn effective_mode() -> Option<SandboxMode> {
    match EFFECTIVE.load(Ordering::Acquire) {
        MODE_NAMESPACE => Some(SandboxMode::Namespace),
        MODE_CHROOT => Some(SandboxMode::Chroot),
        MODE_NONE => Some(SandboxMode::None),
        _ => None,
    }
}

fn set_effective(mode: SandboxMode) {
    let v = match mode {
        SandboxMode::Namespace => MODE_NAMESPACE,
        SandboxMode::Chroot => MODE_CHROOT,
        SandboxMode::None => MODE_NONE,
    };
    EFFECTIVE.store(v, Ordering::Release);
}

/// Step 1, while the process is single-threaded: records the inherited fds
/// and, for `--sandbox namespace`, moves the process into fresh namespaces.
///
/// Unless `--sandbox none`, this forks: the calling process becomes the
/// keeper and never returns from here; the function returns in the child,
/// the process that enters the jail.
pub fn early(args: &VhostUserArgs) -> Result<()> {
    let threads = namespaces::thread_count();
    if threads > 1 {
        return Err(Error::Threaded(threads));
    }
    fds::snapshot()?;
    let mode = match args.sandbox {
        SandboxMode::Namespace => match namespaces::unshare_all() {
            Ok(()) => SandboxMode::Namespace,
            Err(e) => {
                log::warn!("sandbox: no namespaces ({e}); using chroot and Landlock instead");
                SandboxMode::Chroot
            }
        },
        other => other,
    };
    if mode != SandboxMode::None {
        // The jailed process loses the host's paths; the keeper still has
        // them and removes the listening socket when the backend ends.
        namespaces::fork_keeper(args.socket_path.clone())?;
    }
    if mode == SandboxMode::Namespace {
        namespaces::private_mounts()?;
    }
    set_effective(mode);
    Ok(())
}

/// Step 2: the jail one backend enters from [`crate::daemon::serve`].
#[derive(Debug, Clone)]
pub struct Jail {
    seccomp: SeccompMode,
    policy: SeccompPolicy,
    keep_fds: Vec<RawFd>,
    limits: rlimits::Limits,
}

impl Jail {
    /// The jail for a backend started with `args`, filtering syscalls with
    /// `policy`. The `--fd` socket, if any, is kept open.
    pub fn new(args: &VhostUserArgs, policy: SeccompPolicy) -> Self {
        Jail {
            seccomp: args.seccomp,
            policy,
            keep_fds: args.fd.into_iter().collect(),
            limits: rlimits::Limits::default(),
        }
    }

    /// Keeps an inherited fd the device uses (e.g. `--image-fd`, `--tap-fd`);
    /// every other inherited fd above stderr is closed on entry.
    pub fn keep_fd(mut self, fd: RawFd) -> Self {
        self.keep_fds.push(fd);
        self
    }

    /// Replaces the resource limits (see [`rlimits::Limits`]).
    pub fn limits(mut self, limits: rlimits::Limits) -> Self {
        self.limits = limits;
        self
    }

    fn enter_jail(&self) -> Result<()> {
        let mode = effective_mode().unwrap_or(SandboxMode::None);
        fds::close_stray(&self.keep_fds)?;
        rlimits::apply(&self.limits)?;
        match mode {
            SandboxMode::Namespace => filesystem::pivot_into_empty_root()?,
            SandboxMode::Chroot => filesystem::chroot_into_empty_dir()?,
            SandboxMode::None => {}
        }
        caps::drop_all()?;
        if mode == SandboxMode::Chroot {
            // Where namespaces are missing, Landlock denies every path
            // access as a second fence next to the chroot.
            filesystem::landlock_deny_all();
        }
        caps::set_no_new_privs()?;
        if self.seccomp != SeccompMode::None {
            seccomp::install(&self.policy, self.seccomp)?;
        }
        log::info!(
            "sandbox: {mode:?}, seccomp {:?} ({} syscalls for {})",
            self.seccomp,
            self.policy.len(),
            self.policy.name
        );
        #[cfg(feature = "escape-test")]
        escape::attempt_from_env();
        Ok(())
    }
}

impl Sandbox for Jail {
    fn enter(&self) -> crate::Result<()> {
        self.enter_jail()
            .map_err(|e| crate::Error::Sandbox(e.to_string()))
    }
}
