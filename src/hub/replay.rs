//! A replay: what a resuming subscription must send before its live
//! frames, read from the engine a page at a time ([`Replaying`]), and the
//! reset notice sent when events may be missing.

use std::collections::VecDeque;

use crate::event::{EncodedEvent, Event};
use crate::hub::config::{BATCH, EARLIEST, PAGE_BYTES, RESET_EVENT};
use crate::hub::fanout::SubscriberQueue;
use crate::hub::history::{EveryPage, History, Replay, Retained, StorageError};
use crate::hub::id::{EventId, earliest};

/// Where a replay reads its pages: the engine's history.
pub(crate) trait Pages {
    /// Up to `max` events of `topic` in `(after, until]`, as
    /// [`History::page`] reads them, and whether a bound of the source's
    /// own (bytes) left some out.
    fn page(
        &mut self,
        topic: &str,
        after: EventId,
        until: EventId,
        max: usize,
    ) -> Result<(Replay, bool), StorageError>;

    /// A page of the updates of every topic `wanted` answers for, as
    /// [`History::page_every`] reads them; `None` when the source keeps
    /// no order across topics.
    fn every(
        &mut self,
        after: EventId,
        until: EventId,
        max: usize,
        first: bool,
        wanted: &mut dyn FnMut(&str) -> Option<bool>,
    ) -> Result<Option<EveryPage>, StorageError>;
}

/// The pages of a history in this process (it cannot fail).
pub(crate) struct HistoryPages<'a>(pub(crate) &'a dyn History);

impl Pages for HistoryPages<'_> {
    fn page(
        &mut self,
        topic: &str,
        after: EventId,
        until: EventId,
        max: usize,
    ) -> Result<(Replay, bool), StorageError> {
        Ok((self.0.page(topic, after, until, max), false))
    }

    fn every(
        &mut self,
        after: EventId,
        until: EventId,
        max: usize,
        first: bool,
        wanted: &mut dyn FnMut(&str) -> Option<bool>,
    ) -> Result<Option<EveryPage>, StorageError> {
        Ok(self.0.page_every(after, until, max, first, wanted))
    }
}

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
    /// Per topic of the subscription (in the queue's order), or one for
    /// all (`every`): the id its replay goes on after. Empty once
    /// everything has been read.
    pub(crate) from: Vec<EventId>,
    /// The newest id the replay covers.
    pub(crate) until: EventId,
    /// The newest id read: a reset notice mid-replay names it.
    pub(crate) last: Option<EventId>,
    /// Per topic (as `from`): whether its private updates are replayed.
    pub(crate) private: Box<[bool]>,
    /// A subscription by selector: it replays the updates of every topic
    /// it follows, exactly or by selector, read in id order across topics
    /// ([`History::page_every`]).
    pub(crate) every: bool,
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
            every: false,
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
        let mut replay = Replaying::after(asked, last_id, queue, &mut || history.id_of(asked));
        // Reading memory cannot fail.
        let gap = !replay.placed;
        let _ = replay.read_page(queue, &mut HistoryPages(history), Some(asked), gap);
        // Boxed here, not by the caller: a subscribing stream's frame does
        // not hold the value on its way to the heap.
        Box::new(replay)
    }

    /// A replay, nothing read yet, for the subscriber of `queue` resuming
    /// after `asked` (or from the start of history, with `earliest`) up to
    /// `until`. A subscriber by selector replays every topic its selectors
    /// match, besides its own. An id that is not one of the hub's own may
    /// be a publisher's: `resolve` says where it is, if history has it.
    pub(crate) fn after(
        asked: &str,
        until: EventId,
        queue: &SubscriberQueue,
        resolve: &mut dyn FnMut() -> Option<EventId>,
    ) -> Replaying {
        let every = !queue.selectors().is_empty();
        // An id this hub cannot place (garbage, or from the future: a
        // restart with the clock stepped back, another server) replays
        // everything retained after the reset notice.
        let placed = match asked.parse::<EventId>() {
            Ok(id) => Some(id).filter(|a| *a <= until),
            Err(_) if asked == EARLIEST => None,
            Err(_) => resolve(),
        };
        let after = placed.unwrap_or(EventId::floor_of(0));
        let (from, private) = if every {
            (vec![after], Box::default())
        } else {
            let private = queue.topics.iter().map(|t| queue.allows(t)).collect();
            (vec![after; queue.topics.len()], private)
        };
        Replaying {
            ready: VecDeque::new(),
            from,
            until,
            last: None,
            private,
            every,
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

    /// Reads up to `BATCH` more events of `queue`'s subscription, in id
    /// order, into `ready`; a reset notice goes first when some were
    /// dropped before they could be read (`asked` names the id the client
    /// resumed from, on the first page).
    pub(crate) fn read_page(
        &mut self,
        queue: &SubscriberQueue,
        source: &mut dyn Pages,
        asked: Option<&str>,
        mut gap: bool,
    ) -> Result<(), StorageError> {
        if self.every {
            return self.read_every(queue, source, asked, gap);
        }
        let topics = &queue.topics;
        let mut events: Vec<Retained> = Vec::new();
        let mut oldest: Option<EventId> = None;
        let mut bound = self.until;
        let mut more = false;
        for ((name, from), private) in topics.iter().zip(self.from.iter_mut()).zip(&self.private) {
            if *from >= self.until {
                continue; // nothing of this topic is left
            }
            let (mut page, cut) = source.page(name, *from, bound, BATCH)?;
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
        self.take_page(events, gap, oldest, asked);
        match (more, self.last) {
            (true, Some(last)) => self.from.iter_mut().for_each(|f| *f = (*f).max(last)),
            _ => self.from = Vec::new(),
        }
        Ok(())
    }

    /// [`read_page`](Replaying::read_page) for a subscription by selector:
    /// the updates of every topic it follows, in id order, from a source
    /// that keeps that order (else only the topics it names exactly).
    fn read_every(
        &mut self,
        queue: &SubscriberQueue,
        source: &mut dyn Pages,
        asked: Option<&str>,
        gap: bool,
    ) -> Result<(), StorageError> {
        let Some(&from) = self.from.first() else {
            return Ok(());
        };
        let mut wanted = |t: &str| {
            let follows = queue.topics.iter().any(|x| **x == *t)
                || queue.selectors().iter().any(|s| s.matches(t));
            follows.then(|| queue.allows(t))
        };
        let Some(mut page) = source.every(from, self.until, BATCH, asked.is_some(), &mut wanted)?
        else {
            // No order across topics: the topics named exactly.
            self.every = false;
            self.from = vec![from; queue.topics.len()];
            self.private = queue.topics.iter().map(|t| queue.allows(t)).collect();
            return self.read_page(queue, source, asked, gap);
        };
        let cut = cut_page(&mut page.events);
        let to = match page.events.last() {
            Some(last) if cut => last.id,
            _ => page.to,
        };
        self.take_page(page.events, gap || page.gap, page.oldest, asked);
        self.from = if cut || !page.done {
            vec![to]
        } else {
            Vec::new()
        };
        Ok(())
    }

    /// Queues a page read, `events` in id order (those still `private`
    /// left out: they only move the replay on), after a reset notice if
    /// some may be missing (`gap`).
    fn take_page(
        &mut self,
        events: Vec<Retained>,
        gap: bool,
        oldest: Option<EventId>,
        asked: Option<&str>,
    ) {
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
        self.ready
            .extend(events.into_iter().filter(|e| !e.private).map(|e| e.frame));
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
