//! Starting and watching the VM's processes: the core (`flotilla-vmm`) and one vhost-user
//! backend per device. Every child dies with the gateway (PR_SET_PDEATHSIG), so a killed
//! gateway leaves nothing behind.
//!
//! [`Supervisor`] owns the backends once the VM runs. Each backend has a watcher thread that
//! waits on its pidfd; when the process ends without being asked to, the watcher tells the
//! core to hold the device (the *waiting* state: the guest's requests pile up in the rings),
//! starts a new incarnation on a new socketpair, and hands the core the new connection, which
//! replays the vhost-user set-up (DESIGN.md "The core owns device state"). The first retry is
//! immediate; while incarnations keep failing, the delay doubles up to [`MAX_BACKOFF`].
//! Operators see `FLOTILLA_BACKEND_LOST` / `FLOTILLA_BACKEND_RESTARTED` events and
//! `flotilla-query-backends`.

pub mod backend;
pub mod launch;
pub mod pidfd;
pub mod spawn;
pub mod tap;

pub use launch::{launch_vm, LaunchError, LaunchedVm};

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::core_link::CoreLink;
use crate::qmp::EventBus;
use backend::{BackendSpec, Incarnation};
use pidfd::{ExitStatus, Pidfd};

/// Longest wait between two restart attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// First non-zero restart delay.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// An incarnation that served at least this long counts as healthy: the next crash restarts
/// at once again.
const HEALTHY_UPTIME: Duration = Duration::from_secs(1);
/// How long a stopping backend gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What the supervisor needs from the core: attach a backend's socket to a device slot, and
/// detach it (empty the slot, or hold the device while a replacement starts).
pub trait CoreOps: Send + Sync {
    /// Attaches the backend at the other end of `socket` to `slot`.
    fn attach(&self, slot: &str, socket: &UnixStream) -> Result<(), String>;
    /// Detaches `slot`'s backend.
    fn detach(&self, slot: &str, unplug: bool) -> Result<(), String>;
    /// Whether the core still runs (backends end by themselves when it goes).
    fn alive(&self) -> bool {
        true
    }
}

impl CoreOps for CoreLink {
    fn attach(&self, slot: &str, socket: &UnixStream) -> Result<(), String> {
        let mut args = Map::new();
        args.insert("slot".into(), json!(slot));
        self.request_with_fd("x-attach-backend", args, socket)
            .map(drop)
            .map_err(|e| e.desc)
    }

    fn detach(&self, slot: &str, unplug: bool) -> Result<(), String> {
        let mut args = Map::new();
        args.insert("slot".into(), json!(slot));
        args.insert("unplug".into(), json!(unplug));
        self.request("x-detach-backend", args, |done| done())
            .map(drop)
            .map_err(|e| e.desc)
    }

    fn alive(&self) -> bool {
        !self.is_closed()
    }
}

/// How long a backend that exited cleanly (its frontend hung up) waits before it counts as
/// lost: when the core ends, its backends see the hang-up at the same moment the gateway
/// sees the core's exit, and that is the VM ending, not a crash.
const HANG_UP_GRACE: Duration = Duration::from_millis(100);

/// Where the supervisor reports lost and restarted backends (the QMP event bus).
pub trait EventSink: Send + Sync {
    /// Emits event `name` with `data`.
    fn emit(&self, name: &str, data: Value);
}

impl EventSink for EventBus {
    fn emit(&self, name: &str, data: Value) {
        EventBus::emit(self, name, data);
    }
}

/// Lifecycle of a supervised backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendPhase {
    /// Serving.
    Running,
    /// Its process ended; a new one is being started.
    Restarting,
    /// Being stopped (device_del, shutdown).
    Stopping,
}

impl BackendPhase {
    fn as_str(self) -> &'static str {
        match self {
            BackendPhase::Running => "running",
            BackendPhase::Restarting => "restarting",
            BackendPhase::Stopping => "stopping",
        }
    }
}

