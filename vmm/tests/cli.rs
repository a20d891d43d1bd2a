//! The flotilla-vmm command line as a user meets it: bad input gets one line naming the
//! problem and exit status 2, never a panic. These run on any host: they fail before a guest
//! would execute. (Having an integration test here also makes `cargo test --workspace` build
//! the real binary that the end-to-end tests in `tests/` boot.)

use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla-vmm"))
        .args(args)
        .env_remove("FLOTILLA_LOG")
        .output()
        .expect("run flotilla-vmm")
}

fn assert_usage_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(needle), "'{needle}' not in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unknown_and_malformed_options_name_the_option() {
    assert_usage_error(&vmm(&["-kernel", "k", "-bogus"]), "-bogus");
    assert_usage_error(&vmm(&["-kernel"]), "-kernel");
    assert_usage_error(&vmm(&["-kernel", "k", "-m", "100"]), "'-m'");
    assert_usage_error(&vmm(&["-kernel", "k", "-m", "lots"]), "'-m'");
    assert_usage_error(&vmm(&["-kernel", "k", "-smp", "255"]), "'-smp'");
    assert_usage_error(&vmm(&["-kernel", "k", "-smp", "cpus=0"]), "'-smp'");
    assert_usage_error(&vmm(&["-kernel", "k", "-serial", "pty"]), "'-serial'");
    assert_usage_error(&vmm(&["-kernel", "k", "-kernel", "k"]), "-kernel");
    assert_usage_error(&vmm(&["-kernel", "k", "stray"]), "stray");
    assert_usage_error(&vmm(&["-m", "512"]), "-kernel");
    let long_name = "n".repeat(256);
    assert_usage_error(&vmm(&["-kernel", "k", "-name", &long_name]), "'-name'");
}

#[test]
fn missing_files_are_user_errors() {
    assert_usage_error(
        &vmm(&["-kernel", "/nonexistent/vmlinuz"]),
        "/nonexistent/vmlinuz",
    );
}

#[test]
fn help_and_version() {
    let out = vmm(&["-help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("-kernel"));
    let out = vmm(&["-version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("flotilla-vmm "));
}

/// A minimal ELF64 "kernel" whose entry point is `code`, loaded at 1 MiB.
fn elf_kernel(code: &[u8]) -> std::path::PathBuf {
    const LOAD: u64 = 0x10_0000;
    let mut elf = Vec::new();
    let code_off = 64 + 56;
    // ELF header.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    // One PT_LOAD program header.
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [
        code_off as u64,
        LOAD,
        LOAD,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(code);
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("flotilla-cli-elf-{}-{n}", std::process::id()));
    std::fs::write(&path, elf).expect("write test kernel");
    path
}

/// A guest that crashes before any exception handler exists (ud2 with an empty IDT) triple
/// faults: the VMM ends with status 1 and a register dump, not a hang or a panic. Only a
/// few guest instructions run, so this works on any /dev/kvm, PVM included.
#[test]
fn triple_fault_ends_with_register_dump() {
    let kernel = elf_kernel(&[0x0f, 0x0b]);
    let out = vmm(&["-kernel", kernel.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_file(&kernel);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("triple fault"), "{stderr}");
    assert!(stderr.contains("rip=0x100000"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The control socket as the gateway drives it: stop, query-status, cont, query-cpus, quit,
/// with STOP/RESUME/SHUTDOWN events. The guest is a two-byte spin loop, which even PVM runs.
#[test]
fn control_socket_lifecycle() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;

    let kernel = elf_kernel(&[0xeb, 0xfe]); // jmp .
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let child_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-vmm"));
    cmd.args([
        "-kernel",
        kernel.to_str().unwrap_or_default(),
        "-smp",
        "2",
        "-control-fd",
        "3",
    ]);
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(child_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn flotilla-vmm");
    drop(theirs);
    let mut writer = ours.try_clone().expect("clone");
    let mut reader = BufReader::new(ours);
    let mut roundtrip = |line: &str| -> Vec<serde_json::Value> {
        writer
            .write_all(format!("{line}\n").as_bytes())
            .expect("send");
        let mut got = Vec::new();
        loop {
            let mut buf = String::new();
            reader.read_line(&mut buf).expect("read");
            let v: serde_json::Value = serde_json::from_str(&buf).expect("json");
            let done = v.get("return").is_some() || v.get("error").is_some();
            got.push(v);
            if done {
                return got;
            }
        }
    };
    let status = roundtrip(r#"{"execute":"query-status","id":1}"#);
    assert_eq!(status[0]["return"]["status"], "running");
    assert_eq!(status[0]["id"], 1);
    let stop = roundtrip(r#"{"execute":"stop"}"#);
    assert_eq!(stop[0]["event"], "STOP");
    assert_eq!(
        roundtrip(r#"{"execute":"query-status"}"#)[0]["return"]["status"],
        "paused"
    );
    let cont = roundtrip(r#"{"execute":"cont"}"#);
    assert_eq!(cont[0]["event"], "RESUME");
    let cpus = roundtrip(r#"{"execute":"query-cpus"}"#);
    let cpus = cpus[0]["return"].as_array().expect("cpu list");
    assert_eq!(cpus.len(), 2);
    assert!(cpus
        .iter()
        .all(|c| c["thread_id"].as_i64().unwrap_or(0) > 0));
    assert_eq!(
        roundtrip(r#"{"execute":"bogus"}"#)[0]["error"]["class"],
        "CommandNotFound"
    );
    assert_eq!(
        roundtrip(r#"{"execute":"quit"}"#)[0]["return"],
        serde_json::json!({})
    );
    let mut buf = String::new();
    reader.read_line(&mut buf).expect("SHUTDOWN event");
    let event: serde_json::Value = serde_json::from_str(&buf).expect("json");
    assert_eq!(event["event"], "SHUTDOWN");
    assert_eq!(event["data"]["reason"], "host-qmp-quit");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let _ = std::fs::remove_file(&kernel);
}
