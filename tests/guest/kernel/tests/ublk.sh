# shellcheck shell=sh
# ublk front end (vubd --ublk) inside the 6.12 guest, one boot:
#   geometry  devices from a config file (4 KiB null, read-only RAM, write-through RAM,
#             RAM): size, block sizes, I/O sizes, discard and write-zeroes limits, write
#             cache and read-only as /sys/block/ublkbN shows them; devices added and
#             removed by SIGHUP (control thread under seccomp), one refused because its
#             reactor's io_uring is full (torn down, no trace left); SIGTERM removes them
#   ext4      mkfs.ext4, files, sha256 across a remount, e2fsck -fn, fstrim (discard)
#   fio       crc32c verify: 4 KiB random at QD32, 4 KiB-512 KiB sequential at QD8
#   iostat    the queue's counters over the management socket
#   rpc       device_add of a ublk device at run time, data round trip, device_list,
#             device_resize answered "not supported" (6.12 has no UPDATE_SIZE),
#             device_remove: the node goes; a clashing ublk-id is refused
#   perf      4 KiB randread/randwrite at QD1 and QD32 on a null and a RAM device (IOPS)
#   unpriv    vubd as uid 1000 (UNPRIVILEGED_DEV), /dev/ublkcN given to it as a udev rule
#             would: data round trip, SIGTERM removes the device
# Sourced by the guest's init (helpers: say, result, wait_for, $VUBD, $U).

# everything that failed, comma-separated
UFAIL=""
ufail() {
    UFAIL="$UFAIL${UFAIL:+,}$1"
    say "ublk: FAIL $1"
}
# check NAME GOT WANT
check() { expect ufail "$@"; }
# vstart LOG ARGS...: vubd in the background, LOG started afresh; VPID
vstart() {
    : >"$1"
    vubd_start "$@"
}
# vstop: SIGTERM, vubd must exit within 20 s; VRC
vstop() { vubd_stop 20; }
# rpc JSON: one request on the management socket, the answer on stdout
rpc() { rpc_at /tmp/rpc.sock "$1"; }
gone() { [ ! -e "/dev/$1" ] && [ ! -e "/sys/block/$1" ]; }
# nqueues DISK: its blk-mq hardware queues (/sys/block/DISK/mq/0, 1, ...)
nqueues() { find "/sys/block/$1/mq/" -mindepth 1 -maxdepth 1 | wc -l; }

