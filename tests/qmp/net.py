#!/usr/bin/env python3
"""NICs with a real guest, run inside a network namespace of the test's own (the caller
wraps this in `ip netns exec`); every tap lives in that namespace and no traffic leaves it.

flotilla boots with eth0 cold-plugged (-netdev tap,ifname=fltap0 + -device
virtio-net-device); the guest runs the `net` scenario. Checks: the guest pings the host
side; 100 MiB host -> guest and 100 MiB guest -> host over TCP with matching md5s; a
third 100 MiB host -> guest transfer while the backend is SIGKILLed 10 times still
arrives intact; eth1 hot-plugged with netdev_add + device_add (link up, ping), then
device_del (DEVICE_DELETED, link down, backend reaped). Prints NET-OK on success.
"""
import glob
import hashlib
import os
import socket
import subprocess
import threading
import time

from flotilla_qmp import (launch, alive, connect_unix, dump_devices, wait_for, driver_args, finish, reader,
                          run_dir)

MIB = 1 << 20


def sh(*cmd):
    subprocess.run(cmd, check=True)


def sender(port, result, mib=100):
    """Serves one connection: sends `mib` MiB of random data, records its md5."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    conn, _ = srv.accept()
    md5 = hashlib.md5()
    for _ in range(mib):
        chunk = os.urandom(MIB)
        md5.update(chunk)
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)
    conn.close()
    srv.close()
    result[port] = md5.hexdigest()


def receiver(port, result, mib=100):
    """Serves one connection: reads `mib` MiB, records their md5, closes."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    conn, _ = srv.accept()
    md5, left = hashlib.md5(), mib * MIB
    while left > 0:
        data = conn.recv(min(left, MIB))
        if not data:
            break
        md5.update(data)
        left -= len(data)
    conn.close()
    srv.close()
    result[port] = md5.hexdigest() if left == 0 else f"short by {left} bytes"


# How long a guest may go without its heartbeat (every 10 s, tests/guest/scenarios/net.sh)
# before a stuck transfer counts as the guest frozen as a whole.
HEARTBEAT_SILENCE = 30


def diagnose(q, log):
    """After a timeout: which side stopped. The NICs' rings and backends (the core's view),
    the host end of the TCP connections and the tap, then whether the guest's vCPU runs:
    KVM's exit counters and the VM core's threads, sampled twice 2 s apart. Last, whether
    the guest itself still runs: its heartbeat on the serial console."""
    beats = lambda: log().count("FLOTILLA-GUEST-ALIVE")
    start, before = time.time(), beats()
    dump_devices(q, ["nic0", "net1"])
    for cmd in (["ss", "-tni"], ["ip", "-s", "link", "show", "fltap0"]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        print(f"{' '.join(cmd)}:\n{out.stdout}{out.stderr}", flush=True)
    in_kvm = True
    for sample in (1, 2):
        if sample == 2:
            time.sleep(2)
        print_kvm_exits(sample)
        in_kvm = print_vmm_threads(sample) and in_kvm
    time.sleep(max(0.0, HEARTBEAT_SILENCE - (time.time() - start)))
    if beats() == before and in_kvm:
        # A stuck transfer in a guest that still runs (a lost interrupt, a stalled queue:
        # flotilla's own failures) keeps the heartbeat going, and a vCPU held in the VM core
        # is not in KVM_RUN. What is left is the guest frozen under the platform's nested
        # SVM (tests/README.md "Platform failures"); the harness reruns on this line.
        print(f"flotilla-tests: L2 guest frozen: no heartbeat in {HEARTBEAT_SILENCE} s "
              "while its vCPU threads run in KVM_RUN", flush=True)
    else:
        print(f"guest heartbeats in {HEARTBEAT_SILENCE} s: {beats() - before}; "
              f"vCPU threads all in KVM_RUN: {in_kvm}", flush=True)


KVM_STATS = ("exits", "halt_exits", "irq_exits", "irq_injections", "nmi_injections",
             "io_exits", "mmio_exits", "signal_exits", "request_irq_exits", "irq_window_exits",
             "pf_taken", "pf_fixed", "pf_spurious", "pf_emulate", "pf_guest", "tlb_flush",
             "insn_emulation", "insn_emulation_fail", "req_event", "nested_run")


def print_kvm_exits(sample):
    """KVM's exit counters for each VM (debugfs; since Linux 5.14 they are per VM, summed over
    its vCPUs): a vCPU at 100 % in KVM_RUN while `exits` races is caught in an exit loop on
    the KVM host; with the counters standing still it spins in the guest."""
    if not os.path.isdir("/sys/kernel/debug/kvm"):
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], capture_output=True)
    for vdir in sorted(glob.glob("/sys/kernel/debug/kvm/*-*")):
        counts = [f"{name}={v}" for name in KVM_STATS if (v := read_text(f"{vdir}/{name}")) is not None]
        print(f"sample {sample}: kvm {vdir}: {' '.join(counts) or 'no counters'}", flush=True)


