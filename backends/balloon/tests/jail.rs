//! flotilla-balloon's jail, proven from the inside: the backend (built with
//! the test-only `escape-test` feature) tries to leave its jail right after
//! entering it, and each fence must hold as the policy says
//! (`flotilla_backend::jail::escape` lists the attempts). Its own policy is
//! narrow too: fallocate only punches holes.

mod common;

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};

use common::BIN;
use flotilla_backend::test_support::{
    assert_errno, assert_keeper_sigsys as assert_sigsys, attempt_output, fatal_attempts, stderr,
    ESCAPED,
};

/// Runs flotilla-balloon on an inherited socketpair (`--fd`), so that it
/// enters the jail at once and makes `attempt` there.
fn attempt(attempt: &str, args: &[&str]) -> Output {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.into_raw_fd();
    // SAFETY: clearing FD_CLOEXEC on our own fd so that the child inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let child = Command::new(BIN)
        .args(["--fd", &fd.to_string(), "--log-level", "info"])
        .args(args)
        .env("FLOTILLA_ESCAPE_TEST", attempt)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flotilla-balloon");
    // SAFETY: the child has its copy; ours is not needed.
    unsafe { libc::close(fd) };
    let out = attempt_output(child, attempt);
    drop(ours);
    out
}

#[test]
fn seccomp_kill_refuses_exec_socket_ptrace_kill_and_mount_with_sigsys() {
    for (what, nr) in fatal_attempts() {
        assert_sigsys(&what, &attempt(&what, &[]), nr);
    }
}

#[test]
fn seccomp_fences_file_opens_with_eacces() {
    assert_errno("open", &attempt("open", &[]), libc::EACCES);
    let what = format!("proc-mem:{}", std::process::id());
    assert_errno(&what, &attempt(&what, &[]), libc::EACCES);
}

#[test]
fn fallocate_is_allowed_only_to_punch_holes() {
    // PUNCH_HOLE | KEEP_SIZE (3) goes through; preallocating (0) or
    // collapsing a range (FALLOC_FL_COLLAPSE_RANGE) kills.
    let out = attempt("fallocate:3", &[]);
    assert_eq!(out.status.code(), Some(ESCAPED), "{}", stderr(&out));
    for mode in [0, libc::FALLOC_FL_COLLAPSE_RANGE] {
        let what = format!("fallocate:{mode}");
        assert_sigsys(&what, &attempt(&what, &[]), libc::SYS_fallocate);
    }
}

#[test]
fn namespaces_alone_hide_files_network_and_other_processes() {
    let none = ["--seccomp", "none"];
    let pid = std::process::id();
    assert_errno("open", &attempt("open", &none), libc::ENOENT);
    assert_errno("exec", &attempt("exec", &none), libc::ENOENT);
    assert_errno("socket", &attempt("socket", &none), libc::ENETUNREACH);
    let what = format!("kill:{pid}");
    assert_errno(&what, &attempt(&what, &none), libc::ESRCH);
    assert_errno("mount", &attempt("mount", &none), libc::EPERM);
}
