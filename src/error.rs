//! Public error types.
//!
//! Three families, because callers handle them differently:
//!
//! - [`Error`]: setting a server up failed (bind, bad option). Returned by
//!   [`ServerBuilder::build`](crate::ServerBuilder::build) and
//!   [`Server::run`](crate::Server::run).
//! - [`EventError`]: an [`Event`](crate::Event) cannot be encoded into a valid
//!   frame (a line break in its name or id, a value that does not serialize).
//! - [`StreamError`]: what a stream handler's `?` propagates; it carries the
//!   [`EndReason`] when the stream is over.

use std::any::Any;
use std::fmt;
use std::io;
use std::net::SocketAddr;

/// A setup failure of the server.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The listen address could not be parsed or resolved.
    Address {
        /// The address as given.
        addr: String,
        /// Why it was refused.
        source: io::Error,
    },
    /// Binding the listening socket failed (address in use, permission).
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The operating system's error.
        source: io::Error,
    },
    /// A route pattern is invalid (empty, not starting with `/`, an unnamed
    /// or duplicated `{param}`).
    Route {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The operating system refused a resource the server needs to run
    /// (the readiness poller, its wake-up descriptor).
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Address { addr, .. } => write!(f, "invalid listen address {addr:?}"),
            Error::Bind { addr, .. } => write!(f, "cannot listen on {addr}"),
            Error::Route { pattern, reason } => write!(f, "invalid route {pattern:?}: {reason}"),
            Error::Io(_) => f.write_str("server i/o setup failed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Address { source, .. } | Error::Bind { source, .. } | Error::Io(source) => {
                Some(source)
            }
            Error::Route { .. } => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// Why an [`Event`](crate::Event) cannot be encoded.
///
/// The encoder refuses rather than emit a frame a client would misread.
#[derive(Debug)]
#[non_exhaustive]
pub enum EventError {
    /// The event name contains a carriage return or a line feed.
    EventName,
    /// The id contains a carriage return, a line feed or a NUL byte.
    Id,
    /// A channel name passed to a named send is empty or contains a line break.
    Channel,
    /// The data value could not be serialized to JSON.
    Json(serde_json::Error),
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::EventName => f.write_str("event name contains a line break"),
            EventError::Id => f.write_str("event id contains a line break or a NUL byte"),
            EventError::Channel => f.write_str("channel name is empty or contains a line break"),
            EventError::Json(_) => f.write_str("event data does not serialize to JSON"),
        }
    }
}

impl std::error::Error for EventError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EventError::Json(e) => Some(e),
            _ => None,
        }
    }
}

impl From<serde_json::Error> for EventError {
    fn from(e: serde_json::Error) -> Self {
        EventError::Json(e)
    }
}

/// Why a stream ended before its handler finished.
///
/// One variant per value of the `reason` label of the
/// `ssed_disconnects_total` metric; [`reason`](EndReason::reason) gives that
/// label, shared by logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndReason {
    /// The client went away: a write failed, or
    /// [`check_connection`](crate::Stream::check_connection) saw the peer close.
    Client,
    /// A write blocked for longer than the write timeout: the client stopped
    /// reading.
    WriteTimeout,
    /// The execution-time budget ran out without a successful send.
    Budget,
    /// The server is shutting down.
    Shutdown,
    /// The subscriber fell behind its queue and was dropped so that it cannot
    /// hold back publishers or other subscribers.
    Slow,
    /// The credential the stream was opened with expired (a JWT's `exp`;
    /// see [`Stream::end_at`](crate::Stream::end_at)).
    Expired,
    /// An operator ended the stream (the daemon's `DELETE /streams`):
    /// revoked, whatever it was doing.
    Revoked,
}

impl EndReason {
    /// Every reason, in the order of [`EndReason::index`].
    pub const ALL: [EndReason; 7] = [
        EndReason::Client,
        EndReason::WriteTimeout,
        EndReason::Budget,
        EndReason::Shutdown,
        EndReason::Slow,
        EndReason::Expired,
        EndReason::Revoked,
    ];

