//! Boots the test guest under a VMM on the KVM host and reads back what the
//! guest init reported on its serial console (`tests/guest/init`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::host::KvmHost;
use crate::images::{self, Images};
use crate::{paths, shell_quote};

/// Per-boot timeout. A boot to init takes ~12 s under QEMU+KVM inside the
/// L1 VM; ten times that only ends a hung VMM.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds between the test guest's `FLOTILLA-GUEST-ALIVE` lines (`tests/guest/init`).
pub const HEARTBEAT_SECS: u32 = 10;

/// Marker the guest init prints once it runs (modules loaded).
pub const INIT_MARKER: &str = "FLOTILLA-GUEST-INIT";

/// Which VMM boots the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    /// `target/<profile>/flotilla-vmm`, the VMM under test.
    Flotilla,
    /// `qemu-system-x86_64 -M microvm,acpi=on -enable-kvm`: the reference that
    /// proves the images and the harness independently of flotilla.
    Qemu,
}

/// Everything about one guest boot. [`boot_guest`] covers the common case.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub vmm: Vmm,
    /// Name of a script in `tests/guest/scenarios/` (without `.sh`).
    pub scenario: String,
    pub mem_mib: u32,
    pub cpus: u32,
    /// Appended to the default kernel command line (later words win, e.g.
    /// `loglevel=7` undoes the default `quiet`).
    pub extra_append: String,
    /// Extra VMM arguments, appended verbatim (already shell-quoted as needed).
    pub extra_args: Vec<String>,
    /// Kernel/initramfs; `None` = the standard test guest images.
    pub images: Option<Images>,
    pub timeout: Duration,
}

impl GuestConfig {
    pub fn new(vmm: Vmm, scenario: &str) -> GuestConfig {
        GuestConfig {
            vmm,
            scenario: scenario.to_string(),
            mem_mib: 256,
            cpus: 1,
            extra_append: String::new(),
            extra_args: Vec::new(),
            images: None,
            timeout: GUEST_TIMEOUT,
        }
    }

    /// The kernel command line: serial console, `reboot=k` (the i8042 reset
    /// line, which both VMMs turn into "VM ended"), `panic=-1` so a guest
    /// panic ends the VM instead of hanging until the timeout, `quiet` to keep
    /// serial traffic (slow: an exit per byte) down, the scenario name, and a heartbeat
    /// every [`HEARTBEAT_SECS`] (a guest that stops beating froze as a whole:
    /// `tests/l1/flotilla-agent` tells that from a stuck device on a timeout).
    pub fn kernel_cmdline(&self) -> String {
        let mut s = format!(
            "console=ttyS0 reboot=k panic=-1 quiet flotilla.heartbeat={HEARTBEAT_SECS} flotilla.scenario={}",
            self.scenario
        );
        if !self.extra_append.is_empty() {
            s.push(' ');
            s.push_str(&self.extra_append);
        }
        s
    }

    /// The full shell command line that runs the VMM with this guest.
    pub fn command_line(&self, images: &Images) -> String {
        let kernel = shell_quote(&images.kernel.to_string_lossy());
        let initrd = shell_quote(&images.initramfs.to_string_lossy());
        let append = shell_quote(&self.kernel_cmdline());
        let mut line = match self.vmm {
            Vmm::Flotilla => format!(
                "{} -kernel {kernel} -initrd {initrd} -append {append} -m {} -smp {} -serial stdio -name flotilla-test",
                shell_quote(&paths::vmm_binary().to_string_lossy()),
                self.mem_mib,
                self.cpus
            ),
            Vmm::Qemu => format!(
                "{} -M microvm,acpi=on -enable-kvm -cpu host -m {} -smp {} -nodefaults -no-user-config \
                 -nographic -no-reboot -serial stdio -kernel {kernel} -initrd {initrd} -append {append}",
                shell_quote(&paths::qemu_binary()),
                self.mem_mib,
                self.cpus
            ),
        };
        for arg in &self.extra_args {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }

    /// Boots the guest on the [`KvmHost`] and waits for the VMM to exit.
    pub fn run(&self) -> Result<GuestRun> {
        let images = match &self.images {
            Some(i) => i.clone(),
            None => images::guest_images()?,
        };
        if self.vmm == Vmm::Flotilla {
            let vmm = paths::vmm_binary();
            if !vmm.is_file() {
                return Err(Error::Missing {
                    what: "flotilla-vmm",
                    path: vmm,
                    hint: " (build it: cargo build -p vmm)",
                });
            }
        }
        // Pinned like every L2 VMM on the nested KVM host (`L2_PIN_VAR`).
        let command = format!(
            "${} {}",
            crate::host::L2_PIN_VAR,
            self.command_line(&images)
        );
        let output = KvmHost::get().run(&command, self.timeout)?;
        Ok(GuestRun {
            vmm: self.vmm,
            command,
            status: output.status,
            serial_output: clean(&output.stdout),
            stderr: clean(&output.stderr),
            elapsed: output.elapsed,
        })
    }
}

/// Boots the standard test guest running `scenario` with `mem_mib` MiB and
/// `cpus` vCPUs under `vmm`, `extra_append` added to the kernel command line.
pub fn boot_guest(
    vmm: Vmm,
    scenario: &str,
    mem_mib: u32,
    cpus: u32,
    extra_append: &str,
) -> Result<GuestRun> {
    GuestConfig {
        mem_mib,
        cpus,
        extra_append: extra_append.to_string(),
        ..GuestConfig::new(vmm, scenario)
    }
    .run()
}

/// The outcome of one guest boot.
#[derive(Debug, Clone)]
pub struct GuestRun {
    pub vmm: Vmm,
    /// The VMM command line that was run.
    pub command: String,
    /// The VMM's exit status.
    pub status: i32,
    /// The guest's serial console (the VMM's stdout), `\r` removed.
    pub serial_output: String,
    /// The VMM's stderr.
    pub stderr: String,
    /// Wall time of the VMM run on the KVM host (plus the agent round trip).
    pub elapsed: Duration,
}

impl GuestRun {
    /// The guest init ran.
    pub fn saw_init(&self) -> bool {
        self.serial_output.contains(INIT_MARKER)
    }

