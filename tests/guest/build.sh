#!/bin/bash
# Builds the boot images the e2e tests use, from Debian packages only:
#
#   tests/cache/guest/vmlinuz         Debian cloud kernel (the L2 guest)
#   tests/cache/guest/initramfs.img   busybox-static + virtio modules + tests/guest/init
#                                      + tests/guest/scenarios/*.sh
#   tests/cache/l1/vmlinuz            Debian generic kernel (has 9p, kvm-amd)
#   tests/cache/l1/initramfs.img      busybox-static + 9p/overlay/kvm modules + tests/l1/init
#   tests/cache/rootfs/root.ext4      (target rootfs only, not in all) a 32 MiB ext4 root:
#                                      busybox-static, tests/guest/rootfs-init as /sbin/init,
#                                      the scenarios, /etc/flotilla-rootfs-id (also in
#                                      tests/cache/rootfs/id); needs mkfs.ext4 (e2fsprogs)
#   tests/cache/guest-iperf3/initramfs.img  (target iperf3 only, not in all) the guest
#                                      initramfs followed by a second cpio archive holding
#                                      iperf3 and its libraries (iperf3, libiperf0, libsctp1,
#                                      libssl3, libc6): ~3 MB more, so only the network
#                                      benchmark boots it; the kernel is tests/cache/guest/vmlinuz
#
# Usage: tests/guest/build.sh [all|guest|l1|rootfs|iperf3]     (default: all)
#
# Idempotent: a stamp file records the hash of every input (this script, the
# init scripts, the scenarios, the chosen .deb files); when it matches and the
# outputs exist nothing is done, so the harness can call this on every run.
# Concurrent callers (nextest runs one process per test) serialize on a lock.
# The network is used only by apt-get, and only when a .deb is not cached yet.
#
# Env overrides: FLOTILLA_GUEST_KERNEL_PKG / FLOTILLA_L1_KERNEL_PKG pick a
# specific linux-image package instead of the newest one apt knows.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TESTS="$(cd "$HERE/.." && pwd)"
CACHE="$TESTS/cache"
DEBS="$CACHE/debs"
WHAT="${1:-all}"

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

case "$WHAT" in all|guest|l1|rootfs|iperf3) ;; *) die "unknown target '$WHAT' (all|guest|l1|rootfs|iperf3)";; esac
for tool in dpkg-deb cpio gzip sha256sum apt-get apt-cache flock; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

mkdir -p "$DEBS"
exec 9>"$CACHE/.build.lock"
flock 9

# Guest modules. Order does not matter here: deps are resolved from each
# .ko's depends= string (Debian ships no modules.dep) and the resulting
# load order is written to /etc/modules.order in the image.
GUEST_MODULES="virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev
virtio_pci virtio_blk failover net_failover virtio_net virtio_balloon virtio_console
evdev button"
# L1 modules, the order from TESTING.md (9p root, overlay, kvm-amd, netns tools).
L1_MODULES="virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev
virtio_pci netfs fscache 9pnet 9pnet_virtio 9p overlay irqbypass ccp kvm kvm-amd tun veth
llc stp bridge failover net_failover virtio_net virtio_blk"

# Newest package whose name matches an anchored regex, from the local apt lists.
newest_pkg() {
    local re="$1" found
    found="$(apt-cache search --names-only "$re" 2>/dev/null | awk '{print $1}' | sort -V | tail -n1)"
    if [ -z "$found" ] && [ ! -e "$CACHE/.apt-updated" ]; then
        log "no package matches $re in the apt lists; running apt-get update"
        apt-get update -qq >&2 && touch "$CACHE/.apt-updated"
        found="$(apt-cache search --names-only "$re" 2>/dev/null | awk '{print $1}' | sort -V | tail -n1)"
    fi
    echo "$found"
}

