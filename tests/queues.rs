//! Multi-queue devices and many requests in flight, through libblkio.

mod common;

use common::*;
use std::collections::HashSet;

const DISK_SIZE: u64 = 64 * MIB;

/// Tiny xorshift so the access pattern is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random writes (and read-backs) inside [base, base+len) checked against an in-memory
/// shadow copy, then a full read of the region compared with the shadow.
fn random_io_worker(disk: &mut Disk, base: u64, len: u64, seed: u64) {
    const SIZES: [usize; 5] = [512, 4096, 16 * 1024, 64 * 1024, 128 * 1024];
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let mut shadow = vec![0u8; len as usize]; // a fresh RAM disk reads as zeroes
    for iter in 0..300u64 {
        let size = SIZES[rng.below(SIZES.len() as u64) as usize];
        let rel = rng.below((len - size as u64) / 512) * 512;
        let off = base + rel;
        let data = pattern(seed * 1000 + iter, off, size);
        ok(
            &format!("queue seed {seed}: write {size} B at {off}"),
            disk.write(off, &data),
        );
        shadow[rel as usize..rel as usize + size].copy_from_slice(&data);

        // Read back a random (possibly different) extent.
        let size = SIZES[rng.below(SIZES.len() as u64) as usize];
        let rel = rng.below((len - size as u64) / 512) * 512;
        let what = format!("queue seed {seed}: read {size} B at {}", base + rel);
        let got = ok(&what, disk.read(base + rel, size));
        assert_bytes_eq(&what, &got, &shadow[rel as usize..rel as usize + size]);
    }
    let chunk = MIB as usize;
    for rel in (0..len as usize).step_by(chunk) {
        let what = format!("queue seed {seed}: final read at {}", base + rel as u64);
        let got = ok(&what, disk.read(base + rel as u64, chunk));
        assert_bytes_eq(&what, &got, &shadow[rel..rel + chunk]);
    }
}

/// `n` 4 KiB writes to distinct, scattered blocks of [base, base+16 MiB) all queued at
/// once, then `n` reads queued at once; checks every completion arrives exactly once,
/// succeeds, and every block reads back what was written.
fn in_flight_batch(disk: &mut Disk, base: u64, n: usize, seed: u64) {
    const BS: usize = 4096;
    assert!(n * BS <= disk.buf.len());
    let blocks = (16 * MIB) / BS as u64;
    let off = |i: usize| base + (i as u64 * 7919 % blocks) * BS as u64;

    for i in 0..n {
        disk.buf.store(i * BS, &pattern(seed, off(i), BS));
        disk.submit_write(off(i), i * BS, BS, i);
    }
    check_completions("batched writes", disk.wait(n), n);

    disk.buf.fill(0, n * BS, 0xA5);
    for i in 0..n {
        disk.submit_read(off(i), i * BS, BS, i);
    }
    check_completions("batched reads", disk.wait(n), n);
    for i in 0..n {
        let what = format!("batched read of block {i} at {}", off(i));
        assert_bytes_eq(
            &what,
            &disk.buf.load(i * BS, BS),
            &pattern(seed, off(i), BS),
        );
    }
}

fn check_completions(what: &str, done: Vec<(usize, i32)>, n: usize) {
    let mut seen = HashSet::new();
    for (ud, ret) in done {
        assert_eq!(ret, 0, "{what}: request {ud} failed");
        assert!(ud < n, "{what}: completion for unknown request {ud}");
        assert!(seen.insert(ud), "{what}: request {ud} completed twice");
    }
    assert_eq!(seen.len(), n, "{what}: missing completions");
}

fn two_queue_server(dir: &std::path::Path) -> Server {
    let mask = two_cpu_mask();
    Server::start(
        dir,
        "vubd",
        &["--ram", "64M", "--num-queues", "2", "-m", &mask],
    )
}

#[test]
fn two_queues_two_threads() {
    let dir = test_dir();
    let server = two_queue_server(dir.path());
    let mut client = Client::connect(&server.socket, 2);
    let half = DISK_SIZE / 2;
    std::thread::scope(|s| {
        for (t, disk) in client.disks.iter_mut().enumerate() {
            s.spawn(move || random_io_worker(disk, t as u64 * half, half, t as u64 + 1));
        }
    });
    // Each queue sees the data written through the other one.
    let (d0, d1) = client.disks.split_at_mut(1);
    let a = ok("queue 1 reads region 0", d1[0].read(0, 64 * 1024));
    let b = ok("queue 0 reads region 0", d0[0].read(0, 64 * 1024));
    assert_bytes_eq("region 0 seen through both queues", &a, &b);
    let a = ok("queue 0 reads region 1", d0[0].read(half, 64 * 1024));
    let b = ok("queue 1 reads region 1", d1[0].read(half, 64 * 1024));
    assert_bytes_eq("region 1 seen through both queues", &a, &b);
}

#[test]
fn two_queues_many_in_flight() {
    let dir = test_dir();
    let server = two_queue_server(dir.path());
    let mut client = Client::connect(&server.socket, 2);
    std::thread::scope(|s| {
        for (t, disk) in client.disks.iter_mut().enumerate() {
            s.spawn(move || {
                for round in 0..5 {
                    in_flight_batch(disk, t as u64 * 32 * MIB, 512, t as u64 * 10 + round);
                }
            });
        }
    });
}

#[test]
fn one_queue_many_in_flight() {
    let dir = test_dir();
    let server = Server::start(dir.path(), "vubd", &["--ram", "64M"]);
    let mut client = Client::connect(&server.socket, 1);
    for round in 0..5 {
        in_flight_batch(client.disk(), 0, 1000, round);
    }
}

#[test]
fn more_queues_than_the_device_offers_is_refused() {
    let dir = test_dir();
    let server = two_queue_server(dir.path());
    let mut blkio = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio
        .set_str("path", server.socket.to_str().unwrap())
        .unwrap();
    blkio.connect().expect("connect");
    assert_eq!(
        blkio.get_i32("max-queues").expect("max-queues"),
        2,
        "device started with --num-queues 2 must report 2 queues"
    );
    blkio.set_i32("num-queues", 3).unwrap();
    assert!(
        blkio.start().is_err(),
        "starting 3 queues on a 2-queue device must fail"
    );
}

/// QEMU asks for one queue per vCPU unless told otherwise and refuses a backend that offers
/// fewer, so a device offers the protocol's maximum (256) unless --num-queues lowers it.
#[test]
fn default_device_offers_256_queues() {
    let dir = test_dir();
    let server = Server::start(dir.path(), "vubd", &["--ram", "64M"]);
    let mut blkio = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio
        .set_str("path", server.socket.to_str().unwrap())
        .unwrap();
    blkio.connect().expect("connect");
    assert_eq!(blkio.get_i32("max-queues").expect("max-queues"), 256);
    drop(blkio);
    let mut client = Client::connect(&server.socket, 4);
    for q in 0..4 {
        let off = q as u64 * MIB;
        let data = pattern(q as u64, off, 4096);
        ok("write", client.disks[q].write(off, &data));
        let got = ok("read", client.disks[q].read(off, 4096));
        assert_bytes_eq(&format!("queue {q}"), &got, &data);
    }
}
