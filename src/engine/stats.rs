//! Busy/idle accounting per reactor, SPDK style: each loop iteration's time goes to busy if
//! any poller found work, to idle otherwise. Time comes from the TSC (no syscall, ~20 cycles).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[inline]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86_64.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Ticks per second, measured once over a short sleep.
pub fn ticks_per_sec() -> u64 {
    static TPS: OnceLock<u64> = OnceLock::new();
    *TPS.get_or_init(|| {
        let (t0, i0) = (ticks(), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (t1, el) = (ticks(), i0.elapsed());
        ((t1.wrapping_sub(t0)) as f64 / el.as_secs_f64()).max(1.0) as u64
    })
}

pub fn duration_to_ticks(d: Duration) -> u64 {
    (d.as_secs_f64() * ticks_per_sec() as f64) as u64
}

pub fn ticks_to_duration(t: u64) -> Duration {
    Duration::from_secs_f64(t as f64 / ticks_per_sec() as f64)
}

/// One reactor's time and sleep accounting: plain counters, written only by the reactor and
/// copied out by message.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReactorStats {
    pub busy_ticks: u64,
    pub idle_ticks: u64,
    pub sleeps: u64,
    pub sleep_ticks: u64,
    /// Sleeps that ended because a wake-up fd fired (the rest timed out).
    pub wakeups: u64,
    /// Times a poller idle for `PARK_AFTER` stopped being polled.
    pub parks: u64,
}

impl ReactorStats {
    /// Share of awake time spent doing work, in percent.
    pub fn busy_percent(&self) -> f64 {
        let awake = self.busy_ticks + self.idle_ticks;
        if awake == 0 {
            0.0
        } else {
            100.0 * self.busy_ticks as f64 / awake as f64
        }
    }
}

/// Converts TSC ticks to nanoseconds with one multiply: `ns = ticks * mult >> 32`.
#[derive(Clone, Copy, Debug)]
pub struct TickScale {
    mult: u64,
}

impl TickScale {
    pub fn new() -> TickScale {
        TickScale {
            mult: ((1_000_000_000u128 << 32) / u128::from(ticks_per_sec())) as u64,
        }
    }

    #[inline]
    pub fn to_ns(self, ticks: u64) -> u64 {
        ((u128::from(ticks) * u128::from(self.mult)) >> 32) as u64
    }
}

impl Default for TickScale {
    fn default() -> Self {
        TickScale::new()
    }
}
