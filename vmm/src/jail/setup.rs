//! The single-threaded half of the core's jail: resource limits, namespaces, the empty root,
//! privileges. Same fences as the backend jail (`backends/src/jail/`), written against libc
//! here because the core does not depend on the backends' crate.

use std::ffi::CStr;

use super::JailError;

/// The unprivileged user and group a root-started core becomes.
const NOBODY: libc::uid_t = 65534;

/// Threads of this process right now.
pub(super) fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1)
}

fn check(rc: libc::c_int, what: &'static str) -> Result<(), JailError> {
    if rc < 0 {
        Err(JailError::last(what))
    } else {
        Ok(())
    }
}

/// Lowers `resource` to at most `value` (never raising).
fn lower(
    resource: libc::__rlimit_resource_t,
    value: u64,
    what: &'static str,
) -> Result<(), JailError> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `cur` is a valid rlimit for getrlimit to fill in.
    check(unsafe { libc::getrlimit(resource, &mut cur) }, what)?;
    let max = cur.rlim_max.min(value);
    let new = libc::rlimit {
        rlim_cur: cur.rlim_cur.min(max),
        rlim_max: max,
    };
    // SAFETY: `new` is a valid rlimit.
    check(unsafe { libc::setrlimit(resource, &new) }, what)
}

/// No core dumps (a core file holds guest memory); descriptors and tasks bounded. vCPU
/// threads (up to 254), a request-channel thread per backend and their eventfds, irqfds and
/// ioeventfds stay far below both limits.
pub(super) fn limit_resources() -> Result<(), JailError> {
    lower(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    lower(libc::RLIMIT_NOFILE, 4096, "RLIMIT_NOFILE")?;
    lower(libc::RLIMIT_NPROC, 4096, "RLIMIT_NPROC")
}

fn write_file(path: &str, contents: &str) -> Result<(), JailError> {
    std::fs::write(path, contents).map_err(|source| JailError::Sys {
        what: "writing the user namespace id map",
        source,
    })
}

/// Set when the core made a user namespace of its own (it was not started as root).
static IN_OWN_USERNS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Unshares the user (unless root), mount, ipc, uts and net namespaces and makes every mount
/// private. The core needs no network: its sockets are socketpairs and inherited unix
/// sockets, which work across network namespaces.
pub(super) fn enter_namespaces() -> Result<(), JailError> {
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid != 0 {
        // SAFETY: unshare with flags only.
        check(
            unsafe { libc::unshare(libc::CLONE_NEWUSER) },
            "unshare(user)",
        )?;
        IN_OWN_USERNS.store(true, std::sync::atomic::Ordering::Release);
        write_file("/proc/self/setgroups", "deny")?;
        write_file("/proc/self/uid_map", &format!("0 {uid} 1"))?;
        write_file("/proc/self/gid_map", &format!("0 {gid} 1"))?;
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;
    // SAFETY: unshare with flags only; the process is single-threaded (checked by `isolate`).
    check(
        unsafe { libc::unshare(flags) },
        "unshare(mount, ipc, uts, net)",
    )?;
    let name = b"flotilla-core";
    // SAFETY: `name` is valid for its length; the uts namespace is our own.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    // SAFETY: valid NUL-terminated target; NULL source, type and data are allowed for a
    // propagation change.
    check(
        unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        },
        "making mounts private",
    )
}

fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
    what: &'static str,
) -> Result<(), JailError> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is NULL or a valid NUL-terminated string living across the call.
    let rc = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    check(rc, what)
}

/// Mounts a tiny read-only tmpfs over the temporary directory (only in our mount namespace),
/// makes it the root with `pivot_root(".", ".")` and detaches the host's root: every path
/// lookup afterwards finds an empty directory.
pub(super) fn pivot_into_empty_root() -> Result<(), JailError> {
    let dir = std::ffi::CString::new(std::env::temp_dir().into_os_string().into_encoded_bytes())
        .map_err(|e| JailError::Sys {
            what: "temporary directory name",
            source: std::io::Error::other(e),
        })?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some(c"tmpfs"),
        &dir,
        Some(c"tmpfs"),
        flags,
        Some(c"size=4k,nr_inodes=8,mode=0555"),
        "mounting the jail's tmpfs",
    )?;
    // SAFETY: chdir/pivot_root/umount2 with valid NUL-terminated paths.
    unsafe {
        check(libc::chdir(dir.as_ptr()), "chdir into the jail root")?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            "pivot_root",
        )?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            "detaching the old root",
        )?;
        check(libc::chdir(c"/".as_ptr()), "chdir /")?;
    }
    mount(
        None,
        c"/",
        None,
        flags | libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        None,
        "remounting the jail root read-only",
    )
}

/// Where namespaces are refused: a Landlock ruleset that handles every filesystem right and
/// allows none. Restricting the still single-threaded process covers every later thread.
pub(super) fn landlock_deny_all() {
    use landlock::{Access, AccessFs, Ruleset, RulesetAttr, ABI};
    let result = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI::V6))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self());
    match result {
        Ok(status) => log::info!("jail: Landlock {:?}", status.ruleset),
        Err(e) => log::warn!("jail: Landlock unavailable: {e}"),
    }
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

/// Empties the bounding and ambient sets, becomes `nobody` when started as root (outside a
/// user namespace of its own), empties the effective/permitted/inheritable sets, keeps the
/// parent-death signal the gateway set (a credential change clears it), turns dumpability
/// off and sets no_new_privs. Single-threaded, so every later thread inherits all of it.
pub(super) fn drop_privileges() -> Result<(), JailError> {
    let mut pdeath: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer.
    unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut pdeath as *mut libc::c_int) };
    for cap in 0..=63 as libc::c_ulong {
        // SAFETY: prctl with integer arguments; EINVAL past the last capability.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
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
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root && !IN_OWN_USERNS.load(std::sync::atomic::Ordering::Acquire) {
        // SAFETY: plain set*id calls on a single-threaded process.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
            check(libc::setresgid(NOBODY, NOBODY, NOBODY), "setresgid")?;
            check(libc::setresuid(NOBODY, NOBODY, NOBODY), "setresuid")?;
        }
    }
    let mut header = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and data have the layout and count capset(2) expects for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    check(rc as libc::c_int, "capset")?;
    if pdeath != 0 {
        // SAFETY: prctl with integer arguments only.
        check(
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, pdeath as libc::c_ulong) },
            "PR_SET_PDEATHSIG",
        )?;
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "PR_SET_NO_NEW_PRIVS",
        )
    }
}
