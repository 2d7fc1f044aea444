//! One queue's channel to the image: submits guest requests to librbd straight from the
//! guest's iovecs and collects their completions from its mailbox.
//!
//! Each request gets a completion (`rbd_aio_create_completion`, no callback) whose argument
//! points to one of this channel's `CompletionArg`s: whichever reactor reaps the completion
//! (see `router.rs`) finds there the mailbox to post `(slot, result)` to. The mailbox is a
//! bounded lock-free queue (crossbeam's array channel: a push and a pop are a few atomics;
//! only a blocked receiver would take its lock, and nobody blocks on it). When another
//! reactor posted to it, it wakes this channel's reactor with an empty message (its
//! `ReactorHandle`), once per batch: a confined reactor may not create an eventfd of the
//! channel's own, and the reactor's message eventfd is what wakes it anyway.
//!
//! A write the driver wants durable (`fua`: the guest turned its write cache off) is
//! followed by an `rbd_aio_flush` before it completes: librbd's cache (on by default, in
//! writearound mode) acknowledges writes before the OSDs have them. With the cache off the
//! flush costs a hop through librbd's threads, no round trip to the cluster.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::ThreadId;

use crossbeam_channel::{Receiver, Sender};

use super::ffi::{self, CompletionT};
use super::router::RouterShared;
use super::Image;
use crate::blk::backend::{Channel, Submitted};
use crate::blk::{BlockError, BlockRequest, Op};
use crate::engine::{Ctx, ReactorHandle};

/// Requests one channel may have in librbd at once. librbd throttles the client as a whole
/// (`objecter_inflight_ops`, 1024); this bounds one queue's share and sizes its slabs.
pub const SLOTS: u32 = 256;

/// Where completions of one channel go.
pub struct Sink {
    queue: Sender<(u32, i64)>,
    /// The channel's reactor (None without one: a test harness on the caller's thread).
    reactor: Option<ReactorHandle>,
    thread: ThreadId,
}

impl Sink {
    /// Posts a completion for slot `index`; true if the channel's reactor must be woken
    /// (the poster runs on another thread).
    pub fn post(&self, index: u32, rc: i64) -> bool {
        // Never full: each slot has at most one completion outstanding, and the queue
        // holds one per slot.
        if self.queue.try_send((index, rc)).is_err() {
            log::error!("rbd: completion mailbox full or gone; completion lost");
        }
        self.thread != std::thread::current().id()
    }

    /// Wakes the channel's reactor: a message that does nothing but have it run a pass,
    /// in which the channel's queue reaps its mailbox. (A capture-less closure: boxing it
    /// allocates nothing.)
    pub fn wake(&self) {
        if let Some(r) = &self.reactor {
            r.run(|_| {});
        }
    }

    /// Whether `other` wakes the same reactor.
    pub fn same_reactor(&self, other: &Sink) -> bool {
        self.thread == other.thread
    }
}

/// What a completion's `cb_arg` points to. Immutable once built, so any thread may read it.
pub struct CompletionArg {
    pub sink: Arc<Sink>,
    pub index: u32,
}

/// One slot's request, known only to the channel's own reactor.
#[derive(Clone, Copy, Default)]
struct Local {
    tag: u64,
    op: Option<Op>,
    len: u64,
    /// The write completed; its flush is in flight.
    flushing: bool,
}

pub struct RbdChannel {
    image: Arc<Image>,
    router: Arc<RouterShared>,
    /// Addresses handed to librbd as completion arguments: must not move or be freed while
    /// a completion may still name them (see Drop).
    args: Box<[CompletionArg]>,
    done: Receiver<(u32, i64)>,
    local: Box<[Local]>,
    free: Vec<u32>,
    in_flight: u32,
}

impl RbdChannel {
    pub fn new(image: Arc<Image>, router: Arc<RouterShared>, ctx: &Ctx<'_>) -> RbdChannel {
        let (tx, rx) = crossbeam_channel::bounded(SLOTS as usize);
        let sink = Arc::new(Sink {
            queue: tx,
            reactor: ctx.handle().cloned(),
            thread: std::thread::current().id(),
        });
        let args = (0..SLOTS)
            .map(|index| CompletionArg {
                sink: Arc::clone(&sink),
                index,
            })
            .collect();
        RbdChannel {
            image,
            router,
            args,
            done: rx,
            local: vec![Local::default(); SLOTS as usize].into_boxed_slice(),
            free: (0..SLOTS).rev().collect(),
            in_flight: 0,
        }
    }

    /// Starts `op` for slot `index` with a fresh completion. Err(errno) if librbd refused it
    /// at once (then no completion will follow).
    ///
    /// # Safety
    /// For reads and writes, `iov`/`iovcnt` describe memory valid until the completion is
    /// reaped.
    unsafe fn start(
        &self,
        index: u32,
        op: Op,
        offset: u64,
        len: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    ) -> Result<(), i32> {
        let api = self.image.api;
        let img = self.image.handle.0;
        let arg = ptr::from_ref(&self.args[index as usize])
            .cast_mut()
            .cast::<c_void>();
        let mut comp: CompletionT = ptr::null_mut();
        // SAFETY: `arg` stays valid until the completion is reaped (`args` is never moved and
        // is leaked rather than freed while requests are in flight); no callback.
        let rc = unsafe { (api.rbd_aio_create_completion)(arg, None, &mut comp) };
        if rc < 0 {
            return Err(-rc);
        }
        // librbd takes at most IOV_MAX iovecs (as many as the front end ever builds).
        let iovcnt = iovcnt as libc::c_int;
        // SAFETY: an open image (the Arc keeps it open) and a fresh completion; the iovecs
        // are valid until completion (the caller's contract).
        let rc = unsafe {
            match op {
                Op::Read => (api.rbd_aio_readv)(img, iov, iovcnt, offset, comp),
                Op::Write { .. } => (api.rbd_aio_writev)(img, iov, iovcnt, offset, comp),
                Op::Flush => (api.rbd_aio_flush)(img, comp),
                Op::Discard => (api.rbd_aio_discard)(img, offset, len, comp),
                Op::WriteZeroes { unmap } => {
                    // Without UNMAP the range must stay allocated: thick zeroes.
                    let flags = if unmap { 0 } else { ffi::WRITE_ZEROES_THICK };
                    (api.rbd_aio_write_zeroes)(img, offset, len as usize, comp, flags, 0)
                }
            }
        };
        if rc < 0 {
            // Refused before librbd took the completion: it is still ours to release.
            // SAFETY: created above, never handed over.
            unsafe { (api.rbd_aio_release)(comp) };
            return Err(-rc);
        }
        Ok(())
    }

