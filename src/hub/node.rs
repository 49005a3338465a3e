//! What every engine shares on this node: the subscribers of each topic
//! and the lock that orders fan-out, the waker threads, the mailboxes'
//! waiting consumers, and the hub's settings.
//!
//! An engine (see `engine.rs`) decides where events and messages are kept
//! and which id an event gets; it hands each event it keeps to the
//! [`Node`] ([`Node::fan_out`], or [`Node::deliver`] from the Redis
//! reader), which offers the shared frame to every subscriber's queue
//! under its lock and wakes them after it. The node knows no engine: the
//! one thing it tells one is that a topic has no subscriber left
//! ([`Follower`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::event::EncodedEvent;
use crate::hub::config::HubConfig;
use crate::hub::fanout::{Pushed, SubscriberQueue, Wakers};
use crate::hub::id::EventId;
use crate::hub::mailbox::Mailboxes;

/// An engine that must know when no subscriber of this node is left on a
/// topic (the Redis reader stops following it). Told under the node's
/// lock, so it never crosses a subscriber joining the topic.
pub(crate) trait Follower: Send + Sync {
    /// No subscriber of this node follows `topic` any more.
    fn unfollow(&self, topic: &str);
}

/// This node's subscribers, waiting consumers and settings.
pub(crate) struct Node {
    pub(crate) config: HubConfig,
    pub(crate) wakers: Wakers,
    /// Waiting consumers, and, with a local engine, the messages.
    pub(crate) mailboxes: Mailboxes,
    state: Mutex<State>,
    /// Events published since the hub was created.
    published: AtomicU64,
}

struct State {
    /// Each topic's subscribers here; its key is shared with the topic
    /// lists of the subscribers' queues.
    subscribers: HashMap<Arc<str>, Vec<SubscriberSlot>>,
    next_subscriber: u64,
    /// Per subscriber of several topics that was offered an update of
    /// several topics: the ones it took lately.
    recent: HashMap<u64, Recent>,
    /// The newest id handed to this node's subscribers (or restored).
    last_id: EventId,
    follower: Option<Arc<dyn Follower>>,
}

/// A subscriber in one topic's list. Small: a stream of many topics has
/// one per topic (24 bytes; what only a resuming subscriber whose replay
/// is read outside the lock needs is boxed apart).
struct SubscriberSlot {
    id: u64,
    queue: Arc<SubscriberQueue>,
    resume: Option<Box<Resume>>,
}

/// A subscription whose replay is read outside the node's lock (from
/// Redis) while live frames already arrive: they wait here until the
/// replay's end is known, and are kept only if newer.
struct Resume {
    /// While the replay is read: the live frames that arrived meanwhile,
    /// sorted out against the replay once it is in.
    pending: Option<Vec<(EventId, EncodedEvent)>>,
    /// Frames up to this id are skipped: the replay had them (the reader
    /// may deliver an event after the replay already read it).
    seen: EventId,
}

/// One update as a fan-out offers it.
#[derive(Clone, Copy)]
struct Update<'a> {
    id: EventId,
    frame: &'a EncodedEvent,
    private: bool,
    /// An update of several topics: offered once per topic.
    several: bool,
}

/// Updates of several topics a subscriber of several topics took lately
/// (the last [`RECENT`]): it takes each once, whichever of its topics
/// offers it first. With Redis the copies may come apart, in the window
/// where a topic new to this node joins the reader.
#[derive(Default)]
struct Recent {
    ids: [Option<EventId>; RECENT],
    next: usize,
}

/// How many updates of several topics [`Recent`] remembers.
const RECENT: usize = 8;

impl Recent {
    /// Whether `id` is new to it (and now remembered).
    fn first(&mut self, id: EventId) -> bool {
        if self.ids.contains(&Some(id)) {
            return false;
        }
        self.ids[self.next] = Some(id);
        self.next = (self.next + 1) % RECENT;
        true
    }
}

/// An event the Redis reader read, for this node's subscribers.
pub(crate) struct Delivery {
    pub(crate) topic: Box<str>,
    pub(crate) id: EventId,
    pub(crate) frame: EncodedEvent,
    pub(crate) private: bool,
    /// One of an update's several topics (see [`Recent`]).
    pub(crate) several: bool,
}

