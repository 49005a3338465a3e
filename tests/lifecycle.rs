//! Limits and the life of a stream, over real sockets: the stream cap and
//! the overload answers, the execution-time budget, heartbeats,
//! disconnect detection, the write timeout, the request deadline, graceful
//! shutdown, handler panics, and the `forward`/`poll` helpers.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use ssed::{EndReason, Event, Overload, Response, Stats, StreamError};
use support::{Client, Head, connect, start, wait_until};

/// The longest any test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Local helpers: a raw stream reader that tells a clean end from a cut
// ---------------------------------------------------------------------------

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One step of a chunked event stream, as read off the wire.
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// A chunk's payload (one frame).
    Data(String),
    /// The terminating chunk `0\r\n\r\n`: a clean end.
    Last,
    /// The connection closed between chunks (no terminating chunk).
    Eof,
}

/// A raw HTTP client that keeps every byte and decodes chunks strictly.
struct Raw {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn new(addr: SocketAddr) -> Raw {
        Raw {
            conn: connect(addr),
            buf: Vec::new(),
        }
    }

    /// Connects, asks for an event stream at `path` and reads the head.
    fn stream(addr: SocketAddr, path: &str) -> (Raw, Head) {
        let mut raw = Raw::new(addr);
        raw.send(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
                .as_bytes(),
        );
        let head = raw.head();
        (raw, head)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.conn.write_all(bytes).expect("send request");
    }

