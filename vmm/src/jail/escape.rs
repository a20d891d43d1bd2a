//! Test-only escape attempts, made by the jailed core.
//!
//! Compiled only with the `escape-test` feature, which nothing but vmm's own tests enable
//! (never a default feature, absent from release builds). When `FLOTILLA_ESCAPE_TEST` names
//! an attempt, the main thread makes it right after installing its filter (every other thread
//! is running by then), logs the outcome and exits with [`DENIED`] when it failed with an
//! errno or [`ESCAPED`] when it worked; an attempt seccomp refuses never returns (SIGSYS,
//! reported by the handler). The same attempts as the backends'
//! (`flotilla_backend::jail::escape`):
//!
//! - `open`: open("/etc/passwd"); `proc-mem:PID`: open("/proc/PID/mem");
//! - `exec`: execve("/bin/sh", "exit 0");
//! - `socket`: socket(AF_INET) and, if that works, connect to 127.0.0.1;
//! - `ptrace:PID`: PTRACE_ATTACH; `kill:PID`: kill(PID, 0);
//! - `mount`: mount(MS_MOVE of "/" without a source), harmless even where permitted.

use std::ffi::CString;

/// Exit status when the attempt failed with an errno.
pub const DENIED: i32 = 42;
/// Exit status when the attempt went through.
pub const ESCAPED: i32 = 43;

/// Makes the attempt `FLOTILLA_ESCAPE_TEST` names, if any, then exits.
pub fn attempt_from_env() {
    let Ok(what) = std::env::var("FLOTILLA_ESCAPE_TEST") else {
        return;
    };
    let (name, arg) = what.split_once(':').unwrap_or((what.as_str(), ""));
    let pid: libc::pid_t = arg.parse().unwrap_or(0);
    eprintln!("escape-test: attempting {what}");
    let result = match name {
        "open" => std::fs::File::open("/etc/passwd").map(drop),
        "proc-mem" => std::fs::File::open(format!("/proc/{pid}/mem")).map(drop),
        "exec" => exec(),
        "socket" => socket(),
        // SAFETY: ptrace/kill with integer arguments; kill with signal 0 only checks whether a
        // signal could be sent.
        "ptrace" => {
            check(unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0usize, 0usize) as libc::c_int })
        }
        "kill" => check(unsafe { libc::kill(pid, 0) }),
        "mount" => mount(),
        other => {
            eprintln!("escape-test: unknown attempt {other}");
            std::process::exit(2)
        }
    };
    let code = match result {
        Ok(()) => {
            eprintln!("escape-test: {what} went through");
            ESCAPED
        }
        Err(e) => {
            eprintln!("escape-test: {what} denied: {e}");
            DENIED
        }
    };
    std::process::exit(code)
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn exec() -> std::io::Result<()> {
    let sh = CString::new("/bin/sh").map_err(std::io::Error::other)?;
    let c = CString::new("-c").map_err(std::io::Error::other)?;
    let script = CString::new("exit 0").map_err(std::io::Error::other)?;
    let argv = [sh.as_ptr(), c.as_ptr(), script.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NUL-terminated strings and NULL-terminated arrays that outlive the call.
    check(unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) })
}

fn socket() -> std::io::Result<()> {
    // SAFETY: socket/connect/close with valid arguments; `addr` lives across the call.
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
    // SAFETY: valid NUL-terminated target; NULL source and type make MS_MOVE fail with
    // EINVAL once permitted.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    })
}
