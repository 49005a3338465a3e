#![cfg(feature = "daemon")]
//! Subscribers that vanish without a word: a phone that loses its network
//! sends no FIN and no RST. Before, such a stream held its thread and its
//! slot until the kernel's retransmissions ran out (`tcp_retries2`, about
//! 15 minutes); now `TCP_USER_TIMEOUT` (the write timeout) and keepalive
//! end the connection and the acceptor's poller ends the stream at once,
//! within `heartbeat + write_timeout` and a little.
//!
//! Each test makes a network namespace of its own joined to this one by a
//! veth pair on addresses of its own (10.233.N.0/30), runs the daemon on
//! this side and a subscriber (`ssed loadtest`, one stream) inside the
//! namespace, then cuts the subscriber off: its link goes down, or its
//! packets to the server are dropped while the link stays up. Meanwhile
//! the stream sends heartbeats only, or events published about once a
//! second (the issue's own case): small ones, which a waker thread sends
//! for the sleeping subscriber, or large ones, which the stream's own
//! thread writes. It removes the namespace (and with it the veth pair) and
//! stops both processes by PID at the end, on failure too. Without root or
//! `ip` a test says why and passes, except with `CI=true`, where it fails.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::netns::netns;
use support::process::{Ssed, spawn_config};
use support::{Client, TempDir, metric, metrics, request, request_text, streams_open, wait_until};

const HEARTBEAT: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// What the bound allows beyond `heartbeat + write_timeout`: the kernel's
/// retransmission timer rounds the user timeout up a little.
const SLACK: Duration = Duration::from_secs(4);
/// The publish token of the tests that publish: the daemon listens on the
/// veth address, not loopback, so publishing needs one.
const PUBLISH_TOKEN: &str = "p";
/// An event a waker thread sends for a sleeping subscriber.
const SMALL_EVENT: usize = 200;
/// An event above what a waker sends for a subscriber (16 KiB,
/// `DIRECT_BYTES` in src/hub/fanout.rs): the stream's own thread writes it.
const LARGE_EVENT: usize = 20 * 1024;
/// How often the publisher publishes.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Most events the publisher publishes (so at most this many seconds):
/// more than a test waits, from the stream's start to the end of its
/// longest wait for the stream's end.
const PUBLISH_MAX: u32 = 20;

fn disconnects(addr: SocketAddr, reason: &str) -> u64 {
    metrics(addr)
        .get(&format!("ssed_disconnects_total{{reason=\"{reason}\"}}"))
        .copied()
        .unwrap_or(0)
}

fn write_timeouts(addr: SocketAddr) -> u64 {
    disconnects(addr, "write_timeout")
}

/// How the subscriber is cut off.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Every link of its namespace but `lo` goes down: no FIN, no RST.
    LinkDown,
    /// The link stays up and data still arrives; its packets to the
    /// server (its ACKs) are dropped on the way out.
    NoAcks,
}

/// What the stream sends while its subscriber is cut off.
#[derive(Clone, Copy, Debug)]
enum Traffic {
    /// Nothing published: heartbeats only (a waker thread sends them).
    Heartbeats,
    /// A [`SMALL_EVENT`] published every [`PUBLISH_EVERY`], from before the
    /// cut until the stream is gone: a waker thread sends each.
    SmallEvents,
    /// The same with a [`LARGE_EVENT`]: the stream's own thread writes each.
    LargeEvents,
}

impl Traffic {
    /// The bytes of data of each event published, if any are.
    fn event_bytes(self) -> Option<usize> {
        match self {
            Traffic::Heartbeats => None,
            Traffic::SmallEvents => Some(SMALL_EVENT),
            Traffic::LargeEvents => Some(LARGE_EVENT),
        }
    }
}

/// Publishes events on a thread of its own, at most [`PUBLISH_MAX`] of
/// them, one every [`PUBLISH_EVERY`], until stopped; dropping it stops it
/// and waits for the thread.
struct Publisher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u32, String>>>,
}

