//! Resource limits: [`lower`] for every process; [`Limits`] and [`apply`]
//! are the backends' (the core sets its own in `vmm::jail`).

use super::{Error, Result};

/// The limits set on entry; lowering only (a limit already below stays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// RLIMIT_NOFILE: descriptors. Guest memory regions (up to 8 per
    /// SET_MEM_TABLE, more with hotplug), two eventfds per queue, an epoll
    /// per worker, an inflight memfd: a few dozen in practice.
    pub max_fds: u64,
    /// RLIMIT_NPROC: tasks of this user, which bounds the threads a
    /// compromised backend can start (fork itself is refused by seccomp).
    pub max_tasks: u64,
    /// RLIMIT_FSIZE: the largest file offset a write or ftruncate may reach.
    /// Must cover the image and any memfd the backend sizes (inflight
    /// regions); 1 TiB by default.
    pub max_file_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_fds: 1024,
            max_tasks: 1024,
            max_file_size: 1 << 40,
        }
    }
}

/// The resource argument of getrlimit/setrlimit.
pub type Resource = libc::__rlimit_resource_t;

/// Sets both limits of `resource` to at most `value` (never raising).
pub fn lower(resource: Resource, value: u64, what: &'static str) -> Result<()> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `cur` is a valid rlimit to fill in.
    if unsafe { libc::getrlimit(resource, &mut cur) } != 0 {
        return Err(Error::last(what));
    }
    let max = cur.rlim_max.min(value);
    let new = libc::rlimit {
        rlim_cur: cur.rlim_cur.min(max),
        rlim_max: max,
    };
    // SAFETY: `new` is a valid rlimit.
    if unsafe { libc::setrlimit(resource, &new) } != 0 {
        return Err(Error::last(what));
    }
    Ok(())
}

/// Sets NOFILE, NPROC and FSIZE from `limits`, and CORE to 0 (a core file
/// of a backend holds guest memory).
pub fn apply(limits: &Limits) -> Result<()> {
    lower(libc::RLIMIT_NOFILE, limits.max_fds, "RLIMIT_NOFILE")?;
    lower(libc::RLIMIT_NPROC, limits.max_tasks, "RLIMIT_NPROC")?;
    lower(libc::RLIMIT_FSIZE, limits.max_file_size, "RLIMIT_FSIZE")?;
    lower(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")
}
