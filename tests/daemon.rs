#![cfg(feature = "daemon")]
//! The daemon in-process over real sockets on `127.0.0.1:0`: every route and
//! status code of DESIGN.md's "Daemon HTTP interface", ids, replay and reset,
//! slow subscribers, mailboxes, auth and tickets, CORS, heartbeats, the
//! execution-time budget, `/healthz` and `/metrics`.
//!
//! Every test builds its own daemon from a TOML config (so the config keys
//! are exercised too), every read has a timeout and every loop is bounded.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use ssed::EndReason;
use support::{Client, Head, connect, field, metrics, wait_until};

/// The longest any test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// A daemon under test
// ---------------------------------------------------------------------------

/// A daemon running in the background; dropping it stops it.
type Running = support::InProcess;

/// Starts a daemon on 127.0.0.1:0 with `toml` over the defaults.
fn start(toml: &str) -> Running {
    start_on("127.0.0.1:0", toml)
}

/// Starts a daemon listening on `listen` with `toml` over the defaults.
fn start_on(listen: &str, toml: &str) -> Running {
    // `listen` first: the caller's text may open tables (`[auth]`).
    support::daemon(&format!("listen = \"{listen}\"\n{toml}"))
}

impl Running {
    /// Waits until `topic` has exactly `n` hub subscribers (a stream that
    /// sent its head is subscribed; one that ended takes a moment to leave).
    fn wait_subscribers(&self, topic: &str, n: usize) {
        assert!(
            wait_until(DEADLINE, || self.hub.subscribers(topic) == n),
            "topic {topic} never had {n} subscribers (has {})",
            self.hub.subscribers(topic)
        );
    }

    fn disconnects(&self, reason: EndReason) -> u64 {
        self.server.stats().snapshot().disconnects(reason)
    }
}

// ---------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------

/// Encodes a request with `Host` set to the server's address.
fn encode(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for h in headers {
        raw.push_str(h);
        raw.push_str("\r\n");
    }
    let chunked = headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("transfer-encoding:"));
    if !chunked && (method == "POST" || !body.is_empty()) {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One request on a fresh connection (closed after); the answer.
fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> (Head, String) {
    let mut all = vec!["Connection: close"];
    all.extend_from_slice(headers);
    let mut c = Client::new(addr);
    c.send(&encode(addr, method, path, &all, body));
    c.response()
}

fn get(addr: SocketAddr, path: &str) -> (Head, String) {
    call(addr, "GET", path, &[], b"")
}

fn post(addr: SocketAddr, path: &str, headers: &[&str], body: &str) -> (Head, String) {
    call(addr, "POST", path, headers, body.as_bytes())
}

/// Checks an error answer: its status, and a short plain-text body.
fn assert_error(what: &str, (head, body): &(Head, String), status: u16) {
    assert_eq!(head.status, status, "{what}: {body:?}");
    assert!(
        head.header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{what}: error answers are plain text: {head:?}"
    );
    assert!(
        !body.trim().is_empty(),
        "{what}: error answers say what was wrong"
    );
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// What `POST /publish/{topic}` answered.
#[derive(Debug, Clone)]
struct Published {
    id: String,
    receivers: u64,
}

/// A keep-alive connection for many requests in a row.
struct Publisher {
    addr: SocketAddr,
    client: Option<Client>,
    headers: Vec<String>,
}

impl Publisher {
    fn new(addr: SocketAddr) -> Self {
        Publisher {
            addr,
            client: None,
            headers: Vec::new(),
        }
    }

    fn post(&mut self, path: &str, body: &[u8]) -> (Head, String) {
        let addr = self.addr;
        let headers: Vec<&str> = self.headers.iter().map(String::as_str).collect();
        let bytes = encode(addr, "POST", path, &headers, body);
        let c = self.client.get_or_insert_with(|| Client::new(addr));
        c.send(&bytes);
        let (head, body) = c.response();
        if head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.client = None;
        }
        (head, body)
    }

    fn publish(&mut self, topic: &str, data: &str) -> Published {
        let (head, body) = self.post(&format!("/publish/{topic}"), data.as_bytes());
        assert_eq!(head.status, 200, "publish to {topic}: {body}");
        let v = json(&body);
        assert_eq!(v["topic"], topic, "{body}");
        Published {
            id: v["id"].as_str().expect("id is a string").to_owned(),
            receivers: v["receivers"].as_u64().expect("receivers is a number"),
        }
    }

    fn push(&mut self, key: &str, message: &str) -> (Head, String) {
        self.post(&format!("/keys/{key}"), message.as_bytes())
    }
}

fn publish(addr: SocketAddr, topic: &str, data: &str) -> Published {
    Publisher::new(addr).publish(topic, data)
}

/// Opens `GET path` as an `EventSource` would (with the right `Host`).
fn open(addr: SocketAddr, path: &str, headers: &[&str]) -> (Client, Head) {
    let mut all = vec!["Accept: text/event-stream"];
    all.extend_from_slice(headers);
    let mut c = Client::new(addr);
    c.send(&encode(addr, "GET", path, &all, b""));
    let head = c.head();
    (c, head)
}

/// Opens a stream that must succeed: `200`, the SSE headers, and the
/// default `retry: 3000` as the first frame.
fn subscribe(addr: SocketAddr, path: &str, headers: &[&str]) -> Client {
    let (mut c, head) = open(addr, path, headers);
    assert_eq!(head.status, 200, "GET {path}: {head:?}");
    assert_eq!(
        head.header("content-type"),
        Some("text/event-stream"),
        "{head:?}"
    );
    assert_eq!(head.header("cache-control"), Some("no-cache"), "{head:?}");
    assert_eq!(head.header("x-accel-buffering"), Some("no"), "{head:?}");
    assert!(head.is_chunked(), "{head:?}");
    assert_eq!(
        c.next_frame().as_deref(),
        Some("retry: 3000\n\n"),
        "first frame of {path}"
    );
    c
}

/// An event as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ev {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

fn parse_event(frame: &str) -> Ev {
    Ev {
        id: field(frame, "id").first().map(|s| (*s).to_owned()),
        event: field(frame, "event").first().map(|s| (*s).to_owned()),
        data: field(frame, "data").join("\n"),
    }
}

/// Whether a frame carries an event (not a comment or a bare `retry:`).
fn is_event(frame: &str) -> bool {
    frame.lines().any(|l| l.starts_with("data"))
}

/// The next event of a stream, skipping comments and `retry:` frames.
fn next_event(c: &mut Client) -> Ev {
    for _ in 0..1000 {
        match c.next_frame() {
            Some(f) if is_event(&f) => return parse_event(&f),
            Some(_) => {}
            None => panic!("stream ended while waiting for an event"),
        }
    }
    panic!("no event within 1000 frames")
}

fn metric(m: &HashMap<String, u64>, series: &str) -> u64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in /metrics: {m:?}"))
}

fn disconnect_series(reason: &str) -> String {
    format!("ssed_disconnects_total{{reason=\"{reason}\"}}")
}

fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id
        .split_once('-')
        .unwrap_or_else(|| panic!("id {id:?} is not <ms>-<seq>"));
    let n = |p: &str| {
        assert!(
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()),
            "id {id:?} is not <ms>-<seq>"
        );
        p.parse::<u64>().expect("digits")
    };
    (n(ms), n(seq))
}

// ---------------------------------------------------------------------------
// A strict reader, for tests that must tell a clean end from a cut
// ---------------------------------------------------------------------------

/// A raw connection that keeps every byte and decodes afterwards.
struct Raw {
    conn: TcpStream,
    buf: Vec<u8>,
}

