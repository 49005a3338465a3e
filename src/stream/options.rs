//! [`StreamOptions`]: the settings every stream obeys, shared by
//! [`ServerBuilder`](crate::ServerBuilder) (whose setters for them write
//! here) and the `tiny_http` adapter.

use std::time::Duration;

use crate::shutdown::ShutdownHandle;
use crate::stats::Stats;
use crate::stream::StreamConfig;

/// Settings of streams, builder style: their execution-time budget, their
/// heartbeats, the shutdown handle they obey and the counters they update.
///
/// A [`ServerBuilder`](crate::ServerBuilder) holds one (see
/// [`ServerBuilder::stream_options`](crate::ServerBuilder::stream_options));
/// the `tiny_http` adapter (feature `tiny-http`) takes one per request.
/// Clone it, or share it in an `Arc`, across the threads that serve
/// streams: clones share the shutdown handle and the counters.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use ssed::StreamOptions;
///
/// let shutdown = ssed::ShutdownHandle::new();
/// let stats = ssed::Stats::new();
/// let options = StreamOptions::new()
///     .max_execution_time(Duration::from_secs(60))
///     .heartbeat(Duration::from_secs(15))
///     .shutdown_handle(shutdown.clone()) // keep a clone to end the streams
///     .stats(stats.clone());             // keep a clone to read the counters
/// assert_eq!(options.heartbeat_interval(), Some(Duration::from_secs(15)));
/// ```
#[derive(Debug, Clone)]
#[must_use = "options do nothing until a server or a stream uses them"]
pub struct StreamOptions {
    max_execution_time: Duration,
    heartbeat: Duration,
    heartbeat_event: bool,
    pub(crate) shutdown: ShutdownHandle,
    pub(crate) stats: Stats,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            max_execution_time: Duration::from_secs(30),
            heartbeat: Duration::ZERO,
            heartbeat_event: false,
            shutdown: ShutdownHandle::new(),
            stats: Stats::new(),
        }
    }
}

impl StreamOptions {
    /// Options with every default.
    pub fn new() -> Self {
        Self::default()
    }

    /// A stream's execution-time budget, restarted by every successful
    /// send; when it runs out the stream's blocking calls fail with
    /// [`EndReason::Budget`](crate::EndReason::Budget) and the stream ends. `Duration::ZERO` means
    /// unlimited. Default 30 s.
    pub fn max_execution_time(mut self, d: Duration) -> Self {
        self.max_execution_time = d;
        self
    }

    /// Interval of keep-alive frames on an otherwise silent stream, sent
    /// while a handler waits in [`Stream::sleep`](crate::Stream::sleep), [`Stream::recv`](crate::Stream::recv) and the
    /// helpers built on them. A heartbeat is a send: it restarts the
    /// budget. `Duration::ZERO` turns them off. Default off.
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.heartbeat = d;
        self
    }

    /// Send heartbeats as `event: ping` with `{"time": "<ISO-8601>"}`
    /// instead of a comment. Default false.
    pub fn heartbeat_event(mut self, on: bool) -> Self {
        self.heartbeat_event = on;
        self
    }

    /// A shutdown handle the streams obey: once it is triggered, their
    /// blocking calls return [`EndReason::Shutdown`](crate::EndReason::Shutdown), each open stream gets
    /// a last frame (`: server shutting down`) and its end, and new streams
    /// get `503` with `Retry-After`. (With `tiny_http`, it does not stop
    /// tiny_http itself.)
    /// Default: a fresh handle (keep a clone of your own to use it).
    pub fn shutdown_handle(mut self, handle: ShutdownHandle) -> Self {
        self.shutdown = handle;
        self
    }

    /// Counters to update: streams open and opened, frames and bytes sent,
    /// disconnects per reason, handler panics. Default: fresh counters
    /// (keep a clone of your own to read them).
    pub fn stats(mut self, stats: Stats) -> Self {
        self.stats = stats;
        self
    }

    /// The budget in force (`None`: unlimited).
    pub fn budget(&self) -> Option<Duration> {
        nonzero(self.max_execution_time)
    }

    /// The heartbeat interval in force (`None`: off).
    pub fn heartbeat_interval(&self) -> Option<Duration> {
        nonzero(self.heartbeat)
    }

    /// The per-stream settings, with `write_timeout` for the writes.
    pub(crate) fn stream_config(&self, write_timeout: Duration) -> StreamConfig {
        StreamConfig {
            budget: self.budget(),
            write_timeout,
            heartbeat: self.heartbeat_interval(),
            heartbeat_event: self.heartbeat_event,
        }
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}
