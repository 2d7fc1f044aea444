//! Fuzzes the guest-facing request path: a hostile driver controls two regions of guest memory,
//! a descriptor table of raw descriptors (any addr/len/flags/next, indirect tables included),
//! request headers and discard segments anywhere, and the avail ring.
//!
//! Phase 1 pops every offered chain from a device-side `virtio_queue::Queue` and runs
//! `Parser::parse`, then the block core's checks against a small device model, checking the
//! parser's invariants. Phase 2 runs whole `VirtQueue` passes (null and RAM backends) over the
//! same guest memory, which writes status bytes and used-ring entries and signals a call
//! eventfd through the ring.
//! Nothing may panic, and nothing may touch memory outside the two regions (a stray pointer
//! segfaults under the sanitizer).
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use vubd::testing::GuestMemoryMmap;
use vubd::testing::{
    open_backend, Backend, BlockRequest, Caps, Chain, Ctx, DeviceModel, EventFdNotifier,
    InflightRegion, ParseError, Parser, Poller, QueueStart, Request, RequestType, Ring, SignalRing,
    Uring, VirtQueue,
};
use vubd::BackendSpec;

/// Each guest memory region is 64 KiB.
const REGION: u64 = 0x1_0000;
/// Largest queue size tried (2^8).
const MAX_QUEUE_LOG2: u8 = 8;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A guest address: mostly inside one of the two regions, sometimes anything at all.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    R0(u16),
    R1(u16),
    /// Just below/above a region end, to hit boundary arithmetic.
    R0End(u8),
    R1End(u8),
    Raw(u64),
}

/// Where region 1 sits relative to region 0 (region 0 is at `base0 * 64 KiB`).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Region1 {
    /// Right after region 0: ranges may straddle the two.
    Adjacent,
    /// `1 + n` 64 KiB slots after region 0.
    Gap(u8),
    /// Near the top of the 64-bit guest address space (its end does not overflow).
    High,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Small(u8),
    Sectors(u8),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Desc {
    addr: Addr,
    len: Len,
    /// bit 0 NEXT, bit 1 WRITE, bit 2 INDIRECT, bit 3 an undefined high flag.
    flags: u8,
    next: u16,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Sector {
    Small(u16),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct Header {
    at: Addr,
    kind: Kind,
    ioprio: u32,
    sector: Sector,
}

#[derive(Arbitrary, Debug)]
struct Segment {
    at: Addr,
    sector: Sector,
    num_sectors: u32,
    flags: u32,
}

#[derive(Arbitrary, Debug)]
struct Table {
    at: Addr,
    descs: Vec<Desc>,
}

/// A long valid chain laid out as a table: a 16-byte readable header descriptor, then
/// `count` descriptors (zero-length or 16-byte readable ones), then a 1-byte status, each
/// entry linked to the next. Placed anywhere, used as an indirect table or as the queue's own
/// descriptor table; it lets inputs reach walks far longer than hand-written tables.
#[derive(Arbitrary, Debug)]
struct Long {
    at: Addr,
    count: u16,
    zero_len: bool,
    header: Addr,
    status: Addr,
}

#[derive(Arbitrary, Debug)]
struct RawWrite {
    at: Addr,
    bytes: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    base0: u8,
    region1: Region1,
    queue_log2: u8,
    desc_table: Addr,
    avail_ring: Addr,
    used_ring: Addr,
    /// Device's next_avail before the pass (wrap-around of the 16-bit indices).
    next_avail: u16,
    /// How many chains the driver offers: avail.idx = next_avail + offered.
    offered: u16,
    avail_flags: u16,
    avail: Vec<u16>,
    used_event: u16,
    event_idx: bool,
    /// 0: rw 512 B blocks, 1: ro 512, 2: rw 4096, 3: ro 4096.
    disk: u8,
    /// Track requests in an inflight region (INFLIGHT_SHMFD).
    inflight: bool,
    /// Heads a "previous backend" left in flight, resubmitted before the avail ring (any
    /// value: they come from frontend-shared memory).
    resubmit: Vec<u16>,
    long: Option<Long>,
    writes: Vec<RawWrite>,
    headers: Vec<Header>,
    segments: Vec<Segment>,
    tables: Vec<Table>,
    descs: Vec<Desc>,
}

struct Layout {
    base0: u64,
    base1: u64,
}

impl Layout {
    fn new(input: &Input) -> Layout {
        let base0 = u64::from(input.base0 % 16) * REGION;
        let base1 = match input.region1 {
            Region1::Adjacent => base0 + REGION,
            Region1::Gap(n) => base0 + REGION * (2 + u64::from(n % 16)),
            Region1::High => u64::MAX - 2 * REGION + 1,
        };
        Layout { base0, base1 }
    }

    fn addr(&self, a: Addr) -> u64 {
        match a {
            Addr::R0(off) => self.base0 + u64::from(off),
            Addr::R1(off) => self.base1 + u64::from(off),
            Addr::R0End(d) => (self.base0 + REGION).wrapping_add(i64::from(d as i8) as u64),
            Addr::R1End(d) => (self.base1 + REGION).wrapping_add(i64::from(d as i8) as u64),
            Addr::Raw(a) => a,
        }
    }

    fn memory(&self) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(self.base0), REGION as usize),
            (GuestAddress(self.base1), REGION as usize),
        ])
        .expect("two disjoint 64 KiB regions")
    }
}

