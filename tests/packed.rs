//! Packed virtqueues (VIRTIO_F_RING_PACKED) through vubd's vhost-user socket, driven by the
//! raw packed-ring driver of `frontend`: byte-exact I/O, indirect tables, many requests in
//! flight completing in any order, laps around the ring, event suppression both ways,
//! hostile chains, GET/SET_VRING_BASE with both positions, dirty logging, and INFLIGHT_SHMFD
//! resubmission after vubd is killed.

mod common;
mod frontend;

use common::*;
use frontend::*;
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const PAGE: u64 = 4096;
const MEM: u64 = 8 * MIB;

/// Headers and status bytes of request `slot` (one 256-byte block each), and its data buffer
/// (64 KiB each, from 1 MiB above).
fn hdr_at(slot: u16) -> u64 {
    DATA_BASE + 0x100 * u64::from(slot)
}
fn status_at(slot: u16) -> u64 {
    hdr_at(slot) + 16
}
fn buf_at(slot: u16) -> u64 {
    DATA_BASE + MIB + 0x1_0000 * u64::from(slot)
}

fn connect(path: &Path, mem: &GuestMemory, features: u64, protocol: u64) -> Frontend {
    let mut fe = Frontend::connect(path);
    fe.handshake_features(F_RING_PACKED | features, protocol);
    assert!(fe.share(mem), "SET_MEM_TABLE accepted");
    fe
}

fn file_server(dir: &Path) -> (Server, PathBuf) {
    let img = create_file(dir, "disk.img", 16 * MIB);
    let img_arg = img.display().to_string();
    let server = Server::start(dir, "vubd", &["--blk-file", img_arg.as_str(), "--buffered"]);
    (server, img)
}

/// Offers a request of `kind` at `sector` with `data` buffers (each (len, write-only)) laid
/// out from `buf_at(slot)`, header and status at `slot`'s; returns its buffer id.
fn offer(
    mem: &GuestMemory,
    ring: &mut PackedRing,
    slot: u16,
    kind: u32,
    sector: u64,
    lens: &[u32],
) -> u16 {
    blk_header(mem, hdr_at(slot), kind, sector);
    mem.write(status_at(slot), &[0xff]);
    let w = if kind == T_IN { DESC_F_WRITE } else { 0 };
    let mut chain = vec![(hdr_at(slot), 16, 0)];
    let mut at = buf_at(slot);
    for &l in lens {
        chain.push((at, l, w));
        at += u64::from(l);
    }
    chain.push((status_at(slot), 1, DESC_F_WRITE));
    ring.submit(mem, &chain)
}

/// Runs one request to completion; returns (status, used length).
fn run(
    mem: &GuestMemory,
    ring: &mut PackedRing,
    slot: u16,
    kind: u32,
    sector: u64,
    lens: &[u32],
) -> (u8, u32) {
    let id = offer(mem, ring, slot, kind, sector, lens);
    let (got, len) = ring.wait_used(mem, WAIT).expect("request completed");
    assert_eq!(got, id, "the only request in flight");
    (mem.read(status_at(slot), 1)[0], len)
}

fn write(mem: &GuestMemory, ring: &mut PackedRing, slot: u16, sector: u64, data: &[u8]) -> u8 {
    mem.write(buf_at(slot), data);
    run(mem, ring, slot, T_OUT, sector, &[data.len() as u32]).0
}

fn read(mem: &GuestMemory, ring: &mut PackedRing, slot: u16, sector: u64, len: u32) -> Vec<u8> {
    mem.write(buf_at(slot), &vec![0xee; len as usize]);
    let (st, used) = run(mem, ring, slot, T_IN, sector, &[len]);
    assert_eq!((st, used), (S_OK, len + 1), "read status and used length");
    mem.read(buf_at(slot), len as usize)
}

/// Drains the call eventfd: how many signals arrived since the last call.
fn signals(ring: &PackedRing) -> u64 {
    let mut b = [0u8; 8];
    match (&ring.call).read(&mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

#[test]
fn packed_is_offered_and_reads_writes_flushes_are_byte_exact() {
    let dir = test_dir();
    let (mut server, img) = file_server(dir.path());
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&server.socket, &mem, 0, 0);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 16).expect("packed ring set up");

    let a = pattern(1, 0, 8192);
    assert_eq!(write(&mem, &mut ring, 0, 0, &a), S_OK);
    // Two data descriptors in one request.
    let b = pattern(2, 64 * 512, 12288);
    mem.write(buf_at(1), &b);
    assert_eq!(run(&mem, &mut ring, 1, T_OUT, 64, &[4096, 8192]), (S_OK, 1));
    assert_eq!(run(&mem, &mut ring, 2, T_FLUSH, 0, &[]), (S_OK, 1));
    assert_bytes_eq("read a", &read(&mem, &mut ring, 3, 0, 8192), &a);
    assert_bytes_eq("read b", &read(&mem, &mut ring, 4, 64, 12288), &b);
    // A read past the end fails with IOERR and a used length of 1.
    assert_eq!(
        run(&mem, &mut ring, 5, T_IN, 16 * MIB / 512 - 1, &[4096]),
        (S_IOERR, 1)
    );
    drop(fe);
    server.terminate();
    assert_bytes_eq("file a", &read_file_at(&img, 0, 8192), &a);
    assert_bytes_eq("file b", &read_file_at(&img, 64 * 512, 12288), &b);
}

