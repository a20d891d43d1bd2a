//! NICs served by flotilla-net with a real guest (issue 6): tests/qmp/net.py runs on the KVM
//! host inside a network namespace this test creates and deletes; the taps live there and no
//! traffic leaves it.

use std::time::Duration;

use flotilla_tests::{guest_images, paths, shell_quote, KvmHost};

#[test]
fn nics_carry_traffic_survive_backend_crashes_and_hot_plug() {
    let images = guest_images().expect("guest images");
    let script = paths::workspace_root().join("tests/qmp/net.py");
    let flotilla = paths::program("flotilla");
    let ns = format!("flnet{}", std::process::id());
    let command = format!(
        "ulimit -c 0; ip netns add {ns} || exit 1; \
         ip netns exec {ns} python3 {} --flotilla {} --kernel {} --initrd {}; status=$?; \
         ip netns del {ns}; exit $status",
        shell_quote(&script.to_string_lossy()),
        shell_quote(&flotilla.to_string_lossy()),
        shell_quote(&images.kernel.to_string_lossy()),
        shell_quote(&images.initramfs.to_string_lossy()),
    );
    let out = KvmHost::get()
        .run(&command, Duration::from_secs(1500))
        .expect("run on the KVM host");
    let stdout = out.stdout_str();
    assert!(
        out.status == 0 && stdout.contains("NET-OK"),
        "status {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        out.stderr_str()
    );
    println!("{stdout}");
}
