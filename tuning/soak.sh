#!/usr/bin/env bash
# Soak: two devices (a RAM disk and an O_DIRECT file), two queues each, under a mixed
# verified workload (vubd-bench --verify: every read of a block written in the run must
# return its latest contents), reconnecting every 30 s. Samples vubd's RSS and open fds
# every 10 s. Fails on any I/O error, data mismatch, crash, or growth of RSS or fds after
# the warm-up quarter. Not in CI (10 minutes by default).
# Usage: tuning/soak.sh [seconds=600] [results.csv]
set -euo pipefail
DURATION=${1:-600}
CSV=${2:-}
source "$(dirname "$0")/lib.sh"
DIR=$(mktemp -d /var/tmp/vubd-soak.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
truncate -s 512M "$DIR/disk.img"
cat > "$DIR/vubd.toml" <<TOML
[[device]]
name = "ram"
socket-path = "$DIR/ram.sock"
ram = "512M"
num-queues = 2

[[device]]
name = "file"
socket-path = "$DIR/file.sock"
blk-file = "$DIR/disk.img"
num-queues = 2
TOML
"$BIN/vubd" --config "$DIR/vubd.toml" 2>"$DIR/vubd.log" &
VUBD=$!
wait_sock "$DIR/ram.sock"
wait_sock "$DIR/file.sock"

client() { # device: runs 30 s verified sessions until the deadline
    local dev=$1 end=$2 n=0
    while [ "$(date +%s)" -lt "$end" ]; do
        "$BIN/vubd-bench" --socket "$DIR/$dev.sock" --rw randrw --bs 4096 --iodepth 16 \
            --queues 2 --seconds 30 --verify --json >>"$DIR/$dev.json" 2>>"$DIR/$dev.err" ||
            { echo "FAIL: $dev session $n: $(tail -1 "$DIR/$dev.err")"; return 1; }
        n=$((n + 1))
    done
}

START=$(date +%s)
END=$((START + DURATION))
client ram "$END" & C1=$!
client file "$END" & C2=$!

echo "t_s,rss_kib,fds" >"$DIR/samples.csv"
while kill -0 "$C1" 2>/dev/null || kill -0 "$C2" 2>/dev/null; do
    kill -0 "$VUBD" 2>/dev/null || { echo "FAIL: vubd died"; tail -20 "$DIR/vubd.log"; exit 1; }
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$VUBD/status")
    fds=$(ls "/proc/$VUBD/fd" | wc -l)
    echo "$(( $(date +%s) - START )),$rss,$fds" >>"$DIR/samples.csv"
    sleep 10
done
rc=0
wait "$C1" || rc=1
wait "$C2" || rc=1
[ -n "$CSV" ] && cp "$DIR/samples.csv" "$CSV"

python3 - "$DIR" "$DURATION" <<'PY' || rc=1
import csv, json, sys
d, duration = sys.argv[1], int(sys.argv[2])
rows = [(int(r["t_s"]), int(r["rss_kib"]), int(r["fds"])) for r in csv.DictReader(open(f"{d}/samples.csv"))]
warm = [r for r in rows if r[0] >= duration // 4] or rows
# Growth: the second half of the post-warm-up samples against the first half.
half = max(1, len(warm) // 2)
first, second = warm[:half], warm[half:] or warm[-1:]
rss1, rss2 = max(r[1] for r in first), max(r[1] for r in second)
fds1, fds2 = max(r[2] for r in first), max(r[2] for r in second)
ios = verified = sessions = 0
for dev in ("ram", "file"):
    for line in open(f"{d}/{dev}.json"):
        j = json.loads(line); ios += j["ios"]; verified += j["verified"]; sessions += 1
print(f"soak: {duration}s, {sessions} sessions, {ios} I/Os, {verified} verified reads, "
      f"RSS max {rss1} then {rss2} KiB, fds max {fds1} then {fds2} (first/second half after warm-up)")
ok = rss2 <= rss1 * 1.05 + 2048 and fds2 <= fds1
print("soak: PASS" if ok else "soak: FAIL (growth)")
sys.exit(0 if ok else 1)
PY
grep -E "ERROR|panicked" "$DIR/vubd.log" && { echo "FAIL: errors in vubd log"; rc=1; }
exit $rc
