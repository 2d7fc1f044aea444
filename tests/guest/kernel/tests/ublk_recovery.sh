# shellcheck shell=sh
# ublk user recovery inside the 6.12 guest: vubd is SIGKILLed twice while a fio with crc32c
# verify runs on /dev/ublkb7 (a file backend on tmpfs), and started again with the same
# --ublk-id each time; the device stays, the new vubd takes it over (START/END_USER_RECOVERY),
# the requests the dead one had taken are issued again, and fio completes and verifies
# clean. Then without --ublk-id: the kernel picks the id, a killed vubd leaves the device
# waiting, and a vubd started with that id takes it over with the data intact.
# Sourced by the guest's init (helpers: say, result, wait_for, $VUBD, $U).

RFAIL=""
rfail() {
    RFAIL="$RFAIL${RFAIL:+,}$1"
    say "ublk_recovery: FAIL $1"
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
# rstart LOG ARGS...: vubd in the background, LOG started afresh (rtakeover reads it); RPID
rstart() {
    : >"$1"
    vubd_start "$@"
    RPID=$VPID
}
rkill() {
    kill -KILL "$RPID" 2>/dev/null
    wait "$RPID" 2>/dev/null
}
# rtakeover LOG: waits for the new vubd to say it took the device over; prints seconds
rtakeover() {
    t0=$(uptime_s)
    if wait_for 90 grep -q 'taken over' "$1"; then
        awk "BEGIN{print $(uptime_s) - $t0}"
    else
        echo none
        rfail "no_takeover_$(basename "$1" .log)"
        tail -n 20 "$1"
    fi
}

test_ublk_recovery() {
    img=/tmp/disk.img
    dd if=/dev/zero of=$img bs=1M count=0 seek=256 2>/dev/null
    set -- --ublk --ublk-id 7 --blk-file $img
    rstart /tmp/r1.log "$@"
    wait_for 30 [ -b /dev/ublkb7 ] || {
        rfail no_device
        tail -n 20 /tmp/r1.log
    }
    "$U/fio" --name=recovery --filename=/dev/ublkb7 --direct=1 --ioengine=libaio \
        --rw=randwrite --bs=4k --iodepth=16 --size=96M --verify=crc32c --verify_fatal=1 \
        --output=/tmp/fio-rec.out &
    fpid=$!
    sleep 2
    inflight1=$(tr -s ' ' _ </sys/block/ublkb7/inflight)
    rkill
    t_kill=$(uptime_s)
    sleep 1
    [ -b /dev/ublkb7 ] || rfail node_gone_after_kill
    kill -0 $fpid 2>/dev/null || rfail fio_ended_while_vubd_was_down
    rstart /tmp/r2.log "$@"
    takeover1=$(rtakeover /tmp/r2.log)
    down1=$(awk "BEGIN{print $(uptime_s) - $t_kill}")
    # again, later in the run (the verify phase, or the end of the writes)
    sleep 4
    inflight2=$(tr -s ' ' _ </sys/block/ublkb7/inflight)
    rkill
    sleep 1
    rstart /tmp/r3.log "$@"
    takeover2=$(rtakeover /tmp/r3.log)
    if wait_for 300 eval "! kill -0 $fpid 2>/dev/null"; then
        wait $fpid
        frc=$?
    else
        kill -KILL $fpid
        frc=timeout
    fi
    [ "$frc" = 0 ] || {
        rfail "fio_exit_$frc"
        tail -n 40 /tmp/fio-rec.out
    }
    grep -qi 'verify.*bad\|bad magic\|crc32c.*fail' /tmp/fio-rec.out && rfail verify_errors
    grep -q 'err= 0' /tmp/fio-rec.out || rfail fio_errors
    vwrite=$(grep -o 'WRITE: bw=[^,]*' /tmp/fio-rec.out | head -n 1 | tr ' ' _)
    kill -TERM "$RPID"
    wait_for 20 eval "! kill -0 $RPID 2>/dev/null" || rfail no_exit_on_sigterm
    wait "$RPID"
    rc=$?
    [ $rc = 0 ] || rfail "exit_$rc"
    [ -e /dev/ublkb7 ] && rfail node_left_after_sigterm

    # --- without --ublk-id ---
    img2=/tmp/disk2.img
    dd if=/dev/zero of=$img2 bs=1M count=0 seek=64 2>/dev/null
    rstart /tmp/n1.log --ublk --blk-file $img2
    wait_for 30 grep -q 'started' /tmp/n1.log
    nid=$(sed -n 's|.*/dev/ublkb\([0-9]*\) started.*|\1|p' /tmp/n1.log | head -n 1)
    if [ -z "$nid" ] || [ ! -b "/dev/ublkb$nid" ]; then
        rfail noid_no_device
    else
        dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null
        dd if=/tmp/pat of="/dev/ublkb$nid" bs=64k oflag=direct 2>/dev/null || rfail noid_write
        rkill
        sleep 1
        [ -b "/dev/ublkb$nid" ] || rfail noid_node_gone_after_kill
        rstart /tmp/n2.log --ublk --ublk-id "$nid" --blk-file $img2
        takeover3=$(rtakeover /tmp/n2.log)
        dd if="/dev/ublkb$nid" of=/tmp/back bs=64k count=16 iflag=direct 2>/dev/null || rfail noid_read
        cmp -s /tmp/pat /tmp/back || rfail noid_data
        kill -TERM "$RPID"
        wait "$RPID"
        [ -e "/dev/ublkb$nid" ] && rfail noid_node_left
    fi
    grep -qE 'panicked|vubd: seccomp' /tmp/r1.log /tmp/r2.log /tmp/r3.log /tmp/n1.log /tmp/n2.log &&
        rfail vubd_log
    st=PASS
    [ -z "$RFAIL" ] || st=FAIL
    if [ $st = FAIL ]; then
        for f in /tmp/r1.log /tmp/r2.log /tmp/r3.log /tmp/n2.log; do
            echo "vubd-init: ---- $f ----"
            tail -n 30 $f
        done
        dump_dmesg
    fi
    result $st inflight_at_kill1="$inflight1" inflight_at_kill2="$inflight2" \
        takeover1_s="$takeover1" takeover2_s="$takeover2" downtime1_s="$down1" \
        fio_exit="$frc" fio_write="${vwrite:-none}" noid_id="${nid:-none}" \
        noid_takeover_s="${takeover3:-none}" ${RFAIL:+reason=$RFAIL}
}
