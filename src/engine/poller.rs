//! Pollers: what a reactor runs. A poller is anything that finds work by looking (a
//! virtqueue, a socket, a completion list) and reports whether it found some; the reactor
//! books its time as busy or idle from the answer (SPDK's `spdk_poller`).
//!
//! The engine knows nothing of what a poller serves. Completions of the reactor's io_uring
//! reach the poller whose slot is encoded in their user data.

use std::any::Any;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::uring::Uring;
use super::ReactorHandle;

/// Names one poller across threads; unique in the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PollerId(u64);

impl PollerId {
    pub fn next() -> PollerId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        PollerId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Bits of io_uring user data a poller may use for its own tags.
pub const TAG_BITS: u32 = 48;
/// Tags with this bit set are background operations (notifications): they do not keep a
/// reactor from sleeping, as a frontend may leave one pending for as long as it likes.
pub const BACKGROUND: u64 = 1 << (TAG_BITS - 1);
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;

/// Splits io_uring user data into the poller slot and the poller's tag.
pub fn split_user_data(ud: u64) -> (usize, u64) {
    ((ud >> TAG_BITS) as usize, ud & TAG_MASK)
}

/// Pollers a poller asked for while it ran; the reactor adds them after the call.
pub type Spawned = Vec<(PollerId, Box<dyn Poller>)>;

/// What a poller may use while its reactor runs it.
pub struct Ctx<'a> {
    pub ring: &'a mut Uring,
    slot: usize,
    reactor: usize,
    spawned: Option<&'a mut Spawned>,
    handle: Option<&'a ReactorHandle>,
}

impl<'a> Ctx<'a> {
    /// A context without a reactor around it (tests): pollers cannot be spawned.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn new(ring: &'a mut Uring, slot: usize, reactor: usize) -> Ctx<'a> {
        Ctx {
            ring,
            slot,
            reactor,
            spawned: None,
            handle: None,
        }
    }

    /// The context a reactor (or a test harness that runs several pollers) gives.
    pub fn with(
        ring: &'a mut Uring,
        slot: usize,
        reactor: usize,
        spawned: &'a mut Spawned,
        handle: Option<&'a ReactorHandle>,
    ) -> Ctx<'a> {
        Ctx {
            ring,
            slot,
            reactor,
            spawned: Some(spawned),
            handle,
        }
    }

    /// Runs `poller` on this reactor too, from after the current call on: how a backend
    /// starts what serves all its channels on one reactor (a connection, a completion
    /// router). False where no reactor runs around the caller.
    pub fn spawn(&mut self, id: PollerId, poller: Box<dyn Poller>) -> bool {
        match self.spawned.as_deref_mut() {
            Some(s) => {
                s.push((id, poller));
                true
            }
            None => false,
        }
    }

    /// How other threads reach this reactor (to hand it work later), if there is one.
    pub fn handle(&self) -> Option<&ReactorHandle> {
        self.handle
    }

    /// The io_uring user data under which a completion for `tag` comes back to this poller.
    pub fn user_data(&self, tag: u64) -> u64 {
        debug_assert!(tag <= TAG_MASK);
        ((self.slot as u64) << TAG_BITS) | (tag & TAG_MASK)
    }

    /// The reactor's index in the engine.
    pub fn reactor(&self) -> usize {
        self.reactor
    }
}

/// A poller's answer when the reactor is about to sleep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Armed {
    /// Work raced in: do not sleep.
    Ready,
    /// The poller's wake-up fds will signal new work.
    Sleep,
    /// No fd can signal new work (a frontend without a kick fd): look again in a millisecond.
    Poll,
}

pub trait Poller: Any {
    /// One pass. Returns how much work it found (0: idle).
    fn poll(&mut self, ctx: &mut Ctx<'_>) -> u32;

    /// A completion from the reactor's io_uring whose user data names this poller.
    fn complete(&mut self, ctx: &mut Ctx<'_>, tag: u64, result: i32);

    /// After every poller polled, before the reactor submits to its io_uring: publish what
    /// the pass completed (one notification per pass, not per request).
    fn end_pass(&mut self, _ctx: &mut Ctx<'_>) {}

    /// Before the reactor sleeps: re-enable whatever wakes it for this poller's work.
    fn arm(&mut self) -> Armed {
        Armed::Sleep
    }

    /// After the reactor woke up: polling again, wake-ups are not needed.
    fn disarm(&mut self) {}

    /// The poller has found no work for a while (`PARK_AFTER`) while the reactor stays busy
    /// with others: it may stop being polled. True if it armed a completion on the reactor's
    /// ring that will bring it back (e.g. a read of its kick eventfd) and nothing else of
    /// its own needs polling; it is then skipped by every pass until a completion for it
    /// arrives. Default: always polled.
    fn park(&mut self, _ctx: &mut Ctx<'_>) -> bool {
        false
    }

    /// Fds whose readability means work for this poller, watched while the reactor sleeps.
    fn wake_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Stop taking new work; in-flight work completes. The reactor retires the poller once
    /// `drained` says so.
    fn stop(&mut self, ctx: &mut Ctx<'_>);

    fn drained(&self) -> bool;

    /// The poller has nothing left to do and may leave the reactor without being stopped
    /// (a backend connection whose last channel closed).
    fn done(&self) -> bool {
        false
    }

    /// For logs: what this poller serves.
    fn describe(&self) -> String;
}
