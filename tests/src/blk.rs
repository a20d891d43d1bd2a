//! Guests with vhost-user block disks: start the backend processes on the KVM
//! host next to the VMM, wire them into its command line, and collect what
//! the host side sees of the images afterwards.
//!
//! Everything runs as one shell script on the [`KvmHost`] (the backends must
//! live where the VMM runs, and the nested L1 VM only sees the host's files
//! read-only): a per-run work directory under the KVM host's `/tmp` holds
//! images, sockets and backend logs, and is removed at the end.
//!
//! ```no_run
//! use flotilla_tests::blk::{Disk, DiskTest};
//! use flotilla_tests::{GuestConfig, Vmm};
//! let mut t = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "vda"));
//! let img = t.path("disk.img");
//! t.setup(&format!("truncate -s 64M {img}"));
//! t.disks.push(Disk::flotilla(&img));
//! t.after(&format!("echo FLOTILLA-RESULT host_md5=$(md5sum <{img} | cut -d' ' -f1)"));
//! let run = t.run().expect("guest run");
//! ```

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::guest::{GuestConfig, GuestRun, Vmm};
use crate::host::{KvmHost, L2_PIN_VAR};
use crate::images::{self, Images};
use crate::{paths, shell_quote};

/// How long a backend may take to create its socket.
const SOCKET_WAIT_TENTHS: u32 = 300;
/// How long a backend may take to exit once the VMM is gone.
const EXIT_WAIT_TENTHS: u32 = 50;

/// A program serving a disk over vhost-user-blk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `target/<profile>/flotilla-blk`, exits when its frontend disconnects.
    Flotilla,
    /// `qemu-storage-daemon` exporting a raw file (`writable=on` unless
    /// read-only); it keeps running until it is killed.
    QemuStorageDaemon,
}

/// One vhost-user disk of a guest, in command-line order (the first is
/// `vda`).
#[derive(Debug, Clone)]
pub struct Disk {
    pub backend: Backend,
    /// The image, as a path on the KVM host (usually [`DiskTest::path`]).
    pub image: String,
    /// Extra backend arguments, each already shell-quoted (flotilla-blk
    /// flags such as `--readonly`, `--serial ABC`).
    pub backend_args: Vec<String>,
    /// Request queues: `--num-queues` for flotilla-blk and `num-queues=` for
    /// the frontend device. `None` leaves both at their default (1).
    pub num_queues: Option<u16>,
    /// Read-only export (`--readonly` / `writable=off`).
    pub readonly: bool,
}

impl Disk {
    /// A disk served by flotilla-blk.
    pub fn flotilla(image: &str) -> Disk {
        Disk {
            backend: Backend::Flotilla,
            image: image.to_string(),
            backend_args: Vec::new(),
            num_queues: None,
            readonly: false,
        }
    }

    /// A disk served by qemu-storage-daemon.
    pub fn qemu_storage_daemon(image: &str) -> Disk {
        Disk {
            backend: Backend::QemuStorageDaemon,
            ..Disk::flotilla(image)
        }
    }

    /// Adds backend arguments (quoted here).
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Disk {
        self.backend_args
            .extend(args.iter().map(|a| shell_quote(a.as_ref())));
        self
    }

    pub fn readonly(mut self) -> Disk {
        self.readonly = true;
        self
    }

