//! What the gateway keeps of its privileges, and what it drops at start-up.
//!
//! The gateway is the policy plane (DESIGN.md, "Processes"): it opens images and taps,
//! spawns the core and the backends, and those children enter their own jails, which takes
//! privileges of their own (namespaces, pivot_root, becoming `nobody`, emptying their
//! bounding set). A root-started child's capabilities at exec are the gateway's bounding set,
//! so the bounding set is trimmed to exactly what the gateway and its children use
//! ([`KEPT`]); the permitted, effective and inheritable sets follow it, and the ambient set
//! is emptied. Dropped: module loading, raw I/O, ptrace, time, reboot, device nodes, raw
//! sockets, BPF, audit, resource overrides, and every other capability.
//!
//! no_new_privs is set as well: it only stops an exec from *gaining* privileges (setuid
//! bits, file capabilities). A child exec'd by a root gateway gets the bounding set, which
//! is a subset of what the gateway holds, so it gains nothing and is unaffected; a rootless
//! gateway's children get their privileges from their own user namespaces, which
//! no_new_privs does not restrict. (docs/security.md, "The gateway".)
//!
//! Capabilities and no_new_privs are per thread and inherited by new threads, so
//! [`drop_unneeded`] runs first thing in `main`, before any thread exists.

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

/// Capabilities the gateway keeps, and why.
pub const KEPT: &[(u32, &str)] = &[
    (
        cap::DAC_OVERRIDE,
        "open images, sockets and pid files owned by other users",
    ),
    (
        cap::DAC_READ_SEARCH,
        "reach them through closed directories",
    ),
    (
        cap::FOWNER,
        "remove stale sockets in sticky directories such as /tmp",
    ),
    (cap::KILL, "signal children that became nobody"),
    (cap::SETGID, "children drop to the nobody group"),
    (cap::SETUID, "children drop to the nobody user"),
    (cap::SETPCAP, "children empty their own bounding set"),
    (cap::NET_ADMIN, "create and configure taps"),
    (
        cap::SYS_CHROOT,
        "backends chroot where namespaces are refused",
    ),
    (
        cap::SYS_ADMIN,
        "children create namespaces, mount their empty root and pivot_root",
    ),
];

/// The kept capabilities as a mask.
pub fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |m, &(cap, _)| m | (1u64 << cap))
}

/// Highest capability number tried (the kernel answers EINVAL past its last one).
const CAP_MAX: u32 = 63;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Trims the bounding set to [`KEPT`], limits the other sets to it, and sets no_new_privs.
/// A gateway without CAP_SETPCAP (not root) has nothing to trim and only sets no_new_privs.
pub fn drop_unneeded() -> std::io::Result<()> {
    let keep = kept_mask();
    for cap in 0..=CAP_MAX {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments only; EINVAL past the last capability,
            // EPERM without CAP_SETPCAP: both leave nothing to do.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
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
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data have the layout and count capget(2) expects for version 3.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for (i, d) in data.iter_mut().enumerate() {
        let mask = (keep >> (32 * i)) as u32;
        d.effective &= mask;
        d.permitted &= mask;
        d.inheritable &= mask;
    }
    // SAFETY: as above; capset only lowers the sets here, which is always permitted.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dangerous_capabilities_are_not_kept() {
        for cap in [
            cap::SYS_MODULE,
            cap::SYS_RAWIO,
            cap::SYS_PTRACE,
            cap::SYS_TIME,
            cap::SYS_BOOT,
            cap::MKNOD,
            cap::NET_RAW,
            cap::BPF,
            cap::SYS_RESOURCE,
            cap::AUDIT_CONTROL,
            cap::MAC_ADMIN,
            cap::LINUX_IMMUTABLE,
        ] {
            assert_eq!(kept_mask() & (1 << cap), 0, "capability {cap} kept");
        }
        assert_eq!(KEPT.len() as u32, kept_mask().count_ones());
    }
}
