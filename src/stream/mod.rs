//! [`Stream`]: what a stream handler writes to.
//!
//! A stream lives on its connection's own thread. Every send is written and
//! flushed before it returns; a failed or timed-out write ends the stream;
//! every blocking call (`send`, `sleep`, `recv`, `poll`, `forward`) is bounded
//! by the execution-time budget and by shutdown.
//!
//! `write.rs` puts frames on the socket within the write timeout, without
//! copying large ones; `registry.rs` keeps the open streams' sockets and
//! threads for shutdown to reach.

mod options;
pub(crate) mod registry;
pub(crate) mod write;

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::Serialize;

pub use options::StreamOptions;

use crate::digits::Digits;
use crate::error::{EndReason, EventError, StreamError};
use crate::event::{EncodedEvent, Event};
use crate::http::Response;
use crate::http::chunked::{CHUNK_FRAMING, chunk_into, frame_into};
use crate::http::response::{STREAM_HEAD_10, STREAM_HEAD_11, stream_head};
use crate::shutdown::ShutdownHandle;
use crate::stats::Stats;
use crate::stream::registry::{HUNG_UP_NOT, HUNG_UP_REVOKED, HUNG_UP_TIMEOUT, Registry, Tracked};
use crate::stream::write::{write_all_timeout, write_frames_timeout, write_frames_to};
use crate::wire::Wire;

/// The data of the message [`Stream::done`] sends.
pub(crate) const DONE: &str = "[DONE]";
/// The comment sent as a heartbeat.
const HEARTBEAT_FRAME: &[u8] = b": keep-alive\n\n";
/// [`HEARTBEAT_FRAME`] as an HTTP/1.1 chunk (14 bytes: `E`).
const HEARTBEAT_CHUNK: &[u8] = b"E\r\n: keep-alive\n\n\r\n";
/// Writes up to this size are put together on the stack (see
/// `Stream::write_frames`); small enough that the frame stays within the
/// stack pages every stream thread touches anyway.
const SMALL_WRITE: usize = 224;
/// How often a parked stream the server cannot unpark looks for shutdown.
const UNREGISTERED_POLL: Duration = Duration::from_millis(250);
/// The comment sent as the last frame when the server shuts down.
pub(crate) const SHUTDOWN_COMMENT: &str = "server shutting down";

/// Where a stream's bytes go.
pub(crate) enum Sink {
    /// Our own transport, plain or TLS: deadlines through `SO_SNDTIMEO`,
    /// peer checks.
    Socket(Arc<Wire>),
    /// Any writer (the tiny_http adapter): no write deadline, no peer check.
    #[cfg_attr(not(feature = "tiny-http"), allow(dead_code))]
    Writer(Box<dyn Write + Send>),
}

/// Per-stream settings, copied from the server's.
#[derive(Debug, Clone)]
pub(crate) struct StreamConfig {
    pub budget: Option<Duration>,
    pub write_timeout: Duration,
    pub heartbeat: Option<Duration>,
    pub heartbeat_event: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing written yet: a non-streaming answer is still possible.
    Pending,
    /// The `200` head went out.
    Open,
    /// Finished (`done`, a non-streaming answer, or the end chunk written).
    Finished,
}

