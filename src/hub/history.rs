//! History: what a hub keeps of each topic for replay, behind the
//! [`History`] trait, and [`MemoryHistory`], the store in memory.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use crate::event::EncodedEvent;
use crate::hub::id::{EventId, now_ms};

/// An event as kept in history: its id, its encoded frame, and whether it
/// is private.
#[derive(Debug, Clone)]
pub struct Retained {
    /// The event's id.
    pub id: EventId,
    /// The frame, id line included, as every subscriber receives it.
    pub frame: EncodedEvent,
    /// A private update: replayed only to subscriptions that may receive
    /// private updates (see [`Hub::publish_private`](crate::Hub::publish_private)).
    pub private: bool,
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

/// A page of the replay of a subscription by selector: the retained
/// updates of every topic it wants, in id order (see
/// [`History::page_every`]).
#[derive(Debug)]
pub struct EveryPage {
    /// The updates wanted, oldest first, each once; `private` set on those
    /// the subscription may not see (they still move the replay on).
    pub events: Vec<Retained>,
    /// The newest id looked at: the next page goes on after it.
    pub to: EventId,
    /// Whether updates after the id asked may be missing.
    pub gap: bool,
    /// The oldest retained id, if known (for the reset notice).
    pub oldest: Option<EventId>,
    /// Nothing is left up to the bound asked.
    pub done: bool,
}

/// A store could not keep or read what it was given (a disk or database
/// error); the hub refuses the operation rather than acknowledge it.
#[derive(Debug)]
pub struct StorageError(Box<dyn std::error::Error + Send + Sync>);

impl StorageError {
    /// Wraps the store's own error.
    pub fn new(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        StorageError(source.into())
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("storage failed")
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// Where a hub keeps the recent events of each topic.
///
/// Called with the local engine's lock held, so implementations need no
/// locking of their own and see appends in id order.
pub trait History: Send + 'static {
    /// Keeps `event` as the newest event of `topic`, evicting the oldest
    /// past the store's bound.
    ///
    /// # Errors
    ///
    /// When the store cannot keep it: the hub then neither delivers the
    /// event nor acknowledges it ([`HubError::Storage`](crate::HubError::Storage)).
    fn append(&mut self, topic: &str, event: Retained) -> Result<(), StorageError>;

    /// Every retained event of `topic` with an id above `after`.
    fn since(&self, topic: &str, after: EventId) -> Replay;

    /// At most `max` retained events of `topic` with ids above `after` and
    /// at most `until`, oldest first, with `gap` and `oldest` as for
    /// [`since`](History::since). A stream replays history a page at a
    /// time, so what it holds does not grow with the history: override
    /// this when `since` copies more than the page. Default: `since`,
    /// trimmed.
    fn page(&self, topic: &str, after: EventId, until: EventId, max: usize) -> Replay {
        let mut replay = self.since(topic, after);
        replay.events.retain(|e| e.id <= until);
        replay.events.truncate(max);
        replay
    }

    /// The id of the earliest retained event whose frame carries `alias`
    /// as its id (a publisher-given id, see
    /// [`Hub::publish_with_id`](crate::Hub::publish_with_id)): where a
    /// resume from that id starts. It must not look through history to
    /// answer (anyone may resume from any id): a store keeps the ids
    /// publishers gave as it appends. Default: none (such a resume gets
    /// the reset notice and everything retained).
    fn id_of(&self, alias: &str) -> Option<EventId> {
        let _ = alias;
        None
    }

    /// Up to `max` retained updates with ids above `after` and at most
    /// `until`, of every topic `wanted` answers for (`Some(true)`: its
    /// private updates may be seen too), in id order and each once: a
    /// page of the replay of a subscription by selector (`*`, a URI
    /// template). It looks at a bounded number of updates per call, so a
    /// page may come back with few or none and not [`done`](EveryPage::done).
    /// `first` is the replay's first page (the one that must tell whether
    /// anything after `after` was lost). Default: `None`, the store keeps
    /// no order across topics (such a subscription then replays only the
    /// topics it names exactly).
    fn page_every(
        &self,
        after: EventId,
        until: EventId,
        max: usize,
        first: bool,
        wanted: &mut dyn FnMut(&str) -> Option<bool>,
    ) -> Option<EveryPage> {
        let _ = (after, until, max, first, wanted);
        None
    }

    /// The newest id this store has ever issued or restored, if any; the hub
    /// continues after it.
    fn last_id(&self) -> Option<EventId> {
        None
    }

    /// Bytes of memory the retained events take, their bookkeeping
    /// included: what counts against the hub's budget
    /// ([`HubConfig::max_retained_bytes`](crate::HubConfig)). Default 0 (a
    /// store that keeps nothing in this process).
    fn retained_bytes(&self) -> u64 {
        0
    }

    /// Drops the oldest retained events, across all topics, until the
    /// store holds at most `bytes` ([`retained_bytes`](History::retained_bytes));
    /// returns how many it dropped. A resume from before a dropped event
    /// then gets the reset notice, as after any eviction. Default: drops
    /// nothing.
    ///
    /// # Errors
    ///
    /// When the store cannot drop them (the hub logs it and goes on).
    fn shrink_to(&mut self, bytes: u64) -> Result<u64, StorageError> {
        let _ = bytes; // nothing kept here, nothing to drop
        Ok(0)
    }
}

/// Bytes counted for each retained event besides its frame: the frame's
/// reference counts and its allocation's header, and its entry in the
/// order of all events (id and topic, in a B-tree's node). Its place in
/// the topic's queue is counted with the queue's capacity (see [`SLOT`]).
pub(crate) const EVENT_OVERHEAD: u64 = 80;
/// Bytes counted for each publisher-given id kept besides its text: its
/// map entry and allocation.
const ALIAS_OVERHEAD: u64 = 64;
/// Most updates one [`History::page_every`] call looks at (a page by
/// selector among many topics it does not want still ends soon: the
/// store's lock is held while it reads).
const EVERY_SCAN: usize = 4096;
/// Bytes counted for each topic with retained events besides its name:
/// its map entry, its queue and its place in the eviction order.
pub(crate) const TOPIC_OVERHEAD: u64 = 160;

/// The default [`History`]: the last `capacity` events of each topic in
/// memory; nothing survives a restart.
///
/// It counts the bytes it holds ([`History::retained_bytes`]) and drops
/// the globally oldest events first when asked to shrink
/// ([`History::shrink_to`]). A topic whose last event is gone is forgotten
/// altogether, so topics published once and never again cost nothing for
/// long: a resume on a forgotten topic gets the reset notice if it asks
/// for anything at or before the newest id dropped that way.
#[derive(Debug)]
pub struct MemoryHistory {
    capacity: usize,
    /// Below this id the store knows nothing (events before the process
    /// started).
    floor: EventId,
    /// The newest id dropped from a topic that was then forgotten: any
    /// topic not known here may have lost events up to it.
    forgotten: Option<EventId>,
    topics: HashMap<Arc<str>, TopicHistory>,
    /// Every retained event, as its id and topic, in id order: the first
    /// is the oldest of all, the next to go when the store shrinks, and a
    /// replay by selector reads it in order ([`History::page_every`]).
    index: BTreeSet<(EventId, Arc<str>)>,
    /// Publisher-given ids of retained events, each to the earliest
    /// event that carries it ([`History::id_of`]).
    aliases: HashMap<Box<str>, EventId>,
    /// The newest id evicted from any topic.
    evicted_newest: Option<EventId>,
    /// Bytes held: frames, [`EVENT_OVERHEAD`] per event, names and
    /// [`TOPIC_OVERHEAD`] per topic, publisher ids.
    bytes: u64,
}

#[derive(Debug, Default)]
struct TopicHistory {
    events: VecDeque<Retained>,
    /// The newest id evicted from this topic.
    evicted: Option<EventId>,
}

/// Bytes of one place in a topic's queue, counted for every place the
/// queue has, used or not.
const SLOT: u64 = std::mem::size_of::<Retained>() as u64;

fn event_cost(event: &Retained) -> u64 {
    event.frame.as_bytes().len() as u64 + EVENT_OVERHEAD
}

fn topic_cost(name: &str) -> u64 {
    name.len() as u64 + TOPIC_OVERHEAD
}

/// What `wanted` answers for `topic`, asked once (`known` keeps it).
fn ask<'a>(
    known: &mut HashMap<&'a str, Option<bool>>,
    wanted: &mut dyn FnMut(&str) -> Option<bool>,
    topic: &'a str,
) -> Option<bool> {
    *known.entry(topic).or_insert_with(|| wanted(topic))
}

/// The publisher-given id `event`'s frame carries, if any (the hub's own
/// ids read as `<ms>-<seq>`, which a publisher's may not).
fn alias_of(event: &Retained) -> Option<&str> {
    event
        .frame
        .id()
        .filter(|id| !id.is_empty() && id.parse::<EventId>().is_err())
}

/// What one eviction took: the topic, the id, and whether the topic was
/// forgotten with it (no event left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Evicted {
    pub topic: Arc<str>,
    pub id: EventId,
    pub forgotten: bool,
}

