# Shared by the tuning scripts: build, CPU placement, socket wait, medians.
# shellcheck shell=bash
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
cargo build --release --bins -q
BIN=$PWD/target/release
# The server gets the last CPU, the client CPU 0.
SRV_CPU=$(( $(nproc) - 1 ))
CLI_CPU=0

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# Median of the numbers on stdin, one per line.
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Median of JSON field $1 over the lines of vubd-bench --json output given as arguments.
json_median() {
    local field=$1; shift
    printf '%s\n' "$@" | python3 -c "import json,sys; [print(json.loads(l)['$field']) for l in sys.stdin]" | median
}