/// An open event stream, handed to a stream handler.
///
/// The `200` head is written with the first frame (or by [`open`](Stream::open)),
/// so a handler can still answer otherwise before that, e.g. with
/// [`no_content`](Stream::no_content) to tell an `EventSource` to stop
/// reconnecting.
///
/// # Errors
///
/// Every blocking method returns [`StreamError::Ended`] once the stream is
/// over, with the [`EndReason`]: the client left (a write failed), a write
/// timed out, the budget ran out, or the server is shutting down. Propagate
/// it with `?`; the server counts and logs it.
pub struct Stream {
    sink: Sink,
    chunked: bool,
    state: State,
    headers: Vec<(String, String)>,
    config: StreamConfig,
    /// When the budget runs out, if there is one.
    deadline: Option<Instant>,
    /// When the stream must end whatever happens (its credential expires).
    expires: Option<Instant>,
    last_write: Instant,
    /// The write timeout `SO_SNDTIMEO` is currently armed with.
    armed: Option<Duration>,
    counts: Vec<(Box<str>, u64)>,
    last_event_id: Option<String>,
    shutdown: ShutdownHandle,
    /// Disconnects at shutdown: the shutdown handle's own receiver until
    /// [`Stream::own_wake`] makes one for this stream.
    wake: Receiver<()>,
    /// Where to register a wake-up channel of this stream's own (as
    /// `tracked`'s id), until it has one: see [`Stream::own_wake`].
    registry: Option<Arc<Registry>>,
    /// What the registry knows of this stream, when the server registered
    /// it (the tiny_http adapter does not), which unparks its thread at
    /// shutdown: set when the server's poller saw its connection die (see
    /// [`Registry::hang_up`]) or an operator ended it (see
    /// [`Registry::revoke`]).
    tracked: Option<Arc<Tracked>>,
    stats: Stats,
    ended: Option<EndReason>,
    /// A `retry:` to send right after the head (see [`Stream::retry_on_open`]).
    open_retry: Option<Duration>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("state", &self.state)
            .field("chunked", &self.chunked)
            .field("time_left", &self.time_left())
            .field("last_event_id", &self.last_event_id)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Stream {
    pub(crate) fn new(
        sink: Sink,
        http10: bool,
        config: StreamConfig,
        last_event_id: Option<String>,
        shutdown: ShutdownHandle,
        stats: Stats,
    ) -> Self {
        let now = Instant::now();
        Stream {
            sink,
            chunked: !http10,
            state: State::Pending,
            headers: Vec::new(),
            deadline: config.budget.map(|b| now + b),
            expires: None,
            config,
            last_write: now,
            armed: None,
            counts: Vec::new(),
            last_event_id,
            wake: shutdown.receiver().clone(),
            registry: None,
            tracked: None,
            shutdown,
            stats,
            ended: None,
            open_retry: None,
        }
    }

    /// Records that the server registered this stream as `tracked`:
    /// shutdown unparks its thread, [`Stream::own_wake`] can give it a
    /// wake-up channel of its own, `tracked` tells it when its connection
    /// died or an operator ended it, and counts what is written to it
    /// (whoever writes: the stats handed to wakers count there too).
    pub(crate) fn set_registry(&mut self, registry: Arc<Registry>, tracked: Arc<Tracked>) {
        self.registry = Some(registry);
        self.stats = tracked.stats().clone();
        self.tracked = Some(tracked);
    }

    /// What the server's registry knows of this stream, for its handler to
    /// add to (whom and what it follows: see [`Tracked::set_subject`] and
    /// [`Tracked::set_follows`]); `None` on a stream the server did not
    /// register (the tiny_http adapter's).
    // Only the daemon lists and ends streams.
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    pub(crate) fn tracked(&self) -> Option<&Tracked> {
        self.tracked.as_deref()
    }

    /// Before a wait on channels (`sleep`, `recv`): makes this stream's own
    /// wake-up channel, so thousands of waiting streams never share one
    /// channel's waiter list. Made on first use, not at open: a stream that
    /// only parks (a hub subscriber) never needs one, and it would cost
    /// every idle stream a heap block.
    fn own_wake(&mut self) {
        if let (Some(registry), Some(t)) = (self.registry.take(), &self.tracked) {
            let id = t.id();
            let (tx, rx) = crossbeam_channel::bounded(0);
            self.wake = rx;
            registry.set_wake(id, tx, &self.shutdown);
        }
    }

    /// Parks the thread until it is unparked (an event, shutdown) or the
    /// next heartbeat or the budget's end is due. Spurious wake-ups are
    /// fine: callers look again.
    pub(crate) fn park(&self) {
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        let mut wake = self.next_wake(far);
        if self.tracked.is_none() {
            // Nobody unparks us at shutdown: look now and then.
            wake = wake.min(now + UNREGISTERED_POLL);
        }
        if wake >= far {
            // No heartbeat or budget due: an untimed park spares arming a
            // kernel timer on every wait (shutdown unparks us).
            std::thread::park();
        } else {
            std::thread::park_timeout(wake.saturating_duration_since(now));
        }
    }

    // ----- sending -------------------------------------------------------

    /// Sends `data`, serialized as JSON, as an event named `channel`, and
    /// counts it for that channel.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream is over;
    /// [`StreamError::Event`] when `channel` holds a line break or `data`
    /// does not serialize (nothing is sent, the stream stays usable).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn handler(stream: &mut ssed::Stream) -> Result<(), ssed::StreamError> {
    /// stream.send("demo", "Message n°1")?;              // data: "Message n°1"
    /// stream.send("load", &serde_json::json!({"cpu": 0.3}))?;
    /// assert_eq!(stream.sent_count("demo"), 1);
    /// # Ok(()) }
    /// ```
    pub fn send<T: Serialize + ?Sized>(
        &mut self,
        channel: &str,
        data: &T,
    ) -> Result<(), StreamError> {
        if channel.is_empty() || channel.contains(['\r', '\n']) {
            return Err(EventError::Channel.into());
        }
        let event = Event::new().event(channel).json_data(data)?;
        self.send_event(&event)
    }

    /// Sends a complete [`Event`] and counts it under its name (`message`
    /// when it has none).
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream is over;
    /// [`StreamError::Event`] when the event is invalid (nothing is sent).
    pub fn send_event(&mut self, event: &Event) -> Result<(), StreamError> {
        let frame = event.encode()?;
        self.write_frames(&[&frame])?;
        let name = event
            .event_name()
            .filter(|n| !n.is_empty())
            .unwrap_or("message");
        self.count(name);
        Ok(())
    }

    /// Sends frames encoded once elsewhere (for instance by a hub fanning
    /// one event out to many streams), all in one write.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream is over.
    pub fn send_encoded(&mut self, frames: &[EncodedEvent]) -> Result<(), StreamError> {
        if let [one] = frames {
            return self.write_frames(&[one.as_bytes()]); // the common case: no allocation
        }
        let slices: Vec<&[u8]> = frames.iter().map(EncodedEvent::as_bytes).collect();
        self.write_frames(&slices)
    }

    /// Sends a comment (`: text`), which clients ignore.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream is over.
    pub fn comment(&mut self, text: &str) -> Result<(), StreamError> {
        let frame = Event::new().comment(text).encode()?;
        self.write_frames(&[&frame])
    }

    /// Sends `event: ping` with data `{"time": "<ISO-8601 UTC>"}`.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream is over.
    pub fn ping(&mut self) -> Result<(), StreamError> {
        let frame = ping_event().encode()?;
        self.write_frames(&[&frame])?;
        self.count("ping");
        Ok(())
    }

    /// Sets the client's reconnection time (`retry:`). A time under one
    /// millisecond sends nothing.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream is over.
    pub fn retry(&mut self, time: Duration) -> Result<(), StreamError> {
        if time.as_millis() == 0 {
            return Ok(());
        }
        self.open_retry = None; // this one says it now
        let (frame, len) = retry_frame(time);
        self.write_frames(&[&frame[..len]])
    }

    /// Like [`retry`](Stream::retry), but while the head has not gone out
    /// the frame waits to go with it, in the same write (which
    /// [`follow`](Stream::follow) hands to a waker thread).
    // Only the daemon defers its `retry:` this way.
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    pub(crate) fn retry_on_open(&mut self, time: Duration) -> Result<(), StreamError> {
        if self.state != State::Pending {
            return self.retry(time);
        }
        self.open_retry = (time.as_millis() > 0).then_some(time);
        Ok(())
    }

    /// Sends `data: [DONE]`, ends the stream cleanly, and returns `Ok` so a
    /// handler can `return stream.done();`. Later sends return
    /// [`StreamError::Finished`].
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream was already over.
    pub fn done(&mut self) -> Result<(), StreamError> {
        self.send_event(&Event::new().data(DONE))?;
        self.finish_body();
        Ok(())
    }

    // ----- answering without a stream -----------------------------------

    /// Answers `204 No Content` instead of streaming, which tells an
    /// `EventSource` to stop reconnecting.
    ///
    /// # Errors
    ///
    /// [`StreamError::AlreadyOpen`] once the stream's head went out.
    pub fn no_content(&mut self) -> Result<(), StreamError> {
        self.respond(Response::no_content())
    }

    /// Answers with an ordinary response instead of streaming (a `401`, a
    /// `400` for a bad topic name, …). The connection closes after it.
    ///
    /// # Errors
    ///
    /// [`StreamError::AlreadyOpen`] once the stream's head went out;
    /// [`StreamError::Ended`] if the answer could not be written.
    pub fn respond(&mut self, response: Response) -> Result<(), StreamError> {
        if let Some(r) = self.ended {
            return Err(StreamError::Ended(r));
        }
        self.answer(response)
    }

    /// Writes a non-streaming answer if the head has not gone out.
    fn answer(&mut self, response: Response) -> Result<(), StreamError> {
        match self.state {
            State::Pending => {}
            State::Open => return Err(StreamError::AlreadyOpen),
            State::Finished => return Err(StreamError::Finished),
        }
        let bytes = response.encode(if self.chunked { 1 } else { 0 }, false, true);
        self.state = State::Finished;
        self.write_out(&bytes).map_err(StreamError::Ended)
    }

    /// Adds a header to the stream's `200` head (a cookie, CORS headers).
    ///
    /// # Errors
    ///
    /// [`StreamError::AlreadyOpen`] once the head went out.
    pub fn header(&mut self, name: &str, value: &str) -> Result<(), StreamError> {
        if self.state != State::Pending {
            return Err(StreamError::AlreadyOpen);
        }
        let clean = |s: &str| s.replace(['\r', '\n'], " ");
        self.headers.push((clean(name), clean(value)));
        Ok(())
    }

    /// Writes the `200` head now, before any event, so the client sees the
    /// stream open at once. Does nothing if it is already open.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream is over.
    pub fn open(&mut self) -> Result<(), StreamError> {
        match self.state {
            State::Open => Ok(()),
            State::Finished => Err(StreamError::Finished),
            State::Pending => self.write_frames(&[]),
        }
    }

    /// Whether the `200` head went out.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    // ----- counts --------------------------------------------------------

    /// How many events were sent on `channel` (event name; `message` for
    /// unnamed events) since the stream opened or the count was reset.
    pub fn sent_count(&self, channel: &str) -> u64 {
        self.counts
            .iter()
            .find(|(c, _)| &**c == channel)
            .map_or(0, |(_, n)| *n)
    }

    /// Whether anything was sent on `channel` (since the last reset).
    pub fn has_sent(&self, channel: &str) -> bool {
        self.sent_count(channel) > 0
    }

    /// Resets the count of one channel.
    pub fn reset_count(&mut self, channel: &str) {
        self.counts.retain(|(c, _)| &**c != channel);
    }

    /// Resets every channel's count.
    pub fn reset_counts(&mut self) {
        self.counts = Vec::new();
    }

    fn count(&mut self, channel: &str) {
        match self.counts.iter_mut().find(|(c, _)| &**c == channel) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((channel.into(), 1)),
        }
    }

