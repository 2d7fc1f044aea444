# Shared by the tuning scripts: build, CPU placement, socket wait, medians.
# shellcheck shell=bash disable=SC2034  # (variables used by the scripts that source this)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
# VUBD_NO_BUILD=1 uses target/release as it is (e.g. while src/ is being edited); the build
# still runs when a binary is missing.
if [ "${VUBD_NO_BUILD:-0}" != 1 ] || [ ! -x target/release/vubd ] || [ ! -x target/release/vubd-bench ]; then
    cargo build --release --bins -q
fi
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

# Copies vubd and vubd-bench into directory $1 and points BIN there, so that a rebuild of
# target/release during a long run cannot mix two builds in one comparison.
snapshot_bins() { mkdir -p "$1" && cp "$BIN/vubd" "$BIN/vubd-bench" "$BIN/vubd-floor" "$1/" && BIN=$1; }

# The version of vubd being measured: commit, and whether the tree had local changes.
vubd_version() { git describe --always --dirty 2>/dev/null || echo unknown; }

# qemu-storage-daemon, installed from bookworm-backports if missing (as root on Debian).
need_qsd() {
    command -v qemu-storage-daemon >/dev/null && return 0
    echo "installing qemu-storage-daemon from bookworm-backports" >&2
    grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ ||
        echo "deb http://deb.debian.org/debian bookworm-backports main" >/etc/apt/sources.list.d/backports.list
    apt-get update -qq && apt-get install -y -qq -t bookworm-backports qemu-system-common qemu-utils >/dev/null
}

# Sets PY to a Python that has matplotlib: python3 if it has it or pip can add it (pyenv,
# venv), else Debian's python3-matplotlib and /usr/bin/python3. PY=python3 if all fail (the
# reports then skip their plots).
need_matplotlib() {
    PY=python3
    python3 -c "import matplotlib" 2>/dev/null && return 0
    echo "installing matplotlib" >&2
    { python3 -m pip install -q matplotlib || python3 -m pip install -q --break-system-packages matplotlib; } \
        >/dev/null 2>&1 || true
    python3 -c "import matplotlib" 2>/dev/null && return 0
    apt-get install -y -qq python3-matplotlib >/dev/null 2>&1 || true
    if /usr/bin/python3 -c "import matplotlib" 2>/dev/null; then PY=/usr/bin/python3; fi
}

# Resident memory (KiB) and open fds of process $1: "RSS FDS".
rss_fds() { echo "$(awk '/^VmRSS/ {print $2}' "/proc/$1/status") $(find "/proc/$1/fd" -mindepth 1 -maxdepth 1 | wc -l)"; }

# CPU time of process $1 (all threads) in clock ticks.
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# Writes the 1 GiB O_DIRECT disk image at $1 (again): this VM's disk reads data written in
# the last minutes from a fast tier and older data from a slow one (tuning/README.md), so
# each disk cell of compare.sh and ab.sh reads an image written right before it (~1 s).
fresh_disk_image() { dd if=/dev/zero of="$1" bs=1M count=1024 oflag=direct conv=notrunc status=none; }
