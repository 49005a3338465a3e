//! The open streams, so shutdown can reach them: their sockets (to fail a
//! write that blocks) and their threads (to wake one that waits); and so
//! a stream whose connection died can be told at once (see
//! [`Registry::hang_up`]).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_channel::Sender;
use rustix::event::epoll;

use crate::error::EndReason;
use crate::shutdown::ShutdownHandle;
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

/// What a stream learns when its connection dies while it waits: one of
/// the `HUNG_UP_*` values, set by [`Registry::hang_up`].
pub(crate) type HangUp = Arc<AtomicU8>;

struct Entry {
    conn: Arc<Wire>,
    hang_up: HangUp,
    /// The stream's thread, unparked at shutdown.
    thread: std::thread::Thread,
    /// Dropped at shutdown: disconnects the stream's own wake-up channel.
    wake: Option<Sender<()>>,
}

impl Registry {
    /// Registers a stream's socket and its thread (the caller), which
    /// shutdown unparks. Out of line, as is `remove`: stream threads keep
    /// every stack page they touch (see `Stream::follow`).
    ///
    /// With a poller to [watch](Registry::watch_with), the socket is
    /// watched for an error or hang-up (once): see [`Registry::hang_up`].
    #[inline(never)]
    pub(crate) fn insert(&self, conn: Arc<Wire>) -> (u64, HangUp) {
        let id = self.next.fetch_add(1, Relaxed);
        let hang_up = HangUp::default();
        // In the table before the poller may report it: a connection that
        // died already reports at once, and only once.
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(
                id,
                Entry {
                    conn: Arc::clone(&conn),
                    hang_up: Arc::clone(&hang_up),
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
        (id, hang_up)
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
    pub(crate) fn hang_up(&self, id: u64) {
        let woken = match self.conns.lock() {
            Ok(mut conns) => conns.get_mut(&id).map(|e| {
                let why = match rustix::net::sockopt::socket_error(e.conn.tcp()) {
                    Ok(Err(errno)) if failure_reason(&errno.into()) == EndReason::WriteTimeout => {
                        HUNG_UP_TIMEOUT
                    }
                    _ => HUNG_UP_CLIENT,
                };
                e.hang_up.store(why, Relaxed);
                (e.wake.take(), e.thread.clone())
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
