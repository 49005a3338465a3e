//! [`Hub`]: topics, history and replay, keyed mailboxes.
//!
//! One lock orders everything that must be ordered: a publish takes it to
//! assign the next id, append to history and offer the encoded frame to
//! every subscriber's queue; a subscribe takes it to join its topics and copy
//! the history it must replay. So a subscriber sees every event exactly once,
//! in id order, with no gap between replay and live events, and events of
//! several topics interleave in id order. Fan-out under the lock is a
//! `try_send` of a reference-counted frame per subscriber: a publish never
//! blocks on a subscriber, and a subscriber whose queue is full is dropped
//! with [`EndReason::Slow`] (its client reconnects with `Last-Event-ID` and
//! replays what it missed from history).
//!
//! History sits behind the [`History`] trait so other stores (an embedded
//! database, Redis) can replace the in-memory one without touching the HTTP
//! layer. Mailboxes live in memory; a [`MailboxStore`] given to
//! [`Hub::with_stores`] also keeps every waiting message, so they survive a
//! restart. A store that fails a write fails the operation
//! ([`HubError::Storage`]): nothing is acknowledged that was not kept.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::error::{EndReason, EventError, Report, StreamError};
use crate::event::{EncodedEvent, Event};
use crate::fanout::{Pushed, SubscriberQueue, Wakers, Writer};
use crate::history::{History, MemoryHistory, Replay, Retained, StorageError};
use crate::id::{EventId, MAX_NAME_LEN, earliest, now_ms, valid_name};
use crate::mailbox::{self, MailboxStore, Mailboxes};
use crate::redis::{Engine, PushError, RedisState};
use crate::resp::RedisUrl;
use crate::stream::Stream;

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
    /// shared with every other node that uses it: see [`crate::redis`].
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
        crate::redis::start_reader(engine, WeakHub(Arc::downgrade(&hub.0)))
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

/// A subscription to one or more topics: the replay backlog, then live
/// frames. Dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    id: u64,
    replay: Replaying,
    queue: Arc<SubscriberQueue>,
}

/// Reads one topic's page of a replay: `(topic, after, until, max)`, as
/// [`History::page`] does, and whether a bound of the source's own (bytes)
/// left events out.
type PageFn<'a> =
    dyn FnMut(&str, EventId, EventId, usize) -> Result<(Replay, bool), StorageError> + 'a;

/// What is left of a subscription's replay.
///
/// A hub that keeps history itself hands it out a page at a time (see
/// [`History::page`]): a stream resuming on topics with thousands of
/// retained events holds one page of shared frames while its client reads,
/// never the whole history. The events replayed are those published before
/// the subscription (up to `until`); later ones arrive through its queue.
struct Replaying {
    /// Frames read and not yet taken (a reset notice first, if any).
    ready: VecDeque<EncodedEvent>,
    /// Per topic of the subscription (in the queue's order): the id its
    /// replay goes on after. Empty once everything has been read.
    from: Vec<EventId>,
    /// The newest id the replay covers.
    until: EventId,
    /// The newest id read: a reset notice mid-replay names it.
    last: Option<EventId>,
}

impl Default for Replaying {
    /// Nothing to replay.
    fn default() -> Self {
        Replaying {
            ready: VecDeque::new(),
            from: Vec::new(),
            until: EventId::floor_of(0),
            last: None,
        }
    }
}

impl Replaying {
    /// The replay of a subscription resuming after `asked` on `topics`,
    /// with its first page read: called under the hub's lock, with the
    /// subscription joining its topics in the same hold, so nothing falls
    /// between the replay and the live frames.
    // Out of line, so its locals do not deepen `Hub::subscribe` (see
    // `Stream::follow`).
    #[inline(never)]
    fn start(state: &State, topics: &[Arc<str>], asked: &str) -> Replaying {
        // An id this hub cannot place (garbage, or from the future: a
        // restart with the clock stepped back, another server) replays
        // everything retained after the reset notice.
        let placeable = asked
            .parse::<EventId>()
            .ok()
            .filter(|a| *a <= state.last_id);
        let after = placeable.unwrap_or(EventId::floor_of(0));
        let mut replay = Replaying {
            ready: VecDeque::new(),
            from: vec![after; topics.len()],
            until: state.last_id,
            last: None,
        };
        let history = state.history.as_ref();
        // Reading memory cannot fail.
        let _ = replay.read_page(
            topics,
            &mut |t, a, u, m| Ok((history.page(t, a, u, m), false)),
            Some(asked),
            placeable.is_none(),
        );
        replay
    }

