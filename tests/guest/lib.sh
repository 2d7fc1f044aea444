# shellcheck shell=bash
# What tests/guest/run.sh and tests/guest/kernel/run.sh share: timing, the exit status for a
# host that cannot run the tests, the processes they start (killed on any exit) and their
# work directory (removed unless a test failed or VUBD_GUEST_KEEP=1). Sourced; the caller
# defines log() first.

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
setup_missing() {
    echo "VUBD-SETUP-MISSING: $*" >&2
    exit 77
}

# --- processes we start: killed on any exit ----------------------------------------------------
PIDS=()
WORK=""
FAILED=0
# kill_group PID: TERM, then KILL after 2 s, to the process group led by PID (our job)
kill_group() {
    kill -TERM -- "-$1" 2>/dev/null || return 0
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        kill -0 -- "-$1" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -KILL -- "-$1" 2>/dev/null || true
}
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill_group "$pid"
    done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        rm -f "$WORK"/*.img
        if [ "$FAILED" -eq 0 ] && [ "${VUBD_GUEST_KEEP:-0}" != 1 ]; then
            rm -rf "$WORK"
        else
            log "logs kept in $WORK"
        fi
    fi
}
trap cleanup EXIT
trap 'FAILED=1; exit 130' INT TERM
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}

need_tools() {
    local bin
    for bin in "$@"; do
        command -v "$bin" >/dev/null || setup_missing "$bin (run tests/guest/install-host.sh as root)"
    done
}
