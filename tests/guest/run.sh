#!/usr/bin/env bash
# Linux guest tests for vubd: boots a small Debian guest (kernel + busybox initramfs, built
# by build-guest.sh and cached) in qemu-system-x86_64 with a vhost-user-blk-pci disk served
# by a vubd this script starts, and runs a test inside it (tests/guest/init).
#
# Usage: tests/guest/run.sh [TEST...]
#   TEST: geometry queues fs fio discard restart resize migrate memhotplug diskhotplug
#         reboot qemukill rbd packed (default all)
#   or the kernel tests (probe ramdisk vduse ublk ublk_recovery vhostuser), handed to kernel/run.sh
#
# Output: the guest's and the host's "VUBD-RESULT test=NAME status=PASS|FAIL key=value..."
# lines, one "VUBD-TEST name=NAME status=... seconds=..." line per test, and a summary.
# Exit status: 0 all passed, 1 a test failed, 77 the environment cannot run the tests
# (qemu or the guest cannot be installed/built: not root, no network), with a
# "VUBD-SETUP-MISSING: ..." line on stderr.
#
# Environment:
#   VUBD_GUEST_CACHE         guest cache dir (default /var/cache/vubd-guest)
#   VUBD_GUEST_ACCEL         auto (default: probe KVM, else TCG), kvm or tcg
#   VUBD_BIN                 vubd binary to test (default: cargo build --release --bin vubd)
#   VUBD_GUEST_BOOT_TIMEOUT  seconds one boot may take before it is killed (default 300)
#   VUBD_GUEST_KEEP=1        keep the work dir (logs, disk image) even when all passed
#   VUBD_GUEST_NO_INSTALL=1  do not run install-host.sh (then missing tools mean exit 77)
#   VUBD_GUEST_RECONNECT     chardev reconnect option of the restart test
#                            (default reconnect-ms=1000 on QEMU >= 10, else reconnect=1)
#   VUBD_GUEST_KILL_AFTER    restart test: seconds of fio before vubd is killed (default 4)
set -euo pipefail
# Job control: every background job (qemu under timeout(1), vubd) gets its own process
# group, so the cleanup can end it and its children with one kill of the group.
set -m

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${VUBD_GUEST_CACHE:-/var/cache/vubd-guest}
ACCEL=${VUBD_GUEST_ACCEL:-auto}
BOOT_TIMEOUT=${VUBD_GUEST_BOOT_TIMEOUT:-300}
KVM_PROBE_TIMEOUT=${VUBD_GUEST_KVM_PROBE_TIMEOUT:-30}
ALL_TESTS=(geometry queues fs fio discard restart resize migrate memhotplug diskhotplug reboot qemukill rbd packed)
DISK_SIZE=$((256 * 1024 * 1024))
SERIAL=vubd-guest-disk
GIB=1073741824

log() { echo "run.sh: $*" >&2; }

