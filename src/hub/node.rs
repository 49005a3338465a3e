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
use crate::hub::config::{HubConfig, HubError};
use crate::hub::engine::Interest;
use crate::hub::fanout::{Matching, Pushed, SubscriberQueue, Wakers};
use crate::hub::grant::{Privacy, Selector};
use crate::hub::id::EventId;
use crate::hub::mailbox::Mailboxes;

/// The name under which an engine follows every topic for this node's
/// subscribers by selector (no topic is ever named so: a topic holds no
/// control character). [`Follower::unfollow`] is told it when the last of
/// them leaves; [`Node::deliver`] takes updates of it, with their topics,
/// for them.
pub(crate) const EVERY_TOPIC: &str = "\u{0}*";

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
    /// The subscribers of each selector (`*`, a URI template): matched
    /// once per topic, whatever their number.
    groups: Vec<Group>,
    next_subscriber: u64,
    /// Per subscriber of several topics that was offered an update of
    /// several topics: the ones it took lately.
    recent: HashMap<u64, Recent>,
    /// The newest id handed to this node's subscribers (or restored).
    last_id: EventId,
    follower: Option<Arc<dyn Follower>>,
}

/// A subscriber in one topic's list. Small: a stream of many topics has
/// one per topic (32 bytes; what only a resuming subscriber whose replay
/// is read outside the lock needs is boxed apart).
struct SubscriberSlot {
    id: u64,
    queue: Arc<SubscriberQueue>,
    resume: Option<Box<Resume>>,
    /// Private updates of this topic may reach it.
    private: bool,
}

/// The subscribers of one selector, and which topics it matched lately:
/// a selector is matched once per topic, not once per subscriber per
/// event.
struct Group {
    selector: Selector,
    subs: Vec<SubscriberSlot>,
    /// Topics seen, and whether the selector matches each; emptied when
    /// it holds [`MATCHES_KEPT`], so any topics arriving keep it bounded.
    matches: HashMap<Box<str>, bool>,
}

/// Most topics a [`Group`] remembers its answer for.
const MATCHES_KEPT: usize = 1024;
/// Most distinct selectors followed on a node at once: every publish
/// looks at each (and each keeps up to [`MATCHES_KEPT`] answers), so
/// clients that each ask for selectors of their own cannot make a publish
/// arbitrarily slow, nor the node's memory arbitrarily large.
pub(crate) const MAX_SELECTORS_FOLLOWED: usize = 1024;

impl Group {
    /// Whether the selector matches any of `topics`.
    fn matches_any(&mut self, topics: &[&str]) -> bool {
        topics.iter().any(|t| self.matches(t))
    }

    fn matches(&mut self, topic: &str) -> bool {
        if let Selector::All = self.selector {
            return true;
        }
        if let Some(m) = self.matches.get(topic) {
            return *m;
        }
        let m = self.selector.matches(topic);
        if self.matches.len() >= MATCHES_KEPT {
            self.matches.clear();
        }
        self.matches.insert(topic.into(), m);
        m
    }
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
    /// From the Redis reader, which delivers every update once more, with
    /// its topics, for this node's subscribers by selector (see
    /// [`EVERY_TOPIC`]): those take the updates of the topics they name
    /// exactly from there too, never from the topics' own streams, so
    /// they get each update once and in order whatever the streams'
    /// timing.
    split: bool,
}

