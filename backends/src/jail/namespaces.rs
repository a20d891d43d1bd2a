//! Namespaces: the unshare steps every jailed flotilla process combines in
//! its own order (the backends add a pid namespace and a keeper process, see
//! `keeper`; the core has no pid namespace).

use std::sync::atomic::{AtomicBool, Ordering};

use super::{Error, Result};

/// Set by [`unshare_user_unless_root`] when it made a user namespace.
pub(crate) static IN_OWN_USERNS: AtomicBool = AtomicBool::new(false);

/// Threads of this process right now.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1)
}

/// Writes one id map entry "inside outside 1" for a fresh user namespace.
fn write_map(file: &str, contents: &str) -> Result<()> {
    std::fs::write(file, contents).map_err(|e| Error::sys("writing the user namespace id map", e))
}

/// When not started as root: unshares a user namespace and maps the caller's
/// uid and gid to root in it (so the other namespaces can be made). Must run
/// while the process is single-threaded.
pub fn unshare_user_unless_root() -> Result<()> {
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid != 0 {
        unshare(libc::CLONE_NEWUSER, "unshare(user)")?;
        IN_OWN_USERNS.store(true, Ordering::Release);
        write_map("/proc/self/setgroups", "deny")?;
        write_map("/proc/self/uid_map", &format!("0 {uid} 1"))?;
        write_map("/proc/self/gid_map", &format!("0 {gid} 1"))?;
    }
    Ok(())
}

/// unshare(2) with `flags` (`libc::CLONE_NEW*`); `what` names it in errors.
pub fn unshare(flags: libc::c_int, what: &'static str) -> Result<()> {
    // SAFETY: unshare with flags only.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(Error::last(what));
    }
    Ok(())
}

/// Names the (own) uts namespace; best effort.
pub fn set_hostname(name: &[u8]) {
    // SAFETY: `name` is valid for its length; the uts namespace is our own.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
}

/// Makes every mount of the (own) mount namespace private, so nothing done
/// later reaches the parent namespace's mount table.
pub fn make_mounts_private() -> Result<()> {
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::sys("making mounts private", e))
}
