//! QEMU's vhost-user-blk frontend against flotilla-blk, without a guest:
//! QEMU connects and negotiates when it realizes the device, and reports
//! through QMP (`x-query-virtio-status`) what it read from us. Booting a
//! guest on top is the end-to-end suite's job; this checks the handshake
//! with a third frontend implementation on every `cargo test`.
//!
//! Needs `qemu-system-x86_64` (.ci/run installs it); no KVM (`-S`, TCG).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{random_image, Backend};

/// Starts QEMU paused with one vhost-user-blk-pci device on `sock`, runs
/// the QMP commands and returns everything QEMU printed.
fn qemu_qmp(sock: &std::path::Path, num_queues: u32) -> String {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "q35", "-accel", "tcg", "-S", "-display", "none"])
        .args(["-nodefaults", "-no-user-config", "-m", "256"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .arg("-device")
        .arg(format!(
            "vhost-user-blk-pci,id=blk0,chardev=c0,num-queues={num_queues}"
        ))
        .args(["-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 not found: install qemu-system-x86 (.ci/run does)");
    let script = [
        r#"{"execute":"qmp_capabilities"}"#,
        r#"{"execute":"x-query-virtio-status","arguments":{"path":"/machine/peripheral/blk0/virtio-backend"}}"#,
        r#"{"execute":"quit"}"#,
    ];
    {
        let stdin = qemu.stdin.as_mut().unwrap();
        for line in script {
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let out = qemu.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "QEMU failed: {text}");
    text
}

#[test]
fn qemu_negotiates_with_a_read_write_multiqueue_disk() {
    let mut backend = Backend::spawn(
        "qemu-rw",
        &random_image(1 << 20, 31),
        &["--num-queues", "2"],
    );
    let out = qemu_qmp(&backend.sock, 2);
    for feature in [
        "VIRTIO_BLK_F_FLUSH",
        "VIRTIO_BLK_F_DISCARD",
        "VIRTIO_BLK_F_WRITE_ZEROES",
        "VIRTIO_BLK_F_MQ",
        "VIRTIO_BLK_F_SEG_MAX",
        "VIRTIO_BLK_F_BLK_SIZE",
        "VIRTIO_BLK_F_TOPOLOGY",
        "VIRTIO_RING_F_EVENT_IDX",
        "VIRTIO_F_VERSION_1",
    ] {
        assert!(
            out.contains(feature),
            "{feature} missing from QEMU's view: {out}"
        );
    }
    assert!(!out.contains("VIRTIO_BLK_F_RO"), "{out}");
    assert!(out.contains(r#""num-vqs": 2"#), "{out}");
    assert_eq!(backend.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn qemu_sees_a_read_only_disk() {
    let mut backend = Backend::spawn("qemu-ro", &random_image(1 << 20, 32), &["--readonly"]);
    let out = qemu_qmp(&backend.sock, 1);
    assert!(out.contains("VIRTIO_BLK_F_RO"), "{out}");
    assert!(!out.contains("VIRTIO_BLK_F_DISCARD"), "{out}");
    assert_eq!(backend.wait_exit(Duration::from_secs(10)), Some(0));
}
