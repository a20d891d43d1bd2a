//! Local child processes: run with a timeout, and tie long-lived children to
//! the test process's life.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::host::Output;

/// Makes the child get SIGKILL when its parent goes away, so a crashed or
/// interrupted test never leaves a QEMU (or a VMM) behind.
pub fn kill_with_parent(cmd: &mut Command) {
    // SAFETY: getpid() before the fork; prctl/getppid/_exit are
    // async-signal-safe, which is all pre_exec may use.
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody will kill us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` (with [`kill_with_parent`]) from a thread that lives as long
/// as the process.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not
/// the process. Test harnesses run each test on its own short-lived thread,
/// so a VM shared by several tests must be forked from a thread that never
/// ends; otherwise the first test to finish would kill it.
pub fn spawn_persistent(mut cmd: Command) -> Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let program = format!("{:?}", cmd.get_program());
    kill_with_parent(&mut cmd);
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        // The sender lives in a static, so `rx` never disconnects and the
        // thread never returns.
        let _ = thread::Builder::new()
            .name("flotilla-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| {
            Error::io(
                "spawner thread is gone",
                std::io::ErrorKind::BrokenPipe.into(),
            )
        })?;
    reply_rx
        .recv()
        .map_err(|_| {
            Error::io(
                "spawner thread is gone",
                std::io::ErrorKind::BrokenPipe.into(),
            )
        })?
        .context(|| format!("spawning {program}"))
}

/// Runs `cmd` with stdin closed, collecting stdout and stderr, killing its
/// whole process group after `timeout`.
///
/// The child leads a new process group so that everything it starts (a VMM
/// started by `sh -c`) dies with it on timeout.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let description = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    kill_with_parent(cmd);
    let mut child = cmd.spawn().context(|| format!("spawning {description}"))?;
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let started = Instant::now();
    let deadline = started + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                // SAFETY: plain kill(2) on the child's process group.
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                break child
                    .wait()
                    .context(|| format!("waiting for {description}"))?;
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(Error::io(format!("waiting for {description}"), e)),
        }
    };
    // Whatever the child left running in its group goes too.
    // SAFETY: as above; ESRCH when the group is already empty is fine.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let output = Output {
        status: exit_code(status),
        stdout: stdout.map(join).unwrap_or_default(),
        stderr: stderr.map(join).unwrap_or_default(),
        elapsed: started.elapsed(),
    };
    if timed_out {
        return Err(Error::Timeout {
            command: description,
            timeout,
            output,
        });
    }
    Ok(output)
}

/// Shell-style exit code: the status, or 128 + signal number.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn drain<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture; the exit status still tells.
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn join(handle: thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    handle.join().unwrap_or_default()
}
