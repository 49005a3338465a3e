//! Keyed mailboxes kept in this process: each message waits for exactly one
//! consumer, in push order, for at most its time to live.
//!
//! What they hold is counted in bytes ([`Mailboxes::bytes`]) against the
//! hub's retained budget: a push that would take the mailboxes alone past
//! it is refused rather than let a publisher grow the process without
//! bound. Expired messages are swept in the background
//! ([`Mailboxes::sweep`], called by the hub's sweeper thread), so a mailbox
//! nobody pushes to or reads again does not keep its messages past their
//! TTL, and an empty mailbox nobody waits on is removed.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::error::Report;
use crate::hub::history::StorageError;
use crate::hub::id::now_ms;

/// Bytes counted for each waiting message besides its text: its text's
/// allocation header. Its place in the mailbox's queue is counted with the
/// queue's capacity (see [`SLOT`]).
const MESSAGE_OVERHEAD: u64 = 16;
/// Bytes of one place in a mailbox's queue, counted for every place the
/// queue has, used or not.
const SLOT: u64 = std::mem::size_of::<Message>() as u64;
/// Bytes counted for each mailbox besides its key: its map entry and queue.
const MAILBOX_OVERHEAD: u64 = 160;

/// A mailbox message as a [`MailboxStore`] keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The mailbox key.
    pub key: String,
    /// Its number: unique in the store, increasing in push order.
    pub seq: u64,
    /// When it was pushed, in milliseconds since the Unix epoch (its TTL
    /// runs on across a restart).
    pub pushed_ms: u64,
    /// The message.
    pub text: String,
}

/// Where a hub keeps its waiting mailbox messages so they survive a
/// restart (see [`Hub::with_stores`](crate::Hub::with_stores)).
///
/// A message is put when pushed and removed once taken (for a consuming
/// stream: once written to its client), so a crash between the two can
/// deliver it again but never loses it. `put` is called with the hub's
/// mailbox lock held, so a store sees pushes in `seq` order; `remove` may
/// come from any thread, in any order.
pub trait MailboxStore: Send + 'static {
    /// Every kept message, in `seq` order.
    ///
    /// # Errors
    ///
    /// When the store cannot be read.
    fn load(&mut self) -> Result<Vec<StoredMessage>, StorageError>;

    /// Keeps `message`.
    ///
    /// # Errors
    ///
    /// When it cannot: the push is refused
    /// ([`HubError::Storage`](crate::HubError::Storage)).
    fn put(&mut self, message: &StoredMessage) -> Result<(), StorageError>;

    /// Forgets message `seq` (taken, or expired).
    ///
    /// # Errors
    ///
    /// When it cannot; the hub logs it (the message may come again after a
    /// restart).
    fn remove(&mut self, seq: u64) -> Result<(), StorageError>;

    /// Forgets every message of `seqs` (expired), at once where the store
    /// can. Default: [`remove`](MailboxStore::remove) each.
    ///
    /// # Errors
    ///
    /// As for `remove`.
    fn remove_many(&mut self, seqs: &[u64]) -> Result<(), StorageError> {
        seqs.iter().try_for_each(|&seq| self.remove(seq))
    }
}

/// Why a push was refused.
#[derive(Debug)]
pub(crate) enum PushError {
    /// The mailbox holds `capacity` messages already.
    Full,
    /// The mailboxes would take more than the retained budget.
    OverBudget,
    /// The store could not keep the message.
    Storage(StorageError),
}

/// A waiting message.
pub(crate) struct Message {
    /// Its number in the mailbox store.
    pub(crate) seq: u64,
    /// When its TTL runs out; `None`: never (a TTL too long for the clock).
    pub(crate) expires: Option<Instant>,
    pub(crate) text: String,
}

impl Message {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| now > e)
    }

    fn cost(&self) -> u64 {
        self.text.len() as u64 + MESSAGE_OVERHEAD
    }
}

struct Mailbox {
    queue: VecDeque<Message>,
    /// One token wakes one waiting consumer; made when a consumer first
    /// waits, so a mailbox only pushed to costs no channel.
    notify: Option<(Sender<()>, Receiver<()>)>,
    waiters: usize,
}

