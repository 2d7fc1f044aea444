//! The ring floor: a QD1 virtio-blk read done by an ideal device on the split ring's layout.
//! The driver side writes what a driver writes for one request (the 16-byte header, three
//! descriptors, an avail entry and the avail index); the device side reads what a device
//! must read (the avail index and entry, the descriptors, the header), fills the data
//! buffer, writes the status byte, the used entry and the used index; the driver waits for
//! the used index and reads the entry and the status. No validation beyond the data
//! length, no backend, no notifications: the cache lines a request moves between the two
//! CPUs and nothing else. A server can come near this on a QD1 polled read, never under it.

use std::cell::UnsafeCell;
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

const SIZE: usize = 256;
const NEXT: u64 = 1;
const WRITE: u64 = 2;
const DATA: usize = 4096;

/// Each part of the ring on its own page, where a driver would put it.
#[repr(C, align(4096))]
struct Page<T>(T);

/// A split ring and one request's buffers. The device finds the parts by the descriptors'
/// addresses: offsets into this structure.
#[repr(C)]
struct Layout {
    /// Descriptors: {le64 addr} and {le32 len, le16 flags, le16 next} as two words.
    desc: Page<[[AtomicU64; 2]; SIZE]>,
    /// flags, idx, ring[SIZE], used_event.
    avail: Page<[AtomicU16; SIZE + 3]>,
    used: Page<Used>,
    /// The request header {type, reserved, sector} and, on the same line, the status byte.
    header: Page<[AtomicU64; 2]>,
    status: AtomicU8,
    data: Page<UnsafeCell<[u8; DATA]>>,
}

#[repr(C)]
struct Used {
    flags: AtomicU16,
    idx: AtomicU16,
    /// {le32 id, le32 len}.
    ring: [[AtomicU32; 2]; SIZE],
}

// SAFETY: every field but `data` is atomic; `data` is written by the device thread alone
// and read by no one (the driver side, like a benchmark client that does not verify, does
// not look at the bytes).
unsafe impl Sync for Layout {}

fn offset_of_header() -> u64 {
    std::mem::offset_of!(Layout, header) as u64
}
fn offset_of_data() -> u64 {
    std::mem::offset_of!(Layout, data) as u64
}
fn offset_of_status() -> u64 {
    std::mem::offset_of!(Layout, status) as u64
}

/// The device: serves requests until `stop`. `data`: whether a read fills its buffer (a
/// null device's zeroes) or only the ring moves.
fn device(ring: &Layout, stop: &AtomicBool, data: bool) {
    let mut next = 0u16;
    while !stop.load(Ordering::Relaxed) {
        if ring.avail.0[1].load(Ordering::Acquire) == next {
            std::hint::spin_loop();
            continue;
        }
        let head = ring.avail.0[2 + usize::from(next) % SIZE].load(Ordering::Relaxed);
        let mut i = usize::from(head) % SIZE;
        let mut total = 0u32;
        loop {
            let addr = ring.desc.0[i][0].load(Ordering::Relaxed);
            let word = ring.desc.0[i][1].load(Ordering::Relaxed);
            let len = word as u32;
            let flags = (word >> 32) & 0xffff;
            if addr == offset_of_header() {
                // The request type and sector, as a parser reads them.
                let kind = ring.header.0[0].load(Ordering::Relaxed) as u32;
                let sector = ring.header.0[1].load(Ordering::Relaxed);
                std::hint::black_box((kind, sector));
            } else if addr == offset_of_data() {
                if data {
                    let n = (len as usize).min(DATA);
                    // SAFETY: `n` is at most the buffer's length; only this thread writes
                    // the buffer and no thread reads it (see `Sync` above).
                    unsafe { std::ptr::write_bytes(ring.data.0.get().cast::<u8>(), 0, n) };
                }
                total += len;
            } else if addr == offset_of_status() {
                ring.status.store(0, Ordering::Relaxed);
                total += 1;
            }
            if flags & NEXT == 0 {
                break;
            }
            i = (word >> 48) as usize % SIZE;
        }
        let slot = usize::from(next) % SIZE;
        ring.used.0.ring[slot][0].store(u32::from(head), Ordering::Relaxed);
        ring.used.0.ring[slot][1].store(total, Ordering::Relaxed);
        next = next.wrapping_add(1);
        ring.used.0.idx.store(next, Ordering::Release);
    }
}