fn len(l: Len) -> u32 {
    match l {
        Len::Small(n) => u32::from(n),
        Len::Sectors(n) => u32::from(n) * 512,
        Len::Raw(n) => n,
    }
}

fn sector(s: Sector) -> u64 {
    match s {
        Sector::Small(n) => u64::from(n),
        Sector::Raw(n) => n,
    }
}

fn raw_desc(l: &Layout, d: &Desc) -> [u8; 16] {
    let mut flags = 0u16;
    if d.flags & 1 != 0 {
        flags |= F_NEXT;
    }
    if d.flags & 2 != 0 {
        flags |= F_WRITE;
    }
    if d.flags & 4 != 0 {
        flags |= F_INDIRECT;
    }
    if d.flags & 8 != 0 {
        flags |= 0x8000;
    }
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&l.addr(d.addr).to_le_bytes());
    b[8..12].copy_from_slice(&len(d.len).to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&d.next.to_le_bytes());
    b
}

fn kind(k: Kind) -> u32 {
    match k {
        Kind::In => 0,
        Kind::Out => 1,
        Kind::Flush => 4,
        Kind::GetId => 8,
        Kind::Discard => 11,
        Kind::WriteZeroes => 13,
        Kind::Raw(t) => t,
    }
}

/// Writes that fall outside guest memory are simply skipped (the driver cannot write there
/// either).
fn put(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    let _ = mem.write_slice(bytes, GuestAddress(addr));
}

fn queue_size(input: &Input) -> u16 {
    1 << (input.queue_log2 % (MAX_QUEUE_LOG2 + 1))
}

/// Lays the driver's view out in `mem`; returns the queue's ring addresses (aligned as the
/// spec requires: 16, 2 and 4 bytes).
fn fill(l: &Layout, mem: &GuestMemoryMmap, input: &Input) -> (u64, u64, u64) {
    let size = queue_size(input);
    if let Some(long) = &input.long {
        let base = l.addr(long.at);
        let n = u64::from(long.count % 8192);
        let put_desc = |i: u64, addr: u64, len: u32, flags: u16| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
            put(mem, base.wrapping_add(16 * i), &b);
        };
        let body_len = if long.zero_len { 0 } else { 16 };
        put_desc(0, l.addr(long.header), 16, F_NEXT);
        for i in 1..=n {
            put_desc(i, l.addr(long.header), body_len, F_NEXT);
        }
        put_desc(n + 1, l.addr(long.status), 1, F_WRITE);
    }
    for w in input.writes.iter().take(16) {
        let n = w.bytes.len().min(256);
        put(mem, l.addr(w.at), &w.bytes[..n]);
    }
    for h in input.headers.iter().take(16) {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&kind(h.kind).to_le_bytes());
        b[4..8].copy_from_slice(&h.ioprio.to_le_bytes());
        b[8..16].copy_from_slice(&sector(h.sector).to_le_bytes());
        put(mem, l.addr(h.at), &b);
    }
    for s in input.segments.iter().take(8) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&sector(s.sector).to_le_bytes());
        b[8..12].copy_from_slice(&s.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&s.flags.to_le_bytes());
        put(mem, l.addr(s.at), &b);
    }
    for t in input.tables.iter().take(4) {
        let base = l.addr(t.at);
        for (i, d) in t.descs.iter().take(32).enumerate() {
            put(mem, base.wrapping_add(16 * i as u64), &raw_desc(l, d));
        }
    }
    let desc = l.addr(input.desc_table) & !15;
    let avail = l.addr(input.avail_ring) & !1;
    let used = l.addr(input.used_ring) & !3;
    for (i, d) in input.descs.iter().take(usize::from(size)).enumerate() {
        put(mem, desc.wrapping_add(16 * i as u64), &raw_desc(l, d));
    }
    // avail ring: flags, idx, ring[size], used_event.
    let idx = input.next_avail.wrapping_add(input.offered);
    put(mem, avail, &input.avail_flags.to_le_bytes());
    put(mem, avail.wrapping_add(2), &idx.to_le_bytes());
    for (i, head) in input.avail.iter().take(usize::from(size)).enumerate() {
        let slot = u64::from(input.next_avail.wrapping_add(i as u16) % size);
        put(mem, avail.wrapping_add(4 + 2 * slot), &head.to_le_bytes());
    }
    put(
        mem,
        avail.wrapping_add(4 + 2 * u64::from(size)),
        &input.used_event.to_le_bytes(),
    );
    (desc, avail, used)
}

