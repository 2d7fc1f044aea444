//! The request path allocates nothing once warm: a counting global allocator watches whole
//! queue passes (pop, parse, check, iovecs, backend, status, used ring, notification) on the
//! null, RAM and file backends.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vubd::testing::GuestMemoryMmap;
use vubd::testing::{mock, open_backend, packed_mock, Harness, MockPackedQueue, Op};
use vubd::BackendSpec;

struct Counting;

thread_local! {
    /// Counting on this thread (the test's, which runs the queue): the test harness's other
    /// threads allocate as they please meanwhile.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}
static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// The count is process-wide: one test counts at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const QSIZE: u16 = 64;
const BATCH: u16 = 16;

/// Runs `rounds` passes of BATCH mixed 4 KiB reads and writes; returns allocations counted
/// during all passes after the first (warm-up) one.
fn allocations(backend: BackendSpec, rounds: u32) -> u64 {
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
    let vq = MockSplitQueue::new(&*mem, QSIZE);
    for i in 0..BATCH {
        let hdr = 0x10_0000 + u64::from(i) * 0x100;
        mem.write_obj(u32::from(i % 2), GuestAddress(hdr)).unwrap(); // IN, OUT alternating
        mem.write_obj(u64::from(i) * 8, GuestAddress(hdr + 8))
            .unwrap();
        let data_flags = if i % 2 == 0 { 2 } else { 0 };
        let d = [
            Descriptor::new(hdr, 16, 1, i * 3 + 1),
            Descriptor::new(
                0x80_0000 + u64::from(i) * 0x1000,
                4096,
                data_flags | 1,
                i * 3 + 2,
            ),
            Descriptor::new(hdr + 0x80, 1, 2, 0),
        ];
        for (k, d) in d.iter().enumerate() {
            vq.desc_table()
                .store(i * 3 + k as u16, RawDescriptor::from(*d))
                .unwrap();
        }
    }
    let start = mock::queue_start(&vq, QSIZE, &mem, open_backend(&backend, false).unwrap(), "");
    let mut h = Harness::new(|ctx| mock::virt_queue(start, ctx));
    for round in 0..rounds {
        if round == 1 {
            ALLOCS.store(0, Ordering::SeqCst);
            COUNTING.set(true);
        }
        mock::offer(&vq, QSIZE, (0..BATCH).map(|i| i * 3));
        assert_eq!(h.pass(), u32::from(BATCH));
        while h.poller.in_flight() > 0 {
            h.reap();
        }
        h.pass();
    }
    COUNTING.set(false);
    let stats = h.poller.stats();
    assert_eq!(stats.error_count(), 0);
    assert_eq!(
        stats.ops[Op::Read.index()] + stats.ops[Op::Write { fua: false }.index()],
        u64::from(rounds) * u64::from(BATCH)
    );
    ALLOCS.load(Ordering::SeqCst)
}

/// `allocations` over a packed ring (EVENT_IDX on): the driver rewrites the same BATCH
/// chains (buffer ids 0..BATCH) at its avail position each round, laps around the ring.
fn packed_allocations(backend: BackendSpec, rounds: u32) -> u64 {
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
    let mut drv = MockPackedQueue::new(&mem, GuestAddress(0x1000), QSIZE);
    let chains: Vec<[(u64, u32, u16, u16); 3]> = (0..BATCH)
        .map(|i| {
            let hdr = 0x10_0000 + u64::from(i) * 0x100;
            mem.write_obj(u32::from(i % 2), GuestAddress(hdr)).unwrap();
            mem.write_obj(u64::from(i) * 8, GuestAddress(hdr + 8))
                .unwrap();
            let data_flags = if i % 2 == 0 { 2 } else { 0 };
            [
                (hdr, 16, 1, i),
                (0x80_0000 + u64::from(i) * 0x1000, 4096, data_flags | 1, i),
                (hdr + 0x80, 1, 2, i),
            ]
        })
        .collect();
    let start =
        packed_mock::queue_start(&drv, &mem, open_backend(&backend, false).unwrap(), "", true);
    let mut h = Harness::new(|ctx| packed_mock::virt_queue(start, ctx));
    for round in 0..rounds {
        if round == 1 {
            ALLOCS.store(0, Ordering::SeqCst);
            COUNTING.set(true);
        }
        for c in &chains {
            drv.add_raw(c);
        }
        assert_eq!(h.pass(), u32::from(BATCH));
        while h.poller.in_flight() > 0 {
            h.reap();
        }
        h.pass();
    }
    COUNTING.set(false);
    let stats = h.poller.stats();
    assert_eq!(stats.error_count(), 0);
    assert_eq!(
        stats.ops[Op::Read.index()] + stats.ops[Op::Write { fua: false }.index()],
        u64::from(rounds) * u64::from(BATCH)
    );
    ALLOCS.load(Ordering::SeqCst)
}

/// Runs `measure` (heap allocations over 200 rounds, the first being the warm-up) on the
/// null, RAM and buffered-file backends, and asserts none allocated once warm.
fn assert_allocation_free(what: &str, measure: fn(BackendSpec, u32) -> u64) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(16 << 20).unwrap();
    for (name, backend) in [
        ("null", BackendSpec::Null { size: 16 << 20 }),
        ("ram", BackendSpec::Ram { size: 16 << 20 }),
        (
            "file",
            BackendSpec::File {
                path: file.path().into(),
                buffered: true,
            },
        ),
    ] {
        let n = measure(backend, 200);
        assert_eq!(
            n,
            0,
            "{what}, {name}: {n} heap allocations in {} requests",
            199 * BATCH
        );
    }
}

#[test]
fn packed_request_path_allocates_nothing_once_warm() {
    assert_allocation_free("packed", packed_allocations);
}

#[test]
fn request_path_allocates_nothing_once_warm() {
    assert_allocation_free("split", allocations);
}
