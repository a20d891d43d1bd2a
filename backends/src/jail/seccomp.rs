//! Seccomp allowlists kept as data, and the code that turns them into BPF
//! and installs them: one implementation for every flotilla process.
//!
//! A process's policy is two lists (crosvm's idea of policy as data, checked
//! by the compiler here):
//!
//! - the *fence*, `(syscall, errno)` pairs: those calls fail with the errno
//!   instead of killing (path opens fail with EACCES, so libraries that probe
//!   files carry on; clone3 fails with ENOSYS, because its flags sit in
//!   memory where seccomp cannot read them, and glibc then falls back to
//!   clone, whose flags an allowlist can check);
//! - the *allowlist*, [`Syscall`] entries: anything else traps (the SIGSYS
//!   reporter of [`install_reporter`] writes "seccomp refused syscall N" and
//!   the process dies of SIGSYS) or, for the backends' `--seccomp log`, is
//!   logged by the kernel and allowed.
//!
//! [`build`] makes one fence program per errno and then the allowlist
//! program. When filters disagree the kernel takes the strictest answer, so
//! fenced syscalls must also be in the allowlist: their result is the errno.
//!
//! The policies themselves stay with their processes: the backends' in
//! [`super::policy`] and each backend's `sandbox.rs`, the core's per-thread
//! roles in `vmm::jail::seccomp`.

// libc's syscall numbers and ioctl constants change type with the
// architecture; the casts keep this file the same on all of them.
#![allow(clippy::unnecessary_cast)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicUsize, Ordering};

pub use seccompiler::{BpfProgram, SeccompAction};
use seccompiler::{
    SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use super::{Error, Result};

/// A condition on one syscall argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// Argument `index` equals the value.
    Eq(u8, u64),
    /// Argument `index` differs from the value.
    Ne(u8, u64),
    /// `argument & mask == value`.
    MaskedEq(u8, u64, u64),
    /// Argument `index` is this process's pid (tgkill, ...).
    OwnPid(u8),
}

/// What one allowlist entry lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Args {
    /// Any arguments.
    Any,
    /// Only when the condition holds.
    One(Cond),
    /// Only when every condition holds.
    All(&'static [Cond]),
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
        Syscall::when(nr, Cond::Eq(index, value))
    }

    /// The syscall when `cond` holds.
    pub const fn when(nr: libc::c_long, cond: Cond) -> Self {
        Syscall {
            nr: nr as i64,
            args: Args::One(cond),
        }
    }

    /// The syscall when every one of `conds` holds (none: any arguments).
    pub const fn all(nr: libc::c_long, conds: &'static [Cond]) -> Self {
        Syscall {
            nr: nr as i64,
            args: Args::All(conds),
        }
    }

    /// The conditions, all of which must hold; empty: any arguments.
    pub fn conds(&self) -> &[Cond] {
        match &self.args {
            Args::Any => &[],
            Args::One(c) => std::slice::from_ref(c),
            Args::All(conds) => conds,
        }
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Seccomp(e.to_string())
}

fn arch() -> Result<TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e))
}

