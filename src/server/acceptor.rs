//! The accept loop: the one thread that owns every connection until its
//! request is in, and again between requests. This is ssed's main loop.
//!
//! New connections are non-blocking and watched with epoll, so a thousand
//! idle or trickling clients cost a descriptor and a few bytes each, never a
//! thread. When a head is complete the acceptor routes it and either answers
//! at once (`400`, `404`, `405`, `406`, `413`, `431`, `503`: no thread spent)
//! or spawns the connection's one thread: a stream's at once, an ordinary
//! request's once its body is in too. Head and body must arrive within
//! `request_timeout` of the request's first byte (a deadline, not a
//! per-read timeout), and the bodies waiting here share one bound on the
//! memory they hold. A thread never waits on its client: what of a response
//! the client does not take at once comes back here to be sent, and
//! keep-alive connections come back here between requests, so an idle,
//! slow or non-reading client holds no thread. The states a waiting
//! connection goes through live in `crate::server::pending`.
//!
//! Errors of `accept` (descriptor exhaustion above all) never end the loop:
//! they are counted, logged at most once a second, and retried after a short
//! backoff, during which the oldest waiting connection may be cut to free a
//! descriptor.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rustix::event::epoll;
use rustix::fd::{AsFd, OwnedFd};

use crate::backoff::{Backoff, Jitter};
use crate::http::body::{self, BodyDecoder, BodyError, Feed};
use crate::http::head::{self, MAX_HEAD, Parse};
use crate::http::{Request, Response};
use crate::server::conn::{self, Job};
use crate::server::pending::{Flush, Outgoing, Pending, Phase, Returned, Table, Waiting};
use crate::server::route::{Handler, Match, PlainFn};
use crate::server::{Overload, Shared};
use crate::stream::registry::STREAM_TAG;
use crate::wire::Wire;

const LISTENER: u64 = u64::MAX;
const WAKER: u64 = u64::MAX - 1;
/// Accepts per wake-up, so reading heads is not starved during a flood.
const ACCEPT_BURST: usize = 256;
/// How often deadlines are checked.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// How long an answered error connection is drained before closing, so the
/// client reads the answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
/// The most bytes drained from such a connection.
const LINGER_BYTES: usize = 64 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Bytes read at a time: a 64 KiB body in four reads.
const READ_CHUNK: usize = 16 * 1024;
/// The floor of the bound on waiting bodies (see [`body_budget`]).
const BODY_BUDGET_MIN: usize = 4 * 1024 * 1024;
/// The interim answer to `Expect: 100-continue` (RFC 9110 section 10.1.1).
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The most memory the bodies waiting in the acceptor may hold together.
///
/// The threads already hold up to `max_requests × max_body` of bodies being
/// handled; as much again for bodies still arriving keeps the worst case
/// at twice what a full server holds anyway, instead of `max_pending ×
/// max_body` (256 MiB by default). The 4 MiB floor keeps room for a few
/// dozen ordinary publishes when `max_requests × max_body` is small. Past
/// the bound the waiting body nearest its deadline is cut: the one that has
/// had the most time, so a fast client behind slow ones still gets in.
fn body_budget(max_requests: usize, max_body: usize) -> usize {
    max_requests.saturating_mul(max_body).max(BODY_BUDGET_MIN)
}

/// An ordinary request whose body is arriving: what its thread will need.
struct PlainJob {
    req: Request,
    handler: Arc<PlainFn>,
    head_only: bool,
    minor: u8,
}

type Conn = Pending<PlainJob>;

pub(crate) struct Acceptor {
    shared: Arc<Shared>,
    listener: TcpListener,
    table: Table<PlainJob>,
    returned: Receiver<Returned>,
    /// See [`body_budget`].
    body_budget: usize,
    listening: bool,
    backoff: Backoff,
    resume_at: Option<Instant>,
    last_error_log: Option<Instant>,
    suppressed_errors: u64,
    jitter: Jitter,
}

impl Acceptor {
    pub(crate) fn new(
        shared: Arc<Shared>,
        listener: TcpListener,
        epoll: OwnedFd,
        returned: Receiver<Returned>,
    ) -> Self {
        let body_budget = body_budget(shared.config.max_requests, shared.config.max_body);
        Acceptor {
            table: Table::new(epoll, shared.stats.clone()),
            shared,
            listener,
            returned,
            body_budget,
            listening: true,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
            resume_at: None,
            last_error_log: None,
            suppressed_errors: 0,
            jitter: Jitter::new(),
        }
    }

