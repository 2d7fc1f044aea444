#!/usr/bin/env bash
# Huge pages for the RAM disk: the same 1 GiB RAM disk on 4 KiB pages and on 2 MiB huge
# pages (reserved here through /proc/sys/vm/nr_hugepages; needs root), preconditioned by a
# full sequential write, then 4 KiB random reads and writes at QD32 and 64 KiB reads.
# Server on the last CPU, client on CPU 0; medians of $REPS runs. Restores nr_hugepages.
# Usage: tuning/hugepages.sh [seconds=5] [reps=3]
set -euo pipefail
SECS=${1:-5}
REPS=${2:-3}
source "$(dirname "$0")/lib.sh"
SRV=$SRV_CPU
DIR=$(mktemp -d)
OLD=$(cat /proc/sys/vm/nr_hugepages)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; echo "$OLD" >/proc/sys/vm/nr_hugepages; rm -rf "$DIR"' EXIT

echo "| RAM disk pages | load | IOPS | MiB/s | p50 µs | p99 µs |"
echo "|---|---|---|---|---|---|"
for pages in normal huge; do
    if [ $pages = huge ]; then echo 520 >/proc/sys/vm/nr_hugepages; else echo 0 >/proc/sys/vm/nr_hugepages; fi
    rm -f "$DIR/s.sock"
    taskset -c $SRV "$BIN/vubd" --socket-path "$DIR/s.sock" --ram 1G -m $SRV 2>"$DIR/vubd-$pages.log" &
    PID=$!
    wait_sock "$DIR/s.sock"
    grep -q "on huge pages" "$DIR/vubd-$pages.log" && [ $pages = normal ] && { echo "unexpected huge pages" >&2; exit 1; }
    grep -o "RAM disk.*" "$DIR/vubd-$pages.log" >&2
    taskset -c 0 "$BIN/vubd-bench" --socket "$DIR/s.sock" --rw write --bs 1048576 --iodepth 4 --seconds 2 --json >/dev/null
    for load in "randread 4096 32" "randwrite 4096 32" "randread 65536 8"; do
        set -- $load
        runs=()
        for _ in $(seq "$REPS"); do
            runs+=("$(taskset -c 0 "$BIN/vubd-bench" --socket "$DIR/s.sock" --rw "$1" --bs "$2" --iodepth "$3" --seconds "$SECS" --json)")
        done
        pick() { json_median "$1" "${runs[@]}"; }
        printf '| %s | %s bs=%s QD%s | %.0f | %.0f | %.2f | %.2f |\n' $pages "$1" "$2" "$3" \
            "$(pick iops)" "$(pick mib_s)" "$(pick lat_p50_us)" "$(pick lat_p99_us)"
    done
    kill $PID; wait $PID 2>/dev/null || true
done
