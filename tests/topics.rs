#![cfg(feature = "daemon")]
//! Topics that are not names: IRIs such as `https://example.com/books/1`,
//! and any text of 1 to 1,024 bytes without control or format characters,
//! named in `/events?topic=`. On every engine (memory, `data_dir`, Redis)
//! the daemon in-process streams them over real sockets, its hub publishes
//! into them, and a stream resuming with `Last-Event-ID` gets them again;
//! topics that are none are refused with a 400 that says why.
//!
//! The Redis test uses the machine's Redis on 127.0.0.1:6379, with topics
//! unique to the run, whose keys it deletes at the end; without a Redis it
//! passes after printing why, except under `CI=true`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ssed::{Event, Hub};
use support::redis::{command, redis};
use support::{Client, InProcess, TempDir, encode, field, wait_until};

/// The longest any test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(10);

/// A daemon in this process, with heartbeats off.
fn node(toml: &str) -> InProcess {
    support::daemon(&format!(
        "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\n{toml}"
    ))
}

fn events_path(topics: &[&str]) -> String {
    let query: Vec<String> = topics
        .iter()
        .map(|t| format!("topic={}", encode(t)))
        .collect();
    format!("/events?{}", query.join("&"))
}

/// Two topics of this run: an IRI, and a text with what might trip a key,
/// a delimiter or an encoding (spaces, braces, quotes, `%`, `#`, `?`, `/`,
/// `:`, a backslash, accents, CJK, an emoji).
fn two_topics(tag: &str) -> [String; 2] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let run = format!("{}-{nanos}", std::process::id());
    [
        format!("https://example.com/books/1?run={run}&engine={tag}#top"),
        format!(
            "{tag} {run}: a b {{c}} \"d\" 'e' 100% #f ?g /h\\ caf\u{e9} \u{4e16}\u{754c} \u{1f600}"
        ),
    ]
}

/// Opens an event stream of `topics` (resuming after `last`); it must be
/// let in.
fn subscribe(addr: SocketAddr, topics: &[&str], last: Option<&str>) -> Client {
    let mut c = Client::new(addr);
    let header = last.map(|id| format!("Last-Event-ID: {id}"));
    let headers: Vec<&str> = header.iter().map(String::as_str).collect();
    let head = c.get_stream(&events_path(topics), &headers);
    assert_eq!(head.status, 200, "{topics:?}");
    c
}

/// The id and data of the stream's next event (comments and `retry:`
/// skipped; a `reset` notice would show as one).
fn next_event(c: &mut Client) -> (String, String) {
    let frame = c.frame_matching(10, |f| !field(f, "data").is_empty());
    let id = field(&frame, "id").join("");
    (id, field(&frame, "data").join("\n"))
}

/// Publishes `data` to `topic` through the daemon's hub; its id.
fn publish(hub: &Hub, topic: &str, data: &str) -> String {
    hub.publish(topic, Event::new().data(data))
        .expect("publish to a topic in a query")
        .id
        .to_string()
}

/// What every engine must do with such topics: stream them live to one
/// subscriber of both, and replay what came after the first event to one
/// that resumes after it. The first event's id and the second's.
fn live_and_replayed(n: &InProcess, topics: &[String; 2]) -> (String, String) {
    let [iri, odd] = topics;
    let both = [iri.as_str(), odd.as_str()];
    let mut live = subscribe(n.addr, &both, None);
    assert!(
        wait_until(DEADLINE, || n.hub.subscribers(iri) == 1
            && n.hub.subscribers(odd) == 1),
        "the stream never joined both topics"
    );
    let first = publish(&n.hub, iri, "first");
    let second = publish(&n.hub, odd, "second");
    assert_eq!(next_event(&mut live), (first.clone(), "first".to_owned()));
    assert_eq!(next_event(&mut live), (second.clone(), "second".to_owned()));
    let mut resumed = subscribe(n.addr, &both, Some(&first));
    assert_eq!(
        next_event(&mut resumed),
        (second.clone(), "second".to_owned())
    );
    // And live after its replay.
    let third = publish(&n.hub, iri, "third");
    assert_eq!(next_event(&mut resumed), (third, "third".to_owned()));
    (first, second)
}

#[test]
fn iri_topics_stream_and_replay_in_memory() {
    let n = node("");
    live_and_replayed(&n, &two_topics("memory"));
}

