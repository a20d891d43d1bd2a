#!/bin/sh
# The serial number the backend reports (VIRTIO_BLK_T_GET_ID) for vda.
for _ in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
echo "FLOTILLA-RESULT serial=$(cat /sys/block/vda/serial 2>&1 | tr ' ' '_')"
