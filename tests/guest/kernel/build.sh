#!/usr/bin/env bash
# Builds the VDUSE/ublk test guest: Debian bookworm-backports' kernel (linux-image-amd64,
# 6.12.x, which has vduse, vdpa, virtio_vdpa and ublk_drv as modules) and a busybox
# initramfs in two parts, concatenated at boot (Linux unpacks every cpio archive of the
# initrd in turn):
#   base.img  kernel modules, busybox-static, fio, e2fsprogs, util-linux, iproute2's vdpa
#             (with their shared libraries, from ldd), uapi-probe (uapi-probe.c, static)
#             and init as /init. Depends only on this directory's files and the packages.
#   vubd.img  /usr/local/sbin/vubd (debug info stripped) with its shared libraries, if
#             any: small and quick to make, so a new vubd does not rebuild the guest.
#
# Usage: build.sh OUTDIR VUBD_BIN          both parts: OUTDIR/{vmlinuz,base.img,vubd.img,
#                                          initrd.img (= base.img + vubd.img),info}
#        build.sh --base OUTDIR            the guest alone: OUTDIR/{vmlinuz,base.img,info}
#        build.sh --vubd FILE VUBD_BIN     the vubd part alone, into FILE
# Host needs (tests/guest/install-host.sh installs them): apt-get, dpkg-deb, cpio, depmod,
# ldconfig, xz, the binaries above; gcc for uapi-probe (skipped without it). The
# bookworm-backports suite is added to apt's sources when missing (root only).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
export PATH="$PATH:/usr/sbin:/sbin"

# Kernel modules the tests need, with everything modules.dep says they depend on. Names
# built into the kernel (virtio_pci in 6.12) are skipped.
WANT_MODULES=(virtio_pci virtio_blk crc32c_generic ext4 vhost_iotlb vdpa vduse virtio_vdpa ublk_drv)
# Host binaries copied into /usr/local/sbin of the guest with their shared libraries
# (socat: the tests' JSON-RPC client for vubd's management socket).
WANT_BINS=(fio mke2fs e2fsck blkdiscard blockdev fstrim vdpa socat)
BACKPORTS_LINE="deb http://deb.debian.org/debian bookworm-backports main"

die() {
    echo "build.sh: $*" >&2
    exit 1
}
usage() {
    echo "usage: $0 OUTDIR VUBD_BIN | --base OUTDIR | --vubd FILE VUBD_BIN" >&2
    exit 2
}

