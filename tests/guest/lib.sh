# shellcheck shell=bash
# What tests/guest/run.sh and tests/guest/kernel/run.sh share: timing, the exit status for a
# host that cannot run the tests, the processes they start (killed on any exit) and their
# work directory (removed unless a test failed or VUBD_GUEST_KEEP=1). Sourced; the caller
# defines log() first; QEMU_PID, QEMU_LOG, QEMU_RC and BOOT_TIMEOUT are the boot's.

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
setup_missing() {
    echo "VUBD-SETUP-MISSING: $*" >&2
    exit 77
}

# When the run started, for the summary's total.
t_start=$(now)

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

# --- one guest boot -------------------------------------------------------------------------
# wait_qemu: waits for QEMU_PID (its timeout(1) wrapper enforces the boot timeout); sets QEMU_RC
# and BOOT_SECONDS (QEMU's wall time, start to power off). A guest that printed VUBD-DONE
# but did not power off within 20 s is stopped, with QEMU_RC=125.
wait_qemu() {
    local done_at="" t0
    t0=$(now)
    QEMU_RC=0
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        if [ -z "$done_at" ] && grep -aq '^VUBD-DONE' "$QEMU_LOG" 2>/dev/null; then
            done_at=$(date +%s)
        fi
        if [ -n "$done_at" ] && [ $(($(date +%s) - done_at)) -ge 20 ]; then
            log "guest printed VUBD-DONE but did not power off in 20 s: stopping QEMU"
            kill_group "$QEMU_PID"
            wait "$QEMU_PID" 2>/dev/null || true
            forget_pid "$QEMU_PID"
            QEMU_RC=125
            return
        fi
        sleep 0.2
    done
    wait "$QEMU_PID" || QEMU_RC=$?
    forget_pid "$QEMU_PID"
    # shellcheck disable=SC2034 # read by the caller
    BOOT_SECONDS=$(since "$t0")
}

# check_run NAME: judges one boot from its serial log, QEMU's status and, where the host ran
# a vubd for it, that vubd's log ($WORK/NAME.vubd.log). Prints the guest's VUBD-RESULT
# lines; returns 1 on failure.
check_run() {
    local name=$1 ok=0 lines
    lines=$(grep -ao 'VUBD-RESULT .*' "$WORK/$name.serial.log" | tr -d '\r' || true)
    if [ -n "$lines" ]; then
        echo "$lines"
        echo "$lines" | grep -qv ' status=PASS' && ok=1
    else
        echo "VUBD-RESULT test=$name status=FAIL reason=no_result_from_guest"
        ok=1
    fi
    grep -aq '^VUBD-DONE' "$WORK/$name.serial.log" || {
        echo "VUBD-RESULT test=$name-host status=FAIL reason=guest_did_not_finish qemu_rc=$QEMU_RC"
        ok=1
    }
    if [ "$QEMU_RC" -ne 0 ]; then
        local why=qemu_exit_$QEMU_RC
        [ "$QEMU_RC" -eq 124 ] && why=boot_timeout_${BOOT_TIMEOUT}s
        [ "$QEMU_RC" -eq 125 ] && why=guest_did_not_power_off
        echo "VUBD-RESULT test=$name-host status=FAIL reason=$why"
        ok=1
    fi
    if grep -aqE 'panicked|SIGSEGV' "$WORK/$name.vubd.log" 2>/dev/null; then
        echo "VUBD-RESULT test=$name-host status=FAIL reason=vubd_panicked"
        ok=1
    fi
    [ $ok -eq 0 ] || show_logs "$name"
    return $ok
}

# show_logs NAME [VUBD_NAME]: the tails of one boot's serial console and QEMU output, and of
# the host vubd's log (VUBD_NAME's, by default NAME's), on stderr: a failure in CI, where the
# work dir is gone, must carry what explains it.
show_logs() {
    local name=$1 vubd_log=$WORK/${2:-$1}.vubd.log
    log "---- $name: serial console (tail) ----"
    tail -80 "$WORK/$name.serial.log" 2>/dev/null | tr -d '\r' >&2
    log "---- $name: qemu ----"
    tail -20 "$WORK/$name.qemu.log" >&2 2>/dev/null
    [ ! -f "$vubd_log" ] || {
        log "---- $(basename "$vubd_log"): vubd (tail) ----"
        tail -40 "$vubd_log" >&2
    }
}

# run_tests TITLE TEST...: runs test_NAME for each in turn, prints one "VUBD-TEST name=...
# status=... seconds=..." line per test (with the words test_fields prints, where the caller
# defines it) and a summary; returns 1 if a test failed.
run_tests() {
    local title=$1 t t0 extra npass=0 nfail=0
    shift
    local -A status=() seconds=()
    for t in "$@"; do
        t0=$(now)
        log "== $t"
        if "test_$t"; then
            status[$t]=PASS
        else
            status[$t]=FAIL
            FAILED=1
        fi
        seconds[$t]=$(since "$t0")
        extra=""
        declare -F test_fields >/dev/null && extra=" $(test_fields)"
        echo "VUBD-TEST name=$t status=${status[$t]} seconds=${seconds[$t]}$extra accel=$ACCEL"
    done
    echo "---- $title (accel $ACCEL) ----"
    for t in "$@"; do
        printf '%-10s %s %6s s\n' "$t" "${status[$t]}" "${seconds[$t]}"
        if [ "${status[$t]}" = PASS ]; then npass=$((npass + 1)); else nfail=$((nfail + 1)); fi
    done
    echo "SUMMARY passed=$npass failed=$nfail total_seconds=$(since "$t_start")"
    [ $nfail -eq 0 ]
}
