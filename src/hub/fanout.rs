//! A subscriber's queue and the threads that wake subscribers.
//!
//! Fan-out cost is dominated by waking threads: one futex wake per
//! subscriber per event, then a context switch. Two things keep that off the
//! publisher's back and let events batch:
//!
//! - a publish only pushes the shared frame onto each queue and notes which
//!   subscribers are parked; waking them happens after the hub's locks are
//!   released, on a waker thread when there are many, so a publisher is back
//!   to its next event in microseconds;
//! - a subscriber drains everything queued in one write per wake-up, and is
//!   not woken again while it is awake, so a fast publisher's events
//!   coalesce instead of costing a wake each;
//! - a subscriber that sleeps with nothing unsent is not woken at all: the
//!   waker sends its frames with one non-blocking `send` on its behalf (see
//!   [`Direct`]), which spares the futex wake and both context switches.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::event::EncodedEvent;
use crate::http::chunked::frame_into;
use crate::hub::grant::{Grant, Privacy, Selector, covers_any};
use crate::stats::Stats;
use crate::wire::Wire;

/// Subscribers woken inline by the publisher; more go to the waker threads.
const INLINE_WAKES: usize = 8;
/// Most frames a waker sends for a sleeping subscriber. A deeper queue
/// means the publisher outruns the wakers: the subscriber's own thread then
/// drains it, so the subscribers' threads share that work across the cores
/// instead of the wakers falling behind until queues overflow. Measured
/// with 100 subscribers and the publisher flat out (2 cores, 2 wakers): 1
/// gives 0.54-0.61 M deliveries/s at 2.6-2.9 us of CPU each; 16 gives
/// 1.07-1.25 M at 1.0-1.2 us and no drop in 8 runs; 64 dropped subscribers
/// as slow in one run of 3 (and with one waker and no bound, 3 runs in 5
/// lost them all).
const DIRECT_MAX: usize = 16;
/// Most bytes of frames a waker sends for a sleeping subscriber; larger
/// frames are written by the subscriber's own thread, without a copy (see
/// `crate::stream::write`). A waker copies what it sends into one buffer, and what
/// the socket does not take waits in the subscriber's `carry`: this keeps
/// that copy, which a client that stops reading pins for the write
/// timeout, small whatever the frames.
pub(crate) const DIRECT_BYTES: usize = 16 * 1024;

/// One subscriber's queue of frames.
#[derive(Debug)]
pub(crate) struct SubscriberQueue {
    frames: Mutex<Frames>,
    capacity: usize,
    /// Most bytes of frames it may hold before the subscriber is dropped as
    /// slow (one frame at least): a subscriber that does not read keeps
    /// what waits here alive even after history lets it go.
    max_bytes: usize,
    /// Set by the subscriber just before it parks; whoever pushes a frame
    /// and finds it set owes the subscriber a wake-up.
    waiting: AtomicBool,
    /// The subscriber fell behind and was dropped.
    slow: AtomicBool,
    /// No more frames will come (dropped as slow).
    closed: AtomicBool,
    /// The thread following the subscription, once it waits.
    thread: OnceLock<Thread>,
    /// Set once the following stream is open on a socket of ours: wakers
    /// may then write its frames themselves.
    direct: OnceLock<Direct>,
    /// Never offered a private update (an anonymous subscriber).
    pub(crate) public_only: bool,
    /// It follows more than one topic or selector: an update may be
    /// offered to it more than once, and it takes it once.
    pub(crate) several: bool,
    /// The topics followed exactly.
    pub(crate) topics: Box<[Arc<str>]>,
    /// Selectors followed, and the grant private updates are judged by,
    /// for the few subscribers that have either (boxed: most have none,
    /// and a subscribing stream thread builds this value on its stack).
    pub(crate) matching: Option<Box<Matching>>,
}

/// What a subscriber by selector, or one whose private updates a grant
/// decides, follows besides its topics.
#[derive(Debug)]
pub(crate) struct Matching {
    /// The selectors followed (`*`, URI templates, URL patterns): every
    /// topic they match.
    pub(crate) selectors: Box<[Selector]>,
    /// Private updates reach it when this grant covers one of their
    /// topics (`None`: as `public_only` says).
    pub(crate) grant: Option<Grant>,
}

