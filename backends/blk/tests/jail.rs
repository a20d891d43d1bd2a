//! The backend jail, proven from the inside: flotilla-blk (built with the
//! test-only `escape-test` feature) tries to leave its jail right after
//! entering it, and each fence must hold as its policy says. Also checks
//! what the jailed process looks like from the host: namespaces, empty root,
//! no capabilities, nobody, no_new_privs, seccomp on every thread, rlimits,
//! inherited fds closed.

mod common;

use std::collections::HashSet;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{random_image, Backend, TempDir, BIN};
use flotilla_backend::test_support::proc::{self, NO_CAPS};
use flotilla_backend::test_support::{
    assert_errno, assert_keeper_sigsys as assert_sigsys, attempt_output, fatal_attempts, stderr,
    DENIED, ESCAPED,
};

/// Runs flotilla-blk with `FLOTILLA_ESCAPE_TEST=attempt` and `args`, and
/// connects to it; the attempt happens right after the jail is entered,
/// before the first vhost-user message is read.
fn attempt(attempt: &str, args: &[&str]) -> Output {
    let dir = TempDir::new("escape");
    let img = dir.0.join("img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let sock = dir.0.join("s");
    let child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--image")
        .arg(&img)
        .args(args)
        .env("FLOTILLA_ESCAPE_TEST", attempt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flotilla-blk");
    common::wait_for(&sock);
    let frontend = UnixStream::connect(&sock).expect("connect");
    let out = attempt_output(child, attempt);
    drop(frontend);
    out
}

fn me() -> String {
    std::process::id().to_string()
}

#[test]
fn seccomp_kill_refuses_exec_socket_ptrace_kill_and_mount_with_sigsys() {
    for (what, nr) in fatal_attempts() {
        assert_sigsys(&what, &attempt(&what, &[]), nr);
    }
}

#[test]
fn seccomp_fences_file_opens_with_eacces() {
    // Path opens fail with an errno rather than killing, so that libraries
    // probing files carry on; /proc/<pid>/mem of another process included.
    assert_errno("open", &attempt("open", &[]), libc::EACCES);
    let what = format!("proc-mem:{}", me());
    assert_errno(&what, &attempt(&what, &[]), libc::EACCES);
}

#[test]
fn namespaces_alone_hide_files_network_and_other_processes() {
    // Without seccomp, the namespaces, the empty root and the dropped
    // capabilities still refuse every attempt.
    let none = ["--seccomp", "none"];
    let pid = me();
    assert_errno("open", &attempt("open", &none), libc::ENOENT);
    let what = format!("proc-mem:{pid}");
    assert_errno(&what, &attempt(&what, &none), libc::ENOENT);
    assert_errno("exec", &attempt("exec", &none), libc::ENOENT);
    // A socket can be made, but the net namespace has no interface up.
    assert_errno("socket", &attempt("socket", &none), libc::ENETUNREACH);
    // This process is outside the backend's pid namespace: no such pid.
    let what = format!("kill:{pid}");
    assert_errno(&what, &attempt(&what, &none), libc::ESRCH);
    let what = format!("ptrace:{pid}");
    assert_errno(&what, &attempt(&what, &none), libc::ESRCH);
    assert_errno("mount", &attempt("mount", &none), libc::EPERM);
}

#[test]
fn chroot_mode_hides_files_without_namespaces() {
    let args = ["--sandbox", "chroot", "--seccomp", "none"];
    // ENOENT from the chroot or EACCES from Landlock, whichever the kernel
    // checks first.
    for what in ["open", "exec"] {
        let out = attempt(what, &args);
        assert_eq!(out.status.code(), Some(DENIED), "{what}: {}", stderr(&out));
    }
    assert_errno("mount", &attempt("mount", &args), libc::EPERM);
}

#[test]
fn seccomp_log_mode_logs_and_lets_through_but_still_fences_opens() {
    let log = ["--seccomp", "log", "--sandbox", "none"];
    assert_errno("open", &attempt("open", &log), libc::EACCES);
    // kill(0, 0) (the backend's own process group) is let through, logged.
    let out = attempt("kill:0", &log);
    assert_eq!(out.status.code(), Some(ESCAPED), "{}", stderr(&out));
}

#[test]
fn the_jailed_backend_seen_from_the_host() {
    // A descriptor leaked into the backend by its parent.
    let (leak_r, leak_w) = nix::unistd::pipe().unwrap();
    let leaked = leak_r.into_raw_fd();
    // SAFETY: clearing FD_CLOEXEC on our own fd so the child inherits it.
    unsafe { libc::fcntl(leaked, libc::F_SETFD, 0) };
    let image = random_image(1 << 20, 40);
    let backend = Backend::spawn("seen", &image, &["--num-queues", "2"]);
    // SAFETY: our copy of the read end is not needed any more.
    unsafe { libc::close(leaked) };
    // The jail is entered once a frontend has connected.
    let _frontend = UnixStream::connect(&backend.sock).expect("connect");
    let keeper = backend.child.id();
    let jailed = common::jailed_pid(keeper);
    assert_ne!(jailed, keeper, "the jail forks into a pid namespace");
    // Give the backend a moment to enter the jail.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while proc::status(jailed, "Seccomp") != "2" {
        assert!(std::time::Instant::now() < deadline, "never jailed");
        std::thread::sleep(Duration::from_millis(10));
    }

    for which in ["pid_for_children", "net", "mnt", "ipc", "uts"] {
        assert_ne!(
            proc::ns("self", which),
            proc::ns(&jailed.to_string(), which),
            "{which}"
        );
    }
    assert_eq!(
        proc::ns("self", "mnt"),
        proc::ns(&keeper.to_string(), "mnt"),
        "keeper on the host"
    );
    assert!(proc::root_is_empty(jailed), "jail root not empty");

    let tasks = proc::task_ids(jailed);
    assert!(tasks.len() >= 3, "worker threads exist: {tasks:?}");
    for t in tasks {
        let status = format!("/proc/{jailed}/task/{t}/status");
        for (field, want) in [
            ("CapEff", NO_CAPS),
            ("CapPrm", NO_CAPS),
            ("CapInh", NO_CAPS),
            ("NoNewPrivs", "1"),
            ("Seccomp", "2"),
        ] {
            assert_eq!(proc::status_field(&status, field), want, "task {t} {field}");
        }
        let uid = proc::status_field(&status, "Uid");
        assert!(
            uid.split_whitespace().all(|u| u == "65534"),
            "task {t}: uid {uid}"
        );
    }
    assert_eq!(proc::status(jailed, "CapBnd"), NO_CAPS);

    let limits = std::fs::read_to_string(format!("/proc/{jailed}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
            })
            .unwrap()
    };
    assert_eq!(limit("Max core file size"), ["0", "0"]);
    assert_eq!(limit("Max open files"), ["1024", "1024"]);
    assert_eq!(limit("Max file size"), ["1099511627776", "1099511627776"]);

    // The leaked pipe end is closed: its writer sees no reader left once the
    // keeper (which closes everything) and the jailed child both let go.
    let fds: HashSet<String> = proc::fds_of(jailed).into_iter().map(|(_, l)| l).collect();
    let pipe = proc::link(&format!("/proc/self/fd/{}", leak_w.as_raw_fd()));
    assert!(!fds.contains(&pipe), "leaked {pipe} still open: {fds:?}");
    drop(backend);
}
