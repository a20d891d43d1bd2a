//! The gateway's supervisor replaces a backend that seccomp killed: the real flotilla-blk
//! (built with the test-only `escape-test` feature, as for `jail.rs`) is started by
//! `qmp_gateway::supervisor` the way the gateway starts it, tries to exec from inside its
//! jail, dies of SIGSYS, is reported lost with signal SIGSYS, and a fresh incarnation is
//! started and attached in its place. The core is a stand-in that keeps the sockets.
//!
//! This file holds a single test: it changes the process environment, which every backend
//! it starts inherits.

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qmp_gateway::supervisor::backend::{blk_spec, BlkOptions};
use qmp_gateway::supervisor::{BackendPhase, CoreOps, EventSink, Supervisor};
use serde_json::Value;

/// A core that accepts every backend and keeps its socket open, as the real one does.
#[derive(Default)]
struct Core {
    attached: Mutex<Vec<UnixStream>>,
}

impl CoreOps for Core {
    fn attach(&self, _slot: &str, socket: &UnixStream) -> Result<(), String> {
        let kept = socket.try_clone().map_err(|e| e.to_string())?;
        self.attached.lock().unwrap().push(kept);
        Ok(())
    }
    fn detach(&self, _slot: &str, _unplug: bool) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Default)]
struct Events(Mutex<Vec<(String, Value)>>);

impl EventSink for Events {
    fn emit(&self, name: &str, data: Value) {
        self.0.lock().unwrap().push((name.to_string(), data));
    }
}

#[test]
fn a_backend_killed_by_seccomp_is_restarted_by_the_supervisor() {
    let dir = common::TempDir::new("supervised");
    let path = dir.0.join("img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let image: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap()
        .into();
    let opts = BlkOptions {
        image_name: path.to_string_lossy().into_owned(),
        ..BlkOptions::default()
    };
    let spec = blk_spec(PathBuf::from(common::BIN), &opts, image);
    let core = Arc::new(Core::default());
    let events = Arc::new(Events::default());
    let sup = Supervisor::new(core.clone(), events.clone());

    // Every incarnation started while this is set execs from inside its jail.
    std::env::set_var("FLOTILLA_ESCAPE_TEST", "exec");
    sup.start("disk0", "vhost-user-blk-device", "blk0", spec)
        .expect("start flotilla-blk");
    let first = sup.list()[0].pid.expect("a first incarnation");
    let deadline = Instant::now() + Duration::from_secs(20);
    let lost = loop {
        let lost = events
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|(name, _)| name == "FLOTILLA_BACKEND_LOST")
            .map(|(_, data)| data.clone());
        if let Some(data) = lost {
            break data;
        }
        assert!(Instant::now() < deadline, "the backend was never lost");
        std::thread::sleep(Duration::from_millis(5));
    };
    std::env::remove_var("FLOTILLA_ESCAPE_TEST");
    assert_eq!(lost["signal"], "SIGSYS", "{lost}");
    assert_eq!(lost["pid"], first, "{lost}");

    // Later incarnations (the first restart may still have inherited the attempt) serve:
    // one runs, jailed, attached to the core.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (pid, restarts) = loop {
        let info = sup.list()[0].clone();
        if let (BackendPhase::Running, Some(pid)) = (info.phase, info.pid) {
            let jailed = common::jailed_pid(pid);
            if info.restarts >= 1
                && flotilla_backend::test_support::proc::status(jailed, "Seccomp") == "2"
            {
                // Still there a moment later: not another incarnation about to die.
                std::thread::sleep(Duration::from_millis(300));
                if sup.list()[0].pid == Some(pid) {
                    break (pid, info.restarts);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no healthy incarnation: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_ne!(pid, first);
    assert!(restarts >= 1);
    assert!(core.attached.lock().unwrap().len() >= 2, "attached again");
    sup.shutdown();
}
