//! End-to-end tests of the block device issue: vhost-user-blk disks served by
//! flotilla-blk (and, for interop, qemu-storage-daemon) under flotilla-vmm
//! (and, for interop, QEMU). Each test boots one guest; the guest scenarios
//! are `tests/guest/scenarios/blk-*.sh` and `rootfs.sh`.
//!
//! Images live in a work directory on the KVM host's /tmp (the nested L1 VM
//! sees the host's files read-only); host-side checks (checksums, allocated
//! blocks, debugfs) run there too and report `FLOTILLA-RESULT` lines like the
//! guest does.

use flotilla_tests::blk::{Disk, DiskTest};
use flotilla_tests::{GuestConfig, GuestRun, Vmm};

/// Runs `t` and checks what every test needs: the guest init ran, the
/// scenario finished with status 0, no kernel crash, the VMM exited 0 and
/// every flotilla-blk backend exited 0 by itself when the VMM went away.
fn run_ok(t: &DiskTest) -> GuestRun {
    let run = t
        .run()
        .unwrap_or_else(|e| panic!("running the guest on the KVM host: {e}"));
    eprintln!(
        "{} ({:?}, scenario {}): {:.1}s",
        std::thread::current().name().unwrap_or("?"),
        t.guest.vmm,
        t.guest.scenario,
        run.elapsed.as_secs_f64()
    );
    for line in run.serial_output.lines() {
        if line.contains("FLOTILLA-RESULT ") || line.contains("FLOTILLA-GUEST-INIT") {
            eprintln!("  {line}");
        }
    }
    assert!(run.saw_init(), "guest init never ran\n{run}");
    assert!(!run.guest_crashed(), "guest kernel crashed\n{run}");
    assert_eq!(run.scenario_status(), Some(0), "scenario status\n{run}");
    assert_eq!(run.status, 0, "VMM exit status\n{run}");
    for (i, disk) in t.disks.iter().enumerate() {
        if disk.backend == flotilla_tests::blk::Backend::Flotilla {
            assert_eq!(
                run.result(&format!("backend{i}_exit")),
                Some("0"),
                "flotilla-blk for disk {i} should exit 0 when the VMM disconnects\n{run}"
            );
        }
    }
    run
}

/// Host-side: `FLOTILLA-RESULT key=<md5 of the first `mib` MiB of img>`.
fn host_md5(key: &str, img: &str, mib: u32) -> String {
    format!("echo FLOTILLA-RESULT {key}=$(head -c {mib}M {img} | md5sum | cut -d' ' -f1)")
}

/// Host-side: `FLOTILLA-RESULT key=<512-byte blocks allocated to img>`.
fn host_blocks(key: &str, img: &str) -> String {
    format!("echo FLOTILLA-RESULT {key}=$(stat -c %b {img})")
}

fn number(run: &GuestRun, key: &str) -> u64 {
    run.result(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric result {key}\n{run}"))
}

/// A small first disk (vda) for tests whose scenario works on vdb and later.
fn small_first_disk(t: &mut DiskTest) {
    let img = t.path("vda.img");
    t.setup(&format!("truncate -s 1M {img}"));
    t.disks.push(Disk::flotilla(&img));
}

/// The checksum scenario on `disk` (vda or vdb) over a 64 MiB image, checked
/// against the host's checksum of the image.
fn checksum_run(t: &mut DiskTest, disk: &str) -> GuestRun {
    t.guest.extra_append = format!("flotilla.disk={disk} flotilla.mib=64");
    // The 64 MiB of data is staged in a RAM file first.
    t.guest.mem_mib = 384;
    let img = t.path("data.img");
    t.after(&host_md5("host_md5", &img, 64));
    let run = run_ok(t);
    assert_eq!(
        run.result(&format!("{disk}_sectors")),
        Some("131072"),
        "{run}"
    );
    assert_eq!(run.result("write"), Some("ok"), "{run}");
    assert_eq!(run.result("sync"), Some("ok"), "{run}");
    let written = run.result("written_md5").expect("written_md5");
    assert_eq!(written.len(), 32, "{run}");
    assert_eq!(
        run.result("readback_md5"),
        Some(written),
        "the guest read back what it wrote\n{run}"
    );
    assert_eq!(
        run.result("host_md5"),
        Some(written),
        "the image holds what the guest wrote\n{run}"
    );
    run
}

#[test]
fn second_disk_checksum_matches_the_image() {
    let mut t = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "blk-checksum"));
    small_first_disk(&mut t);
    let img = t.path("data.img");
    t.setup(&format!("truncate -s 64M {img}"));
    t.disks.push(Disk::flotilla(&img));
    let run = checksum_run(&mut t, "vdb");
    assert_eq!(run.result("vda_sectors"), Some("2048"), "first disk\n{run}");
}