tests=("$@")
# The VDUSE and ublk tests need a 6.12 guest with vubd inside it: kernel/run.sh runs them
# (`run.sh vduse ublk` works from here too).
KERNEL_TESTS=" probe ramdisk vduse ublk ublk_recovery vhostuser "
if [ ${#tests[@]} -gt 0 ] && [[ $KERNEL_TESTS == *" ${tests[0]} "* ]]; then
    for t in "${tests[@]}"; do
        [[ $KERNEL_TESTS == *" $t "* ]] || {
            echo "$0: run the kernel tests ($KERNEL_TESTS) apart from the vhost-user ones" >&2
            exit 2
        }
    done
    exec "$(dirname "$0")/kernel/run.sh" "${tests[@]}"
fi
[ ${#tests[@]} -gt 0 ] || tests=("${ALL_TESTS[@]}")
for t in "${tests[@]}"; do
    case " ${ALL_TESTS[*]} " in
    *" $t "*) ;;
    *)
        echo "usage: $0 [TEST...]   tests: ${ALL_TESTS[*]}; kernel tests:$KERNEL_TESTS" >&2
        exit 2
        ;;
    esac
done

# shellcheck source=tests/guest/lib.sh disable=SC1091
. "$HERE/lib.sh"

# --- host packages -------------------------------------------------------------------------
if [ "${VUBD_GUEST_NO_INSTALL:-0}" != 1 ]; then
    rc=0
    "$HERE/install-host.sh" || rc=$?
    [ $rc -eq 0 ] || exit $rc
fi
PATH="$PATH:/usr/sbin:/sbin"
need_tools qemu-system-x86_64

# --- the guest: cached, keyed by what defines it -------------------------------------------
key=$(cat "$HERE/build-guest.sh" "$HERE/init" | sha256sum | cut -c1-16)
GUEST=$CACHE/guest-$key
if [ ! -f "$GUEST/initrd.img" ]; then
    { mkdir -p "$CACHE" 2>/dev/null && [ -w "$CACHE" ]; } ||
        setup_missing "guest cache $CACHE is not writable (set VUBD_GUEST_CACHE or run as root)"
    exec 9>"$CACHE/.lock"
    flock 9
    if [ ! -f "$GUEST/initrd.img" ]; then
        need_tools cpio depmod ldconfig apt-get dpkg-deb fio mke2fs e2fsck blkdiscard blockdev fstrim
        log "building the guest into $GUEST"
        t0=$(now)
        rm -rf "$GUEST.tmp"
        mkdir -p "$GUEST.tmp"
        "$HERE/build-guest.sh" "$GUEST.tmp" >&2 || setup_missing "guest build failed (build-guest.sh)"
        # drop guests of older script versions
        find "$CACHE" -maxdepth 1 -name 'guest-*' ! -name "guest-$key*" -exec rm -rf {} +
        mv "$GUEST.tmp" "$GUEST"
        log "guest built in $(since "$t0") s"
    fi
    flock -u 9
    exec 9>&-
else
    log "guest from cache: $GUEST"
fi
sed 's/^/run.sh: guest /' "$GUEST/info" >&2

# --- vubd ----------------------------------------------------------------------------------
if [ -n "${VUBD_BIN:-}" ]; then
    VUBD=$VUBD_BIN
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

WORK=$(mktemp -d /var/tmp/vubd-guest-run.XXXXXX)
log "work dir $WORK"

# --- QEMU ----------------------------------------------------------------------------------
qemu_major=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p')
# 'reconnect' (seconds) gave way to 'reconnect-ms' in QEMU 9.2.
# VUBD_GUEST_RECONNECT overrides the option (e.g. reconnect=1).
if [ -n "${VUBD_GUEST_RECONNECT:-}" ]; then
    RECONNECT=$VUBD_GUEST_RECONNECT
elif [ "${qemu_major:-0}" -ge 10 ]; then
    RECONNECT=reconnect-ms=1000
else
    RECONNECT=reconnect=1
fi

# start_qemu NAME APPEND [extra args...]: boots the guest in the background; sets QEMU_PID,
# QEMU_LOG (the serial console) and QEMU_QMP (its QMP socket). Environment: SMP (vCPUs),
# QEMU_MEM (-m), QMP (the QMP socket path, default $WORK/NAME.qmp), REBOOT=1 (a guest reboot
# restarts it instead of ending QEMU).
start_qemu() {
    local name=$1 append=$2
    shift 2
    QEMU_LOG=$WORK/$name.serial.log
    QEMU_QMP=${QMP:-$WORK/$name.qmp}
    local accel_args=(-accel tcg -cpu max) extra=(-no-reboot)
    [ "$ACCEL" = kvm ] && accel_args=(-accel kvm -cpu host)
    [ "${REBOOT:-0}" = 1 ] && extra=()
    extra+=(-qmp "unix:$QEMU_QMP,server=on,wait=off")
    : >"$QEMU_LOG"
    # timeout(1) is the last line of defence if this script is killed without its trap. It
    # allows 15 s beyond BOOT_TIMEOUT so that a marker wait that gives up (await) still finds
    # QEMU alive to show its rings.
    timeout -k 10 "$((BOOT_TIMEOUT + 15))" qemu-system-x86_64 \
        "${accel_args[@]}" -machine q35 -smp "${SMP:-2}" -m "${QEMU_MEM:-512M}" \
        -nodefaults -nographic -monitor none "${extra[@]}" \
        -serial "file:$QEMU_LOG" \
        -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initrd.img" \
        -append "console=ttyS0 panic=-1 quiet $append" \
        "$@" </dev/null >"$WORK/$name.qemu.log" 2>&1 &
    QEMU_PID=$!
    PIDS+=("$QEMU_PID")
}
# wait_marker FILE STRING SECONDS: 0 when STRING shows up in FILE in time
wait_marker() {
    local deadline
    deadline=$(($(date +%s) + $3))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        grep -aq "$2" "$1" 2>/dev/null && return 0
        kill -0 "$QEMU_PID" 2>/dev/null || { grep -aq "$2" "$1" 2>/dev/null; return $?; }
        sleep 0.2
    done
    return 1
}
# await NAME FILE STRING SECONDS [VUBD_NAME]: wait_marker, and the logs of boot NAME (and of
# the vubd VUBD_NAME) on stderr when the marker does not come: the guest is not judged by
# check_run then, and nothing else would show why.
await() {
    wait_marker "$2" "$3" "$4" && return 0
    log "$1: no \"$3\" within $4 s"
    show_logs "$1" "${5:-$1}"
    # Requests the driver still waits for, from guest memory, beside vubd's count of the
    # requests each queue holds, twice: indices that do not move with avail ahead of used
    # mean stuck I/O (in vubd or its backend if vubd holds them; lost on the way if it does
    # not), equal ones a guest stuck elsewhere.
    if kill -0 "$QEMU_PID" 2>/dev/null; then
        log "---- $1: virtio rings (QMP) and vubd's queues (RPC), 1 s apart ----"
        qmp "$QEMU_QMP" --virtio-rings >&2 || true
        vubd_queues >&2
        sleep 1
        qmp "$QEMU_QMP" --virtio-rings >&2 || true
        vubd_queues >&2
    fi
    return 1
}
# vubd_queues: one line per device of the current vubd (VUBD_RPC): per running queue, the
# requests it holds and those it completed
vubd_queues() {
    rpc "$VUBD_RPC" '{"jsonrpc":"2.0","id":1,"method":"iostat"}' 2>&1 | python3 -c '
import json, sys
for d in json.loads(sys.stdin.readline())["result"]["devices"]:
    qs = " ".join(
        "q%s:in_flight=%s,done=%s" % (q["queue"], q["in-flight"], sum(o["ops"] for o in q["ops"].values()))
        for q in d["queues"])
    print("vubd device %s %s" % (d["name"], qs or "no-queues-running"))
' 2>&1 || true
}

# --- KVM or TCG ----------------------------------------------------------------------------
# /dev/kvm may exist and still not boot a stock kernel (a paravirtual KVM that hangs), so
# KVM is used only if a probe boot prints its marker in time. The answer is cached for
# this host boot, and this QEMU major version.
detect_accel() {
    local cache_file probe_t0
    cache_file=$CACHE/accel-$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo x)-qemu$qemu_major
    if [ -f "$cache_file" ]; then
        ACCEL=$(cat "$cache_file")
        log "accel: $ACCEL (probed earlier this host boot: $cache_file)"
        return
    fi
    ACCEL=tcg
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        probe_t0=$(now)
        ACCEL=kvm
        start_qemu kvm-probe "vubd.test=probe"
        if wait_marker "$QEMU_LOG" VUBD-PROBE-OK "$KVM_PROBE_TIMEOUT"; then
            log "accel: kvm (probe boot printed its marker in $(since "$probe_t0") s)"
        else
            ACCEL=tcg
            log "accel: tcg (a KVM probe boot printed no marker within ${KVM_PROBE_TIMEOUT} s)"
        fi
        kill_group "$QEMU_PID"
        wait_qemu
    else
        log "accel: tcg (/dev/kvm is not usable)"
    fi
    echo "$ACCEL" >"$cache_file" 2>/dev/null || true
}
case "$ACCEL" in
auto) detect_accel ;;
kvm | tcg) log "accel: $ACCEL (VUBD_GUEST_ACCEL)" ;;
*)
    echo "VUBD_GUEST_ACCEL must be auto, kvm or tcg" >&2
    exit 2
    ;;
