#!/usr/bin/env python3
"""The VM lifecycle over QMP, as an orchestrator drives it, against a real guest.

Starts `flotilla` (StratoVirt command line) with QMP on a unix socket and on TCP, then:
stop -> query-status paused -> cont -> (second client over TCP) -> system_reset -> the guest
boots again -> system_powerdown -> the guest shuts down through the ACPI power button ->
SHUTDOWN event -> flotilla exits 0. Plain sockets and JSON, no QMP library: this is what
`ncat -U` users see. Prints LIFECYCLE-OK on success; any failure raises.
"""
import argparse
import os
import socket
import subprocess
import sys

from flotilla_qmp import launch, Qmp, wait_for


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--flotilla", required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    a = p.parse_args()

    run = f"/tmp/flotilla-lifecycle-{os.getpid()}"
    os.makedirs(run, exist_ok=True)
    qmp_path, serial = f"{run}/qmp.sock", f"{run}/serial.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    append = "console=ttyS0 reboot=k panic=-1 quiet flotilla.scenario=powerbutton"
    vm = launch(
        [a.flotilla, "-name", "lifecycle", "-kernel", a.kernel, "-initrd", a.initrd,
         "-append", append, "-m", "256", "-smp", "2", "-serial", f"file:{serial}",
         "-qmp", f"unix:{qmp_path},server,nowait", "-qmp", f"tcp:127.0.0.1:{port},server,nowait"],
        stdin=subprocess.DEVNULL)
    try:
        wait_for("the QMP socket", lambda: os.path.exists(qmp_path), 30)
        unix = socket.socket(socket.AF_UNIX)
        unix.connect(qmp_path)
        q = Qmp(unix)
        log = lambda: open(serial, errors="replace").read() if os.path.exists(serial) else ""
        wait_for("the guest to arm its power button", lambda: "powerbutton=armed" in log())
        print("guest booted", flush=True)

        assert q.cmd("stop") == {}
        q.event("STOP")
        assert q.cmd("query-status")["status"] == "paused"
        assert q.cmd("cont") == {}
        q.event("RESUME")
        assert q.cmd("query-status") == {"running": True, "singlestep": False, "status": "running"}
        cpus = q.cmd("query-cpus")
        assert [c["CPU"] for c in cpus] == [0, 1] and all(c["thread_id"] > 0 for c in cpus), cpus

        tcp = Qmp(socket.create_connection(("127.0.0.1", port)))
        assert tcp.cmd("query-status")["status"] == "running"
        print("stop/cont/query-status/query-cpus ok on unix and tcp", flush=True)

        assert q.cmd("system_reset") == {}
        e = q.event("RESET")
        assert e["data"] == {"guest": True}, e
        wait_for("the guest to boot again", lambda: log().count("powerbutton=armed") >= 2)
        print("system_reset: guest booted again", flush=True)

        assert q.cmd("system_powerdown") == {}
        # Well inside the harness's limit for the whole script, so that a hang here fails
        # with the guest's serial log rather than a killed KVM host VM.
        q.event("POWERDOWN", timeout=60)
        e = q.event("SHUTDOWN", timeout=120)
        assert e["data"] == {"guest": True, "reason": "guest-shutdown"}, e
        assert tcp.event("SHUTDOWN", timeout=30)["data"]["guest"] is True
        assert "powerbutton=pressed" in log(), log()
        status = vm.wait(timeout=30)
        assert status == 0, f"flotilla exited with {status}"
        print("LIFECYCLE-OK", flush=True)
    finally:
        if vm.poll() is None:
            vm.kill()
        if os.path.exists(serial):
            sys.stderr.write("--- guest serial ---\n" + open(serial, errors="replace").read())


if __name__ == "__main__":
    main()
