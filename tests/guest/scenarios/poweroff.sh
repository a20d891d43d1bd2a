#!/bin/sh
# ACPI poweroff from inside the scenario (not via init's own poweroff).
echo "FLOTILLA-RESULT action=poweroff"
sync
poweroff -f
sleep 30
echo "FLOTILLA-RESULT error=still-running-after-poweroff"
exit 1
