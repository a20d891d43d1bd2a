//! End-to-end: a disk served by flotilla-blk, a separate vhost-user backend process, reaches
//! the guest through flotilla-vmm's vhost-user frontend over virtio-mmio (found by the stock
//! kernel through the ACPI DSDT). The guest reads the disk (checksum must match the host's)
//! and writes a marker the host then finds in the image.

use std::io::Write;
use std::process::Command;

use flotilla_tests::blk::{Disk, DiskTest};
use flotilla_tests::guest::scratch_dir;
use flotilla_tests::{shell_quote, GuestConfig, Vmm};

/// 1 MiB of pseudo-random bytes (xorshift; no RNG crate needed) followed by a sparse tail.
fn make_image(path: &std::path::Path) {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = Vec::with_capacity(1 << 20);
    while bytes.len() < 1 << 20 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    let mut f = std::fs::File::create(path).expect("create image");
    f.write_all(&bytes).expect("write image");
    f.set_len(64 << 20).expect("size image");
}

fn md5_of_first_mib(path: &std::path::Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 1048576 {} | md5sum",
            shell_quote(&path.to_string_lossy())
        ))
        .output()
        .expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn guest_reads_and_writes_a_flotilla_blk_disk() {
    let dir = scratch_dir("vhost-user-blk").expect("scratch dir");
    let image = dir.join("disk.img");
    make_image(&image);
    let expected_md5 = md5_of_first_mib(&image);

    // The KVM host may see the host's files read-only (nested L1): the disk
    // is a copy in the run's work directory there.
    let mut t = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "vda"));
    let disk = t.path("disk.img");
    t.setup(&format!(
        "cp {} {disk}",
        shell_quote(&image.to_string_lossy())
    ));
    t.disks.push(Disk::flotilla(&disk));
    t.after(&format!(
        "echo FLOTILLA-RESULT host_marker=$(dd if={disk} bs=512 skip=8 count=1 2>/dev/null | head -c 16)"
    ));
    let run = t
        .run()
        .unwrap_or_else(|e| panic!("running the guest on the KVM host: {e}"));
    assert!(run.saw_init(), "guest init never ran\n{run}");
    assert_eq!(
        run.result("vda_sectors"),
        Some("131072"),
        "disk size\n{run}"
    );
    assert_eq!(
        run.result("vda_md5"),
        Some(expected_md5.as_str()),
        "guest read the disk\n{run}"
    );
    assert_eq!(run.result("vda_write"), Some("ok"), "guest write\n{run}");
    assert_eq!(
        run.result("host_marker"),
        Some("hello-from-guest"),
        "write reached the image\n{run}"
    );
    assert_eq!(run.status, 0, "VMM exit status\n{run}");
    assert_eq!(
        run.result("backend0_exit"),
        Some("0"),
        "flotilla-blk exits when the VMM disconnects\n{run}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