#[test]
fn indirect_descriptors() {
    let dir = test_dir();
    let (mut server, img) = file_server(dir.path());
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&server.socket, &mem, F_INDIRECT_DESC, 0);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 8).expect("packed ring set up");
    let table = DATA_BASE + 0x8000;
    let data = pattern(3, 8 * 512, 16384);
    blk_header(&mem, hdr_at(0), T_OUT, 8);
    mem.write(status_at(0), &[0xff]);
    mem.write(buf_at(0), &data);
    // Four data segments in the table.
    let mut chain = vec![(hdr_at(0), 16, 0)];
    for k in 0..4 {
        chain.push((buf_at(0) + 4096 * k, 4096, 0));
    }
    chain.push((status_at(0), 1, DESC_F_WRITE));
    let id = ring.submit_indirect(&mem, table, &chain);
    assert_eq!(ring.wait_used(&mem, WAIT), Some((id, 1)));
    assert_eq!(mem.read(status_at(0), 1)[0], S_OK);

    blk_header(&mem, hdr_at(1), T_IN, 8);
    mem.write(status_at(1), &[0xff]);
    mem.write(buf_at(1), &[0u8; 16384]);
    let chain = [
        (hdr_at(1), 16, 0),
        (buf_at(1), 10000, DESC_F_WRITE),
        (buf_at(1) + 10000, 6384, DESC_F_WRITE),
        (status_at(1), 1, DESC_F_WRITE),
    ];
    let id = ring.submit_indirect(&mem, table + 0x1000, &chain);
    assert_eq!(ring.wait_used(&mem, WAIT), Some((id, 16385)));
    assert_eq!(mem.read(status_at(1), 1)[0], S_OK);
    assert_bytes_eq("indirect read", &mem.read(buf_at(1), 16384), &data);
    drop(fe);
    server.terminate();
    assert_bytes_eq("file", &read_file_at(&img, 8 * 512, 16384), &data);
}

#[test]
fn many_in_flight_around_the_ring_several_times() {
    let dir = test_dir();
    let (mut server, img) = file_server(dir.path());
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&server.socket, &mem, 0, 0);
    // 16 slots; chains of 2 to 5 descriptors, as many in flight as fit: more than 20 laps.
    let size = 16u16;
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, size).expect("packed ring set up");
    let mut want: Vec<Vec<u8>> = Vec::new();
    let mut in_flight: HashMap<u16, (u16, u32, u32)> = HashMap::new(); // id -> (slot, kind, ndesc)
    let mut slots_used = 0u32;
    let mut next = 0u32;
    let total = 120u32;
    let mut done = 0u32;
    let mut out_of_order = 0;
    let mut laps_seen = 0;
    let mut last_wrap = ring.used_wrap;
    // Request k: a write of k's pattern to sector 16 k (slot k % 32), later read back.
    while done < total {
        while next < total {
            let k = next;
            let segs = 1 + k % 4;
            let ndesc = segs + 2;
            if slots_used + ndesc > u32::from(size) {
                break;
            }
            let slot = (k % 32) as u16;
            if in_flight.values().any(|&(s, _, _)| s == slot) {
                break;
            }
            let len = 512 * (1 + k % 8);
            let data = pattern(100 + u64::from(k), 16 * 512 * u64::from(k), len as usize);
            mem.write(buf_at(slot), &data);
            want.push(data);
            let lens: Vec<u32> = split_len(len, segs);
            let id = offer(&mem, &mut ring, slot, T_OUT, 16 * u64::from(k), &lens);
            in_flight.insert(id, (slot, k, ndesc));
            slots_used += ndesc;
            next += 1;
        }
        let (id, used) = ring.wait_used(&mem, WAIT).expect("a completion");
        let (slot, k, ndesc) = in_flight.remove(&id).expect("a buffer id in flight, once");
        if in_flight.values().any(|&(_, k2, _)| k2 < k) {
            out_of_order += 1;
        }
        assert_eq!(used, 1);
        assert_eq!(mem.read(status_at(slot), 1)[0], S_OK, "request {k}");
        slots_used -= ndesc;
        done += 1;
        if ring.used_wrap != last_wrap {
            laps_seen += 1;
            last_wrap = ring.used_wrap;
        }
    }
    assert!(laps_seen >= 10, "went round the ring {laps_seen} times");
    eprintln!("completions out of submission order: {out_of_order}");
    // Read everything back through the ring, several reads in flight.
    for k in 0..total {
        let len = 512 * (1 + k % 8);
        let got = read(&mem, &mut ring, (k % 32) as u16, 16 * u64::from(k), len);
        assert_bytes_eq(&format!("request {k}"), &got, &want[k as usize]);
    }
    drop(fe);
    server.terminate();
    for k in 0..total {
        let len = 512 * (1 + k % 8);
        assert_bytes_eq(
            &format!("file, request {k}"),
            &read_file_at(&img, 16 * 512 * u64::from(k), len as usize),
            &want[k as usize],
        );
    }
}

