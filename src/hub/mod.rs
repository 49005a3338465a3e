//! [`Hub`]: topics, history and replay, keyed mailboxes.
//!
//! An embedding program uses [`Hub`] and [`Subscription`] (also at the
//! crate root). What else is public here is for those who give a hub a
//! store of their own: the [`History`] and [`MailboxStore`] traits and
//! their types, and the two engines ssed ships besides memory, [`store`]
//! (SQLite, feature `durable`) and [`redis`].
//!
//! How the parts fit, each file using only those listed before it:
//! `id.rs` event ids and names; `history.rs` the [`History`] trait and
//! [`MemoryHistory`]; `mailbox.rs` the mailboxes; `fanout.rs` the
//! subscribers' queues and the waker threads; `node.rs` what every engine
//! shares on this node (each topic's subscribers under the lock that
//! orders fan-out); `subscription.rs` a subscription and its replay, read
//! a page at a time; `engine.rs` the one interface to where events and
//! messages are kept, with its two engines, `local.rs` (memory, or any
//! store behind the traits: SQLite in `store.rs`) and `redis/`; this file
//! the [`Hub`], which checks names and events and hands every operation to
//! its engine; `follow.rs` a [`Stream`](crate::Stream) following a
//! subscription or consuming a mailbox.
//!
//! Ordering: the local engine holds its lock to assign the next id, append
//! to history and offer the encoded frame to every subscriber's queue (the
//! node's lock inside); a subscribe holds it to join its topics and copy
//! the history it must replay. So a subscriber sees every event exactly
//! once, in id order, with no gap between replay and live events, and
//! events of several topics interleave in id order. With Redis the ids come
//! from Redis and the node's reader delivers them in id order; a resuming
//! subscriber's live frames wait beside it until its replay is read. Fan-out
//! under the lock is a `try_send` of a reference-counted frame per
//! subscriber: a publish never blocks on a subscriber, and a subscriber
//! whose queue is full is dropped with
//! [`EndReason::Slow`](crate::EndReason::Slow) (its client reconnects with
//! `Last-Event-ID` and replays what it missed from history).
//!
//! History sits behind the [`History`] trait so other stores (an embedded
//! database) can replace the in-memory one without touching the HTTP
//! layer. Mailboxes live in memory; a [`MailboxStore`] given to
//! [`Hub::with_stores`] also keeps every waiting message, so they survive a
//! restart. A store that fails a write fails the operation
//! ([`HubError::Storage`]): nothing is acknowledged that was not kept.

mod engine;
pub(crate) mod fanout;
mod follow;
pub(crate) mod history;
pub(crate) mod id;
mod local;
pub(crate) mod mailbox;
mod node;
pub mod redis;
#[cfg(feature = "durable")]
pub mod store;
mod subscription;

pub use history::{History, MemoryHistory, Replay, Retained, StorageError};
pub use id::{EventId, ParseIdError, valid_name};
pub use mailbox::{MailboxStore, StoredMessage};
pub use subscription::Subscription;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::error::EventError;
use crate::event::Event;
use crate::hub::engine::{Engine, Joined};
use crate::hub::id::MAX_NAME_LEN;
use crate::hub::local::Local;
use crate::hub::mailbox::Mailboxes;
use crate::hub::node::Node;
use crate::hub::redis::RedisState;
use crate::hub::redis::engine::RedisEngine;
use crate::hub::redis::resp::RedisUrl;

/// The event name of the frame sent when a client asks to resume from an id
/// older than what is retained.
pub const RESET_EVENT: &str = "reset";
/// Most frames written per wake-up of a following stream.
const BATCH: usize = 256;
/// How soon a stream whose replay could not be read asks its client to
/// come back.
const REPLAY_RETRY: Duration = Duration::from_secs(2);
/// Most bytes of frames in a page of a replay (one frame at least), and in
/// one write of queued frames: what a stream holds of its own while its
/// client does not read. Frames read from Redis are the stream's own copy;
/// frames in memory are shared with history, until history lets them go.
pub(crate) const PAGE_BYTES: usize = 64 * 1024;
/// Most replay bytes handed to a waker with a stream's head (see
/// `Stream::follow`); a longer replay is written by the stream's thread.
const OPENING_MAX: usize = 16 * 1024;
/// How often expired mailbox messages are swept, at most and at least
/// (within these, the mailbox TTL).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const SWEEP_MIN: Duration = Duration::from_secs(1);
/// The longest id line a frame can get (`id: ` and two 20-digit numbers).
pub(crate) const ID_LINE_MAX: usize = 4 + 20 + 1 + 20 + 1;

/// What a hub holds against its retained budget
/// ([`HubConfig::max_retained_bytes`]), from [`Hub::usage`].
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

/// Settings of a [`Hub`].
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
    /// A topic or key name that is empty, too long or has a character other
    /// than `A-Z a-z 0-9 _ . : -`.
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
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HubError::InvalidName(n) => write!(
                f,
                "invalid name {n:?}: use 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . : -"
            ),
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

