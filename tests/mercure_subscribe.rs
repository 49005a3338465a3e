#![cfg(feature = "daemon")]
//! Mercure subscribers (`GET /.well-known/mercure`) over real sockets:
//! draft-07's `topic=` (exact, URI template, `*`) and draft-08's
//! `match=`/`match_exact=`, the cursor headers, `earliest`, grants on
//! selectors, `?authorization=`, one hub with `/events` and `/publish`,
//! and clear refusals of what is malformed or not built.

mod support;

use std::net::SocketAddr;

use serde_json::{Value, json};
use support::encode as enc;
use support::{Client, Head, field};

const BOOK: &str = "https://example.com/books/1";
const AUTHOR: &str = "https://example.com/authors/1";
const BOOKS: &str = "https://example.com/books/{id}";
const SECRET: &str = "a-long-and-random-jwt-secret";

fn daemon(toml: &str) -> support::InProcess {
    support::daemon(&format!("listen = \"127.0.0.1:0\"\n{toml}"))
}

fn jwt(claims: &Value) -> String {
    support::hs256(SECRET, &json!({"alg": "HS256"}), claims)
}

/// `POST /.well-known/mercure` with `form`, from this machine (no
/// credential needed without a JWT key): the id it answers.
fn publish(addr: SocketAddr, form: &str, headers: &[&str]) -> String {
    let mut lines = headers.to_vec();
    lines.push("Content-Type: application/x-www-form-urlencoded");
    let raw = support::request_text("POST", "/.well-known/mercure", "127.0.0.1", &lines, form);
    let (head, body) = support::request(addr, &raw);
    assert_eq!(head.status, 200, "{form}: {body}");
    body
}

/// `GET /.well-known/mercure?{query}` with extra header lines.
fn subscribe(addr: SocketAddr, query: &str, headers: &[&str]) -> (Client, Head) {
    let mut c = Client::new(addr);
    let head = c.get_stream(&format!("/.well-known/mercure?{query}"), headers);
    (c, head)
}

fn open(addr: SocketAddr, query: &str, headers: &[&str]) -> Client {
    let (c, head) = subscribe(addr, query, headers);
    assert_eq!(head.status, 200, "{query}");
    c
}

fn next(c: &mut Client) -> String {
    c.frame_matching(10, |f| !field(f, "data").is_empty())
}

/// The first frame that is an event (not a bare `retry:` or comment).
fn first_event(c: &mut Client) -> String {
    c.frame_matching(10, |f| {
        !field(f, "data").is_empty() || !field(f, "event").is_empty()
    })
}

fn refused(addr: SocketAddr, query: &str, headers: &[&str]) -> (u16, String) {
    let (mut c, head) = subscribe(addr, query, headers);
    let body = String::from_utf8(c.body(&head)).expect("utf-8");
    (head.status, body)
}

#[test]
fn templates_and_star_receive_what_they_match_and_nothing_else() {
    let d = daemon("");
    let mut books = open(d.addr, &format!("topic={}", enc(BOOKS)), &[]);
    let mut all = open(d.addr, "topic=*", &[]);
    // Draft-08's `match` is exact: braces and all.
    let mut literal = open(d.addr, &format!("match={}", enc(BOOKS)), &[]);
    let mut star08 = open(d.addr, "match_exact=*", &[]);

    publish(d.addr, &format!("topic={}&data=author", enc(AUTHOR)), &[]);
    let id = publish(
        d.addr,
        &format!(
            "topic={}&type=changed&data={}",
            enc(BOOK),
            enc("line 1\nline 2")
        ),
        &[],
    );
    publish(d.addr, &format!("topic={}&data=literal", enc(BOOKS)), &[]);

    let f = next(&mut books);
    assert_eq!(field(&f, "data"), ["line 1", "line 2"], "{f}");
    assert_eq!(field(&f, "event"), ["changed"]);
    assert_eq!(field(&f, "id"), [id.as_str()]);
    // The literal topic `…/{id}` is no topic the template expands to.
    publish(
        d.addr,
        &format!("topic={}&data=two", enc("https://example.com/books/2")),
        &[],
    );
    let f = next(&mut books);
    assert_eq!(field(&f, "data"), ["two"], "{f}");
    for c in [&mut all, &mut star08] {
        assert_eq!(field(&next(c), "data"), ["author"]);
        assert_eq!(field(&next(c), "data"), ["line 1", "line 2"]);
        assert_eq!(field(&next(c), "data"), ["literal"]);
        assert_eq!(field(&next(c), "data"), ["two"]);
    }
    assert_eq!(field(&next(&mut literal), "data"), ["literal"]);
}

