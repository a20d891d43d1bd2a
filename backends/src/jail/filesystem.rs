//! A jailed process's view of the filesystem: nothing.
//!
//! With namespaces the process has a private mount namespace (see
//! [`super::namespaces`]); it mounts a tiny tmpfs, makes it the root with
//! pivot_root, detaches the old root and remounts the new one read-only.
//! A path lookup then finds an empty directory whatever it asks for, and
//! nothing can be created there (that also covers io_uring's OPENAT, which
//! seccomp does not see). Without namespaces, the process chroots into an
//! empty directory it deletes right after, and Landlock denies every
//! filesystem access on top.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::{Error, Result};

/// Mounts an empty tmpfs, pivots into it and detaches the host's root.
///
/// The tmpfs is mounted over the temporary directory: in the private mount
/// namespace that hides nothing from anyone else and leaves no directory
/// behind on the host.
pub fn pivot_into_empty_root() -> Result<()> {
    pivot_at(&std::env::temp_dir())
}

fn pivot_at(dir: &std::path::Path) -> Result<()> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        flags,
        Some("size=4k,nr_inodes=8,mode=0555"),
    )
    .map_err(|e| Error::sys("mounting the jail's tmpfs", e))?;
    nix::unistd::chdir(dir).map_err(|e| Error::sys("chdir into the jail root", e))?;
    // pivot_root(".", "."): the old root ends up stacked under the new one
    // and is detached right after; no directory for it is needed.
    nix::unistd::pivot_root(".", ".").map_err(|e| Error::sys("pivot_root", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| Error::sys("detaching the old root", e))?;
    nix::unistd::chdir("/").map_err(|e| Error::sys("chdir /", e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        flags | MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| Error::sys("remounting the jail root read-only", e))?;
    Ok(())
}

/// Chroots into a fresh empty directory and removes it.
///
/// Used where namespaces are unavailable. Needs CAP_SYS_CHROOT; without it
/// the process stays where it is and relies on Landlock and seccomp.
pub fn chroot_into_empty_dir() -> Result<()> {
    let base = std::env::temp_dir();
    let dir = nix::unistd::mkdtemp(&base.join("flotilla-root.XXXXXX"))
        .map_err(|e| Error::sys("creating the chroot directory", e))?;
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| Error::sys("chroot directory name", std::io::Error::other(e)))?;
    nix::unistd::chdir(&dir).map_err(|e| Error::sys("chdir into the chroot", e))?;
    let _ = std::fs::remove_dir(&dir);
    // SAFETY: `path` is a valid NUL-terminated string (unused now, kept for
    // the error message); chroot(".") takes the current directory.
    let rc = unsafe { libc::chroot(c".".as_ptr()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let _ = nix::unistd::chdir("/");
        if e.raw_os_error() == Some(libc::EPERM) {
            log::warn!("sandbox: chroot into {path:?} not permitted; Landlock and seccomp only");
            return Ok(());
        }
        return Err(Error::sys("chroot", e));
    }
    nix::unistd::chdir("/").map_err(|e| Error::sys("chdir /", e))?;
    Ok(())
}

/// Restricts the process with a Landlock ruleset that handles every
/// filesystem right and allows none: all path-based access fails with
/// EACCES. Best effort: logs (as "`log_prefix`: Landlock ...") what the
/// kernel could not enforce. `all_threads`: restrict every thread of the
/// process (where the kernel can), not only the calling one and its
/// later threads.
pub fn landlock_deny_all(all_threads: bool, log_prefix: &str) {
    use landlock::{Access, AccessFs, RestrictSelfAttr, Ruleset, RulesetAttr, ABI};
    let result = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI::V6))
        .and_then(|r| r.create())
        .and_then(|r| {
            if all_threads {
                r.all_threads(true)
            } else {
                Ok(r)
            }
        })
        .and_then(|r| r.restrict_self());
    match result {
        Ok(status) => log::info!("{log_prefix}: Landlock {:?}", status.ruleset),
        Err(e) => log::warn!("{log_prefix}: Landlock unavailable: {e}"),
    }
}
