//! `flotilla`: the StratoVirt-compatible front end. Parses the command line, serves QMP and
//! stops on `quit` or SIGTERM/SIGINT. Starting the core and the backends comes with issue 3.
//!
//! Exit status: 0 after `quit` or a signal, 2 for a bad command line or an unusable QMP
//! address (one line on stderr), 1 for other failures.

use std::process::ExitCode;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use qmp_gateway::cli::{self, CliAction, CliError, GatewayConfig, USAGE};
use qmp_gateway::gateway::{GatewayHandler, Shutdown};
use qmp_gateway::qmp::{self, EventBus, ServerConfig, ServerError};
use serde_json::json;

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

    let events = EventBus::new();
    let handler = Arc::new(GatewayHandler::new(events.clone(), shutdown_tx));
    let server = qmp::start(
        &config.qmp,
        handler,
        events.clone(),
        ServerConfig::default(),
    )
    .map_err(|e| {
        let code = match e {
            ServerError::Thread(_) => 1,
            _ => 2,
        };
        (e.to_string(), code)
    })?;
    log::warn!(
        "serving QMP only: the VM{} is not started until the core is wired in (issue 3)",
        config
            .name
            .as_deref()
            .map(|n| format!(" '{n}'"))
            .unwrap_or_default()
    );

    let reason = shutdown_rx.recv().unwrap_or(Shutdown::Signal(0));
    if let Shutdown::Signal(sig) = reason {
        events.emit("SHUTDOWN", json!({"guest": false, "reason": "host-signal"}));
        log::info!("signal {sig}: shutting down");
    } else {
        log::info!("quit: shutting down");
    }
    server.shutdown();
    log::logger().flush();
    Ok(())
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
