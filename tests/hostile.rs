//! Hostile frontends: each test misbehaves on one device ("target", file backend, 2 queues)
//! and checks the outcome is a clean error (a virtio status, a refused message or a closed
//! connection), and that another device in the same process ("bystander", served to a
//! libblkio client) keeps serving, as does the target's socket for the next frontend.

mod common;
mod frontend;

use common::*;
use frontend::*;
use std::os::unix::io::AsRawFd;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

type Setup = TargetAndBystander;

fn setup() -> Setup {
    target_and_bystander()
}

/// The other device still does a byte-exact round trip, the server is alive, and the target
/// socket serves a well-behaved frontend.
fn assert_unharmed(s: &mut Setup) {
    s.server.assert_alive();
    let mut c = Client::connect(&s.bystander, 1);
    let data = pattern(7, 4096, 8192);
    ok("bystander write", c.disk().write(4096, &data));
    let got = ok("bystander read", c.disk().read(4096, 8192));
    assert_bytes_eq("bystander data", &got, &data);
    drop(c);
    let (mut fe, mem) = connect_target(&s.target);
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).expect("target ring setup");
    assert_eq!(flush(&mem, &mut ring), S_OK, "target serves a new frontend");
    s.server.assert_alive();
}

fn connect_target(path: &std::path::Path) -> (Frontend, GuestMemory) {
    let mut fe = Frontend::connect(path);
    fe.handshake(0);
    let mem = GuestMemory::new(4 * MIB);
    assert!(fe.share(&mem), "SET_MEM_TABLE accepted");
    (fe, mem)
}

/// A flush request at descriptors of its own; returns its status.
fn flush(mem: &GuestMemory, ring: &mut Ring) -> u8 {
    let hdr = DATA_BASE + 0x8000;
    blk_header(mem, hdr, T_FLUSH, 0);
    mem.write(hdr + 16, &[0xff]);
    let before = ring.used_idx(mem);
    ring.submit(mem, &[(hdr, 16, 0), (hdr + 16, 1, DESC_F_WRITE)]);
    assert!(
        ring.wait_used(mem, before.wrapping_add(1), WAIT),
        "flush completed"
    );
    mem.read(hdr + 16, 1)[0]
}

/// Submits a read of one sector with the given data descriptor; returns (status, used len).
fn read_with_data_desc(mem: &GuestMemory, ring: &mut Ring, data: (u64, u32, u16)) -> (u8, u32) {
    let hdr = DATA_BASE;
    blk_header(mem, hdr, T_IN, 0);
    mem.write(hdr + 16, &[0xff]);
    let before = ring.used_idx(mem);
    ring.submit(mem, &[(hdr, 16, 0), data, (hdr + 16, 1, DESC_F_WRITE)]);
    assert!(
        ring.wait_used(mem, before.wrapping_add(1), WAIT),
        "request completed"
    );
    (mem.read(hdr + 16, 1)[0], ring.used_elem(mem, before).1)
}

/// Offers `head` and checks the queue stops: no used entry, the other queue of the same
/// device still completes requests.
fn assert_queue_stops(fe: &mut Frontend, mem: &GuestMemory, ring: &mut Ring, head: u16) {
    ring.offer(mem, head);
    assert!(
        !ring.wait_used(mem, 1, Duration::from_millis(500)),
        "a malformed chain must not complete"
    );
    let mut other = Ring::setup(fe, mem, 1, 16, 0).expect("queue 1 setup");
    assert_eq!(
        flush(mem, &mut other),
        S_OK,
        "the device's other queue still serves"
    );
}

#[test]
fn descriptor_loop_stops_only_that_queue() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    blk_header(&mem, DATA_BASE, T_IN, 0);
    ring.put_desc(&mem, 0, DATA_BASE, 16, DESC_F_NEXT, 1);
    ring.put_desc(
        &mem,
        1,
        DATA_BASE + 0x1000,
        512,
        DESC_F_NEXT | DESC_F_WRITE,
        0,
    );
    assert_queue_stops(&mut fe, &mem, &mut ring, 0);
    assert!(
        s.server.stderr().contains("malformed chain"),
        "logged: {}",
        s.server.stderr()
    );
    drop(fe);
    assert_unharmed(&mut s);
}