ublk_geometry() {
    cat >/tmp/geo.toml <<'T'
[[device]]
name = "null4k"
ublk = true
ublk-id = 0
null = "1G"
logical-block-size = 4096

[[device]]
name = "ro"
ublk = true
ublk-id = 1
ram = "64M"
read-only = true

[[device]]
name = "wt"
ublk = true
ublk-id = 2
ram = "64M"
writethrough = true

[[device]]
name = "ram"
ublk = true
ublk-id = 6
ram = "256M"
T
    vstart /tmp/geo.log --config /tmp/geo.toml
    if ! wait_for 30 [ -b /dev/ublkb6 ]; then
        ufail geometry_no_device
        tail -n 20 /tmp/geo.log
        vstop
        return
    fi
    b=ublkb0
    check size "$(cat /sys/block/$b/size)" 2097152
    check lbs "$(q $b logical_block_size)" 4096
    check pbs "$(q $b physical_block_size)" 4096
    check min_io "$(q $b minimum_io_size)" 4096
    check max_hw_kb "$(q $b max_hw_sectors_kb)" 512
    check discard_gran "$(q $b discard_granularity)" 4096
    check discard_max "$(q $b discard_max_hw_bytes)" 1073741824
    check wzeroes_max "$(q $b write_zeroes_max_bytes)" 1073741824
    check cache "$(q $b write_cache)" "write back"
    check fua "$(q $b fua)" 1
    check ro "$(cat /sys/block/$b/ro)" 0
    check hw_queues "$(nqueues $b)" 1
    check getsize64 "$("$U/blockdev" --getsize64 /dev/$b)" 1073741824
    dd if=/dev/$b of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null || ufail null_read
    b=ublkb1
    check ro_size "$(cat /sys/block/$b/size)" 131072
    check ro_lbs "$(q $b logical_block_size)" 512
    check ro_ro "$(cat /sys/block/$b/ro)" 1
    check ro_cache "$(q $b write_cache)" "write through"
    check ro_discard "$(q $b discard_max_bytes)" 0
    dd if=/dev/zero of=/dev/$b bs=4k count=1 oflag=direct 2>/dev/null && ufail ro_write_accepted
    b=ublkb2
    check wt_cache "$(q $b write_cache)" "write through"
    check wt_ro "$(cat /sys/block/$b/ro)" 0
    check wt_discard "$(q $b discard_max_hw_bytes)" 1073741824
    GEO="lbs0=$(q ublkb0 logical_block_size) discard_max0=$(q ublkb0 discard_max_hw_bytes) cache0=$(q ublkb0 write_cache | tr ' ' _) cache2=$(q ublkb2 write_cache | tr ' ' _)"
    # SIGHUP: a device added from the file, then removed, by the (confined) control thread
    cp /tmp/geo.toml /tmp/geo.orig
    printf '\n[[device]]\nname = "hup"\nublk = true\nublk-id = 4\nnull = "64M"\n' >>/tmp/geo.toml
    kill -HUP "$VPID"
    wait_for 20 [ -b /dev/ublkb4 ] || ufail hup_add
    check hup_size "$(cat /sys/block/ublkb4/size 2>/dev/null)" 131072
    cp /tmp/geo.orig /tmp/geo.toml
    kill -HUP "$VPID"
    wait_for 20 gone ublkb4 || ufail hup_remove
    [ -b /dev/ublkb0 ] || ufail hup_removed_others
    # A queue whose reactor's io_uring has no room left for its fetches: the device is
    # refused with a clear error and torn down (STOP_DEV, DEL_DEV on a device that never
    # started). The reactor's ring holds 2048 operations, a queue 64, and 64 stay free: the
    # 31 devices 0, 1, 2, 6 and 10-36 fit, 37 does not.
    for i in $(seq 10 37); do
        printf '\n[[device]]\nname = "many%s"\nublk = true\nublk-id = %s\nnull = "64M"\n' "$i" "$i" >>/tmp/geo.toml
    done
    kill -HUP "$VPID"
    wait_for 90 grep -q 'cannot add device many37' /tmp/geo.log || ufail full_ring_not_refused
    wait_for 10 [ -b /dev/ublkb36 ] || ufail many36_missing
    grep 'cannot add device many37' /tmp/geo.log | grep -q 'has room for' || ufail full_ring_message
    FULL=$(grep -o 'reactor_0 has room for [0-9]* more' /tmp/geo.log | head -n 1 | tr ' ' _)
    wait_for 10 gone ublkc37 || ufail many37_left
    [ -e /sys/class/ublk-char/ublkc37 ] && ufail many37_char_class_left
    cp /tmp/geo.orig /tmp/geo.toml
    kill -HUP "$VPID"
    wait_for 90 gone ublkb36 || ufail many_remove
    ublk_perf null 0
    ublk_perf ram 6
    vstop
    check geo_exit "$VRC" 0
    for b in ublkb0 ublkb1 ublkb2 ublkb6 ublkc0 ublkc1 ublkc2 ublkc6; do
        gone $b || ufail "$b"_left_after_sigterm
    done
    grep -qE 'panicked|vubd: seccomp' /tmp/geo.log && ufail geo_log
}

