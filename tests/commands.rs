//! Non-read/write commands, error paths and device options, through libblkio.

mod common;

use blkio::ReqFlags;
use common::*;
use std::path::Path;

const DISK_SIZE: u64 = 64 * MIB;

/// A 64 MiB device of the given backend ("ram" or "file").
fn device(dir: &Path, backend: &str, extra: &[&str]) -> Server {
    let mut args: Vec<String> = match backend {
        "ram" => vec!["--ram".into(), "64M".into()],
        "file" => {
            let file = create_file(dir, "disk.img", DISK_SIZE);
            vec!["--blk-file".into(), file.display().to_string()]
        }
        other => panic!("unknown backend {other}"),
    };
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(dir, "vubd", &args)
}

/// Checks that a device keeps serving: a fresh write/read round trip at `off`.
#[track_caller]
fn assert_serves(disk: &mut Disk, off: u64, when: &str) {
    let data = pattern(99, off, 8192);
    ok(&format!("write {when}"), disk.write(off, &data));
    let got = ok(&format!("read {when}"), disk.read(off, data.len()));
    assert_bytes_eq(&format!("round trip {when}"), &got, &data);
}

fn flush_and_fua(backend: &str) {
    let dir = test_dir();
    let server = device(dir.path(), backend, &[]);
    let mut client = Client::connect(&server.socket, 1);
    let disk = client.disk();
    ok("flush on an idle device", disk.flush());
    ok("write before flush", disk.write(0, &pattern(1, 0, 4096)));
    ok("flush after a write", disk.flush());
    // libblkio emulates FUA with write + flush when the device offers FLUSH.
    let data = pattern(2, MIB, 4096);
    ok("FUA write", disk.write_flags(MIB, &data, ReqFlags::FUA));
    let got = ok("read after FUA write", disk.read(MIB, 4096));
    assert_bytes_eq("FUA write read back", &got, &data);
}

#[test]
fn ram_flush_and_fua() {
    flush_and_fua("ram");
}

#[test]
fn file_flush_and_fua() {
    flush_and_fua("file");
}

fn write_zeroes(backend: &str) {
    let dir = test_dir();
    let server = device(dir.path(), backend, &[]);
    let mut client = Client::connect(&server.socket, 1);
    let max_wz = client.blkio.get_u64("max-write-zeroes-len").unwrap();
    assert!(max_wz > 0, "device does not offer WRITE_ZEROES");
    let disk = client.disk();
    let len = 256 * 1024;
    for (off, flags, what) in [
        (2 * MIB, ReqFlags::empty(), "write-zeroes (unmap allowed)"),
        (4 * MIB + 512, ReqFlags::NO_UNMAP, "write-zeroes NO_UNMAP"),
    ] {
        // Pattern around and inside the range, so zeroes spilling past it are caught.
        let span = len + 2 * 4096;
        let data = pattern(3, off - 4096, span);
        ok(
            &format!("pattern before {what}"),
            disk.write(off - 4096, &data),
        );
        ok(what, disk.write_zeroes(off, len as u64, flags));
        let got = ok(&format!("read after {what}"), disk.read(off - 4096, span));
        assert_bytes_eq(
            &format!("before the {what} range"),
            &got[..4096],
            &data[..4096],
        );
        assert_zeroes(&format!("{what} range"), &got[4096..4096 + len]);
        assert_bytes_eq(
            &format!("after the {what} range"),
            &got[4096 + len..],
            &data[4096 + len..],
        );
    }
}

#[test]
fn ram_write_zeroes() {
    write_zeroes("ram");
}

#[test]
fn file_write_zeroes() {
    write_zeroes("file");
}

fn discard(backend: &str) {
    let dir = test_dir();
    let server = device(dir.path(), backend, &[]);
    let mut client = Client::connect(&server.socket, 1);
    let max_discard = client.blkio.get_u64("max-discard-len").unwrap();
    assert!(max_discard > 0, "device does not offer DISCARD");
    let disk = client.disk();
    ok(
        "write before discard",
        disk.write(8 * MIB, &pattern(4, 8 * MIB, 1 << 20)),
    );
    let len = (MIB).min(max_discard);
    match disk.discard(8 * MIB, len) {
        Ok(()) => {}
        Err(ret) => panic!(
            "discard of {len} B failed: {ret} ({})",
            std::io::Error::from_raw_os_error(-ret)
        ),
    }
    // Discarded content is unspecified; the device must keep working.
    assert_serves(disk, 8 * MIB, "after discard");
}

#[test]
fn ram_discard() {
    discard("ram");
}

#[test]
fn file_discard() {
    discard("file");
}

fn out_of_range(backend: &str) {
    let dir = test_dir();
    let server = device(dir.path(), backend, &[]);
    let mut client = Client::connect(&server.socket, 1);
    let cap = client.capacity();
    assert_eq!(cap, DISK_SIZE);
    let disk = client.disk();
    assert_io_error("read at capacity", disk.read(cap, 512));
    assert_serves(disk, 0, "after read at capacity");
    assert_io_error("read straddling the end", disk.read(cap - 512, 1024));
    assert_serves(disk, 0, "after read straddling the end");
    assert_io_error("read far beyond the end", disk.read(1 << 40, 4096));
    assert_serves(disk, 0, "after read far beyond the end");
    assert_io_error("write at capacity", disk.write(cap, &[0x5a; 512]));
    assert_serves(disk, 0, "after write at capacity");
    assert_io_error(
        "write straddling the end",
        disk.write(cap - 4096, &[0x5a; 8192]),
    );
    // The in-range part of a rejected write must not have been written.
    let tail = ok("read last 4 KiB", disk.read(cap - 4096, 4096));
    assert_zeroes("last 4 KiB after rejected straddling write", &tail);
    assert_io_error(
        "write-zeroes straddling the end",
        disk.write_zeroes(cap - 4096, 8192, ReqFlags::empty()),
    );
    assert_io_error("discard straddling the end", disk.discard(cap - 4096, 8192));
    assert_serves(disk, cap - 8192, "after out-of-range requests");
}