    /// The request in `index` is over.
    fn finish(&mut self, index: u32) -> u64 {
        let tag = self.local[index as usize].tag;
        self.local[index as usize] = Local::default();
        self.free.push(index);
        self.in_flight -= 1;
        self.image.in_flight.fetch_sub(1, Ordering::Relaxed);
        tag
    }
}

/// librbd's return value for `op` as a block result.
fn result(op: Op, len: u64, rc: i64) -> Result<(), BlockError> {
    if rc < 0 {
        let errno = i32::try_from(-rc).unwrap_or(libc::EIO);
        // Discard is a hint (an image or pool that cannot deallocate still succeeds).
        if op == Op::Discard && errno == libc::EOPNOTSUPP {
            return Ok(());
        }
        return Err(BlockError::Io(errno));
    }
    // Reads return the bytes read, which must be all of them; the others return 0.
    if op == Op::Read && rc as u64 != len {
        return Err(BlockError::Short(rc as u32));
    }
    Ok(())
}

impl Channel for RbdChannel {
    fn room(&self, _ctx: &Ctx<'_>) -> u32 {
        self.free.len() as u32
    }

    unsafe fn submit(&mut self, _ctx: &mut Ctx<'_>, req: &BlockRequest) -> Submitted {
        let Some(index) = self.free.pop() else {
            // `room` said 0: the front end does not get here.
            return Submitted::Done(Err(BlockError::Io(libc::EAGAIN)));
        };
        // Counted before librbd sees it, so a reactor deciding whether it may sleep never
        // misses a request that is about to complete.
        self.image.in_flight.fetch_add(1, Ordering::Relaxed);
        self.in_flight += 1;
        self.local[index as usize] = Local {
            tag: req.tag,
            op: Some(req.op),
            len: req.len,
            flushing: false,
        };
        // SAFETY: the front end keeps the iovecs and their memory valid until the request
        // completes (`submit`'s contract), which is after librbd's completion is reaped.
        match unsafe { self.start(index, req.op, req.offset, req.len, req.iov, req.iov_count) } {
            Ok(()) => Submitted::Pending,
            Err(errno) => {
                self.finish(index);
                Submitted::Done(Err(BlockError::Io(errno)))
            }
        }
    }

    fn reap(
        &mut self,
        _ctx: &mut Ctx<'_>,
        done: &mut dyn FnMut(u64, Result<(), BlockError>),
    ) -> u32 {
        let mut n = 0;
        while let Ok((index, rc)) = self.done.try_recv() {
            let Some(l) = self.local.get(index as usize).copied() else {
                continue;
            };
            let Some(op) = l.op else {
                continue;
            };
            n += 1;
            if matches!(op, Op::Write { fua: true }) && !l.flushing && rc >= 0 {
                self.local[index as usize].flushing = true;
                // SAFETY: a flush has no buffers.
                match unsafe { self.start(index, Op::Flush, 0, 0, ptr::null(), 0) } {
                    Ok(()) => continue,
                    Err(errno) => {
                        let tag = self.finish(index);
                        done(tag, Err(BlockError::Io(errno)));
                        continue;
                    }
                }
            }
            let len = l.len;
            let tag = self.finish(index);
            done(tag, result(op, len, rc));
        }
        n
    }
}

impl Drop for RbdChannel {
    fn drop(&mut self) {
        self.router.channel_closed();
        if self.in_flight > 0 {
            // The front end drains a queue before dropping it, so this means requests that
            // never completed (a queue dropped with the cluster unreachable). librbd may
            // still complete them and hand their arguments to a router: keep those alive.
            log::warn!(
                "rbd {}: a channel closed with {} request(s) still in librbd",
                self.image.name,
                self.in_flight
            );
            std::mem::forget(std::mem::take(&mut self.args));
            self.image
                .in_flight
                .fetch_sub(u64::from(self.in_flight), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librbd_results_become_block_results() {
        assert_eq!(result(Op::Read, 4096, 4096), Ok(()));
        assert_eq!(result(Op::Read, 4096, 512), Err(BlockError::Short(512)));
        assert_eq!(result(Op::Write { fua: false }, 4096, 0), Ok(()));
        assert_eq!(
            result(Op::Write { fua: false }, 4096, -i64::from(libc::ETIMEDOUT)),
            Err(BlockError::Io(libc::ETIMEDOUT))
        );
        assert_eq!(
            result(Op::Discard, 4096, -i64::from(libc::EOPNOTSUPP)),
            Ok(())
        );
        assert_eq!(
            // What a blocklisted client gets.
            result(Op::Flush, 0, -i64::from(libc::ESHUTDOWN)),
            Err(BlockError::Io(libc::ESHUTDOWN))
        );
    }
}
