#![cfg(feature = "daemon")]
//! Slow and hostile ordinary requests ("Hostile clients, round two",
//! findings 2 and 6): bodies that stall, clients that pipeline requests and
//! never read the answers, bodies trickled a byte at a time, framing a
//! proxy may read differently, and many large bodies at once.
//!
//! A body arrives in the acceptor, without a thread, under the request's
//! deadline, and the bodies waiting there share one memory bound; a
//! response a client does not take goes back to the acceptor too. So none
//! of these clients holds a thread or a `max_requests` slot, and a real
//! publish, health check or ticket request is answered meanwhile.
//!
//! Where the daemon's own threads, descriptors and memory are the point,
//! the `ssed` binary runs as a child measured through /proc/PID. The tests
//! run one at a time (a static lock); every read has a timeout, every loop
//! is bounded, every child is killed by PID when its guard drops.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ssed::Response;
use support::process::{Ssed, threads_of};
use support::{
    Client, TempDir, field, metrics, read_to_close, request, serial, still_open, wait_until,
};

/// The longest a test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(5);
/// The subscribe token of the daemons here.
const TOKEN: &str = "slow-requests-subscribe-token";
/// Threads a daemon may gain over its idle count while the hostile clients
/// are connected: the real requests' own short-lived threads.
const THREAD_SLACK: usize = 4;

/// `ssed --config DIR/ssed.toml` with `toml` (plus a subscribe token).
fn spawn(dir: &TempDir, toml: &str) -> (Ssed, SocketAddr) {
    let path = dir.path().join("ssed.toml");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\nmax_execution_time = \"0\"\n{toml}\n\
         [auth]\nsubscribe_token = \"{TOKEN}\"\n"
    );
    std::fs::write(&path, toml).expect("write config");
    let ssed = Ssed::spawn(&["--config", path.to_str().expect("utf-8 temp path")], &[]);
    let addr = ssed.listening();
    (ssed, addr)
}

/// Serves one request so every lazily started thread exists, then waits
/// for the thread count to settle; returns it.
fn settled_threads(ssed: &Ssed, addr: SocketAddr) -> usize {
    let (head, body) = request(addr, HEALTHZ);
    assert_eq!(head.status, 200, "{body}");
    let mut last = ssed.threads();
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(40));
        let now = ssed.threads();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the daemon's thread count does not settle");
}

/// The daemon's descriptor count once it holds still (a connection a
/// test just closed may still be lingering in it).
fn settled_fds(ssed: &Ssed) -> usize {
    let mut last = ssed.fds();
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(40));
        let now = ssed.fds();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the daemon's descriptor count does not settle");
}

/// The highest thread count of a process, sampled every 5 ms on a thread
/// of its own until [`Sampler::finish`].
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<usize>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut peak = 0;
            // Bounded: a test that forgets to finish still ends it.
            for _ in 0..6_000 {
                peak = peak.max(threads_of(pid));
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("sampler thread")
    }
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