mode=all
case "${1:-}" in
--base)
    mode=base
    OUT=${2:-}
    [ $# -eq 2 ] || usage
    ;;
--vubd)
    mode=vubd
    VUBD_IMG=${2:-}
    VUBD_BIN=${3:-}
    [ $# -eq 3 ] || usage
    ;;
*)
    OUT=${1:-}
    VUBD_BIN=${2:-}
    [ $# -eq 2 ] || usage
    ;;
esac

tmp=$(mktemp -d /var/tmp/vubd-kguest-build.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# copy_with_libs STAGE PATH DEST: installs PATH as STAGE/DEST and the shared libraries
# ldd lists for it at their host paths under STAGE.
copy_with_libs() {
    local stage=$1 path=$2 dest=$3 lib
    install -D -m 0755 "$path" "$stage$dest"
    # "libx.so => /path (addr)", "/lib64/ld-linux-x86-64.so.2 (addr)", "linux-vdso.so.1
    # (addr)"; a static binary: "not a dynamic executable" / "statically linked".
    ldd "$path" 2>/dev/null | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
        [ -e "$stage$lib" ] && continue
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
}

# libdirs STAGE: the directories (guest paths) holding shared libraries
libdirs() {
    find "$1" -type f \( -name '*.so' -o -name '*.so.*' \) -printf '%h\n' | sort -u | sed "s|^$1||"
}

# mkcpio DIR FILE LEVEL: DIR as a gzip-compressed newc archive owned by root, padded with zeroes
# to a multiple of 512 bytes so another archive can be appended to it.
mkcpio() {
    (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) |
        gzip -"$3" >"$2"
    local size pad
    size=$(stat -c %s "$2")
    pad=$(((512 - size % 512) % 512))
    [ "$pad" -eq 0 ] || head -c "$pad" /dev/zero >>"$2"
}

# --- the vubd part ----------------------------------------------------------------------------
# build_vubd FILE BIN
build_vubd() {
    local img=$1 bin=$2 stage=$tmp/vubd-root kind=static
    [ -x "$bin" ] || die "vubd binary $bin is not executable"
    rm -rf "$stage"
    mkdir -p "$stage/usr/local/sbin" "$stage/etc"
    copy_with_libs "$stage" "$bin" /usr/local/sbin/vubd
    # debug info is most of its size; the symbols (panic backtraces) stay
    if command -v strip >/dev/null; then
        strip --strip-debug "$stage/usr/local/sbin/vubd"
    fi
    if ldd "$bin" >/dev/null 2>&1 && ! ldd "$bin" 2>&1 | grep -q 'statically linked'; then
        kind=dynamic
    fi
    # Library directories for LD_LIBRARY_PATH (init reads it): ones the base guest's loader
    # cache may not know.
    libdirs "$stage" | paste -sd: >"$tmp/vubd-libpath"
    mv "$tmp/vubd-libpath" "$stage/etc/vubd-libpath"
    {
        echo "vubd_sha256=$(sha256sum "$bin" | cut -c1-16)"
        echo "vubd_link=$kind"
    } >"$stage/etc/vubd-info"
    # The tests (tests/*.sh, sourced by init): here rather than in the cached base image, so
    # changing a test does not rebuild the guest.
    mkdir -p "$stage/tests"
    for t in "$HERE"/tests/*.sh; do
        [ -e "$t" ] && install -m 0644 "$t" "$stage/tests/"
    done
    mkcpio "$stage" "$img.tmp" 1
    mv "$img.tmp" "$img"
    echo "build.sh: vubd part: $kind binary, $(stat -c %s "$img") bytes" >&2
}

if [ "$mode" = vubd ]; then
    build_vubd "$VUBD_IMG" "$VUBD_BIN"
    exit 0
fi

# --- kernel: linux-image-amd64 from bookworm-backports ----------------------------------------
# Without backports in apt's sources, "apt-cache -t bookworm-backports" silently answers
# with plain bookworm's 6.1, hence the check for a backports version.
resolve_kernel() {
    kpkg=$(apt-cache -t bookworm-backports depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    kpkg_version=$(apt-cache -t bookworm-backports policy linux-image-amd64 2>/dev/null |
        awk '/Candidate:/ {print $2}')
    case "$kpkg_version" in *bpo*) return 0 ;; esac
    return 1
}
if ! resolve_kernel; then
    [ "$(id -u)" -eq 0 ] || die "bookworm-backports is not in apt's sources and we are not root to add it"
    if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "build.sh: adding bookworm-backports to apt sources" >&2
        echo "$BACKPORTS_LINE" >/etc/apt/sources.list.d/vubd-bookworm-backports.list
    fi
    apt-get update -q >&2 || die "apt-get update failed"
    resolve_kernel || die "no linux-image-amd64 in bookworm-backports (got '${kpkg_version:-none}')"
fi
echo "build.sh: kernel $kpkg ($kpkg_version)" >&2
# apt-get download runs as _apt, who must be able to write the directory
chmod 755 "$tmp"
(cd "$tmp" && apt-get download -q -t bookworm-backports "$kpkg" busybox-static >"$tmp/download.log" 2>&1) || {
    cat "$tmp/download.log" >&2
    die "apt-get download $kpkg busybox-static failed"
}
dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/kernel"
dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/busybox"
kver=$(ls "$tmp/kernel/lib/modules")

stage=$tmp/root
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,usr/local/sbin,etc,proc,sys,dev,tmp,mnt,run}
install -m 0755 "$tmp/busybox/bin/busybox" "$stage/bin/busybox"

# --- modules ------------------------------------------------------------------------------------
# The .deb has no modules.dep (its postinst runs depmod): make one. 6.12's modules are
# .ko.xz; they are unpacked into the guest as .ko, which busybox insmod loads as they are.
depmod -b "$tmp/kernel" "$kver"
moddir=$tmp/kernel/lib/modules/$kver
modname() { # path -> module name (- and _ alike)
    local n
    n=$(basename "$1")
    n=${n%.ko*}
    echo "${n//-/_}"
}
declare -A modpath=()
while IFS= read -r line; do
    p=${line%%:*}
    modpath[$(modname "$p")]=$p
done <"$moddir/modules.dep"
declare -A seen=()
load_order=()
add_module() {
    local name=${1//-/_} p deps d
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    if [ -z "${modpath[$name]:-}" ]; then
        if tr - _ <"$moddir/modules.builtin" | grep -q "/$name.ko\$"; then
            builtin_modules+=("$name")
            return 0
        fi
        die "module $name not found in $kpkg"
    fi
    p=${modpath[$name]}
    deps=$(grep "^$p:" "$moddir/modules.dep" | cut -d: -f2)
    for d in $deps; do
        add_module "$(modname "$d")"
    done
    load_order+=("$p")
}
builtin_modules=()
for m in "${WANT_MODULES[@]}"; do
    add_module "$m"
done
mkdir -p "$stage/lib/modules/$kver"
guest_order=()
for p in "${load_order[@]}"; do
    ko=${p%.xz}
    ko=${ko%.zst}
    mkdir -p "$stage/lib/modules/$kver/$(dirname "$p")"
    case "$p" in
    *.ko.xz) xz -dc "$moddir/$p" >"$stage/lib/modules/$kver/$ko" ;;
    *.ko.zst) zstd -qdc "$moddir/$p" >"$stage/lib/modules/$kver/$ko" ;;
    *) cp "$moddir/$p" "$stage/lib/modules/$kver/$ko" ;;
    esac
    guest_order+=("$ko")
done
cp "$moddir"/modules.builtin "$moddir"/modules.builtin.modinfo "$moddir"/modules.order "$stage/lib/modules/$kver/"
depmod -b "$stage" "$kver"
# /init insmods these in this order (dependencies first).
printf '%s\n' "${guest_order[@]}" >"$stage/lib/modules/$kver/load-order"
# what each wanted module needs, for the README and the info file
moddeps=""
for m in "${WANT_MODULES[@]}"; do
    n=${m//-/_}
    if [ -n "${modpath[$n]:-}" ]; then
        d=$(grep "^${modpath[$n]}:" "$moddir/modules.dep" | cut -d: -f2 | xargs -rn1 basename 2>/dev/null | sed 's/\.ko.*//' | paste -sd+)
        moddeps="$moddeps $n${d:+(needs:$d)}"
    else
        moddeps="$moddeps $n(builtin)"
    fi
done

# --- binaries and their shared libraries ----------------------------------------------------
for b in "${WANT_BINS[@]}"; do
    path=$(command -v "$b") || die "$b missing on the host (install-host.sh; vdpa is in iproute2)"
    copy_with_libs "$stage" "$path" "/usr/local/sbin/$b"
done
ln -s mke2fs "$stage/usr/local/sbin/mkfs.ext4"
[ -e /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$stage/etc/"
# uapi-probe: VDUSE API version and ublk feature bits as the running kernel reports them
uapi_probe=no
if command -v gcc >/dev/null; then
    gcc -static -O2 -Wall -o "$stage/usr/local/sbin/uapi-probe" "$HERE/uapi-probe.c" ||
        die "gcc uapi-probe.c failed"
    strip "$stage/usr/local/sbin/uapi-probe" 2>/dev/null || true
    uapi_probe=yes
else
    echo "build.sh: no gcc: the guest gets no uapi-probe (ublk features unknown)" >&2
fi
# A loader cache, so libraries are found wherever ldd saw them.
libdirs "$stage" >"$tmp/ld.so.conf"
mv "$tmp/ld.so.conf" "$stage/etc/ld.so.conf"
ldconfig -r "$stage"

install -m 0755 "$HERE/init" "$stage/init"

# --- initramfs ---------------------------------------------------------------------------------
mkdir -p "$OUT"
cp "$tmp/kernel/boot/vmlinuz-$kver" "$OUT/vmlinuz.tmp"
mkcpio "$stage" "$OUT/base.img.tmp" 6
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/base.img.tmp" "$OUT/base.img"
{
    echo "kernel=$kpkg"
    echo "kernel_package_version=$kpkg_version"
    echo "kernel_version=$kver"
    echo "modules_wanted=${moddeps# }"
    echo "modules_loaded_in_order=$(printf '%s\n' "${guest_order[@]}" | xargs -n1 basename | sed 's/\.ko$//' | paste -sd' ')"
    echo "busybox=$(dpkg-deb -f "$tmp"/busybox-static_*.deb Version)"
    echo "fio=$(dpkg-query -W -f '${Version}' fio)"
    echo "iproute2=$(dpkg-query -W -f '${Version}' iproute2)"
    echo "uapi_probe=$uapi_probe"
    echo "base_bytes=$(stat -c %s "$OUT/base.img")"
    echo "base_unpacked_bytes=$(du -sb "$stage" | cut -f1)"
} >"$OUT/info"

if [ "$mode" = all ]; then
    build_vubd "$OUT/vubd.img" "$VUBD_BIN"
    cat "$OUT/base.img" "$OUT/vubd.img" >"$OUT/initrd.img"
    echo "vubd_bytes=$(stat -c %s "$OUT/vubd.img")" >>"$OUT/info"
fi
