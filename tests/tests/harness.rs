//! The KVM host harness itself: command round trips, exit statuses, binary
//! output framing and timeouts. One test function, so nextest (a process per
//! test) boots only one extra L1 VM for it.

use std::time::{Duration, Instant};

use flotilla_tests::{Error, KvmHost};

#[test]
fn kvm_host_runs_commands() {
    let host = KvmHost::get();
    let t = Duration::from_secs(60);

    let out = host
        .run("test -c /dev/kvm && pwd && echo err >&2; exit 7", t)
        .expect("simple command");
    assert_eq!(out.status, 7);
    let root = flotilla_tests::paths::workspace_root();
    assert_eq!(out.stdout_str().trim(), root.to_string_lossy());
    assert_eq!(out.stderr_str(), "err\n");

    // Commands see the host's files at the same paths.
    let out = host
        .run("cat tests/Cargo.toml", t)
        .expect("reading a workspace file");
    assert!(
        out.stdout_str().contains("flotilla-tests"),
        "{}",
        out.stdout_str()
    );

    // Every byte value, and text that looks like the agent's framing, pass
    // unchanged (the file is written here and read inside the KVM host).
    let dir = flotilla_tests::guest::scratch_dir("harness").expect("scratch dir");
    let mut payload: Vec<u8> = (0u8..=255).collect();
    payload.extend_from_slice(b"\nFLOTILLA-AGENT-RESULT 1 status=0 timedout=0 stdout=1 stderr=1\n");
    let file = dir.join("payload.bin");
    std::fs::write(&file, &payload).expect("writing payload");
    let cmd = format!("cat {} && head -c 300000 /dev/zero", file.display());
    let out = host.run(&cmd, t).expect("binary output");
    assert_eq!(out.stdout.len(), payload.len() + 300_000);
    assert_eq!(&out.stdout[..payload.len()], &payload[..]);

    let started = Instant::now();
    match host.run("echo before; sleep 600", Duration::from_secs(3)) {
        Err(Error::Timeout { output, .. }) => assert_eq!(output.stdout_str(), "before\n"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "timeout took {:?}",
        started.elapsed()
    );

    // The L1 clock runs at the right rate (its TSC rate is passed in from
    // the host): a 2 s sleep inside must not finish early.
    let started = Instant::now();
    host.run("sleep 2", t).expect("sleep");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "sleep 2 took {:?}",
        started.elapsed()
    );

    // Still usable after a timeout.
    let out = host.run("echo again", t).expect("command after a timeout");
    assert_eq!(out.stdout_str(), "again\n");
}
