//! What an adaptive reactor does when nothing is left to do but wait for io_uring
//! completions: spin (yielding the CPU on each turn) or sleep on the completion eventfd.
//!
//! Sleeping costs a wake-up per request: an `epoll_wait`, the kernel's eventfd signal, a
//! read, and the scheduler's latency, which at QD1 costs more CPU than spinning through a
//! device wait of tens of microseconds (measured on an O_DIRECT disk: 42 vs 37 µs of server
//! CPU per request, and 1.3x the IOPS spinning). Spinning must yield, though: a page-cache
//! read of a file that cannot read without blocking (tmpfs) is punted to an io-wq worker,
//! which the kernel may wake on this very CPU; a reactor that spins without yielding keeps
//! it off the CPU until it sleeps (a QD1 p99 of 120 µs instead of 8). Waits longer than the
//! idle spin itself (a slow network server, a device that is idle) are not spun at all: the
//! reactor learns how long its waits last (an exponentially weighted mean, measured from
//! going idle to the next work, sleep included) and sleeps at once when they are long.

/// Weight of a new sample: 1/8.
const SHIFT: u32 = 3;

#[derive(Debug)]
pub struct IoSpin {
    /// Mean wait, in TSC ticks.
    mean: u64,
    /// The longest spin (the reactor's idle spin).
    max: u64,
    waiting_since: Option<u64>,
}

impl IoSpin {
    pub fn new(max: u64) -> IoSpin {
        IoSpin {
            mean: 0,
            max,
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
        if self.mean > self.max {
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
        let mut s = IoSpin::new(1000);
        assert_eq!(s.budget(), 1000, "nothing learned yet: spin");
        learn(&mut s, 200, 100);
        assert_eq!(s.budget(), 1000);
        learn(&mut s, 5000, 100);
        assert_eq!(
            s.budget(),
            0,
            "waits longer than the idle spin: sleep at once"
        );
        learn(&mut s, 10, 200);
        assert_eq!(s.budget(), 1000, "short again: back to spinning");
    }

    #[test]
    fn work_without_a_wait_teaches_nothing() {
        let mut s = IoSpin::new(1000);
        s.worked(123);
        learn(&mut s, 5000, 100);
        s.worked(1);
        assert_eq!(s.budget(), 0);
    }
}
