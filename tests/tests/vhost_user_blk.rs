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

/// The user's path: `flotilla` with StratoVirt's `-drive` + `-device virtio-blk-device`. The
/// gateway opens the image, spawns flotilla-blk with the descriptors and the core with the
/// other socket end; the guest reads the disk and writes a marker the host finds.
#[test]
fn stratovirt_drive_and_device_through_the_gateway() {
    let dir = scratch_dir("gateway-drive").expect("scratch dir");
    let image = dir.join("disk.img");
    make_image(&image);
    let expected_md5 = md5_of_first_mib(&image);
    let images = flotilla_tests::guest_images().expect("guest images");
    let id = std::process::id();
    let work = format!("/tmp/flotilla-gw-drive-{id}");
    let flotilla = flotilla_tests::paths::program("flotilla");
    let script = format!(
        "rm -rf {work} && mkdir -p {work} && cp {src} {work}/disk.img && \
         $FLOTILLA_L2_PIN {flotilla} -name gw -kernel {kernel} -initrd {initrd} \
           -append 'console=ttyS0 reboot=k panic=-1 quiet flotilla.heartbeat=10 flotilla.scenario=vda' -m 256 \
           -serial stdio -drive id=d0,file={work}/disk.img,if=none,direct=off \
           -device virtio-blk-device,drive=d0,id=disk0,serial=GW0 \
           -qmp unix:{work}/qmp.sock,server,nowait; status=$?; \
         echo FLOTILLA-RESULT host_marker=$(dd if={work}/disk.img bs=512 skip=8 count=1 2>/dev/null | head -c 16); \
         for i in $(seq 50); do pgrep -f '[f]lotilla-blk --fd' >/dev/null || break; sleep 0.1; done; \
         pgrep -f '[f]lotilla-blk --fd' >/dev/null && echo FLOTILLA-RESULT leftover=yes; \
         rm -rf {work}; exit $status",
        src = shell_quote(&image.to_string_lossy()),
        flotilla = shell_quote(&flotilla.to_string_lossy()),
        kernel = shell_quote(&images.kernel.to_string_lossy()),
        initrd = shell_quote(&images.initramfs.to_string_lossy()),
    );
    let out = flotilla_tests::KvmHost::get()
        .run(&script, std::time::Duration::from_secs(300))
        .expect("run on the KVM host");
    let stdout = out.stdout_str().replace('\r', "");
    let result = |key: &str| {
        stdout.lines().find_map(|l| {
            let rest = &l[l.find("FLOTILLA-RESULT ")? + 16..];
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        })
    };
    let context = format!(
        "status {}\n{stdout}\n--- stderr ---\n{}",
        out.status,
        out.stderr_str()
    );
    assert_eq!(
        result("vda_md5").as_deref(),
        Some(expected_md5.as_str()),
        "{context}"
    );
    assert_eq!(result("vda_write").as_deref(), Some("ok"), "{context}");
    assert_eq!(
        result("host_marker").as_deref(),
        Some("hello-from-guest"),
        "{context}"
    );
    assert_eq!(
        result("leftover"),
        None,
        "a backend outlived the VM\n{context}"
    );
    assert_eq!(out.status, 0, "{context}");
    let _ = std::fs::remove_dir_all(dir);
}
