//! The seccomp allowlist of a jailed backend, kept as data.
//!
//! Two filters are installed on every thread (TSYNC, since worker threads
//! already run when the jail is entered):
//!
//! - the *fence* filter makes path opens and unlinks fail with EACCES
//!   (libraries that probe files, e.g. the standard library reading cgroup
//!   limits, then carry on) and clone3 fail with ENOSYS (its flags sit in memory where
//!   seccomp cannot read them; glibc then falls back to clone, whose flags
//!   the allowlist checks: threads only, never fork);
//! - the *allowlist* filter lets through [`BASE`] (what any vhost-user
//!   backend on `vhost-user-backend` needs) plus the device's own
//!   [`SeccompPolicy`]; anything else traps (`--seccomp kill`: the SIGSYS
//!   handler logs the syscall number and the process dies of SIGSYS) or is
//!   logged by the kernel and allowed (`--seccomp log`).
//!
//! When filters disagree the kernel takes the strictest answer, so the
//! fenced syscalls are also in the allowlist: their result is the errno.

// libc's syscall numbers and ioctl constants change type with the
// architecture; the casts keep this file the same on all of them.
#![allow(clippy::unnecessary_cast)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{Error, Result, SeccompMode};

/// What one allowlist entry lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Args {
    /// Any arguments.
    Any,
    /// Only when argument `index` equals the value.
    Eq(u8, u64),
    /// Only when argument `index` differs from the value.
    Ne(u8, u64),
    /// Only when `argument & mask == value`.
    MaskedEq(u8, u64, u64),
    /// Only when argument `index` is this process's pid (tgkill, ...).
    OwnPid(u8),
}

/// One allowlist entry: a syscall number and a condition on its arguments.
/// Several entries for one syscall allow it when any of them matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syscall {
    /// The syscall number (`libc::SYS_*`).
    pub nr: i64,
    /// The condition on its arguments.
    pub args: Args,
}

impl Syscall {
    /// The syscall with any arguments.
    pub const fn any(nr: libc::c_long) -> Self {
        Syscall {
            nr: nr as i64,
            args: Args::Any,
        }
    }

    /// The syscall when argument `index` equals `value` (e.g. one ioctl).
    pub const fn arg_eq(nr: libc::c_long, index: u8, value: u64) -> Self {
        Syscall {
            nr: nr as i64,
            args: Args::Eq(index, value),
        }
    }
}

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
    Syscall {
        nr: libc::SYS_clone as i64,
        args: Args::MaskedEq(0, CLONE_THREAD, CLONE_THREAD),
    },
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
    Syscall {
        nr: libc::SYS_rt_sigaction as i64,
        args: Args::Ne(0, libc::SIGSYS as u64),
    },
    Syscall::any(libc::SYS_rt_sigprocmask),
    Syscall::any(libc::SYS_rt_sigreturn),
    Syscall::any(libc::SYS_rt_sigtimedwait),
    Syscall::any(libc::SYS_sigaltstack),
    Syscall {
        nr: libc::SYS_tgkill as i64,
        args: Args::OwnPid(0),
    },
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
const FENCED: &[(libc::c_long, i32)] = &[
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

fn arch() -> Result<TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))
}

fn condition(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompRule> {
    let c = SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| Error::Seccomp(e.to_string()))?;
    SeccompRule::new(vec![c]).map_err(|e| Error::Seccomp(e.to_string()))
}

/// Turns allowlist entries into seccompiler's rule map.
fn rules(entries: &[Syscall]) -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for s in entries {
        let rule = match s.args {
            Args::Any => None,
            Args::Eq(i, v) => Some(condition(i, SeccompCmpOp::Eq, v)?),
            Args::Ne(i, v) => Some(condition(i, SeccompCmpOp::Ne, v)?),
            Args::MaskedEq(i, mask, v) => Some(condition(i, SeccompCmpOp::MaskedEq(mask), v)?),
            Args::OwnPid(i) => Some(condition(i, SeccompCmpOp::Eq, pid)?),
        };
        let slot = map.entry(s.nr).or_insert_with(|| Some(Vec::new()));
        match (slot.as_mut(), rule) {
            // An unconditional entry wins over any conditional one.
            (_, None) => *slot = None,
            (Some(list), Some(rule)) => list.push(rule),
            (None, Some(_)) => {}
        }
    }
    // seccompiler reads an empty rule list as "any arguments".
    Ok(map
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect())
}

fn compile(filter: SeccompFilter) -> Result<BpfProgram> {
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))
}

