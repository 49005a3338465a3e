#![cfg(feature = "daemon")]
//! `GET /status` and `GET /status/events` over real sockets: the page asks
//! for nothing from elsewhere, the feed sends ssed's own figures about
//! once a second, it is a stream the cap counts, only this machine may see
//! either, and the feed's threads are gone a few seconds after its last
//! watcher (the page in a browser: `tests/browser.rs`).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::process::Ssed;
use support::{Client, Head, InProcess, field, metric, request, wait_until};

/// The longest any test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(5);

/// Every reason a stream can end for, as the feed and `/metrics` name them.
const REASONS: [&str; 6] = [
    "client",
    "write_timeout",
    "budget",
    "shutdown",
    "slow",
    "expired",
];

fn start(toml: &str) -> InProcess {
    start_on("127.0.0.1:0", toml)
}

fn start_on(listen: &str, toml: &str) -> InProcess {
    support::daemon(&format!("listen = \"{listen}\"\n{toml}"))
}

/// `GET path` with `Host: host` and the `extra` header lines.
fn get(addr: SocketAddr, path: &str, host: &str, extra: &[&str]) -> (Head, String) {
    request(addr, &support::request_text("GET", path, host, extra, ""))
}

/// Opens `/status/events` (or any stream) with `extra` header lines.
fn open(addr: SocketAddr, path: &str, extra: &[&str]) -> (Client, Head) {
    let mut c = Client::new(addr);
    let head = c.get_stream(path, extra);
    (c, head)
}

/// The next `status` event's figures, and when it came.
fn next_status(c: &mut Client) -> (Value, Instant) {
    let frame = c.frame_matching(10, |f| f.contains("event: status"));
    let at = Instant::now();
    let data = field(&frame, "data").concat();
    let figures = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {frame:?}"));
    assert_eq!(field(&frame, "id").len(), 1, "an id: {frame:?}");
    (figures, at)
}

#[test]
fn the_status_page_is_one_self_contained_html_page() {
    let d = start("");
    let (head, body) = get(d.addr, "/status", "localhost", &[]);
    assert_eq!(head.status, 200, "{body}");
    assert!(
        head.header("content-type")
            .is_some_and(|v| v.starts_with("text/html")),
        "{head:?}"
    );
    // The browser itself refuses anything from elsewhere.
    assert_eq!(
        head.header("referrer-policy"),
        Some("no-referrer"),
        "its URL may hold the token"
    );
    let policy = head.header("content-security-policy").unwrap_or_default();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    assert!(body.contains("<svg"), "charts are inline SVG");
    assert!(body.contains("new EventSource(url)"), "fed by its stream");
    let without_ns = body.replace("\"http://www.w3.org/2000/svg\"", "");
    for external in ["://", " src=", "<link", "@import", "url("] {
        assert!(!without_ns.contains(external), "{external} in the page");
    }
    // Readable on a phone.
    assert!(body.contains("name=\"viewport\" content=\"width=device-width"));
    // The demo page links to it.
    let (_, demo) = get(d.addr, "/", "localhost", &[]);
    assert!(demo.contains("href=\"/status\""), "{demo}");
}