impl Matching {
    /// What `privacy` and `selectors` call for beside the topics, if
    /// anything: `None` for exact topics with all or no private updates.
    /// Out of line (see `SubscriberQueue::following`).
    #[cold]
    #[inline(never)]
    pub(crate) fn of(selectors: &[Selector], privacy: &Privacy) -> Option<Box<Matching>> {
        let grant = match privacy {
            Privacy::Granted(g) => Some(g.clone()),
            _ => None,
        };
        (grant.is_some() || !selectors.is_empty()).then(|| {
            Box::new(Matching {
                selectors: selectors.into(),
                grant,
            })
        })
    }
}

/// What a waker needs to write a sleeping subscriber's frames itself.
///
/// Waking a thread per subscriber per event costs a futex wake and two
/// context switches, most of a sparse delivery's CPU. When the subscriber
/// sleeps with nothing unsent, a waker instead sends the frames with one
/// non-blocking `send` and leaves it asleep; the subscriber's thread picks
/// up what the waker did (its heartbeat and budget clocks) when it next
/// wakes. Whatever a waker cannot send at once (a full socket buffer, an
/// error) is kept as `carry` and the subscriber is woken to finish it with
/// its write timeout, so slow and vanished clients end exactly as before.
#[derive(Debug)]
pub(crate) struct Direct {
    /// Plain or TLS: over TLS the waker encrypts, under the session's lock
    /// (taken inside this struct's `writer`, as the stream's thread does).
    conn: Arc<Wire>,
    chunked: bool,
    stats: Stats,
    /// Held by whoever writes to the socket (the subscriber's thread or a
    /// waker), from draining the queue to the end of the write, so frames
    /// go out in queue order.
    writer: Mutex<Writer>,
    /// When a waker last sent, in nanoseconds after `epoch`; 0: not since
    /// the subscriber last looked.
    sent_at: AtomicU64,
    epoch: Instant,
}

/// The state behind [`Direct::writer`].
#[derive(Debug, Default)]
pub(crate) struct Writer {
    /// Wakers may write (false once the following stream is done).
    enabled: bool,
    /// Bytes a waker could not send: they go before anything else.
    pub(crate) carry: Vec<u8>,
    /// Bytes the subscriber handed to the wakers to send for it (its head,
    /// a heartbeat), with the number of frames in them: they go out before
    /// any queued frame. See [`Wakers::hand_off`].
    outbox: Vec<u8>,
    outbox_frames: u64,
}

impl Writer {
    /// No more writes by wakers.
    pub(crate) fn stop(&mut self) {
        self.enabled = false;
    }

    /// Whether a waker may be handed bytes to send: writes are on and
    /// nothing is left over from a send that fell short.
    pub(crate) fn can_hand_off(&self) -> bool {
        self.enabled && self.carry.is_empty()
    }

    /// Lets `f` add one frame to what a waker will send; `f` says whether
    /// it did.
    pub(crate) fn stage_with<E>(
        &mut self,
        f: impl FnOnce(&mut Vec<u8>) -> Result<bool, E>,
    ) -> Result<(), E> {
        if f(&mut self.outbox)? {
            self.outbox_frames += 1;
        }
        Ok(())
    }

    /// Whether bytes wait for a waker.
    pub(crate) fn has_staged(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Takes the staged bytes back, to send them on the subscriber's own
    /// thread: counted as sent (bytes only; the frames are counted here).
    pub(crate) fn take_staged(&mut self, stats: &Stats) -> Vec<u8> {
        stats.sent(std::mem::take(&mut self.outbox_frames), 0);
        std::mem::take(&mut self.outbox)
    }
}

/// A subscriber's waiting frames and their size.
#[derive(Debug, Default)]
struct Frames {
    queue: VecDeque<EncodedEvent>,
    bytes: usize,
}

impl Frames {
    fn pop(&mut self) -> Option<EncodedEvent> {
        let frame = self.queue.pop_front()?;
        self.bytes = self.bytes.saturating_sub(frame.as_bytes().len());
        Some(frame)
    }
}

/// What a push did.
pub(crate) enum Pushed {
    /// Queued; the subscriber is awake (or will look before parking).
    Queued,
    /// Queued; the subscriber is parked and must be woken.
    QueuedWake,
    /// The queue was full: the subscriber is now closed as slow and must be
    /// woken to find out.
    Slow,
}

impl SubscriberQueue {
    /// A new queue, shared, for a subscriber of `topics` exactly and of
    /// what `matching` names. Out of line: the value is put together on
    /// the stack before it moves to the heap, and a subscribing stream
    /// thread should not carry those bytes in its own frame (see
    /// `Stream::follow`).
    #[inline(never)]
    pub(crate) fn following(
        capacity: usize,
        max_bytes: usize,
        topics: Box<[Arc<str>]>,
        public_only: bool,
        matching: Option<Box<Matching>>,
    ) -> Arc<Self> {
        let selectors = matching.as_ref().map_or(0, |m| m.selectors.len());
        Arc::new(SubscriberQueue {
            frames: Mutex::new(Frames::default()),
            capacity: capacity.max(1),
            max_bytes,
            waiting: AtomicBool::new(false),
            slow: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            thread: OnceLock::new(),
            direct: OnceLock::new(),
            public_only,
            several: topics.len() + selectors > 1,
            topics,
            matching,
        })
    }