fn publish_request(topic: &str, body: &str) -> String {
    format!(
        "POST /publish/{topic} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn ticket_request() -> String {
    format!(
        "POST /tickets HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// Opens a connection and sends `raw`.
fn open_with(addr: SocketAddr, raw: &[u8]) -> TcpStream {
    let mut c = support::connect(addr);
    c.write_all(raw).expect("send");
    c
}

/// An answer read to the close: its status line and body.
fn status_of(answer: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

// ---------------------------------------------------------------------------
// (a) The finding: stalled bodies do not take the slots
// ---------------------------------------------------------------------------

/// Attackers stalled mid-body on `POST /publish/x`.
const STALLED_PUBLISHES: usize = 160;
/// Attackers stalled mid-body on `GET /healthz` with a `Content-Length`.
const STALLED_HEALTHZ: usize = 40;

/// Round two, finding 2: 200 connections announce a 100-byte body, send
/// one byte and stall. Before, the first 64 each held a thread and a
/// `max_requests` slot until their 408, and everything else ordinary got
/// 503. Now they wait in the acceptor: a loopback publish, a health check
/// and a ticket request are answered at once, the daemon gains no thread,
/// and every attacker gets its 408 at `request_timeout`.
#[test]
fn finding2_stalled_bodies_take_no_thread_and_no_slot() {
    let _serial = serial();
    let request_timeout = Duration::from_secs(1);
    let dir = TempDir::new("stalled-bodies");
    let (ssed, addr) = spawn(&dir, "request_timeout = \"1s\"\n");
    let threads0 = settled_threads(&ssed, addr);
    let sampler = Sampler::start(ssed.pid());

    let started = Instant::now();
    let publish = b"POST /publish/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nA";
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nA";
    let stalled: Vec<TcpStream> = (0..STALLED_PUBLISHES)
        .map(|_| open_with(addr, publish))
        .chain((0..STALLED_HEALTHZ).map(|_| open_with(addr, healthz)))
        .collect();
    let opened = started.elapsed();
    // The acceptor takes every head in within microseconds; before the fix
    // the first 64 had each spawned a thread, now blocked on its body.
    thread::sleep(Duration::from_millis(200));

    let mut answered = Vec::new();
    for (what, raw) in [
        ("publish", publish_request("x", "real")),
        ("healthz", HEALTHZ.to_owned()),
        ("ticket", ticket_request()),
    ] {
        let asked = Instant::now();
        let (head, body) = request(addr, &raw);
        let took = asked.elapsed();
        assert_eq!(head.status, 200, "{what} during the attack: {body}");
        assert!(took < Duration::from_secs(1), "{what} took {took:?}");
        answered.push((what, took));
    }
    let served_by = started.elapsed();
    let peak = sampler.finish();
    eprintln!(
        "{} stalled bodies opened in {opened:?}; answered {answered:?}, all by {served_by:?}; \
         threads idle {threads0}, peak {peak}",
        stalled.len()
    );
    assert!(
        served_by < request_timeout,
        "the real requests should be answered while every attacker still waits"
    );
    assert!(
        peak <= threads0 + THREAD_SLACK,
        "stalled bodies took threads: idle {threads0}, peak {peak}"
    );

    // Each attacker gets its 408 at the deadline, not before.
    let deadline = started + opened + request_timeout + Duration::from_millis(1_500);
    for (i, c) in stalled.iter().enumerate() {
        let answer = read_to_close(c, deadline)
            .unwrap_or_else(|| panic!("stalled body {i} not cut by the deadline"));
        if i == 0 {
            let at = started.elapsed();
            assert!(
                at >= request_timeout - Duration::from_millis(100),
                "cut at {at:?}"
            );
        }
        let (status, body) = status_of(&answer);
        assert!(status.starts_with("HTTP/1.1 408 "), "{i}: {status:?}");
        assert_eq!(body, "request body not received in time\n");
    }
    eprintln!("all stalled bodies answered 408 by {:?}", started.elapsed());
    let m = metrics(addr);
    assert!(
        m["ssed_request_timeouts_total"] >= stalled.len() as u64,
        "every 408 counted: {m:?}"
    );
    assert_eq!(
        m["ssed_request_bodies_cut_total"], 0,
        "none cut for the bound"
    );
}

// ---------------------------------------------------------------------------
// (b) A client that pipelines and never reads
// ---------------------------------------------------------------------------

/// A connection whose receive buffer is as small as the kernel allows, so
/// the server's answers back up at once.
fn tiny_window_connect(addr: SocketAddr) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType, ipproto, sockopt};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let socket: OwnedFd =
        rustix::net::socket(family, SocketType::STREAM, Some(ipproto::TCP)).expect("socket");
    // Before connect: the window scale is agreed in the handshake.
    sockopt::set_socket_recv_buffer_size(&socket, 1024).expect("SO_RCVBUF");
    rustix::net::connect(&socket, &addr).expect("connect");
    let c = TcpStream::from(socket);
    c.set_write_timeout(Some(DEADLINE)).expect("write timeout");
    c
}

/// 1,000 `GET /metrics` pipelined on one connection that never reads: the
/// responses back up, the thread that served them hands the connection
/// and what it could not send to the acceptor, and the daemon's threads are
/// back to idle while the client is still connected. Other requests are
/// served, the acceptor reads no further request while a response waits,
/// and the connection is cut at `write_timeout`.
#[test]
fn a_client_that_pipelines_and_never_reads_holds_no_thread() {
    let _serial = serial();
    let write_timeout = Duration::from_secs(2);
    let dir = TempDir::new("never-reads");
    let (ssed, addr) = spawn(&dir, "write_timeout = \"2s\"\n");
    let threads0 = settled_threads(&ssed, addr);
    let requests0 = metrics(addr)["ssed_requests_total"];
    let fds0 = settled_fds(&ssed);

    let c = tiny_window_connect(addr);
    let pipeline = "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n".repeat(1_000);
    let sent = Instant::now();
    let writer = {
        let mut c = c.try_clone().expect("clone");
        // The server may stop reading before it has all of them: write
        // from a thread of its own, which ends when the server cuts it.
        thread::spawn(move || {
            let _ = c.write_all(pipeline.as_bytes()); // fails once cut
        })
    };

    // The first answers arrive (the thread is serving), then the thread
    // lets go while the client is still connected and reads nothing.
    c.set_nonblocking(true).expect("non-blocking");
    assert!(
        wait_until(Duration::from_secs(1), || c.peek(&mut [0u8; 1]).is_ok()),
        "no answer arrived"
    );
    c.set_nonblocking(false).expect("blocking");
    let mut threads = 0;
    assert!(
        wait_until(Duration::from_secs(1), || {
            threads = ssed.threads();
            threads <= threads0
        }),
        "a client that does not read holds a thread: idle {threads0}, now {threads}"
    );
    let handed_back = sent.elapsed();
    let fds = ssed.fds();
    eprintln!("fds idle {fds0}, now {fds}, threads {threads}");
    assert_eq!(fds, fds0 + 1, "the connection is held, without a thread");

    // Others are served meanwhile.
    let (head, body) = request(addr, HEALTHZ);
    assert_eq!(head.status, 200, "{body}");
    let served = metrics(addr)["ssed_requests_total"] - requests0;
    assert!(
        served < 500,
        "{served} requests answered: the acceptor read past an unsent response"
    );

    // Cut at the write timeout (counted from the hand-back), not before.
    let mut fds = 0;
    assert!(
        wait_until(write_timeout + Duration::from_millis(1_500), || {
            fds = ssed.fds();
            fds <= fds0
        }),
        "the non-reading client was not cut: descriptors {fds0} idle, {fds} now"
    );
    let cut = sent.elapsed();
    eprintln!(
        "threads back to {threads} (idle {threads0}) after {handed_back:?}; \
         {served} requests answered; cut after {cut:?}"
    );
    assert!(
        cut >= write_timeout - Duration::from_millis(100),
        "cut after {cut:?}, before the write timeout"
    );
    drop(c);
    writer.join().expect("writer thread");
}

// ---------------------------------------------------------------------------
// (c) Chunked bodies: byte by byte, and strict line ends
// ---------------------------------------------------------------------------

/// A chunked publish trickled one byte at a time (after a `100 Continue`)
/// reaches a subscriber whole, and the daemon spends no thread while it
/// trickles. Chunk lines ended by a bare LF, which a proxy in front may
/// frame differently, get `400`.
#[test]
fn chunked_bodies_byte_by_byte_are_published_and_bare_lf_lines_are_400() {
    let _serial = serial();
    let dir = TempDir::new("chunked");
    let (ssed, addr) = spawn(&dir, "");
    let threads0 = settled_threads(&ssed, addr);

    let mut sub = Client::new(addr);
    let head = sub.get_stream(&format!("/events/c?token={TOKEN}"), &[]);
    assert_eq!(head.status, 200);
    assert_eq!(sub.next_frame().as_deref(), Some("retry: 3000\n\n"));

    // The subscriber's stream holds a thread (and may start a hub waker).
    let threads1 = settled_threads(&ssed, addr);
    let mut publisher = Client::new(addr);
    publisher.conn.set_nodelay(true).expect("nodelay");
    publisher.send(
        b"POST /publish/c HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\
          Expect: 100-continue\r\n\r\n",
    );
    assert_eq!(publisher.head().status, 100);
    let chunked = b"5\r\nhello\r\n6;note=\"x\"\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
    let mut peak = 0;
    for b in chunked {
        // Sampled before each byte: the last one completes the body and
        // starts the request's thread.
        thread::sleep(Duration::from_millis(2));
        peak = peak.max(ssed.threads());
        publisher.send(std::slice::from_ref(b));
    }
    let (head, body) = publisher.response();
    assert_eq!(head.status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["receivers"], 1);
    let frame = sub.frame_matching(4, |f| !field(f, "data").is_empty());
    assert_eq!(field(&frame, "data"), ["hello world"]);
    assert!(
        peak <= threads1,
        "a trickling body took a thread: idle {threads0}, with the subscriber {threads1}, peak {peak}"
    );

    // The keep-alive connection serves the next chunked publish as well.
    publisher.send(
        b"POST /publish/c HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\n",
    );
    let (head, body) = publisher.response();
    assert_eq!(head.status, 200, "{body}");
    let frame = sub.frame_matching(4, |f| !field(f, "data").is_empty());
    assert_eq!(field(&frame, "data"), ["abc"]);

    let head = "POST /publish/c HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\
                Connection: close\r\n\r\n";
    for body in [
        "5\nhello\r\n0\r\n\r\n",
        "5;x=y\nhello\r\n0\r\n\r\n",
        "5\r\nhello\n0\r\n\r\n",
        "5\r\nhello\r\n0\n\r\n",
        "5\r\nhello\r\n0\r\nX-Trailer: t\n\r\n",
        "5\r\nhello\r\n0\r\n\n",
    ] {
        let (answer, text) = request(addr, &format!("{head}{body}"));
        assert_eq!(answer.status, 400, "{body:?}: {text}");
        assert!(text.contains("CRLF"), "{body:?}: {text}");
    }
    let m = metrics(addr);
    assert_eq!(
        m["ssed_events_published_total"], 2,
        "a refused body published"
    );
}

// ---------------------------------------------------------------------------
// (d) Host
// ---------------------------------------------------------------------------

/// Round two, finding 6: an HTTP/1.1 request without `Host`, any request
/// with two, and a head with bare-LF line ends get `400` (RFC 9112 section
/// 3.2; two `Host` values let CORS and a proxy disagree on the origin).
/// HTTP/1.0 without `Host` is still served.
#[test]
fn finding6_host_is_required_once_on_http11_and_lines_end_with_crlf() {
    let _serial = serial();
    let server = support::start(ssed::Server::builder().get("/hello", |req| {
        Response::text(200, format!("hello {}", req.header("host").unwrap_or("-")))
    }));
    let addr = server.local_addr();
    let cases: &[(&str, u16, &str)] = &[
        ("GET /hello HTTP/1.1\r\nHost: a\r\n\r\n", 200, "hello a"),
        ("GET /hello HTTP/1.0\r\n\r\n", 200, "hello -"),
        ("GET /hello HTTP/1.0\r\nHost: a\r\n\r\n", 200, "hello a"),
        (
            "GET /hello HTTP/1.1\r\n\r\n",
            400,
            "an HTTP/1.1 request needs a Host header",
        ),
        (
            "GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
            "more than one Host header",
        ),
        (
            "GET /hello HTTP/1.0\r\nhost: a\r\nHOST: a\r\n\r\n",
            400,
            "more than one Host header",
        ),
        (
            "GET /hello HTTP/1.1\nHost: a\n\n",
            400,
            "request lines must end with CRLF, not a bare LF",
        ),
        (
            "GET /hello HTTP/1.1\r\nHost: a\n\r\n",
            400,
            "request lines must end with CRLF, not a bare LF",
        ),
    ];
    for (raw, status, text) in cases {
        let mut c = Client::new(addr);
        c.send(raw.as_bytes());
        let (head, body) = c.response();
        assert_eq!((head.status, body.trim_end()), (*status, *text), "{raw:?}");
        if *status == 400 {
            assert!(
                head.header("content-type")
                    .is_some_and(|t| t.starts_with("text/plain")),
                "{head:?}"
            );
        }
    }
    assert_eq!(server.stats().snapshot().bad_requests, 5);
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// (e) The bound on waiting bodies
// ---------------------------------------------------------------------------

/// Attackers sending most of a 64 KiB body and stalling.
const LARGE_STALLED: usize = 600;
/// Of each attacker's announced 64 KiB, what it sends.
const LARGE_SENT: usize = 60 * 1024;
/// What the waiting bodies may hold together with the daemon's defaults
/// (`max_requests` 64 × `max_body` 64 KiB).
const BODY_BOUND_KIB: u64 = 4 * 1024;
/// What else the daemon may grow by under this attack: 600 connections'
/// slots, the allocator's slack in a debug build.
const RSS_SLACK_KIB: u64 = 6 * 1024;

/// 600 clients each send 60 KiB of a 64 KiB body and stall: unbounded,
/// they would hold 37.5 MiB in the daemon. The daemon's RSS grows by at
/// most the bound on waiting bodies plus a constant, the oldest attackers
/// are cut with a 503 to make room, the newest still wait, and a real
/// publish, whether its body comes with the head or after a
/// `100 Continue`, still gets through.
#[test]
fn waiting_bodies_stay_within_their_bound_and_a_real_publish_gets_through() {
    let _serial = serial();
    let _ = ssed::raise_fd_limit(); // 600 sockets here
    let dir = TempDir::new("body-bound");
    let (ssed, addr) = spawn(&dir, "request_timeout = \"20s\"\n");
    settled_threads(&ssed, addr);
    std::fs::write(format!("/proc/{}/clear_refs", ssed.pid()), "5").expect("reset VmHWM");
    let rss0 = ssed.status_kib("VmRSS");

    let started = Instant::now();
    let mut raw =
        b"POST /publish/big HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 65536\r\n\r\n".to_vec();
    raw.resize(raw.len() + LARGE_SENT, b'A');
    let attackers: Vec<TcpStream> = (0..LARGE_STALLED).map(|_| open_with(addr, &raw)).collect();
    let sent = started.elapsed();
    // Let the acceptor read what was sent (the last writes are still in
    // the socket buffers when write_all returns).
    thread::sleep(Duration::from_millis(300));

    let asked = Instant::now();
    let (head, body) = request(addr, &publish_request("big", "with the head"));
    assert_eq!(
        head.status, 200,
        "publish with the body in the head's packet: {body}"
    );
    let mut c = Client::new(addr);
    c.send(
        b"POST /publish/big HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1024\r\n\
          Expect: 100-continue\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(c.head().status, 100);
    c.send(&[b'B'; 1024]);
    let (head, body) = c.response();
    assert_eq!(head.status, 200, "publish after 100 Continue: {body}");
    let publish_took = asked.elapsed();

    let rss = ssed.status_kib("VmRSS");
    let hwm = ssed.status_kib("VmHWM");
    eprintln!(
        "{LARGE_STALLED} bodies of {LARGE_SENT} bytes sent in {sent:?}; \
         daemon RSS {rss0} -> {rss} KiB (peak {hwm}); two publishes in {publish_took:?}"
    );
    assert!(
        hwm.saturating_sub(rss0) <= BODY_BOUND_KIB + RSS_SLACK_KIB,
        "waiting bodies took {} KiB (bound {BODY_BOUND_KIB} KiB + {RSS_SLACK_KIB})",
        hwm.saturating_sub(rss0)
    );

    // The oldest were cut to make room, with a 503; the newest still wait.
    let deadline = Instant::now() + DEADLINE;
    let answer = read_to_close(&attackers[0], deadline).expect("the oldest body was cut");
    let (status, text) = status_of(&answer);
    assert!(status.starts_with("HTTP/1.1 503 "), "{status:?}");
    assert_eq!(text, "too many request bodies arriving at once; retry\n");
    let waiting = attackers[LARGE_STALLED - 32..]
        .iter()
        .filter(|c| still_open(c))
        .count();
    assert_eq!(waiting, 32, "the newest bodies should still wait");
    drop(attackers);
}

/// The same bound in the library, with its counter: with `max_requests`
/// 1 and `max_body` 64 KiB the floor (4 MiB) applies; 80 bodies of 60 KiB
/// pass it, and the first ones cut are the oldest.
#[test]
fn the_body_bound_cuts_the_oldest_waiting_body_and_counts_it() {
    let _serial = serial();
    let server = support::start(ssed::Server::builder().max_requests(1).post("/p", |req| {
        Response::text(200, format!("{}", req.body().len()))
    }));
    let addr = server.local_addr();
    let stats = server.stats();
    let mut raw = b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 65536\r\n\r\n".to_vec();
    raw.resize(raw.len() + LARGE_SENT, b'A');
    let conns: Vec<TcpStream> = (0..80).map(|_| open_with(addr, &raw)).collect();
    // 64 bodies of 64 KiB fill 4 MiB; each one past it cuts one. Wait
    // for the count to hold still.
    let mut evicted = 0;
    assert!(
        wait_until(DEADLINE, || {
            let before = evicted;
            thread::sleep(Duration::from_millis(100));
            evicted = stats.snapshot().bodies_evicted as usize;
            evicted >= 10 && evicted == before
        }),
        "evicted {evicted}"
    );
    let deadline = Instant::now() + DEADLINE;
    for (i, c) in conns[..evicted].iter().enumerate() {
        let answer = read_to_close(c, deadline).expect("cut");
        assert!(status_of(&answer).0.contains(" 503 "), "{i}");
    }
    assert!(
        conns[evicted..].iter().all(still_open),
        "only the oldest are cut"
    );
    // One finishes its body: it is served.
    let mut last = conns.into_iter().last().expect("80 connections");
    last.write_all(&[b'A'; 65536 - LARGE_SENT])
        .expect("rest of the body");
    let mut answer = vec![0u8; 256];
    let n = last.read(&mut answer).expect("answer");
    let (status, _) = status_of(&answer[..n]);
    assert!(status.starts_with("HTTP/1.1 200 "), "{status:?}");
    server.stop().expect("clean stop");
}
