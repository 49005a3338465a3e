//! Event ids and topic names: the two things every layer of the hub
//! agrees on.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest topic or mailbox key name.
pub(crate) const MAX_NAME_LEN: usize = 200;

/// An event id: `<unix-ms>-<seq>`, increasing in publish order across all
/// topics and, being time-based, across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    ms: u64,
    seq: u64,
}

impl EventId {
    /// The id `ms-seq`.
    pub const fn new(ms: u64, seq: u64) -> Self {
        EventId { ms, seq }
    }

    /// Milliseconds since the Unix epoch when it was issued.
    pub fn millis(self) -> u64 {
        self.ms
    }

    /// Its number among the ids of the same millisecond, from 0.
    pub fn seq(self) -> u64 {
        self.seq
    }

    /// The first id of a millisecond.
    pub(crate) fn floor_of(ms: u64) -> Self {
        EventId { ms, seq: 0 }
    }

    /// Above every id.
    pub(crate) const MAX: EventId = EventId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// The id just below `self` (itself for the smallest).
    pub(crate) fn pred(self) -> Self {
        match (self.ms, self.seq) {
            (ms, seq) if seq > 0 => EventId { ms, seq: seq - 1 },
            (0, _) => self,
            (ms, _) => EventId {
                ms: ms - 1,
                seq: u64::MAX,
            },
        }
    }

    /// The id after `self` at time `now_ms`: the clock's millisecond if it
    /// moved forward, else the same millisecond with the next sequence, so
    /// ids keep increasing even if the clock steps back.
    pub(crate) fn next(self, now_ms: u64) -> Self {
        if now_ms > self.ms {
            EventId { ms: now_ms, seq: 0 }
        } else {
            EventId {
                ms: self.ms,
                seq: self.seq + 1,
            }
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// An id string that is not `<digits>-<digits>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseIdError;

impl fmt::Display for ParseIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("event id is not <unix-ms>-<seq>")
    }
}

impl std::error::Error for ParseIdError {}

impl FromStr for EventId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or(ParseIdError)?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(ParseIdError);
        }
        Ok(EventId {
            ms: ms.parse().map_err(|_| ParseIdError)?,
            seq: seq.parse().map_err(|_| ParseIdError)?,
        })
    }
}

/// Whether `name` is a valid topic or mailbox key: 1 to 200 characters of
/// `A-Z a-z 0-9 _ . : -`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Milliseconds since the Unix epoch now (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The earlier of two oldest-retained ids, either of which may be unknown.
pub(crate) fn earliest(a: Option<EventId>, b: Option<EventId>) -> Option<EventId> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_parse() {
        let a = EventId::new(5, 0);
        assert_eq!(a.next(4), EventId::new(5, 1), "clock stepped back");
        assert_eq!(a.next(5), EventId::new(5, 1));
        assert_eq!(a.next(6), EventId::new(6, 0));
        assert!(EventId::new(5, 9) < EventId::new(6, 0));
        assert!(
            EventId::new(5, 10) > EventId::new(5, 9),
            "numeric, not lexical"
        );
        assert_eq!("17-3".parse(), Ok(EventId::new(17, 3)));
        for bad in [
            "",
            "1",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "1 -2",
            "+1-2",
            "99999999999999999999999-1",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        assert!(valid_name("a.b:c_d-9"));
        assert!(valid_name(&"x".repeat(200)));
        for bad in ["", "a b", "a/b", "é", "a?b", &"x".repeat(201)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn pred_is_the_id_just_below() {
        assert_eq!(EventId::new(5, 3).pred(), EventId::new(5, 2));
        assert_eq!(EventId::new(5, 0).pred(), EventId::new(4, u64::MAX));
        assert_eq!(EventId::new(0, 0).pred(), EventId::new(0, 0));
        assert!(EventId::new(5, 0).pred() < EventId::new(5, 0));
    }
}