#[test]
fn ram_out_of_range_fails_then_serves() {
    out_of_range("ram");
}

#[test]
fn file_out_of_range_fails_then_serves() {
    out_of_range("file");
}

fn misaligned_length(backend: &str) {
    let dir = test_dir();
    let server = device(dir.path(), backend, &[]);
    let mut client = Client::connect(&server.socket, 1);
    let disk = client.disk();
    assert_io_error("read of 100 bytes", disk.read(0, 100));
    assert_serves(disk, 0, "after a 100-byte read");
    assert_io_error("write of 100 bytes", disk.write(4096, &[0x5a; 100]));
    assert_serves(disk, 0, "after a 100-byte write");
    assert_io_error("write of 4096+100 bytes", disk.write(8192, &[0x5a; 4196]));
    let untouched = ok("read after rejected write", disk.read(8192, 8192));
    assert_zeroes("area of rejected misaligned write", &untouched);
    assert_io_error(
        "readv whose segments sum to 612 bytes",
        disk.readv(0, &[512, 100]),
    );
    assert_serves(disk, 0, "after misaligned requests");
}

#[test]
fn ram_misaligned_length_fails_then_serves() {
    misaligned_length("ram");
}

#[test]
fn file_misaligned_length_fails_then_serves() {
    misaligned_length("file");
}

#[test]
fn read_only_device() {
    let dir = test_dir();
    let file = create_file(dir.path(), "ro.img", DISK_SIZE);
    let content = pattern(5, 0, MIB as usize);
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&file).unwrap(),
        &content,
        0,
    )
    .unwrap();
    let server = Server::start(
        dir.path(),
        "vubd",
        &["--blk-file", file.to_str().unwrap(), "--read-only"],
    );

    // libblkio refuses to start a read-write client on a device offering VIRTIO_BLK_F_RO,
    // so this proves the server advertises RO.
    match Client::try_connect(&server.socket, 1, false) {
        Ok(_) => panic!("read-write client started on a --read-only device: RO not offered"),
        Err(e) => assert_eq!(e.errno(), blkio::Errno::ROFS, "unexpected error: {e}"),
    }

    let mut client = Client::try_connect(&server.socket, 1, true).expect("read-only client");
    let disk = client.disk();
    let got = ok("read on read-only device", disk.read(0, MIB as usize));
    assert_bytes_eq("read-only device content", &got, &content);
    // Note: libblkio itself fails writes on a read-only client (EBADF) before they reach
    // the server, so this checks the end-to-end outcome, not the server's own RO check.
    assert_io_error("write on read-only device", disk.write(0, &[0; 4096]));
    assert_io_error(
        "write-zeroes on read-only device",
        disk.write_zeroes(0, 4096, ReqFlags::empty()),
    );
    let got = ok("read after rejected writes", disk.read(0, 4096));
    assert_bytes_eq("content after rejected writes", &got, &content[..4096]);
    assert_bytes_eq(
        "backing file after rejected writes",
        &read_file_at(&file, 0, MIB as usize),
        &content,
    );
}

#[test]
fn logical_block_size_4096() {
    let dir = test_dir();
    let server = Server::start(
        dir.path(),
        "vubd",
        &["--ram", "64M", "--logical-block-size", "4096"],
    );
    let mut client = Client::connect(&server.socket, 1);
    assert_eq!(
        client.blkio.get_i32("request-alignment").unwrap(),
        4096,
        "libblkio's request-alignment comes from the device's blk_size"
    );
    assert_eq!(
        client.capacity(),
        DISK_SIZE,
        "capacity is still counted in 512-byte sectors"
    );
    let disk = client.disk();
    let data = pattern(6, 3 * 4096, 8192);
    ok("4 KiB-aligned write", disk.write(3 * 4096, &data));
    let got = ok("4 KiB-aligned read", disk.read(3 * 4096, 8192));
    assert_bytes_eq("4 KiB-aligned round trip", &got, &data);

    // Offsets must be aligned to the logical block size (QEMU checks this too).
    assert_io_error(
        "4 KiB read at a 512-byte offset on a 4 KiB device",
        disk.read(512, 4096),
    );
    assert_io_error(
        "4 KiB write at a 512-byte offset on a 4 KiB device",
        disk.write(3 * 4096 + 512, &[0x5a; 4096]),
    );
    // So must lengths (stricter than qemu-storage-daemon, which checks only 512).
    assert_io_error("512-byte read on a 4 KiB device", disk.read(0, 512));
    assert_io_error(
        "512-byte write on a 4 KiB device",
        disk.write(4 * 4096, &[0x5a; 512]),
    );
    let got = ok("read after rejected writes", disk.read(3 * 4096, 8192));
    assert_bytes_eq("data after rejected unaligned requests", &got, &data);
}
