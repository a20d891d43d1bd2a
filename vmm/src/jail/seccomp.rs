//! The core's seccomp filters, one allowlist per thread role, kept as data.
//!
//! Every thread gets two filters (like the backends', built and installed by the same code,
//! `flotilla_backend::jail::seccomp`):
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

use std::collections::HashMap;

pub use flotilla_backend::jail::seccomp::Cond;
use flotilla_backend::jail::seccomp::{self as shared, BpfProgram, SeccompAction, Syscall};

use super::JailError;

/// One allowlist entry: a syscall and the conditions (all must hold) on its arguments.
/// Several entries for one syscall allow it when any of them matches.
pub type Entry = Syscall;

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

const fn any(nr: libc::c_long) -> Entry {
    Syscall::all(nr, &[])
}

const fn with(nr: libc::c_long, conds: &'static [Cond]) -> Entry {
    Syscall::all(nr, conds)
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

/// The BPF programs of `role`: one fence per errno, then the allowlist.
pub fn build(role: Role, pid: u64) -> Result<Vec<BpfProgram>, JailError> {
    Ok(shared::build(
        &role.allowlist(),
        FENCED,
        SeccompAction::Trap,
        pid,
    )?)
}

/// The compiled filters of every role, built once when the core is jailed.
pub struct Programs(HashMap<Role, Vec<BpfProgram>>);

impl Programs {
    /// Compiles every role's filters for this process.
    pub fn build() -> Result<Self, JailError> {
        let pid = shared::own_pid();
        Role::ALL
            .iter()
            .map(|&r| Ok((r, build(r, pid)?)))
            .collect::<Result<_, _>>()
            .map(Programs)
    }

    /// Installs `role`'s filters on the calling thread.
    pub fn apply(&self, role: Role) -> Result<(), JailError> {
        Ok(shared::apply_this_thread(
            self.0.get(&role).map_or(&[], Vec::as_slice),
        )?)
    }
}

/// Installs the SIGSYS reporter (process-wide, before any filter): "flotilla-vmm jail:
/// seccomp refused syscall N" on stderr, then the process dies of SIGSYS.
pub fn install_reporter() -> Result<(), JailError> {
    Ok(shared::install_reporter("flotilla-vmm", None)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_role_allows_an_escape_hatch() {
        for role in Role::ALL {
            let list = role.allowlist();
            // socketpair (AF_UNIX) stays for the control thread.
            let allowed = shared::escape_hatches_in(&list, &[libc::SYS_memfd_create]);
            assert!(allowed.is_empty(), "{role:?} allows {allowed:?}");
        }
    }

    #[test]
    fn only_vcpus_run_the_guest_and_only_control_makes_threads() {
        let has = |role: Role, nr: libc::c_long, cond: Cond| {
            role.allowlist()
                .iter()
                .any(|e| e.nr == nr as i64 && e.conds().contains(&cond))
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

    /// Every role's allowlist, entry by entry: a change to a list must change this test too,
    /// so a refactor cannot widen a thread's allowlist unnoticed.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_roles_allowlist_is_pinned() {
        let common = "\
            brk
            clock_gettime
            clock_nanosleep
            clone3
            close
            creat
            eventfd2
            exit
            exit_group
            fcntl
            fstat
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
            ioctl arg1 & 0xff00 == 0xae00 && arg1 != 0xae80
            ioctl arg1 == 0x5401
            ioctl arg1 == 0x5421
            ioctl arg1 == 0x5451
            lseek
            madvise
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
            read
            readv
            recvfrom
            recvmsg
            restart_syscall
            rseq
            rt_sigaction arg0 != 0x1f
            rt_sigprocmask
            rt_sigreturn
            sched_getaffinity
            sched_yield
            sendmsg
            sendto
            set_robust_list
            shutdown
            sigaltstack
            statx
            tgkill arg0 == own pid
            write
            writev
";
        let common: Vec<&str> = common.lines().map(str::trim).collect();
        assert_eq!(shared::describe(COMMON), common);
        let extra: [(Role, &[&str]); 6] = [
            (
                Role::Main,
                &[
                    "ioctl arg1 == 0x5402",
                    "ioctl arg1 == 0x5403",
                    "ioctl arg1 == 0x5404",
                ],
            ),
            (Role::Vcpu, &["ioctl arg1 == 0xae80"]),
            (
                Role::Control,
                &[
                    "clone arg0 & 0x10000 == 0x10000",
                    "pread64",
                    "preadv",
                    "socketpair arg0 == 0x1",
                ],
            ),
            (Role::BackendRequest, &[]),
            (Role::Events, &[]),
            (Role::SerialInput, &[]),
        ];
        for (role, pinned) in extra {
            assert_eq!(shared::describe(role.extra()), pinned, "{role:?}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_fenced_calls_are_pinned() {
        let (eacces, enosys) = (libc::EACCES, libc::ENOSYS);
        assert_eq!(
            shared::describe_fenced(FENCED),
            [
                ("open", eacces),
                ("creat", eacces),
                ("openat", eacces),
                ("openat2", eacces),
                ("clone3", enosys),
            ]
            .map(|(name, errno)| (name.to_string(), errno))
        );
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
