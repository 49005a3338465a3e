//! [`Hub`]: topics, history and replay, keyed mailboxes.
//!
//! An embedding program uses [`Hub`] and [`Subscription`] (also at the
//! crate root). What else is public here is for those who give a hub a
//! store of their own: the [`History`] and [`MailboxStore`] traits and
//! their types, and the two engines ssed ships besides memory, [`store`]
//! (SQLite, feature `durable`) and [`redis`].
//!
//! How the parts fit, each file using only those listed before it:
//! `id.rs` event ids, topics and names; `history.rs` the [`History`] trait and
//! [`MemoryHistory`]; `mailbox.rs` the mailboxes; `fanout.rs` the
//! subscribers' queues and the waker threads; `config.rs` the settings,
//! results and errors; `node.rs` what every engine shares on this node
//! (each topic's subscribers, under the lock that orders fan-out);
//! `replay.rs` a replay, read a page at a time; `engine.rs` the one
//! interface to where events and messages are kept, and its two engines,
//! `local.rs` (memory, or any store behind the traits) and `redis/`;
//! `subscription.rs` a [`Subscription`]; this file the [`Hub`], which checks
//! topics, keys and events and hands every operation on events and messages to
//! its engine; `store.rs`
//! the SQLite store; `follow.rs` a [`Stream`](crate::Stream) following a
//! subscription or consuming a mailbox.
//!
//! Ordering: the local engine holds its lock to assign the next id, append
//! to history and offer the encoded frame to every subscriber's queue (the
//! node's lock inside); a subscribe holds it to join its topics and copy
//! the history it must replay. So a subscriber sees every event exactly
//! once, in id order, with no gap between replay and live events, and
//! events of several topics interleave in id order. With Redis the ids come
//! from Redis and the node's reader delivers them in id order; a resuming
//! subscriber's live frames wait beside it until its replay's end is fixed,
//! and are kept only if newer. Fan-out
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

mod config;
mod engine;
pub(crate) mod fanout;
mod follow;
pub mod grant;
pub(crate) mod history;
pub(crate) mod id;
mod local;
pub(crate) mod mailbox;
mod nfa;
mod node;
pub mod redis;
mod replay;
#[cfg(feature = "durable")]
pub mod store;
mod subscription;
pub mod urlpattern;
pub(crate) mod worker;

pub use config::{EARLIEST, HubConfig, HubError, HubUsage, MAX_ID_LEN, Published, RESET_EVENT};
pub use grant::{Privacy, Selector};
pub use history::{EveryPage, History, MemoryHistory, Replay, Retained, StorageError};
pub use id::{EventId, ParseIdError, valid_name, valid_topic};
pub use mailbox::{MailboxStore, StoredMessage};
pub use subscription::Subscription;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::event::Event;
use crate::hub::config::RedisState;
use crate::hub::engine::{Engine, Interest, Joined, Shared, Taken};
use crate::hub::local::Local;
use crate::hub::mailbox::Mailboxes;
use crate::hub::node::Node;
use crate::hub::redis::engine::RedisEngine;
use crate::hub::redis::resp::RedisUrl;

/// Most topics one update may have ([`Hub::publish_update`]).
pub const MAX_UPDATE_TOPICS: usize = 64;

/// How often expired mailbox messages are swept, at most and at least
/// (within these, the mailbox TTL).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const SWEEP_MIN: Duration = Duration::from_secs(1);

/// The engine of the daemon, usable by an embedding app from any thread:
/// topics (created on first use) with history, and keyed mailboxes.
///
/// A topic is any [valid topic](valid_topic): a short name such as
/// `user:42:updates` or an IRI such as `https://example.com/books/1` (up
/// to 1,024 bytes of UTF-8, no control or format characters); a mailbox
/// key is a [valid name](valid_name) (1 to 200 characters of
/// `A-Z a-z 0-9 _ . : -`). Every engine keeps and replays both kinds.
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
pub struct Hub(Arc<Shared>);

