//! Helpers for the host tests of every flotilla process (feature
//! `test-support`, enabled only by dev-dependencies): judging the outcome of
//! an escape attempt (`jail::escape`) made by a jailed process, and looking
//! at a jailed process from the host through /proc.

use std::process::Output;

pub use crate::jail::escape::{DENIED, ESCAPED};

/// A process's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that the attempt `what` died of SIGSYS on syscall `nr`, reported
/// by the jail's SIGSYS handler.
pub fn assert_sigsys(what: &str, out: &Output, nr: libc::c_long) {
    use std::os::unix::process::ExitStatusExt;
    let err = stderr(out);
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{what}: {err}");
    assert!(
        err.contains(&format!("seccomp refused syscall {nr};")),
        "{what}: no report of syscall {nr}: {err}"
    );
}

/// [`assert_sigsys`] for a backend: its keeper reports the SIGSYS too.
pub fn assert_keeper_sigsys(what: &str, out: &Output, nr: libc::c_long) {
    assert_sigsys(what, out, nr);
    let err = stderr(out);
    assert!(err.contains("killed by SIGSYS"), "{what}: {err}");
}

/// Asserts that the attempt `what` failed with `errno` and said so.
pub fn assert_errno(what: &str, out: &Output, errno: i32) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(DENIED), "{what}: {err}");
    let msg = std::io::Error::from_raw_os_error(errno).to_string();
    assert!(
        err.contains(&format!("escape-test: {what} denied: {msg}")),
        "{what}: expected {msg}: {err}"
    );
}

/// The attempts every seccomp policy must kill, with the syscall each dies
/// on: exec, socket, ptrace and kill of this test process, mount.
pub fn fatal_attempts() -> Vec<(String, libc::c_long)> {
    let pid = std::process::id();
    vec![
        ("exec".to_string(), libc::SYS_execve),
        ("socket".to_string(), libc::SYS_socket),
        (format!("ptrace:{pid}"), libc::SYS_ptrace),
        (format!("kill:{pid}"), libc::SYS_kill),
        ("mount".to_string(), libc::SYS_mount),
    ]
}

/// A process seen from the host, through /proc.
pub mod proc {
    /// An empty capability set as /proc/<pid>/status shows it.
    pub const NO_CAPS: &str = "0000000000000000";

    /// The field `name` of a status file (`/proc/<pid>/status`,
    /// `/proc/<pid>/task/<tid>/status`); empty if the file or field is missing.
    pub fn status_field(path: &str, name: &str) -> String {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or("")
            .trim()
            .to_string()
    }

    /// The field `name` of `/proc/<pid>/status`.
    pub fn status(pid: u32, name: &str) -> String {
        status_field(&format!("/proc/{pid}/status"), name)
    }

    /// The namespace `which` (net, mnt, ...) of `pid` ("self" for this
    /// process); empty if unreadable.
    pub fn ns(pid: &str, which: &str) -> String {
        link(&format!("/proc/{pid}/ns/{which}"))
    }

    /// Where a /proc symlink points (empty if unreadable).
    pub fn link(path: &str) -> String {
        std::fs::read_link(path)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The thread ids of `pid`.
    pub fn task_ids(pid: u32) -> Vec<u32> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The children of `pid`'s main thread.
    pub fn children(pid: u32) -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The descriptors `pid` holds: (number, what it is).
    pub fn fds_of(pid: u32) -> Vec<(i32, String)> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| {
                    let e = e.ok()?;
                    let fd = e.file_name().to_str()?.parse().ok()?;
                    Some((fd, link(e.path().to_str()?)))
                })
                .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `pid`'s root directory is empty (it pivoted or chrooted into
    /// an empty one).
    pub fn root_is_empty(pid: u32) -> bool {
        std::fs::read_dir(format!("/proc/{pid}/root"))
            .map(|mut d| d.next().is_none())
            .unwrap_or(false)
    }
}

/// A fresh directory under the temporary directory, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Makes `flotilla-<tag>.XXXXXX`.
    pub fn new(tag: &str) -> Self {
        let template = std::env::temp_dir().join(format!("flotilla-{tag}.XXXXXX"));
        TempDir(nix::unistd::mkdtemp(&template).expect("mkdtemp"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (at most 20 s) until `path` exists, e.g. a backend's socket.
pub fn wait_for(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits at most `timeout` for `child` to exit by itself; its exit code
/// (None: still running, or ended by a signal).
pub fn wait_exit(child: &mut std::process::Child, timeout: std::time::Duration) -> Option<i32> {
    wait_exit_status(child, timeout).and_then(|status| status.code())
}

/// The output of a process started for an escape attempt, waited for at
/// most 60 s. One that is still running then is killed and the test fails
/// saying why that usually happens: the binary was built without the
/// `escape-test` feature (a `cargo build`/`cargo test` of another package
/// rebuilt it so), ignored `FLOTILLA_ESCAPE_TEST` and went on serving.
pub fn attempt_output(mut child: std::process::Child, what: &str) -> Output {
    use std::io::Read;
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let exited = wait_exit_status(&mut child, std::time::Duration::from_secs(60));
    let status = match exited {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
            panic!(
                "{what}: the process was still running after 60 s; was it built without the \
                 escape-test feature? (`touch` its crate and re-run its tests)\n{err}"
            );
        }
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn wait_exit_status(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Guest memory of `size` bytes at guest address 0, backed by a memfd named
/// `name` (as the core's is), mapped here; the file is what a test frontend
/// hands the backend in SET_MEM_TABLE.
pub fn memfd_guest_memory(
    name: &std::ffi::CStr,
    size: usize,
) -> (vm_memory::GuestMemoryMmap<()>, std::fs::File) {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
    let memfd = memfd_create(name, MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
    let file = std::fs::File::from(memfd);
    file.set_len(size as u64).expect("ftruncate");
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file.try_clone().expect("dup"), 0)),
    )])
    .expect("map guest memory");
    (mem, file)
}
