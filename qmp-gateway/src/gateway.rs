//! The gateway's command handler: StratoVirt's full command set, answered here when no VM
//! is needed and refused with a clear error where the core must act (until the core's
//! control socket is wired in, issue 3).
//!
//! Implemented here: `quit` (reply, `SHUTDOWN` event, then the process ends) and `getfd`
//! (the fd passed with SCM_RIGHTS is kept under its name for later commands such as
//! `netdev_add fd=NAME`). The built-ins `qmp_capabilities`, `query-version` and
//! `query-commands` are the server's.

use std::collections::HashMap;
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

/// flotilla's own commands (documented in docs/qmp.md).
pub const VENDOR_COMMANDS: &[CommandSpec] = &[CommandSpec::bare("flotilla-query-backends")];

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
}