fn device_queue(input: &Input, rings: (u64, u64, u64)) -> Option<Queue> {
    let size = queue_size(input);
    let mut q = Queue::new(1 << MAX_QUEUE_LOG2).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(rings.0)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(rings.1)).ok()?;
    q.try_set_used_ring_address(GuestAddress(rings.2)).ok()?;
    q.set_event_idx(input.event_idx);
    q.set_next_avail(input.next_avail);
    q.set_next_used(input.next_avail);
    q.set_ready(true);
    Some(q)
}

/// A device: backend plus model (variant bit 0: read-only, bit 1: 4 KiB blocks).
struct Disk {
    backend: Arc<dyn Backend>,
    model: Arc<DeviceModel>,
}

impl Disk {
    fn new(spec: BackendSpec, variant: u8) -> Disk {
        let backend = open_backend(&spec, false).unwrap();
        let model = Arc::new(DeviceModel::new(
            backend.info().size,
            if variant & 2 != 0 { 4096 } else { 512 },
            variant & 1 != 0,
            true,
            "fuzz-serial",
            Caps::ALL,
            1,
        ));
        Disk { backend, model }
    }
}

/// The checks a request passes before a backend sees it.
fn check(req: &Request, model: &DeviceModel) -> bool {
    req.block_op(model).is_ok_and(|(op, offset, len)| {
        model
            .check(&BlockRequest {
                op,
                offset,
                len,
                ..BlockRequest::default()
            })
            .is_ok()
    })
}

struct Fixtures {
    null: Vec<Disk>,
    ram: Vec<Disk>,
    ring: Uring,
    /// One single-queue inflight region per queue size.
    inflight: Vec<Arc<InflightRegion>>,
}

