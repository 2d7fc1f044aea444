//! One ublk queue, as a poller on the reactor that serves it. Every tag of the queue has a
//! command with the kernel on the reactor's own io_uring: FETCH_REQ once, then
//! COMMIT_AND_FETCH_REQ with each request's result. A request arrives as that command's
//! completion (its descriptor already in the shared array), becomes a `BlockRequest` on the
//! tag's own data buffer, goes to the device's backend channel, and its result goes back to
//! the kernel with the next fetch. The fetches are background operations: the kernel, not
//! we, decides when they complete, so they do not keep the reactor awake.
//!
//! The kernel runs the queue's copies (request data into our buffer for a write, out of it
//! for a read) on this reactor's thread, which it takes as the queue's daemon: every command
//! of a queue must come from one thread, and does.

use std::any::Any;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types};

use super::mapping::{Buffers, Descriptors};
use super::uapi::{self, IoCmd};
use crate::blk::stats::IoStats;
use crate::blk::{
    Backend, BlockError, BlockRequest, Channel, DeviceModel, Op, Submitted, SECTOR_SHIFT,
};
use crate::engine::poller::BACKGROUND;
use crate::engine::ratelimit::RateLimit;
use crate::engine::stats::{ticks, TickScale};
use crate::engine::{Armed, Ctx, Poller};

/// io_uring operations a reactor must still have room for once a queue's fetches are
/// outstanding: the backend's I/O and other pollers' operations.
pub const RING_RESERVE: u32 = 64;

/// Everything a reactor needs to start serving a queue.
pub struct QueueStart {
    /// The device's name, for logs.
    pub device: Arc<str>,
    /// The ublk device id (N of /dev/ublkbN).
    pub dev_id: u32,
    pub index: u16,
    pub depth: u16,
    /// Bytes of each tag's data buffer (the device's largest request).
    pub buf_size: usize,
    /// /dev/ublkcN, shared by the device's queues (the kernel lets one process open it).
    pub char_dev: Arc<File>,
    pub model: Arc<DeviceModel>,
    pub backend: Arc<dyn Backend>,
    /// Time each request for the latency histograms.
    pub latency: bool,
    /// Set by the export when the kernel will not give the fetches back (STOP_DEV failed):
    /// the queue may then leave its reactor with them outstanding, and never unmaps the
    /// buffers they name.
    pub abandoned: Arc<AtomicBool>,
}

/// Where a tag is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TagState {
    /// A FETCH or COMMIT_AND_FETCH is with the kernel (or queued for submission).
    Fetching,
    /// A request arrived and waits for room in the backend channel.
    Waiting,
    /// The backend has the request.
    Running,
    /// The kernel gave the tag back for good (the device stopped) or refused it.
    Dead,
}

struct Tag {
    state: TagState,
    req: BlockRequest,
    /// When the request arrived (TSC), if timed.
    start: u64,
}

pub struct UblkQueue {
    device: Arc<str>,
    dev_id: u32,
    index: u16,
    /// Keeps /dev/ublkcN open while commands name it.
    char_dev: Arc<File>,
    descs: Descriptors,
    bufs: Buffers,
    /// One iovec per tag, over its buffer; a request's `iov` points to its tag's.
    iovecs: Box<[libc::iovec]>,
    tags: Box<[Tag]>,
    /// Tags whose request waits for room in the backend channel, oldest first.
    waiting: VecDeque<u16>,
    model: Arc<DeviceModel>,
    channel: Box<dyn Channel>,
    /// Completions `reap` collected, handled after the channel is released.
    reaped: Vec<(u64, Result<(), BlockError>)>,
    /// Tags whose command is with the kernel (`Fetching`).
    fetching: u32,
    /// Tags whose request is with the backend (`Running`).
    running: u32,
    stopping: bool,
    abandoned: Arc<AtomicBool>,
    stats: Box<IoStats>,
    latency: bool,
    scale: TickScale,
    log_limit: RateLimit,
}

