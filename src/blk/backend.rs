//! What a backend must do (SPDK's bdev and io_channel): a `Backend` is one device's storage,
//! shared by every reactor that serves the device; each queue opens a `Channel` on its own
//! reactor and submits through it, without locks.
//!
//! Completions come back one of three ways, so that any kind of storage fits without the
//! front end knowing which: at once from `submit` (RAM, null), as a CQE of the reactor's
//! io_uring routed to the front end, which hands it to `complete` (files), or from `reap`
//! when the channel's own wake-up fd fires (a socket, librbd's eventfd).

use std::io;
use std::os::unix::io::RawFd;

use super::model::Caps;
use super::{BlockError, BlockRequest};
use crate::engine::Ctx;

/// What a backend tells the device model when a device is created.
#[derive(Clone, Debug)]
pub struct BackendInfo {
    /// Size in bytes.
    pub size: u64,
    pub caps: Caps,
    /// The backend can only be written through a read-only view.
    pub read_only: bool,
    /// All of the device's queues must run on one reactor (a backend that must not be
    /// reached over several connections, e.g. an NBD server without multi-conn).
    pub single_reactor: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("this backend cannot change its size")]
    NotSupported,
    /// The front end cannot tell its consumer of a new size (the reason is the message).
    #[error("this front end cannot change the device's size: {0}")]
    FrontEndNotSupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

pub trait Backend: Send + Sync {
    /// `null`, `ram`, `file`, ...
    fn kind(&self) -> &'static str;

    fn info(&self) -> BackendInfo;

    /// Opens the channel one queue uses on the calling reactor.
    fn open_channel(&self, ctx: &mut Ctx<'_>) -> io::Result<Box<dyn Channel>>;

    /// Changes the size to `new` bytes, or, with `None`, re-reads it (a file grown outside
    /// vubd, a block device resized); returns the size now. Called on a control thread while
    /// queues run: requests are checked against the device model's capacity, which the
    /// caller updates afterwards, so a backend must keep serving the old range meanwhile.
    fn resize(&self, _new: Option<u64>) -> Result<u64, ResizeError> {
        Err(ResizeError::NotSupported)
    }

    /// The data lives in this process only (a RAM disk): no other process can serve it, so a
    /// VM using the device cannot live-migrate (no dirty logging is offered).
    fn process_local(&self) -> bool {
        false
    }
}

/// The outcome of `Channel::submit`.
#[derive(Debug)]
pub enum Submitted {
    /// Done already (or refused): no completion will follow.
    Done(Result<(), BlockError>),
    /// A completion will follow, through `complete` or `reap`.
    Pending,
}

pub trait Channel {
    /// How many more requests may be submitted now (back-pressure, e.g. io_uring room).
    fn room(&self, ctx: &Ctx<'_>) -> u32;

    /// Starts `req`.
    ///
    /// # Safety
    /// `req`'s iovecs, and the memory they describe, stay valid until the request completes:
    /// `Done` is returned, or `complete` / `reap` reports its tag.
    unsafe fn submit(&mut self, ctx: &mut Ctx<'_>, req: &BlockRequest) -> Submitted;

    /// A CQE of the reactor's io_uring for `req`, which this channel submitted there.
    /// The default reads it as the kernel reports a syscall: reads and writes must move
    /// every byte, the others return 0.
    fn complete(&mut self, req: &BlockRequest, result: i32) -> Result<(), BlockError> {
        let expect = if req.op.has_data() { req.len } else { 0 };
        BlockError::check_result(result, expect).or_else(|e| match e {
            // Discard is a hint: a backend that cannot deallocate still succeeds.
            BlockError::Io(libc::EOPNOTSUPP) if req.op == super::Op::Discard => Ok(()),
            e => Err(e),
        })
    }

    /// Every `submit` returns `Done`: the front end may reuse the iovecs as soon as it
    /// returns.
    fn completes_inline(&self) -> bool {
        false
    }

    /// Completions that arrived outside the ring: `done(tag, result)` for each.
    fn reap(
        &mut self,
        _ctx: &mut Ctx<'_>,
        _done: &mut dyn FnMut(u64, Result<(), BlockError>),
    ) -> u32 {
        0
    }

    /// Fds that signal completions for `reap` (watched while the reactor sleeps).
    fn wake_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
}