impl Mailbox {
    fn new() -> Self {
        Mailbox {
            queue: VecDeque::new(),
            notify: None,
            waiters: 0,
        }
    }

    /// Wakes one waiting consumer, if any; a full token channel means a
    /// wake-up is already pending.
    fn wake_one(&self) {
        if let Some((tx, _)) = &self.notify {
            let _ = tx.try_send(());
        }
    }

    fn idle(&self) -> bool {
        self.queue.is_empty() && self.waiters == 0
    }
}

fn mailbox_cost(key: &str) -> u64 {
    key.len() as u64 + MAILBOX_OVERHEAD
}

/// The mailboxes of a hub.
pub(crate) struct Mailboxes {
    boxes: Mutex<HashMap<Box<str>, Mailbox>>,
    /// Where waiting messages are also kept, if anywhere. Locked inside
    /// `boxes` (never the other way round).
    store: Option<Mutex<Box<dyn MailboxStore>>>,
    /// The `seq` of the next message.
    next_message: AtomicU64,
    capacity: usize,
    ttl: Duration,
    /// Most bytes the mailboxes may hold; 0: no bound.
    budget: u64,
    /// Bytes held now (messages, keys and their bookkeeping).
    bytes: AtomicU64,
}

impl fmt::Debug for Mailboxes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mailboxes")
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

impl Mailboxes {
    /// Empty mailboxes holding `capacity` messages each for `ttl`, within
    /// `budget` bytes in all (0: no bound).
    pub(crate) fn new(capacity: usize, ttl: Duration, budget: u64) -> Self {
        Mailboxes {
            boxes: Mutex::new(HashMap::new()),
            store: None,
            next_message: AtomicU64::new(0),
            capacity,
            ttl,
            budget,
            bytes: AtomicU64::new(0),
        }
    }

    /// Mailboxes kept in `store` too, holding again what it kept, minus
    /// the messages whose TTL ran out (counted from when they were pushed).
    ///
    /// # Errors
    ///
    /// When the store cannot be read.
    pub(crate) fn restore(
        mut store: Box<dyn MailboxStore>,
        capacity: usize,
        ttl: Duration,
        budget: u64,
    ) -> Result<Self, StorageError> {
        let stored = store.load()?;
        let next_message = stored
            .iter()
            .map(|m| m.seq.saturating_add(1))
            .max()
            .unwrap_or(0);
        let mut me = Mailboxes::new(capacity, ttl, budget);
        me.next_message = AtomicU64::new(next_message);
        let (now, now_wall) = (Instant::now(), now_ms());
        let mut boxes = HashMap::new();
        let mut bytes = 0;
        for m in stored {
            let age = Duration::from_millis(now_wall.saturating_sub(m.pushed_ms));
            let Some(left) = ttl.checked_sub(age) else {
                if let Err(e) = store.remove(m.seq) {
                    log::warn!("cannot remove an expired mailbox message: {}", Report(&e));
                }
                continue;
            };
            let message = Message {
                seq: m.seq,
                expires: now.checked_add(left),
                text: m.text,
            };
            bytes += message.cost();
            let mailbox = boxes.entry(Box::from(m.key.as_str())).or_insert_with(|| {
                bytes += mailbox_cost(&m.key);
                Mailbox::new()
            });
            mailbox.queue.push_back(message);
        }
        me.boxes = Mutex::new(boxes);
        me.bytes = AtomicU64::new(bytes);
        me.store = Some(Mutex::new(store));
        Ok(me)
    }