impl MemoryHistory {
    /// Keeps the last `capacity` events per topic (0 keeps none).
    pub fn new(capacity: usize) -> Self {
        MemoryHistory::with_floor(capacity, EventId::floor_of(now_ms()))
    }

    /// A cache for a store that knows every event from `floor` on (a
    /// durable store: from its creation), so it signals no gap above it.
    pub(crate) fn with_floor(capacity: usize, floor: EventId) -> Self {
        MemoryHistory {
            capacity,
            floor,
            forgotten: None,
            topics: HashMap::new(),
            index: BTreeSet::new(),
            aliases: HashMap::new(),
            evicted_newest: None,
            bytes: 0,
        }
    }

    /// The newest id that appending `id` to `topic` would evict (`id`
    /// itself when nothing is kept): what a durable store must delete in
    /// the same write.
    #[cfg(feature = "durable")]
    pub(crate) fn evicts(&self, topic: &str, id: EventId) -> Option<EventId> {
        if self.capacity == 0 {
            return Some(id);
        }
        let events = &self.topics.get(topic)?.events;
        let over = (events.len() + 1).checked_sub(self.capacity)?;
        events.get(over.checked_sub(1)?).map(|e| e.id)
    }

    /// Records that `topic` lost its events up to `id` before this cache
    /// was filled (restored from a store). Call
    /// [`forget_empty`](MemoryHistory::forget_empty) once filled.
    #[cfg(feature = "durable")]
    pub(crate) fn note_evicted(&mut self, topic: &str, id: EventId) {
        self.ensure_topic(topic);
        if let Some(t) = self.topics.get_mut(topic) {
            t.evicted = t.evicted.max(Some(id));
        }
        self.evicted_newest = self.evicted_newest.max(Some(id));
    }

