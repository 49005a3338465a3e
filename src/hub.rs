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
//! layer.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};

use crate::error::{EndReason, EventError, StreamError};
use crate::event::{EncodedEvent, Event};
use crate::fanout::{Pushed, SubscriberQueue, Wakers};
use crate::stream::Stream;

/// The event name of the frame sent when a client asks to resume from an id
/// older than what is retained.
pub const RESET_EVENT: &str = "reset";
/// Longest topic or mailbox key name.
pub const MAX_NAME_LEN: usize = 200;
/// Most frames written per wake-up of a following stream.
const BATCH: usize = 256;

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

    /// The first id of a millisecond.
    fn floor_of(ms: u64) -> Self {
        EventId { ms, seq: 0 }
    }

    /// The id after `self` at time `now_ms`: the clock's millisecond if it
    /// moved forward, else the same millisecond with the next sequence, so
    /// ids keep increasing even if the clock steps back.
    fn next(self, now_ms: u64) -> Self {
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

/// An event as kept in history: its id and its encoded frame.
#[derive(Debug, Clone)]
pub struct Retained {
    /// The event's id.
    pub id: EventId,
    /// The frame, id line included, as every subscriber receives it.
    pub frame: EncodedEvent,
}

/// What a history store returns for a resume request.
#[derive(Debug, Default)]
pub struct Replay {
    /// Retained events after the asked id, oldest first.
    pub events: Vec<Retained>,
    /// Whether events after the asked id may be missing (already evicted,
    /// or from before what this store knows).
    pub gap: bool,
    /// The oldest retained id, if any.
    pub oldest: Option<EventId>,
}

/// Where a hub keeps the recent events of each topic.
///
/// Called with the hub's lock held, so implementations need no locking of
/// their own and see appends in id order.
pub trait History: Send + 'static {
    /// Keeps `event` as the newest event of `topic`, evicting the oldest
    /// past the store's bound.
    fn append(&mut self, topic: &str, event: Retained);

    /// Every retained event of `topic` with an id above `after`.
    fn since(&self, topic: &str, after: EventId) -> Replay;

    /// The newest id this store has ever issued or restored, if any; the hub
    /// continues after it.
    fn last_id(&self) -> Option<EventId> {
        None
    }
}

/// The default [`History`]: the last `capacity` events of each topic in
/// memory; nothing survives a restart.
#[derive(Debug)]
pub struct MemoryHistory {
    capacity: usize,
    /// Below this id the store knows nothing (events before the process
    /// started).
    floor: EventId,
    topics: HashMap<Box<str>, TopicHistory>,
}

#[derive(Debug, Default)]
struct TopicHistory {
    events: VecDeque<Retained>,
    /// The newest id evicted from this topic.
    evicted: Option<EventId>,
}

impl MemoryHistory {
    /// Keeps the last `capacity` events per topic (0 keeps none).
    pub fn new(capacity: usize) -> Self {
        MemoryHistory {
            capacity,
            floor: EventId::floor_of(now_ms()),
            topics: HashMap::new(),
        }
    }
}

impl History for MemoryHistory {
    fn append(&mut self, topic: &str, event: Retained) {
        let t = match self.topics.get_mut(topic) {
            Some(t) => t,
            None => self.topics.entry(topic.into()).or_default(),
        };
        if self.capacity == 0 {
            t.evicted = Some(event.id);
            return;
        }
        t.events.push_back(event);
        while t.events.len() > self.capacity {
            if let Some(old) = t.events.pop_front() {
                t.evicted = Some(old.id);
            }
        }
    }

    fn since(&self, topic: &str, after: EventId) -> Replay {
        let Some(t) = self.topics.get(topic) else {
            return Replay {
                gap: after < self.floor,
                ..Replay::default()
            };
        };
        let start = t.events.partition_point(|e| e.id <= after);
        Replay {
            events: t.events.range(start..).cloned().collect(),
            gap: after < self.floor || t.evicted.is_some_and(|ev| ev > after),
            oldest: t.events.front().map(|e| e.id),
        }
    }
}

