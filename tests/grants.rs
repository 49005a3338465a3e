#![cfg(feature = "daemon")]
//! Who may read what: grants from tokens, scoped tickets and JWTs, over
//! real sockets against the daemon.
//!
//! JWTs are minted here: HS256 with ring's HMAC, RS256 with the `openssl`
//! command (the daemon reads the public key from a PEM file, as a user
//! configures it).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use support::process::{Ssed, spawn_config};
use support::{Client, Head, TempDir, field, hs256, metric, streams_open, wait_until};

const SECRET: &str = "a-long-and-random-jwt-secret";

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A draft-07 token granting `subscribe` and `publish`.
fn token(subscribe: &[&str], publish: &[&str]) -> String {
    hs256(
        SECRET,
        &json!({"alg": "HS256", "typ": "JWT"}),
        &json!({"mercure": {"subscribe": subscribe, "publish": publish}, "sub": "user-42"}),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Daemon {
    addr: SocketAddr,
    _ssed: Ssed,
    _dir: TempDir,
}

fn daemon(test: &str, toml: &str) -> Daemon {
    let dir = TempDir::new(test);
    let (ssed, addr) = spawn_config(&dir, &format!("listen = \"127.0.0.1:0\"\n{toml}"));
    Daemon {
        addr,
        _ssed: ssed,
        _dir: dir,
    }
}

/// Opens `path` as an event stream with extra header lines.
fn open(addr: SocketAddr, path: &str, headers: &[&str]) -> (Client, Head) {
    let mut c = Client::new(addr);
    let head = c.get_stream(path, headers);
    (c, head)
}

fn status(addr: SocketAddr, path: &str, headers: &[&str]) -> (u16, String) {
    let (mut c, head) = open(addr, path, headers);
    let body = if head.status == 200 {
        String::new()
    } else {
        String::from_utf8(c.body(&head)).expect("utf-8")
    };
    (head.status, body)
}

/// `POST path` with extra headers and a body: status, headers, body.
fn post(addr: SocketAddr, path: &str, headers: &[&str], body: &str) -> (Head, String) {
    support::request(
        addr,
        &support::request_text("POST", path, "127.0.0.1", headers, body),
    )
}

/// A ticket for `body` (`""`: the caller's whole grant).
fn ticket(addr: SocketAddr, bearer: &str, body: &str) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {bearer}");
    let (head, text) = post(addr, "/tickets", &[&auth], body);
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (head.status, v)
}

fn next_data(c: &mut Client) -> String {
    let frame = c.frame_matching(10, |f| !field(f, "data").is_empty());
    field(&frame, "data").join("\n")
}

#[test]
fn a_scoped_ticket_consumes_its_own_mailbox_and_no_other() {
    let d = daemon(
        "scoped",
        "[auth]\npublish_token = \"pt\"\nsubscribe_token = \"st\"\n",
    );
    let pt = ["Authorization: Bearer pt"];
    for key in ["user:42:updates", "user:43:updates"] {
        let (head, body) = post(d.addr, &format!("/keys/{key}"), &pt, "for you");
        assert_eq!(head.status, 200, "{body}");
    }
    // The backend, holding the subscribe token, mints user 42's ticket.
    let (code, v) = ticket(d.addr, "st", r#"{"subscribe": ["user:42:updates"]}"#);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["subscribe"], json!(["user:42:updates"]));
    let t42 = v["ticket"].as_str().expect("a ticket").to_owned();

    // User 43's key with it: 403, and nothing is taken.
    let (code, body) = status(d.addr, &format!("/keys/user:43:updates?ticket={t42}"), &[]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("user:43:updates"), "{body}");
    // A refused attempt spent it: a fresh one for the right key.
    let (_, v) = ticket(d.addr, "st", r#"{"subscribe": ["user:42:updates"]}"#);
    let t42 = v["ticket"].as_str().expect("a ticket").to_owned();
    let (mut c, head) = open(d.addr, &format!("/keys/user:42:updates?ticket={t42}"), &[]);
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(next_data(&mut c), "for you");
    let cookie = head.header("set-cookie").expect("a session cookie");
    let session = cookie.split(';').next().expect("name=value").to_owned();
    drop(c);
    // The session the ticket started is scoped the same way.
    let with_session = format!("Cookie: {session}");
    let (code, _) = status(d.addr, "/keys/user:43:updates", &[&with_session]);
    assert_eq!(code, 403);
    let (code, _) = status(d.addr, "/events/user:43:updates", &[&with_session]);
    assert_eq!(code, 403);
    let (code, _) = status(d.addr, "/events/user:42:updates", &[&with_session]);
    assert_eq!(code, 200);
    // User 43's message is still there for its owner.
    let (_, v) = ticket(d.addr, "st", r#"{"subscribe": ["user:43:updates"]}"#);
    let t43 = v["ticket"].as_str().expect("a ticket").to_owned();
    let (mut c, head) = open(d.addr, &format!("/keys/user:43:updates?ticket={t43}"), &[]);
    assert_eq!(head.status, 200);
    assert_eq!(next_data(&mut c), "for you");
}

#[test]
fn ticket_requests_are_checked() {
    let d = daemon(
        "tickets",
        &format!("[auth]\nsubscribe_token = \"st\"\njwt_secret = \"{SECRET}\"\n"),
    );
    for (body, want) in [
        ("not json", 400),
        (r#"{"subscribe": "user:1"}"#, 400),
        (r#"{"subscribe": ["{"]}"#, 400),
        (r#"{"subscribe": ["a"], "publish": ["a"]}"#, 400),
    ] {
        let (code, v) = ticket(d.addr, "st", body);
        assert_eq!(code, want, "{body}: {v}");
    }
    // A JWT holder may narrow only to selectors it holds, as written.
    let jwt = token(&["user:42:{x}", "news"], &[]);
    let (code, v) = ticket(d.addr, &jwt, r#"{"subscribe": ["news"]}"#);
    assert_eq!(code, 200, "{v}");
    let (code, v) = ticket(d.addr, &jwt, r#"{"subscribe": ["user:43:{x}"]}"#);
    assert_eq!(code, 403, "{v}");
    let (code, v) = ticket(d.addr, &jwt, "");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["subscribe"], json!(["user:42:{x}", "news"]));
    let (code, _) = ticket(d.addr, "nope", "");
    assert_eq!(code, 401);
}

#[test]
fn a_jwt_grants_its_topics_by_header_and_by_cookie() {
    let d = daemon("jwt", &format!("[auth]\njwt_secret = \"{SECRET}\"\n"));
    let jwt = token(&["news:{id}"], &["news:{id}"]);
    let bearer = format!("Authorization: Bearer {jwt}");
    let cookie = format!("Cookie: theme=dark; mercureAuthorization={jwt}");
    for how in [&bearer, &cookie] {
        let (code, body) = status(d.addr, "/events/news:1", &[how]);
        assert_eq!(code, 200, "{how}: {body}");
        let (code, body) = status(d.addr, "/events?topic=news:1&topic=sports:1", &[how]);
        assert_eq!(code, 403, "{how}: {body}");
        assert!(body.contains("sports:1"), "{body}");
    }
    // With a JWT key set, anonymous subscribers are out by default.
    let (code, _) = status(d.addr, "/events/news:1", &[]);
    assert_eq!(code, 401);
    // Bad tokens: 401 with error="invalid_token", saying no more.
    let expired = hs256(
        SECRET,
        &json!({"alg": "HS256"}),
        &json!({"mercure": {"subscribe": ["*"]}, "exp": unix_now() - 10}),
    );
    let forged = hs256(
        "another-secret",
        &json!({"alg": "HS256"}),
        &json!({"mercure": {"subscribe": ["*"]}}),
    );
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(br#"{"mercure":{"subscribe":["*"]}}"#)
    );
    for bad in [&expired, &forged, &none, &"x.y.z".to_owned()] {
        let (mut c, head) = open(
            d.addr,
            "/events/news:1",
            &[&format!("Authorization: Bearer {bad}")],
        );
        assert_eq!(head.status, 401, "{bad}");
        let challenge = head
            .header("www-authenticate")
            .unwrap_or_default()
            .to_owned();
        assert!(challenge.contains("invalid_token"), "{challenge}");
        assert_eq!(
            String::from_utf8(c.body(&head)).unwrap().trim(),
            "invalid token"
        );
    }
    // Publishing with the grant: its topics yes, others 403.
    let (head, body) = post(d.addr, "/publish/news:1", &[&bearer], "hello");
    assert_eq!(head.status, 200, "{body}");
    let (head, body) = post(d.addr, "/publish/sports:1", &[&bearer], "hello");
    assert_eq!(head.status, 403, "{body}");
    assert!(
        head.header("www-authenticate")
            .is_some_and(|h| h.contains("insufficient_scope")),
        "{head:?}"
    );
    // A JWT key is a publisher credential: this machine has no right to
    // publish without one any more.
    let (head, _) = post(d.addr, "/publish/news:1", &[], "hello");
    assert_eq!(head.status, 401);
    let subscribe_only = token(&["*"], &[]);
    let (head, _) = post(
        d.addr,
        "/publish/news:1",
        &[&format!("Authorization: Bearer {subscribe_only}")],
        "x",
    );
    assert_eq!(head.status, 403);
}

#[test]
fn iri_topics_are_granted_by_exact_selectors_templates_and_tickets() {
    let d = daemon(
        "iri-grants",
        &format!("[auth]\nsubscribe_token = \"st\"\njwt_secret = \"{SECRET}\"\n"),
    );
    let book = "/events?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1";
    let author = "/events?topic=https%3A%2F%2Fexample.com%2Fauthors%2F1";
    let other = "/events?topic=https%3A%2F%2Fexample.com%2Fauthors%2F2";
    let jwt = token(
        &[
            "https://example.com/books/{id}",
            "https://example.com/authors/1",
        ],
        &[],
    );
    let bearer = format!("Authorization: Bearer {jwt}");
    for path in [book, author] {
        let (code, body) = status(d.addr, path, &[&bearer]);
        assert_eq!(code, 200, "{path}: {body}");
    }
    let (code, body) = status(d.addr, other, &[&bearer]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("https://example.com/authors/2"), "{body}");
    // A ticket narrowed to one IRI, exactly.
    let (code, v) = ticket(
        d.addr,
        "st",
        r#"{"subscribe": ["https://example.com/books/1"]}"#,
    );
    assert_eq!(code, 200, "{v}");
    let t = v["ticket"].as_str().expect("a ticket").to_owned();
    let (code, body) = status(d.addr, &format!("{author}&ticket={t}"), &[]);
    assert_eq!(code, 403, "{body}");
    let (code, v) = ticket(
        d.addr,
        "st",
        r#"{"subscribe": ["https://example.com/books/1"]}"#,
    );
    assert_eq!(code, 200, "{v}");
    let t = v["ticket"].as_str().expect("a ticket");
    let (code, body) = status(d.addr, &format!("{book}&ticket={t}"), &[]);
    assert_eq!(code, 200, "{body}");
}

#[test]
fn a_stream_ends_when_its_token_expires() {
    let d = daemon(
        "expiry",
        &format!(
            "heartbeat = \"0\"\nmax_execution_time = \"0\"\n[auth]\njwt_secret = \"{SECRET}\"\n"
        ),
    );
    let exp = unix_now() + 3;
    let jwt = hs256(
        SECRET,
        &json!({"alg": "HS256"}),
        &json!({"mercure": {"subscribe": ["t"]}, "exp": exp}),
    );
    let (mut c, head) = open(
        d.addr,
        "/events/t",
        &[&format!("Authorization: Bearer {jwt}")],
    );
    assert_eq!(head.status, 200);
    assert_eq!(streams_open(d.addr), 1);
    let opened = Instant::now();
    assert!(
        c.closed_within(Duration::from_secs(8)),
        "the stream outlived its token"
    );
    let lived = opened.elapsed();
    assert!(lived >= Duration::from_secs(1), "ended early: {lived:?}");
    assert!(wait_until(Duration::from_secs(5), || streams_open(d.addr) == 0));
    assert_eq!(
        metric(d.addr, "ssed_disconnects_total{reason=\"expired\"}"),
        1
    );
}

#[test]
fn a_draft_08_access_token_needs_its_issuer_and_audience() {
    let d = daemon(
        "at-jwt",
        &format!(
            "[auth]\njwt_secret = \"{SECRET}\"\njwt_issuer = \"https://auth.example\"\n\
             jwt_audience = \"https://hub.example/.well-known/mercure\"\n"
        ),
    );
    let claims = |iss: &str| {
        json!({
            "iss": iss, "aud": "https://hub.example/.well-known/mercure", "sub": "u",
            "exp": unix_now() + 60,
            "authorization_details": [{
                "type": "https://mercure.rocks/authorization-detail",
                "actions": ["subscribe"],
                "topics": [{"match": "books:1", "match_type": "exact"}],
            }],
        })
    };
    let header = json!({"alg": "HS256", "typ": "at+jwt"});
    let good = hs256(SECRET, &header, &claims("https://auth.example"));
    let path = "/events?topic=books:1";
    let (code, body) = status(d.addr, path, &[&format!("Authorization: Bearer {good}")]);
    assert_eq!(code, 200, "{body}");
    let other = hs256(SECRET, &header, &claims("https://evil.example"));
    let (code, _) = status(d.addr, path, &[&format!("Authorization: Bearer {other}")]);
    assert_eq!(code, 401);
}

#[test]
fn an_rs256_token_verifies_with_the_configured_public_key() {
    let dir = TempDir::new("rs256");
    let key = dir.path().join("key.pem");
    let public = dir.path().join("public.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs (package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let (k, p) = (key.to_str().unwrap(), public.to_str().unwrap());
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        k,
    ]);
    run(&["pkey", "-in", k, "-pubout", "-out", p]);
    let signing = format!(
        "{}.{}",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(br#"{"mercure":{"subscribe":["rsa-topic"]}}"#)
    );
    let input = dir.path().join("signing");
    std::fs::write(&input, &signing).expect("write");
    let sig = run(&["dgst", "-sha256", "-sign", k, input.to_str().unwrap()]);
    let jwt = format!("{signing}.{}", b64(&sig));
    let (_ssed, addr) = spawn_config(
        &dir,
        &format!("listen = \"127.0.0.1:0\"\n[auth]\njwt_public_key = \"{p}\"\n"),
    );
    let bearer = format!("Authorization: Bearer {jwt}");
    let (code, body) = status(addr, "/events/rsa-topic", &[&bearer]);
    assert_eq!(code, 200, "{body}");
    let (code, _) = status(addr, "/events/other", &[&bearer]);
    assert_eq!(code, 403);
    // HS256 is not accepted with only a public key: the public key used as
    // an HMAC secret (algorithm confusion) gets nowhere.
    let pem = std::fs::read_to_string(&public).expect("read");
    let confused = hs256(
        &pem,
        &json!({"alg": "HS256"}),
        &json!({"mercure": {"subscribe": ["*"]}}),
    );
    let (code, _) = status(
        addr,
        "/events/rsa-topic",
        &[&format!("Authorization: Bearer {confused}")],
    );
    assert_eq!(code, 401);
}

#[test]
fn auth_settings_that_do_not_fit_are_refused_naming_the_key() {
    for (toml, key, words) in [
        (
            "[auth]\njwt_algorithms = [\"RS256\"]\njwt_secret = \"s\"\n",
            "auth.jwt_algorithms",
            "RS256",
        ),
        (
            "[auth]\njwt_algorithms = [\"none\"]\n",
            "auth.jwt_algorithms",
            "unknown algorithm",
        ),
        (
            "[auth]\njwt_algorithms = [\"HS256\"]\n",
            "auth.jwt_algorithms",
            "no key",
        ),
        (
            "[auth]\njwt_public_key = \"/nonexistent/key.pem\"\n",
            "auth.jwt_public_key",
            "cannot read",
        ),
        (
            "[auth]\nanonymous = \"yes\"\n",
            "auth.anonymous",
            "true or false",
        ),
        (
            "[auth]\njwt_cookie = \"a b\"\n",
            "auth.jwt_cookie",
            "not a cookie name",
        ),
        ("[auth]\nfoo = true\n", "auth.foo", "unknown key"),
    ] {
        support::process::assert_config_refused(toml, key, words);
    }
    // A key the file lacks may come from the environment.
    let dir = TempDir::new("env-secret");
    let path = dir.path().join("ssed.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\n[auth]\njwt_algorithms = [\"HS256\"]\n",
    )
    .expect("write");
    let ssed = Ssed::spawn(
        &["--config", path.to_str().expect("utf-8")],
        &[("SSED_JWT_SECRET", SECRET)],
    );
    let addr = ssed.listening();
    let (code, _) = status(
        addr,
        "/events/t",
        &[&format!("Authorization: Bearer {}", token(&["t"], &[]))],
    );
    assert_eq!(code, 200);
}

#[test]
fn with_no_credentials_only_this_machine_consumes_mailboxes() {
    let Some(ns) = support::netns::netns("grants-mailbox", 3) else {
        return;
    };
    let dir = TempDir::new("mailbox-remote");
    let (ssed, addr) = spawn_config(&dir, &format!("listen = \"{}:0\"\n", ns.server));
    // Loopback may not reach it (it listens on the veth address), but this
    // machine's own address of the link is local too: post from here.
    let (head, body) = post(addr, "/keys/k", &[], "secret");
    assert_eq!(head.status, 403, "not loopback: {body}");
    // From the namespace: a subscriber without credentials may follow a
    // topic, but consuming a mailbox needs a grant.
    let curl = |path: &str| -> String {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "2",
            ])
            .arg(format!("http://{addr}{path}"))
            .output()
            .expect("curl in the namespace");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl("/keys/k"), "401");
    // `curl -m 2` gives up on the open stream with 200 as its status.
    assert_eq!(curl("/events/t"), "200");
    drop(ssed);
}

#[test]
fn a_ticket_minted_with_a_jwt_ends_with_the_token() {
    let d = daemon(
        "ticket-expiry",
        &format!(
            "heartbeat = \"0\"\nmax_execution_time = \"0\"\n[auth]\njwt_secret = \"{SECRET}\"\n"
        ),
    );
    let jwt = hs256(
        SECRET,
        &json!({"alg": "HS256"}),
        &json!({"mercure": {"subscribe": ["t"], "publish": ["t"]}, "exp": unix_now() + 3}),
    );
    // `{}` asks for the whole grant; only its subscribe part goes along.
    let (code, v) = ticket(d.addr, &jwt, "{}");
    assert_eq!(code, 200, "{v}");
    let t = v["ticket"].as_str().expect("a ticket").to_owned();
    let (mut c, head) = open(d.addr, &format!("/events/t?ticket={t}"), &[]);
    assert_eq!(head.status, 200);
    assert!(
        c.closed_within(Duration::from_secs(8)),
        "the ticket's stream outlived the token it was minted with"
    );
    assert!(wait_until(Duration::from_secs(5), || metric(
        d.addr,
        "ssed_disconnects_total{reason=\"expired\"}"
    ) == 1));
}

#[test]
fn a_jwt_cookie_is_not_accepted_from_another_sites_page() {
    let d = daemon(
        "cookie-origin",
        &format!("cors_origins = [\"*\"]\n[auth]\njwt_secret = \"{SECRET}\"\n"),
    );
    let jwt = token(&["news"], &["news"]);
    let cookie = format!("Cookie: mercureAuthorization={jwt}");
    // From a page of another site, with `*` allowing it cross-origin.
    let evil = "Origin: https://evil.example";
    let (head, body) = post(d.addr, "/publish/news", &[&cookie, evil], "x");
    assert_eq!(head.status, 403, "{body}");
    let (code, _) = status(d.addr, "/events/news", &[&cookie, evil]);
    assert_eq!(code, 403);
    // From this origin's own page, and from no page, it works.
    let (head, body) = post(
        d.addr,
        "/publish/news",
        &[&cookie, "Origin: http://127.0.0.1"],
        "x",
    );
    assert_eq!(head.status, 200, "{body}");
    let (code, _) = status(d.addr, "/events/news", &[&cookie]);
    assert_eq!(code, 200);
}

#[test]
fn anonymous_off_with_no_credential_is_refused_at_start() {
    support::process::assert_config_refused(
        "[auth]\nanonymous = false\n",
        "auth.anonymous",
        "refuse every subscriber",
    );
}

/// With JWTs, `max_streams_per_client` counts a stream against its
/// token's subject, not its address: two users behind one address each get
/// their own allowance, and one user gets no more by changing address.
#[test]
fn the_per_client_limit_follows_the_jwt_subject() {
    let d = daemon(
        "sub-limit",
        &format!(
            "max_streams_per_client = 2\n[auth]\njwt_secret = \"{SECRET}\"\nanonymous = true\n"
        ),
    );
    let of = |sub: &str| {
        hs256(
            SECRET,
            &json!({"alg": "HS256"}),
            &json!({"mercure": {"subscribe": ["*"]}, "sub": sub}),
        )
    };
    let open_from = |from: &str, headers: &[&str]| {
        let mut c = Client::from_conn(support::connect_from(from, d.addr));
        let head = c.get_stream("/events/t", headers);
        let body = if head.status == 200 {
            String::new()
        } else {
            String::from_utf8(c.body(&head)).expect("utf-8")
        };
        (c, head.status, body)
    };
    let alice = format!("Authorization: Bearer {}", of("alice"));
    let bob = format!("Authorization: Bearer {}", of("bob"));
    let mut held = Vec::new();
    for (from, who) in [("127.0.0.2", &alice), ("127.0.0.3", &alice)] {
        let (c, code, body) = open_from(from, &[who]);
        assert_eq!(code, 200, "{body}");
        held.push(c);
    }
    // Alice's third, from yet another address: over her allowance.
    let (_c, code, body) = open_from("127.0.0.4", &[&alice]);
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("alice"), "{body}");
    // Bob, from Alice's address, and anonymous streams from it, are apart.
    for _ in 0..2 {
        let (c, code, body) = open_from("127.0.0.2", &[&bob]);
        assert_eq!(code, 200, "bob: {body}");
        held.push(c);
    }
    for _ in 0..2 {
        let (c, code, body) = open_from("127.0.0.2", &[]);
        assert_eq!(code, 200, "anonymous: {body}");
        held.push(c);
    }
    let (_c, code, _) = open_from("127.0.0.2", &[]);
    assert_eq!(code, 429, "the address's own allowance");
    // A forged token naming Alice is refused as a forgery, not counted.
    let forged = format!(
        "Authorization: Bearer {}",
        hs256(
            "not-the-secret",
            &json!({"alg": "HS256"}),
            &json!({"sub": "carol"})
        )
    );
    let (_c, code, _) = open_from("127.0.0.5", &[&forged]);
    assert_eq!(code, 401);
    // One of Alice's streams ends: her place comes back.
    drop(held.remove(0));
    assert!(wait_until(Duration::from_secs(5), || {
        let (_c, code, _) = open_from("127.0.0.6", &[&alice]);
        code == 200
    }));
    assert!(metric(d.addr, "ssed_client_limited_total{limit=\"streams\"}") >= 2);
}

/// On a daemon with `publish_token = "pub"` and the JWT secret: a stream
/// whose JWT covers `topic` gets its private updates, live and replayed; an
/// anonymous one only its public ones; `receivers` counts who got each.
fn check_private_updates(addr: SocketAddr, topic: &str) {
    let jwt = token(&[topic], &[]);
    let bearer = format!("Authorization: Bearer {jwt}");
    let path = format!("/events/{topic}");
    let (mut granted, _) = open(addr, &path, &[&bearer]);
    let (mut anonymous, _) = open(addr, &path, &[]);
    let publish = |query: &str, body: &str| -> Value {
        let (head, text) = post(
            addr,
            &format!("/publish/{topic}{query}"),
            &["Authorization: Bearer pub"],
            body,
        );
        assert_eq!(head.status, 200, "{text}");
        serde_json::from_str(&text).expect("json")
    };
    assert!(
        wait_until(
            Duration::from_secs(5),
            || publish("", "warm-up")["receivers"] == 2
        ),
        "both subscribers in"
    );
    let first = publish("", "public");
    let private = publish("?private=true", "secret");
    let last = publish("?private=false", "later");
    assert_eq!(private["receivers"], 1, "{private}");
    assert_eq!(last["receivers"], 2, "{last}");
    // The next `n` data, past the warm-up publishes.
    let data = |c: &mut Client, n: usize| -> Vec<String> {
        let mut got = Vec::new();
        while got.len() < n {
            let d = next_data(c);
            if d != "warm-up" {
                got.push(d);
            }
        }
        got
    };
    assert_eq!(data(&mut granted, 3), ["public", "secret", "later"]);
    assert_eq!(data(&mut anonymous, 2), ["public", "later"]);
    // Replayed after the first: the same rule.
    let after = format!("Last-Event-ID: {}", first["id"].as_str().expect("id"));
    let (mut granted, _) = open(addr, &path, &[&bearer, &after]);
    let (mut anonymous, _) = open(addr, &path, &[&after]);
    assert_eq!(
        [next_data(&mut granted), next_data(&mut granted)],
        ["secret", "later"]
    );
    assert_eq!(next_data(&mut anonymous), "later");
    // A value that says neither.
    let (head, text) = post(
        addr,
        &format!("/publish/{topic}?private=maybe"),
        &["Authorization: Bearer pub"],
        "x",
    );
    assert_eq!(head.status, 400, "{text}");
}

const PRIVATE_CONFIG: &str = "[auth]\npublish_token = \"pub\"\nanonymous = true\njwt_secret = \"a-long-and-random-jwt-secret\"\n";

#[test]
fn private_updates_reach_only_streams_whose_grant_covers_them() {
    let d = daemon("private-memory", PRIVATE_CONFIG);
    check_private_updates(d.addr, "user:42:updates");
}

#[test]
fn private_updates_stay_private_with_data_dir() {
    let dir = TempDir::new("private-data");
    let data = dir.path().join("data");
    let d = daemon(
        "private-durable",
        &format!(
            "data_dir = {:?}\n{PRIVATE_CONFIG}",
            data.display().to_string()
        ),
    );
    check_private_updates(d.addr, "user:42:updates");
}

#[test]
fn private_updates_stay_private_with_redis() {
    let test = "private_updates_stay_private_with_redis";
    let Some(redis) = support::redis::redis(test) else {
        return;
    };
    let topic = format!("private_{}_{}", std::process::id(), unix_now());
    /// Deletes the topic's stream and count, passed or not.
    struct Cleanup(&'static str, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            support::redis::command(self.0, &["DEL", &self.1]);
            support::redis::command(self.0, &["HDEL", "ssed:seq", &self.1]);
        }
    }
    let _cleanup = Cleanup(redis, format!("ssed:t:{topic}"));
    let d = daemon(
        "private-redis",
        &format!("{PRIVATE_CONFIG}[redis]\nurl = \"redis://{redis}\"\n"),
    );
    check_private_updates(d.addr, &topic);
}
