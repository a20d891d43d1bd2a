//! The core's seccomp filters, one allowlist per thread role, kept as data.
//!
//! Every thread gets two filters (like the backends', `backends/src/jail/seccomp.rs`):
//!
//! - the *fence*: path opens fail with EACCES (a library probing a file carries on; the
//!   core opens nothing after set-up) and clone3 with ENOSYS (its flags sit in memory where
//!   seccomp cannot read them; glibc falls back to clone, whose flags the allowlist checks:
//!   threads only, never a process);
//! - the *allowlist* of its [`Role`]: [`COMMON`] plus the role's own entries. Anything else
//!   traps: the SIGSYS handler writes "seccomp refused syscall N" to stderr and the process
//!   dies of SIGSYS.
//!
//! ioctl is filtered by request: KVM's own (type 0xAE) and FIONBIO/FIOCLEX/TCGETS on every
//! thread, KVM_RUN only on vCPU threads, terminal writes (TCSETS*) only on the main thread
//! (it restores the terminal at exit). TIOCSTI and every other device's ioctls are refused.

// libc's syscall numbers and ioctl constants change type with the architecture; the casts
// keep this file the same on all of them.
#![allow(clippy::unnecessary_cast)]

use std::collections::{BTreeMap, HashMap};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::JailError;

/// What a thread of the core does, hence which syscalls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `main`: waits for the VM to end, reports SHUTDOWN, restores the terminal, exits.
    Main,
    /// A vCPU: KVM_RUN, port and MMIO exits (legacy devices, virtio-mmio, vhost-user set-up
    /// when the guest starts a device), serial output, the SIGRTMIN kick of `stop`.
    Vcpu,
    /// The control channel: requests with SCM_RIGHTS, replies and events, system_reset
    /// (re-reading the kernel and initrd from the descriptors kept open), backend attach
    /// (a socketpair and a thread per backend for its request channel).
    Control,
    /// A backend's request channel (FrontendReqHandler): messages and interrupts.
    BackendRequest,
    /// Device event threads (balloon-events): channel waits and control-socket writes.
    Events,
    /// The serial input thread: reads stdin into the UART.
    SerialInput,
}

/// A condition on one syscall argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// Argument `index` equals the value.
    Eq(u8, u64),
    /// Argument `index` differs from the value.
    Ne(u8, u64),
    /// `argument & mask == value`.
    MaskedEq(u8, u64, u64),
    /// Argument `index` is this process's pid.
    OwnPid(u8),
}

/// One allowlist entry: a syscall and the conditions (all must hold) on its arguments.
/// Several entries for one syscall allow it when any of them matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The syscall number.
    pub nr: i64,
    /// Conditions, all of which must hold; none: any arguments.
    pub conds: &'static [Cond],
}

const fn any(nr: libc::c_long) -> Entry {
    Entry {
        nr: nr as i64,
        conds: &[],
    }
}

const fn with(nr: libc::c_long, conds: &'static [Cond]) -> Entry {
    Entry {
        nr: nr as i64,
        conds,
    }
}

/// `_IOC_TYPE` bits of an ioctl request, and KVM's type.
const IOC_TYPE_MASK: u64 = 0xff00;
const KVMIO_TYPE: u64 = 0xae00;
/// KVM_RUN = _IO(KVMIO, 0x80).
pub const KVM_RUN: u64 = 0xae80;
const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;