    /// Whether every frame of the replay has been read (some may still
    /// wait in `ready`).
    fn complete(&self) -> bool {
        self.from.is_empty()
    }

    /// Reads up to `BATCH` more events, in id order, into `ready`; a reset
    /// notice goes first when some were dropped before they could be read
    /// (`asked` names the id the client resumed from on the first page).
    fn read_page(
        &mut self,
        topics: &[Arc<str>],
        page: &mut PageFn<'_>,
        asked: Option<&str>,
        mut gap: bool,
    ) -> Result<(), StorageError> {
        let mut events: Vec<Retained> = Vec::new();
        let mut oldest: Option<EventId> = None;
        let mut bound = self.until;
        let mut more = false;
        for (name, from) in topics.iter().zip(self.from.iter_mut()) {
            if *from >= self.until {
                continue; // nothing of this topic is left
            }
            let (page, cut) = page(name, *from, bound, BATCH)?;
            if page.gap {
                gap = true;
                // The notice covers this topic up to its oldest event:
                // later pages go on from there, and only a new loss
                // gives a new notice.
                *from = page.oldest.map_or(self.until, |o| o.pred().max(*from));
            }
            oldest = earliest(oldest, page.oldest);
            // A page that came back full, by count or by the source's own
            // bound, may have more behind it.
            more |= cut || page.events.len() >= BATCH;
            events.extend(page.events);
            if cut_page(&mut events) {
                // Later topics need nothing past the page's newest.
                more = true;
                bound = events.last().map_or(bound, |e| e.id);
            }
        }
        events.sort_unstable_by_key(|e| e.id);
        if gap {
            let asked = match (asked, self.last) {
                (Some(asked), _) => asked.to_owned(),
                (None, Some(last)) => last.to_string(),
                (None, None) => String::new(),
            };
            self.ready.push_back(reset_frame(&asked, oldest));
        }
        if let Some(newest) = events.last() {
            self.last = Some(newest.id);
        }
        match (more, self.last) {
            (true, Some(last)) => self.from.iter_mut().for_each(|f| *f = (*f).max(last)),
            _ => self.from = Vec::new(),
        }
        self.ready.extend(events.into_iter().map(|e| e.frame));
        Ok(())
    }
}

/// Sorts `events` by id and keeps the oldest that fit one page: at most
/// [`BATCH`] events and [`PAGE_BYTES`] of frames, one at least. True when
/// some were cut.
fn cut_page(events: &mut Vec<Retained>) -> bool {
    events.sort_unstable_by_key(|e| e.id);
    let (mut keep, mut bytes) = (0, 0);
    for e in events.iter() {
        let size = e.frame.as_bytes().len();
        if keep > 0 && (keep >= BATCH || bytes + size > PAGE_BYTES) {
            break;
        }
        keep += 1;
        bytes += size;
    }
    let cut = keep < events.len();
    events.truncate(keep);
    cut
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topics", &self.queue.topics)
            .field("backlog", &self.replay.ready.len())
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next live frame without waiting (the replay backlog is taken
    /// separately with [`take_backlog`](Subscription::take_backlog)).
    pub fn try_next(&self) -> Option<EncodedEvent> {
        self.queue.try_pop()
    }

    /// Waits up to `timeout` for the next live frame; `None` on timeout or
    /// when the hub dropped the subscriber (see
    /// [`is_slow`](Subscription::is_slow)) and its queue is empty.
    pub fn next_timeout(&self, timeout: Duration) -> Option<EncodedEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = self.queue.try_pop() {
                return Some(frame);
            }
            let now = Instant::now();
            if self.queue.is_closed() || now >= deadline {
                return None;
            }
            if self.queue.prepare_park() {
                std::thread::park_timeout(deadline - now);
                self.queue.unparked();
            }
        }
    }

    /// The replay frames (a reset notice first, if any), taken once.
    ///
    /// This reads the whole replay at once; a stream following the
    /// subscription ([`Stream::follow`]) reads it a page at a time instead.
    /// If Redis fails part way, the backlog ends with a reset notice (the
    /// rest may be missing) and the failure is logged.
    pub fn take_backlog(&mut self) -> Vec<EncodedEvent> {
        let mut all = Vec::new();
        loop {
            match self.next_backlog(usize::MAX) {
                Ok(page) if page.is_empty() => return all,
                Ok(page) => all.extend(page),
                Err(e) => {
                    // What the replay could not read may be missing: say
                    // so, as for any loss, after the last event read.
                    log::warn!("replay cut short: {}", Report(&e));
                    let last = self.replay.last.map(|id| id.to_string());
                    all.push(reset_frame(&last.unwrap_or_default(), None));
                    return all;
                }
            }
        }
    }

    /// Up to `max` more frames of the replay, in order; empty once it is
    /// all taken. Reads the next page from history when none is waiting.
    ///
    /// # Errors
    ///
    /// When Redis, the engine, cannot be read: the replay stops there.
    #[inline(never)]
    pub(crate) fn next_backlog(&mut self, max: usize) -> Result<Vec<EncodedEvent>, StorageError> {
        if self.replay.ready.is_empty() && !self.replay.complete() {
            let topics = &self.queue.topics;
            let read = match &self.hub.0.remote {
                Some(remote) => self.replay.read_page(
                    topics,
                    &mut |t, a, u, m| remote.page(t, a, u, m),
                    None,
                    false,
                ),
                None => {
                    let state = self.hub.state();
                    let history = state.history.as_ref();
                    self.replay.read_page(
                        topics,
                        &mut |t, a, u, m| Ok((history.page(t, a, u, m), false)),
                        None,
                        false,
                    )
                }
            };
            if let Err(e) = read {
                self.replay.from = Vec::new(); // nothing more to read
                return Err(e);
            }
        }
        let n = self.replay.ready.len().min(max);
        Ok(self.replay.ready.drain(..n).collect())
    }

    /// Whether the replay is all taken or waiting in memory.
    pub(crate) fn backlog_read(&self) -> bool {
        self.replay.complete()
    }

    /// Whether the hub dropped this subscriber for falling behind.
    pub fn is_slow(&self) -> bool {
        self.queue.is_slow()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id, &self.queue.topics);
    }
}

