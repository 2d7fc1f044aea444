//! Fuzzes packed virtqueues from the device side. A hostile driver writes any ring
//! descriptors (addresses, lengths, buffer ids, flags with the AVAIL/USED bits in any
//! combination, INDIRECT, NEXT), indirect tables, request headers, the driver event
//! suppression area and the vring base; sometimes a restart is simulated: the packed
//! inflight record holds any bytes and is recovered before the ring starts, as a restarted
//! vubd does. `VirtQueue` passes on the null and RAM backends then take, parse and complete
//! chains, write used descriptors and device events and signal through the ring.
//! Nothing may panic, and nothing may touch memory outside the one guest region.
#![no_main]

use std::cell::RefCell;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vubd::testing::GuestMemoryMmap;
use vubd::testing::{
    open_backend, Backend, Caps, Ctx, DeviceModel, EventFdNotifier, InflightLayout, InflightRegion,
    PackedInflight, PackedRing, PackedRingConfig, Poller, QueueStart, Ring, SignalRing, Uring,
    VirtQueue, VringBase,
};
use vubd::BackendSpec;

/// The guest region: 256 KiB at guest address 0.
const MEM: u64 = 0x4_0000;
const RING: u64 = 0x1000;
const DRIVER_EVENT: u64 = 0x2000;
const DEVICE_EVENT: u64 = 0x2004;
/// Largest ring tried.
const MAX_SIZE: u16 = 64;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// Somewhere in the region, 16-byte steps.
    In(u16),
    /// Just below the region's end.
    End(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Desc {
    addr: Addr,
    len: u16,
    big: bool,
    id: u8,
    flags: u16,
}

#[derive(Arbitrary, Debug)]
struct Input {
    size: u8,
    base: Option<u32>,
    event_idx: bool,
    ring: Vec<Desc>,
    /// Tables: (16-byte slot in the region, entries).
    tables: Vec<(u16, Vec<Desc>)>,
    /// Request headers: (16-byte slot, type, sector).
    headers: Vec<(u16, u8, u64)>,
    driver_event: (u16, u16),
    /// Some: the queue restarts from an inflight record with these bytes written over it.
    record: Option<Vec<(u16, u8)>>,
    passes: u8,
}

fn addr(a: Addr) -> u64 {
    match a {
        Addr::In(x) => u64::from(x) * 16 % MEM,
        Addr::End(x) => MEM - 1 - u64::from(x),
        Addr::Raw(x) => x,
    }
}

fn raw(d: &Desc) -> [u8; 16] {
    let len = if d.big {
        u32::from(d.len) << 16
    } else {
        u32::from(d.len)
    };
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr(d.addr).to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&u16::from(d.id).to_le_bytes());
    b[14..16].copy_from_slice(&d.flags.to_le_bytes());
    b
}

struct Fixtures {
    null: Arc<dyn Backend>,
    ram: Arc<dyn Backend>,
    model: Arc<DeviceModel>,
    ring: Uring,
    /// One single-queue packed inflight region per ring size, made when first needed.
    regions: Vec<Option<Arc<InflightRegion>>>,
}

thread_local! {
    static FIXTURES: RefCell<Fixtures> = RefCell::new({
        let null = open_backend(&BackendSpec::Null { size: 1 << 20 }, false).unwrap();
        let ram = open_backend(&BackendSpec::Ram { size: 1 << 20 }, false).unwrap();
        let model = Arc::new(DeviceModel::new(1 << 20, 512, false, true, "fuzz", Caps::ALL, 1));
        Fixtures {
            null,
            ram,
            model,
            ring: Uring::new().expect("io_uring"),
            regions: (0..=MAX_SIZE).map(|_| None).collect(),
        }
    });
}

