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
