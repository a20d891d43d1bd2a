//! `flotilla-vmm`: boots a microvm from a StratoVirt-style command line.
//!
//! Exit status: 0 when the guest powers off or resets, 2 for bad options or unusable input
//! files (one line on stderr), 1 when the VM fails (KVM error, register dump in the log).

use std::process::ExitCode;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use vmm::builder::build_microvm;
use vmm::config::{VmConfig, VMM_OPTIONS};

use vmm::builder::RunningVm;
use vmm::control::{self, ControlSender};
use vmm::exit::VmExit;
use vmm::{jail, logger, options, terminal};

const USAGE: &str = "\
Usage: flotilla-vmm -kernel PATH [options]
  -kernel PATH           bzImage or ELF vmlinux
  -initrd PATH           initial ramdisk
  -append CMDLINE        kernel command line
  -m SIZE                guest memory: N (MiB), NM or NG; 256M..512G (default 256)
  -smp [cpus=]N          vCPUs, 1..254 (default 1)
  -serial stdio|file:PATH
                         ttyS0 destination (default: discarded)
  -name NAME             VM name (1..255 characters)
  -machine microvm[,virtio-mmio-cmdline=on|off]
                         also list virtio-mmio devices on the kernel command line
  -D [FILE]              log to FILE (or stderr) at info level; FLOTILLA_LOG sets the level
  -control-fd N          serve the flotilla gateway's control socket on inherited fd N
  -disable-seccomp       no seccomp filters (the rest of the jail stays)
  -version, -help";

fn main() -> ExitCode {
    let opts = match options::parse(VMM_OPTIONS, std::env::args().skip(1)) {
        Ok(opts) => opts,
        Err(e) => return usage_error(&e.to_string()),
    };
    if opts.has("help") || opts.has("h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if opts.has("version") {
        println!("flotilla-vmm {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let mut config = match VmConfig::from_options(&opts) {
        Ok(c) => c,
        Err(e) => return usage_error(&e.to_string()),
    };
    if let Err(e) = logger::init(config.log.as_ref().map(|f| f.as_deref())) {
        return usage_error(&e.to_string());
    }
    // Backends named by path are connected now: the jail entered during the build leaves
    // the core no path to connect to.
    if let Err(e) = jail::connect_backend_paths(&mut config) {
        report(&config, &e);
        return ExitCode::from(2);
    }
    jail::arm(jail::JailConfig {
        seccomp: !opts.has("disable-seccomp"),
    });
    let vm = match build_microvm(&config) {
        Ok(vm) => vm,
        Err(e) => {
            report(&config, &e.to_string());
            return ExitCode::from(if e.is_user_error() { 2 } else { 1 });
        }
    };
    let control = match config
        .control_fd
        .map(|fd| start_control(fd, &vm))
        .transpose()
    {
        Ok(c) => c,
        Err(e) => {
            report(&config, &e);
            return ExitCode::from(2);
        }
    };
    if config.serial == Some(vmm::config::SerialConfig::Stdio) {
        terminal::set_raw();
    }
    // Every other thread has started under its own filter; the main thread's comes last so
    // that none of them inherits it.
    jail::enter_thread(jail::Role::Main);
    #[cfg(feature = "escape-test")]
    flotilla_backend::jail::escape::attempt_from_env(|_, line| eprintln!("{line}"));
    let reason = vm.wait();
    if let Some(sender) = &control {
        sender.event("SHUTDOWN", control::shutdown_event(&reason));
    }
    terminal::restore();
    match &reason {
        VmExit::Error(msg) => report(&config, msg),
        _ => log::info!("VM ended: {reason:?}"),
    }
    log::logger().flush();
    // Exit without unwinding the vCPU threads, which are still inside KVM_RUN.
    std::process::exit(reason.exit_code());
}

/// Takes over the inherited control socket and serves it.
fn start_control(fd: i32, vm: &RunningVm) -> Result<ControlSender, String> {
    // SAFETY: fstat on any integer is harmless; it fails with EBADF for a closed descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(format!("-control-fd {fd} is not an open socket"));
    }
    // SAFETY: the descriptor was inherited for this purpose and nothing else in this process
    // refers to it, so taking ownership is sound.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let handle = vm.handle();
    let on_close = {
        let handle = handle.clone();
        move || {
            handle.end(VmExit::Error(
                "the gateway closed the control socket".into(),
            ))
        }
    };
    let (sender, _thread) = control::spawn(stream, Arc::new(handle), on_close)
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    vm.events().connect(sender.clone());
    Ok(sender)
}

/// A fatal error: one line on stderr, and in the log file too when `-D FILE` sends the log
/// elsewhere (logging to stderr would print it twice).
fn report(config: &VmConfig, msg: &str) {
    if matches!(config.log, Some(Some(_))) {
        log::error!("{msg}");
    }
    eprintln!("flotilla-vmm: {msg}");
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("flotilla-vmm: {msg} (see -help)");
    ExitCode::from(2)
}
