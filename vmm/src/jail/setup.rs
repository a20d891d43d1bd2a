//! The single-threaded half of the core's jail: resource limits, namespaces, the empty root,
//! privileges. The core's order and values, on the primitives shared with the backends
//! (`flotilla_backend::jail`).

use flotilla_backend::jail::{caps, filesystem, namespaces, rlimits};

use super::JailError;

pub(super) use filesystem::pivot_into_empty_root;
pub(super) use namespaces::thread_count;

/// No core dumps (a core file holds guest memory); descriptors and tasks bounded. vCPU
/// threads (up to 254), a request-channel thread per backend and their eventfds, irqfds and
/// ioeventfds stay far below both limits.
pub(super) fn limit_resources() -> Result<(), JailError> {
    rlimits::lower(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    rlimits::lower(libc::RLIMIT_NOFILE, 4096, "RLIMIT_NOFILE")?;
    rlimits::lower(libc::RLIMIT_NPROC, 4096, "RLIMIT_NPROC")?;
    Ok(())
}

/// Unshares the user (unless root), mount, ipc, uts and net namespaces and makes every mount
/// private. The core needs no network: its sockets are socketpairs and inherited unix
/// sockets, which work across network namespaces.
pub(super) fn enter_namespaces() -> Result<(), JailError> {
    namespaces::unshare_user_unless_root()?;
    // The process is single-threaded (checked by `isolate`).
    namespaces::unshare(
        libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET,
        "unshare(mount, ipc, uts, net)",
    )?;
    namespaces::set_hostname(b"flotilla-core");
    namespaces::make_mounts_private()?;
    Ok(())
}

/// Where namespaces are refused: a Landlock ruleset that handles every filesystem right and
/// allows none. Restricting the still single-threaded process covers every later thread.
pub(super) fn landlock_deny_all() {
    filesystem::landlock_deny_all(false, "jail");
}

/// Empties the bounding and ambient sets, becomes `nobody` when started as root (outside a
/// user namespace of its own), empties the effective/permitted/inheritable sets, keeps the
/// parent-death signal the gateway set (a credential change clears it), turns dumpability
/// off and sets no_new_privs. Single-threaded, so every later thread inherits all of it.
pub(super) fn drop_privileges() -> Result<(), JailError> {
    let pdeath = caps::parent_death_signal();
    caps::drop_bounding_except(0);
    caps::clear_ambient();
    if caps::is_host_root() {
        caps::become_nobody()?;
    }
    caps::capset_none()?;
    if pdeath != 0 {
        caps::set_parent_death_signal(pdeath)?;
    }
    caps::not_dumpable();
    caps::set_no_new_privs()?;
    Ok(())
}
