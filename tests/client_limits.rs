#![cfg(feature = "daemon")]
//! Clients that hog: `max_streams_per_client`, `publish_rate`, and
//! `trusted_proxies`, the peers whose forwarded headers say who the client
//! is. Each client here connects from an address of its own on loopback
//! (127.0.0.2, 127.0.0.3, …: Linux answers the whole 127/8), to a daemon
//! process of its own.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::process::{Ssed, spawn_config};
use support::{Client, Head, TempDir, connect_from, metric, streams_open, wait_until};

/// Opens `path` as an event stream from `from`, with extra header lines;
/// the client (to keep the stream open) and the answer's head.
fn stream_from(from: &str, server: SocketAddr, path: &str, extra: &[&str]) -> (Client, Head) {
    let mut c = Client::from_conn(connect_from(from, server));
    let head = c.get_stream(path, extra);
    (c, head)
}

/// The body of a refused stream (sized, then closed).
fn refusal_body(c: &mut Client, head: &Head) -> String {
    String::from_utf8(c.body(head)).expect("a text body")
}

/// POSTs `body` to `path` from `from` with extra header lines.
fn post_from(
    from: &str,
    server: SocketAddr,
    path: &str,
    extra: &[&str],
    body: &str,
) -> (Head, String) {
    let mut c = Client::from_conn(connect_from(from, server));
    let req = support::request_text("POST", path, "127.0.0.1", extra, body);
    c.send(req.as_bytes());
    c.response()
}

fn limited(addr: SocketAddr, limit: &str) -> u64 {
    metric(
        addr,
        &format!("ssed_client_limited_total{{limit=\"{limit}\"}}"),
    )
}

fn daemon(test: &str, toml: &str) -> (TempDir, Ssed, SocketAddr) {
    let dir = TempDir::new(test);
    let (ssed, addr) = spawn_config(&dir, &format!("listen = \"127.0.0.1:0\"\n{toml}"));
    (dir, ssed, addr)
}

#[test]
fn a_client_past_its_stream_limit_gets_429_and_others_are_unaffected() {
    let (_dir, _ssed, addr) = daemon("per-client", "max_streams_per_client = 3\n");
    let mut a: Vec<Client> = (0..3)
        .map(|i| {
            let (c, head) = stream_from("127.0.0.2", addr, "/events/t", &[]);
            assert_eq!(head.status, 200, "stream {i} of client A: {head:?}");
            c
        })
        .collect();
    let (mut fourth, head) = stream_from("127.0.0.2", addr, "/events/t", &[]);
    assert_eq!(head.status, 429, "the fourth stream of A: {head:?}");
    assert!(head.header("retry-after").is_some(), "{head:?}");
    let body = refusal_body(&mut fourth, &head);
    assert!(
        body.contains("127.0.0.2") && body.contains("at most 3"),
        "{body}"
    );
    // Another client is unaffected: it gets its own three.
    let b: Vec<Client> = (0..3)
        .map(|i| {
            let (c, head) = stream_from("127.0.0.3", addr, "/events/t", &[]);
            assert_eq!(head.status, 200, "stream {i} of client B: {head:?}");
            c
        })
        .collect();
    assert_eq!(streams_open(addr), 6);
    assert_eq!(limited(addr, "streams"), 1);
    assert_eq!(metric(addr, "ssed_connections_rejected_total"), 0);
    // A's place comes back when one of its streams ends.
    drop(a.pop());
    assert!(
        wait_until(Duration::from_secs(5), || streams_open(addr) == 5),
        "A's closed stream did not end"
    );
    let (_again, head) = stream_from("127.0.0.2", addr, "/events/t", &[]);
    assert_eq!(head.status, 200, "A may open one again: {head:?}");
    // Mailbox consumers count too.
    let (_c, head) = stream_from("127.0.0.3", addr, "/keys/k", &[]);
    assert_eq!(head.status, 429, "B's fourth, a consumer: {head:?}");
    assert_eq!(limited(addr, "streams"), 2);
    drop(b);
}