# Path of the cached .deb for a package, downloading it when missing. When
# apt cannot deliver (offline), fall back to the newest cached .deb whose file
# name matches the fallback extended regex.
fetch_deb() {
    local pkg="$1" fallback_ere="$2" deb
    if [ -n "$pkg" ]; then
        deb="$(ls "$DEBS/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)"
        if [ -z "$deb" ]; then
            log "downloading $pkg"
            (cd "$DEBS" && apt-get download -q "$pkg" >&2 2>"$DEBS/.apt.err") ||
                log "apt-get download $pkg failed: $(tail -n1 "$DEBS/.apt.err")"
            deb="$(ls "$DEBS/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)"
        fi
    fi
    if [ -z "${deb:-}" ]; then
        deb="$(ls "$DEBS" | grep -E "$fallback_ere" | sort -V | tail -n1 || true)"
        if [ -n "$deb" ]; then deb="$DEBS/$deb"; log "using cached $(basename "$deb")"; fi
    fi
    [ -n "${deb:-}" ] || die "no .deb for ${pkg:-$fallback_ere} (apt lists empty and nothing cached?)"
    echo "$deb"
}

# Extract a .deb once into $CACHE/extract/<deb name>/.
extract_deb() {
    local deb="$1" dir
    dir="$CACHE/extract/$(basename "$deb" .deb)"
    if [ ! -e "$dir/.done" ]; then
        rm -rf "$dir" && mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir"
        touch "$dir/.done"
    fi
    echo "$dir"
}

# Module name -> .ko path inside an extracted kernel ('-' and '_' are the
# same to the kernel, not to the file system).
find_ko() {
    local root="$1" name="$2" alt
    alt="$(echo "$name" | tr '_-' '-_')"
    find "$root/lib/modules" \( -name "$name.ko" -o -name "$alt.ko" -o -name "$name.ko.xz" -o -name "$alt.ko.xz" \) 2>/dev/null | head -n1
}

# Dependency-first load order for a module list. Prints "name path" lines;
# modules that do not exist in this kernel are reported and skipped (the init
# tolerates them too).
resolve_modules() {
    local root="$1"; shift
    declare -A seen=()
    local order=()
    visit() {
        local m="$1" ko deps d
        m="${m//-/_}"
        [ -n "${seen[$m]:-}" ] && return 0
        seen[$m]=1
        ko="$(find_ko "$root" "$m")"
        if [ -z "$ko" ]; then log "module $m not in this kernel (built in or absent), skipped"; return 0; fi
        # modinfo strings are NUL-separated in .modinfo; no binutils needed.
        deps="$(tr '\0' '\n' <"$ko" | grep -a '^depends=' | head -n1 | sed 's/^depends=//' | tr ',' ' ')"
        for d in $deps; do visit "$d"; done
        order+=("$m $ko")
    }
    for m in "$@"; do visit "$m"; done
    printf '%s\n' "${order[@]}"
}

# Common initramfs staging: busybox with applet links, dev nodes, modules.
stage_base() {
    local stage="$1" kroot="$2"; shift 2
    local bb="$BUSYBOX_ROOT/bin/busybox"
    [ -x "$bb" ] || die "busybox missing in $BUSYBOX_ROOT"
    mkdir -p "$stage"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,lib/modules}
    cp "$bb" "$stage/bin/busybox"
    for applet in $("$bb" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$stage/bin/$applet"
    done
    # The kernel opens /dev/console for init before anything is mounted.
    mknod -m 600 "$stage/dev/console" c 5 1
    mknod -m 666 "$stage/dev/null" c 1 3
    : >"$stage/etc/modules.order"
    local name ko
    while read -r name ko; do
        [ -n "$name" ] || continue
        case "$ko" in
            *.xz) xz -dc "$ko" >"$stage/lib/modules/$name.ko" ;;
            *) cp "$ko" "$stage/lib/modules/$name.ko" ;;
        esac
        echo "$name" >>"$stage/etc/modules.order"
    done < <(resolve_modules "$kroot" "$@")
}