    /// Runs until shutdown.
    pub(crate) fn run(mut self) -> io::Result<()> {
        epoll::add(
            self.table.poller(),
            &self.listener,
            epoll::EventData::new_u64(LISTENER),
            epoll::EventFlags::IN,
        )?;
        let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
        let mut last_sweep = Instant::now();
        while !self.shared.shutdown.is_shutdown() {
            events.clear();
            // Wake for the next sweep, or sooner when a backoff ends.
            let mut wait = SWEEP_EVERY;
            if let Some(at) = self.resume_at {
                wait = wait.min(at.saturating_duration_since(Instant::now()));
            }
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: wait.as_nanos() as i64,
            };
            match epoll::wait(
                self.table.poller(),
                rustix::buffer::spare_capacity(&mut events),
                Some(&timeout),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    log::error!("epoll_wait failed: {e}");
                    std::thread::sleep(BACKOFF_MAX);
                    continue;
                }
            }
            for ev in events.iter() {
                let token = ev.data.u64();
                match token {
                    LISTENER => self.accept_burst(),
                    WAKER => self.on_wake(),
                    t if t & STREAM_TAG != 0 => self.shared.registry.hang_up(t & !STREAM_TAG),
                    idx => self.on_ready(idx as usize),
                }
            }
            let now = Instant::now();
            if self.resume_at.is_some_and(|t| now >= t) {
                self.resume_listening();
            }
            if now.duration_since(last_sweep) >= SWEEP_EVERY {
                last_sweep = now;
                self.sweep(now);
            }
        }
        self.close_all();
        Ok(())
    }

    // ----- accepting -------------------------------------------------------

    fn accept_burst(&mut self) {
        for _ in 0..ACCEPT_BURST {
            match self.listener.accept() {
                Ok((conn, peer)) => {
                    self.backoff.reset();
                    self.limit_send_buffer(&conn);
                    if let Some(wire) = self.wire(conn, peer) {
                        self.admit(wire, peer, Vec::new(), false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    if self.on_accept_error(&e) {
                        continue; // a descriptor was freed: accept again now
                    }
                    return;
                }
            }
        }
    }

    /// Handles a failed `accept`; returns true when a descriptor was freed
    /// and accepting may go on at once.
    fn on_accept_error(&mut self, e: &io::Error) -> bool {
        self.shared
            .stats
            .counters()
            .accept_errors
            .fetch_add(1, Relaxed);
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            let also = if self.suppressed_errors > 0 {
                format!(" ({} more since the last report)", self.suppressed_errors)
            } else {
                String::new()
            };
            log::warn!(
                "accept failed: {e}{also}; retrying in at most {:?} with {} connections waiting for their head",
                self.backoff.delay(),
                self.table.live()
            );
            self.last_error_log = Some(now);
            self.suppressed_errors = 0;
        } else {
            self.suppressed_errors += 1;
        }
        // Out of descriptors: the waiting connection nearest its deadline
        // is the likeliest to be idle or hostile; cutting it lets a new
        // client in straight away.
        let out_of_fds = matches!(e.raw_os_error(), Some(code)
            if code == rustix::io::Errno::MFILE.raw_os_error()
                || code == rustix::io::Errno::NFILE.raw_os_error());
        if out_of_fds && self.evict_oldest() {
            return true;
        }
        // Nothing to free: level-triggered epoll would report the listener
        // again at once, so stop watching it until the backoff is over.
        if self.listening && epoll::delete(self.table.poller(), &self.listener).is_ok() {
            self.listening = false;
        }
        self.resume_at = Some(now + self.backoff.next_wait());
        false
    }

    fn resume_listening(&mut self) {
        if self.listening {
            return;
        }
        match epoll::add(
            self.table.poller(),
            &self.listener,
            epoll::EventData::new_u64(LISTENER),
            epoll::EventFlags::IN,
        ) {
            Ok(()) => {
                self.listening = true;
                self.resume_at = None;
            }
            Err(e) => {
                log::error!("cannot watch the listener again: {e}");
                self.resume_at = Some(Instant::now() + BACKOFF_MAX);
            }
        }
    }

    /// Gives every connection the small send buffer of streams: a client
    /// that pipelines requests and never reads the answers then pins that
    /// much kernel memory, not the megabytes the kernel's autotuning grants
    /// (on loopback about 1.3 MB), before the acceptor holds the rest of a
    /// response and cuts it at the write timeout.
    fn limit_send_buffer(&self, conn: &TcpStream) {
        let size = self.shared.config.send_buffer;
        if size > 0 {
            // Failure only means the kernel default stays.
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(conn, size);
        }
    }

    /// A new connection's transport: a TLS session when the server speaks
    /// TLS (the handshake is driven as its head is read, see
    /// [`on_readable`](Acceptor::on_readable)); `None` if rustls refuses
    /// to start one (the connection closes).
    fn wire(&self, conn: TcpStream, peer: SocketAddr) -> Option<Wire> {
        #[cfg(feature = "tls")]
        if let Some(config) = &self.shared.tls {
            return match crate::wire::tls::Session::new(config) {
                Ok(session) => Some(Wire::tls(conn, session)),
                Err(e) => {
                    log::warn!("cannot start a TLS session for {peer}: {e}");
                    None
                }
            };
        }
        let _ = peer;
        Some(Wire::plain(conn))
    }

    /// Takes a connection in, fresh or back from a thread (`idle`):
    /// registers it (cutting the waiting connection nearest its deadline
    /// when the table is full) and goes on with what it already sent.
    fn admit(&mut self, conn: Wire, peer: SocketAddr, buf: Vec<u8>, idle: bool) {
        self.make_room();
        if conn.tcp().set_nonblocking(true).is_err() {
            return;
        }
        // Frames are small and latency matters more than packet count.
        let _ = conn.tcp().set_nodelay(true); // an optimisation only
        let now = Instant::now();
        let config = &self.shared.config;
        let (phase, timeout) = if idle && buf.is_empty() {
            (Phase::Idle, config.keep_alive_timeout)
        } else {
            (Phase::Head(buf), config.request_timeout)
        };
        let p = Pending {
            conn,
            peer,
            deadline: now + timeout,
            started: now,
            phase,
        };
        // A returned keep-alive connection may already hold the next head
        // (or its TLS session the plaintext of one, which the poller
        // cannot tell).
        let has_bytes = matches!(&p.phase, Phase::Head(buf) if !buf.is_empty());
        let tls = p.conn.is_tls() && idle;
        if let Some(idx) = self.table.insert(p) {
            let waiting = !has_bytes || self.try_head(idx);
            if waiting && tls {
                self.on_readable(idx);
            }
        }
    }

    /// Cuts the waiting connection nearest its deadline if the table is
    /// full.
    fn make_room(&mut self) {
        if self.table.live() >= self.shared.config.max_pending {
            self.evict_oldest();
        }
    }

    /// Cuts the waiting connection nearest its deadline (a lingering or
    /// idle keep-alive one before a head in progress); false if none.
    fn evict_oldest(&mut self) -> bool {
        match self
            .table
            .nearest(|_| true)
            .and_then(|idx| self.table.remove(idx))
        {
            Some(p) => {
                log::debug!("cut waiting connection from {} to make room", p.peer);
                true
            }
            None => false,
        }
    }

    // ----- reading heads and bodies ----------------------------------------------

    fn on_ready(&mut self, idx: usize) {
        match self.table.get(idx) {
            Some(Pending {
                phase: Phase::Write(_),
                ..
            }) => self.on_writable(idx),
            Some(p) if p.conn.has_unsent() => self.on_handshake_writable(idx),
            Some(_) => self.on_readable(idx),
            None => {}
        }
    }

    /// Sends the TLS records a handshake queued and the socket did not
    /// take at once; then reading goes on.
    #[cold]
    fn on_handshake_writable(&mut self, idx: usize) {
        let Some(p) = self.table.get(idx) else { return };
        match p.conn.flush_now() {
            Ok(true) => {
                self.table.watch_writable(idx, false);
                self.on_readable(idx);
            }
            Ok(false) => {}
            Err(_) => {
                self.table.remove(idx);
            }
        }
    }

    fn on_readable(&mut self, idx: usize) {
        let mut scratch = [0u8; READ_CHUNK];
        loop {
            let Some(p) = self.table.get_mut(idx) else {
                return;
            };
            // A head is read no further than its limit, so a waiting head
            // holds at most 8 KiB whatever the client sends after it.
            let want = match &p.phase {
                Phase::Head(buf) => MAX_HEAD.saturating_sub(buf.len()).clamp(1, READ_CHUNK),
                Phase::Idle => MAX_HEAD,
                Phase::Write(_) => return, // not read until the response is out
                Phase::Body(_) | Phase::Linger(_) => READ_CHUNK,
            };
            let n = match p.conn.read_now(&mut scratch[..want]) {
                Ok(0) => {
                    self.table.remove(idx);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if p.conn.has_unsent() {
                        // A handshake's records wait for room: watch for it.
                        self.table.watch_writable(idx, true);
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.read_failed(idx, &e);
                    return;
                }
            };
            let bytes = &scratch[..n];
            let waiting = match &mut p.phase {
                Phase::Linger(drained) => {
                    *drained += n;
                    if *drained > LINGER_BYTES {
                        self.table.remove(idx);
                        return;
                    }
                    true
                }
                Phase::Idle => {
                    p.phase = Phase::Head(bytes.to_vec());
                    p.started = Instant::now();
                    p.deadline = p.started + self.shared.config.request_timeout;
                    self.try_head(idx)
                }
                Phase::Head(buf) => {
                    buf.extend_from_slice(bytes);
                    self.try_head(idx)
                }
                Phase::Body(_) => self.feed_body(idx, bytes),
                Phase::Write(_) => false,
            };
            if !waiting {
                return;
            }
        }
    }

    /// Closes `idx` after a failed read; a client that spoke plain HTTP to
    /// a TLS port is told so, in plain text.
    fn read_failed(&mut self, idx: usize, e: &io::Error) {
        let Some(p) = self.table.remove(idx) else {
            return;
        };
        #[cfg(feature = "tls")]
        if p.conn.is_tls() && e.kind() == io::ErrorKind::InvalidData {
            self.shared
                .stats
                .counters()
                .bad_requests
                .fetch_add(1, Relaxed);
            if crate::wire::tls::is_plain_http(e) {
                log::debug!("plain HTTP from {} on the TLS port", p.peer);
                let p = Pending {
                    conn: p.conn.into_plain(),
                    ..p
                };
                let msg = "this port speaks HTTPS: use an https:// URL";
                self.answer_conn(p, 0, Response::text(400, msg));
            } else {
                log::debug!("TLS handshake with {} failed: {e}", p.peer);
            }
            return;
        }
        let _ = (p, e); // closes
    }

    /// Parses what `idx` has received. Returns true while the connection
    /// stays here waiting for more bytes.
    fn try_head(&mut self, idx: usize) -> bool {
        let Some(Phase::Head(buf)) = self.table.get(idx).map(|p| &p.phase) else {
            return false;
        };
        match head::parse(buf) {
            Parse::Partial => true,
            Parse::Error(e) => {
                self.shared
                    .stats
                    .counters()
                    .bad_requests
                    .fetch_add(1, Relaxed);
                let minor = 1;
                self.answer(idx, minor, Response::text(e.status(), e.message()));
                false
            }
            Parse::Complete(head, len) => {
                let Some(mut p) = self.table.remove(idx) else {
                    return false;
                };
                let Phase::Head(mut buf) = std::mem::replace(&mut p.phase, Phase::Idle) else {
                    return false;
                };
                let leftover = buf.split_off(len);
                let minor = head.minor;
                let req = Request::from_head(head, p.peer);
                self.dispatch(p, req, leftover, minor);
                false
            }
        }
    }

    /// Feeds bytes of `idx`'s body to its decoder, within the bound on
    /// waiting bodies; spawns the request's thread once the body is in.
    /// Returns true while the connection stays here waiting for more.
    fn feed_body(&mut self, idx: usize, bytes: &[u8]) -> bool {
        let Some(Phase::Body(w)) = self.table.get(idx).map(|p| &p.phase) else {
            return false;
        };
        let before = w.decoder.held();
        let after = w.decoder.held_after(bytes.len());
        while self.table.body_bytes() - before + after > self.body_budget {
            let Some(victim) = self.table.nearest(|p| matches!(p.phase, Phase::Body(_))) else {
                break;
            };
            self.cut_body(victim);
            if victim == idx {
                return false;
            }
        }
        let Some(p) = self.table.get_mut(idx) else {
            return false;
        };
        let Phase::Body(w) = &mut p.phase else {
            return false;
        };
        let fed = w.decoder.feed(bytes);
        let held = w.decoder.held();
        self.table.body_resized(before, held);
        match fed {
            Ok(Feed::More) => true,
            Ok(Feed::Done(used)) => {
                let Some(mut p) = self.table.remove(idx) else {
                    return false;
                };
                let Phase::Body(w) = std::mem::replace(&mut p.phase, Phase::Idle) else {
                    return false;
                };
                let Waiting { decoder, mut job } = *w;
                job.req.set_body(decoder.into_body());
                self.start_plain(p, job, bytes[used..].to_vec());
                false
            }
            Err(e) => {
                if let Some(mut p) = self.table.remove(idx)
                    && let Phase::Body(w) = std::mem::replace(&mut p.phase, Phase::Idle)
                {
                    self.refuse_body(p, w.job.minor, e);
                }
                false
            }
        }
    }

    /// Cuts a waiting body to keep the waiting bodies within their bound.
    fn cut_body(&mut self, idx: usize) {
        let Some(p) = self.table.remove(idx) else {
            return;
        };
        self.shared
            .stats
            .counters()
            .bodies_evicted
            .fetch_add(1, Relaxed);
        log::debug!(
            "cut the request body from {} to keep waiting bodies within {} bytes",
            p.peer,
            self.body_budget
        );
        let minor = match &p.phase {
            Phase::Body(w) => w.job.minor,
            _ => 1,
        };
        let r = Response::text(503, "too many request bodies arriving at once; retry")
            .with_header("Retry-After", "1");
        self.answer_conn(p, minor, r);
    }

    // ----- routing -------------------------------------------------------------

    fn dispatch(&mut self, p: Conn, mut req: Request, leftover: Vec<u8>, minor: u8) {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        let counters = shared.stats.counters();
        shared.resolve_origin(&mut req, p.peer, p.conn.is_tls());
        match shared.router.find(req.method(), req.path()) {
            Match::NotFound => {
                let msg = format!("no route for {}", req.path());
                self.answer_conn(p, minor, Response::text(404, msg));
            }
            Match::MethodNotAllowed(allow) => {
                let msg = format!("method {} not allowed; allowed: {allow}", req.method());
                self.answer_conn(
                    p,
                    minor,
                    Response::text(405, msg).with_header("Allow", &allow),
                );
            }
            Match::Handler(Handler::Stream(handler), params, _) => {
                if !req.accepts_event_stream() {
                    let msg = "this is an event stream: send Accept: text/event-stream (or */*)";
                    self.answer_conn(p, minor, Response::text(406, msg));
                    return;
                }
                if shared.shutdown.is_shutdown() {
                    let r =
                        Response::text(503, "server shutting down").with_header("Retry-After", "1");
                    self.answer_conn(p, minor, r);
                    return;
                }
                let named_later = shared.named_later.as_ref().is_some_and(|f| f(&req));
                let client = if named_later {
                    None
                } else {
                    let Some(client) = shared.clients.acquire(req.client_ip()) else {
                        counters.client_limited.fetch_add(1, Relaxed);
                        self.too_many_from(p, &req, minor);
                        return;
                    };
                    client
                };
                let open = counters.streams_open.load(Relaxed);
                if open >= config.max_connections as u64
                    || shared.memory.refuses(open, &shared.stats)
                {
                    counters.rejected_total.fetch_add(1, Relaxed);
                    self.overload(p, &req, minor, open);
                    return;
                }
                req.set_params(params);
                counters.streams_open.fetch_add(1, Relaxed);
                counters.streams_total.fetch_add(1, Relaxed);
                let job = Job::Stream {
                    req,
                    handler,
                    client,
                };
                self.spawn(p, job, minor);
            }
            Match::Handler(Handler::Plain(handler), params, head_only) => {
                req.set_params(params);
                let job = PlainJob {
                    req,
                    handler,
                    head_only,
                    minor,
                };
                self.receive_body(p, job, leftover);
            }
        }
    }

    /// Starts receiving an ordinary request's body: its thread at once if
    /// the body came with the head, else the connection waits here.
    fn receive_body(&mut self, p: Conn, mut job: PlainJob, mut leftover: Vec<u8>) {
        let max = self.shared.config.max_body;
        let kind = job.req.body_kind;
        match body::decode(kind, max, &leftover) {
            Ok(Some((body, used))) => {
                job.req.set_body(body);
                leftover.drain(..used);
                self.start_plain(p, job, leftover);
            }
            Err(e) => self.refuse_body(p, job.minor, e),
            Ok(None) => {
                // The client may wait for this before sending the body;
                // one that cannot take 19 bytes now is not worth waiting for.
                if job.minor == 1
                    && job.req.header_has_token("expect", "100-continue")
                    && !matches!(p.conn.send_now(CONTINUE), Ok(n) if n == CONTINUE.len())
                {
                    return;
                }
                let Ok(decoder) = BodyDecoder::new(kind, max) else {
                    return; // decode above said it fits
                };
                self.make_room();
                let deadline = p.started + self.shared.config.request_timeout;
                let p = Pending {
                    deadline,
                    phase: Phase::Body(Box::new(Waiting { decoder, job })),
                    ..p
                };
                if let Some(idx) = self.table.insert(p) {
                    self.feed_body(idx, &leftover);
                }
            }
        }
    }

    fn refuse_body(&mut self, p: Conn, minor: u8, e: BodyError) {
        self.shared
            .stats
            .counters()
            .bad_requests
            .fetch_add(1, Relaxed);
        let r = match e {
            BodyError::TooLarge => Response::text(
                413,
                format!(
                    "request body too large (limit: {} bytes)",
                    self.shared.config.max_body
                ),
            ),
            BodyError::Malformed(_) => {
                let (status, msg) = e.status();
                Response::text(status, msg)
            }
        };
        self.answer_conn(p, minor, r);
    }

    /// Spawns the thread of an ordinary request whose body is in, unless
    /// the server is at its cap of requests in progress.
    fn start_plain(&mut self, p: Conn, job: PlainJob, leftover: Vec<u8>) {
        let counters = self.shared.stats.counters();
        let minor = job.minor;
        if self.shared.shutdown.is_shutdown() {
            let r = Response::text(503, "server shutting down").with_header("Retry-After", "1");
            self.answer_conn(p, minor, r);
            return;
        }
        let active = counters.requests_active.load(Relaxed);
        if active >= self.shared.config.max_requests as u64 {
            counters.rejected_total.fetch_add(1, Relaxed);
            let r = Response::text(503, "too many requests in progress")
                .with_header("Retry-After", "1");
            self.answer_conn(p, minor, r);
            return;
        }
        counters.requests_active.fetch_add(1, Relaxed);
        let PlainJob {
            req,
            handler,
            head_only,
            minor,
        } = job;
        self.spawn(
            p,
            Job::Plain {
                req,
                handler,
                head_only,
                leftover,
            },
            minor,
        );
    }

    /// Refuses a stream of a client that holds `max_streams_per_client`
    /// already. `429`, also to an `EventSource`: unlike a full server, this
    /// client will not get a stream by retrying until it closes one, and a
    /// browser gives up on a `429` where it would retry a `retry:`.
    #[cold]
    fn too_many_from(&mut self, p: Conn, req: &Request, minor: u8) {
        let max = self.shared.clients.max();
        let client = req.client_ip();
        log::debug!("stream from {client} refused: it holds {max} streams already");
        let secs = self.shared.config.retry_after.as_secs().max(1).to_string();
        let msg = format!(
            "too many streams from {client}: at most {max} at once per client; close one first"
        );
        self.answer_conn(
            p,
            minor,
            Response::text(429, msg).with_header("Retry-After", &secs),
        );
    }

    fn overload(&mut self, p: Conn, req: &Request, minor: u8, open: u64) {
        let wants_stream = req.is_event_source();
        match self.shared.config.overload {
            Overload::Retry { min, max } if wants_stream => {
                let retry = self.jitter.between(min, max);
                let body = format!(": server at capacity\nretry: {}\n\n", retry.as_millis());
                let r = Response::new(200)
                    .with_header("Content-Type", "text/event-stream")
                    .with_header("Cache-Control", "no-cache")
                    .with_body(body);
                log::debug!(
                    "stream from {} refused at the cap ({open} open): retry in {retry:?}",
                    p.peer
                );
                self.answer_conn(p, minor, r);
            }
            _ => {
                let secs = self.shared.config.retry_after.as_secs().max(1).to_string();
                let msg = format!("server at capacity ({open} streams open); retry later");
                log::debug!("stream from {} refused at the cap ({open} open)", p.peer);
                self.answer_conn(
                    p,
                    minor,
                    Response::text(503, msg).with_header("Retry-After", &secs),
                );
            }
        }
        if open > 0 {
            log_cap_reached(open);
        }
    }

    fn spawn(&mut self, p: Conn, job: Job, minor: u8) {
        let Pending { conn, peer, .. } = p;
        if conn.tcp().set_nonblocking(false).is_err() {
            job.abandon(&self.shared);
            return;
        }
        let is_stream = matches!(job, Job::Stream { .. });
        if is_stream {
            detect_dead_peer(conn.tcp(), &self.shared.config.stream);
            // A stream's client sends nothing more: keep only what sends.
            #[cfg(feature = "tls")]
            if let Some(s) = conn.session() {
                s.seal();
            }
        }
        // Boxed, so the request stays on the heap and the thread's first
        // frames stay small: see `conn::run`.
        let job = Box::new(job);
        // The thread takes the connection out of this slot; if the spawn
        // fails the slot still holds it and the client gets a 503.
        let slot = Arc::new(Mutex::new(Some(conn)));
        let thread_slot = Arc::clone(&slot);
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new()
            .name("ssed-conn".into())
            .stack_size(self.shared.config.stack_size)
            .spawn(move || conn::run(shared, thread_slot, peer, job));
        if let Err(e) = spawned {
            // `job` went down with the closure; undo its counters here.
            let counters = self.shared.stats.counters();
            if is_stream {
                counters.streams_open.fetch_sub(1, Relaxed);
            } else {
                counters.requests_active.fetch_sub(1, Relaxed);
            }
            log::warn!("cannot start a thread for {peer}: {e}; answering 503");
            counters.rejected_total.fetch_add(1, Relaxed);
            if let Some(conn) = slot.lock().ok().and_then(|mut s| s.take()) {
                let r = Response::text(503, "server cannot start a thread right now")
                    .with_header("Retry-After", "1");
                self.answer_conn(Pending::fresh(conn, peer), minor, r);
            }
        }
    }

    // ----- answering and writing without a thread ------------------------------------

    fn answer(&mut self, idx: usize, minor: u8, r: Response) {
        if let Some(p) = self.table.remove(idx) {
            self.answer_conn(p, minor, r);
        }
    }

    /// Writes a short answer without blocking, half-closes, and keeps
    /// draining the connection for a moment so the client reads the answer
    /// rather than a reset.
    fn answer_conn(&mut self, p: Conn, minor: u8, r: Response) {
        let bytes = r.encode(minor, false, true);
        if p.conn.tcp().set_nonblocking(true).is_err() {
            return;
        }
        // A fresh socket's send buffer holds a short answer; if it does not,
        // the client is not reading and gets nothing.
        if !matches!(p.conn.send_now(&bytes), Ok(n) if n == bytes.len())
            || !matches!(p.conn.flush_now(), Ok(true))
        {
            return;
        }
        self.linger(p);
    }

    /// Half-closes `p` and drains it until the client closes, for at most
    /// [`LINGER`]; with the table full, closes it now.
    fn linger(&mut self, p: Conn) {
        p.conn.close_notify();
        let _ = p.conn.tcp().shutdown(Shutdown::Write); // the peer may be gone already
        if self.table.live() >= self.shared.config.max_pending {
            return; // no room: close now
        }
        let p = Pending {
            deadline: Instant::now() + LINGER,
            phase: Phase::Linger(0),
            ..p
        };
        self.table.insert(p);
    }

    /// Sends more of a response a thread handed back.
    fn on_writable(&mut self, idx: usize) {
        let Some(p) = self.table.get_mut(idx) else {
            return;
        };
        let Phase::Write(out) = &mut p.phase else {
            return;
        };
        match out.flush(&p.conn) {
            Flush::Blocked => {}
            // A streamed body: each piece gets the write timeout.
            Flush::Progress => {
                p.deadline = Instant::now() + self.shared.config.write_timeout;
            }
            Flush::Gone => {
                self.table.remove(idx);
            }
            Flush::Done => {
                let Some(mut p) = self.table.remove(idx) else {
                    return;
                };
                let Phase::Write(out) = std::mem::replace(&mut p.phase, Phase::Idle) else {
                    return;
                };
                let Outgoing {
                    close, leftover, ..
                } = *out;
                if close {
                    self.linger(p);
                } else {
                    self.admit(p.conn, p.peer, leftover, true);
                }
            }
        }
    }

    // ----- timers and wake-ups -------------------------------------------------------

    fn sweep(&mut self, now: Instant) {
        let shared = Arc::clone(&self.shared);
        let counters = shared.stats.counters();
        for idx in self.table.expired(now) {
            let Some(p) = self.table.remove(idx) else {
                continue;
            };
            let answer = match &p.phase {
                Phase::Head(buf) if buf.is_empty() => {
                    counters.head_timeouts.fetch_add(1, Relaxed);
                    log::debug!("connection from {} sent nothing in time", p.peer);
                    None
                }
                Phase::Head(_) => {
                    counters.head_timeouts.fetch_add(1, Relaxed);
                    log::debug!("request head from {} not complete in time", p.peer);
                    Some((1, "request head not received in time"))
                }
                Phase::Body(w) => {
                    counters.head_timeouts.fetch_add(1, Relaxed);
                    log::debug!("request body from {} not complete in time", p.peer);
                    Some((w.job.minor, "request body not received in time"))
                }
                Phase::Write(_) => {
                    log::debug!(
                        "response to {} not taken within the write timeout; closing",
                        p.peer
                    );
                    None
                }
                Phase::Idle | Phase::Linger(_) => None,
            };
            if let Some((minor, msg)) = answer {
                self.answer_conn(p, minor, Response::text(408, msg));
            }
        }
    }

    fn on_wake(&mut self) {
        if let Some(fd) = self.shared.shutdown.wake_fd() {
            let mut buf = [0u8; 8];
            let _ = rustix::io::read(fd, &mut buf); // just resets the counter
        }
        while let Ok(r) = self.returned.try_recv() {
            if self.shared.shutdown.is_shutdown() {
                continue; // dropped: closes
            }
            self.take_back(r);
        }
    }

    /// Takes back a connection from a thread: sends the rest of its
    /// response, then waits for its next request or lets it close.
    fn take_back(&mut self, r: Returned) {
        let Returned {
            conn,
            peer,
            unsent,
            more,
            close,
            leftover,
            at,
        } = r;
        if unsent.is_empty() && more.is_none() && !conn.has_unsent() {
            if close {
                let p = Pending::fresh(conn, peer);
                if p.conn.tcp().set_nonblocking(true).is_ok() {
                    self.linger(p);
                }
            } else {
                self.admit(conn, peer, leftover, true);
            }
            return;
        }
        self.make_room();
        if conn.tcp().set_nonblocking(true).is_err() {
            return;
        }
        let p = Pending {
            conn,
            peer,
            deadline: at + self.shared.config.write_timeout,
            started: at,
            phase: Phase::Write(Box::new(Outgoing::new(unsent, more, close, leftover))),
        };
        self.table.insert(p);
    }

    fn close_all(&mut self) {
        for idx in self.table.occupied() {
            self.table.remove(idx);
        }
        let _ = epoll::delete(self.table.poller(), &self.listener); // dropped next anyway
    }
}

/// Logs "cap reached" at most once every ten seconds.
fn log_cap_reached(open: u64) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let now = Instant::now();
    let Ok(mut last) = LAST.lock() else { return };
    if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
        *last = Some(now);
        log::warn!("stream cap reached ({open} open): refusing new streams");
    }
}