impl Stream {
    /// Streams a hub subscription: the replay backlog, then every live
    /// frame, all queued frames of a wake-up in one write. Runs until the
    /// stream ends.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the client leaves, the budget runs out,
    /// the server shuts down, or the hub drops the subscriber as
    /// [`EndReason::Slow`].
    // Out of line, as `Hub::subscribe` is: a stream thread keeps every
    // stack page it ever touched for the stream's life, and inlined into
    // the handler their locals would stack up in one deep frame.
    #[inline(never)]
    pub fn follow(&mut self, mut sub: Subscription) -> Result<(), StreamError> {
        let backlog = match sub.next_backlog(BATCH) {
            Ok(page) => page,
            Err(e) => return self.replay_failed(&e),
        };
        let queue = Arc::clone(&sub.queue);
        // An idle stream's thread sends nothing itself: its head, retry
        // and (short) replay, like its heartbeats and most events, are sent
        // by a waker thread (see `Stream::take_opening` for why).
        let opening = if sub.backlog_read() {
            self.take_opening(&backlog, OPENING_MAX)
        } else {
            None
        };
        if let Some((opening, frames)) = opening {
            drop(backlog);
            match self.direct_parts() {
                Some((conn, chunked, stats)) => {
                    queue.enable_direct(conn, chunked, stats, opening, frames);
                }
                // Not expected (the opening is only taken on a socket of
                // ours), but its bytes must not be lost.
                None => self.finish_partial(&opening)?,
            }
        } else {
            if !self.send_replay(&mut sub, backlog)? {
                return Ok(());
            }
            // Open now (a no-op if a frame or the handler already did), so
            // wakers can write frames while this thread sleeps.
            self.open()?;
            if let Some((conn, chunked, stats)) = self.direct_parts() {
                queue.enable_direct(conn, chunked, stats, Vec::new(), 0);
            }
        }
        let result = self.follow_queue(&sub.hub, &queue);
        // From here on only this thread writes (the final frame, the close).
        let carry = queue.disable_direct();
        if !carry.is_empty() {
            // A waker began a frame after the last look, or was never given
            // the chance to send what was staged: finish it, or cut the
            // connection without another byte.
            let _ = self.finish_partial(&carry);
        }
        result
    }

    /// Writes the replay on this thread, `first` then a page at a time:
    /// frames are shared and written without a copy, so a client that
    /// stops reading pins one page of references, whatever the history.
    #[inline(never)]
    fn send_replay(
        &mut self,
        sub: &mut Subscription,
        first: Vec<EncodedEvent>,
    ) -> Result<bool, StreamError> {
        let mut page = first;
        while !page.is_empty() {
            self.send_encoded(&page)?;
            page = match sub.next_backlog(BATCH) {
                Ok(page) => page,
                Err(e) => {
                    self.replay_failed(&e)?;
                    return Ok(false);
                }
            };
        }
        Ok(true)
    }