/// A decoded chunked event stream.
#[derive(Debug)]
struct Decoded {
    status: u16,
    frames: Vec<String>,
    /// The terminating chunk arrived.
    clean: bool,
}

impl Raw {
    fn open(addr: SocketAddr, path: &str, headers: &[&str]) -> Raw {
        let mut all = vec!["Accept: text/event-stream"];
        all.extend_from_slice(headers);
        let mut conn = connect(addr);
        conn.write_all(&encode(addr, "GET", path, &all, b""))
            .expect("send request");
        Raw {
            conn,
            buf: Vec::new(),
        }
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 65536];
        match self.conn.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            // A reset after the server closed counts as the end too.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("read failed: {e}; have {} bytes", self.buf.len()),
        }
    }

    /// Reads until `needle` has arrived.
    fn read_until(&mut self, needle: &[u8]) {
        let deadline = Instant::now() + DEADLINE;
        // Search only what arrived since the last look (megabytes arrive
        // in the slow-subscriber tests).
        let mut from = 0;
        while !self.buf[from..].windows(needle.len()).any(|w| w == needle) {
            from = self.buf.len().saturating_sub(needle.len());
            assert!(
                Instant::now() < deadline,
                "{:?} never arrived",
                String::from_utf8_lossy(needle)
            );
            assert!(
                self.fill() > 0,
                "closed before {:?}",
                String::from_utf8_lossy(needle)
            );
        }
    }

    /// Reads until the server closes the connection.
    fn read_to_eof(&mut self) {
        let deadline = Instant::now() + DEADLINE * 2;
        while self.fill() > 0 {
            assert!(
                Instant::now() < deadline,
                "the server never closed the stream"
            );
        }
    }

    fn decode(&self) -> Decoded {
        let end = self
            .buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete head");
        let head = String::from_utf8_lossy(&self.buf[..end]);
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        let mut rest = &self.buf[end + 4..];
        let mut body = Vec::new();
        let mut clean = false;
        while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&rest[..line_end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .expect("a chunk size");
            let start = line_end + 2;
            if rest.len() < start + size + 2 {
                break; // cut in the middle of a chunk
            }
            assert_eq!(
                &rest[start + size..start + size + 2],
                b"\r\n",
                "chunk framing"
            );
            if size == 0 {
                clean = true;
                assert_eq!(rest.len(), start + 2, "bytes after the terminating chunk");
                break;
            }
            body.extend_from_slice(&rest[start..start + size]);
            rest = &rest[start + size + 2..];
        }
        let text = String::from_utf8(body).expect("utf-8 stream");
        let frames = text.split_inclusive("\n\n").map(str::to_owned).collect();
        Decoded {
            status,
            frames,
            clean,
        }
    }
}

// ---------------------------------------------------------------------------
// Routes and status codes
// ---------------------------------------------------------------------------

#[test]
fn demo_page_is_html_with_event_source() {
    let d = start("");
    let (head, body) = get(d.addr, "/");
    assert_eq!(head.status, 200);
    assert!(
        head.header("content-type")
            .is_some_and(|v| v.starts_with("text/html")),
        "{head:?}"
    );
    assert!(body.contains("EventSource"), "{body}");
}

#[test]
fn publish_reaches_a_subscriber_with_name_and_multiline_data() {
    let d = start("");
    let mut c = subscribe(d.addr, "/events/news", &[]);
    d.wait_subscribers("news", 1);

    let (head, body) = post(d.addr, "/publish/news", &[], "hello");
    assert_eq!(head.status, 200, "{body}");
    assert!(
        head.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{head:?}"
    );
    let v = json(&body);
    assert_eq!(v["topic"], "news");
    assert_eq!(v["receivers"], 1);
    let id = v["id"].as_str().expect("id").to_owned();
    parse_id(&id);
    let ev = next_event(&mut c);
    assert_eq!(
        ev,
        Ev {
            id: Some(id),
            event: None,
            data: "hello".into()
        }
    );

    // `?event=NAME` names the event; every line break form splits the data.
    let (head, body) = post(
        d.addr,
        "/publish/news?event=headline",
        &[],
        "line 1\nline 2\r\nline 3\rline 4",
    );
    assert_eq!(head.status, 200, "{body}");
    let id = json(&body)["id"].as_str().expect("id").to_owned();
    let frame = c.frame_matching(10, is_event);
    assert_eq!(field(&frame, "event"), ["headline"]);
    assert_eq!(field(&frame, "id"), [id.as_str()]);
    assert_eq!(
        field(&frame, "data"),
        ["line 1", "line 2", "line 3", "line 4"]
    );

    // The data is exactly the body: spaces, colons, unicode, JSON.
    let exact = r#"  {"a": "b: c"}  é ✓ "#;
    post(d.addr, "/publish/news", &[], exact);
    assert_eq!(next_event(&mut c).data, exact);

    // An event name cannot hold a line break.
    let r = post(d.addr, "/publish/news?event=a%0Ab", &[], "x");
    assert_error("event name with a line break", &r, 400);

    // Nobody listening: published all the same, to no one.
    let p = publish(d.addr, "nobody", "x");
    assert_eq!(p.receivers, 0);
}

