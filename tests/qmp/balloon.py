#!/usr/bin/env python3
"""The balloon with a real guest: memory the guest gives up really returns to the host.

flotilla boots a 1 GiB guest with `-device virtio-balloon-device,deflate-on-oom=true`; the
guest (`balloon` scenario) touches most of its memory, then reports MemFree every second.
  1. balloon 512 MiB: BALLOON_CHANGED events until the guest holds 512 MiB, query-balloon
     says 512 MiB, guest MemFree drops by >= 400 MiB, and the guest-memory memfd of the core
     loses >= 400 MiB of allocated blocks (holes punched by flotilla-balloon);
  2. balloon 1 GiB: the guest gets it back;
  3. balloon 512 MiB again and SIGKILL flotilla-balloon mid-inflate: it is restarted and
     the balloon still reaches 512 MiB, query-balloon and the memfd agree;
  4. balloon 256 MiB, then the guest allocates 600 MiB: deflate-on-oom hands memory back
     instead of the OOM killer killing anything.
Prints BALLOON-OK on success; any failure raises.
"""
import os
import re
import subprocess
import time

from flotilla_qmp import launch, alive, children, connect_unix, wait_for, driver_args, finish, reader, run_dir

MIB = 1 << 20
GIB = 1 << 30


def memfd_bytes(core_pid):
    """Allocated bytes of the core's guest-memory memfd."""
    fd_dir = f"/proc/{core_pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}").startswith("/memfd:flotilla-guest-ram"):
                return os.stat(f"{fd_dir}/{fd}").st_blocks * 512
        except OSError:
            continue
    raise RuntimeError("no guest-memory memfd in the core")


def main():
    a = driver_args()

    run = run_dir("balloon")
    qmp_path, serial = f"{run}/qmp.sock", f"{run}/serial.log"
    append = "console=ttyS0 reboot=k panic=-1 quiet flotilla.scenario=balloon"
    # One vCPU, as every I/O-heavy driver here: pinned to one L1 CPU on the nested KVM host
    # (flotilla_qmp.launch), two vCPUs time-slice there with the backend; one vCPU is what
    # the other I/O drivers and the iperf runs use (tests/README.md "Platform failures",
    # session 7).
    vm = launch(
        [a.flotilla, "-name", "balloon", "-kernel", a.kernel, "-initrd", a.initrd,
         "-append", append, "-m", "1024", "-smp", "1", "-serial", f"file:{serial}",
         "-device", "virtio-balloon-device,deflate-on-oom=true",
         "-qmp", f"unix:{qmp_path},server,nowait"],
        stdin=subprocess.DEVNULL)
    try:
        q = connect_unix(qmp_path)
        log = reader(serial)
        core = [c for c in children(vm.pid)[0] if open(f"/proc/{c}/comm").read().strip() == "flotilla-vmm"][0]
        backend = lambda: q.cmd("flotilla-query-backends")[0]
        assert backend()["driver"] == "virtio-balloon-device", backend()

        def free_kib():
            frees = re.findall(r"balloon free=(\d+)", log())
            return int(frees[-1]) if frees else None

        def settle(target, timeout=600):
            """Waits until the guest holds the balloon at `target` bytes (query-balloon)."""
            deadline = time.time() + timeout
            while time.time() < deadline:
                actual = q.cmd("query-balloon")["actual"]
                if abs(actual - target) < 2 * MIB:
                    return actual
                time.sleep(0.5)
            raise TimeoutError(f"balloon stuck at {actual} (target {target})")

        wait_for("the guest to touch its memory", lambda: "balloon filled" in log(), 600)
        wait_for("a meminfo report", lambda: free_kib() is not None, 60)
        time.sleep(2)
        free0, host0 = free_kib(), memfd_bytes(core)
        assert q.cmd("query-balloon") == {"actual": GIB}
        print(f"balloon: guest free {free0 // 1024} MiB, host allocated {host0 // MIB} MiB", flush=True)

        # 1. Down to 512 MiB.
        t0 = time.time()
        assert q.cmd("balloon", value=512 * MIB) == {}
        settle(512 * MIB)
        print(f"balloon: guest at 512 MiB after {time.time() - t0:.1f} s", flush=True)
        e = q.event("BALLOON_CHANGED", timeout=5)
        assert 0 < e["data"]["actual"] <= GIB, e
        time.sleep(2)
        free1, host1 = free_kib(), memfd_bytes(core)
        print(f"balloon: guest free {free1 // 1024} MiB, host allocated {host1 // MIB} MiB", flush=True)
        assert free0 - free1 >= 400 * 1024, (free0, free1)
        assert host0 - host1 >= 400 * MIB, (host0, host1)

        # 2. Back up.
        assert q.cmd("balloon", value=4 * GIB) == {}, "clamped to the guest's memory"
        settle(GIB)
        wait_for("the guest to get its memory back", lambda: free_kib() - free1 >= 400 * 1024, 60)
        print("balloon: back to 1 GiB", flush=True)

        # 3. Kill the backend mid-inflate.
        assert q.cmd("balloon", value=512 * MIB) == {}
        wait_for("inflation to start", lambda: q.cmd("query-balloon")["actual"] < GIB - 16 * MIB, 120)
        pid = backend()["pid"]
        os.kill(pid, 9)
        assert q.event("FLOTILLA_BACKEND_LOST", timeout=30)["data"]["pid"] == pid
        q.event("FLOTILLA_BACKEND_RESTARTED", timeout=30)
        assert not alive(pid)
        settle(512 * MIB)
        time.sleep(2)
        host3 = memfd_bytes(core)
        assert host0 - host3 >= 400 * MIB, (host0, host3)
        print(f"balloon: restarted mid-inflate, still reached 512 MiB (host allocated {host3 // MIB} MiB)", flush=True)

        # 4. deflate-on-oom.
        assert q.cmd("balloon", value=256 * MIB) == {}
        settle(256 * MIB)
        wait_for("the guest's allocation under the balloon", lambda: "oom-fill " in log(), 900)
        assert "balloon oom-fill ok" in log(), log()[-3000:]
        assert "Killed process" not in log() and "Out of memory" not in log(), log()[-3000:]
        assert q.cmd("query-balloon")["actual"] > 256 * MIB, "the balloon gave memory back"
        print("balloon: deflate-on-oom gave the guest memory back", flush=True)
        assert q.cmd("balloon", value=GIB) == {}
        q.cmd("quit")
        assert vm.wait(timeout=60) == 0
        print("BALLOON-OK", flush=True)
    finally:
        finish([vm], serial, run, 3000)


if __name__ == "__main__":
    main()
