//! Test and bench support: a poller (and whatever pollers it spawns, such as a backend's
//! connection) on a ring of the calling thread, run pass by pass the way a reactor runs them,
//! without a reactor thread.

use std::time::{Duration, Instant};

use super::poller::{split_user_data, Spawned};
use super::uring::Uring;
use super::{Ctx, Poller};

pub struct Harness<P: Poller> {
    pub ring: Uring,
    /// The poller under test, in slot 0.
    pub poller: P,
    /// Pollers it spawned, in slots 1 and up.
    others: Vec<Option<Box<dyn Poller>>>,
    spawned: Spawned,
}

impl<P: Poller> Harness<P> {
    pub fn new(make: impl FnOnce(&mut Ctx<'_>) -> P) -> Harness<P> {
        let mut ring = Uring::new().expect("io_uring");
        let mut spawned = Spawned::new();
        let poller = make(&mut Ctx::with(&mut ring, 0, 0, &mut spawned, None));
        let mut h = Harness {
            ring,
            poller,
            others: Vec::new(),
            spawned,
        };
        h.add_spawned();
        h
    }

    fn add_spawned(&mut self) {
        for (_, p) in self.spawned.drain(..) {
            self.others.push(Some(p));
        }
    }

    /// Runs `f` on the poller in `slot` with its context.
    fn with_slot(&mut self, slot: usize, f: impl FnOnce(&mut dyn Poller, &mut Ctx<'_>)) {
        let mut ctx = Ctx::with(&mut self.ring, slot, 0, &mut self.spawned, None);
        if slot == 0 {
            f(&mut self.poller, &mut ctx);
        } else if let Some(Some(p)) = self.others.get_mut(slot - 1) {
            f(p.as_mut(), &mut ctx);
        }
    }

    /// One reactor pass: completions, poll, end of pass, submit. Returns the poll's work
    /// of the poller under test.
    pub fn pass(&mut self) -> u32 {
        self.reap();
        let mut work = 0;
        self.with_slot(0, |p, ctx| work = p.poll(ctx));
        for slot in 1..=self.others.len() {
            self.with_slot(slot, |p, ctx| {
                p.poll(ctx);
            });
        }
        for slot in 0..=self.others.len() {
            self.with_slot(slot, |p, ctx| p.end_pass(ctx));
        }
        self.ring.submit().expect("io_uring submit");
        self.add_spawned();
        for o in self.others.iter_mut() {
            if o.as_ref().is_some_and(|p| p.done()) {
                *o = None;
            }
        }
        work
    }

    /// Hands every available completion to its poller; returns how many.
    pub fn reap(&mut self) -> u32 {
        let mut buf = [(0u64, 0i32); 64];
        let mut total = 0;
        loop {
            let n = self.ring.reap_into(&mut buf);
            for &(ud, res) in &buf[..n] {
                let (slot, tag) = split_user_data(ud);
                self.with_slot(slot, |p, ctx| p.complete(ctx, tag, res));
            }
            total += n as u32;
            if n < buf.len() {
                self.add_spawned();
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

    /// Runs passes until `done(poller)` (at most `timeout`); false on timeout.
    pub fn run_until(&mut self, timeout: Duration, mut done: impl FnMut(&P) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            self.pass();
            if done(&self.poller) {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }
}