#[test]
fn the_retry_frame_follows_the_config() {
    let d = start("retry = \"1500ms\"");
    let (mut c, head) = open(d.addr, "/events/t", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(c.next_frame().as_deref(), Some("retry: 1500\n\n"));

    // "0": no retry frame; the first frame is the first event.
    let d = start("retry = \"0\"");
    let (mut c, head) = open(d.addr, "/events/t", &[]);
    assert_eq!(head.status, 200);
    d.wait_subscribers("t", 1);
    let p = publish(d.addr, "t", "first");
    let frame = c.next_frame().expect("a frame");
    assert_eq!(frame, format!("id: {}\ndata: first\n\n", p.id));
}

#[test]
fn several_topics_on_one_stream_interleave_in_id_order() {
    let d = start("");
    let mut c = subscribe(d.addr, "/events?topic=a&topic=b", &[]);
    d.wait_subscribers("a", 1);
    d.wait_subscribers("b", 1);
    let mut want = Vec::new();
    for (topic, data) in [
        ("a", "a1"),
        ("b", "b1"),
        ("c", "c1"),
        ("b", "b2"),
        ("a", "a2"),
        ("c", "c2"),
        ("a", "a3"),
    ] {
        let p = publish(d.addr, topic, data);
        if topic != "c" {
            assert_eq!(p.receivers, 1);
            want.push((p.id, data));
        } else {
            assert_eq!(p.receivers, 0);
        }
    }
    let got: Vec<(String, String)> = (0..want.len())
        .map(|_| {
            let ev = next_event(&mut c);
            (ev.id.expect("an id"), ev.data)
        })
        .collect();
    let want: Vec<(String, String)> = want.into_iter().map(|(id, d)| (id, d.to_owned())).collect();
    assert_eq!(got, want);
}

#[test]
fn bad_topic_and_key_names_get_400_everywhere() {
    let d = start("");
    let long = "x".repeat(201);
    let bad = ["a%20b", "a%2Fb", "caf%C3%A9", "a+b", long.as_str()];
    for name in bad {
        let (mut c, head) = open(d.addr, &format!("/events/{name}"), &[]);
        let body = String::from_utf8(c.body(&head)).expect("utf-8");
        assert_error(&format!("GET /events/{name}"), &(head, body), 400);

        let (mut c, head) = open(d.addr, &format!("/keys/{name}"), &[]);
        let body = String::from_utf8(c.body(&head)).expect("utf-8");
        assert_error(&format!("GET /keys/{name}"), &(head, body), 400);

        let r = post(d.addr, &format!("/publish/{name}"), &[], "x");
        assert_error(&format!("POST /publish/{name}"), &r, 400);
        let r = post(d.addr, &format!("/keys/{name}"), &[], "x");
        assert_error(&format!("POST /keys/{name}"), &r, 400);
    }
    assert_eq!(
        d.hub.published(),
        0,
        "nothing was published under a bad name"
    );
    // In the query a topic may be any text (an IRI, say): these names are
    // topics there; what is none is refused (tests/topics.rs says why).
    for name in bad {
        let (_c, head) = open(d.addr, &format!("/events?topic=ok&topic={name}"), &[]);
        assert_eq!(head.status, 200, "GET /events?topic={name}");
    }
    let over = "x".repeat(1025);
    for name in ["a%E2%80%8Bb", "a%07b", over.as_str()] {
        let (mut c, head) = open(d.addr, &format!("/events?topic=ok&topic={name}"), &[]);
        let body = String::from_utf8(c.body(&head)).expect("utf-8");
        assert_error(&format!("GET /events?topic={name}"), &(head, body), 400);
    }

    // The longest valid name, and every allowed character, are fine.
    let longest = "y".repeat(200);
    for name in [longest.as_str(), "A-Z_a.z:0-9"] {
        let _c = subscribe(d.addr, &format!("/events/{name}"), &[]);
        publish(d.addr, name, "ok");
        let (head, body) = post(d.addr, &format!("/keys/{name}"), &[], "ok");
        assert_eq!(head.status, 200, "{body}");
    }

    // /events with no topic at all, or with too many.
    for path in [
        "/events".to_owned(),
        "/events?topic=".to_owned(),
        format!(
            "/events?{}",
            (0..65)
                .map(|i| format!("topic=t{i}"))
                .collect::<Vec<_>>()
                .join("&")
        ),
    ] {
        let (mut c, head) = open(d.addr, &path, &[]);
        let body = String::from_utf8(c.body(&head)).expect("utf-8");
        assert_error(&path, &(head, body), 400);
    }
}

#[test]
fn a_body_that_is_not_utf8_gets_400() {
    let d = start("");
    for path in ["/publish/t", "/keys/k"] {
        let r = call(d.addr, "POST", path, &[], &[b'o', b'k', 0xff, 0xfe]);
        assert_error(path, &r, 400);
    }
    assert_eq!(d.hub.published(), 0);
    assert_eq!(d.hub.mailbox_len("k"), 0);
}

#[test]
fn unknown_paths_404_and_wrong_methods_405_with_allow() {
    let d = start("");
    for path in ["/nope", "/events/a/b", "/publish", "/publish/a/b"] {
        assert_error(&format!("GET {path}"), &get(d.addr, path), 404);
    }
    for (method, path) in [
        ("DELETE", "/publish/x"),
        ("GET", "/publish/x"),
        ("PUT", "/keys/k"),
        ("POST", "/healthz"),
        ("GET", "/tickets"),
    ] {
        let r = call(d.addr, method, path, &[], b"");
        assert_error(&format!("{method} {path}"), &r, 405);
        let allow =
            r.0.header("allow")
                .unwrap_or_else(|| panic!("{method} {path}: no Allow: {:?}", r.0));
        assert!(!allow.contains(method), "{method} {path}: Allow: {allow}");
        let want = if path == "/healthz" { "GET" } else { "POST" };
        assert!(allow.contains(want), "{method} {path}: Allow: {allow}");
    }
}

#[test]
fn a_body_over_max_body_gets_413() {
    let d = start("max_body = 16");
    let ok = "x".repeat(16);
    assert_eq!(post(d.addr, "/publish/t", &[], &ok).0.status, 200);
    let big = "x".repeat(17);
    assert_error(
        "publish 17 bytes",
        &post(d.addr, "/publish/t", &[], &big),
        413,
    );
    assert_error("push 17 bytes", &post(d.addr, "/keys/k", &[], &big), 413);
    // A chunked body is held to the same limit.
    let chunked = "Transfer-Encoding: chunked";
    let r = call(
        d.addr,
        "POST",
        "/publish/t",
        &[chunked],
        b"9\r\n123456789\r\n9\r\n123456789\r\n0\r\n\r\n",
    );
    assert_error("chunked body of 18 bytes", &r, 413);
    let r = call(
        d.addr,
        "POST",
        "/publish/t",
        &[chunked],
        b"8\r\n12345678\r\n0\r\n\r\n",
    );
    assert_eq!(r.0.status, 200, "{}", r.1);
    assert_eq!(d.hub.published(), 2);
}

#[test]
fn past_the_cap_streams_get_503_with_retry_after() {
    let d = start("max_connections = 1\nheartbeat = \"100ms\"");
    let mut held = subscribe(d.addr, "/events/a", &[]);

    let (mut c, head) = open(d.addr, "/events/b", &[]);
    let body = String::from_utf8(c.body(&head)).expect("utf-8");
    let r = (head, body);
    assert_error("stream past the cap", &r, 503);
    assert!(
        r.0.header("retry-after")
            .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)),
        "{:?}",
        r.0
    );

    // Ordinary requests are not streams: they still get through.
    let h = json(&get(d.addr, "/healthz").1);
    assert_eq!(h["streams_open"], 1);
    assert_eq!(h["max_connections"], 1);
    let m = metrics(d.addr);
    assert_eq!(metric(&m, "ssed_connections_rejected_total"), 1);
    assert_eq!(metric(&m, "ssed_connections_open"), 1);
    assert_eq!(metric(&m, "ssed_connections_max"), 1);
    assert!(
        held.frame_matching(10, |f| f.starts_with(": "))
            .contains("keep-alive")
    );

    // Once the slot frees (the heartbeat finds the client gone), a stream
    // gets in again.
    drop(held);
    assert!(
        wait_until(DEADLINE, || d.server.stats().snapshot().streams_open == 0),
        "the closed stream was never noticed"
    );
    assert_eq!(d.disconnects(EndReason::Client), 1);
    let _again = subscribe(d.addr, "/events/b", &[]);
}

#[test]
fn overload_retry_sends_a_jittered_retry_to_event_sources_and_503_to_others() {
    let d = start("max_connections = 1\noverload = \"retry\"\noverload_retry = [\"1s\", \"2s\"]");
    let _held = subscribe(d.addr, "/events/a", &[]);
    for _ in 0..5 {
        let (mut c, head) = open(d.addr, "/events/b", &[]);
        assert_eq!(head.status, 200, "{head:?}");
        assert!(
            head.header("content-type")
                .is_some_and(|v| v.starts_with("text/event-stream")),
            "{head:?}"
        );
        let body = String::from_utf8(c.body(&head)).expect("utf-8");
        let retry: Vec<u64> = field(&body, "retry")
            .iter()
            .map(|v| v.parse().expect("retry is digits"))
            .collect();
        assert_eq!(retry.len(), 1, "{body:?}");
        assert!(
            (1000..=2000).contains(&retry[0]),
            "retry {} outside overload_retry",
            retry[0]
        );
        assert!(
            c.closed_within(DEADLINE),
            "the overloaded stream was not closed"
        );
    }

    // Not an EventSource (no `Accept: text/event-stream`): a plain 503.
    let r = call(d.addr, "GET", "/events/b", &[], b"");
    assert_error("stream past the cap without Accept", &r, 503);
    assert!(r.0.header("retry-after").is_some(), "{:?}", r.0);
    assert_eq!(
        metric(&metrics(d.addr), "ssed_connections_rejected_total"),
        6
    );
}

