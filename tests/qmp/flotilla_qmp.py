"""QMP over a plain socket, as the e2e drivers in this directory use it (no QMP library:
this is what `ncat -U` users see), plus small helpers for watching a VM from the host."""
import json
import os
import shlex
import socket
import subprocess
import time


class Qmp:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.events = []
        greeting = self.recv()
        assert greeting["QMP"]["version"]["qemu"]["major"] >= 5, greeting
        assert self.cmd("qmp_capabilities") == {}, "negotiation"

    def recv(self, timeout=60):
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            m = self.recv()
            if "event" in m:
                assert "seconds" in m["timestamp"], m
                self.events.append(m)
            elif "error" in m:
                raise RuntimeError(f"{name}: {m['error']}")
            else:
                return m["return"]

    def event(self, name, timeout=300):
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError(f"no {name} event")
            m = self.recv(timeout=left)
            if "event" in m:
                self.events.append(m)


def wait_for(what, cond, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise TimeoutError(what)



def connect_unix(path, timeout=30):
    """Waits for the QMP socket at `path` and negotiates."""
    deadline = time.time() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            # The file appears at bind(), a moment before listen().
            s.connect(path)
            return Qmp(s)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def children(pid):
    """Pids of the live (non-zombie) children of `pid`, and of the zombie ones."""
    live, zombies = [], []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for c in f.read().split():
                    (zombies if state(int(c)) == "Z" else live).append(int(c))
    except FileNotFoundError:
        pass
    return live, zombies


def state(pid):
    """The process state letter (R, S, Z, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid):
    s = state(pid)
    return s is not None and s != "Z"


def launch(argv, **kwargs):
    """Starts the VMM (`argv`) as the test harness wants every L2 VMM started: behind
    $FLOTILLA_L2_PIN (`taskset -c 0` on the nested KVM host, tests/src/host.rs
    `L2_PIN_VAR`; empty on hardware KVM). taskset execs the VMM: the pid is flotilla's."""
    prefix = shlex.split(os.environ.get("FLOTILLA_L2_PIN", ""))
    return subprocess.Popen(prefix + argv, **kwargs)


def driver_args(**extra):
    """The arguments every driver takes (--flotilla, --kernel, --initrd), plus `extra`
    options given as name=(type, default)."""
    import argparse
    p = argparse.ArgumentParser()
    for name in ("flotilla", "kernel", "initrd"):
        p.add_argument(f"--{name}", required=True)
    for name, (kind, default) in extra.items():
        p.add_argument(f"--{name}", type=kind, default=default)
    return p.parse_args()


def run_dir(name):
    """A fresh scratch directory for this driver run."""
    path = f"/tmp/flotilla-{name}-{os.getpid()}"
    os.makedirs(path, exist_ok=True)
    return path


def reader(path):
    """A function returning the complete lines so far of a growing file (the guest's serial
    log): a line still being written is left out, so a check never sees half a result."""
    def read():
        if not os.path.exists(path):
            return ""
        text = open(path, errors="replace").read()
        return text[: text.rfind("\n") + 1]
    return read


def dump_devices(q, ids):
    """After a timeout: the backends and each device's rings as the core reads them from
    guest memory (which side of a stalled device stopped). Diagnostics only: errors are
    printed, never raised, so they cannot hide the timeout."""
    for cmd, args in [("flotilla-query-backends", {})] + [
            ("x-flotilla-query-virtqueues", {"id": i}) for i in ids]:
        try:
            print(f"{cmd} {args}: {q.cmd(cmd, **args)}", flush=True)
        except Exception as e:
            print(f"{cmd} {args}: {e}", flush=True)


def finish(procs, serial, run, tail=4000):
    """Kills what still runs, shows the end of the guest's serial log, removes `run`."""
    import subprocess
    import sys
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
    if os.path.exists(serial):
        sys.stderr.write("--- guest serial (tail) ---\n" + open(serial, errors="replace").read()[-tail:])
    subprocess.run(["rm", "-rf", run])
