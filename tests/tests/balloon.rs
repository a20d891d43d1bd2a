//! The balloon with a real guest (issue 7): tests/qmp/balloon.py runs on the KVM host next
//! to flotilla and checks the guest's and the host's view of memory.

use std::time::Duration;

use flotilla_tests::{guest_images, paths, shell_quote, KvmHost};

#[test]
fn the_balloon_returns_guest_memory_to_the_host() {
    let images = guest_images().expect("guest images");
    let script = paths::workspace_root().join("tests/qmp/balloon.py");
    let flotilla = paths::program("flotilla");
    let command = format!(
        "ulimit -c 0; python3 {} --flotilla {} --kernel {} --initrd {}",
        shell_quote(&script.to_string_lossy()),
        shell_quote(&flotilla.to_string_lossy()),
        shell_quote(&images.kernel.to_string_lossy()),
        shell_quote(&images.initramfs.to_string_lossy()),
    );
    let out = KvmHost::get()
        .run(&command, Duration::from_secs(1800))
        .expect("run on the KVM host");
    let stdout = out.stdout_str();
    assert!(
        out.status == 0 && stdout.contains("BALLOON-OK"),
        "status {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        out.stderr_str()
    );
    println!("{stdout}");
}
