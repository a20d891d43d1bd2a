//! The nested KVM host: an "L1" QEMU-TCG VM with nested SVM, and the client
//! side of its command agent (`tests/l1/flotilla-agent`).
//!
//! Transport: the agent owns the VM's second serial port (ttyS1), which QEMU
//! connects to a unix socket we listen on. A serial port needs no guest
//! driver beyond the built-in 8250 and works the moment init runs. Framing
//! (see the agent script): `RUN <id> <secs> <base64 cmd>` down,
//! `FLOTILLA-AGENT-RESULT <id> status= timedout= stdout=<n> stderr=<m>` up,
//! followed by exactly n + m bytes.

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::host::Output;
use crate::images::{self, Images};
use crate::{paths, process};

/// Boot attempts before giving up (TESTING.md "Known flake": some boots
/// print nothing at all and never progress).
pub const BOOT_ATTEMPTS: u32 = 4;
/// How long the console of a booting L1 may stay silent, before its init
/// runs, until the boot counts as stuck (`FLOTILLA_L1_READY_TIMEOUT` seconds
/// overrides). A healthy boot reaches the ready marker in ~3 s on an idle
/// machine, ~10 s on a busy one.
pub const READY_TIMEOUT: Duration = Duration::from_secs(25);
/// A boot that keeps printing is slow, not stuck; but this is the limit.
pub const SLOW_BOOT_LIMIT: Duration = Duration::from_secs(120);
/// Extra time the host side allows beyond a command's own timeout (which the
/// agent enforces) before declaring the agent dead: the agent's frozen-guest check on a
/// timeout (25 s, `tests/l1/flotilla-agent`) plus sending the output.
const AGENT_GRACE: Duration = Duration::from_secs(60);
/// Longest silence of the agent while a command runs: it says `FLOTILLA-AGENT-ALIVE` every
/// 15 s, so a VM that says nothing for this long froze (lost its timers, or hangs with
/// every CPU idle), and the command is given up at once instead of at its timeout.
const AGENT_SILENCE: Duration = Duration::from_secs(150);
/// L1 size, from the issue: room for a few L2 guests and the tmpfs overlay.
const L1_MEM_MIB: u32 = 4096;
const L1_CPUS: u32 = 2;

/// A running L1 VM with a connected agent. Dropping it kills the VM.
pub struct L1Vm {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    console_log: PathBuf,
    next_id: u64,
    /// Bytes read past a line while waiting for a header.
    pending: Vec<u8>,
}

enum BootFailure {
    /// Worth another attempt (no marker, QEMU died, ...).
    Retry(String),
    /// Retrying cannot help (missing images, L1 init reported failure).
    Fatal(Error),
}

impl From<Error> for BootFailure {
    fn from(e: Error) -> Self {
        BootFailure::Fatal(e)
    }
}

