#!/bin/sh
# Online vCPUs as the guest kernel sees them.
if [ -r /sys/devices/system/cpu/online ]; then
    online=$(cat /sys/devices/system/cpu/online)
    # "0-3" or "0,2-3": count the CPUs in the list.
    n=0
    for part in $(echo "$online" | tr ',' ' '); do
        case "$part" in
            *-*) n=$((n + ${part#*-} - ${part%-*} + 1)) ;;
            *) n=$((n + 1)) ;;
        esac
    done
else
    n=$(nproc)
fi
echo "FLOTILLA-RESULT cpus=$n"
