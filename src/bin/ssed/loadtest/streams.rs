//! The streams: every subscriber connection, driven by one thread.
//!
//! The sockets are non-blocking and watched with epoll, so holding 19,000
//! streams costs 19,000 descriptors and a few hundred bytes each, never a
//! thread. A connection goes from connecting (the request being written),
//! to waiting for the response head, to held (its body fed to a
//! [`Body`] decoder); [`Counts`] keeps what happened to each. Over
//! `https://` a connection also carries its TLS session (`tls.rs`), driven
//! by the same readiness reports; its handshake is part of the connect,
//! within the same deadline.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::fd::OwnedFd;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use serde::{Deserialize, Serialize};

use super::args::Target;
use super::decode::{Body, BodyEnd, Tally, unix_ns};
use super::tls::{self, Got};

/// Time from starting a connect to a complete response head.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often connect and head deadlines are checked.
pub(super) const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Largest response head accepted.
pub(super) const MAX_HEAD: usize = 16 * 1024;
/// Reads from one stream per readiness report (level-triggered: the rest
/// is reported again).
const READS_PER_WAKE: usize = 8;

#[derive(Debug)]
enum Phase {
    /// Connect in progress, or the request partly written.
    Connecting { sent: u32 },
    /// Waiting for the response head.
    Head { buf: Vec<u8> },
    /// A held stream.
    Streaming(Box<Body>),
}

#[derive(Debug)]
struct Conn {
    sock: TcpStream,
    started: Instant,
    phase: Phase,
    /// The TLS session of an `https://` stream; none in plain text.
    tls: Option<Box<tls::Session>>,
    /// Which of the requests it sends (one per `--url`).
    request: usize,
}

/// How a response head was classified.
enum Answer {
    Held { chunked: bool },
    Refused,
    Other(u16),
}

/// Counts of what happened to the streams; a worker process sends its own
/// as JSON.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct Counts {
    pub(super) attempted: u64,
    /// Open streams that answered 200.
    pub(super) held: u64,
    pub(super) peak_held: u64,
    /// Every 200 seen.
    pub(super) accepted: u64,
    pub(super) refused: u64,
    pub(super) other: u64,
    pub(super) other_statuses: BTreeMap<u16, u64>,
    pub(super) failed: u64,
    pub(super) failures: BTreeMap<String, u64>,
    /// Failures that were this client's own (out of descriptors, source
    /// ports or addresses), also counted in `failed`.
    pub(super) client_failed: u64,
    /// Handshakes that ended on a TLS error (a certificate not trusted, no
    /// protocol in common): this client's configuration, not the server's
    /// load; also counted in `failed`.
    #[serde(default)]
    pub(super) tls_rejected: u64,
    pub(super) dropped: u64,
    pub(super) malformed: u64,
}

impl Counts {
    /// Adds another process's counts. Peaks add up too: the sum of the
    /// processes' peaks, an upper bound of the peak they held together.
    pub(super) fn add(&mut self, o: &Counts) {
        self.attempted += o.attempted;
        self.held += o.held;
        self.peak_held += o.peak_held;
        self.accepted += o.accepted;
        self.refused += o.refused;
        self.other += o.other;
        for (status, n) in &o.other_statuses {
            *self.other_statuses.entry(*status).or_default() += n;
        }
        self.failed += o.failed;
        for (reason, n) in &o.failures {
            *self.failures.entry(reason.clone()).or_default() += n;
        }
        self.client_failed += o.client_failed;
        self.tls_rejected += o.tls_rejected;
        self.dropped += o.dropped;
        self.malformed += o.malformed;
    }
}

/// Every stream of the run, watched by one epoll instance.
pub(super) struct Streams {
    epoll: OwnedFd,
    addr: SocketAddr,
    /// Local addresses to bind before connecting, round-robin.
    sources: Vec<IpAddr>,
    next_source: usize,
    /// The request of each `--url` (the same server, other paths); the
    /// streams take them in turn.
    requests: Vec<Vec<u8>>,
    /// For an `https://` target.
    tls: Option<tls::Client>,
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Slots closed during the current batch of readiness reports, freed
    /// after it so a stale report never reaches a new connection.
    closed: Vec<usize>,
    /// Connecting or waiting for a head.
    pub(super) in_flight: u64,
    pub(super) counts: Counts,
    pub(super) tally: Tally,
}

