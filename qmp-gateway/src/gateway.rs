//! The gateway's command handler: StratoVirt's full command set, answered here when no VM
//! is needed and refused with a clear error where the core must act (until the core's
//! control socket is wired in, issue 3).
//!
//! Implemented here: `quit` (reply, `SHUTDOWN` event, then the process ends) and `getfd`
//! (the fd passed with SCM_RIGHTS is kept under its name for later commands such as
//! `netdev_add fd=NAME`). The built-ins `qmp_capabilities`, `query-version` and
//! `query-commands` are the server's.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::mpsc::Sender;
use std::sync::Mutex;

use serde_json::{json, Map, Value};

use crate::hotplug::{Hotplug, TapSource};
use crate::qmp::schema::STRATOVIRT_COMMANDS;
use crate::qmp::{ClientCtx, CommandHandler, CommandSpec, EventBus, QmpError};
use crate::supervisor::Supervisor;
use vmm::trace;

/// Why the gateway should stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// A QMP client sent `quit`.
    Quit,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// The core exited with this status (128 + N when killed by signal N).
    CoreExited(i32),
}

/// Commands the core executes; the gateway forwards them untouched.
pub const CORE_COMMANDS: &[&str] = &[
    "stop",
    "cont",
    "query-status",
    "system_reset",
    "system_powerdown",
    "query-cpus",
    "query-hotpluggable-cpus",
    "query-mem-gpa",
    "balloon",
    "query-balloon",
    "quit",
];

/// Commands the hotplug state answers (with a VM).
const HOTPLUG_COMMANDS: &[&str] = &[
    "blockdev-add",
    "blockdev-del",
    "device_add",
    "device_del",
    "netdev_add",
    "netdev_del",
];

pub use crate::qmp::schema::VENDOR_COMMANDS;

/// Most fds `getfd` keeps at once.
pub const MAX_NAMED_FDS: usize = 256;

/// The gateway's [`CommandHandler`].
pub struct GatewayHandler {
    core: Option<std::sync::Arc<crate::core_link::CoreLink>>,
    hotplug: Option<std::sync::Arc<Hotplug>>,
    supervisor: Option<std::sync::Arc<Supervisor>>,
    events: EventBus,
    shutdown: Mutex<Sender<Shutdown>>,
    named_fds: Mutex<HashMap<String, OwnedFd>>,
}

impl GatewayHandler {
    /// A handler emitting events on `events` and reporting `quit` on `shutdown`.
    pub fn new(events: EventBus, shutdown: Sender<Shutdown>) -> Self {
        GatewayHandler {
            core: None,
            hotplug: None,
            supervisor: None,
            events,
            shutdown: Mutex::new(shutdown),
            named_fds: Mutex::default(),
        }
    }

    /// A handler that forwards VM commands to the core over `core`.
    pub fn with_core(
        events: EventBus,
        shutdown: Sender<Shutdown>,
        core: std::sync::Arc<crate::core_link::CoreLink>,
    ) -> Self {
        GatewayHandler {
            core: Some(core),
            ..Self::new(events, shutdown)
        }
    }

    /// Serves the hotplug commands through `hotplug` and lists `supervisor`'s backends.
    pub fn with_hotplug(
        self,
        hotplug: std::sync::Arc<Hotplug>,
        supervisor: std::sync::Arc<Supervisor>,
    ) -> Self {
        GatewayHandler {
            hotplug: Some(hotplug),
            supervisor: Some(supervisor),
            ..self
        }
    }

