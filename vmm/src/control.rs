//! The core's end of the control socket (DESIGN.md "Control socket"): JSON lines in both
//! directions, QMP-shaped, so the gateway forwards VM commands (`stop`, `cont`,
//! `query-status`, ...) untouched and relays the core's events to QMP clients, adding the
//! timestamps. The gateway is trusted, but its input is still validated: a malformed line
//! gets an error reply and changes nothing.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{json, Map, Value};

use crate::builder::VmHandle;
use crate::exit::VmExit;
use crate::hotplug::{SlotQueues, SlotStatus};
use crate::trace;
use crate::trace_event;

/// Longest control line accepted; anything longer is answered with an error and skipped.
pub const MAX_LINE: usize = 1 << 20;

/// What the control channel needs from the VM.
pub trait VmControl: Send + Sync {
    /// Stops all vCPUs.
    fn pause(&self) -> Result<(), String>;
    /// Resumes all vCPUs.
    fn resume(&self);
    /// Whether the vCPUs are paused.
    fn is_paused(&self) -> bool;
    /// OS thread id per vCPU.
    fn vcpu_thread_ids(&self) -> Vec<i32>;
    /// Ends the VMM (QMP `quit`).
    fn quit(&self);
    /// Presses the ACPI power button (QMP `system_powerdown`).
    fn powerdown(&self) -> Result<(), String>;
    /// Reboots the machine in place (QMP `system_reset`).
    fn reset(&self) -> Result<(), String>;
    /// Reads the 64-bit value at a guest-physical address (QMP `query-mem-gpa`).
    fn read_gpa(&self, gpa: u64) -> Result<u64, String>;
    /// Attaches the backend connected over `stream` to a device slot.
    fn attach_backend(&self, _slot: &str, _stream: UnixStream) -> Result<(), String> {
        Err("this VM has no device slots".into())
    }
    /// Drops a slot's backend (`unplug`: empty the slot; else wait for a new backend).
    fn detach_backend(&self, _slot: &str, _unplug: bool) -> Result<(), String> {
        Err("this VM has no device slots".into())
    }
    /// Every device slot and its state.
    fn slots(&self) -> Vec<SlotStatus> {
        Vec::new()
    }
    /// A snapshot of a slot's virtqueues (`x-query-virtqueues`, for diagnosing a stall).
    fn virtqueues(&self, _slot: &str) -> Result<SlotQueues, String> {
        Err("this VM has no device slots".into())
    }
    /// QMP `balloon`: leave the guest `value` bytes.
    fn set_balloon(&self, _value: u64) -> Result<(), String> {
        Err("No balloon device has been activated".into())
    }
    /// QMP `query-balloon`: the bytes the guest has.
    fn query_balloon(&self) -> Result<u64, String> {
        Err("No balloon device has been activated".into())
    }
}

impl VmControl for VmHandle {
    fn pause(&self) -> Result<(), String> {
        VmHandle::pause(self)
    }
    fn resume(&self) {
        VmHandle::resume(self)
    }
    fn is_paused(&self) -> bool {
        VmHandle::is_paused(self)
    }
    fn vcpu_thread_ids(&self) -> Vec<i32> {
        VmHandle::vcpu_thread_ids(self)
    }
    fn quit(&self) {
        self.end(VmExit::Quit)
    }
    fn powerdown(&self) -> Result<(), String> {
        VmHandle::powerdown(self)
    }
    fn reset(&self) -> Result<(), String> {
        VmHandle::reset(self)
    }
    fn read_gpa(&self, gpa: u64) -> Result<u64, String> {
        VmHandle::read_gpa(self, gpa)
    }
    fn attach_backend(&self, slot: &str, stream: UnixStream) -> Result<(), String> {
        VmHandle::attach_backend(self, slot, stream)
    }
    fn detach_backend(&self, slot: &str, unplug: bool) -> Result<(), String> {
        VmHandle::detach_backend(self, slot, unplug)
    }
    fn slots(&self) -> Vec<SlotStatus> {
        VmHandle::slots(self)
    }
    fn virtqueues(&self, slot: &str) -> Result<SlotQueues, String> {
        VmHandle::virtqueues(self, slot)
    }
    fn set_balloon(&self, value: u64) -> Result<(), String> {
        VmHandle::set_balloon(self, value)
    }
    fn query_balloon(&self) -> Result<u64, String> {
        VmHandle::query_balloon(self)
    }
}