    // ----- connection and budget -----------------------------------------

    /// Checks, without sending anything, whether the client is still there.
    ///
    /// It sees a closed connection (FIN or reset); a client that vanished
    /// without a word is only found by the next write. On the tiny_http
    /// adapter it only reports a stream already ended.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] with [`EndReason::Client`] when the peer closed.
    pub fn check_connection(&mut self) -> Result<(), StreamError> {
        self.check_alive()?;
        let Sink::Socket(wire) = &self.sink else {
            return Ok(());
        };
        let conn = wire.tcp();
        let peer_closed = conn.set_nonblocking(true).is_ok() && {
            let mut byte = [0u8; 1];
            match conn.peek(&mut byte) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            }
        };
        if conn.set_nonblocking(false).is_err() || peer_closed {
            return Err(self.end(EndReason::Client));
        }
        Ok(())
    }

    /// Records a send made on this stream's behalf at `at` (a waker wrote
    /// to the socket while the thread slept): heartbeat and budget count
    /// from it.
    pub(crate) fn note_sent(&mut self, at: Instant) {
        if at > self.last_write {
            self.last_write = at;
            self.deadline = self.config.budget.map(|b| at + b);
        }
    }

    /// The socket and framing, once the head is out on a socket of ours:
    /// what a waker needs to write frames for this stream.
    pub(crate) fn direct_parts(&self) -> Option<(Arc<Wire>, bool, Stats)> {
        match (&self.sink, self.state) {
            (Sink::Socket(conn), State::Open) if self.ended.is_none() => {
                Some((Arc::clone(conn), self.chunked, self.stats.clone()))
            }
            _ => None,
        }
    }

    /// Whether bytes a waker gave this stream's connection still wait to
    /// go out (TLS records the socket did not take): the stream's thread
    /// sends them, with [`finish_partial`](Stream::finish_partial), before
    /// anything else.
    pub(crate) fn has_unsent(&self) -> bool {
        matches!(&self.sink, Sink::Socket(w) if w.has_unsent())
    }

    /// Writes the rest of a frame a waker began, even if the stream is
    /// ending (a cut frame would corrupt the next one): within the write
    /// timeout, resetting the budget. If it cannot, no further byte goes
    /// out on this connection, not even the final frame.
    pub(crate) fn finish_partial(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        match self.write_out(bytes) {
            Ok(()) => {
                self.stats.sent(0, bytes.len() as u64);
                self.last_write = Instant::now();
                self.extend_time();
                Ok(())
            }
            Err(reason) => {
                self.state = State::Finished;
                Err(StreamError::Ended(reason))
            }
        }
    }

    /// Restarts the execution-time budget, as a successful send does.
    pub fn extend_time(&mut self) {
        self.deadline = self.config.budget.map(|b| Instant::now() + b);
    }

    /// Ends the stream at `at` whatever it is doing then (asleep,
    /// following, between sends), with [`EndReason::Expired`]: for a
    /// credential that expires, such as a JWT with `exp`. Sends do not
    /// move it; a later call does.
    pub fn end_at(&mut self, at: Instant) {
        self.expires = Some(at);
    }

    /// Time left in the execution-time budget (`None`: unlimited).
    pub fn time_left(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The id the client last saw: its `Last-Event-ID` header, or else the
    /// `lastEventId` query parameter.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    // ----- blocking helpers ------------------------------------------------

    /// Sleeps for `time`, sending heartbeats if they are configured.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] with [`EndReason::Budget`] if the budget runs
    /// out first, [`EndReason::Shutdown`] at shutdown (at once, not at the
    /// end of the sleep).
    pub fn sleep(&mut self, time: Duration) -> Result<(), StreamError> {
        self.own_wake();
        let until = Instant::now() + time;
        loop {
            self.check_alive()?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            let wake = self.next_wake(until);
            match self.wake.recv_deadline(wake) {
                Err(RecvTimeoutError::Timeout) => self.on_timer()?,
                // Shutdown, or the connection died (which says so first).
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    self.check_alive()?;
                    return Err(self.end(EndReason::Shutdown));
                }
            }
        }
    }

    /// Waits for the next value of `rx`, sending heartbeats meanwhile.
    /// `Ok(None)` means every sender is gone.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] at shutdown or when the budget runs out.
    pub fn recv<T>(&mut self, rx: &Receiver<T>) -> Result<Option<T>, StreamError> {
        self.recv_until(rx, None)
    }

    /// [`recv`](Stream::recv), waiting at most `max`: `Ok(None)` also when
    /// nothing came in time.
    pub(crate) fn recv_within<T>(
        &mut self,
        rx: &Receiver<T>,
        max: Duration,
    ) -> Result<Option<T>, StreamError> {
        self.recv_until(rx, Some(Instant::now() + max))
    }

    fn recv_until<T>(
        &mut self,
        rx: &Receiver<T>,
        until: Option<Instant>,
    ) -> Result<Option<T>, StreamError> {
        self.own_wake();
        loop {
            self.check_alive()?;
            // Fast path: a value already queued needs no select (which
            // registers with both channels) and no sleep.
            match rx.try_recv() {
                Ok(v) => return Ok(Some(v)),
                Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(None),
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if until.is_some_and(|u| now >= u) {
                return Ok(None);
            }
            // Never wait past the budget or the next heartbeat.
            let wake = self.next_wake(until.unwrap_or(now + Duration::from_secs(3600)));
            crossbeam_channel::select! {
                recv(rx) -> msg => return Ok(msg.ok()),
                recv(self.wake) -> _ => {
                    // Shutdown, or the connection died (which says so first).
                    self.check_alive()?;
                    return Err(self.end(EndReason::Shutdown));
                }
                default(wake.saturating_duration_since(Instant::now())) => self.on_timer()?,
            }
        }
    }

    /// Calls `f` every `interval` and sends each `Some` value as JSON on
    /// `channel`; runs until the stream ends, then returns why.
    ///
    /// # Errors
    ///
    /// Always, eventually: [`StreamError::Ended`] when the client leaves,
    /// the budget runs out (no value for longer than the budget and no
    /// heartbeat) or the server shuts down.
    pub fn poll<T, F>(
        &mut self,
        channel: &str,
        interval: Duration,
        mut f: F,
    ) -> Result<(), StreamError>
    where
        T: Serialize,
        F: FnMut() -> Option<T>,
    {
        loop {
            if let Some(value) = f() {
                self.send(channel, &value)?;
            }
            self.sleep(interval)?;
        }
    }

    /// Relays every value of `rx` as JSON on `channel` until every sender
    /// is gone (then returns `Ok`).
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream ends first.
    pub fn forward<T: Serialize>(
        &mut self,
        channel: &str,
        rx: &Receiver<T>,
    ) -> Result<(), StreamError> {
        while let Some(value) = self.recv(rx)? {
            self.send(channel, &value)?;
        }
        Ok(())
    }

    /// Relays every [`Event`] of `rx` until every sender is gone.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream ends first;
    /// [`StreamError::Event`] on an invalid event.
    pub fn forward_events(&mut self, rx: &Receiver<Event>) -> Result<(), StreamError> {
        while let Some(event) = self.recv(rx)? {
            self.send_event(&event)?;
        }
        Ok(())
    }

    // ----- internals -------------------------------------------------------

    fn end(&mut self, reason: EndReason) -> StreamError {
        let reason = *self.ended.get_or_insert(reason);
        StreamError::Ended(reason)
    }

    /// Ends the stream for `reason` (the first reason sticks) and returns
    /// the error to propagate.
    pub(crate) fn end_with(&mut self, reason: EndReason) -> StreamError {
        self.end(reason)
    }

    pub(crate) fn check_alive(&mut self) -> Result<(), StreamError> {
        if let Some(r) = self.ended {
            return Err(StreamError::Ended(r));
        }
        if self.state == State::Finished {
            return Err(StreamError::Finished);
        }
        if self.shutdown.is_shutdown() {
            return Err(self.end(EndReason::Shutdown));
        }
        if let Some(t) = &self.tracked {
            match t.hang_up() {
                HUNG_UP_NOT => {}
                // A peer that vanished: what a write that never ends is.
                HUNG_UP_TIMEOUT => return Err(self.end(EndReason::WriteTimeout)),
                HUNG_UP_REVOKED => return Err(self.end(EndReason::Revoked)),
                _ => return Err(self.end(EndReason::Client)),
            }
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(self.end(EndReason::Budget));
        }
        if self.expires.is_some_and(|e| Instant::now() >= e) {
            return Err(self.end(EndReason::Expired));
        }
        Ok(())
    }

    /// The earliest of `until`, the budget's end and the next heartbeat.
    fn next_wake(&self, until: Instant) -> Instant {
        let mut wake = until;
        if let Some(d) = self.deadline {
            wake = wake.min(d);
        }
        if let Some(e) = self.expires {
            wake = wake.min(e);
        }
        if let Some(h) = self.config.heartbeat {
            wake = wake.min(self.last_write + h);
        }
        wake
    }

    pub(crate) fn on_timer(&mut self) -> Result<(), StreamError> {
        self.check_alive()?;
        if let Some(h) = self.config.heartbeat
            && self.last_write.elapsed() >= h
        {
            if self.config.heartbeat_event {
                self.ping_frame()?;
            } else if self.state == State::Open {
                // The usual case, written as it stands: the shallowest
                // write a stream makes (see `write_small`).
                self.check_alive()?;
                let frame = if self.chunked {
                    HEARTBEAT_CHUNK
                } else {
                    HEARTBEAT_FRAME
                };
                self.wrote(frame, 1)?;
            } else {
                self.write_frames(&[HEARTBEAT_FRAME])?;
            }
        }
        Ok(())
    }

    /// `event: ping` with the time, as a heartbeat.
    #[inline(never)]
    fn ping_frame(&mut self) -> Result<(), StreamError> {
        let frame = ping_event().encode()?;
        self.write_frames(&[&frame])
    }

    /// Writes `frames` (with the head first if it has not gone out), as one
    /// chunk per frame, in a single write; resets the budget on success.
    fn write_frames(&mut self, frames: &[&[u8]]) -> Result<(), StreamError> {
        self.check_alive()?;
        let pending = self.state == State::Pending;
        if pending && self.open_retry.is_some() {
            return self.write_with_retry(frames);
        }
        let framing = if self.chunked { CHUNK_FRAMING } else { 0 };
        let payload: usize = frames.iter().map(|f| f.len() + framing).sum();
        if (!pending || self.headers.is_empty()) && STREAM_HEAD_11.len() + payload <= SMALL_WRITE {
            return self.write_small(frames);
        }
        let head = if pending {
            stream_head(
                if self.chunked { 1 } else { 0 },
                &std::mem::take(&mut self.headers),
            )
        } else {
            Vec::new()
        };
        self.write_large(&head, frames)
    }

    /// Writes `head` and `frames` without copying the frames (see
    /// `crate::stream::write`): what a stream holds of its own while a write waits
    /// on a client stays bounded however large the frames or the batch.
    fn write_large(&mut self, head: &[u8], frames: &[&[u8]]) -> Result<(), StreamError> {
        let result = match &mut self.sink {
            Sink::Socket(conn) => {
                self.stats.thread_write();
                write_frames_timeout(
                    conn,
                    head,
                    frames,
                    self.chunked,
                    self.config.write_timeout,
                    &mut self.armed,
                )
            }
            Sink::Writer(w) => {
                write_frames_to(&mut **w, head, frames, self.chunked).map_err(|_| EndReason::Client)
            }
        };
        match result {
            Ok(0) => Ok(()),
            Ok(bytes) => {
                self.state = State::Open;
                self.stats.sent(frames.len() as u64, bytes);
                self.last_write = Instant::now();
                self.extend_time();
                Ok(())
            }
            Err(reason) => Err(StreamError::Ended(self.failed(reason))),
        }
    }

    /// [`write_frames`](Stream::write_frames) for the usual writes of an
    /// idle stream (the head with `retry:`, a heartbeat), which fit in
    /// `SMALL_WRITE` bytes with the head: put together on the stack. A heap
    /// buffer freed here would stay in this thread's malloc cache for as
    /// long as the stream lives, memory every idle stream pays for. Out of
    /// line, so the buffer is on the stack only while it is used: a stream
    /// thread keeps every stack page it ever touched (see `Stream::follow`).
    #[inline(never)]
    fn write_small(&mut self, frames: &[&[u8]]) -> Result<(), StreamError> {
        let head: &[u8] = match (self.state == State::Pending, self.chunked) {
            (false, _) => b"",
            (true, true) => STREAM_HEAD_11,
            (true, false) => STREAM_HEAD_10,
        };
        let mut buf = [0u8; SMALL_WRITE];
        let mut at = fill(&mut buf, &[head]);
        for frame in frames {
            at += if self.chunked {
                let size = Digits::hex(frame.len());
                fill(&mut buf[at..], &[size.as_bytes(), b"\r\n", frame, b"\r\n"])
            } else {
                fill(&mut buf[at..], &[frame])
            };
        }
        self.wrote(&buf[..at], frames.len())
    }

    /// [`write_frames`](Stream::write_frames) with the `retry:` that waits
    /// for the head first.
    #[inline(never)]
    fn write_with_retry(&mut self, frames: &[&[u8]]) -> Result<(), StreamError> {
        let Some(time) = self.open_retry.take() else {
            return self.write_frames(frames);
        };
        let (retry, len) = retry_frame(time);
        let mut all: Vec<&[u8]> = Vec::with_capacity(frames.len() + 1);
        all.push(&retry[..len]);
        all.extend_from_slice(frames);
        self.write_frames(&all)
    }

    /// What this stream's first write would carry (the head, a `retry:`
    /// from [`retry_on_open`](Stream::retry_on_open), then `frames`) and
    /// how many frames that is, for a waker thread to send instead of this
    /// one: from here the stream counts as open and as having just sent.
    /// `None`, and nothing changes, unless the stream is pending on a
    /// socket of ours and `frames` come to at most `max` bytes.
    ///
    /// Why hand it over: a thread that sends on a TCP socket keeps the
    /// kernel's page fragment for that (32 KiB by default) until it exits,
    /// which would more than double an idle stream's memory.
    #[inline(never)]
    pub(crate) fn take_opening(
        &mut self,
        frames: &[EncodedEvent],
        max: usize,
    ) -> Option<(Vec<u8>, u64)> {
        if !matches!(self.sink, Sink::Socket(_))
            || self.state != State::Pending
            || self.check_alive().is_err()
            || frames.iter().map(|f| f.as_bytes().len()).sum::<usize>() > max
        {
            return None;
        }
        let minor = if self.chunked { 1 } else { 0 };
        let mut out = if self.headers.is_empty() {
            let head = if self.chunked {
                STREAM_HEAD_11
            } else {
                STREAM_HEAD_10
            };
            let mut out = Vec::with_capacity(head.len() + 64);
            out.extend_from_slice(head);
            out
        } else {
            stream_head(minor, &std::mem::take(&mut self.headers))
        };
        let mut count = frames.len() as u64;
        if let Some(time) = self.open_retry.take() {
            let (retry, len) = retry_frame(time);
            frame_into(&mut out, &retry[..len], self.chunked);
            count += 1;
        }
        for frame in frames {
            frame_into(&mut out, frame.as_bytes(), self.chunked);
        }
        self.state = State::Open;
        self.last_write = Instant::now();
        self.extend_time();
        Some((out, count))
    }

    /// A heartbeat that is due, added to `out` for a waker to send instead
    /// of written here (see [`take_opening`](Stream::take_opening)); true
    /// when one was. The stream counts as having just sent: should the
    /// waker fail, this thread is woken to finish the bytes itself.
    pub(crate) fn stage_heartbeat(&mut self, out: &mut Vec<u8>) -> Result<bool, StreamError> {
        self.check_alive()?;
        let Some(h) = self.config.heartbeat else {
            return Ok(false);
        };
        if self.state != State::Open || self.last_write.elapsed() < h {
            return Ok(false);
        }
        if self.config.heartbeat_event {
            self.stage_ping(out)?;
        } else if self.chunked {
            out.extend_from_slice(HEARTBEAT_CHUNK);
        } else {
            out.extend_from_slice(HEARTBEAT_FRAME);
        }
        self.last_write = Instant::now();
        self.extend_time();
        Ok(true)
    }

    #[inline(never)]
    fn stage_ping(&self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        let frame = ping_event().encode()?;
        frame_into(out, &frame, self.chunked);
        Ok(())
    }

    /// Writes `bytes` (holding `frames` frames, and the head if it was
    /// pending) and notes the write.
    fn wrote(&mut self, bytes: &[u8], frames: usize) -> Result<(), StreamError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.write_out(bytes).map_err(StreamError::Ended)?;
        self.state = State::Open;
        self.stats.sent(frames as u64, bytes.len() as u64);
        self.last_write = Instant::now();
        self.extend_time();
        Ok(())
    }

    /// Writes every byte within the write timeout, or ends the stream.
    fn write_out(&mut self, bytes: &[u8]) -> Result<(), EndReason> {
        let result = match &mut self.sink {
            Sink::Socket(conn) => {
                self.stats.thread_write();
                write_all_timeout(conn, bytes, self.config.write_timeout, &mut self.armed)
            }
            Sink::Writer(w) => w
                .write_all(bytes)
                .and_then(|()| w.flush())
                .map_err(|_| EndReason::Client),
        };
        result.map_err(|reason| self.failed(reason))
    }

    /// Ends the stream after a failed write (the first reason sticks).
    fn failed(&mut self, reason: EndReason) -> EndReason {
        // A socket the server force-closed at shutdown fails like a
        // vanished client; report it as what it is.
        let hung_up = self.tracked.as_ref().map_or(HUNG_UP_NOT, |t| t.hang_up());
        let reason = if self.shutdown.is_shutdown() {
            EndReason::Shutdown
        } else if hung_up == HUNG_UP_REVOKED {
            // An operator shut the socket down to end it (whatever the
            // write made of that).
            EndReason::Revoked
        } else if reason == EndReason::Client && hung_up == HUNG_UP_TIMEOUT {
            // The acceptor read the kernel's timeout off the socket first
            // (which clears it); the write then saw only a broken pipe.
            EndReason::WriteTimeout
        } else {
            reason
        };
        *self.ended.get_or_insert(reason)
    }

    /// Writes the end of the body (the last chunk) and marks the stream
    /// finished. Best effort: the connection closes next anyway.
    fn finish_body(&mut self) {
        if self.state == State::Open && self.chunked && self.ended.is_none() {
            let _ = self.write_out(b"0\r\n\r\n"); // closing next anyway
        }
        self.state = State::Finished;
    }

    /// Called by the server once the handler has returned.
    pub(crate) fn close(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Finished => {
                if self.state == State::Pending && self.ended.is_none() {
                    let _ = self.write_frames(&[]); // an empty stream still gets its 200
                }
                self.finish_body();
            }
            Outcome::Shutdown => {
                if self.state == State::Pending {
                    let r =
                        Response::text(503, "server shutting down").with_header("Retry-After", "1");
                    let _ = self.answer(r);
                } else if self.state == State::Open {
                    // The last frame: a comment, so clients that ignore it
                    // simply reconnect elsewhere or later.
                    let frame = Event::new().comment(SHUTDOWN_COMMENT).encode();
                    if let (Ok(frame), Sink::Socket(conn)) = (frame, &self.sink) {
                        let mut out = Vec::new();
                        if self.chunked {
                            chunk_into(&mut out, &frame);
                            out.extend_from_slice(b"0\r\n\r\n");
                        } else {
                            out.extend_from_slice(&frame);
                        }
                        // A short deadline: shutdown must not wait on a
                        // client that stopped reading.
                        let timeout = self.config.write_timeout.min(Duration::from_secs(1));
                        self.stats.thread_write();
                        let _ = write_all_timeout(conn, &out, timeout, &mut self.armed);
                    }
                }
                self.state = State::Finished;
            }
            Outcome::Failed => {
                if self.state == State::Pending && self.ended.is_none() {
                    let _ = self.answer(Response::text(500, "stream handler failed"));
                }
                // An open stream that failed is cut without its last chunk,
                // so the client sees an error rather than a clean end.
                self.state = State::Finished;
            }
            Outcome::Ended => {
                // The budget or the hub ended a stream that never sent
                // anything: the socket still works, so answer with an empty
                // stream (the client reconnects) rather than nothing at all.
                let answerable = matches!(self.ended, Some(EndReason::Budget | EndReason::Slow));
                if self.state == State::Pending && answerable {
                    let mut out = stream_head(if self.chunked { 1 } else { 0 }, &self.headers);
                    if self.chunked {
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                    if let Sink::Socket(conn) = &self.sink {
                        self.stats.thread_write();
                        let _ = write_all_timeout(
                            conn,
                            &out,
                            self.config.write_timeout,
                            &mut self.armed,
                        );
                    }
                }
                self.state = State::Finished;
            }
        }
        // Over TLS, a clean end says so (a cut one must not look clean).
        if let (Outcome::Finished | Outcome::Shutdown, Sink::Socket(w)) = (outcome, &self.sink) {
            w.close_notify();
        }
    }

    pub(crate) fn ended(&self) -> Option<EndReason> {
        self.ended
    }
}