#[test]
fn chain_longer_than_the_queue_stops_that_queue() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    blk_header(&mem, DATA_BASE, T_IN, 0);
    ring.put_desc(&mem, 0, DATA_BASE, 16, DESC_F_NEXT, 1);
    for i in 1..16u16 {
        // Every descriptor says NEXT; the last points past the table.
        ring.put_desc(
            &mem,
            i,
            DATA_BASE + 0x1000,
            512,
            DESC_F_NEXT | DESC_F_WRITE,
            i + 1,
        );
    }
    assert_queue_stops(&mut fe, &mem, &mut ring, 0);
    drop(fe);
    assert_unharmed(&mut s);
}

#[test]
fn nested_indirect_table_stops_that_queue() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    let table = DATA_BASE + 0x2_0000;
    let mut inner = (table + 0x100).to_le_bytes().to_vec();
    inner.extend_from_slice(&32u32.to_le_bytes());
    inner.extend_from_slice(&DESC_F_INDIRECT.to_le_bytes());
    inner.extend_from_slice(&0u16.to_le_bytes());
    mem.write(table, &inner);
    ring.put_desc(&mem, 0, table, 16, DESC_F_INDIRECT, 0);
    assert_queue_stops(&mut fe, &mem, &mut ring, 0);
    drop(fe);
    assert_unharmed(&mut s);
}

#[test]
fn zero_length_or_read_only_status_stops_that_queue() {
    for status_flags in [(1u32, 0u16), (0, DESC_F_WRITE)] {
        let mut s = setup();
        let (mut fe, mem) = connect_target(&s.target);
        let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
        blk_header(&mem, DATA_BASE, T_FLUSH, 0);
        ring.put_desc(&mem, 0, DATA_BASE, 16, DESC_F_NEXT, 1);
        ring.put_desc(&mem, 1, DATA_BASE + 16, status_flags.0, status_flags.1, 0);
        assert_queue_stops(&mut fe, &mem, &mut ring, 0);
        drop(fe);
        assert_unharmed(&mut s);
    }
}

#[test]
fn write_only_header_fails_with_ioerr() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    blk_header(&mem, DATA_BASE, T_IN, 0);
    mem.write(DATA_BASE + 16, &[0xff]);
    ring.submit(
        &mem,
        &[
            (DATA_BASE, 16, DESC_F_WRITE),
            (DATA_BASE + 16, 1, DESC_F_WRITE),
        ],
    );
    assert!(ring.wait_used(&mem, 1, WAIT));
    assert_eq!(mem.read(DATA_BASE + 16, 1)[0], S_IOERR);
    assert_eq!(
        flush(&mem, &mut ring),
        S_OK,
        "the queue keeps serving after an IOERR"
    );
    drop(fe);
    assert_unharmed(&mut s);
}

#[test]
fn buffers_outside_memory_or_overflowing_fail_with_ioerr() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    for data in [
        (64 * MIB, 512, DESC_F_WRITE),               // outside every region
        (mem.size - 256, 512, DESC_F_WRITE),         // straddles the end of memory
        (u64::MAX - 255, 512, DESC_F_WRITE),         // address + length overflows
        (mem.size - 512, 0xffff_fe00, DESC_F_WRITE), // length runs far past memory
    ] {
        let (status, used) = read_with_data_desc(&mem, &mut ring, data);
        assert_eq!((status, used), (S_IOERR, 1), "data descriptor {data:x?}");
    }
    assert_eq!(flush(&mem, &mut ring), S_OK);
    drop(fe);
    assert_unharmed(&mut s);
}

#[test]
fn head_reused_while_in_flight_stops_that_queue() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    // A 1 MiB read goes to io_uring and stays in flight while the same head is offered again
    // in the same batch.
    blk_header(&mem, DATA_BASE, T_IN, 0);
    ring.put_desc(&mem, 0, DATA_BASE, 16, DESC_F_NEXT, 1);
    ring.put_desc(
        &mem,
        1,
        DATA_BASE + 0x10_0000,
        1 << 20,
        DESC_F_NEXT | DESC_F_WRITE,
        2,
    );
    ring.put_desc(&mem, 2, DATA_BASE + 16, 1, DESC_F_WRITE, 0);
    for slot in 0..2u64 {
        mem.write_u16(ring.avail + 4 + 2 * slot, 0);
    }
    ring.avail_idx = 2;
    mem.write_u16(ring.avail + 2, 2);
    ring.kick_now();
    assert!(ring.wait_used(&mem, 1, WAIT), "the first request completes");
    assert!(
        !ring.wait_used(&mem, 2, Duration::from_millis(300)),
        "the reused head is not"
    );
    let log = s.server.stderr();
    assert!(
        log.contains("reused while in flight") || log.contains("head index"),
        "{log}"
    );
    drop(fe);
    assert_unharmed(&mut s);
}