/// Descriptors that arrived on the control socket (SCM_RIGHTS), oldest first. A request that
/// carries one (`x-attach-backend`) was sent together with it, so requests and descriptors
/// pair up in order.
#[derive(Default)]
pub struct ReceivedFds(Mutex<VecDeque<OwnedFd>>);

impl ReceivedFds {
    fn push(&self, fd: OwnedFd) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(fd);
    }

    fn take(&self) -> Option<OwnedFd> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }
}

/// The control socket's reading half: a byte stream like any other, except that descriptors
/// passed along with the bytes are kept in a [`ReceivedFds`] instead of being dropped.
struct FdReader {
    stream: UnixStream,
    fds: Arc<ReceivedFds>,
}

/// Most descriptors accepted with one read.
const MAX_FDS_PER_READ: usize = 8;

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut cmsg = [0u64; 2 + MAX_FDS_PER_READ / 2 + 2];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; the pointers set below refer to live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        let n = loop {
            // SAFETY: recvmsg writes at most the lengths msg describes into buf and cmsg.
            let n =
                unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        // SAFETY: the CMSG macros walk the control buffer recvmsg filled, within
        // msg_controllen; each SCM_RIGHTS payload is an array of descriptors now ours.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let count = ((*c).cmsg_len as usize - (data as usize - c as usize))
                        / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        self.fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            log::warn!("control: descriptors were dropped (more than {MAX_FDS_PER_READ} at once)");
        }
        Ok(n)
    }
}

/// The writing half of the control socket, shared by the control thread (replies, STOP and
/// RESUME) and the main thread (SHUTDOWN). One line per write, under a lock, so messages
/// never interleave.
#[derive(Clone)]
pub struct ControlSender(Arc<Mutex<UnixStream>>);

impl ControlSender {
    /// Wraps the socket.
    pub fn new(stream: UnixStream) -> Self {
        ControlSender(Arc::new(Mutex::new(stream)))
    }

    /// Sends one JSON message.
    pub fn send(&self, message: &Value) -> std::io::Result<()> {
        let mut line = message.to_string();
        line.push('\n');
        let mut stream = self.0.lock().unwrap_or_else(|p| p.into_inner());
        stream.write_all(line.as_bytes())
    }

    /// Sends an event (the gateway adds the QMP timestamp).
    pub fn event(&self, name: &str, data: Value) {
        if let Err(e) = self.send(&json!({ "event": name, "data": data })) {
            log::warn!("control: cannot send event {name}: {e}");
        }
    }
}

/// The SHUTDOWN event data for how the VM ended.
pub fn shutdown_event(reason: &VmExit) -> Value {
    let (guest, why) = match reason {
        VmExit::PowerOff => (true, "guest-shutdown"),
        VmExit::Reset => (true, "guest-reset"),
        VmExit::Quit => (false, "host-qmp-quit"),
        VmExit::Error(_) => (false, "host-error"),
    };
    json!({ "guest": guest, "reason": why })
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({ "error": { "class": class, "desc": desc.into() } })
}

/// Executes one command line that carries no descriptor and returns the reply.
pub fn handle_line(vm: &dyn VmControl, events: &ControlSender, line: &str) -> Value {
    handle_request(vm, events, &ReceivedFds::default(), line)
}

/// Executes one command line and returns the reply (with `id` echoed). A command that takes
/// a descriptor takes the oldest one in `fds`, even when it then fails, so the pairing of
/// requests and descriptors survives errors.
pub fn handle_request(
    vm: &dyn VmControl,
    events: &ControlSender,
    fds: &ReceivedFds,
    line: &str,
) -> Value {
    let request: Map<String, Value> = match serde_json::from_str(line) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return error("GenericError", "expected a JSON object"),
        Err(e) => return error("GenericError", format!("JSON parse error: {e}")),
    };
    let fd = (request.get("execute").and_then(Value::as_str) == Some("x-attach-backend"))
        .then(|| fds.take())
        .flatten();
    let mut reply = execute(vm, events, &request, fd);
    if let (Some(id), Some(obj)) = (request.get("id"), reply.as_object_mut()) {
        obj.insert("id".into(), id.clone());
    }
    reply
}

