#!/bin/sh
# 4 KiB O_DIRECT reads, timed with /proc/uptime (10 ms resolution), on the
# disks named by flotilla.throttle=DISK:BURST:READS,... (default
# vdb:320:800,vdc:320:800): first BURST untimed reads to empty a throttled
# disk's token bucket (1 s worth), then READS timed ones, each by
# flotilla.jobs=J parallel dd readers (queue depth J) in their own regions
# (blocks 0.. for the burst, 1024.. for the timed reads; 16 MiB disks hold
# the defaults with room to spare). Prints DISK_iops and DISK_centis.
param() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "flotilla.$1="*) echo "${w#*=}"; return ;; esac
    done
    echo "$2"
}
disks=$(param throttle vdb:320:800,vdc:320:800)
jobs=$(param jobs 8)
centis() { cut -d' ' -f1 /proc/uptime | tr -d .; }
last=$(echo "$disks" | tr ',' '\n' | tail -n1 | cut -d: -f1)
for _ in $(seq 50); do [ -b "/dev/$last" ] && break; sleep 0.1; done
# parallel_reads DISK COUNT FIRST: COUNT 4 KiB direct reads by $jobs readers,
# each in its own region from block FIRST on; fails if any reader fails.
parallel_reads() {
    per=$(($2 / jobs))
    pids=
    for j in $(seq "$jobs"); do
        dd if="/dev/$1" of=/dev/null bs=4096 count="$per" skip=$(($3 + j * (per + 8))) iflag=direct 2>/dev/null &
        pids="$pids $!"
    done
    ok=0
    for p in $pids; do wait "$p" || ok=1; done
    return $ok
}
for spec in $(echo "$disks" | tr ',' ' '); do
    disk=${spec%%:*}
    burst=${spec#*:}
    reads=${burst#*:}
    burst=${burst%%:*}
    # Empty the token bucket (the same queue depth as the timed part, so
    # it drains fast), then time the reads.
    parallel_reads "$disk" "$burst" 0
    t0=$(centis)
    parallel_reads "$disk" "$reads" 1024 || echo "FLOTILLA-RESULT ${disk}_dd=failed"
    t1=$(centis)
    cs=$((t1 - t0))
    [ "$cs" -gt 0 ] || cs=1
    echo "FLOTILLA-RESULT ${disk}_centis=$cs ${disk}_iops=$((reads / jobs * jobs * 100 / cs))"
done
