#![cfg(all(feature = "daemon", feature = "durable"))]
//! The operators' endpoints over real sockets: `GET /streams` lists the
//! open streams (subscribers of `/events` and of the Mercure endpoint,
//! mailbox consumers) with their subject, topics and counts, filtered by
//! `?topic=` and `?subject=`; `DELETE /streams/{id}` and `DELETE
//! /streams?subject=|topic=` end them now, asleep or stuck in a write, on
//! the memory, `data_dir` and Redis engines; `[auth] admin_token` guards
//! them, and with none set only this machine may use them.
//!
//! The Redis case uses the machine's Redis (names unique to the run,
//! deleted after); without one it says why and passes, except under
//! `CI=true`. The case of a client on another machine needs a network
//! namespace (root and `ip`), with the same rule.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use ssed::Event;
use support::{Client, Head, InProcess, TempDir, daemon, encode, hs256, metric, wait_until};

const SECRET: &str = "operators-jwt-secret";
const ADMIN: &str = "the-operators-token";
/// The longest any test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(5);

/// A JWT for `sub` that may subscribe to everything.
fn jwt(sub: &str) -> String {
    hs256(
        SECRET,
        &json!({"alg": "HS256"}),
        &json!({"sub": sub, "mercure": {"subscribe": ["*"], "publish": ["*"]}}),
    )
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// Opens `path` as an event stream with extra header lines; it is open
/// (its head read) when this returns.
fn open(addr: SocketAddr, path: &str, extra: &[&str]) -> Client {
    let mut c = Client::new(addr);
    let head = c.get_stream(path, extra);
    assert_eq!(head.status, 200, "{path}: {head:?}");
    c
}

/// Sends `method path` with `extra` header lines and reads the whole
/// answer (the connection closes after it): its head and body, the body
/// decoded from its chunks when it came chunked.
fn call(addr: SocketAddr, method: &str, path: &str, extra: &[&str]) -> (Head, String) {
    let req = support::request_text(method, path, "127.0.0.1", extra, "");
    answer(support::connect(addr), &req)
}

/// Sends `req` on `conn` and reads the answer to the connection's end.
fn answer(mut conn: TcpStream, req: &str) -> (Head, String) {
    conn.write_all(req.as_bytes()).expect("send");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).expect("the whole answer");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let text = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let mut status_line = lines.next().unwrap_or_default().splitn(3, ' ');
    let version = status_line.next().unwrap_or_default().to_owned();
    let status = status_line
        .next()
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let head = Head {
        version,
        status,
        headers,
    };
    let body = &raw[end + 4..];
    let body = if head.is_chunked() {
        dechunk(body)
    } else {
        body.to_vec()
    };
    (head, String::from_utf8(body).expect("a UTF-8 body"))
}

/// The body of a chunked message: its chunks' data, up to the last chunk.
fn dechunk(raw: &[u8]) -> Vec<u8> {
    chunks(raw).concat()
}

/// The chunks of a chunked message's body, up to the last chunk.
fn chunks(mut raw: &[u8]) -> Vec<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size = usize::from_str_radix(
            std::str::from_utf8(&raw[..line_end]).expect("ASCII").trim(),
            16,
        )
        .expect("a hex chunk size");
        let data = &raw[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.push(data[..size].to_vec());
        assert_eq!(&data[size..size + 2], b"\r\n", "a chunk ends with CRLF");
        raw = &data[size + 2..];
    }
}

/// `GET /streams…` as this machine: the listed streams.
fn list(addr: SocketAddr, query: &str) -> Vec<Value> {
    list_as(addr, query, &[])
}

fn list_as(addr: SocketAddr, query: &str, extra: &[&str]) -> Vec<Value> {
    let (head, body) = call(addr, "GET", &format!("/streams{query}"), extra);
    assert_eq!(head.status, 200, "GET /streams{query}: {body}");
    assert_eq!(head.header("content-type"), Some("application/json"));
    assert!(head.is_chunked(), "a listing is streamed out: {head:?}");
    match serde_json::from_str(&body) {
        Ok(Value::Array(streams)) => streams,
        other => panic!("not a JSON array: {other:?} from {body}"),
    }
}

