#![cfg(feature = "daemon")]
//! The Mercure publish endpoint (`POST /.well-known/mercure`) over real
//! sockets: a Mercure publisher's form becomes one event on all its
//! topics, which `/events?topic=` subscribers receive; private updates
//! reach granted streams only; bad forms get a clear answer.

mod support;

use std::net::SocketAddr;

use serde_json::{Value, json};
use support::encode as enc;
use support::{Client, field};

const BOOK: &str = "https://example.com/books/1";
const SHELF: &str = "https://example.com/users/7/books";
const SECRET: &str = "a-long-and-random-jwt-secret";

/// The daemon in this process on `toml`.
fn daemon(toml: &str) -> support::InProcess {
    support::daemon(&format!("listen = \"127.0.0.1:0\"\n{toml}"))
}

/// An HS256 JWT of `claims`.
fn jwt(claims: &Value) -> String {
    support::hs256(SECRET, &json!({"alg": "HS256"}), claims)
}

/// `POST /.well-known/mercure` with `form` (and extra header lines):
/// status and body.
fn publish(addr: SocketAddr, form: &str, headers: &[&str]) -> (u16, String) {
    let mut lines = headers.to_vec();
    if !headers.iter().any(|h| h.starts_with("Content-Type")) {
        lines.push("Content-Type: application/x-www-form-urlencoded");
    }
    let raw = support::request_text("POST", "/.well-known/mercure", "127.0.0.1", &lines, form);
    let (head, body) = support::request(addr, &raw);
    (head.status, body)
}

/// A stream of `topics` (with extra header lines).
fn follow(addr: SocketAddr, topics: &[&str], headers: &[&str]) -> Client {
    let query: Vec<String> = topics.iter().map(|t| format!("topic={}", enc(t))).collect();
    let mut c = Client::new(addr);
    let head = c.get_stream(&format!("/events?{}", query.join("&")), headers);
    assert_eq!(head.status, 200);
    c
}

/// The next frame with data.
fn next(c: &mut Client) -> String {
    c.frame_matching(10, |f| !field(f, "data").is_empty())
}

#[test]
fn a_mercure_update_is_one_event_on_all_its_topics() {
    let d = daemon("");
    let mut book = follow(d.addr, &[BOOK], &[]);
    let mut shelf = follow(d.addr, &[SHELF], &[]);
    let mut both = follow(d.addr, &[BOOK, SHELF], &[]);
    let form = format!(
        "topic={}&topic={}&data={}&type=book&retry=3000",
        enc(BOOK),
        enc(SHELF),
        enc("{\"title\": \"Dune\"}")
    );
    // A stream has joined its topics once its head is out (`follow`).
    let (status, id) = publish(d.addr, &form, &[]);
    assert_eq!(status, 200, "{id}");
    for c in [&mut book, &mut shelf, &mut both] {
        let f = next(c);
        assert_eq!(field(&f, "id"), [id.as_str()], "{f}");
        assert_eq!(field(&f, "event"), ["book"], "{f}");
        assert_eq!(field(&f, "retry"), ["3000"], "{f}");
        assert_eq!(field(&f, "data"), ["{\"title\": \"Dune\"}"], "{f}");
    }
    // Once each: the next event of `both` is the next update.
    let (_, second) = publish(d.addr, &format!("topic={}&data=second", enc(SHELF)), &[]);
    let f = next(&mut both);
    assert_eq!(field(&f, "id"), [second.as_str()], "{f}");
    assert_eq!(field(&f, "data"), ["second"]);
}

#[test]
fn a_private_mercure_update_reaches_granted_streams_only() {
    let d = daemon(&format!(
        "[auth]\nanonymous = true\njwt_secret = \"{SECRET}\"\n"
    ));
    let publisher = format!(
        "Authorization: Bearer {}",
        jwt(&json!({"mercure": {"publish": ["https://example.com/{+path}"]}}))
    );
    let reader = format!(
        "Authorization: Bearer {}",
        jwt(&json!({"mercure": {"subscribe": [SHELF]}}))
    );
    let mut granted = follow(d.addr, &[SHELF], &[&reader]);
    let mut anonymous = follow(d.addr, &[SHELF], &[]);
    let private = format!(
        "topic={}&topic={}&data=secret&private=on",
        enc(SHELF),
        enc(BOOK)
    );
    let (status, body) = publish(d.addr, &private, &[&publisher]);
    assert_eq!(status, 200, "{body}");
    let (status, public) = publish(
        d.addr,
        &format!("topic={}&data=public", enc(SHELF)),
        &[&publisher],
    );
    assert_eq!(status, 200, "{public}");
    assert_eq!(field(&next(&mut granted), "data"), ["secret"]);
    assert_eq!(field(&next(&mut granted), "data"), ["public"]);
    let f = next(&mut anonymous);
    assert_eq!(
        field(&f, "data"),
        ["public"],
        "the private one skipped: {f}"
    );
    // Publishing needs the right for every topic of the update.
    let narrow = format!(
        "Authorization: Bearer {}",
        jwt(&json!({"mercure": {"publish": [BOOK]}}))
    );
    let (status, body) = publish(
        d.addr,
        &format!("topic={}&topic={}&data=x", enc(BOOK), enc(SHELF)),
        &[&narrow],
    );
    assert_eq!(status, 403, "{body}");
    let (status, _) = publish(d.addr, &format!("topic={}&data=x", enc(BOOK)), &[]);
    assert_eq!(status, 401, "no credential, with a JWT key configured");
}

