//! flotilla-net's jail, proven from the inside: the backend (built with the
//! test-only `escape-test` feature) tries to leave its jail right after
//! entering it, and each fence must hold as the policy says
//! (`flotilla_backend::jail::escape` lists the attempts). Its own policy is
//! narrow too: of the tap ioctls only TUNSETOFFLOAD is left. Needs root (a
//! network namespace and a tap, deleted at the end).

mod common;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, Netns};
use flotilla_backend::test_support::proc::{self, link, NO_CAPS};
use flotilla_backend::test_support::{
    assert_errno, assert_keeper_sigsys as assert_sigsys, attempt_output, fatal_attempts, stderr,
    ESCAPED,
};

/// Starts flotilla-net as the gateway does (`--fd 3 --tap-fd 4`), with a
/// stray descriptor 5 leaked to it, and `FLOTILLA_ESCAPE_TEST=attempt` if
/// given. Returns the child, our end of its socket, and what the stray fd
/// is (its /proc link, e.g. `socket:[1234]`).
fn spawn(tap: &OwnedFd, attempt: Option<&str>, args: &[&str]) -> (Child, UnixStream, String) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let (stray, _stray_peer) = UnixStream::pair().expect("socketpair");
    let stray_link = link(&format!("/proc/self/fd/{}", stray.as_raw_fd()));
    let fds = [theirs.as_raw_fd(), tap.as_raw_fd(), stray.as_raw_fd()];
    let mut cmd = Command::new(bin());
    cmd.args(["--fd", "3", "--tap-fd", "4", "--log-level", "info"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(what) = attempt {
        cmd.env("FLOTILLA_ESCAPE_TEST", what);
    }
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and
    // exec; our descriptors stay close-on-exec in this process.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0; 3];
            for (h, fd) in high.iter_mut().zip(fds) {
                *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *h < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (target, h) in (3..).zip(high) {
                if libc::dup2(h, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn flotilla-net");
    (child, ours, stray_link)
}

fn attempt(tap: &OwnedFd, what: &str, args: &[&str]) -> Output {
    let (child, ours, _) = spawn(tap, Some(what), args);
    let out = attempt_output(child, what);
    drop(ours);
    out
}

#[test]
fn seccomp_kill_refuses_exec_socket_ptrace_kill_and_mount_with_sigsys() {
    let ns = Netns::new();
    let tap = ns.tap("fnj0");
    for (what, nr) in fatal_attempts() {
        assert_sigsys(&what, &attempt(&tap, &what, &[]), nr);
    }
    assert_errno("open", &attempt(&tap, "open", &[]), libc::EACCES);
    let what = format!("proc-mem:{}", std::process::id());
    assert_errno(&what, &attempt(&tap, &what, &[]), libc::EACCES);
}

#[test]
fn of_the_tap_ioctls_only_tunsetoffload_is_left() {
    let ns = Netns::new();
    let tap = ns.tap("fnj1");
    let offload = format!("ioctl:4:{}", libc::TUNSETOFFLOAD);
    let out = attempt(&tap, &offload, &[]);
    assert_eq!(out.status.code(), Some(ESCAPED), "{}", stderr(&out));
    // Re-attaching the fd to another interface, changing the header size
    // under the guest, or making the tap persistent: SIGSYS.
    for request in [
        libc::TUNSETIFF,
        libc::TUNSETVNETHDRSZ,
        libc::TUNSETPERSIST,
        libc::TUNSETQUEUE,
    ] {
        let what = format!("ioctl:4:{request}");
        assert_sigsys(&what, &attempt(&tap, &what, &[]), libc::SYS_ioctl);
    }
}

#[test]
fn namespaces_alone_keep_the_backend_off_the_host_network() {
    // With seccomp off, a socket can be made but the backend's own network
    // namespace has no interface up; files and processes are out of sight.
    let ns = Netns::new();
    let tap = ns.tap("fnj2");
    let none = ["--seccomp", "none"];
    let pid = std::process::id();
    let socket = attempt(&tap, "socket", &none);
    assert_errno("socket", &socket, libc::ENETUNREACH);
    assert_errno("open", &attempt(&tap, "open", &none), libc::ENOENT);
    let what = format!("kill:{pid}");
    assert_errno(&what, &attempt(&tap, &what, &none), libc::ESRCH);
}

#[test]
fn the_jailed_backend_keeps_its_tap_and_loses_stray_fds() {
    let ns = Netns::new();
    let tap = ns.tap("fnj3");
    let (mut child, _ours, stray) = spawn(&tap, None, &[]);
    let keeper = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let jailed = loop {
        if let Some(&pid) = proc::children(keeper).first() {
            if proc::status(pid, "Seccomp") == "2" {
                break pid;
            }
        }
        assert!(Instant::now() < deadline, "never jailed");
        std::thread::sleep(Duration::from_millis(10));
    };
    let fds = proc::fds_of(jailed);
    let has = |fd: i32, what: &str| fds.iter().any(|(n, l)| *n == fd && l.contains(what));
    assert!(has(4, "tun"), "the tap fd is kept: {fds:?}");
    assert!(has(3, "socket:"), "the vhost-user socket is kept: {fds:?}");
    assert!(
        !fds.iter().any(|(_, l)| *l == stray),
        "the stray fd ({stray}) is closed: {fds:?}"
    );
    for task in proc::task_ids(jailed) {
        let path = &format!("/proc/{jailed}/task/{task}/status");
        assert_eq!(proc::status_field(path, "Seccomp"), "2", "{path}");
        assert_eq!(proc::status_field(path, "NoNewPrivs"), "1", "{path}");
        assert_eq!(proc::status_field(path, "CapEff"), NO_CAPS, "{path}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_tap_opened_by_name_is_the_callers_and_survives_the_jail() {
    // Standalone use: `--tap IFNAME` creates the tap where flotilla-net was
    // started (not in the namespace its jail makes), and keeps it once jailed.
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("fnj-standalone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock = dir.join("s");
    let sock_arg = sock.to_string_lossy().into_owned();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(bin())
        .args([
            "--socket-path",
            &sock_arg,
            "--tap",
            "fnj4",
            "--log-level",
            "info",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flotilla-net");
    flotilla_backend::test_support::wait_for(&sock);
    let tap_there = || {
        Command::new("ip")
            .args(["-n", &ns.name, "link", "show", "fnj4"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    assert!(tap_there(), "the tap is in the caller's namespace");
    // A frontend connects: the backend enters its jail, closing inherited fds.
    let frontend = UnixStream::connect(&sock).expect("connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    let jailed = |keeper: u32| {
        proc::children(keeper)
            .first()
            .is_some_and(|&pid| proc::status(pid, "Seccomp") == "2")
    };
    while !jailed(child.id()) {
        assert!(Instant::now() < deadline, "never jailed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(tap_there(), "the jailed backend still holds the tap");
    drop(frontend);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
