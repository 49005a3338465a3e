#![cfg(feature = "daemon")]
//! Mercure's active subscriptions (`[mercure] subscriptions = true`) over
//! real sockets: the private subscription updates of drafts 07 and 08 on
//! subscribe and unsubscribe, who sees them, the subscriptions API and its
//! authorization, and the same across two Redis nodes.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::encode as enc;
use support::{Client, field};

const BOOK: &str = "https://example.com/books/1";
const SECRET: &str = "a-long-and-random-jwt-secret";
/// Draft-07's subscription topics, as a URI template.
const SUBS07: &str = "/.well-known/mercure/subscriptions{/topic}{/subscriber}";
/// Draft-08's, as a URI template.
const SUBS08: &str = "/.well-known/mercure/subscriptions{/type}{/match}{/subscriber}";
const ROOT: &str = "/.well-known/mercure/subscriptions";

fn config(on: bool, extra: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nheartbeat = \"1s\"\n{extra}\n[auth]\njwt_secret = \"{SECRET}\"\n\
         anonymous = true\n[mercure]\nsubscriptions = {on}\n"
    )
}

fn jwt(claims: &Value) -> String {
    support::hs256(SECRET, &json!({"alg": "HS256"}), claims)
}

/// A token that may read the subscription updates and the API.
fn observer_token() -> String {
    jwt(&json!({"mercure": {"subscribe": [SUBS07, SUBS08, ROOT]}}))
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn open(addr: SocketAddr, query: &str, token: Option<&str>) -> Client {
    let mut c = Client::new(addr);
    let auth = token.map(bearer);
    let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
    let head = c.get_stream(&format!("/.well-known/mercure?{query}"), &headers);
    assert_eq!(head.status, 200, "{query}");
    c
}

/// The next event with data: its `event:` name and data, parsed.
fn next_update(c: &mut Client) -> (String, Value) {
    let f = c.frame_matching(20, |f| !field(f, "data").is_empty());
    let data = field(&f, "data").join("\n");
    let name = field(&f, "event").first().copied().unwrap_or_default();
    let value = serde_json::from_str(&data).unwrap_or(Value::String(data));
    (name.to_owned(), value)
}

/// The next update about a subscription by `matcher` (an observer first
/// sees its own subscription announced).
fn update_about(c: &mut Client, matcher: &str) -> (String, Value) {
    for _ in 0..10 {
        let (name, up) = next_update(c);
        if up["topic"] == matcher || up["match"] == matcher {
            return (name, up);
        }
    }
    panic!("no update about {matcher}");
}

/// `GET path` with an optional token: status and body.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, Option<String>) {
    let auth = token.map(bearer);
    let lines: Vec<&str> = auth.iter().map(String::as_str).collect();
    let raw = support::request_text("GET", path, "127.0.0.1", &lines, "");
    let mut c = Client::new(addr);
    c.send(raw.as_bytes());
    let (head, body) = c.response();
    let kind = head.header("content-type").map(str::to_owned);
    (head.status, body, kind)
}

