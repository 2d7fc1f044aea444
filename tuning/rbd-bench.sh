#!/usr/bin/env bash
# vubd against qemu-storage-daemon (QSD) fronting the same Ceph RBD image, side by side,
# under the same libblkio client (vubd-bench): 4 KiB randread and randwrite at QD1 and
# QD32, one queue. Both use librbd with the same ceph.conf and its defaults (rbd cache on,
# writearound): QSD with driver=rbd and cache.direct=off (QEMU then sets rbd_cache=true),
# in its iothread configuration (shared/notes/qsd-configs.md, (2)).
#
# The cluster is the one-node test cluster of tests/ceph/cluster.sh (1 mon + 1 bluestore
# OSD on a sparse file, 127.0.0.1), started here and stopped at the end: the numbers say
# what the servers add on top of librbd and this OSD, not what a real cluster does. On a
# 2-core machine the OSD, librbd's threads, the server and the client share two cores, so
# nothing is pinned except vubd's reactor (-m, the last CPU) and the QSD iothread's
# process is left free alike; runs alternate vubd/QSD within each cell, figures are medians
# over --reps.
#
# Usage: tuning/rbd-bench.sh [--seconds S] [--reps R] [--out FILE]
# Needs tests/ceph/install.sh's packages (incl. qemu-block-extra for QSD's rbd driver).
# Writes FILE (default tuning/results/rbd.md) and FILE's .jsonl (one line per run).
# VUBD_NO_BUILD=1 skips the cargo build (see lib.sh).
set -euo pipefail
SECS=5
REPS=3
OUT=tuning/results/rbd.md
while [ $# -gt 0 ]; do
    case $1 in
        --seconds) SECS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

# shellcheck source=SCRIPTDIR/lib.sh disable=SC1091
source "$(dirname "$0")/lib.sh"
need_qsd
command -v ceph-mon >/dev/null || { echo "needs Ceph: run tests/ceph/install.sh" >&2; exit 1; }
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ] ||
    { echo "needs QEMU's rbd driver (qemu-block-extra): run tests/ceph/install.sh" >&2; exit 1; }

