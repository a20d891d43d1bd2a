//! Runs one of the e2e drivers in tests/qmp/ (Python, next to flotilla on the KVM host) and
//! checks its verdict. Shared by the supervision, network and balloon tests.

use std::time::Duration;

use flotilla_tests::{guest_images, paths, shell_quote, KvmHost};

/// Runs `tests/qmp/SCRIPT --flotilla .. --kernel .. --initrd ..` on the KVM host (inside the
/// network namespace `netns`, created and deleted around it, when given), with core dumps
/// off; asserts it exits 0 having printed `marker`, and returns its stdout.
pub fn run(script: &str, marker: &str, timeout: Duration, netns: Option<&str>) -> String {
    let images = guest_images().expect("guest images");
    let script = paths::workspace_root().join("tests/qmp").join(script);
    let driver = format!(
        "python3 {} --flotilla {} --kernel {} --initrd {}",
        shell_quote(&script.to_string_lossy()),
        shell_quote(&paths::program("flotilla").to_string_lossy()),
        shell_quote(&images.kernel.to_string_lossy()),
        shell_quote(&images.initramfs.to_string_lossy()),
    );
    // No core dumps: a crashing backend would write the guest's memory to disk.
    let command = match netns {
        None => format!("ulimit -c 0; {driver}"),
        Some(ns) => format!(
            "ulimit -c 0; ip netns add {ns} || exit 1; ip netns exec {ns} {driver}; \
             status=$?; ip netns del {ns}; exit $status"
        ),
    };
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
    // The drivers print latencies and throughputs for docs/PERFORMANCE.md.
    println!("{stdout}");
    stdout.to_string()
}
