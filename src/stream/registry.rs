//! The open streams, so shutdown can reach them: their sockets (to fail a
//! write that blocks) and their threads (to wake one that waits); so a
//! stream whose connection died can be told at once (see
//! [`Registry::hang_up`]); and so an operator can list them and end one
//! now (see [`Registry::ids`] and [`Registry::revoke`]).
//!
//! What is known of one stream for that ([`Tracked`]: its peer, when it
//! opened, what it sent, whom and what it follows) lives here, on the
//! heap, shared with the stream: none of it weighs on the stream thread's
//! stack, whose every touched page stays resident (see `Stream::follow`).

use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use crossbeam_channel::Sender;
use rustix::event::epoll;

use crate::error::EndReason;
use crate::shutdown::ShutdownHandle;
use crate::stats::{Stats, Tally};
use crate::stream::write::failure_reason;
use crate::wire::Wire;

/// The bit that marks a watched stream in the poller's event data (the
/// rest is its id in the registry); the acceptor's own entries never set
/// it.
pub(crate) const STREAM_TAG: u64 = 1 << 62;

/// What [`Registry::hang_up`] found: still up.
pub(crate) const HUNG_UP_NOT: u8 = 0;
/// The peer closed (its side, at least) or reset the connection.
pub(crate) const HUNG_UP_CLIENT: u8 = 1;
/// The kernel gave the connection up: data or keepalive probes went
/// unacknowledged past `TCP_USER_TIMEOUT` (a peer that vanished).
pub(crate) const HUNG_UP_TIMEOUT: u8 = 2;
/// An operator ended the stream (see [`Registry::revoke`]).
pub(crate) const HUNG_UP_REVOKED: u8 = 3;

/// Open stream sockets, so shutdown can unblock a thread stuck in `write`.
/// Holds a reference to the same socket (no second descriptor).
#[derive(Default)]
pub(crate) struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
    /// The poller that reports a stream's connection dying (the acceptor's,
    /// which calls [`Registry::hang_up`]); none: nobody watches.
    watch: OnceLock<OwnedFd>,
}

struct Entry {
    conn: Arc<Wire>,
    tracked: Arc<Tracked>,
    /// The stream's thread, unparked at shutdown.
    thread: std::thread::Thread,
    /// Dropped at shutdown: disconnects the stream's own wake-up channel.
    wake: Option<Sender<()>>,
}

/// One open stream, as its thread, the registry and an operator's listing
/// share it: why it must end if it must (set by the registry, read by the
/// stream), and what it is (for the listing).
// Only the daemon lists and ends streams.
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
pub(crate) struct Tracked {
    id: u64,
    /// One of the `HUNG_UP_*` values: [`HUNG_UP_NOT`] until the stream
    /// must end, then why (the first reason sticks).
    hang_up: AtomicU8,
    peer: SocketAddr,
    /// The client's address, as a trusted proxy gives it (else the peer's).
    client: IpAddr,
    opened: SystemTime,
    /// Its handle on the server's counters, which also counts what was
    /// written to it, by its thread or by wakers on its behalf.
    stats: Stats,
    /// Who its client is, when its handler knows (a JWT's subject).
    subject: OnceLock<Box<str>>,
    /// What it follows, as its handler describes it.
    follows: OnceLock<Arc<dyn Following>>,
}

/// What a stream follows, as its handler tells the registry (see
/// [`Tracked::set_follows`]): for an operator's listing and its filters. The library knows streams, not what they carry; whoever opens
/// one (the daemon's subscribers, its mailbox consumers) says.
// Only the daemon lists and ends streams.
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
pub(crate) trait Following: Send + Sync {
    /// What kind of stream it is, in a word (`subscriber`, `mailbox`).
    fn kind(&self) -> &'static str;
    /// Calls `f` with each topic, selector (as its client gave it) or
    /// mailbox key it follows.
    fn each_topic(&self, f: &mut dyn FnMut(&str));
    /// Frames waiting to be written to it.
    fn queued(&self) -> usize;
    /// Itself, for its handler to find what it added (its own type).
    fn as_any(&self) -> &dyn std::any::Any;
}

// Only the daemon lists and ends streams.
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
impl Tracked {
    /// Its id in the registry.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The connection's peer.
    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The client's address: the peer's, or what a trusted proxy said.
    pub(crate) fn client(&self) -> IpAddr {
        self.client
    }

    /// When it opened.
    pub(crate) fn opened(&self) -> SystemTime {
        self.opened
    }