WORK=$(mktemp -d /var/tmp/vubd-rbd-bench.XXXXXX)
CEPH=$WORK/ceph
SOCK=$WORK/srv.sock
SRV_PID=""
cleanup() {
    [ -n "$SRV_PID" ] && kill "$SRV_PID" 2>/dev/null && wait "$SRV_PID" 2>/dev/null
    bash tests/ceph/cluster.sh stop "$CEPH" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
# One cluster per machine (fixed mon ports): the lock the tests take too.
exec 8>/var/tmp/vubd-ceph.lock
flock 8
bash tests/ceph/cluster.sh start "$CEPH" >&2
CONF=$CEPH/ceph.conf
rbd -c "$CONF" create --size 1024 rbd/bench
# Every object written once, so reads hit data rather than absent objects.
rbd -c "$CONF" bench --io-type write --io-size 4M --io-pattern seq --io-total 1G rbd/bench >/dev/null

start_vubd() {
    "$BIN/vubd" --socket-path "$SOCK" --rbd rbd/bench --rbd-conf "$CONF" --num-queues 1 \
        -m "[$SRV_CPU]" "$@" 2>>"$WORK/vubd.log" &
    SRV_PID=$!
}
# The reactor sleeps as soon as a pass finds nothing: no idle spinning next to librbd's
# threads and the OSD on a small machine.
start_vubd-interrupt() { start_vubd --poll-mode interrupt; }
start_qsd() {
    qemu-storage-daemon --object iothread,id=io0 \
        --blockdev "driver=rbd,node-name=r0,pool=rbd,image=bench,conf=$CONF,cache.direct=off" \
        --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1,iothread=io0" \
        2>>"$WORK/qsd.log" &
    SRV_PID=$!
}
stop_server() {
    kill "$SRV_PID" 2>/dev/null || true
    wait "$SRV_PID" 2>/dev/null || true
    SRV_PID=""
    rm -f "$SOCK"
}

JSONL=${OUT%.md}.jsonl
: >"$JSONL"
for rw in randread randwrite; do
    for qd in 1 32; do
        for rep in $(seq "$REPS"); do
            for srv in vubd vubd-interrupt qsd; do
                rm -f "$SOCK"
                "start_$srv"
                wait_sock "$SOCK"
                # A run the OSD stalls past vubd-bench's request timeout counts as failed.
                line=$("$BIN/vubd-bench" --socket "$SOCK" --rw "$rw" --iodepth "$qd" \
                    --seconds "$SECS" --server-pid "$SRV_PID" --json) || line=""
                stop_server
                if [ -n "$line" ]; then
                    echo "{\"server\":\"$srv\",\"rep\":$rep,\"r\":$line}" >>"$JSONL"
                else
                    echo "{\"server\":\"$srv\",\"rep\":$rep,\"failed\":\"$rw qd$qd\"}" >>"$JSONL"
                fi
                echo "$srv $rw qd$qd rep $rep: ${line:-FAILED}" >&2
            done
        done
    done
done

python3 - "$JSONL" "$OUT" "$SECS" "$REPS" <<'EOF'
import json, statistics, sys, subprocess, platform
runs = [json.loads(l) for l in open(sys.argv[1])]
out, secs, reps = sys.argv[2], sys.argv[3], sys.argv[4]
ok = [r for r in runs if "r" in r]
failed = [f'{r["server"]} {r["failed"]} (rep {r["rep"]})' for r in runs if "failed" in r]
def med(srv, rw, qd, key):
    v = [r["r"][key] for r in ok if r["server"] == srv and r["r"]["rw"] == rw and r["r"]["iodepth"] == qd]
    return statistics.median(v) if v else float("nan")
def cell(srv, rw, qd):
    return (f"{med(srv, rw, qd, 'iops'):.0f} | {med(srv, rw, qd, 'lat_p50_us'):.0f} / "
            f"{med(srv, rw, qd, 'lat_p99_us'):.0f} | {med(srv, rw, qd, 'server_cpu_us_per_io'):.0f}")
rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
lines = [
    "# vubd vs qemu-storage-daemon on a Ceph RBD image",
    "",
    f"`tuning/rbd-bench.sh --seconds {secs} --reps {reps}` (vubd {rev or 'unknown'}; {platform.node()},"
    f" {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPUs).",
    "",
    "One-node test cluster (tests/ceph/cluster.sh: 1 mon, 1 bluestore OSD on a sparse file, "
    "127.0.0.1), a 1 GiB image written once; librbd defaults for both servers (rbd cache on, "
    "writearound); QSD 10 with driver=rbd, cache.direct=off, an iothread. Client: vubd-bench "
    "(libblkio), 1 queue, 4 KiB, sleeping on its completion fd. Medians over the reps.",
    "",
    "**Busy machine**: 2 cores shared by the OSD, the mon, librbd's ~17 threads, the server, "
    "the client and other people's work. The numbers compare the two servers in the same "
    "conditions; they say nothing of what a real cluster delivers.",
    "",
    "Servers: `vubd` (default adaptive polling), `vubd-int` (`--poll-mode interrupt`), `qsd`. "
    "Server CPU is the whole process (librbd's threads included) per I/O.",
    "",
    "| workload | server | IOPS | p50 / p99 latency (us) | server CPU (us/IO) | IOPS vs QSD |",
    "|---|---|---|---|---|---|",
]
for rw in ("randread", "randwrite"):
    for qd in (1, 32):
        q = med("qsd", rw, qd, "iops")
        for srv, label in (("vubd", "vubd"), ("vubd-interrupt", "vubd-int"), ("qsd", "qsd")):
            v = med(srv, rw, qd, "iops")
            lines.append(f"| {rw} QD{qd} | {label} | {cell(srv, rw, qd)} | {v / q:.2f} |")
if failed:
    lines += ["", "Runs that failed (a request took longer than vubd-bench's timeout): " + ", ".join(failed) + "."]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
