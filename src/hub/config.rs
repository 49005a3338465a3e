//! The hub's settings, what its operations return and why they fail, and
//! the bounds every part of it shares. It uses only ids and the storage
//! error, below it; everything else in the hub uses it.

use std::fmt;
use std::time::Duration;

use crate::error::EventError;
use crate::hub::history::StorageError;
use crate::hub::id::{EventId, MAX_NAME_LEN, TopicProblem, topic_problem};

/// The event name of the frame sent when a client asks to resume from an id
/// older than what is retained.
pub const RESET_EVENT: &str = "reset";

/// Most bytes of a publisher-given id.
pub const MAX_ID_LEN: usize = 256;

/// Why `id` cannot be a publisher-given id, if it cannot: empty or over
/// [`MAX_ID_LEN`] bytes, with a control or Unicode format character (it
/// travels in the `Last-Event-ID` header), starting with `#`, [`EARLIEST`],
/// or written as the hub's own ids are (`<ms>-<seq>`: a resume could not
/// tell them apart).
pub(crate) fn id_problem(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Some(format!("an id has 1 to {MAX_ID_LEN} bytes"));
    }
    match topic_problem(id) {
        Some(TopicProblem::Control(c)) => {
            return Some(format!(
                "an id cannot hold a control character, this one holds U+{:04X}",
                u32::from(c)
            ));
        }
        Some(TopicProblem::Format(c)) => {
            return Some(format!(
                "an id cannot hold an invisible Unicode format character, this one holds U+{:04X}",
                u32::from(c)
            ));
        }
        _ => {}
    }
    if id.starts_with('#') {
        return Some("an id given by a publisher cannot start with #".into());
    }
    if id == EARLIEST {
        return Some("`earliest` is reserved (it asks for all of history)".into());
    }
    if id.parse::<EventId>().is_ok() {
        return Some(format!(
            "{id:?} is written as the hub's own ids are (<ms>-<seq>): choose another form"
        ));
    }
    None
}

/// The last event id that asks for a replay of everything retained, with
/// no reset notice (Mercure's `earliest`).
pub const EARLIEST: &str = "earliest";
/// Most frames written per wake-up of a following stream.
pub(crate) const BATCH: usize = 256;
/// How soon a stream whose replay could not be read asks its client to
/// come back.
pub(crate) const REPLAY_RETRY: Duration = Duration::from_secs(2);
/// Most bytes of frames in a page of a replay (one frame at least), and in
/// one write of queued frames: what a stream holds of its own while its
/// client does not read. Frames read from Redis are the stream's own copy;
/// frames in memory are shared with history, until history lets them go.
pub(crate) const PAGE_BYTES: usize = 64 * 1024;
/// Most replay bytes handed to a waker with a stream's head (see
/// `Stream::follow`); a longer replay is written by the stream's thread.
pub(crate) const OPENING_MAX: usize = 16 * 1024;
/// The longest id line a frame can get (`id: ` and two 20-digit numbers).
pub(crate) const ID_LINE_MAX: usize = 4 + 20 + 1 + 20 + 1;

/// What a hub holds against its retained budget
/// ([`HubConfig::max_retained_bytes`]), from [`Hub::usage`](crate::Hub::usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HubUsage {
    /// Bytes of retained events in this process (0 when Redis keeps them).
    pub history_bytes: u64,
    /// Bytes of waiting mailbox messages in this process.
    pub mailbox_bytes: u64,
    /// The budget (0: none).
    pub max_retained_bytes: u64,
    /// Retained events dropped to keep within the budget, since start.
    pub events_evicted: u64,
    /// Pushes refused because the mailboxes held the whole budget.
    pub pushes_refused: u64,
}

/// Settings of a [`Hub`](crate::Hub).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// Frames a subscriber may have queued before it is dropped as slow.
    /// Default 512 (the queue grows only as frames wait, so idle subscribers
    /// hold none of it).
    pub queue: usize,
    /// Bytes of frames a subscriber may have queued (one frame at least)
    /// before it is dropped as slow: what a subscriber that stops reading
    /// keeps alive, even after history lets it go. Default 1 MiB.
    pub queue_bytes: usize,
    /// Messages a mailbox holds before a push is refused. Default 1000.
    pub mailbox_capacity: usize,
    /// How long an unconsumed mailbox message is kept. Default 1 h.
    pub mailbox_ttl: Duration,
    /// Bytes of memory that retained events and waiting mailbox messages
    /// may take together (frames and texts, with their bookkeeping). Past
    /// it the oldest retained events are dropped, across all topics (a
    /// resume from before them gets the reset notice, as after any
    /// eviction), and a push that the mailboxes alone cannot hold is
    /// refused ([`HubError::OverBudget`]). 0: no budget. Default 0; the
    /// daemon derives one from the machine's (or its cgroup's) memory.
    pub max_retained_bytes: u64,
    /// Largest frame a publish may make, its `data:` prefixes and id line
    /// included ([`HubError::TooLarge`] past it); bounds what one event
    /// can cost whatever its text looks like (a body of line breaks
    /// encodes to about seven times its size). 0: no bound. Default 0.
    pub max_frame: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            queue: 512,
            queue_bytes: 1024 * 1024,
            mailbox_capacity: 1000,
            mailbox_ttl: Duration::from_secs(3600),
            max_retained_bytes: 0,
            max_frame: 0,
        }
    }
}

