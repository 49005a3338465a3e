//! The hub's own tests: publish, fan-out, slow subscribers, storage
//! failures and mailboxes (the replay's are in `subscription.rs`).

use std::sync::Mutex;
use std::sync::atomic::Ordering;

use super::*;
use crate::error::Report;
use crate::event::EncodedEvent;
use crate::hub::history::Replay;
use crate::hub::id::now_ms;
use crate::hub::mailbox::StoredMessage;

fn text(f: &EncodedEvent) -> String {
    String::from_utf8(f.as_bytes().to_vec()).expect("utf-8")
}

#[test]
fn publish_fans_out_shared_bytes_in_id_order() {
    let hub = Hub::new(10);
    let a = hub.subscribe(&["a"], None).expect("valid");
    let ab = hub.subscribe(&["a", "b"], None).expect("valid");
    let p1 = hub.publish("a", Event::new().data("1")).expect("valid");
    let p2 = hub
        .publish("b", Event::new().event("x").data("2"))
        .expect("valid");
    assert!(p2.id > p1.id);
    assert_eq!((p1.receivers, p2.receivers), (2, 1));
    let fa = a.try_next().expect("queued");
    let fab = ab.try_next().expect("queued");
    assert!(std::ptr::eq(fa.as_bytes(), fab.as_bytes()), "encoded once");
    assert_eq!(text(&fab), format!("id: {}\ndata: 1\n\n", p1.id));
    assert_eq!(
        text(&ab.try_next().expect("queued")),
        format!("event: x\nid: {}\ndata: 2\n\n", p2.id)
    );
    assert!(a.try_next().is_none());
    drop(a);
    assert_eq!(hub.subscribers("a"), 1);
}

#[test]
fn a_full_queue_drops_only_that_subscriber() {
    let hub = Hub::with_history(
        Box::new(MemoryHistory::new(10)),
        HubConfig {
            queue: 2,
            ..HubConfig::default()
        },
    );
    let slow = hub.subscribe(&["t"], None).expect("valid");
    let fast = hub.subscribe(&["t"], None).expect("valid");
    for i in 0..3 {
        hub.publish("t", Event::new().data(i.to_string()))
            .expect("valid");
        while fast.try_next().is_some() {}
    }
    assert!(slow.is_slow());
    assert!(!fast.is_slow());
    assert_eq!(hub.subscribers("t"), 1);
    // The slow one drains what it had, then sees the disconnect.
    assert!(slow.try_next().is_some());
    assert!(slow.try_next().is_some());
    assert!(slow.try_next().is_none());
    assert!(
        slow.next_timeout(Duration::from_secs(5)).is_none(),
        "closed: no wait"
    );
}

#[test]
fn mailboxes_are_fifo_bounded_and_single_delivery() {
    let hub = Hub::with_history(
        Box::new(MemoryHistory::new(0)),
        HubConfig {
            mailbox_capacity: 2,
            ..HubConfig::default()
        },
    );
    assert_eq!(hub.push("k", "a").expect("room"), 1);
    assert_eq!(hub.push("k", "b").expect("room"), 2);
    assert!(matches!(
        hub.push("k", "c"),
        Err(HubError::MailboxFull { capacity: 2, .. })
    ));
    assert!(matches!(
        hub.push("bad key", "c"),
        Err(HubError::InvalidName(_))
    ));
    let a = hub.0.node.mailboxes.take("k").expect("queued");
    assert_eq!(a.text, "a");
    hub.0.node.mailboxes.untake("k", a);
    assert_eq!(hub.try_take("k").as_deref(), Some("a"));
    assert_eq!(hub.try_take("k").as_deref(), Some("b"));
    assert_eq!(hub.try_take("k"), None);
    assert_eq!(hub.mailbox_len("k"), 0);
}

/// A history that refuses writes while `fail` is set.
struct Flaky {
    inner: MemoryHistory,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl History for Flaky {
    fn append(&mut self, topic: &str, event: Retained) -> Result<(), StorageError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StorageError::new("disk full"));
        }
        self.inner.append(topic, event)
    }

    fn since(&self, topic: &str, after: EventId) -> Replay {
        self.inner.since(topic, after)
    }
}

#[test]
fn a_refused_write_is_neither_delivered_nor_acknowledged() {
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hub = Hub::with_history(
        Box::new(Flaky {
            inner: MemoryHistory::new(10),
            fail: Arc::clone(&fail),
        }),
        HubConfig::default(),
    );
    let sub = hub.subscribe(&["t"], None).expect("valid");
    let first = hub.publish("t", Event::new().data("1")).expect("stored");
    fail.store(true, Ordering::SeqCst);
    let err = hub
        .publish("t", Event::new().data("2"))
        .expect_err("refused");
    assert!(matches!(err, HubError::Storage(_)), "{err:?}");
    assert_eq!(
        Report(&err).to_string(),
        "storage unavailable: storage failed: disk full"
    );
    assert_eq!(hub.published(), 1);
    assert_eq!(hub.last_id(), first.id, "no id spent");
    fail.store(false, Ordering::SeqCst);
    let third = hub.publish("t", Event::new().data("3")).expect("stored");
    let got: Vec<String> = std::iter::from_fn(|| sub.try_next())
        .map(|f| text(&f))
        .collect();
    assert_eq!(
        got,
        [
            format!("id: {}\ndata: 1\n\n", first.id),
            format!("id: {}\ndata: 3\n\n", third.id),
        ]
    );
}

