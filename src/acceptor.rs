//! The accept loop: the one thread that owns every connection until its
//! request head is complete. This is ssed's main loop.
//!
//! New connections are non-blocking and watched with epoll, so a thousand
//! idle or trickling clients cost a descriptor and a few bytes each, never a
//! thread. When a head is complete the acceptor routes it and either answers
//! at once (`400`, `404`, `405`, `406`, `413`, `431`, `503`: no thread spent)
//! or spawns the connection's one thread. Every head must arrive within
//! `request_timeout` of the connection's first moment (a deadline, not a
//! per-read timeout). Keep-alive connections come back here between
//! requests, so an idle keep-alive connection holds no thread either.
//!
//! Errors of `accept` (descriptor exhaustion above all) never end the loop:
//! they are counted, logged at most once a second, and retried after a short
//! backoff, during which the oldest waiting connection may be cut to free a
//! descriptor.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rustix::event::epoll;
use rustix::fd::{AsFd, OwnedFd};

use crate::conn::{self, Job};
use crate::http::head::{self, BodyKind, Parse};
use crate::http::{Request, Response};
use crate::route::{Handler, Match};
use crate::server::{Overload, Shared};

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

/// A connection handed back after a keep-alive response.
#[derive(Debug)]
pub(crate) struct Returned {
    pub conn: TcpStream,
    pub peer: SocketAddr,
    pub leftover: Vec<u8>,
}

