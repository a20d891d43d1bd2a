#!/bin/sh
# Reboot (the test passes reboot=k, so via the i8042 reset line): the VMM
# must end the VM with status 0. The marker proves the scenario ran.
echo "FLOTILLA-RESULT action=reboot"
sync
reboot -f
sleep 30
echo "FLOTILLA-RESULT error=still-running-after-reboot"
exit 1