#[test]
fn loopback_publish_through_a_proxy_needs_a_token() {
    // A reverse proxy on the same machine connects from loopback for
    // anyone on the internet: its forwarding headers void the exemption.
    let d = start_on("127.0.0.1:0", "");
    for header in [
        "X-Forwarded-For: 203.0.113.7",
        "X-Real-IP: 203.0.113.7",
        "Forwarded: for=203.0.113.7",
    ] {
        for path in ["/publish/t", "/keys/k"] {
            let r = post(d.addr, path, &[header], "x");
            assert_error(&format!("POST {path} with {header}"), &r, 403);
            assert!(r.1.contains("proxy"), "{}", r.1);
        }
    }
    assert_eq!(d.hub.published(), 0);
    let r = post(d.addr, "/publish/t", &[], "x");
    assert_eq!(
        r.0.status, 200,
        "a direct local publisher still may: {}",
        r.1
    );
    // With a token the proxy is no obstacle.
    let d = start_on("127.0.0.1:0", "[auth]\npublish_token = \"p\"");
    let r = post(
        d.addr,
        "/publish/t",
        &["X-Forwarded-For: 203.0.113.7", "Authorization: Bearer p"],
        "x",
    );
    assert_eq!(r.0.status, 200, "{}", r.1);
}

#[test]
fn non_loopback_publish_needs_a_token() {
    let Some(ip) = support::non_loopback_ip() else {
        eprintln!(
            "skipped: this machine has no non-loopback address to connect from \
             (auth::is_loopback is unit-tested)"
        );
        return;
    };
    let listen = SocketAddr::new(ip, 0).to_string();
    // No publish token: only this machine's loopback may publish.
    let d = start_on(&listen, "");
    for path in ["/publish/t", "/keys/k"] {
        let r = post(d.addr, path, &[], "x");
        assert_error(&format!("POST {path} from {ip}"), &r, 403);
    }
    assert_eq!(d.hub.published(), 0);
    // Subscribing stays open.
    let _c = subscribe(d.addr, "/events/t", &[]);

    // With a token, any peer may publish with it.
    let d = start_on(&listen, "[auth]\npublish_token = \"p\"");
    let r = post(d.addr, "/publish/t", &["Authorization: Bearer p"], "x");
    assert_eq!(r.0.status, 200, "{}", r.1);
    assert_error(
        "no token from afar",
        &post(d.addr, "/publish/t", &[], "x"),
        401,
    );
}

// ---------------------------------------------------------------------------
// /healthz and /metrics
// ---------------------------------------------------------------------------

#[test]
fn healthz_reports_streams_cap_and_uptime() {
    let d = start("max_connections = 7");
    let (head, body) = get(d.addr, "/healthz");
    assert_eq!(head.status, 200);
    assert!(
        head.header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "{head:?}"
    );
    let h = json(&body);
    assert_eq!(h["streams_open"], 0, "{body}");
    assert_eq!(h["max_connections"], 7, "{body}");
    assert!(h["uptime_seconds"].as_u64().is_some(), "{body}");

    let _c = subscribe(d.addr, "/events/t", &[]);
    let h = json(&get(d.addr, "/healthz").1);
    assert_eq!(h["streams_open"], 1);
}

#[test]
fn metrics_name_every_series_and_move() {
    let d = start("max_connections = 9");
    let before = metrics(d.addr);
    for name in [
        "ssed_connections_open",
        "ssed_connections_max",
        "ssed_connections_rejected_total",
        "ssed_events_published_total",
        "ssed_frames_sent_total",
        "ssed_bytes_sent_total",
    ] {
        metric(&before, name);
    }
    for reason in ["client", "write_timeout", "budget", "shutdown", "slow"] {
        assert_eq!(metric(&before, &disconnect_series(reason)), 0);
    }
    assert_eq!(metric(&before, "ssed_connections_max"), 9);
    assert_eq!(metric(&before, "ssed_connections_open"), 0);

    // Published: +1 per event, listener or not.
    publish(d.addr, "m", "nobody hears");
    let m = metrics(d.addr);
    assert_eq!(
        metric(&m, "ssed_events_published_total"),
        metric(&before, "ssed_events_published_total") + 1
    );

    // A subscriber: frames and bytes grow with what it is sent.
    let mut c = subscribe(d.addr, "/events/m", &[]);
    d.wait_subscribers("m", 1);
    let opened = metrics(d.addr);
    assert_eq!(metric(&opened, "ssed_connections_open"), 1);
    publish(d.addr, "m", "someone hears");
    assert_eq!(next_event(&mut c).data, "someone hears");
    assert!(wait_until(DEADLINE, || {
        let m = metrics(d.addr);
        metric(&m, "ssed_frames_sent_total") > metric(&opened, "ssed_frames_sent_total")
            && metric(&m, "ssed_bytes_sent_total") > metric(&opened, "ssed_bytes_sent_total")
    }));
    assert_eq!(metric(&metrics(d.addr), "ssed_events_published_total"), 2);
}

// ---------------------------------------------------------------------------
// Ids, replay, reset
// ---------------------------------------------------------------------------

#[test]
fn ids_increase_strictly_across_topics_in_publish_order() {
    let d = start("");
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let mut p = Publisher::new(d.addr);
    let ids: Vec<(u64, u64)> = (0..60)
        .map(|i| parse_id(&p.publish(["x", "y", "z"][i % 3], "e").id))
        .collect();
    for pair in ids.windows(2) {
        assert!(pair[0] < pair[1], "ids not increasing: {pair:?}");
    }
    // Time-based: the millisecond part is the clock's.
    let (first_ms, _) = ids[0];
    assert!(
        first_ms.abs_diff(now_ms) < 60_000,
        "{first_ms} vs now {now_ms}"
    );
}

#[test]
fn replay_has_no_gap_or_duplicate_under_concurrent_publishing() {
    const N: usize = 300;
    const PER_CONNECTION: usize = 40;
    let d = start("");
    let addr = d.addr;
    let mut c = subscribe(addr, "/events/t", &[]);
    d.wait_subscribers("t", 1);
    let publisher: JoinHandle<Vec<String>> = thread::spawn(move || {
        let mut p = Publisher::new(addr);
        (0..N)
            .map(|i| {
                let id = p.publish("t", &format!("e{i}")).id;
                thread::sleep(Duration::from_millis(1)); // keep publishing while the reader reconnects
                id
            })
            .collect()
    });

    let mut seen: Vec<Ev> = Vec::new();
    let mut reconnects = 0;
    while seen.len() < N {
        for _ in 0..PER_CONNECTION {
            let ev = next_event(&mut c);
            assert_ne!(
                ev.event.as_deref(),
                Some("reset"),
                "no reset: the id is retained"
            );
            seen.push(ev);
            if seen.len() == N {
                break;
            }
        }
        if seen.len() == N {
            break;
        }
        // Drop the connection mid-stream and resume from the last id seen,
        // alternately with the header and with the query parameter.
        drop(c);
        reconnects += 1;
        assert!(reconnects <= N / PER_CONNECTION + 1, "too many reconnects");
        let last = seen
            .last()
            .and_then(|e| e.id.clone())
            .expect("events have ids");
        c = if reconnects % 2 == 1 {
            subscribe(addr, "/events/t", &[&format!("Last-Event-ID: {last}")])
        } else {
            subscribe(addr, &format!("/events/t?lastEventId={last}"), &[])
        };
    }
    let published = publisher.join().expect("publisher thread");
    let got: Vec<String> = seen.iter().map(|e| e.id.clone().expect("an id")).collect();
    assert_eq!(got.len(), published.len());
    let first_diff = got.iter().zip(&published).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "received ids differ from published ones");
    for (i, ev) in seen.iter().enumerate() {
        assert_eq!(ev.data, format!("e{i}"));
    }
    assert!(reconnects >= 2, "both resume forms were used");
    // Nothing more: the next event is a fresh one.
    let marker = publish(addr, "t", "marker");
    assert_eq!(next_event(&mut c).id, Some(marker.id));
}

