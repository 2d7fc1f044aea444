//! Test and bench support: one poller on a ring of the calling thread, run pass by pass the
//! way a reactor runs it, without a reactor thread.

use std::time::{Duration, Instant};

use super::poller::split_user_data;
use super::uring::Uring;
use super::{Ctx, Poller};

pub struct Harness<P: Poller> {
    pub ring: Uring,
    pub poller: P,
}

impl<P: Poller> Harness<P> {
    pub fn new(make: impl FnOnce(&mut Ctx<'_>) -> P) -> Harness<P> {
        let mut ring = Uring::new().expect("io_uring");
        let poller = make(&mut Ctx::new(&mut ring, 0, 0));
        Harness { ring, poller }
    }

    /// One reactor pass: completions, poll, end of pass, submit. Returns the poll's work.
    pub fn pass(&mut self) -> u32 {
        self.reap();
        let work = self.poller.poll(&mut Ctx::new(&mut self.ring, 0, 0));
        self.poller.end_pass(&mut Ctx::new(&mut self.ring, 0, 0));
        self.ring.submit().expect("io_uring submit");
        work
    }

    /// Hands every available completion to the poller; returns how many.
    pub fn reap(&mut self) -> u32 {
        let mut buf = [(0u64, 0i32); 64];
        let mut total = 0;
        loop {
            let n = self.ring.reap_into(&mut buf);
            for &(ud, res) in &buf[..n] {
                let (_, tag) = split_user_data(ud);
                self.poller
                    .complete(&mut Ctx::new(&mut self.ring, 0, 0), tag, res);
            }
            total += n as u32;
            if n < buf.len() {
                return total;
            }
        }
    }

    /// Runs passes until no request is in the kernel (at most 10 s).
    pub fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.pass();
            if self.ring.in_flight() == 0 && self.ring.pending() == 0 {
                self.pass();
                return;
            }
            assert!(
                Instant::now() < deadline,
                "requests did not complete in 10 s"
            );
            std::thread::yield_now();
        }
    }
}