esac

# --- vubd processes --------------------------------------------------------------------------
# start_vubd NAME ARGS...: starts vubd on $WORK/NAME.sock; sets VUBD_PID, SOCK
start_vubd() {
    local name=$1
    shift
    SOCK=$WORK/$name.sock
    launch_vubd "$name" "$SOCK" --socket-path "$SOCK" "$@"
}
# launch_vubd NAME SOCKET ARGS...: starts vubd with ARGS (log $WORK/NAME.vubd.log) and waits
# for SOCKET; sets VUBD_PID and VUBD_RPC (its RPC socket: the one ARGS name, or
# $WORK/NAME.rpc, added, so that a failure can show vubd's view of its queues).
launch_vubd() {
    local name=$1 sock=$2 a prev=""
    shift 2
    VUBD_RPC=""
    for a in "$@"; do
        [ "$prev" = --rpc-socket ] && VUBD_RPC=$a
        prev=$a
    done
    if [ -z "$VUBD_RPC" ]; then
        VUBD_RPC=$WORK/$name.rpc
        set -- "$@" --rpc-socket "$VUBD_RPC"
    fi
    rm -f "$sock"
    echo "== $(date +%T) $VUBD $*" >>"$WORK/$name.vubd.log"
    RUST_LOG=${RUST_LOG:-info} "$VUBD" "$@" >>"$WORK/$name.vubd.log" 2>&1 &
    VUBD_PID=$!
    PIDS+=("$VUBD_PID")
    for _ in $(seq 100); do
        [ -S "$sock" ] && return 0
        kill -0 "$VUBD_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "vubd did not come up on $sock:"
    tail -20 "$WORK/$name.vubd.log" >&2
    return 1
}
stop_vubd() {
    local alive=1
    kill -0 "$VUBD_PID" 2>/dev/null || alive=0
    kill -TERM "$VUBD_PID" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$VUBD_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$VUBD_PID" 2>/dev/null || true
    wait "$VUBD_PID" 2>/dev/null || true
    forget_pid "$VUBD_PID"
    return $((1 - alive))
}

# vhost_args SOCK QUEUES [chardev-extra [device-extra]]: the QEMU arguments of the
# vhost-user-blk disk (QUEUES empty: no num-queues, QEMU's default of one queue per vCPU)
vhost_args() {
    echo "-object memory-backend-memfd,id=mem0,size=512M,share=on -numa node,memdev=mem0
        -chardev socket,id=c0,path=$1${3:+,$3}
        -device vhost-user-blk-pci,id=disk0,chardev=c0${2:+,num-queues=$2},queue-size=256${4:+,$4}"
}

# --- results -------------------------------------------------------------------------------

# boot_one NAME VUBD-ARGS APPEND: one vubd, one guest boot, checked
boot_one() {
    local name=$1 vargs=$2 append=$3 img=$WORK/$1.img rc=0
    truncate -s "$DISK_SIZE" "$img"
    # shellcheck disable=SC2086
    start_vubd "$name" --blk-file "$img" --num-queues 2 --serial "$SERIAL" $vargs || {
        echo "VUBD-RESULT test=$name-host status=FAIL reason=vubd_start"
        return 1
    }
    # shellcheck disable=SC2046
    start_qemu "$name" "$append" $(vhost_args "$SOCK" 2)
    wait_qemu
    check_run "$name" || rc=1
    stop_vubd || {
        echo "VUBD-RESULT test=$name-host status=FAIL reason=vubd_exited_early"
        rc=1
    }
    return $rc
}

geometry_expect() { # LBS
    local l=$1
    echo "size:$((DISK_SIZE / 512)),logical_block_size:$l,physical_block_size:$l,minimum_io_size:$l,optimal_io_size:0,queues:2,ro:0,serial:$SERIAL,write_cache:write_back,discard_granularity:$l,discard_max_hw_bytes:$GIB,discard_max_bytes:$GIB,max_discard_segments:1,write_zeroes_max_bytes:$GIB,max_segments:254,max_segment_size:1048576"
}

