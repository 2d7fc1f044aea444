#!/usr/bin/env bash
# Many devices on one reactor: one vubd process, one reactor (-m on the last CPU), N RAM
# devices (64 MiB, one queue each) from a generated --config file. Devices 1..N-1 each get an
# attached but idle libblkio client (vubd-bench --hold: one process per device, since
# vhost-user needs the client's memory shared with the server); device 0 gets a busy client
# measuring 4 KiB randread at QD1 with a polling client, QD1 with an eventfd client and QD32
# with an eventfd client (IOPS, p50/p99, server CPU per I/O), alternating mode by mode,
# medians of --reps runs. For each N it also records vubd's RSS and open fds (before and
# after the idle clients attach), vubd's CPU while only the idle clients are attached, and
# the idle clients' memory, from which the report derives the cost of one idle device and
# how far N can go on this machine (idle clients within 3 GiB of RSS, vubd's fd limit).
# Server on the last CPU, clients (idle and busy) on CPU 0.
# Writes DIR/many-devices.jsonl, DIR/many-devices.md, DIR/many-devices.png and vubd's logs in
# DIR/many-devices-vubd.log.
#
# Usage: tuning/many-devices.sh [--devices "1 2 8 32 128"] [--seconds S] [--reps R]
#                               [--out DIR] [--quick]
#   --quick: --devices "1 2 8", 1 s x 1 rep unless given (a smoke run of about 20 s)
#   N=1000 works (e.g. --devices "1 1000"): the idle clients take about 2.5 MiB RSS each
#   and vubd needs about 8 fds per attached device; the script raises the soft fd limit
#   to the hard one, which vubd inherits (vubd does not raise its own).
# Full run with the defaults: about 3 minutes (30 s per N plus ~10 ms per idle client).
# VUBD_NO_BUILD=1 skips the cargo build (see lib.sh).
set -euo pipefail
DEVICES=""
SECS=""
REPS=""
OUT=tuning/results
QUICK=0
IDLE_SECS=2
while [ $# -gt 0 ]; do
    case $1 in
        --devices) DEVICES=$2; shift 2 ;;
        --seconds) SECS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ $QUICK = 1 ]; then
    DEVICES=${DEVICES:-1 2 8}; SECS=${SECS:-1}; REPS=${REPS:-1}
fi
DEVICES=${DEVICES:-1 2 8 32 128}
SECS=${SECS:-3}
REPS=${REPS:-3}