def print_vmm_threads(sample):
    """Each flotilla-vmm thread's state, utime and kernel stack: a vCPU running, halted in KVM
    or held in the VM core (a spinning thread's utime moves between samples). Returns whether
    there were vCPU threads and each was runnable or inside KVM's run ioctl."""
    pids = subprocess.run(["pgrep", "-x", "flotilla-vmm"], capture_output=True, text=True).stdout.split()
    vcpus, in_kvm = 0, True
    for pid in pids:
        for tid in sorted(os.listdir(f"/proc/{pid}/task")):
            task = f"/proc/{pid}/task/{tid}"
            comm = read_text(f"{task}/comm") or ""
            stat = (read_text(f"{task}/stat") or "").rsplit(")", 1)[-1].split()
            raw_stack = read_text(f"{task}/stack") or "?"
            stack = raw_stack.replace("\n", " | ")
            print(f"sample {sample}: flotilla-vmm {pid} thread {tid} {comm}: "
                  f"state {stat[0] if stat else '?'} utime {stat[11] if len(stat) > 12 else '?'} "
                  f"wchan {read_text(f'{task}/wchan')} stack [{stack}]", flush=True)
            if comm.startswith("vcpu"):
                vcpus += 1
                running = bool(stat) and stat[0] == "R"
                in_kvm = in_kvm and (running or "kvm_arch_vcpu_ioctl_run" in raw_stack)
    return vcpus > 0 and in_kvm


# The L1 kernel's page-moving counters. A guest page KVM has mapped that the host kernel
# migrates (compaction, THP collapse/split, NUMA balancing) must leave the L2 guest's
# nested TLB too; network transfers make the high-order allocations that trigger
# compaction, so a guest that dies mid-transfer is checked against these.
VMSTAT_KEYS = ("pgmigrate_success", "pgmigrate_fail", "compact_stall", "compact_daemon_wake",
               "compact_migrate_scanned", "thp_fault_alloc", "thp_collapse_alloc", "thp_split_pmd",
               "numa_pte_updates", "pswpout")


def vm_events():
    """The VMSTAT_KEYS counters of /proc/vmstat."""
    pairs = (line.split() for line in (read_text("/proc/vmstat") or "").splitlines())
    return {k: int(v) for k, v in pairs if k in VMSTAT_KEYS}


def print_vm_events(label, since):
    """The VMSTAT_KEYS counters that moved since `since` (a vm_events())."""
    now = vm_events()
    moved = " ".join(f"{k}+{now[k] - since.get(k, 0)}" for k in VMSTAT_KEYS
                     if now.get(k, 0) != since.get(k, 0))
    print(f"net: L1 vmstat during {label}: {moved or 'nothing moved'}", flush=True)
    return now