/// `len` in `n` pieces, multiples of 512 where possible.
fn split_len(len: u32, n: u32) -> Vec<u32> {
    let mut v = Vec::new();
    let mut left = len;
    for i in 0..n {
        let piece = if i + 1 == n {
            left
        } else {
            (left / (n - i)).max(1)
        };
        v.push(piece);
        left -= piece;
    }
    v.retain(|&l| l > 0);
    v
}

#[test]
fn event_suppression_both_ways() {
    let dir = test_dir();
    let server = Server::start(dir.path(), "vubd", &["--ram", "16M"]);
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&server.socket, &mem, F_EVENT_IDX, 0);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 8).expect("packed ring set up");
    let flush = |mem: &GuestMemory, ring: &mut PackedRing, slot: u16| {
        offer(mem, ring, slot, T_FLUSH, 0, &[])
    };

    // The driver wants no signals: completions arrive, the call fd stays quiet. (A queue
    // signals once when it starts: drained first.)
    mem.write_u16(ring.driver_event + 2, 1); // flags: DISABLE
    std::thread::sleep(Duration::from_millis(100));
    signals(&ring);
    for s in 0..3 {
        let id = flush(&mem, &mut ring, s);
        assert_eq!(ring.wait_used(&mem, WAIT), Some((id, 1)));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(signals(&ring), 0, "no signal while disabled");

    // EVENT_IDX: a signal once the used position passes the one the driver names: 2 slots
    // (each flush is 2 descriptors) ahead, in the current lap.
    let target = ring.used_idx + 2;
    let (idx, wrap) = if target >= ring.size {
        (target - ring.size, !ring.used_wrap)
    } else {
        (target, ring.used_wrap)
    };
    mem.write_u16(ring.driver_event, idx | if wrap { 0x8000 } else { 0 });
    mem.write_u16(ring.driver_event + 2, 2); // flags: DESC
    let id = flush(&mem, &mut ring, 3);
    assert_eq!(ring.wait_used(&mem, WAIT), Some((id, 1)));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(signals(&ring), 0, "event slot not passed yet");
    let id = flush(&mem, &mut ring, 4);
    assert_eq!(ring.wait_used(&mem, WAIT), Some((id, 1)));
    let deadline = std::time::Instant::now() + WAIT;
    while signals(&ring) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "signal once the event slot was passed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // ENABLE: every completion may signal.
    mem.write_u16(ring.driver_event + 2, 0);
    let id = flush(&mem, &mut ring, 5);
    assert_eq!(ring.wait_used(&mem, WAIT), Some((id, 1)));
    let deadline = std::time::Instant::now() + WAIT;
    while signals(&ring) == 0 {
        assert!(std::time::Instant::now() < deadline, "signal when enabled");
        std::thread::sleep(Duration::from_millis(1));
    }

    // The device side: once the queue goes idle vubd asks for a kick at the next avail
    // position (EVENT_IDX: flags DESC, off_wrap = the driver's avail position and lap).
    let want = ring.avail_idx | if ring.avail_wrap { 0x8000 } else { 0 };
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let flags = mem.read_u16(ring.device_event + 2);
        let off_wrap = mem.read_u16(ring.device_event);
        if flags == 2 && off_wrap == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "device event: flags {flags}, off_wrap {off_wrap:#x}, want {want:#x}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // A kicked request wakes it.
    let id = flush(&mem, &mut ring, 6);
    assert_eq!(ring.wait_used(&mem, WAIT), Some((id, 1)));
    drop(fe);
}

