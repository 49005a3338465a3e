#![cfg(all(feature = "daemon", feature = "durable"))]
//! One update of several topics (`Hub::publish_update`, what a Mercure
//! publisher's alternate topics become) on every engine: one id, one
//! event in each topic's history, delivered and replayed once to a
//! subscription of several of them, and a private one kept from public
//! subscriptions. The Redis engine uses the machine's Redis (names unique
//! to the run, deleted after); without one the Redis case says why and
//! passes, except under `CI=true`.

mod support;

use std::time::Duration;

use ssed::hub::store;
use ssed::{Event, Hub, HubConfig, Subscription};
use support::TempDir;

const DEADLINE: Duration = Duration::from_secs(5);

/// The data of what `sub` receives live: `n` frames, each within the
/// deadline.
fn live(sub: &Subscription, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let f = sub.next_timeout(DEADLINE).expect("delivered in time");
            data(&String::from_utf8_lossy(f.as_bytes()))
        })
        .collect()
}

fn data(frame: &str) -> String {
    frame
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Publishes on `a` and `b` of `hub` and checks who gets what, live and
/// replayed.
fn check(hub: &Hub, a: &str, b: &str) {
    let only_a = hub.subscribe(&[a], None).expect("valid");
    let both = hub.subscribe(&[a, b], None).expect("valid");
    let public = hub.subscribe_public(&[a, b], None).expect("valid");
    let first = hub.publish(a, Event::new().data("first")).expect("kept");
    let update = hub
        .publish_update(&[a, b], Event::new().data("both"), false)
        .expect("kept");
    hub.publish_update(&[b, a], Event::new().data("secret"), true)
        .expect("kept");
    hub.publish(b, Event::new().data("last")).expect("kept");
    assert_eq!(live(&only_a, 3), ["first", "both", "secret"]);
    assert_eq!(live(&both, 4), ["first", "both", "secret", "last"]);
    assert_eq!(live(&public, 3), ["first", "both", "last"]);
    assert!(
        both.next_timeout(Duration::from_millis(200)).is_none(),
        "each update once"
    );
    // Replayed after the first: once each, in publish order.
    let after = first.id.to_string();
    let replay = |mut sub: Subscription| -> Vec<String> {
        let frames = sub.take_backlog();
        frames
            .iter()
            .map(|f| data(&String::from_utf8_lossy(f.as_bytes())))
            .collect()
    };
    let both = hub.subscribe(&[a, b], Some(&after)).expect("valid");
    assert_eq!(replay(both), ["both", "secret", "last"]);
    let public = hub.subscribe_public(&[b, a], Some(&after)).expect("valid");
    assert_eq!(replay(public), ["both", "last"]);
    let only_b = hub.subscribe(&[b], Some(&after)).expect("valid");
    assert_eq!(replay(only_b), ["both", "secret", "last"]);
    assert!(update.id > first.id);
}

#[test]
fn an_update_of_several_topics_in_memory() {
    check(&Hub::new(10), "a", "b");
}

#[test]
fn an_update_of_several_topics_in_sqlite_after_a_restart() {
    let dir = TempDir::new("updates");
    {
        let hub = store::open_hub(dir.path(), 10, HubConfig::default()).expect("opens");
        check(&hub, "a", "b");
    }
    // Reopened: the same history, each update once.
    let hub = store::open_hub(dir.path(), 10, HubConfig::default()).expect("reopens");
    let mut sub = hub.subscribe(&["a", "b"], Some("0")).expect("valid");
    let frames = sub.take_backlog();
    let seen: Vec<String> = frames
        .iter()
        .map(|f| data(&String::from_utf8_lossy(f.as_bytes())))
        .filter(|d| !d.starts_with('{'))
        .collect();
    assert_eq!(seen, ["first", "both", "secret", "last"]);
}

#[test]
fn an_update_of_several_topics_in_redis() {
    let Some(redis) = support::redis::redis("an_update_of_several_topics_in_redis") else {
        return;
    };
    let run = support::redis::unique_run("u");
    let (a, b) = (format!("{run}a"), format!("{run}b"));
    let _cleanup = support::redis::TopicCleanup {
        redis,
        topics: vec![a.clone(), b.clone()],
    };
    let hub = Hub::with_redis(&format!("redis://{redis}"), 10, HubConfig::default())
        .expect("a Redis hub");
    check(&hub, &a, &b);
}