    /// The selectors it follows.
    pub(crate) fn selectors(&self) -> &[Selector] {
        self.matching.as_ref().map_or(&[], |m| &m.selectors)
    }

    /// Whether a private update of `topic` may reach it.
    pub(crate) fn allows(&self, topic: &str) -> bool {
        self.allows_any(&[topic])
    }

    /// Whether a private update of these topics may reach it: one of them
    /// is enough.
    pub(crate) fn allows_any(&self, topics: &[&str]) -> bool {
        if self.public_only {
            return false;
        }
        match self.matching.as_ref().and_then(|m| m.grant.as_ref()) {
            Some(grant) => covers_any(grant, topics),
            None => true,
        }
    }

    /// Lets wakers write to `conn` (open, `chunked` or not) while the
    /// subscriber sleeps, starting with `opening` (`frames` frames; empty
    /// when the stream's head is already out). Called on the subscriber's
    /// thread, which is the one a waker wakes when it cannot send.
    pub(crate) fn enable_direct(
        &self,
        conn: Arc<Wire>,
        chunked: bool,
        stats: Stats,
        opening: Vec<u8>,
        frames: u64,
    ) {
        let _ = self.thread.set(std::thread::current());
        let _ = self.direct.set(Direct {
            conn,
            chunked,
            stats,
            writer: Mutex::new(Writer {
                enabled: true,
                carry: Vec::new(),
                outbox: opening,
                outbox_frames: frames,
            }),
            sent_at: AtomicU64::new(0),
            epoch: Instant::now(),
        });
    }

    /// No more writes by wakers (the stream is done following); returns
    /// what a waker left unsent or was never given the chance to send,
    /// which the stream must finish before any other byte (staged frames
    /// are counted here; the bytes when they are written).
    pub(crate) fn disable_direct(&self) -> Vec<u8> {
        let (Some(d), Some(mut w)) = (self.direct.get(), self.writer()) else {
            return Vec::new();
        };
        w.enabled = false;
        let mut rest = std::mem::take(&mut w.carry);
        rest.append(&mut w.take_staged(&d.stats));
        rest
    }

    /// The stats of the socket wakers write to, when they may.
    pub(crate) fn direct_stats(&self) -> Option<&Stats> {
        self.direct.get().map(|d| &d.stats)
    }