    /// Value of `FLOTILLA-RESULT key=value`, the first one with that key.
    /// Markers are searched anywhere in a line: a kernel message may have
    /// been printed in front of them.
    pub fn result(&self, key: &str) -> Option<&str> {
        self.marked("FLOTILLA-RESULT ", key)
    }

    /// `status` of `FLOTILLA-SCENARIO-END` (absent when the scenario ended
    /// the machine itself, or never finished).
    pub fn scenario_status(&self) -> Option<i32> {
        self.marked("FLOTILLA-SCENARIO-END ", "status")?
            .parse()
            .ok()
    }

    fn marked(&self, marker: &str, key: &str) -> Option<&str> {
        self.serial_output.lines().find_map(|line| {
            let rest = &line[line.find(marker)? + marker.len()..];
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        })
    }

    /// A kernel panic or oops shows on the console.
    pub fn guest_crashed(&self) -> bool {
        self.serial_output.contains("Kernel panic") || self.serial_output.contains("Oops:")
    }
}

/// For assertion messages: what ran, how it ended, and the output.
impl fmt::Display for GuestRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:?} exited with status {} after {:.1}s",
            self.vmm,
            self.status,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "command: {}", self.command)?;
        writeln!(
            f,
            "--- serial output ---\n{}",
            self.serial_output.trim_end()
        )?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

fn clean(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\r', "")
}

/// Where a test can put scratch files that the KVM host also sees.
///
/// The L1 VM sees the host's files live through 9p, so files written here
/// before a command runs are visible to it.
pub fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = paths::log_dir()
        .join("scratch")
        .join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(serial: &str) -> GuestRun {
        GuestRun {
            vmm: Vmm::Qemu,
            command: String::new(),
            status: 0,
            serial_output: serial.to_string(),
            stderr: String::new(),
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn parses_guest_markers() {
        let r = run("[ 0.1] x\nFLOTILLA-GUEST-INIT kernel=6.1 scenario=cpus\n\
                     [ 0.2] noise FLOTILLA-RESULT cpus=2\nFLOTILLA-RESULT memtotal_kb=1\n\
                     FLOTILLA-SCENARIO-END name=cpus status=0\n");
        assert!(r.saw_init());
        assert_eq!(r.result("cpus"), Some("2"));
        assert_eq!(r.result("memtotal_kb"), Some("1"));
        assert_eq!(r.result("cpu"), None);
        assert_eq!(r.scenario_status(), Some(0));
        assert!(!r.guest_crashed());
        let r = run("Kernel panic - not syncing: x\n");
        assert!(!r.saw_init() && r.guest_crashed() && r.scenario_status().is_none());
    }

    #[test]
    fn command_lines() {
        let images = Images {
            kernel: "/k".into(),
            initramfs: "/i".into(),
        };
        let mut c = GuestConfig::new(Vmm::Qemu, "boot");
        c.extra_append = "reboot=t".into();
        let line = c.command_line(&images);
        assert!(line.contains("-M microvm,acpi=on -enable-kvm"), "{line}");
        assert!(
            line.ends_with(
                "-append 'console=ttyS0 reboot=k panic=-1 quiet flotilla.heartbeat=10 flotilla.scenario=boot reboot=t'"
            ),
            "{line}"
        );
        let line = GuestConfig::new(Vmm::Flotilla, "cpus").command_line(&images);
        assert!(
            line.contains("flotilla-vmm -kernel /k -initrd /i -append"),
            "{line}"
        );
        assert!(
            line.ends_with("-m 256 -smp 1 -serial stdio -name flotilla-test"),
            "{line}"
        );
    }
}