    /// Records that topics no longer known lost events up to `id`
    /// (restored from a store).
    #[cfg(feature = "durable")]
    pub(crate) fn note_forgotten(&mut self, id: EventId) {
        self.forgotten = self.forgotten.max(Some(id));
        self.evicted_newest = self.evicted_newest.max(Some(id));
    }

    /// The newest id dropped from a forgotten topic, if any.
    #[cfg(feature = "durable")]
    pub(crate) fn forgotten(&self) -> Option<EventId> {
        self.forgotten
    }

    /// Forgets every topic without events (after a restore); returns their
    /// names.
    #[cfg(feature = "durable")]
    pub(crate) fn forget_empty(&mut self) -> Vec<Arc<str>> {
        let empty: Vec<Arc<str>> = self
            .topics
            .iter()
            .filter(|(_, t)| t.events.is_empty())
            .map(|(name, _)| Arc::clone(name))
            .collect();
        for name in &empty {
            self.forget(name);
        }
        empty
    }

    /// Makes `topic`'s entry if it is missing. A new topic starts as having
    /// lost what forgotten topics lost: it may be one of them.
    fn ensure_topic(&mut self, topic: &str) {
        if !self.topics.contains_key(topic) {
            self.bytes += topic_cost(topic);
            let entry = TopicHistory {
                events: VecDeque::new(),
                evicted: self.forgotten,
            };
            self.topics.insert(Arc::from(topic), entry);
        }
    }