    /// `netdev_add`: a tap by `ifname`, or by `fd`/`fds` naming a descriptor stored with
    /// `getfd` (as Kata Containers passes it). One queue pair only.
    fn netdev_add(&self, hotplug: &Hotplug, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
        if let Some(t) = args
            .get("type")
            .and_then(Value::as_str)
            .filter(|t| *t != "tap")
        {
            return Err(QmpError::generic(format!(
                "netdev type '{t}' is not supported (only tap)"
            )));
        }
        if args.get("vhost").and_then(Value::as_bool) == Some(true)
            || args.contains_key("vhostfd")
            || args.contains_key("vhostfds")
        {
            return Err(QmpError::generic(
                "vhost-net is not used: flotilla's NIC backend is the flotilla-net process",
            ));
        }
        if args
            .get("queues")
            .and_then(Value::as_u64)
            .is_some_and(|q| q != 1)
        {
            return Err(QmpError::generic("only queues=1 is supported"));
        }
        let named = ["fd", "fds"]
            .iter()
            .find_map(|k| args.get(*k).and_then(Value::as_str));
        let source = match (args.get("ifname").and_then(Value::as_str), named) {
            (Some(name), None) => TapSource::Ifname(name.to_string()),
            (None, Some(name)) if name.contains(':') => {
                return Err(QmpError::generic(
                    "fds with several descriptors (multi-queue) is not supported",
                ))
            }
            (None, Some(name)) => TapSource::Fd(self.take_named_fd(name).ok_or_else(|| {
                QmpError::generic(format!(
                    "no descriptor named '{name}' (pass it with getfd first)"
                ))
            })?),
            _ => {
                return Err(QmpError::generic(
                    "netdev_add needs exactly one of 'ifname' and 'fd'/'fds'",
                ))
            }
        };
        hotplug.netdev_add(id, source)
    }

    fn fds(&self) -> std::sync::MutexGuard<'_, HashMap<String, OwnedFd>> {
        self.named_fds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the fd a client stored with `getfd` under `name`.
    pub fn take_named_fd(&self, name: &str) -> Option<OwnedFd> {
        self.fds().remove(name)
    }

    fn getfd(&self, args: &Map<String, Value>, client: &ClientCtx) -> Result<Value, QmpError> {
        let name = args
            .get("fdname")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::generic(
                "Parameter 'fdname' expects a name not starting with a digit",
            ));
        }
        let fd = client
            .take_fd()
            .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
        let mut fds = self.fds();
        if !fds.contains_key(name) && fds.len() >= MAX_NAMED_FDS {
            return Err(QmpError::generic(format!(
                "too many named fds (at most {MAX_NAMED_FDS})"
            )));
        }
        // Reusing a name closes the fd it held, as in QEMU.
        fds.insert(name.to_string(), fd);
        log::info!("getfd: client {} stored fd '{name}'", client.id());
        Ok(json!({}))
    }

    /// Trace points live in both processes: the gateway's are switched here, the core's in
    /// the core, and `trace-get-state` lists both.
    fn trace_state(
        &self,
        name: &str,
        args: Map<String, Value>,
        client: &ClientCtx,
    ) -> Result<Value, QmpError> {
        let pattern = args
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let ours = if name == "trace-set-state" {
            let on = args.get("enable").and_then(Value::as_bool).unwrap_or(false);
            trace::set_state(trace::GATEWAY_POINTS, &pattern, on);
            json!({})
        } else {
            let list: Vec<Value> = trace::states(trace::GATEWAY_POINTS, &pattern)
                .into_iter()
                .map(|(n, on)| json!({"name": n, "state": if on { "enabled" } else { "disabled" }}))
                .collect();
            Value::Array(list)
        };
        let Some(core) = &self.core else {
            return Ok(ours);
        };
        let theirs = core.request(name, args, |queued| client.defer(queued))?;
        Ok(match (ours, theirs) {
            (Value::Array(mut a), Value::Array(b)) => {
                a.extend(b);
                Value::Array(a)
            }
            (ours, _) => ours,
        })
    }

    /// The core's slot of every device the gateway knows, by device id: disks and NICs from
    /// the hotplug state (cold-plugged ones are registered there at start-up, hot-plugged ones
    /// by `device_add`), and every supervised backend (which adds the balloon).
    fn device_slots(&self) -> BTreeMap<String, String> {
        let mut slots: BTreeMap<String, String> = self
            .supervisor
            .iter()
            .flat_map(|s| s.list())
            .map(|b| (b.id, b.slot))
            .collect();
        slots.extend(self.hotplug.iter().flat_map(|h| h.devices()));
        slots
    }

    /// `x-flotilla-query-virtqueues`: maps the device id to the core's slot and asks the core
    /// for a snapshot of its rings (`x-query-virtqueues`), adding the id to the reply.
    fn query_virtqueues(
        &self,
        args: &Map<String, Value>,
        client: &ClientCtx,
    ) -> Result<Value, QmpError> {
        const NAME: &str = "x-flotilla-query-virtqueues";
        let Some(core) = &self.core else {
            return Err(QmpError::generic(format!("{NAME} needs a running VM")));
        };
        let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
        let slots = self.device_slots();
        let Some(slot) = slots.get(id) else {
            let known = if slots.is_empty() {
                "this VM has no devices".to_string()
            } else {
                let ids: Vec<&str> = slots.keys().map(String::as_str).collect();
                format!("known devices: {}", ids.join(", "))
            };
            return Err(QmpError::generic(format!(
                "Device '{id}' not found: the gateway has no record of a device with that id ({known})"
            )));
        };
        let mut request = Map::new();
        request.insert("slot".into(), json!(slot));
        let mut reply =
            core.request("x-query-virtqueues", request, |queued| client.defer(queued))?;
        if let Some(obj) = reply.as_object_mut() {
            obj.insert("id".into(), json!(id));
        }
        Ok(reply)
    }

    fn quit(&self, client: &ClientCtx) -> Result<Value, QmpError> {
        let events = self.events.clone();
        let shutdown = self
            .shutdown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        client.defer(move || {
            events.emit(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"}),
            );
            if shutdown.send(Shutdown::Quit).is_err() {
                log::warn!("quit: nobody waits for the shutdown request");
            }
        });
        Ok(json!({}))
    }
}

