//! The reactor's io_uring: one per reactor, fed by every poller the reactor owns, submitted
//! once per loop iteration. A sleeping reactor learns of completions by polling the ring's
//! own fd (see `fd`).

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::{squeue, IoUring};

use super::poller::BACKGROUND;

pub const RING_ENTRIES: u32 = 256;

pub struct Uring {
    ring: IoUring,
    /// SQEs pushed but not yet submitted.
    pending: u32,
    /// Requests pushed whose CQE has not been reaped.
    in_flight: u32,
    /// Background operations (notifications) pushed whose CQE has not been reaped.
    background: u32,
    /// Never more operations outstanding than the CQ holds: back-pressure, not overflow.
    limit: u32,
}

impl Uring {
    pub fn new() -> io::Result<Uring> {
        let ring = IoUring::builder()
            // Room for many operations outstanding at once (each parked queue holds a read of
            // its kick eventfd, each ublk queue 64 fetches): 1000 idle devices on a reactor
            // must all be able to park. CQ entries are 16 bytes.
            .setup_cqsize(RING_ENTRIES * 8)
            .setup_r_disabled()
            .build(RING_ENTRIES)?;
        // Only the operations vubd issues, from now on (this also enables the ring).
        crate::sandbox::uring::restrict_reactor_ring(&ring)?;
        let limit = ring.params().cq_entries();
        Ok(Uring {
            ring,
            pending: 0,
            in_flight: 0,
            background: 0,
            limit,
        })
    }

    /// The ring's fd, readable while completions wait: what a sleeping reactor watches.
    ///
    /// Not a registered eventfd, which would have to be enabled only around sleeps (an
    /// eventfd signal per completion costs a spinning reactor) and then races: the kernel
    /// stores the CQ tail and reads the eventfd-disabled flag without a barrier between,
    /// so a completion posted while the reactor enables the flag and looks at the CQ can go
    /// unsignalled, and a sleep needed a timeout to bound that. An hrtimer armed and
    /// cancelled per sleep cost ~6 µs of CPU and latency per request on a VM disk at QD1.
    /// The ring's poll wait queue is woken after every CQ commit behind a full barrier
    /// (`wq_has_sleeper`), so a completion the reactor missed before `epoll_wait` always
    /// wakes it; with no one waiting, that wake-up is a list append.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// How many more operations may be pushed before the CQ could overflow.
    pub fn room(&self) -> u32 {
        self.limit - self.in_flight - self.background
    }

    /// Requests the kernel has (or is about to get) whose completions the reactor waits for.
    /// Background operations are not counted: a frontend decides when they complete.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
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
        if sqe.get_user_data() & BACKGROUND != 0 {
            self.background += 1;
        } else {
            self.in_flight += 1;
        }
        Ok(())
    }

    /// One io_uring_enter for everything pushed since the last call.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(n) => {
                self.pending -= (n as u32).min(self.pending);
                Ok(())
            }
            // The kernel is short of resources or the CQ is busy: try again next iteration.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Hands every available completion to `f(user_data, result)`; returns how many.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) -> u32 {
        let mut buf = [(0u64, 0i32); 32];
        let mut total = 0;
        loop {
            let n = self.reap_into(&mut buf);
            for &(ud, res) in &buf[..n] {
                f(ud, res);
            }
            total += n as u32;
            if n < buf.len() {
                return total;
            }
        }
    }

    /// Fills `out` with up to its length of completions, `(user_data, result)`; returns how
    /// many. Unlike `reap`, nothing of the ring is borrowed while the caller handles them.
    pub fn reap_into(&mut self, out: &mut [(u64, i32)]) -> usize {
        let mut n = 0;
        for cqe in self.ring.completion().take(out.len()) {
            let ud = cqe.user_data();
            if ud & BACKGROUND != 0 {
                self.background = self.background.saturating_sub(1);
            } else {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            out[n] = (ud, cqe.result());
            n += 1;
        }
        n
    }

    /// Background operations not yet completed (a harness draining the ring waits for them).
    #[cfg(any(test, feature = "test-utils"))]
    pub fn background(&self) -> u32 {
        self.background
    }

    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{opcode, types};

    #[test]
    fn the_ring_refuses_operations_vubd_does_not_use() {
        let mut ring = Uring::new().unwrap();
        // openat through the ring would bypass seccomp; the restrictions refuse it.
        let sqe = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/etc/passwd".as_ptr())
            .build()
            .user_data(7);
        // SAFETY: the path is a static C string.
        unsafe { ring.push(&sqe) }.unwrap();
        ring.submit().unwrap();
        let mut got = Vec::new();
        for _ in 0..1000 {
            ring.reap(|ud, res| got.push((ud, res)));
            if !got.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got, vec![(7, -libc::EACCES)]);
    }
}
