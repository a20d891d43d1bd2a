//! The `flotilla` binary: command-line errors, -help/-version, and a QMP session ending in
//! `quit` or a signal.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{temp_dir, wait_for, Client};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

fn output(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run flotilla")
}

fn usage_error(args: &[&str], want: &str) {
    let out = output(args);
    assert_eq!(out.status.code(), Some(2), "{args:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("flotilla: "), "{err}");
    assert!(err.contains(want), "{args:?}: {err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn command_line_errors_exit_2_with_one_line() {
    usage_error(&[], "option '-kernel' is required");
    usage_error(&["-kernel", "/k"], "a QMP channel is required");
    usage_error(&["-kernel", "/k", "-bogus"], "unknown option '-bogus'");
    usage_error(
        &[
            "-kernel",
            "/k",
            "-qmp",
            "unix:/tmp/x,server,nowait",
            "-incoming",
            "file:/t",
        ],
        "-incoming: not implemented yet (issue 3)",
    );
    usage_error(
        &[
            "-kernel",
            "/k",
            "-qmp",
            "unix:/tmp/x,server,nowait",
            "-smp",
            "300",
        ],
        "between 1 and 254",
    );
}

#[test]
fn help_and_version() {
    for flag in ["-help", "--help"] {
        let out = output(&[flag]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("Usage: flotilla"), "{text}");
    }
    let out = output(&["-version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout)
        .starts_with(&format!("flotilla {}", env!("CARGO_PKG_VERSION"))));
}

fn spawn(sock: &Path) -> Child {
    let child = Command::new(BIN)
        .args(["-kernel", "/nonexistent/vmlinuz", "-name", "t", "-qmp"])
        .arg(format!("unix:{},server,nowait", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flotilla");
    wait_for("the QMP socket", || sock.exists());
    child
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "flotilla did not exit"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn qmp_session_and_quit() {
    let dir = temp_dir("bin");
    let sock = dir.join("q.sock");
    let mut child = spawn(&sock);
    let mut c = Client::unix(&sock);
    c.negotiate();
    let r = c.cmd(json!({"execute": "query-version"}));
    assert_eq!(r["return"]["qemu"]["major"], 5);
    let r = c.cmd(json!({"execute": "query-status", "id": "s"}));
    assert_eq!(r["error"]["class"], "GenericError");
    assert_eq!(
        r["error"]["desc"],
        "not yet implemented: query-status (issue 3: the core's control socket)"
    );
    assert_eq!(r["id"], "s");
    let r = c.cmd(json!({"execute": "balloon", "arguments": {"value": "1G"}}));
    assert_eq!(
        r["error"]["desc"],
        "Invalid parameter type for 'value', expected: integer"
    );
    // getfd with a real fd passed over the socket.
    let (rd, _wr) = nix::unistd::pipe().unwrap();
    use std::os::fd::AsRawFd;
    c.send_with_fds(
        b"{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"p\"}}\n",
        &[rd.as_raw_fd()],
    );
    assert_eq!(c.reply(), json!({"return": {}}));
    let r = c.cmd(json!({"execute": "getfd", "arguments": {"fdname": "q"}}));
    assert_eq!(
        r["error"]["desc"],
        "No file descriptor supplied via SCM_RIGHTS"
    );
    // A second client sees the SHUTDOWN event too.
    let mut watcher = Client::unix(&sock);
    watcher.negotiate();
    c.send(&json!({"execute": "quit", "id": 9}));
    assert_eq!(c.recv(), json!({"return": {}, "id": 9}));
    let ev = c.recv();
    assert_eq!(ev["event"], "SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(watcher.recv()["event"], "SHUTDOWN");
    assert!(c.line().is_none(), "connection closed after quit");
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "socket removed");
}

#[test]
fn sigterm_ends_the_gateway() {
    let dir = temp_dir("sig");
    let sock = dir.join("q.sock");
    let mut child = spawn(&sock);
    let mut c = Client::unix(&sock);
    c.negotiate();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let ev = c.recv();
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert!(!sock.exists());
    // The path is free again; a stale file is refused, as StratoVirt does.
    std::fs::write(&sock, b"").unwrap();
    let out = Command::new(BIN)
        .args(["-kernel", "/k", "-qmp"])
        .arg(format!("unix:{},server,nowait", sock.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

#[test]
fn monitor_on_a_socket_chardev_and_a_second_qmp() {
    let dir = temp_dir("mon");
    let qmp_sock = dir.join("q.sock");
    let mon_sock = dir.join("mon.sock");
    let mut child = Command::new(BIN)
        .args(["-kernel", "/k", "-qmp"])
        .arg(format!("unix:{},server,nowait", qmp_sock.display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=mon0,path={},server,nowait",
            mon_sock.display()
        ))
        .args(["-mon", "chardev=mon0,id=monitor0,mode=control"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flotilla");
    wait_for("both sockets", || qmp_sock.exists() && mon_sock.exists());
    let mut a = Client::unix(&qmp_sock);
    a.negotiate();
    let mut b = Client::unix(&mon_sock);
    b.negotiate();
    b.send(&json!({"execute": "quit"}));
    assert_eq!(b.recv(), json!({"return": {}}));
    assert_eq!(a.recv()["event"], "SHUTDOWN");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert!(!qmp_sock.exists() && !mon_sock.exists());
}
