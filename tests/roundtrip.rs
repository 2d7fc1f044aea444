//! Byte-exact write/read round trips through a real vhost-user-blk client (libblkio),
//! for every backend: ram, null, file (O_DIRECT and buffered).

mod common;

use common::*;
use std::path::Path;

const DISK_SIZE: u64 = 64 * MIB;
const SIZES: [usize; 4] = [512, 4096, 64 * 1024, 1024 * 1024];

/// Non-overlapping (offset, size) extents: every size at a 2 MiB boundary, at +512 and
/// at +12.5 KiB (not 4 KiB aligned), plus the very last sector and the last MiBs.
fn extents(capacity: u64) -> Vec<(u64, usize)> {
    let mut v = Vec::new();
    for (i, &size) in SIZES.iter().enumerate() {
        for (j, sub) in [0, 512, 3 * 4096 + 512].into_iter().enumerate() {
            v.push(((i * 3 + j) as u64 * 2 * MIB + sub, size));
        }
    }
    v.push((capacity - 512, 512));
    v.push((capacity - 3 * MIB, 1024 * 1024));
    v
}

/// Writes every extent, reads all back, overwrites every other one with new data and
/// checks again (new data where overwritten, old data elsewhere). Returns the seed of the
/// data each extent should hold now.
fn check_roundtrips(disk: &mut Disk, capacity: u64) -> Vec<(u64, usize, u64)> {
    let mut expect: Vec<(u64, usize, u64)> = extents(capacity)
        .into_iter()
        .map(|(off, size)| (off, size, 1))
        .collect();
    for &(off, size, seed) in &expect {
        ok(
            &format!("write {size} B at {off}"),
            disk.write(off, &pattern(seed, off, size)),
        );
    }
    verify(disk, &expect, "after first writes");

    for (i, e) in expect.iter_mut().enumerate() {
        if i % 2 == 0 {
            e.2 = 2;
            ok(
                &format!("overwrite {} B at {}", e.1, e.0),
                disk.write(e.0, &pattern(e.2, e.0, e.1)),
            );
        }
    }
    verify(disk, &expect, "after overwrites");
    expect
}

fn verify(disk: &mut Disk, expect: &[(u64, usize, u64)], when: &str) {
    for &(off, size, seed) in expect {
        let what = format!("read {size} B at {off} {when}");
        let got = ok(&what, disk.read(off, size));
        assert_bytes_eq(&what, &got, &pattern(seed, off, size));
    }
}

/// One request with six iovecs of different sizes (scattered in memory), read back with
/// one plain read, with the same segmentation and with a different one.
fn check_multi_segment(disk: &mut Disk, expect_zeroes: bool) {
    let lens = [512, 4096, 1536, 65536, 8192 + 512, 512];
    let total: usize = lens.iter().sum();
    let off = 30 * MIB + 512;
    let data = pattern(7, off, total);
    let want = if expect_zeroes {
        vec![0u8; total]
    } else {
        data.clone()
    };
    let mut segs = Vec::new();
    let mut at = 0;
    for len in lens {
        segs.push(&data[at..at + len]);
        at += len;
    }
    ok("writev with 6 segments", disk.writev(off, &segs));

    let got = ok("read of writev data", disk.read(off, total));
    assert_bytes_eq("plain read after 6-segment writev", &got, &want);

    let got = ok("readv with 6 segments", disk.readv(off, &lens)).concat();
    assert_bytes_eq("6-segment readv", &got, &want);

    let other = [8192, 512, 1024, total - 8192 - 512 - 1024];
    let got = ok("readv with 4 segments", disk.readv(off, &other)).concat();
    assert_bytes_eq("4-segment readv with different boundaries", &got, &want);
}

fn file_backed(dir: &Path, extra: &[&str]) -> (Server, std::path::PathBuf) {
    let file = create_file(dir, "disk.img", DISK_SIZE);
    let mut args = vec!["--blk-file", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Server::start(dir, "vubd", &args), file)
}

#[test]
fn ram_roundtrip() {
    let dir = test_dir();
    let server = Server::start(dir.path(), "vubd", &["--ram", "64M"]);
    let mut client = Client::connect(&server.socket, 1);
    assert_eq!(client.capacity(), DISK_SIZE, "capacity of --ram 64M");
    let disk = client.disk();

    let fresh = ok("read never-written area", disk.read(40 * MIB, 64 * 1024));
    assert_zeroes("a fresh RAM disk", &fresh);

    check_roundtrips(disk, DISK_SIZE);
}

#[test]
fn ram_multi_segment() {
    let dir = test_dir();
    let server = Server::start(dir.path(), "vubd", &["--ram", "64M"]);
    let mut client = Client::connect(&server.socket, 1);
    check_multi_segment(client.disk(), false);
}

#[test]
fn null_writes_succeed_reads_return_zeroes() {
    let dir = test_dir();
    let server = Server::start(dir.path(), "vubd", &["--null", "1G"]);
    let mut client = Client::connect(&server.socket, 1);
    let capacity = client.capacity();
    assert_eq!(capacity, 1024 * MIB, "capacity of --null 1G");
    let disk = client.disk();
    for (off, size) in extents(capacity) {
        ok(
            &format!("null write {size} B at {off}"),
            disk.write(off, &pattern(1, off, size)),
        );
        let got = ok(
            &format!("null read {size} B at {off}"),
            disk.read(off, size),
        );
        assert_zeroes(&format!("null read {size} B at {off}"), &got);
    }
    check_multi_segment(disk, true);
}

fn file_roundtrip(extra: &[&str]) {
    let dir = test_dir();
    let (server, file) = file_backed(dir.path(), extra);
    let mut client = Client::connect(&server.socket, 1);
    assert_eq!(client.capacity(), DISK_SIZE, "capacity = backing file size");
    let disk = client.disk();

    let fresh = ok("read never-written area", disk.read(40 * MIB, 64 * 1024));
    assert_zeroes("a fresh sparse file", &fresh);

    let expect = check_roundtrips(disk, DISK_SIZE);
    // The data must really be in the file, at the same offsets.
    for (off, size, seed) in expect {
        let what = format!("backing file content, {size} B at {off}");
        assert_bytes_eq(
            &what,
            &read_file_at(&file, off, size),
            &pattern(seed, off, size),
        );
    }
}

#[test]
fn file_direct_roundtrip() {
    file_roundtrip(&[]);
}

#[test]
fn file_buffered_roundtrip() {
    file_roundtrip(&["--buffered"]);
}

#[test]
fn file_direct_multi_segment() {
    let dir = test_dir();
    let (server, file) = file_backed(dir.path(), &[]);
    let mut client = Client::connect(&server.socket, 1);
    check_multi_segment(client.disk(), false);
    let total = 512 + 4096 + 1536 + 65536 + 8192 + 512 + 512;
    let off = 30 * MIB + 512;
    assert_bytes_eq(
        "backing file after writev",
        &read_file_at(&file, off, total),
        &pattern(7, off, total),
    );
}

#[test]
fn file_buffered_multi_segment() {
    let dir = test_dir();
    let (server, _file) = file_backed(dir.path(), &["--buffered"]);
    let mut client = Client::connect(&server.socket, 1);
    check_multi_segment(client.disk(), false);
}
