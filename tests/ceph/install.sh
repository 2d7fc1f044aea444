#!/usr/bin/env bash
# Installs, idempotently, what the RBD backend tests need on a Debian 12 (bookworm) host:
#   - a one-node Ceph cluster (ceph-mon, ceph-osd, ceph-common: ceph, rados, rbd,
#     ceph-authtool, monmaptool), the client libraries the backend dlopens at run time
#     (librbd1, librados2) and their Python bindings for checks (python3-rbd,
#     python3-rados; they import under /usr/bin/python3);
#   - NBD servers/clients for comparison tests: nbdkit (its `memory` and `file` plugins are
#     in the main package) and libnbd-bin (nbdinfo, nbdcopy, nbdsh);
#   - qemu-block-extra (QEMU's rbd block driver module), only when the machine's qemu-utils
#     is a bookworm-backports build and the backports qemu-block-extra of exactly that
#     version installs without removing or downgrading anything (checked with apt-get -s).
#     On a machine with plain bookworm's QEMU 7.2 it is skipped;
#   - shellcheck, to lint these scripts.
# Nothing here needs systemd; the cluster is started by tests/ceph/cluster.sh.
# librbd-dev is NOT installed: the backend loads librbd.so.1 at run time and needs no headers.
#
# Fast (one dpkg-query) when everything is installed; `apt-get update` runs only when
# something is missing.
# Exit status: 0 when everything is there, 77 when it is missing and cannot be installed
# (not root, no apt, no network), with one "VUBD-SETUP-MISSING: ..." line on stderr.
set -euo pipefail

missing() {
    echo "VUBD-SETUP-MISSING: $*" >&2
    exit 77
}
log() { echo "ceph/install: $*" >&2; }

# Same source line and file as tests/guest/install-host.sh, so the two scripts never add
# bookworm-backports twice in different ways.
BACKPORTS_LINE="deb http://deb.debian.org/debian bookworm-backports main"
PKGS=(ceph-mon ceph-osd ceph-common librbd1 librados2 python3-rbd python3-rados
    nbdkit libnbd-bin shellcheck)

# Installed version of a package, empty when not installed.
installed_version() {
    dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null |
        sed -n 's/^installed //p'
}

# One dpkg-query for all; it prints nothing for packages it has never heard of.
declare -A have=()
while read -r pkg status; do
    [ "$status" != installed ] || have[$pkg]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PKGS[@]}" 2>/dev/null || true)
want_pkgs=()
for p in "${PKGS[@]}"; do
    [ -n "${have[$p]:-}" ] || want_pkgs+=("$p")
done

# qemu-block-extra must be the exact build of qemu-utils (QEMU refuses modules of another
# build), and only the backports one (10.x), which matches qemu-storage-daemon.
qemu_ver=$(installed_version qemu-utils)
want_qbe=
case "$qemu_ver" in
*bpo12*) [ "$(installed_version qemu-block-extra)" = "$qemu_ver" ] || want_qbe="$qemu_ver" ;;
esac

if [ ${#want_pkgs[@]} -eq 0 ] && [ -z "$want_qbe" ]; then
    exit 0
fi
log "need: ${want_pkgs[*]}${want_qbe:+ qemu-block-extra=$want_qbe}"

[ "$(id -u)" -eq 0 ] || missing "packages ${want_pkgs[*]} (not root, cannot apt-get install)"
command -v apt-get >/dev/null || missing "packages ${want_pkgs[*]} (no apt-get)"

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding bookworm-backports to apt sources"
    echo "$BACKPORTS_LINE" >/etc/apt/sources.list.d/vubd-bookworm-backports.list
fi
apt-get update -q >&2 || missing "apt-get update failed (no network?)"

if [ ${#want_pkgs[@]} -gt 0 ]; then
    log "installing: ${want_pkgs[*]}"
    apt-get install -y -q --no-install-recommends "${want_pkgs[@]}" >&2 ||
        missing "apt-get install ${want_pkgs[*]} failed"
fi

if [ -n "$want_qbe" ]; then
    # Simulate first: refuse if apt would remove anything or downgrade an installed package.
    if ! sim=$(apt-get -s install -y --no-install-recommends "qemu-block-extra=$want_qbe" 2>&1); then
        log "WARNING: skipping qemu-block-extra=$want_qbe: apt-get -s fails:"
        printf '%s\n' "$sim" | tail -5 >&2
    else
        bad=$(printf '%s\n' "$sim" | grep '^Remv ' || true)
        # "Inst pkg [old] (new ...": an upgrade or a downgrade of an installed package.
        while read -r _ pkg old new _; do
            old=${old#[}
            old=${old%]}
            new=${new#(}
            if dpkg --compare-versions "$new" lt "$old"; then
                bad+="downgrade $pkg $old -> $new"$'\n'
            fi
        done < <(printf '%s\n' "$sim" | grep -E '^Inst [^ ]+ \[' || true)
        if [ -n "$bad" ]; then
            log "WARNING: skipping qemu-block-extra=$want_qbe, it would change QEMU:"
            printf '%s\n' "$bad" >&2
        else
            log "installing: qemu-block-extra=$want_qbe (bookworm-backports)"
            apt-get install -y -q --no-install-recommends "qemu-block-extra=$want_qbe" >&2 ||
                missing "apt-get install qemu-block-extra=$want_qbe failed"
        fi
    fi
fi

for bin in ceph-mon ceph-osd ceph ceph-authtool monmaptool rados rbd nbdkit; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null ||
        missing "$bin (still missing after install)"
done
/usr/bin/python3 -c 'import rados, rbd' 2>/dev/null ||
    missing "python3-rbd / python3-rados (import rados, rbd fails under /usr/bin/python3)"
log "$(ceph-mon --version | head -1)"