    /// Drops `topic`'s entry (it holds no event).
    fn forget(&mut self, topic: &str) {
        if let Some(t) = self.topics.remove(topic) {
            let slots = t.events.capacity() as u64 * SLOT;
            self.bytes = self.bytes.saturating_sub(topic_cost(topic) + slots);
            self.forgotten = self.forgotten.max(t.evicted);
        }
    }

    /// Counts a change of a topic's queue capacity from `before` places.
    fn resized(&mut self, before: usize, after: usize) {
        let (before, after) = (before as u64 * SLOT, after as u64 * SLOT);
        self.bytes = (self.bytes + after).saturating_sub(before);
    }

    /// Removes the oldest event of `topic`; `None` if it has none.
    fn pop_oldest(&mut self, topic: &Arc<str>) -> Option<Evicted> {
        let t = self.topics.get_mut(topic)?;
        let old = t.events.pop_front()?;
        t.evicted = t.evicted.max(Some(old.id));
        // A queue that shrank well below its capacity gives the rest back:
        // a topic whose history the budget cut keeps no room for it.
        let cap = t.events.capacity();
        if cap > 16 && t.events.len() < cap / 4 {
            t.events.shrink_to(t.events.len() * 2);
        }
        let now = t.events.capacity();
        let empty = t.events.is_empty();
        self.resized(cap, now);
        self.bytes = self.bytes.saturating_sub(event_cost(&old));
        self.evicted_newest = self.evicted_newest.max(Some(old.id));
        self.index.remove(&(old.id, Arc::clone(topic)));
        self.unalias(&old);
        if empty {
            self.forget(topic);
        }
        let forgotten = empty;
        Some(Evicted {
            topic: Arc::clone(topic),
            id: old.id,
            forgotten,
        })
    }

    /// Remembers that the event `id` carries the publisher-given `alias`
    /// (the earliest such event wins).
    fn alias(&mut self, alias: Box<str>, id: EventId) {
        match self.aliases.get_mut(&alias) {
            Some(known) => *known = (*known).min(id),
            None => {
                self.bytes += alias.len() as u64 + ALIAS_OVERHEAD;
                self.aliases.insert(alias, id);
            }
        }
    }

    /// Forgets the publisher-given id of `old`, just evicted, once no
    /// topic retains that event (an update of several topics is in each).
    /// A later event with the same id is not looked for: a resume from it
    /// then gets the reset notice.
    fn unalias(&mut self, old: &Retained) {
        let Some(alias) = alias_of(old) else { return };
        if self.aliases.get(alias) != Some(&old.id) {
            return;
        }
        let held = self
            .index
            .range((old.id, Arc::<str>::from(""))..)
            .next()
            .is_some_and(|(id, _)| *id == old.id);
        if !held {
            self.aliases.remove(alias);
            self.bytes = self
                .bytes
                .saturating_sub(alias.len() as u64 + ALIAS_OVERHEAD);
        }
    }

    /// Keeps `event` as the newest of `topic` (what [`History::append`]
    /// does, infallibly).
    pub(crate) fn push(&mut self, topic: &str, event: Retained) {
        if self.capacity == 0 {
            // Nothing is kept: the topic is forgotten at once.
            self.forgotten = self.forgotten.max(Some(event.id));
            self.evicted_newest = self.evicted_newest.max(Some(event.id));
            if let Some(t) = self.topics.get_mut(topic) {
                t.evicted = t.evicted.max(Some(event.id));
                if t.events.is_empty() {
                    self.forget(topic);
                }
            }
            return;
        }
        let (id, cost) = (event.id, event_cost(&event));
        self.ensure_topic(topic);
        let Some(name) = self.topics.get_key_value(topic).map(|(k, _)| Arc::clone(k)) else {
            return; // made just above
        };
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        let cap = t.events.capacity();
        let alias: Option<Box<str>> = alias_of(&event).map(Into::into);
        t.events.push_back(event);
        let now = t.events.capacity();
        let mut over = t.events.len().saturating_sub(self.capacity);
        self.bytes += cost;
        self.resized(cap, now);
        self.index.insert((id, Arc::clone(&name)));
        if let Some(alias) = alias {
            self.alias(alias, id);
        }
        while over > 0 && self.pop_oldest(&name).is_some() {
            over -= 1;
        }
    }

