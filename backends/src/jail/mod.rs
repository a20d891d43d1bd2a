//! The jails of flotilla's processes: the process-agnostic primitives, and
//! the backend jail built from them.
//!
//! The primitives (always built; the core's `vmm::jail` and the gateway's
//! `privileges` use them too, with this crate's `daemon` feature off):
//! [`seccomp`] (allowlists as data, BPF building, installing, the SIGSYS
//! reporter), [`caps`] (bounding/ambient/effective sets, becoming nobody,
//! no_new_privs), [`rlimits`], [`namespaces`] (unsharing, the user
//! namespace's id maps, private mounts), [`filesystem`] (pivot_root into an
//! empty tmpfs, the chroot fallback, Landlock) and, for tests only,
//! `escape` (the escape attempts). Each process keeps its own policy and its
//! own order of the steps.
//!
//! The backend jail (feature `daemon`). DESIGN.md ("Sandboxing") fixes the
//! order, which follows crosvm, virtiofsd and Firecracker's jailer: the
//! parent opens what the child needs, the child then shrinks its world. It
//! happens in two steps because some kernel operations only work while the
//! process has a single thread:
//!
//! 1. [`early`], from [`crate::daemon::prepare`] before any thread exists:
//!    note the inherited descriptors, unshare the user (when not root), pid,
//!    ipc, uts and net namespaces, fork, and unshare the mount namespace in
//!    the child. The parent stays outside
//!    as a *keeper* that forwards termination signals and hands the jailed
//!    child's exit status on; the child, pid 1 of its own
//!    pid namespace, goes on. It still sees the host's files (a private copy
//!    of the mount table), so the device can open its image and bind its
//!    socket as usual.
//! 2. [`Jail::enter`](crate::sandbox::Sandbox::enter) (the
//!    [`crate::sandbox::Sandbox`] hook of [`crate::daemon::serve`]), once
//!    the device's fds are open and the frontend connection is ready: close
//!    inherited fds nobody claimed ([`fds`]), set rlimits ([`rlimits`]),
//!    pivot_root into an empty read-only tmpfs (or chroot into an empty
//!    directory, plus Landlock — [`filesystem`]), drop every capability in
//!    every thread ([`caps`]), set no_new_privs, and install the seccomp
//!    allowlist on all threads ([`policy`]).
//!
//! Each backend supplies only its [`SeccompPolicy`] (the syscalls its device
//! needs beyond [`policy::BASE`]) and the inherited fds it keeps.

pub mod caps;
#[cfg(feature = "escape-test")]
pub mod escape;
#[cfg(feature = "daemon")]
pub mod fds;
pub mod filesystem;
#[cfg(feature = "daemon")]
mod keeper;
pub mod namespaces;
#[cfg(feature = "daemon")]
pub mod policy;
pub mod rlimits;
pub mod seccomp;

#[cfg(feature = "daemon")]
mod backend;

#[cfg(feature = "daemon")]
pub use backend::{early, effective_mode, Jail, SandboxMode, SeccompMode};
#[cfg(feature = "daemon")]
pub use policy::SeccompPolicy;
pub use seccomp::Syscall;

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

impl From<Error> for std::io::Error {
    /// The underlying OS error of a failed system call; the message otherwise.
    fn from(e: Error) -> Self {
        match e {
            Error::Sys { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        }
    }
}
