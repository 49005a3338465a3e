//! Redis as the hub's [`Engine`]: ids, history and mailboxes in Redis,
//! live events through this node's reader thread.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::event::Event;
use crate::hub::config::{HubError, HubUsage, ID_LINE_MAX, Published};
use crate::hub::engine::{Engine, Joined, Receipt, Taken};
use crate::hub::history::StorageError;
use crate::hub::id::EventId;
use crate::hub::node::Node;
use crate::hub::redis::{PushError, Redis, RedisState};
use crate::hub::replay::Replaying;

/// How often a consumer of a Redis mailbox looks without being woken.
const MAILBOX_POLL: Duration = Duration::from_secs(1);

/// The hub's engine when Redis keeps everything.
pub(crate) struct RedisEngine(pub(crate) Arc<Redis>);

impl RedisEngine {
    /// [`Engine::subscribe`] for a subscriber resuming after `asked`: the
    /// replay covers what Redis has up to `until`, read now that the
    /// subscriber is in; what the reader delivers meanwhile waits beside
    /// it, and goes to its queue only if newer. So nothing published
    /// around the subscription is missed or doubled.
    // Out of line, so a subscriber that does not resume never has its
    // locals on the stack (see `Stream::follow`).
    #[inline(never)]
    fn start_replay(
        &self,
        node: &Node,
        joined: &mut Joined,
        asked: &str,
        newest: EventId,
    ) -> Result<(), StorageError> {
        let redis = &self.0;
        let names = &joined.queue.topics;
        let (until, _) = redis.position(names)?;
        node.resume_live(joined.id, &joined.queue, until);
        // An id Redis cannot place (garbage, or newer than anything issued)
        // replays everything retained after the reset notice.
        let placeable = asked.parse::<EventId>().ok().filter(|a| *a <= newest);
        let after = placeable.unwrap_or(EventId::floor_of(0));
        joined.replay = Replaying {
            ready: VecDeque::new(),
            from: vec![after; names.len()],
            until,
            last: None,
        };
        joined.replay.read_page(
            names,
            &mut |t, a, u, m| redis.page(t, a, u, m),
            Some(asked),
            placeable.is_none(),
        )
    }
}

impl Engine for RedisEngine {
    fn publish(&self, node: &Node, topic: &str, event: Event) -> Result<Published, HubError> {
        // Redis picks the id; the reader delivers the event here as on
        // every node. `receivers` counts this node's subscribers.
        let (frame, at) = event.encode_around_id()?;
        node.config.check_frame(frame.len() + ID_LINE_MAX)?;
        let id = self
            .0
            .publish(topic, &frame, at)
            .map_err(HubError::Storage)?;
        node.note_published();
        Ok(Published {
            id,
            receivers: node.subscribers(topic),
        })
    }

    /// Joins the topics (the reader follows each from the newest id at
    /// least), then, for a subscriber that resumes, reads the replay from
    /// Redis (see [`RedisEngine::start_replay`]).
    fn subscribe(
        &self,
        node: &Node,
        names: &[&str],
        last_event_id: Option<&str>,
    ) -> Result<Joined, HubError> {
        let redis = &self.0;
        let (newest, seqs) = redis.position(names).map_err(HubError::Storage)?;
        let mut woke = false;
        let (id, queue) = node.join(names, last_event_id.is_some(), &mut |i, name| {
            let seq = seqs.get(i).copied().unwrap_or(0);
            woke |= redis.want(name, newest, seq);
        });
        if woke {
            redis.wake_readers();
        }
        let mut joined = Joined {
            id,
            queue,
            replay: Replaying::default(),
        };
        if let Some(asked) = last_event_id
            && let Err(e) = self.start_replay(node, &mut joined, asked, newest)
        {
            node.unsubscribe(joined.id, &joined.queue.topics);
            return Err(HubError::Storage(e));
        }
        Ok(joined)
    }

    fn read_page(
        &self,
        _node: &Node,
        replay: &mut Replaying,
        topics: &[Arc<str>],
    ) -> Result<(), StorageError> {
        let redis = &self.0;
        replay.read_page(
            topics,
            &mut |t, a, u, m| redis.page(t, a, u, m),
            None,
            false,
        )
    }

    fn push(&self, node: &Node, key: &str, text: String) -> Result<usize, HubError> {
        let capacity = node.config.mailbox_capacity;
        let queued = self
            .0
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
        // A failure is logged and counted by the engine.
        let (text, stored) = self.0.take(key, node.config.mailbox_ttl).ok()??;
        Some(Taken {
            text,
            receipt: Receipt::Redis(stored),
        })
    }

    fn delivered(&self, _node: &Node, _key: &str, _taken: Taken) {
        // Popped for good when it was taken.
    }

    fn put_back(&self, node: &Node, key: &str, taken: Taken) {
        let Receipt::Redis(stored) = taken.receipt else {
            return;
        };
        if let Err(lost) = self.0.untake(key, &stored, node.config.mailbox_ttl) {
            log::error!(
                "mailbox {key:?}: a message could not be delivered nor put back: {}",
                crate::error::Report(&lost)
            );
        }
    }

    fn mailbox_len(&self, _node: &Node, key: &str) -> usize {
        self.0.mailbox_len(key)
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
        Some(self.0.state())
    }

    fn stop(&self) {
        self.0.stop();
    }
}
