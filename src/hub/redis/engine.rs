//! Redis as the hub's [`Engine`]: ids, history and mailboxes in Redis,
//! live events through this node's reader thread.

use std::sync::Arc;
use std::time::Duration;

use crate::event::Event;
use crate::hub::config::{HubError, HubUsage, ID_LINE_MAX, Published};
use crate::hub::engine::{Engine, Interest, Joined, Receipt, Taken};
use crate::hub::fanout::SubscriberQueue;
use crate::hub::grant::Selector;
use crate::hub::history::{EveryPage, Replay, StorageError};
use crate::hub::id::EventId;
use crate::hub::node::{EVERY_TOPIC, Node};
use crate::hub::redis::pool::{POOL_MAX, TIMEOUT};
use crate::hub::redis::{PushError, Redis, RedisState};
use crate::hub::replay::{Pages, Replaying};
use crate::hub::worker::Workers;

/// How often a consumer of a Redis mailbox looks without being woken.
const MAILBOX_POLL: Duration = Duration::from_secs(1);

/// The hub's engine when Redis keeps everything.
///
/// What a stream's thread asks of it (subscribe, replay pages, mailbox
/// takes) runs on the engine's [`Workers`]: see `worker.rs` for why.
pub(crate) struct RedisEngine {
    redis: Arc<Redis>,
    node: Arc<Node>,
    workers: Workers,
}

impl RedisEngine {
    /// The engine over `redis` for `node`, its workers started.
    pub(crate) fn new(redis: Arc<Redis>, node: Arc<Node>) -> Self {
        RedisEngine {
            redis,
            node,
            workers: Workers::started("ssed-redis-w", POOL_MAX, TIMEOUT),
        }
    }
}

/// [`Engine::subscribe`], on a worker: joins the topics (the reader
/// follows each from the newest id at least), then, for a subscriber that
/// resumes, reads the replay from Redis (see [`start_replay`]).
fn subscribe(
    redis: &Redis,
    node: &Node,
    interest: &Interest<'_>,
    last_event_id: Option<&str>,
) -> Result<Joined, HubError> {
    let names = interest.names;
    // Subscribers by selector follow every update: the stream of them is
    // positioned with the topics.
    let mut followed = names.to_vec();
    if !interest.selectors.is_empty() {
        // Publishes write the stream of every update from now on: before
        // this reads where it stands, so none is missed.
        redis.mark_selecting().map_err(HubError::Storage)?;
        followed.push(EVERY_TOPIC);
    }
    let (newest, seqs) = redis.position(&followed).map_err(HubError::Storage)?;
    node.saw(newest);
    let mut woke = false;
    let (id, queue) = node.join(interest, last_event_id.is_some(), &mut |i, name| {
        let seq = seqs.get(i).copied().unwrap_or(0);
        woke |= redis.want(name, newest, seq);
    })?;
    if woke {
        redis.wake_readers();
    }
    // Joined: whatever ends this early (a failure, a panic) leaves the
    // topics again.
    let mut joined = Leave {
        node,
        joined: Some(Joined {
            id,
            queue,
            replay: None,
        }),
    };
    if let (Some(asked), Some(j)) = (last_event_id, joined.joined.as_mut()) {
        start_replay(redis, node, j, asked, newest, &followed).map_err(HubError::Storage)?;
    }
    joined
        .joined
        .take()
        .ok_or_else(|| HubError::Storage(StorageError::new("redis subscribe: no subscription")))
}

/// A subscriber joined to its topics whose subscribe has not finished:
/// dropped before, it leaves them.
struct Leave<'a> {
    node: &'a Node,
    joined: Option<Joined>,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if let Some(j) = &self.joined {
            self.node.unsubscribe(j.id, &j.queue);
        }
    }
}

/// The replay of a subscriber resuming after `asked`: it covers what Redis
/// has up to `until`, read now that the subscriber is in; what the reader
/// delivers meanwhile waits beside it, and goes to its queue only if
/// newer. So nothing published around the subscription is missed or
/// doubled.
fn start_replay(
    redis: &Redis,
    node: &Node,
    joined: &mut Joined,
    asked: &str,
    newest: EventId,
    followed: &[&str],
) -> Result<(), StorageError> {
    let (until, _) = redis.position(followed)?;
    node.resume_live(joined.id, &joined.queue, until);
    // An id Redis cannot place (garbage, or newer than anything issued)
    // replays everything retained after the reset notice.
    let mut found = Ok(None);
    let replay = Replaying::after(asked, newest, &joined.queue, &mut || {
        found = redis.id_of(asked);
        found.as_ref().ok().copied().flatten()
    });
    found?;
    let replay = joined.replay.insert(Box::new(replay));
    replay.until = until;
    let gap = !replay.placed;
    replay.read_page(&joined.queue, &mut RedisPages(redis), Some(asked), gap)
}

/// A replay's pages, read from Redis.
struct RedisPages<'a>(&'a Redis);

