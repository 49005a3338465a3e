#![cfg(all(feature = "daemon", feature = "durable"))]
//! Publisher-given ids (a Mercure update's `id`) on every engine: the
//! frame carries the publisher's id, a resume from it starts after the
//! earliest event that carries it (exact topics and selectors alike), an
//! id that cannot be one is refused and changes nothing. The Redis engine
//! uses the machine's Redis (names unique to the run, deleted after);
//! without one the Redis case says why and passes, except under
//! `CI=true`.

mod support;

use ssed::hub::store;
use ssed::hub::{Privacy, Selector};
use ssed::{Event, Hub, HubConfig, HubError, Subscription};
use support::TempDir;

fn field(frame: &[u8], name: &str) -> String {
    let prefix = format!("{name}: ");
    String::from_utf8_lossy(frame)
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_owned))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `(id, data)` of each replayed frame; a reset notice as `("reset", "")`.
fn replay(mut sub: Subscription) -> Vec<(String, String)> {
    sub.take_backlog()
        .iter()
        .map(|f| {
            let f = f.as_bytes();
            if field(f, "event") == "reset" {
                ("reset".into(), String::new())
            } else {
                (field(f, "id"), field(f, "data"))
            }
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// Publishes with publisher ids on `hub` (topics prefixed with `run`) and
/// resumes from them.
fn check(hub: &Hub, run: &str) {
    let (a, b) = (format!("{run}books/1"), format!("{run}books/2"));
    // Publisher ids are the hub's, not a topic's: unique to the run too.
    let id = |n: u32| format!("urn:uuid:{run}{n}");
    let (u1, u2, u9) = (id(1), id(2), id(9));
    let live = hub.subscribe(&[&a], None).expect("subscribed");
    // A subscriber by selector before the publishes: on Redis, the stream
    // of every update (what a replay by selector reads) is written while
    // some node has one.
    let books = Selector::parse(&format!("{run}books/{{n}}")).expect("a template");
    let _watch = hub
        .subscribe_matching(&[], std::slice::from_ref(&books), &Privacy::Public, None)
        .expect("subscribed");
    let first = hub
        .publish_with_id(&[&a], &u1, Event::new().data("one"), false)
        .expect("kept");
    hub.publish_with_id(&[&a, &b], &u2, Event::new().data("two"), false)
        .expect("kept");
    hub.publish(&b, Event::new().data("three")).expect("kept");
    // The same id again: a resume from it starts after the first.
    hub.publish_with_id(&[&a], &u2, Event::new().data("four"), false)
        .expect("kept");
    let f = live
        .next_timeout(std::time::Duration::from_secs(5))
        .expect("live");
    assert_eq!(field(f.as_bytes(), "id"), u1, "the publisher's id");
    assert!(first.id.to_string().contains('-'), "the hub's own id");

    let r = hub.subscribe(&[&a, &b], Some(&u1)).expect("subscribed");
    assert_eq!(r.cursor(Some(&u1)), u1);
    let three = replay(r);
    assert_eq!(three.len(), 3, "{three:?}");
    assert_eq!(three[0], (u2.clone(), "two".into()));
    assert_eq!(three[1].1, "three");
    assert_eq!(three[2], (u2.clone(), "four".into()));
    let r = hub.subscribe(&[&a], Some(&u2)).expect("subscribed");
    assert_eq!(replay(r), pairs(&[(&u2, "four")]));
    // By selector, where the id is found among the topics it matches.
    let r = hub
        .subscribe_matching(&[], &[books], &Privacy::Public, Some(&u2))
        .expect("subscribed");
    assert_eq!(replay(r)[1], (u2.clone(), "four".into()));
    // An id no event carries: the reset notice, then everything.
    let r = hub.subscribe(&[&a], Some(&u9)).expect("subscribed");
    assert_eq!(r.cursor(Some(&u9)), "earliest");
    let all = replay(r);
    assert_eq!(all[0].0, "reset");
    assert_eq!(all.len(), 4, "{all:?}");

    // Ids that cannot be one: refused, nothing published.
    let before = hub.published();
    for bad in [
        "",
        "#1",
        "earliest",
        "a\nb",
        "a\u{200B}b",
        &"x".repeat(257),
        "1700000000000-1",
    ] {
        let r = hub.publish_with_id(&[&a], bad, Event::new().data("x"), false);
        assert!(matches!(r, Err(HubError::InvalidId(_))), "{bad:?}: {r:?}");
    }
    assert_eq!(hub.published(), before);
}

#[test]
fn publisher_ids_in_memory() {
    check(&Hub::new(10), "");
}

#[test]
fn publisher_ids_with_a_data_dir_across_a_restart() {
    let dir = TempDir::new("publisher-ids");
    check(
        &store::open_hub(dir.path(), 10, HubConfig::default()).expect("opens"),
        "",
    );
    let hub = store::open_hub(dir.path(), 10, HubConfig::default()).expect("reopens");
    let r = hub
        .subscribe(&["books/1"], Some("urn:uuid:1"))
        .expect("subscribed");
    assert_eq!(
        replay(r),
        pairs(&[("urn:uuid:2", "two"), ("urn:uuid:2", "four")])
    );
}

#[test]
fn publisher_ids_in_redis() {
    let Some(redis) = support::redis::redis("publisher_ids_in_redis") else {
        return;
    };
    let run = support::redis::unique_run("p");
    let _cleanup = support::redis::TopicCleanup {
        redis,
        topics: vec![format!("{run}books/1"), format!("{run}books/2")],
    };
    let _ids = AliasCleanup { redis, run: &run };
    let hub = Hub::with_redis(&format!("redis://{redis}"), 10, HubConfig::default())
        .expect("a Redis hub");
    check(&hub, &run);
}

/// Deletes the publisher ids a Redis run kept (`check` gives 1 and 2).
struct AliasCleanup<'a> {
    redis: &'static str,
    run: &'a str,
}

impl Drop for AliasCleanup<'_> {
    fn drop(&mut self) {
        let ids: Vec<String> = (1..=2)
            .map(|n| format!("urn:uuid:{}{n}", self.run))
            .collect();
        for (key, how) in [("ssed:ids", "HDEL"), ("ssed:ids:order", "ZREM")] {
            support::redis::command(self.redis, &[how, key, &ids[0], &ids[1]]);
        }
    }
}