pub(crate) fn register_waker(epoll_fd: &OwnedFd, waker: impl AsFd) -> io::Result<()> {
    epoll::add(
        epoll_fd,
        waker,
        epoll::EventData::new_u64(WAKER),
        epoll::EventFlags::IN,
    )?;
    Ok(())
}

/// Keepalive probes start after this long without traffic when the stream
/// sends no heartbeat.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
/// Unanswered keepalive probes before the connection is given up.
const KEEPALIVE_PROBES: u32 = 3;

/// Has the kernel give a stream's connection up when its peer vanished
/// without a word (a phone that lost its network: no FIN, no RST): without
/// this the connection lives until `tcp_retries2` runs out, about 15
/// minutes, holding the stream's thread and slot.
///
/// - with a heartbeat `h`: `TCP_USER_TIMEOUT` = the write timeout `w`, so
///   a heartbeat (or an event) unacknowledged for `w` ends the
///   connection: free within about `h + w`. Keepalive only backs it up,
///   after `h + w` of silence, so its probes never race the heartbeats;
/// - without: keepalive probes after 15 s of silence, every `w / 3` (1 to
///   75 s), and a user timeout of 15 s + three probes' time, so that one
///   lost probe does not end a live stream (Linux ends the connection at
///   the first unanswered probe once the user timeout has passed since
///   the last acknowledgement): free within about 15 s + `w`.
///
/// The kernel then reports an error on the socket, which the acceptor's
/// poller hears (the registry watches every stream): the stream ends at
/// once, with [`EndReason::WriteTimeout`](crate::EndReason::WriteTimeout).
/// A client that keeps a zero window that long is ended the same way (it
/// does not read). Failures only leave the kernel's defaults.
fn detect_dead_peer(conn: &TcpStream, config: &crate::stream::StreamConfig) {
    use rustix::net::sockopt;
    let w = config.write_timeout.max(Duration::from_millis(1));
    let interval = (w / 3).clamp(Duration::from_secs(1), Duration::from_secs(75));
    let (idle, user_timeout) = match config.heartbeat {
        Some(h) => (h + w, w),
        None => (
            KEEPALIVE_IDLE,
            w.max(KEEPALIVE_IDLE + interval * KEEPALIVE_PROBES),
        ),
    };
    let ms = u32::try_from(user_timeout.as_millis()).unwrap_or(u32::MAX);
    let _ = sockopt::set_tcp_user_timeout(conn, ms);
    let idle = idle.clamp(Duration::from_secs(1), Duration::from_secs(7200));
    let _ = sockopt::set_tcp_keepidle(conn, idle);
    let _ = sockopt::set_tcp_keepintvl(conn, interval);
    let _ = sockopt::set_tcp_keepcnt(conn, KEEPALIVE_PROBES);
    let _ = sockopt::set_socket_keepalive(conn, true);
}
