#!/usr/bin/env bash
# Adaptive polling, measured: idle CPU of vubd with an attached but idle libblkio frontend,
# and QD1 latency/CPU in each poll mode (poll, adaptive with several --idle-spin-us,
# interrupt). Server on the last CPU, client on CPU 0, null disk, 4 KiB random reads.
# Usage: tuning/adaptive.sh [seconds=5] [reps=3]
set -euo pipefail
SECS=${1:-5}
REPS=${2:-3}
source "$(dirname "$0")/lib.sh"
SRV=$SRV_CPU
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT

start() { # mode spin
    rm -f "$DIR/s.sock"
    taskset -c $SRV "$BIN/vubd" --socket-path "$DIR/s.sock" --null 1G -m $SRV \
        --poll-mode "$1" --idle-spin-us "$2" 2>>"$DIR/vubd.log" &
    PID=$!
    wait_sock "$DIR/s.sock"
}

echo "| mode | idle CPU (attached, idle client) | QD1 p50 µs | QD1 p99 µs | QD1 IOPS | server CPU µs/IO |"
echo "|---|---|---|---|---|---|"
for cfg in "poll 50" "adaptive 10" "adaptive 50" "adaptive 200" "interrupt 0"; do
    set -- $cfg
    start "$1" "$2"
    idle=$(taskset -c 0 "$BIN/vubd-bench" --socket "$DIR/s.sock" --hold --seconds "$SECS" --server-pid $PID |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f%%" % (100*d["server_cpu_s"]/d["hold_seconds"]))')
    runs=()
    for _ in $(seq "$REPS"); do
        runs+=("$(taskset -c 0 "$BIN/vubd-bench" --socket "$DIR/s.sock" --rw randread --iodepth 1 \
            --seconds "$SECS" --server-pid $PID --json)")
    done
    pick() { json_median "$1" "${runs[@]}"; }
    printf '| %s | %s | %.2f | %.2f | %.0f | %.2f |\n' "$1 (spin ${2} µs)" "$idle" \
        "$(pick lat_p50_us)" "$(pick lat_p99_us)" "$(pick iops)" "$(pick server_cpu_us_per_io)"
    kill $PID; wait $PID 2>/dev/null || true
done
