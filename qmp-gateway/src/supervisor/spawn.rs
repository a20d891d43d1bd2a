//! Spawning a child with a chosen set of inherited descriptors.
//!
//! Descriptors are handed over at fixed numbers (3, 4, ...) named on the child's command
//! line. In the child, between fork and exec: all signals are unblocked (the gateway blocks
//! its termination signals in every thread), the parent-death signal is armed, and the
//! descriptors are first moved out of the way (to numbers ≥ 1000) and then onto their
//! targets, so a source that happens to sit on another's target number is never clobbered.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;

/// Serializes spawns: descriptor numbers are process-wide, and a fork while another thread
/// is setting up its own pair of descriptors has been seen to hand a child the wrong socket.
static SPAWN: Mutex<()> = Mutex::new(());

/// Where the first inherited descriptor lands in the child.
pub const FIRST_CHILD_FD: RawFd = 3;

/// Finds a sibling program of the running binary (`flotilla-vmm`, `flotilla-blk`), unless
/// the environment variable `env` names one.
pub fn sibling_program(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Spawns `program args` with `fds` inherited at [`FIRST_CHILD_FD`], [`FIRST_CHILD_FD`]+1, ...
/// (in order). stdin/stdout/stderr are inherited.
pub fn spawn_with_fds(
    program: &Path,
    args: &[String],
    fds: &[&dyn AsRawFd],
) -> std::io::Result<Child> {
    let _guard = SPAWN.lock().unwrap_or_else(|p| p.into_inner());
    let sources: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (sigprocmask, prctl, getppid, fcntl, dup2, close).
    unsafe {
        cmd.pre_exec(move || {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the death signal was armed.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            let mut moved = [0 as RawFd; 64];
            if sources.len() > moved.len() {
                return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
            }
            for (i, &src) in sources.iter().enumerate() {
                let tmp = libc::fcntl(src, libc::F_DUPFD, 1000);
                if tmp < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                moved[i] = tmp;
            }
            for (i, &tmp) in moved[..sources.len()].iter().enumerate() {
                // dup2 clears FD_CLOEXEC on the target, so the descriptor survives exec.
                if libc::dup2(tmp, FIRST_CHILD_FD + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(tmp);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_arrive_at_their_numbers() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (mut c, d) = UnixStream::pair().unwrap();
        // The child writes "3" to fd 3 and "4" to fd 4.
        let script = "printf 3 >&3; printf 4 >&4".to_string();
        let mut child =
            spawn_with_fds(Path::new("/bin/sh"), &["-c".into(), script], &[&b, &d]).unwrap();
        drop((b, d));
        assert!(child.wait().unwrap().success());
        let mut s = String::new();
        a.read_to_string(&mut s).unwrap();
        assert_eq!(s, "3");
        s.clear();
        c.read_to_string(&mut s).unwrap();
        assert_eq!(s, "4");
        let _ = a.write_all(b"");
    }
}