/// `DELETE path` as this machine: the status and the answer's `ended`.
fn delete(addr: SocketAddr, path: &str) -> (u16, Option<u64>) {
    let (head, body) = call(addr, "DELETE", path, &[]);
    let ended = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["ended"].as_u64());
    (head.status, ended)
}

/// The listed stream whose peer is `c`'s end of the connection.
fn listed<'a>(streams: &'a [Value], c: &Client) -> &'a Value {
    let me = c.conn.local_addr().expect("local address").to_string();
    streams
        .iter()
        .find(|s| s["peer"] == me.as_str())
        .unwrap_or_else(|| panic!("{me} is not listed: {streams:?}"))
}

fn id_of(streams: &[Value], c: &Client) -> u64 {
    listed(streams, c)["id"].as_u64().expect("a numeric id")
}

fn topics(s: &Value) -> Vec<&str> {
    s["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .map(|t| t.as_str().expect("a topic"))
        .collect()
}

fn revoked(addr: SocketAddr) -> u64 {
    metric(addr, "ssed_disconnects_total{reason=\"revoked\"}")
}

/// Whether `c` receives the event `data` (after whatever came before it).
fn receives(c: &mut Client, data: &str) -> bool {
    let want = format!("data: {data}\n");
    (0..10).any(|_| c.next_frame().is_some_and(|f| f.contains(&want)))
}

/// A daemon that verifies JWTs signed with `SECRET`, with `extra` top
/// level lines and `auth` lines in `[auth]`.
fn jwt_daemon(extra: &str, auth: &str) -> InProcess {
    daemon(&format!(
        "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\nmax_execution_time = \"0\"\n{extra}\n\
         [auth]\njwt_secret = \"{SECRET}\"\n{auth}\n"
    ))
}

#[test]
fn lists_every_kind_of_stream_with_its_subject_topics_and_counts() {
    let d = jwt_daemon("", "");
    let alice = bearer(&jwt("alice"));
    let bob = bearer(&jwt("bob"));
    let mut two = open(d.addr, "/events?topic=a&topic=b", &[&alice]);
    let one = open(d.addr, "/events/c", &[&bob]);
    let template = "https://example.com/books/{id}";
    let mercure = open(
        d.addr,
        &format!("/.well-known/mercure?topic={}", encode(template)),
        &[&alice],
    );
    let consumer = open(d.addr, "/keys/box", &[&alice]);
    d.hub
        .publish("a", Event::new().data("hello"))
        .expect("published");
    assert!(receives(&mut two, "hello"));

    let all = list(d.addr, "");
    assert_eq!(all.len(), 4, "{all:?}");
    let s = listed(&all, &two);
    assert_eq!(s["subject"], "alice");
    assert_eq!(s["kind"], "subscriber");
    assert_eq!(topics(s), ["a", "b"]);
    assert!(s["frames"].as_u64().expect("frames") >= 2, "{s}"); // retry, event
    assert!(s["bytes"].as_u64().expect("bytes") > 100, "{s}"); // the head too
    assert_eq!(s["queued"], 0);
    assert_eq!(s["client"], "127.0.0.1");
    let opened = s["opened"].as_str().expect("opened");
    assert!(
        opened.len() == 24 && opened.as_bytes()[10] == b'T' && opened.ends_with('Z'),
        "RFC 3339: {opened}"
    );
    let s = listed(&all, &one);
    assert_eq!((&s["subject"], topics(s)), (&json!("bob"), vec!["c"]));
    let s = listed(&all, &mercure);
    assert_eq!(
        (&s["subject"], topics(s)),
        (&json!("alice"), vec![template])
    );
    let s = listed(&all, &consumer);
    assert_eq!(s["kind"], "mailbox");
    assert_eq!(topics(s), ["box"]);
    let mut ids: Vec<u64> = all.iter().map(|s| s["id"].as_u64().expect("id")).collect();
    ids.dedup();
    assert_eq!(ids.len(), 4, "one id each: {ids:?}");

    // Filters: exact topics (a selector as given), subjects, both.
    // In no particular order.
    let peers = |streams: Vec<Value>| -> Vec<String> {
        let mut peers: Vec<String> = streams
            .iter()
            .map(|s| s["peer"].as_str().expect("peer").to_owned())
            .collect();
        peers.sort();
        peers
    };
    let peer = |c: &Client| c.conn.local_addr().expect("addr").to_string();
    assert_eq!(peers(list(d.addr, "?topic=b")), [peer(&two)]);
    assert_eq!(
        peers(list(d.addr, &format!("?topic={}", encode(template)))),
        [peer(&mercure)]
    );
    assert_eq!(peers(list(d.addr, "?topic=box")), [peer(&consumer)]);
    assert!(list(d.addr, "?topic=books").is_empty());
    let mut alices = vec![peer(&two), peer(&mercure), peer(&consumer)];
    alices.sort();
    assert_eq!(peers(list(d.addr, "?subject=alice")), alices);
    assert_eq!(peers(list(d.addr, "?subject=alice&topic=a")), [peer(&two)]);
    assert!(list(d.addr, "?subject=alice&topic=c").is_empty());
    for bad in ["?colour=red", "?topic=", "?topic=a&topic=b", "?subject="] {
        let (head, body) = call(d.addr, "GET", &format!("/streams{bad}"), &[]);
        assert_eq!(head.status, 400, "{bad}: {body}");
    }
    // HTTP/1.0 gets the listing close-delimited.
    let (head, body) = answer(
        support::connect(d.addr),
        "GET /streams?topic=c HTTP/1.0\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    assert!(!head.is_chunked() && head.header("content-length").is_none());
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v[0]["subject"], "bob");
    drop((one, consumer));
}

/// Ends a user's streams by subject on `d`: exactly theirs, across their
/// topics; the others stay and still receive events. `publish` publishes
/// `data` on a topic.
/// Publishes `data` on `topic` through the daemon's hub.
fn publish_on(d: &InProcess, topic: &str, data: &str) {
    d.hub
        .publish(topic, Event::new().data(data))
        .expect("published");
}

fn ending_by_subject(d: &InProcess, names: [&str; 2], publish: &dyn Fn(&str, &str)) {
    let [a, b] = names;
    let (alice, bob) = (bearer(&jwt("alice")), bearer(&jwt("bob")));
    let mut theirs = vec![
        open(d.addr, &format!("/events/{a}"), &[&alice]),
        open(d.addr, &format!("/events?topic={a}&topic={b}"), &[&alice]),
        open(
            d.addr,
            &format!("/.well-known/mercure?match={b}"),
            &[&alice],
        ),
    ];
    let mut others = [
        open(d.addr, &format!("/events/{a}"), &[&bob]),
        open(d.addr, &format!("/.well-known/mercure?topic={b}"), &[]),
    ];
    let listed = list(d.addr, &format!("?subject=alice&topic={b}"));
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(delete(d.addr, "/streams?subject=alice"), (200, Some(3)));
    for c in &mut theirs {
        assert!(c.closed_within(DEADLINE), "alice's stream is still open");
    }
    assert!(wait_until(DEADLINE, || revoked(d.addr) == 3));
    assert!(list(d.addr, "?subject=alice").is_empty());
    assert_eq!(list(d.addr, "").len(), 2);
    publish(a, "still-here-a");
    publish(b, "still-here-b");
    assert!(receives(&mut others[0], "still-here-a"));
    assert!(receives(&mut others[1], "still-here-b"));
    // Nothing left to end: none, and not an error.
    assert_eq!(delete(d.addr, "/streams?subject=alice"), (200, Some(0)));
}

#[test]
fn deleting_by_subject_ends_exactly_that_users_streams() {
    let d = jwt_daemon("", "anonymous = true");
    ending_by_subject(&d, ["a", "b"], &|topic, data| publish_on(&d, topic, data));
}

#[test]
fn deleting_by_subject_works_with_a_data_dir() {
    let dir = TempDir::new("operators-durable");
    let d = jwt_daemon(
        &format!("data_dir = \"{}\"", dir.path().display()),
        "anonymous = true",
    );
    ending_by_subject(&d, ["a", "b"], &|topic, data| publish_on(&d, topic, data));
}

#[test]
fn deleting_by_subject_works_with_redis() {
    let Some(redis) = support::redis::redis("operators-redis") else {
        return;
    };
    let run = support::redis::unique_run("operators");
    let (a, b) = (format!("{run}a"), format!("{run}b"));
    let _cleanup = support::redis::TopicCleanup {
        redis,
        topics: vec![a.clone(), b.clone()],
    };
    // `[redis]` goes last: the lines after a table are that table's.
    let node = |auth: &str| {
        daemon(&format!(
            "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\nmax_execution_time = \"0\"\n\
             [auth]\njwt_secret = \"{SECRET}\"\n{auth}\n[redis]\nurl = \"redis://{redis}\"\n"
        ))
    };
    let d = node("anonymous = true");
    // Published through another node of the same Redis: what reaches this
    // one comes in through its reader.
    let other = node("");
    let publish = |topic: &str, data: &str| {
        other
            .hub
            .publish(topic, Event::new().data(data))
            .expect("published");
    };
    ending_by_subject(&d, [&a, &b], &publish);
}

#[test]
fn deleting_by_id_and_by_topic() {
    let d = daemon("listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\nmax_execution_time = \"0\"\n");
    let mut x = open(d.addr, "/events/x", &[]);
    let mut y1 = open(d.addr, "/events/y", &[]);
    let mut y2 = open(d.addr, "/events?topic=y&topic=z", &[]);
    let mut z = open(d.addr, "/events/z", &[]);
    let all = list(d.addr, "");
    let id = id_of(&all, &x);
    assert_eq!(delete(d.addr, &format!("/streams/{id}")), (200, Some(1)));
    assert!(x.closed_within(DEADLINE), "stream {id} is still open");
    assert_eq!(
        delete(d.addr, &format!("/streams/{id}")).0,
        404,
        "ended already"
    );
    assert_eq!(delete(d.addr, "/streams/123456789").0, 404);
    assert_eq!(delete(d.addr, "/streams/not-an-id").0, 404);
    assert_eq!(delete(d.addr, "/streams?topic=y"), (200, Some(2)));
    assert!(y1.closed_within(DEADLINE) && y2.closed_within(DEADLINE));
    // Bad or missing filters end nothing.
    for bad in [
        "/streams",
        "/streams?topic=",
        "/streams?everything=1",
        &format!("/streams/{}?topic=z", id_of(&all, &z)),
    ] {
        assert_eq!(delete(d.addr, bad).0, 400, "{bad}");
    }
    assert!(wait_until(DEADLINE, || revoked(d.addr) == 3));
    d.hub
        .publish("z", Event::new().data("z-lives"))
        .expect("published");
    assert!(receives(&mut z, "z-lives"));
    assert_eq!(list(d.addr, "").len(), 1);
}

/// A client socket with a small receive buffer, connected to `addr`: a
/// stream to it fills the server's socket after a few events when it
/// does not read.
fn small_window(addr: SocketAddr) -> TcpStream {
    let fd = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .expect("socket");
    rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 4096).expect("SO_RCVBUF");
    rustix::net::connect(&fd, &addr).expect("connect");
    let conn = TcpStream::from(fd);
    conn.set_read_timeout(Some(DEADLINE)).expect("timeout");
    conn
}

