//! What an adaptive reactor does when nothing is left to do but wait for io_uring
//! completions: spin (yielding the CPU on each turn) or sleep until one arrives.
//!
//! A sleep and its wake-up cost CPU (an `epoll_wait`, the scheduler; on a VM, a halt and a
//! wake-up interrupt too) and add their latency to the request. A page-cache read that
//! io_uring hands to a worker comes back in 5-10 µs: it is spun. An O_DIRECT 4 KiB read on
//! this project's VM disk takes ~37 µs: it is slept through, as qemu-storage-daemon's best
//! configuration does. At QD1 on that disk with a polling client, sleeping took the
//! server's CPU per request from 40-42 to 31-32 µs (0.76x) for 0.85x the IOPS; spinning had
//! cost 1.3-1.8x QSD's CPU per request (`tuning/ab.sh`, `tuning/compare.sh` cells
//! `disk/*/qd1`).
//!
//! The reactor learns how long its waits last: an exponentially weighted mean, from going
//! idle to the next work. Waits whose mean is longer than the break-even below are slept
//! at once; the idle spin caps the spin of short ones. A wait slept at once teaches
//! nothing: its length then includes the wake-up (tens of µs on a VM), which would keep a
//! device that became fast looking slow for good. Instead every `PROBE_EVERY`th long wait
//! is spun, and those measure the device.
//!
//! Spinning must yield, though: a read that cannot be done without blocking (tmpfs) is
//! punted to an io-wq worker, which the kernel may wake on this very CPU; a reactor that
//! spins without yielding keeps it off the CPU until it sleeps (a QD1 p99 of 120 µs instead
//! of 8).
//!
//! Only I/O waits are learned. The wait for a frontend's next request is always spun for
//! the idle spin: learned the same way, a client that sleeps between requests made the
//! reactor sleep too, and a sleeping reactor makes that client's next request wait for its
//! wake-up (null QD1 with an eventfd client fell to 0.09x the IOPS).

/// Expected waits longer than this are slept through at once: above it, a sleep and its
/// wake-up cost less CPU than the spin (see above), and the wake-up latency is a small
/// part of the wait.
pub const SLEEP_WAITS_OVER: std::time::Duration = std::time::Duration::from_micros(20);

/// While waits are long, one in this many is spun anyway, to measure it. A probe spins
/// through a whole device wait: one in 16 cost 7 % more CPU per request at QD1 on the VM
/// disk; one in 64 costs under 2 %, and a device that got fast is spun again within a few
/// hundred requests.
const PROBE_EVERY: u32 = 64;

/// Weight of a new sample: 1/8.
const SHIFT: u32 = 3;

#[derive(Debug)]
pub struct Spin {
    /// Mean wait, in TSC ticks.
    mean: u64,
    /// The longest spin (the reactor's idle spin).
    max: u64,
    /// Waits with a longer mean are slept at once (`SLEEP_WAITS_OVER`, in ticks).
    far: u64,
    waiting_since: Option<u64>,
    /// What the current wait may spin, chosen when it began.
    budget: u64,
    /// Long waits since the last probe.
    skipped: u32,
}

impl Spin {
    /// `max`: the longest spin; `far`: a mean wait above which the reactor sleeps at once.
    pub fn new(max: u64, far: u64) -> Spin {
        Spin {
            mean: 0,
            max,
            far,
            waiting_since: None,
            budget: max,
            skipped: 0,
        }
    }

    pub fn set_max(&mut self, max: u64) {
        self.max = max;
    }

    /// The reactor has found nothing to do since `start`, with I/O in flight. The first call
    /// of a wait decides how long it may spin.
    pub fn waiting(&mut self, start: u64) {
        if self.waiting_since.is_some() {
            return;
        }
        self.waiting_since = Some(start);
        self.budget = if self.mean <= self.far.min(self.max) {
            self.max
        } else {
            self.skipped += 1;
            if self.skipped >= PROBE_EVERY {
                self.skipped = 0;
                self.max
            } else {
                0
            }
        };
    }

    /// A pass found work at `now`: a wait, if one was going on, ended.
    pub fn worked(&mut self, now: u64) {
        let Some(t) = self.waiting_since.take() else {
            return;
        };
        if self.budget == 0 {
            return; // slept at once: see the module's comment
        }
        // A stall of seconds says no more than "long": capped, so that a device that is
        // fast again is spun after a few probes rather than hundreds.
        let sample = now.wrapping_sub(t).min(self.far.saturating_mul(4));
        self.mean = self.mean - (self.mean >> SHIFT) + (sample >> SHIFT);
    }

    /// Ticks to spin before sleeping, in the current wait.
    pub fn budget(&self) -> u64 {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `times` waits; each lasts `spun` ticks if it is spun and `slept` if it is slept at
    /// once (which adds the wake-up).
    fn learn2(s: &mut Spin, spun: u64, slept: u64, times: usize) {
        let mut t = 1_000_000;
        for _ in 0..times {
            s.waiting(t);
            s.waiting(t + 1); // a later pass of the same wait changes nothing
            t += if s.budget() > 0 { spun } else { slept };
            s.worked(t);
            t += 100;
        }
    }

    fn learn(s: &mut Spin, wait: u64, times: usize) {
        learn2(s, wait, wait, times);
    }

    #[test]
    fn short_waits_are_spun_through_long_ones_are_slept() {
        let mut s = Spin::new(1000, 400);
        learn(&mut s, 200, 100);
        assert_eq!(s.budget(), 1000, "short waits: spin");
        learn(&mut s, 600, 100);
        s.waiting(0);
        assert_eq!(
            s.budget(),
            0,
            "waits longer than the break-even, though shorter than the idle spin: sleep"
        );
        s.worked(1);
        learn(&mut s, 10, 800);
        s.waiting(0);
        assert_eq!(s.budget(), 1000, "short again: back to spinning");
    }

    #[test]
    fn long_waits_are_probed_one_in_sixty_four() {
        let mut s = Spin::new(1000, 400);
        learn(&mut s, 600, 100);
        let mut spun = 0;
        for i in 0..256 {
            s.waiting(i * 10_000);
            spun += usize::from(s.budget() > 0);
            s.worked(i * 10_000 + 600);
        }
        assert_eq!(spun, 4);
    }

    #[test]
    fn a_device_that_got_fast_is_spun_again_though_its_slept_waits_look_long() {
        let mut s = Spin::new(1000, 400);
        learn(&mut s, 600, 100);
        // Now 10 ticks when spun; slept waits measure the wake-up (900).
        learn2(&mut s, 10, 900, 800);
        s.waiting(0);
        assert_eq!(s.budget(), 1000);
    }

    #[test]
    fn a_short_idle_spin_caps_what_is_spun() {
        let mut s = Spin::new(100, 400);
        learn(&mut s, 200, 100);
        s.waiting(0);
        assert_eq!(
            s.budget(),
            0,
            "waits longer than the whole idle spin: sleep"
        );
    }

    #[test]
    fn a_stall_is_forgotten_within_a_few_probes() {
        let mut s = Spin::new(1000, 400);
        learn(&mut s, 10_000_000_000, 20);
        learn(&mut s, 10, 400);
        s.waiting(0);
        assert_eq!(s.budget(), 1000);
    }

    #[test]
    fn work_without_a_wait_teaches_nothing() {
        let mut s = Spin::new(1000, 400);
        s.worked(123);
        learn(&mut s, 5000, 100);
        s.worked(1);
        s.waiting(0);
        assert_eq!(s.budget(), 0);
    }
}