#[test]
fn behind_a_trusted_proxy_the_limit_follows_x_forwarded_for() {
    let (_dir, _ssed, addr) = daemon(
        "trusted",
        "max_streams_per_client = 2\ntrusted_proxies = [\"127.0.0.9\"]\n",
    );
    let via = |client: &str| format!("X-Forwarded-For: 198.51.100.1, {client}");
    let mut held = Vec::new();
    for i in 0..2 {
        let (c, head) = stream_from("127.0.0.9", addr, "/events/t", &[&via("203.0.113.1")]);
        assert_eq!(head.status, 200, "stream {i} of 203.0.113.1: {head:?}");
        held.push(c);
    }
    let (mut c, head) = stream_from("127.0.0.9", addr, "/events/t", &[&via("203.0.113.1")]);
    assert_eq!(head.status, 429, "{head:?}");
    let body = refusal_body(&mut c, &head);
    assert!(body.contains("203.0.113.1"), "{body}");
    // Another client behind the same proxy has its own allowance, the
    // proxy's address is not the client; RFC 7239 `Forwarded` works too.
    for (i, h) in [
        via("203.0.113.2"),
        via("203.0.113.2"),
        "Forwarded: for=203.0.113.3;proto=https".into(),
    ]
    .iter()
    .enumerate()
    {
        let (c, head) = stream_from("127.0.0.9", addr, "/events/t", &[h]);
        assert_eq!(head.status, 200, "stream {i} ({h}): {head:?}");
        held.push(c);
    }
    let (_c, head) = stream_from(
        "127.0.0.9",
        addr,
        "/events/t",
        &["Forwarded: for=\"[2001:db8::1]:443\", for=203.0.113.3"],
    );
    assert_eq!(head.status, 200, "second of 203.0.113.3: {head:?}");
    let (_c, head) = stream_from(
        "127.0.0.9",
        addr,
        "/events/t",
        &["Forwarded: for=203.0.113.3"],
    );
    assert_eq!(head.status, 429, "third of 203.0.113.3: {head:?}");
}

#[test]
fn from_an_untrusted_peer_forwarded_headers_change_nothing() {
    let (_dir, _ssed, addr) = daemon(
        "untrusted",
        "max_streams_per_client = 2\ntrusted_proxies = [\"127.0.0.9\"]\n",
    );
    let mut held = Vec::new();
    for i in 0..2 {
        let h = format!("X-Forwarded-For: 192.0.2.{i}");
        let (c, head) = stream_from("127.0.0.2", addr, "/events/t", &[&h]);
        assert_eq!(head.status, 200, "{head:?}");
        held.push(c);
    }
    for h in [
        "X-Forwarded-For: 192.0.2.77",
        "Forwarded: for=192.0.2.78",
        "X-Real-IP: 192.0.2.79",
    ] {
        let (mut c, head) = stream_from("127.0.0.2", addr, "/events/t", &[h]);
        assert_eq!(head.status, 429, "{h} must not make a new client: {head:?}");
        let body = refusal_body(&mut c, &head);
        assert!(body.contains("127.0.0.2"), "{body}");
    }
    assert_eq!(limited(addr, "streams"), 3);
}

#[test]
fn publish_rate_limits_each_address_with_no_token() {
    let (_dir, _ssed, addr) = daemon("rate-addr", "publish_rate = \"5/m\"\n");
    for i in 0..5 {
        let (head, body) = post_from("127.0.0.2", addr, "/publish/t", &[], &format!("m{i}"));
        assert_eq!(head.status, 200, "publish {i}: {body}");
    }
    let (head, body) = post_from("127.0.0.2", addr, "/publish/t", &[], "too many");
    assert_eq!(head.status, 429, "{body}");
    assert!(body.contains("5/m"), "{body}");
    // One every 12 s at 5 a minute: the answer says how long to wait.
    let wait: u64 = head
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=12).contains(&wait), "Retry-After {wait}");
    // Pushes into mailboxes are publishes too.
    let (head, _) = post_from("127.0.0.2", addr, "/keys/k", &[], "m");
    assert_eq!(head.status, 429);
    // Another address has its own allowance.
    let (head, body) = post_from("127.0.0.3", addr, "/publish/t", &[], "other");
    assert_eq!(head.status, 200, "{body}");
    assert_eq!(limited(addr, "publish_rate"), 2);
    assert_eq!(metric(addr, "ssed_events_published_total"), 6);
}

#[test]
fn publish_rate_limits_a_credential_from_every_address() {
    let (_dir, _ssed, addr) = daemon(
        "rate-token",
        "publish_rate = \"3/m\"\n[auth]\npublish_token = \"pt\"\n",
    );
    let auth = ["Authorization: Bearer pt"];
    for (i, from) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().enumerate() {
        let (head, body) = post_from(from, addr, "/publish/t", &auth, "m");
        assert_eq!(head.status, 200, "publish {i}: {body}");
    }
    // The token's allowance is spent, from wherever it comes.
    let (head, body) = post_from("127.0.0.5", addr, "/publish/t", &auth, "m");
    assert_eq!(head.status, 429, "{body}");
    // A wrong token is refused as before, and not counted against the rate.
    let (head, _) = post_from(
        "127.0.0.5",
        addr,
        "/publish/t",
        &["Authorization: Bearer x"],
        "m",
    );
    assert_eq!(head.status, 401);
    assert_eq!(limited(addr, "publish_rate"), 1);
}

