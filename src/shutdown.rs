//! The shutdown handle: one signal that reaches the acceptor and every
//! stream's blocking call.
//!
//! Streams wait on a channel whose only sender is dropped at shutdown, so a
//! stream blocked in `sleep`, `recv` or `forward` wakes at once with no
//! per-stream bookkeeping; the acceptor is woken through an eventfd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_channel::{Receiver, Sender};
use rustix::fd::OwnedFd;

/// A cheap, clonable handle that stops a server (or any streams built with
/// it) from any thread.
///
/// # Examples
///
/// ```
/// let handle = ssed::ShutdownHandle::new();
/// assert!(!handle.is_shutdown());
/// handle.shutdown();
/// assert!(handle.is_shutdown());
/// ```
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    flag: AtomicBool,
    sender: Mutex<Option<Sender<()>>>,
    receiver: Receiver<()>,
    wake: OnceLock<OwnedFd>,
}

impl Default for ShutdownHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownHandle {
    /// A handle not yet triggered.
    pub fn new() -> Self {
        let (sender, receiver) = crossbeam_channel::bounded(0);
        ShutdownHandle(Arc::new(Inner {
            flag: AtomicBool::new(false),
            sender: Mutex::new(Some(sender)),
            receiver,
            wake: OnceLock::new(),
        }))
    }

    /// Starts the shutdown: the acceptor stops accepting, every stream's
    /// blocking call returns [`EndReason::Shutdown`](crate::EndReason::Shutdown),
    /// and [`Server::run`](crate::Server::run) returns once the streams have
    /// closed or the grace period is over. Calling it again does nothing.
    pub fn shutdown(&self) {
        if self.0.flag.swap(true, Ordering::SeqCst) {
            return;
        }
        // Dropping the only sender disconnects every receiver at once.
        let sender = match self.0.sender.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(sender);
        self.wake();
    }

    /// Whether [`shutdown`](ShutdownHandle::shutdown) was called.
    pub fn is_shutdown(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }

    /// A receiver that disconnects at shutdown (never receives a value).
    pub(crate) fn receiver(&self) -> &Receiver<()> {
        &self.0.receiver
    }

    /// Installs the acceptor's wake-up descriptor; the first one wins.
    pub(crate) fn set_wake(&self, fd: OwnedFd) -> bool {
        self.0.wake.set(fd).is_ok()
    }

    /// The acceptor's wake-up descriptor, once installed.
    pub(crate) fn wake_fd(&self) -> Option<&OwnedFd> {
        self.0.wake.get()
    }

    /// Wakes the acceptor (to stop, or to take back a keep-alive connection).
    pub(crate) fn wake(&self) {
        if let Some(fd) = self.0.wake.get() {
            // A full eventfd counter (EAGAIN) still means "readable": the
            // acceptor wakes either way.
            let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
        }
    }
}
