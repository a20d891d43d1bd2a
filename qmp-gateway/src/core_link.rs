//! The gateway's end of the control socket to the core (DESIGN.md "Control socket"): VM
//! commands go down as QMP-shaped JSON lines with our own request ids; replies come back
//! with those ids, and the core's events come up and are fanned out to every QMP client
//! (the event bus adds the QMP timestamp).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Map, Value};

use crate::qmp::protocol::ErrorClass;
use crate::qmp::{EventBus, QmpError};

/// How long a forwarded command may take before the client gets an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Who waits for the reply with a given id: gets the reply and a sender to signal once the
/// reply is queued for its client.
type Waiter = Sender<(Value, Sender<()>)>;

/// A connection to the core.
pub struct CoreLink {
    writer: Mutex<UnixStream>,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    closed: std::sync::atomic::AtomicBool,
}

impl CoreLink {
    /// Serves `stream`: a reader thread routes replies and relays events onto `events`.
    pub fn start(stream: UnixStream, events: EventBus) -> std::io::Result<Arc<CoreLink>> {
        let link = Arc::new(CoreLink {
            writer: Mutex::new(stream.try_clone()?),
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let reader_link = link.clone();
        std::thread::Builder::new()
            .name("core-link".into())
            .spawn(move || reader_link.read_loop(stream, events))?;
        Ok(link)
    }

    /// Whether the core has gone (its end of the socket closed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_loop(&self, stream: UnixStream, events: EventBus) {
        let reader = BufReader::new(stream);
        for line in reader.lines() {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    log::error!("core link: read failed: {e}");
                    break;
                }
            };
            let message: Value = match serde_json::from_str(&line) {
                Ok(m) => m,
                Err(e) => {
                    log::error!("core link: malformed line from the core ({e}): {line}");
                    continue;
                }
            };
            if let Some(name) = message.get("event").and_then(Value::as_str) {
                events.emit(
                    name,
                    message.get("data").cloned().unwrap_or_else(|| json!({})),
                );
            } else if let Some(id) = message.get("id").and_then(Value::as_u64) {
                if let Some(waiter) = self.pending().remove(&id) {
                    // Hold further messages (events) until the reply is queued for its client:
                    // a client must see the reply to a command before the events that follow
                    // it (e.g. `quit`, then SHUTDOWN). The requester may have timed out.
                    let (queued_tx, queued_rx) = channel();
                    if waiter.send((message, queued_tx)).is_ok() {
                        let _ = queued_rx.recv_timeout(Duration::from_secs(1));
                    }
                }
            } else {
                log::warn!("core link: unexpected message from the core: {line}");
            }
        }
        // Dropping the senders fails every request still waiting.
        let mut pending = self.pending();
        self.closed.store(true, Ordering::SeqCst);
        pending.clear();
        log::info!("core link: closed");
    }

    /// Executes `command` in the core and returns its result. `queued` is called with a
    /// callback to run once the reply is queued for the client (see [`ClientCtx::defer`]);
    /// events from the core wait for it.
    ///
    /// [`ClientCtx::defer`]: crate::qmp::ClientCtx::defer
    pub fn request(
        &self,
        command: &str,
        args: Map<String, Value>,
        queued: impl FnOnce(Box<dyn FnOnce() + Send>),
    ) -> Result<Value, QmpError> {
        self.request_inner(command, args, None, queued)
    }

    /// Executes a core-internal command that carries a descriptor (`x-attach-backend`: the
    /// core's end of a backend's socketpair). The descriptor travels with the request's bytes
    /// (SCM_RIGHTS), so the core pairs them in order.
    pub fn request_with_fd(
        &self,
        command: &str,
        args: Map<String, Value>,
        fd: &dyn AsRawFd,
    ) -> Result<Value, QmpError> {
        self.request_inner(command, args, Some(fd.as_raw_fd()), |done| done())
    }

    fn request_inner(
        &self,
        command: &str,
        args: Map<String, Value>,
        fd: Option<RawFd>,
        queued: impl FnOnce(Box<dyn FnOnce() + Send>),
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = channel();
        {
            let mut pending = self.pending();
            if self.closed.load(Ordering::SeqCst) {
                return Err(QmpError::generic("the VM core is gone"));
            }
            pending.insert(id, tx);
        }
        let mut line = json!({ "execute": command, "arguments": args, "id": id }).to_string();
        line.push('\n');
        let sent = {
            let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            match fd {
                None => writer.write_all(line.as_bytes()),
                Some(fd) => send_with_fd(&writer, line.as_bytes(), fd)
                    .and_then(|n| writer.write_all(&line.as_bytes()[n..])),
            }
        };
        if let Err(e) = sent {
            self.pending().remove(&id);
            return Err(QmpError::generic(format!("the VM core is gone ({e})")));
        }
        let reply = match rx.recv_timeout(REQUEST_TIMEOUT) {
            Ok((reply, queued_tx)) => {
                queued(Box::new(move || {
                    let _ = queued_tx.send(());
                }));
                reply
            }
            Err(_) => {
                self.pending().remove(&id);
                return Err(QmpError::generic(format!(
                    "the VM core did not answer '{command}'"
                )));
            }
        };
        if let Some(ret) = reply.get("return") {
            return Ok(ret.clone());
        }
        let error = reply.get("error");
        let desc = error
            .and_then(|e| e.get("desc"))
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        let class = match error.and_then(|e| e.get("class")).and_then(Value::as_str) {
            Some("CommandNotFound") => ErrorClass::CommandNotFound,
            Some("DeviceNotFound") => ErrorClass::DeviceNotFound,
            Some("DeviceNotActive") => ErrorClass::DeviceNotActive,
            _ => ErrorClass::GenericError,
        };
        Err(QmpError {
            class,
            desc: desc.to_string(),
        })
    }
}

