//! A backend that is sent a fault signal dies of it (so its supervisor replaces it), even
//! though Rust's runtime would otherwise swallow an asynchronous SIGSEGV or SIGBUS once.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn dies_of(signal: i32) {
    let dir = std::env::temp_dir().join(format!("flotilla-sig-{signal}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.join("blk.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-blk"))
        .arg("--socket-path")
        .arg(&sock)
        .arg("--image")
        .arg(&image)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "flotilla-blk never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flotilla-blk survived signal {signal}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(signal), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigsegv_kills_the_backend() {
    dies_of(libc::SIGSEGV);
}

#[test]
fn sigbus_kills_the_backend() {
    dies_of(libc::SIGBUS);
}

#[test]
fn sigabrt_kills_the_backend() {
    dies_of(libc::SIGABRT);
}
