//! End-to-end boot tests: the Debian cloud kernel with the busybox test
//! initramfs, booted by flotilla-vmm on a real KVM (the nested L1 VM on
//! machines without hardware KVM). `qemu_reference_boots` runs the same
//! scenarios under QEMU to prove the images and the harness on their own.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_tests::guest::scratch_dir;
use flotilla_tests::process::run_with_timeout;
use flotilla_tests::{
    boot_guest, extend_initramfs, guest_images, paths, GuestConfig, GuestRun, Images, Output, Vmm,
};

fn flotilla(scenario: &str, mem_mib: u32, cpus: u32, extra_append: &str) -> GuestRun {
    boot_guest(Vmm::Flotilla, scenario, mem_mib, cpus, extra_append)
        .unwrap_or_else(|e| panic!("running flotilla-vmm with scenario {scenario}: {e}"))
}

/// A normal scenario: init ran, the scenario returned 0, the VM powered off.
fn assert_clean_run(run: &GuestRun) {
    assert!(run.saw_init(), "guest init never ran\n{run}");
    assert!(!run.guest_crashed(), "guest kernel crashed\n{run}");
    assert_eq!(
        run.scenario_status(),
        Some(0),
        "scenario did not finish with 0\n{run}"
    );
    assert_eq!(run.status, 0, "VMM exit status\n{run}");
}

#[test]
fn boots_to_init() {
    let run = flotilla("boot", 256, 1, "");
    assert_clean_run(&run);
}

#[test]
fn smp_2_guest_sees_two_cpus() {
    let run = flotilla("cpus", 256, 2, "");
    assert_clean_run(&run);
    assert_eq!(run.result("cpus"), Some("2"), "{run}");
}

#[test]
fn memory_512_mib_guest_memtotal() {
    let run = flotilla("meminfo", 512, 1, "");
    assert_clean_run(&run);
    let kb: u64 = run
        .result("memtotal_kb")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no memtotal_kb result\n{run}"));
    let want = 512 * 1024;
    // MemTotal excludes what firmware tables and the kernel image reserve.
    assert!(
        kb.abs_diff(want) <= want / 10,
        "MemTotal {kb} kB is not within 10% of {want} kB\n{run}"
    );
}

#[test]
fn guest_reboot_ends_vm_with_status_0() {
    let run = flotilla("reboot", 256, 1, "reboot=k");
    assert!(run.saw_init(), "{run}");
    assert_eq!(run.result("action"), Some("reboot"), "{run}");
    assert_eq!(run.result("error"), None, "{run}");
    assert_eq!(run.status, 0, "{run}");
}

#[test]
fn guest_poweroff_ends_vm_with_status_0() {
    let run = flotilla("poweroff", 256, 1, "");
    assert!(run.saw_init(), "{run}");
    assert_eq!(run.result("action"), Some("poweroff"), "{run}");
    assert_eq!(run.result("error"), None, "{run}");
    assert_eq!(run.status, 0, "{run}");
}

/// A test can add files to the guest by appending a cpio archive to the
/// initramfs (here: a new scenario), without rebuilding the base image.
#[test]
fn extended_initramfs_adds_a_scenario() {
    let base = guest_images().expect("guest images");
    let dir = scratch_dir("extend").expect("scratch dir");
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("scenarios")).expect("creating scenario dir");
    std::fs::write(
        root.join("scenarios/extra.sh"),
        "echo \"FLOTILLA-RESULT extra=$(cat /proc/sys/kernel/osrelease)\"\n",
    )
    .expect("writing scenario");
    let initramfs = dir.join("initramfs.img");
    extend_initramfs(&base.initramfs, &initramfs, &root).expect("extending the initramfs");
    let run = GuestConfig {
        images: Some(Images {
            kernel: base.kernel,
            initramfs,
        }),
        ..GuestConfig::new(Vmm::Flotilla, "extra")
    }
    .run()
    .expect("running flotilla-vmm with the extended initramfs");
    assert_clean_run(&run);
    assert!(
        run.result("extra").is_some_and(|v| v.contains("cloud")),
        "{run}"
    );
}

