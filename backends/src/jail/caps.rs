//! Capabilities and privileges: the steps every flotilla process combines
//! in its own order (the backends drop everything, the core likewise, the
//! gateway keeps what its children need).

use std::sync::atomic::Ordering;

use super::{Error, Result};

/// The unprivileged user and group a root-started process becomes.
pub const NOBODY: libc::uid_t = 65534;

/// Highest capability number tried when trimming the bounding set (the
/// kernel answers EINVAL past its own last one).
const CAP_MAX: u32 = 63;

/// Capability numbers of linux/capability.h (libc does not carry them).
pub mod cap {
    #![allow(missing_docs)]
    pub const DAC_OVERRIDE: u32 = 1;
    pub const DAC_READ_SEARCH: u32 = 2;
    pub const FOWNER: u32 = 3;
    pub const KILL: u32 = 5;
    pub const SETGID: u32 = 6;
    pub const SETUID: u32 = 7;
    pub const SETPCAP: u32 = 8;
    pub const LINUX_IMMUTABLE: u32 = 9;
    pub const NET_ADMIN: u32 = 12;
    pub const NET_RAW: u32 = 13;
    pub const SYS_MODULE: u32 = 16;
    pub const SYS_RAWIO: u32 = 17;
    pub const SYS_CHROOT: u32 = 18;
    pub const SYS_PTRACE: u32 = 19;
    pub const SYS_ADMIN: u32 = 21;
    pub const SYS_BOOT: u32 = 22;
    pub const SYS_RESOURCE: u32 = 24;
    pub const SYS_TIME: u32 = 25;
    pub const MKNOD: u32 = 27;
    pub const AUDIT_CONTROL: u32 = 30;
    pub const MAC_ADMIN: u32 = 33;
    pub const BPF: u32 = 39;
}

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

fn header() -> CapHeader {
    CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    }
}

fn capget() -> Result<[CapData; 2]> {
    let mut header = header();
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data are valid and sized for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::last("capget"));
    }
    Ok(data)
}

fn capset(data: &[CapData; 2]) -> Result<()> {
    let mut header = header();
    // SAFETY: header and data are valid for the duration of the call, with
    // the layout and count capset(2) expects for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(Error::last("capset"));
    }
    Ok(())
}

/// Drops every capability not in the mask `keep` from the bounding set.
/// Without CAP_SETPCAP (not root) nothing is dropped, and nothing needs to be.
pub fn drop_bounding_except(keep: u64) {
    for cap in 0..=CAP_MAX {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments only. EINVAL past the last
            // capability, EPERM without CAP_SETPCAP: both leave nothing to do.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
}

/// Empties the ambient set.
pub fn clear_ambient() {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
}

/// Whether the process runs as root of the host's user namespace (root, and
/// not in a user namespace it made itself, see
/// [`super::namespaces::unshare_user_unless_root`]).
pub fn is_host_root() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && !super::namespaces::IN_OWN_USERNS.load(Ordering::Acquire)
}

/// Becomes `nobody` with no supplementary groups. glibc applies set*id calls
/// to every thread, and the kernel clears the permitted and effective sets
/// of every thread whose uids all leave 0.
pub fn become_nobody() -> Result<()> {
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
    Ok(())
}

/// Empties the calling thread's effective, permitted and inheritable sets.
pub fn capset_none() -> Result<()> {
    capset(&[CapData::default(); 2])
}

/// Limits the calling thread's effective, permitted and inheritable sets to
/// the mask `keep` (lowering only, which is always permitted).
pub fn limit_to(keep: u64) -> Result<()> {
    let mut data = capget()?;
    for (i, d) in data.iter_mut().enumerate() {
        let mask = (keep >> (32 * i)) as u32;
        d.effective &= mask;
        d.permitted &= mask;
        d.inheritable &= mask;
    }
    capset(&data)
}

/// The calling thread's effective capability mask (for tests and logs).
pub fn effective() -> Result<u64> {
    let data = capget()?;
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

/// The parent-death signal armed now (0: none).
pub fn parent_death_signal() -> libc::c_int {
    let mut sig: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer.
    unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut sig as *mut libc::c_int) };
    sig
}

/// Arms the parent-death signal (a credential change clears it).
pub fn set_parent_death_signal(sig: libc::c_int) -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) } != 0 {
        return Err(Error::last("PR_SET_PDEATHSIG"));
    }
    Ok(())
}

/// Not dumpable: no ptrace attach by the same uid, /proc files root-owned,
/// no core file.
pub fn not_dumpable() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
}

/// Sets PR_SET_NO_NEW_PRIVS (a seccomp filter carries it to every thread).
pub fn set_no_new_privs() -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::last("PR_SET_NO_NEW_PRIVS"));
    }
    Ok(())
}
