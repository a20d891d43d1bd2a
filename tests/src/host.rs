//! `KvmHost`: where commands that need a real KVM run.

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::l1::L1Vm;
use crate::{paths, process, shell_quote};

/// Exit status and captured output of a command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit code; 128 + N when killed by signal N.
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// How long the command itself ran (not counting waiting for the KVM
    /// host to boot or to finish other tests' commands).
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// stdout, lossily decoded.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr, lossily decoded.
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A machine with a working hardware-assisted `/dev/kvm`.
///
/// On a host with `kvm_intel`/`kvm_amd` commands run directly. Otherwise (the
/// PVM development machines) the first command boots an L1 QEMU-TCG VM with
/// nested SVM, and every command of this process runs inside it, one at a
/// time. Paths are the same in both cases, and commands start in the
/// workspace root.
pub struct KvmHost {
    mode: Mode,
}

enum Mode {
    Direct,
    /// `None` until the first command, and again after the VM was found
    /// broken (it is rebooted on the next command).
    Nested(Mutex<Option<L1Vm>>),
}

impl KvmHost {
    /// The process-wide KVM host. Cheap: the L1 VM boots lazily on the first
    /// [`run`](Self::run).
    ///
    /// `FLOTILLA_KVM_HOST=direct|nested` overrides the detection.
    pub fn get() -> &'static KvmHost {
        static HOST: OnceLock<KvmHost> = OnceLock::new();
        HOST.get_or_init(|| {
            let nested = match std::env::var("FLOTILLA_KVM_HOST").as_deref() {
                Ok("direct") => false,
                Ok("nested") => true,
                _ => !has_hardware_kvm(),
            };
            KvmHost {
                mode: if nested {
                    Mode::Nested(Mutex::new(None))
                } else {
                    Mode::Direct
                },
            }
        })
    }

    /// Whether commands run in the nested L1 VM.
    pub fn is_nested(&self) -> bool {
        matches!(self.mode, Mode::Nested(_))
    }

    /// Runs `command` with `sh -c` on the KVM host, from the workspace root,
    /// with stdin closed. Returns its status and output; a non-zero status is
    /// not an error. After `timeout` the command and everything it started
    /// are killed and [`Error::Timeout`] carries the output so far.
    pub fn run(&self, command: &str, timeout: Duration) -> Result<Output> {
        let root = paths::workspace_root();
        let full = format!("cd {} && {}", shell_quote(&root.to_string_lossy()), command);
        match &self.mode {
            Mode::Direct => {
                let result = process::run_with_timeout(
                    Command::new("sh").arg("-c").arg(&full).current_dir(&root),
                    timeout,
                );
                rename_timeout(result, command)
            }
            Mode::Nested(vm) => {
                // A test that panicked while holding the lock leaves the VM in
                // a consistent state (commands are whole round trips), so a
                // poisoned lock is simply taken over.
                let mut vm = vm.lock().unwrap_or_else(|p| p.into_inner());
                if vm.is_none() {
                    *vm = Some(boot_l1()?);
                }
                let l1 = vm.as_mut().ok_or_else(|| Error::L1Boot {
                    attempts: 0,
                    reason: "internal: no VM after boot".into(),
                })?;
                let mut result = l1.exec(&full, timeout);
                if matches!(result, Err(Error::Agent { .. })) {
                    // Broken channel or unresponsive agent: drop (kill) this
                    // VM; the next command boots a fresh one.
                    let panicked = l1_kernel_panicked(l1.console_log());
                    *vm = None;
                    if let Some(log) = panicked {
                        // The L1 kernel itself died (nested SVM under TCG
                        // has rare kernel-stack overflows of its own): that
                        // is the test machine failing, not the test. Run the
                        // command once more on a fresh VM, loudly.
                        eprintln!(
                            "KVM host VM kernel panicked during a test command (console: {}); \
                             running it again on a fresh VM",
                            log.display()
                        );
                        let mut fresh = boot_l1()?;
                        result = fresh.exec(&full, timeout);
                        if !matches!(result, Err(Error::Agent { .. })) {
                            *vm = Some(fresh);
                        }
                    }
                }
                if let (Ok(out), Some(l1)) = (&result, vm.as_mut()) {
                    if reports_l2_triple_fault(out) {
                        save_kvm_trace(l1, &root);
                    }
                }
                rename_timeout(result, command)
            }
        }
    }

    /// Like [`run`](Self::run) with a `program` and arguments, quoted for
    /// the shell.
    pub fn run_args<S: AsRef<str>>(
        &self,
        program: &Path,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        let mut line = shell_quote(&program.to_string_lossy());
        for a in args {
            line.push(' ');
            line.push_str(&shell_quote(a.as_ref()));
        }
        self.run(&line, timeout)
    }
}

/// What the KVM host VM records for the post-mortem of an L2 triple fault
/// (`tests/l1/kvm-trace`): `FLOTILLA_L1_KVM_TRACE=off|shutdown|full`, default `shutdown` (a
/// kprobe that saves the L2 state KVM wipes before the VMM sees KVM_EXIT_SHUTDOWN; no cost
/// until a triple fault); `full` also traces every kvm exit into a bounded ring.
fn kvm_trace_mode() -> Option<&'static str> {
    match std::env::var("FLOTILLA_L1_KVM_TRACE").as_deref() {
        Ok("off") => None,
        Ok("full") => Some("full"),
        _ => Some("shutdown"),
    }
}

