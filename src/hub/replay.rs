//! A replay: what a resuming subscription must send before its live
//! frames, read from the engine a page at a time ([`Replaying`]), and the
//! reset notice sent when events may be missing.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::event::{EncodedEvent, Event};
use crate::hub::config::{BATCH, EARLIEST, PAGE_BYTES, RESET_EVENT};
use crate::hub::fanout::SubscriberQueue;
use crate::hub::history::{History, Replay, Retained, StorageError};
use crate::hub::id::{EventId, earliest};

/// Reads one topic's page of a replay: `(topic, after, until, max)`, as
/// [`History::page`] does, and whether a bound of the source's own (bytes)
/// left events out.
type PageFn<'a> =
    dyn FnMut(&str, EventId, EventId, usize) -> Result<(Replay, bool), StorageError> + 'a;

/// Lists the topics of history: calls its argument with each name (see
/// [`History::topic_names`]).
pub(crate) type TopicNames<'a> = dyn FnMut(&mut dyn FnMut(&str)) + 'a;

/// What is left of a subscription's replay.
///
/// A hub that keeps history itself hands it out a page at a time (see
/// [`History::page`]): a stream resuming on topics with thousands of
/// retained events holds one page of shared frames while its client reads,
/// never the whole history. The events replayed are those published before
/// the subscription (up to `until`); later ones arrive through its queue.
pub(crate) struct Replaying {
    /// Frames read and not yet taken (a reset notice first, if any).
    pub(crate) ready: VecDeque<EncodedEvent>,
    /// Per topic of the subscription (in the queue's order): the id its
    /// replay goes on after. Empty once everything has been read.
    pub(crate) from: Vec<EventId>,
    /// The newest id the replay covers.
    pub(crate) until: EventId,
    /// The newest id read: a reset notice mid-replay names it.
    pub(crate) last: Option<EventId>,
    /// Per topic (as `from`): whether its private updates are replayed.
    pub(crate) private: Box<[bool]>,
    /// The topics replayed, when they are not the ones the subscription
    /// follows exactly (a subscription by selector replays every topic its
    /// selectors matched in history).
    pub(crate) topics: Option<Box<[Arc<str>]>>,
    /// Resumed from `earliest`: everything retained, and no reset notice
    /// (nothing was asked for that history could lack).
    pub(crate) earliest: bool,
    /// It starts from a place in history: an id this hub placed, or
    /// `earliest`. Else a reset notice goes first.
    pub(crate) placed: bool,
    /// A reset notice went out: events after the id asked for may be
    /// missing.
    pub(crate) noticed: bool,
}

impl Default for Replaying {
    /// Nothing to replay.
    fn default() -> Self {
        Replaying {
            ready: VecDeque::new(),
            from: Vec::new(),
            until: EventId::floor_of(0),
            last: None,
            private: Box::default(),
            topics: None,
            earliest: false,
            placed: true,
            noticed: false,
        }
    }
}

impl Replaying {
    /// The replay of a subscription resuming after `asked` on `topics`,
    /// with its first page read from `history`, whose newest id is
    /// `last_id`: called under the local engine's lock, with the
    /// subscription joining its topics in the same hold, so nothing falls
    /// between the replay and the live frames.
    // Out of line, so its locals do not deepen `Hub::subscribe` (see
    // `Stream::follow`).
    #[inline(never)]
    pub(crate) fn start(
        last_id: EventId,
        history: &dyn History,
        queue: &SubscriberQueue,
        asked: &str,
    ) -> Box<Replaying> {
        let mut replay = Replaying::after(
            asked,
            last_id,
            queue,
            &mut |each| history.topic_names(each),
            &mut |names| names.iter().filter_map(|t| history.id_of(t, asked)).min(),
        );
        let topics = replay.topics.take();
        let names = topics.as_deref().unwrap_or(&queue.topics);
        // Reading memory cannot fail.
        let gap = !replay.placed;
        let _ = replay.read_page(
            names,
            &mut |t, a, u, m| Ok((history.page(t, a, u, m), false)),
            Some(asked),
            gap,
        );
        replay.topics = topics;
        // Boxed here, not by the caller: a subscribing stream's frame does
        // not hold the value on its way to the heap.
        Box::new(replay)
    }

