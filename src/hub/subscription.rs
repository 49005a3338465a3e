//! A [`Subscription`]: its queue of live frames, and its replay.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Report;
use crate::event::EncodedEvent;
use crate::hub::config::EARLIEST;
use crate::hub::engine::Shared;
use crate::hub::fanout::SubscriberQueue;
use crate::hub::history::StorageError;
use crate::hub::id::EventId;
use crate::hub::replay::{Replaying, reset_frame};

/// A subscription to one or more topics: the replay backlog, then live
/// frames. Dropping it unsubscribes.
pub struct Subscription {
    /// The hub's node and engine: a subscription keeps them alive.
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: u64,
    /// What is left of its replay; `None` for a subscription that does
    /// not resume (kept apart: a stream's thread keeps the stack pages a
    /// subscription passes through, and most never replay).
    pub(crate) replay: Option<Box<Replaying>>,
    pub(crate) queue: Arc<SubscriberQueue>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topics", &self.queue.topics)
            .field(
                "backlog",
                &self.replay.as_ref().map_or(0, |r| r.ready.len()),
            )
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
    /// subscription ([`Stream::follow`](crate::Stream::follow)) reads it a page at a time instead.
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
                    let last = self
                        .replay
                        .as_ref()
                        .and_then(|r| r.last)
                        .map(|id| id.to_string());
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
        let Some(replay) = self.replay.as_deref_mut() else {
            return Ok(Vec::new());
        };
        // A page may hold nothing this subscription sees (a page by
        // selector among topics it does not follow): read on until one
        // does, or all is read.
        while replay.ready.is_empty() && !replay.complete() {
            let shared = &self.shared;
            let read = shared.engine.read_page(&shared.node, replay, &self.queue);
            if let Err(e) = read {
                replay.from = Vec::new(); // nothing more to read
                return Err(e);
            }
        }
        let n = replay.ready.len().min(max);
        Ok(replay.ready.drain(..n).collect())
    }

    /// Whether the replay is all taken or waiting in memory.
    pub(crate) fn backlog_read(&self) -> bool {
        self.replay.as_ref().is_none_or(|r| r.complete())
    }

    /// Where this subscription's events start, as Mercure's
    /// `Mercure-Last-Event-ID` tells a subscriber: for one resuming after
    /// `asked`, that id when the replay follows on from it, else (from
    /// `earliest`, or after a reset notice: the id unknown or events lost)
    /// [`EARLIEST`]; for one not resuming, the newest id the hub had.
    pub fn cursor(&self, asked: Option<&str>) -> String {
        match (asked, self.replay.as_deref()) {
            (Some(asked), Some(r)) if !r.earliest && !r.noticed => asked.to_owned(),
            (Some(_), _) => EARLIEST.to_owned(),
            (None, _) => {
                let newest = self.shared.node.last_id();
                if newest <= EventId::floor_of(0) {
                    EARLIEST.to_owned()
                } else {
                    newest.to_string()
                }
            }
        }
    }

    /// Whether the hub dropped this subscriber for falling behind.
    pub fn is_slow(&self) -> bool {
        self.queue.is_slow()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.node.unsubscribe(self.id, &self.queue);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::hub::Hub;
    use crate::hub::config::BATCH;
    use crate::hub::id::EventId;

    fn text(f: &EncodedEvent) -> String {
        String::from_utf8(f.as_bytes().to_vec()).expect("utf-8")
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
            assert!(
                sub.replay.as_ref().map_or(0, |r| r.ready.len()) <= BATCH,
                "one page at most"
            );
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
}