impl Publisher {
    fn start(addr: SocketAddr, topic: &str, bytes: usize) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let path = format!("/publish/{topic}");
        let data = "x".repeat(bytes);
        let auth = format!("Authorization: Bearer {PUBLISH_TOKEN}");
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            for n in 0..PUBLISH_MAX {
                let (head, body) =
                    request(addr, &request_text("POST", &path, "t", &[&auth], &data));
                if head.status != 200 {
                    return Err(format!("publish {n}: {} {body}", head.status));
                }
                // Until the next one is due, unless stopped.
                let next = started + PUBLISH_EVERY * (n + 1);
                while Instant::now() < next {
                    if stopped.load(Ordering::Relaxed) {
                        return Ok(n + 1);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Ok(PUBLISH_MAX)
        });
        Publisher {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it; how many events it published, or why it failed.
    fn finish(mut self) -> Result<u32, String> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("joined once");
        thread
            .join()
            .unwrap_or_else(|_| Err("the publisher panicked".into()))
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs the daemon on the namespace's server address, a subscriber inside
/// the namespace, starts `traffic`, then cuts the subscriber off: the
/// stream must be gone within the bound, counted as a write timeout.
fn vanished_subscriber_is_freed(test: &str, n: u8, cut: Cut, traffic: Traffic) {
    let Some(ns) = netns(test, n) else { return };
    let dir = TempDir::new(test);
    let config = dir.path().join("ssed.toml");
    let mut toml = format!(
        "listen = \"{}:0\"\nheartbeat = \"{}s\"\nwrite_timeout = \"{}s\"\nmax_execution_time = \"0\"\n",
        ns.server,
        HEARTBEAT.as_secs(),
        WRITE_TIMEOUT.as_secs()
    );
    if traffic.event_bytes().is_some() {
        toml.push_str(&format!("[auth]\npublish_token = \"{PUBLISH_TOKEN}\"\n"));
    }
    std::fs::write(&config, toml).expect("write config");
    let server = Ssed::spawn(&["--config", config.to_str().expect("utf-8 path")], &[]);
    let addr = server.listening();
    let url = format!("http://{addr}/events/{test}");
    let _client = Ssed::spawn_via(
        &["ip", "netns", "exec", &ns.name],
        &[
            "loadtest",
            "--url",
            &url,
            "--connections",
            "1",
            "--duration",
            "60s",
        ],
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(10), || streams_open(addr) == 1),
        "the subscriber in the namespace never got its stream"
    );
    let thread_writes = || metric(addr, "ssed_stream_thread_writes_total");
    let writes_before = thread_writes();
    let publisher = traffic
        .event_bytes()
        .map(|bytes| Publisher::start(addr, test, bytes));
    // A heartbeat, or two events, go through first: the connection is
    // alive, and they show who writes for the stream.
    let alive = match traffic {
        Traffic::Heartbeats => HEARTBEAT,
        Traffic::SmallEvents | Traffic::LargeEvents => PUBLISH_EVERY,
    };
    std::thread::sleep(alive + Duration::from_millis(500));
    assert_eq!(
        streams_open(addr),
        1,
        "the stream holds while the peer answers"
    );
    let published = metric(addr, "ssed_events_published_total");
    // Who wrote them: a waker thread, or the stream's own.
    let writes = thread_writes() - writes_before;
    match traffic {
        Traffic::Heartbeats | Traffic::SmallEvents => assert_eq!(
            writes, 0,
            "heartbeats and small events go out from a waker while the subscriber sleeps"
        ),
        Traffic::LargeEvents => assert!(
            writes > 0,
            "large events go out from the stream's own thread"
        ),
    }
    if publisher.is_some() {
        assert!(
            published >= 2,
            "{published} events published before the cut"
        );
    }
    let before = write_timeouts(addr);
    let blackhole = format!("{}/32", ns.server);
    let cut_command: &[&str] = match cut {
        // `ns.inner` is not known here: every link but lo goes down.
        Cut::LinkDown => &[
            "sh",
            "-c",
            "for l in $(ls /sys/class/net); do [ $l = lo ] || ip link set $l down; done",
        ],
        Cut::NoAcks => &["ip", "route", "add", "blackhole", &blackhole],
    };
    ns.exec(cut_command).expect("cut the subscriber off");
    let cut_at = Instant::now();
    let bound = HEARTBEAT + WRITE_TIMEOUT + SLACK;
    assert!(
        wait_until(bound + Duration::from_secs(5), || streams_open(addr) == 0),
        "the stream of a vanished subscriber is still open {:?} after the cut ({cut:?}, {traffic:?})",
        cut_at.elapsed()
    );
    let took = cut_at.elapsed();
    let published_by_end = metric(addr, "ssed_events_published_total");
    if let Some(publisher) = publisher {
        let count = publisher.finish().expect("the publisher publishes");
        // Events went on after the cut, not heartbeats only.
        assert!(
            published_by_end > published,
            "no event was published between the cut and the stream's end ({count} in all)"
        );
    }
    assert!(
        took <= bound,
        "freed {took:?} after the cut ({cut:?}, {traffic:?}); the bound is heartbeat + write_timeout + {SLACK:?} = {bound:?}"
    );
    assert_eq!(
        write_timeouts(addr),
        before + 1,
        "counted under ssed_disconnects_total{{reason=\"write_timeout\"}}"
    );
    eprintln!("{test}: freed {took:?} after the cut (bound {bound:?})");
}

#[test]
fn a_subscriber_whose_link_goes_down_is_freed_within_heartbeat_plus_write_timeout() {
    vanished_subscriber_is_freed("dead_peer_link_down", 1, Cut::LinkDown, Traffic::Heartbeats);
}

#[test]
fn a_subscriber_that_stops_acknowledging_is_freed_within_heartbeat_plus_write_timeout() {
    vanished_subscriber_is_freed("dead_peer_no_acks", 2, Cut::NoAcks, Traffic::Heartbeats);
}

#[test]
fn a_subscriber_whose_link_goes_down_amid_small_events_is_freed_within_the_bound() {
    vanished_subscriber_is_freed(
        "dead_peer_link_down_small",
        4,
        Cut::LinkDown,
        Traffic::SmallEvents,
    );
}

#[test]
fn a_subscriber_that_stops_acknowledging_small_events_is_freed_within_the_bound() {
    vanished_subscriber_is_freed(
        "dead_peer_no_acks_small",
        5,
        Cut::NoAcks,
        Traffic::SmallEvents,
    );
}

#[test]
fn a_subscriber_whose_link_goes_down_amid_large_events_is_freed_within_the_bound() {
    vanished_subscriber_is_freed(
        "dead_peer_link_down_large",
        6,
        Cut::LinkDown,
        Traffic::LargeEvents,
    );
}

#[test]
fn a_subscriber_that_stops_acknowledging_large_events_is_freed_within_the_bound() {
    vanished_subscriber_is_freed(
        "dead_peer_no_acks_large",
        7,
        Cut::NoAcks,
        Traffic::LargeEvents,
    );
}

#[test]
fn a_reset_connection_ends_its_idle_stream_at_once_not_at_its_next_write() {
    // No heartbeat and no budget: before, nothing would ever write to this
    // stream again, and a connection the peer reset held its thread and
    // slot until the server stopped. The acceptor's poller hears the reset.
    let dir = TempDir::new("dead_peer_reset");
    let (_server, addr) = spawn_config(
        &dir,
        "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\nmax_execution_time = \"0\"\n",
    );
    let mut client = Client::new(addr);
    let head = client.get_stream("/events/dead_peer_reset", &[]);
    assert_eq!(head.status, 200);
    assert!(wait_until(Duration::from_secs(5), || streams_open(addr) == 1));
    let before = disconnects(addr, "client");
    // Linger 0: close sends RST, not FIN.
    rustix::net::sockopt::set_socket_linger(&client.conn, Some(Duration::ZERO)).expect("SO_LINGER");
    drop(client);
    let reset_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || streams_open(addr) == 0),
        "a reset idle stream is still open {:?} later",
        reset_at.elapsed()
    );
    assert_eq!(
        disconnects(addr, "client"),
        before + 1,
        "counted as the client's"
    );
}