    /// Its handle on the server's counters (see [`Stats::for_stream`]).
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// What was written to it so far.
    pub(crate) fn tally(&self) -> Option<&Tally> {
        self.stats.tally()
    }

    /// Who its client is, if its handler said (see [`set_subject`](Tracked::set_subject)).
    pub(crate) fn subject(&self) -> Option<&str> {
        self.subject.get().map(|s| &**s)
    }

    /// What it follows, if its handler said (see [`set_follows`](Tracked::set_follows)).
    pub(crate) fn follows(&self) -> Option<&dyn Following> {
        self.follows.get().map(|f| &**f)
    }

    /// Names its client (a JWT's subject). Once: a later call is ignored.
    pub(crate) fn set_subject(&self, subject: &str) {
        let _ = self.subject.set(subject.into());
    }

    /// Says what it follows. Once: a later call is ignored.
    pub(crate) fn set_follows(&self, follows: Arc<dyn Following>) {
        let _ = self.follows.set(follows);
    }

    /// Why it must end: one of the `HUNG_UP_*` values.
    pub(crate) fn hang_up(&self) -> u8 {
        self.hang_up.load(Relaxed)
    }

    /// Whether it is ending: its connection died, or it was revoked.
    pub(crate) fn is_ending(&self) -> bool {
        self.hang_up() != HUNG_UP_NOT
    }