impl UblkQueue {
    /// Builds the queue on its reactor: opens the backend channel there, maps the
    /// descriptors and buffers, and queues a FETCH_REQ for every tag.
    pub fn new(start: QueueStart, ctx: &mut Ctx<'_>) -> std::io::Result<UblkQueue> {
        let depth = start.depth;
        let room = ctx.ring.room();
        if room < u32::from(depth) + RING_RESERVE {
            return Err(std::io::Error::other(format!(
                "reactor_{} has room for {room} more io_uring operations; a ublk queue of \
                 depth {depth} needs {} (too many ublk queues on one reactor: give the device \
                 other cores with cpumask)",
                ctx.reactor(),
                u32::from(depth) + RING_RESERVE
            )));
        }
        let channel = start.backend.open_channel(ctx)?;
        let descs = Descriptors::map(start.char_dev.as_raw_fd(), start.index, depth)?;
        let bufs = Buffers::new(depth, start.buf_size)?;
        let iovecs: Box<[libc::iovec]> = (0..depth)
            .map(|t| libc::iovec {
                iov_base: bufs.addr(t).cast(),
                iov_len: bufs.size(),
            })
            .collect();
        let tags = (0..depth)
            .map(|_| Tag {
                state: TagState::Dead,
                req: BlockRequest::default(),
                start: 0,
            })
            .collect();
        let mut q = UblkQueue {
            device: start.device,
            dev_id: start.dev_id,
            index: start.index,
            char_dev: start.char_dev,
            descs,
            bufs,
            iovecs,
            tags,
            waiting: VecDeque::with_capacity(usize::from(depth)),
            model: start.model,
            channel,
            reaped: Vec::with_capacity(usize::from(depth)),
            fetching: 0,
            running: 0,
            stopping: false,
            abandoned: start.abandoned,
            stats: Box::default(),
            latency: start.latency,
            scale: TickScale::new(),
            log_limit: RateLimit::new(),
        };
        for t in 0..depth {
            if let Err(e) = q.send(ctx, uapi::IO_FETCH_REQ, t, 0) {
                if t == 0 {
                    return Err(e);
                }
                // The queue never becomes ready: START_DEV times out and the export tears
                // the device down, which gives back the fetches already queued.
                log::error!("{}: FETCH_REQ of tag {t} not queued: {e}", q.describe());
                break;
            }
        }
        Ok(q)
    }

    /// A copy of the counters, and the requests with us (backend or waiting for it).
    pub fn stats(&self) -> (IoStats, u32) {
        // Fits: at most the queue depth.
        (
            (*self.stats).clone(),
            self.running + self.waiting.len() as u32,
        )
    }

    /// Queues the command `op` for `tag` (FETCH_REQ, or COMMIT_AND_FETCH_REQ with `result`).
    fn send(&mut self, ctx: &mut Ctx<'_>, op: u32, tag: u16, result: i32) -> std::io::Result<()> {
        let cmd = IoCmd {
            q_id: self.index,
            tag,
            result,
            addr: self.bufs.addr(tag) as u64,
        };
        let sqe = opcode::UringCmd16::new(types::Fd(self.char_dev.as_raw_fd()), op)
            .cmd(cmd.to_bytes())
            .build()
            .user_data(ctx.user_data(BACKGROUND | u64::from(tag)));
        // SAFETY: the command names the tag's buffer, which stays mapped while the kernel
        // holds the command: the queue leaves its reactor only once every command came back
        // (`drained`), or leaks the buffers (`abandoned`, `Drop`).
        unsafe { ctx.ring.push(&sqe) }?;
        self.tags[usize::from(tag)].state = TagState::Fetching;
        self.fetching += 1;
        Ok(())
    }

    /// The kernel answered `tag`'s fetch.
    fn fetched(&mut self, ctx: &mut Ctx<'_>, tag: u16, res: i32) {
        let i = usize::from(tag);
        match self.tags.get(i).map(|t| t.state) {
            Some(TagState::Fetching) => {}
            state => {
                log::error!(
                    "{}: completion for tag {tag}, which is {state:?}",
                    self.describe()
                );
                return;
            }
        }
        self.fetching -= 1;
        match res {
            uapi::IO_RES_OK => {
                self.tags[i].start = if self.latency { ticks() } else { 0 };
                if self.waiting.is_empty() && self.channel.room(ctx) > 0 {
                    self.execute(ctx, tag);
                } else {
                    self.tags[i].state = TagState::Waiting;
                    self.waiting.push_back(tag);
                }
            }
            uapi::IO_RES_ABORT => self.tags[i].state = TagState::Dead,
            e => {
                self.tags[i].state = TagState::Dead;
                log::error!(
                    "{}: the kernel refused tag {tag}'s command: {}",
                    self.describe(),
                    if e < 0 {
                        std::io::Error::from_raw_os_error(-e).to_string()
                    } else {
                        format!("result {e}")
                    }
                );
            }
        }
    }