test_geometry() {
    local rc=0
    boot_one geometry "" "vubd.test=geometry vubd.expect=$(geometry_expect 512)" || rc=1
    boot_one geometry4k "--logical-block-size 4096" "vubd.test=geometry vubd.expect=$(geometry_expect 4096)" || rc=1
    return $rc
}
# queues: QEMU's defaults, as a user who copies the README's command line without
# num-queues gets them: a 4-vCPU guest asks vubd (default --num-queues) for 4 queues.
test_queues() {
    local name=queues img=$WORK/queues.img rc=0
    truncate -s "$DISK_SIZE" "$img"
    start_vubd "$name" --blk-file "$img" --serial "$SERIAL" || {
        echo "VUBD-RESULT test=$name-host status=FAIL reason=vubd_start"
        return 1
    }
    local expect="queues:4,size:$((DISK_SIZE / 512)),serial:$SERIAL"
    # shellcheck disable=SC2046
    SMP=4 start_qemu "$name" "vubd.test=geometry vubd.expect=$expect" $(vhost_args "$SOCK" "")
    wait_qemu
    check_run "$name" || rc=1
    stop_vubd || {
        echo "VUBD-RESULT test=$name-host status=FAIL reason=vubd_exited_early"
        rc=1
    }
    # The guest ran its geometry check (test=geometry above); this line is the queues verdict.
    echo "VUBD-RESULT test=$name status=$([ $rc -eq 0 ] && echo PASS || echo FAIL) vcpus=4 expect=$expect"
    return $rc
}
test_fs() { boot_one fs "" "vubd.test=fs"; }
test_fio() { boot_one fio "" "vubd.test=fio"; }
test_discard() {
    local rc=0 st=PASS first_data
    boot_one discard "" "vubd.test=discard" || rc=1
    # The guest discarded 4..12 MiB: vubd punches a hole there (fallocate PUNCH_HOLE), so
    # the image has no data in that range; 0..4 MiB was written and must be data.
    first_data=$(python3 -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    print(os.lseek(fd, int(sys.argv[2]), os.SEEK_DATA))
except OSError:
    print(os.fstat(fd).st_size)
' "$WORK/discard.img" $((4 << 20)))
    [ "$first_data" -ge $((12 << 20)) ] || st=FAIL
    echo "VUBD-RESULT test=discard-host status=$st first_data_after_4MiB=$first_data hole_expected_until=$((12 << 20))"
    [ $st = PASS ] || rc=1
    return $rc
}

# restart: the guest runs fio with verify; the host SIGKILLs vubd mid-run and starts it
# again on the same socket and file; QEMU reconnects (chardev reconnect) and fio must finish
# without an I/O error and with its verification passing.
test_restart() {
    local name=restart img=$WORK/restart.img rc=0 kill_after=${VUBD_GUEST_KILL_AFTER:-4}
    truncate -s "$DISK_SIZE" "$img"
    local vargs=(--blk-file "$img" --num-queues 2 --serial "$SERIAL")
    start_vubd "$name" "${vargs[@]}" || {
        echo "VUBD-RESULT test=$name-host status=FAIL reason=vubd_start"
        return 1
    }
    # shellcheck disable=SC2046
    start_qemu "$name" "vubd.test=restart vubd.fio_size=32M vubd.fio_secs=20" $(vhost_args "$SOCK" 2 "$RECONNECT")
    local killed=no restarted=no busy=no
    if await "$name" "$QEMU_LOG" VUBD-FIO-STARTED "$BOOT_TIMEOUT"; then
        sleep "$kill_after"
        # fio must still be running when vubd dies, or the scenario tested nothing
        grep -aq 'VUBD-RESULT' "$QEMU_LOG" || busy=yes
        if kill -0 "$QEMU_PID" 2>/dev/null && kill -KILL "$VUBD_PID" 2>/dev/null; then
            killed=yes
            wait "$VUBD_PID" 2>/dev/null || true
            forget_pid "$VUBD_PID"
            log "restart: vubd SIGKILLed ${kill_after} s into fio; starting it again"
            sleep 1
            start_vubd "$name" "${vargs[@]}" && restarted=yes
        fi
    fi
    wait_qemu
    local host_st=PASS
    [ $killed = yes ] && [ $restarted = yes ] && [ $busy = yes ] || host_st=FAIL
    echo "VUBD-RESULT test=restart-host status=$host_st killed=$killed fio_running_at_kill=$busy restarted=$restarted kill_after_s=$kill_after"
    [ $host_st = PASS ] || rc=1
    check_run "$name" || rc=1
    if [ $restarted = yes ]; then
        stop_vubd || {
            echo "VUBD-RESULT test=$name-host status=FAIL reason=restarted_vubd_exited_early"
            rc=1
        }
    fi
    return $rc
}

# rpc SOCKET JSON: one JSON-RPC request to vubd's management socket; prints the answer
rpc() {
    python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
print(s.makefile().readline().strip())
' "$1" "$2"
}

# resize: the guest mounts an ext4 and waits; the host grows the device through the
# management socket (device_resize); the guest must see the new size at once (virtio config
# change) and grow the mounted file system online with resize2fs.
test_resize() {
    local name=resize img=$WORK/resize.img rc=0 answer st=PASS
    truncate -s "$DISK_SIZE" "$img"
    start_vubd "$name" --blk-file "$img" --num-queues 2 --serial "$SERIAL" \
        --rpc-socket "$WORK/rpc.sock" || {
        echo "VUBD-RESULT test=$name-host status=FAIL reason=vubd_start"
        return 1
    }
    # shellcheck disable=SC2046
    start_qemu "$name" "vubd.test=resize" $(vhost_args "$SOCK" 2)
    if await "$name" "$QEMU_LOG" VUBD-RESIZE-READY "$BOOT_TIMEOUT"; then
        answer=$(rpc "$WORK/rpc.sock" '{"jsonrpc":"2.0","id":1,"method":"device_resize","params":{"name":"dev0","size":"768M"}}')
        log "device_resize: $answer"
        case "$answer" in *'"capacity":805306368'*) ;; *) st=FAIL ;; esac
    else
        st=FAIL
    fi
    echo "VUBD-RESULT test=resize-host status=$st answer=${answer:-none}"
    [ $st = PASS ] || rc=1
    wait_qemu
    check_run "$name" || rc=1
    stop_vubd || {
        echo "VUBD-RESULT test=$name-host status=FAIL reason=vubd_exited_early"
        rc=1
    }
    return $rc
}

