//! The seccomp policy of a jailed backend, kept as data: [`BASE`] (what
//! any vhost-user backend on `vhost-user-backend` needs), the device's own
//! [`SeccompPolicy`] and the fenced calls ([`FENCED`]); built and installed
//! by [`super::seccomp`].
//!
//! Two kinds of filter are installed on every thread (TSYNC, since worker
//! threads already run when the jail is entered):
//!
//! - the *fence* makes path opens and unlinks fail with EACCES (libraries
//!   that probe files, e.g. the standard library reading cgroup limits, then
//!   carry on) and clone3 fail with ENOSYS (glibc then falls back to clone,
//!   whose flags the allowlist checks: threads only, never fork);
//! - the *allowlist* lets through [`BASE`] plus the device's
//!   [`SeccompPolicy`]; anything else traps (`--seccomp kill`: the SIGSYS
//!   handler logs the syscall number and the process dies of SIGSYS) or is
//!   logged by the kernel and allowed (`--seccomp log`).

// libc's syscall numbers and ioctl constants change type with the
// architecture; the casts keep this file the same on all of them.
#![allow(clippy::unnecessary_cast)]

use super::seccomp::{self, BpfProgram, Cond, SeccompAction, Syscall};
use super::{Result, SeccompMode};

/// The syscalls one backend needs on top of [`BASE`].
#[derive(Debug, Clone)]
pub struct SeccompPolicy {
    /// The program, for log lines.
    pub name: &'static str,
    /// Its device's syscalls.
    pub syscalls: Vec<Syscall>,
}

impl SeccompPolicy {
    /// A policy for `name` allowing [`BASE`] plus `syscalls`.
    pub fn new(name: &'static str, syscalls: &[Syscall]) -> Self {
        SeccompPolicy {
            name,
            syscalls: syscalls.to_vec(),
        }
    }

    /// Number of allowlist entries, base included.
    pub fn len(&self) -> usize {
        BASE.len() + self.syscalls.len()
    }

    /// The whole allowlist: [`BASE`] and the device's entries.
    pub fn allowlist(&self) -> Vec<Syscall> {
        BASE.iter().chain(&self.syscalls).copied().collect()
    }