/// What every thread of the core may do: memory, futexes, its own signals, time, reads and
/// writes on descriptors it holds, vhost-user messages on connected sockets, poll, eventfds,
/// KVM ioctls other than KVM_RUN. No open, socket, connect, bind, exec, fork, ptrace, kill,
/// mount, memfd_create.
pub const COMMON: &[Entry] = &[
    // Memory.
    any(libc::SYS_brk),
    any(libc::SYS_mmap),
    any(libc::SYS_munmap),
    any(libc::SYS_mremap),
    any(libc::SYS_mprotect),
    any(libc::SYS_madvise),
    // Threads, futexes.
    any(libc::SYS_futex),
    any(libc::SYS_set_robust_list),
    any(libc::SYS_rseq),
    any(libc::SYS_sched_yield),
    any(libc::SYS_sched_getaffinity),
    with(libc::SYS_prctl, &[Cond::Eq(0, libc::PR_SET_NAME as u64)]),
    with(libc::SYS_prctl, &[Cond::Eq(0, libc::PR_GET_NAME as u64)]),
    any(libc::SYS_exit),
    any(libc::SYS_exit_group),
    any(libc::SYS_getpid),
    any(libc::SYS_gettid),
    any(libc::SYS_getuid),
    any(libc::SYS_geteuid),
    any(libc::SYS_getgid),
    any(libc::SYS_getegid),
    // Signals: own process only (the vCPU kick is a tgkill); SIGSYS's handler stays.
    with(libc::SYS_rt_sigaction, &[Cond::Ne(0, libc::SIGSYS as u64)]),
    any(libc::SYS_rt_sigprocmask),
    any(libc::SYS_rt_sigreturn),
    any(libc::SYS_sigaltstack),
    any(libc::SYS_restart_syscall),
    with(libc::SYS_tgkill, &[Cond::OwnPid(0)]),
    // Time.
    any(libc::SYS_clock_gettime),
    any(libc::SYS_clock_nanosleep),
    any(libc::SYS_nanosleep),
    any(libc::SYS_gettimeofday),
    any(libc::SYS_getrandom),
    // Descriptors already held.
    any(libc::SYS_read),
    any(libc::SYS_write),
    any(libc::SYS_readv),
    any(libc::SYS_writev),
    any(libc::SYS_lseek),
    any(libc::SYS_close),
    any(libc::SYS_fcntl),
    any(libc::SYS_fstat),
    any(libc::SYS_newfstatat),
    any(libc::SYS_statx),
    any(libc::SYS_eventfd2),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_poll),
    any(libc::SYS_ppoll),
    // vhost-user and control messages on connected sockets.
    any(libc::SYS_recvmsg),
    any(libc::SYS_sendmsg),
    any(libc::SYS_recvfrom),
    any(libc::SYS_sendto),
    any(libc::SYS_shutdown),
    any(libc::SYS_getsockopt),
    // ioctl: KVM's (except KVM_RUN), non-blocking/close-on-exec, reading terminal modes.
    with(
        libc::SYS_ioctl,
        &[
            Cond::MaskedEq(1, IOC_TYPE_MASK, KVMIO_TYPE),
            Cond::Ne(1, KVM_RUN),
        ],
    ),
    with(libc::SYS_ioctl, &[Cond::Eq(1, libc::FIONBIO as u64)]),
    with(libc::SYS_ioctl, &[Cond::Eq(1, libc::FIOCLEX as u64)]),
    with(libc::SYS_ioctl, &[Cond::Eq(1, libc::TCGETS as u64)]),
    // Fenced to errnos by the first filter (see the module comment).
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_open),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_creat),
    any(libc::SYS_openat),
    any(libc::SYS_openat2),
    any(libc::SYS_clone3),
];

/// vCPU threads: running the guest.
const VCPU: &[Entry] = &[with(libc::SYS_ioctl, &[Cond::Eq(1, KVM_RUN)])];

/// The control thread: attach a backend (a socketpair and a thread for its request
/// channel), system_reset (pread of the kernel and initrd).
const CONTROL: &[Entry] = &[
    with(libc::SYS_socketpair, &[Cond::Eq(0, libc::AF_UNIX as u64)]),
    with(
        libc::SYS_clone,
        &[Cond::MaskedEq(0, CLONE_THREAD, CLONE_THREAD)],
    ),
    any(libc::SYS_pread64),
    any(libc::SYS_preadv),
];

/// The main thread: restoring the terminal's modes at exit.
const MAIN: &[Entry] = &[
    with(libc::SYS_ioctl, &[Cond::Eq(1, libc::TCSETS as u64)]),
    with(libc::SYS_ioctl, &[Cond::Eq(1, libc::TCSETSW as u64)]),
    with(libc::SYS_ioctl, &[Cond::Eq(1, libc::TCSETSF as u64)]),
];

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::Main,
        Role::Vcpu,
        Role::Control,
        Role::BackendRequest,
        Role::Events,
        Role::SerialInput,
    ];

    /// The role's entries beyond [`COMMON`].
    pub fn extra(self) -> &'static [Entry] {
        match self {
            Role::Main => MAIN,
            Role::Vcpu => VCPU,
            Role::Control => CONTROL,
            Role::BackendRequest | Role::Events | Role::SerialInput => &[],
        }
    }

    /// The role's whole allowlist.
    pub fn allowlist(self) -> Vec<Entry> {
        COMMON.iter().chain(self.extra()).copied().collect()
    }
}

/// Syscalls that fail with an errno instead of killing: (number, errno).
const FENCED: &[(libc::c_long, i32)] = &[
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_open, libc::EACCES),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_creat, libc::EACCES),
    (libc::SYS_openat, libc::EACCES),
    (libc::SYS_openat2, libc::EACCES),
    (libc::SYS_clone3, libc::ENOSYS),
];

fn err(e: impl std::fmt::Display) -> JailError {
    JailError::Seccomp(e.to_string())
}

fn arch() -> Result<TargetArch, JailError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e))
}