fn execute(
    vm: &dyn VmControl,
    events: &ControlSender,
    request: &Map<String, Value>,
    fd: Option<OwnedFd>,
) -> Value {
    let Some(command) = request.get("execute").and_then(Value::as_str) else {
        return error("GenericError", "missing 'execute' (a command name string)");
    };
    trace_event!(trace::CONTROL_COMMAND, "{command}");
    let args = match request.get("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a.clone(),
        Some(_) => return error("GenericError", "'arguments' must be an object"),
    };
    if let Some(key) = request
        .keys()
        .find(|k| !["execute", "arguments", "id"].contains(&k.as_str()))
    {
        return error("GenericError", format!("unexpected member '{key}'"));
    }
    let no_args = |reply: Value| match args.keys().next() {
        Some(k) => error(
            "GenericError",
            format!("'{command}' takes no argument '{k}'"),
        ),
        None => reply,
    };
    match command {
        "query-status" => no_args(if vm.is_paused() {
            json!({ "return": { "running": false, "singlestep": false, "status": "paused" } })
        } else {
            json!({ "return": { "running": true, "singlestep": false, "status": "running" } })
        }),
        "stop" => {
            if !args.is_empty() {
                return no_args(Value::Null);
            }
            if vm.is_paused() {
                return json!({ "return": {} });
            }
            match vm.pause() {
                Ok(()) => {
                    events.event("STOP", json!({}));
                    json!({ "return": {} })
                }
                Err(e) => {
                    // A half-stopped VM is worse than a running one: undo.
                    vm.resume();
                    error("GenericError", format!("cannot stop the VM: {e}"))
                }
            }
        }
        "cont" => {
            if !args.is_empty() {
                return no_args(Value::Null);
            }
            if vm.is_paused() {
                vm.resume();
                events.event("RESUME", json!({}));
            }
            json!({ "return": {} })
        }
        "quit" => {
            if !args.is_empty() {
                return no_args(Value::Null);
            }
            // The VM ends only once this reply is on the wire (see `spawn`): a client must see
            // the reply to `quit` before the SHUTDOWN event.
            json!({ "return": {} })
        }
        "system_powerdown" => {
            if !args.is_empty() {
                return no_args(Value::Null);
            }
            match vm.powerdown() {
                Ok(()) => {
                    events.event("POWERDOWN", json!({}));
                    json!({ "return": {} })
                }
                Err(e) => error(
                    "GenericError",
                    format!("cannot press the power button: {e}"),
                ),
            }
        }
        "system_reset" => {
            if !args.is_empty() {
                return no_args(Value::Null);
            }
            match vm.reset() {
                Ok(()) => {
                    events.event("RESET", json!({ "guest": true }));
                    json!({ "return": {} })
                }
                Err(e) => error("GenericError", e),
            }
        }
        "query-mem-gpa" => {
            let Some(text) = args.get("gpa").and_then(Value::as_str) else {
                return error(
                    "GenericError",
                    "Invalid parameter type for 'gpa', expected: string",
                );
            };
            let digits = text.strip_prefix("0x").unwrap_or(text);
            match u64::from_str_radix(digits, 16) {
                Ok(gpa) => match vm.read_gpa(gpa) {
                    Ok(value) => json!({ "return": format!("{value:X}") }),
                    Err(e) => error("GenericError", e),
                },
                Err(_) => error(
                    "GenericError",
                    format!("'{text}' is not a hexadecimal address"),
                ),
            }
        }
        "trace-get-state" => {
            let Some(pattern) = args.get("name").and_then(Value::as_str) else {
                return error(
                    "GenericError",
                    "Invalid parameter type for 'name', expected: string",
                );
            };
            let list: Vec<Value> = trace::states(trace::CORE_POINTS, pattern)
                .into_iter()
                .map(|(name, on)| json!({ "name": name, "state": if on { "enabled" } else { "disabled" } }))
                .collect();
            json!({ "return": list })
        }
        "trace-set-state" => {
            let (Some(pattern), Some(on)) = (
                args.get("name").and_then(Value::as_str),
                args.get("enable").and_then(Value::as_bool),
            ) else {
                return error(
                    "GenericError",
                    "trace-set-state needs 'name' (string) and 'enable' (bool)",
                );
            };
            trace::set_state(trace::CORE_POINTS, pattern, on);
            json!({ "return": {} })
        }
        "x-attach-backend" => {
            let Some(slot) = args.get("slot").and_then(Value::as_str) else {
                return error("GenericError", "x-attach-backend needs 'slot' (string)");
            };
            let Some(fd) = fd else {
                return error(
                    "GenericError",
                    "x-attach-backend: no socket was passed with the request",
                );
            };
            match vm.attach_backend(slot, UnixStream::from(fd)) {
                Ok(()) => json!({ "return": {} }),
                Err(e) => error("GenericError", e),
            }
        }
        "x-detach-backend" => {
            let (Some(slot), Some(unplug)) = (
                args.get("slot").and_then(Value::as_str),
                args.get("unplug").and_then(Value::as_bool),
            ) else {
                return error(
                    "GenericError",
                    "x-detach-backend needs 'slot' (string) and 'unplug' (bool)",
                );
            };
            match vm.detach_backend(slot, unplug) {
                Ok(()) => json!({ "return": {} }),
                Err(e) => error("GenericError", e),
            }
        }
        "balloon" => {
            let Some(value) = args.get("value").and_then(Value::as_u64) else {
                return error(
                    "GenericError",
                    "Invalid parameter type for 'value', expected: integer",
                );
            };
            match vm.set_balloon(value) {
                Ok(()) => json!({ "return": {} }),
                Err(e) => error("DeviceNotActive", e),
            }
        }
        "query-balloon" => match vm.query_balloon() {
            Ok(actual) => no_args(json!({ "return": { "actual": actual } })),
            Err(e) => error("DeviceNotActive", e),
        },
        "x-query-slots" => no_args(json!({ "return": vm
            .slots()
            .into_iter()
            .map(|s| json!({ "slot": s.name, "kind": s.kind.prefix(), "state": s.state.as_str() }))
            .collect::<Vec<_>>() })),
        "x-query-virtqueues" => {
            let Some(slot) = args.get("slot").and_then(Value::as_str) else {
                return error("GenericError", "x-query-virtqueues needs 'slot' (string)");
            };
            match vm.virtqueues(slot) {
                Ok(queues) => json!({ "return": virtqueues_json(&queues) }),
                Err(e) => error("GenericError", e),
            }
        }
        "query-cpus" => no_args(json!({ "return": query_cpus(vm) })),
        "query-hotpluggable-cpus" => no_args(json!({ "return": hotpluggable_cpus(vm) })),
        other => error(
            "CommandNotFound",
            format!("The command {other} has not been found"),
        ),
    }
}

