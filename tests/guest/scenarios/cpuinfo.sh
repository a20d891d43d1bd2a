#!/bin/sh
# CPU features as the guest sees them, and how the kernel set up the FPU/XSAVE state.
echo "FLOTILLA-RESULT flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | tr -s ' ' | sed 's/^ //;s/ /,/g')"
dmesg | grep -E 'x86/fpu|XSAVE' | sed 's/^/FLOTILLA-DMESG /'
