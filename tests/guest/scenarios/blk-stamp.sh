#!/bin/sh
# Write-then-verify loop for backend-crash tests (flotilla.disk=NAME, default vdb;
# flotilla.seconds=N, default 60; flotilla.blocks=N 4-KiB blocks, default 1024).
# Each generation stamps every block with its number and the generation, writes the whole
# disk region with O_DIRECT, reads it back with O_DIRECT and compares. Prints per generation
#   FLOTILLA-RESULT stamp gen=G ok|errors|mismatch
# and at the end
#   FLOTILLA-RESULT stamp done gens=N io_errors=E mismatched_blocks=M
param() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "flotilla.$1="*) echo "${w#*=}"; return ;; esac
    done
    echo "$2"
}
disk=/dev/$(param disk vdb)
seconds=$(param seconds 60)
blocks=$(param blocks 1024)
for _ in $(seq 100); do [ -b "$disk" ] && break; sleep 0.1; done
up() { cut -d. -f1 /proc/uptime; }
end=$(($(up) + seconds))
dev=${disk#/dev/}
# Stall reporter: when the disk's completed-I/O counters stop moving for 20 s, print once
# what the guest is waiting for, so a failed run says which side stopped (requests still
# in flight in the guest = no completion seen; none = the guest is stuck elsewhere).
(
    mount -t debugfs none /sys/kernel/debug 2>/dev/null
    last="" still=0 told=0
    while :; do
        sleep 5
        now=$(cat /sys/block/$dev/stat 2>/dev/null)
        if [ "$now" = "$last" ]; then still=$((still + 5)); else still=0 told=0; fi
        last=$now
        if [ "$still" -ge 20 ] && [ "$told" = 0 ]; then
            told=1
            busy=$(cat /sys/kernel/debug/block/$dev/hctx*/busy 2>/dev/null | tr '\n' ' ')
            irqs=$(grep -i virtio /proc/interrupts | tr -s ' ' | tr '\n' ';')
            ddpid=$(pidof dd)
            wchan=$(for p in $ddpid; do cat /proc/$p/wchan; echo; done | tr '\n' ' ')
            echo "FLOTILLA-RESULT stamp stalled ${still}s inflight=$(cat /sys/block/$dev/inflight | tr -s ' ') stat=[$now] busy=[$busy] dd=[$ddpid] wchan=[$wchan] irqs=[$irqs]"
            for p in $ddpid; do echo "FLOTILLA-RESULT stamp stack dd $p: $(tr '\n' '|' </proc/$p/stack 2>/dev/null)"; done
        fi
    done
) &
watcher=$!
gen=0 errors=0 mismatched=0
echo "FLOTILLA-RESULT stamp start disk=$disk blocks=$blocks"
while [ "$(up)" -lt "$end" ]; do
    gen=$((gen + 1))
    awk -v g="$gen" -v n="$blocks" 'BEGIN {
        for (b = 0; b < n; b++) {
            s = sprintf("block %08d generation %08d\n", b, g); line = s
            while (length(line) < 4096) line = line s
            printf "%s", substr(line, 1, 4096)
        }
    }' >/tmp/want
    if ! dd if=/tmp/want of="$disk" bs=64k oflag=direct conv=fsync 2>/tmp/dd.err; then
        errors=$((errors + 1)); echo "FLOTILLA-RESULT stamp gen=$gen errors write $(cat /tmp/dd.err | tr '\n' ' ')"
        continue
    fi
    if ! dd if="$disk" of=/tmp/got bs=64k count=$((blocks / 16)) iflag=direct 2>/tmp/dd.err; then
        errors=$((errors + 1)); echo "FLOTILLA-RESULT stamp gen=$gen errors read $(cat /tmp/dd.err | tr '\n' ' ')"
        continue
    fi
    if cmp -s /tmp/want /tmp/got; then
        echo "FLOTILLA-RESULT stamp gen=$gen ok"
    else
        bad=$(cmp -l /tmp/want /tmp/got 2>/dev/null | awk '{ print int(($1 - 1) / 4096) }' | uniq | wc -l)
        mismatched=$((mismatched + bad))
        echo "FLOTILLA-RESULT stamp gen=$gen mismatch blocks=$bad"
    fi
done
kill "$watcher" 2>/dev/null
echo "FLOTILLA-RESULT stamp done gens=$gen io_errors=$errors mismatched_blocks=$mismatched"
