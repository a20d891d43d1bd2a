//! Interoperability with the QEMU project's Python QMP library (`qemu.qmp` from PyPI), the
//! client many scripts and test suites use: its asyncio `QMPClient` and its synchronous
//! `legacy.QEMUMonitorProtocol` against our server with the fake handler.
//!
//! The library is installed into a venv under target/ on first use. If that fails (no
//! network, no python3-venv) the test fails with pip's output: it is never skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{serve, unlimited};

fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-qmp-venv");
        let python = dir.join("bin/python");
        let has_lib = |p: &Path| {
            Command::new(p)
                .args(["-c", "import qemu.qmp"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !has_lib(&python) {
            run_or_panic(Command::new("python3").args(["-m", "venv"]).arg(&dir));
            run_or_panic(Command::new(dir.join("bin/pip")).args([
                "install",
                "--disable-pip-version-check",
                "-q",
                "qemu.qmp",
            ]));
            assert!(
                has_lib(&python),
                "qemu.qmp still not importable after pip install"
            );
        }
        dir
    })
}

fn run_or_panic(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `script` with the socket path as argv[1]; it must print `marker`.
fn python(script: &str, socket: &Path, marker: &str) {
    let out = Command::new(venv().join("bin/python"))
        .arg("-c")
        .arg(script)
        .arg(socket)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(marker),
        "python failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

const ASYNC_CLIENT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient, ExecuteError

async def main(path):
    qmp = QMPClient('flotilla-test')
    await qmp.connect(path)            # greeting + qmp_capabilities
    v = qmp.greeting.QMP.version
    assert v['qemu']['major'] >= 5, v
    assert v['package'].startswith('flotilla-'), v
    r = await qmp.execute('query-version')
    assert r['qemu']['major'] == 5, r
    r = await qmp.execute('echo', {'v': {'nested': [1, 'two', None]}})
    assert r == {'nested': [1, 'two', None]}, r
    try:
        await qmp.execute('no-such-command')
        raise SystemExit('no error for an unknown command')
    except ExecuteError as e:
        assert e.error_class == 'CommandNotFound', e.error_class
    try:
        await qmp.execute('echo', {'v': 1, 'extra': 2})
        raise SystemExit('no error for an extra argument')
    except ExecuteError as e:
        assert e.error_class == 'GenericError', e.error_class
    with qmp.listener() as listener:
        await qmp.execute('emit', {'name': 'STOP', 'data': {'n': 1}})
        ev = await asyncio.wait_for(listener.get(), 10)
    assert ev['event'] == 'STOP' and ev['data'] == {'n': 1}, ev
    assert ev['timestamp']['seconds'] > 1600000000, ev
    assert 0 <= ev['timestamp']['microseconds'] < 1000000, ev
    await qmp.disconnect()
    print('ASYNC-OK')

asyncio.run(main(sys.argv[1]))
"#;

const LEGACY_CLIENT: &str = r#"
import os, sys
from qemu.qmp.legacy import QEMUMonitorProtocol

m = QEMUMonitorProtocol(sys.argv[1])
m.connect(negotiate=True)
assert m.cmd('echo', v=5) == 5
# An fd sent on its own (SCM_RIGHTS with one byte), then the command that takes it.
r, w = os.pipe()
os.write(w, b'hello from python')
os.close(w)
m.send_fd_scm(r)
os.close(r)
assert m.cmd('take-fd') == 'hello from python'
resp = m.cmd_raw('sleep', {'ms': 'soon'})
assert resp['error']['class'] == 'GenericError', resp
m.cmd('emit', name='RESUME')
ev = m.pull_event(wait=True)
assert ev['event'] == 'RESUME', ev
m.close()
print('LEGACY-OK')
"#;

#[test]
fn qemu_python_library_async_client() {
    let f = serve(unlimited());
    python(ASYNC_CLIENT, &f.path, "ASYNC-OK");
}

#[test]
fn qemu_python_library_legacy_client_with_fd_passing() {
    let f = serve(unlimited());
    python(LEGACY_CLIENT, &f.path, "LEGACY-OK");
}

const REAL_VM_CLIENT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient

async def main(path):
    qmp = QMPClient('flotilla-test')
    await qmp.connect(path)
    r = await qmp.execute('query-status')
    assert r == {'running': True, 'singlestep': False, 'status': 'running'}, r
    with qmp.listener() as listener:
        await qmp.execute('stop')
        ev = await asyncio.wait_for(listener.get(), 10)
    assert ev['event'] == 'STOP', ev
    r = await qmp.execute('query-status')
    assert r['status'] == 'paused', r
    with qmp.listener() as listener:
        await qmp.execute('quit')
        ev = await asyncio.wait_for(listener.get(), 10)
    assert ev['event'] == 'SHUTDOWN' and ev['data']['reason'] == 'host-qmp-quit', ev
    await qmp.disconnect()
    print('REAL-VM-OK')

asyncio.run(main(sys.argv[1]))
"#;

/// The library against the real `flotilla` with a running core (a spin-loop guest, which any
/// /dev/kvm runs): query-status, stop with its STOP event, quit with SHUTDOWN.
#[test]
fn qemu_python_library_drives_the_real_gateway() {
    let dir = common::temp_dir("pyreal");
    let sock = dir.join("q.sock");
    let kernel = common::spin_kernel(&dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", sock.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn flotilla");
    common::wait_for("the QMP socket", || sock.exists());
    python(REAL_VM_CLIENT, &sock, "REAL-VM-OK");
    assert_eq!(child.wait().expect("wait for flotilla").code(), Some(0));
}