# rbd: the restart test on a Ceph RBD image with the write cache off (rbd-restart.sh)
test_rbd() {
    # shellcheck source=/dev/null # checked on its own
    . "$HERE/rbd-restart.sh"
    rbd_restart
}

# qmp SOCKET COMMAND [ARGS-JSON]: one QMP command (tests/guest/qmp.py); prints the answer
qmp() { python3 "$HERE/qmp.py" "$@"; }
# wait_file PATH SECONDS: 0 once PATH exists
wait_file() {
    for _ in $(seq $(($2 * 10))); do
        [ -e "$1" ] && return 0
        sleep 0.1
    done
    return 1
}
# kv LINE KEY: the value of KEY=value in LINE
kv() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
# host_fail NAME REASON...: a failed host-side check
host_fail() {
    local name=$1
    shift
    echo "VUBD-RESULT test=$name-host status=FAIL reason=$*"
}
# finish_vubd NAME: stops vubd; a vubd that died early is a failure
finish_vubd() {
    stop_vubd || {
        host_fail "$1" vubd_exited_early
        return 1
    }
}

# migrate: live migration on shared storage. One vubd serves two devices on one image:
# "src" for the source QEMU and "dst" for the destination QEMU (started with -incoming).
# The guest runs fio with verify and a reader of known data (init: test_migrate); the host
# migrates it over QMP while fio runs. The guest must finish on the destination with all
# data verified, QEMU must have synced the dirty log at least twice (pages dirtied while it
# copied), and fio must still have been running at the switch-over.
test_migrate() {
    local name=migrate img=$WORK/migrate.img rc=0 st=PASS why="" mig="" syncs=0 fio_secs
    fio_secs=${VUBD_GUEST_MIGRATE_FIO_SECS:-45}
    truncate -s "$DISK_SIZE" "$img"
    local dev
    : >"$WORK/migrate.toml"
    for dev in src dst; do
        printf '[[device]]\nname = "%s"\nsocket-path = "%s"\nblk-file = "%s"\nnum-queues = 2\nserial = "%s"\n' \
            "$dev" "$WORK/$dev.sock" "$img" "$SERIAL" >>"$WORK/migrate.toml"
    done
    launch_vubd "$name" "$WORK/dst.sock" --config "$WORK/migrate.toml" || {
        host_fail $name vubd_start
        return 1
    }
    local append="vubd.test=migrate vubd.fio_secs=$fio_secs"
    # shellcheck disable=SC2046
    QMP=$WORK/src.qmp start_qemu migrate-src "$append" $(vhost_args "$WORK/src.sock" 2)
    local src_pid=$QEMU_PID src_log=$QEMU_LOG
    if await migrate-src "$src_log" VUBD-FIO-STARTED "$BOOT_TIMEOUT" migrate; then
        # shellcheck disable=SC2046
        QMP=$WORK/dst.qmp start_qemu migrate "$append" $(vhost_args "$WORK/dst.sock" 2) \
            -incoming "unix:$WORK/migrate.mig"
        wait_file "$WORK/dst.qmp" 30 || why=no_destination
        sleep 3
        mig=$(qmp "$WORK/src.qmp" --migrate "unix:$WORK/migrate.mig" --timeout 300) || why=migration_failed
        log "migration: $mig"
        syncs=$(kv "$mig" dirty_sync_count)
        [ "${syncs:-0}" -ge 2 ] || why="$why${why:+,}dirty_log_synced_${syncs:-0}_times"
        # the guest's results must come from the destination: fio ran across the switch-over
        if grep -aq 'VUBD-RESULT' "$src_log"; then why="$why${why:+,}fio_ended_before_switchover"; fi
        qmp "$WORK/src.qmp" quit >/dev/null 2>&1 || true
    else
        why=guest_did_not_start_fio
    fi
    for _ in $(seq 50); do kill -0 "$src_pid" 2>/dev/null || break; sleep 0.2; done
    kill_group "$src_pid"
    wait "$src_pid" 2>/dev/null || true
    forget_pid "$src_pid"
    [ -z "$why" ] || st=FAIL
    echo "VUBD-RESULT test=migrate-host status=$st $mig ${why:+reason=$why}"
    [ $st = PASS ] || rc=1
    if [ -f "$WORK/migrate.serial.log" ]; then
        wait_qemu
        check_run "$name" || rc=1
    fi
    grep -q 'dirty page logging on' "$WORK/$name.vubd.log" || {
        host_fail $name vubd_never_logged_dirty_pages
        rc=1
    }
    finish_vubd $name || rc=1
    migrate_ram || rc=1
    return $rc
}

# A RAM disk lives in one vubd process only: vubd offers no dirty logging for it, and QEMU
# must refuse to migrate a VM using it, saying why.
migrate_ram() {
    local name=migrate-ram answer st=FAIL
    start_vubd "$name" --ram 256M --num-queues 2 || {
        host_fail $name vubd_start
        return 1
    }
    # Only QEMU's devices matter, not the guest: CPUs stay stopped (-S).
    # shellcheck disable=SC2046
    QMP=$WORK/ram.qmp start_qemu "$name" "vubd.test=probe" $(vhost_args "$SOCK" 2) -S
    if wait_file "$WORK/ram.qmp" 60 && sleep 1; then
        answer=$(qmp "$WORK/ram.qmp" --migrate "unix:$WORK/ram.mig" --timeout 30 2>&1) || true
        case "$answer" in *LOG_ALL* | *LOG_SHMFD*) st=PASS ;; esac
        qmp "$WORK/ram.qmp" quit >/dev/null 2>&1 || true
    fi
    wait_qemu
    echo "VUBD-RESULT test=migrate-ram-host status=$st answer=$(echo "${answer:-none}" | tr ' ' _ | head -c 300)"
    finish_vubd $name || return 1
    [ $st = PASS ]
}

