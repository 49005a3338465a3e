//! Event ids, topics and names: the things every layer of the hub agrees
//! on.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest name: a mailbox key, or a topic in a path.
pub(crate) const MAX_NAME_LEN: usize = 200;
/// Longest topic, in bytes.
pub(crate) const MAX_TOPIC_LEN: usize = 1024;

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

    /// The id just above `self` (itself for the largest).
    pub(crate) fn succ(self) -> Self {
        match (self.ms, self.seq) {
            (ms, seq) if seq < u64::MAX => EventId { ms, seq: seq + 1 },
            (u64::MAX, _) => self,
            (ms, _) => EventId { ms: ms + 1, seq: 0 },
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

/// Whether `name` is a valid name: 1 to 200 characters of
/// `A-Z a-z 0-9 _ . : -`. Mailbox keys are names, and so are the topics
/// the daemon takes in a path (`/events/{topic}`, `/publish/{topic}`);
/// every name is also a [valid topic](valid_topic).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Whether `topic` is a valid topic: any UTF-8 text of 1 to 1,024 bytes
/// without control characters (C0, DEL, C1) or Unicode format characters
/// (general category Cf: invisible ones such as U+200B or the bidi
/// overrides), so that IRIs such as `https://example.com/books/1` are
/// topics, as Mercure has them. Every [valid name](valid_name) is one.
pub fn valid_topic(topic: &str) -> bool {
    topic_problem(topic).is_none()
}

/// Why a string is not a [valid topic](valid_topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TopicProblem {
    /// No character at all.
    Empty,
    /// Over [`MAX_TOPIC_LEN`] bytes: its length.
    TooLong(usize),
    /// A control character (C0, DEL, C1).
    Control(char),
    /// A Unicode format character (general category Cf).
    Format(char),
}

impl fmt::Display for TopicProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicProblem::Empty => f.write_str("a topic cannot be empty"),
            TopicProblem::TooLong(len) => write!(
                f,
                "a topic is at most {MAX_TOPIC_LEN} bytes of UTF-8, this one is {len}"
            ),
            TopicProblem::Control(c) => write!(
                f,
                "a topic cannot hold a control character, this one holds U+{:04X}",
                u32::from(*c)
            ),
            TopicProblem::Format(c) => write!(
                f,
                "a topic cannot hold an invisible Unicode format character (category Cf), \
                 this one holds U+{:04X}",
                u32::from(*c)
            ),
        }
    }
}

/// Why `topic` is not a [valid topic](valid_topic), if it is not.
pub(crate) fn topic_problem(topic: &str) -> Option<TopicProblem> {
    if topic.is_empty() {
        return Some(TopicProblem::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Some(TopicProblem::TooLong(topic.len()));
    }
    topic.chars().find_map(|c| {
        if c.is_control() {
            Some(TopicProblem::Control(c))
        } else if is_format(c) {
            Some(TopicProblem::Format(c))
        } else {
            None
        }
    })
}

/// Whether `c` is a Unicode format character: general category Cf, as
/// Unicode 16.0 lists it (`DerivedGeneralCategory.txt`).
fn is_format(c: char) -> bool {
    matches!(
        u32::from(c),
        0xAD | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x890..=0x891
            | 0x8E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
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
    fn topics_are_iris_and_names() {
        for good in [
            "a",
            "a.b:c_d-9",
            "https://example.com/books/1",
            "https://example.com/books/{id}?x=1&y=2#frag",
            "with spaces, \"quotes\", 'apostrophes', 100% {braces} [brackets] \\",
            "caf\u{e9} \u{4e16}\u{754c} \u{1f600}",
            "\u{ac}\u{ae}\u{5ff}\u{606}\u{200a}\u{2010}\u{2065}\u{fffc}\u{13440}",
            &"x".repeat(MAX_TOPIC_LEN),
            &"\u{e9}".repeat(MAX_TOPIC_LEN / 2),
        ] {
            assert_eq!(topic_problem(good), None, "{good:?}");
            assert!(valid_topic(good));
        }
        assert_eq!(topic_problem(""), Some(TopicProblem::Empty));
        let long = "x".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(topic_problem(&long), Some(TopicProblem::TooLong(1025)));
        // Bytes, not characters: 513 two-byte characters are too many.
        let wide = "\u{e9}".repeat(MAX_TOPIC_LEN / 2 + 1);
        assert_eq!(topic_problem(&wide), Some(TopicProblem::TooLong(1026)));
        for c in [
            '\0', '\t', '\n', '\r', '\u{1b}', '\u{7f}', '\u{80}', '\u{85}', '\u{9f}',
        ] {
            let t = format!("a{c}b");
            assert_eq!(topic_problem(&t), Some(TopicProblem::Control(c)), "{t:?}");
        }
        // Every range of Cf, at both ends.
        for c in [
            0xAD, 0x600, 0x605, 0x61C, 0x6DD, 0x70F, 0x890, 0x891, 0x8E2, 0x180E, 0x200B, 0x200F,
            0x202A, 0x202E, 0x2060, 0x2064, 0x2066, 0x206F, 0xFEFF, 0xFFF9, 0xFFFB, 0x110BD,
            0x110CD, 0x13430, 0x1343F, 0x1BCA0, 0x1BCA3, 0x1D173, 0x1D17A, 0xE0001, 0xE0020,
            0xE007F,
        ] {
            let c = char::from_u32(c).expect("a char");
            let t = format!("https://example.com/{c}");
            assert_eq!(topic_problem(&t), Some(TopicProblem::Format(c)), "{t:?}");
        }
        let why = topic_problem("a\u{200b}b").map(|p| p.to_string());
        assert!(why.is_some_and(|w| w.contains("U+200B")));
    }

    #[test]
    fn every_name_is_a_topic() {
        for name in ["a", "a.b:c_d-9", &"x".repeat(MAX_NAME_LEN)] {
            assert!(valid_name(name) && valid_topic(name), "{name:?}");
        }
        assert!(valid_topic("a/b") && !valid_name("a/b"));
    }

    #[test]
    fn pred_is_the_id_just_below() {
        assert_eq!(EventId::new(5, 3).pred(), EventId::new(5, 2));
        assert_eq!(EventId::new(5, 0).pred(), EventId::new(4, u64::MAX));
        assert_eq!(EventId::new(0, 0).pred(), EventId::new(0, 0));
        assert!(EventId::new(5, 0).pred() < EventId::new(5, 0));
    }
}