#[test]
fn avail_index_jumping_past_the_queue_size_stops_that_queue() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    mem.write_u16(ring.avail + 2, 17);
    ring.kick_now();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ring.used_idx(&mem), 0);
    assert!(
        s.server.stderr().contains("more than the queue size"),
        "{}",
        s.server.stderr()
    );
    let mut other = Ring::setup(&mut fe, &mem, 1, 16, 0).unwrap();
    assert_eq!(flush(&mem, &mut other), S_OK);
    drop(fe);
    assert_unharmed(&mut s);
}

/// A refused message: either REPLY_ACK says failure, or vubd closes the connection.
fn refused(fe: &mut Frontend, request: u32, payload: &[u8], fds: &[i32]) -> bool {
    match fe.ack(request, payload, fds) {
        Ok(accepted) => !accepted,
        Err(_) => true,
    }
}

#[test]
fn bad_memory_regions_are_refused() {
    let mut s = setup();
    let mem = GuestMemory::new(4 * MIB);
    let fd = mem.file.as_raw_fd();
    let table = |regions: &[Vec<u8>]| {
        let mut p = (regions.len() as u32).to_le_bytes().to_vec();
        p.extend_from_slice(&0u32.to_le_bytes());
        for r in regions {
            p.extend_from_slice(r);
        }
        p
    };
    let cases: Vec<(&str, u32, Vec<u8>, Vec<i32>)> = vec![
        (
            "zero-sized",
            SET_MEM_TABLE,
            table(&[region(0, 0, USER_BASE, 0)]),
            vec![fd],
        ),
        (
            "overlapping",
            SET_MEM_TABLE,
            table(&[
                region(0, 2 * MIB, USER_BASE, 0),
                region(MIB, 2 * MIB, USER_BASE + 8 * MIB, 0),
            ]),
            vec![fd, fd],
        ),
        (
            "overflowing",
            SET_MEM_TABLE,
            table(&[region(u64::MAX - 4095, 8192, USER_BASE, 0)]),
            vec![fd],
        ),
        (
            "larger than its file",
            SET_MEM_TABLE,
            table(&[region(0, 64 * MIB, USER_BASE, 0)]),
            vec![fd],
        ),
        (
            "zero-sized added",
            ADD_MEM_REG,
            [vec![0u8; 8], region(0, 0, USER_BASE, 0)].concat(),
            vec![fd],
        ),
    ];
    for (what, request, payload, fds) in cases {
        let mut fe = Frontend::connect(&s.target);
        fe.handshake(0);
        assert!(
            refused(&mut fe, request, &payload, &fds),
            "{what} memory region accepted"
        );
        drop(fe);
        s.server.assert_alive();
    }
    assert_unharmed(&mut s);
}

#[test]
fn vring_outside_memory_and_queue_beyond_offered_are_refused() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    ring.used = 64 * MIB; // beyond the 4 MiB region
    assert!(
        !ring.configure(&mut fe, 0) || fe.closed_by_server(),
        "ring outside memory started"
    );
    drop(fe);

    let (mut fe, _mem) = connect_target(&s.target);
    assert!(
        refused(&mut fe, SET_VRING_NUM, &vring_state(2, 16), &[]),
        "queue 2 of a 2-queue device"
    );
    let mut fe = Frontend::connect(&s.target);
    fe.handshake(0);
    assert!(
        refused(&mut fe, SET_VRING_NUM, &vring_state(0, 100), &[]),
        "size not a power of two"
    );
    drop(fe);
    assert_unharmed(&mut s);
}