struct ProcState {
    pidfd: Option<Arc<Pidfd>>,
    phase: BackendPhase,
    restarts: u32,
    stop: bool,
}

/// One supervised backend.
struct Managed {
    id: String,
    driver: String,
    slot: String,
    spec: BackendSpec,
    state: Mutex<ProcState>,
    wake: Condvar,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl Managed {
    fn state(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A backend as `flotilla-query-backends` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Device id.
    pub id: String,
    /// QMP driver name of the device.
    pub driver: String,
    /// The core's slot.
    pub slot: String,
    /// Current process id, if one runs.
    pub pid: Option<u32>,
    /// Phase.
    pub phase: BackendPhase,
    /// How many times it was restarted.
    pub restarts: u32,
}

/// Owns every backend process of the VM.
pub struct Supervisor {
    core: Arc<dyn CoreOps>,
    events: Arc<dyn EventSink>,
    backends: Mutex<BTreeMap<String, Arc<Managed>>>,
    shutting_down: AtomicBool,
}

fn event_data(m: &Managed, pid: u32, restarts: u32) -> Map<String, Value> {
    let mut data = Map::new();
    data.insert("id".into(), json!(m.id));
    data.insert("driver".into(), json!(m.driver));
    data.insert("pid".into(), json!(pid));
    data.insert("restarts".into(), json!(restarts));
    data
}

impl Supervisor {
    /// A supervisor attaching backends through `core` and reporting on `events`.
    pub fn new(core: Arc<dyn CoreOps>, events: Arc<dyn EventSink>) -> Arc<Self> {
        Arc::new(Supervisor {
            core,
            events,
            backends: Mutex::default(),
            shutting_down: AtomicBool::new(false),
        })
    }

    fn backends(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Managed>>> {
        self.backends.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a backend with this device id exists.
    pub fn contains(&self, id: &str) -> bool {
        self.backends().contains_key(id)
    }

    /// Starts a backend for device `id` and attaches it to the core's `slot` (hotplug).
    /// Nothing is left behind on failure: the process is killed and reaped.
    pub fn start(
        self: &Arc<Self>,
        id: &str,
        driver: &str,
        slot: &str,
        spec: BackendSpec,
    ) -> Result<(), String> {
        if self.contains(id) {
            return Err(format!("a backend for device '{id}' already runs"));
        }
        let inc = spec
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", spec.program.display()))?;
        if let Err(e) = self.core.attach(slot, &inc.core_end) {
            stop_process(&inc.pidfd);
            return Err(e);
        }
        self.adopt(id, driver, slot, spec, inc.pidfd)
    }

    /// Takes over a backend started before the core (cold plug): its socket went to the core
    /// on the command line.
    pub fn adopt(
        self: &Arc<Self>,
        id: &str,
        driver: &str,
        slot: &str,
        spec: BackendSpec,
        pidfd: Pidfd,
    ) -> Result<(), String> {
        let pid = pidfd.pid();
        let managed = Arc::new(Managed {
            id: id.to_string(),
            driver: driver.to_string(),
            slot: slot.to_string(),
            spec,
            state: Mutex::new(ProcState {
                pidfd: Some(Arc::new(pidfd)),
                phase: BackendPhase::Running,
                restarts: 0,
                stop: false,
            }),
            wake: Condvar::new(),
            watcher: Mutex::new(None),
        });
        let watcher = {
            let me = self.clone();
            let m = managed.clone();
            std::thread::Builder::new()
                .name(format!("watch-{id}"))
                .spawn(move || me.watch(&m))
        };
        match watcher {
            Ok(handle) => {
                *managed.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
                self.backends().insert(id.to_string(), managed);
                log::info!("backend '{id}' ({driver}, slot {slot}): pid {pid}");
                Ok(())
            }
            Err(e) => {
                if let Some(p) = managed.state().pidfd.take() {
                    stop_process(&p);
                }
                Err(format!("cannot watch backend '{id}': {e}"))
            }
        }
    }

    /// Stops device `id`'s backend for good and reaps it; its watcher ends too. Works in any
    /// phase, including while a restart is pending.
    pub fn stop(&self, id: &str) -> Result<(), String> {
        self.stop_then(id, || ())
    }

    /// Like [`Supervisor::stop`], running `detach` once the backend is marked as stopping
    /// but before it is signalled: a backend whose frontend hangs up exits by itself, and that
    /// exit must not be mistaken for a crash.
    pub fn stop_then(&self, id: &str, detach: impl FnOnce()) -> Result<(), String> {
        let Some(m) = self.backends().remove(id) else {
            return Err(format!("no backend for device '{id}'"));
        };
        {
            let mut st = m.state();
            st.stop = true;
            st.phase = BackendPhase::Stopping;
        }
        m.wake.notify_all();
        detach();
        stop_managed(&m);
        Ok(())
    }

    /// Stops every backend (the VM is ending): no restart, nothing left running.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let all: Vec<Arc<Managed>> = std::mem::take(&mut *self.backends())
            .into_values()
            .collect();
        for m in &all {
            let mut st = m.state();
            st.stop = true;
            st.phase = BackendPhase::Stopping;
            if let Some(p) = &st.pidfd {
                let _ = p.signal(libc::SIGTERM);
            }
            m.wake.notify_all();
        }
        for m in &all {
            stop_managed(m);
        }
    }

    /// Every supervised backend, by device id.
    pub fn list(&self) -> Vec<BackendInfo> {
        self.backends()
            .values()
            .map(|m| {
                let st = m.state();
                BackendInfo {
                    id: m.id.clone(),
                    driver: m.driver.clone(),
                    slot: m.slot.clone(),
                    pid: st.pidfd.as_ref().map(|p| p.pid()),
                    phase: st.phase,
                    restarts: st.restarts,
                }
            })
            .collect()
    }

    /// `flotilla-query-backends`.
    pub fn query(&self) -> Value {
        Value::Array(
            self.list()
                .into_iter()
                .map(|b| {
                    json!({
                        "id": b.id, "driver": b.driver, "slot": b.slot, "pid": b.pid,
                        "state": b.phase.as_str(), "restarts": b.restarts,
                    })
                })
                .collect(),
        )
    }

    /// The watcher: waits for the process, and restarts it until told to stop.
    fn watch(&self, m: &Managed) {
        let mut delay = Duration::ZERO;
        loop {
            let Some(pidfd) = m.state().pidfd.clone() else {
                return;
            };
            let started = Instant::now();
            let status = match pidfd.wait() {
                Ok(s) => s,
                Err(e) => {
                    log::error!(
                        "backend '{}': waiting for pid {} failed: {e}",
                        m.id,
                        pidfd.pid()
                    );
                    return;
                }
            };
            if status == ExitStatus::Exited(0) && !m.state().stop {
                std::thread::sleep(HANG_UP_GRACE);
            }
            let restarts = {
                let mut st = m.state();
                st.pidfd = None;
                if st.stop || self.shutting_down.load(Ordering::SeqCst) || !self.core.alive() {
                    log::info!("backend '{}' (pid {}) ended: {status}", m.id, pidfd.pid());
                    return;
                }
                st.phase = BackendPhase::Restarting;
                st.restarts
            };
            log::warn!("backend '{}' (pid {}) lost: {status}", m.id, pidfd.pid());
            let mut data = event_data(m, pidfd.pid(), restarts);
            match status {
                ExitStatus::Exited(code) => {
                    data.insert("status".into(), json!(code));
                }
                ExitStatus::Signaled { .. } => {
                    data.insert("signal".into(), json!(status.signal_name()));
                }
            }
            self.events
                .emit("FLOTILLA_BACKEND_LOST", Value::Object(data));
            if let Err(e) = self.core.detach(&m.slot, false) {
                log::warn!(
                    "backend '{}': the core did not take the device off: {e}",
                    m.id
                );
            }
            // A backend that served for a while restarts at once; one that keeps dying
            // backs off.
            delay = if started.elapsed() >= HEALTHY_UPTIME {
                Duration::ZERO
            } else {
                delay
            };
            match self.restart(m, &mut delay) {
                Some(inc) => {
                    let (pid, restarts) = {
                        let mut st = m.state();
                        if st.stop {
                            // device_del came while the new one was being attached, and its
                            // unplug may have reached the core first: empty the slot again.
                            drop(st);
                            let _ = self.core.detach(&m.slot, true);
                            stop_process(&inc.pidfd);
                            return;
                        }
                        st.restarts += 1;
                        st.phase = BackendPhase::Running;
                        let pid = inc.pidfd.pid();
                        st.pidfd = Some(Arc::new(inc.pidfd));
                        (pid, st.restarts)
                    };
                    log::info!(
                        "backend '{}' restarted: pid {pid} ({restarts} restarts)",
                        m.id
                    );
                    self.events.emit(
                        "FLOTILLA_BACKEND_RESTARTED",
                        Value::Object(event_data(m, pid, restarts)),
                    );
                }
                None => return,
            }
        }
    }

    /// Starts and attaches incarnations until one works (`Some`) or the backend is being
    /// stopped (`None`). `delay` is the wait before the next attempt; it grows while attempts
    /// fail.
    fn restart(&self, m: &Managed, delay: &mut Duration) -> Option<Incarnation> {
        loop {
            {
                let st = m.state();
                let (st, _) = m
                    .wake
                    .wait_timeout_while(st, *delay, |st| !st.stop)
                    .unwrap_or_else(|p| p.into_inner());
                if st.stop || self.shutting_down.load(Ordering::SeqCst) || !self.core.alive() {
                    return None;
                }
            }
            *delay = (*delay * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
            let inc = match m.spec.spawn() {
                Ok(inc) => inc,
                Err(e) => {
                    log::error!("backend '{}': cannot start a new one: {e}", m.id);
                    continue;
                }
            };
            if let Err(e) = self.core.attach(&m.slot, &inc.core_end) {
                log::warn!(
                    "backend '{}': the core refused the new backend (pid {}): {e}",
                    m.id,
                    inc.pidfd.pid()
                );
                stop_process(&inc.pidfd);
                continue;
            }
            return Some(inc);
        }
    }
}

/// Asks the process to end (SIGTERM), insists after [`STOP_GRACE`] (SIGKILL), and reaps it.
fn stop_process(pidfd: &Pidfd) {
    let _ = pidfd.signal(libc::SIGTERM);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(move || {
            if rx.recv_timeout(STOP_GRACE).is_err() {
                let _ = pidfd.signal(libc::SIGKILL);
            }
        });
        if let Err(e) = pidfd.wait() {
            log::warn!("reaping pid {} failed: {e}", pidfd.pid());
        }
        let _ = tx.send(());
    });
}

/// Stops a managed backend and waits for its watcher (which reaps the process).
fn stop_managed(m: &Managed) {
    let pidfd = {
        let mut st = m.state();
        st.stop = true;
        st.phase = BackendPhase::Stopping;
        st.pidfd.clone()
    };
    m.wake.notify_all();
    if let Some(p) = &pidfd {
        let _ = p.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        // The watcher reaps; if the process ignores SIGTERM, SIGKILL it.
        while m.state().pidfd.is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if m.state().pidfd.is_some() {
            let _ = p.signal(libc::SIGKILL);
        }
    }
    if let Some(handle) = m.watcher.lock().unwrap_or_else(|p| p.into_inner()).take() {
        if handle.join().is_err() {
            log::error!("backend '{}': its watcher panicked", m.id);
        }
    }
    log::info!("backend '{}' stopped", m.id);
}

#[cfg(test)]
mod tests;
