#!/usr/bin/env bash
# The NBD backend side by side with qemu-storage-daemon's NBD client (`driver=nbd`): both
# front the same NBD server and are driven by the same libblkio client (vubd-bench), 4 KiB
# randread and randwrite at QD1 and QD32.
#
# Placement (2 CPUs): the server under test (vubd's reactor, or QSD) on the last CPU; the
# client and the NBD server behind it on CPU 0. The NBD server is `nbdkit memory` (an
# in-memory export, so the figures are the two clients' overheads plus one local socket hop),
# or qemu-nbd on a tmpfs file with `--nbd-server qemu-nbd`.
#
# The export is filled with data first (nbdcopy from nbdkit's pattern plugin), so no server
# pays for the NBD server's first writes to a region. Servers take turns run by run (vubd in
# its default adaptive mode, vubd --poll-mode interrupt, and qsd-main, qsd-iothread,
# qsd-iothread-nopoll: the configurations of shared/notes/qsd-configs.md; QSD's best one
# differs per cell), the order rotating every round, each started fresh for its run, so only
# one exists at a time. Each figure is the median of RUNS runs of SECS seconds; the table
# gives both vubd modes, QSD's best configuration for the cell, and the ratios.
#
# Usage: tuning/nbd-bench.sh [--seconds S] [--runs R] [--nbd-server nbdkit|qemu-nbd] [--out FILE]
set -euo pipefail
SECS=3
RUNS=3
NBD=nbdkit
OUTFILE=""
while [ $# -gt 0 ]; do
    case $1 in
        --seconds) SECS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --nbd-server) NBD=$2; shift 2 ;;
        --out) OUTFILE=$2; shift 2 ;;
        *) echo "usage: $0 [--seconds S] [--runs R] [--nbd-server nbdkit|qemu-nbd] [--out FILE]" >&2; exit 2 ;;
    esac
done
source "$(dirname "$0")/lib.sh"
need_qsd
for tool in "$NBD" nbdkit nbdcopy; do
    command -v "$tool" >/dev/null ||
        { echo "$tool is not installed (apt-get install nbdkit libnbd-bin qemu-utils)" >&2; exit 1; }
done

WORK=$(mktemp -d /var/tmp/vubd-nbd-bench.XXXXXX)
SHM=$(mktemp -d /dev/shm/vubd-nbd-bench.XXXXXX)
PID=""
NBD_PID=""
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null
    [ -n "$NBD_PID" ] && kill "$NBD_PID" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$WORK" "$SHM"
}
trap cleanup EXIT
snapshot_bins "$WORK/bin"

NBD_SOCK=$WORK/nbd.sock
case $NBD in
    nbdkit)
        taskset -c "$CLI_CPU" nbdkit -f -U "$NBD_SOCK" memory size=1G 2>"$WORK/nbd.log" &
        ;;
    qemu-nbd)
        truncate -s 1G "$SHM/disk.img"
        taskset -c "$CLI_CPU" qemu-nbd --persistent --shared=8 --format=raw --cache=writeback \
            --aio=io_uring --socket="$NBD_SOCK" "$SHM/disk.img" 2>"$WORK/nbd.log" &
        ;;
    *) echo "--nbd-server must be nbdkit or qemu-nbd" >&2; exit 2 ;;
esac
NBD_PID=$!
wait_sock "$NBD_SOCK"
URI="nbd+unix:///?socket=$NBD_SOCK"
# Every block written once (non-zero data), before any measurement.
taskset -c "$CLI_CPU" nbdcopy -- [ nbdkit pattern size=1G ] "$URI"