/// Boots an L1 VM and arms its KVM post-mortem tracing (best effort: a kernel without
/// tracefs or kprobes still runs the tests).
fn boot_l1() -> Result<L1Vm> {
    let mut vm = L1Vm::boot()?;
    if let Some(mode) = kvm_trace_mode() {
        let root = paths::workspace_root();
        let arm = format!(
            "cd {} && python3 tests/l1/kvm-trace arm {mode}",
            shell_quote(&root.to_string_lossy())
        );
        match vm.exec(&arm, Duration::from_secs(60)) {
            Ok(out) if out.success() => {
                if std::env::var_os("FLOTILLA_TESTS_VERBOSE").is_some() {
                    eprint!("flotilla-tests: {}", out.stdout_str());
                }
            }
            Ok(out) => eprintln!(
                "flotilla-tests: L1 kvm-trace arm failed (status {}): {}{}",
                out.status,
                out.stdout_str(),
                out.stderr_str()
            ),
            Err(e) => eprintln!("flotilla-tests: L1 kvm-trace arm failed: {e}"),
        }
    }
    Ok(vm)
}

/// flotilla-vmm's report of a guest triple fault (vmm/src/vstate/vcpu.rs), or QEMU's.
fn reports_l2_triple_fault(out: &Output) -> bool {
    let says = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        text.contains("KVM_EXIT_SHUTDOWN") || text.contains("triple fault")
    };
    says(&out.stdout) || says(&out.stderr)
}

/// After a command that reported an L2 triple fault: saves the L1's KVM trace (the L2 state at
/// the fault, see `tests/l1/kvm-trace`) next to the L1 console log and prints where, with the
/// recorded states.
fn save_kvm_trace(l1: &mut L1Vm, root: &Path) {
    if kvm_trace_mode().is_none() {
        return;
    }
    let dump = format!(
        "cd {} && python3 tests/l1/kvm-trace dump 400",
        shell_quote(&root.to_string_lossy())
    );
    let out = match l1.exec(&dump, Duration::from_secs(60)) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("flotilla-tests: an L2 guest triple-faulted; no L1 KVM trace: {e}");
            return;
        }
    };
    let text = out.stdout_str();
    let path = kvm_trace_path(l1.console_log());
    let saved = std::fs::write(&path, &text).is_ok();
    let states: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("flotilla_l2_shutdown"))
        .collect();
    eprintln!(
        "flotilla-tests: an L2 guest triple-faulted; L1 KVM trace {}:\n{}",
        if saved {
            format!("in {}", path.display())
        } else {
            "(not saved)".to_string()
        },
        if states.is_empty() {
            "(no L2 state recorded)".to_string()
        } else {
            states.join("\n")
        }
    );
}

/// `l1-<pid>-<n>.kvm-trace.<k>.log` next to `l1-<pid>-<n>.console.log`, `k` numbering the dumps.
fn kvm_trace_path(console: &Path) -> std::path::PathBuf {
    let name = console
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".console.log").unwrap_or(&name);
    (1..)
        .map(|k| console.with_file_name(format!("{stem}.kvm-trace.{k}.log")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| console.with_file_name(format!("{stem}.kvm-trace.log")))
}

/// Reports the caller's command in timeouts, not the `cd ... &&` wrapper.
/// The console log of an L1 VM whose kernel panicked, if it did.
fn l1_kernel_panicked(console: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::read_to_string(console)
        .ok()
        .filter(|text| text.contains("Kernel panic - not syncing"))
        .map(|_| console.to_path_buf())
}

fn rename_timeout(result: Result<Output>, command: &str) -> Result<Output> {
    result.map_err(|e| match e {
        Error::Timeout {
            timeout, output, ..
        } => Error::Timeout {
            command: command.to_string(),
            timeout,
            output,
        },
        other => other,
    })
}

/// Hardware KVM present (as opposed to PVM, which cannot boot real guests).
pub fn has_hardware_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
}

#[cfg(test)]
mod panic_tests {
    use super::{kvm_trace_path, l1_kernel_panicked, reports_l2_triple_fault, Output};

    #[test]
    fn an_l2_triple_fault_is_recognised_from_the_vmm_output() {
        let out = |stderr: &str| Output {
            stderr: stderr.as_bytes().to_vec(),
            ..Output::default()
        };
        assert!(reports_l2_triple_fault(&out(
            "flotilla-vmm: vCPU 1: triple fault (KVM_EXIT_SHUTDOWN); rip=0xfff0"
        )));
        assert!(!reports_l2_triple_fault(&out("RESTART-OK")));
    }

    #[test]
    fn kvm_traces_are_numbered_next_to_the_console_log() {
        let dir = std::env::temp_dir().join(format!("flotilla-kvm-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let console = dir.join("l1-7-1.console.log");
        let first = kvm_trace_path(&console);
        assert_eq!(first, dir.join("l1-7-1.kvm-trace.1.log"));
        std::fs::write(&first, "x").unwrap();
        assert_eq!(kvm_trace_path(&console), dir.join("l1-7-1.kvm-trace.2.log"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_panicked_l1_is_recognised_from_its_console() {
        let dir = std::env::temp_dir().join(format!("flotilla-l1-panic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        std::fs::write(&log, "FLOTILLA-L1-READY kvm=1\n[  1.0] ok\n").unwrap();
        assert_eq!(l1_kernel_panicked(&log), None);
        std::fs::write(
            &log,
            "[ 159.9] Kernel panic - not syncing: corrupted stack end detected inside scheduler\n",
        )
        .unwrap();
        assert_eq!(l1_kernel_panicked(&log), Some(log.clone()));
        assert_eq!(l1_kernel_panicked(&dir.join("missing")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