/// Updates of several topics a subscriber of several topics took lately
/// (the last [`RECENT`]): it takes each once, whichever of its topics
/// offers it first. With Redis the copies of a subscriber of exact topics
/// only may come apart, in the window where a topic new to this node
/// joins the reader (one by selector takes them all from one stream: see
/// `Update::split`).
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
    /// For [`EVERY_TOPIC`]: the update's topics, which selectors match.
    pub(crate) topics: Option<Box<[Box<str>]>>,
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
                groups: Vec::new(),
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

    /// Records that the engine has issued ids up to `id` (read where a
    /// subscriber joins, so a node that has delivered nothing yet names
    /// the newest id as a new subscriber's cursor).
    pub(crate) fn saw(&self, id: EventId) {
        let mut state = self.state();
        state.last_id = state.last_id.max(id);
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
        let mut state = self.state();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut n = 0;
        for topic in topics {
            for s in state.subscribers.get(*topic).into_iter().flatten() {
                let once = !s.queue.several || seen.insert(s.id);
                if once && (!private || s.private) {
                    n += 1;
                }
            }
        }
        for g in &mut state.groups {
            if !g.matches_any(topics) {
                continue;
            }
            for s in &g.subs {
                let once = !s.queue.several || seen.insert(s.id);
                if once && (!private || s.queue.allows_any(topics)) {
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
        let update = Update {
            id,
            frame,
            private,
            several: topics.len() > 1,
            split: false,
        };
        for topic in topics {
            state.fan_out(topic, update, self.config.queue, &mut out);
        }
        if !state.groups.is_empty() {
            state.fan_out_selectors(topics, update, self.config.queue, &mut out);
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
                split: true,
            };
            match &d.topics {
                Some(topics) => {
                    let topics: Vec<&str> = topics.iter().map(|t| &**t).collect();
                    state.fan_out_selectors(&topics, update, self.config.queue, &mut out);
                }
                None => state.fan_out(&d.topic, update, self.config.queue, &mut out),
            }
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
        let subs = if topic == EVERY_TOPIC {
            let groups = std::mem::take(&mut state.groups);
            groups.into_iter().flat_map(|g| g.subs).collect()
        } else {
            match state.subscribers.remove(topic) {
                Some(subs) => subs,
                None => return,
            }
        };
        state.forget_topic(topic);
        let mut wake = Vec::with_capacity(subs.len());
        for s in subs {
            s.queue.close_slow();
            if s.queue.several {
                state.remove_subscriber(s.id, &s.queue);
            }
            wake.push(s.queue);
        }
        drop(state);
        self.wakers.wake(wake);
    }

    /// Joins a new subscriber to what `interest` names (topics sorted and
    /// distinct, selectors distinct); returns its number and queue.
    /// `on_new(i, name)` is told, under the lock, of each topic that had no
    /// subscriber here (and, as topic `names.len()`, of [`EVERY_TOPIC`]
    /// when it is the first subscriber by selector here). With `resume`, live frames wait beside the
    /// subscriber until [`Node::resume_live`].
    ///
    /// # Errors
    ///
    /// [`HubError::Selectors`] when its selectors would take this node past
    /// [`MAX_SELECTORS_FOLLOWED`] distinct ones.
    pub(crate) fn join(
        &self,
        interest: &Interest<'_>,
        resume: bool,
        on_new: &mut dyn FnMut(usize, &str),
    ) -> Result<(u64, Arc<SubscriberQueue>), HubError> {
        let names = interest.names;
        let mut state = self.state();
        if !interest.selectors.is_empty() {
            state.room_for(interest.selectors)?;
        }
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
        let matching = match (interest.selectors, interest.privacy) {
            ([], Privacy::All | Privacy::Public) => None,
            (selectors, privacy) => state.matching(selectors, privacy),
        };
        let queue = SubscriberQueue::following(
            self.config.queue,
            self.config.queue_bytes,
            topics.into_boxed_slice(),
            *interest.privacy == Privacy::Public,
            matching,
        );
        for name in queue.topics.iter() {
            let private = queue.allows(name);
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
                    private,
                });
            }
        }
        if !queue.selectors().is_empty() {
            if state.groups.is_empty() {
                on_new(names.len(), EVERY_TOPIC);
            }
            state.join_groups(id, &queue, resume);
        }
        Ok((id, queue))
    }

    /// Ends the wait of a resuming subscriber whose replay covers up to
    /// `until`: the live frames that arrived meanwhile go to its queue if
    /// newer, in id order, and later ones up to `until` are skipped. Under
    /// the lock, so no live frame can pass them.
    pub(crate) fn resume_live(&self, id: u64, queue: &SubscriberQueue, until: EventId) {
        let mut state = self.state();
        let mut later: Vec<(EventId, EncodedEvent)> = Vec::new();
        let State {
            subscribers,
            groups,
            ..
        } = &mut *state;
        let mut end_wait = |list: &mut Vec<SubscriberSlot>| {
            let Some(slot) = list.iter_mut().find(|s| s.id == id) else {
                return; // dropped as slow meanwhile
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
        };
        for name in queue.topics.iter() {
            if let Some(list) = subscribers.get_mut(name) {
                end_wait(list);
            }
        }
        for g in groups.iter_mut() {
            if queue.selectors().contains(&g.selector) {
                end_wait(&mut g.subs);
            }
        }
        later.sort_unstable_by_key(|(id, _)| *id);
        later.dedup_by_key(|(id, _)| *id);
        for (_, frame) in &later {
            if matches!(queue.push(frame), Pushed::Slow) {
                break; // it drains what it has, then ends as slow
            }
        }
    }

    /// Removes subscriber `id` (of `queue`) from everything it follows.
    pub(crate) fn unsubscribe(&self, id: u64, queue: &SubscriberQueue) {
        self.state().remove_subscriber(id, queue);
    }
}