#[test]
fn vring_base_round_trip_mid_wrap() {
    let dir = test_dir();
    let (mut server, img) = file_server(dir.path());
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&server.socket, &mem, 0, 0);
    let size = 8u16;
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, size).expect("packed ring set up");
    // 3 descriptors each: 5 requests leave both positions at 7 in lap 2 (wrap 0).
    for k in 0..5u16 {
        assert_eq!(
            write(
                &mem,
                &mut ring,
                k,
                u64::from(k) * 8,
                &pattern(u64::from(k), 0, 512)
            ),
            S_OK
        );
    }
    assert_eq!((ring.avail_idx, ring.avail_wrap), (7, false));
    let r = fe.get(GET_VRING_BASE, &vring_state(0, 0)).unwrap();
    let base = u32::from_le_bytes(r.payload[4..8].try_into().unwrap());
    assert_eq!(
        base,
        ring.base(),
        "GET_VRING_BASE: avail and used positions with wrap counters"
    );
    assert_eq!(base, 0x0007_0007);

    // Restart at that base (as QEMU does after a stop): the ring goes on across the end.
    assert!(ring.configure(&mut fe, base));
    for k in 5..9u16 {
        assert_eq!(
            write(
                &mem,
                &mut ring,
                k,
                u64::from(k) * 8,
                &pattern(u64::from(k), 0, 512)
            ),
            S_OK
        );
    }
    let r = fe.get(GET_VRING_BASE, &vring_state(0, 0)).unwrap();
    assert_eq!(
        u32::from_le_bytes(r.payload[4..8].try_into().unwrap()),
        ring.base()
    );
    drop(fe);

    // A new frontend that starts a ring mid-lap (a migration target): positions 3, wrap 0.
    let mem2 = GuestMemory::new(MEM);
    let mut fe = connect(&server.socket, &mem2, 0, 0);
    let mut ring =
        PackedRing::setup_at(&mut fe, &mem2, 0, size, 0x0003_0003).expect("set up mid-lap");
    for k in 0..6u16 {
        assert_eq!(
            write(
                &mem2,
                &mut ring,
                k,
                100 + u64::from(k) * 8,
                &pattern(50 + u64::from(k), 0, 512)
            ),
            S_OK
        );
    }
    assert_bytes_eq(
        "read back",
        &read(&mem2, &mut ring, 7, 100, 512),
        &pattern(50, 0, 512),
    );
    // A base beyond the ring is refused when the ring starts (after a stop, as the protocol
    // wants SET_VRING_BASE on stopped rings only).
    fe.get(GET_VRING_BASE, &vring_state(0, 0)).unwrap();
    let r = PackedRing::setup_at(&mut fe, &mem2, 0, size, 0x0009_8000);
    assert!(r.is_none(), "base index beyond the ring size accepted");
    drop(fe);
    server.terminate();
    for k in 0..9u64 {
        assert_bytes_eq(
            "file",
            &read_file_at(&img, k * 8 * 512, 512),
            &pattern(k, 0, 512),
        );
    }
}

type Hostile = TargetAndBystander;

fn hostile() -> Hostile {
    target_and_bystander()
}

/// The bystander does a byte-exact round trip, the server lives, and the target serves a
/// new packed frontend.
fn assert_unharmed(h: &mut Hostile) {
    h.server.assert_alive();
    let mut c = Client::connect(&h.bystander, 1);
    let data = pattern(7, 4096, 8192);
    ok("bystander write", c.disk().write(4096, &data));
    let got = ok("bystander read", c.disk().read(4096, 8192));
    assert_bytes_eq("bystander data", &got, &data);
    drop(c);
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&h.target, &mem, 0, 0);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 16).expect("target ring");
    assert_eq!(run(&mem, &mut ring, 0, T_FLUSH, 0, &[]), (S_OK, 1));
    h.server.assert_alive();
}

/// The queue offered something it must refuse: nothing completes, the device's other queue
/// still serves.
fn assert_queue_stops(fe: &mut Frontend, mem: &GuestMemory, ring: &mut PackedRing) {
    ring.kick_now();
    assert_eq!(
        ring.wait_used(mem, Duration::from_millis(500)),
        None,
        "a malformed chain must not complete"
    );
    let mut other = PackedRing::setup(fe, mem, 1, 16).expect("queue 1");
    assert_eq!(
        run(mem, &mut other, 9, T_FLUSH, 0, &[]),
        (S_OK, 1),
        "the other queue serves"
    );
}