impl Streams {
    pub(super) fn new(
        target: &Target,
        paths: &[String],
        token: Option<&str>,
        sources: &[IpAddr],
    ) -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let request = |path: &str| {
            let mut request = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: ssed-loadtest/{}\r\n",
                target.host,
                env!("CARGO_PKG_VERSION")
            );
            if let Some(t) = token {
                request.push_str(&format!("Authorization: Bearer {t}\r\n"));
            }
            request.push_str("\r\n");
            request.into_bytes()
        };
        let mut requests = vec![request(&target.path)];
        requests.extend(paths.iter().map(|p| request(p)));
        Ok(Streams {
            epoll,
            addr: target.addr,
            sources: sources.to_vec(),
            next_source: 0,
            requests,
            tls: target.tls.clone(),
            slots: Vec::new(),
            free: Vec::new(),
            closed: Vec::new(),
            in_flight: 0,
            counts: Counts::default(),
            tally: Tally::new(),
        })
    }

    fn fail(&mut self, reason: impl Into<String>) {
        self.counts.failed += 1;
        *self.counts.failures.entry(reason.into()).or_default() += 1;
    }

    /// A failure on this side: no descriptor, source port or address.
    fn client_fail(&mut self, reason: String) {
        self.counts.client_failed += 1;
        self.fail(format!("client: {reason}"));
    }

    /// Starts one non-blocking connect.
    pub(super) fn open(&mut self) {
        self.counts.attempted += 1;
        let family = if self.addr.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = match rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        ) {
            Ok(fd) => fd,
            Err(e) => return self.client_fail(format!("socket: {}", io::Error::from(e))),
        };
        if !self.sources.is_empty() {
            let from = self.sources[self.next_source % self.sources.len()];
            self.next_source = self.next_source.wrapping_add(1);
            if let Err(e) = rustix::net::bind(&fd, &SocketAddr::new(from, 0)) {
                return self.client_fail(format!("bind {from}: {}", io::Error::from(e)));
            }
        }
        match rustix::net::connect(&fd, &self.addr) {
            Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
            // No local port or address left for this destination.
            Err(e @ (rustix::io::Errno::ADDRNOTAVAIL | rustix::io::Errno::ADDRINUSE)) => {
                return self.client_fail(format!("connect: {}", io::Error::from(e)));
            }
            Err(e) => return self.fail(format!("connect: {}", io::Error::from(e))),
        }
        let sock = TcpStream::from(fd);
        let which = (self.counts.attempted as usize).wrapping_sub(1) % self.requests.len();
        let session = match &self.tls {
            None => None,
            Some(client) => {
                match client
                    .connection()
                    .map_err(io::Error::other)
                    .and_then(|c| tls::Session::new(c, &self.requests[which]))
                {
                    Ok(s) => Some(Box::new(s)),
                    Err(e) => return self.fail(format!("TLS: {e}")),
                }
            }
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
            &sock,
            epoll::EventData::new_u64(idx as u64),
            epoll::EventFlags::OUT,
        ) {
            self.free.push(idx);
            return self.fail(format!("epoll: {}", io::Error::from(e)));
        }
        self.slots[idx] = Some(Conn {
            sock,
            started: Instant::now(),
            phase: Phase::Connecting { sent: 0 },
            tls: session,
            request: which,
        });
        self.in_flight += 1;
    }

    /// Closes slot `idx`; its descriptor leaves the poller as it closes.
    fn close(&mut self, idx: usize) -> Option<Conn> {
        let conn = self.slots.get_mut(idx)?.take()?;
        if !matches!(conn.phase, Phase::Streaming(_)) {
            self.in_flight -= 1;
        }
        self.closed.push(idx);
        Some(conn)
    }

    fn release_closed(&mut self) {
        self.free.append(&mut self.closed);
    }

    fn on_ready(&mut self, idx: usize, scratch: &mut [u8]) {
        let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        match conn.phase {
            Phase::Connecting { .. } if conn.tls.is_some() => self.on_tls_connected(idx),
            Phase::Connecting { sent } => self.on_writable(idx, sent),
            Phase::Head { .. } | Phase::Streaming(_) if conn.tls.is_some() => {
                self.on_tls_ready(idx, scratch)
            }
            Phase::Head { .. } | Phase::Streaming(_) => self.on_readable(idx, scratch),
        }
    }

    /// Whether stream `idx`'s connect failed (or it is gone): then it is
    /// closed and counted as failed.
    fn connect_failed(&mut self, idx: usize) -> bool {
        let Some(conn) = self.slots.get(idx).and_then(Option::as_ref) else {
            return true;
        };
        match conn.sock.take_error() {
            Ok(None) => false,
            Ok(Some(e)) | Err(e) => {
                self.close(idx);
                self.fail(format!("connect: {e}"));
                true
            }
        }
    }

    fn on_writable(&mut self, idx: usize, mut sent: u32) {
        if self.connect_failed(idx) {
            return;
        }
        let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        let request = &self.requests[conn.request];
        while (sent as usize) < request.len() {
            match (&conn.sock).write(&request[sent as usize..]) {
                Ok(n) => sent += n as u32,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.phase = Phase::Connecting { sent };
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(idx);
                    return self.fail(format!("send request: {e}"));
                }
            }
        }
        conn.phase = Phase::Head { buf: Vec::new() };
        if let Err(e) = epoll::modify(
            &self.epoll,
            &conn.sock,
            epoll::EventData::new_u64(idx as u64),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        ) {
            self.close(idx);
            self.fail(format!("epoll: {}", io::Error::from(e)));
        }
    }

    fn on_readable(&mut self, idx: usize, scratch: &mut [u8]) {
        for _ in 0..READS_PER_WAKE {
            let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
                return;
            };
            let n = match (&conn.sock).read(scratch) {
                Ok(0) => return self.on_closed(idx, None),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.on_closed(idx, Some(e)),
            };
            // A short read drained the socket: epoll is level-triggered and
            // reports it again when more arrives, so skip the read that
            // would only say EAGAIN (half the client's syscalls per event).
            let drained = n < scratch.len();
            if !self.deliver(idx, &scratch[..n]) || drained {
                return;
            }
        }
    }

    /// Takes `data` from stream `idx`'s response; returns whether the
    /// stream is still open and wants more.
    fn deliver(&mut self, idx: usize, data: &[u8]) -> bool {
        let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return false;
        };
        match &mut conn.phase {
            Phase::Streaming(body) => {
                self.tally.now_ns = unix_ns();
                if let Err(end) = body.feed(data, &mut self.tally) {
                    if end == BodyEnd::Malformed {
                        self.counts.malformed += 1;
                    }
                    self.on_closed(idx, None);
                    return false;
                }
                true
            }
            Phase::Head { buf } => {
                buf.extend_from_slice(data);
                self.on_head(idx)
            }
            Phase::Connecting { .. } => false,
        }
    }

    /// An `https://` stream's TCP connect finished (or failed): the
    /// handshake starts, the request queued behind it.
    fn on_tls_connected(&mut self, idx: usize) {
        if self.connect_failed(idx) {
            return;
        }
        let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        conn.phase = Phase::Head { buf: Vec::new() };
        self.tls_flush(idx, true);
    }

    /// Sends what stream `idx`'s TLS session has queued and watches the
    /// socket for writing only while some waits (`force`: set the interest
    /// even if unchanged); returns whether the stream is still open.
    fn tls_flush(&mut self, idx: usize, force: bool) -> bool {
        let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return false;
        };
        let Some(session) = conn.tls.as_mut() else {
            return true;
        };
        let want_out = match session.flush(&conn.sock) {
            Ok(w) => w,
            Err(e) => {
                self.on_closed(idx, Some(e));
                return false;
            }
        };
        if !force && want_out == session.want_out {
            return true;
        }
        session.want_out = want_out;
        let mut flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        if want_out {
            flags |= epoll::EventFlags::OUT;
        }
        if let Err(e) = epoll::modify(
            &self.epoll,
            &conn.sock,
            epoll::EventData::new_u64(idx as u64),
            flags,
        ) {
            self.close(idx);
            self.fail(format!("epoll: {}", io::Error::from(e)));
            return false;
        }
        true
    }

    /// Readiness of an `https://` stream past its connect: records in,
    /// their plain text to the response, and any records out (the
    /// handshake's, the request). At most [`READS_PER_WAKE`] reads of the
    /// socket, but everything rustls decrypted is taken before returning:
    /// epoll reports again only what the socket still holds.
    fn on_tls_ready(&mut self, idx: usize, scratch: &mut [u8]) {
        if !self.tls_flush(idx, false) {
            return;
        }
        let mut reads = 0;
        loop {
            let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
                return;
            };
            let Some(session) = conn.tls.as_mut() else {
                return;
            };
            let got = if reads < READS_PER_WAKE {
                reads += 1;
                session.read(&conn.sock, scratch)
            } else {
                session.buffered(scratch)
            };
            match got {
                Ok(Got::Data(n)) => {
                    // Not `deliver`'s answer: a partial head is no reason
                    // to leave what rustls holds behind.
                    self.deliver(idx, &scratch[..n]);
                    if self.slots.get(idx).is_none_or(Option::is_none) {
                        return;
                    }
                }
                Ok(Got::Idle) => break,
                Ok(Got::Closed) => return self.on_closed(idx, None),
                Err(e) => return self.on_closed(idx, Some(e)),
            }
        }
        // The handshake's answers and the request go out as soon as they can.
        self.tls_flush(idx, false);
    }

    /// Parses the head received so far; returns true while the stream is
    /// still open and streaming.
    fn on_head(&mut self, idx: usize) -> bool {
        let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return false;
        };
        let Phase::Head { buf } = &mut conn.phase else {
            return false;
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let (answer, len) = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => (classify(&response), len),
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return false,
            Ok(httparse::Status::Partial) => {
                self.close(idx);
                self.fail("response head too large");
                return false;
            }
            Err(e) => {
                self.close(idx);
                self.fail(format!("bad response head: {e}"));
                return false;
            }
        };
        match answer {
            Answer::Held { chunked } => {
                let rest = buf.split_off(len);
                let mut body = Box::new(Body::new(chunked));
                self.in_flight -= 1;
                self.counts.accepted += 1;
                self.counts.held += 1;
                self.counts.peak_held = self.counts.peak_held.max(self.counts.held);
                self.tally.now_ns = unix_ns();
                let fed = body.feed(&rest, &mut self.tally);
                conn.phase = Phase::Streaming(body);
                match fed {
                    Ok(()) => true,
                    Err(end) => {
                        if end == BodyEnd::Malformed {
                            self.counts.malformed += 1;
                        }
                        self.on_closed(idx, None);
                        false
                    }
                }
            }
            Answer::Refused => {
                self.close(idx);
                self.counts.refused += 1;
                false
            }
            Answer::Other(status) => {
                self.close(idx);
                self.counts.other += 1;
                *self.counts.other_statuses.entry(status).or_default() += 1;
                false
            }
        }
    }

    /// The server closed `idx` (or the connection failed).
    fn on_closed(&mut self, idx: usize, error: Option<io::Error>) {
        let Some(conn) = self.close(idx) else { return };
        match conn.phase {
            Phase::Streaming(_) => {
                self.counts.held -= 1;
                self.counts.dropped += 1;
            }
            Phase::Head { .. } | Phase::Connecting { .. } => {
                let handshake = conn.tls.as_ref().is_some_and(|t| t.handshaking());
                if handshake && error.as_ref().is_some_and(tls::is_tls_error) {
                    self.counts.tls_rejected += 1;
                }
                match (error, handshake) {
                    (Some(e), true) => self.fail(format!("TLS handshake: {e}")),
                    (Some(e), false) => self.fail(format!("before a response: {e}")),
                    (None, true) => self.fail("closed during the TLS handshake"),
                    (None, false) => self.fail("closed before a response"),
                }
            }
        }
    }

    /// Closes up to `n` held streams (the newest first); returns how many.
    pub(super) fn close_held(&mut self, n: u64) -> u64 {
        let mut closed = 0;
        for idx in (0..self.slots.len()).rev() {
            if closed == n {
                break;
            }
            let streaming = self.slots[idx]
                .as_ref()
                .is_some_and(|c| matches!(c.phase, Phase::Streaming(_)));
            if streaming && self.close(idx).is_some() {
                self.counts.held -= 1;
                closed += 1;
            }
        }
        self.release_closed();
        closed
    }

    /// Fails connections whose connect or head took too long.
    pub(super) fn sweep(&mut self, now: Instant) {
        if self.in_flight == 0 {
            return;
        }
        let late: Vec<(usize, &'static str)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                let waiting = !matches!(c.phase, Phase::Streaming(_));
                if !waiting || now.duration_since(c.started) < CONNECT_TIMEOUT {
                    return None;
                }
                Some(match (&c.phase, &c.tls) {
                    (Phase::Connecting { .. }, _) => (i, "connect timed out"),
                    (_, Some(t)) if t.handshaking() => (i, "TLS handshake timed out"),
                    _ => (i, "response head timed out"),
                })
            })
            .collect();
        for (idx, why) in late {
            self.close(idx);
            self.fail(why);
        }
        self.release_closed();
    }

    /// Waits up to `timeout` for readiness and handles it.
    pub(super) fn turn(
        &mut self,
        events: &mut Vec<epoll::Event>,
        scratch: &mut [u8],
        timeout: Duration,
    ) -> io::Result<()> {
        events.clear();
        let timeout = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(events),
            Some(&timeout),
        ) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            self.on_ready(ev.data.u64() as usize, scratch);
        }
        self.release_closed();
        Ok(())
    }
}

/// The first header `name` of a parsed response, as text.
pub(super) fn header_value(response: &httparse::Response<'_, '_>, name: &str) -> Option<String> {
    response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
}

fn classify(response: &httparse::Response<'_, '_>) -> Answer {
    let status = response.code.unwrap_or(0);
    let header = |name: &str| header_value(response, name).map(|v| v.to_ascii_lowercase());
    let event_stream = header("content-type").is_some_and(|t| t.starts_with("text/event-stream"));
    match status {
        // A sized event stream is ssed's `overload = "retry"` answer past
        // the cap: a `retry:` and a close, never a stream.
        200 if event_stream && header("content-length").is_some() => Answer::Refused,
        200 if event_stream => Answer::Held {
            chunked: header("transfer-encoding").is_some_and(|t| t.contains("chunked")),
        },
        503 => Answer::Refused,
        s => Answer::Other(s),
    }
}
