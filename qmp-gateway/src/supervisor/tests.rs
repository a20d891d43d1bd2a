//! The supervisor against a fake core and shell-script "backends": restarts with backoff,
//! stop in every phase, nothing left running.

use super::*;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

#[derive(Default)]
struct FakeCore {
    calls: Mutex<Vec<String>>,
    refuse_attach: Mutex<u32>,
}

impl CoreOps for FakeCore {
    fn attach(&self, slot: &str, _socket: &UnixStream) -> Result<(), String> {
        let mut refuse = self.refuse_attach.lock().unwrap();
        if *refuse > 0 {
            *refuse -= 1;
            self.calls.lock().unwrap().push(format!("refused {slot}"));
            return Err("backend lacks features".into());
        }
        self.calls.lock().unwrap().push(format!("attach {slot}"));
        Ok(())
    }
    fn detach(&self, slot: &str, unplug: bool) -> Result<(), String> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("detach {slot} {unplug}"));
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

fn sh(script: &str) -> BackendSpec {
    BackendSpec {
        program: PathBuf::from("/bin/sh"),
        args: vec!["-c".into(), script.into()],
        fds: Vec::<OwnedFd>::new(),
    }
}

fn setup() -> (Arc<FakeCore>, Arc<Events>, Arc<Supervisor>) {
    let core = Arc::new(FakeCore::default());
    let events = Arc::new(Events::default());
    let sup = Supervisor::new(core.clone(), events.clone());
    (core, events, sup)
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); check the state in /proc instead.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn a_killed_backend_is_restarted_and_reported() {
    let (core, events, sup) = setup();
    sup.start("disk0", "virtio-blk-mmio", "blk1", sh("exec sleep 60"))
        .unwrap();
    let first = sup.list()[0].pid.unwrap();
    for round in 1..=3u32 {
        let pid = sup.list()[0].pid.unwrap();
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        wait_for("restart", || {
            let b = &sup.list()[0];
            b.restarts == round && b.phase == BackendPhase::Running && b.pid != Some(pid)
        });
        assert!(!alive(pid), "the dead incarnation is reaped");
    }
    assert_ne!(sup.list()[0].pid, Some(first));
    let ev = events.0.lock().unwrap().clone();
    let lost: Vec<_> = ev
        .iter()
        .filter(|(n, _)| n == "FLOTILLA_BACKEND_LOST")
        .collect();
    let back: Vec<_> = ev
        .iter()
        .filter(|(n, _)| n == "FLOTILLA_BACKEND_RESTARTED")
        .collect();
    assert_eq!((lost.len(), back.len()), (3, 3));
    assert_eq!(lost[0].1["signal"], "SIGKILL");
    assert_eq!(lost[0].1["pid"], first);
    assert_eq!(back[2].1["restarts"], 3);
    assert_eq!(
        core.calls.lock().unwrap()[..3],
        ["attach blk1", "detach blk1 false", "attach blk1"]
    );
    let last = sup.list()[0].pid.unwrap();
    sup.stop("disk0").unwrap();
    assert!(!alive(last));
    assert!(sup.list().is_empty());
    assert!(sup.stop("disk0").is_err());
}

#[test]
fn a_crash_looping_backend_backs_off_and_can_be_stopped_meanwhile() {
    let (_core, events, sup) = setup();
    let started = Instant::now();
    sup.start("d", "virtio-blk-mmio", "blk0", sh("exit 3"))
        .unwrap();
    wait_for("several restarts", || sup.list()[0].restarts >= 5);
    // 0 + 10 + 20 + 40 ms at least between the first five incarnations.
    assert!(started.elapsed() >= Duration::from_millis(70));
    let ev = events.0.lock().unwrap().clone();
    assert_eq!(ev[0].0, "FLOTILLA_BACKEND_LOST");
    assert_eq!(ev[0].1["status"], 3);
    // Stop while it is between incarnations or mid-restart: returns promptly.
    let t = Instant::now();
    sup.stop("d").unwrap();
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(sup.list().is_empty());
}

#[test]
fn a_refused_attach_leaves_nothing_running() {
    let (core, _events, sup) = setup();
    *core.refuse_attach.lock().unwrap() = 1;
    let e = sup
        .start("d", "virtio-blk-mmio", "blk2", sh("exec sleep 60"))
        .unwrap_err();
    assert_eq!(e, "backend lacks features");
    assert!(sup.list().is_empty());
    // A retry after the refusal works; the same id cannot be started twice.
    sup.start("d", "virtio-blk-mmio", "blk2", sh("exec sleep 60"))
        .unwrap();
    assert!(sup
        .start("d", "virtio-blk-mmio", "blk3", sh("exec sleep 60"))
        .is_err());
    let pid = sup.list()[0].pid.unwrap();
    sup.shutdown();
    assert!(!alive(pid));
    assert!(sup.list().is_empty());
}

#[test]
fn a_restart_refused_by_the_core_is_retried() {
    let (core, _events, sup) = setup();
    sup.start("d", "virtio-blk-mmio", "blk0", sh("exec sleep 60"))
        .unwrap();
    *core.refuse_attach.lock().unwrap() = 2;
    let pid = sup.list()[0].pid.unwrap();
    // SAFETY: signalling a child we started and have not reaped.
    unsafe { libc::kill(pid as i32, libc::SIGSEGV) };
    wait_for("restart", || sup.list()[0].restarts == 1);
    let calls = core.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [
            "attach blk0",
            "detach blk0 false",
            "refused blk0",
            "refused blk0",
            "attach blk0"
        ]
    );
    sup.shutdown();
}

#[test]
fn no_zombies_after_many_cycles() {
    let (_core, _events, sup) = setup();
    let mut pids = Vec::new();
    for i in 0..100 {
        sup.start("d", "virtio-blk-mmio", "blk0", sh("exec sleep 60"))
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        pids.push(sup.list()[0].pid.unwrap());
        sup.stop("d").unwrap();
    }
    assert!(pids.iter().all(|&p| !alive(p)));
    // Nothing of ours is left, reaped or not.
    let me = std::process::id().to_string();
    let children =
        std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap_or_default();
    for p in &pids {
        assert!(!children.split_whitespace().any(|c| c == p.to_string()));
    }
}