#[test]
fn resuming_past_retained_history_sends_reset_then_what_is_kept() {
    let d = start("history = 3");
    let cases = [
        ("first", true),
        ("garbage", true),
        ("1-0", false),
        ("second", false),
        ("x\"y\\z", true),
    ];
    for (round, (asked, by_header)) in cases.into_iter().enumerate() {
        // A topic per round, so each starts with exactly ten published.
        let topic = format!("r{round}");
        let ids: Vec<String> = (0..10)
            .map(|i| publish(d.addr, &topic, &i.to_string()).id)
            .collect();
        let asked = match asked {
            "first" => ids[0].clone(),
            "second" => ids[1].clone(),
            other => other.to_owned(),
        };
        let mut c = if by_header {
            subscribe(
                d.addr,
                &format!("/events/{topic}"),
                &[&format!("Last-Event-ID: {asked}")],
            )
        } else {
            subscribe(d.addr, &format!("/events/{topic}?lastEventId={asked}"), &[])
        };
        let reset = next_event(&mut c);
        assert_eq!(
            reset.event.as_deref(),
            Some("reset"),
            "asked {asked}: {reset:?}"
        );
        let v = json(&reset.data);
        assert_eq!(v["lastEventId"], asked.as_str(), "{}", reset.data);
        assert_eq!(v["oldest"], ids[7].as_str(), "{}", reset.data);
        for (i, id) in ids.iter().enumerate().skip(7) {
            let ev = next_event(&mut c);
            assert_eq!(ev.id.as_deref(), Some(id.as_str()), "asked {asked}");
            assert_eq!(ev.data, i.to_string(), "asked {asked}");
        }
        // Exactly the three retained events, then live ones.
        d.wait_subscribers(&topic, 1);
        let live = publish(d.addr, &topic, "live");
        let ev = next_event(&mut c);
        assert_eq!(
            (ev.id, ev.data.as_str()),
            (Some(live.id), "live"),
            "asked {asked}"
        );
    }

    // Up to date: no reset, nothing replayed, straight to live events.
    let last = publish(d.addr, "fresh", "old").id;
    let mut c = subscribe(
        d.addr,
        "/events/fresh",
        &[&format!("Last-Event-ID: {last}")],
    );
    d.wait_subscribers("fresh", 1);
    let live = publish(d.addr, "fresh", "new");
    assert_eq!(next_event(&mut c).id, Some(live.id));

    // An id this server never issued (from the future): reset too.
    let future = "99999999999999-0";
    let mut c = subscribe(d.addr, "/events/r0", &[&format!("Last-Event-ID: {future}")]);
    let reset = next_event(&mut c);
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    assert_eq!(json(&reset.data)["lastEventId"], future);
}

// ---------------------------------------------------------------------------
// Slow subscribers
// ---------------------------------------------------------------------------

/// The hub drops a subscriber whose queue (512 frames) is full; the stream
/// then ends with reason `slow` once it has written what was queued. Here
/// the stuck client stops reading until its connection thread blocks in a
/// write and the queue overflows, then resumes reading (well within
/// `write_timeout`, so that reason cannot come first): it gets exactly the
/// events queued before the drop, the stream ends, and resuming with
/// `Last-Event-ID` replays the rest. A reading subscriber gets everything,
/// and no publish waits on either.
#[test]
fn a_slow_subscriber_is_dropped_while_others_get_everything() {
    const BIG: usize = 60_000;
    let d = start("write_timeout = \"30s\"");
    let addr = d.addr;

    let mut stuck = Raw::open(addr, "/events/big", &[]);
    stuck.read_until(b"retry: 3000\n\n");
    d.wait_subscribers("big", 1);

    let received = Arc::new(AtomicUsize::new(0));
    let reader: JoinHandle<Vec<String>> = thread::spawn({
        let received = Arc::clone(&received);
        move || {
            let mut c = subscribe(addr, "/events/big", &[]);
            let mut ids = Vec::new();
            for _ in 0..4000 {
                let ev = next_event(&mut c);
                if ev.data == "end" {
                    return ids;
                }
                assert_eq!(ev.data.len(), BIG);
                ids.push(ev.id.expect("an id"));
                received.fetch_add(1, Ordering::SeqCst);
            }
            panic!("no end event");
        }
    });
    d.wait_subscribers("big", 2);

    let body = "x".repeat(BIG);
    let mut publisher = Publisher::new(addr);
    let mut published: Vec<String> = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut dropped_at = None;
    for i in 0..2000 {
        // Keep the reading subscriber close behind, so only the stuck one
        // can overflow its queue.
        assert!(
            wait_until(DEADLINE, || received.load(Ordering::SeqCst) + 8
                >= published.len()),
            "the reading subscriber fell behind"
        );
        let t = Instant::now();
        let p = publisher.publish("big", &body);
        slowest = slowest.max(t.elapsed());
        published.push(p.id);
        if p.receivers == 1 {
            dropped_at = Some(i);
            break;
        }
        assert_eq!(p.receivers, 2);
    }
    let dropped_at = dropped_at.expect("the stuck subscriber was never dropped");
    for _ in 0..5 {
        let t = Instant::now();
        let p = publisher.publish("big", &body);
        slowest = slowest.max(t.elapsed());
        assert_eq!(p.receivers, 1, "a dropped subscriber stays dropped");
        published.push(p.id);
    }
    publisher.publish("big", "end");
    let reader_ids = reader.join().expect("reader thread");
    assert!(
        reader_ids == published,
        "the reading subscriber missed or repeated events"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a publish waited {slowest:?}"
    );

    // The stuck client reads again: what was queued before the drop, then
    // the end of the stream.
    stuck.read_to_eof();
    let got = stuck.decode();
    assert_eq!(got.status, 200);
    let stuck_ids: Vec<String> = got
        .frames
        .iter()
        .filter(|f| is_event(f))
        .map(|f| parse_event(f).id.expect("an id"))
        .collect();
    assert!(
        stuck_ids[..] == published[..dropped_at],
        "the stuck subscriber got {} events, want exactly the {dropped_at} before the drop",
        stuck_ids.len()
    );
    assert!(
        wait_until(DEADLINE, || d.disconnects(EndReason::Slow) == 1),
        "no slow disconnect counted"
    );
    assert_eq!(d.disconnects(EndReason::WriteTimeout), 0);
    assert_eq!(metric(&metrics(addr), &disconnect_series("slow")), 1);

    // Resuming replays exactly what it missed.
    let last = stuck_ids.last().expect("got some events");
    let mut c = subscribe(addr, "/events/big", &[&format!("Last-Event-ID: {last}")]);
    let rest: Vec<String> = (dropped_at..published.len())
        .map(|_| next_event(&mut c).id.expect("an id"))
        .collect();
    assert!(
        rest[..] == published[dropped_at..],
        "the replay after a slow drop differs"
    );
    assert_eq!(next_event(&mut c).data, "end");
}

