#!/usr/bin/env bash
# Installs, idempotently, what the Linux guest tests need on a Debian 12 (bookworm) host:
#   - qemu-system-x86 from bookworm-backports, the same QEMU (10.x) as the machine's
#     qemu-utils / qemu-storage-daemon. Plain bookworm's qemu-system-x86 is 7.2 and would
#     replace them, so the backports suite is added to apt's sources when it is missing.
#   - the host tools that build the guest: cpio (initramfs), kmod (depmod -> modules.dep),
#     and the packages whose binaries go into the guest with their shared libraries:
#     fio, e2fsprogs, util-linux. (busybox-static and the kernel are only downloaded.)
#   - shellcheck, to lint these scripts.
# Exit status: 0 when everything is there, 77 when it is missing and cannot be installed
# (not root, no apt, no network), with one "VUBD-SETUP-MISSING: ..." line on stderr.
set -euo pipefail

missing() {
    echo "VUBD-SETUP-MISSING: $*" >&2
    exit 77
}

BACKPORTS_LINE="deb http://deb.debian.org/debian bookworm-backports main"
# Binaries -> the Debian package that provides them.
declare -A NEED=(
    [qemu-system-x86_64]=qemu-system-x86
    [cpio]=cpio
    [depmod]=kmod
    [fio]=fio
    [mkfs.ext4]=e2fsprogs
    [e2fsck]=e2fsprogs
    [resize2fs]=e2fsprogs
    [blkdiscard]=util-linux
    [blockdev]=util-linux
    [fstrim]=util-linux
    [shellcheck]=shellcheck
    [socat]=socat
)

# The QEMU that vhost-user-blk tests must use: the same major version as
# qemu-storage-daemon, so one QEMU serves everything.
qsd_major() { qemu-storage-daemon --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p'; }
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p'; }

want_pkgs=()
for bin in "${!NEED[@]}"; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1; then
        want_pkgs+=("${NEED[$bin]}")
    fi
done
# A qemu-system-x86_64 of another major version than the machine's qemu-storage-daemon
# (e.g. 7.2 from plain bookworm) is replaced by the backports one.
if command -v qemu-system-x86_64 >/dev/null 2>&1 && [ -n "$(qsd_major)" ] &&
    [ "$(qemu_major)" != "$(qsd_major)" ]; then
    want_pkgs+=(qemu-system-x86)
fi

if [ ${#want_pkgs[@]} -eq 0 ]; then
    exit 0
fi
mapfile -t want_pkgs < <(printf '%s\n' "${want_pkgs[@]}" | sort -u)
echo "install-host: need ${want_pkgs[*]}" >&2

[ "$(id -u)" -eq 0 ] || missing "packages ${want_pkgs[*]} (not root, cannot apt-get install)"
command -v apt-get >/dev/null || missing "packages ${want_pkgs[*]} (no apt-get)"

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "install-host: adding bookworm-backports to apt sources" >&2
    echo "$BACKPORTS_LINE" >/etc/apt/sources.list.d/vubd-bookworm-backports.list
fi
apt-get update -q >&2 || missing "apt-get update failed (no network?)"

other=()
for p in "${want_pkgs[@]}"; do
    [ "$p" = qemu-system-x86 ] || other+=("$p")
done
if [ ${#other[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${other[@]}" >&2 ||
        missing "apt-get install ${other[*]} failed"
fi
if printf '%s\n' "${want_pkgs[@]}" | grep -qx qemu-system-x86; then
    # From backports, so it matches qemu-utils / qemu-storage-daemon 10.x and does not
    # pull plain bookworm's 7.2 over them.
    apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 >&2 ||
        missing "apt-get install -t bookworm-backports qemu-system-x86 failed"
fi

command -v qemu-system-x86_64 >/dev/null || missing "qemu-system-x86_64 (still missing after install)"
if command -v qemu-storage-daemon >/dev/null; then
    qemu-storage-daemon --version >/dev/null ||
        missing "qemu-storage-daemon --version fails after installing qemu-system-x86"
    if [ "$(qemu_major)" != "$(qsd_major)" ]; then
        echo "install-host: WARNING: qemu-system-x86_64 $(qemu_major).x but qemu-storage-daemon $(qsd_major).x" >&2
    fi
fi
echo "install-host: $(qemu-system-x86_64 --version | head -1)" >&2