#[test]
fn the_cursor_headers_say_where_the_stream_starts() {
    let d = daemon("");
    // Nothing published yet.
    let (_c, head) = subscribe(d.addr, &format!("topic={}", enc(BOOK)), &[]);
    assert_eq!(head.header("mercure-last-event-id"), Some("earliest"));
    let first = publish(d.addr, &format!("topic={}&data=one", enc(BOOK)), &[]);
    let second = publish(d.addr, &format!("topic={}&data=two", enc(AUTHOR)), &[]);
    // Not resuming: the newest id, a cursor to resume from later.
    let (_c, head) = subscribe(d.addr, &format!("topic={}", enc(BOOKS)), &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("last-event-id"), Some(second.as_str()));
    assert_eq!(head.header("mercure-last-event-id"), Some(second.as_str()));
    // Resuming from an id the hub has: that id, in both drafts' headers.
    let query = format!("topic=*&last_event_id={}", enc(&first));
    let (mut c, head) = subscribe(d.addr, &query, &[]);
    assert_eq!(head.header("mercure-last-event-id"), Some(first.as_str()));
    assert_eq!(head.header("last-event-id"), Some(first.as_str()));
    assert_eq!(field(&next(&mut c), "data"), ["two"]);
    // From an id it never issued: `earliest`, the reset notice, then all.
    let (mut c, head) = subscribe(d.addr, "topic=*&lastEventID=nope", &[]);
    assert_eq!(head.header("mercure-last-event-id"), Some("earliest"));
    let f = first_event(&mut c);
    assert_eq!(field(&f, "event"), ["reset"], "{f}");
    assert_eq!(field(&next(&mut c), "data"), ["one"]);
    // `earliest`: everything retained, no notice, by header or query.
    for (query, header) in [
        ("topic=*&lastEventID=earliest", None),
        ("topic=*", Some("Last-Event-ID: earliest")),
    ] {
        let headers: Vec<&str> = header.into_iter().collect();
        let (mut c, head) = subscribe(d.addr, query, &headers);
        assert_eq!(head.header("mercure-last-event-id"), Some("earliest"));
        let f = first_event(&mut c);
        assert_eq!(field(&f, "data"), ["one"], "no reset first: {f}");
        assert_eq!(field(&next(&mut c), "data"), ["two"]);
    }
}

#[test]
fn one_hub_for_both_interfaces() {
    let d = daemon("");
    let mut mercure = open(d.addr, &format!("topic={}", enc("orders.{id}")), &[]);
    let mut events = Client::new(d.addr);
    let head = events.get_stream(&format!("/events?topic={}", enc(BOOK)), &[]);
    assert_eq!(head.status, 200);
    let (status, _) = support::post(d.addr, "/publish/orders.7", "{\"n\":7}");
    assert!(status < 300, "{status}");
    assert_eq!(field(&next(&mut mercure), "data"), ["{\"n\":7}"]);
    publish(d.addr, &format!("topic={}&data=book", enc(BOOK)), &[]);
    assert_eq!(field(&next(&mut events), "data"), ["book"]);
}

#[test]
fn grants_cover_selectors_and_tokens_come_by_query_too() {
    let d = daemon(&format!(
        "[auth]\nanonymous = false\njwt_secret = \"{SECRET}\"\n"
    ));
    let reader = jwt(&json!({"mercure": {"subscribe": [BOOKS]}}));
    let bearer = format!("Authorization: Bearer {reader}");
    let publisher = format!(
        "Authorization: Bearer {}",
        jwt(&json!({"mercure": {"publish": ["*"]}}))
    );
    // The template it holds, and a topic the template covers.
    let mut by_template = open(d.addr, &format!("topic={}", enc(BOOKS)), &[&bearer]);
    let mut exact = open(d.addr, &format!("topic={}", enc(BOOK)), &[&bearer]);
    // Draft-07's `?authorization=`, for an EventSource that sends no header.
    let mut by_query = open(
        d.addr,
        &format!("topic={}&authorization={reader}", enc(BOOKS)),
        &[],
    );
    // Not covered: `*`, another template, a topic outside.
    for query in [
        "topic=*".to_owned(),
        format!("topic={}", enc("https://example.com/{+any}")),
        format!("topic={}&topic={}", enc(BOOK), enc(AUTHOR)),
    ] {
        let (status, body) = refused(d.addr, &query, &[&bearer]);
        assert_eq!(status, 403, "{query}: {body}");
    }
    // Draft-08's challenges: none, invalid_token, insufficient_scope.
    for (query, header, status, challenge) in [
        ("topic=*", None, 401, "Bearer realm=\"ssed\""),
        (
            "topic=*&authorization=not.a.jwt",
            None,
            401,
            "error=\"invalid_token\"",
        ),
        (
            "topic=*",
            Some(bearer.as_str()),
            403,
            "error=\"insufficient_scope\"",
        ),
    ] {
        let headers: Vec<&str> = header.into_iter().collect();
        let (_c, head) = subscribe(d.addr, query, &headers);
        assert_eq!(head.status, status, "{query}");
        let got = head.header("www-authenticate").unwrap_or_default();
        assert!(got.starts_with("Bearer"), "{query}: {got}");
        assert!(got.contains(challenge), "{query}: {got}");
        if status == 401 && header.is_none() && !query.contains("authorization") {
            assert!(
                !got.contains("error="),
                "no error code without a token: {got}"
            );
        }
    }
    // `?authorization=` is Mercure's: /events does not take it.
    let mut c = Client::new(d.addr);
    let head = c.get_stream(
        &format!("/events?topic={}&authorization={reader}", enc(BOOK)),
        &[],
    );
    assert_eq!(head.status, 401);

    publish(
        d.addr,
        &format!("topic={}&data=secret&private=on", enc(BOOK)),
        &[&publisher],
    );
    for c in [&mut by_template, &mut exact, &mut by_query] {
        assert_eq!(field(&next(c), "data"), ["secret"]);
    }
}

