//! A connection's one thread: runs a stream handler for as long as the
//! stream lives, or answers an ordinary request and hands the connection
//! back to the acceptor.
//!
//! An ordinary request's thread never waits on its client: its body is in
//! before the thread starts (the acceptor received it), and its response
//! goes out with one non-blocking send, the rest handed back to the
//! acceptor with the connection. A client that never reads its answers
//! thus costs a descriptor in the acceptor, not a thread.
//!
//! A panic in a handler is caught here, at the thread boundary: it ends that
//! connection only, is logged at `error` and counted.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{EndReason, Report, StreamError, panic_message};
use crate::http::body;
use crate::http::head::{self, Parse};
use crate::http::response::BodyPieces;
use crate::http::{Request, Response};
use crate::server::Shared;
use crate::server::limits::clients::ClientSlot;
use crate::server::pending::Returned;
use crate::server::route::{Handler, Match, PlainFn, StreamFn};
use crate::stats::Gauge;
use crate::stream::{Outcome, Sink, Stream};
use crate::wire::Wire;

/// What a connection thread is to do.
pub(crate) enum Job {
    Stream {
        req: Request,
        handler: Arc<StreamFn>,
        /// The client's place under `max_streams_per_client`, given back
        /// when the job (and so the stream) ends.
        #[expect(dead_code, reason = "held for its Drop, which gives the place back")]
        client: Option<ClientSlot>,
    },
    Plain {
        req: Request,
        handler: Arc<PlainFn>,
        head_only: bool,
        leftover: Vec<u8>,
    },
}

impl Job {
    /// Undoes the acceptor's accounting for a job that will not run.
    pub(crate) fn abandon(self, shared: &Shared) {
        let counters = shared.stats.counters();
        match self {
            Job::Stream { .. } => counters.streams_open.fetch_sub(1, Relaxed),
            Job::Plain { .. } => counters.requests_active.fetch_sub(1, Relaxed),
        };
    }
}

/// The body of every connection thread.
pub(crate) fn run(
    shared: Arc<Shared>,
    slot: Arc<Mutex<Option<Wire>>>,
    peer: SocketAddr,
    job: Box<Job>,
) {
    let counters = shared.stats.counters();
    let _gauge = match &*job {
        Job::Stream { .. } => Gauge(&counters.streams_open),
        Job::Plain { .. } => Gauge(&counters.requests_active),
    };
    let conn = match slot.lock() {
        Ok(mut s) => s.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    drop(slot);
    let Some(conn) = conn else { return };
    // A stream's request is used where it lies, in the job's box: moved
    // onto this thread's stack it would deepen every frame of a stream
    // that lives for hours, and the deepest stack page a stream thread
    // touches stays resident for its whole life.
    if let Job::Stream { req, handler, .. } = &*job {
        run_stream(&shared, conn, peer, req, &**handler);
        // The client's place goes back before the stream stops counting
        // as open: whoever sees it closed may open another at once.
        drop(job);
        return;
    }
    run_plain_job(&shared, conn, peer, job);
}

/// Runs an ordinary request's job. Out of line, as `run_plain` is: the
/// request it moves out of the box would otherwise take room in the first
/// frame of every stream thread too.
#[inline(never)]
fn run_plain_job(shared: &Shared, conn: Wire, peer: SocketAddr, job: Box<Job>) {
    if let Job::Plain {
        req,
        handler,
        head_only,
        leftover,
    } = *job
    {
        run_plain(shared, conn, peer, req, &handler, head_only, leftover);
    }
}

fn run_stream(shared: &Shared, conn: Wire, peer: SocketAddr, req: &Request, handler: &StreamFn) {
    // The acceptor gave the socket its small send buffer at accept time.
    let conn = Arc::new(conn);
    let tracked = shared
        .registry
        .insert(Arc::clone(&conn), peer, req.client_ip(), &shared.stats);
    let id = tracked.id();
    let opened = Instant::now();
    log_open(peer, req);
    let mut stream = Stream::new(
        Sink::Socket(conn),
        req.is_http10(),
        shared.config.stream.clone(),
        req.last_event_id().map(str::to_owned),
        shared.shutdown.clone(),
        shared.stats.clone(),
    );
    stream.set_registry(Arc::clone(&shared.registry), tracked);
    let result = catch_unwind(AssertUnwindSafe(|| handler(req, &mut stream)));
    end_stream(shared, peer, req, &mut stream, result, opened, id);
}

/// Logs a stream's opening (debug). Out of line: the formatting's frame
/// would otherwise sit under every stream's handler.
#[inline(never)]
fn log_open(peer: SocketAddr, req: &Request) {
    log::debug!("stream open: {} {}", Who(peer, req), req.path());
}

/// Counts, closes and logs a stream whose handler returned (or panicked).
/// Out of line: its locals would otherwise widen the frame every stream
/// thread holds below its handler for the stream's whole life.
#[inline(never)]
fn end_stream(
    shared: &Shared,
    peer: SocketAddr,
    req: &Request,
    stream: &mut Stream,
    result: std::thread::Result<Result<(), StreamError>>,
    opened: Instant,
    id: u64,
) {
    let outcome = match result {
        Ok(Ok(()) | Err(StreamError::Finished)) => match stream.ended() {
            Some(EndReason::Shutdown) => Outcome::Shutdown,
            Some(_) => Outcome::Ended,
            None => Outcome::Finished,
        },
        Ok(Err(StreamError::Ended(EndReason::Shutdown))) => Outcome::Shutdown,
        Ok(Err(StreamError::Ended(_))) => Outcome::Ended,
        Ok(Err(e)) => {
            log::warn!("stream handler for {} failed: {}", req.path(), Report(&e));
            Outcome::Failed
        }
        Err(panic) => {
            shared.stats.counters().handler_panics.fetch_add(1, Relaxed);
            log::error!(
                "stream handler for {} panicked: {}",
                req.path(),
                panic_message(&*panic)
            );
            Outcome::Failed
        }
    };
    if let Some(reason) = stream.ended() {
        shared.stats.disconnect(reason);
    }
    stream.close(outcome);
    let why = stream.ended().map_or("finished", EndReason::reason);
    if stream.ended() == Some(EndReason::Slow) {
        log_slow_drop(Who(peer, req), req.path());
    }
    log::debug!(
        "stream closed: {} {} after {:.1?} ({why})",
        Who(peer, req),
        req.path(),
        opened.elapsed()
    );
    shared.registry.remove(id);
}

/// Who a request came from, for logs: the peer, and the client a trusted
/// proxy named when it is another address.
struct Who<'a>(SocketAddr, &'a Request);

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Who(peer, req) = self;
        if req.client_ip() == peer.ip().to_canonical() {
            write!(f, "{peer}")
        } else {
            write!(f, "{} via {peer}", req.client_ip())
        }
    }
}

