//! The latency histogram: log-linear buckets of nanoseconds, so its size
//! stays fixed however many deliveries it counts. Two histograms merge
//! bucket by bucket, so the quantiles of the union of several processes'
//! samples are exact to the bucket, never averages of their quantiles.

use serde::{Deserialize, Serialize};

/// Bits of sub-bucket precision: 128 buckets per power of two (0.8%).
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;

/// A log-linear histogram of nanoseconds: fixed size, whatever the count.
/// It travels between a worker process and the load tester as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Histogram {
    counts: Vec<u64>,
    pub(super) count: u64,
    sum: u128,
    pub(super) max: u64,
}

impl Histogram {
    pub(super) fn new() -> Self {
        Histogram {
            counts: vec![0; Self::index(u64::MAX) + 1],
            count: 0,
            sum: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let shift = (63 - v.leading_zeros()) - SUB_BITS;
        (shift as u64 * SUB + (v >> shift)) as usize
    }

    /// The middle of bucket `i`.
    fn value_at(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let shift = i / SUB - 1;
        let mantissa = i - shift * SUB;
        (mantissa << shift) + (1 << shift) / 2
    }

    pub(super) fn record(&mut self, v: u64) {
        self.record_n(v, 1);
    }

    /// Records `n` samples of `v`.
    pub(super) fn record_n(&mut self, v: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.counts[Self::index(v)] += n;
        self.count += n;
        self.sum += u128::from(v) * u128::from(n);
        self.max = self.max.max(v);
    }

    /// The value below which a fraction `q` of the samples fall.
    pub(super) fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::value_at(i).min(self.max));
            }
        }
        Some(self.max)
    }

    /// Adds every sample of `other`; false (and nothing added) when
    /// `other` does not have this histogram's buckets (a bad message).
    pub(super) fn merge(&mut self, other: &Histogram) -> bool {
        if other.counts.len() != self.counts.len() {
            return false;
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
        true
    }

    pub(super) fn mean(&self) -> Option<u64> {
        (self.count > 0).then(|| (self.sum / u128::from(self.count)) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_within_a_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [
            (0.5, 50_000_000.0),
            (0.9, 90_000_000.0),
            (0.99, 99_000_000.0),
        ] {
            let got = h.quantile(q).expect("samples") as f64;
            assert!((got - want).abs() / want < 0.01, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.max, 100_000_000);
        assert_eq!(Histogram::index(5), 5);
        // Two halves merged are the whole, through JSON as between processes.
        let (mut low, mut high) = (Histogram::new(), Histogram::new());
        for v in 1..=100_000u64 {
            if v % 2 == 0 { &mut low } else { &mut high }.record(v * 1000);
        }
        let high: Histogram =
            serde_json::from_str(&serde_json::to_string(&high).expect("json")).expect("back");
        assert!(low.merge(&high));
        assert_eq!((low.count, low.max), (h.count, h.max));
        for q in [0.5, 0.9, 0.99] {
            assert_eq!(low.quantile(q), h.quantile(q), "q{q}");
        }
        let mut short = Histogram::new();
        short.counts.truncate(3);
        assert!(!low.merge(&short));
        for v in [0, 1, 127, 128, 255, 256, 1000, 123_456_789, u64::MAX / 3] {
            let back = Histogram::value_at(Histogram::index(v));
            assert!(
                back.abs_diff(v) as f64 <= v as f64 / 100.0 + 1.0,
                "{v} -> {back}"
            );
        }
    }
}