    /// Reads once; 0 at EOF. Every read is bounded by the socket's timeout.
    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        loop {
            match self.conn.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!(
                    "read failed: {e}; buffered {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    fn head(&mut self) -> Head {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 4).collect();
                return parse_head(&raw[..end]);
            }
            assert!(Instant::now() < deadline, "no head within {DEADLINE:?}");
            assert!(
                self.fill() > 0,
                "EOF before a response head; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// The next chunk of a chunked body.
    fn chunk(&mut self) -> Chunk {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(line_end) = find(&self.buf, b"\r\n") {
                let text = std::str::from_utf8(&self.buf[..line_end]).expect("chunk size is ASCII");
                let size = usize::from_str_radix(text, 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {text:?}"));
                let total = line_end + 2 + size + 2;
                if self.buf.len() >= total {
                    assert_eq!(
                        &self.buf[total - 2..total],
                        b"\r\n",
                        "CRLF after chunk data"
                    );
                    let data: Vec<u8> = self.buf[line_end + 2..total - 2].to_vec();
                    self.buf.drain(..total);
                    if size == 0 {
                        return Chunk::Last;
                    }
                    return Chunk::Data(String::from_utf8(data).expect("chunk is UTF-8"));
                }
            }
            assert!(Instant::now() < deadline, "no chunk within {DEADLINE:?}");
            if self.fill() == 0 {
                assert!(
                    self.buf.is_empty(),
                    "connection closed inside a chunk: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return Chunk::Eof;
            }
        }
    }

    /// Chunks up to and including the end (`Last` or `Eof`), at most `limit`.
    fn chunks_to_end(&mut self, limit: usize) -> Vec<Chunk> {
        let mut out = Vec::new();
        for _ in 0..limit {
            let c = self.chunk();
            let end = !matches!(c, Chunk::Data(_));
            out.push(c);
            if end {
                return out;
            }
        }
        panic!("stream did not end within {limit} chunks: {out:?}")
    }

    /// Everything until the server closes the connection.
    fn rest(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + DEADLINE;
        while self.fill() > 0 {
            assert!(
                Instant::now() < deadline,
                "connection not closed within {DEADLINE:?}"
            );
        }
        std::mem::take(&mut self.buf)
    }

    /// After a chunk was read: the connection closes right away, nothing
    /// more (in particular no terminating chunk).
    fn assert_cut(&mut self) {
        let rest = self.rest();
        assert!(
            rest.is_empty(),
            "expected a cut, got {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

fn parse_head(raw: &[u8]) -> Head {
    let text = std::str::from_utf8(raw).expect("head is UTF-8");
    let mut lines = text.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().expect("version").to_owned();
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .map(|l| {
            l.split_once(':')
                .unwrap_or_else(|| panic!("bad header line {l:?}"))
        })
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Head {
        version,
        status,
        headers,
    }
}

/// Sends `raw` on a fresh connection; returns the head and body of the
/// answer, read to EOF.
fn exchange(addr: SocketAddr, raw: &[u8]) -> (Head, String) {
    let mut c = Raw::new(addr);
    c.send(raw);
    let head = c.head();
    let body = String::from_utf8(c.rest()).expect("UTF-8 body");
    (head, body)
}

/// Asserts a plain-text error answer with a body.
fn assert_plain_error(head: &Head, body: &str, status: u16) {
    assert_eq!(head.status, status, "{head:?} {body:?}");
    let ct = head.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "content type {ct:?}");
    assert!(!body.trim().is_empty(), "error answer explains itself");
}

/// Ships a value out of a handler to the test.
fn report<T>(tx: &Sender<T>, value: T) {
    tx.send(value).expect("test is listening");
}

// ---------------------------------------------------------------------------
// The cap
// ---------------------------------------------------------------------------

#[test]
fn past_the_cap_streams_get_503_until_one_closes() {
    let stats = Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_connections(2)
            .retry_after(Duration::from_secs(3))
            .heartbeat(Duration::from_millis(50))
            .route("/s", |_req, stream| {
                stream.open()?;
                // Heartbeats inside the sleep find a client that left.
                stream.sleep(Duration::from_secs(30))
            }),
    );
    let addr = server.local_addr();
    let (c1, h1) = Raw::stream(addr, "/s");
    let (mut c2, h2) = Raw::stream(addr, "/s");
    assert_eq!((h1.status, h2.status), (200, 200));
    assert_eq!(stats.snapshot().streams_open, 2);

    let (head, body) = exchange(
        addr,
        b"GET /s HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
    );
    assert_plain_error(&head, &body, 503);
    assert_eq!(head.header("retry-after"), Some("3"));
    let snap = stats.snapshot();
    assert_eq!(
        (snap.rejected_total, snap.streams_open, snap.streams_total),
        (1, 2, 2)
    );

    drop(c1);
    assert!(
        wait_until(DEADLINE, || stats.snapshot().streams_open == 1),
        "a closed client frees its slot: {:?}",
        stats.snapshot()
    );
    let (mut c3, h3) = Raw::stream(addr, "/s");
    assert_eq!(h3.status, 200, "a slot is free again");
    assert_eq!(c3.chunk(), Chunk::Data(": keep-alive\n\n".into()));
    assert!(wait_until(DEADLINE, || stats
        .snapshot()
        .disconnects(EndReason::Client)
        == 1));
    assert_eq!(
        c2.chunk(),
        Chunk::Data(": keep-alive\n\n".into()),
        "others unaffected"
    );
    server.stop().expect("clean stop");
}

#[test]
fn overload_retry_gives_event_stream_clients_a_jittered_retry() {
    let stats = Stats::new();
    let (min, max) = (Duration::from_secs(2), Duration::from_secs(4));
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_connections(1)
            .overload(Overload::Retry { min, max })
            .route("/s", |_req, stream| {
                stream.open()?;
                stream.sleep(Duration::from_secs(30))
            }),
    );
    let addr = server.local_addr();
    let (_held, h) = Raw::stream(addr, "/s");
    assert_eq!(h.status, 200);

    for _ in 0..5 {
        let (head, body) = exchange(
            addr,
            b"GET /s HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
        );
        assert_eq!(head.status, 200, "{body:?}");
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        let retry: Vec<u128> = body
            .lines()
            .filter_map(|l| l.strip_prefix("retry: "))
            .map(|v| v.parse().expect("retry is digits"))
            .collect();
        assert_eq!(retry.len(), 1, "one retry line in {body:?}");
        assert!(
            (min.as_millis()..=max.as_millis()).contains(&retry[0]),
            "retry {} within [{min:?}, {max:?}]",
            retry[0]
        );
        assert!(body.ends_with("\n\n"), "the frame is complete: {body:?}");
    }
    // Not an EventSource: the plain 503.
    let (head, body) = exchange(addr, b"GET /s HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_plain_error(&head, &body, 503);
    assert!(head.header("retry-after").is_some());
    assert_eq!(stats.snapshot().rejected_total, 6);
    assert_eq!(stats.snapshot().streams_open, 1);
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// The execution-time budget
// ---------------------------------------------------------------------------

#[test]
fn budget_ends_a_silent_stream() {
    let stats = Stats::new();
    let (tx, rx) = crossbeam_channel::unbounded();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_execution_time(Duration::from_millis(300))
            .route("/silent", move |_req, stream| {
                stream.open()?;
                let r = stream.sleep(Duration::from_secs(10));
                report(&tx, r.as_ref().err().and_then(StreamError::end_reason));
                r
            }),
    );
    let started = Instant::now();
    let (mut c, head) = Raw::stream(server.local_addr(), "/silent");
    assert_eq!(head.status, 200);
    assert_eq!(
        c.chunk(),
        Chunk::Eof,
        "a budget end is a cut, not a clean end"
    );
    let elapsed = started.elapsed();
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(2)).contains(&elapsed),
        "closed after {elapsed:?}"
    );
    assert_eq!(
        rx.recv_timeout(DEADLINE).expect("handler reported"),
        Some(EndReason::Budget)
    );
    assert!(wait_until(DEADLINE, || stats
        .snapshot()
        .disconnects(EndReason::Budget)
        == 1));
    assert!(wait_until(DEADLINE, || stats.snapshot().streams_open == 0));
    server.stop().expect("clean stop");
}

/// The brief's literal case: a handler that only sleeps, never opening.
/// The connection must close on the budget all the same.
#[test]
fn budget_ends_a_stream_that_never_opened() {
    let stats = Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_execution_time(Duration::from_millis(300))
            .route("/silent", |_req, stream| {
                stream.sleep(Duration::from_secs(10))
            }),
    );
    let started = Instant::now();
    let mut c = Raw::new(server.local_addr());
    c.send(b"GET /silent HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n");
    let answer = c.rest();
    let elapsed = started.elapsed();
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(2)).contains(&elapsed),
        "closed after {elapsed:?}"
    );
    assert!(wait_until(DEADLINE, || stats
        .snapshot()
        .disconnects(EndReason::Budget)
        == 1));
    // A client must be able to tell what happened: some HTTP answer, not an
    // empty reply (curl: "Empty reply from server").
    assert!(
        answer.starts_with(b"HTTP/1.1 "),
        "an HTTP answer before the close, got {:?}",
        String::from_utf8_lossy(&answer)
    );
    server.stop().expect("clean stop");
}