/// Logs a slow subscriber's drop at `warn` (degraded, still serving), at
/// most once every ten seconds with a count of the others, so a publisher
/// outrunning thousands of streams cannot flood the log as well.
fn log_slow_drop(peer: Who<'_>, path: &str) {
    static LAST: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));
    let now = Instant::now();
    let more = {
        let Ok(mut last) = LAST.lock() else { return };
        if last
            .0
            .is_some_and(|t| now.duration_since(t) < SLOW_LOG_EVERY)
        {
            last.1 += 1;
            return;
        }
        last.0 = Some(now);
        std::mem::take(&mut last.1)
    };
    if more > 0 {
        log::warn!(
            "slow subscriber dropped: {peer} {path} fell behind its queue ({more} more since the last report)"
        );
    } else {
        log::warn!("slow subscriber dropped: {peer} {path} fell behind its queue");
    }
}

/// How often [`log_slow_drop`] reports.
const SLOW_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a connection thread waits for the next request on a keep-alive
/// connection before handing it back to the acceptor. A client sending
/// requests back to back (a publisher) is served on one thread without a
/// spawn and an acceptor round trip per request; an idle connection costs
/// the thread only this long.
const KEEP_ALIVE_LINGER: Duration = Duration::from_millis(10);

/// One ordinary request ready to be served on this thread, body included.
struct Next {
    req: Request,
    handler: Arc<PlainFn>,
    head_only: bool,
    leftover: Vec<u8>,
}

/// What became of a connection after a response.
enum After {
    /// The response is out and the connection stays open; the bytes
    /// received past the request.
    KeepAlive(Vec<u8>),
    /// The acceptor takes it over.
    HandBack {
        /// The response bytes the client did not take at once.
        unsent: Vec<u8>,
        /// The rest of a streamed body, made as the client takes it.
        more: Option<BodyPieces>,
        /// Whether the connection closes once they are out.
        close: bool,
        /// The bytes received past the request.
        leftover: Vec<u8>,
    },
    /// The client is gone.
    Gone,
}

// Not inlined into `run`: its locals would widen the first frame of every
// stream thread too.
#[inline(never)]
fn run_plain(
    shared: &Shared,
    conn: Wire,
    peer: SocketAddr,
    req: Request,
    handler: &Arc<PlainFn>,
    head_only: bool,
    leftover: Vec<u8>,
) {
    let mut next = Next {
        req,
        handler: Arc::clone(handler),
        head_only,
        leftover,
    };
    loop {
        let leftover = match serve_plain(shared, &conn, peer, next) {
            After::KeepAlive(leftover) => leftover,
            After::HandBack {
                unsent,
                more,
                close,
                leftover,
            } => {
                let r = Returned {
                    conn,
                    peer,
                    unsent,
                    more,
                    close,
                    leftover,
                    at: Instant::now(),
                };
                return hand_back(shared, r);
            }
            After::Gone => return,
        };
        match next_request(shared, &conn, peer, leftover) {
            Linger::Serve(n) => next = *n,
            Linger::HandBack(leftover) => {
                let r = Returned {
                    conn,
                    peer,
                    unsent: Vec::new(),
                    more: None,
                    close: false,
                    leftover,
                    at: Instant::now(),
                };
                return hand_back(shared, r);
            }
            Linger::Close => return,
        }
    }
}

