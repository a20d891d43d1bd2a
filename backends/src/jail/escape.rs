//! Test-only escape attempts, made from inside the real jail (by the
//! backends right after entering it, by the core's main thread once every
//! thread runs under its filter).
//!
//! Compiled only with the `escape-test` feature (never a default feature,
//! never in release builds; enabled by the tests' dev-dependencies). When
//! the environment variable `FLOTILLA_ESCAPE_TEST` names an attempt, the
//! process makes it, reports the outcome, and exits with [`DENIED`] if the
//! attempt failed with an errno or [`ESCAPED`] if it worked; an attempt the
//! seccomp filter refuses never returns (the process dies of SIGSYS and its
//! handler logs the syscall). Attempts, each harmless even where it works:
//!
//! - `open`: open("/etc/passwd");
//! - `exec`: execve("/bin/sh", "exit 0");
//! - `socket`: socket(AF_INET) and, if that works, connect to 127.0.0.1;
//! - `ptrace:PID`: PTRACE_ATTACH to PID;
//! - `proc-mem:PID`: open("/proc/PID/mem");
//! - `kill:PID`: kill(PID, 0);
//! - `mount`: mount(MS_MOVE of "/" without a source), refused for want of
//!   privilege before it could do anything;
//! - `fallocate:MODE`: fallocate(MODE) on a fresh 8 KiB memfd (a policy
//!   may allow one mode only, e.g. the balloon's punch-hole);
//! - `ioctl:FD:REQUEST`: ioctl(FD, REQUEST, 0) (REQUEST in decimal or 0x
//!   hex; a policy may allow some requests on a device fd and not others).

use std::ffi::CString;

/// Exit status when the attempt failed with an errno.
pub const DENIED: i32 = 42;
/// Exit status when the attempt went through.
pub const ESCAPED: i32 = 43;

/// Makes the attempt `FLOTILLA_ESCAPE_TEST` names, if any, then exits.
/// `report` gets each line about it (the backends log them, the core writes
/// them to stderr).
pub fn attempt_from_env(report: impl Fn(log::Level, &str)) {
    let Ok(what) = std::env::var("FLOTILLA_ESCAPE_TEST") else {
        return;
    };
    let (name, arg) = what.split_once(':').unwrap_or((what.as_str(), ""));
    let pid: libc::pid_t = arg.parse().unwrap_or(0);
    let (arg1, arg2) = arg.split_once(':').unwrap_or((arg, ""));
    report(log::Level::Warn, &format!("escape-test: attempting {what}"));
    let result = match name {
        "open" => open("/etc/passwd"),
        "proc-mem" => open(&format!("/proc/{pid}/mem")),
        "exec" => exec(),
        "socket" => socket(),
        // SAFETY: ptrace/kill with integer arguments; kill with signal 0
        // only checks whether a signal could be sent.
        "ptrace" => {
            check(unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0usize, 0usize) as libc::c_int })
        }
        "kill" => check(unsafe { libc::kill(pid, 0) }),
        "mount" => mount(),
        "fallocate" => fallocate(number(arg1) as libc::c_int),
        // SAFETY: an ioctl whose pointer argument, if any, is NULL: the
        // kernel fails it with EFAULT rather than touching memory.
        "ioctl" => check(unsafe {
            libc::ioctl(
                number(arg1) as libc::c_int,
                number(arg2) as libc::c_ulong,
                0,
            )
        }),
        other => {
            report(
                log::Level::Error,
                &format!("escape-test: unknown attempt {other}"),
            );
            std::process::exit(2)
        }
    };
    let code = match result {
        Ok(()) => {
            report(
                log::Level::Error,
                &format!("escape-test: {what} went through"),
            );
            ESCAPED
        }
        Err(e) => {
            report(
                log::Level::Warn,
                &format!("escape-test: {what} denied: {e}"),
            );
            DENIED
        }
    };
    log::logger().flush();
    std::process::exit(code)
}

/// A decimal or 0x-prefixed hexadecimal number (0 if malformed).
fn number(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap_or(0),
        None => s.parse().unwrap_or(0),
    }
}

fn fallocate(mode: libc::c_int) -> std::io::Result<()> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is ours
    // and closed below; ftruncate/fallocate take integers only.
    unsafe {
        let fd = libc::memfd_create(c"escape-test".as_ptr(), libc::MFD_CLOEXEC);
        check(fd)?;
        let result = check(libc::ftruncate(fd, 8192))
            .and_then(|()| check(libc::fallocate(fd, mode, 0, 4096)));
        libc::close(fd);
        result
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open(path: &str) -> std::io::Result<()> {
    std::fs::File::open(path).map(drop)
}

fn exec() -> std::io::Result<()> {
    let sh = CString::new("/bin/sh").map_err(std::io::Error::other)?;
    let c = CString::new("-c").map_err(std::io::Error::other)?;
    let script = CString::new("exit 0").map_err(std::io::Error::other)?;
    let argv = [sh.as_ptr(), c.as_ptr(), script.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NUL-terminated strings and NULL-terminated arrays that outlive
    // the call; on success the process image is replaced.
    check(unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) })
}

fn socket() -> std::io::Result<()> {
    // SAFETY: socket/connect/close with valid arguments; `addr` lives
    // across the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        check(fd)?;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 9u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let result = check(rc);
        libc::close(fd);
        match result {
            // Refused means the host's loopback answered: out of the jail.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(()),
            other => other,
        }
    }
}

fn mount() -> std::io::Result<()> {
    let root = CString::new("/").map_err(std::io::Error::other)?;
    // SAFETY: valid NUL-terminated target; NULL source and type are allowed
    // by mount(2) and make MS_MOVE fail with EINVAL once permitted.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    })
}
