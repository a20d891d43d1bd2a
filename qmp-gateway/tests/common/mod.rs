//! A small QMP test client and a fake command handler, shared by the integration tests.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qmp_gateway::qmp::schema::{opt, req};
use qmp_gateway::qmp::{
    self, ArgSpec, ArgType, BoundAddr, ClientCtx, CommandHandler, CommandSpec, EventBus,
    ListenAddr, QmpError, QmpServer, ServerConfig,
};
use serde_json::{json, Map, Value};

/// A fresh directory for sockets (unix socket paths must stay short), removed on drop.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(tag: &str) -> TempDir {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "qmpgw-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    TempDir(dir)
}

/// Either kind of stream, read line by line.
pub struct Client {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
    pub unix: Option<UnixStream>,
}

const TIMEOUT: Duration = Duration::from_secs(20);

impl Client {
    pub fn unix(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect unix");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        Client {
            reader: BufReader::new(Box::new(s.try_clone().unwrap())),
            writer: Box::new(s.try_clone().unwrap()),
            unix: Some(s),
        }
    }

    pub fn tcp(addr: std::net::SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect tcp");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        Client {
            reader: BufReader::new(Box::new(s.try_clone().unwrap())),
            writer: Box::new(s),
            unix: None,
        }
    }

    /// The next line, raw (None on EOF).
    pub fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line),
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// The next message.
    pub fn recv(&mut self) -> Value {
        let line = self.line().expect("server closed the connection");
        assert!(line.ends_with('\n'), "unterminated line {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// The next message that is not an event.
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.recv();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    pub fn send_raw(&mut self, data: &[u8]) {
        self.writer.write_all(data).expect("write");
    }

    pub fn send(&mut self, v: &Value) {
        let mut text = serde_json::to_vec(v).unwrap();
        text.push(b'\n');
        self.send_raw(&text);
    }

    pub fn cmd(&mut self, v: Value) -> Value {
        self.send(&v);
        self.reply()
    }

    /// Reads the greeting and negotiates.
    pub fn negotiate(&mut self) {
        let g = self.recv();
        assert!(g.get("QMP").is_some(), "greeting expected: {g}");
        let r = self.cmd(json!({"execute": "qmp_capabilities"}));
        assert_eq!(r, json!({"return": {}}));
    }

    /// Sends `data` with `fds` attached (SCM_RIGHTS).
    pub fn send_with_fds(&mut self, data: &[u8], fds: &[i32]) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let sock = self.unix.as_ref().expect("fds need a unix socket");
        let iov = [std::io::IoSlice::new(data)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let n =
            sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).expect("sendmsg");
        assert_eq!(n, data.len());
    }
}

/// A handler with a few test commands:
/// - `echo {v}` returns `v`;
/// - `sleep {ms}` sleeps, then returns `{}`;
/// - `emit {name, data?}` emits an event;
/// - `take-fd` reads what is readable from the last passed fd and returns it as a string;
/// - `fail` fails with DeviceNotFound.
pub struct FakeHandler {
    pub events: EventBus,
    pub closed: AtomicUsize,
}

const ECHO: &[ArgSpec] = &[req("v", ArgType::Any)];
const SLEEP: &[ArgSpec] = &[req("ms", ArgType::Int)];
const EMIT: &[ArgSpec] = &[req("name", ArgType::Str), opt("data", ArgType::Object)];

impl FakeHandler {
    pub fn new(events: EventBus) -> Arc<FakeHandler> {
        Arc::new(FakeHandler {
            events,
            closed: AtomicUsize::new(0),
        })
    }
}

impl CommandHandler for FakeHandler {
    fn commands(&self) -> Vec<CommandSpec> {
        vec![
            CommandSpec::with("echo", ECHO),
            CommandSpec::with("sleep", SLEEP),
            CommandSpec::with("emit", EMIT),
            CommandSpec::bare("take-fd"),
            CommandSpec::bare("fail"),
        ]
    }

    fn execute(
        &self,
        name: &str,
        args: Map<String, Value>,
        client: ClientCtx,
    ) -> Result<Value, QmpError> {
        match name {
            "echo" => Ok(args["v"].clone()),
            "sleep" => {
                let ms = args["ms"].as_u64().unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
                Ok(json!({}))
            }
            "emit" => {
                let data = args.get("data").cloned().unwrap_or(json!({}));
                self.events.emit(args["name"].as_str().unwrap_or("X"), data);
                Ok(json!({}))
            }
            "take-fd" => {
                let fd = client.take_fd().ok_or_else(|| {
                    QmpError::generic("No file descriptor supplied via SCM_RIGHTS")
                })?;
                let mut f = std::fs::File::from(fd);
                let mut s = String::new();
                f.read_to_string(&mut s)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                Ok(json!(s))
            }
            "fail" => Err(QmpError::device_not_found("no such device")),
            _ => Err(QmpError::unknown_command(name)),
        }
    }

    fn client_closed(&self, _client: &ClientCtx) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Waits up to 10 s for `cond`.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

/// Number of open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

pub struct Fixture {
    pub server: QmpServer,
    pub handler: Arc<FakeHandler>,
    pub path: PathBuf,
    _dir: TempDir,
}

pub fn serve(config: ServerConfig) -> Fixture {
    let dir = temp_dir("srv");
    let path = dir.join("qmp.sock");
    let events = EventBus::new();
    let handler = FakeHandler::new(events.clone());
    let server = qmp::start(
        &[
            ListenAddr::Unix(path.clone()),
            ListenAddr::Tcp("127.0.0.1:0".into()),
        ],
        handler.clone(),
        events,
        config,
    )
    .expect("start server");
    Fixture {
        server,
        handler,
        path,
        _dir: dir,
    }
}

pub fn unlimited() -> ServerConfig {
    ServerConfig {
        rate_limit: None,
        ..ServerConfig::default()
    }
}

impl Fixture {
    pub fn unix(&self) -> Client {
        Client::unix(&self.path)
    }

    pub fn tcp(&self) -> Client {
        match self.server.local_addrs()[1] {
            BoundAddr::Tcp(a) => Client::tcp(a),
            ref other => panic!("unexpected {other:?}"),
        }
    }
}

/// A spin-loop "kernel" (see `flotilla_tests::elf`): enough for the core to run a VM on any
/// /dev/kvm (even PVM, which cannot boot a real guest) while QMP is exercised.
pub fn spin_kernel(dir: &std::path::Path) -> std::path::PathBuf {
    flotilla_tests::elf::write_tiny_kernel(dir, "spin.elf", flotilla_tests::elf::SPIN)
        .expect("write the test kernel")
}
