//! Completion routing: one poller per (image, reactor) that has channels of the image.
//!
//! librbd signals completions on one eventfd per image (`rbd_set_image_notification`), and
//! `rbd_poll_io_events` hands out every completed request of the image, whichever queue
//! submitted it. Each reactor serving the image keeps an io_uring read on that eventfd, so
//! a busy reactor learns of completions from its own completion queue without a system
//! call, and a sleeping one is woken by it like by any I/O. The reactor whose read returns
//! reaps everything librbd has, posts each completion to the mailbox of the channel that
//! submitted it (the completion's argument names it), and wakes each other reactor it
//! posted to, once per batch. `rbd_poll_io_events` is called only after the
//! eventfd fired, never in a loop: it takes a lock librbd's own threads need, and on a small
//! machine their CPU time is what the I/O is waiting for.
//!
//! The read is a background operation for the reactor (it may wait forever), so a sleeping
//! reactor would rely on io_uring's eventfd alone to wake for it; a completion racing with
//! that arming can go unsignalled (see the reactor's `sleep`). While any request of the
//! image is in flight, `arm` therefore says `Poll`: no sleep longer than a millisecond, and
//! librbd's latency is measured in milliseconds anyway.

use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types};

use super::channel::{CompletionArg, Sink};
use super::ffi::CompletionT;
use super::Image;
use crate::engine::poller::BACKGROUND;
use crate::engine::ratelimit::RateLimit;
use crate::engine::{Armed, Ctx, Poller};

const READ: u64 = BACKGROUND | 1;
const CANCEL: u64 = BACKGROUND | 2;
/// Completions taken from librbd per call.
const BATCH: usize = 64;

/// What a router and the channels on its reactor share. Only that reactor's thread touches
/// it after creation (atomics because the image's table of routers is shared).
pub struct RouterShared {
    channels: AtomicU32,
    /// The router is leaving (no channel was left): a new channel needs a new router.
    leaving: AtomicBool,
}

impl RouterShared {
    pub fn new() -> RouterShared {
        RouterShared {
            channels: AtomicU32::new(1),
            leaving: AtomicBool::new(false),
        }
    }