/// Frames handed out by one fan-out: who took them, who needs waking.
#[derive(Default)]
pub(crate) struct FanOut {
    pub(crate) receivers: usize,
    wake: Vec<Arc<SubscriberQueue>>,
}

impl Node {
    pub(crate) fn new(
        config: HubConfig,
        mailboxes: Mailboxes,
        last_id: EventId,
        follower: Option<Arc<dyn Follower>>,
    ) -> Self {
        Node {
            config,
            wakers: Wakers::started(),
            mailboxes,
            state: Mutex::new(State {
                subscribers: HashMap::new(),
                next_subscriber: 0,
                recent: HashMap::new(),
                last_id,
                follower,
            }),
            published: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every
        // mutation is a single push or remove), so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a publish.
    pub(crate) fn note_published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// Events published since the hub was created.
    pub(crate) fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// The newest id handed to subscribers here, or restored at start.
    pub(crate) fn last_id(&self) -> EventId {
        self.state().last_id
    }

    /// Subscribers of `topic` now.
    pub(crate) fn subscribers(&self, topic: &str) -> usize {
        self.state().subscribers.get(topic).map_or(0, Vec::len)
    }

    /// Subscribers of `topic` now that an update would reach: all of them
    /// for a public one, those that may receive private updates for a
    /// `private` one.
    /// Subscribers of any of `topics` now that an update would reach, each
    /// once: all of them for a public one, those that may receive private
    /// updates for a `private` one.
    pub(crate) fn receivers(&self, topics: &[&str], private: bool) -> usize {
        let state = self.state();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut n = 0;
        for topic in topics {
            for s in state.subscribers.get(*topic).into_iter().flatten() {
                let once = topics.len() == 1 || s.queue.topics.len() == 1 || seen.insert(s.id);
                if once && !(private && s.queue.public_only) {
                    n += 1;
                }
            }
        }
        n
    }

    /// Offers `frame` (id `id`) to every subscriber of `topic` (a
    /// `private` one to those that may receive private updates); waking
    /// them is left to [`Node::wake`], after the caller's own lock.
    pub(crate) fn fan_out(
        &self,
        topics: &[&str],
        id: EventId,
        frame: &EncodedEvent,
        private: bool,
    ) -> FanOut {
        let mut out = FanOut::default();
        let mut state = self.state();
        let several = topics.len() > 1;
        for topic in topics {
            let update = Update {
                id,
                frame,
                private,
                several,
            };
            state.fan_out(topic, update, self.config.queue, &mut out);
        }
        state.last_id = state.last_id.max(id);
        out
    }

    /// Wakes the subscribers a fan-out left to wake: the expensive part of
    /// fan-out, never under a lock.
    pub(crate) fn wake(&self, out: FanOut) {
        if !out.wake.is_empty() {
            self.wakers.wake(out.wake);
        }
    }

    /// Delivers events the Redis reader read, in id order: an update of
    /// several topics comes once per topic and reaches each subscriber
    /// once.
    pub(crate) fn deliver(&self, batch: Vec<Delivery>) {
        let mut out = FanOut::default();
        let mut state = self.state();
        for d in &batch {
            let update = Update {
                id: d.id,
                frame: &d.frame,
                private: d.private,
                several: d.several,
            };
            state.fan_out(&d.topic, update, self.config.queue, &mut out);
            state.last_id = state.last_id.max(d.id);
        }
        drop(state);
        drop(batch);
        self.wake(out);
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
                state.remove_subscriber(s.id, &s.queue.topics);
            }
            wake.push(s.queue);
        }
        drop(state);
        self.wakers.wake(wake);
    }

