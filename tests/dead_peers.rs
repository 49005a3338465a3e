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
//! packets to the server are dropped while the link stays up. It removes
//! the namespace (and with it the veth pair) and stops both processes by
//! PID at the end, on failure too. Without root or `ip` a test says why
//! and passes, except with `CI=true`, where it fails.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::netns::netns;
use support::process::{Ssed, spawn_config};
use support::{Client, TempDir, metrics, streams_open, wait_until};

const HEARTBEAT: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// What the bound allows beyond `heartbeat + write_timeout`: the kernel's
/// retransmission timer rounds the user timeout up a little.
const SLACK: Duration = Duration::from_secs(4);

fn disconnects(addr: SocketAddr, reason: &str) -> u64 {
    metrics(addr)
        .get(&format!("ssed_disconnects_total{{reason=\"{reason}\"}}"))
        .copied()
        .unwrap_or(0)
}

fn write_timeouts(addr: SocketAddr) -> u64 {
    disconnects(addr, "write_timeout")
}

/// Runs the daemon on the namespace's server address, a subscriber inside
/// the namespace, then `cut` (a command run inside the namespace): the
/// stream must be gone within the bound, counted as a write timeout.
fn vanished_subscriber_is_freed(test: &str, n: u8, cut: &[&str]) {
    let Some(ns) = netns(test, n) else { return };
    let dir = TempDir::new(test);
    let config = dir.path().join("ssed.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{}:0\"\nheartbeat = \"{}s\"\nwrite_timeout = \"{}s\"\nmax_execution_time = \"0\"\n",
            ns.server,
            HEARTBEAT.as_secs(),
            WRITE_TIMEOUT.as_secs()
        ),
    )
    .expect("write config");
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
    // A heartbeat or two goes through first: the connection is alive.
    std::thread::sleep(HEARTBEAT + Duration::from_millis(500));
    assert_eq!(
        streams_open(addr),
        1,
        "the stream holds while the peer answers"
    );
    let before = write_timeouts(addr);
    ns.exec(cut).expect("cut the subscriber off");
    let cut_at = Instant::now();
    let bound = HEARTBEAT + WRITE_TIMEOUT + SLACK;
    assert!(
        wait_until(bound + Duration::from_secs(5), || streams_open(addr) == 0),
        "the stream of a vanished subscriber is still open {:?} after the cut",
        cut_at.elapsed()
    );
    let took = cut_at.elapsed();
    assert!(
        took <= bound,
        "freed {took:?} after the cut; the bound is heartbeat + write_timeout + {SLACK:?} = {bound:?}"
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
    vanished_subscriber_is_freed(
        "dead_peer_link_down",
        1,
        // `ns.inner` is not known here: every link but lo goes down.
        &[
            "sh",
            "-c",
            "for l in $(ls /sys/class/net); do [ $l = lo ] || ip link set $l down; done",
        ],
    );
}

#[test]
fn a_subscriber_that_stops_acknowledging_is_freed_within_heartbeat_plus_write_timeout() {
    // The link stays up and data still arrives; the subscriber's packets
    // to the server (its ACKs) are dropped on the way out.
    vanished_subscriber_is_freed(
        "dead_peer_no_acks",
        2,
        &["ip", "route", "add", "blackhole", "10.233.2.1/32"],
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