    /// The short name used as the `reason` label and in logs.
    pub fn reason(self) -> &'static str {
        match self {
            EndReason::Client => "client",
            EndReason::WriteTimeout => "write_timeout",
            EndReason::Budget => "budget",
            EndReason::Shutdown => "shutdown",
            EndReason::Slow => "slow",
            EndReason::Expired => "expired",
            EndReason::Revoked => "revoked",
        }
    }

    /// A dense index (0..7) for counters kept per reason.
    pub fn index(self) -> usize {
        match self {
            EndReason::Client => 0,
            EndReason::WriteTimeout => 1,
            EndReason::Budget => 2,
            EndReason::Shutdown => 3,
            EndReason::Slow => 4,
            EndReason::Expired => 5,
            EndReason::Revoked => 6,
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            EndReason::Client => "client disconnected",
            EndReason::WriteTimeout => "write timed out",
            EndReason::Budget => "execution time budget exhausted",
            EndReason::Shutdown => "server shutting down",
            EndReason::Slow => "subscriber too slow",
            EndReason::Expired => "credential expired",
            EndReason::Revoked => "ended by an operator",
        };
        f.write_str(text)
    }
}

impl std::error::Error for EndReason {}

/// The error a stream handler propagates with `?`.
///
/// Most often it is [`StreamError::Ended`]: the stream is over (the client
/// left, the budget ran out, the server is stopping) and the handler should
/// return. The other variants are mistakes of the handler itself.
#[derive(Debug)]
#[non_exhaustive]
pub enum StreamError {
    /// The stream is over; the handler should return.
    Ended(EndReason),
    /// An event could not be encoded; nothing was sent and the stream is
    /// still usable.
    Event(EventError),
    /// The stream already finished (after [`done`](crate::Stream::done) or a
    /// non-streaming answer such as [`no_content`](crate::Stream::no_content)).
    Finished,
    /// A non-streaming answer or a header was asked for after the stream's
    /// `200` head went out.
    AlreadyOpen,
    /// An error of the application, wrapped with [`StreamError::other`].
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl StreamError {
    /// Wraps an application error so a handler can propagate it with `?`.
    pub fn other(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        StreamError::Other(e.into())
    }

    /// The reason the stream ended, if this error means it did.
    pub fn end_reason(&self) -> Option<EndReason> {
        match self {
            StreamError::Ended(r) => Some(*r),
            _ => None,
        }
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Ended(r) => write!(f, "stream ended: {r}"),
            StreamError::Event(_) => f.write_str("invalid event"),
            StreamError::Finished => f.write_str("stream already finished"),
            StreamError::AlreadyOpen => f.write_str("stream head already sent"),
            StreamError::Other(_) => f.write_str("stream handler failed"),
        }
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StreamError::Ended(r) => Some(r),
            StreamError::Event(e) => Some(e),
            StreamError::Finished | StreamError::AlreadyOpen => None,
            StreamError::Other(e) => Some(e.as_ref()),
        }
    }
}

impl From<EndReason> for StreamError {
    fn from(r: EndReason) -> Self {
        StreamError::Ended(r)
    }
}

impl From<EventError> for StreamError {
    fn from(e: EventError) -> Self {
        StreamError::Event(e)
    }
}

impl From<serde_json::Error> for StreamError {
    fn from(e: serde_json::Error) -> Self {
        StreamError::Event(EventError::Json(e))
    }
}

/// Displays an error with its chain of sources, `a: b: c`, for logs and
/// messages.
///
/// # Examples
///
/// ```
/// let e = ssed::Error::Io(std::io::Error::other("no poller"));
/// assert_eq!(ssed::Report(&e).to_string(), "server i/o setup failed: no poller");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// The message of a caught panic, for the log.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_dense_and_distinct() {
        for (i, r) in EndReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let names: std::collections::HashSet<_> =
            EndReason::ALL.iter().map(|r| r.reason()).collect();
        assert_eq!(names.len(), EndReason::ALL.len());
    }

    #[test]
    fn errors_are_small() {
        // StreamError travels through every `?` of a handler: keep it at three words.
        assert!(std::mem::size_of::<StreamError>() <= 24);
    }
}