#[test]
fn hostile_chains_stop_the_queue_or_fail_and_never_harm_others() {
    let mut h = hostile();
    let a = DESC_F_AVAIL;

    // NEXT all the way round the ring (the packed form of a descriptor loop).
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&h.target, &mem, 0, 0);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 8).unwrap();
    blk_header(&mem, hdr_at(0), T_IN, 0);
    for i in 0..8 {
        ring.put_desc(&mem, i, hdr_at(0), 16, 0, DESC_F_NEXT | a);
    }
    assert_queue_stops(&mut fe, &mem, &mut ring);
    drop(fe);
    assert_unharmed(&mut h);

    // A buffer id beyond the queue size.
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&h.target, &mem, 0, 0);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 8).unwrap();
    blk_header(&mem, hdr_at(0), T_FLUSH, 0);
    ring.offer_raw(
        &mem,
        &[
            (hdr_at(0), 16, DESC_F_NEXT, 99),
            (status_at(0), 1, DESC_F_WRITE, 99),
        ],
        true,
    );
    assert_queue_stops(&mut fe, &mem, &mut ring);
    drop(fe);

    // A status descriptor of length 0: there is nowhere to report the error.
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&h.target, &mem, 0, 0);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 8).unwrap();
    blk_header(&mem, hdr_at(0), T_FLUSH, 0);
    ring.submit(&mem, &[(hdr_at(0), 16, 0), (status_at(0), 0, DESC_F_WRITE)]);
    assert_queue_stops(&mut fe, &mem, &mut ring);
    drop(fe);

    // A chain whose second descriptor the driver never made available.
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&h.target, &mem, 0, 0);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 8).unwrap();
    ring.offer_raw(
        &mem,
        &[
            (hdr_at(0), 16, DESC_F_NEXT | a, 0),
            (status_at(0), 1, DESC_F_WRITE, 0),
        ],
        false,
    );
    assert_queue_stops(&mut fe, &mem, &mut ring);
    drop(fe);
    assert_unharmed(&mut h);

    // Failures the device can report: IOERR, the queue goes on.
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&h.target, &mem, F_INDIRECT_DESC, 0);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 8).unwrap();
    // A device-writable header.
    blk_header(&mem, hdr_at(0), T_IN, 0);
    mem.write(status_at(0), &[0xff]);
    let id = ring.submit(
        &mem,
        &[
            (hdr_at(0), 16, DESC_F_WRITE),
            (buf_at(0), 512, DESC_F_WRITE),
            (status_at(0), 1, DESC_F_WRITE),
        ],
    );
    assert_eq!(ring.wait_used(&mem, WAIT), Some((id, 1)));
    assert_eq!(mem.read(status_at(0), 1)[0], S_IOERR, "writable header");
    // A buffer outside guest memory.
    blk_header(&mem, hdr_at(2), T_IN, 0);
    mem.write(status_at(2), &[0xff]);
    let id = ring.submit(
        &mem,
        &[
            (hdr_at(2), 16, 0),
            (MEM + 0x1000, 512, DESC_F_WRITE),
            (status_at(2), 1, DESC_F_WRITE),
        ],
    );
    assert_eq!(ring.wait_used(&mem, WAIT), Some((id, 1)));
    assert_eq!(
        mem.read(status_at(2), 1)[0],
        S_IOERR,
        "buffer outside memory"
    );
    // The queue still serves.
    assert_eq!(run(&mem, &mut ring, 3, T_FLUSH, 0, &[]), (S_OK, 1));
    // An indirect table inside an indirect table stops the queue.
    let table = DATA_BASE + 0x8000;
    blk_header(&mem, hdr_at(4), T_IN, 0);
    let mut d = hdr_at(4).to_le_bytes().to_vec();
    d.extend_from_slice(&16u32.to_le_bytes());
    d.extend_from_slice(&0u16.to_le_bytes());
    d.extend_from_slice(&0u16.to_le_bytes());
    let mut nested = table.to_le_bytes().to_vec();
    nested.extend_from_slice(&32u32.to_le_bytes());
    nested.extend_from_slice(&0u16.to_le_bytes());
    nested.extend_from_slice(&DESC_F_INDIRECT.to_le_bytes());
    d.extend_from_slice(&nested);
    mem.write(table, &d);
    let _ = ring.submit(&mem, &[(table, 32, DESC_F_INDIRECT)]);
    assert_queue_stops(&mut fe, &mem, &mut ring);
    drop(fe);
    assert_unharmed(&mut h);
}

/// SET_LOG_BASE with `log` (size, offset 0); waits for the answer.
fn set_log_base(fe: &mut Frontend, log: &GuestMemory, size: u64) {
    let mut p = size.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    fe.send(SET_LOG_BASE, &p, &[log.file.as_raw_fd()], false)
        .unwrap();
    assert_eq!(fe.recv().unwrap().request, SET_LOG_BASE);
}

