//! Counters the server keeps, readable while it runs (the daemon's
//! `/metrics` and `/healthz` are built from them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::error::EndReason;

/// A cheap, clonable handle on a server's counters.
///
/// Create one, give it to [`ServerBuilder::stats`](crate::ServerBuilder::stats),
/// and read it from anywhere (a metrics route, a monitoring thread) with
/// [`snapshot`](Stats::snapshot).
///
/// # Examples
///
/// ```
/// let stats = ssed::Stats::new();
/// assert_eq!(stats.snapshot().streams_open, 0);
/// ```
#[derive(Debug, Clone)]
pub struct Stats(Arc<Node>);

/// What a [`Stats`] handle points to: a server's counters, or one
/// stream's (see [`Stats::for_stream`]). One pointer either way: a stream
/// carries its handle in frames its thread keeps (see `Stream::follow`),
/// and hands it to the wakers that write on its behalf.
#[derive(Debug)]
enum Node {
    /// A server's counters.
    Server(Box<Counters>),
    /// One stream's share of `frames_sent` and `bytes_sent`, and the
    /// server's counters, which its writes count in too.
    Stream { tally: Tally, server: Stats },
}

impl Default for Stats {
    fn default() -> Self {
        Stats(Arc::new(Node::Server(Box::default())))
    }
}

/// One stream's share of `frames_sent` and `bytes_sent`, for an
/// operator's listing of the open streams: counted by whoever writes for
/// the stream (its own thread, or a waker sending on its behalf) through
/// the stream's [`Stats`] (see [`Stats::for_stream`]).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    frames: AtomicU64,
    bytes: AtomicU64,
}

// Only the daemon lists and ends streams.
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
impl Tally {
    /// Frames written to the stream so far.
    pub(crate) fn frames(&self) -> u64 {
        self.frames.load(Relaxed)
    }

    /// Bytes written to the stream so far (framing included).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) streams_open: AtomicU64,
    pub(crate) streams_max: AtomicU64,
    pub(crate) streams_total: AtomicU64,
    pub(crate) requests_active: AtomicU64,
    pub(crate) requests_total: AtomicU64,
    pub(crate) rejected_total: AtomicU64,
    pub(crate) pending: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) disconnects: [AtomicU64; EndReason::ALL.len()],
    pub(crate) handler_panics: AtomicU64,
    pub(crate) accept_errors: AtomicU64,
    pub(crate) head_timeouts: AtomicU64,
    pub(crate) bad_requests: AtomicU64,
    pub(crate) thread_writes: AtomicU64,
    pub(crate) memory_rejected: AtomicU64,
    pub(crate) bodies_evicted: AtomicU64,
    pub(crate) client_limited: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Streams open now (each holds one thread).
    pub streams_open: u64,
    /// The stream cap in force.
    pub streams_max: u64,
    /// Streams opened since start.
    pub streams_total: u64,
    /// Ordinary requests being handled now.
    pub requests_active: u64,
    /// Ordinary requests handled since start.
    pub requests_total: u64,
    /// Streams and requests refused at a cap (`503` or overload retry).
    pub rejected_total: u64,
    /// Connections waiting for their request head (they hold no thread).
    pub pending: u64,
    /// Event-stream frames written.
    pub frames_sent: u64,
    /// Bytes written on event streams (framing included).
    pub bytes_sent: u64,
    /// Streams ended early, per [`EndReason`], indexed by [`EndReason::index`].
    pub disconnects: [u64; EndReason::ALL.len()],
    /// Handler panics caught.
    pub handler_panics: u64,
    /// Failed `accept` calls (descriptor exhaustion and the like).
    pub accept_errors: u64,
    /// Connections cut because their request did not arrive in time (the
    /// head, or on ordinary routes the body, within `request_timeout`).
    pub head_timeouts: u64,
    /// Requests refused as malformed or over a limit (`400`, `413`, `431`, …).
    pub bad_requests: u64,
    /// Writes made to a stream's socket by the stream's own thread. What a
    /// followed hub subscription sends while idle (its head, heartbeats,
    /// sparse events) goes out from the hub's waker threads instead, and
    /// is not counted here: a thread that once writes to a TCP socket keeps
    /// a kernel page fragment for it (32 KiB by default) until it ends.
    pub thread_writes: u64,
    /// Streams refused because memory headroom was below the floor
    /// (a sixteenth of the memory limit, within 4 to 64 MiB), though the
    /// cap was not reached. Also counted in `rejected_total`.
    pub memory_rejected: u64,
    /// Connections cut while sending a request body, to keep what the
    /// bodies still arriving hold within its bound (the one nearest its
    /// deadline goes first).
    pub bodies_evicted: u64,
    /// Streams refused with `429` because their client already held
    /// [`max_streams_per_client`](crate::ServerBuilder::max_streams_per_client)
    /// streams (not counted in `rejected_total`).
    pub client_limited: u64,
    /// Requests refused with `429` by a rate limit (the daemon's
    /// `publish_rate`).
    pub rate_limited: u64,
}