/// Bad-input checks do not execute a guest, so they run on this host
/// directly (no KVM needed before the kernel is loaded).
fn run_vmm_locally(kernel: &Path) -> Output {
    let vmm = paths::vmm_binary();
    assert!(
        vmm.is_file(),
        "{} not built (cargo build -p vmm)",
        vmm.display()
    );
    let initrd = guest_images().expect("building guest images").initramfs;
    run_with_timeout(
        Command::new(&vmm)
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0", "-m", "128", "-serial", "stdio"]),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| {
        panic!(
            "running {} -kernel {}: {e}",
            vmm.display(),
            kernel.display()
        )
    })
}

/// Exit status 2 and exactly one line on stderr, no panic.
fn assert_usage_error(out: &Output, what: &str) {
    let stderr = out.stderr_str();
    assert_eq!(out.status, 2, "{what}: exit status (stderr: {stderr})");
    assert!(
        !stderr.contains("panicked"),
        "{what}: VMM panicked: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: want a one-line error, got:\n{stderr}"
    );
}

#[test]
fn missing_kernel_is_rejected_with_status_2() {
    let dir = scratch_dir("missing-kernel").expect("scratch dir");
    let out = run_vmm_locally(&dir.join("no-such-vmlinuz"));
    assert_usage_error(&out, "missing kernel");
}

#[test]
fn garbage_and_truncated_kernels_are_rejected_with_status_2() {
    let dir = scratch_dir("bad-kernel").expect("scratch dir");
    // Deterministic junk (xorshift), so a failure reproduces.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let junk: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let garbage = dir.join("garbage-vmlinuz");
    std::fs::write(&garbage, &junk).expect("writing garbage kernel");
    assert_usage_error(&run_vmm_locally(&garbage), "garbage kernel");

    // A real bzImage cut inside its setup header area.
    let real =
        std::fs::read(guest_images().expect("guest images").kernel).expect("reading vmlinuz");
    let truncated = dir.join("truncated-vmlinuz");
    std::fs::write(&truncated, &real[..1024]).expect("writing truncated kernel");
    assert_usage_error(&run_vmm_locally(&truncated), "truncated kernel");

    let empty = dir.join("empty-vmlinuz");
    std::fs::write(&empty, b"").expect("writing empty kernel");
    assert_usage_error(&run_vmm_locally(&empty), "empty kernel");
}

/// The same scenarios under QEMU microvm (the reference VMM): if this fails,
/// the images or the harness are broken, not flotilla.
#[test]
fn qemu_reference_boots() {
    let qemu = |scenario: &str, mem: u32, cpus: u32, extra: &str| {
        let run = boot_guest(Vmm::Qemu, scenario, mem, cpus, extra)
            .unwrap_or_else(|e| panic!("QEMU scenario {scenario}: {e}"));
        eprintln!(
            "qemu scenario {scenario}: {:.1}s",
            run.elapsed.as_secs_f64()
        );
        run
    };

    let run = qemu("boot", 256, 1, "");
    assert_clean_run(&run);

    let run = qemu("cpus", 256, 2, "");
    assert_clean_run(&run);
    assert_eq!(run.result("cpus"), Some("2"), "{run}");

    // Kept to three boots: each QEMU-in-L1 boot costs ~15 s, and nested QEMU (not flotilla)
    // occasionally hangs in its own ACPI/BIOS paths (seen with -m 512 and with reboot=k);
    // the meminfo/reboot scenarios are proven against flotilla above. The benchmark
    // (tests/bench/boot.sh) boots QEMU more.
    let run = qemu("poweroff", 256, 1, "");
    assert_eq!(run.result("action"), Some("poweroff"), "{run}");
    assert_eq!(run.result("error"), None, "{run}");
    assert_eq!(run.status, 0, "{run}");
}