/// A mailbox store that records what it is asked and can refuse puts.
#[derive(Default, Clone)]
struct Recorder {
    log: Arc<Mutex<Vec<String>>>,
    fail: Arc<std::sync::atomic::AtomicBool>,
    kept: Vec<StoredMessage>,
}

impl MailboxStore for Recorder {
    fn load(&mut self) -> Result<Vec<StoredMessage>, StorageError> {
        Ok(std::mem::take(&mut self.kept))
    }

    fn put(&mut self, m: &StoredMessage) -> Result<(), StorageError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StorageError::new("disk full"));
        }
        let mut log = self.log.lock().expect("not poisoned");
        log.push(format!("put {} {} {}", m.key, m.seq, m.text));
        Ok(())
    }

    fn remove(&mut self, seq: u64) -> Result<(), StorageError> {
        let mut log = self.log.lock().expect("not poisoned");
        log.push(format!("remove {seq}"));
        Ok(())
    }
}

#[test]
fn a_mailbox_store_sees_puts_and_removals_and_restores_in_order() {
    let now = now_ms();
    let kept = |seq: u64, key: &str, age_ms: u64| StoredMessage {
        key: key.into(),
        seq,
        pushed_ms: now - age_ms,
        text: format!("m{seq}"),
    };
    let store = Recorder {
        kept: vec![
            kept(3, "k", 10),
            kept(5, "k", 10),
            kept(7, "old", 7_200_000),
        ],
        ..Recorder::default()
    };
    let log = Arc::clone(&store.log);
    let fail = Arc::clone(&store.fail);
    let hub = Hub::with_stores(
        Box::new(MemoryHistory::new(0)),
        Box::new(store),
        HubConfig::default(),
    )
    .expect("loads");
    let taken = |log: &Arc<Mutex<Vec<String>>>| log.lock().expect("not poisoned").clone();
    assert_eq!(taken(&log), ["remove 7"], "older than the TTL: dropped");
    assert_eq!(hub.mailbox_len("old"), 0);
    hub.push("k", "new").expect("room");
    assert_eq!(
        taken(&log)[1],
        "put k 8 new",
        "seq continues after the store's"
    );
    let m = hub.0.node.mailboxes.take("k").expect("restored");
    assert_eq!((m.seq, m.text.as_str()), (3, "m3"));
    hub.0.node.mailboxes.untake("k", m);
    assert_eq!(
        taken(&log).len(),
        2,
        "taken and given back: the store keeps it"
    );
    assert_eq!(hub.try_take("k").as_deref(), Some("m3"));
    assert_eq!(taken(&log)[2], "remove 3");
    fail.store(true, Ordering::SeqCst);
    assert!(matches!(hub.push("k", "lost?"), Err(HubError::Storage(_))));
    assert_eq!(hub.mailbox_len("k"), 2, "a refused push is not queued");
}

#[test]
fn hub_is_a_cheap_shared_handle() {
    fn assert_traits<T: Send + Sync + Clone>() {}
    assert_traits::<Hub>();
}

#[test]
fn a_hub_and_its_subscriptions_can_cross_catch_unwind() {
    // An embedder may call the hub inside `catch_unwind`; the engine
    // behind the hub must not take that away.
    fn unwind_safe<T: std::panic::UnwindSafe + std::panic::RefUnwindSafe + Send + Sync>() {}
    unwind_safe::<Hub>();
    fn sendable<T: Send + std::panic::UnwindSafe>() {}
    sendable::<Subscription>();
}

