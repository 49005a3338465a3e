//! The local engine: events and messages kept by this process, in memory
//! or in any store behind the [`History`] and
//! [`MailboxStore`](crate::hub::MailboxStore) traits (SQLite with the
//! `durable` feature), within the hub's retained budget.
//!
//! Its lock is taken before the node's: a publish holds it to assign the
//! next id, append to history and offer the frame to the subscribers (the
//! node's lock inside), a subscribe to join its topics and read the first
//! page of its replay. So a subscriber sees every event exactly once, in id
//! order, with no gap between replay and live events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::Report;
use crate::event::Event;
use crate::hub::config::{HubError, HubUsage, Published};
use crate::hub::engine::{Engine, Interest, Joined, Receipt, Taken};
use crate::hub::fanout::SubscriberQueue;
use crate::hub::history::{History, Retained, StorageError};
use crate::hub::id::{EventId, now_ms};
use crate::hub::mailbox::{self, Message};
use crate::hub::node::Node;
use crate::hub::replay::{HistoryPages, Replaying};

/// History and mailboxes in this process.
pub(crate) struct Local {
    state: Mutex<State>,
    /// Retained events dropped to keep within the budget.
    evicted: AtomicU64,
    /// Pushes refused because the mailboxes held the whole budget.
    refused: AtomicU64,
}

struct State {
    /// The newest id issued (or restored).
    last_id: EventId,
    history: Box<dyn History>,
}