impl State {
    /// Whether the groups have room for `selectors` (distinct): `Err`
    /// when the new ones would pass [`MAX_SELECTORS_FOLLOWED`].
    #[cold]
    #[inline(never)]
    fn room_for(&self, selectors: &[Selector]) -> Result<(), HubError> {
        let new = selectors
            .iter()
            .filter(|s| !self.groups.iter().any(|g| g.selector == **s))
            .count();
        if self.groups.len() + new > MAX_SELECTORS_FOLLOWED {
            return Err(HubError::Selectors {
                max: MAX_SELECTORS_FOLLOWED,
            });
        }
        Ok(())
    }

    /// What a subscriber by `selectors`, or one whose private updates a
    /// grant decides, follows besides its topics: its selectors shared with
    /// the groups that have them already (one compiled automaton per
    /// distinct selector, not per subscriber). Out of line (see
    /// `join_groups`).
    #[cold]
    #[inline(never)]
    fn matching(&self, selectors: &[Selector], privacy: &Privacy) -> Option<Box<Matching>> {
        let shared: Vec<Selector> = selectors
            .iter()
            .map(|s| match self.groups.iter().find(|g| g.selector == *s) {
                Some(g) => g.selector.clone(),
                None => s.clone(),
            })
            .collect();
        Matching::of(&shared, privacy)
    }

