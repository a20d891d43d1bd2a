#!/bin/sh
# An interactive shell on ttyS0 (run flotilla-vmm with -serial stdio); `exit` powers off.
echo "flotilla guest shell; 'exit' powers the VM off"
setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