/// Sends the start of `bytes` with `fd` attached; returns how many bytes went out.
fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: RawFd) -> std::io::Result<usize> {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(bytes)];
    loop {
        match sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake core answering on the other end of a socketpair.
    fn fake_core(stream: UnixStream) {
        std::thread::spawn(move || {
            let mut writer = stream.try_clone().unwrap();
            for line in BufReader::new(stream).lines() {
                let req: Value = serde_json::from_str(&line.unwrap()).unwrap();
                let id = req["id"].clone();
                let reply = match req["execute"].as_str() {
                    Some("stop") => {
                        writer
                            .write_all(b"{\"event\":\"STOP\",\"data\":{}}\n")
                            .unwrap();
                        json!({"return": {}, "id": id})
                    }
                    Some("query-status") => json!({"return": {"status": "running"}, "id": id}),
                    Some("hang") => continue,
                    _ => json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id}),
                };
                writer.write_all(format!("{reply}\n").as_bytes()).unwrap();
            }
        });
    }

    #[test]
    fn replies_errors_and_events() {
        let now = |f: Box<dyn FnOnce() + Send>| f();
        let (ours, theirs) = UnixStream::pair().unwrap();
        fake_core(theirs);
        let events = EventBus::new();
        let link = CoreLink::start(ours, events).unwrap();
        assert_eq!(
            link.request("query-status", Map::new(), now).unwrap()["status"],
            "running"
        );
        assert_eq!(link.request("stop", Map::new(), now).unwrap(), json!({}));
        let e = link.request("bogus", Map::new(), now).unwrap_err();
        assert_eq!(
            (e.class, e.desc.as_str()),
            (ErrorClass::CommandNotFound, "nope")
        );
    }

    #[test]
    fn a_vanished_core_fails_requests_promptly() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let link = CoreLink::start(ours, EventBus::new()).unwrap();
        drop(theirs);
        let started = std::time::Instant::now();
        assert!(link.request("query-status", Map::new(), |f| f()).is_err());
        assert!(started.elapsed() < REQUEST_TIMEOUT);
    }
}
