#!/usr/bin/env bash
# A/B: two vubd builds side by side under the same libblkio client (vubd-bench), alternating
# run by run in one invocation, on the null, tmpfs and O_DIRECT disk backends. For a change
# that must not cost performance (a refactor), or one that should gain some.
# Server on the last CPU, client on CPU 0; 4 KiB random reads; medians of --reps runs.
#
# Usage: tuning/ab.sh --a OLD_VUBD --b NEW_VUBD [--seconds S] [--reps R] [--out FILE.md]
#                     [--cells "null 1 fd,disk 32 fd"]   (backend QD fd|poll; default: all)
#   Build the old one from a worktree, e.g.
#     git worktree add /var/tmp/vubd-old HEAD~1 && cargo build --release \
#         --manifest-path /var/tmp/vubd-old/Cargo.toml
set -euo pipefail
SECS=3
REPS=5
A=""
B=""
OUT=""
CELLS=""
while [ $# -gt 0 ]; do
    case $1 in
        --a) A=$2; shift 2 ;;
        --b) B=$2; shift 2 ;;
        --seconds) SECS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --cells) CELLS=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -x "$A" ] && [ -x "$B" ] || { echo "usage: $0 --a OLD_VUBD --b NEW_VUBD" >&2; exit 2; }
source "$(dirname "$0")/lib.sh"
WORK=$(mktemp -d /var/tmp/vubd-ab.XXXXXX)
SHM=$(mktemp -d /dev/shm/vubd-ab.XXXXXX)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK" "$SHM"; }
trap cleanup EXIT
dd if=/dev/zero of="$SHM/disk.img" bs=1M count=1024 status=none

start() { # which backend -> sets PID, SOCK
    local bin=$1 backend=$2 args
    case $backend in
        null) args=(--null 1G) ;;
        tmpfs) args=(--blk-file "$SHM/disk.img" --buffered) ;;
        disk) args=(--blk-file "$WORK/disk.img") ;;
    esac
    SOCK=$WORK/$RANDOM.sock
    taskset -c "$SRV_CPU" "$bin" --socket-path "$SOCK" "${args[@]}" -m "$SRV_CPU" 2>>"$WORK/vubd.log" &
    PID=$!
    PIDS+=("$PID")
    wait_sock "$SOCK"
}

declare -A RES=()
cells=("null 1 fd" "null 1 poll" "null 32 fd" "null 32 poll" "tmpfs 32 fd" "tmpfs 1 poll" "disk 32 fd" "disk 1 fd")
[ -n "$CELLS" ] && IFS=, read -r -a cells <<<"$CELLS"
for cell in "${cells[@]}"; do
    read -r backend qd mode <<<"$cell"
    poll=()
    [ "$mode" = poll ] && poll=(--poll)
    if [ "$backend" = disk ]; then
        fresh_disk_image "$WORK/disk.img"
    fi
    for rep in $(seq "$REPS"); do
        for side in a b; do
            bin=$A
            [ $side = b ] && bin=$B
            start "$bin" "$backend"
            line=$(taskset -c "$CLI_CPU" "$BIN/vubd-bench" --socket "$SOCK" --rw randread --bs 4096 \
                --iodepth "$qd" --seconds "$SECS" --server-pid "$PID" --json "${poll[@]}")
            kill "$PID"
            wait "$PID" 2>/dev/null || true
            RES["$cell|$side"]+="$line"$'\n'
            echo "$cell rep $rep $side: $line" >&2
        done
    done
done

field() { # cell side field -> median
    local lines
    mapfile -t lines < <(printf '%s' "${RES[$1|$2]}")
    json_median "$3" "${lines[@]}"
}
{
    echo "A: $A"
    echo "B: $B"
    echo
    echo "| cell | IOPS A | IOPS B | B/A | p50 us A | p50 us B | p99 us A | p99 us B | server us/IO A | server us/IO B | B/A |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    for cell in "${cells[@]}"; do
        ia=$(field "$cell" a iops); ib=$(field "$cell" b iops)
        pa=$(field "$cell" a lat_p50_us); pb=$(field "$cell" b lat_p50_us)
        qa=$(field "$cell" a lat_p99_us); qb=$(field "$cell" b lat_p99_us)
        ca=$(field "$cell" a server_cpu_us_per_io); cb=$(field "$cell" b server_cpu_us_per_io)
        awk -v c="$cell" -v ia="$ia" -v ib="$ib" -v pa="$pa" -v pb="$pb" -v qa="$qa" -v qb="$qb" \
            -v ca="$ca" -v cb="$cb" 'BEGIN {
            printf "| %s | %.0f | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n",
                c, ia, ib, ib / ia, pa, pb, qa, qb, ca, cb, (ca > 0 ? cb / ca : 0) }'
    done
    echo
    echo "Medians of $REPS runs of ${SECS} s, A and B alternating; 4 KiB randread; server on CPU $SRV_CPU, client on CPU $CLI_CPU."
} | if [ -n "$OUT" ]; then tee "$OUT"; else cat; fi
