#!/usr/bin/env bash
# Quick side-by-side: vubd (RAM and null disks) and qemu-storage-daemon (null-co) under the
# same libblkio client, 4 KiB random reads, QD1 and QD32, with and without client polling.
# Server pinned to the last CPU, client to CPU 0. Each figure is the median of $RUNS runs.
# Usage: tuning/quick-bench.sh [seconds-per-run] [runs]
set -euo pipefail
SECS=${1:-5}
RUNS=${2:-3}
source "$(dirname "$0")/lib.sh"
LAST=$SRV_CPU
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT

run() { # label socket qd [--poll]
    local label=$1 sock=$2 qd=$3 poll=${4:-}
    local vals=()
    for _ in $(seq "$RUNS"); do
        vals+=("$(taskset -c 0 $BIN/vubd-bench --socket "$sock" --rw randread --bs 4096 \
            --iodepth "$qd" --seconds "$SECS" $poll | tail -1 |
            python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.0f %.2f" % (d["iops"], d["lat_mean_us"]))')")
    done
    printf '%s\n' "${vals[@]}" | sort -n | awk -v l="$label" -v q="$qd" -v p="${poll:+poll}" \
        '{a[NR]=$0} END {split(a[int((NR+1)/2)], m, " "); printf "| %s | QD%s %s | %d | %.2f |\n", l, q, p, m[1], m[2]}'
}

taskset -c "$LAST" $BIN/vubd --socket-path "$DIR/ram.sock" --ram 1G -m "$LAST" 2>"$DIR/vubd-ram.log" &
taskset -c "$LAST" $BIN/vubd --socket-path "$DIR/null.sock" --null 1G -m "$LAST" 2>"$DIR/vubd-null.log" &
taskset -c "$LAST" qemu-storage-daemon \
    --blockdev driver=null-co,node-name=n0,size=1073741824,read-zeroes=on \
    --object iothread,id=io0 \
    --export type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path="$DIR/qsd.sock",writable=on,iothread=io0 \
    2>"$DIR/qsd.log" &
wait_sock "$DIR/ram.sock"; wait_sock "$DIR/null.sock"; wait_sock "$DIR/qsd.sock"

echo "| server | load | IOPS (median of $RUNS x ${SECS}s) | mean latency us |"
echo "|---|---|---|---|"
for qd in 1 32; do
    for poll in "" --poll; do
        run "vubd ram" "$DIR/ram.sock" $qd $poll
        run "vubd null" "$DIR/null.sock" $qd $poll
        run "qsd null-co" "$DIR/qsd.sock" $qd $poll
    done
done