/// seccompiler's rule map for `entries`; `pid` is what [`Cond::OwnPid`]
/// compares with.
pub fn rules(entries: &[Syscall], pid: u64) -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for e in entries {
        let slot = map.entry(e.nr).or_insert_with(|| Some(Vec::new()));
        if e.conds().is_empty() {
            // An unconditional entry wins over any conditional one.
            *slot = None;
            continue;
        }
        let conds = e
            .conds()
            .iter()
            .map(|c| {
                let (index, op, value) = match *c {
                    Cond::Eq(i, v) => (i, SeccompCmpOp::Eq, v),
                    Cond::Ne(i, v) => (i, SeccompCmpOp::Ne, v),
                    Cond::MaskedEq(i, mask, v) => (i, SeccompCmpOp::MaskedEq(mask), v),
                    Cond::OwnPid(i) => (i, SeccompCmpOp::Eq, pid),
                };
                SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(err)
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(list) = slot.as_mut() {
            list.push(SeccompRule::new(conds).map_err(err)?);
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
        .map_err(|e: seccompiler::BackendError| err(e))
}

/// The BPF programs of a policy: one fence per errno of `fenced`, then the
/// allowlist `allow`, whose mismatches get `on_mismatch` (Trap or Log).
/// `pid` is what [`Cond::OwnPid`] compares with (the caller's pid).
pub fn build(
    allow: &[Syscall],
    fenced: &[(libc::c_long, i32)],
    on_mismatch: SeccompAction,
    pid: u64,
) -> Result<Vec<BpfProgram>> {
    let mut programs = Vec::new();
    let mut errnos: Vec<i32> = fenced.iter().map(|&(_, e)| e).collect();
    errnos.sort_unstable();
    errnos.dedup();
    for errno in errnos {
        let these = fenced
            .iter()
            .filter(|&&(_, e)| e == errno)
            .map(|&(nr, _)| (nr as i64, Vec::new()))
            .collect();
        let filter = SeccompFilter::new(
            these,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch()?,
        )
        .map_err(err)?;
        programs.push(compile(filter)?);
    }
    let allow = SeccompFilter::new(
        rules(allow, pid)?,
        on_mismatch,
        SeccompAction::Allow,
        arch()?,
    )
    .map_err(err)?;
    programs.push(compile(allow)?);
    Ok(programs)
}

/// This process's pid, for [`build`].
pub fn own_pid() -> u64 {
    // SAFETY: getpid cannot fail.
    (unsafe { libc::getpid() }) as u64
}

/// Installs `programs` on every thread of the process (TSYNC).
pub fn apply_all_threads(programs: &[BpfProgram]) -> Result<()> {
    for program in programs {
        seccompiler::apply_filter_all_threads(program).map_err(err)?;
    }
    Ok(())
}

/// Installs `programs` on the calling thread (and the threads it starts
/// later).
pub fn apply_this_thread(programs: &[BpfProgram]) -> Result<()> {
    for program in programs {
        seccompiler::apply_filter(program).map_err(err)?;
    }
    Ok(())
}

/// The program named in the SIGSYS report ("<program> jail: ...").
static REPORT_PROGRAM: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static REPORT_PROGRAM_LEN: AtomicUsize = AtomicUsize::new(0);
/// A second descriptor for the SIGSYS report, e.g. a log file (-1: stderr only).
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

/// A syscall number no kernel defines, hence in no allowlist.
const NO_SUCH_SYSCALL: libc::c_long = 0x3fff;

/// The SIGSYS handler: reports the refused syscall, then makes SIGSYS kill
/// the process (SA_RESETHAND restored the default action on entry).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // `si_syscall` of the SIGSYS member of siginfo_t's union: after the
    // three ints and padding (16 bytes) and `si_call_addr` (a pointer).
    const SYSCALL_OFFSET: usize = 16 + std::mem::size_of::<usize>();
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers,
    // and for SIGSYS from seccomp that member is the one filled in.
    let nr = unsafe { *(info.cast::<u8>().add(SYSCALL_OFFSET).cast::<libc::c_int>()) };
    let program = REPORT_PROGRAM.load(Ordering::Relaxed);
    let program: &[u8] = if program.is_null() {
        b"flotilla"
    } else {
        // SAFETY: set together with its length from a `&'static [u8]` by
        // `install_reporter`.
        unsafe { std::slice::from_raw_parts(program, REPORT_PROGRAM_LEN.load(Ordering::Relaxed)) }
    };
    let mut digits = [0u8; 20];
    let mut line = [0u8; 96];
    let mut len = 0;
    for part in [
        program,
        &b" jail: seccomp refused syscall "[..],
        decimal(nr as u64, &mut digits),
        &b"; the process dies of SIGSYS\n"[..],
    ] {
        let n = part.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write is async-signal-safe and allowed by every policy; `line`
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

/// Installs the process-wide SIGSYS reporter: "`program` jail: seccomp
/// refused syscall N; the process dies of SIGSYS" on stderr and, when given,
/// on `also_fd`; then the process dies of SIGSYS. Install it before any
/// filter; the policies refuse rt_sigaction on SIGSYS, so it stays.
pub fn install_reporter(program: &'static str, also_fd: Option<i32>) -> Result<()> {
    REPORT_PROGRAM_LEN.store(program.len(), Ordering::Relaxed);
    REPORT_PROGRAM.store(program.as_ptr().cast_mut(), Ordering::Relaxed);
    REPORT_FD.store(also_fd.unwrap_or(-1), Ordering::Relaxed);
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
    Ok(())
}

/// Syscalls no flotilla policy may allow, on any thread: exec, fork, new
/// sockets and listening, tracing and signalling other processes, mounts
/// and namespaces, other processes' memory, BPF, seccomp itself, keys,
/// modules. Each process's tests check its lists against these (and against
/// its own extras).
pub const ESCAPE_HATCHES: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_ptrace,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_bpf,
    libc::SYS_seccomp,
    libc::SYS_keyctl,
    libc::SYS_init_module,
];

/// The escape hatches (and `also`, a process's own forbidden extras) that `list` allows;
/// empty for a sound policy. Shared by every process's policy tests.
pub fn escape_hatches_in(list: &[Syscall], also: &[libc::c_long]) -> Vec<libc::c_long> {
    ESCAPE_HATCHES
        .iter()
        .chain(also)
        .copied()
        .filter(|&nr| list.iter().any(|s| s.nr == nr as i64))
        .collect()
}

/// A fenced list as (name, errno) pairs, in order, for tests that pin it.
pub fn describe_fenced(fenced: &[(libc::c_long, i32)]) -> Vec<(String, i32)> {
    fenced
        .iter()
        .map(|&(nr, errno)| {
            let name = name(nr as i64).map_or_else(|| format!("syscall {nr}"), str::to_owned);
            (name, errno)
        })
        .collect()
}

/// The allowlist `entries` as sorted text, one line per entry, for unit
/// tests that pin a policy ("read", "ioctl arg1 == 0x5421", ...; "syscall
/// N" where [`name`] does not know the syscall).
pub fn describe(entries: &[Syscall]) -> Vec<String> {
    let mut lines: Vec<String> = entries
        .iter()
        .map(|e| {
            let mut line = name(e.nr).map_or_else(|| format!("syscall {}", e.nr), str::to_owned);
            for (i, c) in e.conds().iter().enumerate() {
                line.push_str(if i == 0 { " " } else { " && " });
                line.push_str(&match *c {
                    Cond::Eq(a, v) => format!("arg{a} == {v:#x}"),
                    Cond::Ne(a, v) => format!("arg{a} != {v:#x}"),
                    Cond::MaskedEq(a, m, v) => format!("arg{a} & {m:#x} == {v:#x}"),
                    Cond::OwnPid(a) => format!("arg{a} == own pid"),
                });
            }
            line
        })
        .collect();
    lines.sort();
    lines.dedup();
    lines
}

macro_rules! names {
    ($nr:ident; $($(#[$attr:meta])* $sys:ident),* $(,)?) => {{
        $(
            $(#[$attr])*
            if $nr == libc::$sys as i64 {
                return Some(&stringify!($sys)[4..]);
            }
        )*
    }};
}

/// The name of syscall `nr` for [`describe`], for the syscalls flotilla's
/// policies name (None for others).
pub fn name(nr: i64) -> Option<&'static str> {
    names!(nr;
        SYS_accept4, SYS_brk, SYS_clock_gettime, SYS_clock_nanosleep, SYS_clone, SYS_clone3,
        SYS_close, SYS_dup, SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait, SYS_eventfd2,
        SYS_exit, SYS_exit_group, SYS_fallocate, SYS_fcntl, SYS_fdatasync, SYS_fstat,
        SYS_fstatfs, SYS_fsync, SYS_ftruncate, SYS_futex, SYS_getegid, SYS_geteuid,
        SYS_getgid, SYS_getpid, SYS_getrandom, SYS_getsockopt, SYS_gettid, SYS_gettimeofday,
        SYS_getuid, SYS_io_uring_enter, SYS_io_uring_register, SYS_io_uring_setup, SYS_ioctl,
        SYS_lseek, SYS_madvise, SYS_memfd_create, SYS_mmap, SYS_mprotect, SYS_mremap,
        SYS_munmap, SYS_nanosleep, SYS_newfstatat, SYS_openat, SYS_openat2, SYS_ppoll,
        SYS_prctl, SYS_pread64, SYS_preadv, SYS_preadv2, SYS_pwrite64, SYS_pwritev,
        SYS_pwritev2, SYS_read, SYS_readv, SYS_recvfrom, SYS_recvmsg, SYS_restart_syscall,
        SYS_rseq, SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_rt_sigtimedwait,
        SYS_sched_getaffinity, SYS_sched_yield, SYS_sendmsg, SYS_sendto, SYS_set_robust_list,
        SYS_shutdown, SYS_sigaltstack, SYS_socketpair, SYS_statx, SYS_tgkill,
        SYS_timerfd_create, SYS_timerfd_gettime, SYS_timerfd_settime, SYS_unlinkat, SYS_write,
        SYS_writev,
        #[cfg(target_arch = "x86_64")] SYS_creat,
        #[cfg(target_arch = "x86_64")] SYS_epoll_wait,
        #[cfg(target_arch = "x86_64")] SYS_open,
        #[cfg(target_arch = "x86_64")] SYS_poll,
        #[cfg(target_arch = "x86_64")] SYS_unlink,
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unconditional_entries_win_and_conditions_accumulate() {
        let map = rules(
            &[
                Syscall::arg_eq(libc::SYS_ioctl, 1, 1),
                Syscall::arg_eq(libc::SYS_ioctl, 1, 2),
                Syscall::arg_eq(libc::SYS_read, 0, 1),
                Syscall::any(libc::SYS_read),
            ],
            1,
        )
        .unwrap();
        assert_eq!(map[&(libc::SYS_ioctl as i64)].len(), 2);
        assert!(map[&(libc::SYS_read as i64)].is_empty());
    }

    #[test]
    fn one_program_per_errno_then_the_allowlist() {
        let fenced = [
            (libc::SYS_openat, libc::EACCES),
            (libc::SYS_unlinkat, libc::EACCES),
            (libc::SYS_clone3, libc::ENOSYS),
        ];
        let allow = [Syscall::any(libc::SYS_read)];
        for action in [SeccompAction::Trap, SeccompAction::Log] {
            assert_eq!(build(&allow, &fenced, action, 1).unwrap().len(), 3);
        }
    }

    #[test]
    fn describe_spells_out_every_condition() {
        const KVM: &[Cond] = &[Cond::MaskedEq(1, 0xff00, 0xae00), Cond::Ne(1, 0xae80)];
        let text = describe(&[
            Syscall::all(libc::SYS_ioctl, KVM),
            Syscall::when(libc::SYS_tgkill, Cond::OwnPid(0)),
            Syscall::any(libc::SYS_read),
            Syscall::any(libc::SYS_execve),
        ]);
        assert_eq!(
            text,
            [
                "ioctl arg1 & 0xff00 == 0xae00 && arg1 != 0xae80".to_string(),
                "read".to_string(),
                format!("syscall {}", libc::SYS_execve),
                "tgkill arg0 == own pid".to_string(),
            ]
        );
    }

    #[test]
    fn decimal_formats() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(59, &mut b), b"59");
        assert_eq!(decimal(u64::MAX, &mut b), b"18446744073709551615");
    }
}
