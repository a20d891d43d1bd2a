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

use flotilla_backend::jail::caps;

/// Capability numbers of linux/capability.h (libc does not carry them).
pub use caps::cap;

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

/// Trims the bounding set to [`KEPT`], limits the other sets to it, and sets no_new_privs.
/// A gateway without CAP_SETPCAP (not root) has nothing to trim and only sets no_new_privs.
pub fn drop_unneeded() -> std::io::Result<()> {
    let keep = kept_mask();
    caps::drop_bounding_except(keep);
    caps::clear_ambient();
    caps::limit_to(keep)?;
    caps::set_no_new_privs()?;
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
