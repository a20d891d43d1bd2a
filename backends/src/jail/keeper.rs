//! The keeper process a backend leaves outside its namespaces.
//!
//! (With `--sandbox chroot` there are no namespaces, but the keeper is
//! still forked: it keeps the host's paths and removes the socket.)
//!
//! `unshare(CLONE_NEWPID)` moves only the *children* of the caller into the
//! new pid namespace, so the backend forks once: the child is pid 1 of its
//! namespace and becomes the backend; the parent stays behind as the keeper.
//! The keeper is what the supervisor (or a shell) started and knows by pid:
//! it forwards SIGTERM/SIGINT/SIGHUP to the backend and, when the backend
//! ends, ends the same way (same exit code, or the same fatal signal, e.g.
//! SIGSYS after a seccomp violation), so a parent cannot tell the two apart.
//! The backend gets PR_SET_PDEATHSIG so that it dies with its keeper.

use std::io;
use std::path::PathBuf;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::{Error, Result};

/// Forks into the new pid namespace. Returns in the child (the backend);
/// the parent runs the keeper loop and exits from there.
pub fn fork_keeper(socket_path: Option<PathBuf>) -> Result<()> {
    // Blocked before the fork, so that a child dying at once still leaves
    // its SIGCHLD pending for the keeper.
    let set = keeper_signals();
    let mut old = SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&set),
        Some(&mut old),
    )
    .map_err(|e| Error::sys("blocking signals", e))?;
    // SAFETY: the process is single-threaded (checked by `early`), so the
    // child may run arbitrary code after fork.
    match unsafe { fork() }.map_err(|e| Error::sys("fork into the pid namespace", e))? {
        ForkResult::Child => {
            old.thread_set_mask()
                .map_err(|e| Error::sys("restoring the signal mask", e))?;
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
                return Err(Error::last("PR_SET_PDEATHSIG"));
            }
            Ok(())
        }
        ForkResult::Parent { child } => keep(child, set, socket_path),
    }
}

fn keeper_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// The signals the keeper passes on to the backend.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The keeper: waits for `child`, forwarding signals, then ends like it.
fn keep(child: Pid, set: SigSet, socket_path: Option<PathBuf>) -> ! {
    let remove_socket = || {
        if let Some(path) = &socket_path {
            let _ = std::fs::remove_file(path);
        }
    };
    // The keeper needs none of the inherited descriptors but stderr and the
    // log file; holding the vhost-user socket would hide the backend's death
    // from the frontend.
    let log_fd = crate::logger::sink_fd();
    if let Ok(fds) = super::fds::open_fds() {
        for fd in fds.into_iter().filter(|&fd| fd > 2 && Some(fd) != log_fd) {
            // SAFETY: the keeper runs no other code that could own these.
            unsafe { libc::close(fd) };
        }
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => loop {
                match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => {
                        remove_socket();
                        log::logger().flush();
                        std::process::exit(code)
                    }
                    Ok(WaitStatus::Signaled(_, sig, _)) => {
                        remove_socket();
                        end_by_signal(sig)
                    }
                    Ok(WaitStatus::StillAlive) => break,
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        log::error!("keeper: waitpid: {e}");
                        std::process::exit(1)
                    }
                }
            },
            Ok(sig) => {
                let _ = nix::sys::signal::kill(child, sig);
            }
            Err(e) => {
                log::error!("keeper: sigwait: {}", io::Error::from(e));
                std::process::exit(1)
            }
        }
    }
}

/// Ends the keeper with the signal that ended the backend.
fn end_by_signal(sig: Signal) -> ! {
    if sig == Signal::SIGSYS {
        log::error!("jailed backend killed by SIGSYS: a seccomp violation");
    } else {
        log::warn!("jailed backend killed by {sig}");
    }
    log::logger().flush();
    // SAFETY: resetting to the default action and raising; no memory touched.
    unsafe {
        let _ = rlimit_core_zero();
        libc::signal(sig as libc::c_int, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig as libc::c_int);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig as libc::c_int);
    }
    std::process::exit(128 + sig as i32)
}

/// No core file from the keeper either: it would be empty of interest.
fn rlimit_core_zero() -> Result<()> {
    super::rlimits::lower(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")
}