    /// Ends a stream whose replay could not be read (Redis down): its
    /// client is told to come back soon, with the id it got to.
    #[cold]
    #[inline(never)]
    fn replay_failed(&mut self, e: &StorageError) -> Result<(), StreamError> {
        log::warn!("replay cut short: {}", Report(e));
        self.retry(REPLAY_RETRY)?;
        self.comment("storage unavailable; reconnect later")
    }

    fn follow_queue(&mut self, hub: &Hub, queue: &Arc<SubscriberQueue>) -> Result<(), StreamError> {
        let mut batch = Vec::new();
        loop {
            // Held while draining and writing, so a waker never writes in
            // between: frames leave in queue order.
            let mut writer = queue.writer();
            match self.follow_step(queue, writer.as_deref_mut(), &mut batch) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    // Still holding the writer: no waker may add frames
                    // after a write that failed halfway.
                    if let Some(w) = writer.as_mut() {
                        w.stop();
                    }
                    return Err(e);
                }
            }
            let staged = writer.as_deref().is_some_and(Writer::has_staged);
            drop(writer);
            // Staged bytes (the opening, a heartbeat) are handed over just
            // before parking, with the writer free for the waker.
            if staged && !hub.0.wakers.hand_off(Arc::clone(queue)) {
                self.send_staged(queue)?;
            }
            if queue.prepare_park() {
                self.park();
                queue.unparked();
            }
        }
    }

    /// Sends what was staged for a waker on this thread (no waker runs).
    #[cold]
    #[inline(never)]
    fn send_staged(&mut self, queue: &SubscriberQueue) -> Result<(), StreamError> {
        // Held across the write, as in `follow_queue`: no waker may write
        // in between, nor after a write that failed halfway.
        let Some(mut w) = queue.writer() else {
            return Ok(());
        };
        let result = self.write_staged(queue, &mut w);
        if result.is_err() {
            w.stop();
        }
        result
    }

    /// Writes, on this thread, what was staged for a waker and not yet
    /// sent (the caller holds the writer).
    fn write_staged(&mut self, queue: &SubscriberQueue, w: &mut Writer) -> Result<(), StreamError> {
        let Some(stats) = queue.direct_stats() else {
            return Ok(());
        };
        let bytes = w.take_staged(stats);
        if bytes.is_empty() {
            return Ok(());
        }
        self.finish_partial(&bytes)
    }

    /// One look at the queue, holding the writer: true when frames went
    /// out (look again), false when there is nothing more to do (park).
    fn follow_step(
        &mut self,
        queue: &SubscriberQueue,
        mut writer: Option<&mut Writer>,
        batch: &mut Vec<EncodedEvent>,
    ) -> Result<bool, StreamError> {
        if let Some(w) = writer.as_deref_mut()
            && !w.carry.is_empty()
        {
            // The rest of a frame a waker began: it goes out first, even
            // when the stream is ending, or the frame would be cut.
            let carry = std::mem::take(&mut w.carry);
            self.finish_partial(&carry)?;
        }
        if let Some(at) = queue.take_sent_at() {
            self.note_sent(at);
        }
        self.check_alive()?;
        // Bounded by bytes too: a write to a client that does not read
        // holds these frames until it gives up.
        queue.drain_into(batch, BATCH, PAGE_BYTES);
        if !batch.is_empty() {
            if let Some(w) = writer.as_deref_mut() {
                // Bytes staged for a waker that has not sent them yet go
                // before the frames.
                self.write_staged(queue, w)?;
            }
            self.send_encoded(batch)?;
            batch.clear();
            if batch.capacity() > 64 {
                *batch = Vec::new(); // do not hold a burst's buffer while idle
            }
            return Ok(true);
        }
        if queue.is_closed() {
            let reason = if queue.is_slow() {
                EndReason::Slow
            } else {
                EndReason::Shutdown
            };
            return Err(self.end_with(reason));
        }
        // A heartbeat that is due goes out under the same hold: staged for
        // a waker when one may write, so this thread never sends while idle.
        if let Some(w) = writer
            && w.can_hand_off()
        {
            w.stage_with(|out| self.stage_heartbeat(out))?;
            return Ok(false);
        }
        self.on_timer()?;
        Ok(false)
    }

    /// Consumes the mailbox `key`: each message is sent once as `data:`
    /// and removed; the message `[DONE]` is sent, then the stream ends.
    /// A message whose write fails goes back to the front of the mailbox
    /// for the next consumer.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream ends first.
    pub fn consume(&mut self, hub: &Hub, key: &str) -> Result<(), StreamError> {
        if let Some(remote) = &hub.0.remote {
            return self.consume_remote(hub, remote, key);
        }
        let wake = hub.0.mailboxes.wait_handle(key);
        let result = (|| loop {
            // A consumer whose client already left must not take a message:
            // a write to a socket the peer closed usually still succeeds.
            // Looked at before each message, so a client that closes
            // mid-mailbox loses only what was already on its way to it
            // (docs/operations.md has the bound).
            while let Some(message) = {
                self.check_connection()?;
                hub.0.mailboxes.take(key)
            } {
                let done = message.text == crate::stream::DONE;
                let sent = if done {
                    self.done()
                } else {
                    self.send_event(&Event::new().data(message.text.as_str()))
                };
                match sent {
                    Ok(()) => {
                        // Out of the store only once written: a crash
                        // before this delivers it again rather than lose it.
                        hub.0.mailboxes.forget(key, message.seq);
                        if done {
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        hub.0.mailboxes.untake(key, message);
                        return Err(e);
                    }
                }
            }
            if self.recv(&wake)?.is_none() {
                return Ok(());
            }
        })();
        hub.0.mailboxes.leave(key);
        result
    }
}

