#!/bin/sh
# The README demo: show what the guest sees of the machine flotilla gave it.
echo "== flotilla demo guest =="
echo "kernel:  $(uname -sr)"
echo "cpus:    $(grep -c ^processor /proc/cpuinfo) online ($(cat /sys/devices/system/cpu/online))"
echo "memory:  $(grep MemTotal /proc/meminfo | tr -s ' ')"
echo "console: $(cat /sys/class/tty/console/active 2>/dev/null)"
echo "acpi:    $(ls /sys/bus/acpi/devices 2>/dev/null | tr '\n' ' ')"
echo "uptime:  $(cut -d' ' -f1 /proc/uptime) s"
echo "== powering off through ACPI S5 =="
