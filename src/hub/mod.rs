//! [`Hub`]: topics, history and replay, keyed mailboxes.
//!
//! An embedding program uses [`Hub`] and [`Subscription`] (also at the
//! crate root). What else is public here is for those who give a hub a
//! store of their own: the [`History`] and [`MailboxStore`] traits and
//! their types, and the two engines ssed ships besides memory, [`store`]
//! (SQLite, feature `durable`) and [`redis`].
//!
//! How the parts fit: this file holds the hub, its one lock and what it
//! orders (publish, subscribe, fan-out under the lock, waking after it);
//! `id.rs` event ids and names; `history.rs` the [`History`] trait and
//! [`MemoryHistory`]; `mailbox.rs` the mailboxes; `subscription.rs` a
//! subscription and its replay, read a page at a time; `follow.rs` a
//! [`Stream`](crate::Stream) following a subscription or consuming a
//! mailbox; `fanout.rs` the subscribers' queues and the waker threads.
//!
//! One lock orders everything that must be ordered: a publish takes it to
//! assign the next id, append to history and offer the encoded frame to
//! every subscriber's queue; a subscribe takes it to join its topics and copy
//! the history it must replay. So a subscriber sees every event exactly once,
//! in id order, with no gap between replay and live events, and events of
//! several topics interleave in id order. Fan-out under the lock is a
//! `try_send` of a reference-counted frame per subscriber: a publish never
//! blocks on a subscriber, and a subscriber whose queue is full is dropped
//! with [`EndReason::Slow`](crate::EndReason::Slow) (its client reconnects with `Last-Event-ID` and
//! replays what it missed from history).
//!
//! History sits behind the [`History`] trait so other stores (an embedded
//! database, Redis) can replace the in-memory one without touching the HTTP
//! layer. Mailboxes live in memory; a [`MailboxStore`] given to
//! [`Hub::with_stores`] also keeps every waiting message, so they survive a
//! restart. A store that fails a write fails the operation
//! ([`HubError::Storage`]): nothing is acknowledged that was not kept.

pub(crate) mod fanout;
mod follow;
pub(crate) mod history;
pub(crate) mod id;
pub(crate) mod mailbox;
pub mod redis;
#[cfg(feature = "durable")]
pub mod store;
mod subscription;

pub use history::{History, MemoryHistory, Replay, Retained, StorageError};
pub use id::{EventId, ParseIdError, valid_name};
pub use mailbox::{MailboxStore, StoredMessage};
use subscription::Replaying;
pub use subscription::Subscription;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::error::{EventError, Report};
use crate::event::{EncodedEvent, Event};
use crate::hub::fanout::{Pushed, SubscriberQueue, Wakers};
use crate::hub::id::{MAX_NAME_LEN, now_ms};
use crate::hub::mailbox::Mailboxes;
use crate::hub::redis::resp::RedisUrl;
use crate::hub::redis::{Engine, PushError, RedisState};

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
/// How often a consumer of a Redis mailbox looks without being woken.
const REMOTE_MAILBOX_POLL: Duration = Duration::from_secs(1);
/// How often expired mailbox messages are swept, at most and at least
/// (within these, the mailbox TTL).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const SWEEP_MIN: Duration = Duration::from_secs(1);
/// The longest id line a frame can get (`id: ` and two 20-digit numbers).
const ID_LINE_MAX: usize = 4 + 20 + 1 + 20 + 1;

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
    config: HubConfig,
    wakers: Wakers,
    state: Mutex<State>,
    mailboxes: Mailboxes,
    /// With Redis as the engine: history, ids and mailboxes live there.
    remote: Option<Arc<Engine>>,
    /// Retained events dropped to keep within the budget.
    evicted: AtomicU64,
    /// Pushes refused because the mailboxes held the whole budget.
    refused: AtomicU64,
    /// Dropped with the hub: ends the sweeper thread.
    _sweeper: Option<Sender<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(r) = &self.remote {
            r.stop();
        }
    }
}