    /// Drops the oldest events of all topics until at most `bytes` are
    /// held; returns what it dropped, oldest first.
    pub(crate) fn shrink(&mut self, bytes: u64) -> Vec<Evicted> {
        let mut out = Vec::new();
        while self.bytes > bytes {
            let Some((id, topic)) = self.index.first().cloned() else {
                break;
            };
            match self.pop_oldest(&topic) {
                Some(e) => out.push(e),
                None => {
                    // Not expected: an entry without its event. Drop it
                    // rather than loop.
                    self.index.remove(&(id, topic));
                }
            }
        }
        out
    }
}

impl History for MemoryHistory {
    fn append(&mut self, topic: &str, event: Retained) -> Result<(), StorageError> {
        self.push(topic, event);
        Ok(())
    }

    fn since(&self, topic: &str, after: EventId) -> Replay {
        self.page(topic, after, EventId::MAX, usize::MAX)
    }

    fn page(&self, topic: &str, after: EventId, until: EventId, max: usize) -> Replay {
        let Some(t) = self.topics.get(topic) else {
            return Replay {
                gap: after < self.floor || self.forgotten.is_some_and(|f| f > after),
                ..Replay::default()
            };
        };
        let start = t.events.partition_point(|e| e.id <= after);
        Replay {
            events: t
                .events
                .range(start..)
                .take_while(|e| e.id <= until)
                .take(max)
                .cloned()
                .collect(),
            gap: after < self.floor || t.evicted.is_some_and(|ev| ev > after),
            oldest: t.events.front().map(|e| e.id),
        }
    }

    fn id_of(&self, alias: &str) -> Option<EventId> {
        self.aliases.get(alias).copied()
    }

    fn page_every(
        &self,
        after: EventId,
        until: EventId,
        max: usize,
        first: bool,
        wanted: &mut dyn FnMut(&str) -> Option<bool>,
    ) -> Option<EveryPage> {
        // What each topic met is to the replay, asked once per page.
        let mut known: HashMap<&str, Option<bool>> = HashMap::new();
        let mut want = |t| ask(&mut known, wanted, t);
        let mut page = EveryPage {
            events: Vec::new(),
            to: after,
            gap: after < self.floor || self.forgotten.is_some_and(|f| f > after),
            oldest: self.index.first().map(|(id, _)| *id),
            done: true,
        };
        // Lost since `after`: on the first page, any topic wanted that
        // dropped events after it (looked for only when some topic did);
        // later, the topics the page meets (events dropped while the
        // replay runs).
        if first && !page.gap && self.evicted_newest.is_some_and(|e| e > after) {
            page.gap = self
                .topics
                .iter()
                .any(|(name, t)| t.evicted.is_some_and(|e| e > after) && want(name).is_some());
        }
        let start = (after.succ(), Arc::<str>::from(""));
        for (looked, (id, topic)) in self.index.range(start..).enumerate() {
            if *id > until {
                break;
            }
            if *id != page.to && (looked >= EVERY_SCAN || page.events.len() >= max) {
                // Stops between updates, never inside one.
                page.done = false;
                break;
            }
            page.to = *id;
            let Some(seen) = want(topic) else { continue };
            let Some(t) = self.topics.get(topic) else {
                continue;
            };
            page.gap |= t.evicted.is_some_and(|e| e > after);
            let at = t.events.partition_point(|e| e.id < *id);
            let Some(event) = t.events.get(at).filter(|e| e.id == *id) else {
                continue;
            };
            let hidden = event.private && !seen;
            match page.events.last_mut() {
                // Another topic of the same update: seen if either lets it be.
                Some(last) if last.id == *id => last.private &= hidden,
                _ => page.events.push(Retained {
                    private: hidden,
                    ..event.clone()
                }),
            }
        }
        Some(page)
    }

    fn retained_bytes(&self) -> u64 {
        self.bytes
    }