#[test]
fn bad_mercure_updates_are_refused_saying_why() {
    let d = daemon("");
    let topic = format!("topic={}", enc(BOOK));
    for (form, headers, status, words) in [
        ("data=x".to_owned(), vec![], 400, "topic"),
        (
            format!("{topic}&id=1700000000000-1"),
            vec![],
            400,
            "own ids",
        ),
        (format!("{topic}&retry=soon"), vec![], 400, "milliseconds"),
        (format!("{topic}&type=a%0Ab"), vec![], 400, "line break"),
        (
            format!("topic={}", enc("a\u{200b}b")),
            vec![],
            400,
            "U+200B",
        ),
        (
            format!("{topic}&data=x"),
            vec!["Content-Type: application/json"],
            415,
            "form",
        ),
    ] {
        let (got, body) = publish(d.addr, &form, &headers);
        assert_eq!(got, status, "{form}: {body}");
        assert!(body.contains(words), "{form}: {body}");
    }
    // And a good one still goes through.
    let (status, body) = publish(d.addr, &format!("{topic}&data=ok"), &[]);
    assert_eq!(status, 200, "{body}");
}

/// Whether Symfony's Mercure component (Debian's `php-symfony-mercure`)
/// and `php` are here; says why not, and fails under `CI=true`.
fn symfony_here(test: &str) -> bool {
    let here = std::path::Path::new("/usr/share/php/Symfony/Component/Mercure/Hub.php").exists()
        && std::process::Command::new("php")
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success());
    if !here {
        assert!(
            !support::netns::in_ci(),
            "{test}: php and php-symfony-mercure are missing (CI=true: .ci/run installs them)"
        );
        eprintln!("skipping {test}: php and php-symfony-mercure are missing");
    }
    here
}

#[test]
fn symfonys_mercure_publisher_publishes_unchanged() {
    let test = "symfonys_mercure_publisher_publishes_unchanged";
    if !symfony_here(test) {
        return;
    }
    let d = daemon(&format!(
        "[auth]\nanonymous = true\njwt_secret = \"{SECRET}\"\n"
    ));
    let token = jwt(&json!({"mercure": {"publish": ["*"], "subscribe": ["*"]}}));
    let reader = format!("Authorization: Bearer {token}");
    let mut granted = follow(d.addr, &[SHELF], &[&reader]);
    let mut anonymous = follow(d.addr, &[BOOK], &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/php/publish.php");
    let url = format!("http://{}/.well-known/mercure", d.addr);
    let run = |data: &str, private: &str| -> String {
        let out = std::process::Command::new("php")
            .args([script, &url, &token, data, private, BOOK, SHELF])
            .output()
            .expect("php runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let private = run("secret", "1");
    let public = run("{\"title\": \"Dune\"}", "0");
    let f = next(&mut granted);
    assert_eq!(field(&f, "id"), [private.as_str()], "{f}");
    assert_eq!(field(&f, "event"), ["book"]);
    assert_eq!(field(&f, "retry"), ["2500"]);
    assert_eq!(field(&f, "data"), ["secret"]);
    assert_eq!(field(&next(&mut granted), "id"), [public.as_str()]);
    let f = next(&mut anonymous);
    assert_eq!(
        field(&f, "id"),
        [public.as_str()],
        "only the public one: {f}"
    );
    assert_eq!(field(&f, "data"), ["{\"title\": \"Dune\"}"]);
}

/// A Mercure subscription: `GET /.well-known/mercure` with `query`.
fn subscribe(addr: std::net::SocketAddr, query: &str) -> (Client, support::Head) {
    let mut c = Client::new(addr);
    let head = c.get_stream(&format!("/.well-known/mercure?{query}"), &[]);
    (c, head)
}

#[test]
fn a_mercure_subscriber_follows_exact_topics_and_resumes() {
    let d = daemon("");
    let (mut sub, head) = subscribe(d.addr, &format!("topic={}", enc(BOOK)));
    assert_eq!(head.status, 200);
    let (_, first) = publish(d.addr, &format!("topic={}&data=one", enc(BOOK)), &[]);
    let (_, second) = publish(d.addr, &format!("topic={}&data=two", enc(BOOK)), &[]);
    assert_eq!(field(&next(&mut sub), "id"), [first.as_str()]);
    assert_eq!(field(&next(&mut sub), "id"), [second.as_str()]);
    // Resumed after the first, with either draft's parameter.
    for name in ["lastEventID", "last_event_id"] {
        let (mut again, head) = subscribe(
            d.addr,
            &format!("topic={}&{name}={}", enc(BOOK), enc(&first)),
        );
        assert_eq!(head.status, 200);
        let f = next(&mut again);
        assert_eq!(field(&f, "id"), [second.as_str()], "{name}: {f}");
        assert_eq!(field(&f, "data"), ["two"]);
    }
}
