#![cfg(all(feature = "daemon", feature = "durable"))]
//! Subscriptions by selector (`*`, URI templates: what Mercure
//! subscribers ask for) on every engine: live updates of every topic a
//! selector matches and of no other, an update of several topics once,
//! private updates as the subscription's privacy says, and the replay of
//! every matched topic of history, from an id or from `earliest`. The
//! Redis engine uses the machine's Redis (names unique to the run,
//! deleted after); without one the Redis case says why and passes, except
//! under `CI=true`.

mod support;

use std::time::Duration;

use ssed::hub::grant::Grant;
use ssed::hub::store;
use ssed::hub::{EARLIEST, Privacy, Selector};
use ssed::{Event, Hub, HubConfig, Subscription};
use support::TempDir;

const DEADLINE: Duration = Duration::from_secs(5);
/// The Redis tests here take turns: a subscriber of `*` there sees every
/// topic of the shared Redis, the other test's too.
static REDIS_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
const BOOKS: &str = "https://example.com/books/{id}";

fn book(n: u32) -> String {
    format!("https://example.com/books/{n}")
}

fn author(n: u32) -> String {
    format!("https://example.com/authors/{n}")
}

fn sel(s: &str) -> Selector {
    Selector::parse(s).expect("a selector")
}

fn data(frame: &[u8]) -> String {
    String::from_utf8_lossy(frame)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The data of what `sub` receives live: `n` frames, each within the
/// deadline.
fn live(sub: &Subscription, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            data(
                sub.next_timeout(DEADLINE)
                    .expect("delivered in time")
                    .as_bytes(),
            )
        })
        .collect()
}

/// As [`live`], then nothing more for a moment.
fn only(sub: &Subscription, n: usize) -> Vec<String> {
    let got = live(sub, n);
    if let Some(more) = sub.next_timeout(Duration::from_millis(150)) {
        panic!("after {got:?}, one too many: {}", data(more.as_bytes()));
    }
    got
}

fn replay(mut sub: Subscription) -> Vec<String> {
    sub.take_backlog()
        .iter()
        .map(|f| {
            let text = String::from_utf8_lossy(f.as_bytes()).into_owned();
            if text.contains("event: reset") {
                "<reset>".to_owned()
            } else {
                data(f.as_bytes())
            }
        })
        .collect()
}

/// Checks selector subscriptions on `hub`, whose topics are prefixed with
/// `run` (unique to a Redis run).
fn check(hub: &Hub, run: &str) {
    let (b1, b2, a1) = (
        format!("{run}{}", book(1)),
        format!("{run}{}", book(2)),
        format!("{run}{}", author(1)),
    );
    let books = sel(&format!("{run}{BOOKS}"));
    let all = hub
        .subscribe_matching(&[], &[Selector::All], &Privacy::Public, None)
        .expect("subscribed");
    let templ = hub
        .subscribe_matching(&[], std::slice::from_ref(&books), &Privacy::All, None)
        .expect("subscribed");
    // An exact topic the template matches too, and the template twice:
    // each update once.
    let overlap = hub
        .subscribe_matching(
            &[b1.as_str()],
            &[books.clone(), books.clone()],
            &Privacy::All,
            None,
        )
        .expect("subscribed");
    // Private updates of the books its grant covers, and no other.
    let granted = hub
        .subscribe_matching(
            &[],
            &[Selector::All],
            &Privacy::Granted(Grant::new(vec![sel(&b2)], Vec::new())),
            None,
        )
        .expect("subscribed");

    let first = hub.publish(&b1, Event::new().data("b1")).expect("kept");
    hub.publish(&a1, Event::new().data("a1")).expect("kept");
    hub.publish_update(&[&a1, &b2], Event::new().data("a1+b2"), false)
        .expect("kept");
    hub.publish_update(&[&b1, &b2], Event::new().data("secret b1+b2"), true)
        .expect("kept");
    hub.publish_update(&[&b1], Event::new().data("secret b1"), true)
        .expect("kept");

    assert_eq!(only(&all, 3), ["b1", "a1", "a1+b2"], "`*`, public only");
    assert_eq!(
        only(&templ, 4),
        ["b1", "a1+b2", "secret b1+b2", "secret b1"],
        "the books"
    );
    assert_eq!(
        only(&overlap, 4),
        ["b1", "a1+b2", "secret b1+b2", "secret b1"],
        "each once"
    );
    assert_eq!(
        only(&granted, 4),
        ["b1", "a1", "a1+b2", "secret b1+b2"],
        "the private one of a granted topic"
    );

    // Replayed: every topic the selector matches in history, in order.
    let after = first.id.to_string();
    let again = |selectors: &[Selector], privacy: Privacy, asked: &str| {
        hub.subscribe_matching(&[], selectors, &privacy, Some(asked))
            .expect("subscribed")
    };
    let r = again(std::slice::from_ref(&books), Privacy::All, &after);
    assert_eq!(r.cursor(Some(&after)), after, "resumed where asked");
    assert_eq!(replay(r), ["a1+b2", "secret b1+b2", "secret b1"]);
    let r = again(&[Selector::All], Privacy::Public, &after);
    assert_eq!(replay(r), ["a1", "a1+b2"]);
    let grant = Grant::new(vec![sel(&b2)], Vec::new());
    let r = again(&[Selector::All], Privacy::Granted(grant), &after);
    assert_eq!(replay(r), ["a1", "a1+b2", "secret b1+b2"]);
    // From `earliest`: all of it, and no reset notice.
    let r = again(std::slice::from_ref(&books), Privacy::Public, EARLIEST);
    assert_eq!(r.cursor(Some(EARLIEST)), EARLIEST);
    assert_eq!(replay(r), ["b1", "a1+b2"]);
    // From an id no one issued: a reset notice, then everything.
    let r = again(std::slice::from_ref(&books), Privacy::Public, "no-such-id");
    assert_eq!(r.cursor(Some("no-such-id")), EARLIEST);
    assert_eq!(replay(r), ["<reset>", "b1", "a1+b2"]);
}