# quit_held_guest QMP: a guest booted with vubd.hold=1 waits after VUBD-DONE for the host
# to finish its QMP steps; then QEMU is told to quit.
quit_held_guest() {
    wait_marker "$QEMU_LOG" '^VUBD-DONE' "$BOOT_TIMEOUT" || return 0
    qmp "$1" quit >/dev/null 2>&1 || true
}

# memhotplug: QEMU boots with room for a DIMM and a memory-less NUMA node 1; when the guest
# is ready the host plugs 256 MiB there (object_add + device_add pc-dimm: vubd gets
# ADD_MEM_REG while the rings run), the guest does I/O with its buffers bound to node 1,
# then the host unplugs the DIMM (device_del: REM_MEM_REG) and the guest does I/O again.
test_memhotplug() {
    local name=memhotplug img=$WORK/memhotplug.img rc=0 why="" q=$WORK/memhp.qmp
    truncate -s "$DISK_SIZE" "$img"
    start_vubd "$name" --blk-file "$img" --num-queues 2 --serial "$SERIAL" || {
        host_fail $name vubd_start
        return 1
    }
    # shellcheck disable=SC2046
    QEMU_MEM=512M,slots=2,maxmem=1G QMP=$q start_qemu "$name" \
        "vubd.test=memhotplug vubd.hold=1 memhp_default_state=online_movable" \
        $(vhost_args "$SOCK" 2) -numa node,nodeid=1
    if await "$name" "$QEMU_LOG" VUBD-MEMHP-READY "$BOOT_TIMEOUT"; then
        qmp "$q" object-add '{"qom-type":"memory-backend-memfd","id":"hp0","size":268435456,"share":true}' >/dev/null &&
            qmp "$q" device_add '{"driver":"pc-dimm","id":"dimm0","memdev":"hp0","node":1}' >/dev/null ||
            why=plug
        if await "$name" "$QEMU_LOG" VUBD-MEMHP-UNPLUG "$BOOT_TIMEOUT"; then
            qmp "$q" device_del '{"id":"dimm0"}' >/dev/null || why="$why${why:+,}device_del"
            qmp "$q" --wait-gone /machine/peripheral/dimm0 --timeout 120 >/dev/null ||
                why="$why${why:+,}dimm_not_released"
            qmp "$q" object-del '{"id":"hp0"}' >/dev/null || why="$why${why:+,}object_del"
        else
            why="$why${why:+,}guest_did_not_use_the_memory"
        fi
    else
        why=guest_not_ready
    fi
    quit_held_guest "$q"
    wait_qemu
    check_run "$name" || rc=1
    local added removed
    # the DIMM's region, not the boot memory (QEMU adds that with ADD_MEM_REG too)
    added=$(grep -c 'memory region added: guest 0x[0-9a-f]*, 256 MiB' "$WORK/$name.vubd.log" || true)
    removed=$(grep -c 'memory region removed: guest 0x[0-9a-f]*, 256 MiB' "$WORK/$name.vubd.log" || true)
    [ "$added" -ge 1 ] || why="$why${why:+,}vubd_saw_no_ADD_MEM_REG"
    [ "$removed" -ge 1 ] || why="$why${why:+,}vubd_saw_no_REM_MEM_REG"
    local st=PASS
    [ -z "$why" ] || st=FAIL
    echo "VUBD-RESULT test=$name-host status=$st regions_added=$added regions_removed=$removed ${why:+reason=$why}"
    [ $st = PASS ] || rc=1
    finish_vubd $name || rc=1
    return $rc
}

