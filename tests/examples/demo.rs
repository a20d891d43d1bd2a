//! The README demo: build flotilla-vmm and the test guest, boot it with 2 vCPUs and 512 MiB,
//! and print the guest's serial console.
//!
//! On a host with hardware KVM the VMM runs directly; elsewhere (PVM) it runs inside the
//! nested KVM host VM, exactly as the end-to-end tests do.
//!
//! `cargo run --release -p flotilla-tests --example demo`

use std::process::{Command, ExitCode};

use flotilla_tests::{paths, GuestConfig, KvmHost, Vmm};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode, Box<dyn std::error::Error>> {
    // `cargo run` builds this example only; build the VMM in the same profile next to it.
    let release = paths::profile_dir().ends_with("release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(paths::workspace_root()).args([
        "build",
        "-p",
        "vmm",
        "--bin",
        "flotilla-vmm",
    ]);
    if release {
        build.arg("--release");
    }
    eprintln!("demo: building flotilla-vmm");
    if !build.status()?.success() {
        return Err("cargo build -p vmm failed".into());
    }
    eprintln!("demo: building the guest image (Debian cloud kernel + busybox initramfs)");
    flotilla_tests::guest_images()?;
    if KvmHost::get().is_nested() {
        eprintln!("demo: no hardware KVM here; booting the KVM host VM first (QEMU TCG, ~10 s)");
    }
    let mut guest = GuestConfig::new(Vmm::Flotilla, "demo");
    guest.mem_mib = 512;
    guest.cpus = 2;
    // Show the kernel's boot log too, not just the init's output.
    guest.extra_append = "loglevel=6".into();
    eprintln!(
        "demo: $ {}",
        guest.command_line(&flotilla_tests::guest_images()?)
    );
    let run = guest.run()?;
    println!("{}", run.serial_output);
    eprintln!(
        "demo: flotilla-vmm exited with status {} after {:.1} s{}",
        run.status,
        run.elapsed.as_secs_f64(),
        if run.saw_init() {
            "; the guest reached its init"
        } else {
            "; the guest never reached init"
        }
    );
    Ok(if run.status == 0 && run.saw_init() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
