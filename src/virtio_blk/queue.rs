//! The virtqueue front end: a poller that takes chains off one virtqueue, split or packed
//! (VIRTIO_F_RING_PACKED, `packed`), parses them into block requests, submits them to the
//! device's backend channel, completes them in the used ring (split) or as used descriptors
//! (packed) and notifies the driver at most once per reactor pass.
//!
//! The ring layout is an enum matched once per pass (`poll`, `end_pass`, `arm`) and once per
//! request (taking a chain, writing its used entry): no trait object per descriptor, and the
//! split path runs the same code as before packed rings existed.

use std::fs::File;
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain::Chain;
use super::inflight::InflightQueue;
use super::iovec::{self, IovecError};
use super::notify::Notifier;
use super::packed::{PackedInflight, PackedRing, VringBase};
use super::request::{ParseError, Parser, Request, RequestType};
use super::split;
use crate::blk::error::status;
use crate::blk::stats::IoStats;
use crate::blk::{Backend, BlockError, BlockRequest, Channel, DeviceModel, Op, Submitted};
use crate::engine::poller::BACKGROUND;
use crate::engine::ratelimit::RateLimit;
use crate::engine::stats::{ticks, TickScale};
use crate::engine::{Armed, Ctx, Poller};
use crate::guestmem::dirty::DirtyLog;
use crate::guestmem::{access, GuestMemoryMmap};

/// Everything a reactor needs to start polling a queue. The control plane has validated the
/// ring addresses against `mem` before sending it.
pub struct QueueStart {
    /// The device's name, for logs.
    pub device: Arc<str>,
    pub index: u16,
    /// The split or packed ring (VIRTIO_F_RING_PACKED), with its inflight tracking when the
    /// frontend shared a region (INFLIGHT_SHMFD). A packed ring is configured (its addresses
    /// checked against `mem`) and positioned at the vring base or where the inflight record
    /// says the ring stands.
    pub ring: Ring,
    pub mem: Arc<GuestMemoryMmap>,
    pub model: Arc<DeviceModel>,
    pub backend: Arc<dyn Backend>,
    pub kick: Option<File>,
    /// Heads (packed: head entries of the inflight record) a previous backend took and never
    /// completed, oldest first.
    pub resubmit: Vec<u16>,
    /// Time each request for the latency histograms.
    pub latency: bool,
}

/// The ring a queue runs, with its inflight tracker.
pub enum Ring {
    Split {
        queue: Queue,
        inflight: Option<InflightQueue>,
    },
    Packed {
        ring: PackedRing,
        inflight: Option<PackedInflight>,
    },
}

/// One request whose backend has not answered yet. Indexed by its head descriptor index,
/// which the driver may not reuse until the request is completed.
#[derive(Default)]
struct Slot {
    busy: bool,
    /// The iovecs the backend reads or writes; `req` points to them.
    iovecs: Vec<libc::iovec>,
    req: BlockRequest,
    status: GuestAddress,
    /// Bytes written into device-writable buffers on success, status byte included.
    used_len: u32,
    /// Keeps the guest memory the iovecs point into mapped until the request completes,
    /// even if the frontend swaps its memory table meanwhile.
    mem: Option<Arc<GuestMemoryMmap>>,
    start: u64,
}

/// What is left of a queue once it stopped: where the ring stands and what it did.
#[derive(Clone, Debug)]
pub struct QueueStopped {
    /// The next avail index the device would have processed: GET_VRING_BASE's answer for a
    /// split ring (a packed ring's avail index without its wrap counter).
    pub next_avail: u16,
    /// GET_VRING_BASE's answer as vhost-user encodes it: `next_avail` for a split ring; for
    /// a packed ring the avail position in bits 0-15 and the used one in bits 16-31.
    pub base: u32,
    /// A packed ring's positions.
    pub packed: Option<VringBase>,
    pub stats: IoStats,
}

pub struct VirtQueue<N: Notifier> {
    device: Arc<str>,
    index: u16,
    ring: Ring,
    /// Entries of the ring.
    size: u16,
    mem: Arc<GuestMemoryMmap>,
    model: Arc<DeviceModel>,
    channel: Box<dyn Channel>,
    notifier: N,
    kick: Option<File>,
    slots: Vec<Slot>,
    in_flight: u32,
    parser: Parser,
    req: Request,
    /// The backend completes every request inside `submit`.
    inline: bool,
    /// Iovecs of requests to an inline backend.
    scratch: Vec<libc::iovec>,
    /// Completions `reap` collected, handled after the channel is released.
    reaped: Vec<(u64, Result<(), BlockError>)>,
    needs_signal: bool,
    /// Split rings: used entries published since the driver was last asked whether it
    /// wants a notification (EVENT_IDX).
    used_added: u16,
    broken: bool,
    stopping: bool,
    stats: Box<IoStats>,
    /// Latency histograms on: requests are timed (TSC), `scale` converts.
    latency: bool,
    scale: TickScale,
    log_limit: RateLimit,
    /// Heads (split) or inflight record head entries (packed) to resubmit after a restart,
    /// last one first.
    resubmit: Vec<u16>,
    /// The connection's dirty log (it comes with the memory): buffers filled by reads are
    /// marked when they complete, while a migration runs.
    log: Option<Arc<DirtyLog>>,
    /// Parked: not polled by the reactor until the read of the kick fd completes.
    parked: bool,
    /// A read of the kick eventfd is in flight on the reactor's ring (into `kick_buf`).
    kick_read: bool,
    kick_buf: Box<u64>,
}

