# shellcheck shell=sh
# VDUSE front end (vubd --vduse) inside the 6.12 guest, one boot:
#   stale     vubd killed before `vdpa dev add`: the next one replaces the unused device
#   geometry  size, block sizes, queues, discard/write-zeroes limits in /sys/block/vdX
#   ext4      mkfs.ext4, files, sha256 across a remount, e2fsck -fn, fstrim
#   fio       crc32c verify on 2 queues at once; both queues served (iostat over RPC)
#   rpc       device_add of a VDUSE device at run time (4 KiB blocks), vdpa dev add, data
#             round trip, device_list; device_remove: vdX, the vdpa and VDUSE devices go
#   resize    device_resize: the guest kernel sees the new size; I/O at the new end
#   restart   vubd SIGKILLed mid-fio (verify): fio waits, a restarted vubd takes the device
#             over and runs the requests in flight again; fio completes clean, same vdX
#   exit      SIGTERM: vubd deletes the vdpa device and destroys the VDUSE device
#   inflight  the same kill and restart with requests surely in flight: the disk's backend
#             is another VDUSE disk (O_DIRECT, served by a second vubd), so the killed vubd
#             has taken requests it has not completed; the restarted one runs them again
#   perf      fio 4 KiB randread/randwrite at QD1 and QD32 on a null device (IOPS)
# Sourced by the guest's init (helpers: say, result, wait_for, $VUBD, $U).
# boot: vubd.perf_secs=5

