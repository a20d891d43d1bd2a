//! flotilla-balloon's seccomp policy: the syscalls a balloon needs on top of
//! the shared backend base (`flotilla_backend::jail::policy::BASE`).
//!
//! Inflated pages are punched out of the guest memory file, always with
//! `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: the filter pins that mode,
//! so a compromised balloon cannot grow, shrink or preallocate the guest's
//! memory file (only give pages back, which the guest can do anyway).
//! fstatfs is the hugetlbfs check on SET_MEM_TABLE; the stats timer's
//! timerfd calls and the munmap/mmap of memory-table fds are in the base.

use flotilla_backend::jail::{SeccompPolicy, Syscall};

/// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`, fallocate's second argument.
const PUNCH_HOLE_KEEP_SIZE: u64 = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64;

/// The syscalls of a balloon backend beyond the base allowlist.
const BALLOON: &[Syscall] = &[
    Syscall::arg_eq(libc::SYS_fallocate, 1, PUNCH_HOLE_KEEP_SIZE),
    Syscall::any(libc::SYS_fstatfs),
];

/// The policy flotilla-balloon's jail installs.
pub fn policy() -> SeccompPolicy {
    SeccompPolicy::new("flotilla-balloon", BALLOON)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_punch_mode_is_the_one_release_uses() {
        assert_eq!(super::PUNCH_HOLE_KEEP_SIZE, 3);
    }

    /// The device's entries beyond the base, pinned: a change to the
    /// policy must change this list too.
    #[test]
    fn the_policy_is_pinned() {
        assert_eq!(
            flotilla_backend::jail::seccomp::describe(&super::policy().syscalls),
            ["fallocate arg1 == 0x3", "fstatfs"]
        );
    }
}
