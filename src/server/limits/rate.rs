//! A rate per key (`publish_rate = "200/s"`): the generic cell rate
//! algorithm, which keeps one instant per key (when its next request is
//! due) and allows a burst of one period's worth.
//!
//! The table is bounded whatever keys arrive: a key whose instant has
//! passed is the same as no key and is swept out when the table fills;
//! while it stays full of keys that are all active, new keys share one
//! overflow entry (they are limited together) instead of growing it.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::clients;

/// Keys the table holds at most (about 40 bytes each).
const MAX_KEYS: usize = 4096;

/// A number of requests per period: `200/s`, `30/m`, `1000/h` (the
/// daemon's `publish_rate`). A burst of one period's worth is allowed, then
/// one request every period / count.
///
/// # Examples
///
/// ```
/// let rate: ssed::Rate = "200/s".parse()?;
/// assert_eq!(rate.to_string(), "200/s");
/// # Ok::<(), ssed::RateError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: u32,
    per: Duration,
}

impl Rate {
    /// Time between two requests at the sustained rate.
    fn interval(&self) -> Duration {
        self.per / self.count
    }
}

/// Why a string is not a [`Rate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateError(String);

impl fmt::Display for RateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RateError {}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            RateError(format!(
                "{s:?} is not a rate: write a count per second, minute or hour, as \"200/s\", \
                 \"30/m\" or \"1000/h\""
            ))
        };
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(RateError(format!(
                "{s:?}: a rate of 0 would refuse everything; leave it empty for no limit"
            )));
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Who is counted: a credential, or a client address (see
/// [`RateLimiter::credential`], [`RateLimiter::address`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateKey(u64);

#[derive(Debug)]
struct Table {
    due: HashMap<RateKey, Instant>,
    /// The shared entry of keys that found the table full.
    overflow: Instant,
    /// Until then the table is full of active keys: new ones go to
    /// `overflow` without a sweep.
    crowded_until: Option<Instant>,
}

/// Limits requests per key to a [`Rate`]: the daemon's `publish_rate`, and
/// for an embedding app's own routes. Bounded in memory whatever keys
/// arrive (see the module's notes: at most 4,096 keys, then a shared
/// allowance). Thread-safe.
///
/// # Examples
///
/// ```
/// use std::time::Instant;
/// let limit = ssed::RateLimiter::new("2/s".parse()?);
/// let key = limit.address("192.0.2.1".parse()?);
/// let now = Instant::now();
/// assert!(limit.check(key, now).is_ok());
/// assert!(limit.check(key, now).is_ok());
/// let wait = limit.check(key, now).unwrap_err(); // past the burst
/// assert_eq!(wait.as_millis(), 500);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RateLimiter {
    rate: Rate,
    interval: Duration,
    /// How far ahead of now a key's due instant may run (the burst).
    tolerance: Duration,
    hasher: RandomState,
    table: Mutex<Table>,
}

impl RateLimiter {
    /// A limiter allowing `rate` per key.
    pub fn new(rate: Rate) -> Self {
        let interval = rate.interval();
        RateLimiter {
            rate,
            interval,
            tolerance: interval * (rate.count - 1),
            hasher: RandomState::new(),
            table: Mutex::new(Table {
                due: HashMap::new(),
                overflow: Instant::now(),
                crowded_until: None,
            }),
        }
    }

    /// The rate enforced.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// The key of a credential (a token, a subject): everyone presenting
    /// it shares one allowance, from whatever address.
    pub fn credential(&self, credential: &str) -> RateKey {
        RateKey(self.hasher.hash_one((0u8, credential)))
    }

    /// The key of a client address (an IPv6 client is its /64).
    pub fn address(&self, ip: IpAddr) -> RateKey {
        RateKey(self.hasher.hash_one((1u8, clients::key(ip))))
    }

    /// Counts one request of `key` at `now`: `Err(wait)` when it comes too
    /// soon, `wait` being how long until one would be allowed.
    ///
    /// # Errors
    ///
    /// The wait, when the key's allowance is spent.
    pub fn check(&self, key: RateKey, now: Instant) -> Result<(), Duration> {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let t = &mut *t;
        let slot = if let Some(due) = t.due.get_mut(&key) {
            due
        } else if t.due.len() < MAX_KEYS || self.sweep(t, now) {
            t.due.entry(key).or_insert(now)
        } else {
            &mut t.overflow
        };
        let due = (*slot).max(now);
        let ahead = due - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        *slot = due + self.interval;
        Ok(())
    }

    /// Makes room in a full table by dropping keys whose due instant has
    /// passed; whether there is room now.
    fn sweep(&self, t: &mut Table, now: Instant) -> bool {
        if t.crowded_until.is_some_and(|until| now < until) {
            return false;
        }
        t.due.retain(|_, due| *due > now);
        let room = t.due.len() < MAX_KEYS;
        // Freed little: the keys are active, and sweeping again for each
        // new one would scan the table every time. Sweep again only after
        // a while (what a key's allowance takes to refill, at most 1 s).
        t.crowded_until = (t.due.len() > MAX_KEYS - MAX_KEYS / 8)
            .then(|| now + (self.tolerance + self.interval).min(Duration::from_secs(1)));
        room
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .due
            .len()
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
#[cfg(any(feature = "daemon", test))]
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_refuse_nonsense() {
        let r: Rate = "200/s".parse().unwrap();
        assert_eq!(r.interval(), Duration::from_millis(5));
        assert_eq!(r.to_string(), "200/s");
        assert_eq!(
            "30/m".parse::<Rate>().unwrap().interval(),
            Duration::from_secs(2)
        );
        assert_eq!("1000 / h".parse::<Rate>().unwrap().to_string(), "1000/h");
        for bad in ["", "200", "0/s", "-1/s", "10/d", "x/s", "10/"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_burst_of_one_period_then_the_sustained_rate() {
        let l = RateLimiter::new("10/s".parse().unwrap());
        let k = l.credential("token");
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(l.check(k, t0).is_ok(), "burst {i}");
        }
        let wait = l.check(k, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(l.check(k, t0 + Duration::from_millis(99)).is_err());
        assert!(l.check(k, t0 + Duration::from_millis(100)).is_ok());
        assert!(l.check(k, t0 + Duration::from_millis(100)).is_err());
        // Another key has its own allowance; an address is not a credential.
        assert!(l.check(l.credential("other"), t0).is_ok());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(l.check(l.address(ip), t0).is_ok());
        assert_ne!(l.address(ip), l.credential("10.0.0.1"));
        // After a quiet period, a full burst again.
        let later = t0 + Duration::from_secs(5);
        for _ in 0..10 {
            assert!(l.check(k, later).is_ok());
        }
        assert!(l.check(k, later).is_err());
    }

    #[test]
    fn the_table_stays_bounded_whatever_keys_arrive() {
        let l = RateLimiter::new("2/s".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS as u32 * 3) {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let _ = l.check(l.address(ip), t0);
        }
        assert_eq!(l.keys(), MAX_KEYS);
        // The overflow is shared: its burst is spent by now.
        let fresh = l.address("192.0.2.1".parse().unwrap());
        assert!(l.check(fresh, t0).is_err());
        // Once the old keys' instants pass they are swept for new ones.
        let later = t0 + Duration::from_secs(3);
        assert!(l.check(fresh, later).is_ok());
        assert_eq!(l.keys(), 1);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }
}