impl L1Vm {
    /// Boots an L1 VM, retrying up to [`BOOT_ATTEMPTS`] times when it shows
    /// no ready marker, and reports every retry on stderr.
    pub fn boot() -> Result<L1Vm> {
        let images = images::l1_images()?;
        let logs = paths::log_dir();
        fs::create_dir_all(&logs).context(|| format!("creating {}", logs.display()))?;
        paths::prune_older_than(&logs, Duration::from_secs(24 * 3600));
        paths::prune_older_than(&logs.join("scratch"), Duration::from_secs(24 * 3600));
        let ready_timeout = std::env::var("FLOTILLA_L1_READY_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(READY_TIMEOUT);
        let mut last = String::new();
        for attempt in 1..=BOOT_ATTEMPTS {
            let started = Instant::now();
            match Self::boot_once(&images, &logs, attempt, ready_timeout) {
                Ok(vm) => {
                    let msg = format!(
                        "flotilla-tests: L1 KVM host ready in {:.1}s (attempt {attempt}/{BOOT_ATTEMPTS}, console {})",
                        started.elapsed().as_secs_f64(),
                        vm.console_log.display()
                    );
                    if attempt > 1 || std::env::var_os("FLOTILLA_TESTS_VERBOSE").is_some() {
                        eprintln!("{msg}");
                    }
                    return Ok(vm);
                }
                Err(BootFailure::Retry(reason)) => {
                    eprintln!(
                        "flotilla-tests: L1 boot attempt {attempt}/{BOOT_ATTEMPTS} failed after {:.1}s: {reason}{}",
                        started.elapsed().as_secs_f64(),
                        if attempt < BOOT_ATTEMPTS { "; killing it and booting again" } else { "" }
                    );
                    last = reason;
                }
                Err(BootFailure::Fatal(e)) => return Err(e),
            }
        }
        Err(Error::L1Boot {
            attempts: BOOT_ATTEMPTS,
            reason: last,
        })
    }

    fn boot_once(
        images: &Images,
        logs: &Path,
        attempt: u32,
        ready_timeout: Duration,
    ) -> std::result::Result<L1Vm, BootFailure> {
        // A process may boot several L1s (after a broken one): number them.
        static BOOTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = BOOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let name = format!("l1-{}-{n}", std::process::id());
        let console_log = logs.join(format!("{name}.console.log"));
        let qemu_log = logs.join(format!("{name}.qemu.log"));
        // Unix socket paths are limited to 108 bytes: keep it in /tmp.
        let socket = std::env::temp_dir().join(format!("flotilla-{name}.sock"));
        let _ = fs::remove_file(&socket);
        let listener =
            UnixListener::bind(&socket).context(|| format!("binding {}", socket.display()))?;
        listener
            .set_nonblocking(true)
            .context(|| format!("configuring {}", socket.display()))?;
        let qemu_out =
            fs::File::create(&qemu_log).context(|| format!("creating {}", qemu_log.display()))?;
        let qemu_err = qemu_out
            .try_clone()
            .context(|| format!("duplicating {}", qemu_log.display()))?;

        let mut cmd = Command::new(paths::qemu_binary());
        cmd.args(["-M", "microvm,acpi=on", "-accel", tcg_accel(), "-cpu"])
            .arg(l1_cpu())
            .args(["-m", &L1_MEM_MIB.to_string(), "-smp", &L1_CPUS.to_string()])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&images.kernel)
            .arg("-initrd")
            .arg(&images.initramfs)
            .arg("-append")
            .arg(l1_cmdline(images))
            .arg("-serial")
            .arg(format!("file:{}", console_log.display()))
            .arg("-chardev")
            .arg(format!("socket,id=agent,path={}", socket.display()))
            // microvm instantiates one ISA serial port; the agent's is COM2.
            .args(["-device", "isa-serial,chardev=agent,iobase=0x2f8,irq=3"])
            .args([
                "-fsdev",
                "local,id=fs0,path=/,security_model=none,readonly=on,multidevs=remap",
            ])
            .args(["-device", "virtio-9p-device,fsdev=fs0,mount_tag=hostroot"])
            .stdin(Stdio::null())
            .stdout(qemu_out)
            .stderr(qemu_err);
        let child = process::spawn_persistent(cmd)?;
        // From here on `guard` kills QEMU on every early return.
        let mut guard = ChildGuard(Some(child));
        let started = Instant::now();

        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if let Some(status) = guard.try_exited() {
                        let _ = fs::remove_file(&socket);
                        return Err(BootFailure::Retry(format!(
                            "QEMU exited ({status}) before connecting: {}",
                            file_tail(&qemu_log)
                        )));
                    }
                    if started.elapsed() > ready_timeout {
                        let _ = fs::remove_file(&socket);
                        return Err(BootFailure::Retry(
                            "QEMU never connected the agent socket".into(),
                        ));
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    let _ = fs::remove_file(&socket);
                    return Err(Error::io(format!("accepting on {}", socket.display()), e).into());
                }
            }
        };
        // Connected: the path is no longer needed.
        let _ = fs::remove_file(&socket);
        stream
            .set_nonblocking(false)
            .context(|| "configuring the agent socket".to_string())?;
        let writer = stream
            .try_clone()
            .context(|| "duplicating the agent socket".to_string())?;
        let mut vm = L1Vm {
            child: match guard.0.take() {
                Some(c) => c,
                None => return Err(BootFailure::Retry("internal: lost the QEMU child".into())),
            },
            reader: BufReader::new(stream),
            writer,
            console_log,
            next_id: 1,
            pending: Vec::new(),
        };

        // The flake shows as a console that stops growing before init runs;
        // a loaded machine boots slowly but steadily. So retry on a stall,
        // not on a fixed deadline (up to SLOW_BOOT_LIMIT in all).
        let mut console_len = 0;
        let mut last_growth = Instant::now();
        loop {
            let elapsed = started.elapsed();
            let console = fs::read(&vm.console_log).unwrap_or_default();
            if console.len() != console_len {
                console_len = console.len();
                last_growth = Instant::now();
            }
            if let Some(reason) = find_line(&console, b"FLOTILLA-L1-FAILED") {
                return Err(BootFailure::Fatal(Error::L1Boot {
                    attempts: attempt,
                    reason: format!(
                        "L1 init: {reason} (console log {})",
                        vm.console_log.display()
                    ),
                }));
            }
            let init_started = contains(&console, b"FLOTILLA-L1-BOOT");
            let stalled = !init_started && last_growth.elapsed() > ready_timeout;
            if stalled || elapsed > SLOW_BOOT_LIMIT {
                return Err(BootFailure::Retry(format!(
                    "no ready marker after {:.0}s, console {} ({} bytes, last line: {:?})",
                    elapsed.as_secs_f64(),
                    if stalled {
                        format!("silent for {:.0}s", last_growth.elapsed().as_secs_f64())
                    } else {
                        "still printing".to_string()
                    },
                    console.len(),
                    last_line(&console),
                )));
            }
            if let Ok(Some(status)) = vm.child.try_wait() {
                return Err(BootFailure::Retry(format!(
                    "QEMU exited ({status}) during boot; console: {}",
                    file_tail(&vm.console_log)
                )));
            }
            match vm.read_line(Instant::now() + Duration::from_millis(500)) {
                Ok(Some(line)) => {
                    if let Some(rest) = line.strip_prefix("FLOTILLA-AGENT-READY ") {
                        if rest.trim() == "kvm=1" {
                            return Ok(vm);
                        }
                        return Err(BootFailure::Fatal(Error::L1NoKvm {
                            log: vm.console_log.clone(),
                        }));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(BootFailure::Retry(format!("agent socket: {e}")));
                }
            }
        }
    }

    /// Path of this VM's console (ttyS0) log.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Runs `command` in the VM (see [`crate::KvmHost::run`]).
    pub fn exec(&mut self, command: &str, timeout: Duration) -> Result<Output> {
        let id = self.next_id;
        self.next_id += 1;
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let agent_err = |reason: String, log: &Path| Error::Agent {
            command: command.to_string(),
            reason,
            log: log.to_path_buf(),
        };
        let request = format!("RUN {id} {secs} {}\n", base64(command.as_bytes()));
        let started = Instant::now();
        if let Err(e) = self.writer.write_all(request.as_bytes()) {
            return Err(agent_err(
                format!("sending the command: {e}"),
                &self.console_log,
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(secs) + AGENT_GRACE;
        let header_prefix = format!("FLOTILLA-AGENT-RESULT {id} ");
        let mut heard = Instant::now();
        let header = loop {
            match self.read_line(deadline.min(heard + AGENT_SILENCE)) {
                Ok(Some(line)) => {
                    heard = Instant::now();
                    if let Some(rest) = line.strip_prefix(&header_prefix) {
                        break rest.to_string();
                    }
                }
                Ok(None) if Instant::now() < deadline => {
                    return Err(agent_err(
                        format!("no sign of life for {AGENT_SILENCE:?}"),
                        &self.console_log,
                    ))
                }
                Ok(None) => {
                    return Err(agent_err(
                        format!("no answer within {:?} + {AGENT_GRACE:?}", timeout),
                        &self.console_log,
                    ))
                }
                Err(e) => {
                    return Err(agent_err(
                        format!("reading the answer: {e}"),
                        &self.console_log,
                    ))
                }
            }
        };
        let field = |name: &str| -> Option<i64> {
            header
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        };
        let (Some(status), Some(timed_out), Some(out_len), Some(err_len)) = (
            field("status"),
            field("timedout"),
            field("stdout"),
            field("stderr"),
        ) else {
            return Err(agent_err(
                format!("malformed header `{header}`"),
                &self.console_log,
            ));
        };
        let stdout = self
            .read_exact_deadline(out_len.max(0) as usize, deadline)
            .map_err(|e| agent_err(format!("reading stdout: {e}"), &self.console_log))?;
        let stderr = self
            .read_exact_deadline(err_len.max(0) as usize, deadline)
            .map_err(|e| agent_err(format!("reading stderr: {e}"), &self.console_log))?;
        let output = Output {
            status: status as i32,
            stdout,
            stderr,
            elapsed: started.elapsed(),
        };
        if timed_out != 0 {
            return Err(Error::Timeout {
                command: command.to_string(),
                timeout,
                output,
            });
        }
        Ok(output)
    }

    /// One line from the agent, or `None` at `deadline`. Partial lines are
    /// kept for the next call.
    fn read_line(&mut self, deadline: Instant) -> std::io::Result<Option<String>> {
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(Some(String::from_utf8_lossy(&line).trim_end().to_string()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(deadline - now))?;
            let buf = match self.reader.fill_buf() {
                Ok([]) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(buf) => buf,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // Take bytes up to and including a newline; leave the rest (the
            // start of a binary payload) in the BufReader.
            let take = buf
                .iter()
                .position(|&b| b == b'\n')
                .map_or(buf.len(), |p| p + 1);
            self.pending.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
        }
    }

    fn read_exact_deadline(&mut self, len: usize, deadline: Instant) -> std::io::Result<Vec<u8>> {
        let mut out = std::mem::take(&mut self.pending);
        if out.len() > len {
            self.pending = out.split_off(len);
        }
        while out.len() < len {
            let now = Instant::now();
            if now >= deadline {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("got {} of {len} bytes before the deadline", out.len()),
                ));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(deadline - now))?;
            let mut chunk = vec![0u8; (len - out.len()).min(64 * 1024)];
            match self.reader.read(&mut chunk) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

impl Drop for L1Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the QEMU child unless taken out.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn try_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// QEMU's TCG for the L1: `FLOTILLA_L1_TCG_THREAD=single|multi` (default multi). One thread
/// for both vCPUs avoids the cross-thread races of QEMU 7.2's SVM emulation (tests/README.md
/// "Platform failures") at about half the L1's throughput when both vCPUs are busy.
fn tcg_accel() -> &'static str {
    match std::env::var("FLOTILLA_L1_TCG_THREAD").as_deref() {
        Ok("single") => "tcg,thread=single",
        _ => "tcg,thread=multi",
    }
}

/// The L1's CPU model: `FLOTILLA_L1_CPU` (a QEMU `-cpu` value), else `max,la57=off`.
///
/// Without 5-level paging: with it the L2 guest (which then pages with 5 levels too) had
/// its instructions that L1's KVM emulates (APIC and MMIO accesses, intercepted instructions
/// it must skip without NRIPS, which TCG does not offer) fail their instruction fetch,
/// and KVM injected a page fault for each one instead: millions per run (`pf_guest`), the
/// guest crawling or spinning in KVM_RUN. With `la57=off` that counter stays at 0
/// (tests/README.md "Platform failures").
fn l1_cpu() -> String {
    std::env::var("FLOTILLA_L1_CPU").unwrap_or_else(|_| "max,la57=off".to_string())
}

/// The L1 kernel command line.
///
/// `tsc_early_khz` (+ `tsc=reliable`, `lpj`): without them the kernel
/// calibrates the TSC against the PIT, which fails when the host is busy
/// (TCG vCPU threads get descheduled mid-measurement): "tsc: Unable to
/// calibrate against PIT ... Marking TSC unstable due to could not calculate
/// TSC khz", and the boot then hangs for good. That is the "known flake" of
/// TESTING.md: it hit every boot while another L1 was booting. Under TCG the
/// guest TSC ticks at the host TSC's rate, so the host's rate is the answer.
///
/// `earlyprintk` and no `quiet`: the console log is a file, cheap to write,
/// and shows where a stuck boot stopped.
///
/// `FLOTILLA_L1_APPEND` adds to it, for experiments on the L1 kernel (e.g.
/// `transparent_hugepage=never`); CI does not set it.
fn l1_cmdline(images: &Images) -> String {
    let mut cmdline = String::from("console=ttyS0 earlyprintk=ttyS0 reboot=t panic=-1");
    if let Some(khz) = host_tsc_khz() {
        cmdline.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
        let hz = images
            .kernel
            .parent()
            .and_then(|dir| fs::read_to_string(dir.join("kernel-hz")).ok())
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let Some(hz) = hz.filter(|&hz| hz > 0) {
            cmdline.push_str(&format!(" lpj={}", khz * 1000 / hz));
        }
    }
    if let Ok(extra) = std::env::var("FLOTILLA_L1_APPEND") {
        cmdline.push(' ');
        cmdline.push_str(&extra);
    }
    cmdline
}

/// The host's TSC rate in kHz (`FLOTILLA_TSC_KHZ` overrides), measured
/// against CLOCK_MONOTONIC over 200 ms. Each endpoint is a TSC read, a clock
/// read and a TSC read; pairs more than ~20 us apart (preempted) are redone,
/// so the error stays around 1e-4.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        if let Some(khz) = std::env::var("FLOTILLA_TSC_KHZ")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return Some(khz);
        }
        measure_tsc_khz()
    })
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    use std::arch::x86_64::_rdtsc;
    let sample = || {
        for _ in 0..100 {
            // SAFETY: rdtsc has no preconditions on x86_64.
            let a = unsafe { _rdtsc() };
            let t = Instant::now();
            // SAFETY: as above.
            let b = unsafe { _rdtsc() };
            if b > a && b - a < 50_000 {
                return Some((a / 2 + b / 2, t));
            }
        }
        None
    };
    let (c0, t0) = sample()?;
    thread::sleep(Duration::from_millis(200));
    let (c1, t1) = sample()?;
    let secs = t1.duration_since(t0).as_secs_f64();
    let khz = (c1.checked_sub(c0)? as f64 / secs / 1000.0).round() as u64;
    // Anything outside 100 MHz..10 GHz is a broken measurement.
    (100_000..10_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

fn last_line(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    text.trim_end()
        .lines()
        .last()
        .unwrap_or("")
        .chars()
        .take(160)
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The rest of the first line starting with `marker`, if any.
fn find_line(text: &[u8], marker: &[u8]) -> Option<String> {
    text.split(|&b| b == b'\n')
        .find(|l| l.starts_with(marker))
        .map(|l| {
            String::from_utf8_lossy(&l[marker.len()..])
                .trim()
                .to_string()
        })
}

fn file_tail(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    crate::error::tail(&bytes)
}

/// Standard base64 (RFC 4648, padded): the agent decodes with busybox
/// `base64 -d`. Ten lines here instead of a dependency for one direction.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
    }

    #[test]
    fn tsc_rate_is_plausible() {
        if let Some(khz) = host_tsc_khz() {
            assert!((100_000..10_000_000).contains(&khz), "{khz}");
        }
    }

    #[test]
    fn marker_lines() {
        let text = b"x\nFLOTILLA-L1-FAILED 9p mount\ny";
        assert_eq!(
            find_line(text, b"FLOTILLA-L1-FAILED").as_deref(),
            Some("9p mount")
        );
        assert!(contains(text, b"9p"));
        assert!(find_line(text, b"nope").is_none());
    }
}