    /// A replay, nothing read yet, for the subscriber of `queue` resuming
    /// after `asked` (or from the start of history, with `earliest`) up to
    /// `until`. A subscriber by selector replays the topics of
    /// `topic_names` that its selectors match, besides its own. An id that
    /// is not one of the hub's own may be a publisher's: `resolve` places
    /// it among the topics replayed.
    pub(crate) fn after(
        asked: &str,
        until: EventId,
        queue: &SubscriberQueue,
        topic_names: &mut TopicNames<'_>,
        resolve: &mut dyn FnMut(&[Arc<str>]) -> Option<EventId>,
    ) -> Replaying {
        let topics = (!queue.selectors().is_empty()).then(|| matched_topics(queue, topic_names));
        let names = topics.as_deref().unwrap_or(&queue.topics);
        // An id this hub cannot place (garbage, or from the future: a
        // restart with the clock stepped back, another server) replays
        // everything retained after the reset notice.
        let placed = match asked.parse::<EventId>() {
            Ok(id) => Some(id).filter(|a| *a <= until),
            Err(_) if asked == EARLIEST => None,
            Err(_) => resolve(names),
        };
        let after = placed.unwrap_or(EventId::floor_of(0));
        Replaying {
            ready: VecDeque::new(),
            from: vec![after; names.len()],
            until,
            last: None,
            private: names.iter().map(|t| queue.allows(t)).collect(),
            topics,
            earliest: asked == EARLIEST,
            placed: placed.is_some() || asked == EARLIEST,
            noticed: false,
        }
    }

    /// Whether every frame of the replay has been read (some may still
    /// wait in `ready`).
    pub(crate) fn complete(&self) -> bool {
        self.from.is_empty()
    }

    /// Reads up to `BATCH` more events, in id order, into `ready`; a reset
    /// notice goes first when some were dropped before they could be read
    /// (`asked` names the id the client resumed from on the first page).
    pub(crate) fn read_page(
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
        for ((name, from), private) in topics.iter().zip(self.from.iter_mut()).zip(&self.private) {
            if *from >= self.until {
                continue; // nothing of this topic is left
            }
            let (mut page, cut) = page(name, *from, bound, BATCH)?;
            if *private {
                // Replayed: no longer private here. An update of several
                // topics comes once, and this copy sorts first.
                page.events.iter_mut().for_each(|e| e.private = false);
            }
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
        events.sort_unstable_by_key(|e| (e.id, e.private));
        // An update of several topics is in the history of each: once here
        // (the copy of a topic whose private updates it may see first).
        events.dedup_by_key(|e| e.id);
        if gap && !self.earliest {
            let asked = match (asked, self.last) {
                (Some(asked), _) => asked.to_owned(),
                (None, Some(last)) => last.to_string(),
                (None, None) => String::new(),
            };
            self.ready.push_back(reset_frame(&asked, oldest));
            self.noticed = true;
        }
        if let Some(newest) = events.last() {
            self.last = Some(newest.id);
        }
        match (more, self.last) {
            (true, Some(last)) => self.from.iter_mut().for_each(|f| *f = (*f).max(last)),
            _ => self.from = Vec::new(),
        }
        // Left out only now: a private event still moves the replay on.
        self.ready
            .extend(events.into_iter().filter(|e| !e.private).map(|e| e.frame));
        Ok(())
    }
}

/// Sorts `events` by id and keeps the oldest that fit one page: at most
/// [`BATCH`] events and [`PAGE_BYTES`] of frames, one at least. True when
/// some were cut.
fn cut_page(events: &mut Vec<Retained>) -> bool {
    events.sort_unstable_by_key(|e| (e.id, e.private));
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

/// The topics a subscriber by selector replays: its own, and every topic
/// of history (as `topic_names` lists them) that one of its selectors
/// matches; sorted, distinct.
fn matched_topics(queue: &SubscriberQueue, topic_names: &mut TopicNames<'_>) -> Box<[Arc<str>]> {
    let mut names: Vec<Arc<str>> = queue.topics.to_vec();
    topic_names(&mut |t| {
        if queue.selectors().iter().any(|s| s.matches(t)) {
            names.push(Arc::from(t));
        }
    });
    names.sort_unstable();
    names.dedup();
    names.into()
}

/// The `event: reset` frame telling a client that resumes from `asked`
/// that events may be missing.
pub(crate) fn reset_frame(asked: &str, oldest: Option<EventId>) -> EncodedEvent {
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
