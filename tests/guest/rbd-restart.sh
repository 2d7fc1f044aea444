# shellcheck shell=bash
# The guest restart test on a Ceph RBD image. Sourced by run.sh (test_rbd), whose helpers
# it uses: start_vubd, stop_vubd, start_qemu, wait_qemu, wait_marker, check_run, log.
#
# A one-node cluster (tests/ceph/cluster.sh) serves an image; vubd fronts it with the write
# cache off (--writethrough: every write the guest sees completed must be durable); the
# guest runs fio with verification (init's `restart` test); the host SIGKILLs vubd in the
# middle and starts it again at once. QEMU reconnects (chardev reconnect) and hands the new
# vubd its inflight region (INFLIGHT_SHMFD), which resubmits what the dead one never
# completed. PASS needs: fio finished with every verification passing (no completed write
# lost, nothing corrupted), no I/O error in the guest, and the new vubd breaking the
# exclusive lock its dead predecessor held (and saying so) instead of stalling ~30 s
# until librbd's watch on it expires.
#
# Environment (besides run.sh's): VUBD_GUEST_KILL_AFTER (seconds of fio before the kill,
# default 4).

CEPH_DIR=""
CEPH_LOCK=/var/tmp/vubd-ceph.lock

rbd_cluster_stop() {
    if [ -n "$CEPH_DIR" ]; then
        bash "$ROOT/tests/ceph/cluster.sh" stop "$CEPH_DIR" >&2 || true
        rm -f "$CEPH_DIR/osd-0/block"
        CEPH_DIR=""
    fi
    # The cluster lock (fd 8) is released when this shell exits or closes it.
    exec 8>&- 2>/dev/null || true
}

rbd_restart() {
    local name=rbd rc=0 kill_after=${VUBD_GUEST_KILL_AFTER:-4} conf
    if ! command -v ceph-mon >/dev/null && [ "${VUBD_GUEST_NO_INSTALL:-0}" != 1 ]; then
        local irc=0
        "$ROOT/tests/ceph/install.sh" || irc=$?
        [ $irc -eq 0 ] || exit $irc
    fi
    command -v ceph-mon >/dev/null || setup_missing "ceph-mon (run tests/ceph/install.sh as root)"

    # One cluster per machine (fixed mon ports): the same lock tests/common/ceph.rs takes.
    exec 8>"$CEPH_LOCK"
    flock 8
    CEPH_DIR=$WORK/ceph
    trap 'rbd_cluster_stop; cleanup' EXIT
    if ! bash "$ROOT/tests/ceph/cluster.sh" start "$CEPH_DIR" >"$WORK/ceph-start.log" 2>&1; then
        cat "$WORK/ceph-start.log" >&2
        echo "VUBD-RESULT test=rbd-host status=FAIL reason=ceph_cluster_start"
        rbd_cluster_stop
        trap cleanup EXIT
        return 1
    fi
    conf=$CEPH_DIR/ceph.conf
    rbd -c "$conf" create --size $((DISK_SIZE >> 20)) rbd/guest >&2 || {
        echo "VUBD-RESULT test=rbd-host status=FAIL reason=rbd_create"
        rbd_cluster_stop
        trap cleanup EXIT
        return 1
    }

    local vargs=(--rbd rbd/guest --rbd-conf "$conf" --num-queues 2 --serial "$SERIAL" --writethrough)
    start_vubd "$name" "${vargs[@]}" || {
        echo "VUBD-RESULT test=$name-host status=FAIL reason=vubd_start"
        rbd_cluster_stop
        trap cleanup EXIT
        return 1
    }
    # shellcheck disable=SC2046
    start_qemu "$name" "vubd.test=restart vubd.fio_size=32M vubd.fio_secs=20" $(vhost_args "$SOCK" 2 "$RECONNECT")
    local killed=no restarted=no busy=no broke=no takeover_s=-1
    if wait_marker "$QEMU_LOG" VUBD-FIO-STARTED "$BOOT_TIMEOUT"; then
        sleep "$kill_after"
        # fio must still be running when vubd dies, or the scenario tested nothing
        grep -aq 'VUBD-RESULT' "$QEMU_LOG" || busy=yes
        if kill -0 "$QEMU_PID" 2>/dev/null && kill -KILL "$VUBD_PID" 2>/dev/null; then
            killed=yes
            wait "$VUBD_PID" 2>/dev/null || true
            forget_pid "$VUBD_PID"
            log "rbd: vubd SIGKILLed ${kill_after} s into fio; starting it again"
            local t0 lines
            t0=$(now)
            lines=$(wc -l <"$WORK/$name.vubd.log")
            start_vubd "$name" "${vargs[@]}" && restarted=yes
            if tail -n +"$((lines + 1))" "$WORK/$name.vubd.log" | grep -q 'broke the exclusive lock held by'; then
                broke=yes
                takeover_s=$(since "$t0")
            fi
        fi
    fi
    wait_qemu
    local host_st=PASS
    [ $killed = yes ] && [ $restarted = yes ] && [ $busy = yes ] && [ $broke = yes ] || host_st=FAIL
    echo "VUBD-RESULT test=rbd status=$host_st killed=$killed fio_running_at_kill=$busy restarted=$restarted lock_broken=$broke restart_to_lock_s=$takeover_s kill_after_s=$kill_after"
    [ $host_st = PASS ] || rc=1
    check_run "$name" || rc=1
    if [ $restarted = yes ]; then
        stop_vubd || {
            echo "VUBD-RESULT test=$name-host status=FAIL reason=restarted_vubd_exited_early"
            rc=1
        }
    fi
    cp "$CEPH_DIR/log/client.admin.log" "$WORK/ceph-client.log" 2>/dev/null || true
    rbd_cluster_stop
    trap cleanup EXIT
    return $rc
}