# gzip'd newc cpio of a directory, with fixed owners and mtimes so the same
# inputs give the same bytes.
pack_cpio() {
    local dir="$1" out="$2"
    find "$dir" -exec touch -h -d @0 {} +
    (cd "$dir" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9n >"$out.tmp"
    mv "$out.tmp" "$out"
}

inputs_hash() {
    { sha256sum "$HERE/build.sh" "$@"; } | sha256sum | cut -d' ' -f1
}

BUSYBOX_DEB="$(fetch_deb busybox-static '^busybox-static_.*\.deb$')"
BUSYBOX_ROOT="$(extract_deb "$BUSYBOX_DEB")"

build_image() {
    local kind="$1" pkg_re="$2" pkg_override="$3" init="$4" modules="$5"; shift 5
    local out="$CACHE/$kind" pkg deb kroot stamp want
    pkg="${pkg_override:-$(newest_pkg "$pkg_re")}"
    deb="$(fetch_deb "$pkg" "${pkg_re%\$}_.*\.deb\$")"
    want="$(inputs_hash "$init" "$@" <(basename "$deb") <(basename "$BUSYBOX_DEB") <(echo "$modules"))"
    stamp="$out/.stamp"
    if [ -e "$out/vmlinuz" ] && [ -e "$out/initramfs.img" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        log "$kind image up to date ($(basename "$deb"))"
        return 0
    fi
    log "building $kind image from $(basename "$deb")"
    kroot="$(extract_deb "$deb")"
    local stage="$CACHE/stage-$kind"
    rm -rf "$stage" && mkdir -p "$stage" "$out"
    # shellcheck disable=SC2086
    stage_base "$stage" "$kroot" $modules
    install -m 755 "$init" "$stage/init"
    local extra
    for extra in "$@"; do
        case "$extra" in
            */scenarios/*) mkdir -p "$stage/scenarios"; install -m 755 "$extra" "$stage/scenarios/" ;;
            *) install -m 755 "$extra" "$stage/bin/" ;;
        esac
    done
    basename "$deb" >"$stage/etc/flotilla-kernel-deb"
    pack_cpio "$stage" "$out/initramfs.img"
    cp "$(ls "$kroot"/boot/vmlinuz-* | head -n1)" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
    ls "$kroot"/boot/vmlinuz-* | head -n1 | xargs basename >"$out/kernel-release"
    # The harness computes lpj= from the TSC rate and the kernel's HZ.
    sed -n 's/^CONFIG_HZ=//p' "$kroot"/boot/config-* | head -n1 >"$out/kernel-hz"
    rm -rf "$stage"
    echo "$want" >"$stamp"
    log "$kind: $out/vmlinuz $out/initramfs.img ($(du -h "$out/initramfs.img" | cut -f1))"
}

if [ "$WHAT" = all ] || [ "$WHAT" = guest ] || [ "$WHAT" = iperf3 ]; then
    build_image guest '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' "${FLOTILLA_GUEST_KERNEL_PKG:-}" \
        "$HERE/init" "$GUEST_MODULES" "$HERE"/scenarios/*.sh
fi
if [ "$WHAT" = all ] || [ "$WHAT" = l1 ]; then
    build_image l1 '^linux-image-6\.1\.0-[0-9]+-amd64$' "${FLOTILLA_L1_KERNEL_PKG:-}" \
        "$TESTS/l1/init" "$L1_MODULES" "$TESTS/l1/flotilla-agent"
fi

# The ext4 root file system for root=/dev/vda boots (the initramfs init
# switch_roots into it). No kernel modules: the initramfs loaded them.
build_rootfs() {
    local out="$CACHE/rootfs" want mkfs stage applet
    want="$(inputs_hash "$HERE/rootfs-init" "$HERE"/scenarios/*.sh <(basename "$BUSYBOX_DEB"))"
    if [ -e "$out/root.ext4" ] && [ "$(cat "$out/.stamp" 2>/dev/null)" = "$want" ]; then
        log "rootfs image up to date"
        return 0
    fi
    mkfs="$(PATH="$PATH:/sbin:/usr/sbin" command -v mkfs.ext4 || true)"
    [ -n "$mkfs" ] || die "mkfs.ext4 not found (apt-get install e2fsprogs)"
    log "building rootfs image"
    stage="$CACHE/stage-rootfs"
    rm -rf "$stage" && mkdir -p "$stage"/{bin,sbin,etc,proc,sys,dev,tmp,run,mnt,scenarios} "$out"
    cp "$BUSYBOX_ROOT/bin/busybox" "$stage/bin/busybox"
    for applet in $("$stage/bin/busybox" --list); do
        [ "$applet" = busybox ] || [ "$applet" = init ] || ln -sf busybox "$stage/bin/$applet"
    done
    install -m 755 "$HERE/rootfs-init" "$stage/sbin/init"
    install -m 755 "$HERE"/scenarios/*.sh "$stage/scenarios/"
    echo "${want:0:16}" >"$stage/etc/flotilla-rootfs-id"
    rm -f "$out/root.ext4.tmp"
    "$mkfs" -q -F -t ext4 -L flotilla-root -d "$stage" "$out/root.ext4.tmp" 32M >&2
    mv "$out/root.ext4.tmp" "$out/root.ext4"
    cp "$stage/etc/flotilla-rootfs-id" "$out/id"
    rm -rf "$stage"
    echo "$want" >"$out/.stamp"
    log "rootfs: $out/root.ext4 (id $(cat "$out/id"))"
}
if [ "$WHAT" = rootfs ]; then
    build_rootfs
fi

# The guest initramfs plus iperf3 (tests/examples/bench_net_vm.rs). The extra files go in a
# second cpio archive appended to the guest image, as tests/guest/extend.sh does. The
# shared objects are the ones `ldd /usr/bin/iperf3` names on Debian 12; the build checks
# with the staged dynamic loader that they are enough.
IPERF3_PKGS="iperf3 libiperf0 libsctp1 libssl3 libc6"
IPERF3_LIBS="libiperf.so.0 libcrypto.so.3 libsctp.so.1 libm.so.6 libc.so.6"
build_iperf3() {
    local out="$CACHE/guest-iperf3" pkg deb want stage lib src root dir
    local debs=() roots=()
    for pkg in $IPERF3_PKGS; do
        deb="$(fetch_deb "$pkg" "^${pkg}_.*\.deb\$")"
        debs+=("$deb")
        roots+=("$(extract_deb "$deb")")
    done
    want="$(inputs_hash "$CACHE/guest/.stamp" <(for deb in "${debs[@]}"; do basename "$deb"; done))"
    if [ -e "$out/initramfs.img" ] && [ "$(cat "$out/.stamp" 2>/dev/null)" = "$want" ]; then
        log "guest-iperf3 image up to date"
        return 0
    fi
    log "building guest-iperf3 image"
    stage="$CACHE/stage-iperf3"
    rm -rf "$stage" && mkdir -p "$stage"/{bin,lib64,lib/x86_64-linux-gnu} "$out"
    for root in "${roots[@]}"; do
        if [ -x "$root/usr/bin/iperf3" ]; then
            install -m 755 "$root/usr/bin/iperf3" "$stage/bin/iperf3"
        fi
        if [ -e "$root/lib64/ld-linux-x86-64.so.2" ]; then
            cp -L "$root/lib64/ld-linux-x86-64.so.2" "$stage/lib64/"
        fi
    done
    [ -x "$stage/bin/iperf3" ] || die "no usr/bin/iperf3 in the iperf3 package"
    [ -e "$stage/lib64/ld-linux-x86-64.so.2" ] || die "no lib64/ld-linux-x86-64.so.2 in libc6"
    for lib in $IPERF3_LIBS; do
        src=""
        for root in "${roots[@]}"; do
            for dir in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
                if [ -z "$src" ] && [ -e "$root/$dir/$lib" ]; then src="$root/$dir/$lib"; fi
            done
        done
        [ -n "$src" ] || die "$lib not found in $IPERF3_PKGS"
        cp -L "$src" "$stage/lib/x86_64-linux-gnu/$lib"
    done
    # Same loader and libraries as in the guest; fails on a missing shared object.
    "$stage/lib64/ld-linux-x86-64.so.2" --library-path "$stage/lib/x86_64-linux-gnu" \
        "$stage/bin/iperf3" --version >/dev/null || die "staged iperf3 does not run"
    pack_cpio "$stage" "$out/iperf3.cpio.gz"
    cat "$CACHE/guest/initramfs.img" "$out/iperf3.cpio.gz" >"$out/initramfs.img.tmp"
    mv "$out/initramfs.img.tmp" "$out/initramfs.img"
    rm -rf "$stage" "$out/iperf3.cpio.gz"
    echo "$want" >"$out/.stamp"
    log "guest-iperf3: $out/initramfs.img ($(du -h "$out/initramfs.img" | cut -f1))"
}
if [ "$WHAT" = iperf3 ]; then
    build_iperf3
fi