/// Settings of a [`Hub`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// Frames a subscriber may have queued before it is dropped as slow.
    /// Default 512 (the queue grows only as frames wait, so idle subscribers
    /// hold none of it).
    pub queue: usize,
    /// Messages a mailbox holds before a push is refused. Default 1000.
    pub mailbox_capacity: usize,
    /// How long an unconsumed mailbox message is kept. Default 1 h.
    pub mailbox_ttl: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            queue: 512,
            mailbox_capacity: 1000,
            mailbox_ttl: Duration::from_secs(3600),
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
        }
    }
}

impl std::error::Error for HubError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HubError::Event(e) => Some(e),
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
    mailboxes: Mutex<HashMap<Box<str>, Mailbox>>,
}

struct State {
    last_id: EventId,
    history: Box<dyn History>,
    subscribers: HashMap<Box<str>, Vec<SubscriberSlot>>,
    next_subscriber: u64,
    published: u64,
}

struct SubscriberSlot {
    id: u64,
    queue: Arc<SubscriberQueue>,
}

/// Removes subscriber `id` from each of `topics`.
fn remove_subscriber(state: &mut State, id: u64, topics: &[Box<str>]) {
    for topic in topics {
        if let Some(subs) = state.subscribers.get_mut(topic) {
            subs.retain(|s| s.id != id);
            if subs.is_empty() {
                state.subscribers.remove(topic);
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

    /// A hub over any [`History`] store.
    pub fn with_history(history: Box<dyn History>, config: HubConfig) -> Self {
        let last_id = history
            .last_id()
            .unwrap_or_else(|| EventId::floor_of(0))
            .max(EventId::floor_of(0));
        Hub(Arc::new(Inner {
            config,
            wakers: Wakers::new(),
            state: Mutex::new(State {
                last_id,
                history,
                subscribers: HashMap::new(),
                next_subscriber: 0,
                published: 0,
            }),
            mailboxes: Mutex::new(HashMap::new()),
        }))
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
    /// for an event name with a line break.
    pub fn publish(&self, topic: &str, event: Event) -> Result<Published, HubError> {
        if !valid_name(topic) {
            return Err(HubError::InvalidName(topic.to_owned()));
        }
        event.validate()?;
        let mut state = self.state();
        let id = state.last_id.next(now_ms());
        let frame = event.id(id.to_string()).encode_shared()?;
        state.last_id = id;
        state.published += 1;
        state.history.append(
            topic,
            Retained {
                id,
                frame: frame.clone(),
            },
        );
        let mut receivers = 0;
        let mut wake: Vec<Arc<SubscriberQueue>> = Vec::new();
        let mut dropped: Vec<(u64, Arc<SubscriberQueue>)> = Vec::new();
        if let Some(subs) = state.subscribers.get_mut(topic) {
            subs.retain(|s| match s.queue.push(&frame) {
                Pushed::Queued => {
                    receivers += 1;
                    true
                }
                Pushed::QueuedWake => {
                    receivers += 1;
                    wake.push(Arc::clone(&s.queue));
                    true
                }
                Pushed::Slow => {
                    // Closed: it drains what it has, then ends as slow and
                    // its client resumes from history.
                    wake.push(Arc::clone(&s.queue));
                    if s.queue.topics.len() > 1 {
                        dropped.push((s.id, Arc::clone(&s.queue)));
                    }
                    false
                }
            });
            if subs.is_empty() {
                state.subscribers.remove(topic);
            }
        }
        // A slow subscriber of several topics leaves all of them, or it
        // would silently miss this topic's events while the others kept it
        // connected.
        for (id, queue) in dropped {
            remove_subscriber(&mut state, id, &queue.topics);
        }
        drop(state);
        // Waking is the expensive part of fan-out: never under the lock.
        if !wake.is_empty() {
            self.0.wakers.wake(wake);
        }
        Ok(Published { id, receivers })
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
    pub fn subscribe(
        &self,
        topics: &[&str],
        last_event_id: Option<&str>,
    ) -> Result<Subscription, HubError> {
        if let Some(bad) = topics.iter().find(|t| !valid_name(t)) {
            return Err(HubError::InvalidName((*bad).to_owned()));
        }
        let mut names: Vec<Box<str>> = topics.iter().map(|t| Box::from(*t)).collect();
        names.sort();
        names.dedup();
        let queue = Arc::new(SubscriberQueue::new(self.0.config.queue, names.clone()));
        let mut state = self.state();
        let id = state.next_subscriber;
        state.next_subscriber += 1;
        let mut backlog = Vec::new();
        if let Some(asked) = last_event_id {
            let parsed = asked.parse::<EventId>().ok();
            // An id this hub cannot place (garbage, or from the future: a
            // restart with the clock stepped back, another server) replays
            // everything retained after the reset notice.
            let placeable = parsed.filter(|a| *a <= state.last_id);
            let mut gap = placeable.is_none();
            let after = placeable.unwrap_or(EventId::floor_of(0));
            let mut events = Vec::new();
            let mut oldest: Option<EventId> = None;
            for name in &names {
                let replay = state.history.since(name, after);
                gap |= replay.gap;
                oldest = match (oldest, replay.oldest) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                events.extend(replay.events);
            }
            if gap {
                let data = serde_json::json!({
                    "lastEventId": asked,
                    "oldest": oldest.map(|o| o.to_string()).unwrap_or_default(),
                });
                let reset = Event::new().event(RESET_EVENT).data(data.to_string());
                if let Ok(frame) = reset.encode_shared() {
                    backlog.push(frame);
                }
            }
            events.sort_by_key(|e| e.id);
            backlog.extend(events.into_iter().map(|e| e.frame));
        }
        for name in &names {
            let slot = SubscriberSlot {
                id,
                queue: Arc::clone(&queue),
            };
            match state.subscribers.get_mut(name) {
                Some(v) => v.push(slot),
                None => {
                    state.subscribers.insert(name.clone(), vec![slot]);
                }
            }
        }
        drop(state);
        Ok(Subscription {
            hub: self.clone(),
            id,
            backlog,
            queue,
        })
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

    fn unsubscribe(&self, id: u64, topics: &[Box<str>]) {
        remove_subscriber(&mut self.state(), id, topics);
    }

    // ----- mailboxes -------------------------------------------------------

    fn mailboxes(&self) -> MutexGuard<'_, HashMap<Box<str>, Mailbox>> {
        self.0.mailboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `message` in the mailbox `key`, for exactly one consumer.
    ///
    /// # Errors
    ///
    /// [`HubError::InvalidName`] for a bad key, [`HubError::MailboxFull`]
    /// when the mailbox holds its maximum (nothing is dropped silently).
    pub fn push(&self, key: &str, message: impl Into<String>) -> Result<usize, HubError> {
        if !valid_name(key) {
            return Err(HubError::InvalidName(key.to_owned()));
        }
        let capacity = self.0.config.mailbox_capacity;
        let ttl = self.0.config.mailbox_ttl;
        let mut boxes = self.mailboxes();
        let mailbox = match boxes.get_mut(key) {
            Some(m) => m,
            None => boxes.entry(key.into()).or_insert_with(Mailbox::new),
        };
        mailbox.expire(ttl);
        if mailbox.queue.len() >= capacity {
            return Err(HubError::MailboxFull {
                key: key.to_owned(),
                capacity,
            });
        }
        mailbox.queue.push_back((Instant::now(), message.into()));
        // One token wakes one waiting consumer; a full token channel means
        // a wake-up is already pending.
        let _ = mailbox.notify.0.try_send(());
        Ok(mailbox.queue.len())
    }

    /// Takes the oldest message of `key` without waiting.
    pub fn try_take(&self, key: &str) -> Option<String> {
        let ttl = self.0.config.mailbox_ttl;
        let mut boxes = self.mailboxes();
        let mailbox = boxes.get_mut(key)?;
        mailbox.expire(ttl);
        let message = mailbox.queue.pop_front().map(|(_, m)| m);
        if !mailbox.queue.is_empty() {
            let _ = mailbox.notify.0.try_send(()); // let another consumer in
        }
        if mailbox.queue.is_empty() && mailbox.waiters == 0 {
            boxes.remove(key);
        }
        message
    }

    /// Puts a message taken by [`try_take`](Hub::try_take) back at the
    /// front, when it could not be delivered.
    fn untake(&self, key: &str, message: String) {
        let mut boxes = self.mailboxes();
        let mailbox = match boxes.get_mut(key) {
            Some(m) => m,
            None => boxes.entry(key.into()).or_insert_with(Mailbox::new),
        };
        mailbox.queue.push_front((Instant::now(), message));
        let _ = mailbox.notify.0.try_send(());
    }

    /// Messages waiting in `key`.
    pub fn mailbox_len(&self, key: &str) -> usize {
        self.mailboxes().get(key).map_or(0, |m| m.queue.len())
    }

    /// A receiver that gets a token when `key` may have a message; counts
    /// the caller as a waiter until [`leave`](Hub::leave_mailbox).
    fn wait_handle(&self, key: &str) -> Receiver<()> {
        let mut boxes = self.mailboxes();
        let mailbox = match boxes.get_mut(key) {
            Some(m) => m,
            None => boxes.entry(key.into()).or_insert_with(Mailbox::new),
        };
        mailbox.waiters += 1;
        mailbox.notify.1.clone()
    }

    fn leave_mailbox(&self, key: &str) {
        let mut boxes = self.mailboxes();
        if let Some(m) = boxes.get_mut(key) {
            m.waiters = m.waiters.saturating_sub(1);
            if m.waiters == 0 && m.queue.is_empty() {
                boxes.remove(key);
            } else if !m.queue.is_empty() {
                let _ = m.notify.0.try_send(()); // hand the wake-up on
            }
        }
    }
}

struct Mailbox {
    queue: VecDeque<(Instant, String)>,
    notify: (Sender<()>, Receiver<()>),
    waiters: usize,
}

impl Mailbox {
    fn new() -> Self {
        Mailbox {
            queue: VecDeque::new(),
            notify: crossbeam_channel::bounded(1),
            waiters: 0,
        }
    }

    fn expire(&mut self, ttl: Duration) {
        let now = Instant::now();
        while self
            .queue
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > ttl)
        {
            self.queue.pop_front();
        }
    }
}

/// A subscription to one or more topics: the replay backlog, then live
/// frames. Dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    id: u64,
    backlog: Vec<EncodedEvent>,
    queue: Arc<SubscriberQueue>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topics", &self.queue.topics)
            .field("backlog", &self.backlog.len())
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
    pub fn take_backlog(&mut self) -> Vec<EncodedEvent> {
        std::mem::take(&mut self.backlog)
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
    pub fn follow(&mut self, mut sub: Subscription) -> Result<(), StreamError> {
        let backlog = sub.take_backlog();
        for part in backlog.chunks(BATCH) {
            self.send_encoded(part)?;
        }
        let queue = Arc::clone(&sub.queue);
        let mut batch = Vec::new();
        loop {
            self.check_alive()?;
            queue.drain_into(&mut batch, BATCH);
            if !batch.is_empty() {
                self.send_encoded(&batch)?;
                batch.clear();
                if batch.capacity() > 64 {
                    batch = Vec::new(); // do not hold a burst's buffer while idle
                }
                continue;
            }
            if queue.is_closed() {
                let reason = if queue.is_slow() {
                    EndReason::Slow
                } else {
                    EndReason::Shutdown
                };
                return Err(self.end_with(reason));
            }
            if queue.prepare_park() {
                self.park();
                queue.unparked();
            }
            self.on_timer()?;
        }
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
        let wake = hub.wait_handle(key);
        let result = (|| loop {
            // A consumer whose client already left must not take a message:
            // a write to a socket the peer closed usually still succeeds.
            self.check_connection()?;
            while let Some(message) = hub.try_take(key) {
                let sent = if message == crate::stream::DONE {
                    self.done()
                } else {
                    self.send_event(&Event::new().data(message.as_str()))
                };
                match sent {
                    Ok(()) if message == crate::stream::DONE => return Ok(()),
                    Ok(()) => {}
                    Err(e) => {
                        hub.untake(key, message);
                        return Err(e);
                    }
                }
            }
            if self.recv(&wake)?.is_none() {
                return Ok(());
            }
        })();
        hub.leave_mailbox(key);
        result
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: &EncodedEvent) -> String {
        String::from_utf8(f.as_bytes().to_vec()).expect("utf-8")
    }

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
        assert_eq!(hub.try_take("k").as_deref(), Some("a"));
        hub.untake("k", "a".into());
        assert_eq!(hub.try_take("k").as_deref(), Some("a"));
        assert_eq!(hub.try_take("k").as_deref(), Some("b"));
        assert_eq!(hub.try_take("k"), None);
        assert_eq!(hub.mailbox_len("k"), 0);
    }

    #[test]
    fn hub_is_a_cheap_shared_handle() {
        fn assert_traits<T: Send + Sync + Clone>() {}
        assert_traits::<Hub>();
    }
}
