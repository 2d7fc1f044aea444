#!/usr/bin/env bash
# Builds the test guest from Debian packages: a Debian kernel (linux-image-amd64) and an
# initramfs (cpio newc, gzip) holding busybox-static, fio, e2fsprogs and util-linux with
# their shared libraries (from ldd), the virtio/ext4 modules with their dependencies (from
# modules.dep), and tests/guest/init as /init.
#
# Usage: build-guest.sh OUTDIR
# Writes OUTDIR/vmlinuz, OUTDIR/initrd.img and OUTDIR/info. The caller (run.sh) caches
# OUTDIR keyed by the contents of this script and of init; the host tools it needs come
# from install-host.sh.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-guest.sh OUTDIR}
export PATH="$PATH:/usr/sbin:/sbin"

# Kernel modules the tests need, with everything modules.dep says they depend on.
# Names that are built into the kernel are skipped.
WANT_MODULES=(virtio_pci virtio_blk crc32c_generic ext4)
# Binaries copied from the host's Debian packages (fio, e2fsprogs, util-linux) into
# /usr/local/sbin of the guest, each with its shared libraries. busybox provides the rest.
WANT_BINS=(fio mke2fs e2fsck resize2fs blkdiscard blockdev fstrim)

tmp=$(mktemp -d /var/tmp/vubd-guest-build.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
stage=$tmp/root
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,usr/local/sbin,etc,proc,sys,dev,tmp,mnt,run}

# --- Debian packages: kernel and busybox-static are downloaded, not installed ---------
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "build-guest: cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
(cd "$tmp" && apt-get download -q "$kpkg" busybox-static >&2 2>"$tmp/download.err") || {
    cat "$tmp/download.err" >&2
    exit 1
}
dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/kernel"
dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/busybox"
kver=$(ls "$tmp/kernel/lib/modules")
cp "$tmp/kernel/boot/vmlinuz-$kver" "$OUT/vmlinuz.tmp"

install -m 0755 "$tmp/busybox/bin/busybox" "$stage/bin/busybox"

# --- modules ---------------------------------------------------------------------------
# The .deb has no modules.dep (its postinst runs depmod): make one.
depmod -b "$tmp/kernel" "$kver"
moddir=$tmp/kernel/lib/modules/$kver
# name -> path relative to moddir (module names treat - and _ alike)
declare -A modpath=()
while IFS= read -r line; do
    p=${line%%:*}
    n=$(basename "$p" .ko)
    modpath[${n//-/_}]=$p
done <"$moddir/modules.dep"
declare -A loaded=()
load_order=()
add_module() {
    local name=${1//-/_} p deps d
    [ -n "${loaded[$name]:-}" ] && return 0
    loaded[$name]=1
    if [ -z "${modpath[$name]:-}" ]; then
        if grep -q "/$name.ko\$" <(tr - _ <"$moddir/modules.builtin"); then
            return 0 # built in
        fi
        echo "build-guest: module $name not found in $kpkg" >&2
        exit 1
    fi
    p=${modpath[$name]}
    deps=$(grep "^$p:" "$moddir/modules.dep" | cut -d: -f2)
    for d in $deps; do
        add_module "$(basename "$d" .ko)"
    done
    load_order+=("$p")
}
for m in "${WANT_MODULES[@]}"; do
    add_module "$m"
done
mkdir -p "$stage/lib/modules/$kver"
for p in "${load_order[@]}"; do
    mkdir -p "$stage/lib/modules/$kver/$(dirname "$p")"
    cp "$moddir/$p" "$stage/lib/modules/$kver/$p"
done
cp "$moddir"/modules.builtin "$moddir"/modules.builtin.modinfo "$moddir"/modules.order "$stage/lib/modules/$kver/"
depmod -b "$stage" "$kver"
# /init insmods these in this order (dependencies first).
printf '%s\n' "${load_order[@]}" >"$stage/lib/modules/$kver/load-order"

# --- binaries and their shared libraries -------------------------------------------------
copy_lib() {
    local src=$1
    [ -e "$stage$src" ] && return 0
    mkdir -p "$stage$(dirname "$src")"
    cp -L "$src" "$stage$src"
}
for b in "${WANT_BINS[@]}"; do
    path=$(command -v "$b") || { echo "build-guest: $b missing on the host (install-host.sh)" >&2; exit 1; }
    install -m 0755 "$path" "$stage/usr/local/sbin/$b"
    # "libx.so => /path (addr)", "/lib64/ld-linux-x86-64.so.2 (addr)", "linux-vdso.so.1 (addr)"
    ldd "$path" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
        copy_lib "$lib"
    done
done
ln -s mke2fs "$stage/usr/local/sbin/mkfs.ext4"
[ -e /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$stage/etc/"
# A loader cache, so libraries are found wherever ldd saw them.
find "$stage" -name '*.so*' -printf '%h\n' | sort -u | sed "s|^$stage||" >"$tmp/ld.so.conf"
mv "$tmp/ld.so.conf" "$stage/etc/ld.so.conf"
ldconfig -r "$stage"

install -m 0755 "$HERE/init" "$stage/init"

# --- initramfs ---------------------------------------------------------------------------
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) |
    gzip -6 >"$OUT/initrd.img.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
{
    echo "kernel=$kpkg"
    echo "kernel_version=$kver"
    echo "modules=${load_order[*]}"
    echo "busybox=$(dpkg-deb -f "$tmp"/busybox-static_*.deb Version)"
    echo "fio=$(dpkg-query -W -f '${Version}' fio)"
    echo "initrd_bytes=$(stat -c %s "$OUT/initrd.img")"
    echo "initrd_unpacked_bytes=$(du -sb "$stage" | cut -f1)"
} >"$OUT/info"