/// `items` with each one once, in their order (lists are short: looking
/// through them beats hashing).
fn distinct<T: PartialEq + Clone>(items: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        if !out.contains(item) {
            out.push(item.clone());
        }
    }
    out
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
    /// reader thread and 16 worker threads that make the round trips a
    /// stream needs (a worker that cannot start is logged; with none, each
    /// stream makes its own); Redis may be down at start (the reader keeps
    /// trying, see [`Hub::redis_state`]).
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
        let engine = RedisEngine::new(Arc::clone(&redis), Arc::clone(&node));
        let hub = Hub::assemble(Arc::clone(&node), Box::new(engine));
        redis::reader::start_reader(redis, Arc::downgrade(&node))
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
        Hub(Arc::new(Shared {
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
    /// [`HubError::InvalidName`] for a topic that is not a
    /// [valid topic](valid_topic), [`HubError::Event`] for an event name
    /// with a line break, [`HubError::Storage`] when the history store
    /// cannot keep the event (it is then not delivered).
    pub fn publish(&self, topic: &str, event: Event) -> Result<Published, HubError> {
        self.publish_as(topic, event, false)
    }

    /// Publishes `event` on `topic` as a **private update**, as
    /// [`publish`](Hub::publish) does, but for trusted subscriptions only:
    /// it never reaches a subscription made with
    /// [`subscribe_public`](Hub::subscribe_public), live or in a replay,
    /// and `receivers` counts only the others. (The daemon subscribes a
    /// stream with a credential whose grant covers its topics with
    /// [`subscribe`](Hub::subscribe), an anonymous one with
    /// `subscribe_public`.)
    ///
    /// # Errors
    ///
    /// As [`publish`](Hub::publish).
    pub fn publish_private(&self, topic: &str, event: Event) -> Result<Published, HubError> {
        self.publish_as(topic, event, true)
    }

    fn publish_as(&self, topic: &str, event: Event, private: bool) -> Result<Published, HubError> {
        self.publish_update(&[topic], event, private)
    }

    /// Publishes `event` as **one update of several topics**: one id, kept
    /// in the history of each, delivered once to every subscription of any
    /// of them (`receivers` counts each once), and replayed once to a
    /// subscription that resumes on several of them. `private` as
    /// [`publish_private`](Hub::publish_private). The first topic is the
    /// update's own (a Mercure update's canonical topic), the others
    /// alternates; a topic given twice counts once.
    ///
    /// # Errors
    ///
    /// [`HubError::TopicCount`] for no topic or more than
    /// [`MAX_UPDATE_TOPICS`], [`HubError::InvalidName`] for a bad topic
    /// name; otherwise as [`publish`](Hub::publish).
    pub fn publish_update(
        &self,
        topics: &[&str],
        event: Event,
        private: bool,
    ) -> Result<Published, HubError> {
        self.publish_checked(topics, event, private, None)
    }

    /// Publishes `event` as one update of `topics`, as
    /// [`publish_update`](Hub::publish_update) does, under `id`, given by
    /// its publisher (a Mercure update's `id`): subscribers receive it as
    /// the event's id, and one that resumes from it (`Last-Event-ID`)
    /// gets what was published after the earliest event that carries it,
    /// on every engine. The hub still orders events by ids of its own
    /// ([`Published::id`]); a publisher-given id should be unique.
    ///
    /// # Errors
    ///
    /// [`HubError::InvalidId`] for an id that cannot be one: empty, over
    /// [`MAX_ID_LEN`] bytes, with a control or format character, starting
    /// with `#`, [`EARLIEST`], or written as the hub's own ids are;
    /// otherwise as [`publish_update`](Hub::publish_update).
    pub fn publish_with_id(
        &self,
        topics: &[&str],
        id: &str,
        event: Event,
        private: bool,
    ) -> Result<Published, HubError> {
        if let Some(why) = config::id_problem(id) {
            return Err(HubError::InvalidId(why));
        }
        self.publish_checked(topics, event, private, Some(id))
    }

    /// Checks an update (its topics, its event) and hands it to the
    /// engine, each topic once.
    fn publish_checked(
        &self,
        topics: &[&str],
        event: Event,
        private: bool,
        alias: Option<&str>,
    ) -> Result<Published, HubError> {
        if topics.is_empty() || topics.len() > MAX_UPDATE_TOPICS {
            return Err(HubError::TopicCount {
                count: topics.len(),
                max: MAX_UPDATE_TOPICS,
            });
        }
        if let Some(bad) = topics.iter().find(|t| !valid_topic(t)) {
            return Err(HubError::InvalidName((*bad).to_owned()));
        }
        event.validate()?;
        let node = &self.0.node;
        if topics.len() == 1 {
            // Every publish of one topic comes this way: no copy.
            return self.0.engine.publish(node, topics, event, private, alias);
        }
        self.0
            .engine
            .publish(node, &distinct(topics), event, private, alias)
    }

    /// Subscribes to `topics`, resuming after `last_event_id` if given:
    /// a trusted subscription, which receives private updates too (see
    /// [`subscribe_public`](Hub::subscribe_public) for one that does not).
    ///
    /// The subscription first yields the replay (every retained event of
    /// its topics after that id, in id order), preceded by an `event: reset`
    /// frame when events may be missing (the id is older than what is
    /// retained, unknown, or unparsable), then live events.
    ///
    /// # Errors
    ///
    /// [`HubError::InvalidName`] for a topic that is not a
    /// [valid topic](valid_topic).
    pub fn subscribe(
        &self,
        topics: &[&str],
        last_event_id: Option<&str>,
    ) -> Result<Subscription, HubError> {
        self.subscribe_as(topics, &[], &Privacy::All, last_event_id)
    }

    /// Subscribes to `topics` as [`subscribe`](Hub::subscribe) does, for
    /// public updates only: no private update
    /// ([`publish_private`](Hub::publish_private)) reaches it, live or in
    /// its replay.
    ///
    /// # Errors
    ///
    /// [`HubError::InvalidName`] for a topic that is not a
    /// [valid topic](valid_topic).
    pub fn subscribe_public(
        &self,
        topics: &[&str],
        last_event_id: Option<&str>,
    ) -> Result<Subscription, HubError> {
        self.subscribe_as(topics, &[], &Privacy::Public, last_event_id)
    }

    /// Subscribes to `topics` exactly and to every topic one of
    /// `selectors` matches (`*`, a URI template), as Mercure subscribers
    /// do, resuming after `last_event_id` if given ([`EARLIEST`]: all of
    /// history, with no reset notice). An update of several topics comes
    /// once when any of them matches. Private updates reach it as
    /// `privacy` says: with [`Privacy::Granted`], those of which the grant
    /// covers one topic.
    ///
    /// A selector is matched once per topic and its answer kept, not once
    /// per subscriber and event: thousands of subscribers of one template
    /// cost a fan-out what as many subscribers of one topic do. The replay
    /// of a subscription by selector covers every topic of history it
    /// matches.
    ///
    /// # Errors
    ///
    /// [`HubError::InvalidName`] for a topic that is not a
    /// [valid topic](valid_topic); [`HubError::Storage`] when Redis cannot
    /// be reached.
    pub fn subscribe_matching(
        &self,
        topics: &[&str],
        selectors: &[Selector],
        privacy: &Privacy,
        last_event_id: Option<&str>,
    ) -> Result<Subscription, HubError> {
        self.subscribe_as(topics, &distinct(selectors), privacy, last_event_id)
    }

    // Out of line: see `Stream::follow`.
    #[inline(never)]
    fn subscribe_as(
        &self,
        topics: &[&str],
        selectors: &[Selector],
        privacy: &Privacy,
        last_event_id: Option<&str>,
    ) -> Result<Subscription, HubError> {
        if let Some(bad) = topics.iter().find(|t| !valid_topic(t)) {
            return Err(HubError::InvalidName((*bad).to_owned()));
        }
        let mut names: Vec<&str> = topics.to_vec();
        sort_names(&mut names);
        let interest = Interest {
            names: &names,
            selectors,
            privacy,
        };
        let Joined { id, queue, replay } =
            self.0
                .engine
                .subscribe(&self.0.node, &interest, last_event_id)?;
        Ok(Subscription {
            shared: Arc::clone(&self.0),
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
    /// [`HubError::InvalidName`] for a key that is not a
    /// [valid name](valid_name), [`HubError::MailboxFull`]
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
        let Taken { text, receipt } = self.0.engine.take(&self.0.node, key)?;
        self.0.engine.delivered(&self.0.node, key, receipt);
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
