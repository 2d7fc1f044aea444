//! What an adaptive reactor does when nothing is left to do but wait for io_uring
//! completions: spin (yielding the CPU on each turn) or sleep until one arrives.
//!
//! The reactor learns how long its waits last (an exponentially weighted mean, from going
//! idle to the next work, sleep included) and spins only through waits it expects to be
//! short. A page-cache read that io_uring hands to a worker comes back in 5-10 µs: sleeping
//! costs more than that (an `epoll_wait`, the kernel's eventfd signal, a read and the
//! scheduler's latency; on a VM, a halt and a wake-up interrupt too), so these are spun. A
//! device wait is slept: an O_DIRECT 4 KiB read on this project's VM disk takes ~37 µs,
//! and at QD1 sleeping through it took the server's CPU per request from 40-42 to 31-32 µs
//! (0.76x) for 0.85x the IOPS; qemu-storage-daemon's best configuration sleeps there too,
//! which is what makes a spinning server cost 1.5x its CPU per request (`tuning/ab.sh`,
//! `tuning/compare.sh` cells `disk/*/qd1`). Waits longer than the break-even below are
//! slept at once; the idle spin still caps the spin of short ones.
//!
//! Spinning must yield, though: a read that cannot be done without blocking (tmpfs) is
//! punted to an io-wq worker, which the kernel may wake on this very CPU; a reactor that
//! spins without yielding keeps it off the CPU until it sleeps (a QD1 p99 of 120 µs instead
//! of 8).

/// Expected waits longer than this are slept through at once: above it, a sleep and its
/// wake-up cost less CPU than the spin (see above), and the wake-up latency is a small
/// part of the wait.
pub const SLEEP_WAITS_OVER: std::time::Duration = std::time::Duration::from_micros(20);

/// Weight of a new sample: 1/8.
const SHIFT: u32 = 3;

#[derive(Debug)]
pub struct IoSpin {
    /// Mean wait, in TSC ticks.
    mean: u64,
    /// The longest spin (the reactor's idle spin).
    max: u64,
    /// Waits with a longer mean are slept at once (`SLEEP_WAITS_OVER`, in ticks).
    far: u64,
    waiting_since: Option<u64>,
}

impl IoSpin {
    /// `max`: the longest spin; `far`: a mean wait above which the reactor sleeps at once.
    pub fn new(max: u64, far: u64) -> IoSpin {
        IoSpin {
            mean: 0,
            max,
            far,
            waiting_since: None,
        }
    }

    pub fn set_max(&mut self, max: u64) {
        self.max = max;
    }

    /// The reactor has found nothing to do since `start` with I/O in flight.
    pub fn waiting(&mut self, start: u64) {
        self.waiting_since.get_or_insert(start);
    }

    /// A pass found work at `now`: a wait, if one was going on, ended.
    pub fn worked(&mut self, now: u64) {
        if let Some(t) = self.waiting_since.take() {
            let sample = now.wrapping_sub(t);
            self.mean = self.mean - (self.mean >> SHIFT) + (sample >> SHIFT);
        }
    }

    /// Ticks to spin before sleeping.
    pub fn budget(&self) -> u64 {
        if self.mean > self.far.min(self.max) {
            0
        } else {
            self.max
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learn(s: &mut IoSpin, wait: u64, times: usize) {
        let mut t = 1_000_000;
        for _ in 0..times {
            s.waiting(t);
            s.waiting(t + 1); // a later pass of the same wait changes nothing
            t += wait;
            s.worked(t);
            t += 100;
        }
    }

    #[test]
    fn short_waits_are_spun_through_long_ones_are_slept() {
        let mut s = IoSpin::new(1000, 400);
        assert_eq!(s.budget(), 1000, "nothing learned yet: spin");
        learn(&mut s, 200, 100);
        assert_eq!(s.budget(), 1000);
        learn(&mut s, 600, 100);
        assert_eq!(
            s.budget(),
            0,
            "waits longer than the break-even, though shorter than the idle spin: sleep"
        );
        learn(&mut s, 10, 200);
        assert_eq!(s.budget(), 1000, "short again: back to spinning");
    }

    #[test]
    fn a_short_idle_spin_caps_what_is_spun() {
        let mut s = IoSpin::new(100, 400);
        learn(&mut s, 200, 100);
        assert_eq!(
            s.budget(),
            0,
            "waits longer than the whole idle spin: sleep at once"
        );
    }

    #[test]
    fn work_without_a_wait_teaches_nothing() {
        let mut s = IoSpin::new(1000, 400);
        s.worked(123);
        learn(&mut s, 5000, 100);
        s.worked(1);
        assert_eq!(s.budget(), 0);
    }
}