fn dirty_pages(log: &GuestMemory) -> Vec<u64> {
    let bytes = log.read(0, (MEM / PAGE / 8) as usize);
    let mut pages = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.push(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

#[test]
fn dirty_log_marks_used_descriptors_event_area_data_and_status() {
    let dir = test_dir();
    let (_server, img) = file_server(dir.path());
    let disk = pattern(11, 8 * 512, 8192);
    std::fs::write(&img, {
        let mut v = vec![0u8; 8 * 512];
        v.extend_from_slice(&disk);
        v
    })
    .unwrap();
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&_server.socket, &mem, 0, PF_LOG_SHMFD);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 16).expect("packed ring set up");
    let log_bytes = MEM / PAGE / 8;
    let log = GuestMemory::new(4096);
    set_log_base(&mut fe, &log, log_bytes);
    assert_eq!(read(&mem, &mut ring, 0, 8, 8192), disk);
    assert_eq!(dirty_pages(&log), Vec::<u64>::new(), "LOG_ALL not on yet");
    // LOG_ALL on (with every other feature, as QEMU sends it).
    let f = F_VERSION_1 | F_PROTOCOL_FEATURES | F_RING_PACKED | F_LOG_ALL;
    assert!(fe.ack(SET_FEATURES, &u64_payload(f), &[]).unwrap());
    // Data from the middle of a page: 3 pages.
    let data = DATA_BASE + MIB + 0x3800;
    blk_header(&mem, hdr_at(1), T_IN, 8);
    mem.write(status_at(1) + 0x4000, &[0xff]);
    let id = ring.submit(
        &mem,
        &[
            (hdr_at(1), 16, 0),
            (data, 8192, DESC_F_WRITE),
            (status_at(1) + 0x4000, 1, DESC_F_WRITE),
        ],
    );
    assert_eq!(ring.wait_used(&mem, WAIT), Some((id, 8193)));
    assert_bytes_eq("read data", &mem.read(data, 8192), &disk);
    // Idle: vubd asks for kicks in its event area (and marks it).
    let deadline = std::time::Instant::now() + WAIT;
    while mem.read_u16(ring.device_event + 2) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "device event area enabled when idle"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut want: Vec<u64> = (data / PAGE..=(data + 8191) / PAGE).collect();
    want.push((status_at(1) + 0x4000) / PAGE);
    want.push(ring.desc / PAGE);
    want.push(ring.device_event / PAGE);
    want.sort();
    want.dedup();
    assert_eq!(
        dirty_pages(&log),
        want,
        "read data, status, the used descriptor's slot and the device event area are marked; \
         header, driver event area not"
    );
}

/// The packed inflight layout (vhost-user "Inflight I/O tracking", DPDK's QueueRegionPacked).
mod region {
    pub const FREE_HEAD: u64 = 12;
    pub const OLD_FREE_HEAD: u64 = 14;
    pub const USED_IDX: u64 = 16;
    pub const OLD_USED_IDX: u64 = 18;
    pub const USED_WRAP: u64 = 20;
    pub const OLD_USED_WRAP: u64 = 21;
    pub fn entry(e: u16) -> u64 {
        32 + 32 * u64::from(e)
    }
    pub const E_INFLIGHT: u64 = 0;
    pub const E_NEXT: u64 = 2;
    pub const E_LAST: u64 = 4;
    pub const E_NUM: u64 = 6;
    pub const E_COUNTER: u64 = 8;
    pub const E_ID: u64 = 16;
    pub const E_FLAGS: u64 = 18;
    pub const E_LEN: u64 = 20;
    pub const E_ADDR: u64 = 24;
}

fn inflight_payload(mmap_size: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = mmap_size.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&num_queues.to_le_bytes());
    p.extend_from_slice(&queue_size.to_le_bytes());
    p.extend_from_slice(&[0u8; 4]);
    p
}

/// Records chain `descs` (addr, len, flags, id) in entries `first..` of the region, in flight
/// with `counter`, as a vubd that took it would have.
fn record(region: &GuestMemory, first: u16, counter: u64, descs: &[(u64, u32, u16, u16)]) {
    use region::*;
    let n = descs.len() as u16;
    for (k, &(addr, len, flags, id)) in descs.iter().enumerate() {
        let e = entry(first + k as u16);
        region.write(e + E_ADDR, &addr.to_le_bytes());
        region.write(e + E_LEN, &len.to_le_bytes());
        region.write(e + E_ID, &id.to_le_bytes());
        region.write(e + E_FLAGS, &flags.to_le_bytes());
        region.write(e + E_NEXT, &(first + k as u16 + 1).to_le_bytes());
    }
    let h = entry(first);
    region.write(h + E_NUM, &n.to_le_bytes());
    region.write(h + E_LAST, &(first + n - 1).to_le_bytes());
    region.write(h + E_COUNTER, &counter.to_le_bytes());
    region.write(h + E_INFLIGHT, &[1]);
}