#[test]
fn get_config_returns_exact_sizes_and_refuses_past_the_config_space() {
    let mut s = setup();
    let mut fe = Frontend::connect(&s.target);
    fe.handshake(0);
    let cfg = config_request;
    let r = fe.get(GET_CONFIG, &cfg(0, 60)).unwrap();
    assert_eq!(r.payload.len(), 12 + 60);
    let capacity = u64::from_le_bytes(r.payload[12..20].try_into().unwrap());
    assert_eq!(capacity, 16 * MIB / 512);
    let r = fe.get(GET_CONFIG, &cfg(8, 4)).unwrap();
    assert_eq!(r.payload.len(), 12 + 4, "exactly the size asked for");
    let r = fe.get(GET_CONFIG, &cfg(0, 96)).unwrap();
    assert_eq!(r.payload.len(), 12 + 96, "the whole virtio_blk_config");
    assert!(
        r.payload[12 + 60..].iter().all(|&b| b == 0),
        "fields vubd does not fill read as zero"
    );
    // Past struct virtio_blk_config: refused (error reply or closed connection).
    if let Ok(r) = fe.get(GET_CONFIG, &cfg(90, 16)) {
        assert_eq!(
            r.payload.len(),
            12,
            "an error reply carries no config bytes"
        );
    }
    drop(fe);
    assert_unharmed(&mut s);
}

#[test]
fn connection_dropped_mid_message_and_stalled_frontend() {
    let mut s = setup();
    // Header says 40 bytes follow; 10 arrive, then the connection drops.
    let mut fe = Frontend::connect(&s.target);
    fe.handshake(0);
    let mut msg = SET_VRING_ADDR.to_le_bytes().to_vec();
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&40u32.to_le_bytes());
    msg.extend_from_slice(&[0u8; 10]);
    fe.send_raw(&msg, &[]).unwrap();
    drop(fe);
    s.server.assert_alive();

    // A frontend that stalls mid-header is disconnected; meanwhile a connected client of the
    // other device keeps doing I/O.
    let mut c = Client::connect(&s.bystander, 1);
    let mut fe = Frontend::connect(&s.target);
    fe.sock
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let stalled_at = std::time::Instant::now();
    fe.send_raw(&msg[..6], &[]).unwrap();
    for i in 0..50u64 {
        let data = pattern(i, i * 4096, 4096);
        ok(
            "bystander write during stall",
            c.disk().write(i * 4096, &data),
        );
    }
    assert!(fe.closed_by_server(), "stalled frontend disconnected");
    let waited = stalled_at.elapsed();
    assert!(
        waited >= Duration::from_secs(4),
        "disconnected after {waited:?}, before the timeout"
    );
    drop(c);
    assert_unharmed(&mut s);
}

#[test]
fn guest_triggered_logs_are_rate_limited() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    for _ in 0..200 {
        let (status, _) = read_with_data_desc(&mem, &mut ring, (64 * MIB, 512, DESC_F_WRITE));
        assert_eq!(status, S_IOERR);
    }
    let lines = s
        .server
        .stderr()
        .lines()
        .filter(|l| l.contains("request failed"))
        .count();
    assert!(
        (1..=20).contains(&lines),
        "{lines} log lines for 200 bad requests"
    );
    drop(fe);
    assert_unharmed(&mut s);
}

/// Writes `v` to an eventfd's counter.
fn add_to_eventfd(f: &std::fs::File, v: u64) {
    use std::io::Write;
    (&*f).write_all(&v.to_ne_bytes()).expect("eventfd write");
}

/// Clears O_NONBLOCK in the file description the frontend shares with vubd.
fn make_blocking(f: &std::fs::File) {
    // SAFETY: plain fcntl on an fd we own.
    assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) }, 0);
}

/// Offers `n` flushes one after another on `ring`; true if all completed.
fn flushes_complete(mem: &GuestMemory, ring: &mut Ring, n: usize) -> bool {
    (0..n).all(|_| flush(mem, ring) == S_OK)
}

/// The largest value an eventfd counter can be brought to by write(2); one more blocks.
const EVENTFD_FULL: u64 = 0xffff_ffff_ffff_fffe;