start_server() { # server -> PID, SOCK
    local server=$1 iothread=() export_extra=""
    SOCK=$WORK/$server.sock
    rm -f "$SOCK"
    case $server in
        vubd)
            taskset -c "$SRV_CPU" "$BIN/vubd" --socket-path "$SOCK" --nbd "$URI" --num-queues 1 \
                -m "$SRV_CPU" 2>>"$WORK/vubd.log" &
            ;;
        vubd-interrupt)
            taskset -c "$SRV_CPU" "$BIN/vubd" --socket-path "$SOCK" --nbd "$URI" --num-queues 1 \
                -m "$SRV_CPU" --poll-mode interrupt 2>>"$WORK/vubd.log" &
            ;;
        qsd-*)
            case $server in
                qsd-iothread) iothread=(--object "iothread,id=io0"); export_extra=,iothread=io0 ;;
                qsd-iothread-nopoll) iothread=(--object "iothread,id=io0,poll-max-ns=0"); export_extra=,iothread=io0 ;;
            esac
            taskset -c "$SRV_CPU" qemu-storage-daemon \
                --blockdev "driver=nbd,node-name=n0,server.type=unix,server.path=$NBD_SOCK" \
                "${iothread[@]}" \
                --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1$export_extra" \
                2>>"$WORK/qsd.log" &
            ;;
    esac
    PID=$!
    wait_sock "$SOCK"
}

stop_server() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; }

SERVERS=(vubd vubd-interrupt qsd-main qsd-iothread qsd-iothread-nopoll)
declare -A LINES=()
for rw in randread randwrite; do
    for qd in 1 32; do
        for round in $(seq "$RUNS"); do
            for k in $(seq 0 $((${#SERVERS[@]} - 1))); do
                server=${SERVERS[(round + k) % ${#SERVERS[@]}]}
                start_server "$server"
                line=$(taskset -c "$CLI_CPU" "$BIN/vubd-bench" --socket "$SOCK" --rw "$rw" --bs 4096 \
                    --iodepth "$qd" --seconds "$SECS" --server-pid "$PID" --json)
                stop_server
                LINES[$rw/$qd/$server]+="$line"$'\n'
            done
        done
    done
done

median_of() { # key field
    printf '%s' "${LINES[$1]}" | python3 -c "
import json, sys
v = sorted(json.loads(l)['$2'] or 0 for l in sys.stdin if l.strip())
print(v[(len(v) - 1) // 2])"
}

{
    echo "NBD server: $NBD (CPU $CLI_CPU, with the client); vubd $(vubd_version); $(qemu-storage-daemon --version | head -1)"
    echo "Command: tuning/nbd-bench.sh --seconds $SECS --runs $RUNS --nbd-server $NBD (medians of $RUNS runs of ${SECS}s)"
    echo
    echo "| cell | server | IOPS | p50 us | p99 us | server CPU us/IO | IOPS vs best QSD | p50 vs best QSD |"
    echo "|---|---|---|---|---|---|---|---|"
    for rw in randread randwrite; do
        for qd in 1 32; do
            best="" best_iops=0
            for server in "${SERVERS[@]:2}"; do
                iops=$(median_of "$rw/$qd/$server" iops)
                if python3 -c "import sys; sys.exit(0 if $iops > $best_iops else 1)"; then
                    best=$server best_iops=$iops
                fi
            done
            for server in vubd vubd-interrupt "$best"; do
                k=$rw/$qd/$server
                python3 - "$rw QD$qd" "$server" "$(median_of "$k" iops)" "$(median_of "$k" lat_p50_us)" \
                    "$(median_of "$k" lat_p99_us)" "$(median_of "$k" server_cpu_us_per_io)" \
                    "$best_iops" "$(median_of "$rw/$qd/$best" lat_p50_us)" <<'EOF'
import sys
c, s, i, p50, p99, cpu, bi, b50 = sys.argv[1:]
f = float
label = s if s.startswith("vubd") else s + " (best QSD)"
print(f"| {c} | {label} | {f(i):.0f} | {f(p50):.1f} | {f(p99):.1f} | {f(cpu):.2f} | "
      f"{f(i) / f(bi):.2f}x | {f(p50) / f(b50):.2f}x |")
EOF
            done
        done
    done
} | tee "${OUTFILE:-/dev/null}"
