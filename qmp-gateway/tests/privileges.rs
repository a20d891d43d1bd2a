//! What the running `flotilla` keeps of its privileges, and the jail of the core it starts:
//! the gateway's bounding set is trimmed to `qmp_gateway::privileges::KEPT` with
//! no_new_privs set (and its children still jail themselves); the core runs with every
//! thread fenced, and `-disable-seccomp` turns off the core's filters and nothing else.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{spin_kernel, temp_dir, wait_for, Client};
use flotilla_backend::test_support::proc::{ns, status_field, NO_CAPS};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

fn spawn(sock: &Path, extra: &[&str]) -> Child {
    let kernel = spin_kernel(sock.parent().expect("socket directory"));
    let child = Command::new(BIN)
        .arg("-kernel")
        .arg(&kernel)
        .args(["-smp", "2", "-qmp"])
        .arg(format!("unix:{},server,nowait", sock.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flotilla");
    wait_for("the QMP socket", || sock.exists());
    child
}

/// The core: the gateway's child running flotilla-vmm.
fn core_of(gateway: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{gateway}/task/{gateway}/children"))
            .unwrap_or_default();
        for pid in children.split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "flotilla-vmm" {
                return pid.parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "no core under {gateway}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until every thread of `pid` (at least main, control and two vCPUs) shows
/// `Seccomp: want`, then returns each thread's status path.
fn threads_with_seccomp(pid: u32, want: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(|e| Some(format!("{}/status", e.ok()?.path().to_str()?)))
                    .collect()
            })
            .unwrap_or_default();
        if tasks.len() >= 4 && tasks.iter().all(|t| status_field(t, "Seccomp") == want) {
            return tasks;
        }
        assert!(
            Instant::now() < deadline,
            "core threads never all Seccomp {want}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn quit(sock: &Path, mut child: Child) {
    let mut c = Client::unix(sock);
    c.negotiate();
    let r = c.cmd(json!({"execute": "query-status"}));
    assert_eq!(r["return"]["status"], "running", "{r}");
    c.send(&json!({"execute": "quit"}));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "flotilla did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("seccomp refused"), "{err}");
}

#[test]
fn the_gateway_keeps_only_what_it_needs_and_the_core_is_jailed() {
    let dir = temp_dir("priv");
    let sock = dir.join("q.sock");
    let child = spawn(&sock, &[]);
    let gateway = child.id();
    let status = format!("/proc/{gateway}/status");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let kept = format!("{:016x}", qmp_gateway::privileges::kept_mask());
        assert_eq!(status_field(&status, "CapBnd"), kept);
        assert_eq!(status_field(&status, "CapEff"), kept);
    }
    let core = core_of(gateway);
    for t in threads_with_seccomp(core, "2") {
        assert_eq!(status_field(&t, "NoNewPrivs"), "1", "{t}");
        assert_eq!(status_field(&t, "CapEff"), NO_CAPS, "{t}");
        assert_eq!(status_field(&t, "CapBnd"), NO_CAPS, "{t}");
    }
    assert_ne!(ns("self", "net"), ns(&core.to_string(), "net"));
    assert_ne!(ns("self", "mnt"), ns(&core.to_string(), "mnt"));
    // stop/cont and the other VM commands still work under the filters.
    let mut c = Client::unix(&sock);
    c.negotiate();
    c.send(&json!({"execute": "stop"}));
    assert_eq!(c.recv()["event"], "STOP");
    assert_eq!(c.recv(), json!({"return": {}}));
    c.send(&json!({"execute": "cont"}));
    assert_eq!(c.recv()["event"], "RESUME");
    assert_eq!(c.recv(), json!({"return": {}}));
    let r = c.cmd(json!({"execute": "system_reset"}));
    assert_eq!(r["return"], json!({}), "{r}");
    drop(c);
    quit(&sock, child);
}

#[test]
fn disable_seccomp_turns_off_the_cores_filters_and_nothing_else() {
    let dir = temp_dir("noseccomp");
    let sock = dir.join("q.sock");
    let child = spawn(&sock, &["-disable-seccomp"]);
    let core = core_of(child.id());
    for t in threads_with_seccomp(core, "0") {
        assert_eq!(status_field(&t, "NoNewPrivs"), "1", "{t}");
        assert_eq!(status_field(&t, "CapEff"), NO_CAPS, "{t}");
    }
    assert_ne!(ns("self", "net"), ns(&core.to_string(), "net"));
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{core}/root"))
        .unwrap()
        .collect();
    assert!(root.is_empty(), "{root:?}");
    quit(&sock, child);
}

/// The jailed core's control thread attaches backends under its filter: a hot-plugged disk
/// (x-attach-backend: the socket arrives with SCM_RIGHTS, a socketpair and a request-channel
/// thread are made), its backend killed and replaced by the supervisor (attach again),
/// then unplugged — the core never dies of SIGSYS.
#[test]
fn hotplug_and_backend_restart_work_under_the_cores_filters() {
    let dir = temp_dir("hotplug");
    let sock = dir.join("q.sock");
    let image = dir.join("a.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let child = spawn(&sock, &[]);
    let core = core_of(child.id());
    threads_with_seccomp(core, "2");
    let mut c = Client::unix(&sock);
    c.negotiate();
    let r = c.cmd(json!({"execute": "blockdev-add", "arguments": {
        "node-name": "drive-0",
        "file": {"driver": "file", "filename": image.to_str().unwrap()},
        "cache": {"direct": false}, "read-only": false}}));
    assert_eq!(r["return"], json!({}), "{r}");
    let r = c.cmd(json!({"execute": "device_add", "arguments": {
        "id": "drive-0", "driver": "virtio-blk-mmio", "addr": "0x1"}}));
    assert_eq!(r["return"], json!({}), "{r}");
    let backends = |c: &mut Client| c.cmd(json!({"execute": "flotilla-query-backends"}));
    let r = backends(&mut c);
    let pid = r["return"][0]["pid"].as_u64().unwrap_or(0) as i32;
    assert!(pid > 0, "{r}");
    // SAFETY: kill with a pid the gateway reported for its backend.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = backends(&mut c);
        let b = &r["return"][0];
        if b["restarts"] == 1 && b["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "never replaced: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = c.cmd(json!({"execute": "device_del", "arguments": {"id": "drive-0"}}));
    assert!(r.get("return").is_some(), "{r}");
    let r = c.cmd(json!({"execute": "query-status"}));
    assert_eq!(r["return"]["status"], "running", "{r}");
    drop(c);
    quit(&sock, child);
}
