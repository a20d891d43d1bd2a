#!/bin/bash
# extend.sh BASE OUT DIR: OUT = BASE followed by a gzip'd newc cpio of DIR's
# contents. The kernel unpacks concatenated archives in order, later ones
# adding (or replacing) files, so a test can ship extra tools, scenario
# inputs or data without rebuilding the base initramfs and without the
# 2048-byte command-line limit. Paths inside DIR become absolute guest paths
# (DIR/scenarios/x.sh -> /scenarios/x.sh).
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 BASE OUT DIR" >&2; exit 2; }
base="$1" out="$2" dir="$3"
[ -f "$base" ] || { echo "extend.sh: no base image $base" >&2; exit 1; }
[ -d "$dir" ] || { echo "extend.sh: no directory $dir" >&2; exit 1; }
tmp="$out.tmp.$$"
cp "$base" "$tmp"
(cd "$dir" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9n >>"$tmp"
mv "$tmp" "$out"
