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

/// A tiny ELF "kernel" running `code` (see `flotilla_tests::elf`), in a file of its own.
fn elf_kernel(code: &[u8]) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let name = format!("flotilla-cli-elf-{}-{n}", std::process::id());
    flotilla_tests::elf::write_tiny_kernel(&std::env::temp_dir(), &name, code)
        .expect("write test kernel")
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

/// flotilla-vmm with its control socket on fd 3, as the gateway runs it.
struct Controlled {
    child: std::process::Child,
    writer: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Controlled {
    fn spawn(args: &[&str]) -> Controlled {
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;
        use std::os::unix::process::CommandExt;

        // Tests run on parallel threads; descriptor numbers are process-wide, so creating
        // the pair and forking are serialized.
        static SPAWN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = SPAWN.lock().unwrap_or_else(|p| p.into_inner());
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let child_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-vmm"));
        cmd.args(args).args(["-control-fd", "3"]);
        // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself would keep FD_CLOEXEC set; clear it explicitly then.
                let ok = if child_fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0) == 0
                } else {
                    libc::dup2(child_fd, 3) == 3
                };
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn flotilla-vmm");
        drop(theirs);
        let writer = ours.try_clone().expect("clone");
        Controlled {
            child,
            writer,
            reader: std::io::BufReader::new(ours),
        }
    }

    fn next(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut buf = String::new();
        self.reader.read_line(&mut buf).expect("read");
        if buf.is_empty() {
            let mut stderr = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            panic!(
                "flotilla-vmm closed the control socket; status {:?}, stderr: {stderr}",
                self.child.wait()
            );
        }
        serde_json::from_str(&buf).expect("json")
    }

    /// Sends a command; returns the events that came before the reply, then the reply.
    fn roundtrip(&mut self, line: &str) -> Vec<serde_json::Value> {
        use std::io::Write;
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .expect("send");
        let mut got = Vec::new();
        loop {
            let v = self.next();
            let done = v.get("return").is_some() || v.get("error").is_some();
            got.push(v);
            if done {
                return got;
            }
        }
    }
}

/// The control socket as the gateway drives it: stop, query-status, cont, query-cpus, quit,
/// with STOP/RESUME/SHUTDOWN events. The guest is a two-byte spin loop, which even PVM runs.
#[test]
fn control_socket_lifecycle() {
    let kernel = elf_kernel(&[0xeb, 0xfe]); // jmp .
    let mut vm = Controlled::spawn(&["-kernel", kernel.to_str().unwrap_or_default(), "-smp", "2"]);
    let status = vm.roundtrip(r#"{"execute":"query-status","id":1}"#);
    assert_eq!(status[0]["return"]["status"], "running");
    assert_eq!(status[0]["id"], 1);
    let stop = vm.roundtrip(r#"{"execute":"stop"}"#);
    assert_eq!(stop[0]["event"], "STOP");
    assert_eq!(
        vm.roundtrip(r#"{"execute":"query-status"}"#)[0]["return"]["status"],
        "paused"
    );
    let cont = vm.roundtrip(r#"{"execute":"cont"}"#);
    assert_eq!(cont[0]["event"], "RESUME");
    let cpus = vm.roundtrip(r#"{"execute":"query-cpus"}"#);
    let cpus = cpus[0]["return"].as_array().expect("cpu list").clone();
    assert_eq!(cpus.len(), 2);
    assert!(cpus
        .iter()
        .all(|c| c["thread_id"].as_i64().unwrap_or(0) > 0));
    assert_eq!(
        vm.roundtrip(r#"{"execute":"bogus"}"#)[0]["error"]["class"],
        "CommandNotFound"
    );
    assert_eq!(
        vm.roundtrip(r#"{"execute":"quit"}"#)[0]["return"],
        serde_json::json!({})
    );
    let event = vm.next();
    assert_eq!(event["event"], "SHUTDOWN");
    assert_eq!(event["data"]["reason"], "host-qmp-quit");
    assert_eq!(vm.child.wait().expect("wait").code(), Some(0));
    let _ = std::fs::remove_file(&kernel);
}

/// `system_reset` reboots the guest in place: a guest that prints one byte at boot prints it
/// again, and keeps running.
#[test]
fn system_reset_reboots_the_guest() {
    // mov al, 'A'; mov dx, 0x3f8; out dx, al; jmp .
    let kernel = elf_kernel(&[0xb0, 0x41, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xeb, 0xfe]);
    let serial = std::env::temp_dir().join(format!("flotilla-reset-serial-{}", std::process::id()));
    let _ = std::fs::remove_file(&serial);
    let serial_arg = format!("file:{}", serial.display());
    let mut vm = Controlled::spawn(&[
        "-kernel",
        kernel.to_str().unwrap_or_default(),
        "-smp",
        "2",
        "-serial",
        &serial_arg,
    ]);
    let wait_for = |n: usize| {
        for _ in 0..500 {
            if std::fs::read(&serial).map(|b| b.len()).unwrap_or(0) >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    wait_for(1);
    let reply = vm.roundtrip(r#"{"execute":"system_reset"}"#);
    assert_eq!(
        reply[0],
        serde_json::json!({"event":"RESET","data":{"guest":true}})
    );
    wait_for(2);
    assert_eq!(std::fs::read(&serial).expect("serial output"), b"AA");
    assert_eq!(
        vm.roundtrip(r#"{"execute":"query-status"}"#)[0]["return"]["status"],
        "running"
    );
    vm.roundtrip(r#"{"execute":"quit"}"#);
    assert_eq!(vm.child.wait().expect("wait").code(), Some(0));
    let _ = std::fs::remove_file(&kernel);
    let _ = std::fs::remove_file(&serial);
}
