//! One backend process: what it takes to start it, again and again.
//!
//! A backend never opens a path: the gateway opens the image (or tap) once and keeps the
//! descriptor, and every incarnation of the backend gets a duplicate of it plus one end of a
//! fresh socketpair, whose other end goes to the core. So a restarted backend serves exactly
//! the same file as the one that crashed, even if the path was renamed meanwhile.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::pidfd::Pidfd;
use super::spawn::{spawn_with_fds, FIRST_CHILD_FD};

/// Set by `-disable-seccomp`: every backend is started with `--seccomp none`.
static SECCOMP_DISABLED: AtomicBool = AtomicBool::new(false);

/// `-disable-seccomp`: backends started from now on run without their seccomp filter
/// (their namespaces, empty root and dropped capabilities stay).
pub fn disable_backend_seccomp() {
    SECCOMP_DISABLED.store(true, Ordering::Release);
}

/// The arguments an incarnation gets: the spec's, plus `--seccomp none` under
/// `-disable-seccomp`.
fn incarnation_args(args: &[String]) -> Vec<String> {
    let mut all = args.to_vec();
    if SECCOMP_DISABLED.load(Ordering::Acquire) {
        all.extend(["--seccomp".into(), "none".into()]);
    }
    all
}

/// Everything needed to start one incarnation of a backend.
#[derive(Debug)]
pub struct BackendSpec {
    /// The program (`flotilla-blk`, ...).
    pub program: PathBuf,
    /// Its arguments. The vhost-user socket is always fd 3 (`--fd 3`); `fds` follow at 4, ...
    pub args: Vec<String>,
    /// Descriptors the backend needs (the image), kept open by the gateway for restarts.
    pub fds: Vec<OwnedFd>,
}

/// A started incarnation.
#[derive(Debug)]
pub struct Incarnation {
    /// Handle to the process (signal, wait).
    pub pidfd: Pidfd,
    /// The core's end of the vhost-user socketpair.
    pub core_end: UnixStream,
    /// When it was started.
    pub started: Instant,
}

impl BackendSpec {
    /// The descriptor number the backend finds `fds[i]` at.
    pub fn fd_number(i: usize) -> i32 {
        FIRST_CHILD_FD + 1 + i as i32
    }

    /// Starts a new incarnation on a new socketpair.
    pub fn spawn(&self) -> std::io::Result<Incarnation> {
        let (core_end, backend_end) = UnixStream::pair()?;
        let mut fds: Vec<&dyn AsRawFd> = vec![&backend_end];
        fds.extend(self.fds.iter().map(|f| f as &dyn AsRawFd));
        let child = spawn_with_fds(&self.program, &incarnation_args(&self.args), &fds)?;
        let pid = child.id();
        // The child is reaped through its pidfd; `Child` is dropped without waiting.
        let pidfd = match Pidfd::open(pid) {
            Ok(p) => p,
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Incarnation {
            pidfd,
            core_end,
            started: Instant::now(),
        })
    }
}

/// What a block backend serves: the options of `-drive` / `blockdev-add` and the device.
#[derive(Clone, Debug, Default)]
pub struct BlkOptions {
    /// The image's path (for messages and the default serial; the backend never opens it).
    pub image_name: String,
    /// Read-only.
    pub read_only: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Request queues.
    pub num_queues: Option<u16>,
    /// GET_ID answer.
    pub serial: Option<String>,
    /// Throttle.
    pub iops: Option<u64>,
    /// I/O engine name for `--aio`.
    pub aio: Option<&'static str>,
}

/// The flotilla-blk spec for an image already opened as `image`.
pub fn blk_spec(program: PathBuf, opts: &BlkOptions, image: OwnedFd) -> BackendSpec {
    let mut args: Vec<String> = vec![
        "--fd".into(),
        FIRST_CHILD_FD.to_string(),
        "--image".into(),
        opts.image_name.clone(),
        "--image-fd".into(),
        BackendSpec::fd_number(0).to_string(),
    ];
    if opts.read_only {
        args.push("--readonly".into());
    }
    if opts.direct {
        args.push("--direct".into());
    }
    if let Some(q) = opts.num_queues {
        args.extend(["--num-queues".into(), q.to_string()]);
    }
    if let Some(serial) = &opts.serial {
        args.extend(["--serial".into(), serial.clone()]);
    }
    if let Some(iops) = opts.iops {
        args.extend(["--iops-total".into(), iops.to_string()]);
    }
    if let Some(aio) = opts.aio {
        args.extend(["--aio".into(), aio.into()]);
    }
    BackendSpec {
        program,
        args,
        fds: vec![image],
    }
}

/// The flotilla-net spec for `tap` (`mac` only names the device in the backend's logs and
/// config; the core owns the MAC the guest sees).
pub fn net_spec(program: PathBuf, mac: Option<[u8; 6]>, tap: OwnedFd) -> BackendSpec {
    let mut args: Vec<String> = vec![
        "--fd".into(),
        FIRST_CHILD_FD.to_string(),
        "--tap-fd".into(),
        BackendSpec::fd_number(0).to_string(),
    ];
    if let Some(m) = mac {
        args.extend([
            "--mac".into(),
            format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
        ]);
    }
    BackendSpec {
        program,
        args,
        fds: vec![tap],
    }
}

/// The flotilla-balloon spec (it needs no descriptor but its socket).
pub fn balloon_spec(program: PathBuf, deflate_on_oom: bool) -> BackendSpec {
    let mut args: Vec<String> = vec!["--fd".into(), FIRST_CHILD_FD.to_string()];
    if deflate_on_oom {
        args.push("--deflate-on-oom".into());
    }
    BackendSpec {
        program,
        args,
        fds: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn disable_seccomp_reaches_the_backend_command_line() {
        let args = vec!["--fd".to_string(), "3".to_string()];
        assert_eq!(incarnation_args(&args), args);
        disable_backend_seccomp();
        assert_eq!(incarnation_args(&args)[2..], ["--seccomp", "none"]);
        SECCOMP_DISABLED.store(false, Ordering::Release);
    }

    #[test]
    fn every_incarnation_gets_a_new_socket_and_the_same_file() {
        let dir = std::env::temp_dir().join(format!("flotilla-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("data");
        std::fs::write(&file, "image").unwrap();
        let image = std::fs::File::open(&file).unwrap();
        // The "backend" copies fd 4 (the image) to fd 3 (its socket).
        let spec = BackendSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "cat <&4 >&3".into()],
            fds: vec![image.into()],
        };
        for _ in 0..2 {
            let mut inc = spec.spawn().unwrap();
            let mut got = String::new();
            inc.core_end.read_to_string(&mut got).unwrap();
            // Each incarnation reads the shared file offset onwards: the first sees it all.
            assert!(got == "image" || got.is_empty(), "{got}");
            assert_eq!(
                inc.pidfd.wait().unwrap(),
                super::super::pidfd::ExitStatus::Exited(0)
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