VFAIL=""
vfail() {
    VFAIL="$VFAIL${VFAIL:+,}$1"
    say "vduse: FAIL $1"
}
# vcheck NAME GOT WANT
vcheck() { expect vfail "$@"; }
# vd_stop: SIGTERM, vubd must exit within 30 s; VRC
vd_stop() { vubd_stop 30; }
# vd_rpc JSON: one request on the management socket, the answer on stdout
vd_rpc() { rpc_at /tmp/vrpc.sock "$1"; }
# vd_node NAME: the block device (vdX) the vdpa device NAME got, if any
vd_node() {
    for b in /sys/bus/vdpa/devices/"$1"/virtio*/block/*; do
        [ -e "$b" ] && basename "$b" && return 0
    done
    return 1
}
# vd_attach NAME: vdpa dev add, then wait for the disk; prints vdX. The kernel probes the
# disk inside `vdpa dev add` (partition scan included): a device that does not answer
# leaves the command stuck in the kernel, so it runs in the background with a deadline.
vd_attach() {
    "$U/vdpa" dev add name "$1" mgmtdev vduse &
    apid=$!
    if ! wait_for 60 eval "! kill -0 $apid 2>/dev/null"; then
        say "vduse: vdpa dev add $1 did not return in 60 s" >&2
        return 1
    fi
    wait $apid || {
        say "vduse: vdpa dev add $1 failed" >&2
        return 1
    }
    wait_for 20 vd_node "$1" >/dev/null || {
        say "vduse: no block device under /sys/bus/vdpa/devices/$1: $(ls /sys/bus/vdpa/devices/"$1" 2>&1 | tr '\n' ' ')" >&2
        return 1
    }
    # (not "n": wait_for counts in it)
    vdn=$(vd_node "$1")
    wait_for 10 [ -b "/dev/$vdn" ] || {
        say "vduse: no /dev/$vdn" >&2
        return 1
    }
    echo "$vdn"
}
# vd_fio_iops FIO-ARGS...: IOPS of a terse fio run (read + write)
vd_fio_iops() {
    timeout 120 "$U/fio" --output-format=terse --terse-version=3 "$@" 2>/tmp/fio.err |
        awk -F';' '/^3;/ {printf "%d\n", $8 + $49}'
}

IMG=/tmp/vd0.img
LOG=/tmp/vubd-vduse.log
ARGS="--vduse vd0 --blk-file $IMG --buffered --num-queues 2 --serial vduse-s0 --rpc-socket /tmp/vrpc.sock"

vduse_stale() {
    # vubd dies before anyone attached the device: /dev/vduse/vd0 stays, unused.
    # shellcheck disable=SC2086 # ARGS is a list of words
    vubd_start $LOG $ARGS
    if ! wait_for 20 [ -c /dev/vduse/vd0 ]; then
        vfail stale_no_vduse_node
        return
    fi
    kill -KILL "$VPID"
    wait "$VPID" 2>/dev/null
    [ -c /dev/vduse/vd0 ] || vfail stale_device_gone_with_vubd
}

vduse_geometry() {
    N=$(vd_attach vd0) || {
        vfail attach
        return 1
    }
    say "vduse: vd0 is /dev/$N"
    vcheck size "$(cat /sys/block/$N/size)" $((256 * 2048))
    vcheck lbs "$(q $N logical_block_size)" 512
    vcheck pbs "$(q $N physical_block_size)" 512
    vcheck min_io "$(q $N minimum_io_size)" 512
    vcheck queues "$(ls /sys/block/$N/mq | wc -l)" 2
    vcheck discard_max "$(q $N discard_max_bytes)" 1073741824
    vcheck discard_gran "$(q $N discard_granularity)" 512
    vcheck discard_segs "$(q $N max_discard_segments)" 1
    vcheck write_zeroes_max "$(q $N write_zeroes_max_bytes)" 1073741824
    vcheck max_segments "$(q $N max_segments)" 254
    vcheck max_segment_size "$(q $N max_segment_size)" 1048576
    vcheck write_cache "$(q $N write_cache)" "write back"
    vcheck ro "$(cat /sys/block/$N/ro)" 0
    vcheck serial "$(cat /sys/block/$N/serial 2>/dev/null)" vduse-s0
    GEO="lbs=$(q $N logical_block_size) queues=$(ls /sys/block/$N/mq | wc -l) discard_max=$(q $N discard_max_bytes)"
}

vduse_ext4() {
    "$U/mke2fs" -q -t ext4 -F "/dev/$N" || {
        vfail mkfs
        return
    }
    mount -t ext4 "/dev/$N" /mnt || {
        vfail mount
        return
    }
    for i in 1 2 3 4; do
        dd if=/dev/urandom of=/mnt/f$i bs=1M count=4 2>/dev/null
    done
    sync
    (cd /mnt && sha256sum f1 f2 f3 f4) >/tmp/sums
    umount /mnt || vfail umount
    "$U/e2fsck" -fn "/dev/$N" >/tmp/fsck.log 2>&1 || {
        vfail e2fsck
        tail -n 5 /tmp/fsck.log
    }
    echo 3 >/proc/sys/vm/drop_caches
    mount -t ext4 "/dev/$N" /mnt || {
        vfail remount
        return
    }
    (cd /mnt && sha256sum -c /tmp/sums >/dev/null) || vfail checksums
    rm /mnt/f1
    "$U/fstrim" /mnt || vfail fstrim
    umount /mnt || vfail umount2
}

vduse_fio() {
    # Two jobs on the two CPUs: virtio_blk maps each CPU to its own queue.
    timeout 300 "$U/fio" --name=verify --filename="/dev/$N" --direct=1 --ioengine=libaio \
        --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --size=24M --offset_increment=64M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --cpus_allowed=0-1 \
        --cpus_allowed_policy=split --group_reporting >/tmp/fio-verify.log 2>&1 || {
        vfail fio_verify
        tail -n 20 /tmp/fio-verify.log
    }
    grep -q 'err= 0' /tmp/fio-verify.log || vfail fio_errors
    # The in-flight record a restarted vubd reads: named after the VDUSE device.
    [ -f /run/vubd/vduse-vd0.inflight ] || vfail "no_record($(ls /run/vubd 2>&1 | tr ' \n' __))"
    # Both queues took writes: per-queue write bytes come first in iostat (keys sorted:
    # "queues" before "total").
    vd_rpc '{"jsonrpc":"2.0","id":1,"method":"iostat","params":{"name":"dev0"}}' >/tmp/iostat.json
    wq=$(grep -o '"write":{"bytes":[0-9]*' /tmp/iostat.json | cut -d: -f3 | head -n 2 | tr '\n' ' ')
    set -- $wq
    [ "${1:-0}" -gt 0 ] && [ "${2:-0}" -gt 0 ] || vfail "queues_not_both_used($(echo "$wq" | tr ' ' _))"
    QWRITES="q0_write_bytes=${1:-0} q1_write_bytes=${2:-0}"
}

vduse_rpc() {
    a=$(vd_rpc '{"jsonrpc":"2.0","id":2,"method":"device_add","params":{"name":"vd1","vduse":"vd1","ram":"64M","num-queues":1,"logical-block-size":4096}}')
    case "$a" in *'"result"'*) ;; *)
        vfail "rpc_add($(echo "$a" | tr ' ' _ | cut -c1-120))"
        return
        ;;
    esac
    wait_for 10 [ -c /dev/vduse/vd1 ] || vfail rpc_no_vduse_node
    M=$(vd_attach vd1) || {
        vfail rpc_attach
        return
    }
    vcheck rpc_lbs "$(q $M logical_block_size)" 4096
    vcheck rpc_size "$(cat /sys/block/$M/size)" $((64 * 2048))
    vcheck rpc_queues "$(ls /sys/block/$M/mq | wc -l)" 1
    dd if=/dev/urandom of=/tmp/r1 bs=1M count=2 2>/dev/null
    dd if=/tmp/r1 of="/dev/$M" bs=1M seek=3 conv=fsync 2>/dev/null || vfail rpc_write
    echo 3 >/proc/sys/vm/drop_caches
    dd if="/dev/$M" of=/tmp/r2 bs=1M skip=3 count=2 2>/dev/null
    cmp -s /tmp/r1 /tmp/r2 || vfail rpc_data
    l=$(vd_rpc '{"jsonrpc":"2.0","id":3,"method":"device_list"}')
    case "$l" in *"\"kernel-device\":\"/dev/$M\""*) ;; *) vfail rpc_list_node ;; esac
    case "$l" in *'"front-end":"vduse"'*) ;; *) vfail rpc_list_front ;; esac
    r=$(vd_rpc '{"jsonrpc":"2.0","id":4,"method":"device_remove","params":{"name":"vd1"}}')
    case "$r" in *'"result"'*) ;; *) vfail "rpc_remove($(echo "$r" | tr ' ' _ | cut -c1-120))" ;; esac
    wait_for 10 [ ! -e "/sys/block/$M" ] || vfail rpc_node_stays
    [ -b "/dev/$M" ] && vfail rpc_dev_node_stays
    [ -e /dev/vduse/vd1 ] && vfail rpc_vduse_stays
    timeout 10 "$U/vdpa" dev show vd1 >/dev/null 2>&1 && vfail rpc_vdpa_stays
    RPCNODE=$M
}

vduse_resize() {
    r=$(vd_rpc '{"jsonrpc":"2.0","id":5,"method":"device_resize","params":{"name":"dev0","size":"384M"}}')
    case "$r" in *'"capacity":402653184'*) ;; *) vfail "resize_rpc($(echo "$r" | tr ' ' _ | cut -c1-120))" ;; esac
    # shellcheck disable=SC2016 # expanded by the eval in wait_for
    wait_for 10 eval '[ "$(cat /sys/block/$N/size)" = 786432 ]' || vfail "resize_not_seen($(cat /sys/block/$N/size))"
    vcheck resize_bytes "$("$U/blockdev" --getsize64 "/dev/$N")" 402653184
    dd if=/dev/urandom of=/tmp/r1 bs=1M count=1 2>/dev/null
    dd if=/tmp/r1 of="/dev/$N" bs=1M seek=383 conv=fsync 2>/dev/null || vfail resize_write_end
    echo 3 >/proc/sys/vm/drop_caches
    dd if="/dev/$N" of=/tmp/r2 bs=1M skip=383 count=1 2>/dev/null
    cmp -s /tmp/r1 /tmp/r2 || vfail resize_data_end
}

vduse_restart() {
    timeout 300 "$U/fio" --name=restart --filename="/dev/$N" --direct=1 --ioengine=libaio \
        --rw=randwrite --bs=4k --iodepth=16 --size=96M --offset=128M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 >/tmp/fio-restart.log 2>&1 &
    fpid=$!
    sleep 3
    kill -0 $fpid 2>/dev/null || vfail restart_fio_ended_too_soon
    t_kill=$(cut -d' ' -f1 /proc/uptime)
    kill -KILL "$VPID"
    wait "$VPID" 2>/dev/null
    # With nobody serving the rings, fio waits: its requests neither fail nor complete.
    sleep 2
    kill -0 $fpid 2>/dev/null || vfail restart_fio_did_not_wait
    [ -b "/dev/$N" ] || vfail restart_node_gone
    # shellcheck disable=SC2086 # ARGS is a list of words
    vubd_start $LOG $ARGS
    if ! wait_for 240 eval "! kill -0 $fpid 2>/dev/null"; then
        vfail restart_fio_hangs
        kill -KILL $fpid 2>/dev/null
    fi
    wait $fpid
    frc=$?
    t_done=$(cut -d' ' -f1 /proc/uptime)
    vcheck restart_fio_rc "$frc" 0
    grep -q 'err= 0' /tmp/fio-restart.log || {
        vfail restart_fio_errors
        tail -n 20 /tmp/fio-restart.log
    }
    grep -q 'taking over the VDUSE device' $LOG || vfail restart_no_takeover
    RESUBMITTED=$(grep -o 'running again [0-9]* request' $LOG | awk '{s += $3} END {print s + 0}')
    vcheck restart_same_node "$(vd_node vd0)" "$N"
    # New I/O on the same disk after the restart.
    dd if=/dev/urandom of=/tmp/r1 bs=1M count=1 2>/dev/null
    dd if=/tmp/r1 of="/dev/$N" bs=1M seek=10 conv=fsync 2>/dev/null || vfail restart_new_write
    echo 3 >/proc/sys/vm/drop_caches
    dd if="/dev/$N" of=/tmp/r2 bs=1M skip=10 count=1 2>/dev/null
    cmp -s /tmp/r1 /tmp/r2 || vfail restart_new_data
    RESTART_S=$(awk "BEGIN{print $t_done - $t_kill}")
}

vduse_exit() {
    vd_stop
    vcheck exit_rc "$VRC" 0
    [ -e "/sys/block/$N" ] && vfail exit_node_stays
    [ -e /dev/vduse/vd0 ] && vfail exit_vduse_stays
    [ -e /run/vubd/vduse-vd0.inflight ] && vfail exit_record_stays
    grep -q 'VDUSE device vd0 destroyed' $LOG || vfail exit_not_destroyed
}

vduse_inflight() {
    BLOG=/tmp/vubd-back.log
    vubd_start $BLOG --vduse vb --ram 96M --num-queues 1
    bpid=$VPID
    wait_for 20 [ -c /dev/vduse/vb ] || {
        vfail inflight_back_start
        return
    }
    B=$(vd_attach vb) || {
        vfail inflight_back_attach
        return
    }
    ALOG=/tmp/vubd-front.log
    AARGS="--vduse va --blk-file /dev/$B --num-queues 1"
    # shellcheck disable=SC2086 # AARGS is a list of words
    vubd_start $ALOG $AARGS
    wait_for 20 [ -c /dev/vduse/va ] || vfail inflight_front_start
    A=$(vd_attach va) || {
        vfail inflight_front_attach
        return
    }
    # Both vubd processes call their device dev0: each VDUSE device has its own record.
    for r in va vb; do
        [ -f /run/vubd/vduse-$r.inflight ] || vfail "inflight_no_record_$r($(ls /run/vubd 2>&1 | tr ' \n' __))"
    done
    timeout 300 "$U/fio" --name=inflight --filename="/dev/$A" --direct=1 --ioengine=libaio \
        --rw=randwrite --bs=4k --iodepth=32 --size=40M --loops=4 \
        --verify=crc32c --do_verify=1 --verify_fatal=1 >/tmp/fio-inflight.log 2>&1 &
    fpid=$!
    sleep 3
    kill -0 $fpid 2>/dev/null || vfail inflight_fio_ended_too_soon
    # The back vubd is held while the front one dies, so the front one surely has requests
    # out: at a moment between fio's phases it may have none, and then the restart would
    # prove nothing. It is let go before the front one is reaped, whose exit waits for them.
    kill -STOP "$bpid"
    sleep 1
    kill -KILL "$VPID"
    kill -CONT "$bpid"
    wait "$VPID" 2>/dev/null
    sleep 2
    kill -0 $fpid 2>/dev/null || vfail inflight_fio_did_not_wait
    # shellcheck disable=SC2086 # AARGS is a list of words
    vubd_start $ALOG $AARGS
    if ! wait_for 240 eval "! kill -0 $fpid 2>/dev/null"; then
        vfail inflight_fio_hangs
        kill -KILL $fpid 2>/dev/null
    fi
    wait $fpid
    vcheck inflight_fio_rc "$?" 0
    grep -q 'err= 0' /tmp/fio-inflight.log || {
        vfail inflight_fio_errors
        tail -n 20 /tmp/fio-inflight.log
    }
    vcheck inflight_same_node "$(vd_node va)" "$A"
    RESUB2=$(grep -o 'running again [0-9]* request' $ALOG | awk '{s += $3} END {print s + 0}')
    # The backend disk is slow (another VDUSE device): the killed vubd had requests out.
    [ "$RESUB2" -gt 0 ] || vfail inflight_nothing_resubmitted
    vd_stop
    vcheck inflight_front_exit "$VRC" 0
    VPID=$bpid
    vd_stop
    vcheck inflight_back_exit "$VRC" 0
    [ -e /dev/vduse/va ] || [ -e /dev/vduse/vb ] && vfail inflight_devices_stay
}

vduse_perf() {
    PLOG=/tmp/vubd-perf.log
    vubd_start $PLOG --vduse vp --null 1G --num-queues 1
    wait_for 20 [ -c /dev/vduse/vp ] || {
        vfail perf_start
        return
    }
    P=$(vd_attach vp) || {
        vfail perf_attach
        return
    }
    s=${P_perf_secs:-5}
    common="--name=p --filename=/dev/$P --direct=1 --ioengine=libaio --bs=4k --time_based --runtime=$s --cpus_allowed=0"
    # shellcheck disable=SC2086 # common is a list of words
    {
        RR1=$(vd_fio_iops $common --rw=randread --iodepth=1)
        RR32=$(vd_fio_iops $common --rw=randread --iodepth=32)
        RW1=$(vd_fio_iops $common --rw=randwrite --iodepth=1)
        RW32=$(vd_fio_iops $common --rw=randwrite --iodepth=32)
    }
    [ -n "$RR1" ] && [ -n "$RW32" ] || {
        vfail perf_fio
        cat /tmp/fio.err
    }
    PERF="iops_randread_qd1=$RR1 iops_randread_qd32=$RR32 iops_randwrite_qd1=$RW1 iops_randwrite_qd32=$RW32"
    vd_stop
    vcheck perf_exit_rc "$VRC" 0
}

test_vduse() {
    [ -c /dev/vduse/control ] || {
        result FAIL reason=no_vduse_control
        return
    }
    if [ "${P_verbose:-0}" = 1 ]; then
        for f in $LOG /tmp/vubd-back.log /tmp/vubd-front.log /tmp/vubd-perf.log; do
            : >$f
        done
        tail -f $LOG /tmp/vubd-back.log /tmp/vubd-front.log /tmp/vubd-perf.log &
    fi
    if [ -n "${P_only:-}" ]; then
        # one phase alone (debugging): vubd.only=NAME on the kernel command line
        "vduse_$P_only"
        # shellcheck disable=SC2086 # key=value lists
        result "$([ -z "$VFAIL" ] && echo PASS || echo FAIL)" only="$P_only" \
            inflight_resubmitted="${RESUB2:-none}" ${PERF:-} ${VFAIL:+reason=$VFAIL}
        return
    fi
    dd if=/dev/zero of=$IMG bs=1M count=0 seek=256 2>/dev/null
    vduse_stale
    rm -f /tmp/vrpc.sock
    # shellcheck disable=SC2086 # ARGS is a list of words
    vubd_start $LOG $ARGS
    wait_for 20 [ -S /tmp/vrpc.sock ] || vfail no_rpc_socket
    grep -q 'replaced the unused VDUSE device vd0' $LOG || vfail stale_not_replaced
    if ! vduse_geometry; then
        # The guest may have a task stuck in the kernel: report now.
        tail -n 80 $LOG
        dump_dmesg
        result FAIL reason="$VFAIL"
        return
    fi
    if true; then
        vduse_ext4
        vduse_fio
        vduse_rpc
        vduse_resize
        vduse_restart
    fi
    vduse_exit
    vduse_inflight
    vduse_perf
    grep -qE 'panicked|seccomp' $LOG /tmp/vubd-*.log && vfail vubd_panic_or_seccomp
    st=PASS
    if [ -n "$VFAIL" ]; then
        st=FAIL
        echo "vubd-init: ---- vubd log ----"
        tail -n 60 $LOG
        dump_dmesg
    fi
    # shellcheck disable=SC2086 # key=value lists
    result $st node="${N:-none}" $GEO ${QWRITES:-} rpc_node="${RPCNODE:-none}" \
        restart_s="${RESTART_S:-none}" resubmitted="${RESUBMITTED:-none}" \
        inflight_resubmitted="${RESUB2:-none}" ${PERF:-} \
        ${VFAIL:+reason=$VFAIL}
}