#[test]
fn selectors_in_memory() {
    check(&Hub::new(10), "");
}

#[test]
fn selectors_with_a_data_dir_across_a_restart() {
    let dir = TempDir::new("selectors");
    let open = || store::open_hub(dir.path(), 10, HubConfig::default()).expect("opens");
    check(&open(), "");
    // Reopened: the replay of a template comes from the file.
    let hub = open();
    let sub = hub
        .subscribe_matching(&[], &[sel(BOOKS)], &Privacy::Public, Some(EARLIEST))
        .expect("subscribed");
    assert_eq!(replay(sub), ["b1", "a1+b2"]);
}

#[test]
fn many_subscribers_of_one_template_each_get_every_matching_update() {
    let hub = Hub::new(10);
    let subs: Vec<Subscription> = (0..200)
        .map(|_| {
            hub.subscribe_matching(&[], &[sel(BOOKS)], &Privacy::Public, None)
                .expect("subscribed")
        })
        .collect();
    for n in 0..20 {
        hub.publish(&book(n), Event::new().data(n.to_string()))
            .expect("kept");
        hub.publish(&author(n), Event::new().data("no"))
            .expect("kept");
    }
    let want: Vec<String> = (0..20).map(|n| n.to_string()).collect();
    for s in &subs {
        assert_eq!(live(s, 20), want);
    }
    drop(subs);
    // Gone with their subscriptions: a publish reaches no one.
    let p = hub.publish(&book(1), Event::new().data("x")).expect("kept");
    assert_eq!(p.receivers, 0);
}

#[test]
fn selectors_in_redis() {
    let Some(redis) = support::redis::redis("selectors_in_redis") else {
        return;
    };
    let _turn = REDIS_TURN.lock().unwrap_or_else(|p| p.into_inner());
    let run = support::redis::unique_run("s");
    let topics = [book(1), book(2), author(1)].map(|t| format!("{run}{t}"));
    let _cleanup = support::redis::TopicCleanup {
        redis,
        topics: topics.to_vec(),
    };
    let url = format!("redis://{redis}");
    let hub = Hub::with_redis(&url, 10, HubConfig::default()).expect("a Redis hub");
    check(&hub, &run);
    // Another node: live updates published here reach its subscribers by
    // selector, and its replay reads the same topics.
    let other = Hub::with_redis(&url, 10, HubConfig::default()).expect("a Redis hub");
    let books = sel(&format!("{run}{BOOKS}"));
    let there = other
        .subscribe_matching(&[], std::slice::from_ref(&books), &Privacy::Public, None)
        .expect("subscribed");
    let from_here = hub
        .publish(&topics[1], Event::new().data("from here"))
        .expect("kept")
        .id;
    assert_eq!(only(&there, 1), ["from here"]);
    let r = other
        .subscribe_matching(
            &[],
            std::slice::from_ref(&books),
            &Privacy::Public,
            Some(EARLIEST),
        )
        .expect("subscribed");
    assert_eq!(replay(r), ["b1", "a1+b2", "from here"]);

    // Publishes write the stream of every update only while a node marks
    // that it has subscribers by selector. A mark that lapses (Redis lost
    // it) may have cost them updates: they are closed as slow, to resume,
    // and the mark is back.
    support::redis::command(redis, &["DEL", "ssed:selecting"]);
    let unmarked = hub
        .publish(&topics[1], Event::new().data("unmarked"))
        .expect("kept")
        .id;
    assert!(
        support::wait_until(Duration::from_secs(5), || there.is_slow()),
        "the subscriber by selector is closed as slow"
    );
    assert!(
        support::redis::command(redis, &["EXISTS", "ssed:selecting"]).starts_with(":1"),
        "marked again"
    );
    // What was published meanwhile is not in that stream: a resume from
    // before it is told that updates may be missing.
    let r = other
        .subscribe_matching(
            &[],
            &[books],
            &Privacy::Public,
            Some(&from_here.to_string()),
        )
        .expect("subscribed");
    assert_eq!(replay(r), ["<reset>"]);
    // A node that has delivered nothing yet still names the newest id as
    // where a new subscriber's events start (Mercure-Last-Event-ID).
    let third = Hub::with_redis(&url, 10, HubConfig::default()).expect("a Redis hub");
    let sub = third.subscribe(&[&topics[0]], None).expect("subscribed");
    assert_eq!(sub.cursor(None), unmarked.to_string());
}

