#!/bin/sh
# Run from the ext4 root on a vhost-user disk: where / is, that it is
# writable (a file the host then reads from the image with debugfs), and a
# read of the busybox binary off the disk.
echo "FLOTILLA-RESULT root=$(awk '$2 == "/" { dev = $1 } END { print dev }' /proc/mounts)"
echo "FLOTILLA-RESULT busybox_md5=$(md5sum /bin/busybox | cut -d' ' -f1)"
if echo "written-on-the-ext4-root" >/flotilla-guest-wrote && sync; then
    echo "FLOTILLA-RESULT root_write=ok"
fi