# diskhotplug: the host creates a device over vubd's management socket (device_add), plugs
# a vhost-user-blk-pci for it into a free pcie-root-port (chardev-add + device_add), the
# guest writes and reads it back, then the host unplugs it (device_del), removes the device
# from vubd (device_remove, refused while a frontend is attached) and compares the image
# with the guest's checksum.
test_diskhotplug() {
    local name=diskhotplug img=$WORK/diskhotplug.img rc=0 why="" q=$WORK/dhp.qmp r=$WORK/dhp-rpc.sock
    local hot=$WORK/hot.img answer
    truncate -s "$DISK_SIZE" "$img"
    truncate -s 64M "$hot"
    start_vubd "$name" --blk-file "$img" --num-queues 2 --serial "$SERIAL" --rpc-socket "$r" || {
        host_fail $name vubd_start
        return 1
    }
    # shellcheck disable=SC2046
    QMP=$q start_qemu "$name" "vubd.test=diskhotplug vubd.hold=1" $(vhost_args "$SOCK" 2) \
        -device pcie-root-port,id=rp1,bus=pcie.0,chassis=1
    if await "$name" "$QEMU_LOG" VUBD-HOTPLUG-READY "$BOOT_TIMEOUT"; then
        answer=$(rpc "$r" "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"device_add\",\"params\":{\"name\":\"hot\",\"socket-path\":\"$WORK/hot.sock\",\"blk-file\":\"$hot\",\"num-queues\":1}}")
        case "$answer" in *'"result"'*) ;; *) why="rpc_device_add:$answer" ;; esac
        qmp "$q" chardev-add "{\"id\":\"hotc\",\"backend\":{\"type\":\"socket\",\"data\":{\"addr\":{\"type\":\"unix\",\"data\":{\"path\":\"$WORK/hot.sock\"}},\"server\":false}}}" >/dev/null &&
            qmp "$q" device_add '{"driver":"vhost-user-blk-pci","id":"hotdisk","chardev":"hotc","bus":"rp1","num-queues":1}' >/dev/null ||
            why="$why${why:+,}qemu_plug"
        if await "$name" "$QEMU_LOG" VUBD-HOTPLUG-UNPLUG "$BOOT_TIMEOUT"; then
            answer=$(rpc "$r" '{"jsonrpc":"2.0","id":2,"method":"device_remove","params":{"name":"hot"}}')
            case "$answer" in *'-32003'*) ;; *) why="$why${why:+,}removed_while_attached:$answer" ;; esac
            qmp "$q" device_del '{"id":"hotdisk"}' >/dev/null || why="$why${why:+,}device_del"
            qmp "$q" --wait-gone /machine/peripheral/hotdisk --timeout 120 >/dev/null ||
                why="$why${why:+,}disk_not_released"
            qmp "$q" chardev-remove '{"id":"hotc"}' >/dev/null || why="$why${why:+,}chardev_remove"
            local removed=no
            for _ in $(seq 50); do
                answer=$(rpc "$r" '{"jsonrpc":"2.0","id":3,"method":"device_remove","params":{"name":"hot"}}')
                case "$answer" in *'"result"'*) removed=yes && break ;; esac
                sleep 0.2
            done
            [ $removed = yes ] || why="$why${why:+,}device_remove:$answer"
            [ ! -e "$WORK/hot.sock" ] || why="$why${why:+,}socket_left_behind"
        else
            why="$why${why:+,}guest_did_not_use_the_disk"
        fi
    else
        why=guest_not_ready
    fi
    quit_held_guest "$q"
    wait_qemu
    check_run "$name" || rc=1
    local want got
    want=$(grep -ao 'VUBD-RESULT test=diskhotplug .*' "$QEMU_LOG" | tr ' ' '\n' | sed -n 's/^sha256=//p' | tr -d '\r')
    got=$(head -c $((8 << 20)) "$hot" | sha256sum | cut -d' ' -f1)
    [ -n "$want" ] && [ "$want" = "$got" ] || why="$why${why:+,}image_differs"
    local st=PASS
    [ -z "$why" ] || st=FAIL
    echo "VUBD-RESULT test=$name-host status=$st image_sha256=$got ${why:+reason=$why}"
    [ $st = PASS ] || rc=1
    finish_vubd $name || rc=1
    return $rc
}

# reboot: three boots of one QEMU (init: test_reboot): reboot -f inside the guest mid-I/O,
# then system_reset over QMP mid-I/O; data flushed before each must be intact after it.
test_reboot() {
    local name=reboot img=$WORK/reboot.img rc=0 why="" q=$WORK/reboot.qmp
    truncate -s "$DISK_SIZE" "$img"
    start_vubd "$name" --blk-file "$img" --num-queues 2 --serial "$SERIAL" || {
        host_fail $name vubd_start
        return 1
    }
    # shellcheck disable=SC2046
    REBOOT=1 QMP=$q start_qemu "$name" "vubd.test=reboot" $(vhost_args "$SOCK" 2)
    if await "$name" "$QEMU_LOG" VUBD-RESET-READY "$BOOT_TIMEOUT"; then
        qmp "$q" system_reset >/dev/null || why=system_reset
    else
        why=guest_not_ready_for_reset
    fi
    wait_qemu
    check_run "$name" || rc=1
    grep -aq 'VUBD-RESULT test=reboot status=PASS stage=2 after=reboot_f flushed_data=intact' "$QEMU_LOG" ||
        why="$why${why:+,}reboot_f_not_verified"
    grep -aq 'VUBD-RESULT test=reboot status=PASS stage=3 after=system_reset flushed_data=intact' "$QEMU_LOG" ||
        why="$why${why:+,}system_reset_not_verified"
    local st=PASS
    [ -z "$why" ] || st=FAIL
    echo "VUBD-RESULT test=$name-host status=$st ${why:+reason=$why}"
    [ $st = PASS ] || rc=1
    finish_vubd $name || rc=1
    return $rc
}