thread_local! {
    // Built once: a RAM disk allocation and an io_uring setup cost far more than one input.
    // Each pass reaps its ring before the next, so no state carries over.
    static FIXTURES: RefCell<Fixtures> = RefCell::new(Fixtures {
        null: (0..4).map(|v| Disk::new(BackendSpec::Null { size: 1 << 20 }, v)).collect(),
        ram: (0..4).map(|v| Disk::new(BackendSpec::Ram { size: 1 << 20 }, v)).collect(),
        ring: Uring::new().expect("io_uring"),
        inflight: (0..=MAX_QUEUE_LOG2)
            .map(|l| Arc::new(InflightRegion::create(1, 1 << l, 1).expect("inflight region")))
            .collect(),
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

/// `VUBD_FUZZ_TRACE=1` prints what each input did (to check seeds by hand).
fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("VUBD_FUZZ_TRACE").is_some())
}

/// Phase 1: parse every offered chain and check the parser's promises.
fn parse_all(mem: &GuestMemoryMmap, mut q: Queue, model: &DeviceModel) {
    let mut parser = Parser::default();
    let mut req = Request::default();
    for _ in 0..q.size() {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        // virtio-queue's walker (what the parser was first written against)...
        let r = parser.parse(chain, mem, &mut req);
        if r.is_ok() {
            let _ = check(&req, model);
        }
        // ...and vubd's own, which the poller uses.
        let chain = Chain::new(mem, GuestAddress(q.desc_table()), q.size(), head);
        let r = parser.parse(chain, mem, &mut req);
        if trace() {
            eprintln!(
                "head {head}: {r:?} kind {:?} sector {} len {} check {:?}",
                req.kind(),
                req.sector(),
                req.data_len(),
                r.ok().map(|_| check(&req, model))
            );
        }
        match r {
            Ok(()) => {
                let status = req.status_addr();
                assert!(
                    mem.check_range(status, 1, Permissions::Write),
                    "status byte outside guest memory"
                );
                assert_eq!(parser.status_addr(), Some(status));
                let sum: u64 = req.data().iter().map(|r| u64::from(r.len)).sum();
                assert_eq!(sum, req.data_len());
                assert!(req.data().iter().all(|r| r.len > 0), "empty data range");
                if check(&req, model) {
                    let capacity = model.capacity();
                    match req.kind() {
                        RequestType::In | RequestType::Out => {
                            assert!(req.offset() + req.data_len() <= capacity);
                            assert!(!(req.kind() == RequestType::Out && model.read_only()));
                        }
                        RequestType::Discard | RequestType::WriteZeroes => {
                            let s = req.segment();
                            assert!(!model.read_only());
                            assert!((s.sector << 9) + (u64::from(s.num_sectors) << 9) <= capacity);
                        }
                        RequestType::Unsupported(_) => panic!("unsupported request accepted"),
                        RequestType::Flush | RequestType::GetId => {}
                    }
                }
            }
            Err(ParseError::Invalid(_)) => {
                // The queue completes such a request at this address.
                let status = parser.status_addr().expect("status known on Invalid error");
                assert!(mem.check_range(status, 1, Permissions::Write));
            }
            // The poller stops the queue here; so does this phase (a guest cannot make the
            // server walk more broken chains than that).
            Err(ParseError::Fatal(_)) => break,
        }
    }
}

/// Phase 2: queue passes as a reactor runs them: poll, end of pass (notification through
/// the ring), completions, arm/disarm, poll again.
fn poll_pass(input: &Input, mem: Arc<GuestMemoryMmap>, q: Queue, disk: &Disk, f: &mut Fixtures) {
    let inflight = if input.inflight {
        f.inflight[usize::from(input.queue_log2 % (MAX_QUEUE_LOG2 + 1))].queue(0, q.size())
    } else {
        None
    };
    let ring = &mut f.ring;
    let start = QueueStart {
        device: Arc::from("fuzz"),
        index: 0,
        ring: Ring::Split { queue: q, inflight },
        mem,
        model: Arc::clone(&disk.model),
        backend: Arc::clone(&disk.backend),
        kick: None,
        resubmit: input.resubmit.iter().take(300).copied().collect(),
        latency: true,
    };
    let notifier = EventFdNotifier::new(Some(SignalRing::new(&call_eventfd()).expect("call")));
    let mut p = VirtQueue::new(start, notifier, &mut Ctx::new(ring, 0, 0)).expect("channel");
    for round in 0..2 {
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
    if trace() {
        eprintln!("poll pass ({}): {:?}", disk.backend.kind(), p.stats());
    }
}

fuzz_target!(|input: Input| {
    let layout = Layout::new(&input);
    let variant = usize::from(input.disk % 4);
    FIXTURES.with(|f| {
        let mut f = f.borrow_mut();
        let f = &mut *f;

        let mem = layout.memory();
        let rings = fill(&layout, &mem, &input);
        let Some(q) = device_queue(&input, rings) else {
            return;
        };
        parse_all(&mem, q, &f.null[variant].model);
        let q = device_queue(&input, rings).expect("built once already");
        let null = std::mem::take(&mut f.null);
        poll_pass(&input, Arc::new(mem), q, &null[variant], f);
        f.null = null;

        let mem = layout.memory();
        fill(&layout, &mem, &input);
        let q = device_queue(&input, rings).expect("built once already");
        let ram = std::mem::take(&mut f.ram);
        poll_pass(&input, Arc::new(mem), q, &ram[variant], f);
        f.ram = ram;
    });
});