# ext4, fio, iostat and RPC on one vubd with a management socket
ublk_fs_fio_rpc() {
    # two reactors: two hardware queues
    vstart /tmp/main.log -m 0-1 --rpc-socket /tmp/rpc.sock --ublk --ublk-id 3 --ram 256M
    if ! wait_for 30 [ -b /dev/ublkb3 ]; then
        ufail main_no_device
        tail -n 20 /tmp/main.log
        vstop
        return
    fi
    d=/dev/ublkb3
    check main_hw_queues "$(nqueues ublkb3)" 2
    # --- ext4 ---
    "$U/mkfs.ext4" -q -F $d || ufail mkfs
    mount -t ext4 $d /mnt || ufail mount
    i=1
    while [ $i -le 8 ]; do
        dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i * 16)) 2>/dev/null || ufail write_f$i
        i=$((i + 1))
    done
    mkdir -p /mnt/dir && echo hello >/mnt/dir/small
    (cd /mnt && sha256sum f* dir/small >/tmp/sums)
    sync
    rm -f /mnt/f8
    "$U/fstrim" /mnt || ufail fstrim
    grep -v ' f8$' /tmp/sums >/tmp/sums7
    umount /mnt || ufail umount
    "$U/e2fsck" -fn $d >/tmp/fsck.out 2>&1 || {
        ufail e2fsck
        tail -n 20 /tmp/fsck.out
    }
    mount -t ext4 $d /mnt || ufail remount
    (cd /mnt && sha256sum -c /tmp/sums7 >/tmp/sumcheck 2>&1) || {
        ufail checksums
        cat /tmp/sumcheck
    }
    umount /mnt
    # --- fio with verify ---
    t0=$(cut -d' ' -f1 /proc/uptime)
    "$U/fio" --name=rand4k --filename=$d --direct=1 --ioengine=libaio --rw=randwrite \
        --bs=4k --iodepth=32 --size=64M --verify=crc32c --verify_fatal=1 \
        --output=/tmp/fio1.out || {
        ufail fio_rand4k
        tail -n 30 /tmp/fio1.out
    }
    "$U/fio" --name=seqmix --filename=$d --direct=1 --ioengine=libaio --rw=write \
        --bsrange=4k-512k --iodepth=8 --size=128M --offset=64M --verify=crc32c \
        --verify_fatal=1 --output=/tmp/fio2.out || {
        ufail fio_seqmix
        tail -n 30 /tmp/fio2.out
    }
    FIO_S=$(awk "BEGIN{print $(cut -d' ' -f1 /proc/uptime) - $t0}")
    # --- iostat: the ublk queue is counted ---
    rpc '{"jsonrpc":"2.0","id":1,"method":"iostat","params":{"name":"dev0"}}' >/tmp/iostat.json
    # keys come sorted: each queue's counters, then the device's total, last
    rbytes=$(grep -o '"read":{"bytes":[0-9]*' /tmp/iostat.json | tail -n 1 | grep -o '[0-9]*$')
    wbytes=$(grep -o '"write":{"bytes":[0-9]*' /tmp/iostat.json | tail -n 1 | grep -o '[0-9]*$')
    [ "${rbytes:-0}" -ge $((192 << 20)) ] || ufail "iostat_read_bytes_${rbytes:-none}"
    [ "${wbytes:-0}" -ge $((192 << 20)) ] || ufail "iostat_write_bytes_${wbytes:-none}"
    grep -q '"queue":0' /tmp/iostat.json || ufail iostat_no_queue0
    grep -q '"queue":1' /tmp/iostat.json || ufail iostat_no_queue1
    # --- RPC: a ublk device added and removed at run time ---
    rpc '{"jsonrpc":"2.0","id":2,"method":"device_add","params":{"name":"hot","ublk":true,"ublk-id":5,"ram":"64M"}}' >/tmp/add.json
    grep -q '"result"' /tmp/add.json || {
        ufail rpc_add
        cat /tmp/add.json
    }
    wait_for 10 [ -b /dev/ublkb5 ] || ufail rpc_add_no_node
    dd if=/dev/urandom of=/tmp/pat bs=64k count=32 2>/dev/null
    dd if=/tmp/pat of=/dev/ublkb5 bs=64k oflag=direct 2>/dev/null || ufail hot_write
    dd if=/dev/ublkb5 of=/tmp/back bs=64k count=32 iflag=direct 2>/dev/null || ufail hot_read
    cmp -s /tmp/pat /tmp/back || ufail hot_data
    rpc '{"jsonrpc":"2.0","id":3,"method":"device_list"}' >/tmp/list.json
    grep -q '"kernel-device":"/dev/ublkb5"' /tmp/list.json || ufail list_kernel_device
    grep -q '"front-end":"ublk"' /tmp/list.json || ufail list_front_end
    rpc '{"jsonrpc":"2.0","id":4,"method":"device_resize","params":{"name":"hot","size":"128M"}}' >/tmp/resize.json
    RESIZE=$(grep -o '"message":"[^"]*"' /tmp/resize.json | head -n 1)
    if ! grep -q '"error"' /tmp/resize.json || ! grep -q 'has no UPDATE_SIZE' /tmp/resize.json || ! grep -q '"code":-32004' /tmp/resize.json; then
        ufail resize_not_refused
        cat /tmp/resize.json
    fi
    check hot_size_after_resize "$("$U/blockdev" --getsize64 /dev/ublkb5)" 67108864
    rpc '{"jsonrpc":"2.0","id":5,"method":"device_add","params":{"name":"clash","ublk":true,"ublk-id":5,"null":"1G"}}' >/tmp/clash.json
    grep -q '"error"' /tmp/clash.json || ufail clashing_id_accepted
    rpc '{"jsonrpc":"2.0","id":6,"method":"device_remove","params":{"name":"hot"}}' >/tmp/remove.json
    grep -q '"result"' /tmp/remove.json || {
        ufail rpc_remove
        cat /tmp/remove.json
    }
    wait_for 10 gone ublkb5 || ufail hot_node_left
    gone ublkc5 || ufail hot_char_left
    [ -e /sys/class/ublk-char/ublkc5 ] && ufail hot_char_class_left
    vstop
    check main_exit "$VRC" 0
    gone ublkb3 || ufail ublkb3_left_after_sigterm
    grep -qE 'panicked|vubd: seccomp' /tmp/main.log && ufail main_log
}