#[test]
fn a_private_update_reaches_trusted_subscriptions_only_live_and_in_replay() {
    let hub = Hub::new(10);
    let trusted = hub.subscribe(&["t"], None).expect("valid");
    let public = hub.subscribe_public(&["t", "u"], None).expect("valid");
    let first = hub
        .publish("t", Event::new().data("public"))
        .expect("valid");
    let private = hub
        .publish_private("t", Event::new().data("secret"))
        .expect("valid");
    let last = hub.publish("u", Event::new().data("after")).expect("valid");
    assert_eq!(
        (first.receivers, private.receivers, last.receivers),
        (2, 1, 1)
    );
    assert_eq!(hub.subscribers("t"), 2, "both still subscribed");
    let got = |s: &Subscription| -> Vec<String> {
        std::iter::from_fn(|| s.try_next())
            .map(|f| text(&f))
            .collect()
    };
    assert_eq!(
        got(&trusted),
        [
            format!("id: {}\ndata: public\n\n", first.id),
            format!("id: {}\ndata: secret\n\n", private.id)
        ]
    );
    assert_eq!(
        got(&public),
        [
            format!("id: {}\ndata: public\n\n", first.id),
            format!("id: {}\ndata: after\n\n", last.id)
        ]
    );
    // Replayed: the trusted subscription gets it, the public one skips it
    // and goes on past it.
    let from = EventId::floor_of(0).to_string();
    let mut trusted = hub.subscribe(&["t"], Some(&from)).expect("valid");
    let mut public = hub
        .subscribe_public(&["t", "u"], Some(&from))
        .expect("valid");
    // (The events, past the reset notice such an old id gets.)
    let backlog = |s: &mut Subscription| -> Vec<String> {
        let frames = s.take_backlog();
        frames
            .iter()
            .map(text)
            .filter_map(|f| Some(f.split_once("data: ")?.1.trim().to_owned()))
            .filter(|d| !d.starts_with('{'))
            .collect()
    };
    assert_eq!(backlog(&mut trusted), ["public", "secret"]);
    assert_eq!(backlog(&mut public), ["public", "after"]);
}

#[test]
fn an_update_of_several_topics_is_one_event_to_every_subscriber() {
    let hub = Hub::new(10);
    let a = hub.subscribe(&["a"], None).expect("valid");
    let b = hub.subscribe(&["b"], None).expect("valid");
    let ab = hub.subscribe(&["a", "b"], None).expect("valid");
    let p = hub
        .publish_update(&["a", "b", "a"], Event::new().data("both"), false)
        .expect("valid");
    assert_eq!(p.receivers, 3, "each subscription once");
    let all = |s: &Subscription| -> Vec<String> {
        std::iter::from_fn(|| s.try_next())
            .map(|f| text(&f))
            .collect()
    };
    let frame = format!("id: {}\ndata: both\n\n", p.id);
    assert_eq!(all(&a), std::slice::from_ref(&frame));
    assert_eq!(all(&b), std::slice::from_ref(&frame));
    assert_eq!(all(&ab), std::slice::from_ref(&frame));
    // Replayed once too, on one topic or both.
    let later = hub
        .publish("b", Event::new().data("b only"))
        .expect("valid");
    let from = EventId::floor_of(0).to_string();
    let mut ab = hub.subscribe(&["a", "b"], Some(&from)).expect("valid");
    let mut a = hub.subscribe(&["a"], Some(&from)).expect("valid");
    let events = |s: &mut Subscription| -> Vec<String> {
        let frames = s.take_backlog();
        frames
            .iter()
            .map(text)
            .filter(|f| !f.starts_with("event: reset"))
            .collect()
    };
    assert_eq!(
        events(&mut ab),
        [frame.clone(), format!("id: {}\ndata: b only\n\n", later.id)]
    );
    assert_eq!(events(&mut a), [frame]);
    let none: [&str; 0] = [];
    assert!(matches!(
        hub.publish_update(&none, Event::new(), false),
        Err(HubError::TopicCount { count: 0, .. })
    ));
    assert!(matches!(
        hub.publish_update(&["a", "a\u{200b}b"], Event::new(), false),
        Err(HubError::InvalidName(_))
    ));
}

#[test]
fn iris_are_topics_and_keys_stay_names() {
    let hub = Hub::new(10);
    let iri = "https://example.com/books/1";
    let sub = hub
        .subscribe(&[iri, "news"], None)
        .expect("an IRI is a topic");
    let p = hub.publish(iri, Event::new().data("x")).expect("published");
    assert_eq!(p.receivers, 1);
    let frame = sub.try_next().expect("delivered");
    assert_eq!(
        frame.as_bytes(),
        format!("id: {}\ndata: x\n\n", p.id).as_bytes()
    );
    for bad in ["", "a\u{200b}b", "a\nb", &"x".repeat(1025)] {
        let e = hub.publish(bad, Event::new().data("x")).map(|_| ());
        assert!(matches!(e, Err(HubError::InvalidName(_))), "{bad:?}");
        let e = hub.subscribe(&["news", bad], None).map(|_| ());
        assert!(matches!(e, Err(HubError::InvalidName(_))), "{bad:?}");
    }
    let e = hub.publish("a\u{200b}b", Event::new()).map(|_| ());
    assert!(e.is_err_and(|e| e.to_string().contains("U+200B")));
    // A mailbox key is a name: an IRI is none.
    let e = hub.push(iri, "m").map(|_| ());
    assert!(e.is_err_and(|e| e.to_string().starts_with("invalid key")));
}