impl Local {
    /// An engine over `history`; ids go on after the newest it holds.
    pub(crate) fn new(history: Box<dyn History>) -> Self {
        let last_id = history
            .last_id()
            .unwrap_or_else(|| EventId::floor_of(0))
            .max(EventId::floor_of(0));
        Local {
            state: Mutex::new(State { last_id, history }),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The newest id it holds: where the node starts.
    pub(crate) fn last_id(&self) -> EventId {
        self.state().last_id
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (the id is
        // set only after the store took the event), so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the oldest retained events until history and mailboxes fit
    /// the budget together (nothing without a budget).
    pub(crate) fn shrink(&self, node: &Node) {
        let evicted = self.keep_within_budget(node, &mut self.state());
        self.note_evictions(node, evicted);
    }

    /// Drops the oldest retained events until history and mailboxes fit
    /// the budget together; returns how many went.
    fn keep_within_budget(&self, node: &Node, state: &mut State) -> u64 {
        let budget = node.config.max_retained_bytes;
        if budget == 0 {
            return 0;
        }
        let room = budget.saturating_sub(node.mailboxes.bytes());
        if state.history.retained_bytes() <= room {
            return 0;
        }
        match state.history.shrink_to(room) {
            Ok(n) => n,
            Err(e) => {
                log::error!(
                    "cannot drop retained events to keep within max_retained_bytes: {}",
                    Report(&e)
                );
                0
            }
        }
    }

    /// Counts and logs `n` events dropped for the budget.
    fn note_evictions(&self, node: &Node, n: u64) {
        if n > 0 {
            self.evicted.fetch_add(n, Ordering::Relaxed);
            log_budget_evictions(n, node.config.max_retained_bytes);
        }
    }
}

impl Engine for Local {
    fn publish(
        &self,
        node: &Node,
        topics: &[&str],
        event: Event,
        private: bool,
        alias: Option<&str>,
    ) -> Result<Published, HubError> {
        let mut state = self.state();
        let id = state.last_id.next(now_ms());
        let shown = alias.map_or_else(|| id.to_string(), str::to_owned);
        let frame = event.id(shown).encode_shared()?;
        // Refused before anything changed: its id is issued again.
        node.config.check_frame(frame.as_bytes().len())?;
        // Kept before anyone sees it: an event the store refused reaches no
        // subscriber, and its id is issued again.
        for topic in topics {
            // (An update of several topics that a store takes for some
            // of them only is refused, its id issued again: a resume may
            // then find it under those.)
            state
                .history
                .append(
                    topic,
                    Retained {
                        id,
                        frame: frame.clone(),
                        private,
                    },
                )
                .map_err(HubError::Storage)?;
        }
        state.last_id = id;
        node.note_published();
        let out = node.fan_out(topics, id, &frame, private);
        let evicted = self.keep_within_budget(node, &mut state);
        drop(state);
        let receivers = out.receivers;
        node.wake(out);
        self.note_evictions(node, evicted);
        Ok(Published { id, receivers })
    }

    fn subscribe(
        &self,
        node: &Node,
        interest: &Interest<'_>,
        last_event_id: Option<&str>,
    ) -> Result<Joined, HubError> {
        let state = self.state();
        let (id, queue) = node.join(interest, false, &mut |_, _| {})?;
        let replay = last_event_id
            .map(|asked| Replaying::start(state.last_id, &*state.history, &queue, asked));
        drop(state);
        Ok(Joined { id, queue, replay })
    }

    fn read_page(
        &self,
        _node: &Node,
        replay: &mut Replaying,
        queue: &Arc<SubscriberQueue>,
    ) -> Result<(), StorageError> {
        let state = self.state();
        replay.read_page(
            queue,
            &mut HistoryPages(state.history.as_ref()),
            None,
            false,
        )
    }

    fn push(&self, node: &Node, key: &str, text: String) -> Result<usize, HubError> {
        let queued = node.mailboxes.push(key, text).map_err(|e| match e {
            mailbox::PushError::Full => HubError::MailboxFull {
                key: key.to_owned(),
                capacity: node.config.mailbox_capacity,
            },
            mailbox::PushError::OverBudget => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                HubError::OverBudget {
                    budget: node.config.max_retained_bytes,
                }
            }
            mailbox::PushError::Storage(e) => HubError::Storage(e),
        })?;
        // The mailboxes fit; with the events they may not.
        self.shrink(node);
        Ok(queued)
    }

    fn take(&self, node: &Node, key: &str) -> Option<Taken> {
        let m = node.mailboxes.take(key)?;
        Some(Taken {
            text: m.text,
            receipt: Receipt::Local {
                seq: m.seq,
                expires: m.expires,
            },
        })
    }

    fn delivered(&self, node: &Node, key: &str, receipt: Receipt) {
        // Out of the store only once written: a crash before this delivers
        // it again rather than lose it.
        if let Receipt::Local { seq, .. } = receipt {
            node.mailboxes.forget(key, seq);
        }
    }

    fn put_back(&self, node: &Node, key: &str, taken: Taken) {
        if let Receipt::Local { seq, expires } = taken.receipt {
            let message = Message {
                seq,
                expires,
                text: taken.text,
            };
            node.mailboxes.untake(key, message);
        }
    }

    fn mailbox_len(&self, node: &Node, key: &str) -> usize {
        node.mailboxes.len(key)
    }

    fn mailbox_poll(&self) -> Option<Duration> {
        None
    }

    fn usage(&self, node: &Node) -> HubUsage {
        HubUsage {
            history_bytes: self.state().history.retained_bytes(),
            mailbox_bytes: node.mailboxes.bytes(),
            max_retained_bytes: node.config.max_retained_bytes,
            events_evicted: self.evicted.load(Ordering::Relaxed),
            pushes_refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// Logs events dropped for the budget at `warn` (degraded: resumes from
/// before them get a reset), at most once a minute with a count.
fn log_budget_evictions(n: u64, budget: u64) {
    static LAST: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));
    let now = Instant::now();
    let Ok(mut last) = LAST.lock() else { return };
    last.1 += n;
    if last
        .0
        .is_some_and(|t| now.duration_since(t) < Duration::from_secs(60))
    {
        return;
    }
    last.0 = Some(now);
    let total = std::mem::take(&mut last.1);
    log::warn!(
        "retained events and mailboxes reached max_retained_bytes ({budget} bytes): \
         {total} oldest events dropped from history since the last report"
    );
}
