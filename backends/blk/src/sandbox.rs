//! flotilla-blk's seccomp policy: the syscalls a block device needs on top
//! of the shared backend base (`flotilla_backend::jail::policy::BASE`).
//!
//! Everything here acts on the image fd the process already holds: the
//! io_uring engine (setup, submit, eventfd registration), flushes and
//! discards. Found by running the host tests under `--seccomp log` and
//! `strace -f`; the jail's escape tests prove what stays out.

use flotilla_backend::jail::{SeccompPolicy, Syscall};

/// The syscalls of a block backend beyond the base allowlist.
const BLOCK: &[Syscall] = &[
    // io_uring engine (the default).
    Syscall::any(libc::SYS_io_uring_setup),
    Syscall::any(libc::SYS_io_uring_enter),
    Syscall::any(libc::SYS_io_uring_register),
    // FLUSH, DISCARD / WRITE_ZEROES (punch hole, zero range).
    Syscall::any(libc::SYS_fsync),
    Syscall::any(libc::SYS_fdatasync),
    Syscall::any(libc::SYS_fallocate),
];

/// The policy flotilla-blk's jail installs.
pub fn policy() -> SeccompPolicy {
    SeccompPolicy::new("flotilla-blk", BLOCK)
}

#[cfg(test)]
mod tests {
    /// The device's entries beyond the base, pinned: a change to the
    /// policy must change this list too.
    #[test]
    fn the_policy_is_pinned() {
        assert_eq!(
            flotilla_backend::jail::seccomp::describe(&super::policy().syscalls),
            [
                "fallocate",
                "fdatasync",
                "fsync",
                "io_uring_enter",
                "io_uring_register",
                "io_uring_setup"
            ]
        );
    }
}
