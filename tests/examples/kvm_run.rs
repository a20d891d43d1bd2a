//! Runs shell commands on the KVM host (the nested L1 VM on PVM machines)
//! and prints their output: the quickest way to try flotilla-vmm by hand.
//!
//! ```text
//! cargo run -p flotilla-tests --example kvm_run -- 'target/debug/flotilla-vmm -kernel tests/cache/guest/vmlinuz ...'
//! ```
//! Each argument is one command (they share one L1 boot); the working
//! directory is the workspace root. `FLOTILLA_TIMEOUT` (seconds, default 300)
//! bounds each command. Exits with the last command's status.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flotilla_tests::{guest_images, KvmHost};

fn main() -> ExitCode {
    let commands: Vec<String> = std::env::args().skip(1).collect();
    if commands.is_empty() {
        eprintln!("usage: kvm_run 'COMMAND' ['COMMAND'...]");
        return ExitCode::from(2);
    }
    let timeout = Duration::from_secs(
        std::env::var("FLOTILLA_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300),
    );
    // Build the guest images too, so commands can use tests/cache/guest/*.
    if let Err(e) = guest_images() {
        eprintln!("kvm_run: {e}");
        return ExitCode::FAILURE;
    }
    let host = KvmHost::get();
    let mut status = 0;
    for cmd in &commands {
        let started = Instant::now();
        match host.run(cmd, timeout) {
            Ok(out) => {
                let _ = std::io::stdout().write_all(&out.stdout);
                let _ = std::io::stderr().write_all(&out.stderr);
                eprintln!(
                    "kvm_run: exit status {} after {:.2}s ({} + {} bytes of output)",
                    out.status,
                    started.elapsed().as_secs_f64(),
                    out.stdout.len(),
                    out.stderr.len()
                );
                status = out.status;
            }
            Err(e) => {
                eprintln!("kvm_run: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}
