//! The backend jail: the order in which a flotilla vhost-user backend enters
//! the fences of [`super`], and its seccomp policy ([`super::policy`]).
//! See the module comment of [`super`] for the two steps.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU8, Ordering};

use super::policy::SeccompPolicy;
use super::{caps, fds, filesystem, keeper, namespaces, policy, rlimits};
use super::{Error, Result};
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
        SandboxMode::Namespace => match unshare_all() {
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
        keeper::fork_keeper(args.socket_path.clone())?;
    }
    if mode == SandboxMode::Namespace {
        private_mounts()?;
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
        drop_all()?;
        if mode == SandboxMode::Chroot {
            // Where namespaces are missing, Landlock denies every path
            // access as a second fence next to the chroot.
            filesystem::landlock_deny_all(true, "sandbox");
        }
        caps::set_no_new_privs()?;
        if self.seccomp != SeccompMode::None {
            policy::install(&self.policy, self.seccomp)?;
        }
        log::info!(
            "sandbox: {mode:?}, seccomp {:?} ({} syscalls for {})",
            self.seccomp,
            self.policy.len(),
            self.policy.name
        );
        #[cfg(feature = "escape-test")]
        super::escape::attempt_from_env(|level, line| log::log!(level, "{line}"));
        Ok(())
    }
}

impl Sandbox for Jail {
    fn enter(&self) -> crate::Result<()> {
        self.enter_jail()
            .map_err(|e| crate::Error::Sandbox(e.to_string()))
    }
}

/// Unshares the user (unless root), pid, ipc, uts and net namespaces. The
/// mount namespace comes after the fork ([`private_mounts`]), so that the
/// keeper keeps the host's view and can remove the socket path.
fn unshare_all() -> Result<()> {
    namespaces::unshare_user_unless_root()?;
    namespaces::unshare(
        libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET,
        "unshare(pid, ipc, uts, net)",
    )?;
    namespaces::set_hostname(b"flotilla-jail");
    Ok(())
}

/// Gives the calling (still single-threaded) process a mount namespace of
/// its own with every mount private, so nothing done later in the jail
/// reaches the host's (or the keeper's) mount table.
fn private_mounts() -> Result<()> {
    namespaces::unshare(libc::CLONE_NEWNS, "unshare(mount)")?;
    namespaces::make_mounts_private()
}

/// Drops every capability of every thread.
///
/// Capabilities are per thread, and a backend already runs threads when it
/// enters the jail (vring workers, the signal thread, the relay). Dropping
/// them with capset would only cover the calling thread. When the backend
/// runs as root, it therefore also changes its uid and gids to `nobody`:
/// glibc applies set*id calls to every thread of the process, and the
/// kernel clears the permitted and effective sets of a thread whose uids all
/// leave 0. In a user namespace of its own (the backend was not started as
/// root) the capabilities only ever applied to the backend's own namespaces;
/// the calling thread drops them and seccomp refuses every call where they
/// would matter (mount, unshare, setns, ...).
fn drop_all() -> Result<()> {
    caps::drop_bounding_except(0);
    caps::clear_ambient();
    if caps::is_host_root() {
        caps::become_nobody()?;
    }
    caps::capset_none()?;
    // A credential change clears the parent-death signal; arm it again so
    // the backend still dies with its keeper.
    caps::set_parent_death_signal(libc::SIGKILL)?;
    // Not dumpable: no ptrace attach by the same uid, /proc files root-owned.
    caps::not_dumpable();
    Ok(())
}
