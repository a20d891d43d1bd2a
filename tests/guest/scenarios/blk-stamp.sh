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
echo "FLOTILLA-RESULT stamp done gens=$gen io_errors=$errors mismatched_blocks=$mismatched"