    /// One more channel on this router, unless it is leaving.
    pub fn join(&self) -> bool {
        if self.leaving.load(Ordering::Relaxed) {
            return false;
        }
        self.channels.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn channel_closed(&self) {
        self.channels.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Router {
    image: Arc<Image>,
    shared: Arc<RouterShared>,
    /// The read's buffer: the kernel writes the eventfd's counter here.
    buf: Box<u64>,
    read_armed: bool,
    cancel_sent: bool,
    /// SQEs whose CQE has not come back: the router may not leave before (its slot could
    /// otherwise get a stale CQE, and the buffer must outlive the read).
    outstanding: u32,
    comps: Box<[CompletionT; BATCH]>,
    /// One mailbox per other reactor posted to in this batch: each is woken once.
    wake: Vec<Arc<Sink>>,
    log_limit: RateLimit,
}

impl Router {
    pub fn new(image: Arc<Image>, shared: Arc<RouterShared>) -> Router {
        Router {
            image,
            shared,
            buf: Box::new(0),
            read_armed: false,
            cancel_sent: false,
            outstanding: 0,
            comps: Box::new([ptr::null_mut(); BATCH]),
            wake: Vec::with_capacity(8),
            log_limit: RateLimit::new(),
        }
    }

    fn push(&mut self, ctx: &mut Ctx<'_>, sqe: io_uring::squeue::Entry, what: &str) -> bool {
        // SAFETY: the read's buffer is `self.buf`, which lives until its CQE (the router does
        // not leave while `outstanding` > 0); the eventfd is kept open by `self.image`.
        match unsafe { ctx.ring.push(&sqe) } {
            Ok(()) => {
                self.outstanding += 1;
                true
            }
            Err(e) => {
                if self.log_limit.allow() {
                    log::warn!("rbd {}: cannot queue the {what}: {e}", self.image.name);
                }
                false
            }
        }
    }

    fn arm_read(&mut self, ctx: &mut Ctx<'_>) {
        let fd = types::Fd(std::os::unix::io::AsRawFd::as_raw_fd(&self.image.events));
        let sqe = opcode::Read::new(fd, ptr::from_mut(&mut *self.buf).cast(), 8)
            .build()
            .user_data(ctx.user_data(READ));
        self.read_armed = self.push(ctx, sqe, "eventfd read");
    }

    /// Takes every completion librbd has and posts each to its channel's mailbox.
    fn route(&mut self) -> u32 {
        let api = self.image.api;
        let img = self.image.handle.0;
        let mut total = 0;
        loop {
            // SAFETY: an open image and room for BATCH completion pointers.
            let n = unsafe { (api.rbd_poll_io_events)(img, self.comps.as_mut_ptr(), BATCH as i32) };
            let n = usize::try_from(n).unwrap_or(0).min(BATCH);
            for &c in &self.comps[..n] {
                // SAFETY: a completion librbd just handed over; it is released once, here,
                // after its argument and result are read.
                let (arg, rc) = unsafe {
                    let arg = (api.rbd_aio_get_arg)(c)
                        .cast::<CompletionArg>()
                        .cast_const();
                    let rc = (api.rbd_aio_get_return_value)(c);
                    (api.rbd_aio_release)(c);
                    (arg, rc)
                };
                if arg.is_null() {
                    continue;
                }
                // SAFETY: every completion vubd creates has a `CompletionArg` of a channel as
                // its argument, and a channel keeps its arguments alive while any of its
                // requests is in flight, as this one is until it is posted below. The Arc
                // clone keeps the sink alive after that, when the channel may go at once.
                let (sink, index) = unsafe { (Arc::clone(&(*arg).sink), (*arg).index) };
                if sink.post(index, rc as i64) && !self.wake.iter().any(|s| s.same_reactor(&sink)) {
                    self.wake.push(sink);
                }
            }
            total += n as u32;
            if n < BATCH {
                break;
            }
        }
        for sink in self.wake.drain(..) {
            sink.wake();
        }
        total
    }
}

impl Poller for Router {
    fn poll(&mut self, ctx: &mut Ctx<'_>) -> u32 {
        if self.shared.channels.load(Ordering::Relaxed) == 0 {
            self.shared.leaving.store(true, Ordering::Relaxed);
            if self.read_armed && !self.cancel_sent {
                let sqe = opcode::AsyncCancel::new(ctx.user_data(READ))
                    .build()
                    .user_data(ctx.user_data(CANCEL));
                self.cancel_sent = self.push(ctx, sqe, "cancel");
            }
        } else if !self.read_armed {
            self.arm_read(ctx);
        }
        0
    }

    fn complete(&mut self, ctx: &mut Ctx<'_>, tag: u64, result: i32) {
        self.outstanding = self.outstanding.saturating_sub(1);
        if tag != READ {
            return;
        }
        self.read_armed = false;
        if result < 0 && result != -libc::ECANCELED && self.log_limit.allow() {
            log::warn!(
                "rbd {}: reading the completion eventfd: {}",
                self.image.name,
                std::io::Error::from_raw_os_error(-result)
            );
        }
        // Whatever the read says (even cancelled), librbd may have completions.
        self.route();
        if !self.shared.leaving.load(Ordering::Relaxed) {
            self.arm_read(ctx);
        }
    }

    fn arm(&mut self) -> Armed {
        if self.image.in_flight.load(Ordering::Relaxed) > 0 {
            Armed::Poll
        } else {
            Armed::Sleep
        }
    }

    /// Stops with its reactor: once the channels here have drained and closed.
    fn stop(&mut self, _ctx: &mut Ctx<'_>) {}

    fn drained(&self) -> bool {
        self.done()
    }

    fn done(&self) -> bool {
        self.shared.leaving.load(Ordering::Relaxed) && self.outstanding == 0
    }

    fn describe(&self) -> String {
        format!("rbd {} completions", self.image.name)
    }
}
