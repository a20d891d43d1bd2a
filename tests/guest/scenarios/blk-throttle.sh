#!/bin/sh
# 4 KiB O_DIRECT reads on vdb (throttled by its backend) and vdc (not
# throttled), timed with /proc/uptime (10 ms resolution): flotilla.jobs=J
# parallel dd readers (queue depth J), flotilla.reads=N reads in all. The
# throttled disk's 1 s burst is used up first (flotilla.burst=N reads,
# untimed).
param() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "flotilla.$1="*) echo "${w#*=}"; return ;; esac
    done
    echo "$2"
}
reads=$(param reads 600)
burst=$(param burst 300)
jobs=$(param jobs 8)
per=$((reads / jobs))
centis() { cut -d' ' -f1 /proc/uptime | tr -d .; }
for _ in $(seq 50); do [ -b /dev/vdc ] && break; sleep 0.1; done
for disk in vdb vdc; do
    dd if=/dev/$disk of=/dev/null bs=4096 count="$burst" iflag=direct 2>/dev/null
    t0=$(centis)
    pids=
    for j in $(seq "$jobs"); do
        # Each reader its own region (512 KiB apart).
        dd if=/dev/$disk of=/dev/null bs=4096 count="$per" skip=$((burst + j * 128)) iflag=direct 2>/dev/null &
        pids="$pids $!"
    done
    failed=0
    for p in $pids; do wait "$p" || failed=1; done
    t1=$(centis)
    [ "$failed" = 0 ] || echo "FLOTILLA-RESULT ${disk}_dd=failed"
    cs=$((t1 - t0))
    [ "$cs" -gt 0 ] || cs=1
    echo "FLOTILLA-RESULT ${disk}_centis=$cs ${disk}_iops=$((per * jobs * 100 / cs))"
done