/// A client that stops reading for good is cut once one write has blocked
/// for `write_timeout`, long before its queue could fill.
#[test]
fn a_client_that_stops_reading_is_cut_at_the_write_timeout() {
    let d = start("write_timeout = \"200ms\"");
    let mut stuck = Raw::open(d.addr, "/events/w", &[]);
    stuck.read_until(b"retry: 3000\n\n");
    d.wait_subscribers("w", 1);
    let body = "x".repeat(60_000);
    let mut p = Publisher::new(d.addr);
    // About 1.2 MB: more than the socket buffers hold, far less than the
    // 512 frames that would make it slow.
    for _ in 0..20 {
        p.publish("w", &body);
    }
    assert!(
        wait_until(DEADLINE, || d.disconnects(EndReason::WriteTimeout) == 1),
        "the stuck stream was not cut"
    );
    assert_eq!(d.disconnects(EndReason::Slow), 0);
    assert_eq!(d.hub.subscribers("w"), 0);
    let m = metrics(d.addr);
    assert_eq!(metric(&m, &disconnect_series("write_timeout")), 1);
    assert_eq!(metric(&m, "ssed_connections_open"), 0);
}

/// Stopping the daemon ends open streams with a last comment and a clean
/// end, and counts them as `shutdown`.
#[test]
fn stopping_the_daemon_ends_streams_cleanly() {
    let d = start("");
    let mut streams: Vec<Raw> = ["/events/a", "/events?topic=a&topic=b", "/keys/k"]
        .iter()
        .map(|path| Raw::open(d.addr, path, &[]))
        .collect();
    for s in &mut streams {
        s.read_until(b"retry: 3000\n\n\r\n");
    }
    let stats = d.server.stats();
    let t = Instant::now();
    d.server.stop().expect("clean stop");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t.elapsed()
    );
    for s in &mut streams {
        s.read_to_eof();
        let got = s.decode();
        assert_eq!(
            got.frames.last().map(String::as_str),
            Some(": server shutting down\n\n")
        );
        assert!(got.clean, "{got:?}");
    }
    assert_eq!(stats.snapshot().disconnects(EndReason::Shutdown), 3);
}

// ---------------------------------------------------------------------------
// Mailboxes
// ---------------------------------------------------------------------------

#[test]
fn a_mailbox_delivers_in_order_then_done_ends_the_stream() {
    let d = start("");
    // Pushed before any consumer: the messages wait.
    for (i, m) in ["one", "two", "three"].iter().enumerate() {
        let (head, body) = post(d.addr, "/keys/k", &[], m);
        assert_eq!(head.status, 200, "{body}");
        let v = json(&body);
        assert_eq!(v["key"], "k");
        assert_eq!(v["queued"], i + 1);
    }
    let mut raw = Raw::open(d.addr, "/keys/k", &[]);
    raw.read_until(b"data: three\n\n");
    assert_eq!(d.hub.mailbox_len("k"), 0, "delivered messages are removed");
    post(d.addr, "/keys/k", &[], "[DONE]");
    raw.read_to_eof();
    let got = raw.decode();
    assert_eq!(got.status, 200);
    assert_eq!(
        got.frames,
        [
            "retry: 3000\n\n",
            "data: one\n\n",
            "data: two\n\n",
            "data: three\n\n",
            "data: [DONE]\n\n"
        ]
    );
    assert!(
        got.clean,
        "[DONE] ends the stream with the terminating chunk"
    );

    // A consumer that comes first waits for the next message.
    let mut c = subscribe(d.addr, "/keys/later", &[]);
    thread::sleep(Duration::from_millis(50));
    post(d.addr, "/keys/later", &[], "finally");
    assert_eq!(next_event(&mut c).data, "finally");
    // Multi-line messages keep their lines.
    post(d.addr, "/keys/later", &[], "a\nb");
    assert_eq!(next_event(&mut c).data, "a\nb");
}

#[test]
fn two_concurrent_consumers_get_each_message_exactly_once() {
    const N: usize = 200;
    let d = start("");
    let addr = d.addr;
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    let consumers: Vec<JoinHandle<Vec<String>>> = (0..2)
        .map(|_| {
            let ready = ready_tx.clone();
            thread::spawn(move || {
                let mut c = subscribe(addr, "/keys/jobs", &[]);
                ready.send(()).expect("test alive");
                let mut got = Vec::new();
                for _ in 0..=N {
                    let ev = next_event(&mut c);
                    if ev.data == "[DONE]" {
                        assert_eq!(c.next_frame(), None, "the stream ends after [DONE]");
                        return got;
                    }
                    got.push(ev.data);
                }
                panic!("no [DONE]");
            })
        })
        .collect();
    for _ in 0..2 {
        ready_rx.recv_timeout(DEADLINE).expect("consumer connected");
    }
    let mut p = Publisher::new(addr);
    for i in 0..N {
        let (head, body) = p.push("jobs", &format!("m{i}"));
        assert_eq!(head.status, 200, "{body}");
    }
    for _ in 0..2 {
        assert_eq!(p.push("jobs", "[DONE]").0.status, 200);
    }
    let got: Vec<Vec<String>> = consumers
        .into_iter()
        .map(|h| h.join().expect("consumer thread"))
        .collect();
    let total: usize = got.iter().map(Vec::len).sum();
    let union: HashSet<&String> = got.iter().flatten().collect();
    let want: HashSet<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(
        total,
        N,
        "duplicates: {} and {} messages",
        got[0].len(),
        got[1].len()
    );
    assert_eq!(union, want.iter().collect(), "messages lost");
    // Each consumer sees its share in push order.
    for share in &got {
        let nums: Vec<usize> = share
            .iter()
            .map(|m| m[1..].parse().expect("m<i>"))
            .collect();
        assert!(
            nums.windows(2).all(|w| w[0] < w[1]),
            "out of order: {nums:?}"
        );
    }
    assert_eq!(d.hub.mailbox_len("jobs"), 0);
}

#[test]
fn a_full_mailbox_refuses_with_429_and_drops_nothing() {
    const CAPACITY: usize = 1000;
    let d = start("");
    let mut p = Publisher::new(d.addr);
    for i in 0..CAPACITY {
        let (head, body) = p.push("full", &format!("m{i}"));
        assert_eq!(head.status, 200, "push {i}: {body}");
        assert_eq!(json(&body)["queued"], i + 1);
    }
    let r = p.push("full", "one too many");
    assert_error("push past capacity", &r, 429);
    assert!(r.0.header("retry-after").is_some(), "{:?}", r.0);
    assert_eq!(d.hub.mailbox_len("full"), CAPACITY);

    let mut c = subscribe(d.addr, "/keys/full", &[]);
    for i in 0..CAPACITY {
        assert_eq!(next_event(&mut c).data, format!("m{i}"));
    }
    assert_eq!(
        p.push("full", "[DONE]").0.status,
        200,
        "room again once consumed"
    );
    assert_eq!(next_event(&mut c).data, "[DONE]");
    assert_eq!(c.next_frame(), None);
}

// ---------------------------------------------------------------------------
// Authentication and tickets
// ---------------------------------------------------------------------------

fn assert_unauthorized(what: &str, r: &(Head, String)) {
    assert_error(what, r, 401);
    assert!(
        r.0.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{what}: {:?}",
        r.0
    );
}

/// Opens a stream that must be refused; its answer.
fn refused(addr: SocketAddr, path: &str, headers: &[&str]) -> (Head, String) {
    let (mut c, head) = open(addr, path, headers);
    let body = String::from_utf8(c.body(&head)).expect("utf-8");
    (head, body)
}

const AUTH: &str =
    "ticket_session = \"2m\"\n[auth]\npublish_token = \"p\"\nsubscribe_token = \"s\"";