    /// Whether the policy has no entry at all (never: the base is there).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;

/// What every vhost-user backend needs once jailed: memory (guest memory
/// arrives as fds to mmap after the jail is entered), threads and futexes,
/// signals for SIGTERM and the SIGSYS report, epoll/eventfd/timerfd for the
/// vring workers, messages with SCM_RIGHTS on the already-connected socket,
/// reads and writes on already-open fds, memfds for inflight tracking.
/// No socket, connect, bind, open, exec, fork, ptrace, mount, kill.
pub const BASE: &[Syscall] = &[
    // Memory.
    Syscall::any(libc::SYS_brk),
    Syscall::any(libc::SYS_mmap),
    Syscall::any(libc::SYS_munmap),
    Syscall::any(libc::SYS_mremap),
    Syscall::any(libc::SYS_mprotect),
    Syscall::any(libc::SYS_madvise),
    Syscall::any(libc::SYS_memfd_create),
    Syscall::any(libc::SYS_ftruncate),
    // Threads, futexes, scheduling.
    Syscall::when(
        libc::SYS_clone,
        Cond::MaskedEq(0, CLONE_THREAD, CLONE_THREAD),
    ),
    Syscall::any(libc::SYS_futex),
    Syscall::any(libc::SYS_set_robust_list),
    Syscall::any(libc::SYS_rseq),
    Syscall::any(libc::SYS_sched_yield),
    Syscall::any(libc::SYS_sched_getaffinity),
    Syscall::arg_eq(libc::SYS_prctl, 0, libc::PR_SET_NAME as u64),
    Syscall::arg_eq(libc::SYS_prctl, 0, libc::PR_GET_NAME as u64),
    Syscall::any(libc::SYS_exit),
    Syscall::any(libc::SYS_exit_group),
    Syscall::any(libc::SYS_getpid),
    Syscall::any(libc::SYS_gettid),
    Syscall::any(libc::SYS_getuid),
    Syscall::any(libc::SYS_geteuid),
    Syscall::any(libc::SYS_getgid),
    Syscall::any(libc::SYS_getegid),
    // Signals: own process only; the SIGSYS handler cannot be replaced.
    Syscall::when(libc::SYS_rt_sigaction, Cond::Ne(0, libc::SIGSYS as u64)),
    Syscall::any(libc::SYS_rt_sigprocmask),
    Syscall::any(libc::SYS_rt_sigreturn),
    Syscall::any(libc::SYS_rt_sigtimedwait),
    Syscall::any(libc::SYS_sigaltstack),
    Syscall::when(libc::SYS_tgkill, Cond::OwnPid(0)),
    // Time.
    Syscall::any(libc::SYS_clock_gettime),
    Syscall::any(libc::SYS_clock_nanosleep),
    Syscall::any(libc::SYS_nanosleep),
    Syscall::any(libc::SYS_gettimeofday),
    Syscall::any(libc::SYS_timerfd_create),
    Syscall::any(libc::SYS_timerfd_settime),
    Syscall::any(libc::SYS_timerfd_gettime),
    Syscall::any(libc::SYS_getrandom),
    // Event loops.
    Syscall::any(libc::SYS_epoll_create1),
    Syscall::any(libc::SYS_epoll_ctl),
    Syscall::any(libc::SYS_epoll_pwait),
    #[cfg(target_arch = "x86_64")]
    Syscall::any(libc::SYS_epoll_wait),
    Syscall::any(libc::SYS_eventfd2),
    Syscall::any(libc::SYS_ppoll),
    #[cfg(target_arch = "x86_64")]
    Syscall::any(libc::SYS_poll),
    // I/O on descriptors the process already holds.
    Syscall::any(libc::SYS_read),
    Syscall::any(libc::SYS_write),
    Syscall::any(libc::SYS_readv),
    Syscall::any(libc::SYS_writev),
    Syscall::any(libc::SYS_pread64),
    Syscall::any(libc::SYS_pwrite64),
    Syscall::any(libc::SYS_preadv),
    Syscall::any(libc::SYS_pwritev),
    Syscall::any(libc::SYS_preadv2),
    Syscall::any(libc::SYS_pwritev2),
    Syscall::any(libc::SYS_lseek),
    Syscall::any(libc::SYS_close),
    Syscall::any(libc::SYS_fcntl),
    Syscall::any(libc::SYS_dup),
    Syscall::any(libc::SYS_fstat),
    Syscall::any(libc::SYS_newfstatat),
    Syscall::any(libc::SYS_statx),
    Syscall::arg_eq(libc::SYS_ioctl, 1, libc::FIONBIO as u64),
    Syscall::arg_eq(libc::SYS_ioctl, 1, libc::FIOCLEX as u64),
    // The vhost-user socket (already connected) and the relay's listener.
    Syscall::any(libc::SYS_recvmsg),
    Syscall::any(libc::SYS_sendmsg),
    Syscall::any(libc::SYS_recvfrom),
    Syscall::any(libc::SYS_sendto),
    Syscall::any(libc::SYS_accept4),
    Syscall::any(libc::SYS_shutdown),
    Syscall::any(libc::SYS_getsockopt),
    // Fenced to errnos by the first filter (see the module comment).
    #[cfg(target_arch = "x86_64")]
    Syscall::any(libc::SYS_open),
    Syscall::any(libc::SYS_openat),
    Syscall::any(libc::SYS_openat2),
    #[cfg(target_arch = "x86_64")]
    Syscall::any(libc::SYS_unlink),
    Syscall::any(libc::SYS_unlinkat),
    Syscall::any(libc::SYS_clone3),
];

/// Syscalls that fail with an errno instead of killing: (number, errno).
pub const FENCED: &[(libc::c_long, i32)] = &[
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_open, libc::EACCES),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_creat, libc::EACCES),
    (libc::SYS_openat, libc::EACCES),
    (libc::SYS_openat2, libc::EACCES),
    // vhost's Listener removes its socket path when dropped; the keeper
    // does that from outside the jail.
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_unlink, libc::EACCES),
    (libc::SYS_unlinkat, libc::EACCES),
    (libc::SYS_clone3, libc::ENOSYS),
];

