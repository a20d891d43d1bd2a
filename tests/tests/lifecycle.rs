//! The VM lifecycle through `flotilla` and QMP with a real guest (issue 3): unix and TCP QMP,
//! stop/cont/query-status/query-cpus, system_reset (the guest boots again), system_powerdown
//! (the guest powers off through the ACPI power button), SHUTDOWN, exit status 0. The client
//! is tests/qmp/lifecycle.py, run on the KVM host next to flotilla.

use std::time::Duration;

use flotilla_tests::{guest_images, paths, shell_quote, KvmHost};

#[test]
fn qmp_lifecycle_with_a_real_guest() {
    let images = guest_images().expect("guest images");
    let script = paths::workspace_root().join("tests/qmp/lifecycle.py");
    let flotilla = paths::program("flotilla");
    let command = format!(
        "python3 {} --flotilla {} --kernel {} --initrd {}",
        shell_quote(&script.to_string_lossy()),
        shell_quote(&flotilla.to_string_lossy()),
        shell_quote(&images.kernel.to_string_lossy()),
        shell_quote(&images.initramfs.to_string_lossy()),
    );
    let out = KvmHost::get()
        .run(&command, Duration::from_secs(300))
        .expect("run on the KVM host");
    let stdout = out.stdout_str();
    assert!(
        out.status == 0 && stdout.contains("LIFECYCLE-OK"),
        "status {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        out.stderr_str()
    );
}