/// Serves one request whose body is in, sending the response with one
/// non-blocking send.
fn serve_plain(shared: &Shared, conn: &Wire, peer: SocketAddr, next: Next) -> After {
    let Next {
        req,
        handler,
        head_only,
        leftover,
    } = next;
    let counters = shared.stats.counters();
    counters.requests_total.fetch_add(1, Relaxed);
    let minor = if req.is_http10() { 0 } else { 1 };
    let response = match catch_unwind(AssertUnwindSafe(|| handler(&req))) {
        Ok(r) => r,
        Err(panic) => {
            counters.handler_panics.fetch_add(1, Relaxed);
            log::error!(
                "handler for {} {} panicked: {}",
                req.method(),
                req.path(),
                panic_message(&*panic)
            );
            Response::text(500, "handler failed")
        }
    };
    let close = req.wants_close()
        || shared.shutdown.is_shutdown()
        // A streamed body ends with the connection on HTTP/1.0.
        || (response.is_streamed() && minor == 0)
        || response
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let mut bytes = response.encode(minor, head_only, close);
    let mut more = if head_only {
        None
    } else {
        response.pieces(minor)
    };
    log::debug!(
        "{} {} {} -> {}",
        Who(peer, &req),
        req.method(),
        req.path(),
        response.status()
    );
    // A streamed body goes out here for as long as the client takes it
    // at once, a piece at a time.
    let sent = loop {
        let Ok(sent) = conn.send_now(&bytes) else {
            return After::Gone;
        };
        if sent < bytes.len() || conn.has_unsent() {
            break sent;
        }
        bytes.clear();
        if !more.as_mut().is_some_and(|p| p.next_into(&mut bytes)) {
            more = None;
            break 0;
        }
    };
    if bytes.is_empty() && more.is_none() && !close && !conn.has_unsent() {
        return After::KeepAlive(leftover);
    }
    // The rest waits on the client: the acceptor sends it, and closes
    // (after a linger, so the client reads the answer, not a reset).
    bytes.drain(..sent);
    After::HandBack {
        unsent: bytes,
        more,
        close,
        leftover,
    }
}

enum Linger {
    /// The next request is an ordinary one with its body in: serve it here.
    Serve(Box<Next>),
    /// Anything else (nothing yet, a body still arriving, a stream, an
    /// error to answer): the acceptor takes over with the bytes received
    /// so far.
    HandBack(Vec<u8>),
    Close,
}

/// Waits briefly for the next request on a keep-alive connection. It is
/// served here only if its body is among the bytes received: this thread
/// never waits on a body.
fn next_request(shared: &Shared, conn: &Wire, peer: SocketAddr, mut buf: Vec<u8>) -> Linger {
    let linger_end = Instant::now() + KEEP_ALIVE_LINGER;
    loop {
        if !buf.is_empty() {
            match head::parse(&buf) {
                Parse::Complete(head, len) => {
                    let Match::Handler(Handler::Plain(handler), params, head_only) =
                        shared.router.find(&head.method, head_path(&head.target))
                    else {
                        return Linger::HandBack(buf);
                    };
                    if shared.shutdown.is_shutdown() {
                        return Linger::HandBack(buf);
                    }
                    let Ok(Some((body, used))) =
                        body::decode(head.body, shared.config.max_body, &buf[len..])
                    else {
                        return Linger::HandBack(buf);
                    };
                    let leftover = buf.split_off(len + used);
                    let mut req = Request::from_head(head, peer);
                    shared.resolve_origin(&mut req, peer, conn.is_tls());
                    req.set_params(params);
                    req.set_body(body);
                    return Linger::Serve(Box::new(Next {
                        req,
                        handler,
                        head_only,
                        leftover,
                    }));
                }
                Parse::Partial => {}
                Parse::Error(_) => return Linger::HandBack(buf),
            }
        }
        let left = linger_end.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.tcp().set_read_timeout(Some(left)).is_err() {
            return Linger::HandBack(buf);
        }
        let mut chunk = [0u8; 4096];
        match conn.read_now(&mut chunk) {
            Ok(0) => return Linger::Close,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Linger::HandBack(buf);
            }
            Err(_) => return Linger::Close,
        }
    }
}

fn head_path(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

/// Hands a connection back to the acceptor, which sends what is left of
/// the response and waits for the next head, without a thread. If the
/// acceptor is gone (shutdown) this drops it, closing the connection.
fn hand_back(shared: &Shared, r: Returned) {
    if r.conn.tcp().set_read_timeout(None).is_err() {
        return;
    }
    if shared.returned.send(r).is_ok() {
        shared.shutdown.wake();
    }
}
