#![cfg(feature = "daemon")]
//! Faults and abuse over real sockets (issue 6, part 2): slowloris and
//! thousands of idle connections, clients that vanish without a FIN, a
//! reconnect storm after a restart, a publisher flooding past its
//! subscribers, handlers that panic or spin, and SIGTERM under load.
//!
//! Where the daemon's own behaviour is the point (exit status, restart,
//! memory, threads and descriptors of the server alone) the `ssed` binary
//! runs as a child and is measured through /proc/PID; handler faults run on
//! the library's `Server` in this process. What is already covered
//! elsewhere is not repeated: a half-sent head's 408 and `max_pending`
//! eviction (tests/idle_connections.rs), descriptor exhaustion
//! (tests/fd_exhaustion.rs), one stuck reader cut at the write timeout and
//! a single slow subscriber resuming (tests/daemon.rs), a single panic and
//! the grace-period cut (tests/lifecycle.rs), kill -9 (tests/durable.rs).
//!
//! The tests run one at a time (a static lock): they count threads and
//! descriptors, and several hold thousands of sockets on a 2-core machine.
//! Every read has a timeout, every loop is bounded, every child is killed
//! by PID when its guard drops.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ssed::{EndReason, Response, Stats};
use support::process::{Ssed, fds_of, spawn_config, threads_of};
use support::{
    Client, TempDir, field, metric, read_to_close, request, serial, still_open, wait_until,
};

/// The longest a test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// A daemon child and what it costs
// ---------------------------------------------------------------------------

fn disconnects(addr: SocketAddr, reason: &str) -> u64 {
    metric(
        addr,
        &format!("ssed_disconnects_total{{reason=\"{reason}\"}}"),
    )
}

/// Waits until the daemon reports `n` open streams.
fn wait_open(addr: SocketAddr, n: u64, within: Duration) {
    let mut last = 0;
    assert!(
        wait_until(within, || {
            last = metric(addr, "ssed_connections_open");
            last == n
        }),
        "ssed_connections_open should reach {n}, is {last}"
    );
}

/// Resets the child's peak RSS (`VmHWM`) to its current RSS, so a later
/// `VmHWM` is the peak of what happened since.
fn reset_peak_rss(ssed: &Ssed) {
    std::fs::write(format!("/proc/{}/clear_refs", ssed.pid()), "5").expect("reset VmHWM");
}

/// The highest thread and descriptor counts of a process, sampled every
/// 10 ms on a thread of its own until [`Sampler::finish`].
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(usize, usize)>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let (mut threads, mut fds) = (0, 0);
            // Bounded: a test that forgets to finish still ends it.
            for _ in 0..12_000 {
                threads = threads.max(threads_of(pid));
                fds = fds.max(fds_of(pid));
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
            (threads, fds)
        });
        Sampler { stop, handle }
    }

    /// Stops sampling; the peak thread and descriptor counts.
    fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("sampler thread")
    }
}

// ---------------------------------------------------------------------------
// Many clients
// ---------------------------------------------------------------------------

/// Threads that open connections together, so thousands arrive at once.
const OPENERS: usize = 4;

