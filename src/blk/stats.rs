//! Per-queue I/O statistics: plain counters owned by the queue's poller (no atomics on the
//! request path), copied out by message. Latency histograms have log2 buckets of
//! nanoseconds, as SPDK's bdev histograms.

use super::{BlockError, Op};

/// Latency buckets: bucket `i` counts requests that took less than 2^i ns (the last one
/// everything slower, ~69 s and up).
pub const BUCKETS: usize = 37;

/// Error statuses counted separately: I/O error, unsupported.
pub const STATUS_NAMES: [&str; 2] = ["ioerr", "unsupp"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; BUCKETS],
    pub sum_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; BUCKETS],
            sum_ns: 0,
        }
    }
}

impl Histogram {
    #[inline]
    pub fn record(&mut self, ns: u64) {
        let i = (64 - ns.leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[i] += 1;
        self.sum_ns = self.sum_ns.wrapping_add(ns);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Upper bound of bucket `i` in nanoseconds (`None` for the last, unbounded one).
    pub fn bound_ns(i: usize) -> Option<u64> {
        (i + 1 < BUCKETS).then(|| 1u64 << i)
    }

    fn add(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.wrapping_add(o.sum_ns);
    }

    fn sub(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a = a.saturating_sub(*b);
        }
        self.sum_ns = self.sum_ns.saturating_sub(o.sum_ns);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    pub ops: [u64; Op::COUNT],
    pub bytes: [u64; Op::COUNT],
    /// errors[op][0] I/O errors, errors[op][1] unsupported.
    pub errors: [[u64; 2]; Op::COUNT],
    /// Requests that failed before they had an op (malformed, GET_ID errors).
    pub other_errors: u64,
    pub latency: [Histogram; Op::COUNT],
    /// Driver notifications sent.
    pub notifications: u64,
}

impl IoStats {
    /// A completed request of `op`, `len` bytes, that took `ns` (when timed).
    #[inline]
    pub fn complete(&mut self, op: Op, len: u64, ns: Option<u64>, result: &Result<(), BlockError>) {
        let i = op.index();
        self.ops[i] += 1;
        match result {
            Ok(()) => {
                if op.has_data() {
                    self.bytes[i] += len;
                }
            }
            Err(e) => self.errors[i][usize::from(e.status() != super::error::status::IOERR)] += 1,
        }
        if let Some(ns) = ns {
            self.latency[i].record(ns);
        }
    }

    pub fn requests(&self) -> u64 {
        self.ops.iter().sum()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.iter().flatten().sum::<u64>() + self.other_errors
    }

    pub fn add(&mut self, o: &IoStats) {
        for i in 0..Op::COUNT {
            self.ops[i] += o.ops[i];
            self.bytes[i] += o.bytes[i];
            self.errors[i][0] += o.errors[i][0];
            self.errors[i][1] += o.errors[i][1];
            self.latency[i].add(&o.latency[i]);
        }
        self.other_errors += o.other_errors;
        self.notifications += o.notifications;
    }

    /// What happened since `base` was taken (counters only grow; saturating for safety).
    pub fn since(&self, base: &IoStats) -> IoStats {
        let mut d = self.clone();
        for i in 0..Op::COUNT {
            d.ops[i] = d.ops[i].saturating_sub(base.ops[i]);
            d.bytes[i] = d.bytes[i].saturating_sub(base.bytes[i]);
            d.errors[i][0] = d.errors[i][0].saturating_sub(base.errors[i][0]);
            d.errors[i][1] = d.errors[i][1].saturating_sub(base.errors[i][1]);
            d.latency[i].sub(&base.latency[i]);
        }
        d.other_errors = d.other_errors.saturating_sub(base.other_errors);
        d.notifications = d.notifications.saturating_sub(base.notifications);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_log2_ns() {
        let mut h = Histogram::default();
        h.record(0);
        h.record(1);
        h.record(1000); // 2^9 < 1000 < 2^10
        h.record(u64::MAX);
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[1], 1);
        assert_eq!(h.buckets[10], 1);
        assert_eq!(h.buckets[BUCKETS - 1], 1);
        assert_eq!(Histogram::bound_ns(10), Some(1024));
        assert_eq!(h.count(), 4);
    }
}
