//! Backend supervision with a real guest (issue 4): QMP disk hotplug on microvm
//! (tests/qmp/hotplug.py) and crash restart under a write-verify load
//! (tests/qmp/restart.py). Both drivers run on the KVM host next to flotilla; core dumps
//! are off so that 40 crashing backends do not each write the guest's memory to disk.

use std::time::Duration;

use flotilla_tests::{guest_images, paths, shell_quote, KvmHost};

fn run_driver(script: &str, marker: &str, timeout: Duration) {
    let images = guest_images().expect("guest images");
    let script = paths::workspace_root().join("tests/qmp").join(script);
    let flotilla = paths::program("flotilla");
    let command = format!(
        "ulimit -c 0; python3 {} --flotilla {} --kernel {} --initrd {}",
        shell_quote(&script.to_string_lossy()),
        shell_quote(&flotilla.to_string_lossy()),
        shell_quote(&images.kernel.to_string_lossy()),
        shell_quote(&images.initramfs.to_string_lossy()),
    );
    let out = KvmHost::get()
        .run(&command, timeout)
        .expect("run on the KVM host");
    let stdout = out.stdout_str();
    assert!(
        out.status == 0 && stdout.contains(marker),
        "status {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        out.stderr_str()
    );
    // The numbers go to docs/PERFORMANCE.md; show them in the test log.
    println!("{stdout}");
}

#[test]
fn disks_hot_plug_and_unplug_over_qmp() {
    run_driver("hotplug.py", "HOTPLUG-OK", Duration::from_secs(600));
}

#[test]
fn a_crashing_disk_backend_loses_no_io() {
    run_driver("restart.py", "RESTART-OK", Duration::from_secs(900));
}