/// The `event: reset` frame telling a client that resumes from `asked`
/// that events may be missing.
fn reset_frame(asked: &str, oldest: Option<EventId>) -> EncodedEvent {
    let data = serde_json::json!({
        "lastEventId": asked,
        "oldest": oldest.map(|o| o.to_string()).unwrap_or_default(),
    });
    let reset = Event::new().event(RESET_EVENT).data(data.to_string());
    // A fixed event name and a JSON line cannot fail to encode.
    reset
        .encode_shared()
        .unwrap_or_else(|_| EncodedEvent::from_parts(b"event: reset\ndata: {}\n\n".to_vec()))
}

impl Stream {
    /// [`consume`](Stream::consume) with the messages in Redis: each is
    /// taken with an atomic pop, so exactly one consumer on any node gets
    /// it; one whose write fails goes back to the front.
    fn consume_remote(&mut self, hub: &Hub, remote: &Engine, key: &str) -> Result<(), StreamError> {
        let ttl = hub.0.config.mailbox_ttl;
        let wake = hub.0.mailboxes.wait_handle(key);
        let result = (|| loop {
            // A failed take (Redis down) is logged by the engine; look
            // again after the wait. The client is looked at before each
            // message, as in `consume`.
            while let Ok(Some(taken)) = {
                self.check_connection()?;
                remote.take(key, ttl)
            } {
                let done = taken.text == crate::stream::DONE;
                let sent = if done {
                    self.done()
                } else {
                    self.send_event(&Event::new().data(taken.text.as_str()))
                };
                if let Err(e) = sent {
                    if let Err(lost) = remote.untake(key, &taken.stored, ttl) {
                        log::error!(
                            "mailbox {key:?}: a message could not be delivered nor put back: {}",
                            Report(&lost)
                        );
                    }
                    return Err(e);
                }
                if done {
                    return Ok(());
                }
            }
            // Woken when a push is announced; announcements missed while
            // the reader reconnects are caught by looking now and then.
            self.recv_within(&wake, REMOTE_MAILBOX_POLL)?;
        })();
        hub.0.mailboxes.leave(key);
        result
    }
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
mod tests {
    use super::*;
    use crate::history::Replay;
    use crate::mailbox::StoredMessage;

    fn text(f: &EncodedEvent) -> String {
        String::from_utf8(f.as_bytes().to_vec()).expect("utf-8")
    }

    #[test]
    fn publish_fans_out_shared_bytes_in_id_order() {
        let hub = Hub::new(10);
        let a = hub.subscribe(&["a"], None).expect("valid");
        let ab = hub.subscribe(&["a", "b"], None).expect("valid");
        let p1 = hub.publish("a", Event::new().data("1")).expect("valid");
        let p2 = hub
            .publish("b", Event::new().event("x").data("2"))
            .expect("valid");
        assert!(p2.id > p1.id);
        assert_eq!((p1.receivers, p2.receivers), (2, 1));
        let fa = a.try_next().expect("queued");
        let fab = ab.try_next().expect("queued");
        assert!(std::ptr::eq(fa.as_bytes(), fab.as_bytes()), "encoded once");
        assert_eq!(text(&fab), format!("id: {}\ndata: 1\n\n", p1.id));
        assert_eq!(
            text(&ab.try_next().expect("queued")),
            format!("event: x\nid: {}\ndata: 2\n\n", p2.id)
        );
        assert!(a.try_next().is_none());
        drop(a);
        assert_eq!(hub.subscribers("a"), 1);
    }