# qemukill: QEMU is SIGKILLed while the guest runs fio; vubd must free everything of that
# connection (fds, guest memory mappings, in-flight requests: back to what it had before
# QEMU came) and serve a new QEMU on the same socket.
# packed: the disk with packed virtqueues (packed=on). The guest checks the negotiated
# feature and runs fio randrw with verify; the host resets the guest (system_reset) and,
# in the second boot's fio, SIGKILLs vubd and starts it again on the same socket; QEMU
# reconnects. QEMU must report VIRTIO_F_RING_PACKED among the guest features, and vubd's log
# must show packed rings stopping (GET_VRING_BASE with both positions).
test_packed() {
    local name=packed img=$WORK/packed.img rc=0 why="" q=$WORK/packed.qmp
    local kill_after=${VUBD_GUEST_KILL_AFTER:-4}
    truncate -s "$DISK_SIZE" "$img"
    local vargs=(--blk-file "$img" --num-queues 2 --serial "$SERIAL")
    start_vubd "$name" "${vargs[@]}" || {
        host_fail $name vubd_start
        return 1
    }
    # shellcheck disable=SC2046
    REBOOT=1 QMP=$q start_qemu "$name" "vubd.test=packed vubd.fio_secs=20" \
        $(vhost_args "$SOCK" 2 "$RECONNECT" packed=on)
    local negotiated=no killed=no restarted=no
    if await "$name" "$QEMU_LOG" VUBD-PACKED-RESET-READY "$BOOT_TIMEOUT"; then
        qmp "$q" x-query-virtio-status '{"path":"/machine/peripheral/disk0/virtio-backend"}' \
            >"$WORK/packed.status.json" 2>&1 || true
        # the features the driver acked (guest-features), not the ones offered (host-features)
        python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
sys.exit(0 if any("VIRTIO_F_RING_PACKED" in f for f in d["guest-features"]["transports"]) else 1)' \
            "$WORK/packed.status.json" 2>>"$WORK/packed.qemu.log" && negotiated=yes
        qmp "$q" system_reset >/dev/null || why=system_reset
    else
        why=guest_not_ready_for_reset
    fi
    if [ -z "$why" ] && await "$name" "$QEMU_LOG" VUBD-PACKED-FIO-STARTED "$BOOT_TIMEOUT"; then
        sleep "$kill_after"
        if kill -0 "$QEMU_PID" 2>/dev/null && kill -KILL "$VUBD_PID" 2>/dev/null; then
            killed=yes
            wait "$VUBD_PID" 2>/dev/null || true
            forget_pid "$VUBD_PID"
            log "packed: vubd SIGKILLed ${kill_after} s into fio; starting it again"
            sleep 1
            start_vubd "$name" "${vargs[@]}" && restarted=yes
        fi
    fi
    wait_qemu
    check_run "$name" || rc=1
    grep -aq 'VUBD-RESULT test=packed status=PASS stage=1' "$QEMU_LOG" || why="$why${why:+,}stage1_not_passed"
    grep -aq 'VUBD-RESULT test=packed status=PASS stage=2' "$QEMU_LOG" || why="$why${why:+,}stage2_not_passed"
    [ $negotiated = yes ] || why="$why${why:+,}qemu_does_not_report_packed"
    [ $killed = yes ] && [ $restarted = yes ] || why="$why${why:+,}no_restart"
    grep -aq 'stopped at packed avail' "$WORK/$name.vubd.log" || why="$why${why:+,}vubd_ran_no_packed_ring"
    # The restarted vubd found the killed one's packed inflight record usable (its ring
    # positions come from there: QEMU cannot read a packed ring's avail index back).
    grep -aqE 'inflight record unusable|not covered by the inflight region' "$WORK/$name.vubd.log" &&
        why="$why${why:+,}inflight_record_refused"
    local resubmitted
    resubmitted=$(grep -ao 'resubmitting [0-9]* in-flight' "$WORK/$name.vubd.log" | awk '{s += $2} END {print s + 0}')
    local st=PASS
    [ -z "$why" ] || st=FAIL
    echo "VUBD-RESULT test=$name-host status=$st packed_negotiated=$negotiated killed=$killed restarted=$restarted resubmitted_requests=$resubmitted ${why:+reason=$why}"
    [ $st = PASS ] || rc=1
    if [ $restarted = yes ]; then
        finish_vubd $name || rc=1
    fi
    return $rc
}

test_qemukill() {
    local name=qemukill img=$WORK/qemukill.img rc=0 why="" r=$WORK/qk-rpc.sock
    truncate -s "$DISK_SIZE" "$img"
    start_vubd "$name" --blk-file "$img" --num-queues 2 --serial "$SERIAL" --rpc-socket "$r" || {
        host_fail $name vubd_start
        return 1
    }
    local fds0 maps0 fds1="" maps1="" list="" stat=""
    fds0=$(find "/proc/$VUBD_PID/fd" -mindepth 1 | wc -l)
    maps0=$(grep -c 'memfd:' "/proc/$VUBD_PID/maps" || true)
    # shellcheck disable=SC2046
    start_qemu qemukill-1 "vubd.test=qemukill vubd.fio_secs=60" $(vhost_args "$SOCK" 2)
    if await qemukill-1 "$QEMU_LOG" VUBD-FIO-STARTED "$BOOT_TIMEOUT" "$name"; then
        sleep 4
        local busy
        busy=$(grep -c 'memfd:' "/proc/$VUBD_PID/maps" || true)
        [ "$busy" -gt "$maps0" ] || why=guest_memory_not_mapped
        kill -KILL -- "-$QEMU_PID" 2>/dev/null || why="$why${why:+,}kill"
        wait "$QEMU_PID" 2>/dev/null || true
        forget_pid "$QEMU_PID"
        local freed=no
        for _ in $(seq 100); do
            fds1=$(find "/proc/$VUBD_PID/fd" -mindepth 1 | wc -l)
            maps1=$(grep -c 'memfd:' "/proc/$VUBD_PID/maps" || true)
            list=$(rpc "$r" '{"jsonrpc":"2.0","id":1,"method":"device_list"}')
            stat=$(rpc "$r" '{"jsonrpc":"2.0","id":2,"method":"iostat"}')
            if [ "$fds1" -eq "$fds0" ] && [ "$maps1" -eq "$maps0" ] &&
                echo "$list" | grep -q '"connected":false' && echo "$stat" | grep -q '"in-flight":0'; then
                freed=yes
                break
            fi
            sleep 0.2
        done
        [ $freed = yes ] || why="$why${why:+,}not_freed:fds_${fds0}_to_${fds1},memfd_maps_${maps0}_to_${maps1}"
    else
        why=guest_did_not_start_fio
    fi
    echo "VUBD-RESULT test=$name-host status=$([ -z "$why" ] && echo PASS || echo FAIL) fds_before=$fds0 fds_after=$fds1 memfd_maps_before=$maps0 memfd_maps_after=$maps1 ${why:+reason=$why}"
    [ -z "$why" ] || rc=1
    # A new QEMU on the same socket: fio with verify for a few seconds.
    # shellcheck disable=SC2046
    start_qemu "$name" "vubd.test=qemukill vubd.fio_secs=5" $(vhost_args "$SOCK" 2)
    wait_qemu
    check_run "$name" || rc=1
    finish_vubd $name || rc=1
    return $rc
}

# --- run -----------------------------------------------------------------------------------
log "vubd $VUBD, accel $ACCEL, tests: ${tests[*]}"
run_tests "vubd guest tests" "${tests[@]}"