    /// The request of `tag` as a block request, from its descriptor.
    fn request(&self, tag: u16) -> Result<BlockRequest, BlockError> {
        let d = self.descs.get(tag);
        let op = match d.op() {
            uapi::IO_OP_READ => Op::Read,
            uapi::IO_OP_WRITE => Op::Write {
                fua: d.has(uapi::IO_F_FUA) || !self.model.writeback(),
            },
            // A flush names no range: its sector is whatever the block layer left there
            // (often all ones), so it is not looked at.
            uapi::IO_OP_FLUSH => {
                return Ok(BlockRequest {
                    op: Op::Flush,
                    tag: u64::from(tag),
                    ..BlockRequest::default()
                })
            }
            uapi::IO_OP_DISCARD => Op::Discard,
            uapi::IO_OP_WRITE_ZEROES => Op::WriteZeroes {
                unmap: !d.has(uapi::IO_F_NOUNMAP),
            },
            _ => return Err(BlockError::Unsupported),
        };
        let offset = d
            .start_sector
            .checked_mul(1 << SECTOR_SHIFT)
            .ok_or(BlockError::Overflow)?;
        let len = u64::from(d.nr_sectors) << SECTOR_SHIFT;
        let mut req = BlockRequest {
            op,
            offset,
            len,
            iov: std::ptr::null(),
            iov_count: 0,
            tag: u64::from(tag),
        };
        if op.has_data() {
            // Fits: the buffer size is a u32 (max_io_buf_bytes).
            if len > self.bufs.size() as u64 {
                return Err(BlockError::TooLarge);
            }
            req.iov = &self.iovecs[usize::from(tag)];
            req.iov_count = 1;
        }
        Ok(req)
    }

    /// Starts the request of `tag` on the backend.
    fn execute(&mut self, ctx: &mut Ctx<'_>, tag: u16) {
        let req = match self.request(tag) {
            Ok(r) => r,
            Err(e) => {
                self.log_bad_request(tag, &e);
                self.stats.other_errors += 1;
                return self.commit(ctx, tag, -e.errno());
            }
        };
        if let Err(e) = self.model.check(&req) {
            self.log_bad_request(tag, &e);
            return self.finish(ctx, tag, &req, Err(e));
        }
        // The iovec describes the tag's buffer exactly; a shorter request moves fewer bytes.
        if req.op.has_data() {
            // Fits: at most the buffer size (checked in `request`).
            self.iovecs[usize::from(tag)].iov_len = req.len as usize;
        }
        // SAFETY: the iovec lives in `self.iovecs` and the buffer in `self.bufs`, neither
        // touched for this tag until it completes (its state says Running), and the queue
        // does not leave its reactor while a request runs (`drained`).
        match unsafe { self.channel.submit(ctx, &req) } {
            Submitted::Done(result) => self.finish(ctx, tag, &req, result),
            Submitted::Pending => {
                let t = &mut self.tags[usize::from(tag)];
                t.state = TagState::Running;
                t.req = req;
                self.running += 1;
            }
        }
    }

    /// A request finished: statistics, then its result goes to the kernel with the next
    /// fetch.
    fn finish(
        &mut self,
        ctx: &mut Ctx<'_>,
        tag: u16,
        req: &BlockRequest,
        result: Result<(), BlockError>,
    ) {
        let ns = self.latency.then(|| {
            self.scale
                .to_ns(ticks().wrapping_sub(self.tags[usize::from(tag)].start))
        });
        self.stats.complete(req.op, req.len, ns, &result);
        let res = match &result {
            // Reads and writes report their bytes (the kernel completes that much of the
            // request); the others 0. Fits: at most the buffer size.
            Ok(()) if req.op.has_data() => req.len as i32,
            Ok(()) => 0,
            Err(e) => {
                self.log_io_error(tag, e);
                -e.errno()
            }
        };
        self.commit(ctx, tag, res);
    }

    fn commit(&mut self, ctx: &mut Ctx<'_>, tag: u16, res: i32) {
        if let Err(e) = self.send(ctx, uapi::IO_COMMIT_AND_FETCH_REQ, tag, res) {
            // The request stays with us: the kernel's timeout or STOP_DEV ends it.
            self.tags[usize::from(tag)].state = TagState::Dead;
            log::error!(
                "{}: COMMIT_AND_FETCH of tag {tag} failed: {e}",
                self.describe()
            );
        }
    }