#[test]
fn readonly_disk_refuses_writes() {
    let mut t = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "blk-readonly"));
    let img = t.path("ro.img");
    t.setup(&format!(
        "head -c 1M /dev/urandom >{img} && truncate -s 16M {img}"
    ));
    t.setup(&host_md5("host_md5_before", &img, 1));
    t.after(&host_md5("host_md5_after", &img, 1));
    t.disks.push(Disk::flotilla(&img).readonly());
    let run = run_ok(&t);
    let before = run.result("host_md5_before").expect("host md5");
    assert_eq!(run.result("ro"), Some("1"), "kernel sees RO\n{run}");
    assert_eq!(run.result("read_md5"), Some(before), "reads work\n{run}");
    assert_eq!(run.result("reread_md5"), Some(before), "{run}");
    assert_eq!(run.result("write_fsync"), Some("failed"), "{run}");
    assert_eq!(run.result("write_direct"), Some("failed"), "{run}");
    assert_eq!(
        run.result("host_md5_after"),
        Some(before),
        "image unchanged\n{run}"
    );
}

#[test]
fn serial_reaches_the_guest() {
    let mut t = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "blk-serial"));
    let img = t.path("s.img");
    t.setup(&format!("truncate -s 1M {img}"));
    t.disks
        .push(Disk::flotilla(&img).args(&["--serial", "ABC123"]));
    let run = run_ok(&t);
    assert_eq!(run.result("serial"), Some("ABC123"), "{run}");
}

#[test]
fn fstrim_shrinks_the_image() {
    let mut t = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "blk-discard"));
    small_first_disk(&mut t);
    let img = t.path("fs.img");
    t.setup(&format!("truncate -s 128M {img}"));
    t.disks.push(Disk::flotilla(&img));
    t.on_line(
        "FLOTILLA-RESULT phase=written",
        &host_blocks("host_blocks_written", &img),
    );
    t.after(&host_blocks("host_blocks_end", &img));
    let run = run_ok(&t);
    assert!(
        number(&run, "discard_max_bytes") > 0,
        "the guest sees a discard-capable disk\n{run}"
    );
    for step in ["mkfs", "mount", "write", "umount"] {
        assert_eq!(run.result(step), Some("ok"), "{step}\n{run}");
    }
    assert_eq!(run.result("fstrim_status"), Some("0"), "{run}");
    let written = number(&run, "host_blocks_written");
    let end = number(&run, "host_blocks_end");
    // 32 MiB of file data = 65536 blocks of 512 bytes.
    assert!(written >= 65536, "the data was allocated\n{run}");
    assert!(
        end + 49152 <= written,
        "fstrim gave back at least 24 of the 32 MiB ({written} -> {end} blocks)\n{run}"
    );
}

/// `--iops-total 200` holds 4 KiB direct reads (8 parallel readers) near 200 IOPS. The
/// guest itself manages only ~250 (busy host) to ~1900 (idle) IOPS here, so a second disk
/// at `--iops-total 50` shows the limit, not the guest, is what holds the rate; an
/// unthrottled disk gives the guest's own rate for the log.
#[test]
fn iops_limit_caps_guest_reads() {
    let mut t = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "blk-throttle"));
    small_first_disk(&mut t);
    for (name, limit) in [
        ("at200.img", Some("200")),
        ("at50.img", Some("50")),
        ("free.img", None),
    ] {
        let img = t.path(name);
        t.setup(&format!("truncate -s 16M {img}"));
        let disk = Disk::flotilla(&img);
        t.disks.push(match limit {
            Some(n) => disk.args(&["--iops-total", n]),
            None => disk,
        });
    }
    // DISK:BURST:READS: enough reads to empty the bucket (1 s worth, refilling while the
    // guest reads at its own pace), then ~4 s of timed reads.
    t.guest.extra_append =
        "flotilla.throttle=vdb:600:800,vdc:120:200,vdd:320:800 flotilla.jobs=8".into();
    let run = run_ok(&t);
    for disk in ["vdb", "vdc", "vdd"] {
        assert_eq!(
            run.result(&format!("{disk}_dd")),
            None,
            "reads on {disk} failed\n{run}"
        );
    }
    let at200 = number(&run, "vdb_iops");
    let at50 = number(&run, "vdc_iops");
    let free = number(&run, "vdd_iops");
    eprintln!(
        "--iops-total 200: {at200} IOPS, --iops-total 50: {at50} IOPS, unthrottled: {free} IOPS"
    );
    assert!(
        (100..=300).contains(&at200),
        "--iops-total 200 should hold the guest near 200 IOPS, measured {at200} (unthrottled {free})\n{run}"
    );
    assert!(
        (25..=75).contains(&at50),
        "--iops-total 50 should hold the guest near 50 IOPS, measured {at50} (unthrottled {free})\n{run}"
    );
    assert!(
        free >= 2 * at50,
        "unthrottled, the same reads should be much faster than at 50 IOPS: {free}\n{run}"
    );
}