#[test]
fn call_fd_at_its_maximum_and_blocking_does_not_stall_the_reactor() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    // An eventfd whose counter is full and whose file description is blocking: a write(2)
    // of 1 to it would block until the frontend reads it, which it never does.
    let call = eventfd();
    add_to_eventfd(&call, EVENTFD_FULL);
    make_blocking(&call);
    let mut ring = Ring::setup_with(&mut fe, &mem, 0, 16, 0, eventfd(), call)
        .expect("ring with a full call fd");
    // Requests complete (the queue's reactor is not stuck in a write), and the bystander on
    // the same reactor keeps serving while this frontend never reads its call fd.
    assert!(flushes_complete(&mem, &mut ring, 20), "requests complete");
    let mut c = Client::connect(&s.bystander, 1);
    ok("bystander write", c.disk().write(0, &pattern(5, 0, 4096)));
    assert!(flushes_complete(&mem, &mut ring, 20), "still completing");
    drop(c);
    drop(fe);
    assert_unharmed(&mut s);
}

#[test]
fn call_fd_made_blocking_after_it_was_handed_over_does_not_stall_the_reactor() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let mut ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    assert_eq!(flush(&mem, &mut ring), S_OK);
    // O_NONBLOCK lives in the file description vubd shares: the frontend fills the counter
    // and takes O_NONBLOCK away after SET_VRING_CALL.
    let mut drained = [0u8; 8];
    let _ = std::io::Read::read(&mut &ring.call, &mut drained);
    add_to_eventfd(&ring.call, EVENTFD_FULL);
    make_blocking(&ring.call);
    make_blocking(&ring.kick);
    assert!(flushes_complete(&mem, &mut ring, 20), "requests complete");
    let mut c = Client::connect(&s.bystander, 1);
    ok("bystander write", c.disk().write(0, &pattern(6, 0, 4096)));
    drop(c);
    drop(fe);
    assert_unharmed(&mut s);
}

#[test]
fn kick_or_call_fds_that_are_not_eventfds_are_refused() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let (r, w) = std::io::pipe().unwrap();
    let pipe_file = |p: std::os::fd::OwnedFd| std::fs::File::from(p);
    assert!(
        Ring::setup_with(&mut fe, &mem, 0, 16, 0, eventfd(), pipe_file(w.into())).is_none(),
        "a pipe as call fd was accepted"
    );
    drop(fe);
    let (mut fe, mem) = connect_target(&s.target);
    assert!(
        Ring::setup_with(&mut fe, &mem, 0, 16, 0, pipe_file(r.into()), eventfd()).is_none(),
        "a pipe as kick fd was accepted"
    );
    drop(fe);
    let log = s.server.stderr();
    assert!(
        log.contains("SET_VRING_CALL with an fd that is not an eventfd")
            && log.contains("SET_VRING_KICK with an fd that is not an eventfd"),
        "{log}"
    );
    assert_unharmed(&mut s);
}

#[test]
fn frontend_that_shrinks_its_memory_file_loses_only_its_connection() {
    let mut s = setup();
    let (mut fe, mem) = connect_target(&s.target);
    let ring = Ring::setup(&mut fe, &mem, 0, 16, 0).unwrap();
    // Let the queue settle into sleep, then pull the memory out from under vubd and kick:
    // its next access to the ring is past the end of the file.
    std::thread::sleep(Duration::from_millis(50));
    mem.file.set_len(0).unwrap();
    ring.kick_now();
    assert!(fe.closed_by_server(), "the frontend was disconnected");
    s.server.assert_alive();
    let log = s.server.stderr();
    assert!(log.contains("shared memory faulted"), "{log}");
    // The test must not touch its own (now truncated) mapping again.
    std::mem::forget(mem);
    assert_unharmed(&mut s);
}

#[test]
fn inflight_region_vubd_creates_cannot_be_shrunk() {
    let mut s = setup();
    let mut fe = Frontend::connect(&s.target);
    fe.handshake(PF_INFLIGHT_SHMFD);
    let mut p = 0u64.to_le_bytes().to_vec(); // mmap_size
    p.extend_from_slice(&0u64.to_le_bytes()); // mmap_offset
    p.extend_from_slice(&2u16.to_le_bytes()); // num_queues
    p.extend_from_slice(&16u16.to_le_bytes()); // queue_size
    p.extend_from_slice(&[0u8; 4]); // padding
    let r = fe.get(GET_INFLIGHT_FD, &p).unwrap();
    let file = r.files.into_iter().next().expect("inflight fd");
    let err = file.set_len(0).expect_err("the inflight memfd shrank");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    drop(fe);
    assert_unharmed(&mut s);
}
