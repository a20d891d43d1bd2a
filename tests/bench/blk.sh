#!/bin/bash
# Block backend benchmark (not a test): flotilla-blk vs qemu-storage-daemon, both serving the
# same raw image over vhost-user to the same independent client (libblkio's
# virtio-blk-vhost-user driver, backends/blk/examples/blkio_bench.rs), one queue each, page
# cache warm; the host's own fio (psync) on the file is the ceiling. Prints a markdown table.
#
# Usage: tests/bench/blk.sh [SECONDS_PER_POINT]   (default 5)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
secs=${1:-5}
command -v fio >/dev/null || { echo "installing fio" >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >&2; }
cargo build --release -q -p flotilla-blk --bin flotilla-blk --example blkio_bench
blk=target/release/flotilla-blk
bench=target/release/examples/blkio_bench
work=$(mktemp -d /tmp/flotilla-blkbench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
img=$work/disk.img
head -c $((1 << 30)) /dev/urandom >"$img"
cat "$img" >/dev/null # warm the page cache

points=("randread 4096 1" "randread 4096 32" "randwrite 4096 1" "randwrite 4096 32" "read 131072 4")
iops() { # SOCKET RW BS QD -> IOPS
    "$bench" "$1" --queues 1 --depth "$4" --bs "$3" --seconds "$secs" --rw "$2" | sed -E 's/.*: ([0-9]+) IOPS.*/\1/'
}
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }

declare -A res
run_target() { # NAME START-COMMAND...
    local name=$1; shift
    local sock=$work/$name.sock
    for p in "${points[@]}"; do
        set -- "$@"
        rm -f "$sock"
        "$@" "$sock" >/dev/null 2>&1 &
        local pid=$!
        wait_sock "$sock"
        read -r rw bs qd <<<"$p"
        res[$name,$p]=$(iops "$sock" "$rw" "$bs" "$qd")
        kill "$pid" 2>/dev/null || true # flotilla-blk exits by itself when the client leaves
        wait "$pid" 2>/dev/null || true
        echo "$name $p: ${res[$name,$p]} IOPS" >&2
    done
}
flotilla() { "$blk" --image "$img" --socket-path "$1"; }
flotilla_poll() { "$blk" --image "$img" --poll --socket-path "$1"; }
qsd() {
    qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$img,cache.direct=off" \
        --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$1,writable=on,num-queues=1"
}
run_target flotilla-blk flotilla
run_target "flotilla-blk --poll" flotilla_poll
run_target qemu-storage-daemon qsd

ceiling() { # RW BS QD -> IOPS from fio psync (one job; QD is not meaningful for psync)
    local mode=$1; [ "$mode" = read ] && mode=read
    fio --name=c --filename="$img" --invalidate=0 --ioengine=psync --rw="$mode" --bs="$2" \
        --time_based --runtime="$secs" --output-format=terse 2>/dev/null |
        awk -F';' -v w="$1" '{ print (w ~ /write/) ? $49 : $8 }'
}
echo
echo "| workload | flotilla-blk | flotilla-blk --poll | qemu-storage-daemon | host fio psync (ceiling) |"
echo "|---|---|---|---|---|"
for p in "${points[@]}"; do
    read -r rw bs qd <<<"$p"
    echo "| $rw ${bs} B QD$qd | ${res[flotilla-blk,$p]} | ${res[flotilla-blk --poll,$p]} | ${res[qemu-storage-daemon,$p]} | $(ceiling "$rw" "$bs" "$qd") |"
done
echo
echo "IOPS, ${secs} s per point, 1 queue, 1 GiB image in the page cache."