#[test]
fn restarted_vubd_resubmits_packed_in_flight_requests_once_in_order() {
    use region::*;
    let dir = test_dir();
    let (mut server, img) = file_server(dir.path());
    let args_img = img.display().to_string();
    let size = 16u16;
    let mem = GuestMemory::new(MEM);

    // First life: an inflight region with the packed layout, one write.
    let mut fe = connect(&server.socket, &mem, 0, PF_INFLIGHT_SHMFD);
    let r = fe
        .get(GET_INFLIGHT_FD, &inflight_payload(0, 1, size))
        .unwrap();
    let region_file = r.files.into_iter().next().expect("inflight fd");
    let mmap_size = u64::from_le_bytes(r.payload[0..8].try_into().unwrap());
    assert_eq!(
        mmap_size,
        (32 + 32 * u64::from(size)).div_ceil(64) * 64,
        "packed layout"
    );
    assert!(fe
        .ack(
            SET_INFLIGHT_FD,
            &inflight_payload(mmap_size, 1, size),
            &[region_file.as_raw_fd()]
        )
        .unwrap());
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, size).expect("ring");
    let a = pattern(1, 0, 4096);
    assert_eq!(write(&mem, &mut ring, 0, 0, &a), S_OK);
    let region = GuestMemory::map(region_file.try_clone().unwrap(), mmap_size);
    assert_eq!(region.read_u16(USED_IDX), 3, "used position recorded");
    assert_eq!(region.read(USED_WRAP, 1)[0], 1);
    assert_eq!(
        region.read(entry(0) + E_INFLIGHT, 1)[0],
        0,
        "completed: not in flight"
    );

    signal(server.pid(), libc::SIGKILL);
    let _ = server.wait_exit(WAIT);
    drop(fe);

    // What the dead vubd left: d, b, c taken (slots 3-5, 6-8, 9-11, entries 0-2, 3-5, 6-8);
    // d completed and its used descriptor is published (slot 3), but vubd died before
    // committing it; b and c never completed.
    let (b, c, d) = (
        pattern(2, 8 * 512, 4096),
        pattern(3, 16 * 512, 4096),
        pattern(4, 24 * 512, 4096),
    );
    let chain_of = |slot: u16, sector: u64, data: &[u8], id: u16, mem: &GuestMemory| {
        blk_header(mem, hdr_at(slot), T_OUT, sector);
        mem.write(buf_at(slot), data);
        mem.write(status_at(slot), &[0xff]);
        vec![
            (hdr_at(slot), 16u32, DESC_F_NEXT, id),
            (buf_at(slot), data.len() as u32, DESC_F_NEXT, id),
            (status_at(slot), 1, DESC_F_WRITE, id),
        ]
    };
    let dd = chain_of(1, 24, &d, 1, &mem);
    let bd = chain_of(2, 8, &b, 2, &mem);
    let cd = chain_of(3, 16, &c, 3, &mem);
    for descs in [&dd, &bd, &cd] {
        ring.offer_raw(&mem, descs, true);
    }
    // Ring descriptors as the driver wrote them (with their AVAIL/USED bits).
    let with_bits = |v: &Vec<(u64, u32, u16, u16)>| -> Vec<(u64, u32, u16, u16)> {
        v.iter()
            .map(|&(a, l, f, i)| (a, l, f | DESC_F_AVAIL, i))
            .collect()
    };
    record(&region, 0, 5, &with_bits(&dd));
    record(&region, 3, 6, &with_bits(&bd));
    record(&region, 6, 7, &with_bits(&cd));
    // d's completion: pre_complete ran (entries 0-2 back on the free list, used at 6), its
    // used descriptor is in slot 3, `end` did not run.
    region.write(entry(2) + E_NEXT, &9u16.to_le_bytes());
    region.write(FREE_HEAD, &0u16.to_le_bytes());
    region.write(OLD_FREE_HEAD, &9u16.to_le_bytes());
    region.write(USED_IDX, &6u16.to_le_bytes());
    region.write(OLD_USED_IDX, &3u16.to_le_bytes());
    region.write(USED_WRAP, &[1]);
    region.write(OLD_USED_WRAP, &[1]);
    ring.put_desc(&mem, 3, 0, 1, 1, DESC_F_AVAIL | DESC_F_USED);
    mem.write(status_at(1), &[0]);

    // Second life: the same socket and file; the frontend hands the region back and, like
    // QEMU, sends the stale vring base of the first start.
    let mut server = Server::start(
        dir.path(),
        "vubd",
        &["--blk-file", args_img.as_str(), "--buffered"],
    );
    let mut fe = connect(&server.socket, &mem, 0, PF_INFLIGHT_SHMFD);
    assert!(fe
        .ack(
            SET_INFLIGHT_FD,
            &inflight_payload(mmap_size, 1, size),
            &[region_file.as_raw_fd()]
        )
        .unwrap());
    assert!(ring.configure(&mut fe, PACKED_START));
    assert_eq!(
        ring.wait_used(&mem, WAIT),
        Some((1, 1)),
        "d, used before the restart"
    );
    assert_eq!(
        ring.wait_used(&mem, WAIT),
        Some((2, 1)),
        "b resubmitted first (counter order)"
    );
    assert_eq!(ring.wait_used(&mem, WAIT), Some((3, 1)), "c resubmitted");
    assert_eq!(
        ring.wait_used(&mem, Duration::from_millis(300)),
        None,
        "d must not run twice"
    );
    assert_eq!(
        (mem.read(status_at(2), 1)[0], mem.read(status_at(3), 1)[0]),
        (S_OK, S_OK)
    );
    assert!(
        server
            .stderr()
            .contains("resubmitting 2 in-flight request(s)"),
        "{}",
        server.stderr()
    );
    for h in [0u16, 3, 6] {
        assert_eq!(
            region.read(entry(h) + E_INFLIGHT, 1)[0],
            0,
            "entry {h} settled"
        );
    }
    assert_eq!(region.read_u16(OLD_USED_IDX), 12);

    // The ring goes on after them.
    let e = pattern(5, 32 * 512, 4096);
    assert_eq!(write(&mem, &mut ring, 4, 32, &e), S_OK);
    let r = fe.get(GET_VRING_BASE, &vring_state(0, 0)).unwrap();
    assert_eq!(
        u32::from_le_bytes(r.payload[4..8].try_into().unwrap()),
        ring.base()
    );
    drop(fe);
    server.terminate();
    assert_bytes_eq("a", &read_file_at(&img, 0, 4096), &a);
    assert_bytes_eq("b (resubmitted)", &read_file_at(&img, 8 * 512, 4096), &b);
    assert_bytes_eq("c (resubmitted)", &read_file_at(&img, 16 * 512, 4096), &c);
    assert_zeroes(
        "d (published before the kill; not run again)",
        &read_file_at(&img, 24 * 512, 4096),
    );
    assert_bytes_eq("e", &read_file_at(&img, 32 * 512, 4096), &e);
}