impl HubConfig {
    /// [`HubError::TooLarge`] for a frame of `size` bytes past
    /// [`max_frame`](HubConfig::max_frame).
    pub(crate) fn check_frame(&self, size: usize) -> Result<(), HubError> {
        let max = self.max_frame;
        if max > 0 && size > max {
            return Err(HubError::TooLarge { size, max });
        }
        Ok(())
    }
}

/// Why a hub operation was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum HubError {
    /// A topic that is not a [valid topic](crate::hub::valid_topic) (empty,
    /// over 1,024 bytes, or with a control or Unicode format character), or
    /// a mailbox key that is not a [valid name](crate::hub::valid_name)
    /// (1 to 200 characters of `A-Z a-z 0-9 _ . : -`). It carries the
    /// topic or key as given; its message says why that is no topic, or,
    /// for a topic, that it is no key.
    InvalidName(String),
    /// The event could not be encoded.
    Event(EventError),
    /// The mailbox already holds its maximum of messages.
    MailboxFull {
        /// The mailbox key.
        key: String,
        /// Its capacity.
        capacity: usize,
    },
    /// The hub's store could not keep the event or message, so it was
    /// neither delivered nor queued.
    Storage(StorageError),
    /// The event's frame would be larger than [`HubConfig::max_frame`].
    TooLarge {
        /// The frame's size in bytes.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// The mailboxes already hold what [`HubConfig::max_retained_bytes`]
    /// allows: the message was not queued.
    OverBudget {
        /// The budget, in bytes.
        budget: u64,
    },
    /// A publisher-given id that cannot be one (see
    /// [`Hub::publish_with_id`](crate::Hub::publish_with_id)); its message
    /// says why.
    InvalidId(String),
    /// A subscription by selector that would take the node past the
    /// distinct selectors it follows at once.
    Selectors {
        /// The most distinct selectors a node follows.
        max: usize,
    },
    /// An update with no topic, or more than
    /// [`MAX_UPDATE_TOPICS`](crate::hub::MAX_UPDATE_TOPICS).
    TopicCount {
        /// The topics given.
        count: usize,
        /// The most an update may have.
        max: usize,
    },
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A string that is no topic says why; one that is a topic
            // was refused as a mailbox key.
            HubError::InvalidName(n) => {
                let shown: String = n.chars().take(64).collect();
                match topic_problem(n) {
                    Some(why) => write!(f, "invalid topic {shown:?}: {why}"),
                    None => write!(
                        f,
                        "invalid key {shown:?}: use 1 to {MAX_NAME_LEN} characters of \
                         A-Z a-z 0-9 _ . : -"
                    ),
                }
            }
            HubError::Event(_) => f.write_str("invalid event"),
            HubError::MailboxFull { key, capacity } => {
                write!(f, "mailbox {key:?} is full ({capacity} messages waiting)")
            }
            HubError::Storage(_) => f.write_str("storage unavailable"),
            HubError::TooLarge { size, max } => {
                write!(f, "event frame of {size} bytes is over the limit of {max}")
            }
            HubError::OverBudget { budget } => write!(
                f,
                "mailboxes hold the whole retained-memory budget ({budget} bytes)"
            ),
            HubError::InvalidId(why) => write!(f, "invalid id: {why}"),
            HubError::Selectors { max } => write!(
                f,
                "this hub follows {max} distinct topic selectors already: subscribe by one \
                 that is followed, or by exact topics"
            ),
            HubError::TopicCount { count, max } => {
                write!(f, "an update has 1 to {max} topics, not {count}")
            }
        }
    }
}

impl std::error::Error for HubError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HubError::Event(e) => Some(e),
            HubError::Storage(e) => Some(e),
            _ => None,
        }
    }
}

impl From<EventError> for HubError {
    fn from(e: EventError) -> Self {
        HubError::Event(e)
    }
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The id the event got.
    pub id: EventId,
    /// Subscribers whose queue took the event.
    pub receivers: usize,
}

/// Where a node's Redis connection stands, as [`Hub::redis_state`]
/// reports it.
///
/// [`Hub::redis_state`]: crate::Hub::redis_state
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisState {
    /// Whether the reader is connected (events from other nodes flow).
    pub connected: bool,
    /// Times the reader connected again after losing its connection.
    pub reconnects: u64,
    /// Failed commands and connects (publishes, pushes, replays, reads).
    pub errors: u64,
    /// The most recent error, without the password.
    pub last_error: Option<String>,
}