/// The engine of the daemon, usable by an embedding app from any thread:
/// topics (created on first use) with history, and keyed mailboxes.
///
/// A cheap handle: clones share the same hub.
///
/// # Examples
///
/// ```
/// use ssed::{Event, Hub};
/// let hub = Hub::new(100);
/// let sub = hub.subscribe(&["news"], None)?;
/// let published = hub.publish("news", Event::new().data("hello"))?;
/// assert_eq!(published.receivers, 1);
/// assert_eq!(sub.try_next().map(|f| f.as_bytes().to_vec()),
///            Some(format!("id: {}\ndata: hello\n\n", published.id).into_bytes()));
/// # Ok::<(), ssed::HubError>(())
/// ```
#[derive(Clone)]
pub struct Hub(Arc<Inner>);

struct Inner {
    node: Arc<Node>,
    engine: Box<dyn Engine>,
    /// Dropped with the hub: ends the sweeper thread.
    _sweeper: Option<Sender<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.engine.stop();
    }
}

/// Sorts topic names and drops repeats. A stream's thread runs this and
/// keeps every stack page it touches: a short list (a stream takes at
/// most 64 in the daemon) is sorted in place, where the standard sort
/// would put a 4 KiB scratch buffer on the stack.
fn sort_names(names: &mut Vec<&str>) {
    if names.len() <= 64 {
        for i in 1..names.len() {
            let mut j = i;
            while j > 0 && names[j - 1] > names[j] {
                names.swap(j - 1, j);
                j -= 1;
            }
        }
    } else {
        names.sort_unstable();
    }
    names.dedup();
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.0.node.config)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub keeping the last `history` events of each topic in memory.
    pub fn new(history: usize) -> Self {
        Hub::with_history(Box::new(MemoryHistory::new(history)), HubConfig::default())
    }

    /// A hub over any [`History`] store, with mailboxes in memory only.
    pub fn with_history(history: Box<dyn History>, config: HubConfig) -> Self {
        let mailboxes = Mailboxes::new(
            config.mailbox_capacity,
            config.mailbox_ttl,
            config.max_retained_bytes,
        );
        Hub::local(history, mailboxes, config)
    }

    /// A hub whose engine is the Redis at `url` (`redis://[[user]:password@]host[:port][/db]`),
    /// shared with every other node that uses it: see [`crate::hub::redis`].
    /// Each topic keeps its last `history` events there. Starts this node's
    /// reader thread; Redis may be down at start (the reader keeps trying,
    /// see [`Hub::redis_state`]).
    ///
    /// # Errors
    ///
    /// [`HubError::Storage`] for a URL that does not parse (the message
    /// says why, without the password) or a reader thread that cannot be
    /// started.
    pub fn with_redis(url: &str, history: usize, config: HubConfig) -> Result<Self, HubError> {
        let url = RedisUrl::parse(url)
            .map_err(|m| HubError::Storage(StorageError::new(format!("redis url: {m}"))))?;
        let redis = Arc::new(redis::Redis::new(url, history));
        let mailboxes = Mailboxes::new(config.mailbox_capacity, config.mailbox_ttl, 0);
        let node = Arc::new(Node::new(
            config,
            mailboxes,
            EventId::floor_of(0),
            Some(Arc::clone(&redis) as Arc<dyn node::Follower>),
        ));
        let hub = Hub::assemble(Arc::clone(&node), Box::new(RedisEngine(Arc::clone(&redis))));
        redis::start_reader(redis, Arc::downgrade(&node))
            .map_err(|e| HubError::Storage(StorageError::new(e)))?;
        Ok(hub)
    }

    /// Where this node's Redis connection stands; `None` without Redis.
    pub fn redis_state(&self) -> Option<RedisState> {
        self.0.engine.redis_state()
    }

    /// A hub over a [`History`] store whose mailboxes are also kept in
    /// `mailboxes`: the messages it holds are waiting again, minus those
    /// whose TTL ran out (counted from when they were pushed).
    ///
    /// # Errors
    ///
    /// When the mailbox store cannot be read.
    pub fn with_stores(
        history: Box<dyn History>,
        mailboxes: Box<dyn MailboxStore>,
        config: HubConfig,
    ) -> Result<Self, StorageError> {
        let mailboxes = Mailboxes::restore(
            mailboxes,
            config.mailbox_capacity,
            config.mailbox_ttl,
            config.max_retained_bytes,
        )?;
        Ok(Hub::local(history, mailboxes, config))
    }

    /// A hub on the local engine.
    fn local(history: Box<dyn History>, mailboxes: Mailboxes, config: HubConfig) -> Self {
        let local = Local::new(history);
        let node = Arc::new(Node::new(config, mailboxes, local.last_id(), None));
        // A store restored with more than the budget gives the excess up now.
        local.shrink(&node);
        Hub::assemble(node, Box::new(local))
    }

    fn assemble(node: Arc<Node>, engine: Box<dyn Engine>) -> Self {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        start_sweeper(&node, stopped);
        Hub(Arc::new(Inner {
            node,
            engine,
            _sweeper: Some(stop),
        }))
    }

    /// What the hub holds against its budget now.
    pub fn usage(&self) -> HubUsage {
        self.0.engine.usage(&self.0.node)
    }

    /// Publishes `event` on `topic`: assigns the next id (replacing any id
    /// the event had), encodes the frame once, keeps it in history and hands
    /// it to every subscriber of the topic. Never blocks on a subscriber.
    ///
    /// # Errors
    ///
    /// [`HubError::InvalidName`] for a bad topic name, [`HubError::Event`]
    /// for an event name with a line break, [`HubError::Storage`] when the
    /// history store cannot keep the event (it is then not delivered).
    pub fn publish(&self, topic: &str, event: Event) -> Result<Published, HubError> {
        if !valid_name(topic) {
            return Err(HubError::InvalidName(topic.to_owned()));
        }
        event.validate()?;
        self.0.engine.publish(&self.0.node, topic, event)
    }

    /// Subscribes to `topics`, resuming after `last_event_id` if given.
    ///
    /// The subscription first yields the replay (every retained event of
    /// its topics after that id, in id order), preceded by an `event: reset`
    /// frame when events may be missing (the id is older than what is
    /// retained, unknown, or unparsable), then live events.
    ///
    /// # Errors
    ///
    /// [`HubError::InvalidName`] for a bad topic name.
    // Out of line: see `Stream::follow`.
    #[inline(never)]
    pub fn subscribe(
        &self,
        topics: &[&str],
        last_event_id: Option<&str>,
    ) -> Result<Subscription, HubError> {
        if let Some(bad) = topics.iter().find(|t| !valid_name(t)) {
            return Err(HubError::InvalidName((*bad).to_owned()));
        }
        let mut names: Vec<&str> = topics.to_vec();
        sort_names(&mut names);
        let Joined { id, queue, replay } =
            self.0
                .engine
                .subscribe(&self.0.node, &names, last_event_id)?;
        Ok(Subscription {
            hub: self.clone(),
            id,
            replay,
            queue,
        })
    }

    /// Subscribers of `topic` now.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.0.node.subscribers(topic)
    }

    /// Events published since the hub was created.
    pub fn published(&self) -> u64 {
        self.0.node.published()
    }

    /// The id of the newest event published, if any.
    pub fn last_id(&self) -> EventId {
        self.0.node.last_id()
    }

    // ----- mailboxes -------------------------------------------------------

    /// Queues `message` in the mailbox `key`, for exactly one consumer.
    ///
    /// # Errors
    ///
    /// [`HubError::InvalidName`] for a bad key, [`HubError::MailboxFull`]
    /// when the mailbox holds its maximum (nothing is dropped silently),
    /// [`HubError::OverBudget`] when the mailboxes hold the whole retained
    /// budget, [`HubError::Storage`] when the mailbox store cannot keep it.
    pub fn push(&self, key: &str, message: impl Into<String>) -> Result<usize, HubError> {
        if !valid_name(key) {
            return Err(HubError::InvalidName(key.to_owned()));
        }
        self.0.engine.push(&self.0.node, key, message.into())
    }

    /// Takes the oldest message of `key` without waiting.
    pub fn try_take(&self, key: &str) -> Option<String> {
        let taken = self.0.engine.take(&self.0.node, key)?;
        let text = taken.text.clone();
        self.0.engine.delivered(&self.0.node, key, taken);
        Some(text)
    }

    /// Messages waiting in `key`.
    pub fn mailbox_len(&self, key: &str) -> usize {
        self.0.engine.mailbox_len(&self.0.node, key)
    }
}

/// Starts the thread that sweeps expired mailbox messages every
/// [`SWEEP_EVERY`] (or the TTL, if shorter). It holds the node weakly and
/// ends when the hub is dropped (`stopped` disconnects).
fn start_sweeper(node: &Arc<Node>, stopped: Receiver<()>) {
    let every = node.config.mailbox_ttl.clamp(SWEEP_MIN, SWEEP_EVERY);
    let weak = Arc::downgrade(node);
    let spawned = std::thread::Builder::new()
        .name("ssed-sweeper".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(every)
            {
                let Some(node) = weak.upgrade() else { return };
                let expired = node.mailboxes.sweep();
                if expired > 0 {
                    log::debug!("{expired} expired mailbox messages swept");
                }
            }
        });
    if let Err(e) = spawned {
        // Expiry still happens whenever a mailbox is pushed or read.
        log::warn!("cannot start the mailbox sweeper: {e}");
    }
}

#[cfg(test)]
mod tests;
