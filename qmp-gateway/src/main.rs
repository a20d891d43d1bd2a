//! `flotilla`: the StratoVirt-compatible front end. Parses the command line, starts one
//! `flotilla-blk` per disk and the `flotilla-vmm` core, serves QMP (forwarding VM commands to
//! the core and its events to every client), and ends with the core.
//!
//! Exit status: the core's (0 after `quit` or a guest power-off), 0 after SIGTERM/SIGINT, 2 for
//! a bad command line, an unreadable image or an unusable QMP address (one line on stderr), 1
//! for other failures.

use std::process::ExitCode;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use qmp_gateway::cli::{self, CliAction, CliError, GatewayConfig, USAGE};
use qmp_gateway::core_link::CoreLink;
use qmp_gateway::gateway::{GatewayHandler, Shutdown};
use qmp_gateway::hotplug::Hotplug;
use qmp_gateway::qmp::{self, EventBus, ServerConfig, ServerError};
use qmp_gateway::supervisor::launch::{drive_options, ColdBackend};
use qmp_gateway::supervisor::spawn::sibling_program;
use qmp_gateway::supervisor::{launch_vm, Supervisor};
use serde_json::json;
use std::os::unix::process::ExitStatusExt;

fn main() -> ExitCode {
    let config = match cli::parse_args(std::env::args().skip(1)) {
        Ok(CliAction::Run(config)) => config,
        Ok(CliAction::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(CliAction::Version) => {
            println!(
                "flotilla {} (StratoVirt-compatible; QMP greets as QEMU {}.{}.{})",
                env!("CARGO_PKG_VERSION"),
                qmp::protocol::QEMU_COMPAT_VERSION.0,
                qmp::protocol::QEMU_COMPAT_VERSION.1,
                qmp::protocol::QEMU_COMPAT_VERSION.2,
            );
            return ExitCode::SUCCESS;
        }
        Err(e @ CliError::NotImplemented { .. }) => return fail(&e.to_string(), e.exit_code()),
        Err(e) => return fail(&format!("{e} (see -help)"), e.exit_code()),
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err((msg, code)) => fail(&msg, code),
    }
}

fn fail(msg: &str, code: u8) -> ExitCode {
    log::error!("{msg}");
    eprintln!("flotilla: {msg}");
    ExitCode::from(code)
}

fn run(config: &GatewayConfig) -> Result<(), (String, u8)> {
    // Before any thread exists: capabilities and no_new_privs are per thread.
    qmp_gateway::privileges::drop_unneeded()
        .map_err(|e| (format!("cannot drop privileges: {e}"), 1))?;
    // Before any thread exists: fork is only sound in a single-threaded process.
    let ready = if config.daemonize {
        Some(daemonize()?)
    } else {
        None
    };
    vmm::logger::init(config.log.as_ref().map(|f| f.as_deref()))
        .map_err(|e| (format!("cannot open the log file: {e}"), 2))?;
    let (shutdown_tx, shutdown_rx) = channel();
    // Block the termination signals before any thread starts, so that every thread inherits
    // the mask and only the signal thread receives them.
    let signals = termination_signals();
    signals
        .thread_block()
        .map_err(|e| (format!("cannot block signals: {e}"), 1))?;
    spawn_signal_thread(signals, shutdown_tx.clone())?;

    if config.disable_seccomp {
        qmp_gateway::supervisor::backend::disable_backend_seccomp();
    }
    let events = EventBus::new();
    let vm = launch_vm(config).map_err(|e| (e.to_string(), e.exit_code()))?;
    let core_link = CoreLink::start(vm.control, events.clone())
        .map_err(|e| (format!("cannot serve the control socket: {e}"), 1))?;
    let core_pid = vm.core.id();
    watch_core(vm.core, shutdown_tx.clone())?;
    let supervisor = Supervisor::new(core_link.clone(), Arc::new(events.clone()));
    let hotplug = Arc::new(Hotplug::new(
        supervisor.clone(),
        core_link.clone(),
        events.clone(),
        sibling_program("flotilla-blk", "FLOTILLA_BLK"),
        sibling_program("flotilla-net", "FLOTILLA_NET"),
    ));
    adopt_backends(config, &supervisor, &hotplug, vm.backends)?;
    let handler = Arc::new(
        GatewayHandler::with_core(events.clone(), shutdown_tx, core_link)
            .with_hotplug(hotplug, supervisor.clone()),
    );
    let server = match qmp::start(
        &config.qmp,
        handler,
        events.clone(),
        ServerConfig::default(),
    ) {
        Ok(server) => server,
        Err(e) => {
            // SAFETY: kill with a pid we spawned and have not reaped yet.
            unsafe { libc::kill(core_pid as libc::pid_t, libc::SIGKILL) };
            let code = match e {
                ServerError::Thread(_) => 1,
                _ => 2,
            };
            return Err((e.to_string(), code));
        }
    };
    if let Some(path) = &config.pidfile {
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| {
            (
                format!("cannot write the pid file '{}': {e}", path.display()),
                2,
            )
        })?;
    }
    if let Some(ready) = ready {
        detach(ready);
    }

    let status = match shutdown_rx.recv().unwrap_or(Shutdown::Signal(0)) {
        Shutdown::Signal(sig) => {
            log::info!("signal {sig}: shutting down");
            // SAFETY: as above; the core may already be gone, which is harmless.
            unsafe { libc::kill(core_pid as libc::pid_t, libc::SIGKILL) };
            events.emit("SHUTDOWN", json!({"guest": false, "reason": "host-signal"}));
            0
        }
        Shutdown::CoreExited(status) => {
            log::info!("the core exited with status {status}");
            status
        }
        // Only sent by the handler when there is no core.
        Shutdown::Quit => 0,
    };
    server.shutdown();
    supervisor.shutdown();
    if let Some(path) = &config.pidfile {
        let _ = std::fs::remove_file(path);
    }
    log::logger().flush();
    if status != 0 {
        return Err((
            format!("the VM core exited with status {status}"),
            u8::try_from(status).unwrap_or(1),
        ));
    }
    Ok(())
}

