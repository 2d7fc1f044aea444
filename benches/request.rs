//! Criterion suites for the request path, without a frontend or a kernel in the way.

mod common;

use std::sync::Arc;

use common::{memory, read_chains, QUEUE_SIZE, W};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vubd::testing::GuestMemoryMmap;
use vubd::testing::{
    iovec, mock, open_backend, packed_mock, Backend, GuestRange, Harness, MockPackedQueue, Parser,
    QueueStart, Request, VIRTIO_BLK_T_IN,
};
use vubd::BackendSpec;

fn null_disk() -> Arc<dyn Backend> {
    open_backend(&BackendSpec::Null { size: 1 << 30 }, false).unwrap()
}

/// Request parsing alone: one 3-descriptor read chain -> `Request` (guest memory reads and
/// every spec check, no backend).
fn parse(c: &mut Criterion) {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    vq.add_desc_chains(&read_chains(&mem, 1), 0).unwrap();
    let mut queue = mock::queue(&vq, QUEUE_SIZE);
    let mut parser = Parser::default();
    let mut req = Request::default();
    c.bench_function("parse_read_chain", |b| {
        b.iter(|| {
            queue.set_next_avail(0);
            let chain = queue.pop_descriptor_chain(&mem).unwrap();
            parser.parse(chain, &mem, &mut req).unwrap();
        })
    });
}

/// A whole queue pass on the null backend: pop, parse, check, zero-fill 4 KiB, write status,
/// add used, statistics, EVENT_IDX notification check. Reported per request at batch sizes 1, 8, 32,
/// with latency histograms on (the default) and off ("_nolat").
fn queue_pass(c: &mut Criterion) {
    queue_pass_with(c, "queue_pass_null", true);
    queue_pass_with(c, "queue_pass_null_nolat", false);
}

fn queue_pass_with(c: &mut Criterion, name: &str, latency: bool) {
    let _ = env_logger::try_init();
    common::queue_pass_backend(c, name, &null_disk(), &[1, 8, 32], latency);
}

/// The same pass on the backends that reach memory or the kernel: a RAM disk (completes
/// inline, copying 4 KiB), a buffered file on tmpfs (io_uring readv, served by io-wq) and an
/// O_DIRECT file on the disk under the target directory (io_uring readv to the device). The
/// pass repeats until every completion is reaped, as a reactor's next passes would.
fn queue_pass_backends(c: &mut Criterion) {
    let _ = env_logger::try_init();
    let path = std::path::PathBuf::from("/dev/shm/vubd-bench-queue-pass.img");
    // /dev/shm has no O_DIRECT; the target directory is on a real file system.
    let direct = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("queue-pass-direct.img");
    for p in [&path, &direct] {
        let file = std::fs::File::create(p).unwrap();
        file.set_len(64 << 20).unwrap();
    }
    // Blocks the reads really reach: a hole or an unwritten extent reads back as zeroes
    // without touching the device.
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&direct)
            .unwrap();
        file.write_all(&vec![0xa5; 1 << 20]).unwrap();
        file.sync_all().unwrap();
    }
    let backends: [(&str, BackendSpec); 3] = [
        ("ram", BackendSpec::Ram { size: 64 << 20 }),
        (
            "file_tmpfs",
            BackendSpec::File {
                path: path.clone(),
                buffered: true,
            },
        ),
        (
            "file_direct",
            BackendSpec::File {
                path: direct.clone(),
                buffered: false,
            },
        ),
    ];
    for (name, spec) in backends {
        let backend = open_backend(&spec, false).unwrap();
        common::queue_pass_backend(c, &format!("queue_pass_{name}"), &backend, &[1, 32], true);
    }
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&direct);
}

/// Where the packed ring of the packed benches lives (the split mock's rings are below 1 MiB
/// too, but these benches use one layout at a time).
const PACKED_RING: u64 = 0x1000;

/// The header, data and status buffers of read `i`, as `read_chains` lays them out.
fn read_bufs(mem: &GuestMemoryMmap, i: u16) -> [(u64, u32, u16); 3] {
    let hdr = 0x10_0000 + u64::from(i) * 0x100;
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(hdr)).unwrap();
    mem.write_obj(u64::from(i) * 8, GuestAddress(hdr + 8))
        .unwrap();
    let data = 0x80_0000 + u64::from(i) * 0x1000;
    [(hdr, 16, 0), (data, 4096, W), (hdr + 0x80, 1, W)]
}

/// Packed rings beside split ones: the queue pass of `queue_pass` (latency histograms on) on
/// the null backend, over a packed ring. Each packed iteration includes the mock driver's work:
/// writing the chains' descriptors into the ring and reading the used descriptors back
/// (split's includes writing the avail ring).
fn packed(c: &mut Criterion) {
    let _ = env_logger::try_init();
    let mem = Arc::new(memory());
    let mut group = c.benchmark_group("queue_pass_null_packed");
    for batch in [1u16, 8, 32] {
        let mut drv = MockPackedQueue::new(&mem, GuestAddress(PACKED_RING), QUEUE_SIZE);
        let bufs: Vec<_> = (0..batch).map(|i| read_bufs(&mem, i)).collect();
        let start: QueueStart = packed_mock::queue_start(&drv, &mem, null_disk(), "", true);
        let mut h = Harness::new(|ctx| packed_mock::virt_queue(start, ctx));
        group.throughput(Throughput::Elements(u64::from(batch)));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter(|| {
                for chain in &bufs {
                    drv.add_chain(chain);
                }
                assert_eq!(h.pass(), u32::from(batch));
                for _ in 0..batch {
                    drv.used().expect("used");
                }
            })
        });
    }
    group.finish();
}

/// Data ranges -> iovecs into guest memory (region lookup and bounds checks) for a request
/// of 1, 8 and 32 segments of 4 KiB.
fn iovec_building(c: &mut Criterion) {
    let mem = memory();
    let mut group = c.benchmark_group("iovec_build");
    for segs in [1u64, 8, 32] {
        let ranges: Vec<GuestRange> = (0..segs)
            .map(|i| GuestRange {
                addr: GuestAddress(0x80_0000 + i * 0x2000),
                len: 4096,
            })
            .collect();
        let mut out = Vec::with_capacity(64);
        group.throughput(Throughput::Elements(segs));
        group.bench_with_input(BenchmarkId::from_parameter(segs), &ranges, |b, ranges| {
            b.iter(|| {
                out.clear();
                iovec::build(&mem, ranges, true, &mut out).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    parse,
    iovec_building,
    queue_pass,
    queue_pass_backends,
    packed
);
criterion_main!(benches);