    /// The shell command that starts this backend listening on `sock`.
    fn backend_command(&self, sock: &str) -> String {
        let image = shell_quote(&self.image);
        let sock = shell_quote(sock);
        match self.backend {
            Backend::Flotilla => {
                let mut line = format!(
                    "{} --socket-path {sock} --image {image}",
                    shell_quote(&blk_binary().to_string_lossy())
                );
                if self.readonly {
                    line.push_str(" --readonly");
                }
                if let Some(n) = self.num_queues {
                    let _ = write!(line, " --num-queues {n}");
                }
                for a in &self.backend_args {
                    line.push(' ');
                    line.push_str(a);
                }
                line
            }
            Backend::QemuStorageDaemon => {
                // Option values are comma-separated: a comma in a path would
                // have to be doubled. Work directory paths have none.
                let mut export = format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable={}",
                    if self.readonly { "off" } else { "on" }
                );
                if let Some(n) = self.num_queues {
                    let _ = write!(export, ",num-queues={n}");
                }
                let mut line = format!(
                    "qemu-storage-daemon --blockdev driver=file,node-name=f0,filename={image} --export {export}"
                );
                for a in &self.backend_args {
                    line.push(' ');
                    line.push_str(a);
                }
                line
            }
        }
    }

    /// The VMM arguments that attach this disk as disk number `index`
    /// (`qemu_pci`: QEMU's PCI device instead of its virtio-mmio one).
    fn vmm_args(&self, vmm: Vmm, index: usize, sock: &str, qemu_pci: bool) -> Vec<String> {
        let queues = self
            .num_queues
            .map(|n| format!(",num-queues={n}"))
            .unwrap_or_default();
        let chardev = format!("-chardev socket,id=c{index},path={}", shell_quote(sock));
        let device = match vmm {
            Vmm::Flotilla => {
                format!("-device vhost-user-blk-device,id=disk{index},chardev=c{index}{queues}")
            }
            // On microvm the virtio-mmio flavour is plain `vhost-user-blk`.
            Vmm::Qemu if qemu_pci => {
                format!("-device vhost-user-blk-pci,id=disk{index},chardev=c{index}{queues}")
            }
            Vmm::Qemu => format!("-device vhost-user-blk,id=disk{index},chardev=c{index}{queues}"),
        };
        vec![chardev, device]
    }
}

/// `target/<profile>/flotilla-blk` (`$FLOTILLA_BLK` overrides).
pub fn blk_binary() -> std::path::PathBuf {
    paths::program("flotilla-blk")
}

/// A guest boot with vhost-user disks, plus host-side shell steps around it.
#[derive(Debug, Clone)]
pub struct DiskTest {
    pub guest: GuestConfig,
    pub disks: Vec<Disk>,
    /// Work directory on the KVM host (created empty, removed at the end).
    pub work_dir: String,
    /// Under QEMU, attach the disks as `vhost-user-blk-pci` on microvm's
    /// PCIe host bridge (`-machine pcie=on`) instead of virtio-mmio.
    ///
    /// QEMU's virtio-mmio transport offers every guest the largest queue
    /// (QueueNumMax = 1024, whatever `queue-size` says), and flotilla-blk
    /// accepts at most 256 entries (`backends/blk/src/config.rs`
    /// `MAX_QUEUE_SIZE`), so over virtio-mmio QEMU's first SET_VRING_NUM is
    /// refused; over PCI the guest gets QEMU's `queue-size` (128).
    pub qemu_pci: bool,
    setup: Vec<String>,
    after: Vec<String>,
    on_line: Vec<(String, String)>,
}

impl DiskTest {
    /// A run of `guest` with no disks yet, with its own work directory.
    pub fn new(guest: GuestConfig) -> DiskTest {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        DiskTest {
            guest,
            disks: Vec::new(),
            work_dir: format!("/tmp/flotilla-blk-{}-{n}", std::process::id()),
            qemu_pci: false,
            setup: Vec::new(),
            after: Vec::new(),
            on_line: Vec::new(),
        }
    }

