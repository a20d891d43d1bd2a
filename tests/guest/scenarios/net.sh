#!/bin/sh
# NIC test against a host side in a network namespace (tests/qmp/net.py):
#   eth0 (cold-plugged, 10.0.2.2/24): ping 10.0.2.1; receive 100 MiB from port 5001 and
#   print its md5; send 100 MiB (a random MiB 100 times) to port 5002; receive 100 MiB from
#   port 5003 while the host kills the backend.
#   eth1 (hot-plugged later, 10.0.3.2/24): wait for the carrier, ping 10.0.3.1, wait for
#   the carrier to go (device_del).
# Every step prints FLOTILLA-RESULT net ...
carrier() { cat "/sys/class/net/$1/carrier" 2>/dev/null || echo none; }
wait_carrier() {
    for _ in $(seq 1200); do [ "$(carrier "$1")" = "$2" ] && return 0; sleep 0.1; done
    return 1
}
# Stall reporter: while a transfer runs (/tmp/xfer names it), when eth0's packet counters
# stop moving for 20 s, print once what the guest sees (counters, the NIC's interrupts, the
# TCP sockets' queues and retransmits), so a failed run says which side stopped.
# It also prints a heartbeat every 10 s: a guest that stops printing it while its vCPUs keep
# running has frozen as a whole (tests/qmp/net.py tells that from a stuck transfer).
stats() { for c in rx_packets tx_packets rx_dropped tx_dropped; do printf '%s=%s ' $c "$(cat /sys/class/net/eth0/statistics/$c)"; done; }
(
    last="" still=0 told=0 beat=0
    while :; do
        sleep 5
        beat=$((beat + 1))
        [ $((beat % 2)) = 0 ] && echo "FLOTILLA-GUEST-ALIVE $beat"
        # Every minute of a transfer: how far it got and the NIC's interrupt counts, so a
        # transfer that crawls (a completion interrupt that never came shows as a TX
        # count standing still) says so before its timeout.
        [ -e /tmp/xfer ] && [ $((beat % 12)) = 0 ] &&
            echo "net progress in $(cat /tmp/xfer): $(stats)irqs=[$(grep -i virtio /proc/interrupts | tr -s ' ' | tr '\n' ';')]"
        [ -e /tmp/xfer ] || { still=0 told=0; continue; }
        now=$(stats)
        if [ "$now" = "$last" ]; then still=$((still + 5)); else still=0 told=0; fi
        last=$now
        if [ "$still" -ge 20 ] && [ "$told" = 0 ]; then
            told=1
            echo "FLOTILLA-RESULT net stalled ${still}s in $(cat /tmp/xfer): $now irqs=[$(grep -i virtio /proc/interrupts | tr -s ' ' | tr '\n' ';')]"
            echo "FLOTILLA-RESULT net stalled tcp=[$(tail -n +2 /proc/net/tcp | tr -s ' ' | tr '\n' ';')]"
        fi
    done
) &
# After a receive: the bytes that arrived (dd's count) and eth0's receive error counters, so a
# wrong md5 says whether bytes were missing or wrong.
rx_counts() {
    s=/sys/class/net/eth0/statistics
    echo "net rx: $(tail -n 1 /tmp/rx.dd); eth0 rx_packets=$(cat $s/rx_packets) rx_errors=$(cat $s/rx_errors) rx_length_errors=$(cat $s/rx_length_errors) rx_dropped=$(cat $s/rx_dropped) rx_crc_errors=$(cat $s/rx_crc_errors)"
}
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.2/24 dev eth0
ip link set eth1 up && ip addr add 10.0.3.2/24 dev eth1
echo "FLOTILLA-RESULT net macs eth0=$(cat /sys/class/net/eth0/address) eth1=$(cat /sys/class/net/eth1/address)"
wait_carrier eth0 1
echo "FLOTILLA-RESULT net carrier eth0=$(carrier eth0) eth1=$(carrier eth1)"
if ping -c 3 -W 10 10.0.2.1 >/dev/null; then echo "FLOTILLA-RESULT net ping0=ok"; else echo "FLOTILLA-RESULT net ping0=failed"; fi
echo rx >/tmp/xfer
echo "FLOTILLA-RESULT net rx md5=$(nc 10.0.2.1 5001 </dev/null | dd bs=65536 2>/tmp/rx.dd | md5sum | cut -d' ' -f1)"
rx_counts
dd if=/dev/urandom of=/tmp/chunk bs=1M count=1 2>/dev/null
echo "FLOTILLA-RESULT net tx want=$(for i in $(seq 100); do cat /tmp/chunk; done | md5sum | cut -d' ' -f1)"
echo tx >/tmp/xfer
for i in $(seq 100); do cat /tmp/chunk; done | nc 10.0.2.1 5002 >/dev/null
echo "FLOTILLA-RESULT net tx sent"
echo rx2 >/tmp/xfer
echo "FLOTILLA-RESULT net rx2 md5=$(nc 10.0.2.1 5003 </dev/null | dd bs=65536 2>/tmp/rx.dd | md5sum | cut -d' ' -f1)"
rx_counts
rm -f /tmp/xfer
if wait_carrier eth1 1; then
    echo "FLOTILLA-RESULT net eth1 up"
    if ping -c 3 -W 10 10.0.3.1 >/dev/null; then echo "FLOTILLA-RESULT net ping1=ok"; else echo "FLOTILLA-RESULT net ping1=failed"; fi
else
    echo "FLOTILLA-RESULT net eth1 never came up"
fi
if wait_carrier eth1 0; then echo "FLOTILLA-RESULT net eth1 down"; fi