#[test]
fn ends_a_sleeping_stream_and_one_stuck_in_a_write_at_once() {
    // A write may block for a minute: only the revocation can end it soon.
    let d = daemon(
        "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\nmax_execution_time = \"0\"\n\
         write_timeout = \"60s\"\n",
    );
    // Asleep: an idle subscriber, its thread parked.
    let mut idle = open(d.addr, "/events/quiet", &[]);
    let id = id_of(&list(d.addr, "?topic=quiet"), &idle);
    let asked = Instant::now();
    assert_eq!(delete(d.addr, &format!("/streams/{id}")), (200, Some(1)));
    assert!(idle.closed_within(DEADLINE));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );

    // Asleep on a channel: a mailbox consumer waiting for a message.
    let mut consumer = open(d.addr, "/keys/inbox", &[]);
    assert_eq!(delete(d.addr, "/streams?topic=inbox"), (200, Some(1)));
    assert!(consumer.closed_within(DEADLINE));

    // Stuck in a write: a subscriber that reads nothing while 4 KiB events
    // come until they queue up behind the write its thread is blocked in.
    let mut stuck = Client::from_conn(small_window(d.addr));
    let head = stuck.get_stream("/events/busy", &[]);
    assert_eq!(head.status, 200);
    let big = "x".repeat(4096);
    let mut queued = 0;
    for _ in 0..150 {
        d.hub
            .publish("busy", Event::new().data(big.as_str()))
            .expect("published");
        std::thread::sleep(Duration::from_millis(5));
        queued = list(d.addr, "?topic=busy")[0]["queued"]
            .as_u64()
            .expect("queued");
        if queued >= 3 {
            break;
        }
    }
    assert!(queued >= 3, "the stream never fell behind");
    let writes = metric(d.addr, "ssed_stream_thread_writes_total");
    assert!(writes > 0, "its own thread is the one writing");
    let asked = Instant::now();
    assert_eq!(delete(d.addr, "/streams?topic=busy"), (200, Some(1)));
    assert!(wait_until(DEADLINE, || revoked(d.addr) == 3));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    assert!(stuck.closed_within(DEADLINE));
    assert!(list(d.addr, "").is_empty());
    assert_eq!(metric(d.addr, "ssed_disconnects_total{reason=\"slow\"}"), 0);
}