    /// The subscriber's hold on the socket, when wakers may write to it.
    pub(crate) fn writer(&self) -> Option<MutexGuard<'_, Writer>> {
        let d = self.direct.get()?;
        // A waker panicking mid-send leaves at worst a partial frame in
        // `carry`, which the subscriber sends: keep going.
        Some(d.writer.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// When a waker last sent for this subscriber, if it did since the
    /// last call.
    pub(crate) fn take_sent_at(&self) -> Option<Instant> {
        let d = self.direct.get()?;
        match d.sent_at.swap(0, Ordering::SeqCst) {
            0 => None,
            ns => d.epoch.checked_add(Duration::from_nanos(ns)),
        }
    }

    /// Sends the queued frames on the sleeping subscriber's behalf; false
    /// when the subscriber must be woken instead (no direct mode, busy,
    /// closed, or not everything could be sent).
    fn write_through(&self, scratch: &mut Scratch) -> bool {
        let Some(d) = self.direct.get() else {
            return false;
        };
        let mut w = match d.writer.try_lock() {
            Ok(w) => w,
            // As in `writer()`: a panic mid-send leaves at worst a partial
            // frame in `carry`, which stops direct writes below.
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        // Records a send left in a TLS session count as carry: the
        // subscriber's thread sends them with its write timeout.
        if !w.enabled || !w.carry.is_empty() || d.conn.has_unsent() || self.is_closed() {
            return false;
        }
        let Scratch { frames, buf } = scratch;
        frames.clear();
        let mut first = true;
        loop {
            if !self.drain_direct(frames, first) {
                // Too much for a waker: the subscriber's thread writes it.
                return false;
            }
            first = false;
            if !frames.is_empty() || !w.outbox.is_empty() {
                buf.clear();
                // What the subscriber staged goes first. Its buffer is
                // freed here, on the waker, like everything sent for it.
                buf.extend_from_slice(&std::mem::take(&mut w.outbox));
                let staged = std::mem::take(&mut w.outbox_frames);
                for f in frames.iter() {
                    frame_into(buf, f.as_bytes(), d.chunked);
                }
                let sent = d.conn.send_now(buf).unwrap_or(0);
                d.stats.sent(frames.len() as u64 + staged, sent as u64);
                if sent < buf.len() {
                    w.carry.extend_from_slice(&buf[sent..]);
                    return false;
                }
                if d.conn.has_unsent() {
                    return false; // as carry, above
                }
                let ns = u64::try_from(d.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                d.sent_at.store(ns.max(1), Ordering::SeqCst);
                frames.clear();
            }
            // Still asleep: the next push must come back here. A push that
            // slipped in after the drain either found the flag set (and
            // wakes) or left it to us: then go round once more.
            self.waiting.store(true, Ordering::SeqCst);
            if self.len() == 0 || !self.waiting.swap(false, Ordering::SeqCst) {
                return true;
            }
        }
    }

    fn frames(&self) -> MutexGuard<'_, Frames> {
        // Every critical section is a push or a drain: a panic cannot leave
        // the queue half-changed.
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers a frame (publisher side).
    pub(crate) fn push(&self, frame: &EncodedEvent) -> Pushed {
        {
            let mut frames = self.frames();
            let size = frame.as_bytes().len();
            if frames.queue.len() >= self.capacity
                || (!frames.queue.is_empty() && frames.bytes + size > self.max_bytes)
            {
                drop(frames);
                self.slow.store(true, Ordering::SeqCst);
                self.closed.store(true, Ordering::SeqCst);
                return Pushed::Slow;
            }
            frames.queue.push_back(frame.clone());
            frames.bytes += size;
        }
        if self.waiting.swap(false, Ordering::SeqCst) {
            Pushed::QueuedWake
        } else {
            Pushed::Queued
        }
    }

    /// Closes the queue as slow without a push (its frames waited
    /// elsewhere and overflowed there).
    pub(crate) fn close_slow(&self) {
        self.slow.store(true, Ordering::SeqCst);
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Moves up to `max` frames and `max_bytes` of them (one at least) into
    /// `out` (subscriber side).
    pub(crate) fn drain_into(&self, out: &mut Vec<EncodedEvent>, max: usize, max_bytes: usize) {
        let mut frames = self.frames();
        let mut bytes = 0;
        for taken in 0..max {
            let Some(next) = frames.queue.front() else {
                break;
            };
            let size = next.as_bytes().len();
            if taken > 0 && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            if let Some(f) = frames.pop() {
                out.push(f);
            }
        }
        if frames.queue.is_empty() && frames.queue.capacity() > 64 {
            frames.queue.shrink_to(8); // do not hold a burst's memory while idle
        }
    }

    /// Moves queued frames into `out` for a waker to send; false, and
    /// nothing moves, when they are the subscriber's thread's to write.
    /// On a waker's `first` look, every frame, if they are few and small
    /// ([`DIRECT_MAX`], [`DIRECT_BYTES`]): a deeper queue means the
    /// publisher outruns the wakers. Once it is sending, as many as fit
    /// [`DIRECT_BYTES`], so it keeps up with a fast publisher without its
    /// buffer (and what it may leave in `carry`) growing.
    fn drain_direct(&self, out: &mut Vec<EncodedEvent>, first: bool) -> bool {
        let mut frames = self.frames();
        if first {
            if frames.queue.len() > DIRECT_MAX || frames.bytes > DIRECT_BYTES {
                return false;
            }
            out.extend(frames.queue.drain(..));
            frames.bytes = 0;
            return true;
        }
        if frames
            .queue
            .front()
            .is_some_and(|f| f.as_bytes().len() > DIRECT_BYTES)
        {
            return false;
        }
        let mut bytes = 0;
        while let Some(next) = frames.queue.front() {
            bytes += next.as_bytes().len();
            if bytes > DIRECT_BYTES {
                break;
            }
            out.extend(frames.pop());
        }
        true
    }

    pub(crate) fn try_pop(&self) -> Option<EncodedEvent> {
        self.frames().pop()
    }

    pub(crate) fn len(&self) -> usize {
        self.frames().queue.len()
    }

    pub(crate) fn is_slow(&self) -> bool {
        self.slow.load(Ordering::SeqCst)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Announces that the subscriber is about to park; returns false (and
    /// withdraws) when there is already something to do, so no wake-up can
    /// be lost between the last look and the park.
    pub(crate) fn prepare_park(&self) -> bool {
        let _ = self.thread.set(std::thread::current()); // the first follower stays
        self.waiting.store(true, Ordering::SeqCst);
        if self.len() > 0 || self.is_closed() {
            self.waiting.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// After parking (woken or timed out).
    pub(crate) fn unparked(&self) {
        self.waiting.store(false, Ordering::SeqCst);
    }

    fn wake(&self, scratch: &mut Scratch) {
        if self.write_through(scratch) {
            return;
        }
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

/// Buffers a waker reuses from one subscriber to the next, so sending on
/// their behalf allocates nothing per delivery.
#[derive(Default)]
struct Scratch {
    frames: Vec<EncodedEvent>,
    buf: Vec<u8>,
}

/// Wakes (or writes for) every queue of `list`.
fn wake_all(list: &[Arc<SubscriberQueue>]) {
    let mut scratch = Scratch::default();
    for q in list {
        q.wake(&mut scratch);
    }
}

/// Wakes parked subscribers, off the publisher's path when there are many.
#[derive(Debug)]
pub(crate) struct Wakers {
    tx: OnceLock<Option<Sender<Vec<Arc<SubscriberQueue>>>>>,
}

impl Wakers {
    /// The hub's wakers, started now: the first stream to hand bytes over
    /// must not start threads itself (a stream thread keeps every stack
    /// page it touches, and starting a thread takes several).
    pub(crate) fn started() -> Self {
        let wakers = Wakers {
            tx: OnceLock::new(),
        };
        let _ = wakers.tx.get_or_init(spawn_wakers);
        wakers
    }

    /// Wakes every queue of `list`.
    pub(crate) fn wake(&self, list: Vec<Arc<SubscriberQueue>>) {
        if list.len() <= INLINE_WAKES {
            wake_all(&list);
            return;
        }
        let Some(tx) = self.tx.get_or_init(spawn_wakers) else {
            wake_all(&list);
            return;
        };
        let shares = waker_count();
        let per = list.len().div_ceil(shares);
        let mut list = list;
        while !list.is_empty() {
            let rest = list.split_off(per.min(list.len()));
            if let Err(e) = tx.send(list) {
                wake_all(&e.into_inner());
            }
            list = rest;
        }
    }
}

impl Wakers {
    /// Has a waker send what the subscriber of `queue` staged in its
    /// [`Writer`]: false when no waker thread runs, and
    /// the subscriber must send it itself.
    #[inline(never)]
    pub(crate) fn hand_off(&self, queue: Arc<SubscriberQueue>) -> bool {
        match self.tx.get_or_init(spawn_wakers) {
            Some(tx) => tx.send(vec![queue]).is_ok(),
            None => false,
        }
    }
}

/// One waker thread per core, up to four. Wakers mostly send frames on
/// sleeping subscribers' behalf now, so a second one on 2 cores halves the
/// time to reach the last subscriber (p99 at 1,000 subscribers, five runs
/// each: 12.4-17.4 ms with two against 18.2-26.0 with one).
fn waker_count() -> usize {
    // Asked once: the answer reads cgroup files.
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4)))
}

/// Starts the waker thread(s); `None` (wake inline) if none can start. They
/// end when the hub, which holds the only sender, is dropped.
fn spawn_wakers() -> Option<Sender<Vec<Arc<SubscriberQueue>>>> {
    let (tx, rx) = crossbeam_channel::unbounded::<Vec<Arc<SubscriberQueue>>>();
    let mut started = 0;
    for i in 0..waker_count() {
        let rx = rx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ssed-waker-{i}"))
            .stack_size(64 * 1024)
            .spawn(move || {
                for list in rx {
                    wake_all(&list);
                }
            });
        match spawned {
            Ok(_) => started += 1,
            Err(e) => log::warn!("cannot start a waker thread: {e}; waking inline"),
        }
    }
    (started > 0).then_some(tx)
}