#[test]
fn qemu_storage_daemon_disk_under_flotilla_vmm() {
    let mut t = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "blk-checksum"));
    let img = t.path("data.img");
    t.setup(&format!("truncate -s 64M {img}"));
    t.disks.push(Disk::qemu_storage_daemon(&img));
    checksum_run(&mut t, "vda");
}

/// QEMU's own vhost-user frontend (microvm, virtio-mmio, which offers the guest
/// 1024-entry queues) with flotilla-blk as its disk.
#[test]
fn flotilla_blk_disk_under_qemu() {
    let mut t = DiskTest::new(GuestConfig::new(Vmm::Qemu, "blk-checksum"));
    let img = t.path("data.img");
    t.setup(&format!("truncate -s 64M {img}"));
    t.disks.push(Disk::flotilla(&img));
    checksum_run(&mut t, "vda");
}

/// The guest's root file system is an ext4 image on a flotilla-blk disk: the initramfs
/// only loads the virtio modules and switch_roots to `root=/dev/vda`, whose own init
/// (`tests/guest/rootfs-init`) prints the image's id and runs the scenario from there.
#[test]
fn boots_from_an_ext4_root_on_flotilla_blk() {
    let rootfs = flotilla_tests::rootfs_image().expect("rootfs image");
    let mut guest = GuestConfig::new(Vmm::Flotilla, "rootfs");
    guest.extra_append = "root=/dev/vda rootfstype=ext4".into();
    let mut t = DiskTest::new(guest);
    let img = t.path("root.ext4");
    t.setup(&format!(
        "cp {} {img}",
        flotilla_tests::shell_quote(&rootfs.image.to_string_lossy())
    ));
    t.disks.push(Disk::flotilla(&img));
    // The guest's file, read back from the image; and the file system is clean.
    t.after(&format!(
        "echo FLOTILLA-RESULT host_sees=$(debugfs -R 'cat /flotilla-guest-wrote' {img} 2>/dev/null)"
    ));
    t.after(&format!(
        "e2fsck -fn {img} >/dev/null 2>&1; echo FLOTILLA-RESULT host_fsck=$?"
    ));
    let bb = format!(
        "echo FLOTILLA-RESULT host_busybox_md5=$(debugfs -R 'cat /bin/busybox' {img} 2>/dev/null | md5sum | cut -d' ' -f1)"
    );
    t.after(&bb);
    let run = run_ok(&t);
    let marker = run
        .serial_output
        .lines()
        .find(|l| l.contains("FLOTILLA-ROOTFS-INIT "))
        .unwrap_or_else(|| panic!("the init on the ext4 root never ran\n{run}"));
    assert!(
        marker.contains(&format!("id={} root=/dev/vda fstype=ext4", rootfs.id)),
        "{marker}\n{run}"
    );
    assert_eq!(run.result("root"), Some("/dev/vda"), "{run}");
    assert_eq!(run.result("root_write"), Some("ok"), "{run}");
    assert_eq!(
        run.result("host_sees"),
        Some("written-on-the-ext4-root"),
        "{run}"
    );
    assert_eq!(
        run.result("host_fsck"),
        Some("0"),
        "file system clean\n{run}"
    );
    assert_eq!(
        run.result("busybox_md5"),
        run.result("host_busybox_md5"),
        "{run}"
    );
}
