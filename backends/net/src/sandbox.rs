//! flotilla-net's seccomp policy: the syscalls a tap-backed NIC needs on top
//! of the shared backend base (`flotilla_backend::jail::policy::BASE`).
//!
//! The base already covers the data path: read/readv/writev on the tap and
//! the eventfds, epoll, poll (`--poll`), recvmsg/sendmsg with SCM_RIGHTS,
//! mmap/munmap of the memory table. What is left is the one tap ioctl the
//! backend issues after set-up: TUNSETOFFLOAD, when the driver acks
//! features (SET_FEATURES) or the device is reset. TUNSETIFF, TUNSETVNETHDRSZ
//! and TUNGETIFF happen before the jail and stay refused: a compromised
//! backend cannot attach the fd to another interface or change the header
//! size under the guest. No socket of any kind.

// libc's ioctl constants change type with the architecture; the cast keeps
// this file the same on all of them.
#![allow(clippy::unnecessary_cast)]

use flotilla_backend::jail::{SeccompPolicy, Syscall};

/// The syscalls of a NIC backend beyond the base allowlist.
const NET: &[Syscall] = &[Syscall::arg_eq(
    libc::SYS_ioctl,
    1,
    libc::TUNSETOFFLOAD as u64,
)];

/// The policy flotilla-net's jail installs.
pub fn policy() -> SeccompPolicy {
    SeccompPolicy::new("flotilla-net", NET)
}

#[cfg(test)]
mod tests {
    /// The device's entries beyond the base, pinned: a change to the
    /// policy must change this list too.
    #[test]
    fn the_policy_is_pinned() {
        assert_eq!(
            flotilla_backend::jail::seccomp::describe(&super::policy().syscalls),
            ["ioctl arg1 == 0x400454d0"]
        );
    }
}
