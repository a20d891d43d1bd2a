//! Inherited file descriptors: which ones the process started with, and
//! closing those nobody claimed.
//!
//! A parent may leak descriptors into a backend (a shell's, a test harness's,
//! a supervisor bug). Only stdio, the vhost-user socket and the fds a device
//! names on its command line are the backend's to use; the rest are closed on
//! entering the jail. Descriptors the process opened itself (the image, the
//! epoll and event fds, the log file) are not in the snapshot and stay.

use std::os::fd::RawFd;
use std::sync::OnceLock;

use super::{Error, Result};

static INHERITED: OnceLock<Vec<RawFd>> = OnceLock::new();

/// Lists the open descriptors of this process (from /proc/self/fd).
pub fn open_fds() -> Result<Vec<RawFd>> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| Error::sys("/proc/self/fd", e))?;
    let mut fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    fds.sort_unstable();
    // The directory's own descriptor was in the listing and is closed now.
    fds.retain(|&fd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok());
    Ok(fds)
}

/// Records the descriptors open right now as "inherited"; call at start-up.
pub fn snapshot() -> Result<()> {
    let fds = open_fds()?;
    let _ = INHERITED.set(fds);
    Ok(())
}

/// The descriptors recorded by [`snapshot`].
pub fn inherited() -> &'static [RawFd] {
    INHERITED.get().map(Vec::as_slice).unwrap_or(&[])
}

/// Closes every inherited descriptor above stderr that is not in `keep`
/// (the log file, opened before the snapshot, is always kept).
pub fn close_stray(keep: &[RawFd]) -> Result<()> {
    let log = crate::logger::sink_fd();
    for &fd in inherited() {
        if fd > 2 && !keep.contains(&fd) && Some(fd) != log {
            log::info!("sandbox: closing inherited fd {fd}");
            // SAFETY: the fd was inherited at start-up and not claimed by the
            // device (not in `keep`), so no object of this program owns it;
            // closing it cannot pull a descriptor from under someone.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}