/// The read of the kick eventfd that wakes a parked queue, and the cancel of that read when
/// the queue stops. Tags below 2^16 are head indices; `TAG_SIGNAL` is the notifier's.
const TAG_KICK: u64 = BACKGROUND | 0x2_0000;
const TAG_KICK_CANCEL: u64 = BACKGROUND | 0x3_0000;

/// The dirty log the regions of `mem` mark (one per connection), if any.
fn log_of(mem: &GuestMemoryMmap) -> Option<Arc<DirtyLog>> {
    use vm_memory::GuestMemoryBackend;
    mem.iter()
        .next()
        .and_then(|r| std::ops::Deref::deref(r).bitmap().log().cloned())
}

/// Marks the buffers a completed read filled (the kernel wrote them, not vm-memory).
fn mark_read(mem: &GuestMemoryMmap, req: &BlockRequest) {
    if req.iov.is_null() {
        return;
    }
    // SAFETY: `req.iov` points to `iov_count` iovecs built for this request, in its slot or
    // in the scratch array; neither is touched again before the request's used entry is
    // added, which happens after this.
    let iovecs = unsafe { std::slice::from_raw_parts(req.iov, req.iov_count as usize) };
    for v in iovecs {
        access::mark_host_range(mem, v.iov_base.cast_const().cast(), v.iov_len);
    }
}

impl<N: Notifier> VirtQueue<N> {
    /// Builds the queue on its reactor: the backend channel is opened there.
    pub fn new(start: QueueStart, notifier: N, ctx: &mut Ctx<'_>) -> std::io::Result<Self> {
        let size = match &start.ring {
            Ring::Split { queue, .. } => queue.size(),
            Ring::Packed { ring, .. } => ring.size(),
        };
        let channel = start.backend.open_channel(ctx)?;
        let inline = channel.completes_inline();
        let log = log_of(&start.mem);
        let mut q = VirtQueue {
            device: start.device,
            index: start.index,
            ring: start.ring,
            size,
            mem: start.mem,
            model: start.model,
            channel,
            notifier,
            kick: start.kick,
            slots: (0..size).map(|_| Slot::default()).collect(),
            in_flight: 0,
            parser: Parser::default(),
            req: Request::default(),
            inline,
            scratch: Vec::with_capacity(iovec::MAX_IOVECS),
            reaped: Vec::with_capacity(usize::from(size)),
            needs_signal: false,
            used_added: 0,
            broken: false,
            stopping: false,
            stats: Box::default(),
            latency: start.latency,
            scale: TickScale::new(),
            log_limit: RateLimit::new(),
            resubmit: start.resubmit.into_iter().rev().collect(),
            log,
            parked: false,
            kick_read: false,
            kick_buf: Box::new(0),
        };
        // A backend killed between publishing used entries and signalling them leaves the
        // driver waiting for completions already in the used ring: a queue that starts
        // signals once so the driver looks. A spurious notification is harmless.
        q.notifier.notify();
        if let Ring::Packed { ring, .. } = &mut q.ring {
            // Polled from now on: the driver need not kick (until the queue parks or sleeps).
            ring.disable_notification(&q.mem);
        }
        Ok(q)
    }

    #[cfg(any(test, feature = "test-utils"))]
    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn notifier_mut(&mut self) -> &mut N {
        &mut self.notifier
    }

