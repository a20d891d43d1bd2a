//! The `flotilla` binary: command-line errors, -help/-version, and a QMP session ending in
//! `quit` or a signal.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{spin_kernel, temp_dir, wait_for, Client};
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
        "-incoming: not implemented yet",
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

/// The gateway with a real core running a spin-loop guest.
fn spawn(sock: &Path) -> Child {
    let kernel = spin_kernel(sock.parent().expect("socket directory"));
    let child = Command::new(BIN)
        .arg("-kernel")
        .arg(&kernel)
        .args(["-name", "t", "-smp", "2", "-qmp"])
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
    // VM commands reach the core and its events come back with QMP timestamps.
    let r = c.cmd(json!({"execute": "query-status", "id": "s"}));
    assert_eq!(r["return"]["status"], "running", "{r}");
    assert_eq!(r["id"], "s");
    c.send(&json!({"execute": "stop"}));
    let ev = c.recv();
    assert_eq!(ev["event"], "STOP", "{ev}");
    assert!(ev["timestamp"]["seconds"].as_u64().unwrap_or(0) > 0, "{ev}");
    assert_eq!(c.recv(), json!({"return": {}}));
    let r = c.cmd(json!({"execute": "query-status"}));
    assert_eq!(r["return"]["status"], "paused");
    c.send(&json!({"execute": "cont"}));
    assert_eq!(c.recv()["event"], "RESUME");
    assert_eq!(c.recv(), json!({"return": {}}));
    let r = c.cmd(json!({"execute": "query-cpus"}));
    assert_eq!(r["return"].as_array().map(Vec::len), Some(2), "{r}");
    // The spin loop's two bytes (EB FE) sit at the kernel load address.
    let r = c.cmd(json!({"execute": "query-mem-gpa", "arguments": {"gpa": "100000"}}));
    assert!(
        r["return"].as_str().is_some_and(|v| v.ends_with("FEEB")),
        "{r}"
    );
    // Trace points of both processes, switched at run time.
    let r =
        c.cmd(json!({"execute": "trace-set-state", "arguments": {"name": "*", "enable": true}}));
    assert_eq!(r["return"], json!({}), "{r}");
    let r = c.cmd(json!({"execute": "trace-get-state", "arguments": {"name": "*"}}));
    let names: Vec<&str> = r["return"]
        .as_array()
        .map(|l| l.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    for want in ["qmp_command", "vcpu_exit", "vhost_user_message"] {
        assert!(names.contains(&want), "{want} in {r}");
    }
    assert!(r["return"]
        .as_array()
        .is_some_and(|l| l.iter().all(|t| t["state"] == "enabled")));
    c.cmd(json!({"execute": "trace-set-state", "arguments": {"name": "*", "enable": false}}));
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
    let kernel = spin_kernel(&dir);
    let mut child = Command::new(BIN)
        .arg("-kernel")
        .arg(&kernel)
        .arg("-qmp")
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

/// Whether `pid` is gone (or a zombie nobody has reaped yet: it runs no more code).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Err(_) => true,
        Ok(status) => status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z')),
    }
}

/// The thread-group id of a thread: the core's pid from a vCPU thread id.
fn tgid(tid: i64) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).expect("thread status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Tgid line")
}

/// A SIGKILLed gateway takes the core and every backend with it (PR_SET_PDEATHSIG): nothing
/// is left running.
#[test]
fn killing_the_gateway_leaves_nothing_behind() {
    let dir = temp_dir("kill");
    let sock = dir.join("q.sock");
    let kernel = spin_kernel(&dir);
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create image");
    let mut child = Command::new(BIN)
        .arg("-kernel")
        .arg(&kernel)
        .arg("-drive")
        .arg(format!("id=d0,file={},if=none", image.display()))
        .args(["-device", "virtio-blk-device,drive=d0,id=disk0", "-qmp"])
        .arg(format!("unix:{},server,nowait", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flotilla");
    wait_for("the QMP socket", || sock.exists());
    let mut c = Client::unix(&sock);
    c.negotiate();
    let r = c.cmd(json!({"execute": "query-cpus"}));
    let core = tgid(
        r["return"][0]["thread_id"]
            .as_i64()
            .expect("a vCPU thread id"),
    );
    // The disk's backend is the core's sibling: a child of the gateway.
    let children =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))
            .unwrap_or_default();
    let pids: Vec<i32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(pids.contains(&core), "core {core} among {pids:?}");
    assert_eq!(pids.len(), 2, "core and one flotilla-blk: {pids:?}");
    child.kill().expect("SIGKILL the gateway");
    child.wait().expect("reap the gateway");
    for pid in pids {
        wait_for("the gateway's children to die", || process_gone(pid));
    }
}

/// `-daemonize -pidfile`: the command returns once QMP is served, the pid file names the
/// daemon, and `quit` ends it and removes the pid file.
#[test]
fn daemonize_with_pidfile() {
    let dir = temp_dir("daemon");
    let sock = dir.join("q.sock");
    let pidfile = dir.join("vm.pid");
    let kernel = spin_kernel(&dir);
    let out = Command::new(BIN)
        .arg("-kernel")
        .arg(&kernel)
        .arg("-daemonize")
        .arg("-pidfile")
        .arg(&pidfile)
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", sock.display()))
        .output()
        .expect("run flotilla -daemonize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(sock.exists(), "QMP is served when the command returns");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert!(!process_gone(pid), "the daemon runs");
    let mut c = Client::unix(&sock);
    c.negotiate();
    assert_eq!(
        c.cmd(json!({"execute": "query-status"}))["return"]["status"],
        "running"
    );
    c.send(&json!({"execute": "quit"}));
    assert_eq!(c.recv(), json!({"return": {}}));
    wait_for("the daemon to exit", || process_gone(pid));
    wait_for("the pid file to go", || !pidfile.exists());
}