#[test]
fn publishing_and_subscribing_check_their_tokens() {
    let d = start(AUTH);
    assert_unauthorized(
        "publish without token",
        &post(d.addr, "/publish/t", &[], "x"),
    );
    assert_unauthorized(
        "publish, wrong token",
        &post(d.addr, "/publish/t", &["Authorization: Bearer s"], "x"),
    );
    assert_unauthorized("push without token", &post(d.addr, "/keys/k", &[], "x"));
    assert_eq!(d.hub.published(), 0);
    let r = post(d.addr, "/publish/t", &["Authorization: Bearer p"], "x");
    assert_eq!(r.0.status, 200, "{}", r.1);
    let r = post(d.addr, "/keys/k", &["Authorization: bearer p"], "x");
    assert_eq!(r.0.status, 200, "{}", r.1);

    assert_unauthorized(
        "subscribe without token",
        &refused(d.addr, "/events/t", &[]),
    );
    assert_unauthorized(
        "subscribe, wrong Bearer",
        &refused(d.addr, "/events/t", &["Authorization: Bearer p"]),
    );
    assert_unauthorized(
        "subscribe, wrong ?token",
        &refused(d.addr, "/events/t?token=p", &[]),
    );
    assert_unauthorized("consume without token", &refused(d.addr, "/keys/k", &[]));
    let _a = subscribe(d.addr, "/events/t", &["Authorization: Bearer s"]);
    let _b = subscribe(d.addr, "/events/t?token=s", &[]);
    let mut k = subscribe(d.addr, "/keys/k?token=s", &[]);
    assert_eq!(next_event(&mut k).data, "x");
}

#[test]
fn tickets_are_single_use_and_set_a_session_cookie() {
    let d = start(AUTH);
    assert_unauthorized("ticket without token", &post(d.addr, "/tickets", &[], ""));
    assert_unauthorized(
        "ticket with wrong token",
        &post(d.addr, "/tickets", &["Authorization: Bearer p"], ""),
    );
    let (head, body) = post(d.addr, "/tickets", &["Authorization: Bearer s"], "");
    assert_eq!(head.status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["expires_in"], 30, "{body}");
    let ticket = v["ticket"].as_str().expect("a ticket").to_owned();
    assert_eq!(ticket.len(), 32, "{ticket}");
    assert!(ticket.bytes().all(|b| b.is_ascii_hexdigit()), "{ticket}");

    let url = format!("/events/x?ticket={ticket}");
    let (mut c, head) = open(d.addr, &url, &[]);
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(c.next_frame().as_deref(), Some("retry: 3000\n\n"));
    let cookie = head
        .header("set-cookie")
        .expect("a session cookie")
        .to_owned();
    let attrs: Vec<&str> = cookie.split(';').map(str::trim).collect();
    let session = attrs[0]
        .strip_prefix("ssed_session=")
        .expect("named ssed_session");
    assert!(
        !session.is_empty() && !session.contains(&ticket),
        "{cookie}"
    );
    for want in ["HttpOnly", "SameSite=Strict", "Max-Age=120"] {
        assert!(attrs.contains(&want), "{want} missing from {cookie}");
    }
    drop(c);

    // Single use: the same URL without the cookie is refused...
    assert_unauthorized("spent ticket", &refused(d.addr, &url, &[]));
    // ...and with it (a browser's reconnect) let in.
    let cookie_header = format!("Cookie: other=1; ssed_session={session}");
    let _again = subscribe(d.addr, &url, &[&cookie_header]);
    let _plain = subscribe(d.addr, "/events/x", &[&cookie_header]);
    assert_unauthorized(
        "forged session",
        &refused(d.addr, "/events/x", &["Cookie: ssed_session=0123"]),
    );
    assert_unauthorized(
        "unknown ticket",
        &refused(
            d.addr,
            "/events/x?ticket=00000000000000000000000000000000",
            &[],
        ),
    );

    // No subscribe token configured: subscribing is open, no tickets.
    let open_daemon = start("");
    let r = post(
        open_daemon.addr,
        "/tickets",
        &["Authorization: Bearer s"],
        "",
    );
    assert_error("tickets without subscribe_token", &r, 404);
}

// ---------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------

