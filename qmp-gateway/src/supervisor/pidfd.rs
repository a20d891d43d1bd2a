//! Process handles that cannot name the wrong process.
//!
//! A pid can be reused as soon as its process is reaped; a pidfd always refers to the process
//! it was opened for. The supervisor signals and waits for backends only through their
//! pidfds, so a `device_del` racing a crash can never kill an unrelated process that happened
//! to get the same pid.

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this status.
    Exited(i32),
    /// A signal ended it (`core` when it dumped core).
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether a core dump was written.
        core: bool,
    },
}

impl ExitStatus {
    /// The signal's name (`SIGKILL`), or `None` for a normal exit.
    pub fn signal_name(&self) -> Option<String> {
        match self {
            ExitStatus::Exited(_) => None,
            ExitStatus::Signaled { signal, .. } => Some(
                nix::sys::signal::Signal::try_from(*signal)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {signal}")),
            ),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exit status {code}"),
            ExitStatus::Signaled { core, .. } => write!(
                f,
                "killed by {}{}",
                self.signal_name().unwrap_or_default(),
                if *core { " (core dumped)" } else { "" }
            ),
        }
    }
}

/// A pidfd for a child of this process.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    /// Opens a pidfd for `pid`, which must be an unreaped child of ours (so it cannot have
    /// been reused yet).
    pub fn open(pid: u32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Pidfd {
            // SAFETY: the kernel just returned this descriptor; nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            pid,
        })
    }

    /// The process id (for logs and QMP).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal`. Fails with ESRCH once the process has exited.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal with a pidfd we own, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Blocks until the process exits and reaps it.
    pub fn wait(&self) -> std::io::Result<ExitStatus> {
        const P_PIDFD: libc::idtype_t = 3;
        loop {
            // SAFETY: siginfo_t is plain data that waitid fills in.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on our pidfd writes only into `info`.
            let r = unsafe {
                libc::waitid(
                    P_PIDFD,
                    self.fd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: after a successful WEXITED waitid the child fields of `info` are set.
            let status = unsafe { info.si_status() };
            return Ok(match info.si_code {
                libc::CLD_EXITED => ExitStatus::Exited(status),
                code => ExitStatus::Signaled {
                    signal: status,
                    core: code == libc::CLD_DUMPED,
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    // The children are reaped through their pidfds, which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    fn waits_for_exit_codes_and_signals() {
        let child = Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let p = Pidfd::open(child.id()).unwrap();
        assert_eq!(p.wait().unwrap(), ExitStatus::Exited(7));

        let child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
        let p = Pidfd::open(child.id()).unwrap();
        p.signal(libc::SIGKILL).unwrap();
        let status = p.wait().unwrap();
        assert_eq!(
            status,
            ExitStatus::Signaled {
                signal: libc::SIGKILL,
                core: false
            }
        );
        assert_eq!(status.to_string(), "killed by SIGKILL");
        // Reaped: the pidfd now refers to a process that is gone.
        assert!(p.signal(libc::SIGTERM).is_err());
    }
}