impl Pages for RedisPages<'_> {
    fn page(
        &mut self,
        topic: &str,
        after: EventId,
        until: EventId,
        max: usize,
    ) -> Result<(Replay, bool), StorageError> {
        self.0.page(topic, after, until, max)
    }

    fn every(
        &mut self,
        after: EventId,
        until: EventId,
        max: usize,
        first: bool,
        wanted: &mut dyn FnMut(&str) -> Option<bool>,
    ) -> Result<Option<EveryPage>, StorageError> {
        self.0
            .page_every(after, until, max, first, wanted)
            .map(Some)
    }
}

impl Engine for RedisEngine {
    fn publish(
        &self,
        node: &Node,
        topics: &[&str],
        event: Event,
        private: bool,
        alias: Option<&str>,
    ) -> Result<Published, HubError> {
        // Redis picks the id; the reader delivers the event here as on
        // every node. `receivers` counts this node's subscribers (who may
        // receive it).
        let (frame, at) = event.encode_around_id()?;
        let id_line = alias.map_or(ID_LINE_MAX, |a| a.len() + 5);
        node.config.check_frame(frame.len() + id_line)?;
        let id = self
            .redis
            .publish(topics, &frame, at, private, alias)
            .map_err(HubError::Storage)?;
        node.note_published();
        Ok(Published {
            id,
            receivers: node.receivers(topics, private),
        })
    }

    /// On a worker, with the engine's own handle on the node (the same one
    /// the hub holds: a job needs it owned).
    fn subscribe(
        &self,
        _node: &Node,
        interest: &Interest<'_>,
        last_event_id: Option<&str>,
    ) -> Result<Joined, HubError> {
        let (redis, node) = (Arc::clone(&self.redis), Arc::clone(&self.node));
        let names: Vec<Box<str>> = interest.names.iter().map(|n| Box::from(*n)).collect();
        let selectors: Vec<Selector> = interest.selectors.to_vec();
        let privacy = interest.privacy.clone();
        let last_event_id = last_event_id.map(str::to_owned);
        self.workers
            .run(move || {
                let names: Vec<&str> = names.iter().map(|n| &**n).collect();
                let interest = Interest {
                    names: &names,
                    selectors: &selectors,
                    privacy: &privacy,
                };
                subscribe(&redis, &node, &interest, last_event_id.as_deref())
            })
            .map_err(HubError::Storage)?
    }

    fn read_page(
        &self,
        _node: &Node,
        replay: &mut Replaying,
        queue: &Arc<SubscriberQueue>,
    ) -> Result<(), StorageError> {
        let redis = Arc::clone(&self.redis);
        let queue = Arc::clone(queue);
        let mut page = std::mem::take(replay);
        let (page, read) = self.workers.run(move || {
            let read = page.read_page(&queue, &mut RedisPages(&redis), None, false);
            (page, read)
        })?;
        *replay = page;
        read
    }

    fn push(&self, node: &Node, key: &str, text: String) -> Result<usize, HubError> {
        let capacity = node.config.mailbox_capacity;
        let queued = self
            .redis
            .push(key, &text, capacity, node.config.mailbox_ttl)
            .map_err(|e| match e {
                PushError::Full => HubError::MailboxFull {
                    key: key.to_owned(),
                    capacity,
                },
                PushError::Storage(e) => HubError::Storage(e),
            })?;
        // Consumers here need not wait for the announcement to come back
        // through the reader.
        node.mailboxes.notify(key);
        Ok(queued)
    }

    fn take(&self, node: &Node, key: &str) -> Option<Taken> {
        let (redis, key, ttl) = (
            Arc::clone(&self.redis),
            key.to_owned(),
            node.config.mailbox_ttl,
        );
        // A failure is logged and counted by the engine.
        let (text, stored) = self
            .workers
            .run(move || redis.take(&key, ttl))
            .ok()?
            .ok()??;
        Some(Taken {
            text,
            receipt: Receipt::Redis(stored),
        })
    }

    fn delivered(&self, _node: &Node, _key: &str, _receipt: Receipt) {
        // Popped for good when it was taken.
    }

    fn put_back(&self, node: &Node, key: &str, taken: Taken) {
        let Receipt::Redis(stored) = taken.receipt else {
            return;
        };
        let (redis, owned, ttl) = (
            Arc::clone(&self.redis),
            key.to_owned(),
            node.config.mailbox_ttl,
        );
        let put = self.workers.run(move || redis.untake(&owned, &stored, ttl));
        if let Err(lost) = put.and_then(|r| r) {
            log::error!(
                "mailbox {key:?}: a message could not be delivered nor put back: {}",
                crate::error::Report(&lost)
            );
        }
    }

    fn mailbox_len(&self, _node: &Node, key: &str) -> usize {
        self.redis.mailbox_len(key)
    }

    /// Announcements missed while the reader reconnects are caught by
    /// looking now and then.
    fn mailbox_poll(&self) -> Option<Duration> {
        Some(MAILBOX_POLL)
    }

    fn usage(&self, node: &Node) -> HubUsage {
        HubUsage {
            history_bytes: 0,
            mailbox_bytes: node.mailboxes.bytes(),
            max_retained_bytes: node.config.max_retained_bytes,
            events_evicted: 0,
            pushes_refused: 0,
        }
    }

    fn redis_state(&self) -> Option<RedisState> {
        Some(self.redis.state())
    }

    fn stop(&self) {
        self.redis.stop();
    }
}