impl StatsSnapshot {
    /// Disconnects counted for one reason.
    pub fn disconnects(&self, reason: EndReason) -> u64 {
        self.disconnects[reason.index()]
    }
}

impl Stats {
    /// A fresh set of counters, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = self.counters();
        StatsSnapshot {
            streams_open: c.streams_open.load(Relaxed),
            streams_max: c.streams_max.load(Relaxed),
            streams_total: c.streams_total.load(Relaxed),
            requests_active: c.requests_active.load(Relaxed),
            requests_total: c.requests_total.load(Relaxed),
            rejected_total: c.rejected_total.load(Relaxed),
            pending: c.pending.load(Relaxed),
            frames_sent: c.frames_sent.load(Relaxed),
            bytes_sent: c.bytes_sent.load(Relaxed),
            disconnects: std::array::from_fn(|i| c.disconnects[i].load(Relaxed)),
            handler_panics: c.handler_panics.load(Relaxed),
            accept_errors: c.accept_errors.load(Relaxed),
            head_timeouts: c.head_timeouts.load(Relaxed),
            bad_requests: c.bad_requests.load(Relaxed),
            thread_writes: c.thread_writes.load(Relaxed),
            memory_rejected: c.memory_rejected.load(Relaxed),
            bodies_evicted: c.bodies_evicted.load(Relaxed),
            client_limited: c.client_limited.load(Relaxed),
            rate_limited: c.rate_limited.load(Relaxed),
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        match &*self.0 {
            Node::Server(counters) => counters,
            Node::Stream { server, .. } => server.counters(),
        }
    }

    /// A handle for one stream: its writes count in the server's counters
    /// and in a [`Tally`] of its own.
    pub(crate) fn for_stream(&self) -> Stats {
        let server = match &*self.0 {
            Node::Stream { server, .. } => server.clone(),
            Node::Server(_) => self.clone(),
        };
        Stats(Arc::new(Node::Stream {
            tally: Tally::default(),
            server,
        }))
    }

    /// What the stream of a handle from [`for_stream`](Stats::for_stream)
    /// sent; `None` for a server's.
    // Only the daemon lists streams.
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    pub(crate) fn tally(&self) -> Option<&Tally> {
        match &*self.0 {
            Node::Stream { tally, .. } => Some(tally),
            Node::Server(_) => None,
        }
    }

    pub(crate) fn disconnect(&self, reason: EndReason) {
        self.counters().disconnects[reason.index()].fetch_add(1, Relaxed);
    }

    /// A write by a stream's own thread (see [`StatsSnapshot::thread_writes`]).
    pub(crate) fn thread_write(&self) {
        self.counters().thread_writes.fetch_add(1, Relaxed);
    }

    /// A stream refused for want of memory (see
    /// [`StatsSnapshot::memory_rejected`]).
    pub(crate) fn memory_refused(&self) {
        self.counters().memory_rejected.fetch_add(1, Relaxed);
    }

    /// Counts a write of `frames` frames and `bytes` bytes (and for one
    /// stream, see [`Tally`]). Out of line: inlined into the write paths
    /// of a stream's thread, it widened their frames, and a stream thread
    /// keeps every stack page it touches.
    #[inline(never)]
    pub(crate) fn sent(&self, frames: u64, bytes: u64) {
        let c = self.counters();
        c.frames_sent.fetch_add(frames, Relaxed);
        c.bytes_sent.fetch_add(bytes, Relaxed);
        if let Some(t) = self.tally() {
            t.frames.fetch_add(frames, Relaxed);
            t.bytes.fetch_add(bytes, Relaxed);
        }
    }
}

/// Decrements a gauge when the thread ends, however it ends.
pub(crate) struct Gauge<'a>(pub(crate) &'a AtomicU64);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streams_writes_count_for_it_and_for_the_server() {
        let server = Stats::new();
        let a = server.for_stream();
        let b = a.for_stream(); // of the server's, not of a's
        a.sent(2, 100);
        b.sent(1, 10);
        server.sent(5, 50);
        let s = server.snapshot();
        assert_eq!((s.frames_sent, s.bytes_sent), (8, 160));
        let tally = a.tally().expect("a stream's");
        assert_eq!((tally.frames(), tally.bytes()), (2, 100));
        assert_eq!(b.tally().map(Tally::frames), Some(1));
        assert!(server.tally().is_none());
        assert_eq!(std::mem::size_of::<Stats>(), std::mem::size_of::<usize>());
    }
}
