#!/bin/sh
# A read-only disk (vda): the kernel sees it read-only, reads work, and a
# write (buffered or O_DIRECT) fails.
for _ in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
echo "FLOTILLA-RESULT ro=$(cat /sys/block/vda/ro)"
echo "FLOTILLA-RESULT read_md5=$(dd if=/dev/vda bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
for flag in conv=fsync oflag=direct; do
    if err=$(dd if=/dev/zero of=/dev/vda bs=4096 count=1 "$flag" 2>&1); then
        echo "FLOTILLA-RESULT write_${flag#*=}=succeeded"
    else
        echo "FLOTILLA-RESULT write_${flag#*=}=failed"
        # The error text, one word-safe token (e.g. Read-only_file_system).
        echo "FLOTILLA-RESULT write_${flag#*=}_error=$(echo "$err" | head -n1 | sed 's/.*: //' | tr ' ' '_')"
    fi
done
# Reads still work after the refused writes.
echo "FLOTILLA-RESULT reread_md5=$(dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
