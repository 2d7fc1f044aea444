#!/usr/bin/env bash
# Side-by-side: vubd and qemu-storage-daemon (QSD) serving the same kind of backend to the
# same libblkio client (vubd-bench), alternating run by run, in one invocation.
#   backends: null (QSD null-co), a file on tmpfs, a file on the real disk with O_DIRECT
#             (QSD aio=io_uring,cache.direct=on)
#   load:     4 KiB randread and randwrite, QD1 and QD32, 1 and 2 queues, client with and
#             without completion polling
# Both servers get the same CPU (the last one), the client another (CPU 0). vubd runs in
# its default adaptive mode; QSD with an iothread. Each figure is the median of --reps runs.
# Writes DIR/runs.jsonl, DIR/results.md (every figure for both servers and the ratio) and
# DIR/compare.png (IOPS and p50/p99 latency).
#
# Usage: tuning/compare.sh [--seconds S] [--reps R] [--out DIR] [--quick]
#   --quick: null backend, randread, 1 queue only (a 1-minute smoke run)
set -euo pipefail
SECS=3
REPS=3
OUT=tuning/results
QUICK=0
while [ $# -gt 0 ]; do
    case $1 in
        --seconds) SECS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

# What the comparison needs, installed if missing (as root on Debian).
if ! command -v qemu-storage-daemon >/dev/null; then
    echo "installing qemu-storage-daemon from bookworm-backports" >&2
    grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ ||
        echo "deb http://deb.debian.org/debian bookworm-backports main" >/etc/apt/sources.list.d/backports.list
    apt-get update -qq && apt-get install -y -qq -t bookworm-backports qemu-system-common qemu-utils >/dev/null
fi
python3 -c "import matplotlib" 2>/dev/null || pip install -q matplotlib

source "$(dirname "$0")/lib.sh"
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (server and client apart)" >&2; exit 1; }
mkdir -p "$OUT"
RUNS=$OUT/runs.jsonl
: >"$RUNS"
WORK=$(mktemp -d /var/tmp/vubd-compare.XXXXXX)
SHM=$(mktemp -d /dev/shm/vubd-compare.XXXXXX)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK" "$SHM"; }
trap cleanup EXIT

start_servers() { # backend -> sets VUBD_PID, QSD_PID
    local backend=$1 vubd_backend qsd_dev
    case $backend in
        null)
            vubd_backend=(--null 1G)
            qsd_dev=(--blockdev driver=null-co,node-name=d0,size=1073741824,read-zeroes=on) ;;
        tmpfs)
            dd if=/dev/zero of="$SHM/disk.img" bs=1M count=1024 status=none
            vubd_backend=(--blk-file "$SHM/disk.img" --buffered)
            qsd_dev=(--blockdev driver=file,node-name=d0,filename="$SHM/disk.img",aio=io_uring,cache.direct=off) ;;
        disk)
            [ -f "$WORK/disk.img" ] || dd if=/dev/zero of="$WORK/disk.img" bs=1M count=1024 oflag=direct status=none
            vubd_backend=(--blk-file "$WORK/disk.img")
            qsd_dev=(--blockdev driver=file,node-name=d0,filename="$WORK/disk.img",aio=io_uring,cache.direct=on) ;;
    esac
    rm -f "$WORK/vubd.sock" "$WORK/qsd.sock"
    taskset -c $SRV_CPU "$BIN/vubd" --socket-path "$WORK/vubd.sock" "${vubd_backend[@]}" \
        --num-queues 2 -m $SRV_CPU 2>>"$OUT/vubd.log" &
    VUBD_PID=$!
    taskset -c $SRV_CPU qemu-storage-daemon "${qsd_dev[@]}" --object iothread,id=io0 \
        --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path="$WORK/qsd.sock",writable=on,num-queues=2,iothread=io0 \
        2>>"$OUT/qsd.log" &
    QSD_PID=$!
    PIDS=("$VUBD_PID" "$QSD_PID")
    wait_sock "$WORK/vubd.sock"
    wait_sock "$WORK/qsd.sock"
}

stop_servers() {
    kill "${PIDS[@]}" 2>/dev/null || true
    wait "${PIDS[@]}" 2>/dev/null || true
    PIDS=()
}

run_one() { # server backend rw qd queues poll
    local server=$1 backend=$2 rw=$3 qd=$4 queues=$5 poll=$6 sock pid
    if [ "$server" = vubd ]; then sock=$WORK/vubd.sock pid=$VUBD_PID; else sock=$WORK/qsd.sock pid=$QSD_PID; fi
    local args=(--socket "$sock" --rw "$rw" --bs 4096 --iodepth "$qd" --queues "$queues"
        --seconds "$SECS" --server-pid "$pid" --json)
    [ "$poll" = yes ] && args+=(--poll)
    local line
    line=$(taskset -c $CLI_CPU "$BIN/vubd-bench" "${args[@]}") || { echo "run failed: $server ${args[*]}" >&2; exit 1; }
    echo "{\"server\":\"$server\",\"backend\":\"$backend\",${line#\{}" >>"$RUNS"
}

BACKENDS=(null tmpfs disk); RWS=(randread randwrite); QUEUES=(1 2)
[ $QUICK = 1 ] && { BACKENDS=(null); RWS=(randread); QUEUES=(1); }
echo "compare: ${#BACKENDS[@]} backends, $SECS s x $REPS reps per figure; results in $OUT" >&2
for backend in "${BACKENDS[@]}"; do
    start_servers "$backend"
    for rw in "${RWS[@]}"; do
        for qd in 1 32; do
            for queues in "${QUEUES[@]}"; do
                for poll in no yes; do
                    for _ in $(seq "$REPS"); do
                        run_one vubd "$backend" "$rw" "$qd" "$queues" $poll
                        run_one qsd "$backend" "$rw" "$qd" "$queues" $poll
                    done
                    echo "  $backend $rw qd$qd q$queues poll=$poll done" >&2
                done
            done
        done
    done
    stop_servers
done
{
    echo "Command: \`tuning/compare.sh --seconds $SECS --reps $REPS\`"
    echo "Host: $(nproc) CPUs, kernel $(uname -r), $(qemu-storage-daemon --version | head -1)"
    echo "Server CPU $SRV_CPU, client CPU $CLI_CPU, date $(date -u +%F)"
    echo
} >"$OUT/results.md"
python3 tuning/compare_report.py "$RUNS" "$OUT" >>"$OUT/results.md"
cat "$OUT/results.md"