/// Opens `n` connections from [`OPENERS`] threads at once, sending
/// `request(i)` on connection `i`; returns them in order.
fn open_many(
    addr: SocketAddr,
    n: usize,
    request: impl Fn(usize) -> String + Sync,
) -> Vec<TcpStream> {
    let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    thread::scope(|s| {
        let request = &request;
        let handles: Vec<_> = (0..OPENERS)
            .map(|t| {
                s.spawn(move || {
                    (t..n)
                        .step_by(OPENERS)
                        .map(|i| {
                            let mut c = support::connect(addr);
                            c.write_all(request(i).as_bytes()).expect("send request");
                            (i, c)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (i, c) in h.join().expect("opener thread") {
                slots[i] = Some(c);
            }
        }
    });
    slots
        .into_iter()
        .map(|c| c.expect("every connection opened"))
        .collect()
}

fn subscribe_request(path: &str, last_event_id: Option<&str>) -> String {
    let resume = last_event_id.map_or_else(String::new, |id| format!("Last-Event-ID: {id}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n{resume}\r\n")
}

/// A keep-alive connection publishing one event after another.
struct Publisher {
    client: Client,
}

impl Publisher {
    fn new(addr: SocketAddr) -> Publisher {
        Publisher {
            client: Client::new(addr),
        }
    }

    /// Publishes `data` on `topic`; the id and the receivers it reports.
    fn publish(&mut self, topic: &str, data: &str) -> (String, u64) {
        let req = format!(
            "POST /publish/{topic} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{data}",
            data.len()
        );
        self.client.send(req.as_bytes());
        let (head, body) = self.client.response();
        assert_eq!(head.status, 200, "publish: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
        (
            v["id"].as_str().expect("an id").to_owned(),
            v["receivers"].as_u64().expect("receivers"),
        )
    }
}

/// An event frame's id and data; `None` for comments and `retry:` frames.
fn event_of(frame: &str) -> Option<(String, String)> {
    let data = field(frame, "data");
    if data.is_empty() {
        return None;
    }
    let id = field(frame, "id").first().map_or("", |s| s).to_owned();
    Some((id, data.join("\n")))
}

/// The next event of a stream, skipping comments and `retry:`; `None` at
/// the end of the stream.
fn next_event(c: &mut Client) -> Option<(String, String)> {
    for _ in 0..100 {
        match c.next_frame() {
            Some(f) => {
                if let Some(ev) = event_of(&f) {
                    return Some(ev);
                }
            }
            None => return None,
        }
    }
    panic!("100 frames without an event")
}

// ---------------------------------------------------------------------------
// Slowloris and idle connections
// ---------------------------------------------------------------------------

/// Connections that connect and send nothing.
const SILENT: usize = 4_000;
/// Connections that trickle a request head, one byte a second each.
const TRICKLING: usize = 1_000;
/// The daemon's `max_pending` (not a config key: the library default).
const MAX_PENDING: usize = 4_096;
const TRICKLED_HEAD: &[u8] = b"GET /events/t HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n";
/// What a waiting connection may cost the server in memory, at most:
/// measured at well under 1 KiB (the table slot and a small buffer).
const PENDING_BYTES: u64 = 2 * 1024;

/// 5,000 connections that never finish a head, a fifth of them trickling
/// it a byte a second: the server spends no thread on them, holds at most
/// `max_pending` descriptors for them (cutting the oldest past it) and a
/// bounded amount of memory, serves a real subscriber and publisher
/// meanwhile, and cuts every one at `request_timeout` (408 for a half-sent
/// head). Afterwards threads and descriptors are back where they were.
#[test]
fn slowloris_and_idle_connections_cost_no_thread_and_are_cut_at_the_deadline() {
    let _serial = serial();
    let _ = ssed::raise_fd_limit(); // this process holds 5,000 sockets
    let request_timeout = Duration::from_secs(4);
    let dir = TempDir::new("slowloris");
    let (ssed, addr) = spawn_config(
        &dir,
        "listen = \"127.0.0.1:0\"\nrequest_timeout = \"4s\"\nheartbeat = \"0\"\nmax_execution_time = \"0\"\n",
    );
    // Warm up (a stream, the hub, a request thread's keep-alive
    // hand-back), then take the baseline with no connection open.
    {
        let mut warm = Client::new(addr);
        assert_eq!(warm.get_stream("/events/warm", &[]).status, 200);
    }
    // No heartbeats here: publishing is what finds the warm-up client gone
    // (the first write after a close still succeeds; the next one fails).
    let mut publisher = Publisher::new(addr);
    assert!(
        wait_until(DEADLINE, || {
            publisher.publish("warm", "w");
            thread::sleep(Duration::from_millis(10));
            metric(addr, "ssed_connections_open") == 0
        }),
        "the warm-up stream did not end"
    );
    let (threads0, fds0) = (ssed.threads(), ssed.fds());
    reset_peak_rss(&ssed);
    let rss0 = ssed.status_kib("VmRSS");
    let sampler = Sampler::start(ssed.pid());

    let started = Instant::now();
    let silent: Vec<TcpStream> = (0..SILENT).map(|_| support::connect(addr)).collect();
    let trickling: Arc<Vec<TcpStream>> = Arc::new(
        (0..TRICKLING)
            .map(|_| {
                let mut c = support::connect(addr);
                c.write_all(&TRICKLED_HEAD[..1]).expect("first byte");
                c
            })
            .collect(),
    );
    let trickle_start = Instant::now();
    let opened = started.elapsed();
    let stop_trickling = Arc::new(AtomicBool::new(false));
    let trickler = {
        let conns = Arc::clone(&trickling);
        let stop = Arc::clone(&stop_trickling);
        thread::spawn(move || {
            for (second, byte) in TRICKLED_HEAD.iter().enumerate().skip(1).take(10) {
                let at = trickle_start + Duration::from_secs(second as u64);
                while Instant::now() < at {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                for c in conns.iter() {
                    let _ = (&*c).write(std::slice::from_ref(byte)); // cut ones fail
                }
            }
        })
    };

    // A real subscriber and publisher are served meanwhile.
    let asked = Instant::now();
    let mut sub = Client::new(addr);
    let head = sub.get_stream("/events/t", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(sub.next_frame().as_deref(), Some("retry: 3000\n\n"));
    wait_open(addr, 1, DEADLINE);
    let (_, receivers) = Publisher::new(addr).publish("t", "still served");
    assert_eq!(receivers, 1);
    let (_, data) = next_event(&mut sub).expect("the event");
    assert_eq!(data, "still served");
    let served = asked.elapsed();
    let pending = metric(addr, "ssed_pending_connections");

    // Before the deadline: every trickling head still waits; only the
    // silent connections past `max_pending` were cut, oldest first.
    let before_deadline = trickle_start + request_timeout - Duration::from_secs(1);
    assert!(
        Instant::now() < before_deadline,
        "too slow to check before the deadline ({:?} since the first connect)",
        started.elapsed()
    );
    let trickling_cut_early = trickling.iter().filter(|c| !still_open(c)).count();
    let silent_cut_early = silent.iter().filter(|c| !still_open(c)).count();

    // After the deadline (checked every 100 ms): every one is cut; a
    // trickled head gets its 408 first.
    let after_deadline = trickle_start + request_timeout + Duration::from_millis(1_500);
    let silent_left = silent
        .iter()
        .filter(|c| read_to_close(c, after_deadline).is_none())
        .count();
    let mut not_408 = 0;
    for c in trickling.iter() {
        let got = read_to_close(c, after_deadline);
        if !got.is_some_and(|g| g.starts_with(b"HTTP/1.1 408 ")) {
            not_408 += 1;
        }
    }
    let all_cut = trickle_start.elapsed();
    stop_trickling.store(true, Ordering::SeqCst);
    trickler.join().expect("trickler thread");
    let (peak_threads, peak_fds) = sampler.finish();
    let peak_rss = ssed.status_kib("VmHWM");
    eprintln!(
        "{} idle connections opened in {opened:?}; subscriber and publisher served in {served:?} \
         with {pending} pending; cut before the deadline: {silent_cut_early} silent, \
         {trickling_cut_early} trickling; all cut {all_cut:?} after the trickling began; \
         server threads {threads0} -> peak {peak_threads}, fds {fds0} -> peak {peak_fds}, \
         RSS {rss0} KiB -> peak {peak_rss} KiB",
        SILENT + TRICKLING
    );
    assert!(
        served < Duration::from_secs(3),
        "legitimate clients waited {served:?}"
    );
    assert!(pending <= MAX_PENDING as u64, "{pending} pending");
    assert_eq!(
        trickling_cut_early, 0,
        "trickling heads cut before their deadline"
    );
    let over = SILENT + TRICKLING - MAX_PENDING;
    // Each legitimate connection (and each /metrics poll) made room too.
    assert!(
        (over..over + 64).contains(&silent_cut_early),
        "past max_pending the oldest {over} should be cut at once, {silent_cut_early} were"
    );
    assert_eq!(
        silent_left, 0,
        "silent connections outlived request_timeout"
    );
    assert_eq!(
        not_408, 0,
        "trickled heads not answered 408 at the deadline"
    );
    // The subscriber's stream thread, two short request threads and a
    // keep-alive hand-back are all the threads this may take.
    assert!(
        peak_threads <= threads0 + 4,
        "idle connections took threads: {threads0} -> {peak_threads}"
    );
    assert!(
        peak_fds <= fds0 + MAX_PENDING + 8,
        "descriptors: {fds0} -> peak {peak_fds}, more than max_pending"
    );
    let per_conn = (peak_rss.saturating_sub(rss0) * 1024) / MAX_PENDING as u64;
    assert!(
        per_conn <= PENDING_BYTES,
        "RSS grew {} KiB, {per_conn} bytes per waiting connection",
        peak_rss - rss0
    );

    // Everything is given back; the subscriber is still there.
    drop(silent);
    drop(trickling);
    assert!(
        wait_until(DEADLINE, || ssed.fds() <= fds0 + 1
            && ssed.threads() <= threads0 + 1),
        "not back to baseline: fds {fds0} -> {}, threads {threads0} -> {}",
        ssed.fds(),
        ssed.threads()
    );
    Publisher::new(addr).publish("t", "after");
    assert_eq!(next_event(&mut sub).map(|e| e.1).as_deref(), Some("after"));
}

// ---------------------------------------------------------------------------
// Clients that vanish without a FIN
// ---------------------------------------------------------------------------

/// Opens a stream from a socket with a small receive buffer (set before
/// the handshake, so the advertised window stays small), reads the head
/// and the opening `retry:`, and returns the socket, never to read again.
fn vanishing_subscriber(addr: SocketAddr, path: &str) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    sockopt::set_socket_recv_buffer_size(&fd, 4096).expect("SO_RCVBUF");
    rustix::net::connect(&fd, &addr).expect("connect");
    let conn = TcpStream::from(fd);
    conn.set_read_timeout(Some(support::READ_TIMEOUT))
        .expect("read timeout");
    let mut c = Client::from_conn(conn);
    c.send(subscribe_request(path, None).as_bytes());
    assert_eq!(c.head().status, 200);
    assert_eq!(c.next_frame().as_deref(), Some("retry: 3000\n\n"));
    c.conn
}

/// Two clients that stop reading and never close hold the whole cap (2):
/// a third is refused. A steady publisher (small events, no burst) fills
/// their windows; each is then found by `write_timeout`, counted as
/// `write_timeout` (not `slow`, not `client`), and its slot freed, so the
/// third gets in and receives the next event. Without the write timeout
/// they would hold the cap for as long as they stayed silent.
///
/// A peer that vanishes outright (powered off, no RST) is the same case as
/// far as the server can tell once its window is full. Before that, the
/// kernel gives the connection up once data has gone unacknowledged for
/// `TCP_USER_TIMEOUT` (the write timeout; with `heartbeat = "0"`, as here,
/// 15 s and three keepalive probes' time) and the stream ends, counted as
/// `write_timeout` too: see "Dead peers: the bound" in docs/operations.md,
/// and tests/dead_peers.rs, which cut subscribers off in network
/// namespaces.
#[test]
fn clients_that_vanish_without_fin_are_cut_at_the_write_timeout_and_free_their_slots() {
    let _serial = serial();
    let dir = TempDir::new("vanish");
    let (_ssed, addr) = spawn_config(
        &dir,
        "listen = \"127.0.0.1:0\"\nmax_connections = 2\nwrite_timeout = \"500ms\"\n\
         heartbeat = \"0\"\nmax_execution_time = \"0\"\n",
    );
    let gone: Vec<TcpStream> = (0..2)
        .map(|_| vanishing_subscriber(addr, "/events/v"))
        .collect();
    wait_open(addr, 2, DEADLINE);
    let mut refused = Client::new(addr);
    let head = refused.get_stream("/events/v", &[]);
    assert_eq!(head.status, 503, "the cap (2) should be full");
    assert!(head.header("retry-after").is_some());

    let mut publisher = Publisher::new(addr);
    // Streams subscribe right after their head: probe until both are in.
    assert!(
        wait_until(DEADLINE, || publisher.publish("v", "probe").1 == 2),
        "the silent clients never joined the topic"
    );
    let body = "v".repeat(4096);
    let started = Instant::now();
    let mut published = 0;
    let found = loop {
        // About 400 KiB/s: the two windows (a few KiB each, plus the
        // server's 64 KiB send buffer) fill within a second.
        let (_, receivers) = publisher.publish("v", &body);
        published += 1;
        if receivers == 0 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still {receivers} receivers after {published} events"
        );
        thread::sleep(Duration::from_millis(10));
    };
    wait_open(addr, 0, DEADLINE);
    eprintln!("both silent clients cut {found:?} after the first of {published} events");
    assert_eq!(disconnects(addr, "write_timeout"), 2);
    assert_eq!(disconnects(addr, "slow"), 0);
    assert_eq!(disconnects(addr, "client"), 0);
    assert!(
        found < Duration::from_secs(5),
        "found only after {found:?} (write_timeout 500ms)"
    );

    // The freed slots take new streams.
    let mut sub = Client::new(addr);
    assert_eq!(sub.get_stream("/events/v", &[]).status, 200);
    wait_open(addr, 1, DEADLINE);
    let (id, receivers) = publisher.publish("v", "next");
    assert_eq!(receivers, 1);
    assert_eq!(next_event(&mut sub), Some((id, "next".to_owned())));
    drop(gone);
}

// ---------------------------------------------------------------------------
// A reconnect storm after a restart
// ---------------------------------------------------------------------------

const STORM: usize = 5_000;
const STORM_CAP: usize = 4_000;
/// Events published before the restart; client `i` last saw event `i % EVENTS`.
const STORM_EVENTS: usize = 200;

/// Reads a resumed stream: `retry:`, then exactly `expected` (id, data)
/// in order, with no `reset`, nothing missing, nothing twice.
fn expect_replay(i: usize, c: &mut Client, expected: &[(String, String)]) {
    assert_eq!(
        c.next_frame().as_deref(),
        Some("retry: 3000\n\n"),
        "client {i}"
    );
    for want in expected {
        let got = next_event(c).unwrap_or_else(|| panic!("client {i}: stream ended"));
        assert_eq!(&got, want, "client {i}: wrong, missing or repeated event");
    }
}

/// 5,000 clients reconnect at once with `Last-Event-ID` right after a
/// restart (SIGTERM, exit 0, same port and `data_dir`): exactly the cap
/// (4,000) get streams and the rest a `503` with `Retry-After`; the server
/// never runs more stream threads than the cap; every accepted client
/// replays exactly the events after its id, then gets the next live event;
/// the refused ones come back once there is room and get the same.
#[test]
fn a_reconnect_storm_after_a_restart_respects_the_cap_and_replays_exactly() {
    let _serial = serial();
    let _ = ssed::raise_fd_limit(); // this process holds 5,000 sockets
    let dir = TempDir::new("storm");
    let data = dir.path().join("data");
    let config = |listen: &str| {
        format!(
            "listen = \"{listen}\"\nmax_connections = {STORM_CAP}\nheartbeat = \"0\"\n\
             max_execution_time = \"0\"\nhistory = 1000\ndata_dir = {:?}\n",
            data.to_str().expect("utf-8 temp path")
        )
    };
    let (mut first, addr) = spawn_config(&dir, &config("127.0.0.1:0"));
    let mut publisher = Publisher::new(addr);
    let events: Vec<(String, String)> = (0..STORM_EVENTS)
        .map(|n| {
            let data = format!("e{n}");
            (publisher.publish("storm", &data).0, data)
        })
        .collect();
    drop(publisher);
    first.terminate();
    let status = first.wait_exit(DEADLINE).expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}; log:\n{}", first.stderr());

    let (ssed, again) = spawn_config(&dir, &config(&addr.to_string()));
    assert_eq!(again, addr, "restarted on the same address");
    let threads0 = ssed.threads();
    let sampler = Sampler::start(ssed.pid());
    let last_seen = |i: usize| i % STORM_EVENTS;
    let request = |i: usize| subscribe_request("/events/storm", Some(&events[last_seen(i)].0));

    let started = Instant::now();
    let conns = open_many(addr, STORM, request);
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let mut c = Client::from_conn(conn);
        let head = c.head();
        match head.status {
            200 => accepted.push((i, c)),
            503 => {
                assert!(head.header("retry-after").is_some(), "client {i}: {head:?}");
                refused.push(i);
            }
            other => panic!("client {i}: status {other}"),
        }
    }
    let answered = started.elapsed();
    assert_eq!(
        (accepted.len(), refused.len()),
        (STORM_CAP, STORM - STORM_CAP),
        "exactly the cap should get streams"
    );
    for (i, c) in &mut accepted {
        expect_replay(*i, c, &events[last_seen(*i) + 1..]);
    }
    let replayed = started.elapsed();
    // Every accepted stream follows the topic live: one more event reaches
    // all of them, right after their replay.
    let (live_id, receivers) = Publisher::new(addr).publish("storm", "live");
    assert_eq!(receivers, STORM_CAP as u64);
    let live = (live_id, "live".to_owned());
    for (i, c) in &mut accepted {
        assert_eq!(next_event(c).as_ref(), Some(&live), "client {i}");
    }
    let (peak_threads, _) = sampler.finish();
    assert_eq!(
        metric(addr, "ssed_connections_rejected_total"),
        (STORM - STORM_CAP) as u64
    );
    assert!(
        peak_threads <= threads0 + STORM_CAP + 4,
        "threads {threads0} -> peak {peak_threads}: more streams than the cap ran"
    );

    // The accepted leave. With no heartbeat the server learns it from
    // failing writes: a first one draws a reset, the next fails. Those
    // events are in history for the ones still to come.
    drop(accepted);
    let mut flushes = Vec::new();
    let mut publisher = Publisher::new(addr);
    assert!(
        wait_until(DEADLINE, || {
            let data = format!("flush{}", flushes.len());
            flushes.push((publisher.publish("storm", &data).0, data));
            metric(addr, "ssed_connections_open") == 0
        }),
        "the closed streams were never noticed"
    );
    assert_eq!(disconnects(addr, "client"), STORM_CAP as u64);

    // The refused come back once there is room.
    let retried = open_many(addr, refused.len(), |j| request(refused[j]));
    for (j, conn) in retried.into_iter().enumerate() {
        let i = refused[j];
        let mut c = Client::from_conn(conn);
        assert_eq!(c.head().status, 200, "client {i} on its retry");
        let mut expected = events[last_seen(i) + 1..].to_vec();
        expected.push(live.clone());
        expected.extend_from_slice(&flushes);
        expect_replay(i, &mut c, &expected);
    }
    eprintln!(
        "storm of {STORM}: answered in {answered:?}, {STORM_CAP} replays done in {replayed:?}, \
         the refused {} done in {:?}; server threads {threads0} -> peak {peak_threads}",
        refused.len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// A publisher flooding past its subscribers
// ---------------------------------------------------------------------------

const FLOOD_EVENTS: usize = 2_500;
const FLOOD_BYTES: usize = 32 * 1024;
const STUCK: usize = 4;
const FAST: usize = 2;
/// How far the publisher lets the fast readers fall behind: well inside
/// the hub's 512-frame queue, so a reader that keeps up is never "slow".
const WINDOW: usize = 256;
/// What the flood may add to the server's peak RSS. Queues are bounded
/// (512 frames) and frames shared, so here the server holds about one
/// stuck queue (the stuck readers stall together: 16 MiB), the fast
/// readers' window (8 MiB) and the history (3 MiB); unbounded queues would
/// keep all 78 MiB published for the stuck readers.
const FLOOD_RSS_BOUND_KIB: u64 = 48 * 1024;

/// An event stream read a chunk (one frame) at a time with exact-size
/// reads, looking only at each frame's first line: megabytes a second even
/// in a debug build, where scanning every byte would not keep up.
struct FrameReader {
    r: BufReader<TcpStream>,
    line: Vec<u8>,
    frame: Vec<u8>,
}

impl FrameReader {
    /// Opens `GET path` as a stream and reads its head (expects `200`).
    fn open(addr: SocketAddr, path: &str) -> FrameReader {
        let mut conn = support::connect(addr);
        conn.write_all(subscribe_request(path, None).as_bytes())
            .expect("send request");
        let mut f = FrameReader {
            r: BufReader::with_capacity(64 * 1024, conn),
            line: Vec::new(),
            frame: Vec::new(),
        };
        assert!(f.read_line().starts_with(b"HTTP/1.1 200 "));
        while f.read_line() != b"\r\n" {}
        f
    }

    fn read_line(&mut self) -> &[u8] {
        self.line.clear();
        self.r
            .read_until(b'\n', &mut self.line)
            .expect("read a line");
        &self.line
    }

    /// The next frame; `None` at the end of the stream (last chunk, EOF,
    /// or a reset).
    fn next_frame(&mut self) -> Option<&[u8]> {
        self.line.clear();
        match self.r.read_until(b'\n', &mut self.line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let size = std::str::from_utf8(&self.line)
            .ok()
            .and_then(|l| usize::from_str_radix(l.trim_end(), 16).ok())
            .unwrap_or_else(|| panic!("bad chunk size line {:?}", self.line));
        if size == 0 {
            return None;
        }
        self.frame.resize(size + 2, 0);
        self.r.read_exact(&mut self.frame).ok()?;
        Some(&self.frame[..size])
    }

    /// The id and data of the next event (`id: ...` then one `data:`
    /// line); other frames are skipped. `None` at the end of the stream.
    fn next_event(&mut self) -> Option<(String, Vec<u8>)> {
        for _ in 0..100 {
            let frame = self.next_frame()?;
            let Some(rest) = frame.strip_prefix(b"id: ") else {
                continue; // retry:, a comment
            };
            let eol = rest.iter().position(|&b| b == b'\n').expect("id line");
            let id = String::from_utf8(rest[..eol].to_vec()).expect("utf-8 id");
            let data = rest[eol + 1..]
                .strip_prefix(b"data: ")
                .and_then(|d| d.strip_suffix(b"\n\n"))
                .expect("one data line");
            return Some((id, data.to_vec()));
        }
        panic!("100 frames without an event")
    }

    /// The ids of the flood events up to `end` (or the end of the stream),
    /// checking each one's data; bumps `progress` for each.
    fn flood_ids(&mut self, progress: &AtomicUsize) -> Vec<String> {
        let mut ids = Vec::new();
        while let Some((id, data)) = self.next_event() {
            match &data[..] {
                b"end" => break,
                b"probe" => {}
                _ => {
                    let seq = std::str::from_utf8(&data[..8]).expect("a sequence number");
                    assert_eq!(
                        (seq.parse::<usize>().ok(), data.len()),
                        (Some(ids.len()), FLOOD_BYTES),
                        "event {id}"
                    );
                    ids.push(id);
                    progress.fetch_add(1, Ordering::SeqCst);
                }
            }
            assert!(ids.len() <= FLOOD_EVENTS, "more events than published");
        }
        ids
    }
}

/// A publisher flooding far faster than some subscribers read: the ones
/// that stopped reading are dropped with reason `slow` (counted, logged
/// at `warn`) after receiving an exact prefix of the events; the ones that
/// keep up receive every event; publishing never waits on anyone; the
/// server's memory stays bounded, far below what it published.
#[test]
fn a_flooding_publisher_drops_slow_subscribers_and_memory_stays_bounded() {
    let _serial = serial();
    let dir = TempDir::new("flood");
    let (ssed, addr) = spawn_config(
        &dir,
        "listen = \"127.0.0.1:0\"\nhistory = 100\nwrite_timeout = \"60s\"\nheartbeat = \"0\"\n\
         max_execution_time = \"0\"\n",
    );
    let mut publisher = Publisher::new(addr);
    publisher.publish("flood", "probe"); // warms up the topic and its history

    let mut stuck: Vec<FrameReader> = (0..STUCK)
        .map(|_| FrameReader::open(addr, "/events/flood"))
        .collect();
    let progress: Vec<Arc<AtomicUsize>> =
        (0..FAST).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let fast: Vec<JoinHandle<Vec<String>>> = progress
        .iter()
        .map(|p| {
            let mut reader = FrameReader::open(addr, "/events/flood");
            let p = Arc::clone(p);
            thread::spawn(move || reader.flood_ids(&p))
        })
        .collect();
    // Streams subscribe right after their head: probe until all are in.
    let all = (STUCK + FAST) as u64;
    assert!(
        wait_until(DEADLINE, || publisher.publish("flood", "probe").1 == all),
        "not every subscriber joined the topic"
    );
    reset_peak_rss(&ssed);
    let rss0 = ssed.status_kib("VmRSS");

    let mut body = "x".repeat(FLOOD_BYTES);
    let mut published = Vec::with_capacity(FLOOD_EVENTS);
    let mut receivers_seen = Vec::new();
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for i in 0..FLOOD_EVENTS {
        assert!(
            wait_until(DEADLINE, || progress
                .iter()
                .all(|p| p.load(Ordering::SeqCst) + WINDOW >= i)),
            "a fast reader fell {WINDOW} events behind"
        );
        body.replace_range(..8, &format!("{i:08}"));
        let t = Instant::now();
        let (id, receivers) = publisher.publish("flood", &body);
        slowest = slowest.max(t.elapsed());
        if receivers_seen.last() != Some(&receivers) {
            receivers_seen.push(receivers);
        }
        published.push(id);
    }
    publisher.publish("flood", "end");
    let flooded = started.elapsed();
    let peak_rss = ssed.status_kib("VmHWM");

    for (i, reader) in fast.into_iter().enumerate() {
        let ids = reader.join().expect("fast reader");
        assert!(
            ids == published,
            "fast reader {i} missed or repeated events"
        );
    }
    // The stuck ones read again: an exact prefix of the flood, then the
    // server ends the stream.
    let unused = AtomicUsize::new(0);
    let mut prefixes = Vec::new();
    for (i, reader) in stuck.iter_mut().enumerate() {
        let ids = reader.flood_ids(&unused);
        assert!(
            !ids.is_empty() && ids.len() < published.len() && ids[..] == published[..ids.len()],
            "stuck reader {i}: {} events, not a prefix of the {} published",
            ids.len(),
            published.len()
        );
        prefixes.push(ids.len());
    }
    let mib = (FLOOD_EVENTS * FLOOD_BYTES) >> 20;
    eprintln!(
        "flood of {FLOOD_EVENTS} x {FLOOD_BYTES} B ({mib} MiB) in {flooded:?}, slowest publish \
         {slowest:?}; receivers {receivers_seen:?}; stuck readers got {prefixes:?} events; \
         server RSS {rss0} KiB -> peak {peak_rss} KiB"
    );
    assert_eq!(receivers_seen.first(), Some(&all));
    assert_eq!(receivers_seen.last(), Some(&(FAST as u64)));
    assert!(wait_until(DEADLINE, || disconnects(addr, "slow") == STUCK as u64));
    assert_eq!(disconnects(addr, "write_timeout"), 0);
    assert!(
        wait_until(DEADLINE, || ssed.logged("WARN")
            && ssed.logged("slow subscriber dropped")),
        "dropping a slow subscriber is not logged at warn; log:\n{}",
        ssed.stderr()
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a publish waited {slowest:?}"
    );
    assert!(
        peak_rss.saturating_sub(rss0) < FLOOD_RSS_BOUND_KIB,
        "RSS grew {} KiB during a flood of {mib} MiB",
        peak_rss - rss0
    );
}

// ---------------------------------------------------------------------------
// Handlers that panic or never yield (the library, in this process)
// ---------------------------------------------------------------------------

/// Threads of this process named `ssed-conn` (connection threads).
fn conn_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|name| name.trim_end() == "ssed-conn")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Marks the panics these tests cause on purpose.
const PLANNED: &str = "planned panic (tests/faults.rs)";

/// Keeps planned panics out of the test output; others print as usual.
fn quiet_planned_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
            let planned = message.is_some_and(|m| m.contains(PLANNED));
            if !planned {
                default(info);
            }
        }));
    });
}

/// Panics, before and after a stream opens, hundreds in a row: each ends
/// its own stream (500 before the head, a cut after it), is counted, and
/// gives its thread and its slot back: the cap (4) still admits four
/// streams afterwards and refuses a fifth.
#[test]
fn panicking_handlers_give_back_their_thread_and_slot() {
    let _serial = serial();
    quiet_planned_panics();
    const PANICS: usize = 200;
    let stats = Stats::new();
    let server = support::start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_connections(4)
            .route("/early", |_req, _stream| panic!("{}", PLANNED))
            .route("/late", |_req, stream| {
                stream.send("x", &1)?;
                panic!("{}", PLANNED)
            })
            .route("/hold", |_req, stream| {
                stream.send("held", &1)?;
                stream.sleep(Duration::from_secs(60))
            })
            .get("/plain", |_req| Response::text(200, "ok")),
    );
    let addr = server.local_addr();
    let started = Instant::now();
    for i in 0..PANICS {
        let mut c = Client::new(addr);
        if i % 2 == 0 {
            let head = c.get_stream("/early", &[]);
            assert_eq!(head.status, 500, "panic {i}");
        } else {
            let head = c.get_stream("/late", &[]);
            assert_eq!(head.status, 200, "panic {i}");
            assert_eq!(c.next_frame().as_deref(), Some("event: x\ndata: 1\n\n"));
            assert!(c.closed_within(DEADLINE), "panic {i}: stream not cut");
        }
    }
    assert!(
        wait_until(DEADLINE, || {
            let s = stats.snapshot();
            s.handler_panics == PANICS as u64 && s.streams_open == 0 && conn_threads() == 0
        }),
        "after {PANICS} panics: {:?}, {} connection threads",
        stats.snapshot(),
        conn_threads()
    );
    eprintln!("{PANICS} panicking streams in {:?}", started.elapsed());

    let mut held: Vec<Client> = (0..4)
        .map(|_| {
            let mut c = Client::new(addr);
            assert_eq!(c.get_stream("/hold", &[]).status, 200);
            assert_eq!(c.next_frame().as_deref(), Some("event: held\ndata: 1\n\n"));
            c
        })
        .collect();
    assert_eq!(Client::new(addr).get_stream("/hold", &[]).status, 503);
    let (head, body) = request(
        addr,
        "GET /plain HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((head.status, body.as_str()), (200, "ok\n"));
    held.clear();
    server.stop().expect("clean stop");
}

/// A handler that never calls its stream (spins in its own code, neither
/// sending nor sleeping) is out of reach of everything the server has:
///
/// - the budget is only checked inside the stream's own calls, so the
///   stream outlives `max_execution_time` and keeps its slot (the cap of 1
///   refuses the next stream);
/// - shutdown wakes blocked stream calls, which this handler never makes;
///   after the grace period the server cuts its socket (the client sees the
///   stream end without its last chunk) and `Server::run` returns, but the
///   thread itself runs on: a thread cannot be killed from outside, only
///   asked. It ends when its own code returns.
#[test]
fn a_handler_that_never_yields_is_cut_at_shutdown_but_its_thread_runs_on() {
    let _serial = serial();
    let budget = Duration::from_millis(100);
    let grace = Duration::from_millis(300);
    let release = Arc::new(AtomicBool::new(false));
    let spins = Arc::new(AtomicU64::new(0));
    let (started_tx, started_rx) = crossbeam_channel::bounded::<()>(1);
    let stats = Stats::new();
    let server = support::start(
        ssed::Server::builder()
            .stats(stats.clone())
            .max_connections(1)
            .max_execution_time(budget)
            .grace_period(grace)
            .route("/spin", {
                let release = Arc::clone(&release);
                let spins = Arc::clone(&spins);
                move |_req, stream| {
                    stream.open()?;
                    let _ = started_tx.try_send(()); // the test waits for it
                    // Bounded by the test: it sets `release` before it ends.
                    while !release.load(Ordering::SeqCst) {
                        spins.fetch_add(1, Ordering::Relaxed);
                        std::hint::spin_loop();
                    }
                    Ok(())
                }
            }),
    );
    // Whatever happens below, the spinning thread is released at the end.
    struct Release(Arc<AtomicBool>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _release = Release(Arc::clone(&release));

    let addr = server.local_addr();
    let mut c = Client::new(addr);
    assert_eq!(c.get_stream("/spin", &[]).status, 200);
    started_rx.recv_timeout(DEADLINE).expect("the handler runs");

    // Four budgets later the stream is still open and holds the only slot.
    thread::sleep(budget * 4);
    assert!(
        still_open(&c.conn),
        "the budget cannot end a spinning handler"
    );
    let s = stats.snapshot();
    assert_eq!((s.streams_open, s.disconnects(EndReason::Budget)), (1, 0));
    assert_eq!(Client::new(addr).get_stream("/spin", &[]).status, 503);

    let stopping = Instant::now();
    let stopper = thread::spawn(move || server.stop());
    assert!(
        c.closed_within(DEADLINE),
        "the socket is cut after the grace period"
    );
    let cut = stopping.elapsed();
    let stopped = stopper.join().expect("stop thread");
    let returned = stopping.elapsed();
    assert!(stopped.is_ok(), "{stopped:?}");
    // run() waits the grace period, cuts, then waits up to 1 s more.
    assert!(
        cut >= grace && returned < grace + Duration::from_secs(3),
        "cut after {cut:?}, stop returned after {returned:?}"
    );

    // The server is stopped; the handler is not.
    let before = spins.load(Ordering::Relaxed);
    assert!(
        wait_until(DEADLINE, || spins.load(Ordering::Relaxed) > before),
        "the spinning thread should still run"
    );
    assert_eq!(conn_threads(), 1);
    assert_eq!(stats.snapshot().streams_open, 1, "its slot is still taken");

    release.store(true, Ordering::SeqCst);
    assert!(
        wait_until(DEADLINE, || conn_threads() == 0
            && stats.snapshot().streams_open == 0),
        "the thread ends once its own code returns"
    );
    eprintln!("spinning handler: cut {cut:?} after stop, run() returned after {returned:?}");
}

// ---------------------------------------------------------------------------
// SIGTERM under load
// ---------------------------------------------------------------------------

const UNDER_LOAD: usize = 5_000;
/// The library's default grace period, which the daemon uses.
const GRACE: Duration = Duration::from_secs(5);
/// The last bytes of every stream at shutdown: the comment chunk, then
/// the terminating chunk.
const LAST_BYTES: &[u8] = b"18\r\n: server shutting down\n\n\r\n0\r\n\r\n";

/// SIGTERM with 5,000 open streams: the daemon exits with status 0 within
/// the grace period, having sent every stream its last frame and a clean
/// end of the chunked body.
#[test]
fn sigterm_with_5000_open_streams_exits_0_in_the_grace_period_with_a_last_frame_on_each() {
    let _serial = serial();
    let _ = ssed::raise_fd_limit(); // this process holds 5,000 sockets
    let dir = TempDir::new("sigterm");
    let (mut ssed, addr) = spawn_config(
        &dir,
        "listen = \"127.0.0.1:0\"\nmax_connections = 6000\nheartbeat = \"0\"\n\
         max_execution_time = \"0\"\n",
    );
    let opening = Instant::now();
    let conns = open_many(addr, UNDER_LOAD, |_| subscribe_request("/events/s", None));
    wait_open(addr, UNDER_LOAD as u64, Duration::from_secs(20));
    let opened = opening.elapsed();
    let threads = ssed.threads();

    let t = Instant::now();
    ssed.terminate();
    let status = ssed
        .wait_exit(GRACE + Duration::from_secs(5))
        .expect("exits after SIGTERM");
    let took = t.elapsed();
    assert!(status.success(), "{status:?}; log:\n{}", ssed.stderr());
    assert!(took < GRACE, "exit took {took:?}, past the grace period");
    assert!(
        ssed.logged(&format!("waiting for {UNDER_LOAD} connections")),
        "log:\n{}",
        ssed.stderr()
    );
    assert!(
        !ssed.logged("grace period over"),
        "streams were cut, not closed; log:\n{}",
        ssed.stderr()
    );

    let mut without = 0;
    for c in &conns {
        let got = read_to_close(c, Instant::now() + DEADLINE).expect("closed after exit");
        if !(got.starts_with(b"HTTP/1.1 200 ") && got.ends_with(LAST_BYTES)) {
            without += 1;
        }
    }
    eprintln!(
        "{UNDER_LOAD} streams opened in {opened:?} ({threads} server threads); \
         SIGTERM to exit 0 in {took:?}"
    );
    assert_eq!(without, 0, "streams without a last frame and a clean end");
}
