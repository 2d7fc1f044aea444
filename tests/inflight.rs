//! Restart without losing I/O (INFLIGHT_SHMFD): a frontend keeps the inflight region across a
//! SIGKILL of vubd; the restarted vubd resubmits exactly the requests that were taken and not
//! completed, in their original order, and not the one whose completion was already published.

mod common;
mod frontend;

use common::*;
use frontend::*;
use std::os::unix::io::AsRawFd;
use std::time::Duration;

const QSIZE: u16 = 16;
const WAIT: Duration = Duration::from_secs(5);

/// Offsets in one queue's inflight area (vhost-user spec, split rings).
const LAST_BATCH_HEAD: u64 = 12;
const USED_IDX: u64 = 14;
fn desc_state(head: u16) -> u64 {
    16 + 16 * u64::from(head)
}

fn inflight_payload(mmap_size: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = mmap_size.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&num_queues.to_le_bytes());
    p.extend_from_slice(&queue_size.to_le_bytes());
    p.extend_from_slice(&[0u8; 4]);
    p
}

/// A 4 KiB write of `data` at `sector`, using descriptors `first..first+3` and buffers of its
/// own; returns the head.
fn write_chain(mem: &GuestMemory, ring: &Ring, first: u16, sector: u64, data: &[u8]) -> u16 {
    let hdr = DATA_BASE + 0x100 * u64::from(first);
    let buf = DATA_BASE + 0x10_0000 + 0x1000 * u64::from(first);
    blk_header(mem, hdr, T_OUT, sector);
    mem.write(buf, data);
    mem.write(hdr + 16, &[0xff]);
    ring.put_desc(mem, first, hdr, 16, DESC_F_NEXT, first + 1);
    ring.put_desc(
        mem,
        first + 1,
        buf,
        data.len() as u32,
        DESC_F_NEXT,
        first + 2,
    );
    ring.put_desc(mem, first + 2, hdr + 16, 1, DESC_F_WRITE, 0);
    first
}

fn status_of(mem: &GuestMemory, first: u16) -> u8 {
    mem.read(DATA_BASE + 0x100 * u64::from(first) + 16, 1)[0]
}

/// GET_INFLIGHT_FD for one queue: the region's file and size.
fn get_region(fe: &mut Frontend) -> (std::fs::File, u64) {
    let r = fe
        .get(GET_INFLIGHT_FD, &inflight_payload(0, 1, QSIZE))
        .unwrap();
    let file = r.files.into_iter().next().expect("inflight fd");
    (
        file,
        u64::from_le_bytes(r.payload[0..8].try_into().unwrap()),
    )
}

/// SET_INFLIGHT_FD: hands the region back; whether vubd took it.
fn set_region(fe: &mut Frontend, file: &std::fs::File, mmap_size: u64) -> bool {
    fe.ack(
        SET_INFLIGHT_FD,
        &inflight_payload(mmap_size, 1, QSIZE),
        &[file.as_raw_fd()],
    )
    .unwrap()
}

fn connect(socket: &std::path::Path, mem: &GuestMemory) -> Frontend {
    let mut fe = Frontend::connect(socket);
    fe.handshake(PF_INFLIGHT_SHMFD);
    assert!(fe.share(mem));
    fe
}