# ublk_perf NAME ID: 4 KiB random reads and writes, QD1 and QD32, 3 s each, on /dev/ublkbID;
# IOPS into PERF. fio runs on CPU 0, vubd's reactor on CPU 1 (its default: the last CPU): a
# polling reactor and the application on one CPU take turns on it (see docs/ublk.md).
ublk_perf() {
    for rw in randread randwrite; do
        for qd in 1 32; do
            taskset -c 0 "$U/fio" --name=p --filename="/dev/ublkb$2" --direct=1 --ioengine=libaio \
                --rw=$rw --bs=4k --iodepth=$qd --time_based --runtime=3 --size=256M \
                --output-format=terse --terse-version=3 --output=/tmp/perf.out || ufail "perf_$1_$rw$qd"
            # terse v3: field 8 read IOPS, field 49 write IOPS
            if [ $rw = randread ]; then f=8; else f=49; fi
            PERF="$PERF $1_${rw}_qd$qd=$(cut -d';' -f$f /tmp/perf.out)"
        done
    done
}

# vubd as an unprivileged user: the kernel keeps UNPRIVILEGED_DEV (no recovery), every
# command names /dev/ublkcN, which a udev rule would give the user: here, chown.
ublk_unprivileged() {
    chmod 0666 /dev/ublk-control
    grep -q '^vu:' /etc/passwd 2>/dev/null || {
        echo 'vu:x:1000:1000::/tmp:/bin/sh' >>/etc/passwd
        echo 'vu:x:1000:' >>/etc/group
    }
    # su (busybox) execs the shell, which execs vubd: $! is vubd
    su -p -s /bin/sh vu -c "RUST_LOG=${P_rust_log:-info} exec $VUBD --ublk --ublk-id 9 --ram 64M" \
        >/tmp/unpriv.log 2>&1 &
    VPID=$!
    if wait_for 10 [ -c /dev/ublkc9 ]; then
        chown 1000:1000 /dev/ublkc9
    else
        ufail unpriv_no_char_dev
    fi
    if wait_for 20 [ -b /dev/ublkb9 ]; then
        dd if=/tmp/pat of=/dev/ublkb9 bs=64k oflag=direct 2>/dev/null || ufail unpriv_write
        dd if=/dev/ublkb9 of=/tmp/back bs=64k count=32 iflag=direct 2>/dev/null || ufail unpriv_read
        cmp -s /tmp/pat /tmp/back || ufail unpriv_data
        grep -q 'UNPRIVILEGED_DEV' /tmp/unpriv.log || ufail unpriv_flag
    else
        ufail unpriv_no_device
    fi
    vstop
    check unpriv_exit "$VRC" 0
    wait_for 10 gone ublkb9 || ufail unpriv_node_left
    gone ublkc9 || ufail unpriv_char_left
    chmod 0600 /dev/ublk-control
}

test_ublk() {
    PERF=""
    ublk_geometry
    ublk_fs_fio_rpc
    ublk_unprivileged
    st=PASS
    [ -z "$UFAIL" ] || st=FAIL
    if [ $st = FAIL ]; then
        for f in /tmp/geo.log /tmp/main.log /tmp/unpriv.log; do
            echo "vubd-init: ---- $f ----"
            tail -n 40 $f
        done
        dump_dmesg
    fi
    # shellcheck disable=SC2086 # GEO and PERF are lists of key=value words
    result $st $GEO full_ring="${FULL:-none}" fio_s="${FIO_S:-none}" iostat_read_bytes="${rbytes:-none}" \
        iostat_write_bytes="${wbytes:-none}" resize_answer="$(echo "${RESIZE:-none}" | tr ' ' _)" \
        $PERF ${UFAIL:+reason=$UFAIL}
}
