//! Waiting before trying again: exponential backoff with jitter, so that
//! what failed together (a restart, a deploy, a database back up) does not
//! retry in lockstep. Used by the accept loop, the Redis reader, the
//! PostgreSQL listener (and its host order with `load_balance_hosts=random`),
//! and the `overload = "retry"` answer.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Random draws good enough to spread retries (xorshift64), seeded so that
/// processes and threads started together draw differently. No dependency.
#[derive(Debug, Clone)]
pub(crate) struct Jitter(u64);

impl Jitter {
    /// A fresh generator: `RandomState` carries random keys (different for
    /// each instance), and hashing the clock with them gives the seed.
    pub(crate) fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Jitter(RandomState::new().hash_one(nanos) | 1) // xorshift must not start at 0
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A time drawn from `min..=max`, to the millisecond.
    pub(crate) fn between(&mut self, min: Duration, max: Duration) -> Duration {
        let span = max.saturating_sub(min).as_millis() as u64;
        if span == 0 {
            return min;
        }
        min + Duration::from_millis(self.next() % (span + 1))
    }

    /// Puts `items` in random order (Fisher-Yates): the hosts and
    /// addresses of `load_balance_hosts=random`.
    #[cfg(feature = "postgres")]
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize; // at most i
            items.swap(i, j);
        }
    }
}

/// Exponential backoff: the delay doubles after each failure, from `min`
/// up to `max`; each wait is the delay less up to half of it, at random
/// ("equal jitter").
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    delay: Duration,
    jitter: Jitter,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            delay: min,
            jitter: Jitter::new(),
        }
    }

    /// The wait before the next try; the delay after it doubles.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let wait = self.jitter.between(self.delay / 2, self.delay);
        self.delay = (self.delay * 2).min(self.max);
        wait
    }

    /// The delay the next wait is drawn below (for the log).
    pub(crate) fn delay(&self) -> Duration {
        self.delay
    }

    /// Back to the shortest delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.delay = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_within_equal_jitter_and_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        let mut delay = min;
        for _ in 0..20 {
            let wait = b.next_wait();
            assert!(wait <= delay && wait >= delay / 2, "{wait:?} for {delay:?}");
            delay = (delay * 2).min(max);
        }
        assert_eq!(b.delay(), max);
        b.reset();
        assert_eq!(b.delay(), min);
    }

    #[test]
    fn draws_stay_within_their_range_and_differ() {
        let mut j = Jitter::new();
        let (min, max) = (Duration::from_secs(5), Duration::from_secs(15));
        let draws: Vec<Duration> = (0..1000).map(|_| j.between(min, max)).collect();
        assert!(draws.iter().all(|d| (min..=max).contains(d)));
        assert!(draws.iter().any(|d| *d != draws[0]), "not all the same");
        assert_eq!(j.between(min, min), min);
        assert_ne!(Jitter::new().next(), Jitter::new().next(), "seeded apart");
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn shuffles_keep_every_item_and_vary() {
        let mut j = Jitter::new();
        let orders: Vec<Vec<u32>> = (0..50)
            .map(|_| {
                let mut v: Vec<u32> = (0..8).collect();
                j.shuffle(&mut v);
                v
            })
            .collect();
        for order in &orders {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..8).collect::<Vec<u32>>());
        }
        assert!(orders.iter().any(|o| *o != orders[0]), "not all the same");
        j.shuffle::<u32>(&mut []);
    }
}