fn descriptor(ring: &Layout, i: usize, addr: u64, len: u32, flags: u64, next: u16) {
    ring.desc.0[i][0].store(addr, Ordering::Relaxed);
    let word = u64::from(len) | flags << 32 | u64::from(next) << 48;
    ring.desc.0[i][1].store(word, Ordering::Relaxed);
}

/// Round-trip times in µs, one sample per batch (`super::timed`), for `seconds`; the
/// driver runs on this thread, the device on `device_cpu`. Fails if a request came back
/// with the wrong head, length or status, or a read left its buffer unfilled.
pub fn measure(seconds: f64, device_cpu: usize, data: bool) -> Result<Vec<f64>, String> {
    let ring: Arc<Layout> = Arc::new(Layout {
        desc: Page(std::array::from_fn(|_| {
            [AtomicU64::new(0), AtomicU64::new(0)]
        })),
        avail: Page(std::array::from_fn(|_| AtomicU16::new(0))),
        used: Page(Used {
            flags: AtomicU16::new(0),
            idx: AtomicU16::new(0),
            ring: std::array::from_fn(|_| [AtomicU32::new(0), AtomicU32::new(0)]),
        }),
        header: Page([AtomicU64::new(0), AtomicU64::new(0)]),
        status: AtomicU8::new(0xff),
        data: Page(UnsafeCell::new([0xa5; DATA])),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let dev = {
        let (ring, stop) = (Arc::clone(&ring), Arc::clone(&stop));
        super::spawn_on(device_cpu, move || device(&ring, &stop, data))
    };
    let mut idx = 0u16;
    let mut sector = 0u64;
    let mut wrong = 0u64;
    let samples = super::timed(seconds, || {
        // A read of 8 sectors (VIRTIO_BLK_T_IN is 0), as a driver prepares it.
        ring.header.0[0].store(0, Ordering::Relaxed);
        ring.header.0[1].store(sector, Ordering::Relaxed);
        sector = (sector + 8) % (1 << 21);
        descriptor(&ring, 0, offset_of_header(), 16, NEXT, 1);
        descriptor(&ring, 1, offset_of_data(), DATA as u32, NEXT | WRITE, 2);
        descriptor(&ring, 2, offset_of_status(), 1, WRITE, 0);
        ring.avail.0[2 + usize::from(idx) % SIZE].store(0, Ordering::Relaxed);
        idx = idx.wrapping_add(1);
        ring.avail.0[1].store(idx, Ordering::Release);
        while ring.used.0.idx.load(Ordering::Acquire) != idx {
            std::hint::spin_loop();
        }
        // Head 0, the buffer and the status byte written, status OK.
        let entry = &ring.used.0.ring[usize::from(idx.wrapping_sub(1)) % SIZE];
        let done = (
            entry[0].load(Ordering::Relaxed),
            entry[1].load(Ordering::Relaxed),
            ring.status.load(Ordering::Relaxed),
        );
        // The next request must find it written again (a plain store: the driver owns
        // the line, which holds the header it writes next anyway).
        ring.status.store(0xff, Ordering::Relaxed);
        wrong += u64::from(done != (0, DATA as u32 + 1, 0));
    });
    fence(Ordering::SeqCst);
    stop.store(true, Ordering::Relaxed);
    let _ = dev.join();
    if wrong > 0 {
        return Err(format!("{wrong} requests came back wrong"));
    }
    if data {
        // SAFETY: the device thread, the buffer's only writer, has been joined.
        let buf = unsafe { &*ring.data.0.get() };
        if buf.iter().any(|&b| b != 0) {
            return Err("the data buffer was not filled".into());
        }
    }
    Ok(samples)
}
