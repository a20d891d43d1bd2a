#!/bin/sh
# The first virtio disk: size, a checksum of its first MiB, and a write the host can check.
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
echo "FLOTILLA-RESULT vda_sectors=$(cat /sys/block/vda/size 2>/dev/null)"
echo "FLOTILLA-RESULT vda_md5=$(dd if=/dev/vda bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
if echo "hello-from-guest" | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null; then
    echo "FLOTILLA-RESULT vda_write=ok"
fi