/// A packed queue idle on a reactor that never sleeps (poll mode) parks: before it does, it
/// asks the driver for a kick at its avail position in the device event area. A request
/// offered without a kick then waits (nobody polls the queue); the kick brings it back.
#[test]
fn idle_packed_queue_parks_after_asking_for_kicks() {
    let dir = test_dir();
    let server = Server::start(dir.path(), "vubd", &["--ram", "16M", "--poll-mode", "poll"]);
    let mem = GuestMemory::new(MEM);
    let mut fe = connect(&server.socket, &mem, F_EVENT_IDX, 0);
    let mut ring = PackedRing::setup(&mut fe, &mem, 0, 16).expect("packed ring set up");
    for round in 0..12u16 {
        // Idle: parked, with a kick asked for at the driver's next avail position.
        let want = ring.avail_idx | if ring.avail_wrap { 0x8000 } else { 0 };
        let deadline = std::time::Instant::now() + WAIT;
        while (
            mem.read_u16(ring.device_event + 2),
            mem.read_u16(ring.device_event),
        ) != (2, want)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no kick asked for"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(5));
        // Offered without a kick: not served while parked.
        let slot = round % 4;
        blk_header(&mem, hdr_at(slot), T_FLUSH, 0);
        mem.write(status_at(slot), &[0xff]);
        let id = ring.submit_quiet(
            &mem,
            &[(hdr_at(slot), 16, 0), (status_at(slot), 1, DESC_F_WRITE)],
        );
        assert_eq!(
            ring.wait_used(&mem, Duration::from_millis(30)),
            None,
            "round {round}: served without a kick"
        );
        ring.kick_now();
        assert_eq!(
            ring.wait_used(&mem, WAIT),
            Some((id, 1)),
            "round {round}: the kick woke it"
        );
        assert_eq!(mem.read(status_at(slot), 1)[0], S_OK);
    }
    drop(fe);
}
