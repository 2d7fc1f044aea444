//! Dirty logging for live migration, driven the way QEMU drives it (raw vhost-user messages,
//! with the rings running): SET_LOG_BASE shares a log, SET_FEATURES turns VHOST_F_LOG_ALL on
//! and off mid-run, and every guest page vubd writes (read data, status bytes, used ring)
//! must have its bit set, and no page it only reads. A RAM disk offers no logging; a hostile
//! log (too small a file, a file shrunk under vubd) costs only its own connection.
//!
//! The end-to-end migration of a running guest between two QEMUs is the guest test
//! `migrate` (tests/guest/run.sh).

mod common;
mod frontend;

use common::*;
use frontend::*;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);
const PAGE: u64 = 4096;
/// Guest memory of the tests: 4 MiB = 1024 pages = a 128-byte log.
const MEM: u64 = 4 * MIB;
const LOG_BYTES: u64 = 4096;

/// The file device ("target", one queue, shared storage: offers LOG_ALL) and a RAM device
/// ("bystander", which must not).
type Setup = TargetAndBystander;

fn setup() -> Setup {
    target_and_bystander_with(1)
}

/// A frontend that negotiated LOG_SHMFD (not yet LOG_ALL), with memory and ring 0 running.
fn connect_logging(path: &Path) -> (Frontend, GuestMemory, Ring) {
    let mut fe = Frontend::connect(path);
    fe.handshake(PF_LOG_SHMFD);
    let mem = GuestMemory::new(MEM);
    assert!(fe.share(&mem), "SET_MEM_TABLE accepted");
    let ring = Ring::setup(&mut fe, &mem, 0, 16, 0).expect("ring 0 set up");
    (fe, mem, ring)
}

/// SET_LOG_BASE with `log` (size, offset 0). True if vubd answered; false if it closed the
/// connection.
fn set_log_base(fe: &mut Frontend, log: &GuestMemory, size: u64) -> bool {
    let mut p = size.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    if fe
        .send(SET_LOG_BASE, &p, &[log.file.as_raw_fd()], false)
        .is_err()
    {
        return false;
    }
    match fe.recv() {
        Ok(r) => {
            assert_eq!(r.request, SET_LOG_BASE);
            true
        }
        Err(_) => false,
    }
}

/// SET_FEATURES with or without LOG_ALL, acknowledged (QEMU waits for it too).
fn set_log_all(fe: &mut Frontend, on: bool) -> bool {
    let f = F_VERSION_1 | F_PROTOCOL_FEATURES | if on { F_LOG_ALL } else { 0 };
    fe.ack(SET_FEATURES, &u64_payload(f), &[]).unwrap()
}

/// The pages whose bit is set in `log`.
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

fn clear(log: &GuestMemory) {
    log.write(0, &vec![0; LOG_BYTES as usize]);
}

/// Where the test requests live: header, data and status on pages of their own.
const HDR: u64 = DATA_BASE;
const DATA: u64 = DATA_BASE + 0x3800; // 8 KiB from the middle of a page: touches 3 pages
const STATUS: u64 = DATA_BASE + 0x8000;

/// One request of `kind` at sector 8 with 8 KiB of data at DATA; returns its status.
fn request(mem: &GuestMemory, ring: &mut Ring, kind: u32) -> u8 {
    blk_header(mem, HDR, kind, 8);
    mem.write(STATUS, &[0xff]);
    let data_flags = if kind == T_IN { DESC_F_WRITE } else { 0 };
    let before = ring.used_idx(mem);
    ring.submit(
        mem,
        &[
            (HDR, 16, 0),
            (DATA, 8192, data_flags),
            (STATUS, 1, DESC_F_WRITE),
        ],
    );
    assert!(
        ring.wait_used(mem, before.wrapping_add(1), WAIT),
        "request completed"
    );
    mem.read(STATUS, 1)[0]
}

fn pages_of(start: u64, len: u64) -> Vec<u64> {
    (start / PAGE..=(start + len - 1) / PAGE).collect()
}

