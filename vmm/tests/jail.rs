//! The core's jail, proven from the inside and seen from the host: flotilla-vmm (built with
//! the test-only `escape-test` feature by this crate's own dev-dependency) boots a tiny
//! guest that spins, and once every thread runs under its filter the main thread tries to
//! leave the jail as `FLOTILLA_ESCAPE_TEST` says. Works on any /dev/kvm (PVM included): the
//! guest runs two instructions in a loop.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla_backend::test_support::proc::{self, status_field, NO_CAPS};
use flotilla_backend::test_support::{assert_errno, assert_sigsys, fatal_attempts, stderr};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla-vmm");

/// A guest that spins forever (`jmp .`), in a file of its own.
fn spinning_kernel() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let name = format!("flotilla-jail-elf-{}-{n}", std::process::id());
    flotilla_tests::elf::write_tiny_kernel(&std::env::temp_dir(), &name, &[0xeb, 0xfe])
        .expect("write test kernel")
}

fn command(kernel: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("-kernel")
        .arg(kernel)
        .args(["-smp", "2"])
        .args(args)
        .env_remove("FLOTILLA_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Runs the core with `attempt`, waiting at most 30 s for it to end.
fn attempt(attempt: &str, args: &[&str]) -> Output {
    let kernel = spinning_kernel();
    let mut child = command(&kernel, args)
        .env("FLOTILLA_ESCAPE_TEST", attempt)
        .spawn()
        .expect("spawn flotilla-vmm");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&kernel);
    out
}

#[test]
fn seccomp_kills_the_core_on_exec_socket_ptrace_kill_and_mount() {
    for (what, nr) in fatal_attempts() {
        assert_sigsys(&what, &attempt(&what, &[]), nr);
    }
}

#[test]
fn seccomp_fences_the_cores_file_opens_with_eacces() {
    assert_errno("open", &attempt("open", &[]), libc::EACCES);
    let what = format!("proc-mem:{}", std::process::id());
    assert_errno(&what, &attempt(&what, &[]), libc::EACCES);
}

#[test]
fn with_seccomp_disabled_the_rest_of_the_jail_still_holds() {
    // -disable-seccomp turns the filters off and nothing else: the empty root, the
    // network namespace and the dropped privileges refuse every attempt.
    let off = ["-disable-seccomp"];
    let pid = std::process::id();
    assert_errno("open", &attempt("open", &off), libc::ENOENT);
    assert_errno("exec", &attempt("exec", &off), libc::ENOENT);
    assert_errno("socket", &attempt("socket", &off), libc::ENETUNREACH);
    assert_errno("mount", &attempt("mount", &off), libc::EPERM);
    // No pid namespace for the core (see vmm::jail), but as nobody without capabilities it
    // cannot signal or trace a root process.
    let what = format!("kill:{pid}");
    assert_errno(&what, &attempt(&what, &off), libc::EPERM);
    let what = format!("ptrace:{pid}");
    assert_errno(&what, &attempt(&what, &off), libc::EPERM);
}

#[test]
fn the_jailed_core_seen_from_the_host() {
    let kernel = spinning_kernel();
    let mut child = command(&kernel, &[]).spawn().expect("spawn flotilla-vmm");
    let pid = child.id();
    let tasks = format!("/proc/{pid}/task");
    // Jailed once every thread (main, two vCPUs) has its filter.
    let deadline = Instant::now() + Duration::from_secs(30);
    let threads = loop {
        let threads: Vec<String> = std::fs::read_dir(&tasks)
            .unwrap()
            .filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string()))
            .collect();
        let fenced = threads
            .iter()
            .filter(|t| status_field(&format!("{tasks}/{t}/status"), "Seccomp") == "2")
            .count();
        if threads.len() >= 3 && fenced == threads.len() {
            break threads;
        }
        assert!(
            Instant::now() < deadline,
            "not every thread fenced: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let names: Vec<String> = threads
        .iter()
        .map(|t| {
            std::fs::read_to_string(format!("{tasks}/{t}/comm"))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect();
    assert!(names.iter().any(|n| n == "vcpu1"), "{names:?}");
    for t in &threads {
        let status = format!("{tasks}/{t}/status");
        for (field, want) in [
            ("CapEff", NO_CAPS),
            ("CapPrm", NO_CAPS),
            ("CapBnd", NO_CAPS),
            ("NoNewPrivs", "1"),
            ("Seccomp", "2"),
        ] {
            assert_eq!(status_field(&status, field), want, "task {t} {field}");
        }
        let uid = status_field(&status, "Uid");
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert!(uid.split_whitespace().all(|u| u == "65534"), "{t}: {uid}");
        }
    }
    let pid_s = pid.to_string();
    for which in ["net", "mnt", "ipc", "uts"] {
        assert_ne!(proc::ns("self", which), proc::ns(&pid_s, which), "{which}");
    }
    assert!(proc::root_is_empty(pid), "the core's root is not empty");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max core file size") && l.contains(" 0 ")),
        "{limits}"
    );
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&kernel);
    assert!(
        !stderr(&out).contains("seccomp refused"),
        "{}",
        stderr(&out)
    );
}