#[test]
fn cors_allows_listed_origins_only() {
    let d = start("cors_origins = [\"https://app.example\"]");
    let (mut c, head) = open(d.addr, "/events/x", &["Origin: https://app.example"]);
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(
        head.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        head.header("access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(c.next_frame().as_deref(), Some("retry: 3000\n\n"));

    let r = refused(d.addr, "/events/x", &["Origin: https://evil.example"]);
    assert_error("foreign origin", &r, 403);
    assert!(
        r.0.header("access-control-allow-origin").is_none(),
        "{:?}",
        r.0
    );
    assert_error(
        "publish from a foreign origin",
        &post(d.addr, "/publish/x", &["Origin: https://evil.example"], "x"),
        403,
    );

    // Same origin (the page served by this daemon): no CORS headers needed.
    let same = format!("Origin: http://{}", d.addr);
    let (_c, head) = open(d.addr, "/events/x", &[&same]);
    assert_eq!(head.status, 200, "{head:?}");
    assert!(
        head.header("access-control-allow-origin").is_none(),
        "{head:?}"
    );

    // Preflight.
    let (head, _) = call(
        d.addr,
        "OPTIONS",
        "/events/x",
        &[
            "Origin: https://app.example",
            "Access-Control-Request-Method: GET",
            "Access-Control-Request-Headers: last-event-id",
        ],
        b"",
    );
    assert_eq!(head.status, 204, "{head:?}");
    assert_eq!(
        head.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let methods = head
        .header("access-control-allow-methods")
        .expect("Allow-Methods");
    assert!(
        methods.contains("GET") && methods.contains("POST"),
        "{methods}"
    );
    let headers = head
        .header("access-control-allow-headers")
        .expect("Allow-Headers")
        .to_ascii_lowercase();
    assert!(
        headers.contains("last-event-id") && headers.contains("authorization"),
        "{headers}"
    );
    let r = call(
        d.addr,
        "OPTIONS",
        "/events/x",
        &[
            "Origin: https://evil.example",
            "Access-Control-Request-Method: GET",
        ],
        b"",
    );
    assert_error("preflight from a foreign origin", &r, 403);

    // An allowed origin may publish too (with loopback's right to).
    let (head, body) = post(d.addr, "/publish/x", &["Origin: https://app.example"], "x");
    assert_eq!(head.status, 200, "{body}");
    assert_eq!(
        head.header("access-control-allow-origin"),
        Some("https://app.example")
    );

    // "*" lets any origin in, echoed so that credentials work.
    let any = start("cors_origins = [\"*\"]");
    let (_c, head) = open(any.addr, "/events/x", &["Origin: https://whoever.example"]);
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(
        head.header("access-control-allow-origin"),
        Some("https://whoever.example")
    );
    assert_eq!(
        head.header("access-control-allow-credentials"),
        Some("true")
    );
}

// ---------------------------------------------------------------------------
// Heartbeats and the execution-time budget
// ---------------------------------------------------------------------------

#[test]
fn heartbeat_comments_keep_an_idle_stream_alive() {
    let d = start("heartbeat = \"100ms\"");
    let mut c = subscribe(d.addr, "/events/quiet", &[]);
    let t = Instant::now();
    for _ in 0..3 {
        assert_eq!(c.next_frame().as_deref(), Some(": keep-alive\n\n"));
    }
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "heartbeats came too fast: {:?}",
        t.elapsed()
    );
}

#[test]
fn heartbeat_events_are_pings_with_the_time() {
    let d = start("heartbeat = \"100ms\"\nheartbeat_event = true");
    let mut c = subscribe(d.addr, "/events/quiet", &[]);
    for _ in 0..2 {
        let ev = next_event(&mut c);
        assert_eq!(ev.event.as_deref(), Some("ping"), "{ev:?}");
        let v = json(&ev.data);
        let time = v["time"].as_str().expect("a time string");
        assert!(
            time.ends_with('Z') && time.contains('T') && time.len() >= 20,
            "{time}"
        );
        let year: u32 = time[..4].parse().expect("a year");
        assert!(year >= 2024, "{time}");
    }
}

/// An idle subscriber's own thread never writes to its socket: its head,
/// `retry:`, a short replay, heartbeats and sparse events all go out from
/// the hub's waker threads. (A thread that once writes to a TCP socket
/// keeps a kernel page fragment, 32 KiB by default, until it ends: most of
/// what an idle stream would cost the machine.) The streams still see
/// everything, in order; once they end, their threads write the close.
#[test]
fn idle_subscribers_threads_never_write_themselves() {
    const STREAMS: usize = 12;
    // Events well before the first heartbeat is due: a thread that is
    // awake (a heartbeat's wake-up) when an event comes writes that event
    // itself, as it should, and this test is about idle threads.
    let d = start("heartbeat = \"500ms\"");
    let first = publish(d.addr, "quiet", "before");
    publish(d.addr, "quiet", "missed");
    // Half resume after the first event (a replay of one), half are new.
    let resume = format!("Last-Event-ID: {}", first.id);
    let mut clients: Vec<Client> = (0..STREAMS)
        .map(|i| {
            if i % 2 == 0 {
                let mut c = subscribe(d.addr, "/events/quiet", &[&resume]);
                assert_eq!(next_event(&mut c).data, "missed");
                c
            } else {
                subscribe(d.addr, "/events/quiet", &[])
            }
        })
        .collect();
    // Sparse events reach every stream, then heartbeats.
    for n in 0..3 {
        thread::sleep(Duration::from_millis(40));
        let data = format!("sparse {n}");
        publish(d.addr, "quiet", &data);
        for c in &mut clients {
            assert_eq!(next_event(c).data, data);
        }
    }
    for c in &mut clients {
        for _ in 0..2 {
            assert_eq!(c.next_frame().as_deref(), Some(": keep-alive\n\n"));
        }
    }
    let stats = d.server.stats().snapshot();
    assert_eq!(stats.streams_open, STREAMS as u64);
    assert_eq!(
        stats.thread_writes, 0,
        "stream threads wrote to their sockets themselves"
    );
    assert_eq!(
        metric(&metrics(d.addr), "ssed_stream_thread_writes_total"),
        0
    );

    // Ending: each thread writes its own last frame at shutdown.
    d.server.shutdown_handle().shutdown();
    for c in &mut clients {
        let rest = c.until_end(16);
        assert!(
            rest.iter().any(|f| f.contains("server shutting down")),
            "{rest:?}"
        );
    }
    assert!(
        wait_until(DEADLINE, || d.server.stats().snapshot().thread_writes
            == STREAMS as u64),
        "one last write per stream, by its thread: {}",
        d.server.stats().snapshot().thread_writes
    );
}

#[test]
fn an_idle_stream_ends_at_its_budget_and_resumes_with_last_event_id() {
    let d = start("heartbeat = \"0\"\nmax_execution_time = \"300ms\"");
    let mut c = subscribe(d.addr, "/events/b", &[]);
    d.wait_subscribers("b", 1);
    let first = publish(d.addr, "b", "before");
    assert_eq!(next_event(&mut c).id, Some(first.id.clone()));
    // The send reset the budget; nothing more comes, so it runs out.
    let t = Instant::now();
    assert_eq!(c.next_frame(), None, "the idle stream ended");
    let idle = t.elapsed();
    assert!(
        idle >= Duration::from_millis(200) && idle < Duration::from_secs(3),
        "ended after {idle:?}, budget 300ms"
    );
    assert!(wait_until(DEADLINE, || d.disconnects(EndReason::Budget) == 1));
    assert_eq!(metric(&metrics(d.addr), &disconnect_series("budget")), 1);

    // Published while the client was away: replayed on resume.
    d.wait_subscribers("b", 0);
    let missed: Vec<String> = ["m1", "m2"]
        .iter()
        .map(|m| publish(d.addr, "b", m).id)
        .collect();
    let mut c = subscribe(
        d.addr,
        "/events/b",
        &[&format!("Last-Event-ID: {}", first.id)],
    );
    for (id, data) in missed.iter().zip(["m1", "m2"]) {
        let ev = next_event(&mut c);
        assert_eq!(
            (ev.id.as_deref(), ev.data.as_str(), ev.event),
            (Some(id.as_str()), data, None)
        );
    }
}

// ---------------------------------------------------------------------------
// Known bugs: these assert DESIGN.md's contract and fail today
// ---------------------------------------------------------------------------

/// Principle 7: an event acknowledged with 2xx reaches every live subscriber
/// of its topic, or that subscriber is disconnected. A stream following two
/// topics that overflows its queue on one of them must end (as `slow`) like
/// a single-topic one, so its client resumes from history.
#[test]
fn a_slow_subscriber_of_several_topics_is_dropped_from_all_of_them() {
    const BIG: usize = 60_000;
    let d = start("write_timeout = \"30s\"");
    let addr = d.addr;
    let mut stuck = Raw::open(addr, "/events?topic=a&topic=b", &[]);
    stuck.read_until(b"retry: 3000\n\n");
    d.wait_subscribers("a", 1);
    d.wait_subscribers("b", 1);

    let body = "x".repeat(BIG);
    let mut p = Publisher::new(addr);
    let mut published = Vec::new();
    for _ in 0..2000 {
        let r = p.publish("a", &body);
        published.push(r.id);
        if r.receivers == 0 {
            break;
        }
    }
    let dropped_at = published.len() - 1;
    assert_eq!(
        d.hub.subscribers("a"),
        0,
        "the stuck subscriber was never dropped"
    );

    // The client reads again and gets what was queued before the drop...
    let last_queued = format!("id: {}\n", published[dropped_at - 1]);
    stuck.read_until(last_queued.as_bytes());
    // ...after which its stream must end, leaving topic b too.
    assert!(
        wait_until(DEADLINE, || d.hub.subscribers("b") == 0),
        "dropped from topic a as slow, the stream still follows topic b: \
         events of a published meanwhile are lost without a disconnect"
    );
    stuck.read_to_eof();
    assert!(wait_until(DEADLINE, || d.disconnects(EndReason::Slow) == 1));
}

/// `GET /keys/{key}`: each message is delivered exactly once. A consumer
/// that closed its connection before a message was pushed must not take
/// it: the server can see the peer's FIN (`Stream::check_connection`)
/// before taking a message, and the next consumer gets it.
#[test]
fn a_mailbox_message_is_not_lost_to_a_consumer_that_left() {
    let d = start("");
    let gone = subscribe(d.addr, "/keys/lost", &[]);
    drop(gone);
    thread::sleep(Duration::from_millis(100)); // the FIN reaches the server
    let (head, body) = post(d.addr, "/keys/lost", &[], "m1");
    assert_eq!(head.status, 200, "{body}");

    let mut next = subscribe(d.addr, "/keys/lost", &[]);
    next.conn
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    let frame = next.try_next_frame();
    assert!(
        matches!(&frame, Ok(Some(f)) if f == "data: m1\n\n"),
        "the message pushed after the first consumer left was lost: {frame:?} \
         (mailbox now holds {})",
        d.hub.mailbox_len("lost")
    );
}