    #[test]
    fn replay_has_no_gap_and_no_duplicate() {
        let hub = Hub::new(100);
        let ids: Vec<EventId> = (0..5)
            .map(|i| {
                hub.publish(
                    if i % 2 == 0 { "a" } else { "b" },
                    Event::new().data(i.to_string()),
                )
                .expect("valid")
                .id
            })
            .collect();
        let mut sub = hub
            .subscribe(&["a", "b"], Some(&ids[1].to_string()))
            .expect("valid");
        let live = hub.publish("a", Event::new().data("live")).expect("valid");
        let backlog: Vec<String> = sub.take_backlog().iter().map(text).collect();
        let want: Vec<String> = ids[2..]
            .iter()
            .zip(2..)
            .map(|(id, i)| format!("id: {id}\ndata: {i}\n\n"))
            .collect();
        assert_eq!(backlog, want);
        assert_eq!(
            text(&sub.try_next().expect("live")),
            format!("id: {}\ndata: live\n\n", live.id)
        );
    }

    #[test]
    fn reset_when_history_was_evicted_or_id_unknown() {
        let hub = Hub::new(2);
        let first = hub.publish("t", Event::new().data("0")).expect("valid").id;
        for i in 1..4 {
            hub.publish("t", Event::new().data(i.to_string()))
                .expect("valid");
        }
        let mut sub = hub
            .subscribe(&["t"], Some(&first.to_string()))
            .expect("valid");
        let backlog: Vec<String> = sub.take_backlog().iter().map(text).collect();
        assert_eq!(backlog.len(), 3, "{backlog:?}");
        assert!(
            backlog[0].starts_with("event: reset\ndata: {"),
            "{}",
            backlog[0]
        );
        assert!(backlog[0].contains(&format!("\"lastEventId\":\"{first}\"")));
        assert!(backlog[2].ends_with("data: 3\n\n"));
        for unknown in ["garbage", "99999999999999-0"] {
            let mut sub = hub.subscribe(&["t"], Some(unknown)).expect("valid");
            let b = sub.take_backlog();
            assert!(text(&b[0]).starts_with("event: reset"), "{unknown}");
        }
        // Up to date: nothing to replay, no reset.
        let mut sub = hub
            .subscribe(&["t"], Some(&hub.last_id().to_string()))
            .expect("valid");
        assert!(sub.take_backlog().is_empty());
    }

    #[test]
    fn a_long_replay_is_read_a_page_at_a_time_in_order_without_duplicates() {
        let hub = Hub::new(2000);
        let topics = ["a", "b", "c"];
        let ids: Vec<EventId> = (0..1000)
            .map(|i| {
                hub.publish(topics[i % 3], Event::new().data(i.to_string()))
                    .expect("valid")
                    .id
            })
            .collect();
        let mut sub = hub
            .subscribe(&topics, Some(&ids[9].to_string()))
            .expect("valid");
        let live = hub.publish("b", Event::new().data("live")).expect("valid");
        let mut got = Vec::new();
        let mut pages = 0;
        loop {
            assert!(sub.replay.ready.len() <= BATCH, "one page at most");
            let page = sub.next_backlog(BATCH).expect("in memory");
            if page.is_empty() {
                break;
            }
            pages += 1;
            got.extend(page.iter().map(text));
        }
        let want: Vec<String> = ids[10..]
            .iter()
            .zip(10..)
            .map(|(id, i)| format!("id: {id}\ndata: {i}\n\n"))
            .collect();
        assert_eq!(got, want);
        assert_eq!(pages, 990usize.div_ceil(BATCH));
        assert_eq!(
            text(&sub.try_next().expect("live")),
            format!("id: {}\ndata: live\n\n", live.id),
            "what came after the subscription is live, not replayed"
        );
        assert!(sub.take_backlog().is_empty());
    }

