#!/bin/sh
# Waits for the ACPI power button (QMP system_powerdown), then powers off.
# There is no acpid in the guest: the `button` module reports presses as key
# events on the "Power Button" input device, read here through evdev. The
# host side waits for `powerbutton=armed` before pressing.
ev=
for d in /sys/class/input/event*; do
    [ "$(cat "$d/device/name" 2>/dev/null)" = "Power Button" ] && ev="/dev/input/${d##*/}"
done
if [ -z "$ev" ]; then
    echo "FLOTILLA-RESULT powerbutton=missing"
    exit 1
fi
# Open the device before saying so: evdev delivers a press only to readers that have it
# open, and the host presses as soon as it reads "armed" (right after a reset it does).
exec 3<"$ev"
echo "FLOTILLA-RESULT powerbutton=armed device=$ev"
# One struct input_event (24 bytes on x86_64) = the press.
dd of=/dev/null bs=24 count=1 <&3 2>/dev/null
echo "FLOTILLA-RESULT powerbutton=pressed"
sync
poweroff -f