    pub fn set_memory(&mut self, mem: Arc<GuestMemoryMmap>) {
        if self.log.is_none() {
            self.log = log_of(&mem);
        }
        self.mem = mem;
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    #[cfg(test)]
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// A copy of the counters, taken without stopping the queue.
    pub fn stats(&self) -> IoStats {
        (*self.stats).clone()
    }

    /// Whether the queue runs a packed ring.
    pub fn is_packed(&self) -> bool {
        matches!(self.ring, Ring::Packed { .. })
    }

    /// What GET_VRING_BASE reports once the queue has drained.
    pub fn stopped(&self) -> QueueStopped {
        let (next_avail, base, packed) = match &self.ring {
            Ring::Split { queue, .. } => (queue.next_avail(), u32::from(queue.next_avail()), None),
            Ring::Packed { ring, .. } => {
                let b = ring.base();
                (b.avail.idx, b.encode(), Some(b))
            }
        };
        QueueStopped {
            next_avail,
            base,
            packed,
            stats: (*self.stats).clone(),
        }
    }

    fn active(&self) -> bool {
        !self.broken && !self.stopping
    }

    fn mark_broken(&mut self, why: &str) {
        self.broken = true;
        self.stats.other_errors += 1;
        log::error!(
            "device {} queue {}: {why}; queue stopped until the frontend resets it",
            self.device,
            self.index
        );
    }

    fn log_bad_request(&mut self, why: &dyn std::fmt::Display) {
        if self.log_limit.allow() {
            log::warn!(
                "device {} queue {}: request failed: {why}{}",
                self.device,
                self.index,
                self.log_limit.suppressed_note()
            );
        }
    }

    /// Parses and executes the chain of a split ring at `head`. False if the queue broke.
    fn take(&mut self, ctx: &mut Ctx<'_>, head: u16) -> bool {
        if usize::from(head) >= self.slots.len() {
            self.mark_broken("head index beyond the queue size");
            return false;
        }
        if self.slots[usize::from(head)].busy {
            self.mark_broken("head index reused while in flight");
            return false;
        }
        let Ring::Split { queue, inflight } = &mut self.ring else {
            return false;
        };
        if let Some(t) = inflight.as_mut() {
            t.begin(head);
        }
        let mem = &*self.mem;
        let chain = Chain::new(mem, GuestAddress(queue.desc_table()), queue.size(), head);
        let parsed = self.parser.parse(chain, mem, &mut self.req);
        self.parsed(ctx, head, parsed)
    }

    /// Parses and executes the packed chain `PackedRing::pop` (or `adopt`) took last, buffer
    /// `id`. False if the queue broke.
    fn take_packed(&mut self, ctx: &mut Ctx<'_>, id: u16) -> bool {
        // The ring checked the id (below the size, not in flight).
        if self.slots[usize::from(id)].busy {
            self.mark_broken("buffer id reused while in flight");
            return false;
        }
        let Ring::Packed { ring, .. } = &self.ring else {
            return false;
        };
        let mem = &*self.mem;
        let parsed = self.parser.parse(ring.chain(mem), mem, &mut self.req);
        self.parsed(ctx, id, parsed)
    }

    /// Takes the next available packed chain, if any: Some(false) if the queue broke.
    fn pop_packed(&mut self, ctx: &mut Ctx<'_>) -> Option<bool> {
        let Ring::Packed { ring, inflight } = &mut self.ring else {
            return None;
        };
        match ring.pop(&self.mem) {
            Ok(Some(id)) => {
                if let Some(t) = inflight.as_mut() {
                    t.begin(id, ring.chain_descs());
                }
                Some(self.take_packed(ctx, id))
            }
            Ok(None) => None,
            Err(why) => {
                self.mark_broken(why);
                Some(false)
            }
        }
    }

    /// Takes again a packed chain a previous vubd had taken: its ring descriptors come from
    /// the inflight record (the driver may have reused the slots since). False if the queue
    /// broke.
    fn resubmit_packed(&mut self, ctx: &mut Ctx<'_>, head: u16) -> bool {
        let Ring::Packed {
            ring,
            inflight: Some(t),
        } = &mut self.ring
        else {
            return false;
        };
        t.chain(head, ring.chain_buf());
        match ring.adopt() {
            Ok(id) => {
                t.adopt(id, head);
                self.take_packed(ctx, id)
            }
            Err(why) => {
                self.mark_broken(why);
                false
            }
        }
    }

    /// The chain at `head` was parsed: execute it, or fail it. False if the queue broke.
    fn parsed(&mut self, ctx: &mut Ctx<'_>, head: u16, parsed: Result<(), ParseError>) -> bool {
        match parsed {
            Ok(()) => self.execute(ctx, head),
            Err(ParseError::Invalid(why)) => {
                self.log_bad_request(&why);
                self.stats.other_errors += 1;
                // Invalid (not Fatal) means the parser found the status byte.
                if let Some(addr) = self.parser.status_addr() {
                    self.write_status(addr, status::IOERR);
                    self.add_used(head, 1);
                }
            }
            Err(ParseError::Fatal(why)) => {
                self.mark_broken(why);
                return false;
            }
        }
        true
    }

    fn execute(&mut self, ctx: &mut Ctx<'_>, head: u16) {
        let status_addr = self.req.status_addr();
        if self.req.kind() == RequestType::GetId {
            let n = self.write_serial();
            self.write_status(status_addr, status::OK);
            return self.add_used(head, n + 1);
        }
        let start = if self.latency { ticks() } else { 0 };
        let (op, offset, len) = match self.req.block_op(&self.model) {
            Ok(v) => v,
            Err(e) => return self.fail_early(head, status_addr, e),
        };
        let mut req = BlockRequest {
            op,
            offset,
            len,
            iov: std::ptr::null(),
            iov_count: 0,
            tag: u64::from(head),
        };
        if let Err(e) = self.model.check(&req) {
            self.log_bad_request(&e);
            return self.finish(head, &req, status_addr, 1, start, Err(e), None);
        }
        // A backend that completes inline is done with the iovecs before `submit` returns:
        // one hot scratch array serves every request. Otherwise they live in the request's
        // slot until it completes.
        let iovecs = if self.inline {
            &mut self.scratch
        } else {
            &mut self.slots[usize::from(head)].iovecs
        };
        iovecs.clear();
        if op.has_data() {
            // The device writes guest memory on a read.
            let write_guest = op == Op::Read;
            if let Err(e) = iovec::build(&self.mem, self.req.data(), write_guest, iovecs) {
                let e = match e {
                    IovecError::OutsideMemory => BlockError::BadBuffer,
                    IovecError::TooMany => BlockError::TooManySegments,
                };
                self.log_bad_request(&e);
                return self.finish(head, &req, status_addr, 1, start, Err(e), None);
            }
            // Fits: at most MAX_IOVECS.
            req.iov_count = iovecs.len() as u32;
            req.iov = iovecs.as_ptr();
        }
        // Fits: data is bounded by the chain walker's 4 GiB cap.
        let used_len = if op == Op::Read { len as u32 + 1 } else { 1 };
        // SAFETY: the iovecs live in `self.slots[head]`, which is neither cleared nor reused
        // until this head completes (busy flag, set below when the request stays pending),
        // or in `self.scratch` for an inline backend, which is done with them on return;
        // the buffers they point to are in `self.mem`, and a pending request keeps its own
        // reference to that snapshot (below) until it completes.
        match unsafe { self.channel.submit(ctx, &req) } {
            Submitted::Done(result) => {
                if let Err(e) = &result {
                    self.log_io_error(e);
                }
                self.finish(head, &req, status_addr, used_len, start, result, None);
            }
            Submitted::Pending => {
                let slot = &mut self.slots[usize::from(head)];
                slot.busy = true;
                slot.req = req;
                slot.status = status_addr;
                slot.used_len = used_len;
                slot.mem = Some(Arc::clone(&self.mem));
                slot.start = start;
                self.in_flight += 1;
            }
        }
    }

    /// A request refused before it had a block operation (an unsupported type).
    fn fail_early(&mut self, head: u16, status_addr: GuestAddress, e: BlockError) {
        self.log_bad_request(&e);
        self.stats.other_errors += 1;
        self.write_status(status_addr, e.status());
        self.add_used(head, 1);
    }

    /// Completes a request the backend answered: status byte, used entry, statistics.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        head: u16,
        req: &BlockRequest,
        status_addr: GuestAddress,
        used_len: u32,
        start: u64,
        result: Result<(), BlockError>,
        mem: Option<Arc<GuestMemoryMmap>>,
    ) {
        let ns = self
            .latency
            .then(|| self.scale.to_ns(ticks().wrapping_sub(start)));
        self.stats.complete(req.op, req.len, ns, &result);
        let (st, used) = match &result {
            Ok(()) => (status::OK, used_len),
            Err(e) => (e.status(), 1),
        };
        // The status byte goes through the snapshot the request was parsed against.
        let mem = mem.as_deref().unwrap_or(&self.mem);
        if result.is_ok() && req.op == Op::Read && self.log.as_ref().is_some_and(|l| l.is_on()) {
            mark_read(mem, req);
        }
        // The address was validated at parse time against this same memory.
        let _ = access::write_u8(mem, status_addr, st);
        self.add_used(head, used);
    }