#[test]
fn the_feed_sends_the_figures_about_every_second() {
    let d = start("max_connections = 5\nheartbeat = \"0\"");
    for i in 0..3 {
        d.hub
            .publish("t", ssed::Event::new().data(format!("before {i}")))
            .expect("publish");
    }
    let opened = Instant::now();
    let (mut c, head) = open(d.addr, "/status/events", &[]);
    assert_eq!(head.status, 200);
    assert!(
        head.header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "{head:?}"
    );
    let (first, at) = next_status(&mut c);
    assert!(
        at - opened < Duration::from_millis(1600),
        "the first figures came after {:?}",
        at - opened
    );
    for key in [
        "time",
        "uptime_seconds",
        "streams_open",
        "max_connections",
        "limited_by",
        "rejected_total",
        "published_total",
        "published_per_second",
        "delivered_total",
        "delivered_per_second",
        "bytes_sent_total",
        "disconnects",
        "disconnects_per_second",
        "rss_bytes",
        "threads",
        "watchers",
    ] {
        assert!(!first[key].is_null(), "no {key}: {first}");
    }
    assert_eq!(first["streams_open"], 1, "the feed is a stream: {first}");
    assert_eq!(first["max_connections"], 5, "{first}");
    assert_eq!(first["limited_by"], "configured", "{first}");
    assert_eq!(first["published_total"], 3, "{first}");
    assert_eq!(first["watchers"], 1, "{first}");
    for reason in REASONS {
        assert!(first["disconnects"][reason].is_u64(), "{reason}: {first}");
        assert!(
            first["disconnects_per_second"][reason].is_number(),
            "{reason}: {first}"
        );
    }
    assert!(
        first["rss_bytes"].as_u64().is_some_and(|b| b > 1 << 20),
        "{first}"
    );
    // The feed's stream, the ticker, the acceptor, the feed's hub's wakers…
    assert!(first["threads"].as_u64().is_some_and(|t| t >= 3), "{first}");
    assert!(
        first["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{first}"
    );

    // Ten publishes and a subscriber that gets them, right after an
    // event: the next figures count them, and their rate.
    let mut sub = Client::new(d.addr);
    assert_eq!(sub.get_stream("/events/t", &[]).status, 200);
    assert!(wait_until(DEADLINE, || d.hub.subscribers("t") == 1));
    let (mut second, mut at2) = next_status(&mut c);
    if second["streams_open"] != 2 {
        // Sent before the subscriber came in.
        (second, at2) = next_status(&mut c);
    }
    let gap = at2 - at;
    assert!(
        (Duration::from_millis(500)..Duration::from_millis(2600)).contains(&gap),
        "{gap:?} between two events (or three)"
    );
    for i in 0..10 {
        d.hub
            .publish("t", ssed::Event::new().data(format!("after {i}")))
            .expect("publish");
    }
    for _ in 0..10 {
        sub.frame_matching(5, |f| f.contains("data: after"));
    }
    let (third, at3) = next_status(&mut c);
    let gap = at3 - at2;
    assert!(
        (Duration::from_millis(500)..Duration::from_millis(1600)).contains(&gap),
        "{gap:?} between two events"
    );
    assert_eq!(second["streams_open"], 2, "{second}");
    assert_eq!(third["published_total"], 13, "{third}");
    let rate = third["published_per_second"].as_f64().expect("a rate");
    assert!(
        (7.0..=14.0).contains(&rate),
        "10 in about a second: {third}"
    );
    let delivered = third["delivered_total"].as_u64().expect("frames") as i64
        - second["delivered_total"].as_u64().expect("frames") as i64;
    assert!(
        delivered >= 10,
        "the subscriber's ten frames: {second} {third}"
    );
    assert!(
        third["delivered_per_second"]
            .as_f64()
            .is_some_and(|r| r >= 7.0),
        "{third}"
    );
    // The feed's own events are not counted as published.
    assert_eq!(d.hub.published(), 13);
    assert_eq!(metric(d.addr, "ssed_events_published_total"), 13);
    assert!(third["uptime_seconds"].as_u64() >= first["uptime_seconds"].as_u64());

    // A subscriber leaving is a disconnect by the client, per second too.
    drop(sub);
    let deadline = Instant::now() + DEADLINE;
    let after = loop {
        let (next, _) = next_status(&mut c);
        if next["disconnects"]["client"] == 1 {
            break next;
        }
        assert!(
            Instant::now() < deadline,
            "the subscriber that left was never counted: {next}"
        );
    };
    assert!(
        after["disconnects_per_second"]["client"]
            .as_f64()
            .is_some_and(|r| r > 0.5),
        "{after}"
    );
    assert_eq!(after["streams_open"], 1, "{after}");
    assert_eq!(
        metric(d.addr, "ssed_disconnects_total{reason=\"client\"}"),
        1
    );
}

#[test]
fn the_feed_is_a_stream_the_cap_counts() {
    let d = start("max_connections = 2\nheartbeat = \"0\"");
    let (_a, head) = open(d.addr, "/events/a", &[]);
    assert_eq!(head.status, 200);
    let (mut feed, head) = open(d.addr, "/status/events", &[]);
    assert_eq!(head.status, 200);
    next_status(&mut feed);
    // At the cap: another stream is refused, and so is another watcher.
    for path in ["/events/b", "/status/events"] {
        let (mut c, head) = open(d.addr, path, &[]);
        let body = String::from_utf8(c.body(&head)).unwrap_or_default();
        assert_eq!(head.status, 503, "{path}: {body}");
        assert!(head.header("retry-after").is_some(), "{path}: {head:?}");
    }
    assert_eq!(metric(d.addr, "ssed_connections_open"), 2);
    assert_eq!(metric(d.addr, "ssed_connections_rejected_total"), 2);
    let (figures, _) = next_status(&mut feed);
    assert_eq!(figures["streams_open"], 2, "{figures}");
    assert_eq!(figures["rejected_total"], 2, "{figures}");
}

#[test]
fn only_this_machine_sees_the_status() {
    let d = start("");
    let refused = |host: &str, extra: &[&str], why: &str| {
        for path in ["/status", "/status/events"] {
            let (head, body) = get(d.addr, path, host, extra);
            assert_eq!(head.status, 403, "{path} {why}: {body}");
            assert!(!body.contains("<svg") && !body.contains("event:"), "{body}");
        }
    };
    // A proxy on this machine connects from loopback for anyone.
    refused(
        "localhost",
        &["X-Forwarded-For: 203.0.113.9"],
        "through a proxy",
    );
    refused(
        "localhost",
        &["Forwarded: for=203.0.113.9"],
        "through a proxy",
    );
    // A page that reached us under its own name (DNS rebinding).
    refused("rebound.example", &[], "under another name");
    // From this machine, under an IP address or localhost: served.
    for host in ["localhost", &d.addr.to_string()] {
        let (head, _) = get(d.addr, "/status", host, &[]);
        assert_eq!(head.status, 200, "Host {host}");
    }
    drop(d);

    // From an address that is not loopback.
    let Some(ip) = support::non_loopback_ip() else {
        eprintln!(
            "skipped the part from afar: this machine has no non-loopback address to \
             connect from (auth::is_loopback is unit-tested)"
        );
        return;
    };
    let d = start_on(&SocketAddr::new(ip, 0).to_string(), "");
    for path in ["/status", "/status/events"] {
        let (head, body) = get(d.addr, path, &d.addr.to_string(), &[]);
        assert_eq!(head.status, 403, "{path} from {ip}: {body}");
    }
    // Subscribing from there stays open as ever.
    let (_c, head) = open(d.addr, "/events/t", &[]);
    assert_eq!(head.status, 200);
}

#[test]
fn with_an_admin_token_the_status_asks_for_it_as_a_header_or_in_the_url() {
    let d = start("[auth]\nadmin_token = \"adm1n-t0ken\"\n");
    let host = d.addr.to_string();
    for path in ["/status", "/status/events"] {
        let (head, body) = get(d.addr, path, &host, &[]);
        assert_eq!(head.status, 401, "{path} without the token: {body}");
        let (head, _) = get(d.addr, path, &host, &["Authorization: Bearer nope"]);
        assert_eq!(head.status, 401, "{path} with a wrong token");
        let wrong = format!("{path}?token=nope");
        assert_eq!(get(d.addr, &wrong, &host, &[]).0.status, 401, "{wrong}");
    }
    let (head, body) = get(
        d.addr,
        "/status",
        &host,
        &["Authorization: Bearer adm1n-t0ken"],
    );
    assert_eq!(head.status, 200, "{body}");
    let (head, _) = get(d.addr, "/status?token=adm1n-t0ken", &host, &[]);
    assert_eq!(head.status, 200, "the page's own URL may carry it");
    let (mut feed, head) = open(d.addr, "/status/events?token=adm1n-t0ken", &[]);
    assert_eq!(head.status, 200, "so may its EventSource's");
    next_status(&mut feed);
    // The URL form is for the status page alone.
    let (head, _) = get(d.addr, "/streams?token=adm1n-t0ken", &host, &[]);
    assert_eq!(head.status, 401);
}

/// Nobody watching costs nothing: the feed's threads (its ticker, its
/// hub's) start with the first watcher and end a few seconds after the
/// last one. The binary itself, so its threads are its own.
#[test]
fn the_feed_runs_only_while_watched() {
    let ssed = Ssed::spawn(
        &["--listen", "127.0.0.1:0"],
        &[("RUST_LOG", "info,ssed::daemon::app::status=debug")],
    );
    let addr = ssed.listening();
    let idle = ssed.threads();
    let (mut c, head) = open(addr, "/status/events", &[]);
    assert_eq!(head.status, 200);
    let (figures, _) = next_status(&mut c);
    let watched = ssed.threads();
    assert_eq!(
        figures["threads"].as_u64(),
        Some(watched as u64),
        "{figures}"
    );
    // The stream's own thread, the ticker, and the hub's sweeper and wakers.
    assert!(
        watched >= idle + 3,
        "{idle} threads idle, {watched} watched"
    );
    // A second watcher costs its stream's thread alone.
    let (mut c2, _) = open(addr, "/status/events", &[]);
    let (figures, _) = next_status(&mut c2);
    assert_eq!(figures["watchers"], 2, "{figures}");
    assert_eq!(ssed.threads(), watched + 1);
    drop(c);
    drop(c2);
    assert!(
        wait_until(Duration::from_secs(8), || ssed.threads() == idle),
        "{} threads a while after the last watcher left, {idle} before",
        ssed.threads()
    );
    assert!(ssed.logged("status feed stopped"), "{}", ssed.stderr());
    // And it starts again.
    let (mut c, _) = open(addr, "/status/events", &[]);
    let (figures, _) = next_status(&mut c);
    assert_eq!(figures["watchers"], 1, "{figures}");
}
