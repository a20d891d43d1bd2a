#!/bin/sh
# Watches the disk slots vda..vde (vdf is left to the host's plug/unplug cycles) and reacts
# like a user would: when a disk's capacity appears it makes an ext2 file system on it,
# mounts it, writes a file, checks it, unmounts, and prints
#   FLOTILLA-RESULT hotplug vdX up ok md5=...   (or "up failed step=...")
# When a disk's capacity drops to 0 (device_del) it prints
#   FLOTILLA-RESULT hotplug vdX down
# Runs until powered off.
disks="vda vdb vdc vdd vde"
size() { cat "/sys/block/$1/size" 2>/dev/null || echo 0; }
try_fs() {
    d=$1
    mke2fs -q "/dev/$d" >/dev/null 2>&1 || { echo "FLOTILLA-RESULT hotplug $d up failed step=mkfs"; return; }
    mkdir -p "/mnt/$d"
    mount -t ext2 "/dev/$d" "/mnt/$d" 2>/dev/null || mount "/dev/$d" "/mnt/$d" \
        || { echo "FLOTILLA-RESULT hotplug $d up failed step=mount"; return; }
    dd if=/dev/urandom of="/mnt/$d/data" bs=64k count=16 2>/dev/null
    want=$(md5sum <"/mnt/$d/data" | cut -d' ' -f1)
    sync
    umount "/mnt/$d" || { echo "FLOTILLA-RESULT hotplug $d up failed step=umount"; return; }
    echo 3 >/proc/sys/vm/drop_caches
    mount "/dev/$d" "/mnt/$d" || { echo "FLOTILLA-RESULT hotplug $d up failed step=remount"; return; }
    got=$(md5sum <"/mnt/$d/data" | cut -d' ' -f1)
    umount "/mnt/$d"
    if [ "$want" = "$got" ]; then
        echo "FLOTILLA-RESULT hotplug $d up ok md5=$got"
    else
        echo "FLOTILLA-RESULT hotplug $d up failed step=verify"
    fi
}
for d in $disks; do
    echo "$(size "$d")" >"/tmp/size-$d"
    echo "FLOTILLA-RESULT hotplug $d initial=$(size "$d")"
done
echo "FLOTILLA-RESULT hotplug=ready"
while :; do
    for d in $disks; do
        old=$(cat "/tmp/size-$d")
        new=$(size "$d")
        [ "$old" = "$new" ] && continue
        echo "$new" >"/tmp/size-$d"
        if [ "$new" = 0 ]; then
            echo "FLOTILLA-RESULT hotplug $d down"
        elif [ "$old" = 0 ]; then
            echo "FLOTILLA-RESULT hotplug $d sectors=$new"
            try_fs "$d"
        fi
    done
    sleep 0.1
done
