//! Helpers shared by the integration tests: a temporary directory, a
//! flotilla-blk child process, and a small deterministic PRNG.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use flotilla_backend::test_support::{wait_for, TempDir};

/// A running flotilla-blk serving an image in its own temporary directory.
pub struct Backend {
    pub child: Child,
    pub sock: PathBuf,
    pub image: PathBuf,
    pub dir: TempDir,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla-blk");

impl Backend {
    /// Writes `image` to a file and starts the backend on a socket next to it.
    pub fn spawn(tag: &str, image: &[u8], args: &[&str]) -> Backend {
        let dir = TempDir::new(tag);
        let image_path = dir.0.join("disk.img");
        std::fs::write(&image_path, image).expect("write image");
        let sock = dir.0.join("blk.sock");
        let child = Command::new(BIN)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--image")
            .arg(&image_path)
            .args(["--log-level", "warn"])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn flotilla-blk");
        wait_for(&sock);
        Backend {
            child,
            sock,
            image: image_path,
            dir,
        }
    }

    /// The image file's current contents.
    pub fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.image).expect("read image")
    }

    /// Waits for the child to exit by itself (it does when the frontend
    /// disconnects) and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        flotilla_backend::test_support::wait_exit(&mut self.child, timeout)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

/// xorshift64*: deterministic, good enough to pick offsets.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// An image of `len` bytes of seeded pseudo-random data.
pub fn random_image(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(seed).fill(&mut v);
    v
}

/// The processes a backend runs as: the one its parent started and, when
/// the jail forked, the jailed child (in its own pid namespace) under it.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        all.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
        i += 1;
    }
    all
}

/// The jailed process of a backend started as `pid` (its only child, or
/// itself with `--sandbox none`), once it exists.
pub fn jailed_pid(pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tree = process_tree(pid);
        if let Some(&child) = tree.get(1) {
            return child;
        }
        if Instant::now() > deadline {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