    fn log_io_error(&mut self, e: &BlockError) {
        if self.log_limit.allow() {
            log::warn!(
                "device {} queue {}: I/O error: {e}{}",
                self.device,
                self.index,
                self.log_limit.suppressed_note()
            );
        }
    }

    fn write_status(&self, addr: GuestAddress, st: u8) {
        // Validated at parse time against this same memory.
        let _ = access::write_u8(&self.mem, addr, st);
    }

    fn write_serial(&mut self) -> u32 {
        let serial = *self.model.serial();
        let mut n = 0usize;
        for r in self.req.data() {
            if n == serial.len() {
                break;
            }
            let take = (serial.len() - n).min(r.len as usize);
            if self.mem.write_slice(&serial[n..n + take], r.addr).is_err() {
                break;
            }
            n += take;
        }
        // Fits: at most 20.
        n as u32
    }

    fn add_used(&mut self, head: u16, used: u32) {
        let ok = match &mut self.ring {
            Ring::Split { queue, inflight } => {
                if let Some(t) = inflight.as_mut() {
                    t.pre_complete(head);
                }
                let ok = split::add_used(queue, &self.mem, head, used, &mut self.used_added);
                if let Some(t) = inflight.as_mut() {
                    t.end(head, queue.next_used());
                }
                ok
            }
            // Writes through `guestmem::access`: marked in the dirty log while it is on.
            Ring::Packed { ring, inflight } => {
                ring.add_used(&self.mem, head, used, inflight.as_mut())
            }
        };
        if !ok {
            self.mark_broken("used ring unwritable");
        }
        self.needs_signal = true;
    }

