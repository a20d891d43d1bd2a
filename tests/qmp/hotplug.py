#!/usr/bin/env python3
"""Disk hotplug over QMP as an orchestrator (Kata Containers) drives it, with a real guest.

flotilla boots with one cold-plugged disk (vda, -drive/-device) and QMP on a unix socket;
the guest runs the `hotplug` scenario, which makes a file system on every disk that
appears and reports disks that vanish. Then:
  1. blockdev-add + device_add (addr 0x1): the guest sees vdb, mkfs + mount + write +
     verify + umount; device_del: DEVICE_DELETED, the backend is reaped, the guest sees
     capacity 0; blockdev-del; the same id again works.
  2. three disks plugged at once (vdc, vdd, vde), all used by the guest, all unplugged.
  3. every error case: duplicate id, unknown node, slot out of range, slot busy, device_add
     without blockdev-add, device_del of an unknown id, blockdev-del of a node in use; after
     each, exactly the expected backends run.
  4. the cold-plugged disk is unplugged the same way.
  5. 100 plug/unplug cycles on vdf: no zombie, no stray backend.
  6. quit: flotilla exits 0 and none of its processes is left.
  7. a second VM with a hot-plugged disk whose gateway is SIGKILLed: core and backend die.
Prints HOTPLUG-OK and the latencies on success; any failure raises.
"""
import signal
import subprocess
import time

from flotilla_qmp import launch, alive, children, connect_unix, wait_for, driver_args, finish, reader, run_dir


