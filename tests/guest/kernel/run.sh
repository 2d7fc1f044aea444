#!/usr/bin/env bash
# VDUSE/ublk guest tests for vubd: boots Debian bookworm-backports' 6.12 kernel (which has
# vduse, vdpa, virtio_vdpa and ublk_drv) with a busybox initramfs under QEMU TCG, and runs
# vubd INSIDE the guest (tests/guest/kernel/init), where /dev/vduse/control and
# /dev/ublk-control exist. No vhost-user disk: the guest is its own host.
#
# Usage: tests/guest/kernel/run.sh [TEST...]    TEST: probe ramdisk (default all)
#
# The guest (kernel + base initramfs, build.sh --base) is cached keyed by build.sh, init
# and uapi-probe.c; vubd goes into a small second initramfs made for each run
# (build.sh --vubd) and appended to the base one, so a new vubd does not rebuild the guest.
#
# Output: the guest's "VUBD-RESULT test=NAME status=PASS|FAIL key=value..." lines, one
# "VUBD-TEST name=NAME status=... seconds=... boot_to_result_s=..." line per test, and a
# summary. Exit status: 0 all passed, 1 a test failed, 77 the environment cannot run the
# tests (qemu or the guest cannot be installed/built: not root, no network), with a
# "VUBD-SETUP-MISSING: ..." line on stderr.
#
# Environment:
#   VUBD_GUEST_CACHE         guest cache dir (default /var/cache/vubd-guest; this script's
#                            guests are kernel-guest-KEY, beside tests/guest/run.sh's)
#   VUBD_GUEST_ACCEL         tcg (default) or kvm
#   VUBD_BIN                 vubd binary to test (default: cargo build --release --bin vubd)
#   VUBD_GUEST_STATIC=1      without VUBD_BIN: build a static vubd (crt-static) into
#                            VUBD_STATIC_TARGET_DIR (default /var/tmp/vubd-static-target)
#   VUBD_GUEST_BOOT_TIMEOUT  seconds one boot may take before it is killed (default 300)
#   VUBD_GUEST_KEEP=1        keep the work dir (logs) even when all passed
#   VUBD_GUEST_NO_INSTALL=1  do not run ../install-host.sh (missing tools mean exit 77)
set -euo pipefail
# Job control: the background QEMU (under timeout(1)) gets its own process group, so the
# cleanup can end it and its children with one kill of the group.
set -m

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
CACHE=${VUBD_GUEST_CACHE:-/var/cache/vubd-guest}
ACCEL=${VUBD_GUEST_ACCEL:-tcg}
BOOT_TIMEOUT=${VUBD_GUEST_BOOT_TIMEOUT:-300}
# probe and ramdisk, then one test per tests/NAME.sh (sourced by the guest's init)
ALL_TESTS=(probe ramdisk)
for f in "$HERE"/tests/*.sh; do
    [ -e "$f" ] && ALL_TESTS+=("$(basename "$f" .sh)")
done

log() { echo "kernel/run.sh: $*" >&2; }

tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=("${ALL_TESTS[@]}")
for t in "${tests[@]}"; do
    case " ${ALL_TESTS[*]} " in
    *" $t "*) ;;
    *)
        echo "usage: $0 [TEST...]   tests: ${ALL_TESTS[*]}" >&2
        exit 2
        ;;
    esac
done
case "$ACCEL" in
tcg | kvm) ;;
*)
    echo "VUBD_GUEST_ACCEL must be tcg or kvm" >&2
    exit 2
    ;;
esac

# shellcheck source=tests/guest/lib.sh disable=SC1091
. "$HERE/../lib.sh"

# --- host packages -----------------------------------------------------------------------------
if [ "${VUBD_GUEST_NO_INSTALL:-0}" != 1 ]; then
    rc=0
    "$HERE/../install-host.sh" || rc=$?
    [ $rc -eq 0 ] || exit $rc
fi
PATH="$PATH:/usr/sbin:/sbin"
need_tools qemu-system-x86_64 cpio gzip

# --- the guest: cached, keyed by what defines it -------------------------------------------------
key=$(cat "$HERE/build.sh" "$HERE/init" "$HERE/uapi-probe.c" | sha256sum | cut -c1-16)
GUEST=$CACHE/kernel-guest-$key
if [ ! -f "$GUEST/base.img" ]; then
    { mkdir -p "$CACHE" 2>/dev/null && [ -w "$CACHE" ]; } ||
        setup_missing "guest cache $CACHE is not writable (set VUBD_GUEST_CACHE or run as root)"
    exec 9>"$CACHE/.kernel-guest.lock"
    flock 9
    if [ ! -f "$GUEST/base.img" ]; then
        need_tools apt-get apt-cache dpkg-deb depmod ldconfig xz fio mke2fs e2fsck blkdiscard blockdev fstrim vdpa socat
        log "building the guest into $GUEST"
        t0=$(now)
        rm -rf "$GUEST.tmp"
        mkdir -p "$GUEST.tmp"
        "$HERE/build.sh" --base "$GUEST.tmp" >&2 || setup_missing "guest build failed (tests/guest/kernel/build.sh)"
        # drop guests of older script versions (only ours: tests/guest/run.sh's are guest-*)
        find "$CACHE" -maxdepth 1 -name 'kernel-guest-*' ! -name "kernel-guest-$key*" -exec rm -rf {} +
        mv "$GUEST.tmp" "$GUEST"
        log "guest built in $(since "$t0") s"
    fi
    flock -u 9
    exec 9>&-
else
    log "guest from cache: $GUEST"
fi
sed 's/^/kernel\/run.sh: guest /' "$GUEST/info" >&2

# --- vubd ----------------------------------------------------------------------------------------
if [ -n "${VUBD_BIN:-}" ]; then
    VUBD=$VUBD_BIN
elif [ "${VUBD_GUEST_STATIC:-0}" = 1 ]; then
    tdir=${VUBD_STATIC_TARGET_DIR:-/var/tmp/vubd-static-target}
    log "cargo build --release --bin vubd (static, into $tdir)"
    (cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --bin vubd \
        --target x86_64-unknown-linux-gnu --target-dir "$tdir" >&2) || {
        echo "VUBD-RESULT test=build status=FAIL reason=cargo_build_static"
        exit 1
    }
    VUBD=$tdir/x86_64-unknown-linux-gnu/release/vubd
else
    log "cargo build --release --bin vubd"
    (cd "$ROOT" && cargo build --release --bin vubd >&2) || {
        echo "VUBD-RESULT test=build status=FAIL reason=cargo_build"
        exit 1
    }
    VUBD=$ROOT/target/release/vubd
fi
[ -x "$VUBD" ] || {
    echo "VUBD-RESULT test=build status=FAIL reason=no_binary path=$VUBD"
    exit 1
}

WORK=$(mktemp -d /var/tmp/vubd-kguest-run.XXXXXX)
log "work dir $WORK"
t0=$(now)
"$HERE/build.sh" --vubd "$WORK/vubd.img" "$VUBD" >&2 || {
    echo "VUBD-RESULT test=build status=FAIL reason=vubd_initramfs"
    exit 1
}
cat "$GUEST/base.img" "$WORK/vubd.img" >"$WORK/initrd.img"
log "vubd initramfs made in $(since "$t0") s; initrd $(stat -c %s "$WORK/initrd.img") bytes"

# --- QEMU ----------------------------------------------------------------------------------------
# start_qemu NAME APPEND: boots the guest in the background; sets QEMU_PID and QEMU_LOG
# (the serial console).
start_qemu() {
    local name=$1 append=$2
    QEMU_LOG=$WORK/$name.serial.log
    local accel_args=(-accel tcg -cpu max)
    [ "$ACCEL" = kvm ] && accel_args=(-accel kvm -cpu host)
    : >"$QEMU_LOG"
    # timeout(1) is the last line of defence if this script is killed without its trap.
    timeout -k 10 "$BOOT_TIMEOUT" qemu-system-x86_64 \
        "${accel_args[@]}" -machine q35 -smp 2 -m 1G "${QEMU_EXTRA[@]}" \
        -nodefaults -nographic -monitor none -no-reboot \
        -serial "file:$QEMU_LOG" \
        -kernel "$GUEST/vmlinuz" -initrd "$WORK/initrd.img" \
        -append "console=ttyS0 panic=-1 quiet $append" \
        </dev/null >"$WORK/$name.qemu.log" 2>&1 &
    QEMU_PID=$!
    PIDS+=("$QEMU_PID")
}

# --- results -------------------------------------------------------------------------------------

# boot_one NAME APPEND: one guest boot running vubd.test=NAME, checked. Sets
# GUEST_UPTIME: the guest's uptime when its test had finished (from VUBD-RESULT-TIME).
boot_one() {
    BOOT_SECONDS=none
    start_qemu "$1" "vubd.test=$1${2:+ $2}"
    wait_qemu
    GUEST_UPTIME=$(tr -d '\r' <"$QEMU_LOG" | sed -n 's/^VUBD-RESULT-TIME .*guest_uptime_s=\([0-9.]*\).*/\1/p' | head -n 1)
    check_run "$1"
}
test_probe() { boot_one probe ""; }
# Extra QEMU arguments of the next boot (the vhostuser test's disk).
QEMU_EXTRA=()
# vhostuser: the same guest with a vhost-user-blk disk served by a vubd on the host, so the
# three front ends are measured by the same fio in the same kernel.
test_vhostuser() {
    local sock=$WORK/vhostuser.sock vpid rc
    "$VUBD" --socket-path "$sock" --null 1G --num-queues 1 >"$WORK/vhostuser.vubd.log" 2>&1 &
    vpid=$!
    PIDS+=("$vpid")
    for _ in $(seq 100); do
        [ -S "$sock" ] && break
        sleep 0.1
    done
    # shellcheck disable=SC2054 # commas are inside QEMU option values
    QEMU_EXTRA=(-object memory-backend-memfd,id=mem0,size=1G,share=on -numa node,memdev=mem0
        -chardev "socket,id=vu0,path=$sock" -device vhost-user-blk-pci,chardev=vu0,num-queues=1)
    rc=0
    boot_one vhostuser "" || rc=1
    QEMU_EXTRA=()
    kill "$vpid" 2>/dev/null
    wait "$vpid" 2>/dev/null || { log "host vubd exited with $?"; rc=1; }
    forget_pid "$vpid"
    grep -E 'panicked|vubd: seccomp' "$WORK/vhostuser.vubd.log" && rc=1
    return $rc
}
test_ramdisk() { boot_one ramdisk "vubd.ram=64M vubd.secs=3"; }

# --- run -----------------------------------------------------------------------------------------
log "vubd $VUBD, accel $ACCEL, tests: ${tests[*]}"
# A test without a host side of its own boots once with its default parameters (a
# "# boot: ..." line in its script: kernel command line words).
for t in "${tests[@]}"; do
    if ! declare -F "test_$t" >/dev/null; then
        eval "test_$t() { boot_one $t \"\$(sed -n 's/^# boot: //p' \"\$HERE/tests/$t.sh\" | head -n 1)\"; }"
    fi
done
# What each VUBD-TEST line adds: the guest's uptime at its result, QEMU's wall time.
test_fields() { echo "guest_uptime_at_result_s=${GUEST_UPTIME:-none} qemu_s=$BOOT_SECONDS"; }
run_tests "vubd VDUSE/ublk guest tests" "${tests[@]}"