    /// Bytes the mailboxes hold now.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, Mailbox>> {
        // Every critical section leaves the map consistent (single pushes
        // and removals): keep serving after a panic elsewhere.
        self.boxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the store, if there is one.
    fn with_store<T>(
        &self,
        f: impl FnOnce(&mut dyn MailboxStore) -> Result<T, StorageError>,
    ) -> Option<Result<T, StorageError>> {
        let store = self.store.as_ref()?;
        // A panic inside the store leaves nothing half-done on our side.
        let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(store.as_mut()))
    }

    /// Removes taken or expired message `seq` from the store, if any.
    pub(crate) fn forget(&self, key: &str, seq: u64) {
        if let Some(Err(e)) = self.with_store(|s| s.remove(seq)) {
            log::error!(
                "mailbox {key:?}: cannot remove a message from the store, it may be delivered again after a restart: {}",
                Report(&e)
            );
        }
    }

    /// Removes expired messages from the store, if any, in one go. Called
    /// with the mailboxes unlocked: the store may be slow (a disk).
    fn forget_expired(&self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        if let Some(Err(e)) = self.with_store(|s| s.remove_many(seqs)) {
            log::error!(
                "cannot remove {} expired mailbox messages from the store, they may come back after a restart: {}",
                seqs.len(),
                Report(&e)
            );
        }
    }

    /// Runs `f` on `mailbox`'s queue, counting any change of its capacity;
    /// a queue left well below its capacity gives the rest back.
    fn with_queue<R>(
        &self,
        mailbox: &mut Mailbox,
        f: impl FnOnce(&mut VecDeque<Message>) -> R,
    ) -> R {
        let before = mailbox.queue.capacity();
        let r = f(&mut mailbox.queue);
        let q = &mut mailbox.queue;
        if q.capacity() > 16 && q.len() < q.capacity() / 4 {
            q.shrink_to(q.len() * 2);
        }
        let (before, after) = (before as u64 * SLOT, q.capacity() as u64 * SLOT);
        if after > before {
            self.bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
        r
    }

    /// The mailbox `key`, made (and counted) if missing.
    fn entry<'m>(&self, boxes: &'m mut HashMap<Box<str>, Mailbox>, key: &str) -> &'m mut Mailbox {
        if !boxes.contains_key(key) {
            self.bytes.fetch_add(mailbox_cost(key), Ordering::Relaxed);
        }
        boxes.entry(Box::from(key)).or_insert_with(Mailbox::new)
    }

    /// Removes `key` if nothing waits in it and nobody waits on it.
    fn remove_if_idle(&self, boxes: &mut HashMap<Box<str>, Mailbox>, key: &str) {
        if boxes.get(key).is_some_and(Mailbox::idle)
            && let Some(m) = boxes.remove(key)
        {
            let slots = m.queue.capacity() as u64 * SLOT;
            self.bytes
                .fetch_sub(mailbox_cost(key) + slots, Ordering::Relaxed);
        }
    }

    /// Takes `message` out of the count.
    fn uncount(&self, message: &Message) {
        self.bytes.fetch_sub(message.cost(), Ordering::Relaxed);
    }

    /// Drops the expired messages at the front of `mailbox`, adding their
    /// numbers to `expired` for the store (see
    /// [`forget_expired`](Mailboxes::forget_expired)).
    fn expire(&self, mailbox: &mut Mailbox, now: Instant, expired: &mut Vec<u64>) {
        let gone = self.with_queue(mailbox, |q| {
            let mut gone = Vec::new();
            while q.front().is_some_and(|m| m.expired(now)) {
                gone.extend(q.pop_front());
            }
            gone
        });
        for m in gone {
            self.uncount(&m);
            expired.push(m.seq);
        }
    }

    /// Queues `text` in `key` for exactly one consumer; returns how many
    /// messages wait there now.
    pub(crate) fn push(&self, key: &str, text: String) -> Result<usize, PushError> {
        let mut boxes = self.lock();
        let cost = text.len() as u64
            + MESSAGE_OVERHEAD
            + if boxes.contains_key(key) {
                0
            } else {
                mailbox_cost(key)
            };
        let mut expired = Vec::new();
        if let Some(mailbox) = boxes.get_mut(key) {
            self.expire(mailbox, Instant::now(), &mut expired);
            if mailbox.queue.len() >= self.capacity {
                drop(boxes);
                self.forget_expired(&expired);
                return Err(PushError::Full);
            }
        }
        if self.budget > 0 && self.bytes().saturating_add(cost) > self.budget {
            return Err(PushError::OverBudget);
        }
        let message = Message {
            seq: self.next_message.fetch_add(1, Ordering::Relaxed),
            expires: Instant::now().checked_add(self.ttl),
            text,
        };
        // Under the mailbox lock, so the store sees pushes in `seq` order.
        let stored = self.with_store(|s| {
            s.put(&StoredMessage {
                key: key.to_owned(),
                seq: message.seq,
                pushed_ms: now_ms(),
                text: message.text.clone(),
            })
        });
        if let Some(Err(e)) = stored {
            return Err(PushError::Storage(e));
        }
        self.bytes.fetch_add(message.cost(), Ordering::Relaxed);
        let mailbox = self.entry(&mut boxes, key);
        self.with_queue(mailbox, |q| q.push_back(message));
        mailbox.wake_one();
        let queued = mailbox.queue.len();
        drop(boxes);
        self.forget_expired(&expired);
        Ok(queued)
    }

    /// Takes the oldest message of `key` out of memory; it stays in the
    /// store until [`forget`](Mailboxes::forget) (or comes back with
    /// [`untake`](Mailboxes::untake)).
    pub(crate) fn take(&self, key: &str) -> Option<Message> {
        let mut boxes = self.lock();
        let mailbox = boxes.get_mut(key)?;
        let mut expired = Vec::new();
        self.expire(mailbox, Instant::now(), &mut expired);
        let message = self.with_queue(mailbox, VecDeque::pop_front);
        if !mailbox.queue.is_empty() {
            mailbox.wake_one(); // let another consumer in
        }
        if let Some(m) = &message {
            self.uncount(m);
        }
        self.remove_if_idle(&mut boxes, key);
        drop(boxes);
        self.forget_expired(&expired);
        message
    }

    /// Puts a message taken by [`take`](Mailboxes::take) back at the front,
    /// when it could not be delivered.
    pub(crate) fn untake(&self, key: &str, message: Message) {
        let mut boxes = self.lock();
        self.bytes.fetch_add(message.cost(), Ordering::Relaxed);
        let mailbox = self.entry(&mut boxes, key);
        self.with_queue(mailbox, |q| q.push_front(message));
        mailbox.wake_one();
    }

    /// Messages waiting in `key`.
    pub(crate) fn len(&self, key: &str) -> usize {
        self.lock().get(key).map_or(0, |m| m.queue.len())
    }

    /// A receiver that gets a token when `key` may have a message; counts
    /// the caller as a waiter until [`leave`](Mailboxes::leave).
    pub(crate) fn wait_handle(&self, key: &str) -> Receiver<()> {
        let mut boxes = self.lock();
        let mailbox = self.entry(&mut boxes, key);
        mailbox.waiters += 1;
        let (_, rx) = mailbox
            .notify
            .get_or_insert_with(|| crossbeam_channel::bounded(1));
        rx.clone()
    }

    /// Wakes a consumer of `key`, if one waits (Redis: a push was
    /// announced).
    pub(crate) fn notify(&self, key: &str) {
        if let Some(m) = self.lock().get(key) {
            m.wake_one();
        }
    }

    /// A consumer of `key` stopped waiting.
    pub(crate) fn leave(&self, key: &str) {
        let mut boxes = self.lock();
        if let Some(m) = boxes.get_mut(key) {
            m.waiters = m.waiters.saturating_sub(1);
            if m.waiters == 0 {
                m.notify = None;
            } else if !m.queue.is_empty() {
                m.wake_one(); // hand the wake-up on
            }
        }
        self.remove_if_idle(&mut boxes, key);
    }

    /// Drops every expired message and every idle mailbox; returns how many
    /// messages expired. Messages of a mailbox expire in push order (one TTL
    /// for all), so only the front of each is looked at.
    pub(crate) fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut boxes = self.lock();
        let keys: Vec<Box<str>> = boxes
            .iter()
            .filter(|(_, m)| m.idle() || m.queue.front().is_some_and(|f| f.expired(now)))
            .map(|(k, _)| k.clone())
            .collect();
        let mut expired = Vec::new();
        for key in keys {
            if let Some(mailbox) = boxes.get_mut(&key) {
                self.expire(mailbox, now, &mut expired);
            }
            self.remove_if_idle(&mut boxes, &key);
        }
        drop(boxes);
        // One write for all of them, with the mailboxes free meanwhile.
        self.forget_expired(&expired);
        expired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_follow_what_waits_and_come_back_to_zero() {
        let m = Mailboxes::new(10, Duration::from_secs(60), 0);
        m.push("k", "abc".into()).expect("room");
        m.push("k", "defg".into()).expect("room");
        let slots = |m: &Mailboxes, k: &str| {
            m.lock()
                .get(k)
                .map_or(0, |b| b.queue.capacity() as u64 * SLOT)
        };
        let want = mailbox_cost("k") + 3 + 4 + 2 * MESSAGE_OVERHEAD + slots(&m, "k");
        assert_eq!(m.bytes(), want);
        let a = m.take("k").expect("queued");
        m.untake("k", a);
        assert_eq!(m.bytes(), want, "given back");
        assert_eq!(m.take("k").map(|m| m.text).as_deref(), Some("abc"));
        assert_eq!(m.take("k").map(|m| m.text).as_deref(), Some("defg"));
        assert_eq!(m.bytes(), 0, "the empty mailbox is gone too");
        let rx = m.wait_handle("w");
        assert!(m.bytes() > 0, "a waited-on mailbox is counted");
        drop(rx);
        m.leave("w");
        assert_eq!(m.bytes(), 0);
    }

    #[test]
    fn the_budget_refuses_what_the_mailboxes_cannot_hold() {
        // Two mailboxes of one 100-byte message each, with their queues'
        // first places (a queue grows by four).
        let budget = 2 * (MAILBOX_OVERHEAD + MESSAGE_OVERHEAD + 110 + 4 * SLOT);
        let m = Mailboxes::new(10, Duration::from_secs(60), budget);
        m.push("a", "x".repeat(100)).expect("room");
        m.push("b", "x".repeat(100)).expect("room");
        assert!(matches!(
            m.push("c", "x".repeat(100)),
            Err(PushError::OverBudget)
        ));
        assert!(m.bytes() <= budget);
        m.take("a").expect("queued");
        m.push("c", "x".repeat(100)).expect("room again");
    }

    #[test]
    fn a_mailbox_emptied_gives_back_its_queue() {
        let m = Mailboxes::new(1000, Duration::from_secs(60), 0);
        for i in 0..1000 {
            m.push("k", format!("{i}")).expect("room");
        }
        m.push("other", "x".into()).expect("room");
        for _ in 0..990 {
            m.take("k").expect("queued");
        }
        let boxes = m.lock();
        assert!(
            boxes["k"].queue.capacity() < 64,
            "{}",
            boxes["k"].queue.capacity()
        );
        let held: u64 = boxes
            .iter()
            .map(|(k, b)| {
                mailbox_cost(k)
                    + b.queue.capacity() as u64 * SLOT
                    + b.queue.iter().map(Message::cost).sum::<u64>()
            })
            .sum();
        assert_eq!(m.bytes(), held, "counted as held");
    }

    #[test]
    fn the_sweep_drops_expired_messages_and_idle_mailboxes() {
        let m = Mailboxes::new(10, Duration::from_millis(20), 0);
        for i in 0..100 {
            m.push(&format!("k{i}"), "old".into()).expect("room");
        }
        std::thread::sleep(Duration::from_millis(40));
        m.push("fresh", "new".into()).expect("room");
        assert_eq!(m.sweep(), 100);
        assert_eq!(m.lock().len(), 1, "only the fresh mailbox is left");
        let slots = m.lock()["fresh"].queue.capacity() as u64 * SLOT;
        assert_eq!(
            m.bytes(),
            mailbox_cost("fresh") + 3 + MESSAGE_OVERHEAD + slots
        );
    }
}