#[test]
fn the_admin_token_guards_them_and_without_one_only_this_machine() {
    let d = daemon(&format!(
        "listen = \"127.0.0.1:0\"\n[auth]\nadmin_token = \"{ADMIN}\"\n"
    ));
    let _s = open(d.addr, "/events/t", &[]);
    let ok = bearer(ADMIN);
    let wrong = bearer("not-the-token");
    for (method, path) in [("GET", "/streams"), ("DELETE", "/streams?topic=t")] {
        let (head, body) = call(d.addr, method, path, &[]);
        assert_eq!(head.status, 401, "{method} {path} without a token: {body}");
        assert!(
            head.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "{head:?}"
        );
        let (head, body) = call(d.addr, method, path, &[&wrong]);
        assert_eq!(
            head.status, 401,
            "{method} {path} with another token: {body}"
        );
        assert!(!body.contains(ADMIN));
    }
    assert_eq!(list_as(d.addr, "", &[&ok]).len(), 1);
    // The token is for the operators' endpoints, not for subscribing.
    let (head, _) = call(d.addr, "GET", "/streams", &["Authorization: Basic eDp5"]);
    assert_eq!(head.status, 401);

    // None set: a direct connection from this machine, under a local Host,
    // from no page of another origin.
    let d = daemon("listen = \"127.0.0.1:0\"\n");
    assert!(list(d.addr, "").is_empty());
    for extra in [
        "X-Forwarded-For: 203.0.113.9",
        "Forwarded: for=203.0.113.9",
        "Origin: http://evil.example",
    ] {
        let (head, body) = call(d.addr, "GET", "/streams", &[extra]);
        assert_eq!(head.status, 403, "{extra}: {body}");
        let (head, _) = call(d.addr, "DELETE", "/streams?topic=t", &[extra]);
        assert_eq!(head.status, 403, "{extra}");
    }
    let (head, body) = answer(
        support::connect(d.addr),
        "GET /streams HTTP/1.1\r\nHost: rebind.evil.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 403, "{body}");
    assert!(body.contains("allowed_hosts"), "{body}");
}

#[test]
fn from_another_machine_only_with_the_admin_token() {
    let Some(ns) = support::netns::netns("operators-remote", 17) else {
        return;
    };
    // Reached at the link's own address, a request from here does not
    // come from loopback.
    let d = daemon(&format!("listen = \"{}:0\"\n", ns.server));
    let (head, body) = call(d.addr, "GET", "/streams", &[]);
    assert_eq!(head.status, 403, "{body}");
    assert!(body.contains("admin_token"), "{body}");
    let d = daemon(&format!(
        "listen = \"{}:0\"\n[auth]\nadmin_token = \"{ADMIN}\"\n",
        ns.server
    ));
    assert_eq!(list_as(d.addr, "", &[&bearer(ADMIN)]).len(), 0);
    drop(ns);
}

#[test]
fn a_listing_of_streams_with_long_topics_goes_out_in_bounded_pieces() {
    let d = daemon("listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\nmax_execution_time = \"0\"\n");
    // Each stream's topics fill most of its request head: 6 of 1,000 bytes.
    let held: Vec<Client> = (0..40)
        .map(|i| {
            let query: Vec<String> = (0..6)
                .map(|t| format!("topic={i}-{t}-{}", "x".repeat(990)))
                .collect();
            open(d.addr, &format!("/events?{}", query.join("&")), &[])
        })
        .collect();
    let mut conn = support::connect(d.addr);
    conn.write_all(b"GET /streams HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).expect("the answer");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let pieces = chunks(&raw[end + 4..]);
    let biggest = pieces.iter().map(Vec::len).max().unwrap_or(0);
    assert!(pieces.len() >= 5, "{} pieces", pieces.len());
    assert!(biggest < 40 * 1024, "a piece of {biggest} bytes");
    let all: Value = serde_json::from_slice(&pieces.concat()).expect("JSON");
    let all = all.as_array().expect("an array");
    assert_eq!(all.len(), 40);
    assert!(all.iter().all(|s| topics(s).len() == 6));
    drop(held);
}

#[test]
fn lists_thousands_of_streams_in_bounded_time() {
    const STREAMS: usize = 3000;
    let d = daemon(
        "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\nmax_execution_time = \"0\"\n\
         max_connections = 4000\nstack_size = 65536\n",
    );
    let _ = ssed::raise_fd_limit();
    let held: Vec<Client> = (0..STREAMS)
        .map(|i| open(d.addr, &format!("/events/many-{}", i % 10), &[]))
        .collect();
    let started = Instant::now();
    let all = list(d.addr, "");
    let took = started.elapsed();
    assert_eq!(all.len(), STREAMS);
    assert!(took < Duration::from_secs(2), "listing took {took:?}");
    let tenth = list(d.addr, "?topic=many-3");
    assert_eq!(tenth.len(), STREAMS / 10);
    // A reader that takes the listing slowly (it does not fit its
    // window) holds no thread: the acceptor makes each piece as the
    // client takes the one before.
    let mut slow = small_window(d.addr);
    slow.write_all(b"GET /streams HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("send");
    std::thread::sleep(Duration::from_millis(300));
    let s = d.server.stats().snapshot();
    assert_eq!(s.requests_active, 0, "a thread waits on the slow reader");
    assert_eq!(s.pending, 1, "the acceptor holds the listing's connection");
    let (head, body) = answer(slow, "");
    assert!(head.is_chunked());
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(STREAMS));
    drop(held);
}