/// The BPF programs for `policy`: one fence per errno, then the allowlist.
pub fn build(policy: &SeccompPolicy, mode: SeccompMode) -> Result<Vec<BpfProgram>> {
    let on_mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    seccomp::build(&policy.allowlist(), FENCED, on_mismatch, seccomp::own_pid())
}

/// Installs the SIGSYS reporter (also writing to the log file) and the
/// filters on every thread.
pub fn install(policy: &SeccompPolicy, mode: SeccompMode) -> Result<()> {
    let programs = build(policy, mode)?;
    seccomp::install_reporter("flotilla", crate::logger::sink_fd())?;
    seccomp::apply_all_threads(&programs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_allows_no_escape_hatch() {
        // memfd_create stays: inflight regions are memfds.
        let allowed = seccomp::escape_hatches_in(BASE, &[libc::SYS_socketpair]);
        assert!(allowed.is_empty(), "in the base allowlist: {allowed:?}");
    }

    #[test]
    fn the_base_is_pinned() {
        let pinned = "\
            accept4
            brk
            clock_gettime
            clock_nanosleep
            clone arg0 & 0x10000 == 0x10000
            clone3
            close
            dup
            epoll_create1
            epoll_ctl
            epoll_pwait
            epoll_wait
            eventfd2
            exit
            exit_group
            fcntl
            fstat
            ftruncate
            futex
            getegid
            geteuid
            getgid
            getpid
            getrandom
            getsockopt
            gettid
            gettimeofday
            getuid
            ioctl arg1 == 0x5421
            ioctl arg1 == 0x5451
            lseek
            madvise
            memfd_create
            mmap
            mprotect
            mremap
            munmap
            nanosleep
            newfstatat
            open
            openat
            openat2
            poll
            ppoll
            prctl arg0 == 0x10
            prctl arg0 == 0xf
            pread64
            preadv
            preadv2
            pwrite64
            pwritev
            pwritev2
            read
            readv
            recvfrom
            recvmsg
            rseq
            rt_sigaction arg0 != 0x1f
            rt_sigprocmask
            rt_sigreturn
            rt_sigtimedwait
            sched_getaffinity
            sched_yield
            sendmsg
            sendto
            set_robust_list
            shutdown
            sigaltstack
            statx
            tgkill arg0 == own pid
            timerfd_create
            timerfd_gettime
            timerfd_settime
            unlink
            unlinkat
            write
            writev
";
        let pinned: Vec<&str> = pinned.lines().map(str::trim).collect();
        assert_eq!(seccomp::describe(BASE), pinned);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_fenced_calls_are_pinned() {
        let (eacces, enosys) = (libc::EACCES, libc::ENOSYS);
        assert_eq!(
            seccomp::describe_fenced(FENCED),
            [
                ("open", eacces),
                ("creat", eacces),
                ("openat", eacces),
                ("openat2", eacces),
                ("unlink", eacces),
                ("unlinkat", eacces),
                ("clone3", enosys),
            ]
            .map(|(name, errno)| (name.to_string(), errno))
        );
    }

    #[test]
    fn filters_compile_for_both_modes() {
        let policy = SeccompPolicy::new("test", &[Syscall::any(libc::SYS_fsync)]);
        assert_eq!(build(&policy, SeccompMode::Kill).unwrap().len(), 3);
        assert_eq!(build(&policy, SeccompMode::Log).unwrap().len(), 3);
    }
}
