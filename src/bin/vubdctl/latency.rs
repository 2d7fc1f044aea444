//! Latency from vubd's log2 histograms: mean from the exact sum, percentiles estimated as
//! the upper bound of the bucket that holds them (all the histogram can tell).

use std::collections::BTreeMap;

use serde::Deserialize;

/// One op's histogram as `iostat` sends it: only non-empty buckets.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WireHistogram {
    pub sum_ns: u64,
    pub buckets: Vec<WireBucket>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WireBucket {
    /// Requests faster than this; null for the last, unbounded bucket.
    pub le_ns: Option<u64>,
    pub count: u64,
}

/// Where a percentile falls: below a bound, or in the unbounded bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bound {
    Below(u64),
    Unbounded,
}

/// Several histograms summed (e.g. every op of a device), or the difference of two samples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    sum_ns: u64,
    buckets: BTreeMap<Bound, u64>,
}

impl Latency {
    pub fn add(&mut self, h: &WireHistogram) {
        self.sum_ns = self.sum_ns.wrapping_add(h.sum_ns);
        for b in &h.buckets {
            let bound = b.le_ns.map_or(Bound::Unbounded, Bound::Below);
            *self.buckets.entry(bound).or_default() += b.count;
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets.values().sum()
    }

    /// What was recorded after `base` (an earlier sample of the same counters).
    pub fn since(&self, base: &Latency) -> Latency {
        let buckets = self
            .buckets
            .iter()
            .map(|(&b, &n)| {
                (
                    b,
                    n.saturating_sub(base.buckets.get(&b).copied().unwrap_or(0)),
                )
            })
            .filter(|&(_, n)| n > 0)
            .collect();
        Latency {
            sum_ns: self.sum_ns.saturating_sub(base.sum_ns),
            buckets,
        }
    }

    pub fn mean_ns(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_ns as f64 / n as f64)
    }

    /// The bucket bound below which at least `q` (0..=1) of the requests completed.
    pub fn percentile(&self, q: f64) -> Option<Bound> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (&bound, &count) in &self.buckets {
            seen += count;
            if seen >= want {
                return Some(bound);
            }
        }
        self.buckets.keys().next_back().copied()
    }
}

/// A table cell: "-" without requests (or with histograms turned off in vubd).
pub fn mean_cell(l: &Latency) -> String {
    l.mean_ns().map_or("-".into(), crate::table::nanos)
}

pub fn percentile_cell(l: &Latency, q: f64) -> String {
    match l.percentile(q) {
        None => "-".into(),
        Some(Bound::Below(ns)) => crate::table::nanos(ns as f64),
        Some(Bound::Unbounded) => "+Inf".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(sum_ns: u64, buckets: &[(Option<u64>, u64)]) -> WireHistogram {
        WireHistogram {
            sum_ns,
            buckets: buckets
                .iter()
                .map(|&(le_ns, count)| WireBucket { le_ns, count })
                .collect(),
        }
    }

    #[test]
    fn percentiles_are_bucket_bounds() {
        let mut l = Latency::default();
        l.add(&hist(0, &[(Some(1024), 50), (Some(4096), 49)]));
        l.add(&hist(100_000, &[(None, 1), (Some(1024), 0)]));
        assert_eq!(l.count(), 100);
        assert_eq!(l.percentile(0.5), Some(Bound::Below(1024)));
        assert_eq!(l.percentile(0.51), Some(Bound::Below(4096)));
        assert_eq!(l.percentile(0.99), Some(Bound::Below(4096)));
        assert_eq!(l.percentile(1.0), Some(Bound::Unbounded));
        assert_eq!(l.mean_ns(), Some(1000.0));
        assert_eq!(percentile_cell(&l, 0.5), "1.0us");
        assert_eq!(percentile_cell(&Latency::default(), 0.5), "-");
    }

    #[test]
    fn differences() {
        let mut a = Latency::default();
        a.add(&hist(300, &[(Some(128), 2)]));
        let mut b = a.clone();
        b.add(&hist(1000, &[(Some(2048), 1)]));
        let d = b.since(&a);
        assert_eq!(d.count(), 1);
        assert_eq!(d.mean_ns(), Some(1000.0));
        assert_eq!(d.percentile(0.5), Some(Bound::Below(2048)));
    }
}