#[test]
fn each_send_restarts_the_budget() {
    let stats = Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_execution_time(Duration::from_millis(300))
            .route("/busy", |_req, stream| {
                for i in 0..10 {
                    stream.send("tick", &i)?;
                    stream.sleep(Duration::from_millis(100))?;
                }
                Ok(())
            }),
    );
    let started = Instant::now();
    let (mut c, head) = Raw::stream(server.local_addr(), "/busy");
    assert_eq!(head.status, 200);
    let chunks = c.chunks_to_end(20);
    let elapsed = started.elapsed();
    let want: Vec<Chunk> = (0..10)
        .map(|i| Chunk::Data(format!("event: tick\ndata: {i}\n\n")))
        .chain([Chunk::Last])
        .collect();
    assert_eq!(chunks, want);
    assert!(
        elapsed >= Duration::from_millis(900),
        "alive the whole second: {elapsed:?}"
    );
    assert_eq!(stats.snapshot().disconnects(EndReason::Budget), 0);
    server.stop().expect("clean stop");
}

#[test]
fn heartbeats_keep_a_sleeping_stream_past_the_budget() {
    let stats = Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_execution_time(Duration::from_millis(300))
            .heartbeat(Duration::from_millis(100))
            .route("/hb", |_req, stream| {
                stream.sleep(Duration::from_secs(1))?;
                stream.send("end", &1)
            }),
    );
    let started = Instant::now();
    let (mut c, head) = Raw::stream(server.local_addr(), "/hb");
    assert_eq!(head.status, 200);
    let chunks = c.chunks_to_end(40);
    let elapsed = started.elapsed();
    let (beats, last_two) = chunks.split_at(chunks.len() - 2);
    assert_eq!(
        last_two,
        [Chunk::Data("event: end\ndata: 1\n\n".into()), Chunk::Last]
    );
    assert!(
        beats
            .iter()
            .all(|c| *c == Chunk::Data(": keep-alive\n\n".into())),
        "only heartbeats before the end: {beats:?}"
    );
    assert!(
        beats.len() >= 5,
        "about ten heartbeats in a second, got {}",
        beats.len()
    );
    assert!(
        elapsed >= Duration::from_millis(950),
        "slept the whole second: {elapsed:?}"
    );
    assert_eq!(stats.snapshot().disconnects(EndReason::Budget), 0);
    server.stop().expect("clean stop");
}

#[test]
fn heartbeat_event_sends_ping_events() {
    let server = start(
        ssed::Server::builder()
            .heartbeat(Duration::from_millis(50))
            .heartbeat_event(true)
            .route("/hb", |_req, stream| {
                stream.sleep(Duration::from_millis(300))
            }),
    );
    let (mut c, head) = Raw::stream(server.local_addr(), "/hb");
    assert_eq!(head.status, 200);
    let chunks = c.chunks_to_end(40);
    assert_eq!(chunks.last(), Some(&Chunk::Last));
    let pings = &chunks[..chunks.len() - 1];
    assert!(pings.len() >= 2, "pings every 50 ms for 300 ms: {chunks:?}");
    for p in pings {
        let Chunk::Data(frame) = p else {
            panic!("{p:?}")
        };
        let data = frame
            .strip_prefix("event: ping\ndata: ")
            .and_then(|d| d.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("ping frame {frame:?}"));
        let v: serde_json::Value = serde_json::from_str(data).expect("JSON");
        assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    }
    server.stop().expect("clean stop");
}