    /// The backend finished the request of `tag` (a CQE, or a reaped completion).
    fn backend_done(
        &mut self,
        ctx: &mut Ctx<'_>,
        tag: u64,
        result: Option<Result<(), BlockError>>,
        cqe: i32,
    ) {
        let Some(t) = self.tags.get_mut(tag as usize) else {
            return;
        };
        if t.state != TagState::Running {
            return;
        }
        t.state = TagState::Fetching;
        self.running -= 1;
        let req = t.req;
        let result = result.unwrap_or_else(|| self.channel.complete(&req, cqe));
        // Fits: tags are below the queue depth (u16).
        self.finish(ctx, tag as u16, &req, result);
    }

    fn reap_channel(&mut self, ctx: &mut Ctx<'_>) -> u32 {
        let reaped = &mut self.reaped;
        let n = self
            .channel
            .reap(ctx, &mut |tag, result| reaped.push((tag, result)));
        while let Some((tag, result)) = self.reaped.pop() {
            self.backend_done(ctx, tag, Some(result), 0);
        }
        n
    }

    fn log_bad_request(&mut self, tag: u16, e: &BlockError) {
        if self.log_limit.allow() {
            log::warn!(
                "{}: request of tag {tag} refused: {e}{}",
                self.describe(),
                self.log_limit.suppressed_note()
            );
        }
    }

    fn log_io_error(&mut self, tag: u16, e: &BlockError) {
        if self.log_limit.allow() {
            log::warn!(
                "{}: I/O error on tag {tag}: {e}{}",
                self.describe(),
                self.log_limit.suppressed_note()
            );
        }
    }
}

impl Poller for UblkQueue {
    /// Requests that waited for room, and completions a backend reports by `reap`. New
    /// requests arrive as completions (`complete`).
    fn poll(&mut self, ctx: &mut Ctx<'_>) -> u32 {
        let mut work = if self.running > 0 {
            self.reap_channel(ctx)
        } else {
            0
        };
        while let Some(&tag) = self.waiting.front() {
            if self.channel.room(ctx) == 0 {
                break;
            }
            self.waiting.pop_front();
            work += 1;
            self.execute(ctx, tag);
        }
        work
    }

    fn complete(&mut self, ctx: &mut Ctx<'_>, tag: u64, result: i32) {
        if tag & BACKGROUND != 0 {
            // Fits: fetches carry the tag (a u16) under the background bit.
            self.fetched(ctx, (tag & 0xffff) as u16, result);
        } else {
            self.backend_done(ctx, tag, None, result);
        }
    }

    /// Requests waiting for room are started once the backend completes something, which
    /// wakes the reactor; look again in a millisecond anyway, as the room may be another
    /// poller's to free.
    fn arm(&mut self) -> Armed {
        if self.waiting.is_empty() {
            Armed::Sleep
        } else {
            Armed::Poll
        }
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        self.channel.wake_fds()
    }

    /// The queue keeps serving: the kernel drains the device's requests before it gives
    /// the fetches back (STOP_DEV), and the queue is done once it has them all.
    fn stop(&mut self, _ctx: &mut Ctx<'_>) {
        self.stopping = true;
    }

    fn drained(&self) -> bool {
        self.stopping
            && self.running == 0
            && ((self.fetching == 0 && self.waiting.is_empty())
                || self.abandoned.load(Ordering::Acquire))
    }

    fn describe(&self) -> String {
        format!(
            "device {} (ublkb{}) queue {}",
            self.device, self.dev_id, self.index
        )
    }
}

impl Drop for UblkQueue {
    fn drop(&mut self) {
        if self.fetching > 0 || !self.waiting.is_empty() {
            // The kernel still holds commands that name these buffers.
            log::warn!(
                "{}: leaving with {} command(s) still with the kernel; their buffers stay mapped",
                self.describe(),
                self.fetching + self.waiting.len() as u32
            );
            self.bufs.leak();
        }
    }
}

/// Reads a running ublk queue's counters (on its reactor), for `blk::queues`.
pub fn snapshot(p: &mut dyn Poller) -> Option<(IoStats, u32)> {
    let any: &mut dyn Any = p;
    any.downcast_mut::<UblkQueue>().map(|q| q.stats())
}
