//! Streams over a [`tiny_http::Request`] (feature `tiny-http`), for apps
//! that already serve HTTP with tiny_http.
//!
//! [`stream`] takes a request, checks it the way ssed's own server checks
//! a stream route (`406` when `Accept` rules out an event stream), and runs
//! a handler with the same signature as a
//! [`ServerBuilder::route`](crate::ServerBuilder::route) handler on the
//! calling thread, over the same [`Stream`]: one handler function can serve
//! on either server. Frames are written straight to tiny_http's response
//! writer, a chunk per frame, flushed at once.
//!
//! It takes the `tiny_http::Request` itself, so it fits where the app's own
//! code receives tiny_http requests (rouille's handlers see a
//! `rouille::Request` instead).
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use ssed::tiny_http::StreamOptions;
//!
//! fn clock(_req: &ssed::Request, stream: &mut ssed::Stream) -> Result<(), ssed::StreamError> {
//!     loop {
//!         stream.send("tick", &"tock")?;
//!         stream.sleep(Duration::from_secs(1))?;
//!     }
//! }
//!
//! let server = tiny_http::Server::http("127.0.0.1:8080")?;
//! let options = Arc::new(StreamOptions::new().heartbeat(Duration::from_secs(15)));
//! for request in server.incoming_requests() {
//!     if request.url() == "/events" {
//!         let options = Arc::clone(&options);
//!         // The stream blocks its thread for as long as it lives.
//!         std::thread::spawn(move || ssed::tiny_http::stream(request, &options, clock));
//!     } else {
//!         request.respond(tiny_http::Response::empty(404))?;
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! ```
//!
//! # What this mode lacks
//!
//! tiny_http owns the socket and its threads, so the guarantees of ssed's
//! own transport (see the crate docs) do not hold here:
//!
//! - **Two threads per stream.** tiny_http keeps a thread on every
//!   connection to read its next request, and the handler needs another
//!   (the one you call [`stream`] on) for as long as the stream lives.
//! - **No cap before the thread is spent.** tiny_http accepts every
//!   connection and gives each a thread, idle ones included; nothing here
//!   answers `503` past a limit. (You can refuse streams yourself before
//!   spawning, reading [`StatsSnapshot::streams_open`](crate::StatsSnapshot)
//!   from the [`Stats`](crate::Stats) in your options.)
//! - **No write timeout.** A client that stops reading blocks the handler
//!   inside `send` until TCP gives up on the connection, which takes
//!   minutes; the execution-time budget cannot interrupt a write.
//! - **No peer check.** [`Stream::check_connection`] only reports a stream
//!   already ended; a client that left is found by the next write (set a
//!   heartbeat to find it on a quiet stream).
//! - **Early ends are clean ends.** Where ssed's server closes the
//!   connection (the budget ran out, the handler failed, shutdown), the
//!   adapter cannot: tiny_http keeps the socket open for the client's next
//!   request. So it ends the response properly instead (the last chunk of
//!   the body), and an `EventSource` reconnects as it would after a close;
//!   on the wire a failed handler looks like a finished one.
//! - **No HTTP/1.0 keep-alive.** An HTTP/1.0 stream is delimited by closing
//!   the connection, which tiny_http only does when the request did not ask
//!   for keep-alive; with `Connection: keep-alive` the client sees the
//!   stream stop but not end.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{EndReason, StreamError, panic_message};
use crate::event::Event;
use crate::http::Request;
use crate::http::head::{BodyKind, Fields, Head};
use crate::http::response::{Response, stream_head};
use crate::stats::Gauge;
pub use crate::stream::StreamOptions;
use crate::stream::{Outcome, SHUTDOWN_COMMENT, Sink, Stream};

/// The body of the `406` a client gets when its `Accept` rules out an
/// event stream (the same text as ssed's own server).
const NOT_ACCEPTABLE: &str = "this is an event stream: send Accept: text/event-stream (or */*)";
/// The end of a chunked body.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// The peer a handler sees when tiny_http knows none (a Unix socket).
const UNKNOWN_PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
/// Not applied: a stream over a writer has no write deadline (see the
/// module docs), but its settings carry one.
const UNUSED_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How [`stream`] served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Served {
    /// The handler returned `Ok` (or finished the stream itself, with
    /// [`Stream::done`], [`Stream::no_content`] or [`Stream::respond`]);
    /// the response is complete.
    Finished,
    /// The stream ended before its handler did, for this reason (the client
    /// left, the budget ran out, the shutdown handle was triggered, …).
    Ended(EndReason),
    /// The handler returned an error other than the end of its stream, or
    /// panicked (logged; a panic is counted in
    /// [`StatsSnapshot::handler_panics`](crate::StatsSnapshot)). The client
    /// got `500` if nothing had been sent yet, else the end of the stream.
    Failed,
    /// The handler did not run; the client got this status: `405` (not a
    /// `GET`), `406` (its `Accept` rules out an event stream) or `503`
    /// (the shutdown handle was triggered).
    Refused(u16),
}

/// Serves `request` as an event stream: runs `handler` on this thread over
/// a [`Stream`] that writes to the request's connection, for as long as the
/// stream lives, then ends the response.
///
/// Before the handler runs, a request that is not a `GET` gets `405`, one
/// whose `Accept` header lists none of `text/event-stream`, `text/*` or
/// `*/*` gets `406` with a plain-text explanation, and once the shutdown
/// handle of `options` is triggered, `503` with `Retry-After`. The handler
/// sees the request as an ssed [`Request`] (no route parameters), and
/// [`Stream::last_event_id`] reads the `Last-Event-ID` header or else the
/// `lastEventId` query parameter. A panic in the handler is caught here
/// and logged. See the [module docs](self) for how this differs from
/// ssed's own server.
///
/// Call it on a thread of its own (it blocks until the stream ends).
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use ssed::tiny_http::{Served, StreamOptions};
///
/// let server = tiny_http::Server::http("127.0.0.1:8080")?;
/// let options = StreamOptions::new();
/// let request = server.recv()?;
/// let served = ssed::tiny_http::stream(request, &options, |_req, stream| {
///     stream.send("hello", &"world")?;
///     stream.done()
/// });
/// assert_eq!(served, Served::Finished);
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
pub fn stream<F>(request: ::tiny_http::Request, options: &StreamOptions, handler: F) -> Served
where
    F: FnOnce(&Request, &mut Stream) -> Result<(), StreamError>,
{
    let req = convert(&request);
    if let Some(refusal) = refusal(&req, options) {
        answer(request, &refusal);
        return Served::Refused(refusal.status);
    }

    let counters = options.stats.counters();
    counters.streams_open.fetch_add(1, Relaxed);
    counters.streams_total.fetch_add(1, Relaxed);
    let _gauge = Gauge(&counters.streams_open);

    let writer = SharedWriter::new(request.into_writer());
    let opened = Instant::now();
    log::debug!(
        "stream open (tiny_http): {} {}",
        req.peer_addr(),
        req.path()
    );
    let mut stream = Stream::new(
        Sink::Writer(Box::new(writer.clone())),
        req.is_http10(),
        options.stream_config(UNUSED_WRITE_TIMEOUT),
        req.last_event_id().map(str::to_owned),
        options.shutdown.clone(),
        options.stats.clone(),
    );
    let result = catch_unwind(AssertUnwindSafe(|| handler(&req, &mut stream)));
    let ended = stream.ended();
    let (outcome, served) = match result {
        Ok(Ok(()) | Err(StreamError::Finished)) => match ended {
            Some(EndReason::Shutdown) => (Outcome::Shutdown, Served::Ended(EndReason::Shutdown)),
            Some(reason) => (Outcome::Ended, Served::Ended(reason)),
            None => (Outcome::Finished, Served::Finished),
        },
        Ok(Err(StreamError::Ended(EndReason::Shutdown))) => {
            (Outcome::Shutdown, Served::Ended(EndReason::Shutdown))
        }
        Ok(Err(StreamError::Ended(reason))) => (Outcome::Ended, Served::Ended(reason)),
        Ok(Err(e)) => {
            log::warn!(
                "stream handler for {} failed: {}",
                req.path(),
                crate::Report(&e)
            );
            (Outcome::Failed, Served::Failed)
        }
        Err(panic) => {
            counters.handler_panics.fetch_add(1, Relaxed);
            log::error!(
                "stream handler for {} panicked: {}",
                req.path(),
                panic_message(&*panic)
            );
            (Outcome::Failed, Served::Failed)
        }
    };
    if let Some(reason) = ended {
        options.stats.disconnect(reason);
    }
    let was_open = stream.is_open();
    stream.close(outcome);
    let ended = stream.ended();
    drop(stream);
    complete(&writer, outcome, was_open, ended, req.is_http10());
    log::debug!(
        "stream closed (tiny_http): {} {} after {:.1?} ({})",
        req.peer_addr(),
        req.path(),
        opened.elapsed(),
        ended.map_or("finished", EndReason::reason)
    );
    served
}

/// The ssed view of a tiny_http request (head only: a stream reads no body).
fn convert(request: &::tiny_http::Request) -> Request {
    let version = request.http_version();
    let head = Head {
        method: request.method().as_str().to_owned(),
        target: request.url().to_owned(),
        minor: if (version.0, version.1) < (1, 1) {
            0
        } else {
            1
        },
        headers: {
            let mut fields = Fields::default();
            for h in request.headers() {
                fields.push(h.field.as_str().as_str(), h.value.as_str());
            }
            fields
        },
        body: BodyKind::None,
    };
    let peer = request.remote_addr().copied().unwrap_or(UNKNOWN_PEER);
    Request::from_head(head, peer)
}

/// An ordinary answer instead of a stream.
struct Refusal {
    status: u16,
    text: &'static str,
    header: Option<(&'static str, &'static str)>,
}

/// What a request gets instead of a stream, if anything.
fn refusal(req: &Request, options: &StreamOptions) -> Option<Refusal> {
    let (status, text, header) = if req.method() != "GET" {
        (
            405,
            "this is an event stream: use GET",
            Some(("Allow", "GET")),
        )
    } else if !req.accepts_event_stream() {
        (406, NOT_ACCEPTABLE, None)
    } else if options.shutdown.is_shutdown() {
        (503, "server shutting down", Some(("Retry-After", "1")))
    } else {
        return None;
    };
    Some(Refusal {
        status,
        text,
        header,
    })
}

/// Answers `refusal` as plain text through tiny_http.
fn answer(request: ::tiny_http::Request, refusal: &Refusal) {
    let mut response = ::tiny_http::Response::from_string(format!("{}\n", refusal.text))
        .with_status_code(refusal.status);
    // Both header literals are valid ASCII, so this never drops one.
    if let Some(header) = refusal
        .header
        .and_then(|(k, v)| ::tiny_http::Header::from_bytes(k, v).ok())
    {
        response = response.with_header(header);
    }
    log::debug!(
        "{:?} {} {} -> {}",
        request.remote_addr(),
        request.method(),
        request.url(),
        refusal.status
    );
    if let Err(e) = request.respond(response) {
        log::debug!("answer not delivered: {e}"); // the client left: nothing to do
    }
}

/// Finishes a response the stream left unfinished.
///
/// ssed's own server closes the connection when a stream ends early; here
/// tiny_http owns the socket and keeps reading it for the client's next
/// request, so an unfinished response would leave the client waiting for
/// the rest forever. The adapter ends it instead: the last chunk of an
/// open stream (after `: server shutting down` at shutdown), or, when
/// nothing was answered at all, an empty stream (`500` if the handler
/// failed).
fn complete(
    writer: &SharedWriter,
    outcome: Outcome,
    was_open: bool,
    ended: Option<EndReason>,
    http10: bool,
) {
    if matches!(ended, Some(EndReason::Client | EndReason::WriteTimeout)) {
        return; // the connection failed: nothing more gets through
    }
    let mut out = Vec::new();
    if was_open {
        match outcome {
            Outcome::Finished => return, // the stream wrote its own end
            Outcome::Shutdown => {
                if let Ok(frame) = Event::new().comment(SHUTDOWN_COMMENT).encode() {
                    if http10 {
                        out.extend_from_slice(&frame);
                    } else {
                        // Writing into a Vec cannot fail.
                        let _ = write!(out, "{:X}\r\n", frame.len());
                        out.extend_from_slice(&frame);
                        out.extend_from_slice(b"\r\n");
                    }
                }
            }
            Outcome::Ended | Outcome::Failed => {}
        }
        if !http10 {
            out.extend_from_slice(LAST_CHUNK);
        }
    } else if !writer.wrote_any() {
        // The budget ran out (or the handler failed after it) before the
        // stream opened; the stream's own close writes nothing then.
        let minor = if http10 { 0 } else { 1 };
        if outcome == Outcome::Failed {
            out = Response::text(500, "stream handler failed").encode(minor, false, true);
        } else {
            out = stream_head(minor, &[]);
            if !http10 {
                out.extend_from_slice(LAST_CHUNK);
            }
        }
    }
    if out.is_empty() {
        return;
    }
    let mut writer = writer.clone();
    if let Err(e) = writer.write_all(&out).and_then(|()| writer.flush()) {
        log::debug!("end of stream not delivered: {e}"); // the client left meanwhile
    }
}

/// tiny_http's response writer, shared by the [`Stream`] and the adapter
/// (which may have to finish the response after the stream is done with
/// it; see [`complete`]).
#[derive(Clone)]
struct SharedWriter(Arc<Mutex<WriterState>>);

struct WriterState {
    inner: Box<dyn Write + Send>,
    /// Whether any byte went out: a response was begun.
    wrote_any: bool,
}

impl SharedWriter {
    fn new(inner: Box<dyn Write + Send>) -> Self {
        SharedWriter(Arc::new(Mutex::new(WriterState {
            inner,
            wrote_any: false,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, WriterState> {
        // A panic while writing leaves nothing half-updated that matters
        // here: the next write fails or succeeds on its own.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wrote_any(&self) -> bool {
        self.lock().wrote_any
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.lock();
        let n = state.inner.write(buf)?;
        state.wrote_any |= n > 0;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.lock().inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_defaults() {
        let o = StreamOptions::new();
        assert_eq!(o.budget(), Some(Duration::from_secs(30)));
        assert_eq!(o.heartbeat_interval(), None);
        let o = o.max_execution_time(Duration::ZERO);
        assert_eq!(o.budget(), None);
    }

    #[test]
    fn handles_are_send_sync() {
        fn assert<T: Send + Sync + Clone>() {}
        assert::<StreamOptions>();
    }
}