/// The BPF programs for `policy`: one fence per errno, then the allowlist.
pub fn build(policy: &SeccompPolicy, mode: SeccompMode) -> Result<Vec<BpfProgram>> {
    let on_mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let mut programs = Vec::new();
    let mut errnos: Vec<i32> = FENCED.iter().map(|&(_, e)| e).collect();
    errnos.sort_unstable();
    errnos.dedup();
    for errno in errnos {
        let fenced = FENCED
            .iter()
            .filter(|&&(_, e)| e == errno)
            .map(|&(nr, _)| (nr as i64, Vec::new()))
            .collect();
        let f = SeccompFilter::new(
            fenced,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch()?,
        )
        .map_err(|e| Error::Seccomp(e.to_string()))?;
        programs.push(compile(f)?);
    }
    let mut all: Vec<Syscall> = BASE.to_vec();
    all.extend_from_slice(&policy.syscalls);
    let allow = SeccompFilter::new(rules(&all)?, on_mismatch, SeccompAction::Allow, arch()?)
        .map_err(|e| Error::Seccomp(e.to_string()))?;
    programs.push(compile(allow)?);
    Ok(programs)
}

/// The log file's descriptor for the SIGSYS report (-1: stderr only).
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// Formats `n` in decimal into `buf`, returning the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            return &buf[i..];
        }
    }
}

/// The SIGSYS handler: reports the refused syscall, then makes SIGSYS kill
/// the process (SA_RESETHAND restored the default action on entry).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // `si_syscall` of the SIGSYS member of siginfo_t's union: after the
    // three ints and padding (16 bytes) and `si_call_addr` (a pointer).
    const SYSCALL_OFFSET: usize = 16 + std::mem::size_of::<usize>();
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers,
    // and for SIGSYS from seccomp that member is the one filled in.
    let nr = unsafe { *(info.cast::<u8>().add(SYSCALL_OFFSET).cast::<libc::c_int>()) };
    let mut digits = [0u8; 20];
    let mut line = [0u8; 96];
    let mut len = 0;
    for part in [
        &b"flotilla jail: seccomp refused syscall "[..],
        decimal(nr as u64, &mut digits),
        &b"; the process dies of SIGSYS\n"[..],
    ] {
        let n = part.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write is async-signal-safe and allowed by the filter; `line`
    // is valid for `len` bytes; the last call never returns.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        let fd = REPORT_FD.load(Ordering::Relaxed);
        if fd > 2 {
            libc::write(fd, line.as_ptr().cast(), len);
        }
        // A syscall no policy allows traps again. SA_RESETHAND has restored
        // the default action, so the kernel's forced SIGSYS now kills the
        // process, even as pid 1 of its namespace (where a plain tgkill of
        // SIGSYS to itself would be dropped).
        libc::syscall(NO_SUCH_SYSCALL);
    }
}

/// A syscall number no kernel defines, hence in no allowlist.
const NO_SUCH_SYSCALL: libc::c_long = 0x3fff;

/// Installs the SIGSYS reporter and the filters on every thread.
pub fn install(policy: &SeccompPolicy, mode: SeccompMode) -> Result<()> {
    let programs = build(policy, mode)?;
    REPORT_FD.store(crate::logger::sink_fd().unwrap_or(-1), Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn
    // with the SA_SIGINFO signature and only makes async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(Error::last("sigaction(SIGSYS)"));
        }
    }
    for program in &programs {
        seccompiler::apply_filter_all_threads(program)
            .map_err(|e| Error::Seccomp(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unconditional_entries_win_and_conditions_accumulate() {
        let map = rules(&[
            Syscall::arg_eq(libc::SYS_ioctl, 1, 1),
            Syscall::arg_eq(libc::SYS_ioctl, 1, 2),
            Syscall::arg_eq(libc::SYS_read, 0, 1),
            Syscall::any(libc::SYS_read),
        ])
        .unwrap();
        assert_eq!(map[&(libc::SYS_ioctl as i64)].len(), 2);
        assert!(map[&(libc::SYS_read as i64)].is_empty());
    }

    #[test]
    fn the_base_allows_no_escape_hatch() {
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_kill,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_bpf,
            libc::SYS_seccomp,
            libc::SYS_keyctl,
            libc::SYS_init_module,
        ] {
            assert!(
                !BASE.iter().any(|s| s.nr == nr as i64),
                "syscall {nr} in the base allowlist"
            );
        }
    }

    #[test]
    fn filters_compile_for_both_modes() {
        let policy = SeccompPolicy::new("test", &[Syscall::any(libc::SYS_fsync)]);
        assert_eq!(build(&policy, SeccompMode::Kill).unwrap().len(), 3);
        assert_eq!(build(&policy, SeccompMode::Log).unwrap().len(), 3);
    }

    #[test]
    fn decimal_formats() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(59, &mut b), b"59");
        assert_eq!(decimal(u64::MAX, &mut b), b"18446744073709551615");
    }
}
