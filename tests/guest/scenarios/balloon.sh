#!/bin/sh
# Balloon test guest (tests/qmp/balloon.py drives the balloon over QMP):
#   1. touch most of memory (fill /tmp, then free it), so that the host has really
#      allocated it and ballooned pages free something;
#   2. report /proc/meminfo once a second: FLOTILLA-RESULT balloon free=KiB total=KiB;
#   3. when free memory falls below 350 MiB (the host ballooned the guest down to 256 MiB),
#      allocate 600 MiB anyway: with deflate-on-oom the balloon gives memory back instead
#      of the OOM killer taking a process. Prints "balloon oom-fill ok|failed".
kib() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
mib=$(($(kib MemTotal) / 1024))
fill=$((mib - 300))
# A tmpfs of its own: the initramfs root is capped at half of memory.
mkdir -p /big && mount -t tmpfs -o size=2g tmpfs /big
dd if=/dev/zero of=/big/fill bs=1M count="$fill" 2>/dev/null
rm -f /big/fill
echo "FLOTILLA-RESULT balloon filled=${fill}MiB total=$(kib MemTotal)"
phase=watch
while :; do
    free=$(kib MemFree)
    echo "FLOTILLA-RESULT balloon free=$free total=$(kib MemTotal)"
    if [ "$phase" = watch ] && [ "$free" -lt $((350 * 1024)) ]; then
        sleep 2
        if dd if=/dev/zero of=/big/oom bs=1M count=600 2>/dev/null; then
            echo "FLOTILLA-RESULT balloon oom-fill ok free=$(kib MemFree)"
        else
            echo "FLOTILLA-RESULT balloon oom-fill failed"
        fi
        rm -f /big/oom
        phase=done
    fi
    sleep 1
done
