//! Telling the driver that used buffers are waiting (the "call"). A front end only says that
//! it wants to notify; the notifier signals at most once per reactor pass.
//!
//! A vhost-user frontend's call fd is an eventfd it shares with us, and it can make a
//! `write()` to it block: fill the counter to its maximum and clear O_NONBLOCK, which lives
//! in the file description we share (and cannot be reopened: anon inodes refuse it). Writing
//! through io_uring does not help cheaply either: eventfds have no non-blocking write path,
//! so io_uring hands every write on a blocking eventfd to a kernel worker (tens of
//! microseconds; libblkio's call fds are blocking).
//!
//! The kernel itself never blocks when it signals an eventfd (`eventfd_signal` saturates the
//! counter). So each call fd is registered as the completion eventfd of a tiny io_uring of
//! its own (a `SignalRing`), and a signal is a completion posted to that ring: a NOP on it
//! (one system call, as cheap as the write it replaces), or, when the reactor submits to its
//! own ring in this pass anyway, an IORING_OP_MSG_RING from the reactor's ring (no system
//! call of its own). Neither can block, whatever the frontend does to its eventfd.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsFd, AsRawFd};
use std::sync::OnceLock;

use io_uring::{opcode, types, IoUring, Probe};

use crate::engine::eventfd::is_eventfd;
use crate::engine::poller::BACKGROUND;
use crate::engine::Ctx;

/// Tag of the MSG_RING operations on the reactor's ring (background: never waited for).
/// Request tags are head indices, below 2^16.
pub const TAG_SIGNAL: u64 = BACKGROUND | 0x1_0000;

pub trait Notifier {
    /// Used buffers were published; signal the driver at the end of the pass.
    fn notify(&mut self);

    /// End of the reactor pass: send the wanted signal. Returns true if one went out.
    fn flush(&mut self, ctx: &mut Ctx<'_>) -> bool;

    /// A completion for one of this notifier's operations on the reactor's ring.
    fn complete(&mut self, tag: u64, result: i32);

    /// No operation of this notifier is outstanding on the reactor's ring.
    fn idle(&self) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum CallFdError {
    #[error("the call fd is not an eventfd")]
    NotEventFd,
    #[error("cannot set up signalling of the call fd: {0}")]
    Ring(io::Error),
}

/// Whether the kernel has IORING_OP_MSG_RING (5.18+), probed once.
fn msg_ring_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let Ok(ring) = IoUring::new(2) else {
            return false;
        };
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::MsgRingData::CODE)
    })
}

/// A frontend's call eventfd, signalled by the kernel through a tiny io_uring of its own.
pub struct SignalRing {
    ring: IoUring,
}

impl SignalRing {
    /// Checks that `call` is an eventfd and registers it. The ring keeps its own reference
    /// to the eventfd; `call` may be closed afterwards.
    pub fn new(call: &File) -> Result<SignalRing, CallFdError> {
        if !is_eventfd(call.as_fd()) {
            return Err(CallFdError::NotEventFd);
        }
        // Probe here, on a control thread: reactors may not create rings.
        msg_ring_supported();
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(4)
            .map_err(CallFdError::Ring)?;
        ring.submitter()
            .register_eventfd(call.as_raw_fd())
            .map_err(CallFdError::Ring)?;
        crate::sandbox::uring::restrict_signal_ring(&ring).map_err(CallFdError::Ring)?;
        Ok(SignalRing { ring })
    }

    /// Signals at once: a NOP completes inline and its completion signals the eventfd.
    fn signal_now(&mut self) -> io::Result<()> {
        let nop = opcode::Nop::new().build();
        // SAFETY: a NOP points to no memory.
        if unsafe { self.ring.submission().push(&nop) }.is_err() {
            self.drain();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&nop) }
                .map_err(|_| io::Error::other("signal ring full"))?;
        }
        self.ring.submit()?;
        self.drain();
        Ok(())
    }

    /// Drops the completions that did the signalling (memory only, no system call).
    fn drain(&mut self) {
        self.ring.completion().for_each(drop);
    }
}

/// Signals a call eventfd through its `SignalRing`. Without one (a driver that polls),
/// signals go nowhere.
pub struct EventFdNotifier {
    signal: Option<SignalRing>,
    wanted: bool,
    /// MSG_RING operations on the reactor's ring whose completion was not reaped yet.
    outstanding: u32,
    /// A MSG_RING failed: signal directly next time.
    direct: bool,
    failures: u64,
}

impl EventFdNotifier {
    pub fn new(signal: Option<SignalRing>) -> EventFdNotifier {
        EventFdNotifier {
            signal,
            wanted: false,
            outstanding: 0,
            direct: false,
            failures: 0,
        }
    }

    /// SET_VRING_CALL on a running queue: the new fd gets a signal, so whatever the old one
    /// covered reaches the driver.
    pub fn set_signal(&mut self, signal: Option<SignalRing>) {
        self.signal = signal;
        self.wanted = true;
    }

    /// Signals that could not be sent.
    #[cfg(test)]
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

impl Notifier for EventFdNotifier {
    fn notify(&mut self) {
        self.wanted = true;
    }

    fn flush(&mut self, ctx: &mut Ctx<'_>) -> bool {
        if !self.wanted {
            return false;
        }
        self.wanted = false;
        let Some(signal) = self.signal.as_mut() else {
            return false;
        };
        // The reactor enters the kernel for this pass anyway: ride along.
        if ctx.ring.pending() > 0 && !self.direct && msg_ring_supported() {
            signal.drain();
            let sqe = opcode::MsgRingData::new(types::Fd(signal.ring.as_raw_fd()), 0, 0, None)
                .build()
                .user_data(ctx.user_data(TAG_SIGNAL));
            // SAFETY: MSG_RING points to no memory; the kernel holds its own reference to
            // the target ring from submission on.
            if unsafe { ctx.ring.push(&sqe) }.is_ok() {
                self.outstanding += 1;
                return true;
            }
        }
        self.direct = false;
        match signal.signal_now() {
            Ok(()) => true,
            Err(_) => {
                self.failures += 1;
                false
            }
        }
    }

    fn complete(&mut self, tag: u64, result: i32) {
        if tag == TAG_SIGNAL {
            self.outstanding = self.outstanding.saturating_sub(1);
            if result < 0 {
                // Not delivered: signal again at the end of the next pass, directly.
                self.failures += 1;
                self.wanted = true;
                self.direct = true;
            }
        }
    }

    fn idle(&self) -> bool {
        self.outstanding == 0
    }
}