    /// Joins a new subscriber to `names` (sorted, distinct); returns its
    /// number and queue. `on_new(i, name)` is told, under the lock, of each
    /// topic that had no subscriber here. With `resume`, live frames wait
    /// beside the subscriber until [`Node::resume_live`].
    pub(crate) fn join(
        &self,
        names: &[&str],
        resume: bool,
        public_only: bool,
        on_new: &mut dyn FnMut(usize, &str),
    ) -> (u64, Arc<SubscriberQueue>) {
        let mut state = self.state();
        let id = state.next_subscriber;
        state.next_subscriber += 1;
        let mut topics = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let key = match state.subscribers.get_key_value(*name) {
                Some((k, _)) => Arc::clone(k),
                None => {
                    let k: Arc<str> = Arc::from(*name);
                    state.subscribers.insert(Arc::clone(&k), Vec::new());
                    k
                }
            };
            if state.subscribers.get(&key).is_some_and(Vec::is_empty) {
                on_new(i, name);
            }
            topics.push(key);
        }
        let queue = SubscriberQueue::shared(
            self.config.queue,
            self.config.queue_bytes,
            topics.into_boxed_slice(),
            public_only,
        );
        for name in queue.topics.iter() {
            if let Some(v) = state.subscribers.get_mut(name) {
                v.push(SubscriberSlot {
                    id,
                    queue: Arc::clone(&queue),
                    resume: resume.then(|| {
                        Box::new(Resume {
                            pending: Some(Vec::new()),
                            seen: EventId::floor_of(0),
                        })
                    }),
                });
            }
        }
        (id, queue)
    }

    /// Ends the wait of a resuming subscriber whose replay covers up to
    /// `until`: the live frames that arrived meanwhile go to its queue if
    /// newer, in id order, and later ones up to `until` are skipped. Under
    /// the lock, so no live frame can pass them.
    pub(crate) fn resume_live(&self, id: u64, queue: &SubscriberQueue, until: EventId) {
        let mut state = self.state();
        let mut later: Vec<(EventId, EncodedEvent)> = Vec::new();
        for name in queue.topics.iter() {
            let Some(slot) = state
                .subscribers
                .get_mut(name)
                .and_then(|v| v.iter_mut().find(|s| s.id == id))
            else {
                continue; // dropped as slow meanwhile
            };
            let resume = slot.resume.get_or_insert_with(|| {
                Box::new(Resume {
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
            if matches!(queue.push(frame), Pushed::Slow) {
                break; // it drains what it has, then ends as slow
            }
        }
    }

    /// Removes subscriber `id` from each of `topics`.
    pub(crate) fn unsubscribe(&self, id: u64, topics: &[Arc<str>]) {
        self.state().remove_subscriber(id, topics);
    }
}

impl State {
    /// `topic` has no subscriber here any more.
    fn forget_topic(&self, topic: &str) {
        if let Some(f) = &self.follower {
            f.unfollow(topic);
        }
    }

    /// Offers `frame` (id `id`) to every subscriber of `topic`, a
    /// `private` one only to those that may receive private updates; a
    /// subscriber whose queue is full is closed as slow and leaves all its
    /// topics.
    ///
    /// An update of several topics comes once per topic: a subscriber of
    /// several of them takes it the first time only (see [`Recent`]).
    fn fan_out(&mut self, topic: &str, update: Update<'_>, limit: usize, out: &mut FanOut) {
        let Update {
            id,
            frame,
            private,
            several,
        } = update;
        let mut dropped: Vec<(u64, Arc<SubscriberQueue>)> = Vec::new();
        let State {
            subscribers,
            recent,
            ..
        } = self;
        if let Some(subs) = subscribers.get_mut(topic) {
            subs.retain_mut(|s| {
                if s.resume.as_ref().is_some_and(|r| id <= r.seen)
                    || (private && s.queue.public_only)
                {
                    return true;
                }
                if several && s.queue.topics.len() > 1 && !recent.entry(s.id).or_default().first(id)
                {
                    return true; // it has this update already
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
                        // Closed: it drains what it has, then ends as slow
                        // and its client resumes from history.
                        out.wake.push(Arc::clone(&s.queue));
                        if s.queue.topics.len() > 1 {
                            dropped.push((s.id, Arc::clone(&s.queue)));
                        }
                        false
                    }
                }
            });
            if subs.is_empty() {
                subscribers.remove(topic);
                self.forget_topic(topic);
            }
        }
        // A slow subscriber of several topics leaves all of them, or it
        // would silently miss this topic's events while the others kept it
        // connected.
        for (id, queue) in dropped {
            self.remove_subscriber(id, &queue.topics);
        }
    }

    /// Removes subscriber `id` from each of `topics`.
    fn remove_subscriber(&mut self, id: u64, topics: &[Arc<str>]) {
        self.recent.remove(&id);
        for topic in topics {
            if let Some(subs) = self.subscribers.get_mut(topic) {
                subs.retain(|s| s.id != id);
                if subs.is_empty() {
                    self.subscribers.remove(topic);
                    self.forget_topic(topic);
                }
            }
        }
    }
}
