#!/bin/sh
# Writes random data over a whole disk (flotilla.disk=NAME, default vdb; at
# most flotilla.mib=N MiB, default 64), syncs, and prints the checksum of what
# it wrote and of what it reads back with O_DIRECT (past the page cache). The
# host compares them with its checksum of the image.
param() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "flotilla.$1="*) echo "${w#*=}"; return ;; esac
    done
    echo "$2"
}
centis() { cut -d' ' -f1 /proc/uptime | tr -d .; }
disk=$(param disk vdb)
mib=$(param mib 64)
for _ in $(seq 50); do [ -b "/dev/$disk" ] && break; sleep 0.1; done
echo "FLOTILLA-RESULT disks=$(ls /sys/block | grep '^vd' | tr '\n' ',')"
for d in /sys/block/vd*; do
    echo "FLOTILLA-RESULT $(basename "$d")_sectors=$(cat "$d/size")"
done
t0=$(centis)
# The data goes through a file in RAM so its checksum is known (busybox tee
# writes a block device in tiny pieces: minutes for 64 MiB under nested KVM).
dd if=/dev/urandom of=/tmp/data bs=1M count="$mib" 2>/dev/null
written=$(md5sum /tmp/data | cut -d' ' -f1)
dd if=/tmp/data of="/dev/$disk" bs=1M conv=fsync 2>/dev/null && echo "FLOTILLA-RESULT write=ok"
rm -f /tmp/data
sync && echo "FLOTILLA-RESULT sync=ok"
t1=$(centis)
echo "FLOTILLA-RESULT written_md5=$written write_centis=$((t1 - t0))"
# Past the page cache: drop it, then O_DIRECT reads.
echo 3 >/proc/sys/vm/drop_caches
readback=$(dd if="/dev/$disk" bs=1M count="$mib" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "FLOTILLA-RESULT readback_md5=$readback readback_centis=$(($(centis) - t1))"