impl CommandHandler for GatewayHandler {
    fn commands(&self) -> Vec<CommandSpec> {
        let mut commands = STRATOVIRT_COMMANDS.to_vec();
        commands.extend_from_slice(VENDOR_COMMANDS);
        commands
    }

    fn execute(
        &self,
        name: &str,
        args: Map<String, Value>,
        client: ClientCtx,
    ) -> Result<Value, QmpError> {
        vmm::trace_event!(trace::QMP_COMMAND, "client {} {name}", client.id());
        if name == "trace-get-state" || name == "trace-set-state" {
            return self.trace_state(name, args, &client);
        }
        if let Some(core) = self.core.as_ref().filter(|_| CORE_COMMANDS.contains(&name)) {
            // `quit` too: the core answers, emits SHUTDOWN and exits, and the gateway follows
            // it out with its status.
            return core.request(name, args, |queued| client.defer(queued));
        }
        if let Some(hotplug) = &self.hotplug {
            match name {
                "blockdev-add" => return hotplug.blockdev_add(&args),
                "blockdev-del" => return hotplug.blockdev_del(&args),
                "device_add" => return hotplug.device_add(&args),
                "device_del" => return hotplug.device_del(&args),
                "netdev_add" => return self.netdev_add(hotplug, &args),
                "netdev_del" => {
                    let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
                    return hotplug.netdev_del(id);
                }
                _ => {}
            }
        }
        match name {
            "getfd" => self.getfd(&args, &client),
            "quit" => self.quit(&client),
            "flotilla-query-backends" => Ok(self
                .supervisor
                .as_ref()
                .map_or_else(|| json!([]), |s| s.query())),
            "x-flotilla-query-virtqueues" => self.query_virtqueues(&args, &client),
            _ if self.core.is_none()
                && (CORE_COMMANDS.contains(&name) || HOTPLUG_COMMANDS.contains(&name)) =>
            {
                Err(QmpError::generic(format!("{name} needs a running VM")))
            }
            _ => Err(QmpError::generic(format!("not yet implemented: {name}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::Peer;
    use std::os::fd::AsRawFd;

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test arguments are objects"),
        }
    }

    #[test]
    fn getfd_stores_named_fds() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let h = GatewayHandler::new(EventBus::new(), tx);
        let ctx = ClientCtx::new(1, Peer::Unix);
        let e = h
            .execute("getfd", args(json!({"fdname": "tap0"})), ctx.clone())
            .unwrap_err();
        assert_eq!(e.desc, "No file descriptor supplied via SCM_RIGHTS");
        let (r, w) = nix::unistd::pipe().unwrap();
        let raw = r.as_raw_fd();
        ctx.push_fds(vec![w, r]);
        assert_eq!(
            h.execute("getfd", args(json!({"fdname": "tap0"})), ctx.clone())
                .unwrap(),
            json!({})
        );
        let e = h
            .execute("getfd", args(json!({"fdname": "0x"})), ctx.clone())
            .unwrap_err();
        assert!(e.desc.contains("not starting with a digit"));
        assert_eq!(h.take_named_fd("tap0").map(|f| f.as_raw_fd()), Some(raw));
        assert!(h.take_named_fd("tap0").is_none());
    }

    #[test]
    fn quit_after_reply_and_vm_commands_refused() {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = GatewayHandler::new(EventBus::new(), tx);
        let ctx = ClientCtx::new(1, Peer::Unix);
        assert_eq!(
            h.execute("quit", Map::new(), ctx.clone()).unwrap(),
            json!({})
        );
        assert!(rx.try_recv().is_err(), "nothing before the reply is queued");
        ctx.run_deferred();
        assert_eq!(rx.try_recv(), Ok(Shutdown::Quit));
        let e = h.execute("stop", Map::new(), ctx).unwrap_err();
        assert_eq!(e.desc, "stop needs a running VM");
        let e = h.execute("query-block", Map::new(), ClientCtx::new(2, Peer::Unix));
        assert_eq!(e.unwrap_err().desc, "not yet implemented: query-block");
        assert!(h.commands().iter().any(|c| c.name == "blockdev-add"));
    }

    /// A core that answers `x-query-virtqueues` for `blk2`, `net1` and `balloon0` (in the
    /// real core's shape, abridged), refuses others as the core does, and reports every slot
    /// it was asked about.
    fn fake_core() -> (
        std::sync::Arc<crate::core_link::CoreLink>,
        std::sync::mpsc::Receiver<String>,
    ) {
        use std::io::{BufRead, Write};
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (asked_tx, asked) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut writer = theirs.try_clone().unwrap();
            for line in std::io::BufReader::new(theirs).lines() {
                let req: Value = serde_json::from_str(&line.unwrap()).unwrap();
                assert_eq!(req["execute"], "x-query-virtqueues");
                let slot = req["arguments"]["slot"].as_str().unwrap().to_string();
                let reply = match slot.as_str() {
                    "blk2" | "net1" | "balloon0" => json!({"return": {
                        "slot": slot, "state": "attached", "activated": true,
                        "queues": [{"index": 0, "ready": false}]}, "id": req["id"]}),
                    _ => json!({"error": {"class": "GenericError",
                        "desc": format!("no device slot '{slot}'")}, "id": req["id"]}),
                };
                asked_tx.send(slot).unwrap();
                writer.write_all(format!("{reply}\n").as_bytes()).unwrap();
            }
        });
        let link = crate::core_link::CoreLink::start(ours, EventBus::new()).unwrap();
        (link, asked)
    }