struct State {
    last_id: EventId,
    history: Box<dyn History>,
    /// Each topic's subscribers here; its key is shared with the topic
    /// lists of the subscribers' queues.
    subscribers: HashMap<Arc<str>, Vec<SubscriberSlot>>,
    next_subscriber: u64,
    published: u64,
    /// Frames a subscriber may have waiting (its queue, or its pending
    /// frames during a Redis replay).
    queue_limit: usize,
    remote: Option<Arc<Engine>>,
}

impl State {
    /// `topic` has no subscriber here any more: the Redis reader stops
    /// following it.
    fn forget_topic(&self, topic: &str) {
        if let Some(r) = &self.remote {
            r.unwant(topic);
        }
    }
}

/// A subscriber in one topic's list. Small: a stream of many topics has
/// one per topic (24 bytes; what only a resuming Redis subscriber needs
/// is boxed apart).
struct SubscriberSlot {
    id: u64,
    queue: Arc<SubscriberQueue>,
    resume: Option<Box<RemoteResume>>,
}

/// A Redis-backed subscription resuming from an id: its replay is read
/// from Redis while the reader already delivers live frames.
struct RemoteResume {
    /// While the replay is read: the live frames that arrived meanwhile,
    /// sorted out against the replay once it is in.
    pending: Option<Vec<(EventId, EncodedEvent)>>,
    /// Frames up to this id are skipped: the replay had them (the reader
    /// may deliver an event after the replay already read it).
    seen: EventId,
}

/// Frames handed out by one fan-out: who took them, who needs waking.
#[derive(Default)]
struct FanOut {
    receivers: usize,
    wake: Vec<Arc<SubscriberQueue>>,
}

