//! flotilla end-to-end test harness.
//!
//! Booting a real guest needs a hardware-assisted KVM. The development and
//! CI machines only have PVM (see `/work/shared/TESTING.md`), so every command
//! that runs a VMM goes through [`KvmHost`]: directly on the host when it has
//! `kvm_intel`/`kvm_amd`, otherwise inside one nested "L1" QEMU-TCG VM per
//! test process that shares the host's root file system (same paths).
//!
//! Layers, bottom up:
//! - [`paths`]: where the workspace, cargo's target dir and the image cache are;
//! - [`images`]: builds the guest and L1 boot images (`tests/guest/build.sh`);
//! - [`process`]: local child processes with timeouts and parent-death signals;
//! - [`host`] / [`l1`]: the KVM host and its command agent;
//! - [`guest`]: boots a test guest under flotilla-vmm or QEMU and parses its
//!   serial output, so tests read like the scenario they check.

pub mod blk;
pub mod elf;
pub mod error;
pub mod guest;
pub mod host;
pub mod images;
pub mod l1;
pub mod paths;
pub mod process;

pub use error::{Error, Result};
pub use guest::{boot_guest, GuestConfig, GuestRun, Vmm, GUEST_TIMEOUT};
pub use host::{KvmHost, Output};
pub use images::{
    extend_initramfs, guest_images, iperf3_guest_images, l1_images, rootfs_image, Images, RootFs,
};

/// Quotes `s` for a POSIX shell command line (single quotes, `'` escaped).
///
/// Commands reach the KVM host as one `sh -c` string, so every path and
/// argument the harness interpolates goes through here.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/a/b-c.img"), "/a/b-c.img");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
