//! The reactor's io_uring: one per reactor, fed by every queue the reactor owns, submitted
//! once per loop iteration, with a registered eventfd that is only enabled while sleeping.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};

use io_uring::{squeue, IoUring};

pub const RING_ENTRIES: u32 = 256;

pub struct Uring {
    ring: IoUring,
    eventfd: File,
    /// SQEs pushed but not yet submitted.
    pending: u32,
    /// SQEs submitted whose CQE has not been reaped.
    in_flight: u32,
    /// Never more requests outstanding than the CQ holds: back-pressure, not overflow.
    limit: u32,
}

pub fn new_eventfd() -> io::Result<File> {
    // SAFETY: plain syscall; the returned fd is checked and then owned by the File.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh eventfd nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl Uring {
    pub fn new() -> io::Result<Uring> {
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .build(RING_ENTRIES)?;
        let eventfd = new_eventfd()?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let limit = ring.params().cq_entries();
        let u = Uring {
            ring,
            eventfd,
            pending: 0,
            in_flight: 0,
            limit,
        };
        u.disable_eventfd();
        Ok(u)
    }

    pub fn eventfd(&self) -> &File {
        &self.eventfd
    }

    /// How many more requests may be pushed before the CQ could overflow.
    pub fn room(&self) -> u32 {
        self.limit - self.in_flight - self.pending
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight + self.pending
    }

    /// SQEs pushed but not yet accepted by the kernel (a failed or partial submit).
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Queues one SQE. The caller checked `room()`; a full SQ is flushed first.
    ///
    /// # Safety
    /// Every buffer and iovec the entry points to must stay valid until its CQE is reaped.
    pub unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        // SAFETY: forwarded from the caller's contract.
        if unsafe { self.ring.submission().push(sqe) }.is_err() {
            self.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(sqe) }
                .map_err(|_| io::Error::other("submission queue full after submit"))?;
        }
        self.pending += 1;
        Ok(())
    }

    /// One io_uring_enter for everything pushed since the last call.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(n) => {
                let n = n as u32;
                self.pending -= n.min(self.pending);
                self.in_flight += n;
                Ok(())
            }
            // The kernel is short of resources or the CQ is busy: try again next iteration.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Hands every available completion to `f(user_data, result)`; returns how many.
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) -> u32 {
        let mut n = 0;
        for cqe in self.ring.completion() {
            f(cqe.user_data(), cqe.result());
            n += 1;
        }
        self.in_flight -= n.min(self.in_flight);
        n
    }

    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Before sleeping: completions posted from now on signal the eventfd. The fence orders
    /// the flag store before the caller's re-check of the CQ (a store-load pair, which x86
    /// may otherwise reorder).
    pub fn enable_eventfd(&self) {
        self.set_eventfd(true);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    pub fn disable_eventfd(&self) {
        self.set_eventfd(false);
    }

    fn set_eventfd(&self, on: bool) {
        // SAFETY: `completion_shared` must not alias a live `completion()`; none is alive here
        // (both callers run outside `reap`), and only the flags word is touched.
        let cq = unsafe { self.ring.completion_shared() };
        if on {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
    }
}