    /// The backend finished the request at `head` (a CQE or a reaped completion).
    fn backend_done(&mut self, head: u64, result: Option<Result<(), BlockError>>, cqe: i32) {
        let Some(slot) = self.slots.get_mut(head as usize) else {
            return;
        };
        if !slot.busy {
            return;
        }
        slot.busy = false;
        self.in_flight -= 1;
        let req = slot.req;
        let mem = slot.mem.take();
        let (status_addr, used_len, start) = (slot.status, slot.used_len, slot.start);
        let result = result.unwrap_or_else(|| self.channel.complete(&req, cqe));
        if let Err(e) = &result {
            self.log_io_error(e);
        }
        self.finish(head as u16, &req, status_addr, used_len, start, result, mem);
    }

    /// One pass over a packed ring: the chains a previous vubd left first, then at most
    /// queue-size chains the driver made available, and no more than the backend can take.
    fn poll_packed(&mut self, ctx: &mut Ctx<'_>) -> u32 {
        let mut work = 0;
        while let Some(&head) = self.resubmit.last() {
            if self.channel.room(ctx) == 0 {
                return work;
            }
            self.resubmit.pop();
            work += 1;
            if !self.resubmit_packed(ctx, head) {
                return work;
            }
        }
        for _ in 0..self.size {
            if self.channel.room(ctx) == 0 {
                break;
            }
            match self.pop_packed(ctx) {
                None => break,
                Some(ok) => {
                    work += 1;
                    if !ok {
                        break;
                    }
                }
            }
        }
        work
    }

    fn reap_channel(&mut self, ctx: &mut Ctx<'_>) -> u32 {
        let reaped = &mut self.reaped;
        let n = self
            .channel
            .reap(ctx, &mut |tag, result| reaped.push((tag, result)));
        while let Some((tag, result)) = self.reaped.pop() {
            self.backend_done(tag, Some(result), 0);
        }
        n
    }
}

