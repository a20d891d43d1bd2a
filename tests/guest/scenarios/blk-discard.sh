#!/bin/sh
# Discard through a file system: mkfs on vdb, write 32 MiB, delete it, fstrim.
# The host measures the image's allocated blocks when it sees phase=written
# (the guest waits for it) and again after the run.
for _ in $(seq 50); do [ -b /dev/vdb ] && break; sleep 0.1; done
echo "FLOTILLA-RESULT discard_max_bytes=$(cat /sys/block/vdb/queue/discard_max_bytes)"
mke2fs -F -b 4096 /dev/vdb >/dev/null 2>&1 && echo "FLOTILLA-RESULT mkfs=ok"
mkdir -p /mnt/d
mount -t ext4 /dev/vdb /mnt/d && echo "FLOTILLA-RESULT mount=ok"
dd if=/dev/zero of=/mnt/d/data bs=1M count=32 conv=fsync 2>/dev/null && echo "FLOTILLA-RESULT write=ok"
sync
echo "FLOTILLA-RESULT phase=written"
sleep 3
rm /mnt/d/data && sync
trimmed=$(fstrim -v /mnt/d 2>&1)
echo "FLOTILLA-RESULT fstrim_status=$? fstrim=$(echo "$trimmed" | tr ' ' '_')"
umount /mnt/d && echo "FLOTILLA-RESULT umount=ok"