#[test]
fn extend_time_keeps_a_stream_alive() {
    let stats = Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_execution_time(Duration::from_millis(300))
            .route("/ext", |_req, stream| {
                stream.open()?;
                // 600 ms without a send, twice the budget.
                for _ in 0..6 {
                    stream.sleep(Duration::from_millis(100))?;
                    stream.extend_time();
                }
                let left = stream.time_left().map(|d| d.as_millis());
                stream.send("alive", &left)
            }),
    );
    let started = Instant::now();
    let (mut c, head) = Raw::stream(server.local_addr(), "/ext");
    assert_eq!(head.status, 200);
    let chunks = c.chunks_to_end(5);
    assert!(started.elapsed() >= Duration::from_millis(550));
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert_eq!(chunks[1], Chunk::Last);
    let Chunk::Data(frame) = &chunks[0] else {
        panic!("{chunks:?}")
    };
    let left: u64 = frame
        .strip_prefix("event: alive\ndata: ")
        .and_then(|d| d.strip_suffix("\n\n"))
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("frame {frame:?}"));
    assert!(
        (200..=300).contains(&left),
        "time_left just after extend_time: {left} ms"
    );
    assert_eq!(stats.snapshot().disconnects(EndReason::Budget), 0);
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// Disconnects and the write timeout
// ---------------------------------------------------------------------------

#[test]
fn a_closed_client_ends_the_stream_at_its_next_send_or_sleep() {
    let stats = Stats::new();
    let (tx, rx) = crossbeam_channel::unbounded();
    let server = start(ssed::Server::builder().stats(stats.clone()).route(
        "/ticks",
        move |_req, stream| {
            for i in 0..500 {
                // A reset connection ends the stream at whichever comes
                // first: the next send, or the sleep (the acceptor hears
                // the reset and wakes it).
                if let Err(e) = stream
                    .send("tick", &i)
                    .and_then(|()| stream.sleep(Duration::from_millis(20)))
                {
                    report(&tx, e.end_reason());
                    return Err(e);
                }
            }
            report(&tx, None);
            Ok(())
        },
    ));
    let mut c = Client::new(server.local_addr());
    let head = c.get_stream("/ticks", &[]);
    assert_eq!(head.status, 200);
    let first = c.next_frame().expect("a first tick");
    assert_eq!(first, "event: tick\ndata: 0\n\n");
    drop(c);
    let closed = Instant::now();
    let reason = rx.recv_timeout(DEADLINE).expect("handler reported");
    assert_eq!(reason, Some(EndReason::Client));
    assert!(
        closed.elapsed() < Duration::from_secs(2),
        "seen after {:?}",
        closed.elapsed()
    );
    assert!(wait_until(DEADLINE, || stats
        .snapshot()
        .disconnects(EndReason::Client)
        == 1));
    assert!(wait_until(DEADLINE, || stats.snapshot().streams_open == 0));
    server.stop().expect("clean stop");
}

#[test]
fn check_connection_sees_a_closed_peer_without_sending() {
    let stats = Stats::new();
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    let server = start(ssed::Server::builder().stats(stats.clone()).route(
        "/check",
        move |_req, stream| {
            stream.open()?;
            let mut ok = 0;
            for _ in 0..500 {
                match stream.check_connection() {
                    Ok(()) => {
                        ok += 1;
                        if ok == 1 {
                            report(&tx, "alive".into());
                        }
                    }
                    Err(e) => {
                        report(&tx, format!("{:?}", e.end_reason()));
                        return Err(e);
                    }
                }
                // The acceptor may hear the close first and end the sleep.
                if let Err(e) = stream.sleep(Duration::from_millis(10)) {
                    report(&tx, format!("{:?}", e.end_reason()));
                    return Err(e);
                }
            }
            report(&tx, "never noticed".into());
            Ok(())
        },
    ));
    let (c, head) = Raw::stream(server.local_addr(), "/check");
    assert_eq!(head.status, 200);
    assert_eq!(rx.recv_timeout(DEADLINE).expect("first check"), "alive");
    drop(c);
    let closed = Instant::now();
    assert_eq!(
        rx.recv_timeout(DEADLINE).expect("handler reported"),
        "Some(Client)"
    );
    assert!(
        closed.elapsed() < Duration::from_secs(1),
        "seen after {:?}",
        closed.elapsed()
    );
    assert!(wait_until(DEADLINE, || stats
        .snapshot()
        .disconnects(EndReason::Client)
        == 1));
    assert_eq!(
        stats.snapshot().frames_sent,
        0,
        "nothing was sent to find out"
    );
    server.stop().expect("clean stop");
}

