//! A replay: what a resuming subscription must send before its live
//! frames, read from the engine a page at a time ([`Replaying`]), and the
//! reset notice sent when events may be missing.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::event::{EncodedEvent, Event};
use crate::hub::config::{BATCH, PAGE_BYTES, RESET_EVENT};
use crate::hub::history::{History, Replay, Retained, StorageError};
use crate::hub::id::{EventId, earliest};

/// Reads one topic's page of a replay: `(topic, after, until, max)`, as
/// [`History::page`] does, and whether a bound of the source's own (bytes)
/// left events out.
type PageFn<'a> =
    dyn FnMut(&str, EventId, EventId, usize) -> Result<(Replay, bool), StorageError> + 'a;

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
    /// Private updates are left out (the subscription's
    /// [`public_only`](crate::hub::fanout::SubscriberQueue)).
    pub(crate) public_only: bool,
}

impl Default for Replaying {
    /// Nothing to replay.
    fn default() -> Self {
        Replaying {
            ready: VecDeque::new(),
            from: Vec::new(),
            until: EventId::floor_of(0),
            last: None,
            public_only: false,
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
        topics: &[Arc<str>],
        asked: &str,
        public_only: bool,
    ) -> Replaying {
        // An id this hub cannot place (garbage, or from the future: a
        // restart with the clock stepped back, another server) replays
        // everything retained after the reset notice.
        let placeable = asked.parse::<EventId>().ok().filter(|a| *a <= last_id);
        let after = placeable.unwrap_or(EventId::floor_of(0));
        let mut replay = Replaying {
            ready: VecDeque::new(),
            from: vec![after; topics.len()],
            until: last_id,
            last: None,
            public_only,
        };
        // Reading memory cannot fail.
        let _ = replay.read_page(
            topics,
            &mut |t, a, u, m| Ok((history.page(t, a, u, m), false)),
            Some(asked),
            placeable.is_none(),
        );
        replay
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
        for (name, from) in topics.iter().zip(self.from.iter_mut()) {
            if *from >= self.until {
                continue; // nothing of this topic is left
            }
            let (page, cut) = page(name, *from, bound, BATCH)?;
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
        events.sort_unstable_by_key(|e| e.id);
        // An update of several topics is in the history of each: once here.
        events.dedup_by_key(|e| e.id);
        if gap {
            let asked = match (asked, self.last) {
                (Some(asked), _) => asked.to_owned(),
                (None, Some(last)) => last.to_string(),
                (None, None) => String::new(),
            };
            self.ready.push_back(reset_frame(&asked, oldest));
        }
        if let Some(newest) = events.last() {
            self.last = Some(newest.id);
        }
        match (more, self.last) {
            (true, Some(last)) => self.from.iter_mut().for_each(|f| *f = (*f).max(last)),
            _ => self.from = Vec::new(),
        }
        // Left out only now: a private event still moves the replay on.
        let public_only = self.public_only;
        self.ready.extend(
            events
                .into_iter()
                .filter(|e| !(public_only && e.private))
                .map(|e| e.frame),
        );
        Ok(())
    }
}

/// Sorts `events` by id and keeps the oldest that fit one page: at most
/// [`BATCH`] events and [`PAGE_BYTES`] of frames, one at least. True when
/// some were cut.
fn cut_page(events: &mut Vec<Retained>) -> bool {
    events.sort_unstable_by_key(|e| e.id);
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