def main():
    a = driver_args()

    run = run_dir("hotplug")
    images = {}
    for name in ["cold", "d1", "d2", "d3", "d4", "cycle"]:
        images[name] = f"{run}/{name}.img"
        with open(images[name], "wb") as f:
            f.truncate(32 << 20)
    qmp_path, serial = f"{run}/qmp.sock", f"{run}/serial.log"
    append = "console=ttyS0 reboot=k panic=-1 quiet flotilla.scenario=hotplug"
    # One vCPU, as restart.py and net.py: an L2 vCPU-1 triple fault ended this test once
    # (tests/README.md "Platform failures").
    vm = launch(
        [a.flotilla, "-name", "hotplug", "-kernel", a.kernel, "-initrd", a.initrd,
         "-append", append, "-m", "256", "-smp", "1", "-serial", f"file:{serial}",
         "-drive", f"id=cold,file={images['cold']},if=none,direct=off",
         "-device", "virtio-blk-device,drive=cold,id=cold0",
         "-qmp", f"unix:{qmp_path},server,nowait"],
        stdin=subprocess.DEVNULL)
    second = None
    try:
        q = connect_unix(qmp_path)
        log = reader(serial)
        wait_for("the guest's hotplug watcher", lambda: "hotplug=ready" in log())
        assert "hotplug vda initial=65536" in log(), log()
        assert "hotplug vdb initial=0" in log(), log()

        def backends():
            return {b["id"]: b for b in q.cmd("flotilla-query-backends")}

        def expect_backends(ids):
            got = backends()
            assert sorted(got) == sorted(ids), got
            live, zombies = children(vm.pid)
            assert not zombies, f"zombies: {zombies}"
            # The core plus one flotilla-blk per disk.
            assert len(live) == 1 + len(ids), (live, got)
            for b in got.values():
                assert alive(b["pid"]) and b["state"] == "running", b
            return got

        def count(line):
            return log().count(line)

        expect_backends(["cold0"])

        # 1. One disk in, used, out, and in again.
        for round_ in (1, 2):
            t0 = time.time()
            assert q.cmd("blockdev-add", **{"node-name": "drive-1", "file": {"driver": "file", "filename": images["d1"]},
                         "cache": {"direct": False}, "read-only": False}) == {}
            t1 = time.time()
            assert q.cmd("device_add", id="drive-1", driver="virtio-blk-mmio", addr="0x1") == {}
            t2 = time.time()
            wait_for("the guest to see vdb", lambda: count("hotplug vdb sectors=65536") >= round_, 60)
            t3 = time.time()
            wait_for("the guest to use vdb", lambda: count("hotplug vdb up ") >= round_, 120)
            assert count("hotplug vdb up ok") == round_, log()
            if round_ == 1:
                print(f"latency blockdev-add {1000 * (t1 - t0):.1f} ms, device_add {1000 * (t2 - t1):.1f} ms, "
                      f"device_add->guest sees disk {1000 * (t3 - t1):.0f} ms (TCG L1, guest polls every 100 ms)", flush=True)
            pid = expect_backends(["cold0", "drive-1"])["drive-1"]["pid"]
            assert q.cmd("device_del", id="drive-1") == {}
            e = q.event("DEVICE_DELETED", timeout=30)
            assert e["data"] == {"device": "drive-1", "path": "drive-1"}, e
            assert not alive(pid), f"backend {pid} survived device_del"
            expect_backends(["cold0"])
            wait_for("the guest to see vdb go", lambda: count("hotplug vdb down") >= round_, 60)
            assert q.cmd("blockdev-del", **{"node-name": "drive-1"}) == {}
        print("hotplug: vdb plugged, used and unplugged twice", flush=True)

        # 2. Three at once.
        disks = [("drive-2", "d2", "0x2", "vdc"), ("drive-3", "d3", "3", "vdd"), ("drive-4", "d4", "0x4", "vde")]
        for node, img, _, _ in disks:
            q.cmd("blockdev-add", **{"node-name": node, "file": {"driver": "file", "filename": images[img]}})
        for node, _, addr, _ in disks:
            q.cmd("device_add", id=node, driver="virtio-blk-mmio", addr=addr)
        for _, _, _, vd in disks:
            wait_for(f"the guest to use {vd}", lambda: f"hotplug {vd} up " in log(), 180)
            assert f"hotplug {vd} up ok" in log(), log()
        expect_backends(["cold0", "drive-2", "drive-3", "drive-4"])
        for node, _, _, _ in disks:
            q.cmd("device_del", id=node)
            assert q.event("DEVICE_DELETED", timeout=30)["data"]["device"] == node
        for _, _, _, vd in disks:
            wait_for(f"the guest to see {vd} go", lambda: f"hotplug {vd} down" in log(), 60)
        expect_backends(["cold0"])
        print("hotplug: three disks at once", flush=True)

        # 3. Errors: each a GenericError with a clear message, nothing changed.
        q.cmd("blockdev-add", **{"node-name": "drive-5", "file": {"driver": "file", "filename": images["d1"]}})
        q.cmd("device_add", id="drive-5", driver="virtio-blk-mmio", addr="0x5")
        cases = [
            ("device_add", dict(id="drive-5", driver="virtio-blk-mmio"), "Duplicate ID"),
            ("device_add", dict(id="nosuch", driver="virtio-blk-mmio"), "not found (blockdev-add it first)"),
            ("device_add", dict(id="drive-2", driver="virtio-blk-mmio", addr="0x6"), "out of range"),
            ("device_add", dict(id="drive-2", driver="virtio-blk-mmio", addr="0x0"), "in use by device 'cold0'"),
            ("device_del", dict(id="nosuch"), "Device 'nosuch' not found"),
            ("blockdev-del", {"node-name": "drive-5"}, "in use"),
            ("blockdev-add", {"node-name": "drive-5", "file": {"filename": images["d2"]}}, "Duplicate node name"),
            ("blockdev-add", {"node-name": "bad", "file": {"filename": f"{run}/missing.img"}}, "Could not open"),
        ]
        for cmd, args, want in cases:
            try:
                q.cmd(cmd, **args)
            except RuntimeError as e:
                assert "GenericError" in str(e) and want in str(e), (cmd, args, str(e))
            else:
                raise AssertionError(f"{cmd} {args} succeeded")
        expect_backends(["cold0", "drive-5"])
        q.cmd("device_del", id="drive-5")
        q.event("DEVICE_DELETED", timeout=30)
        print("hotplug: errors refused cleanly", flush=True)

        # 4. The cold-plugged disk goes the same way.
        assert q.cmd("device_del", id="cold0") == {}
        assert q.event("DEVICE_DELETED", timeout=30)["data"]["device"] == "cold0"
        wait_for("the guest to see vda go", lambda: "hotplug vda down" in log(), 60)
        expect_backends([])

        # 5. 100 cycles on slot 5 (vdf; the guest leaves it alone).
        q.cmd("blockdev-add", **{"node-name": "cycle", "file": {"driver": "file", "filename": images["cycle"]}})
        pids = set()
        t0 = time.time()
        for i in range(100):
            q.cmd("device_add", id="cycle", driver="virtio-blk-mmio", addr="0x5")
            pids.add(backends()["cycle"]["pid"])
            q.cmd("device_del", id="cycle")
            q.event("DEVICE_DELETED", timeout=30)
        print(f"hotplug: 100 add/del cycles in {time.time() - t0:.1f} s, {len(pids)} backends", flush=True)
        assert len(pids) == 100
        assert not any(alive(p) for p in pids)
        expect_backends([])

        # Nothing died on its own (a seccomp violation would show as a lost backend).
        lost = [e for e in q.events if e["event"] == "FLOTILLA_BACKEND_LOST"]
        assert not lost, f"backends died in normal operation: {lost}"

        # 6. quit: nothing left.
        core = children(vm.pid)[0]
        q.cmd("quit")
        assert vm.wait(timeout=30) == 0
        assert not any(alive(p) for p in core), core
        print("hotplug: quit leaves nothing behind", flush=True)

        # 7. SIGKILL of the gateway takes the core and a hot-plugged backend with it.
        qmp2 = f"{run}/qmp2.sock"
        second = launch(
            [a.flotilla, "-kernel", a.kernel, "-initrd", a.initrd, "-append", "console=ttyS0 quiet flotilla.scenario=hotplug",
             "-m", "256", "-serial", f"file:{run}/serial2.log", "-qmp", f"unix:{qmp2},server,nowait"],
            stdin=subprocess.DEVNULL)
        q2 = connect_unix(qmp2)
        q2.cmd("blockdev-add", **{"node-name": "x", "file": {"driver": "file", "filename": images["d1"]}})
        q2.cmd("device_add", id="x", driver="virtio-blk-mmio")
        procs = children(second.pid)[0]
        assert len(procs) == 2, procs
        second.send_signal(signal.SIGKILL)
        second.wait()
        wait_for("the core and backend to die with the gateway", lambda: not any(alive(p) for p in procs), 10)
        print("HOTPLUG-OK", flush=True)
    finally:
        finish([vm, second], serial, run, 6000)


if __name__ == "__main__":
    main()
