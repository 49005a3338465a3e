//! Connections that never finish their request head cost a descriptor and a
//! slot in the acceptor's table, never a thread: thousands of silent or
//! half-sent heads leave the thread count flat, a real subscriber is still
//! served at once, the head deadline cuts every one of them, and past
//! `max_pending` the oldest waiting connection makes room for the newest.
//!
//! The tests run one at a time (a static lock) because they read this
//! process's thread count from /proc/self/task, which another test's server
//! would disturb.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{
    Client, field, read_to_close, request, serial, start, still_open, thread_count, wait_until,
};

/// Connections that send nothing.
const SILENT: usize = 2_000;
/// Connections that send a head without its final blank line.
const PARTIAL: usize = 500;
const PARTIAL_HEAD: &[u8] = b"GET /s HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n";
/// Threads the process may gain over its idle count while the idle
/// connections are open: the subscriber's stream thread, a short-lived
/// request thread, and the test harness starting or ending a test thread.
const THREAD_SLACK: usize = 5;
const GET_PING: &str = "GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// A stream route that sends one event and then waits (until shutdown), and
/// an ordinary route.
fn builder() -> ssed::ServerBuilder {
    ssed::Server::builder()
        .route("/s", |_req, stream| {
            stream.send("hello", &"world")?;
            loop {
                stream.sleep(Duration::from_secs(60))?;
            }
        })
        .get("/ping", |_req| ssed::Response::text(200, "pong"))
}

/// Opens `n` connections that send `prefix` (possibly nothing) and then
/// stay silent; returns them and the highest thread count seen meanwhile.
fn open_idle(addr: SocketAddr, n: usize, prefix: &[u8]) -> (Vec<TcpStream>, usize) {
    let mut conns = Vec::with_capacity(n);
    let mut peak = thread_count();
    for i in 0..n {
        let mut c = TcpStream::connect(addr).expect("connect an idle client");
        c.set_write_timeout(Some(support::READ_TIMEOUT))
            .expect("write timeout");
        if !prefix.is_empty() {
            c.write_all(prefix).expect("send a partial head");
        }
        conns.push(c);
        if i % 100 == 0 {
            peak = peak.max(thread_count());
        }
    }
    (conns, peak.max(thread_count()))
}

#[test]
fn idle_and_half_sent_heads_hold_no_thread() {
    let _serial = serial();
    let server = start(builder());
    let addr = server.local_addr();
    let stats = server.stats();
    let idle = thread_count();

    let (silent, peak_silent) = open_idle(addr, SILENT, b"");
    let (partial, peak_partial) = open_idle(addr, PARTIAL, PARTIAL_HEAD);
    let total = (SILENT + PARTIAL) as u64;
    assert!(
        wait_until(Duration::from_secs(5), || stats.snapshot().pending >= total),
        "pending should reach {total}, is {}",
        stats.snapshot().pending
    );
    let waiting = thread_count();
    eprintln!(
        "threads: idle {idle}, peak while opening {}, with {total} waiting {waiting}; pending {}",
        peak_silent.max(peak_partial),
        stats.snapshot().pending
    );
    assert!(
        peak_silent.max(peak_partial) <= idle + THREAD_SLACK && waiting <= idle + THREAD_SLACK,
        "idle connections took threads: idle {idle}, peak {}, now {waiting}",
        peak_silent.max(peak_partial)
    );

    // A real subscriber and an ordinary request are served meanwhile.
    let asked = Instant::now();
    let mut sub = Client::new(addr);
    let head = sub.get_stream("/s", &[]);
    assert_eq!(head.status, 200);
    let first = sub.next_frame().expect("first event");
    let first_event = asked.elapsed();
    assert_eq!(field(&first, "event"), ["hello"]);
    assert!(
        first_event < Duration::from_secs(1),
        "first event took {first_event:?}"
    );
    let (head, body) = request(addr, GET_PING);
    assert_eq!((head.status, body.trim_end()), (200, "pong"));
    let serving = thread_count();
    eprintln!(
        "subscriber's first event after {first_event:?}; threads with one stream open {serving}"
    );
    assert!(
        serving <= idle + THREAD_SLACK,
        "threads: idle {idle}, now {serving}"
    );

    // Nothing was cut: the default head deadline (10 s) is far off.
    let cut = silent
        .iter()
        .chain(&partial)
        .filter(|c| !still_open(c))
        .count();
    assert_eq!(cut, 0, "idle connections cut before their deadline");
    assert!(stats.snapshot().pending >= total);

    // Clients that go away free their slots.
    drop(silent);
    drop(partial);
    assert!(
        wait_until(Duration::from_secs(5), || stats.snapshot().pending == 0),
        "pending should drop to 0 once the clients close, is {}",
        stats.snapshot().pending
    );
    assert_eq!(stats.snapshot().head_timeouts, 0);
    drop(sub);
    server.stop().expect("clean stop");
}

