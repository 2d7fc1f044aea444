#!/usr/bin/env bash
# Installs, idempotently, the host packages `cargo test` needs beyond a Rust toolchain, on
# Debian 12 (bookworm):
#   - prometheus (promtool and the server: tests/metrics.rs);
#   - systemd (systemd-analyze: tests/systemd.rs);
#   - nbdkit, libnbd-bin and qemu-utils (NBD servers: tests/nbd.rs); qemu-utils from
#     bookworm-backports, to match the QEMU 10 of qemu-storage-daemon;
#   - Ceph (a one-node cluster and librbd: tests/rbd.rs), through tests/ceph/install.sh;
#   - QEMU, fio and the guest's tools (tests/guest.rs), through tests/guest/install-host.sh.
# The tests call it themselves when a tool is missing and they run as root; .ci/run calls
# it first so that a missing package shows up at once.
#
# Fast (no apt) when everything is there. Exit status: 0 when everything is installed, 77
# when something is missing and cannot be installed (not root, no apt, no network), with
# "VUBD-SETUP-MISSING: ..." lines on stderr.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export PATH="$PATH:/usr/sbin:/sbin"

missing() {
    echo "VUBD-SETUP-MISSING: $*" >&2
    exit 77
}
log() { echo "install-deps: $*" >&2; }

BACKPORTS_LINE="deb http://deb.debian.org/debian bookworm-backports main"
# tool -> package
declare -A NEED=(
    [promtool]=prometheus
    [prometheus]=prometheus
    [systemd-analyze]=systemd
    [nbdkit]=nbdkit
    [nbdinfo]=libnbd-bin
    [qemu-nbd]=qemu-utils
)

want=()
for bin in "${!NEED[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || want+=("${NEED[$bin]}")
done

if [ ${#want[@]} -gt 0 ]; then
    mapfile -t want < <(printf '%s\n' "${want[@]}" | sort -u)
    log "need ${want[*]}"
    [ "$(id -u)" -eq 0 ] || missing "packages ${want[*]} (not root, cannot apt-get install)"
    command -v apt-get >/dev/null || missing "packages ${want[*]} (no apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports to apt sources"
        echo "$BACKPORTS_LINE" >/etc/apt/sources.list.d/vubd-bookworm-backports.list
    fi
    apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
    apt_get update -q >&2 || missing "apt-get update failed (no network?)"
    plain=()
    for p in "${want[@]}"; do
        [ "$p" = qemu-utils ] || plain+=("$p")
    done
    if [ ${#plain[@]} -gt 0 ]; then
        apt_get install -y -q --no-install-recommends "${plain[@]}" >&2 ||
            missing "apt-get install ${plain[*]} failed"
    fi
    if printf '%s\n' "${want[@]}" | grep -qx qemu-utils; then
        apt_get install -y -q --no-install-recommends -t bookworm-backports qemu-utils >&2 ||
            missing "apt-get install -t bookworm-backports qemu-utils failed"
    fi
    for bin in "${!NEED[@]}"; do
        command -v "$bin" >/dev/null 2>&1 || missing "$bin (still missing after installing ${NEED[$bin]})"
    done
fi

"$HERE/ceph/install.sh"
"$HERE/guest/install-host.sh"