    /// `name` inside the work directory (no quoting needed: plain characters).
    pub fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.work_dir)
    }

    /// A shell step before the backends start (create images); the run stops
    /// with an error if it fails.
    pub fn setup(&mut self, command: &str) -> &mut Self {
        self.setup.push(command.to_string());
        self
    }

    /// A shell step after the VMM exited and the backends stopped; what it
    /// prints on stdout joins the serial output, so `FLOTILLA-RESULT k=v`
    /// lines become [`GuestRun::result`]s.
    pub fn after(&mut self, command: &str) -> &mut Self {
        self.after.push(command.to_string());
        self
    }

    /// Runs `command` on the KVM host while the guest runs, as soon as a
    /// serial line contains `marker` (its stdout joins the serial output, so
    /// it can report `FLOTILLA-RESULT` values measured at that moment). The
    /// guest should give it a moment (sleep) before changing what it checks.
    pub fn on_line(&mut self, marker: &str, command: &str) -> &mut Self {
        self.on_line.push((marker.to_string(), command.to_string()));
        self
    }

    fn socket(&self, index: usize) -> String {
        self.path(&format!("d{index}.sock"))
    }

    /// The VMM command line with every disk attached.
    pub fn vmm_command(&self, images: &Images) -> String {
        let mut guest = self.guest.clone();
        if guest.vmm == Vmm::Qemu && !self.disks.is_empty() {
            // vhost-user needs guest memory the backend can map.
            guest.extra_args.push(format!(
                "-object memory-backend-memfd,id=mem,size={}M,share=on -machine memory-backend=mem",
                guest.mem_mib
            ));
            if self.qemu_pci {
                guest.extra_args.push("-machine pcie=on".to_string());
            }
        }
        for (i, disk) in self.disks.iter().enumerate() {
            guest
                .extra_args
                .extend(disk.vmm_args(guest.vmm, i, &self.socket(i), self.qemu_pci));
        }
        guest.command_line(images)
    }

    /// The whole script run on the KVM host.
    pub fn script(&self, images: &Images) -> String {
        let w = shell_quote(&self.work_dir);
        let mut s = String::new();
        let _ = writeln!(s, "PATH=\"$PATH:/sbin:/usr/sbin\"; W={w}; pids=''");
        s.push_str("cleanup() { for p in $pids; do kill $p 2>/dev/null; done; rm -rf \"$W\"; }\n");
        s.push_str("trap cleanup EXIT\nrm -rf \"$W\" && mkdir -p \"$W\" || exit 90\n");
        for step in &self.setup {
            let _ = writeln!(
                s,
                "( {step} ) || {{ echo {} >&2; exit 91; }}",
                shell_quote(&format!("setup step failed: {step}"))
            );
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let sock = shell_quote(&self.socket(i));
            let log = shell_quote(&self.path(&format!("d{i}.log")));
            let _ = writeln!(
                s,
                "rm -f {sock}; ${pin} {cmd} >{log} 2>&1 </dev/null & pid{i}=$!; pids=\"$pids $!\"\n\
                 n=0; until [ -S {sock} ]; do n=$((n+1)); \
                 if [ $n -gt {SOCKET_WAIT_TENTHS} ] || ! kill -0 $pid{i} 2>/dev/null; then \
                 echo 'backend {i} did not create its socket' >&2; cat {log} >&2; exit 92; fi; sleep 0.1; done",
                cmd = disk.backend_command(&self.socket(i)),
                pin = L2_PIN_VAR,
            );
        }
        // The VMM and its backends are pinned like every L2 VMM on the nested KVM host
        // (`L2_PIN_VAR`; empty on hardware KVM).
        let vmm = self.vmm_command(images);
        let status = shell_quote(&self.path("vmm.status"));
        // The VMM's stdout (the guest console) goes through a line filter
        // that runs the on_line hooks.
        let mut cases = String::new();
        for (marker, command) in &self.on_line {
            let _ = write!(cases, "*{}*) {command} ;; ", shell_quote(marker));
        }
        let _ = writeln!(
            s,
            "{{ ${L2_PIN_VAR} {vmm}; echo $? >{status}; }} | while IFS= read -r line || [ -n \"$line\" ]; do \
             printf '%s\\n' \"$line\"; case \"$line\" in {cases}*) ;; esac; done\n\
             status=$(cat {status} 2>/dev/null || echo 255)"
        );
        // Backends that end by themselves (flotilla-blk) get a moment to do
        // so, and report how they ended; the others are stopped.
        for (i, disk) in self.disks.iter().enumerate() {
            if disk.backend == Backend::Flotilla {
                let _ = writeln!(
                    s,
                    "n=0; while kill -0 $pid{i} 2>/dev/null && [ $n -lt {EXIT_WAIT_TENTHS} ]; do n=$((n+1)); sleep 0.1; done; \
                     if kill -0 $pid{i} 2>/dev/null; then echo FLOTILLA-RESULT backend{i}_exit=running; kill $pid{i}; wait $pid{i}; \
                     else wait $pid{i}; echo FLOTILLA-RESULT backend{i}_exit=$?; fi"
                );
            } else {
                let _ = writeln!(s, "kill $pid{i} 2>/dev/null; wait $pid{i}");
            }
        }
        for step in &self.after {
            let _ = writeln!(s, "{step}");
        }
        for i in 0..self.disks.len() {
            let _ = writeln!(
                s,
                "echo '--- backend {i} log ---' >&2; cat {} >&2",
                shell_quote(&self.path(&format!("d{i}.log")))
            );
        }
        s.push_str("exit $status\n");
        s
    }

    /// Runs the script on the [`KvmHost`] and returns the guest's outcome
    /// (`command` is the whole script; `stderr` has the VMM's and, after it,
    /// every backend's log).
    pub fn run(&self) -> Result<GuestRun> {
        let images = match &self.guest.images {
            Some(i) => i.clone(),
            None => images::guest_images()?,
        };
        for (what, path, hint, needed) in [
            (
                "flotilla-vmm",
                paths::vmm_binary(),
                " (build it: cargo build -p vmm)",
                self.guest.vmm == Vmm::Flotilla,
            ),
            (
                "flotilla-blk",
                blk_binary(),
                " (build it: cargo build -p flotilla-blk)",
                self.disks.iter().any(|d| d.backend == Backend::Flotilla),
            ),
        ] {
            if needed && !path.is_file() {
                return Err(Error::Missing { what, path, hint });
            }
        }
        let script = self.script(&images);
        // Room for the backends and host steps on top of the guest's own time.
        let timeout = self.guest.timeout + Duration::from_secs(60);
        let out = KvmHost::get().run(&script, timeout)?;
        Ok(GuestRun {
            vmm: self.guest.vmm,
            command: script,
            status: out.status,
            serial_output: out.stdout_str().replace('\r', ""),
            stderr: out.stderr_str().replace('\r', ""),
            elapsed: out.elapsed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images() -> Images {
        Images {
            kernel: "/k".into(),
            initramfs: "/i".into(),
        }
    }

    #[test]
    fn flotilla_disks_on_the_vmm_command_line() {
        let mut t = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "x"));
        let img = t.path("a.img");
        t.disks.push(Disk::flotilla(&img));
        let mut second = Disk::flotilla(&img).readonly().args(&["--serial", "A B"]);
        second.num_queues = Some(2);
        t.disks.push(second);
        let line = t.vmm_command(&images());
        let w = &t.work_dir;
        assert!(
            line.ends_with(&format!(
                "-chardev socket,id=c0,path={w}/d0.sock -device vhost-user-blk-device,id=disk0,chardev=c0 \
                 -chardev socket,id=c1,path={w}/d1.sock -device vhost-user-blk-device,id=disk1,chardev=c1,num-queues=2"
            )),
            "{line}"
        );
        let backend = t.disks[1].backend_command(&t.socket(1));
        assert!(
            backend.ends_with(&format!(
                "flotilla-blk --socket-path {w}/d1.sock --image {w}/a.img --readonly --num-queues 2 --serial 'A B'"
            )),
            "{backend}"
        );
    }

    #[test]
    fn qemu_gets_shared_memory_and_mmio_devices() {
        let mut t = DiskTest::new(GuestConfig::new(Vmm::Qemu, "x"));
        let img = t.path("a.img");
        t.disks.push(Disk::qemu_storage_daemon(&img).readonly());
        let line = t.vmm_command(&images());
        assert!(
            line.contains("-object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem -chardev socket,id=c0,"),
            "{line}"
        );
        assert!(
            line.ends_with("-device vhost-user-blk,id=disk0,chardev=c0"),
            "{line}"
        );
        let backend = t.disks[0].backend_command(&t.socket(0));
        assert!(
            backend.starts_with(&format!(
                "qemu-storage-daemon --blockdev driver=file,node-name=f0,filename={img} --export type=vhost-user-blk,"
            )) && backend.ends_with(",writable=off"),
            "{backend}"
        );
    }

    #[test]
    fn every_test_has_its_own_work_dir() {
        let a = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "x"));
        let b = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "x"));
        assert_ne!(a.work_dir, b.work_dir);
        let mut a = a;
        a.on_line("PHASE=1", "echo hook");
        let script = a.script(&images());
        assert!(script.contains("*PHASE=1*) echo hook ;;"), "{script}");
    }

    /// The VMM and every backend start pinned on the nested KVM host (the prefix is empty on
    /// hardware KVM).
    #[test]
    fn the_vmm_and_its_backends_start_pinned() {
        let mut t = DiskTest::new(GuestConfig::new(Vmm::Flotilla, "x"));
        let img = t.path("a.img");
        t.disks.push(Disk::flotilla(&img));
        t.disks.push(Disk::qemu_storage_daemon(&img));
        let script = t.script(&images());
        let pinned = |what: &str| {
            script
                .lines()
                .filter(|l| l.contains(what))
                .all(|l| l.contains(&format!("${L2_PIN_VAR} {what}")))
        };
        assert!(pinned("qemu-storage-daemon --blockdev"), "{script}");
        assert!(
            script.matches(&format!("${L2_PIN_VAR} ")).count() == 3,
            "{script}"
        );
        assert!(
            script.contains(&format!("{{ ${L2_PIN_VAR} ")),
            "the VMM\n{script}"
        );
    }
}