#[test]
fn malformed_or_unbuilt_matchers_are_refused_saying_why() {
    let d = daemon("");
    let too_many: Vec<String> = (0..65).map(|n| format!("topic=t{n}")).collect();
    for (query, says) in [
        (
            format!(
                "match_urlpattern={}",
                enc("https://example.com/books/(\\d+)")
            ),
            "regular-expression groups",
        ),
        ("match_regex=a.*".to_owned(), "unknown topic matcher type"),
        (
            format!("topic={}", enc("https://example.com/{id")),
            "URI template",
        ),
        (format!("topic={}", enc("a\u{1}b")), "control"),
        (format!("match={}", enc("a\u{200B}b")), "U+200B"),
        (too_many.join("&"), "too many"),
        ("lastEventID=1".to_owned(), "name a topic"),
    ] {
        let (status, body) = refused(d.addr, &query, &[]);
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    // None left a subscriber behind.
    let id = publish(d.addr, "topic=t1&data=x", &[]);
    assert!(!id.is_empty());
    assert_eq!(d.hub.subscribers("t1"), 0);
}

#[test]
fn a_publisher_given_id_is_the_events_id_and_a_place_to_resume() {
    let d = daemon("");
    let mut sub = open(d.addr, &format!("topic={}", enc(BOOKS)), &[]);
    let id = publish(
        d.addr,
        &format!("topic={}&id={}&data=one", enc(BOOK), enc("urn:uuid:42")),
        &[],
    );
    assert_eq!(id, "urn:uuid:42", "the answer is the publisher's id");
    publish(d.addr, &format!("topic={}&data=two", enc(BOOK)), &[]);
    let f = next(&mut sub);
    assert_eq!(field(&f, "id"), ["urn:uuid:42"]);
    // An EventSource resumes with it.
    let (mut again, head) = subscribe(
        d.addr,
        &format!("topic={}", enc(BOOKS)),
        &["Last-Event-ID: urn:uuid:42"],
    );
    assert_eq!(head.header("mercure-last-event-id"), Some("urn:uuid:42"));
    assert_eq!(field(&next(&mut again), "data"), ["two"]);
    // Ids that cannot be one: 400, saying why.
    for (bad, says) in [
        ("%231", "#"),
        ("earliest", "reserved"),
        ("a%0Ab", "control"),
    ] {
        let raw = support::request_text(
            "POST",
            "/.well-known/mercure",
            "127.0.0.1",
            &["Content-Type: application/x-www-form-urlencoded"],
            &format!("topic=t&id={bad}&data=x"),
        );
        let (head, body) = support::request(d.addr, &raw);
        assert_eq!(head.status, 400, "{bad}: {body}");
        assert!(body.contains(says), "{bad}: {body}");
    }
}

#[test]
fn url_patterns_select_by_url_and_grant_by_access_token() {
    let d = daemon(&format!(
        "[auth]\nanonymous = false\njwt_secret = \"{SECRET}\"\n\
         jwt_issuer = \"https://auth.example\"\njwt_audience = \"https://hub.example\"\n"
    ));
    let pattern = "https://example.com/books/:id";
    // A draft-08 access token granting the pattern.
    let token = support::hs256(
        SECRET,
        &json!({"alg": "HS256", "typ": "at+jwt"}),
        &json!({
            "sub": "reader",
            "iss": "https://auth.example",
            "aud": "https://hub.example",
            "exp": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()) + 60,
            "authorization_details": [{
                "type": "https://mercure.rocks/authorization-detail",
                "actions": ["subscribe"],
                "topics": [{"match": pattern, "match_type": "urlpattern"}],
            }],
        }),
    );
    let bearer = format!("Authorization: Bearer {token}");
    let mut sub = open(
        d.addr,
        &format!("match_urlpattern={}", enc(pattern)),
        &[&bearer],
    );
    // A pattern the token does not hold, and `*`: 403.
    for query in [
        format!("match_urlpattern={}", enc("https://example.com/*")),
        "match=*".to_owned(),
    ] {
        let (status, body) = refused(d.addr, &query, &[&bearer]);
        assert_eq!(status, 403, "{query}: {body}");
    }
    let publisher = format!(
        "Authorization: Bearer {}",
        jwt(&json!({"mercure": {"publish": ["*"]}}))
    );
    for (topic, data) in [
        ("https://example.com/books/1/reviews", "review"),
        ("https://example.org/books/1", "elsewhere"),
        ("https://EXAMPLE.com:443/books/2?lang=fr", "book 2"),
    ] {
        publish(
            d.addr,
            &format!("topic={}&data={}&private=on", enc(topic), enc(data)),
            &[&publisher],
        );
    }
    let f = next(&mut sub);
    assert_eq!(field(&f, "data"), ["book 2"], "private, and matched: {f}");
}