    #[test]
    fn events_dropped_during_a_replay_give_a_reset_naming_the_last_one_read() {
        let hub = Hub::new(300);
        let ids: Vec<EventId> = (0..300)
            .map(|i| {
                hub.publish("t", Event::new().data(i.to_string()))
                    .expect("valid")
                    .id
            })
            .collect();
        let mut sub = hub
            .subscribe(&["t"], Some(&ids[0].to_string()))
            .expect("valid");
        let first = sub.next_backlog(BATCH).expect("in memory");
        assert_eq!(first.len(), BATCH, "no reset: nothing was missing yet");
        assert!(text(&first[0]).ends_with("data: 1\n\n"));
        // While the client reads, publishers push the rest out of history.
        for i in 0..300 {
            hub.publish("t", Event::new().data(format!("new {i}")))
                .expect("valid");
        }
        let rest: Vec<String> = sub.take_backlog().iter().map(text).collect();
        assert_eq!(rest.len(), 1, "{rest:?}");
        assert!(rest[0].starts_with("event: reset\n"), "{}", rest[0]);
        assert!(
            rest[0].contains(&format!("\"lastEventId\":\"{}\"", ids[BATCH])),
            "{}",
            rest[0]
        );
        // The replay stopped where the subscription began; the new events
        // wait in its queue.
        assert_eq!(std::iter::from_fn(|| sub.try_next()).count(), 300);
    }

    #[test]
    fn a_page_over_many_topics_holds_the_oldest_events_of_all_of_them() {
        let hub = Hub::new(1000);
        let names: Vec<String> = (0..64).map(|t| format!("t{t}")).collect();
        let topics: Vec<&str> = names.iter().map(String::as_str).collect();
        for round in 0..20 {
            for t in &topics {
                hub.publish(t, Event::new().data(format!("{t} {round}")))
                    .expect("valid");
            }
        }
        let mut sub = hub.subscribe(&topics, Some("0-0")).expect("valid");
        let mut all: Vec<String> = sub.take_backlog().iter().map(text).collect();
        assert!(
            all.remove(0).starts_with("event: reset"),
            "0-0 is older than the hub"
        );
        assert_eq!(all.len(), 64 * 20);
        let ids: Vec<EventId> = all
            .iter()
            .map(|f| {
                f.lines()
                    .find_map(|l| l.strip_prefix("id: "))
                    .and_then(|i| i.parse().ok())
                    .expect("an id")
            })
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "id order, no duplicate"
        );
    }

    #[test]
    fn a_full_queue_drops_only_that_subscriber() {
        let hub = Hub::with_history(
            Box::new(MemoryHistory::new(10)),
            HubConfig {
                queue: 2,
                ..HubConfig::default()
            },
        );
        let slow = hub.subscribe(&["t"], None).expect("valid");
        let fast = hub.subscribe(&["t"], None).expect("valid");
        for i in 0..3 {
            hub.publish("t", Event::new().data(i.to_string()))
                .expect("valid");
            while fast.try_next().is_some() {}
        }
        assert!(slow.is_slow());
        assert!(!fast.is_slow());
        assert_eq!(hub.subscribers("t"), 1);
        // The slow one drains what it had, then sees the disconnect.
        assert!(slow.try_next().is_some());
        assert!(slow.try_next().is_some());
        assert!(slow.try_next().is_none());
        assert!(
            slow.next_timeout(Duration::from_secs(5)).is_none(),
            "closed: no wait"
        );
    }

    #[test]
    fn mailboxes_are_fifo_bounded_and_single_delivery() {
        let hub = Hub::with_history(
            Box::new(MemoryHistory::new(0)),
            HubConfig {
                mailbox_capacity: 2,
                ..HubConfig::default()
            },
        );
        assert_eq!(hub.push("k", "a").expect("room"), 1);
        assert_eq!(hub.push("k", "b").expect("room"), 2);
        assert!(matches!(
            hub.push("k", "c"),
            Err(HubError::MailboxFull { capacity: 2, .. })
        ));
        assert!(matches!(
            hub.push("bad key", "c"),
            Err(HubError::InvalidName(_))
        ));
        let a = hub.0.mailboxes.take("k").expect("queued");
        assert_eq!(a.text, "a");
        hub.0.mailboxes.untake("k", a);
        assert_eq!(hub.try_take("k").as_deref(), Some("a"));
        assert_eq!(hub.try_take("k").as_deref(), Some("b"));
        assert_eq!(hub.try_take("k"), None);
        assert_eq!(hub.mailbox_len("k"), 0);
    }