/// seccompiler's rule map for `entries`; `pid` is what [`Cond::OwnPid`] compares with.
fn rules(entries: &[Entry], pid: u64) -> Result<BTreeMap<i64, Vec<SeccompRule>>, JailError> {
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for e in entries {
        let slot = map.entry(e.nr).or_insert_with(|| Some(Vec::new()));
        if e.conds.is_empty() {
            // An unconditional entry wins over any conditional one.
            *slot = None;
            continue;
        }
        let conds = e
            .conds
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
            .collect::<Result<Vec<_>, _>>()?;
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

fn compile(filter: SeccompFilter) -> Result<BpfProgram, JailError> {
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e))
}

/// The BPF programs of `role`: one fence per errno, then the allowlist.
pub fn build(role: Role, pid: u64) -> Result<Vec<BpfProgram>, JailError> {
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
        let filter = SeccompFilter::new(
            fenced,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch()?,
        )
        .map_err(err)?;
        programs.push(compile(filter)?);
    }
    let allow = SeccompFilter::new(
        rules(&role.allowlist(), pid)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        arch()?,
    )
    .map_err(err)?;
    programs.push(compile(allow)?);
    Ok(programs)
}

/// The compiled filters of every role, built once when the core is jailed.
pub struct Programs(HashMap<Role, Vec<BpfProgram>>);

impl Programs {
    /// Compiles every role's filters for this process.
    pub fn build() -> Result<Self, JailError> {
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() } as u64;
        Role::ALL
            .iter()
            .map(|&r| Ok((r, build(r, pid)?)))
            .collect::<Result<_, _>>()
            .map(Programs)
    }

    /// Installs `role`'s filters on the calling thread.
    pub fn apply(&self, role: Role) -> Result<(), JailError> {
        for program in self.0.get(&role).into_iter().flatten() {
            seccompiler::apply_filter(program).map_err(err)?;
        }
        Ok(())
    }
}

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

/// The SIGSYS handler: reports the refused syscall on stderr, then makes SIGSYS kill the
/// process (SA_RESETHAND restored the default action on entry; the trap of a syscall no
/// filter allows raises it again).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // `si_syscall` of the SIGSYS member of siginfo_t's union: after three ints and padding
    // (16 bytes) and `si_call_addr` (a pointer).
    const SYSCALL_OFFSET: usize = 16 + std::mem::size_of::<usize>();
    // SAFETY: the kernel passes a valid siginfo_t to SA_SIGINFO handlers; for a seccomp
    // SIGSYS the SIGSYS member is the one filled in.
    let nr = unsafe { *(info.cast::<u8>().add(SYSCALL_OFFSET).cast::<libc::c_int>()) };
    let mut digits = [0u8; 20];
    let mut line = [0u8; 96];
    let mut len = 0;
    for part in [
        &b"flotilla-vmm jail: seccomp refused syscall "[..],
        decimal(nr as u64, &mut digits),
        &b"; the process dies of SIGSYS\n"[..],
    ] {
        let n = part.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write is async-signal-safe and allowed on every thread; `line` is valid for
    // `len` bytes; the refused syscall never returns.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::syscall(NO_SUCH_SYSCALL);
    }
}

/// Installs the SIGSYS reporter (process-wide, before any filter).
pub fn install_reporter() -> Result<(), JailError> {
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature and makes
    // only async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(JailError::last("sigaction(SIGSYS)"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_role_allows_an_escape_hatch() {
        for role in Role::ALL {
            let list = role.allowlist();
            for nr in [
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
                libc::SYS_memfd_create,
                libc::SYS_bpf,
                libc::SYS_seccomp,
                libc::SYS_keyctl,
                libc::SYS_init_module,
            ] {
                assert!(
                    !list.iter().any(|e| e.nr == nr as i64),
                    "{role:?} allows syscall {nr}"
                );
            }
        }
    }

    #[test]
    fn only_vcpus_run_the_guest_and_only_control_makes_threads() {
        let has = |role: Role, nr: libc::c_long, cond: Cond| {
            role.allowlist()
                .iter()
                .any(|e| e.nr == nr as i64 && e.conds.contains(&cond))
        };
        for role in Role::ALL {
            assert_eq!(
                has(role, libc::SYS_ioctl, Cond::Eq(1, KVM_RUN)),
                role == Role::Vcpu
            );
            assert_eq!(
                role.allowlist()
                    .iter()
                    .any(|e| e.nr == libc::SYS_clone as i64 || e.nr == libc::SYS_socketpair as i64),
                role == Role::Control,
                "{role:?}"
            );
            assert_eq!(
                has(role, libc::SYS_ioctl, Cond::Eq(1, libc::TCSETS as u64)),
                role == Role::Main
            );
        }
    }

    #[test]
    fn filters_compile_for_every_role() {
        let programs = Programs::build().unwrap();
        for role in Role::ALL {
            assert_eq!(programs.0[&role].len(), 3, "{role:?}");
        }
    }

    #[test]
    fn kvm_run_is_the_number_kvm_uses() {
        // _IO(KVMIO, 0x80)
        assert_eq!(KVM_RUN, (0xae << 8) | 0x80);
    }
}
