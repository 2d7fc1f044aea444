# shellcheck shell=sh
# vhost-user-blk, for comparison with vduse and ublk in the same 6.12 guest: run.sh starts a
# vubd on the HOST (--null 1G) and gives this guest a vhost-user-blk-pci disk served by it.
#   data   a pattern written with O_DIRECT reads back byte-exact (null: reads are zeroes, so
#          the check is that reads of written blocks return zeroes and no I/O fails)
#   perf   the same fio as ublk's perf phase: 4 KiB randread/randwrite at QD1 and QD32,
#          3 s each, fio on CPU 0 (IOPS)
# Sourced by the guest's init (helpers: say, result, wait_for, $U).

HFAIL=""
hfail() {
    HFAIL="$HFAIL${HFAIL:+,}$1"
    say "vhostuser: FAIL $1"
}

test_vhostuser() {
    wait_for 20 [ -b /dev/vda ] || hfail no_disk
    SIZE=$(cat /sys/block/vda/size 2>/dev/null)
    [ "$SIZE" = 2097152 ] || hfail "size_${SIZE:-none}"
    dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null
    dd if=/tmp/pat of=/dev/vda bs=64k oflag=direct 2>/dev/null || hfail write
    dd if=/dev/vda of=/tmp/back bs=64k count=16 iflag=direct 2>/dev/null || hfail read
    # a null disk reads zeroes whatever was written
    [ "$(tr -d "\\0" </tmp/back | wc -c)" -eq 0 ] || hfail read_not_zeroes
    PERF=""
    for rw in randread randwrite; do
        for qd in 1 32; do
            taskset -c 0 "$U/fio" --name=p --filename=/dev/vda --direct=1 --ioengine=libaio \
                --rw=$rw --bs=4k --iodepth=$qd --time_based --runtime=3 --size=256M \
                --output-format=terse --terse-version=3 --output=/tmp/perf.out || hfail "perf_$rw$qd"
            # terse v3: field 8 read IOPS, field 49 write IOPS
            if [ $rw = randread ]; then f=8; else f=49; fi
            PERF="$PERF null_${rw}_qd$qd=$(cut -d';' -f$f /tmp/perf.out)"
        done
    done
    # shellcheck disable=SC2086 # PERF is a list of key=value words
    result "$([ -z "$HFAIL" ] && echo PASS || echo FAIL)" $PERF ${HFAIL:+reason=$HFAIL}
}