#[test]
fn write_timeout_drops_a_client_that_stops_reading() {
    let stats = Stats::new();
    let (tx, rx) = crossbeam_channel::unbounded::<(u32, Option<EndReason>)>();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .write_timeout(Duration::from_millis(300))
            .route("/flood", move |_req, stream| {
                let big = Event::new().data("x".repeat(64 * 1024));
                for i in 0..2000 {
                    if let Err(e) = stream.send_event(&big) {
                        report(&tx, (i, e.end_reason()));
                        return Err(e);
                    }
                }
                report(&tx, (2000, None));
                Ok(())
            }),
    );
    let started = Instant::now();
    let mut c = Raw::new(server.local_addr());
    c.send(b"GET /flood HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n");
    // The client never reads.
    let (sent, reason) = rx.recv_timeout(DEADLINE).expect("handler reported");
    assert_eq!(reason, Some(EndReason::WriteTimeout), "after {sent} frames");
    assert!(sent > 0, "some frames went out before the buffers filled");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(wait_until(DEADLINE, || stats.snapshot().streams_open == 0));
    let snap = stats.snapshot();
    assert_eq!(snap.disconnects(EndReason::WriteTimeout), 1);
    assert_eq!(snap.disconnects(EndReason::Client), 0);
    drop(c);
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// The request deadline
// ---------------------------------------------------------------------------

fn deadline_server(stats: &Stats) -> ssed::RunningServer {
    start(
        ssed::Server::builder()
            .stats(stats.clone())
            .request_timeout(Duration::from_millis(300))
            .route("/s", |_req, stream| stream.send("x", &1)),
    )
}

/// Reads to EOF and returns what arrived and when the close came.
fn wait_for_close(c: &mut Raw, started: Instant) -> (Vec<u8>, Duration) {
    let got = c.rest();
    (got, started.elapsed())
}

/// A cut connection may carry a `408` answer; if it does, it is a proper one.
fn assert_nothing_or_408(got: &[u8]) {
    if got.is_empty() {
        return;
    }
    let end = find(got, b"\r\n\r\n").expect("a complete head");
    let head = parse_head(&got[..end]);
    let body = std::str::from_utf8(&got[end + 4..]).expect("UTF-8");
    assert_plain_error(&head, body, 408);
}

#[test]
fn request_timeout_cuts_a_partial_head() {
    let stats = Stats::new();
    let server = deadline_server(&stats);
    let mut c = Raw::new(server.local_addr());
    let started = Instant::now();
    c.send(b"GET /s HTTP/1.1\r\nHost: t\r\n");
    let (got, elapsed) = wait_for_close(&mut c, started);
    assert!(
        (Duration::from_millis(250)..Duration::from_millis(1200)).contains(&elapsed),
        "cut after {elapsed:?}"
    );
    assert_nothing_or_408(&got);
    assert_eq!(stats.snapshot().head_timeouts, 1);
    assert_eq!(stats.snapshot().streams_total, 0);
    server.stop().expect("clean stop");
}

