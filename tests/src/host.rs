//! `KvmHost`: where commands that need a real KVM run.

use std::io::Write;
use std::path::{Path, PathBuf};
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
        let cd = format!("cd {}", shell_quote(&root.to_string_lossy()));
        match &self.mode {
            Mode::Direct => {
                let full = format!("{cd} && {command}");
                let result = process::run_with_timeout(
                    Command::new("sh").arg("-c").arg(&full).current_dir(&root),
                    timeout,
                );
                rename_timeout(result, command)
            }
            Mode::Nested(vm) => {
                let full = format!(
                    "{cd} && export {L2_PIN_VAR}={} && {command}",
                    shell_quote(&l2_pin())
                );
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
                if let Err(Error::Agent { reason, log, .. }) = &result {
                    // The agent inside the VM enforces the command's timeout
                    // itself, so losing it (no answer past timeout + grace,
                    // a broken channel) means the KVM host VM stopped: its
                    // kernel panicked or froze (nested SVM under TCG has rare
                    // failures of its own, TESTING.md). That is the test
                    // machine failing, not the test: run the command once
                    // more on a fresh VM, and say so outside the captured
                    // test output so a passing run still shows it.
                    let failure = machine_failure(reason, log);
                    report_machine_failure(command, &failure);
                    result = run_on_fresh_l1(&mut vm, &full, timeout)?;
                }
                // An L2 guest that triple-faults under the nested L1 is the
                // platform's doing (tests/README.md "Platform failures": it
                // happens to QEMU + the kernel's vhost-net as well, whenever
                // a backend serves the rings beside the vCPU; ~45 % of the
                // network test's runs): rerun on a fresh L1, a bounded number
                // of times, each reported like a machine failure. On hardware
                // KVM (`Mode::Direct`) a triple fault fails the test.
                for rerun in 1..=L2_PLATFORM_FAILURE_RERUNS {
                    let Some(out) = finished_output(&result) else {
                        break;
                    };
                    if !reports_l2_platform_failure(out) {
                        break;
                    }
                    let Some(l1) = vm.as_mut() else { break };
                    save_kvm_trace(l1, &root);
                    let failure = l2_platform_failure(out, l1.console_log(), rerun);
                    report_machine_failure(command, &failure);
                    result = run_on_fresh_l1(&mut vm, &full, timeout)?;
                }
                if let (Some(out), Some(l1)) = (finished_output(&result), vm.as_mut()) {
                    if reports_l2_platform_failure(out) {
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
/// (`tests/l1/kvm-trace`): `FLOTILLA_L1_KVM_TRACE=shutdown|full`, default off. `shutdown` is a
/// kprobe that saves the L2 state KVM wipes before the VMM sees KVM_EXIT_SHUTDOWN; `full` also
/// traces every kvm exit into a bounded ring. Off by default because arming patches kernel
/// text (int3 + cross-CPU sync) and, under QEMU's multi-threaded TCG, that hung the L1 (both
/// CPUs in soft lockup on a patched site right after arming, 2026-11-22); with it the CI's
/// first boot test lost its L1.
fn kvm_trace_mode() -> Option<&'static str> {
    match std::env::var("FLOTILLA_L1_KVM_TRACE").as_deref() {
        Ok("shutdown") => Some("shutdown"),
        Ok("full") => Some("full"),
        _ => None,
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

/// The environment variable every command on the nested KVM host finds set
/// to the prefix that starts an L2 VMM (`$FLOTILLA_L2_PIN flotilla ...` in
/// shell — `GuestConfig::run`, the block tests' scripts for the VMM and each
/// backend —, `flotilla_qmp.launch` in the Python drivers): `taskset -c 0`,
/// so that the VMM, its vCPUs and its device backends share one L1 CPU.
/// Why: under nested SVM in TCG an L2 guest dies (triple fault, frozen
/// vCPU) when a backend serves its rings from the other L1 CPU while the
/// vCPU runs, whatever the backend: flotilla-net, the kernel's vhost-net
/// (tests/README.md "Platform failures"). Pinned, 8 of 8 iperf runs passed
/// against 5 of 9 unpinned. Unset on hardware KVM, where the VMM runs as a
/// user would run it. `FLOTILLA_L2_CPUS` on the outer host picks other L1
/// CPUs (`0-1`), or `all` for no pinning.
pub const L2_PIN_VAR: &str = "FLOTILLA_L2_PIN";

/// The value of [`L2_PIN_VAR`] for this run.
fn l2_pin() -> String {
    match std::env::var("FLOTILLA_L2_CPUS").as_deref() {
        Ok("all") | Ok("") => String::new(),
        Ok(cpus) => format!("taskset -c {cpus}"),
        Err(_) => "taskset -c 0".to_string(),
    }
}

/// How many times a command whose L2 guest triple-faulted runs again on a fresh L1: at the
/// network test's rate (~45 %) four attempts all fail about once in 25 runs.
const L2_PLATFORM_FAILURE_RERUNS: u32 = 3;

/// Boots a fresh L1 in place of `vm` (dropping the old one) and runs `full` on it. An L1 that
/// fails under the command is dropped too, so the next command boots another.
fn run_on_fresh_l1(vm: &mut Option<L1Vm>, full: &str, timeout: Duration) -> Result<Result<Output>> {
    *vm = None;
    let mut fresh = boot_l1()?;
    let result = fresh.exec(full, timeout);
    if !matches!(result, Err(Error::Agent { .. })) {
        *vm = Some(fresh);
    }
    Ok(result)
}

/// The report of an L2 triple fault: the VMM's lines about it.
fn l2_platform_failure(out: &Output, console: &Path, rerun: u32) -> MachineFailure {
    let text = format!("{}{}", out.stdout_str(), out.stderr_str());
    let tail = text
        .lines()
        .filter(|l| {
            l.contains("KVM_EXIT_SHUTDOWN")
                || l.contains("triple fault")
                || l.contains("pf_guest=")
                || l.contains(L2_GUEST_FROZEN)
        })
        .collect::<Vec<_>>()
        .join("\n");
    MachineFailure {
        what: format!(
            "an L2 guest triple-faulted, looped on injected page faults or froze (nested SVM \
             under TCG; rerun {rerun} of {L2_PLATFORM_FAILURE_RERUNS})"
        ),
        log: console.to_path_buf(),
        tail,
        tail_from: "the L2 VMM's report".to_string(),
    }
}

/// What a command printed, whether it ended by itself or at its timeout (where the agent
/// may have found the L2 guest frozen, [`L2_GUEST_FROZEN`]); `None` when the L1 failed.
fn finished_output(result: &Result<Output>) -> Option<&Output> {
    match result {
        Ok(out) | Err(Error::Timeout { output: out, .. }) => Some(out),
        Err(_) => None,
    }
}

/// flotilla-vmm's report of a guest triple fault (vmm/src/vstate/vcpu.rs), or QEMU's; or
/// the other face of the same platform failure, which tests/qmp/net.py's stall report shows:
/// L1's KVM failing the instruction fetch of nearly every L2 instruction it emulates and
/// injecting a page fault instead (`pf_guest` in the millions, the guest looping on it;
/// tests/README.md "Platform failures"); or net.py's verdict on a stuck transfer that the
/// guest as a whole froze ([`L2_GUEST_FROZEN`]).
fn reports_l2_platform_failure(out: &Output) -> bool {
    let says = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        text.contains("KVM_EXIT_SHUTDOWN")
            || text.contains("triple fault")
            || text.contains(L2_GUEST_FROZEN)
            || text
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("pf_guest=")?.parse::<u64>().ok())
                .any(|n| n >= BOGUS_GUEST_PAGE_FAULTS)
    };
    says(&out.stdout) || says(&out.stderr)
}

/// What tests/qmp/net.py prints when a transfer is stuck because the whole guest froze, and
/// the L1 agent when any command times out that way: the guest's heartbeat (a shell loop on
/// its serial console) went silent while every vCPU thread was in KVM_RUN. A stuck queue in a live guest (a lost interrupt: flotilla's failure) keeps the
/// heartbeat going; a vCPU held in the VM core is not in KVM_RUN; both fail the test.
const L2_GUEST_FROZEN: &str = "L2 guest frozen: no heartbeat";

/// Page faults L1's KVM injected into an L2 guest past which they are the platform's: a
/// healthy network test injects none, the failure millions.
const BOGUS_GUEST_PAGE_FAULTS: u64 = 1_000_000;

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

/// How a KVM host VM failed under a command, for the report.
#[derive(Debug, PartialEq, Eq)]
struct MachineFailure {
    /// One line: what the harness saw.
    what: String,
    /// The console log of the failed VM.
    log: PathBuf,
    /// What the failure left to read: the console's last lines (where a panic or a hang
    /// shows), or the VMM's report of a triple fault.
    tail: String,
    /// Where `tail` comes from.
    tail_from: String,
}

/// Lines of the failed VM's console quoted in the report.
const CONSOLE_TAIL_LINES: usize = 40;

fn machine_failure(reason: &str, log: &Path) -> MachineFailure {
    let console = std::fs::read(log).unwrap_or_default();
    let console = String::from_utf8_lossy(&console);
    let what = if console.contains("Kernel panic - not syncing") {
        format!("the KVM host VM's kernel panicked ({reason})")
    } else {
        format!("the KVM host VM stopped answering ({reason})")
    };
    let lines: Vec<&str> = console.lines().collect();
    let tail = lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n");
    MachineFailure {
        what,
        log: log.to_path_buf(),
        tail,
        tail_from: format!("last lines of {}", log.display()),
    }
}

/// Writes to the process's stderr directly: libtest captures `eprintln!` of passing tests, and a
/// rerun test machine must show in every run's output. Also appended to
/// `target/flotilla-tests/machine-failures.log`, one line per failure.
fn report_machine_failure(command: &str, failure: &MachineFailure) {
    let line = format!(
        "flotilla-tests: the test machine failed while running a test command: {}; L1 console \
         {}; running the command again on a fresh KVM host VM",
        failure.what,
        failure.log.display()
    );
    // The command's start is enough to tell which one it was: the scripts run whole are long.
    let short: String = command
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect();
    let command = if short.len() < command.len() {
        format!("{short} ...")
    } else {
        short
    };
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "{line}\ncommand: {command}\n--- {} ---\n{}\n---",
        failure.tail_from, failure.tail
    );
    if let Some(dir) = failure.log.parent() {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("machine-failures.log"))
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Reports the caller's command in timeouts, not the `cd ... &&` wrapper.
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
    use super::{
        finished_output, kvm_trace_path, l2_platform_failure, machine_failure,
        reports_l2_platform_failure, Output, CONSOLE_TAIL_LINES, L2_GUEST_FROZEN,
    };
    use crate::error::Error;

    /// A command the L1 agent killed at its timeout after finding the guest frozen is rerun
    /// like one that reported the freeze itself; the agent's words are the host's marker.
    #[test]
    fn a_timeout_with_a_frozen_guest_counts_as_a_platform_failure() {
        let agent =
            std::fs::read_to_string(crate::paths::workspace_root().join("tests/l1/flotilla-agent"))
                .expect("tests/l1/flotilla-agent");
        assert!(agent.contains(&format!("flotilla-agent: {L2_GUEST_FROZEN} in")));
        let output = |stderr: &str| Output {
            status: 137,
            stderr: stderr.as_bytes().to_vec(),
            ..Output::default()
        };
        let timeout = |stderr: &str| -> crate::error::Result<Output> {
            Err(Error::Timeout {
                command: "x".into(),
                timeout: std::time::Duration::from_secs(1),
                output: output(stderr),
            })
        };
        let frozen = timeout(
            "flotilla-agent: L2 guest frozen: no heartbeat in 25 s past the timeout, all 1 vCPU threads in KVM_RUN\n",
        );
        let out = finished_output(&frozen).expect("a timeout has output");
        assert!(reports_l2_platform_failure(out));
        let stuck = timeout("FLOTILLA-GUEST-ALIVE 17\n");
        assert!(!reports_l2_platform_failure(
            finished_output(&stuck).expect("output")
        ));
        assert!(finished_output(&Err(Error::L1Boot {
            attempts: 1,
            reason: "x".into()
        }))
        .is_none());
    }

    /// What net.py prints in the platform's failure modes is rerun, what a flotilla failure
    /// looks like is not: a frozen guest (no heartbeat, vCPUs in KVM_RUN) but not a stuck
    /// queue in a live guest; millions of injected page faults but not a healthy count.
    #[test]
    fn frozen_guests_and_page_fault_loops_count_as_platform_failures() {
        for (text, platform) in [
            (
                "net: 100 MiB host -> guest in 28.1 s, md5 ok\nflotilla-tests: L2 guest frozen: no heartbeat in 30 s while its vCPU threads run in KVM_RUN\n",
                true,
            ),
            (
                "guest heartbeats in 30 s: 3; vCPU threads all in KVM_RUN: True\nTimeoutError: guest result 'tx sent'\n",
                false,
            ),
            (
                "sample 2: kvm /sys/kernel/debug/kvm/274-10: exits=6534883 pf_guest=6232612 insn_emulation=6428439",
                true,
            ),
            (
                "sample after host -> guest: kvm x: exits=65447 pf_guest=0 insn_emulation=30000",
                false,
            ),
        ] {
            let out = Output {
                status: 1,
                stdout: text.as_bytes().to_vec(),
                ..Output::default()
            };
            assert_eq!(reports_l2_platform_failure(&out), platform, "{text}");
        }
    }

    #[test]
    fn an_l2_triple_fault_is_reported_with_the_vmm_lines() {
        let out = Output {
            status: 1,
            stdout: b"net: 100 MiB host -> guest in 12.2 s, md5 ok\n".to_vec(),
            stderr: b"INFO backend up\nflotilla-vmm: vCPU 1: triple fault (KVM_EXIT_SHUTDOWN); rip=0xfff0\nTraceback\n"
                .to_vec(),
            ..Output::default()
        };
        let failure = l2_platform_failure(&out, std::path::Path::new("/t/l1-1-1.console.log"), 2);
        assert_eq!(
            failure.what,
            "an L2 guest triple-faulted, looped on injected page faults or froze (nested SVM \
             under TCG; rerun 2 of 3)"
        );
        assert_eq!(
            failure.tail,
            "flotilla-vmm: vCPU 1: triple fault (KVM_EXIT_SHUTDOWN); rip=0xfff0"
        );
    }

    #[test]
    fn an_l2_triple_fault_is_recognised_from_the_vmm_output() {
        let out = |stderr: &str| Output {
            stderr: stderr.as_bytes().to_vec(),
            ..Output::default()
        };
        assert!(reports_l2_platform_failure(&out(
            "flotilla-vmm: vCPU 1: triple fault (KVM_EXIT_SHUTDOWN); rip=0xfff0"
        )));
        assert!(!reports_l2_platform_failure(&out("RESTART-OK")));
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
    fn a_failed_l1_is_described_from_its_console() {
        let dir = std::env::temp_dir().join(format!("flotilla-l1-panic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let mut console = String::from("FLOTILLA-L1-READY kvm=1\n");
        for i in 0..100 {
            console.push_str(&format!("[ {i}.0] line {i}\n"));
        }
        std::fs::write(&log, &console).unwrap();
        let frozen = machine_failure("no answer within 120s + 30s", &log);
        assert_eq!(
            frozen.what,
            "the KVM host VM stopped answering (no answer within 120s + 30s)"
        );
        assert_eq!(frozen.tail.lines().count(), CONSOLE_TAIL_LINES);
        assert!(frozen.tail.ends_with("[ 99.0] line 99"));

        console.push_str("[ 159.9] Kernel panic - not syncing: corrupted stack end detected\n");
        std::fs::write(&log, &console).unwrap();
        let panicked = machine_failure("reading the answer: broken pipe", &log);
        assert_eq!(
            panicked.what,
            "the KVM host VM's kernel panicked (reading the answer: broken pipe)"
        );
        assert!(panicked.tail.ends_with("corrupted stack end detected"));

        let missing = machine_failure("x", &dir.join("missing"));
        assert_eq!(missing.tail, "");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
