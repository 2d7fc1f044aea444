#!/usr/bin/env bash
# vubd against qemu-storage-daemon's (QSD) best configuration per cell, under the same
# libblkio client (vubd-bench), in one invocation.
#   backends: null (QSD null-co), a 1 GiB file on tmpfs (buffered), a 1 GiB file on the real
#             disk with O_DIRECT (QSD aio=io_uring,cache.direct=on)
#   load:     4 KiB randread and randwrite, QD1 and QD32, 1 and 2 queues, client sleeping on
#             its completion fd ("fd") or polling ("poll")
#   servers:  vubd (default adaptive mode) and QSD in the three configurations of
#             shared/notes/qsd-configs.md: qsd-main (main loop), qsd-iothread (iothread,
#             adaptive polling), qsd-iothread-nopoll (iothread, poll-max-ns=0)
# Every run starts its server fresh (nothing else is running on the server CPU, each run
# gets a new connection and a cold start alike) and stops it after the run. Within a cell
# the runs alternate vubd, qsd-main, qsd-iothread, qsd-iothread-nopoll, then repeat
# --reps times, so drift hits all four alike; figures are medians over the reps. Server
# pinned to the last CPU, client to CPU 0; each server offers exactly the cell's queues.
# The best QSD configuration of a cell is the one with the highest median IOPS.
# Writes DIR/runs.jsonl (one line per run), DIR/results.md (per cell: vubd, best QSD, their
# ratios; every QSD configuration; the goals) and DIR/compare.png (IOPS and p99 per cell).
# DIR/floor.txt (vubd-floor, measured in the run; else tuning/results/floor.txt) holds the
# cross-core floors shown next to the null QD1 polling p50: a cache line's round trip (first
# number on a line) and the ring floor (ring_p50_us=, ring_nodata_p50_us=). They move with
# the VM's vCPU placement, so they are measured right before each rep of the null QD1
# polling cells (one line each, tagged cell= rep=; the report divides each rep's vubd p50
# by the floors measured just before it and gives medians), else once at the end.
#
# Usage: tuning/compare.sh [--seconds S] [--reps R] [--out DIR] [--quick] [--cells FILTER]
#   --cells: comma-separated globs over cell names BACKEND/RW/qdN/qN/CLIENT, e.g.
#            'null/*' or 'tmpfs/randread/qd32/*,disk/*/qd1/q1/poll'
#   --quick: randread, 1 queue, every backend, 1 s x 1 rep unless given (a 1-minute smoke run)
# Full run with the defaults (48 cells x 4 servers x 3 reps x 3 s = 576 runs): 30-35 minutes
# (a run costs its --seconds plus 0.1-0.3 s of server start and stop).
# VUBD_NO_BUILD=1 skips the cargo build (see lib.sh). DISK_HEALTHY_IOPS (30000): a disk
# cell whose check reads slower is marked as measured on a slow disk.
set -euo pipefail
SECS=""
REPS=""
OUT=tuning/results
QUICK=0
CELLS=""
while [ $# -gt 0 ]; do
    case $1 in
        --seconds) SECS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --cells) CELLS=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ $QUICK = 1 ]; then
    SECS=${SECS:-1}; REPS=${REPS:-1}; CELLS=${CELLS:-'*/randread/*/q1/*'}
fi
SECS=${SECS:-3}
REPS=${REPS:-3}
# The run as it can be repeated (--quick spelled out).
ARGS="--seconds $SECS --reps $REPS"
[ -n "$CELLS" ] && ARGS+=" --cells \"$CELLS\""
[ "$OUT" != tuning/results ] && ARGS+=" --out $OUT"

# shellcheck source=SCRIPTDIR/lib.sh disable=SC1091
source "$(dirname "$0")/lib.sh"
need_qsd
need_matplotlib
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (server and client apart)" >&2; exit 1; }
mkdir -p "$OUT"
RUNS=$OUT/runs.jsonl
: >"$RUNS"
: >"$OUT/vubd.log"
: >"$OUT/qsd.log"
: >"$OUT/bench.log"
WORK=$(mktemp -d /var/tmp/vubd-compare.XXXXXX)
SHM=$(mktemp -d /dev/shm/vubd-compare.XXXXXX)
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK" "$SHM"; }
trap cleanup EXIT
snapshot_bins "$WORK/bin"

SERVERS=(vubd qsd-main qsd-iothread qsd-iothread-nopoll)
BACKENDS=(null tmpfs disk)
RWS=(randread randwrite)
QDS=(1 32)
QUEUES=(1 2)
CLIENTS=(fd poll)

