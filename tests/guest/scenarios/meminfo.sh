#!/bin/sh
# MemTotal in KiB: RAM given to the guest minus what the kernel reserves.
echo "FLOTILLA-RESULT memtotal_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