#[test]
fn head_deadline_cuts_every_idle_connection() {
    let _serial = serial();
    let timeout = Duration::from_millis(500);
    let server = start(builder().request_timeout(timeout));
    let addr = server.local_addr();
    let stats = server.stats();
    let idle = thread_count();

    let started = Instant::now();
    let (silent, peak_silent) = open_idle(addr, SILENT, b"");
    let (partial, peak_partial) = open_idle(addr, PARTIAL, PARTIAL_HEAD);
    let opened = started.elapsed();
    let peak = peak_silent.max(peak_partial);
    assert!(
        peak <= idle + THREAD_SLACK,
        "threads: idle {idle}, peak {peak}"
    );

    // The last connection was accepted after `opened`; its deadline is
    // `timeout` later, checked every 100 ms. 1.5 s leaves room to spare.
    let deadline = started + opened + Duration::from_millis(1_500);
    let still = silent
        .iter()
        .filter(|c| read_to_close(c, deadline).is_none())
        .count();
    assert_eq!(
        still, 0,
        "{still} silent connections outlived the head deadline"
    );
    // A half-sent head gets a 408 before the close.
    for c in &partial {
        let answer = read_to_close(c, deadline).expect("partial head cut by the deadline");
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 408 "),
            "expected a 408, got {text:?}"
        );
    }
    let all_cut = started.elapsed();
    drop(partial); // ends the server's lingering on the 408 answers
    assert!(
        wait_until(Duration::from_secs(3), || stats.snapshot().pending == 0),
        "pending should return to 0, is {}",
        stats.snapshot().pending
    );
    let snap = stats.snapshot();
    eprintln!(
        "opened {} connections in {opened:?}; all cut {all_cut:?} after the first connect; \
         pending 0 after {:?}; head_timeouts {}; threads idle {idle}, peak {peak}",
        SILENT + PARTIAL,
        started.elapsed(),
        snap.head_timeouts
    );
    assert_eq!(snap.head_timeouts, (SILENT + PARTIAL) as u64);
    assert_eq!(
        snap.streams_total + snap.requests_total,
        0,
        "no idle connection reached a handler"
    );
    drop(silent);
    server.stop().expect("clean stop");
}

#[test]
fn past_max_pending_the_oldest_waiting_connection_is_cut() {
    let _serial = serial();
    let server = start(builder().max_pending(100));
    let addr = server.local_addr();
    let stats = server.stats();

    let (conns, _) = open_idle(addr, 150, b"");
    let deadline = Instant::now() + Duration::from_secs(3);
    for (i, c) in conns[..50].iter().enumerate() {
        let got = read_to_close(c, deadline)
            .unwrap_or_else(|| panic!("connection {i} should be evicted"));
        assert!(got.is_empty(), "an evicted connection gets no answer");
    }
    let kept = conns[50..].iter().filter(|c| still_open(c)).count();
    assert_eq!(kept, 100, "the newest 100 connections should still wait");
    // The last admission cuts (99) before it registers (100): let it finish.
    assert!(
        wait_until(Duration::from_secs(1), || stats.snapshot().pending == 100),
        "pending should be 100, is {}",
        stats.snapshot().pending
    );

    // A new client still gets in; room is made by cutting the oldest one
    // left (the 51st), not the newcomer. The request's thread then frees a
    // slot, so the subscriber after it cuts nobody.
    let (head, body) = request(addr, GET_PING);
    assert_eq!((head.status, body.trim_end()), (200, "pong"));
    let mut sub = Client::new(addr);
    assert_eq!(sub.get_stream("/s", &[]).status, 200);
    assert_eq!(
        field(&sub.next_frame().expect("first event"), "event"),
        ["hello"]
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    assert!(
        read_to_close(&conns[50], deadline).is_some(),
        "connection 50 should be evicted"
    );
    let kept = conns[51..].iter().filter(|c| still_open(c)).count();
    assert_eq!(kept, 99, "only the oldest one made room");
    assert!(stats.snapshot().pending <= 100);
    assert_eq!(stats.snapshot().head_timeouts, 0);
    drop(sub);
    server.stop().expect("clean stop");
}