fn api(addr: SocketAddr, path: &str) -> Value {
    let (status, body, _) = get(addr, path, Some(&observer_token()));
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// A subscriber with a payload, of `BOOK` by draft-07's `topic=`.
fn subscriber_token() -> String {
    jwt(&json!({"mercure": {"subscribe": ["*"], "payload": {"foo": "bar"}}}))
}

#[test]
fn a_granted_observer_sees_subscribe_and_unsubscribe_and_the_api_lists_them() {
    let d = support::daemon(&config(true, ""));
    let token = observer_token();
    let mut watcher = open(d.addr, &format!("topic={}", enc(SUBS07)), Some(&token));
    let mut anonymous = open(d.addr, &format!("topic={}", enc(SUBS07)), None);

    let other = open(
        d.addr,
        &format!("topic={}", enc(BOOK)),
        Some(&subscriber_token()),
    );
    let (name, up) = update_about(&mut watcher, BOOK);
    assert_eq!(name, "", "draft-07 updates are plain messages");
    let subscriber = up["subscriber"].as_str().expect("subscriber").to_owned();
    assert!(subscriber.starts_with("urn:uuid:"), "{up}");
    let id = format!("{ROOT}/{}/{}", enc(BOOK), enc(&subscriber));
    assert_eq!(
        up,
        json!({"@context": "https://mercure.rocks/", "id": id, "type": "Subscription",
               "topic": BOOK, "subscriber": subscriber, "active": true, "payload": {"foo": "bar"}})
    );

    // The API: the collection, the topic's, the one subscription.
    let all = api(d.addr, ROOT);
    assert_eq!(all["type"], "Subscriptions");
    // The two watchers' own subscriptions, and this one.
    let listed = all["subscriptions"].as_array().expect("array");
    assert_eq!(listed.len(), 3, "{all}");
    assert!(listed.contains(&up), "{all}");
    assert!(all["lastEventID"].is_string());
    let of_topic = api(d.addr, &format!("{ROOT}/{}", enc(BOOK)));
    assert_eq!(of_topic["subscriptions"], json!([up]));
    let one = api(d.addr, &id);
    assert_eq!(one["id"], id.as_str());
    assert_eq!(one["active"], true);
    let (status, _, kind) = get(d.addr, &id, Some(&token));
    assert_eq!(
        (status, kind.as_deref()),
        (200, Some("application/ld+json"))
    );

    drop(other);
    let (_, gone) = update_about(&mut watcher, BOOK);
    let mut expected = up.clone();
    expected["active"] = json!(false);
    assert_eq!(gone, expected);
    assert!(support::wait_until(Duration::from_secs(5), || {
        api(d.addr, &format!("{ROOT}/{}", enc(BOOK)))["subscriptions"] == json!([])
    }));
    assert_eq!(
        api(d.addr, ROOT)["subscriptions"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(get(d.addr, &id, Some(&token)).0, 404);

    // The anonymous observer saw neither: its first event is this public one.
    d.hub
        .publish(&format!("{ROOT}/x/y"), ssed::Event::new().data("public"))
        .expect("publish");
    assert_eq!(next_update(&mut anonymous).1, json!("public"));
}

#[test]
fn draft08_subscribers_are_announced_as_draft08_says() {
    let d = support::daemon(&config(true, ""));
    let token = observer_token();
    let mut watcher = open(d.addr, &format!("topic={}", enc(SUBS08)), Some(&token));
    let other = open(
        d.addr,
        &format!("match={}", enc(BOOK)),
        Some(&subscriber_token()),
    );
    let (name, up) = update_about(&mut watcher, BOOK);
    assert_eq!(name, "mercure");
    let subscriber = up["subscriber"].as_str().expect("subscriber").to_owned();
    let id = format!("{ROOT}/exact/{}/{}", enc(BOOK), enc(&subscriber));
    assert_eq!(
        up,
        json!({"id": id, "type": "subscription", "match_type": "exact", "match": BOOK,
               "subscriber": subscriber, "active": true, "payload": {"foo": "bar"}})
    );
    let of_matcher = api(d.addr, &format!("{ROOT}/exact/{}", enc(BOOK)));
    assert_eq!(of_matcher["type"], "subscriptions");
    assert_eq!(of_matcher["subscriptions"], json!([up]));
    let (status, body, kind) = get(d.addr, &id, Some(&token));
    assert_eq!(
        (status, kind.as_deref()),
        (200, Some("application/json")),
        "{body}"
    );
    drop(other);
    let (name, gone) = update_about(&mut watcher, BOOK);
    assert_eq!((name.as_str(), &gone["active"]), ("mercure", &json!(false)));
}

#[test]
fn with_the_config_off_nothing_is_published_and_there_is_no_api() {
    let d = support::daemon(&config(false, ""));
    let token = observer_token();
    let mut watcher = open(
        d.addr,
        "topic=*",
        Some(&jwt(&json!({"mercure": {"subscribe": ["*"]}}))),
    );
    let other = open(
        d.addr,
        &format!("topic={}", enc(BOOK)),
        Some(&subscriber_token()),
    );
    drop(other);
    std::thread::sleep(Duration::from_millis(200));
    d.hub
        .publish("marker", ssed::Event::new().data("marker"))
        .expect("publish");
    assert_eq!(next_update(&mut watcher).1, json!("marker"));
    assert_eq!(get(d.addr, ROOT, Some(&token)).0, 404);
}

#[test]
fn the_api_needs_a_credential_covering_the_path_and_refuses_bad_paths() {
    let d = support::daemon(&config(true, ""));
    assert_eq!(get(d.addr, ROOT, None).0, 401);
    let narrow = jwt(&json!({"mercure": {"subscribe": ["books"]}}));
    assert_eq!(get(d.addr, ROOT, Some(&narrow)).0, 403);
    // Covers one topic's collection only.
    let one = format!("{ROOT}/{}", enc(BOOK));
    let just = jwt(&json!({"mercure": {"subscribe": [one]}}));
    assert_eq!(get(d.addr, &one, Some(&just)).0, 200);
    assert_eq!(get(d.addr, ROOT, Some(&just)).0, 403);
    let all = jwt(&json!({"mercure": {"subscribe": ["*"]}}));
    for (path, want) in [
        (format!("{ROOT}/regex/a/b"), 404),
        (format!("{ROOT}/a/b/c/d"), 404),
        (format!("{ROOT}/%00"), 400),
        (format!("{ROOT}/{}/nobody", enc(BOOK)), 404),
        (format!("{ROOT}/exact/{}/nobody", enc(BOOK)), 404),
        (format!("{ROOT}/%ZZ/%C3"), 404),
    ] {
        assert_eq!(get(d.addr, &path, Some(&all)).0, want, "{path}");
    }
}

#[test]
fn updates_reach_an_observer_on_another_redis_node() {
    let test = "updates_reach_an_observer_on_another_redis_node";
    let Some(redis) = support::redis::redis(test) else {
        return;
    };
    let extra = format!("[redis]\nurl = \"redis://{redis}\"");
    // `[redis]` after the top-level keys, before `[auth]`.
    let node = |_: ()| support::daemon(&config(true, &extra));
    let (a, b) = (node(()), node(()));
    let token = observer_token();
    let mut watcher = open(b.addr, &format!("topic={}", enc(SUBS07)), Some(&token));
    let topic = format!("{BOOK}/{}", std::process::id());
    let other = open(
        a.addr,
        &format!("topic={}", enc(&topic)),
        Some(&subscriber_token()),
    );
    let (_, up) = update_about(&mut watcher, &topic);
    let subscriber = up["subscriber"].as_str().expect("subscriber").to_owned();
    let update_topic = format!("{ROOT}/{}/{}", enc(&topic), enc(&subscriber));
    let _cleanup = support::redis::TopicCleanup {
        redis,
        topics: vec![update_topic.clone()],
    };
    assert_eq!(
        (up["topic"].as_str(), &up["active"]),
        (Some(topic.as_str()), &json!(true))
    );
    // Each node's API lists its own subscribers.
    let of_topic = format!("{ROOT}/{}", enc(&topic));
    assert_eq!(api(a.addr, &of_topic)["subscriptions"], json!([up]));
    assert_eq!(api(b.addr, &of_topic)["subscriptions"], json!([]));
    drop(other);
    let (_, gone) = update_about(&mut watcher, &topic);
    assert_eq!(
        (gone["id"].as_str(), &gone["active"]),
        (Some(update_topic.as_str()), &json!(false))
    );
}