#[test]
fn dirty_log_marks_every_page_vubd_writes_while_on() {
    let s = setup();
    let disk = pattern(11, 8 * 512, 8192);
    std::fs::write(&s.img, {
        let mut v = vec![0u8; 8 * 512];
        v.extend_from_slice(&disk);
        v
    })
    .unwrap();
    let (mut fe, mem, mut ring) = connect_logging(&s.target);
    let log = GuestMemory::new(LOG_BYTES);

    // Before any log: requests work, nothing is marked anywhere.
    assert_eq!(request(&mem, &mut ring, T_IN), 0);
    assert!(
        set_log_base(&mut fe, &log, LOG_BYTES),
        "SET_LOG_BASE answered"
    );
    assert_eq!(request(&mem, &mut ring, T_IN), 0);
    assert_eq!(
        dirty_pages(&log),
        Vec::<u64>::new(),
        "log shared, LOG_ALL not yet on"
    );

    // LOG_ALL on, with the ring running: the very next request is logged.
    assert!(
        set_log_all(&mut fe, true),
        "SET_FEATURES with LOG_ALL accepted"
    );
    mem.write(DATA, &[0u8; 8192]);
    assert_eq!(request(&mem, &mut ring, T_IN), 0);
    assert_bytes_eq("read data", &mem.read(DATA, 8192), &disk);
    let used_page = ring.used / PAGE;
    let mut want: Vec<u64> = pages_of(DATA, 8192);
    want.push(STATUS / PAGE);
    want.push(used_page);
    want.sort();
    want.dedup();
    assert_eq!(
        dirty_pages(&log),
        want,
        "a read marks its data pages, its status byte's page and the used ring's page; not \
         the header's page or the descriptor table's (only read)"
    );

    // A write: the device only reads the data, so only status and used ring are marked.
    clear(&log);
    mem.write(DATA, &pattern(12, 0, 8192));
    assert_eq!(request(&mem, &mut ring, T_OUT), 0);
    let mut want = vec![STATUS / PAGE, used_page];
    want.sort();
    assert_eq!(
        dirty_pages(&log),
        want,
        "a write marks status and used ring only"
    );

    // LOG_ALL off again: nothing is marked.
    assert!(set_log_all(&mut fe, false));
    clear(&log);
    assert_eq!(request(&mem, &mut ring, T_IN), 0);
    assert_eq!(dirty_pages(&log), Vec::<u64>::new(), "logging off");

    // A second log replaces the first (QEMU shares a bigger one when memory grows).
    let log2 = GuestMemory::new(LOG_BYTES);
    assert!(set_log_base(&mut fe, &log2, LOG_BYTES));
    assert!(set_log_all(&mut fe, true));
    assert_eq!(request(&mem, &mut ring, T_IN), 0);
    assert!(
        dirty_pages(&log2).contains(&(STATUS / PAGE)),
        "new log marked"
    );
    assert_eq!(dirty_pages(&log), Vec::<u64>::new(), "old log left alone");
    let mut s = s;
    s.server.assert_alive();
}

#[test]
fn a_ram_disk_offers_no_dirty_logging() {
    let s = setup();
    let mut fe = Frontend::connect(&s.bystander);
    let features = fe.get_u64(GET_FEATURES);
    assert_eq!(features & F_LOG_ALL, 0, "LOG_ALL offered by a RAM disk");
    let proto = fe.get_u64(GET_PROTOCOL_FEATURES);
    assert_eq!(proto & PF_LOG_SHMFD, 0, "LOG_SHMFD offered by a RAM disk");
    // The file device offers both.
    let mut other = Frontend::connect(&s.target);
    assert_ne!(other.get_u64(GET_FEATURES) & F_LOG_ALL, 0);
    assert_ne!(other.get_u64(GET_PROTOCOL_FEATURES) & PF_LOG_SHMFD, 0);
    // Acking it anyway is refused.
    fe.send(
        SET_FEATURES,
        &u64_payload(F_VERSION_1 | F_PROTOCOL_FEATURES | F_LOG_ALL),
        &[],
        false,
    )
    .unwrap();
    assert!(fe.closed_by_server(), "LOG_ALL acked on a RAM disk");
}

#[test]
fn a_log_smaller_than_claimed_is_refused() {
    let s = setup();
    let (mut fe, _mem, _ring) = connect_logging(&s.target);
    let log = GuestMemory::new(LOG_BYTES);
    assert!(
        !set_log_base(&mut fe, &log, 64 * LOG_BYTES),
        "a log larger than its file must be refused"
    );
    assert!(fe.closed_by_server());
    assert_file_device_serves(&s);
}

#[test]
fn a_log_shrunk_under_vubd_costs_only_its_connection() {
    let mut s = setup();
    let (mut fe, mem, mut ring) = connect_logging(&s.target);
    let log = GuestMemory::new(LOG_BYTES);
    assert!(set_log_base(&mut fe, &log, LOG_BYTES));
    assert!(set_log_all(&mut fe, true));
    assert_eq!(request(&mem, &mut ring, T_IN), 0);
    // The log's file shrinks to nothing: vubd's next mark faults (SIGBUS).
    log.file.set_len(0).unwrap();
    blk_header(&mem, HDR, T_IN, 8);
    ring.submit(
        &mem,
        &[
            (HDR, 16, 0),
            (DATA, 8192, DESC_F_WRITE),
            (STATUS, 1, DESC_F_WRITE),
        ],
    );
    assert!(
        fe.closed_by_server(),
        "the connection of the shrunk log is closed"
    );
    s.server.assert_alive();
    // The RAM device in the same process, and the file device's socket, still serve.
    let mut c = Client::connect(&s.bystander, 1);
    let data = pattern(5, 0, 4096);
    ok("write", c.disk().write(0, &data));
    assert_bytes_eq("read back", &ok("read", c.disk().read(0, 4096)), &data);
    drop(c);
    assert_file_device_serves(&s);
    assert!(
        s.server.stderr().contains("shared memory faulted"),
        "a log line names the fault: {}",
        s.server.stderr()
    );
}

/// A new frontend on the file device does a read.
fn assert_file_device_serves(s: &Setup) {
    let (_fe, mem, mut ring) = connect_logging(&s.target);
    assert_eq!(
        request(&mem, &mut ring, T_IN),
        0,
        "file device serves a new frontend"
    );
}