#[test]
fn a_subscriber_by_topic_and_selector_gets_each_update_once_in_redis() {
    let Some(redis) =
        support::redis::redis("a_subscriber_by_topic_and_selector_gets_each_update_once_in_redis")
    else {
        return;
    };
    let _turn = REDIS_TURN.lock().unwrap_or_else(|p| p.into_inner());
    let run = support::redis::unique_run("m");
    let topics: Vec<String> = (0..40).map(|n| format!("{run}{}", book(n))).collect();
    let _cleanup = support::redis::TopicCleanup {
        redis,
        topics: topics.clone(),
    };
    let url = format!("redis://{redis}");
    let hub = Hub::with_redis(&url, 100, HubConfig::default()).expect("a Redis hub");
    let books = sel(&format!("{run}{BOOKS}"));
    // The node reads the stream of every update already.
    let _watch = hub
        .subscribe_matching(&[], std::slice::from_ref(&books), &Privacy::Public, None)
        .expect("subscribed");
    // Each round a subscriber names a topic new to the node (its stream
    // joins the reader behind the stream of every update) and matches it
    // by selector too, while updates of it and of others pour in: in
    // whatever order the streams are read, it gets each update once.
    for round in 0..10 {
        let mine = topics[round].clone();
        let publisher = {
            let (hub, mine, other) = (hub.clone(), mine.clone(), topics[20 + round].clone());
            std::thread::spawn(move || {
                for i in 0..40 {
                    let topic = if i % 4 == 0 { &mine } else { &other };
                    hub.publish(topic, Event::new().data(format!("{round}-{i}")))
                        .expect("kept");
                }
            })
        };
        let sub = hub
            .subscribe_matching(
                &[&mine],
                std::slice::from_ref(&books),
                &Privacy::Public,
                None,
            )
            .expect("subscribed");
        publisher.join().expect("published");
        let mut got: Vec<u32> = Vec::new();
        while let Some(f) = sub.next_timeout(Duration::from_millis(200)) {
            let d = data(f.as_bytes());
            let (r, i) = d.split_once('-').expect("round-i");
            assert_eq!(r, round.to_string());
            got.push(i.parse().expect("a number"));
        }
        let mut sorted = got.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(got, sorted, "round {round}: once each, in order");
    }
}

#[test]
fn a_node_follows_a_bounded_number_of_distinct_selectors() {
    let hub = Hub::new(10);
    let mut subs: Vec<Subscription> = (0..1024)
        .map(|n| {
            hub.subscribe_matching(&[], &[sel(&format!("t{n}:{{x}}"))], &Privacy::Public, None)
                .expect("room for it")
        })
        .collect();
    // One more distinct selector is refused; one already followed is not.
    let refused = hub.subscribe_matching(&[], &[sel("more:{x}")], &Privacy::Public, None);
    assert!(
        matches!(refused, Err(ssed::HubError::Selectors { max: 1024 })),
        "{refused:?}"
    );
    hub.subscribe_matching(&[], &[sel("t7:{x}")], &Privacy::Public, None)
        .expect("a selector followed already");
    // Room again once one is no longer followed; publishing still works.
    subs.truncate(1023);
    hub.subscribe_matching(&[], &[sel("more:{x}")], &Privacy::Public, None)
        .expect("room again");
    let p = hub.publish("t3:a", Event::new().data("x")).expect("kept");
    assert_eq!(p.receivers, 1);
}