struct Pending {
    conn: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    deadline: Instant,
    /// When the first byte of this request arrived (or the connection was
    /// accepted); the body deadline counts from it.
    started: Instant,
    state: PendingState,
    /// Bytes thrown away while lingering.
    drained: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PendingState {
    /// Waiting for (the rest of) a head.
    Head,
    /// A keep-alive connection between requests.
    Idle,
    /// Answered with an error; draining until the client closes.
    Linger,
}

pub(crate) struct Acceptor {
    shared: Arc<Shared>,
    listener: TcpListener,
    epoll: OwnedFd,
    returned: Receiver<Returned>,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    live: usize,
    listening: bool,
    backoff: Duration,
    resume_at: Option<Instant>,
    last_error_log: Option<Instant>,
    suppressed_errors: u64,
    rng: u64,
}

impl Acceptor {
    pub(crate) fn new(
        shared: Arc<Shared>,
        listener: TcpListener,
        epoll: OwnedFd,
        returned: Receiver<Returned>,
    ) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64);
        Acceptor {
            shared,
            listener,
            epoll,
            returned,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            listening: true,
            backoff: BACKOFF_MIN,
            resume_at: None,
            last_error_log: None,
            suppressed_errors: 0,
            rng: seed | 1,
        }
    }

    /// Runs until shutdown.
    pub(crate) fn run(mut self) -> io::Result<()> {
        epoll::add(
            &self.epoll,
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
                &self.epoll,
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
                    idx => self.on_readable(idx as usize),
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
                    self.backoff = BACKOFF_MIN;
                    self.admit(conn, peer, Vec::new(), PendingState::Head);
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
                "accept failed: {e}{also}; retrying in {:?} with {} connections waiting for their head",
                self.backoff,
                self.live
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
        if self.listening && epoll::delete(&self.epoll, &self.listener).is_ok() {
            self.listening = false;
        }
        self.resume_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        false
    }

    fn resume_listening(&mut self) {
        if self.listening {
            return;
        }
        match epoll::add(
            &self.epoll,
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

    /// Takes a connection in: registers it with the poller (cutting the
    /// oldest waiting one when the table is full) and reads what it has.
    fn admit(&mut self, conn: TcpStream, peer: SocketAddr, buf: Vec<u8>, state: PendingState) {
        if self.live >= self.shared.config.max_pending {
            self.evict_oldest();
        }
        if conn.set_nonblocking(true).is_err() {
            return;
        }
        // Frames are small and latency matters more than packet count.
        let _ = conn.set_nodelay(true); // an optimisation only
        let now = Instant::now();
        let timeout = match state {
            PendingState::Idle if buf.is_empty() => self.shared.config.keep_alive_timeout,
            _ => self.shared.config.request_timeout,
        };
        let state = if buf.is_empty() {
            state
        } else {
            PendingState::Head
        };
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        if let Err(e) = epoll::add(
            &self.epoll,
            &conn,
            epoll::EventData::new_u64(idx as u64),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        ) {
            log::warn!("cannot watch a connection from {peer}: {e}");
            self.free.push(idx);
            return;
        }
        self.slots[idx] = Some(Pending {
            conn,
            peer,
            buf,
            deadline: now + timeout,
            started: now,
            state,
            drained: 0,
        });
        self.live += 1;
        self.publish_pending();
        // A returned keep-alive connection may already hold the next head.
        if self.slots[idx].as_ref().is_some_and(|p| !p.buf.is_empty()) {
            self.try_head(idx);
        }
    }

    fn remove(&mut self, idx: usize) -> Option<Pending> {
        let p = self.slots.get_mut(idx)?.take()?;
        let _ = epoll::delete(&self.epoll, &p.conn); // closing removes it anyway
        self.free.push(idx);
        self.live -= 1;
        self.publish_pending();
        Some(p)
    }

    fn publish_pending(&self) {
        self.shared
            .stats
            .counters()
            .pending
            .store(self.live as u64, Relaxed);
    }

    /// Cuts the waiting connection nearest its deadline (a lingering or
    /// idle keep-alive one before a head in progress); false if none.
    fn evict_oldest(&mut self) -> bool {
        let oldest = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p.deadline)))
            .min_by_key(|&(_, d)| d)
            .map(|(i, _)| i);
        match oldest.and_then(|idx| self.remove(idx)) {
            Some(p) => {
                log::debug!("cut waiting connection from {} to make room", p.peer);
                true
            }
            None => false,
        }
    }

    // ----- reading heads -----------------------------------------------------

    fn on_readable(&mut self, idx: usize) {
        let mut scratch = [0u8; 4096];
        loop {
            let Some(p) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
                return;
            };
            match (&p.conn).read(&mut scratch) {
                Ok(0) => {
                    self.remove(idx);
                    return;
                }
                Ok(n) => {
                    if p.state == PendingState::Linger {
                        p.drained += n;
                        if p.drained > LINGER_BYTES {
                            self.remove(idx);
                            return;
                        }
                        continue;
                    }
                    if p.state == PendingState::Idle {
                        p.state = PendingState::Head;
                        p.started = Instant::now();
                        p.deadline = p.started + self.shared.config.request_timeout;
                    }
                    p.buf.extend_from_slice(&scratch[..n]);
                    if !self.try_head(idx) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.remove(idx);
                    return;
                }
            }
        }
    }

    /// Parses what `idx` has received. Returns true while the connection
    /// stays here waiting for more bytes.
    fn try_head(&mut self, idx: usize) -> bool {
        let Some(p) = self.slots.get(idx).and_then(Option::as_ref) else {
            return false;
        };
        match head::parse(&p.buf) {
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
                let Some(mut p) = self.remove(idx) else {
                    return false;
                };
                let leftover = p.buf.split_off(len);
                let minor = head.minor;
                let req = Request::from_head(head, p.peer, p.started);
                self.dispatch(p, req, leftover, minor);
                false
            }
        }
    }

    // ----- routing -------------------------------------------------------------

    fn dispatch(&mut self, p: Pending, mut req: Request, leftover: Vec<u8>, minor: u8) {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        let counters = shared.stats.counters();
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
                self.spawn(p, Job::Stream { req, handler }, minor);
            }
            Match::Handler(Handler::Plain(handler), params, head_only) => {
                if let BodyKind::Length(n) = req.body_kind
                    && n > config.max_body as u64
                {
                    counters.bad_requests.fetch_add(1, Relaxed);
                    let msg = format!("request body too large (limit: {} bytes)", config.max_body);
                    self.answer_conn(p, minor, Response::text(413, msg));
                    return;
                }
                let active = counters.requests_active.load(Relaxed);
                if active >= config.max_requests as u64 {
                    counters.rejected_total.fetch_add(1, Relaxed);
                    let r = Response::text(503, "too many requests in progress")
                        .with_header("Retry-After", "1");
                    self.answer_conn(p, minor, r);
                    return;
                }
                req.set_params(params);
                counters.requests_active.fetch_add(1, Relaxed);
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
        }
    }

    fn overload(&mut self, p: Pending, req: &Request, minor: u8, open: u64) {
        let wants_stream = req.is_event_source();
        match self.shared.config.overload {
            Overload::Retry { min, max } if wants_stream => {
                let retry = self.jitter(min, max);
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

    fn jitter(&mut self, min: Duration, max: Duration) -> Duration {
        // xorshift64: enough to spread reconnects, no dependency needed.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let span = max.saturating_sub(min).as_millis() as u64;
        if span == 0 {
            return min;
        }
        min + Duration::from_millis(self.rng % (span + 1))
    }

    fn spawn(&mut self, p: Pending, job: Job, minor: u8) {
        let Pending { conn, peer, .. } = p;
        if conn.set_nonblocking(false).is_err() {
            job.abandon(&self.shared);
            return;
        }
        let is_stream = matches!(job, Job::Stream { .. });
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
                let p = Pending {
                    conn,
                    peer,
                    buf: Vec::new(),
                    deadline: Instant::now(),
                    started: Instant::now(),
                    state: PendingState::Head,
                    drained: 0,
                };
                self.answer_conn(p, minor, r);
            }
        }
    }

    // ----- answering without a thread --------------------------------------------

    fn answer(&mut self, idx: usize, minor: u8, r: Response) {
        if let Some(p) = self.remove(idx) {
            self.answer_conn(p, minor, r);
        }
    }

    /// Writes a short answer without blocking, half-closes, and keeps
    /// draining the connection for a moment so the client reads the answer
    /// rather than a reset.
    fn answer_conn(&mut self, p: Pending, minor: u8, r: Response) {
        let bytes = r.encode(minor, false, true);
        if p.conn.set_nonblocking(true).is_err() {
            return;
        }
        // A fresh socket's send buffer holds a short answer; if it does not,
        // the client is not reading and gets nothing.
        if (&p.conn).write_all(&bytes).is_err() {
            return;
        }
        let _ = p.conn.shutdown(Shutdown::Write); // the peer may be gone already
        let mut p = p;
        p.state = PendingState::Linger;
        p.buf = Vec::new();
        let deadline = Instant::now() + LINGER;
        self.admit_linger(p, deadline);
    }

    fn admit_linger(&mut self, mut p: Pending, deadline: Instant) {
        if self.live >= self.shared.config.max_pending {
            return; // no room: close now
        }
        p.deadline = deadline;
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        if epoll::add(
            &self.epoll,
            &p.conn,
            epoll::EventData::new_u64(idx as u64),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        )
        .is_err()
        {
            self.free.push(idx);
            return;
        }
        self.slots[idx] = Some(p);
        self.live += 1;
        self.publish_pending();
    }

    // ----- timers and wake-ups -------------------------------------------------------

    fn sweep(&mut self, now: Instant) {
        let expired: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().filter(|p| now >= p.deadline).map(|_| i))
            .collect();
        for idx in expired {
            let Some(p) = self.remove(idx) else { continue };
            match p.state {
                PendingState::Head if !p.buf.is_empty() => {
                    self.shared
                        .stats
                        .counters()
                        .head_timeouts
                        .fetch_add(1, Relaxed);
                    log::debug!("request head from {} not complete in time", p.peer);
                    let r = Response::text(408, "request head not received in time");
                    self.answer_conn(p, 1, r);
                }
                PendingState::Head => {
                    self.shared
                        .stats
                        .counters()
                        .head_timeouts
                        .fetch_add(1, Relaxed);
                    log::debug!("connection from {} sent nothing in time", p.peer);
                }
                PendingState::Idle | PendingState::Linger => {}
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
            self.admit(r.conn, r.peer, r.leftover, PendingState::Idle);
        }
    }

    fn close_all(&mut self) {
        for idx in 0..self.slots.len() {
            self.remove(idx);
        }
        let _ = epoll::delete(&self.epoll, &self.listener); // dropped next anyway
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