impl<N: Notifier + 'static> Poller for VirtQueue<N> {
    /// One pass over the avail ring: at most `queue size` chains, and no more than the
    /// backend can take. Returns how many chains were taken (plus completions reaped).
    fn poll(&mut self, ctx: &mut Ctx<'_>) -> u32 {
        if self.parked {
            // Back from parking (the reactor saw a completion for us): kicks not needed.
            self.parked = false;
            self.disarm();
        }
        let mut work = if self.in_flight > 0 {
            self.reap_channel(ctx)
        } else {
            0
        };
        if !self.active() {
            return work;
        }
        if self.is_packed() {
            return work + self.poll_packed(ctx);
        }
        let Ring::Split { queue, .. } = &self.ring else {
            return work;
        };
        let Some(avail) = split::avail_idx(queue, &self.mem) else {
            self.mark_broken("avail ring unreadable");
            return work;
        };
        let pending = (avail - Wrapping(queue.next_avail())).0;
        if pending > queue.size() {
            self.mark_broken("avail index moved by more than the queue size");
            return work;
        }
        // Requests a previous vubd took but never completed go first, in their old order.
        while let Some(&head) = self.resubmit.last() {
            if self.channel.room(ctx) == 0 {
                return work;
            }
            self.resubmit.pop();
            work += 1;
            if !self.take(ctx, head) {
                return work;
            }
        }
        for _ in 0..pending {
            if self.channel.room(ctx) == 0 {
                break;
            }
            let Ring::Split { queue, .. } = &mut self.ring else {
                break;
            };
            let Some(head) = split::pop_head(queue, &self.mem) else {
                self.mark_broken("avail ring unreadable");
                break;
            };
            work += 1;
            if !self.take(ctx, head) {
                break;
            }
        }
        work
    }

    fn complete(&mut self, _ctx: &mut Ctx<'_>, tag: u64, result: i32) {
        match tag {
            // The driver kicked (or the read was cancelled): the reactor polls us again.
            TAG_KICK => self.kick_read = false,
            TAG_KICK_CANCEL => {}
            t if t & BACKGROUND != 0 => self.notifier.complete(tag, result),
            _ => self.backend_done(tag, None, result),
        }
    }

    /// Idle for a while on a busy reactor: ask the driver to kick again and read the kick
    /// eventfd on the reactor's ring; its completion brings the queue back. Not with
    /// requests in flight (their completions may come through `poll`), a signal owed, or no
    /// kick fd.
    fn park(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let Some(kick) = self.kick.as_ref() else {
            return false;
        };
        if !self.active()
            || self.in_flight > 0
            || self.needs_signal
            || !self.resubmit.is_empty()
            || ctx.ring.room() == 0
        {
            return false;
        }
        if !self.kick_read {
            let buf: *mut u64 = &mut *self.kick_buf;
            let sqe =
                io_uring::opcode::Read::new(io_uring::types::Fd(kick.as_raw_fd()), buf.cast(), 8)
                    .build()
                    .user_data(ctx.user_data(TAG_KICK));
            // SAFETY: `kick_buf` is a heap box owned by this queue, which the reactor keeps
            // until `drained`, and `drained` waits for this read to complete (`stop` cancels
            // it); the kick fd is our own dup, open as long as the queue.
            if unsafe { ctx.ring.push(&sqe) }.is_err() {
                return false;
            }
            self.kick_read = true;
        }
        if self.arm() != Armed::Sleep {
            // Work raced in (or no kick can come): stay polled; the read completes later.
            self.disarm();
            return false;
        }
        self.parked = true;
        true
    }

    /// Signals the driver once if the pass produced used entries and the driver wants to
    /// hear about them (EVENT_IDX aware).
    fn end_pass(&mut self, ctx: &mut Ctx<'_>) {
        if self.needs_signal {
            self.needs_signal = false;
            let wanted = match &mut self.ring {
                Ring::Split { queue, .. } => {
                    split::needs_notification(queue, &self.mem, &mut self.used_added)
                }
                Ring::Packed { ring, .. } => ring.needs_notification(&self.mem),
            };
            if wanted {
                self.notifier.notify();
            }
        }
        if self.notifier.flush(ctx) {
            self.stats.notifications += 1;
        }
    }

    /// Before sleeping: ask the driver to kick again.
    fn arm(&mut self) -> Armed {
        if !self.active() {
            return Armed::Sleep;
        }
        // Both report work that raced in after the driver was asked to notify.
        let ready = match &mut self.ring {
            Ring::Split { queue, .. } => queue.enable_notification(&*self.mem).unwrap_or(true),
            Ring::Packed { ring, .. } => ring.enable_notification(&self.mem),
        };
        if ready {
            return Armed::Ready;
        }
        if self.kick.is_some() {
            Armed::Sleep
        } else {
            Armed::Poll
        }
    }

    /// After waking: polling again, kicks are not needed.
    fn disarm(&mut self) {
        if self.active() {
            match &mut self.ring {
                Ring::Split { queue, .. } => {
                    let _ = queue.disable_notification(&*self.mem);
                }
                Ring::Packed { ring, .. } => ring.disable_notification(&self.mem),
            }
        }
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        let mut fds = self.channel.wake_fds();
        fds.extend(self.kick.as_ref().map(|k| k.as_raw_fd()));
        fds
    }

    fn stop(&mut self, ctx: &mut Ctx<'_>) {
        self.stopping = true;
        if self.kick_read {
            let sqe = io_uring::opcode::AsyncCancel::new(ctx.user_data(TAG_KICK))
                .build()
                .user_data(ctx.user_data(TAG_KICK_CANCEL));
            // SAFETY: a cancel names its target by user data and points to no memory.
            if let Err(e) = unsafe { ctx.ring.push(&sqe) } {
                log::error!(
                    "device {} queue {}: cannot cancel the kick read: {e}",
                    self.device,
                    self.index
                );
            }
        }
    }

    fn drained(&self) -> bool {
        self.stopping
            && self.in_flight == 0
            && !self.needs_signal
            && self.notifier.idle()
            && !self.kick_read
    }

    fn describe(&self) -> String {
        format!("device {} queue {}", self.device, self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend;
    use crate::config::BackendSpec;
    use crate::engine::testing::Harness;
    use crate::virtio_blk::mock;
    use crate::virtio_blk::notify::EventFdNotifier;
    use crate::virtio_blk::request::{VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn harness(
        vq: &MockSplitQueue<GuestMemoryMmap>,
        mem: &Arc<GuestMemoryMmap>,
        spec: BackendSpec,
    ) -> Harness<VirtQueue<EventFdNotifier>> {
        let backend = backend::open(&spec, false).unwrap();
        let start = mock::queue_start(vq, 16, mem, backend, "serial-1");
        Harness::new(|ctx| mock::virt_queue(start, ctx))
    }

    /// A 3-descriptor request at table index `first` with its header at `hdr`.
    fn chain(
        mem: &GuestMemoryMmap,
        first: u16,
        kind: u32,
        sector: u64,
        buf: u64,
    ) -> [RawDescriptor; 3] {
        let hdr = 0x10_0000 + u64::from(first) * 0x100;
        mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        let data_flags = if kind == VIRTIO_BLK_T_IN { W } else { 0 };
        [
            RawDescriptor::from(SplitDescriptor::new(hdr, 16, 1, first + 1)),
            RawDescriptor::from(SplitDescriptor::new(buf, 512, data_flags | 1, first + 2)),
            RawDescriptor::from(SplitDescriptor::new(hdr + 0x80, 1, W, 0)),
        ]
    }

    fn status(mem: &GuestMemoryMmap, first: u16) -> u8 {
        mem.read_obj(GuestAddress(0x10_0000 + u64::from(first) * 0x100 + 0x80))
            .unwrap()
    }

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap())
    }

    #[test]
    fn ram_pass_writes_then_reads_back_and_fills_used_ring() {
        let mem = memory();
        let vq = MockSplitQueue::new(&*mem, 16);
        let mut h = harness(&vq, &mem, BackendSpec::Ram { size: 1 << 20 });
        mem.write_slice(&[0xab; 512], GuestAddress(0x20_0000))
            .unwrap();
        let mut descs = chain(&mem, 0, VIRTIO_BLK_T_OUT, 4, 0x20_0000).to_vec();
        descs.extend(chain(&mem, 3, VIRTIO_BLK_T_IN, 4, 0x21_0000));
        vq.add_desc_chains(&descs, 0).unwrap();
        assert_eq!(h.pass(), 2);
        assert_eq!((status(&mem, 0), status(&mem, 3)), (status::OK, status::OK));
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x21_0000)).unwrap();
        assert_eq!(back, [0xab; 512]);
        let used = mock::USED_RING;
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 2);
        // used ring element 1: (id u32, len u32) after flags and idx.
        let id: u32 = mem.read_obj(GuestAddress(used + 4 + 8)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(used + 4 + 12)).unwrap();
        assert_eq!((id, len), (3, 513));
        let s = h.poller.stats();
        assert_eq!(s.ops[Op::Read.index()], 1);
        assert_eq!(s.bytes[Op::Write { fua: false }.index()], 512);
    }

    #[test]
    fn avail_index_jump_breaks_only_this_queue() {
        let mem = memory();
        let vq = MockSplitQueue::new(&*mem, 16);
        let mut h = harness(&vq, &mem, BackendSpec::Null { size: 1 << 20 });
        vq.avail().idx().store(17);
        assert_eq!(h.pass(), 0);
        assert!(h.poller.is_broken());
        vq.avail().idx().store(1);
        assert_eq!(h.pass(), 0, "a broken queue stays stopped");
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(mock::USED_RING + 2))
                .unwrap(),
            0
        );
    }

    #[test]
    fn head_reused_while_in_flight_breaks_the_queue() {
        let mem = memory();
        let vq = MockSplitQueue::new(&*mem, 16);
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let spec = BackendSpec::File {
            path: file.path().into(),
            buffered: true,
        };
        let mut h = harness(&vq, &mem, spec);
        vq.add_desc_chains(&chain(&mem, 0, VIRTIO_BLK_T_IN, 0, 0x20_0000), 0)
            .unwrap();
        // Poll without reaping: the read stays in flight.
        h.poller.poll(&mut Ctx::new(&mut h.ring, 0, 0));
        assert_eq!(h.poller.in_flight(), 1);
        // The driver offers head 0 again before the device has used it.
        vq.add_desc_chains(&chain(&mem, 0, VIRTIO_BLK_T_IN, 0, 0x20_0000), 0)
            .unwrap();
        h.poller.poll(&mut Ctx::new(&mut h.ring, 0, 0));
        assert!(h.poller.is_broken());
        // The first request still completes normally.
        h.settle();
        assert_eq!(status(&mem, 0), status::OK);
        assert_eq!(h.poller.in_flight(), 0);
    }

    mod packed {
        use super::*;
        use crate::virtio_blk::packed::mock::{self as pmock, MockPackedQueue};
        use crate::virtio_blk::packed::DESC_F_WRITE as PW;

        const RING: u64 = 0x1000;

        fn harness<'a>(
            mem: &'a Arc<GuestMemoryMmap>,
            size: u16,
            spec: BackendSpec,
        ) -> (MockPackedQueue<'a>, Harness<VirtQueue<EventFdNotifier>>) {
            let drv = MockPackedQueue::new(mem, GuestAddress(RING), size);
            let backend = backend::open(&spec, false).unwrap();
            let start = pmock::queue_start(&drv, mem, backend, "serial-1", true);
            (drv, Harness::new(|ctx| pmock::virt_queue(start, ctx)))
        }

        /// A 512-byte request of `kind` at `sector`, header and status in block `n`.
        fn request(
            mem: &GuestMemoryMmap,
            drv: &mut MockPackedQueue<'_>,
            n: u64,
            kind: u32,
            sector: u64,
            buf: u64,
        ) -> u16 {
            let hdr = 0x10_0000 + n * 0x100;
            mem.write_obj(kind, GuestAddress(hdr)).unwrap();
            mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
            let w = if kind == VIRTIO_BLK_T_IN { PW } else { 0 };
            drv.add_chain(&[(hdr, 16, 0), (buf, 512, w), (hdr + 0x80, 1, PW)])
        }

        fn status(mem: &GuestMemoryMmap, n: u64) -> u8 {
            mem.read_obj(GuestAddress(0x10_0000 + n * 0x100 + 0x80))
                .unwrap()
        }

        #[test]
        fn ram_round_trips_across_many_laps() {
            let mem = memory();
            let (mut drv, mut h) = harness(&mem, 8, BackendSpec::Ram { size: 1 << 20 });
            assert!(h.poller.is_packed());
            for k in 0..40u64 {
                let data = [k as u8 ^ 0x5a; 512];
                mem.write_slice(&data, GuestAddress(0x20_0000)).unwrap();
                let a = request(&mem, &mut drv, 0, VIRTIO_BLK_T_OUT, k, 0x20_0000);
                let b = request(&mem, &mut drv, 1, VIRTIO_BLK_T_IN, k, 0x21_0000);
                assert_eq!(h.pass(), 2);
                assert_eq!(drv.used(), Some((a, 1)));
                assert_eq!(drv.used(), Some((b, 513)));
                assert_eq!(drv.used(), None);
                assert_eq!((status(&mem, 0), status(&mem, 1)), (status::OK, status::OK));
                let mut back = [0u8; 512];
                mem.read_slice(&mut back, GuestAddress(0x21_0000)).unwrap();
                assert_eq!(back, data, "request {k}");
            }
            // 40 x 6 slots in a ring of 8: 30 laps, both positions back at 0 with wrap 1.
            let s = h.poller.stopped();
            let b = s.packed.unwrap();
            assert_eq!((b.avail.idx, b.avail.wrap), (0, true));
            assert_eq!(b.used, b.avail);
            assert_eq!(s.base, b.encode());
        }

        #[test]
        fn completions_out_of_order_are_used_in_completion_order() {
            let mem = memory();
            let file = tempfile::NamedTempFile::new().unwrap();
            file.as_file().set_len(1 << 20).unwrap();
            let spec = BackendSpec::File {
                path: file.path().into(),
                buffered: true,
            };
            let (mut drv, mut h) = harness(&mem, 16, spec);
            let a = request(&mem, &mut drv, 0, VIRTIO_BLK_T_IN, 0, 0x20_0000);
            let b = request(&mem, &mut drv, 1, VIRTIO_BLK_T_IN, 8, 0x21_0000);
            h.poller.poll(&mut Ctx::new(&mut h.ring, 0, 0));
            assert_eq!(h.poller.in_flight(), 2);
            // b's completion first (as a kernel may deliver it), then a's.
            h.poller
                .complete(&mut Ctx::new(&mut h.ring, 0, 0), u64::from(b), 512);
            h.poller
                .complete(&mut Ctx::new(&mut h.ring, 0, 0), u64::from(a), 512);
            assert_eq!(drv.used(), Some((b, 513)));
            assert_eq!(drv.used(), Some((a, 513)));
            // The kernel's own completions for them find nothing in flight.
            h.settle();
            assert_eq!(drv.used(), None);
            assert_eq!(h.poller.in_flight(), 0);
            // The slots b's chain took are reused by the next chain: the ring goes on.
            let c = request(&mem, &mut drv, 2, VIRTIO_BLK_T_IN, 16, 0x22_0000);
            h.settle();
            assert_eq!(drv.used(), Some((c, 513)));
            assert!(!h.poller.is_broken());
        }

        #[test]
        fn indirect_and_get_id() {
            let mem = memory();
            let (mut drv, mut h) = harness(&mem, 8, BackendSpec::Null { size: 1 << 20 });
            let hdr = 0x10_0000;
            mem.write_obj(VIRTIO_BLK_T_GET_ID, GuestAddress(hdr))
                .unwrap();
            let id = drv.add_indirect(
                0x30_0000,
                &[(hdr, 16, 0), (0x20_0000, 20, PW), (hdr + 0x80, 1, PW)],
            );
            assert_eq!(h.pass(), 1);
            // The 20-byte serial field and the status byte.
            assert_eq!(drv.used(), Some((id, 21)));
            let mut got = [0u8; 8];
            mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
            assert_eq!(&got, b"serial-1");
            assert_eq!(status(&mem, 0), status::OK);
        }

        #[test]
        fn a_malformed_chain_breaks_only_the_queue() {
            let mem = memory();
            let (mut drv, mut h) = harness(&mem, 4, BackendSpec::Null { size: 1 << 20 });
            // Buffer id beyond the ring.
            drv.add_raw(&[(0x10_0000, 16, 0, 7)]);
            assert_eq!(h.pass(), 1);
            assert!(h.poller.is_broken());
            assert_eq!(drv.used(), None);
        }
    }

    #[test]
    fn get_id_returns_the_serial() {
        let mem = memory();
        let vq = MockSplitQueue::new(&*mem, 16);
        let mut h = harness(&vq, &mem, BackendSpec::Null { size: 1 << 20 });
        let mut d = chain(&mem, 0, VIRTIO_BLK_T_GET_ID, 0, 0x20_0000);
        d[1] = RawDescriptor::from(SplitDescriptor::new(0x20_0000, 20, W | 1, 2));
        vq.add_desc_chains(&d, 0).unwrap();
        assert_eq!(h.pass(), 1);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&id[..8], b"serial-1");
        assert_eq!(status(&mem, 0), status::OK);
    }
}
