//! The one interface through which a [`Hub`](crate::Hub) reaches where its
//! events and messages are kept.
//!
//! Two engines implement it: the local engine (`local.rs`), whose
//! history and mailboxes are in this process (in memory, or in any store
//! behind the [`History`](crate::hub::History) and
//! [`MailboxStore`](crate::hub::MailboxStore) traits, such as SQLite), and
//! the Redis engine (`crate::hub::redis`), shared by every node that uses
//! the same Redis. The hub checks names and events, then hands every
//! operation on events and messages to its engine; both engines deliver
//! what they keep through the [`Node`], the part of the hub they share
//! (which also counts subscribers and publishes).

use std::panic::{RefUnwindSafe, UnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::event::Event;
use crate::hub::config::{HubError, HubUsage, Published, RedisState};
use crate::hub::fanout::SubscriberQueue;
use crate::hub::grant::{Privacy, Selector};
use crate::hub::history::StorageError;
use crate::hub::node::Node;
use crate::hub::replay::Replaying;

/// What a new subscriber follows, and which private updates it may get.
pub(crate) struct Interest<'a> {
    /// Topics followed exactly: sorted, distinct.
    pub(crate) names: &'a [&'a str],
    /// Selectors (`*`, URI templates) followed: distinct.
    pub(crate) selectors: &'a [Selector],
    pub(crate) privacy: &'a Privacy,
}

/// A subscriber joined to its topics, with its replay started.
pub(crate) struct Joined {
    pub(crate) id: u64,
    pub(crate) queue: Arc<SubscriberQueue>,
    /// `None` when it does not resume.
    pub(crate) replay: Option<Box<Replaying>>,
}

/// A mailbox message taken for one consumer: once written, the engine
/// [forgets](Engine::delivered) it; if the write fails, it is
/// [put back](Engine::put_back) for the next consumer.
pub(crate) struct Taken {
    pub(crate) text: String,
    pub(crate) receipt: Receipt,
}

/// What an engine needs to forget a taken message or put it back.
pub(crate) enum Receipt {
    /// Kept in this process: its number in the store, and when it expires.
    Local { seq: u64, expires: Option<Instant> },
    /// Kept in Redis: its stored form.
    Redis(Vec<u8>),
}

/// Where a hub keeps its events and messages, and how it orders them.
///
/// Every method gets the hub's [`Node`]: its settings, its subscribers and
/// its waiting consumers. Names are checked by the hub before any call.
pub(crate) trait Engine: Send + Sync + UnwindSafe + RefUnwindSafe {
    /// Keeps `event` on each of `topics` (distinct, at least one) under
    /// the next id, one event, and offers it to this node's subscribers
    /// of any of them, once each (at once, or through the engine's
    /// reader); a `private` one only to those that may receive private
    /// updates.
    ///
    /// With `alias` (a publisher-given id, checked), the frame carries it
    /// as its id, and a resume from it starts after the earliest event
    /// that carries it.
    fn publish(
        &self,
        node: &Node,
        topics: &[&str],
        event: Event,
        private: bool,
        alias: Option<&str>,
    ) -> Result<Published, HubError>;

    /// Joins a subscriber to what `interest` names and starts its replay
    /// after `last_event_id`, with no gap and no repeat between the
    /// replay and the live frames; private updates, live or replayed,
    /// reach it as its privacy allows.
    fn subscribe(
        &self,
        node: &Node,
        interest: &Interest<'_>,
        last_event_id: Option<&str>,
    ) -> Result<Joined, HubError>;

    /// Reads the next page of `replay`, of the subscription of `queue`.
    fn read_page(
        &self,
        node: &Node,
        replay: &mut Replaying,
        queue: &Arc<SubscriberQueue>,
    ) -> Result<(), StorageError>;

    /// Queues `text` in mailbox `key`; the mailbox's length after it.
    fn push(&self, node: &Node, key: &str, text: String) -> Result<usize, HubError>;

    /// Takes the oldest message of `key`, if any (a failure is logged and
    /// counted by the engine, and reads as none).
    fn take(&self, node: &Node, key: &str) -> Option<Taken>;

    /// A taken message (its `receipt`) was written to its consumer: it is
    /// gone for good.
    fn delivered(&self, node: &Node, key: &str, receipt: Receipt);

    /// A taken message could not be written: it goes back to the front.
    fn put_back(&self, node: &Node, key: &str, taken: Taken);

    /// Messages waiting in `key`.
    fn mailbox_len(&self, node: &Node, key: &str) -> usize;

    /// How often a waiting consumer looks without being woken; `None` when
    /// every push here wakes it.
    fn mailbox_poll(&self) -> Option<Duration>;

    /// What the hub holds against its retained budget.
    fn usage(&self, node: &Node) -> HubUsage;

    /// Where the engine's Redis connection stands, if it has one.
    fn redis_state(&self) -> Option<RedisState> {
        None
    }

    /// The hub is going away: stop the engine's threads that do not end
    /// by themselves when it is dropped (the Redis reader).
    fn stop(&self) {}
}

/// A hub's node and engine, shared by its handles and its subscriptions:
/// a subscription keeps them alive, and the last one to go stops the
/// engine's threads.
pub(crate) struct Shared {
    pub(crate) node: Arc<Node>,
    pub(crate) engine: Box<dyn Engine>,
    /// Dropped with the hub: ends the sweeper thread.
    pub(crate) _sweeper: Option<Sender<()>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.engine.stop();
    }
}