#[test]
fn iri_topics_are_kept_in_the_data_dir_and_replayed_after_a_restart() {
    let dir = TempDir::new("iri-topics");
    let toml = format!(
        "data_dir = {:?}\n",
        dir.path().to_str().expect("a UTF-8 path")
    );
    let topics = two_topics("sqlite");
    let (first, second) = live_and_replayed(&node(&toml), &topics);
    // A new daemon on the same directory has them from SQLite.
    let n = node(&toml);
    let both = [topics[0].as_str(), topics[1].as_str()];
    let mut resumed = subscribe(n.addr, &both, Some(&first));
    assert_eq!(next_event(&mut resumed), (second, "second".to_owned()));
    // From before the oldest: the reset notice, then all of it.
    let mut all = subscribe(n.addr, &both[..1], Some("0-0"));
    let (_, reset) = next_event(&mut all);
    assert!(reset.contains("\"oldest\""), "{reset}");
    assert_eq!(next_event(&mut all), (first, "first".to_owned()));
}

/// Deletes what a test's topics left in Redis, when it ends.
struct RedisKeys(&'static str, Vec<String>);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        for topic in &self.1 {
            let key = format!("ssed:t:{topic}");
            command(self.0, &["DEL", &key]);
            command(self.0, &["HDEL", "ssed:seq", &key]);
        }
    }
}

#[test]
fn iri_topics_are_kept_in_redis_and_replayed_by_another_node() {
    let test = "iri_topics_are_kept_in_redis_and_replayed_by_another_node";
    let Some(redis) = redis(test) else {
        return;
    };
    let topics = two_topics("redis");
    let _keys = RedisKeys(redis, topics.to_vec());
    let toml = format!("[redis]\nurl = \"redis://{redis}\"\n");
    let a = node(&toml);
    let (first, second) = live_and_replayed(&a, &topics);
    // Each topic is one stream key holding the topic as given, byte for
    // byte: no delimiter or encoding in between.
    for topic in &topics {
        let reply = command(redis, &["TYPE", &format!("ssed:t:{topic}")]);
        assert!(reply.starts_with("+stream"), "{topic:?}: {reply}");
    }
    // Another node replays them from Redis.
    let b = node(&toml);
    let both = [topics[0].as_str(), topics[1].as_str()];
    let mut resumed = subscribe(b.addr, &both, Some(&first));
    assert_eq!(next_event(&mut resumed), (second, "second".to_owned()));
}

/// Opens `path` as an event stream that must be refused: the body of its
/// answer.
fn refused(addr: SocketAddr, path: &str) -> String {
    let mut c = Client::new(addr);
    let head = c.get_stream(path, &[]);
    let body = String::from_utf8(c.body(&head)).expect("a UTF-8 answer");
    assert_eq!(head.status, 400, "{path}: {body}");
    body
}

#[test]
fn what_is_no_topic_is_refused_saying_why() {
    let n = node("");
    let longest = format!("https://example.com/{}", "x".repeat(1024 - 20));
    assert_eq!(longest.len(), 1024);
    let open = subscribe(n.addr, &[&longest], None);
    assert!(wait_until(DEADLINE, || n.hub.subscribers(&longest) == 1));
    drop(open);
    let over = format!("{longest}y");
    let body = refused(n.addr, &events_path(&[&over]));
    assert!(
        body.contains("at most 1024 bytes") && body.contains("1025"),
        "{body}"
    );
    for (topic, shown) in [
        ("https://example.com/\u{200b}books", "U+200B"),
        ("books\u{202e}1", "U+202E"),
        ("\u{feff}books", "U+FEFF"),
    ] {
        let body = refused(n.addr, &events_path(&["fine", topic]));
        assert!(
            body.contains("format character") && body.contains(shown),
            "{topic:?}: {body}"
        );
    }
    for (topic, shown) in [
        ("books\u{7}1", "U+0007"),
        ("books\n1", "U+000A"),
        ("books\u{7f}", "U+007F"),
        ("books\u{85}", "U+0085"),
    ] {
        let body = refused(n.addr, &events_path(&[topic]));
        assert!(
            body.contains("control character") && body.contains(shown),
            "{topic:?}: {body}"
        );
    }
    let body = refused(n.addr, "/events?topic=");
    assert!(body.contains("cannot be empty"), "{body}");
    let many: Vec<String> = (0..65).map(|i| format!("https://e.com/{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let body = refused(n.addr, &events_path(&many));
    assert!(body.contains("at most 64"), "{body}");
    // In the path a topic stays a name: an IRI goes in the query.
    for path in [
        "/events/a%2Fb",
        "/events/https%3A%2F%2Fexample.com%2Fbooks%2F1",
    ] {
        let body = refused(n.addr, path);
        assert!(
            body.contains("in the path") && body.contains("/events?topic="),
            "{path}: {body}"
        );
    }
}