#[test]
fn a_trusted_proxy_on_https_gets_a_secure_cookie_and_never_the_loopback_right() {
    let (_dir, _ssed, addr) = daemon(
        "secure",
        "trusted_proxies = [\"127.0.0.9\"]\n[auth]\nsubscribe_token = \"st\"\n",
    );
    let ticket = |from: &str| {
        let (head, body) = post_from(from, addr, "/tickets", &["Authorization: Bearer st"], "");
        assert_eq!(head.status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        v["ticket"].as_str().expect("a ticket").to_owned()
    };
    let cookie_of = |from: &str, extra: &[&str]| {
        let path = format!("/events/t?ticket={}", ticket(from));
        let (_c, head) = stream_from(from, addr, &path, extra);
        assert_eq!(head.status, 200, "{head:?}");
        head.header("set-cookie")
            .expect("a session cookie")
            .to_owned()
    };
    let https = ["X-Forwarded-For: 203.0.113.1", "X-Forwarded-Proto: https"];
    let cookie = cookie_of("127.0.0.9", &https);
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let cookie = cookie_of("127.0.0.9", &["X-Forwarded-Proto: http"]);
    assert!(!cookie.contains("Secure"), "{cookie}");
    // The same claim from a peer not trusted is not believed.
    let cookie = cookie_of("127.0.0.2", &https);
    assert!(!cookie.contains("Secure"), "{cookie}");

    // Behind a trusted proxy, a page on https://host is same-origin.
    let origin = ["X-Forwarded-Proto: https", "Origin: https://localhost"];
    let (_c, head) = stream_from("127.0.0.9", addr, "/events/t?token=st", &origin);
    assert_eq!(head.status, 200, "{head:?}");
    let (_c, head) = stream_from("127.0.0.2", addr, "/events/t?token=st", &origin);
    assert_eq!(
        head.status, 403,
        "from an untrusted peer it is another origin"
    );

    // No publish token: a forwarded request is never "this machine", even
    // from a trusted proxy on loopback saying the client is loopback.
    for h in [
        "X-Forwarded-For: 127.0.0.1",
        "Forwarded: for=127.0.0.1",
        "X-Forwarded-Proto: http",
    ] {
        let (head, body) = post_from("127.0.0.9", addr, "/publish/t", &[h], "m");
        assert_eq!(head.status, 403, "{h}: {body}");
    }
    let (head, body) = post_from("127.0.0.9", addr, "/publish/t", &[], "m");
    assert_eq!(head.status, 200, "direct from loopback: {body}");
}

#[test]
fn bad_limit_settings_are_refused_naming_the_key() {
    for (toml, key) in [
        ("publish_rate = \"lots\"\n", "publish_rate"),
        ("trusted_proxies = [\"nginx\"]\n", "trusted_proxies"),
        ("max_streams_per_client = \"3\"\n", "max_streams_per_client"),
    ] {
        support::process::assert_config_refused(toml, key, "");
    }
}

/// A proxy keeps its connections to ssed open (nginx's upstream
/// `keepalive`): every request on one, not only the first, is read for
/// the client's scheme and address.
#[test]
fn every_request_of_a_kept_alive_proxy_connection_is_read_for_its_client() {
    let (_dir, _ssed, addr) = daemon(
        "keepalive",
        "trusted_proxies = [\"127.0.0.9\"]\n[auth]\nsubscribe_token = \"st\"\n",
    );
    let mut c = Client::from_conn(connect_from("127.0.0.9", addr));
    for i in 0..3 {
        // An https page of this host, through the proxy: same-origin, so
        // no cors_origins entry is needed.
        let req = format!(
            "POST /tickets HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer st\r\n\
             Origin: https://localhost\r\nX-Forwarded-For: 203.0.113.{i}\r\n\
             X-Forwarded-Proto: https\r\nContent-Length: 0\r\n\r\n"
        );
        c.send(req.as_bytes());
        let (head, body) = c.response();
        assert_eq!(head.status, 200, "request {i} on the connection: {body}");
    }
}