#[test]
fn request_timeout_is_a_deadline_not_a_per_read_timeout() {
    let stats = Stats::new();
    let server = deadline_server(&stats);
    let mut c = Raw::new(server.local_addr());
    let mut writer = c.conn.try_clone().expect("clone socket");
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writer = Arc::clone(&stop);
    let started = Instant::now();
    c.send(b"GET /s HTTP/1.1\r\nX-Slow: ");
    let trickle = std::thread::spawn(move || {
        // One byte every 100 ms, never finishing the head; at most 3 s.
        for _ in 0..30 {
            if stop_writer.load(Ordering::SeqCst) || writer.write_all(b"a").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let (got, elapsed) = wait_for_close(&mut c, started);
    stop.store(true, Ordering::SeqCst);
    trickle.join().expect("writer thread");
    assert!(
        (Duration::from_millis(250)..Duration::from_millis(1200)).contains(&elapsed),
        "cut after {elapsed:?} although bytes kept coming"
    );
    assert_nothing_or_408(&got);
    assert_eq!(stats.snapshot().head_timeouts, 1);
    server.stop().expect("clean stop");
}

#[test]
fn request_timeout_closes_a_silent_connection() {
    let stats = Stats::new();
    let server = deadline_server(&stats);
    let started = Instant::now();
    let mut c = Raw::new(server.local_addr());
    let (got, elapsed) = wait_for_close(&mut c, started);
    assert!(
        (Duration::from_millis(250)..Duration::from_millis(1200)).contains(&elapsed),
        "closed after {elapsed:?}"
    );
    assert_nothing_or_408(&got);
    assert_eq!(stats.snapshot().head_timeouts, 1);
    assert_eq!(stats.snapshot().pending, 0);
    server.stop().expect("clean stop");
}

#[test]
fn request_timeout_covers_the_body() {
    let stats = Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .request_timeout(Duration::from_millis(300))
            .post("/echo", |req| {
                Response::text(200, format!("{} bytes", req.body().len()))
            }),
    );
    let mut c = Raw::new(server.local_addr());
    let started = Instant::now();
    c.send(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nabcde");
    let head = c.head();
    let body = String::from_utf8(c.rest()).expect("UTF-8");
    let elapsed = started.elapsed();
    assert_plain_error(&head, &body, 408);
    assert!(
        (Duration::from_millis(250)..Duration::from_millis(1200)).contains(&elapsed),
        "408 after {elapsed:?}"
    );
    // A request cut by its deadline, head or body, is a timeout.
    assert_eq!(stats.snapshot().head_timeouts, 1);
    assert_eq!(stats.snapshot().bad_requests, 0);
    server.stop().expect("clean stop");
}

#[test]
fn keep_alive_timeout_closes_an_idle_connection() {
    let server = start(
        ssed::Server::builder()
            .keep_alive_timeout(Duration::from_millis(200))
            .get("/hello", |_req| Response::text(200, "hello")),
    );
    let mut c = Client::new(server.local_addr());
    c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n");
    let (head, body) = c.response();
    assert_eq!((head.status, body.as_str()), (200, "hello\n"));
    let idle = Instant::now();
    assert!(
        c.closed_within(Duration::from_secs(2)),
        "idle connection closed"
    );
    let elapsed = idle.elapsed();
    assert!(
        (Duration::from_millis(150)..Duration::from_millis(1000)).contains(&elapsed),
        "closed after {elapsed:?}"
    );
    server.stop().expect("clean stop");
}

#[test]
fn max_requests_caps_ordinary_requests_with_503() {
    let stats = Stats::new();
    let (entered_tx, entered_rx) = crossbeam_channel::unbounded::<()>();
    let (release_tx, release_rx) = crossbeam_channel::unbounded::<()>();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_requests(1)
            .get("/block", move |_req| {
                report(&entered_tx, ());
                match release_rx.recv_timeout(DEADLINE) {
                    Ok(()) => Response::text(200, "released"),
                    Err(_) => Response::text(500, "never released"),
                }
            }),
    );
    let addr = server.local_addr();
    let mut first = Raw::new(addr);
    first.send(b"GET /block HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    entered_rx
        .recv_timeout(DEADLINE)
        .expect("first request runs");
    let (head, body) = exchange(addr, b"GET /block HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_plain_error(&head, &body, 503);
    assert!(head.header("retry-after").is_some());
    assert_eq!(stats.snapshot().rejected_total, 1);
    release_tx.send(()).expect("handler waits");
    let head = first.head();
    let body = String::from_utf8(first.rest()).expect("UTF-8");
    assert_eq!((head.status, body.as_str()), (200, "released\n"));
    server.stop().expect("clean stop");
}

#[test]
fn max_pending_cuts_the_oldest_waiting_connection() {
    let stats = Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_pending(2)
            .route("/s", |_req, stream| stream.send("x", &1)),
    );
    let addr = server.local_addr();
    let mut waiting = Vec::new();
    for n in 1..=2 {
        waiting.push(Client::new(addr));
        assert!(
            wait_until(DEADLINE, || stats.snapshot().pending == n),
            "{n} waiting: {:?}",
            stats.snapshot()
        );
    }
    let mut newest = Client::new(addr);
    assert!(
        waiting[0].closed_within(Duration::from_secs(1)),
        "the oldest is cut"
    );
    assert!(
        !waiting[1].closed_within(Duration::from_millis(100)),
        "the second stays"
    );
    // The newest is served normally.
    let head = newest.get_stream("/s", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(newest.until_end(5), ["event: x\ndata: 1\n\n"]);
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------

#[test]
fn stop_sends_a_last_frame_to_every_stream_and_closes() {
    let stats = Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .route("/s", |_req, stream| {
                stream.send("hello", &1)?;
                stream.sleep(Duration::from_secs(60))
            }),
    );
    let addr = server.local_addr();
    let mut clients: Vec<Raw> = (0..3)
        .map(|_| {
            let (mut c, head) = Raw::stream(addr, "/s");
            assert_eq!(head.status, 200);
            assert_eq!(c.chunk(), Chunk::Data("event: hello\ndata: 1\n\n".into()));
            c
        })
        .collect();
    assert_eq!(stats.snapshot().streams_open, 3);

    let started = Instant::now();
    server.stop().expect("clean stop");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "stop took {took:?}");

    for c in &mut clients {
        assert_eq!(c.chunk(), Chunk::Data(": server shutting down\n\n".into()));
        assert_eq!(c.chunk(), Chunk::Last);
        assert!(c.rest().is_empty(), "nothing after the end");
    }
    let snap = stats.snapshot();
    assert_eq!(snap.disconnects(EndReason::Shutdown), 3);
    assert_eq!(snap.streams_open, 0);
    let after = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    assert!(after.is_err(), "nothing listens after stop: {after:?}");
}

#[test]
fn shutdown_handle_stops_from_another_thread_and_refuses_pending_streams() {
    let handle = ssed::ShutdownHandle::new();
    let (tx, rx) = crossbeam_channel::unbounded::<()>();
    let server = start(
        ssed::Server::builder()
            .shutdown_handle(handle.clone())
            .route("/open", |_req, stream| {
                stream.open()?;
                stream.sleep(Duration::from_secs(60))
            })
            .route("/unopened", move |_req, stream| {
                report(&tx, ());
                stream.sleep(Duration::from_secs(60))
            }),
    );
    let addr = server.local_addr();
    let (mut open, head) = Raw::stream(addr, "/open");
    assert_eq!(head.status, 200);
    let mut unopened = Raw::new(addr);
    unopened.send(b"GET /unopened HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n");
    rx.recv_timeout(DEADLINE).expect("the second handler runs");

    let started = Instant::now();
    let from = std::thread::spawn(move || handle.shutdown());
    from.join().expect("shutdown thread");
    assert_eq!(
        open.chunk(),
        Chunk::Data(": server shutting down\n\n".into())
    );
    assert_eq!(open.chunk(), Chunk::Last);
    // A stream that had not opened yet is told to come back later.
    let head = unopened.head();
    let body = String::from_utf8(unopened.rest()).expect("UTF-8");
    assert_plain_error(&head, &body, 503);
    assert!(head.header("retry-after").is_some());
    server.stop().expect("clean stop");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn grace_period_cuts_streams_that_ignore_shutdown() {
    let (tx, rx) = crossbeam_channel::unbounded::<()>();
    let server = start(
        ssed::Server::builder()
            .grace_period(Duration::from_millis(300))
            .route("/stubborn", move |_req, stream| {
                stream.open()?;
                report(&tx, ());
                // Busy without a blocking call of the stream: shutdown
                // cannot reach it, only the cut after the grace period.
                std::thread::sleep(Duration::from_millis(900));
                Ok(())
            }),
    );
    let (mut c, head) = Raw::stream(server.local_addr(), "/stubborn");
    assert_eq!(head.status, 200);
    rx.recv_timeout(DEADLINE).expect("handler runs");
    let started = Instant::now();
    let stopper = std::thread::spawn(move || {
        let r = server.stop();
        (r.is_ok(), Instant::now())
    });
    assert_eq!(c.chunk(), Chunk::Eof, "cut, without a clean end");
    let cut = started.elapsed();
    let (ok, stopped) = stopper.join().expect("stop thread");
    assert!(ok, "clean stop");
    assert!(
        // Before the handler would have ended the body by itself.
        (Duration::from_millis(250)..Duration::from_millis(750)).contains(&cut),
        "cut after {cut:?}"
    );
    assert!(
        stopped.duration_since(started) < Duration::from_secs(2),
        "stop returned in time"
    );
}

// ---------------------------------------------------------------------------
// Panics
// ---------------------------------------------------------------------------

#[test]
fn a_panicking_handler_ends_its_own_connection_only() {
    let stats = Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .route("/early", |_req, _stream| panic!("boom before opening"))
            .route("/late", |_req, stream| {
                stream.send("x", &1)?;
                panic!("boom after a frame")
            })
            .route("/fine", |_req, stream| stream.send("ok", &1))
            .get("/plain-panic", |_req| panic!("boom in a plain handler"))
            .get("/plain", |_req| Response::text(200, "still here")),
    );
    let addr = server.local_addr();

    let (head, body) = exchange(
        addr,
        b"GET /early HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
    );
    assert_plain_error(&head, &body, 500);
    assert_eq!(stats.snapshot().handler_panics, 1);

    let (mut c, head) = Raw::stream(addr, "/late");
    assert_eq!(head.status, 200);
    assert_eq!(c.chunk(), Chunk::Data("event: x\ndata: 1\n\n".into()));
    c.assert_cut();
    assert!(wait_until(DEADLINE, || stats.snapshot().handler_panics == 2));

    let (mut c, head) = Raw::stream(addr, "/fine");
    assert_eq!(head.status, 200);
    assert_eq!(
        c.chunks_to_end(5),
        [Chunk::Data("event: ok\ndata: 1\n\n".into()), Chunk::Last]
    );

    let (head, body) = exchange(
        addr,
        b"GET /plain-panic HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_plain_error(&head, &body, 500);
    assert_eq!(stats.snapshot().handler_panics, 3);
    let (head, body) = exchange(
        addr,
        b"GET /plain HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((head.status, body.as_str()), (200, "still here\n"));
    assert!(wait_until(DEADLINE, || {
        let s = stats.snapshot();
        s.streams_open == 0 && s.requests_active == 0
    }));
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// forward() and poll()
// ---------------------------------------------------------------------------

#[test]
fn forward_relays_a_channel_until_its_senders_are_gone() {
    let (ship_tx, ship_rx) = crossbeam_channel::bounded::<Sender<u32>>(1);
    let server = start(ssed::Server::builder().route("/fwd", move |_req, stream| {
        let (tx, rx) = crossbeam_channel::unbounded();
        ship_tx.send(tx).map_err(StreamError::other)?;
        stream.forward("n", &rx)
    }));
    let mut c = Raw::new(server.local_addr());
    c.send(b"GET /fwd HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n");
    let tx = ship_rx
        .recv_timeout(DEADLINE)
        .expect("handler ships its sender");
    for n in [1, 2, 3] {
        tx.send(n).expect("handler is forwarding");
    }
    let head = c.head();
    assert_eq!(head.status, 200);
    assert_eq!(c.chunk(), Chunk::Data("event: n\ndata: 1\n\n".into()));
    tx.send(4).expect("handler is forwarding");
    drop(tx);
    assert_eq!(
        c.chunks_to_end(10),
        [
            Chunk::Data("event: n\ndata: 2\n\n".into()),
            Chunk::Data("event: n\ndata: 3\n\n".into()),
            Chunk::Data("event: n\ndata: 4\n\n".into()),
            Chunk::Last,
        ]
    );
    server.stop().expect("clean stop");
}

#[test]
fn poll_sends_only_the_some_values() {
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    let server = start(
        ssed::Server::builder()
            .max_execution_time(Duration::from_millis(200))
            .route("/poll", move |_req, stream| {
                // Some on every other call (the 2nd, 4th, … 10th), then
                // None for good.
                let mut calls = 0u32;
                let mut this_one = false;
                let r = stream.poll("v", Duration::from_millis(10), || {
                    calls += 1;
                    this_one = !this_one;
                    (!this_one && calls <= 10).then_some(calls)
                });
                // No value for longer than the budget ends it.
                report(
                    &tx,
                    format!("{:?}", r.as_ref().err().and_then(StreamError::end_reason)),
                );
                r
            }),
    );
    let (mut c, head) = Raw::stream(server.local_addr(), "/poll");
    assert_eq!(head.status, 200);
    let want: Vec<Chunk> = [2, 4, 6, 8, 10]
        .iter()
        .map(|n| Chunk::Data(format!("event: v\ndata: {n}\n\n")))
        .chain([Chunk::Eof])
        .collect();
    assert_eq!(c.chunks_to_end(20), want);
    assert_eq!(
        rx.recv_timeout(DEADLINE).expect("handler reported"),
        "Some(Budget)"
    );
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------

#[test]
fn shared_handles_are_send_sync_clone() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    assert_send_sync_clone::<ssed::ShutdownHandle>();
    assert_send_sync_clone::<ssed::Stats>();
    // And a clone is the same handle, not a copy.
    let stats = Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .route("/s", |_req, stream| stream.send("x", &1)),
    );
    let (mut c, _) = Raw::stream(server.local_addr(), "/s");
    assert_eq!(c.chunks_to_end(5).len(), 2);
    assert!(wait_until(DEADLINE, || server
        .stats()
        .snapshot()
        .streams_total
        == 1));
    assert_eq!(stats.snapshot().streams_total, 1);
    let handle = server.shutdown_handle();
    let clone = handle.clone();
    assert!(!handle.is_shutdown());
    clone.shutdown();
    assert!(handle.is_shutdown());
    server.stop().expect("clean stop");
}
