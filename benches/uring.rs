//! The reactor's io_uring alone: a batch of 4 KiB reads of a file in /dev/shm (tmpfs, so the
//! kernel completes them from memory) pushed, submitted with one io_uring_enter, and reaped.

use std::os::unix::io::AsRawFd;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use io_uring::{opcode, types};
use vubd::testing::Uring;

fn submit_reap(c: &mut Criterion) {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let path = dir.path().join("bench.img");
    std::fs::write(&path, vec![0x5au8; 8 << 20]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let mut bufs = vec![0u8; 32 * 4096];
    let mut ring = Uring::new().unwrap();
    let mut group = c.benchmark_group("uring_read_tmpfs");
    for batch in [1usize, 8, 32] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter(|| {
                for i in 0..batch {
                    let buf = bufs[i * 4096..].as_mut_ptr();
                    let sqe = opcode::Read::new(types::Fd(file.as_raw_fd()), buf, 4096)
                        .offset((i as u64 * 7919 % 2048) * 4096)
                        .build()
                        .user_data(i as u64);
                    // SAFETY: `bufs` outlives the batch, which is reaped below before the
                    // next iteration reuses it.
                    unsafe { ring.push(&sqe) }.unwrap();
                }
                ring.submit().unwrap();
                let mut done = 0;
                while done < batch {
                    done += ring.reap(|_, res| assert_eq!(res, 4096)) as usize;
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, submit_reap);
criterion_main!(benches);
