//! Capabilities and privileges of a jailed backend: none.
//!
//! Capabilities are per thread, and a backend already runs threads when it
//! enters the jail (vring workers, the signal thread, the relay). Dropping
//! them with capset would only cover the calling thread. When the backend
//! runs as root, it therefore also changes its uid and gids to `nobody`:
//! glibc applies set*id calls to every thread of the process, and the
//! kernel clears the permitted and effective sets of a thread whose uids all
//! leave 0. In a user namespace of its own (the backend was not started as
//! root) the capabilities only ever applied to the backend's own namespaces;
//! the calling thread drops them and seccomp refuses every call where they
//! would matter (mount, unshare, setns, ...).

use std::sync::atomic::{AtomicBool, Ordering};

use super::{Error, Result};

/// The unprivileged user and group a root-started backend becomes.
pub const NOBODY: libc::uid_t = 65534;

/// Set by [`super::namespaces::unshare_all`] when it made a user namespace.
pub(crate) static IN_OWN_USERNS: AtomicBool = AtomicBool::new(false);

/// Highest capability number tried when emptying the bounding set (the
/// kernel answers EINVAL past its own last one).
const CAP_MAX: libc::c_ulong = 63;

/// `struct __user_cap_header_struct` of capset(2).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct` of capset(2).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Empties the calling thread's effective, permitted and inheritable sets.
fn capset_none() -> Result<()> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and data are valid for the duration of the call, with
    // the layout and count capset(2) expects for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(Error::last("capset"));
    }
    Ok(())
}

/// Drops every capability of every thread (see the module comment).
pub fn drop_all() -> Result<()> {
    for cap in 0..=CAP_MAX {
        // SAFETY: prctl with integer arguments only. EINVAL past the last
        // capability, EPERM without CAP_SETPCAP: both leave nothing to do.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root && !IN_OWN_USERNS.load(Ordering::Acquire) {
        // SAFETY: plain set*id calls; glibc runs them on every thread.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(Error::last("setgroups"));
            }
            if libc::setresgid(NOBODY, NOBODY, NOBODY) != 0 {
                return Err(Error::last("setresgid"));
            }
            if libc::setresuid(NOBODY, NOBODY, NOBODY) != 0 {
                return Err(Error::last("setresuid"));
            }
        }
    }
    capset_none()?;
    // A credential change clears the parent-death signal; arm it again so
    // the backend still dies with its keeper.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(Error::last("PR_SET_PDEATHSIG"));
    }
    // Not dumpable: no ptrace attach by the same uid, /proc files root-owned.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    Ok(())
}

/// Sets PR_SET_NO_NEW_PRIVS (the seccomp filter carries it to every thread).
pub fn set_no_new_privs() -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::last("PR_SET_NO_NEW_PRIVS"));
    }
    Ok(())
}

/// The calling thread's effective capability mask (for tests and logs).
pub fn effective() -> Result<u64> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data are valid and sized for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::last("capget"));
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}
