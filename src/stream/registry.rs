//! The open streams, so shutdown can reach them: their sockets (to fail a
//! write that blocks) and their threads (to wake one that waits).

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;

use crate::shutdown::ShutdownHandle;

/// Open stream sockets, so shutdown can unblock a thread stuck in `write`.
/// Holds a reference to the same socket (no second descriptor).
#[derive(Default)]
pub(crate) struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
}

struct Entry {
    conn: Arc<TcpStream>,
    /// The stream's thread, unparked at shutdown.
    thread: std::thread::Thread,
    /// Dropped at shutdown: disconnects the stream's own wake-up channel.
    wake: Option<Sender<()>>,
}

impl Registry {
    /// Registers a stream's socket and its thread (the caller), which
    /// shutdown unparks. Out of line, as is `remove`: stream threads keep
    /// every stack page they touch (see `Stream::follow`).
    #[inline(never)]
    pub(crate) fn insert(&self, conn: Arc<TcpStream>) -> u64 {
        let id = self.next.fetch_add(1, Relaxed);
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(
                id,
                Entry {
                    conn,
                    thread: std::thread::current(),
                    wake: None,
                },
            );
        }
        id
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
        drop(removed); // outside the lock: may close the socket
    }

    /// Shuts every registered socket down, failing any blocked write.
    pub(crate) fn shutdown_all(&self) -> usize {
        let conns: Vec<Arc<TcpStream>> = match self.conns.lock() {
            Ok(c) => c.values().map(|e| Arc::clone(&e.conn)).collect(),
            Err(_) => return 0,
        };
        for c in &conns {
            let _ = c.shutdown(std::net::Shutdown::Both); // may be closed already
        }
        conns.len()
    }
}