/// The reply to `x-query-virtqueues` (the gateway adds the device id and relays it as QMP
/// `x-flotilla-query-virtqueues`, docs/qmp.md). Fields read from guest memory are `null` where
/// the ring lies outside RAM; queues that are not ready carry no ring fields at all.
fn virtqueues_json(q: &SlotQueues) -> Value {
    let queues: Vec<Value> = q
        .status
        .queues
        .iter()
        .map(|queue| match &queue.ready {
            None => json!({ "index": queue.index, "ready": false }),
            Some(r) => json!({
                "index": queue.index,
                "ready": true,
                "size": r.config.size,
                "desc": r.config.desc_table,
                "avail": r.config.avail_ring,
                "used": r.config.used_ring,
                "avail-flags": r.rings.avail_flags,
                "avail-idx": r.rings.avail_idx,
                "used-event": r.rings.used_event,
                "used-flags": r.rings.used_flags,
                "used-idx": r.rings.used_idx,
                "avail-event": r.rings.avail_event,
                "inflight": r.rings.inflight(),
            }),
        })
        .collect();
    json!({
        "slot": q.name,
        "kind": q.kind.prefix(),
        "state": q.status.state.as_str(),
        "activated": q.status.activated,
        "event-idx": q.status.event_idx,
        "interrupt-status": q.status.interrupt_status,
        "queues": queues,
    })
}

/// StratoVirt numbers each vCPU as its own socket (`-smp N` = N sockets of one core).
fn cpu_props(index: usize) -> Value {
    json!({ "core-id": 0, "socket-id": index, "thread-id": 0 })
}