    struct NoCore;
    impl crate::supervisor::CoreOps for NoCore {
        fn attach(&self, _: &str, _: &std::os::unix::net::UnixStream) -> Result<(), String> {
            Ok(())
        }
        fn detach(&self, _: &str, _: bool) -> Result<(), String> {
            Ok(())
        }
    }

    struct NoEvents;
    impl crate::supervisor::EventSink for NoEvents {
        fn emit(&self, _: &str, _: Value) {}
    }

    /// Stops the fixture's backend process whatever the test's outcome.
    struct StopAll(std::sync::Arc<Supervisor>);
    impl Drop for StopAll {
        fn drop(&mut self) {
            self.0.shutdown();
        }
    }

    #[test]
    fn virtqueues_of_cold_plugged_devices_by_id() {
        let (link, asked) = fake_core();
        let (tx, _rx) = std::sync::mpsc::channel();
        let sup = Supervisor::new(std::sync::Arc::new(NoCore), std::sync::Arc::new(NoEvents));
        let _stop = StopAll(sup.clone());
        let hotplug = std::sync::Arc::new(Hotplug::new(
            sup.clone(),
            std::sync::Arc::new(NoCore),
            EventBus::new(),
            "/bin/false".into(),
            "/bin/false".into(),
        ));
        // As the gateway adopts a VM's cold-plugged devices at start-up (main.rs): disks and
        // NICs in the hotplug state, the balloon only under the supervisor.
        let null = || std::fs::File::open("/dev/null").unwrap();
        hotplug.register_cold_disk("disk0", "drive0", 2, Default::default(), null());
        hotplug.register_cold_nic("net0", "netdev0", 1, null().into());
        sup.start(
            "balloon0",
            "virtio-balloon-device",
            "balloon0",
            crate::supervisor::backend::BackendSpec {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), "exec sleep 60".into()],
                fds: Vec::new(),
            },
        )
        .unwrap();
        let h = GatewayHandler::with_core(EventBus::new(), tx, link).with_hotplug(hotplug, sup);
        let query = |id: &str| {
            let ctx = ClientCtx::new(1, Peer::Unix);
            let r = h.execute(
                "x-flotilla-query-virtqueues",
                args(json!({ "id": id })),
                ctx.clone(),
            );
            ctx.run_deferred();
            r
        };
        for (id, slot) in [
            ("disk0", "blk2"),
            ("net0", "net1"),
            ("balloon0", "balloon0"),
        ] {
            let r = query(id).unwrap();
            assert_eq!(asked.try_recv().as_deref(), Ok(slot));
            assert_eq!(
                (r["id"].as_str(), r["slot"].as_str()),
                (Some(id), Some(slot))
            );
            assert_eq!(r["queues"][0], json!({"index": 0, "ready": false}));
        }
        let e = query("disk9").unwrap_err();
        assert_eq!(e.class, crate::qmp::ErrorClass::GenericError);
        assert_eq!(
            e.desc,
            "Device 'disk9' not found: the gateway has no record of a device with that id (known devices: balloon0, disk0, net0)"
        );
        assert!(asked.try_recv().is_err(), "the core was not asked");
        assert!(h
            .commands()
            .iter()
            .any(|c| c.name == "x-flotilla-query-virtqueues"));
    }

    #[test]
    fn virtqueues_without_devices_or_a_vm() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let ctx = ClientCtx::new(1, Peer::Unix);
        let no_vm = GatewayHandler::new(EventBus::new(), tx.clone());
        let e = no_vm
            .execute(
                "x-flotilla-query-virtqueues",
                args(json!({"id": "disk0"})),
                ctx.clone(),
            )
            .unwrap_err();
        assert_eq!(e.desc, "x-flotilla-query-virtqueues needs a running VM");
        let (link, asked) = fake_core();
        let bare = GatewayHandler::with_core(EventBus::new(), tx, link);
        let e = bare
            .execute(
                "x-flotilla-query-virtqueues",
                args(json!({"id": "disk0"})),
                ctx,
            )
            .unwrap_err();
        assert_eq!(
            e.desc,
            "Device 'disk0' not found: the gateway has no record of a device with that id (this VM has no devices)"
        );
        assert!(asked.try_recv().is_err());
    }
}
