#!/bin/bash
# Boot benchmark: flotilla-vmm vs QEMU microvm, same kernel + initramfs,
# 1 vCPU / 256 MiB, several runs each, on the KVM host (the nested L1 VM on
# machines without hardware KVM). Prints a markdown table on stdout;
# progress goes to stderr.
#
# Usage: tests/bench/boot.sh [--debug] [--runs N] [--guest-log]
#   --debug      benchmark the debug build instead of release
#   --runs N     runs per VMM (default 5)
#   --guest-log  boot the guest without `quiet`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
profile=(--release)
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --debug) profile=() ;;
        *) args+=("$1") ;;
    esac
    shift
done
# Two builds: `--example` narrows every -p of one command to examples.
cargo build "${profile[@]}" -q -p vmm --bins
cargo build "${profile[@]}" -q -p flotilla-tests --example bench_boot
dir=target/$([ ${#profile[@]} -eq 0 ] && echo debug || echo release)
exec "$dir/examples/bench_boot" "${args[@]}"
