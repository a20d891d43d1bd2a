#!/bin/bash
# Network benchmark with a real guest: iperf3 in the guest against an iperf3 server on
# the tap, flotilla (flotilla-net) vs QEMU microvm (tap, vhost=off and vhost=on), in one
# session on the KVM host (the nested L1 VM on machines without hardware KVM), each run
# in a network namespace of its own. Prints a markdown table on stdout; progress and the
# exact VMM command lines go to stderr. Needs iperf3 on the host (apt-get install iperf3):
# the L1 VM runs the host's binaries.
#
# Usage: tests/bench/net.sh [--runs N] [--seconds S] [--only flotilla|qemu|qemu-vhost|qemu-flotilla-net]...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# Two builds: `--example` narrows every -p of one command to examples, so the binaries
# under test would not be rebuilt.
cargo build --release -q -p qmp-gateway -p vmm -p flotilla-net --bins
cargo build --release -q -p flotilla-tests --example bench_net_vm
exec target/release/examples/bench_net_vm "$@"