/// Offers `frame` (id `id`) to every subscriber of `topic`; a subscriber
/// whose queue is full is closed as slow and leaves all its topics.
fn fan_out(state: &mut State, topic: &str, id: EventId, frame: &EncodedEvent, out: &mut FanOut) {
    let limit = state.queue_limit;
    let mut dropped: Vec<(u64, Arc<SubscriberQueue>)> = Vec::new();
    if let Some(subs) = state.subscribers.get_mut(topic) {
        subs.retain_mut(|s| {
            if s.resume.as_ref().is_some_and(|r| id <= r.seen) {
                return true;
            }
            let pending = s.resume.as_mut().and_then(|r| r.pending.as_mut());
            let pushed = match pending {
                Some(pending) if pending.len() < limit => {
                    pending.push((id, frame.clone()));
                    Pushed::Queued
                }
                Some(_) => {
                    s.queue.close_slow();
                    Pushed::Slow
                }
                None => s.queue.push(frame),
            };
            match pushed {
                Pushed::Queued => {
                    out.receivers += 1;
                    true
                }
                Pushed::QueuedWake => {
                    out.receivers += 1;
                    out.wake.push(Arc::clone(&s.queue));
                    true
                }
                Pushed::Slow => {
                    // Closed: it drains what it has, then ends as slow and
                    // its client resumes from history.
                    out.wake.push(Arc::clone(&s.queue));
                    if s.queue.topics.len() > 1 {
                        dropped.push((s.id, Arc::clone(&s.queue)));
                    }
                    false
                }
            }
        });
        if subs.is_empty() {
            state.subscribers.remove(topic);
            state.forget_topic(topic);
        }
    }
    // A slow subscriber of several topics leaves all of them, or it would
    // silently miss this topic's events while the others kept it connected.
    for (id, queue) in dropped {
        remove_subscriber(state, id, &queue.topics);
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

/// Makes the queue of a subscriber of `names` (sorted, distinct), whose
/// topic list shares the names `state.subscribers` keeps: a topic gets an
/// (empty) list of subscribers if it had none. Also says which were new.
fn join(
    state: &mut State,
    names: &[&str],
    capacity: usize,
    max_bytes: usize,
) -> (Arc<SubscriberQueue>, Vec<bool>) {
    let mut topics = Vec::with_capacity(names.len());
    let mut new = Vec::with_capacity(names.len());
    for name in names {
        let key = match state.subscribers.get_key_value(*name) {
            Some((k, _)) => Arc::clone(k),
            None => {
                let k: Arc<str> = Arc::from(*name);
                state.subscribers.insert(Arc::clone(&k), Vec::new());
                k
            }
        };
        new.push(state.subscribers.get(&key).is_some_and(Vec::is_empty));
        topics.push(key);
    }
    let queue = SubscriberQueue::shared(capacity, max_bytes, topics.into_boxed_slice());
    (queue, new)
}

/// Removes subscriber `id` from each of `topics`.
fn remove_subscriber(state: &mut State, id: u64, topics: &[Arc<str>]) {
    for topic in topics {
        if let Some(subs) = state.subscribers.get_mut(topic) {
            subs.retain(|s| s.id != id);
            if subs.is_empty() {
                state.subscribers.remove(topic);
                state.forget_topic(topic);
            }
        }
    }
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.0.config)
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
        Hub::assemble(history, mailboxes, config, None)
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
        let engine = Arc::new(Engine::new(url, history));
        let mailboxes = Mailboxes::new(config.mailbox_capacity, config.mailbox_ttl, 0);
        let hub = Hub::assemble(
            Box::new(MemoryHistory::new(0)),
            mailboxes,
            config,
            Some(Arc::clone(&engine)),
        );
        crate::hub::redis::start_reader(engine, WeakHub(Arc::downgrade(&hub.0)))
            .map_err(|e| HubError::Storage(StorageError::new(e)))?;
        Ok(hub)
    }

    /// Where this node's Redis connection stands; `None` without Redis.
    pub fn redis_state(&self) -> Option<RedisState> {
        self.0.remote.as_ref().map(|r| r.state())
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
        Ok(Hub::assemble(history, mailboxes, config, None))
    }

    fn assemble(
        history: Box<dyn History>,
        mailboxes: Mailboxes,
        config: HubConfig,
        remote: Option<Arc<Engine>>,
    ) -> Self {
        let last_id = history
            .last_id()
            .unwrap_or_else(|| EventId::floor_of(0))
            .max(EventId::floor_of(0));
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let hub = Hub(Arc::new(Inner {
            wakers: Wakers::started(),
            state: Mutex::new(State {
                last_id,
                history,
                subscribers: HashMap::new(),
                next_subscriber: 0,
                published: 0,
                queue_limit: config.queue,
                remote: remote.clone(),
            }),
            config,
            mailboxes,
            remote,
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            _sweeper: Some(stop),
        }));
        // A store restored with more than the budget gives the excess up now.
        hub.shrink_history();
        hub.start_sweeper(stopped);
        hub
    }

    /// Starts the thread that sweeps expired mailbox messages every
    /// [`SWEEP_EVERY`] (or the TTL, if shorter). It holds the hub weakly
    /// and ends when the hub is dropped (`stopped` disconnects).
    fn start_sweeper(&self, stopped: Receiver<()>) {
        let every = self.0.config.mailbox_ttl.clamp(SWEEP_MIN, SWEEP_EVERY);
        let weak = Arc::downgrade(&self.0);
        let spawned = std::thread::Builder::new()
            .name("ssed-sweeper".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    let Some(inner) = weak.upgrade() else { return };
                    let expired = inner.mailboxes.sweep();
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

    /// Drops the oldest retained events until history and mailboxes fit
    /// the budget together (nothing without a budget).
    fn shrink_history(&self) {
        let evicted = self.keep_within_budget(&mut self.state());
        self.note_evictions(evicted);
    }

    /// What the hub holds against its budget now.
    pub fn usage(&self) -> HubUsage {
        HubUsage {
            history_bytes: self.state().history.retained_bytes(),
            mailbox_bytes: self.0.mailboxes.bytes(),
            max_retained_bytes: self.0.config.max_retained_bytes,
            events_evicted: self.0.evicted.load(Ordering::Relaxed),
            pushes_refused: self.0.refused.load(Ordering::Relaxed),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every
        // mutation is a single push or remove), so keep serving.
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
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
        if let Some(remote) = &self.0.remote {
            // Redis picks the id; the reader delivers the event here as on
            // every node. `receivers` counts this node's subscribers.
            let (frame, at) = event.encode_around_id()?;
            self.check_frame(frame.len() + ID_LINE_MAX)?;
            let id = remote
                .publish(topic, &frame, at)
                .map_err(HubError::Storage)?;
            let mut state = self.state();
            state.published += 1;
            let receivers = state.subscribers.get(topic).map_or(0, Vec::len);
            return Ok(Published { id, receivers });
        }
        let mut state = self.state();
        let id = state.last_id.next(now_ms());
        let frame = event.id(id.to_string()).encode_shared()?;
        // Refused before anything changed: its id is issued again.
        self.check_frame(frame.as_bytes().len())?;
        // Kept before anyone sees it: an event the store refused reaches no
        // subscriber, and its id is issued again.
        state
            .history
            .append(
                topic,
                Retained {
                    id,
                    frame: frame.clone(),
                },
            )
            .map_err(HubError::Storage)?;
        state.last_id = id;
        state.published += 1;
        let mut out = FanOut::default();
        fan_out(&mut state, topic, id, &frame, &mut out);
        let evicted = self.keep_within_budget(&mut state);
        drop(state);
        // Waking is the expensive part of fan-out: never under the lock.
        if !out.wake.is_empty() {
            self.0.wakers.wake(out.wake);
        }
        self.note_evictions(evicted);
        Ok(Published {
            id,
            receivers: out.receivers,
        })
    }

    /// [`HubError::TooLarge`] for a frame of `size` bytes past the bound.
    fn check_frame(&self, size: usize) -> Result<(), HubError> {
        let max = self.0.config.max_frame;
        if max > 0 && size > max {
            return Err(HubError::TooLarge { size, max });
        }
        Ok(())
    }

    /// Drops the oldest retained events until history and mailboxes fit
    /// the budget together; returns how many went.
    fn keep_within_budget(&self, state: &mut State) -> u64 {
        let budget = self.0.config.max_retained_bytes;
        if budget == 0 {
            return 0;
        }
        let room = budget.saturating_sub(self.0.mailboxes.bytes());
        if state.history.retained_bytes() <= room {
            return 0;
        }
        match state.history.shrink_to(room) {
            Ok(n) => n,
            Err(e) => {
                log::error!(
                    "cannot drop retained events to keep within max_retained_bytes: {}",
                    Report(&e)
                );
                0
            }
        }
    }

    /// Counts and logs `n` events dropped for the budget.
    fn note_evictions(&self, n: u64) {
        if n > 0 {
            self.0.evicted.fetch_add(n, Ordering::Relaxed);
            log_budget_evictions(n, self.0.config.max_retained_bytes);
        }
    }

    /// Closes every subscriber of `topic` here as slow (their clients
    /// reconnect and replay from history).
    pub(crate) fn drop_subscribers(&self, topic: &str) {
        let mut state = self.state();
        let Some(subs) = state.subscribers.remove(topic) else {
            return;
        };
        state.forget_topic(topic);
        let mut wake = Vec::with_capacity(subs.len());
        for s in subs {
            s.queue.close_slow();
            if s.queue.topics.len() > 1 {
                remove_subscriber(&mut state, s.id, &s.queue.topics);
            }
            wake.push(s.queue);
        }
        drop(state);
        self.0.wakers.wake(wake);
    }

    /// Delivers events the Redis reader read, in id order.
    pub(crate) fn deliver_remote(&self, batch: Vec<(Box<str>, EventId, EncodedEvent)>) {
        let mut out = FanOut::default();
        let mut state = self.state();
        for (topic, id, frame) in &batch {
            fan_out(&mut state, topic, *id, frame, &mut out);
            state.last_id = state.last_id.max(*id);
        }
        drop(state);
        drop(batch);
        if !out.wake.is_empty() {
            self.0.wakers.wake(out.wake);
        }
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
        if let Some(remote) = &self.0.remote {
            return self.subscribe_remote(remote, &names, last_event_id);
        }
        let mut state = self.state();
        let id = state.next_subscriber;
        state.next_subscriber += 1;
        let (queue, _) = join(
            &mut state,
            &names,
            self.0.config.queue,
            self.0.config.queue_bytes,
        );
        let replay = match last_event_id {
            Some(asked) => Replaying::start(&state, &queue.topics, asked),
            None => Replaying::default(),
        };
        for name in queue.topics.iter() {
            if let Some(v) = state.subscribers.get_mut(name) {
                v.push(SubscriberSlot {
                    id,
                    queue: Arc::clone(&queue),
                    resume: None,
                });
            }
        }
        drop(state);
        Ok(Subscription {
            hub: self.clone(),
            id,
            replay,
            queue,
        })
    }

    /// [`subscribe`](Hub::subscribe) with Redis as the engine: join the
    /// topics (the reader follows each from the newest id at least), then
    /// read the replay from Redis; live frames that arrive meanwhile wait
    /// beside the subscription and are kept only if newer than the replay,
    /// so nothing is missed or doubled.
    fn subscribe_remote(
        &self,
        remote: &Arc<Engine>,
        names: &[&str],
        last_event_id: Option<&str>,
    ) -> Result<Subscription, HubError> {
        let (newest, seqs) = remote.position(names).map_err(HubError::Storage)?;
        let mut woke = false;
        let mut state = self.state();
        let id = state.next_subscriber;
        state.next_subscriber += 1;
        let (queue, new) = join(
            &mut state,
            names,
            self.0.config.queue,
            self.0.config.queue_bytes,
        );
        let seqs = seqs.iter().chain(std::iter::repeat(&0));
        for ((name, seq), new) in queue.topics.iter().zip(seqs).zip(new) {
            if new {
                woke |= remote.want(name, newest, *seq);
            }
            if let Some(v) = state.subscribers.get_mut(name) {
                v.push(SubscriberSlot {
                    id,
                    queue: Arc::clone(&queue),
                    resume: last_event_id.map(|_| {
                        Box::new(RemoteResume {
                            pending: Some(Vec::new()),
                            seen: EventId::floor_of(0),
                        })
                    }),
                });
            }
        }
        drop(state);
        let topics = Arc::clone(&queue);
        let names = &topics.topics;
        let mut sub = Subscription {
            hub: self.clone(),
            id,
            replay: Replaying::default(),
            queue,
        };
        if woke {
            remote.wake_readers();
        }
        let Some(asked) = last_event_id else {
            return Ok(sub);
        };
        // The replay covers what Redis has up to `until`, read now that the
        // subscription is in: what the reader delivers meanwhile waits
        // beside it, and goes to its queue only if newer. So nothing
        // published around the subscription is missed or doubled.
        // On failure `sub` drops here and leaves its topics.
        let (until, _) = remote.position(names).map_err(HubError::Storage)?;
        {
            let mut state = self.state();
            let mut later: Vec<(EventId, EncodedEvent)> = Vec::new();
            for name in names.iter() {
                let Some(slot) = state
                    .subscribers
                    .get_mut(name)
                    .and_then(|v| v.iter_mut().find(|s| s.id == id))
                else {
                    continue; // dropped as slow meanwhile
                };
                let resume = slot.resume.get_or_insert_with(|| {
                    Box::new(RemoteResume {
                        pending: None,
                        seen: until,
                    })
                });
                if let Some(pending) = resume.pending.take() {
                    later.extend(pending.into_iter().filter(|(i, _)| *i > until));
                }
                resume.seen = until;
            }
            later.sort_unstable_by_key(|(id, _)| *id);
            later.dedup_by_key(|(id, _)| *id);
            for (_, frame) in &later {
                if matches!(sub.queue.push(frame), Pushed::Slow) {
                    break; // it drains what it has, then ends as slow
                }
            }
        }
        // An id Redis cannot place (garbage, or newer than anything issued)
        // replays everything retained after the reset notice.
        let placeable = asked.parse::<EventId>().ok().filter(|a| *a <= newest);
        let after = placeable.unwrap_or(EventId::floor_of(0));
        sub.replay = Replaying {
            ready: VecDeque::new(),
            from: vec![after; names.len()],
            until,
            last: None,
        };
        sub.replay
            .read_page(
                names,
                &mut |t, a, u, m| remote.page(t, a, u, m),
                Some(asked),
                placeable.is_none(),
            )
            .map_err(HubError::Storage)?;
        Ok(sub)
    }

    /// Subscribers of `topic` now.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.state().subscribers.get(topic).map_or(0, Vec::len)
    }

    /// Events published since the hub was created.
    pub fn published(&self) -> u64 {
        self.state().published
    }

    /// The id of the newest event published, if any.
    pub fn last_id(&self) -> EventId {
        self.state().last_id
    }

    fn unsubscribe(&self, id: u64, topics: &[Arc<str>]) {
        remove_subscriber(&mut self.state(), id, topics);
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
        let capacity = self.0.config.mailbox_capacity;
        let full = || HubError::MailboxFull {
            key: key.to_owned(),
            capacity,
        };
        if let Some(remote) = &self.0.remote {
            let message = message.into();
            let queued = remote
                .push(key, &message, capacity, self.0.config.mailbox_ttl)
                .map_err(|e| match e {
                    PushError::Full => full(),
                    PushError::Storage(e) => HubError::Storage(e),
                })?;
            // Consumers here need not wait for the announcement to come
            // back through the reader.
            self.notify_mailbox(key);
            return Ok(queued);
        }
        let queued = self
            .0
            .mailboxes
            .push(key, message.into())
            .map_err(|e| match e {
                mailbox::PushError::Full => full(),
                mailbox::PushError::OverBudget => {
                    self.0.refused.fetch_add(1, Ordering::Relaxed);
                    HubError::OverBudget {
                        budget: self.0.config.max_retained_bytes,
                    }
                }
                mailbox::PushError::Storage(e) => HubError::Storage(e),
            })?;
        // The mailboxes fit; with the events they may not.
        self.shrink_history();
        Ok(queued)
    }

    /// Takes the oldest message of `key` without waiting.
    pub fn try_take(&self, key: &str) -> Option<String> {
        if let Some(remote) = &self.0.remote {
            // A failure is logged and counted by the engine.
            return remote
                .take(key, self.0.config.mailbox_ttl)
                .ok()
                .flatten()
                .map(|t| t.text);
        }
        let message = self.0.mailboxes.take(key)?;
        self.0.mailboxes.forget(key, message.seq);
        Some(message.text)
    }

    /// Messages waiting in `key`.
    pub fn mailbox_len(&self, key: &str) -> usize {
        if let Some(remote) = &self.0.remote {
            return remote.mailbox_len(key);
        }
        self.0.mailboxes.len(key)
    }

    /// Wakes a consumer of `key` on this node, if one waits (Redis: a
    /// push was announced).
    pub(crate) fn notify_mailbox(&self, key: &str) {
        self.0.mailboxes.notify(key);
    }
}

/// Logs events dropped for the budget at `warn` (degraded: resumes from
/// before them get a reset), at most once a minute with a count.
fn log_budget_evictions(n: u64, budget: u64) {
    static LAST: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));
    let now = Instant::now();
    let Ok(mut last) = LAST.lock() else { return };
    last.1 += n;
    if last
        .0
        .is_some_and(|t| now.duration_since(t) < Duration::from_secs(60))
    {
        return;
    }
    last.0 = Some(now);
    let total = std::mem::take(&mut last.1);
    log::warn!(
        "retained events and mailboxes reached max_retained_bytes ({budget} bytes): \
         {total} oldest events dropped from history since the last report"
    );
}

/// A weak handle on a hub, for threads that serve it but must not keep it
/// alive (the Redis reader).
pub(crate) struct WeakHub(std::sync::Weak<Inner>);

impl WeakHub {
    pub(crate) fn upgrade(&self) -> Option<Hub> {
        self.0.upgrade().map(Hub)
    }

    pub(crate) fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

#[cfg(test)]
mod tests;