selected() { # cell name -> 0 if --cells (or no filter) selects it
    local pat
    [ -z "$CELLS" ] && return 0
    IFS=, read -r -a pats <<<"$CELLS"
    for pat in "${pats[@]}"; do
        # shellcheck disable=SC2053  # the pattern is a glob on purpose
        [[ $1 == $pat ]] && return 0
    done
    return 1
}

declare -a TODO=()
for backend in "${BACKENDS[@]}"; do
    for rw in "${RWS[@]}"; do
        for qd in "${QDS[@]}"; do
            for queues in "${QUEUES[@]}"; do
                for client in "${CLIENTS[@]}"; do
                    cell=$backend/$rw/qd$qd/q$queues/$client
                    selected "$cell" && TODO+=("$cell")
                done
            done
        done
    done
done
[ ${#TODO[@]} -gt 0 ] || { echo "no cell matches --cells '$CELLS'" >&2; exit 2; }

# The tmpfs backing file, made once if a selected cell uses it (the disk image is written
# before each disk cell, by disk_check).
for cell in "${TODO[@]}"; do
    case $cell in
        tmpfs/*) [ -f "$SHM/disk.img" ] || dd if=/dev/zero of="$SHM/disk.img" bs=1M count=1024 status=none ;;
    esac
done

start_server() { # server backend queues -> PID, SOCK; 1 if it does not come up
    local server=$1 backend=$2 queues=$3 vubd_backend qsd_dev iothread=() export_extra=""
    case $backend in
        null)
            vubd_backend=(--null 1G)
            qsd_dev=(--blockdev "driver=null-co,node-name=f0,size=1073741824,read-zeroes=on") ;;
        tmpfs)
            vubd_backend=(--blk-file "$SHM/disk.img" --buffered)
            qsd_dev=(--blockdev "driver=file,node-name=f0,filename=$SHM/disk.img,aio=io_uring,cache.direct=off") ;;
        disk)
            vubd_backend=(--blk-file "$WORK/disk.img")
            qsd_dev=(--blockdev "driver=file,node-name=f0,filename=$WORK/disk.img,aio=io_uring,cache.direct=on") ;;
    esac
    SOCK=$WORK/$server.sock
    rm -f "$SOCK"
    case $server in
        vubd)
            taskset -c "$SRV_CPU" "$BIN/vubd" --socket-path "$SOCK" "${vubd_backend[@]}" \
                --num-queues "$queues" -m "$SRV_CPU" 2>>"$OUT/vubd.log" &
            ;;
        qsd-*)
            case $server in
                qsd-iothread) iothread=(--object "iothread,id=io0"); export_extra=,iothread=io0 ;;
                qsd-iothread-nopoll) iothread=(--object "iothread,id=io0,poll-max-ns=0"); export_extra=,iothread=io0 ;;
            esac
            taskset -c "$SRV_CPU" qemu-storage-daemon "${qsd_dev[@]}" "${iothread[@]}" \
                --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$queues$export_extra" \
                2>>"$OUT/qsd.log" &
            ;;
    esac
    PID=$!
    for _ in $(seq 200); do
        [ -S "$SOCK" ] && return 0
        kill -0 "$PID" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

stop_server() {
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
}

FAILED=0
run_one() { # server cell rep
    local server=$1 cell=$2 rep=$3 backend rw qd queues client line args
    IFS=/ read -r backend rw qd queues client <<<"$cell"
    qd=${qd#qd} queues=${queues#q}
    args=(--socket "$WORK/$server.sock" --rw "$rw" --bs 4096 --iodepth "$qd" --queues "$queues"
        --seconds "$SECS" --json)
    [ "$client" = poll ] && args+=(--poll)
    local tag="\"server\":\"$server\",\"backend\":\"$backend\",\"cell\":\"$cell\",\"rep\":$rep"
    if start_server "$server" "$backend" "$queues" &&
        line=$(timeout "$TIMEOUT" taskset -c "$CLI_CPU" "$BIN/vubd-bench" "${args[@]}" \
            --server-pid "$PID" 2>>"$OUT/bench.log"); then
        echo "{$tag,${line#\{}" >>"$RUNS"
    else
        echo "run failed: $server $cell rep $rep (see $OUT/bench.log, $OUT/vubd.log, $OUT/qsd.log)" >&2
        echo "{$tag,\"failed\":true}" >>"$RUNS"
        FAILED=$((FAILED + 1))
    fi
    stop_server
}

RUN_COUNT=$(( ${#TODO[@]} * ${#SERVERS[@]} * REPS ))
TIMEOUT=$(awk -v s="$SECS" 'BEGIN {printf "%d", s * 3 + 30}')
echo "compare: ${#TODO[@]} cells x ${#SERVERS[@]} servers x $REPS reps of $SECS s = $RUN_COUNT runs," \
    "about $(awk -v n="$RUN_COUNT" -v s="$SECS" 'BEGIN {printf "%d", n * (s + 0.3) / 60 + 1}') min; results in $OUT" >&2
# This project's VM disk reads data written in the last minutes at 50-80 k IOPS (QD32) and
# data written earlier at 1-10 k, with p99 in the tens of milliseconds: a host-side cache,
# it seems (see tuning/README.md). So before each disk cell the image is written again
# (about a second) and the disk checked; every server of the cell then reads a cached
# image alike. A cell whose check is slow compares the disk's stalls, not the servers: the
# results say so.
DISK_CHECKS=()
disk_check() { # cell
    local line iops
    fresh_disk_image "$WORK/disk.img"
    start_server vubd disk 1 || { stop_server; return 0; }
    line=$(timeout 20 taskset -c "$CLI_CPU" "$BIN/vubd-bench" --socket "$WORK/vubd.sock" \
        --iodepth 32 --seconds 1 --poll --json 2>>"$OUT/bench.log") || line=""
    stop_server
    iops=$("$PY" -c 'import json,sys; print(round(json.loads(sys.argv[1])["iops"]))' "$line" 2>/dev/null) || iops=0
    if [ "$iops" -lt "$DISK_HEALTHY_IOPS" ]; then
        DISK_CHECKS+=("$1: $iops (slow)")
        echo "compare: WARNING: the disk check before $1 gave $iops IOPS (below $DISK_HEALTHY_IOPS): this cell measures the disk's stalls" >&2
    else
        DISK_CHECKS+=("$1: $iops")
    fi
}
floor_bin=$BIN/vubd-floor
[ -x "$floor_bin" ] || floor_bin=target/release/vubd-floor
FLOORS=$OUT/floor.txt
: >"$FLOORS"
floor() { # seconds [cell rep]: one line of floors, measured now on the run's two CPUs,
    # tagged with the cell and rep whose vubd run comes next
    local line
    [ -x "$floor_bin" ] || return 0
    line=$("$floor_bin" --cpus "$CLI_CPU,$SRV_CPU" --seconds "$1" 2>>"$OUT/vubd.log") || return 0
    echo "$line${2:+ cell=$2 rep=$3}" >>"$FLOORS"
}
DISK_HEALTHY_IOPS=${DISK_HEALTHY_IOPS:-30000}
STARTED=$(date +%s)
for cell in "${TODO[@]}"; do
    case $cell in disk/*) disk_check "$cell" ;; esac
    for rep in $(seq "$REPS"); do
        case $cell in null/*/qd1/*/poll) floor 1 "$cell" "$rep" ;; esac
        for server in "${SERVERS[@]}"; do
            run_one "$server" "$cell" "$rep"
        done
    done
    echo "  $cell done ($(( $(date +%s) - STARTED )) s)" >&2
done

# No null QD1 polling cell: the floors once, now.
[ -s "$FLOORS" ] || floor 3
FLOOR=""
for f in "$FLOORS" tuning/results/floor.txt; do
    [ -s "$f" ] && { FLOOR=$f; break; }
done
{
    echo "Command: \`tuning/compare.sh $ARGS\` ($RUN_COUNT runs, $FAILED failed, $(( ($(date +%s) - STARTED + 30) / 60 )) min)"
    echo "vubd $(vubd_version); $(qemu-storage-daemon --version | head -1)"
    echo "Host: $(nproc) CPUs, kernel $(uname -r); server CPU $SRV_CPU, client CPU $CLI_CPU; date $(date -u +%F)"
    echo "Every run starts its server fresh; runs alternate vubd, qsd-main, qsd-iothread,"
    echo "qsd-iothread-nopoll within a cell; medians of $REPS runs of $SECS s; 4 KiB requests."
    if [ ${#DISK_CHECKS[@]} -gt 0 ]; then
        echo "Before each disk cell the image was rewritten and read for 1 s (vubd, QD32, polling"
        checks=$(IFS=';'; echo "${DISK_CHECKS[*]}")
        echo "client; IOPS): ${checks//;/; }."
    fi
    echo
} >"$OUT/results.md"
"$PY" tuning/compare_report.py "$RUNS" "$OUT" ${FLOOR:+--floor "$FLOOR"} >>"$OUT/results.md"
cat "$OUT/results.md"
[ "$FAILED" = 0 ] || { echo "$FAILED runs failed" >&2; exit 1; }