    /// A history that refuses writes while `fail` is set.
    struct Flaky {
        inner: MemoryHistory,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl History for Flaky {
        fn append(&mut self, topic: &str, event: Retained) -> Result<(), StorageError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StorageError::new("disk full"));
            }
            self.inner.append(topic, event)
        }

        fn since(&self, topic: &str, after: EventId) -> Replay {
            self.inner.since(topic, after)
        }
    }

    #[test]
    fn a_refused_write_is_neither_delivered_nor_acknowledged() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hub = Hub::with_history(
            Box::new(Flaky {
                inner: MemoryHistory::new(10),
                fail: Arc::clone(&fail),
            }),
            HubConfig::default(),
        );
        let sub = hub.subscribe(&["t"], None).expect("valid");
        let first = hub.publish("t", Event::new().data("1")).expect("stored");
        fail.store(true, Ordering::SeqCst);
        let err = hub
            .publish("t", Event::new().data("2"))
            .expect_err("refused");
        assert!(matches!(err, HubError::Storage(_)), "{err:?}");
        assert_eq!(
            Report(&err).to_string(),
            "storage unavailable: storage failed: disk full"
        );
        assert_eq!(hub.published(), 1);
        assert_eq!(hub.last_id(), first.id, "no id spent");
        fail.store(false, Ordering::SeqCst);
        let third = hub.publish("t", Event::new().data("3")).expect("stored");
        let got: Vec<String> = std::iter::from_fn(|| sub.try_next())
            .map(|f| text(&f))
            .collect();
        assert_eq!(
            got,
            [
                format!("id: {}\ndata: 1\n\n", first.id),
                format!("id: {}\ndata: 3\n\n", third.id),
            ]
        );
    }

    /// A mailbox store that records what it is asked and can refuse puts.
    #[derive(Default, Clone)]
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
        kept: Vec<StoredMessage>,
    }

    impl MailboxStore for Recorder {
        fn load(&mut self) -> Result<Vec<StoredMessage>, StorageError> {
            Ok(std::mem::take(&mut self.kept))
        }

        fn put(&mut self, m: &StoredMessage) -> Result<(), StorageError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StorageError::new("disk full"));
            }
            let mut log = self.log.lock().expect("not poisoned");
            log.push(format!("put {} {} {}", m.key, m.seq, m.text));
            Ok(())
        }

        fn remove(&mut self, seq: u64) -> Result<(), StorageError> {
            let mut log = self.log.lock().expect("not poisoned");
            log.push(format!("remove {seq}"));
            Ok(())
        }
    }

    #[test]
    fn a_mailbox_store_sees_puts_and_removals_and_restores_in_order() {
        let now = now_ms();
        let kept = |seq: u64, key: &str, age_ms: u64| StoredMessage {
            key: key.into(),
            seq,
            pushed_ms: now - age_ms,
            text: format!("m{seq}"),
        };
        let store = Recorder {
            kept: vec![
                kept(3, "k", 10),
                kept(5, "k", 10),
                kept(7, "old", 7_200_000),
            ],
            ..Recorder::default()
        };
        let log = Arc::clone(&store.log);
        let fail = Arc::clone(&store.fail);
        let hub = Hub::with_stores(
            Box::new(MemoryHistory::new(0)),
            Box::new(store),
            HubConfig::default(),
        )
        .expect("loads");
        let taken = |log: &Arc<Mutex<Vec<String>>>| log.lock().expect("not poisoned").clone();
        assert_eq!(taken(&log), ["remove 7"], "older than the TTL: dropped");
        assert_eq!(hub.mailbox_len("old"), 0);
        hub.push("k", "new").expect("room");
        assert_eq!(
            taken(&log)[1],
            "put k 8 new",
            "seq continues after the store's"
        );
        let m = hub.0.mailboxes.take("k").expect("restored");
        assert_eq!((m.seq, m.text.as_str()), (3, "m3"));
        hub.0.mailboxes.untake("k", m);
        assert_eq!(
            taken(&log).len(),
            2,
            "taken and given back: the store keeps it"
        );
        assert_eq!(hub.try_take("k").as_deref(), Some("m3"));
        assert_eq!(taken(&log)[2], "remove 3");
        fail.store(true, Ordering::SeqCst);
        assert!(matches!(hub.push("k", "lost?"), Err(HubError::Storage(_))));
        assert_eq!(hub.mailbox_len("k"), 2, "a refused push is not queued");
    }

    #[test]
    fn hub_is_a_cheap_shared_handle() {
        fn assert_traits<T: Send + Sync + Clone>() {}
        assert_traits::<Hub>();
    }
}
