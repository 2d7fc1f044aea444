//! What the criterion suites share: a guest memory, 4 KiB read chains laid out in it, and a
//! whole queue pass over a backend, repeated until every completion is reaped.
//!
//! Included by each suite with `mod common;` (a directory, so cargo does not take it for a
//! suite of its own).
#![allow(dead_code)]

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vubd::testing::{mock, Backend, GuestMemoryMmap, Harness, QueueStart, VIRTIO_BLK_T_IN};

pub const QUEUE_SIZE: u16 = 256;
pub const N: u16 = VRING_DESC_F_NEXT as u16;
pub const W: u16 = VRING_DESC_F_WRITE as u16;

/// Whether `tool` is on the PATH (or in /usr/sbin, /sbin). Unlike the tests' helper of the
/// same name (which `tests/common/ceph.rs` calls), it installs nothing: a bench says what
/// is missing and goes on.
pub fn have_tool(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args([
            "-c",
            &format!("PATH=\"$PATH:/usr/sbin:/sbin\" command -v {tool}"),
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// `count` 4 KiB read chains (header, data, status) at the start of the descriptor table;
/// read `i` reads sector `i * 8`, so the first `count * 4` KiB of the disk.
pub fn read_chains(mem: &GuestMemoryMmap, count: u16) -> Vec<RawDescriptor> {
    let mut descs = Vec::new();
    for i in 0..count {
        let hdr = 0x10_0000 + u64::from(i) * 0x100;
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(hdr)).unwrap();
        mem.write_obj(u64::from(i) * 8, GuestAddress(hdr + 8))
            .unwrap();
        let first = i * 3;
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            hdr,
            16,
            N,
            first + 1,
        )));
        let data = 0x80_0000 + u64::from(i) * 0x1000;
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            data,
            4096,
            N | W,
            first + 2,
        )));
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            hdr + 0x80,
            1,
            W,
            0,
        )));
    }
    descs
}

/// Group `name`: a split queue pass over `backend` per iteration, at each of `batches`
/// reads, then passes until every completion is reaped, as a reactor's next passes would
/// reap them (spinning: the time includes the backend's whole round trip). `latency`:
/// per-request latency histograms on or off.
pub fn queue_pass_backend(
    c: &mut Criterion,
    name: &str,
    backend: &Arc<dyn Backend>,
    batches: &[u16],
    latency: bool,
) {
    let mut group = c.benchmark_group(name);
    for &batch in batches {
        let mem = Arc::new(memory());
        let vq = MockSplitQueue::new(&*mem, QUEUE_SIZE);
        for (i, d) in read_chains(&mem, batch).into_iter().enumerate() {
            vq.desc_table().store(i as u16, d).unwrap();
        }
        let start = QueueStart {
            latency,
            ..mock::queue_start(&vq, QUEUE_SIZE, &mem, Arc::clone(backend), "")
        };
        let mut h = Harness::new(|ctx| mock::virt_queue(start, ctx));
        group.throughput(Throughput::Elements(u64::from(batch)));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter(|| {
                // Offer the same `batch` chains again, wrapping around the avail ring as a
                // driver does.
                mock::offer(&vq, QUEUE_SIZE, (0..batch).map(|i| i * 3));
                assert_eq!(h.pass(), u32::from(batch));
                while h.poller.in_flight() > 0 {
                    h.pass();
                }
            })
        });
    }
    group.finish();
}