    /// Adds subscriber `id` to the group of each of its queue's selectors.
    /// Out of line: most subscribers have none, and a subscribing stream
    /// thread keeps the stack pages it touches (see `Stream::follow`).
    #[cold]
    #[inline(never)]
    fn join_groups(&mut self, id: u64, queue: &Arc<SubscriberQueue>, resume: bool) {
        for selector in queue.selectors() {
            let slot = SubscriberSlot {
                id,
                queue: Arc::clone(queue),
                resume: resume.then(|| {
                    Box::new(Resume {
                        pending: Some(Vec::new()),
                        seen: EventId::floor_of(0),
                    })
                }),
                // Decided per update, by its topics.
                private: false,
            };
            match self.groups.iter_mut().find(|g| g.selector == *selector) {
                Some(g) => g.subs.push(slot),
                None => self.groups.push(Group {
                    selector: selector.clone(),
                    subs: vec![slot],
                    matches: HashMap::new(),
                }),
            }
        }
    }

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
        let mut dropped: Vec<(u64, Arc<SubscriberQueue>)> = Vec::new();
        let selectors = !self.groups.is_empty();
        let State {
            subscribers,
            recent,
            ..
        } = self;
        if let Some(subs) = subscribers.get_mut(topic) {
            subs.retain_mut(|s| {
                if s.resume.as_ref().is_some_and(|r| update.id <= r.seen)
                    || (update.private && !s.private)
                    || (update.split && !s.queue.selectors().is_empty())
                {
                    return true;
                }
                // A selector of its own may offer it this update again.
                let again = update.several || (selectors && s.queue.matching.is_some());
                offer(s, update, again, recent, limit, out, &mut dropped)
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
            self.remove_subscriber(id, &queue);
        }
    }

    /// Offers an update of `topics` to the subscribers of every selector
    /// that matches one of them (a private one to those whose grant covers
    /// one of them), after [`fan_out`](State::fan_out) offered it to those
    /// of each topic.
    fn fan_out_selectors(
        &mut self,
        topics: &[&str],
        update: Update<'_>,
        limit: usize,
        out: &mut FanOut,
    ) {
        let mut dropped: Vec<(u64, Arc<SubscriberQueue>)> = Vec::new();
        let State {
            groups,
            recent,
            subscribers,
            ..
        } = self;
        if update.split {
            // Its topics' subscribers by selector too (see `Update::split`).
            for topic in topics {
                for s in subscribers.get_mut(*topic).into_iter().flatten() {
                    if s.queue.selectors().is_empty()
                        || s.resume.as_ref().is_some_and(|r| update.id <= r.seen)
                        || (update.private && !s.private)
                    {
                        continue;
                    }
                    // One dropped as slow leaves every list below.
                    offer(s, update, true, recent, limit, out, &mut dropped);
                }
            }
        }
        for group in groups.iter_mut() {
            if !group.matches_any(topics) {
                continue;
            }
            group.subs.retain_mut(|s| {
                if s.resume.as_ref().is_some_and(|r| update.id <= r.seen)
                    || (update.private && !s.queue.allows_any(topics))
                {
                    return true;
                }
                offer(s, update, true, recent, limit, out, &mut dropped)
            });
        }
        for (id, queue) in dropped {
            self.remove_subscriber(id, &queue);
        }
        self.forget_empty_groups();
    }

    /// Drops selectors no subscriber follows any more; with the last,
    /// the engine stops following every topic.
    fn forget_empty_groups(&mut self) {
        let before = self.groups.len();
        self.groups.retain(|g| !g.subs.is_empty());
        if before > 0 && self.groups.is_empty() {
            self.forget_topic(EVERY_TOPIC);
        }
    }

    /// Removes subscriber `id` (of `queue`) from everything it follows.
    fn remove_subscriber(&mut self, id: u64, queue: &SubscriberQueue) {
        self.recent.remove(&id);
        for topic in queue.topics.iter() {
            if let Some(subs) = self.subscribers.get_mut(topic) {
                subs.retain(|s| s.id != id);
                if subs.is_empty() {
                    self.subscribers.remove(topic);
                    self.forget_topic(topic);
                }
            }
        }
        if !queue.selectors().is_empty() {
            for group in &mut self.groups {
                if queue.selectors().contains(&group.selector) {
                    group.subs.retain(|s| s.id != id);
                }
            }
            self.forget_empty_groups();
        }
    }
}

/// Offers `update` to the subscriber in `s`; false when it was dropped as
/// slow (it leaves the list; one of several topics is noted in
/// `dropped`, to leave the others). With `again`, the update may have
/// been offered to it already: a subscriber of several topics or
/// selectors takes it once (see [`Recent`]).
fn offer(
    s: &mut SubscriberSlot,
    update: Update<'_>,
    again: bool,
    recent: &mut HashMap<u64, Recent>,
    limit: usize,
    out: &mut FanOut,
    dropped: &mut Vec<(u64, Arc<SubscriberQueue>)>,
) -> bool {
    let Update { id, frame, .. } = update;
    if again && s.queue.several && !recent.entry(s.id).or_default().first(id) {
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
            // Closed: it drains what it has, then ends as slow and its
            // client resumes from history.
            out.wake.push(Arc::clone(&s.queue));
            if s.queue.several {
                dropped.push((s.id, Arc::clone(&s.queue)));
            }
            false
        }
    }
}