#[test]
fn restarted_vubd_resubmits_in_flight_requests_once_in_order() {
    let dir = test_dir();
    let img = create_file(dir.path(), "disk.img", 16 * MIB);
    let img_arg = img.display().to_string();
    let args = ["--blk-file", img_arg.as_str(), "--buffered"];
    let mut server = Server::start(dir.path(), "vubd", &args);
    let mem = GuestMemory::new(8 * MIB);

    // First life: the frontend gets an inflight region and does one write.
    let mut fe = connect(&server.socket, &mem);
    let (region_file, mmap_size) = get_region(&mut fe);
    assert!(mmap_size >= 16 + 16 * u64::from(QSIZE));
    assert!(set_region(&mut fe, &region_file, mmap_size));
    let mut ring = Ring::setup(&mut fe, &mem, 0, QSIZE, 0).expect("ring");
    let a = pattern(1, 0, 4096);
    let h0 = write_chain(&mem, &ring, 0, 0, &a);
    ring.offer(&mem, h0);
    assert!(ring.wait_used(&mem, 1, WAIT));
    assert_eq!(status_of(&mem, 0), 0);
    let region = GuestMemory::map(region_file.try_clone().unwrap(), mmap_size);
    assert_eq!(
        region.read(desc_state(h0), 1)[0],
        0,
        "completed request is not marked in flight"
    );
    assert_eq!(
        u16::from_le_bytes(region.read(USED_IDX, 2).try_into().unwrap()),
        1
    );

    // vubd dies.
    signal(server.pid(), libc::SIGKILL);
    let _ = server.wait_exit(WAIT);
    drop(fe);

    // What the dead vubd left behind, as the guest and the region see it: three more requests
    // on the avail ring, all taken by vubd. d (counter 5) completed and its used entry is
    // published, but vubd died before clearing its mark; b (6) and c (7) never completed.
    let (b, c, d) = (
        pattern(2, 8 * 512, 4096),
        pattern(3, 16 * 512, 4096),
        pattern(4, 24 * 512, 4096),
    );
    let hd = write_chain(&mem, &ring, 3, 24, &d);
    let hb = write_chain(&mem, &ring, 6, 8, &b);
    let hc = write_chain(&mem, &ring, 9, 16, &c);
    for (pos, head) in [(1u64, hd), (2, hb), (3, hc)] {
        mem.write_u16(ring.avail + 4 + 2 * pos, head);
    }
    mem.write_u16(ring.avail + 2, 4);
    ring.avail_idx = 4;
    let mut used_elem = u32::from(hd).to_le_bytes().to_vec();
    used_elem.extend_from_slice(&1u32.to_le_bytes());
    mem.write(ring.used + 4 + 8, &used_elem);
    mem.write(DATA_BASE + 0x100 * 3 + 16, &[0]);
    mem.write_u16(ring.used + 2, 2);
    for (head, counter) in [(hd, 5u64), (hb, 6), (hc, 7)] {
        region.write(desc_state(head) + 8, &counter.to_le_bytes());
        region.write(desc_state(head), &[1]);
    }
    region.write(LAST_BATCH_HEAD, &hd.to_le_bytes());

    // Second life: same socket, same file; the frontend hands the region back.
    let mut server = Server::start(dir.path(), "vubd", &args);
    let mut fe = connect(&server.socket, &mem);
    assert!(set_region(&mut fe, &region_file, mmap_size));
    // The frontend's own idea of the ring base is the used index (QEMU restores it so).
    assert!(ring.configure(&mut fe, 2));
    assert!(
        ring.wait_used(&mem, 4, WAIT),
        "b and c resubmitted; used idx {}",
        ring.used_idx(&mem)
    );
    assert!(
        !ring.wait_used(&mem, 5, Duration::from_millis(300)),
        "d must not run twice"
    );
    assert_eq!(
        ring.used_elem(&mem, 2).0,
        u32::from(hb),
        "resubmitted in counter order"
    );
    assert_eq!(ring.used_elem(&mem, 3).0, u32::from(hc));
    assert_eq!((status_of(&mem, 6), status_of(&mem, 9)), (0, 0));
    assert!(
        server
            .stderr()
            .contains("resubmitting 2 in-flight request(s)"),
        "{}",
        server.stderr()
    );
    assert_eq!(region.read(desc_state(hb), 1)[0], 0);
    assert_eq!(region.read(desc_state(hd), 1)[0], 0, "last batch repaired");

    // The ring goes on after the resubmitted ones.
    let e = pattern(5, 32 * 512, 4096);
    let he = write_chain(&mem, &ring, 12, 32, &e);
    ring.offer(&mem, he);
    assert!(ring.wait_used(&mem, 5, WAIT));
    drop(fe);
    server.terminate();

    assert_bytes_eq("a", &read_file_at(&img, 0, 4096), &a);
    assert_bytes_eq("b (resubmitted)", &read_file_at(&img, 8 * 512, 4096), &b);
    assert_bytes_eq("c (resubmitted)", &read_file_at(&img, 16 * 512, 4096), &c);
    assert_zeroes(
        "d (its completion was published; not run again)",
        &read_file_at(&img, 24 * 512, 4096),
    );
    assert_bytes_eq("e", &read_file_at(&img, 32 * 512, 4096), &e);
}

#[test]
fn bad_inflight_regions_are_refused() {
    let dir = test_dir();
    let server = Server::start(dir.path(), "vubd", &["--ram", "16M", "--num-queues", "8"]);
    let mem = GuestMemory::new(4 * MIB);
    let mut fe = connect(&server.socket, &mem);
    let small = GuestMemory::new(4096);
    // Claims 2 queues of 1024 entries in a 4 KiB file.
    let ok = fe.ack(
        SET_INFLIGHT_FD,
        &inflight_payload(4096, 2, 1024),
        &[small.file.as_raw_fd()],
    );
    assert!(
        matches!(ok, Ok(false) | Err(_)),
        "undersized region accepted"
    );
    let mut fe = connect(&server.socket, &mem);
    let ok = fe.get(GET_INFLIGHT_FD, &inflight_payload(0, 9, 16));
    assert!(
        ok.map_or(true, |r| r.files.is_empty()),
        "region for more queues than offered"
    );
}

#[test]
fn inflight_region_marking_more_than_the_driver_offered_is_reset() {
    // A frontend hands back a region that marks every head in flight on a ring it has
    // offered nothing on. Trusting it would start the ring 16 past the avail index and break
    // the queue; vubd resets the region, says so, and serves from the frontend's base.
    let dir = test_dir();
    let img = create_file(dir.path(), "disk.img", 16 * MIB);
    let img_arg = img.display().to_string();
    let mut server = Server::start(dir.path(), "vubd", &["--blk-file", img_arg.as_str()]);
    let mem = GuestMemory::new(8 * MIB);
    let mut fe = connect(&server.socket, &mem);
    let (region_file, mmap_size) = get_region(&mut fe);
    let region = GuestMemory::map(region_file.try_clone().unwrap(), mmap_size);
    for head in 0..QSIZE {
        region.write(desc_state(head) + 8, &(u64::from(head) + 1).to_le_bytes());
        region.write(desc_state(head), &[1]);
    }
    assert!(set_region(&mut fe, &region_file, mmap_size));
    let mut ring = Ring::setup(&mut fe, &mem, 0, QSIZE, 0).expect("ring");
    let a = pattern(7, 0, 4096);
    let h = write_chain(&mem, &ring, 0, 0, &a);
    ring.offer(&mem, h);
    assert!(
        ring.wait_used(&mem, 1, WAIT),
        "the queue stopped; used idx {}; {}",
        ring.used_idx(&mem),
        server.stderr()
    );
    assert_eq!(status_of(&mem, 0), 0);
    assert!(
        server.stderr().contains(
            "inflight region marks 16 request(s) in flight but the driver has 0 outstanding: region reset"
        ),
        "{}",
        server.stderr()
    );
    assert!(
        (0..QSIZE).all(|head| region.read(desc_state(head), 1)[0] == 0),
        "the region still marks requests"
    );
    drop(fe);
    server.terminate();
    assert_bytes_eq("a", &read_file_at(&img, 0, 4096), &a);
}