    /// Sets why it must end, unless a reason is set already; true if this
    /// one was.
    fn mark(&self, why: u8) -> bool {
        self.hang_up
            .compare_exchange(HUNG_UP_NOT, why, Relaxed, Relaxed)
            .is_ok()
    }
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("hang_up", &self.hang_up())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Registers a stream's socket, from `peer` (for `client`), and its
    /// thread (the caller), which shutdown unparks; its writes count in
    /// `stats` and in a tally of its own. Out of line, as is
    /// `remove`: stream threads keep every stack page they touch (see
    /// `Stream::follow`).
    ///
    /// With a poller to [watch](Registry::watch_with), the socket is
    /// watched for an error or hang-up (once): see [`Registry::hang_up`].
    #[inline(never)]
    pub(crate) fn insert(
        &self,
        conn: Arc<Wire>,
        peer: SocketAddr,
        client: IpAddr,
        stats: &Stats,
    ) -> Arc<Tracked> {
        let id = self.next.fetch_add(1, Relaxed);
        let tracked = Arc::new(Tracked {
            id,
            hang_up: AtomicU8::new(HUNG_UP_NOT),
            peer,
            client,
            opened: SystemTime::now(),
            stats: stats.for_stream(),
            subject: OnceLock::new(),
            follows: OnceLock::new(),
        });
        // In the table before the poller may report it: a connection that
        // died already reports at once, and only once.
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(
                id,
                Entry {
                    conn: Arc::clone(&conn),
                    tracked: Arc::clone(&tracked),
                    thread: std::thread::current(),
                    wake: None,
                },
            );
        }
        if let Some(poller) = self.watch.get() {
            // Errors and hang-ups (which epoll always reports), and the
            // peer closing its side: an event stream's client sends
            // nothing after its request and closes only to leave (a
            // browser's `EventSource.close()`, a closed tab), as nginx
            // also takes a client's FIN for an abort. Once: then the
            // stream ends anyway. Failing, the stream is found dead by
            // its next write, as without a poller.
            let _ = epoll::add(
                poller,
                conn.tcp(),
                epoll::EventData::new_u64(STREAM_TAG | id),
                epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT,
            );
        }
        tracked
    }

    /// Has `poller` watch every stream registered from now on: when one's
    /// connection fails, its owner calls [`Registry::hang_up`] with the
    /// event's data less [`STREAM_TAG`].
    pub(crate) fn watch_with(&self, poller: OwnedFd) {
        let _ = self.watch.set(poller);
    }

    /// Stream `id`'s connection failed or hung up (its poller said so):
    /// tells the stream why and wakes it, so a stream that waits (parked,
    /// or asleep on a channel) ends now rather than at its next write.
    /// A peer that vanished without a word is given up by the kernel after
    /// `TCP_USER_TIMEOUT` of unacknowledged data (a heartbeat) or keepalive
    /// probes: that is [`HUNG_UP_TIMEOUT`].
    ///
    /// A stream that must end already (revoked: its socket was shut down
    /// for it, which the poller reports too) keeps its first reason.
    pub(crate) fn hang_up(&self, id: u64) {
        let woken = match self.conns.lock() {
            Ok(mut conns) => conns.get_mut(&id).and_then(|e| {
                let why = match rustix::net::sockopt::socket_error(e.conn.tcp()) {
                    Ok(Err(errno)) if failure_reason(&errno.into()) == EndReason::WriteTimeout => {
                        HUNG_UP_TIMEOUT
                    }
                    _ => HUNG_UP_CLIENT,
                };
                e.tracked
                    .mark(why)
                    .then(|| (e.wake.take(), e.thread.clone()))
            }),
            Err(_) => None,
        };
        if let Some((wake, thread)) = woken {
            drop(wake); // outside the lock
            thread.unpark();
        }
    }

    /// Gives stream `id` a wake-up channel of its own, which shutdown
    /// disconnects; the stream makes it when it first waits on a channel
    /// (most streams never do: they park). If shutdown already began, the
    /// sender is dropped at once.
    pub(crate) fn set_wake(&self, id: u64, wake: Sender<()>, shutdown: &ShutdownHandle) {
        if let Ok(mut conns) = self.conns.lock()
            // Checked under the lock `wake_all` takes, so a stream
            // registering while shutdown begins cannot miss its wake-up.
            && !shutdown.is_shutdown()
            && let Some(entry) = conns.get_mut(&id)
        {
            entry.wake = Some(wake);
        }
    }

    /// Wakes every registered stream by disconnecting its wake-up channel.
    pub(crate) fn wake_all(&self) {
        let (senders, threads): (Vec<Option<Sender<()>>>, Vec<std::thread::Thread>) =
            match self.conns.lock() {
                Ok(mut c) => c
                    .values_mut()
                    .map(|e| (e.wake.take(), e.thread.clone()))
                    .unzip(),
                Err(_) => return,
            };
        drop(senders); // outside the lock
        threads.iter().for_each(std::thread::Thread::unpark);
    }

    /// Ends stream `id` now, whatever it is doing, with
    /// [`EndReason::Revoked`]: marks it, shuts its socket down (a write
    /// that blocks fails at once, as does any a waker tries for it), and
    /// wakes its thread, parked or waiting on a channel, which finds the
    /// mark at its next look. False when no stream `id` is open, or it is
    /// ending already (revoked before, or its connection died).
    // Only the daemon lists and ends streams.
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    pub(crate) fn revoke(&self, id: u64) -> bool {
        let found = match self.conns.lock() {
            Ok(mut conns) => conns.get_mut(&id).and_then(|e| {
                e.tracked
                    .mark(HUNG_UP_REVOKED)
                    .then(|| (e.wake.take(), e.thread.clone(), Arc::clone(&e.conn)))
            }),
            Err(_) => None,
        };
        let Some((wake, thread, conn)) = found else {
            return false;
        };
        // Outside the lock. The socket first: a thread that wakes must
        // not begin a write to a client that does not read.
        let _ = conn.tcp().shutdown(Shutdown::Both); // may be closed already
        drop(wake);
        thread.unpark();
        true
    }

    /// The ids of the streams open now (in no particular order): what a
    /// listing of every stream goes through, a [page](Registry::page) at
    /// a time, streams opening and closing meanwhile. Eight bytes a
    /// stream, against the kilobytes each holds.
    // Only the daemon lists and ends streams.
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    pub(crate) fn ids(&self) -> Vec<u64> {
        match self.conns.lock() {
            Ok(conns) => conns.keys().copied().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The streams of `ids` still open. The lock is held only to copy
    /// their handles.
    // Only the daemon lists and ends streams.
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    pub(crate) fn page(&self, ids: &[u64]) -> Vec<Arc<Tracked>> {
        match self.conns.lock() {
            Ok(conns) => ids
                .iter()
                .filter_map(|id| conns.get(id))
                .map(|e| Arc::clone(&e.tracked))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    #[inline(never)]
    pub(crate) fn remove(&self, id: u64) {
        let removed = self.conns.lock().ok().and_then(|mut c| c.remove(&id));
        if let (Some(poller), Some(e)) = (self.watch.get(), &removed) {
            // Already gone if it fired, or if the socket closed.
            let _ = epoll::delete(poller, e.conn.tcp());
        }
        drop(removed); // outside the lock: may close the socket
    }

    /// Shuts every registered socket down, failing any blocked write.
    pub(crate) fn shutdown_all(&self) -> usize {
        let conns: Vec<Arc<Wire>> = match self.conns.lock() {
            Ok(c) => c.values().map(|e| Arc::clone(&e.conn)).collect(),
            Err(_) => return 0,
        };
        for c in &conns {
            let _ = c.tcp().shutdown(std::net::Shutdown::Both); // may be closed already
        }
        conns.len()
    }
}