fn query_cpus(vm: &dyn VmControl) -> Value {
    let cpus: Vec<Value> = vm
        .vcpu_thread_ids()
        .iter()
        .enumerate()
        .map(|(i, tid)| {
            json!({
                "CPU": i, "arch": "x86", "current": true, "halted": false,
                "props": cpu_props(i),
                "qom_path": format!("/machine/unattached/device[{i}]"),
                "thread_id": tid,
            })
        })
        .collect();
    Value::Array(cpus)
}

fn hotpluggable_cpus(vm: &dyn VmControl) -> Value {
    let cpus: Vec<Value> = (0..vm.vcpu_thread_ids().len())
        .map(|i| {
            json!({
                "props": cpu_props(i),
                "qom-path": format!("/machine/unattached/device[{i}]"),
                "type": "host-x86-cpu",
                "vcpus-count": 1,
            })
        })
        .collect();
    Value::Array(cpus)
}

/// Reads one line of at most [`MAX_LINE`] bytes. `Ok(None)` at end of stream; an overlong
/// line is consumed and reported as `Err(len)` so the caller can answer it.
fn read_bounded_line(reader: &mut impl BufRead) -> std::io::Result<Option<Result<String, usize>>> {
    let mut buf = Vec::new();
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE {
        // Skip the rest of the line.
        let mut skipped = buf.len();
        loop {
            let mut rest = Vec::new();
            let m = reader
                .by_ref()
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut rest)?;
            skipped += m;
            if m == 0 || rest.last() == Some(&b'\n') {
                return Ok(Some(Err(skipped)));
            }
        }
    }
    Ok(Some(Ok(String::from_utf8_lossy(&buf).trim().to_string())))
}

fn is_quit(line: &str) -> bool {
    serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v.get("execute").cloned())
        == Some(json!("quit"))
}