    fn shrink_to(&mut self, bytes: u64) -> Result<u64, StorageError> {
        Ok(self.shrink(bytes).len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn event(id: EventId, data: &str) -> Retained {
        Retained {
            id,
            frame: Event::new()
                .id(id.to_string())
                .data(data)
                .encode_shared()
                .expect("valid"),
            private: false,
        }
    }

    #[cfg(feature = "durable")]
    #[test]
    fn evicts_names_what_an_append_pushes_out() {
        let id = |i: u64| EventId::new(100 + i, 0);
        let filled = |capacity: usize, n: u64| {
            let mut h = MemoryHistory::with_floor(capacity, EventId::floor_of(0));
            for i in 0..n {
                h.push(
                    "t",
                    Retained {
                        id: id(i),
                        frame: Event::new().data("x").encode_shared().expect("valid"),
                        private: false,
                    },
                );
            }
            h
        };
        // (capacity, events already kept, what appending id(9) evicts)
        for (capacity, n, want) in [
            (0, 0, Some(id(9))),
            (1, 0, None),
            (1, 1, Some(id(0))),
            (3, 2, None),
            (3, 3, Some(id(0))),
        ] {
            assert_eq!(
                filled(capacity, n).evicts("t", id(9)),
                want,
                "capacity {capacity}, {n} kept"
            );
        }
        let mut h = filled(3, 3);
        h.note_evicted("t", id(0));
        assert!(h.since("t", EventId::floor_of(50)).gap);
        assert!(!h.since("t", id(0)).gap, "nothing after id(0) is missing");
    }

    #[test]
    fn bytes_count_frames_names_and_bookkeeping() {
        let mut h = MemoryHistory::with_floor(10, EventId::floor_of(0));
        let a = event(EventId::new(1, 0), "aaaa");
        let b = event(EventId::new(2, 0), "bb");
        let want = topic_cost("t")
            + a.frame.as_bytes().len() as u64
            + b.frame.as_bytes().len() as u64
            + 2 * EVENT_OVERHEAD;
        h.push("t", a);
        h.push("t", b);
        let slots = h.topics["t"].events.capacity() as u64 * SLOT;
        assert_eq!(h.retained_bytes(), want + slots);
        assert_eq!(h.shrink(0).len(), 2);
        assert_eq!(h.retained_bytes(), 0, "the empty topic is forgotten too");
        assert!(h.topics.is_empty() && h.index.is_empty());
    }

    #[test]
    fn a_topic_cut_down_gives_back_its_queue_and_counts_what_it_keeps() {
        let mut h = MemoryHistory::with_floor(1000, EventId::floor_of(0));
        for i in 0..1000u64 {
            h.push("t", event(EventId::new(i + 1, 0), "x"));
        }
        let full = h.topics["t"].events.capacity();
        assert!(full >= 1000);
        let one = h.retained_bytes() / 1000;
        h.shrink(one * 10);
        let t = &h.topics["t"];
        assert!(t.events.capacity() < 64, "capacity {}", t.events.capacity());
        // What is counted is what is held: the frames, the names and every
        // place of the queue, used or not.
        let frames: u64 = t.events.iter().map(event_cost).sum();
        let slots = t.events.capacity() as u64 * SLOT;
        assert_eq!(h.retained_bytes(), frames + slots + topic_cost("t"));
    }

    #[test]
    fn shrinking_drops_the_oldest_events_of_all_topics_first() {
        let mut h = MemoryHistory::with_floor(100, EventId::floor_of(0));
        for i in 0..30 {
            let topic = ["a", "b", "c"][i % 3];
            h.push(topic, event(EventId::new(10 + i as u64, 0), "x"));
        }
        let one = event(EventId::new(10, 0), "x");
        let per_event = one.frame.as_bytes().len() as u64 + EVENT_OVERHEAD;
        let before = h.retained_bytes();
        let dropped = h.shrink(before - 10 * per_event);
        let ids: Vec<u64> = dropped.iter().map(|e| e.id.millis()).collect();
        assert_eq!(
            ids,
            (10..20).collect::<Vec<_>>(),
            "oldest first, across topics"
        );
        assert!(h.retained_bytes() <= before - 10 * per_event);
        // Resuming from before the drop finds the gap; after it, none.
        assert!(h.since("a", EventId::new(9, 0)).gap);
        assert!(!h.since("a", EventId::new(19, 0)).gap);
        assert_eq!(h.since("b", EventId::new(19, 0)).events.len(), 7);
    }

    #[test]
    fn topics_that_lose_their_last_event_are_forgotten_but_not_their_gap() {
        let mut h = MemoryHistory::with_floor(10, EventId::floor_of(0));
        for i in 0..1000u64 {
            h.push(&format!("once-{i}"), event(EventId::new(100 + i, 0), "x"));
        }
        h.shrink(0);
        assert!(h.topics.is_empty(), "nothing is kept per forgotten topic");
        // Any topic it no longer knows may have lost events up to the
        // newest dropped: resuming from before it gets the notice.
        assert!(h.since("once-5", EventId::new(99, 0)).gap);
        assert!(h.since("never", EventId::new(500, 0)).gap);
        assert!(!h.since("never", EventId::new(1099, 0)).gap);
        // A topic published again starts knowing that too.
        h.push("once-5", event(EventId::new(2000, 0), "again"));
        assert!(h.since("once-5", EventId::new(99, 0)).gap);
        assert!(!h.since("once-5", EventId::new(1099, 0)).gap);
    }

    #[test]
    fn with_nothing_kept_no_topic_is_remembered() {
        let mut h = MemoryHistory::with_floor(0, EventId::floor_of(0));
        for i in 0..1000u64 {
            h.push(&format!("t{i}"), event(EventId::new(100 + i, 0), "x"));
        }
        assert_eq!(h.retained_bytes(), 0);
        assert!(h.topics.is_empty());
        assert!(h.since("t3", EventId::new(102, 0)).gap);
    }

    /// `(millis, private)` of a page by selector.
    fn every(
        h: &MemoryHistory,
        after: u64,
        max: usize,
        first: bool,
        wanted: &mut dyn FnMut(&str) -> Option<bool>,
    ) -> (Vec<(u64, bool)>, EveryPage) {
        let page = h
            .page_every(EventId::new(after, 0), EventId::MAX, max, first, wanted)
            .expect("kept in order");
        let ids = page
            .events
            .iter()
            .map(|e| (e.id.millis(), e.private))
            .collect();
        (ids, page)
    }

    #[test]
    fn a_page_by_selector_reads_every_topic_in_id_order_each_update_once() {
        let mut h = MemoryHistory::with_floor(100, EventId::floor_of(0));
        for i in 1..=6u64 {
            let topic = ["a", "b", "c"][i as usize % 3];
            h.push(topic, event(EventId::new(i, 0), "x"));
        }
        // An update of a and b, private: seen through a, not through b.
        let mut secret = event(EventId::new(7, 0), "s");
        secret.private = true;
        h.push("a", secret.clone());
        h.push("b", secret);
        let mut wanted = |t: &str| match t {
            "a" => Some(true),
            "b" => Some(false),
            _ => None,
        };
        let (ids, page) = every(&h, 0, 100, true, &mut wanted);
        assert_eq!(
            ids,
            [(1, false), (3, false), (4, false), (6, false), (7, false)]
        );
        assert!(page.done && !page.gap);
        assert_eq!(page.to, EventId::new(7, 0));
        let mut only_b = |t: &str| (t == "b").then_some(false);
        let (ids, _) = every(&h, 0, 100, true, &mut only_b);
        assert_eq!(
            ids,
            [(1, false), (4, false), (7, true)],
            "hidden, still read"
        );
        // A full page stops between two updates, and goes on from there.
        let (ids, page) = every(&h, 0, 2, true, &mut wanted);
        assert_eq!(ids, [(1, false), (3, false)]);
        assert!(!page.done);
        let (ids, _) = every(&h, page.to.millis(), 2, false, &mut wanted);
        assert_eq!(ids, [(4, false), (6, false)]);
    }

    #[test]
    fn a_page_by_selector_looks_at_a_bounded_number_of_updates() {
        let mut h = MemoryHistory::with_floor(10, EventId::floor_of(0));
        let n = EVERY_SCAN as u64 * 2;
        for i in 1..=n {
            h.push(&format!("t{i}"), event(EventId::new(i, 0), "x"));
        }
        h.push("wanted", event(EventId::new(n + 1, 0), "x"));
        let mut wanted = |t: &str| (t == "wanted").then_some(false);
        let (mut after, mut pages) = (0, 0);
        let found = loop {
            let (ids, page) = every(&h, after, 100, after == 0, &mut wanted);
            pages += 1;
            assert!(page.to.millis() - after <= EVERY_SCAN as u64);
            if page.done {
                break ids;
            }
            assert!(ids.is_empty());
            after = page.to.millis();
        };
        assert_eq!(found, [(n + 1, false)]);
        assert_eq!(pages, 3);
    }

    #[test]
    fn a_page_by_selector_tells_of_what_its_topics_lost_not_others() {
        let mut h = MemoryHistory::with_floor(2, EventId::floor_of(0));
        for i in 1..=4u64 {
            h.push("busy", event(EventId::new(i, 0), "x"));
        }
        h.push("calm", event(EventId::new(5, 0), "x"));
        let mut calm = |t: &str| (t == "calm").then_some(false);
        let (ids, page) = every(&h, 0, 100, true, &mut calm);
        assert_eq!(ids, [(5, false)]);
        assert!(!page.gap, "busy lost events, calm did not");
        let mut busy = |t: &str| (t == "busy").then_some(false);
        assert!(every(&h, 0, 100, true, &mut busy).1.gap);
        assert!(!every(&h, 2, 100, true, &mut busy).1.gap);
    }

    #[test]
    fn publisher_ids_are_found_while_an_event_carries_them() {
        let aliased = |id: u64, alias: &str| Retained {
            id: EventId::new(id, 0),
            frame: Event::new()
                .id(alias)
                .data("x")
                .encode_shared()
                .expect("valid"),
            private: false,
        };
        let mut h = MemoryHistory::with_floor(1, EventId::floor_of(0));
        h.push("a", aliased(1, "urn:1"));
        h.push("b", aliased(1, "urn:1"));
        h.push("a", aliased(2, "urn:1"));
        assert_eq!(h.id_of("urn:1"), Some(EventId::new(1, 0)), "the earliest");
        assert_eq!(h.id_of("1-0"), None, "the hub's own ids are not kept");
        assert!(h.aliases.len() == 1);
        // Still in b: still found.
        h.push("a", aliased(3, "urn:3"));
        assert_eq!(h.id_of("urn:1"), Some(EventId::new(1, 0)));
        h.push("b", aliased(4, "urn:4"));
        assert_eq!(h.id_of("urn:1"), None, "gone from every topic");
        h.shrink(0);
        assert!(h.aliases.is_empty());
        assert_eq!(h.retained_bytes(), 0);
    }

    #[test]
    fn an_update_of_several_topics_is_dropped_from_each_when_shrinking() {
        let mut h = MemoryHistory::with_floor(10, EventId::floor_of(0));
        for i in 1..=3u64 {
            h.push("a", event(EventId::new(i, 0), "x"));
            h.push("b", event(EventId::new(i, 0), "x"));
        }
        assert_eq!(h.shrink(0).len(), 6);
        assert!(h.topics.is_empty() && h.index.is_empty());
        assert_eq!(h.retained_bytes(), 0);
    }

    #[test]
    fn a_page_stops_at_its_bound_and_its_size() {
        let mut h = MemoryHistory::with_floor(100, EventId::floor_of(0));
        for i in 0..50u64 {
            h.push("t", event(EventId::new(i + 1, 0), "x"));
        }
        let page = h.page("t", EventId::new(10, 0), EventId::new(40, 0), 5);
        let ids: Vec<u64> = page.events.iter().map(|e| e.id.millis()).collect();
        assert_eq!(ids, [11, 12, 13, 14, 15]);
        let page = h.page("t", EventId::new(38, 0), EventId::new(40, 0), 5);
        assert_eq!(page.events.len(), 2);
    }
}