/// Waits for the core on its own thread; its exit ends the gateway with its status.
fn watch_core(mut core: std::process::Child, tx: Sender<Shutdown>) -> Result<(), (String, u8)> {
    std::thread::Builder::new()
        .name("core-watch".into())
        .spawn(move || {
            let status = match core.wait() {
                Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
                Err(e) => {
                    log::error!("waiting for the core failed: {e}");
                    1
                }
            };
            let _ = tx.send(Shutdown::CoreExited(status));
        })
        .map(drop)
        .map_err(|e| (format!("cannot start the core watcher: {e}"), 1))
}

/// Hands the backends started with the VM to the supervisor, and their disks to hotplug (so
/// `device_del` works on them too).
fn adopt_backends(
    config: &GatewayConfig,
    supervisor: &Arc<Supervisor>,
    hotplug: &Hotplug,
    backends: Vec<ColdBackend>,
) -> Result<(), (String, u8)> {
    for b in backends {
        // The slot's index within its kind: blk3 -> 3.
        let index = b
            .slot
            .trim_start_matches(|c: char| c.is_ascii_alphabetic())
            .parse::<usize>()
            .unwrap_or(0);
        let resource = || {
            b.spec
                .fds
                .first()
                .and_then(|fd| fd.try_clone().ok())
                .ok_or_else(|| (format!("device '{}': descriptor lost", b.id), 1))
        };
        let drive = b
            .drive
            .as_ref()
            .and_then(|id| config.drives.iter().find(|d| &d.id == id));
        if let Some(drive) = drive {
            let image = std::fs::File::from(resource()?);
            hotplug.register_cold_disk(&b.id, &drive.id, index, drive_options(drive), image);
        }
        if let Some(netdev) = &b.netdev {
            hotplug.register_cold_nic(&b.id, netdev, index, resource()?);
        }
        let pidfd = b
            .pidfd
            .ok_or_else(|| (format!("backend '{}' was not started", b.id), 1))?;
        supervisor
            .adopt(&b.id, b.driver, &b.slot, b.spec, pidfd)
            .map_err(|e| (e, 1))?;
    }
    Ok(())
}

/// `-daemonize`: forks; the parent waits until the child serves QMP (a byte on a pipe from
/// [`detach`]) and exits 0 — or 1 if the child failed first (its errors go to the `-D` log).
/// The child leaves the terminal's session and points its standard streams at /dev/null.
fn daemonize() -> Result<std::os::fd::OwnedFd, (String, u8)> {
    use nix::unistd::{fork, setsid, ForkResult};
    let (read_end, write_end) =
        nix::unistd::pipe().map_err(|e| (format!("cannot create a pipe: {e}"), 1))?;
    // SAFETY: called first thing in `run`, while the process has a single thread.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => {
            drop(write_end);
            let mut byte = [0u8; 1];
            let ready =
                nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&read_end), &mut byte) == Ok(1);
            if !ready {
                eprintln!("flotilla: the daemon exited before serving QMP (run without -daemonize, or with -D FILE, to see why)");
            }
            std::process::exit(if ready { 0 } else { 1 });
        }
        Ok(ForkResult::Child) => {
            drop(read_end);
            setsid().map_err(|e| (format!("setsid failed: {e}"), 1))?;
            // The VM's processes inherit these: none may hold the caller's terminal or pipes.
            redirect_to_null(&[libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO]);
            Ok(write_end)
        }
        Err(e) => Err((format!("cannot fork: {e}"), 1)),
    }
}

/// Tells the waiting parent that the daemon is up.
fn detach(ready: std::os::fd::OwnedFd) {
    if let Err(e) = nix::unistd::write(&ready, b"1") {
        log::warn!("cannot tell the parent the daemon is ready: {e}");
    }
}

fn redirect_to_null(fds: &[libc::c_int]) {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        Ok(null) => {
            for &fd in fds {
                // SAFETY: dup2 onto a standard descriptor we own; `null` stays open meanwhile.
                unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
            }
        }
        Err(e) => log::warn!("cannot open /dev/null: {e}"),
    }
}

fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

fn spawn_signal_thread(signals: SigSet, tx: Sender<Shutdown>) -> Result<(), (String, u8)> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match signals.wait() {
                Ok(sig) => {
                    // The receiver lives until main returns; a failed send means it is
                    // already shutting down.
                    let _ = tx.send(Shutdown::Signal(sig as i32));
                }
                Err(e) => {
                    log::error!("sigwait failed: {e}");
                    return;
                }
            }
        })
        .map(drop)
        .map_err(|e| (format!("cannot start the signal thread: {e}"), 1))
}