def read_text(path):
    """A small /proc or debugfs file, stripped; None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def main():
    a = driver_args()

    run = run_dir("net")
    qmp_path, serial = f"{run}/qmp.sock", f"{run}/serial.log"
    sh("ip", "link", "set", "lo", "up")
    results = {}
    threads = [threading.Thread(target=f, args=(port, results), daemon=True)
               for f, port in ((sender, 5001), (receiver, 5002), (sender, 5003))]
    for t in threads:
        t.start()
    append = "console=ttyS0 reboot=k panic=-1 quiet flotilla.scenario=net"
    # One vCPU. Unpinned, the guest died (triple fault or freeze) with one vCPU in 5 of 10
    # runs and with two in 2 of 4 (tests/README.md "Platform failures"): not the vCPU count.
    # What stopped the deaths is launch()'s pinning of the VMM and its backends to one L1
    # CPU; pinned, a 2-vCPU guest time-slices its vCPUs with the backend on that CPU (one
    # stalled run had a vCPU in a PV sched_yield loop), a 1-vCPU one is what iperf ran.
    vm = launch(
        [a.flotilla, "-name", "net", "-kernel", a.kernel, "-initrd", a.initrd,
         "-append", append, "-m", "256", "-smp", "1", "-serial", f"file:{serial}",
         "-netdev", "tap,id=net0,ifname=fltap0",
         "-device", "virtio-net-device,netdev=net0,id=nic0,mac=52:54:00:12:34:56",
         "-qmp", f"unix:{qmp_path},server,nowait"],
        stdin=subprocess.DEVNULL)
    try:
        q = connect_unix(qmp_path)
        sh("ip", "addr", "add", "10.0.2.1/24", "dev", "fltap0")
        sh("ip", "link", "set", "fltap0", "up")
        log = reader(serial)

        def result(key, timeout=300):
            whole = lambda: [l for l in log().splitlines() if f"FLOTILLA-RESULT net {key}" in l]
            try:
                wait_for(f"guest result '{key}'", lambda: whole() or vm.poll() is not None, timeout)
            except TimeoutError:
                print_vm_events(f"the step to '{key}' (timed out)", events[0])
                diagnose(q, log)
                raise
            if not whole():
                print_vm_events(f"the step to '{key}' (VM exited)", events[0])
                raise RuntimeError(f"the VM exited (status {vm.poll()}) before guest result '{key}'")
            return whole()[-1].split(f"net {key}", 1)[1].strip().lstrip("=")

        events = [vm_events()]  # since the last step that printed them
        macs = result("macs", 120)
        assert "eth0=52:54:00:12:34:56" in macs, macs
        assert result("carrier") == "eth0=1 eth1=0", log()
        assert result("ping0") == "ok", log()
        print("net: eth0 up, ping ok", flush=True)
        t0 = time.time()
        rx = result("rx md5")
        threads[0].join(60)
        events[0] = print_vm_events("boot and host -> guest", events[0])
        print_kvm_exits("after host -> guest")
        assert rx == results[5001], (rx, results)
        print(f"net: 100 MiB host -> guest in {time.time() - t0:.1f} s, md5 ok", flush=True)
        want = result("tx want")
        t0 = time.time()
        # Up to 900 s, not 300: pinned to one L1 CPU with the vCPU (flotilla_qmp.launch), the
        # backend runs only when the guest's vCPU yields it the CPU, and a guest -> host
        # stream sometimes falls into sending one frame per such turn (~330 frames/s, a
        # steady crawl: tests/README.md "Platform failures", session 7). The md5 is the test.
        result("tx sent", 900)
        threads[1].join(60)
        events[0] = print_vm_events("guest -> host", events[0])
        print_kvm_exits("after guest -> host")
        assert results.get(5002) == want, (want, results)
        print(f"net: 100 MiB guest -> host in {time.time() - t0:.1f} s, md5 ok", flush=True)

        # Third transfer: kill the backend 10 times while it runs.
        wait_for("the third transfer to start", lambda: threads[2].is_alive(), 10)
        time.sleep(1)
        for i in range(10):
            b = q.cmd("flotilla-query-backends")[0]
            assert b["id"] == "nic0" and b["state"] == "running", b
            os.kill(b["pid"], 9)
            assert q.event("FLOTILLA_BACKEND_LOST", timeout=30)["data"]["pid"] == b["pid"]
            q.event("FLOTILLA_BACKEND_RESTARTED", timeout=30)
            time.sleep(0.5)
        rx2 = result("rx2 md5", 600)
        events[0] = print_vm_events("host -> guest across kills", events[0])
        threads[2].join(60)
        assert rx2 == results[5003], (rx2, results)
        print("net: 100 MiB host -> guest across 10 backend kills, md5 ok", flush=True)

        # Hot-plug eth1.
        assert q.cmd("netdev_add", id="net1", ifname="fltap1") == {}
        assert q.cmd("device_add", id="net1", driver="virtio-net-mmio", addr="0x1") == {}
        sh("ip", "addr", "add", "10.0.3.1/24", "dev", "fltap1")
        sh("ip", "link", "set", "fltap1", "up")
        assert result("eth1", 120) == "up", log()
        assert result("ping1", 120) == "ok", log()
        pid = [b for b in q.cmd("flotilla-query-backends") if b["id"] == "net1"][0]["pid"]
        assert q.cmd("device_del", id="net1") == {}
        e = q.event("DEVICE_DELETED", timeout=30)
        assert e["data"] == {"device": "net1", "path": "net1"}, e
        assert not alive(pid)
        wait_for("the guest to see eth1 go down", lambda: "net eth1 down" in log(), 120)
        assert q.cmd("netdev_del", id="net1") == {}
        print("net: eth1 hot-plugged, pinged, unplugged", flush=True)
        assert vm.wait(timeout=120) == 0
        print("NET-OK", flush=True)
    finally:
        finish([vm], serial, run, 4000)


if __name__ == "__main__":
    main()
