//! End-to-end: a disk served by flotilla-blk, a separate vhost-user backend process, reaches
//! the guest through flotilla-vmm's vhost-user frontend over virtio-mmio (found by the stock
//! kernel through the ACPI DSDT). The guest reads the disk (checksum must match the host's)
//! and writes a marker the host then finds in the image.

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use flotilla_tests::guest::scratch_dir;
use flotilla_tests::{guest_images, paths, shell_quote, GuestConfig, GuestRun, KvmHost, Vmm};

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

    let images = guest_images().expect("guest images");
    let id = std::process::id();
    // The KVM host may see the host's files read-only (nested L1): work on a copy in /tmp.
    let disk = format!("/tmp/flotilla-vu-disk-{id}.img");
    let sock = format!("/tmp/flotilla-vu-{id}.sock");
    let mut guest = GuestConfig::new(Vmm::Flotilla, "vda");
    guest.extra_args = vec![
        format!("-chardev socket,id=c0,path={sock}"),
        "-device vhost-user-blk-device,id=disk0,chardev=c0".to_string(),
    ];
    let vmm = guest.command_line(&images);
    let blk = shell_quote(&paths::profile_dir().join("flotilla-blk").to_string_lossy());
    let script = format!(
        "cp {src} {disk} && rm -f {sock} && ({blk} --socket-path {sock} --image {disk} 2>/tmp/flotilla-vu-blk-{id}.log &) \
         && for i in $(seq 300); do [ -S {sock} ] && break; sleep 0.1; done; \
         {vmm}; status=$?; \
         echo FLOTILLA-RESULT host_marker=$(dd if={disk} bs=512 skip=8 count=1 2>/dev/null | head -c 16); \
         rm -f {disk} {sock}; exit $status",
        src = shell_quote(&image.to_string_lossy()),
    );
    let out = KvmHost::get()
        .run(&script, Duration::from_secs(240))
        .expect("run on the KVM host");
    let run = GuestRun {
        vmm: Vmm::Flotilla,
        command: vmm,
        status: out.status,
        serial_output: out.stdout_str().replace('\r', ""),
        stderr: out.stderr_str(),
        elapsed: out.elapsed,
    };
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
    let _ = std::fs::remove_dir_all(dir);
}