fn call_eventfd() -> std::fs::File {
    use std::os::unix::io::FromRawFd;
    // SAFETY: plain syscall; the fd is checked and then owned by the File.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: a fresh fd owned by nobody else.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

fn memory(input: &Input) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let put = |at: u64, b: &[u8]| {
        let _ = mem.write_slice(b, GuestAddress(at));
    };
    for (slot, kind, sector) in input.headers.iter().take(64) {
        let at = (u64::from(*slot) * 16) % MEM;
        let mut h = u32::from(*kind % 12).to_le_bytes().to_vec();
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        put(at, &h);
    }
    for (slot, entries) in input.tables.iter().take(8) {
        let at = (u64::from(*slot) * 16) % MEM;
        for (i, d) in entries.iter().take(64).enumerate() {
            put(at + 16 * i as u64, &raw(d));
        }
    }
    for (i, d) in input.ring.iter().take(usize::from(MAX_SIZE)).enumerate() {
        put(RING + 16 * i as u64, &raw(d));
    }
    let (flags, off_wrap) = input.driver_event;
    put(DRIVER_EVENT, &off_wrap.to_le_bytes());
    put(DRIVER_EVENT + 2, &flags.to_le_bytes());
    mem
}

fn run(input: &Input, backend: &Arc<dyn Backend>, f: &mut Fixtures) {
    let size = 1 + u16::from(input.size) % MAX_SIZE;
    let mem = Arc::new(memory(input));
    let cfg = PackedRingConfig {
        size,
        desc_table: GuestAddress(RING),
        driver_event: GuestAddress(DRIVER_EVENT),
        device_event: GuestAddress(DEVICE_EVENT),
        event_idx: input.event_idx,
    };
    cfg.check(&mem).expect("the fixed layout is valid");
    // As vhost::device::packed_start: the base, or where the record says the ring stands.
    let mut base = input
        .base
        .and_then(|b| VringBase::decode(b, size))
        .unwrap_or(VringBase::START);
    let mut inflight = None;
    let mut resubmit = Vec::new();
    if let Some(bytes) = &input.record {
        let region = f.regions[usize::from(size)].get_or_insert_with(|| {
            Arc::new(
                InflightRegion::create_layout(InflightLayout::Packed, 1, size, 1)
                    .expect("inflight region"),
            )
        });
        let mut t = PackedInflight::of(region, 0, size).expect("covers queue 0");
        t.reset(base);
        let len = region.mmap_size();
        for &(off, b) in bytes.iter().take(64) {
            let _ = region.file().write_at(&[b], u64::from(off) % len);
        }
        match t.recover(&mem, cfg.desc_table) {
            Ok(rec) => {
                base = rec.base;
                resubmit = rec.heads;
            }
            Err(_) => t.reset(base),
        }
        inflight = Some(t);
    }
    let ring = &mut f.ring;
    let start = QueueStart {
        device: Arc::from("fuzz"),
        index: 0,
        ring: Ring::Packed {
            ring: PackedRing::new(cfg, base),
            inflight,
        },
        mem,
        model: Arc::clone(&f.model),
        backend: Arc::clone(backend),
        kick: None,
        resubmit,
        latency: true,
    };
    let notifier = EventFdNotifier::new(Some(SignalRing::new(&call_eventfd()).expect("call")));
    let mut p = VirtQueue::new(start, notifier, &mut Ctx::new(ring, 0, 0)).expect("channel");
    for round in 0..1 + input.passes % 4 {
        p.poll(&mut Ctx::new(ring, 0, 0));
        p.end_pass(&mut Ctx::new(ring, 0, 0));
        ring.submit().expect("submit");
        let mut done = [(0u64, 0i32); 16];
        loop {
            let n = ring.reap_into(&mut done);
            for &(ud, res) in &done[..n] {
                p.complete(&mut Ctx::new(ring, 0, 0), ud & ((1 << 48) - 1), res);
            }
            if ring.in_flight() == 0 && ring.background() == 0 {
                break;
            }
        }
        if round == 0 {
            p.arm();
            p.disarm();
        }
    }
    assert_eq!(p.in_flight(), 0, "null/ram backends complete inline");
    let stopped = p.stopped();
    let b = stopped.packed.expect("a packed ring");
    assert!(
        b.avail.idx < size && b.used.idx < size,
        "positions inside the ring"
    );
}

fuzz_target!(|input: Input| {
    FIXTURES.with(|f| {
        let mut f = f.borrow_mut();
        let f = &mut *f;
        let null = Arc::clone(&f.null);
        run(&input, &null, f);
        let ram = Arc::clone(&f.ram);
        run(&input, &ram, f);
    });
});