/// Serves the control socket on its own thread. When the gateway closes the socket the VM
/// ends: the core must not outlive the process that supervises it.
pub fn spawn(
    stream: UnixStream,
    vm: Arc<dyn VmControl>,
    on_close: impl FnOnce() + Send + 'static,
) -> std::io::Result<(ControlSender, JoinHandle<()>)> {
    let sender = ControlSender::new(stream.try_clone()?);
    let replies = sender.clone();
    let fds = Arc::new(ReceivedFds::default());
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            crate::jail::enter_thread(crate::jail::Role::Control);
            let mut reader = BufReader::new(FdReader {
                stream,
                fds: fds.clone(),
            });
            loop {
                let mut quit = false;
                let reply = match read_bounded_line(&mut reader) {
                    Ok(None) => break,
                    Ok(Some(Ok(line))) if line.is_empty() => continue,
                    Ok(Some(Ok(line))) => {
                        let reply = handle_request(&*vm, &replies, &fds, &line);
                        quit = reply.get("return").is_some() && is_quit(&line);
                        reply
                    }
                    Ok(Some(Err(len))) => error(
                        "GenericError",
                        format!("line of {len} bytes exceeds {MAX_LINE}"),
                    ),
                    Err(e) => {
                        log::error!("control: read failed: {e}");
                        break;
                    }
                };
                if let Err(e) = replies.send(&reply) {
                    log::error!("control: write failed: {e}");
                    break;
                }
                if quit {
                    vm.quit();
                    return;
                }
            }
            log::warn!("control: connection closed");
            on_close();
        })?;
    Ok((sender, thread))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    #[derive(Default)]
    struct FakeVm {
        paused: AtomicBool,
        quits: AtomicU32,
        fail_pause: bool,
        attached: Mutex<Vec<(String, UnixStream)>>,
    }

    impl VmControl for FakeVm {
        fn pause(&self) -> Result<(), String> {
            if self.fail_pause {
                return Err("vCPU 1 stuck".into());
            }
            self.paused.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn resume(&self) {
            self.paused.store(false, Ordering::SeqCst);
        }
        fn is_paused(&self) -> bool {
            self.paused.load(Ordering::SeqCst)
        }
        fn vcpu_thread_ids(&self) -> Vec<i32> {
            vec![100, 101]
        }
        fn quit(&self) {
            self.quits.fetch_add(1, Ordering::SeqCst);
        }
        fn powerdown(&self) -> Result<(), String> {
            self.quits.fetch_add(10, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&self) -> Result<(), String> {
            self.quits.fetch_add(100, Ordering::SeqCst);
            Ok(())
        }
        fn read_gpa(&self, gpa: u64) -> Result<u64, String> {
            match gpa {
                0x1000 => Ok(0xb900_0001),
                _ => Err(format!("{gpa:#x} is outside guest memory")),
            }
        }
        fn attach_backend(&self, slot: &str, stream: UnixStream) -> Result<(), String> {
            if slot != "blk1" {
                return Err(format!("no device slot '{slot}'"));
            }
            self.attached.lock().unwrap().push((slot.into(), stream));
            Ok(())
        }
        fn virtqueues(&self, slot: &str) -> Result<SlotQueues, String> {
            use crate::hotplug::SlotKind;
            use crate::transport::QueueConfig;
            use crate::vhost_user::frontend::BackendState;
            use crate::vhost_user::virtqueues::*;
            if slot != "blk1" {
                return Err(format!("no device slot '{slot}'"));
            }
            let config = QueueConfig {
                max_size: 256,
                size: 256,
                ready: true,
                desc_table: 0x7f00_0000,
                avail_ring: 0x7f00_1000,
                used_ring: 0x7f00_2000,
            };
            let rings = RingIndices {
                avail_flags: Some(0),
                avail_idx: Some(2),
                used_event: None,
                used_flags: Some(1),
                used_idx: Some(65535),
                avail_event: None,
            };
            Ok(SlotQueues {
                name: slot.into(),
                kind: SlotKind::Blk,
                status: VirtqueueStatus {
                    state: BackendState::Waiting,
                    activated: true,
                    event_idx: true,
                    interrupt_status: Some(1),
                    queues: vec![
                        QueueStatus {
                            index: 0,
                            ready: Some(ReadyQueue { config, rings }),
                        },
                        QueueStatus {
                            index: 1,
                            ready: None,
                        },
                    ],
                },
            })
        }
    }

    /// Sends `line` with `fd` attached, as the gateway's core link does.
    fn send_with_fd(sock: &UnixStream, line: &str, fd: RawFd) {
        let mut cmsg = [0u64; 4];
        let mut iov = libc::iovec {
            iov_base: line.as_ptr() as *mut libc::c_void,
            iov_len: line.len(),
        };
        // SAFETY: plain data; the pointers refer to live buffers of this frame.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
        // SAFETY: the control buffer is large enough for one descriptor.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd);
        }
        // SAFETY: sendmsg reads the buffers msg describes.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
        assert_eq!(n as usize, line.len());
    }

    #[test]
    fn backends_arrive_with_their_requests() {
        let vm = Arc::new(FakeVm::default());
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_sender, _thread) = spawn(theirs, vm.clone(), || ()).unwrap();
        let mut reader = BufReader::new(ours.try_clone().unwrap());
        // A good attach, one for an unknown slot (its socket is consumed and dropped), one
        // without a socket, and one the core must pair with the right socket after those.
        let (a_core, mut a_backend) = UnixStream::pair().unwrap();
        let (b_core, _b_backend) = UnixStream::pair().unwrap();
        let (c_core, mut c_backend) = UnixStream::pair().unwrap();
        send_with_fd(
            &ours,
            "{\"execute\":\"x-attach-backend\",\"arguments\":{\"slot\":\"blk1\"},\"id\":1}\n",
            a_core.as_raw_fd(),
        );
        send_with_fd(
            &ours,
            "{\"execute\":\"x-attach-backend\",\"arguments\":{\"slot\":\"blk7\"},\"id\":2}\n",
            b_core.as_raw_fd(),
        );
        (&ours)
            .write_all(
                b"{\"execute\":\"x-attach-backend\",\"arguments\":{\"slot\":\"blk1\"},\"id\":3}\n",
            )
            .unwrap();
        assert_eq!(next(&mut reader), json!({"return": {}, "id": 1}));
        assert_eq!(next(&mut reader)["error"]["desc"], "no device slot 'blk7'");
        assert!(next(&mut reader)["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("no socket"));
        send_with_fd(
            &ours,
            "{\"execute\":\"x-attach-backend\",\"arguments\":{\"slot\":\"blk1\"},\"id\":4}\n",
            c_core.as_raw_fd(),
        );
        assert_eq!(next(&mut reader)["id"], 4);
        drop((a_core, b_core, c_core));
        let mut attached = vm.attached.lock().unwrap();
        assert_eq!(attached.len(), 2);
        // Each received socket is connected to the right backend.
        for ((_, stream), backend) in attached.iter_mut().zip([&mut a_backend, &mut c_backend]) {
            stream.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            backend.read_exact(&mut b).unwrap();
        }
        let r = handle_line(
            &*vm,
            &ControlSender::new(ours),
            r#"{"execute":"x-detach-backend","arguments":{"slot":"blk1"}}"#,
        );
        assert!(r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("'unplug' (bool)"));
    }

    fn channel() -> (ControlSender, BufReader<UnixStream>) {
        let (a, b) = UnixStream::pair().unwrap();
        (ControlSender::new(a), BufReader::new(b))
    }

    fn next(r: &mut BufReader<UnixStream>) -> Value {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn lifecycle_commands_and_events() {
        let vm = FakeVm::default();
        let (tx, mut events) = channel();
        let r = handle_line(&vm, &tx, r#"{"execute":"query-status","id":7}"#);
        assert_eq!(
            r,
            json!({"return":{"running":true,"singlestep":false,"status":"running"},"id":7})
        );
        assert_eq!(
            handle_line(&vm, &tx, r#"{"execute":"stop"}"#),
            json!({"return":{}})
        );
        assert_eq!(next(&mut events)["event"], "STOP");
        assert_eq!(
            handle_line(&vm, &tx, r#"{"execute":"query-status"}"#)["return"]["status"],
            "paused"
        );
        // stop twice: no second event.
        handle_line(&vm, &tx, r#"{"execute":"stop"}"#);
        assert_eq!(
            handle_line(&vm, &tx, r#"{"arguments":{},"execute":"cont","id":"x"}"#),
            json!({"return":{},"id":"x"})
        );
        assert_eq!(next(&mut events)["event"], "RESUME");
        assert_eq!(
            handle_line(&vm, &tx, r#"{"execute":"system_powerdown"}"#),
            json!({"return":{}})
        );
        assert_eq!(next(&mut events)["event"], "POWERDOWN");
        assert_eq!(
            handle_line(&vm, &tx, r#"{"execute":"system_reset"}"#),
            json!({"return":{}})
        );
        assert_eq!(
            next(&mut events),
            json!({"event":"RESET","data":{"guest":true}})
        );
        assert_eq!(
            handle_line(&vm, &tx, r#"{"execute":"quit"}"#),
            json!({"return":{}})
        );
        assert_eq!(
            vm.quits.load(Ordering::SeqCst),
            110,
            "quit happens after the reply is sent"
        );
    }

    #[test]
    fn mem_gpa_and_trace_state() {
        let vm = FakeVm::default();
        let (tx, _events) = channel();
        let r = handle_line(
            &vm,
            &tx,
            r#"{"execute":"query-mem-gpa","arguments":{"gpa":"1000"}}"#,
        );
        assert_eq!(r, json!({"return": "B9000001"}));
        let r = handle_line(
            &vm,
            &tx,
            r#"{"execute":"query-mem-gpa","arguments":{"gpa":"zz"}}"#,
        );
        assert_eq!(r["error"]["class"], "GenericError");
        let r = handle_line(
            &vm,
            &tx,
            r#"{"execute":"query-mem-gpa","arguments":{"gpa":"ffffffffff"}}"#,
        );
        assert!(r["error"]["desc"].as_str().unwrap().contains("outside"));
        let r = handle_line(
            &vm,
            &tx,
            r#"{"execute":"trace-set-state","arguments":{"name":"vhost_*","enable":true}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let r = handle_line(
            &vm,
            &tx,
            r#"{"execute":"trace-get-state","arguments":{"name":"v*"}}"#,
        );
        assert_eq!(
            r["return"],
            json!([{"name": "vcpu_exit", "state": "disabled"}, {"name": "vhost_user_message", "state": "enabled"}])
        );
        handle_line(
            &vm,
            &tx,
            r#"{"execute":"trace-set-state","arguments":{"name":"*","enable":false}}"#,
        );
        assert!(!trace::VHOST_USER_MESSAGE.enabled());
    }

    #[test]
    fn virtqueues_reply_shape() {
        let vm = FakeVm::default();
        let (tx, _events) = channel();
        let r = handle_line(
            &vm,
            &tx,
            r#"{"execute":"x-query-virtqueues","arguments":{"slot":"blk1"},"id":3}"#,
        );
        assert_eq!(
            r,
            json!({"return": {
                "slot": "blk1", "kind": "blk", "state": "waiting", "activated": true,
                "event-idx": true, "interrupt-status": 1,
                "queues": [
                    {"index": 0, "ready": true, "size": 256,
                     "desc": 0x7f00_0000u64, "avail": 0x7f00_1000u64, "used": 0x7f00_2000u64,
                     "avail-flags": 0, "avail-idx": 2, "used-event": null,
                     "used-flags": 1, "used-idx": 65535, "avail-event": null,
                     "inflight": 3},
                    {"index": 1, "ready": false}
                ]}, "id": 3})
        );
        let r = handle_line(
            &vm,
            &tx,
            r#"{"execute":"x-query-virtqueues","arguments":{"slot":"blk9"}}"#,
        );
        assert_eq!(
            r,
            json!({"error": {"class": "GenericError", "desc": "no device slot 'blk9'"}})
        );
        let r = handle_line(&vm, &tx, r#"{"execute":"x-query-virtqueues"}"#);
        assert_eq!(
            r["error"]["desc"],
            "x-query-virtqueues needs 'slot' (string)"
        );
    }

    #[test]
    fn cpus_like_stratovirt() {
        let vm = FakeVm::default();
        let (tx, _events) = channel();
        let r = handle_line(&vm, &tx, r#"{"execute":"query-cpus"}"#);
        assert_eq!(r["return"][1]["thread_id"], 101);
        assert_eq!(r["return"][1]["props"]["socket-id"], 1);
        assert_eq!(r["return"][1]["qom_path"], "/machine/unattached/device[1]");
        let r = handle_line(&vm, &tx, r#"{"execute":"query-hotpluggable-cpus"}"#);
        assert_eq!(r["return"].as_array().unwrap().len(), 2);
        assert_eq!(r["return"][0]["type"], "host-x86-cpu");
    }

    #[test]
    fn bad_input_changes_nothing() {
        let vm = FakeVm::default();
        let (tx, _events) = channel();
        for (line, class) in [
            ("not json", "GenericError"),
            ("[1,2]", "GenericError"),
            (r#"{"arguments":{}}"#, "GenericError"),
            (r#"{"execute":42}"#, "GenericError"),
            (r#"{"execute":"stop","arguments":[]}"#, "GenericError"),
            (
                r#"{"execute":"stop","arguments":{"now":true}}"#,
                "GenericError",
            ),
            (r#"{"execute":"stop","bogus":1}"#, "GenericError"),
            (r#"{"execute":"no-such-command"}"#, "CommandNotFound"),
        ] {
            let r = handle_line(&vm, &tx, line);
            assert_eq!(r["error"]["class"], class, "{line}: {r}");
            assert!(!vm.is_paused(), "{line}");
        }
    }

    #[test]
    fn failed_stop_leaves_the_vm_running() {
        let vm = FakeVm {
            fail_pause: true,
            ..Default::default()
        };
        let (tx, _events) = channel();
        let r = handle_line(&vm, &tx, r#"{"execute":"stop"}"#);
        assert!(r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("vCPU 1 stuck"));
        assert!(!vm.is_paused());
    }

    #[test]
    fn serves_a_socket_and_survives_an_overlong_line() {
        let vm: Arc<dyn VmControl> = Arc::new(FakeVm::default());
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (closed_tx, closed_rx) = std::sync::mpsc::channel();
        let (_sender, thread) = spawn(theirs, vm, move || closed_tx.send(()).unwrap()).unwrap();
        let mut writer = ours.try_clone().unwrap();
        let mut reader = BufReader::new(ours);
        let big = "x".repeat(MAX_LINE + 10);
        writer
            .write_all(format!("{big}\n{{\"execute\":\"query-status\",\"id\":1}}\n").as_bytes())
            .unwrap();
        assert!(next(&mut reader)["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("exceeds"));
        assert_eq!(next(&mut reader)["id"], 1);
        drop(writer);
        drop(reader);
        closed_rx.recv().unwrap();
        thread.join().unwrap();
        assert_eq!(
            shutdown_event(&VmExit::Quit),
            json!({"guest": false, "reason": "host-qmp-quit"})
        );
    }
}