/// How a handler ended, as the server classifies it for [`Stream::close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Returned `Ok`, or `Finished`: end the body cleanly.
    Finished,
    /// Ended by shutdown: last frame, then close.
    Shutdown,
    /// Client gone, write timeout, budget, slow: just close.
    Ended,
    /// Handler error or panic.
    Failed,
}

/// `event: ping` with the current time.
pub(crate) fn ping_event() -> Event {
    let time = crate::time::iso8601(SystemTime::now());
    Event::new()
        .event("ping")
        .data(format!("{{\"time\":\"{time}\"}}"))
}

/// `retry: <ms>\n\n`, put together on the stack (see `write_frames`), and
/// its length.
fn retry_frame(time: Duration) -> ([u8; 48], usize) {
    let ms = Digits::decimal(time.as_millis());
    let mut frame = [0u8; 48];
    let len = fill(&mut frame, &[b"retry: ", ms.as_bytes(), b"\n\n"]);
    (frame, len)
}

/// Copies `parts` one after another to the start of `buf`; returns the
/// length written. The caller sizes `buf` for them.
fn fill(buf: &mut [u8], parts: &[&[u8]]) -> usize {
    let mut at = 0;
    for part in parts {
        buf[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_chunk_is_the_heartbeat_frame_chunked() {
        let mut out = Vec::new();
        chunk_into(&mut out, HEARTBEAT_FRAME);
        assert_eq!(out, HEARTBEAT_CHUNK);
    }

    /// Without the acceptor's watch (no registry, as under an adapter),
    /// `check_connection` still finds a closed peer by itself.
    #[test]
    fn check_connection_alone_sees_a_closed_peer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let config = StreamOptions::new().stream_config(Duration::from_secs(1));
        let mut stream = Stream::new(
            Sink::Socket(Arc::new(Wire::plain(conn))),
            false,
            config,
            None,
            ShutdownHandle::new(),
            Stats::new(),
        );
        assert!(stream.check_connection().is_ok(), "the peer is there");
        drop(client);
        let mut ended = None;
        for _ in 0..100 {
            if let Err(e) = stream.check_connection() {
                ended = e.end_reason();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ended, Some(EndReason::Client));
    }

    #[test]
    fn a_small_write_fits_the_head_and_a_chunked_retry() {
        let retry = b"retry: 4294967295\n\n";
        let mut out = STREAM_HEAD_11.to_vec();
        chunk_into(&mut out, retry);
        assert!(out.len() <= SMALL_WRITE, "{} bytes", out.len());
        assert!(STREAM_HEAD_11.len() + retry.len() + CHUNK_FRAMING <= SMALL_WRITE);
    }
}
