#!/bin/sh
# iperf3 throughput of eth0 against an `iperf3 -s` on the host side of the tap
# (tests/examples/bench_net_vm.rs; needs the guest-iperf3 initramfs, `build.sh iperf3`).
# eth0 gets 10.0.2.2/24; the server is 10.0.2.1 (flotilla.iperf_host=IP overrides).
# Runs `iperf3 -c HOST -t SECS` (guest -> host, "tx") and the same with -R (host -> guest,
# "rx"), SECS from flotilla.iperf_secs= (default 10), and prints the receiver's rate:
#   FLOTILLA-RESULT iperf tx_mbps=N     FLOTILLA-RESULT iperf rx_mbps=N
# or `..._mbps=failed` followed by iperf3's output.
host=10.0.2.1
secs=10
for word in $(cat /proc/cmdline); do
    case "$word" in
        flotilla.iperf_host=*) host="${word#flotilla.iperf_host=}" ;;
        flotilla.iperf_secs=*) secs="${word#flotilla.iperf_secs=}" ;;
    esac
done
if ! command -v iperf3 >/dev/null; then
    echo "FLOTILLA-RESULT iperf error=no-iperf3-in-this-initramfs"
    exit 1
fi
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.2/24 dev eth0
for _ in $(seq 600); do [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" = 1 ] && break; sleep 0.1; done
# The host configures its side of the tap once the VMM created it: wait for it to answer.
up=no
for _ in $(seq 60); do
    if ping -c 1 -W 1 "$host" >/dev/null 2>&1; then up=yes; break; fi
done
echo "FLOTILLA-RESULT iperf host=$host reachable=$up"
[ "$up" = yes ] || exit 1

status=0
measure() {
    name="$1"; shift
    out=/tmp/iperf-$name.txt
    rate=""
    # The server may still be busy with the previous test for a moment.
    for _ in 1 2 3; do
        if iperf3 -c "$host" -t "$secs" -f m "$@" >"$out" 2>&1; then
            rate="$(awk '/receiver/ { for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") print $(i - 1) }' "$out" | tail -n1)"
            [ -n "$rate" ] && break
        fi
        sleep 1
    done
    if [ -n "$rate" ]; then
        echo "FLOTILLA-RESULT iperf ${name}_mbps=$rate"
    else
        echo "FLOTILLA-RESULT iperf ${name}_mbps=failed"
        cat "$out"
        status=1
    fi
}
measure tx
measure rx -R
exit $status
