//! Boot benchmark: flotilla-vmm and QEMU microvm side by side, booting the
//! same kernel + initramfs (1 vCPU, 256 MiB) on the KVM host.
//!
//! Per run it measures, from just before the VMM process is spawned:
//! the first byte on the serial console, the guest init's
//! `FLOTILLA-GUEST-INIT` marker, the VMM's exit (the guest powers off), and
//! the VMM's peak RSS (`ru_maxrss` from wait4, i.e. VmHWM at exit: exact, no
//! sampling). Prints a markdown table. Driven by `tests/bench/boot.sh`.
//!
//! Usage: bench_boot [--runs N] [--guest-log]
//!   --guest-log   boot without `quiet` (more serial output, slower boot)
//! Internal: bench_boot --measure '<shell command>'  (runs on the KVM host)

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use flotilla_tests::guest::INIT_MARKER;
use flotilla_tests::{guest_images, shell_quote, GuestConfig, KvmHost, Vmm};

/// One measured boot.
#[derive(Debug, Default, Clone)]
struct Sample {
    first_byte_ms: Option<f64>,
    marker_ms: Option<f64>,
    exit_ms: f64,
    maxrss_kb: u64,
    status: i32,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--measure") => match args.get(1) {
            Some(cmd) => measure(cmd),
            None => Err("--measure needs a command".into()),
        },
        _ => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_boot: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Inner mode, on the KVM host: run one VMM and print a `BENCH` line.
fn measure(command: &str) -> Result<(), String> {
    let start = Instant::now();
    // `exec`: the measured pid is the VMM itself, not a shell.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {command}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning {command}: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut sample = Sample::default();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading serial output: {e}")),
        };
        let now = start.elapsed().as_secs_f64() * 1000.0;
        sample.first_byte_ms.get_or_insert(now);
        if sample.marker_ms.is_none() {
            seen.extend_from_slice(&buf[..n]);
            if seen
                .windows(INIT_MARKER.len())
                .any(|w| w == INIT_MARKER.as_bytes())
            {
                sample.marker_ms = Some(now);
            }
        }
    }
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter for wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `child` is not waited on elsewhere.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    sample.exit_ms = start.elapsed().as_secs_f64() * 1000.0;
    sample.maxrss_kb = usage.ru_maxrss as u64;
    let st = std::process::ExitStatus::from_raw(status);
    sample.status = st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!(
        "BENCH first_byte_ms={} marker_ms={} exit_ms={:.1} maxrss_kb={} status={}",
        opt(sample.first_byte_ms),
        opt(sample.marker_ms),
        sample.exit_ms,
        sample.maxrss_kb,
        sample.status
    );
    Ok(())
}

fn parse_sample(line: &str) -> Option<Sample> {
    let rest = line.trim().strip_prefix("BENCH ")?;
    let get = |k: &str| {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
    };
    Some(Sample {
        first_byte_ms: get("first_byte_ms")?.parse().ok(),
        marker_ms: get("marker_ms")?.parse().ok(),
        exit_ms: get("exit_ms")?.parse().ok()?,
        maxrss_kb: get("maxrss_kb")?.parse().ok()?,
        status: get("status")?.parse().ok()?,
    })
}

/// Outer mode: run every VMM `runs` times, interleaved, through KvmHost.
fn bench(args: &[String]) -> Result<(), String> {
    let mut runs = 5usize;
    let mut guest_log = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--runs needs a number")?
            }
            "--guest-log" => guest_log = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let images = guest_images().map_err(|e| e.to_string())?;
    let me = std::env::current_exe().map_err(|e| format!("locating myself: {e}"))?;
    let host = KvmHost::get();
    let vmms = [Vmm::Flotilla, Vmm::Qemu];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); vmms.len()];
    let mut failures: Vec<Vec<String>> = vec![Vec::new(); vmms.len()];
    let l1_started = Instant::now();
    host.run("true", Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    if host.is_nested() {
        eprintln!(
            "bench_boot: KVM host is the nested L1 VM (ready in {:.1}s); numbers are L2-in-TCG, compare only side by side",
            l1_started.elapsed().as_secs_f64()
        );
    }
    for run in 1..=runs {
        for (i, vmm) in vmms.iter().enumerate() {
            let config = GuestConfig {
                extra_append: if guest_log {
                    "loglevel=7".into()
                } else {
                    String::new()
                },
                ..GuestConfig::new(*vmm, "boot")
            };
            let inner = config.command_line(&images);
            let cmd = format!(
                "{} --measure {}",
                shell_quote(&me.to_string_lossy()),
                shell_quote(&inner)
            );
            let out = host
                .run(&cmd, Duration::from_secs(180))
                .map_err(|e| e.to_string())?;
            match out.stdout_str().lines().find_map(parse_sample) {
                Some(s) => {
                    eprintln!(
                        "run {run}/{runs} {vmm:?}: first byte {:?} ms, init {:?} ms, exit {:.0} ms, rss {} KiB, status {}",
                        s.first_byte_ms, s.marker_ms, s.exit_ms, s.maxrss_kb, s.status
                    );
                    if s.status != 0 || s.marker_ms.is_none() {
                        failures[i].push(format!(
                            "run {run}: status {}, marker {:?}",
                            s.status, s.marker_ms
                        ));
                    }
                    samples[i].push(s);
                }
                None => {
                    let msg = format!("run {run}: no measurement ({})", out.stderr_str().trim());
                    eprintln!("{vmm:?} {msg}");
                    failures[i].push(msg);
                }
            }
        }
    }

    println!("\nBoot: Debian cloud kernel + busybox initramfs, 1 vCPU, 256 MiB, `boot` scenario, {runs} runs each{}.",
        if host.is_nested() { ", inside the nested L1 KVM host (QEMU TCG)" } else { "" });
    println!("Times in ms from VMM process start: median (min-max). Peak RSS = VmHWM of the VMM process.\n");
    println!("| VMM | ok runs | first serial byte (ms) | FLOTILLA-GUEST-INIT (ms) | VMM exit (ms) | peak RSS (MiB) |");
    println!("|---|---|---|---|---|---|");
    for (i, vmm) in vmms.iter().enumerate() {
        let ok: Vec<&Sample> = samples[i]
            .iter()
            .filter(|s| s.status == 0 && s.marker_ms.is_some())
            .collect();
        let stat = |f: &dyn Fn(&Sample) -> Option<f64>| {
            summarize(ok.iter().filter_map(|s| f(s)).collect())
        };
        let name = match vmm {
            Vmm::Flotilla => "flotilla-vmm",
            Vmm::Qemu => "qemu microvm",
        };
        println!(
            "| {name} | {}/{runs} | {} | {} | {} | {} |",
            ok.len(),
            stat(&|s| s.first_byte_ms),
            stat(&|s| s.marker_ms),
            stat(&|s| Some(s.exit_ms)),
            stat(&|s| Some(s.maxrss_kb as f64 / 1024.0)),
        );
    }
    for (i, vmm) in vmms.iter().enumerate() {
        for f in &failures[i] {
            println!("\n{vmm:?} failed {f}");
        }
    }
    Ok(())
}

fn summarize(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    format!("{median:.0} ({:.0}-{:.0})", v[0], v[v.len() - 1])
}