# shellcheck source=SCRIPTDIR/lib.sh disable=SC1091
source "$(dirname "$0")/lib.sh"
need_matplotlib
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (server and clients apart)" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)"
mkdir -p "$OUT"
JSONL=$OUT/many-devices.jsonl
: >"$JSONL"
: >"$OUT/many-devices-vubd.log"
WORK=$(mktemp -d /var/tmp/vubd-many.XXXXXX)
VPID=""
HOLD=()
stop_all() {
    if [ ${#HOLD[@]} -gt 0 ]; then kill "${HOLD[@]}" 2>/dev/null || true; wait "${HOLD[@]}" 2>/dev/null || true; fi
    HOLD=()
    if [ -n "$VPID" ]; then kill "$VPID" 2>/dev/null || true; wait "$VPID" 2>/dev/null || true; fi
    VPID=""
}
cleanup() { stop_all; rm -rf "$WORK"; }
trap cleanup EXIT
snapshot_bins "$WORK/bin"
TCK=$(getconf CLK_TCK)
TIMEOUT=$(awk -v s="$SECS" 'BEGIN {printf "%d", s * 3 + 30}')

# Devices under directory $1 with a connected client: accepted Unix sockets carry the path of
# their listening socket in /proc/net/unix (state 03 = connected).
attached_devices() { awk -v d="$1/" '$6 == "03" && index($8, d) == 1 {print $8}' /proc/net/unix | sort -u | wc -l; }
fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 | wc -l; }
alive() { local n=0 p; for p in "$@"; do [ -d "/proc/$p" ] && n=$((n + 1)); done; echo $n; }
mem_sum() { # pids -> "RSS_KiB PSS_KiB" summed
    local p
    for p in "$@"; do cat "/proc/$p/smaps_rollup" 2>/dev/null || true; done |
        awk '/^Rss:/ {r += $2} /^Pss:/ {p += $2} END {printf "%d %d\n", r, p}'
}
now() { date +%s.%N; }
calc() { awk "BEGIN {printf \"%.3f\", $1}"; }

for n in $DEVICES; do
    dir=$WORK/n$n
    mkdir -p "$dir"
    for i in $(seq 0 $((n - 1))); do
        printf '[[device]]\nname = "d%d"\nsocket-path = "%s/d%d.sock"\nram = "64M"\nnum-queues = 1\n\n' "$i" "$dir" "$i"
    done >"$dir/vubd.toml"
    if [ "$(ulimit -n)" -lt $((n * 12 + 64)) ]; then
        echo "warning: ulimit -n $(ulimit -n) may be too low for $n devices (about 8 fds each)" >&2
    fi
    taskset -c "$SRV_CPU" "$BIN/vubd" --config "$dir/vubd.toml" -m "$SRV_CPU" 2>"$dir/vubd.log" &
    VPID=$!
    for i in $(seq 0 $((n - 1))); do
        (wait_sock "$dir/d$i.sock") || { tail -5 "$dir/vubd.log" >&2; exit 1; }
    done
    read -r rss0 fds0 <<<"$(rss_fds "$VPID")"
    nofile=$(awk '/^Max open files/ {print $4}' "/proc/$VPID/limits")

    # The idle clients: attach them all, then wait until every idle device has a connected
    # client and vubd's fd count has settled (the queues' eventfds come after the connection).
    t0=$(now)
    for i in $(seq 1 $((n - 1))); do
        taskset -c "$CLI_CPU" "$BIN/vubd-bench" --socket "$dir/d$i.sock" --hold --seconds 86400 \
            >/dev/null 2>>"$dir/hold.err" &
        HOLD+=($!)
    done
    deadline=$(( $(date +%s) + 30 + n / 10 ))
    while [ "$(attached_devices "$dir")" -lt $((n - 1)) ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
    prev=-1
    while [ "$(date +%s)" -lt "$deadline" ]; do
        cur=$(fd_count "$VPID")
        [ "$cur" = "$prev" ] && break
        prev=$cur
        sleep 0.3
    done
    attach_s=$(calc "$(now) - $t0")
    attached=$(attached_devices "$dir")
    held=$(alive "${HOLD[@]}")
    [ "$attached" -ge $((n - 1)) ] ||
        echo "warning: N=$n: $attached of $((n - 1)) idle clients attached ($held alive); see $dir/hold.err" >&2
    sleep 1
    read -r rss1 fds1 <<<"$(rss_fds "$VPID")"
    c0=$(cpu_ticks "$VPID")
    sleep "$IDLE_SECS"
    c1=$(cpu_ticks "$VPID")
    read -r hold_rss hold_pss <<<"$(mem_sum "${HOLD[@]}")"
    printf '{"kind":"idle","n":%d,"vubd_rss_kib_unattached":%d,"vubd_fds_unattached":%d,"vubd_rss_kib":%d,"vubd_fds":%d,"vubd_nofile":"%s","idle_cpu_pct":%s,"idle_clients":%d,"idle_clients_attached":%d,"idle_clients_alive":%d,"idle_clients_rss_kib":%d,"idle_clients_pss_kib":%d,"attach_s":%.2f}\n' \
        "$n" "$rss0" "$fds0" "$rss1" "$fds1" "$nofile" "$(calc "100 * ($c1 - $c0) / $TCK / $IDLE_SECS")" \
        $((n - 1)) "$attached" "$held" "$hold_rss" "$hold_pss" "$attach_s" >>"$JSONL"
    echo "N=$n: vubd RSS $((rss1 / 1024)) MiB, $fds1 fds; $held idle clients ($((hold_rss / 1024)) MiB RSS) attached in ${attach_s} s" >&2

    for rep in $(seq "$REPS"); do
        for mode in qd1-poll qd1-fd qd32-fd; do
            qd=${mode%-*}
            args=(--socket "$dir/d0.sock" --rw randread --bs 4096 --iodepth "${qd#qd}" --seconds "$SECS"
                --server-pid "$VPID" --json)
            [ "${mode#*-}" = poll ] && args+=(--poll)
            if line=$(timeout "$TIMEOUT" taskset -c "$CLI_CPU" "$BIN/vubd-bench" "${args[@]}" 2>>"$dir/busy.err"); then
                echo "{\"kind\":\"busy\",\"n\":$n,\"mode\":\"$mode\",\"rep\":$rep,${line#\{}" >>"$JSONL"
            else
                echo "run failed: N=$n $mode rep $rep: $(tail -1 "$dir/busy.err")" >&2
                echo "{\"kind\":\"busy\",\"n\":$n,\"mode\":\"$mode\",\"rep\":$rep,\"failed\":true}" >>"$JSONL"
            fi
        done
    done
    stop_all
    { echo "=== N=$n"; cat "$dir/vubd.log"; } >>"$OUT/many-devices-vubd.log"
done

{
    echo "# Many devices on one reactor"
    echo
    echo "Command: \`tuning/many-devices.sh --devices \"$DEVICES\" --seconds $SECS --reps $REPS\`"
    echo "vubd $(vubd_version); host: $(nproc) CPUs, kernel $(uname -r), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo);" \
        "server CPU $SRV_CPU (one reactor), clients CPU $CLI_CPU; date $(date -u +%F)"
    echo "Devices: RAM 64 MiB, num-queues 1; idle clients: \`vubd-bench --hold\`; busy client on device 0:" \
        "4 KiB randread, medians of $REPS runs of $SECS s; idle CPU over $IDLE_SECS s."
    echo
} >"$OUT/many-devices.md"
"$PY" tuning/many_devices_report.py "$JSONL" "$OUT" >>"$OUT/many-devices.md"
cat "$OUT/many-devices.md"
