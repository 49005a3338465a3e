#![cfg(all(feature = "daemon", feature = "durable"))]
//! Durable history and mailboxes (`data_dir`, `ssed::hub::store`): what is kept
//! survives closing the store and `kill -9` of the real daemon, ids keep
//! increasing, trimming and TTLs hold, and a store opens once at a time.
//!
//! Every directory is unique to its test and removed when its guard drops;
//! every child is killed by PID when its guard drops; every wait is bounded.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::Duration;

use ssed::hub::store::{self, DurableHistory, StoreError};
use ssed::hub::{History, Retained};
use ssed::{Event, EventId, HubConfig, HubError};
use support::process::Ssed;
use support::{Client, TempDir, field, post};

/// The longest any test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Guards
// ---------------------------------------------------------------------------

/// Starts `ssed --config <dir>/ssed.toml` with `config` as the file.
fn spawn(dir: &TempDir, config: &str) -> Ssed {
    let path = dir.path().join("ssed.toml");
    std::fs::write(&path, config).expect("write config");
    let path = path.to_str().expect("utf-8 temp path");
    Ssed::spawn(&["--config", path], &[])
}

fn daemon_config(data: &Path) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\nhistory = 100\ndata_dir = {:?}\n",
        data.to_str().expect("utf-8 temp path")
    )
}

/// Publishes `body` on `topic`, expecting a 200; the id it got.
fn publish(addr: SocketAddr, topic: &str, body: &str) -> EventId {
    let (status, text) = post(addr, &format!("/publish/{topic}"), body);
    assert_eq!(status, 200, "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    json["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no id in {text}"))
}

/// The data of the next `n` event frames (skipping `retry:` and comments),
/// with their ids and event names.
fn next_events(client: &mut Client, n: usize) -> Vec<(Option<String>, Option<String>, String)> {
    let mut out = Vec::new();
    for _ in 0..n + 8 {
        if out.len() == n {
            return out;
        }
        let frame = client.next_frame().expect("stream still open");
        let data = field(&frame, "data");
        if data.is_empty() {
            continue; // the opening retry:, a heartbeat
        }
        out.push((
            field(&frame, "id").first().map(|s| s.to_string()),
            field(&frame, "event").first().map(|s| s.to_string()),
            data.join("\n"),
        ));
    }
    panic!("fewer than {n} events: {out:?}");
}

// ---------------------------------------------------------------------------
// The library: DurableHistory and store::open_hub
// ---------------------------------------------------------------------------

fn retained(id: EventId, data: &str) -> Retained {
    let frame = Event::new()
        .id(id.to_string())
        .data(data)
        .encode_shared()
        .expect("valid event");
    Retained {
        id,
        frame,
        private: false,
    }
}

fn ids(events: &[Retained]) -> Vec<EventId> {
    events.iter().map(|e| e.id).collect()
}

#[test]
fn history_survives_reopening_with_trimming_and_no_false_gap() {
    let dir = TempDir::new("history");
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
        + 1_000;
    let a: Vec<EventId> = (0..5).map(|i| EventId::new(base + i, 0)).collect();
    let b = EventId::new(base + 10, 3);
    {
        let mut h = DurableHistory::open(dir.path(), 3).expect("opens");
        assert_eq!(h.last_id(), None, "a new store has issued nothing");
        for (i, id) in a.iter().enumerate() {
            h.append("a", retained(*id, &format!("a{i}")))
                .expect("stored");
        }
        h.append("b", retained(b, "b0")).expect("stored");
    }

    let h = DurableHistory::open(dir.path(), 3).expect("reopens");
    assert_eq!(h.last_id(), Some(b), "the newest id ever stored");
    // Trimmed to 3 per topic: a0 and a1 are gone.
    let r = h.since("a", a[1]);
    assert_eq!(ids(&r.events), a[2..].to_vec());
    assert!(!r.gap, "resuming from a1, nothing after it is missing");
    assert_eq!(r.oldest, Some(a[2]));
    assert_eq!(
        String::from_utf8_lossy(r.events[0].frame.as_bytes()),
        format!("id: {}\ndata: a2\n\n", a[2]),
        "the frame as published"
    );
    let r = h.since("a", a[0]);
    assert!(r.gap, "a1 was trimmed after a0");
    assert_eq!(ids(&r.events), a[2..].to_vec());
    let r = h.since("a", a[3]);
    assert!(!r.gap);
    assert_eq!(ids(&r.events), vec![a[4]]);
    let r = h.since("b", EventId::new(base, 0));
    assert!(!r.gap, "retained since the store was created");
    assert_eq!(ids(&r.events), vec![b]);
    assert!(!h.since("never-used", a[0]).gap, "known since creation");
    assert!(
        h.since("b", EventId::new(1, 0)).gap,
        "an id from before the store existed is unknown"
    );
    drop(h);

    // A smaller capacity trims on open, in the database too.
    drop(DurableHistory::open(dir.path(), 1).expect("reopens"));
    let h = DurableHistory::open(dir.path(), 3).expect("reopens");
    let r = h.since("a", a[0]);
    assert_eq!(ids(&r.events), vec![a[4]]);
    assert!(r.gap);
    assert!(h.since("a", a[2]).gap, "a3 is gone now");
    assert!(!h.since("a", a[3]).gap, "a3 is gone, but nothing after it");
    assert_eq!(h.last_id(), Some(b));
}

#[test]
fn trimming_in_batches_serves_exactly_the_last_capacity_events() {
    let dir = TempDir::new("batches");
    let ids: Vec<EventId> = (0..300)
        .map(|i| EventId::new(5_000_000_000_000 + i, 0))
        .collect();
    let check = |h: &DurableHistory, round: &str| {
        let r = h.since("t", ids[0]);
        assert_eq!(self::ids(&r.events), ids[298..].to_vec(), "{round}");
        assert!(r.gap, "{round}");
        assert!(h.since("t", ids[296]).gap, "{round}: 297 is gone");
        let r = h.since("t", ids[297]);
        assert!(!r.gap, "{round}: nothing after 297 is missing");
        assert_eq!(r.events.len(), 2, "{round}");
        assert_eq!(h.last_id(), Some(ids[299]), "{round}");
    };
    {
        let mut h = DurableHistory::open(dir.path(), 2).expect("opens");
        for (i, id) in ids.iter().enumerate() {
            h.append("t", retained(*id, &i.to_string()))
                .expect("stored");
        }
        check(&h, "live");
    }
    for round in ["reopened", "reopened twice"] {
        check(
            &DurableHistory::open(dir.path(), 2).expect("reopens"),
            round,
        );
    }
}

#[test]
fn capacity_zero_keeps_nothing_but_remembers_the_last_id() {
    let dir = TempDir::new("zero");
    let id = EventId::new(4_000_000_000_000, 7);
    {
        let mut h = DurableHistory::open(dir.path(), 0).expect("opens");
        h.append("t", retained(id, "x")).expect("stored");
        assert!(h.since("t", EventId::new(1, 0)).events.is_empty());
    }
    let h = DurableHistory::open(dir.path(), 0).expect("reopens");
    assert_eq!(h.last_id(), Some(id));
    let r = h.since("t", EventId::new(id.millis() - 1, 0));
    assert!(r.events.is_empty());
    assert!(r.gap, "the event after the asked id was not kept");
    assert!(!h.since("t", id).gap);
}

/// Rows of `table` in the store of `dir` (opened after the store closed).
fn rows(dir: &Path, table: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(store::DB_FILE)).expect("opens");
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .expect("counts")
}

#[test]
fn the_retained_budget_bounds_the_store_in_memory_and_on_disk() {
    let dir = TempDir::new("budget");
    let mut config = HubConfig::default();
    config.max_retained_bytes = 256 * 1024;
    let first;
    {
        let hub = store::open_hub(dir.path(), 1000, config.clone()).expect("opens");
        let body = "x".repeat(1000);
        first = hub
            .publish("t0", Event::new().data(&body))
            .expect("stored")
            .id;
        for i in 1..2000 {
            hub.publish(&format!("t{}", i % 100), Event::new().data(&body))
                .expect("stored");
        }
        let usage = hub.usage();
        assert!(
            usage.history_bytes <= config.max_retained_bytes,
            "{usage:?}"
        );
        assert!(usage.events_evicted > 1500, "{usage:?}");
    }
    // On disk: what memory keeps, and a few not yet trimmed, not 2,000.
    let on_disk = rows(dir.path(), "events");
    assert!(on_disk < 400, "{on_disk} rows kept");
    let hub = store::open_hub(dir.path(), 1000, config.clone()).expect("reopens");
    assert!(hub.usage().history_bytes <= config.max_retained_bytes);
    let mut sub = hub
        .subscribe(&["t0"], Some(&first.to_string()))
        .expect("valid");
    let backlog = sub.take_backlog();
    assert!(
        String::from_utf8_lossy(backlog[0].as_bytes()).starts_with("event: reset"),
        "the first events went for the budget: a resume from them is told"
    );
}

#[test]
fn topics_with_nothing_kept_leave_no_row_behind() {
    let dir = TempDir::new("forgotten");
    let last;
    {
        let hub = store::open_hub(dir.path(), 0, HubConfig::default()).expect("opens");
        let mut id = None;
        for i in 0..500 {
            id = Some(
                hub.publish(&format!("once-{i}"), Event::new().data("x"))
                    .expect("stored")
                    .id,
            );
        }
        last = id.expect("published");
    }
    assert_eq!(rows(dir.path(), "topics"), 0);
    assert_eq!(rows(dir.path(), "events"), 0);
    let hub = store::open_hub(dir.path(), 0, HubConfig::default()).expect("reopens");
    assert_eq!(hub.last_id(), last, "ids go on after the newest");
    let mut sub = hub.subscribe(&["once-3"], Some("1-0")).expect("valid");
    assert_eq!(sub.take_backlog().len(), 1, "a reset notice, nothing else");
}

#[test]
fn ids_keep_increasing_across_reopening_even_behind_the_clock() {
    let dir = TempDir::new("ids");
    // An id an hour ahead of the clock, as if the clock stepped back since.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let ahead = EventId::new(now + 3_600_000, 5);
    {
        let mut h = DurableHistory::open(dir.path(), 10).expect("opens");
        h.append("t", retained(ahead, "from the future"))
            .expect("stored");
    }
    let hub = store::open_hub(dir.path(), 10, HubConfig::default()).expect("opens");
    assert_eq!(hub.last_id(), ahead);
    let next = hub.publish("t", Event::new().data("next")).expect("stored");
    assert_eq!(next.id, EventId::new(ahead.millis(), 6));
    drop(hub);
    let hub = store::open_hub(dir.path(), 10, HubConfig::default()).expect("reopens");
    let again = hub
        .publish("t", Event::new().data("again"))
        .expect("stored");
    assert!(again.id > next.id, "{} after {}", again.id, next.id);
    // Both replay after a restart, no reset.
    let mut sub = hub
        .subscribe(&["t"], Some(&ahead.to_string()))
        .expect("valid");
    let backlog: Vec<String> = sub
        .take_backlog()
        .iter()
        .map(|f| String::from_utf8_lossy(f.as_bytes()).into_owned())
        .collect();
    assert_eq!(
        backlog,
        vec![
            format!("id: {}\ndata: next\n\n", next.id),
            format!("id: {}\ndata: again\n\n", again.id),
        ]
    );
}

#[test]
fn mailboxes_survive_reopening_in_order_minus_what_was_taken() {
    let dir = TempDir::new("mailbox");
    let mut config = HubConfig::default();
    config.mailbox_capacity = 3;
    {
        let hub = store::open_hub(dir.path(), 10, config.clone()).expect("opens");
        for m in ["one", "two", "three"] {
            hub.push("jobs", m).expect("room");
        }
        assert!(matches!(
            hub.push("jobs", "four"),
            Err(HubError::MailboxFull { capacity: 3, .. })
        ));
        hub.push("other", "x").expect("room");
        assert_eq!(hub.try_take("jobs").as_deref(), Some("one"));
    }
    let hub = store::open_hub(dir.path(), 10, config.clone()).expect("reopens");
    assert_eq!(hub.mailbox_len("jobs"), 2);
    hub.push("jobs", "four").expect("room again");
    assert!(
        hub.push("jobs", "five").is_err(),
        "the capacity counts restored messages"
    );
    assert_eq!(hub.try_take("jobs").as_deref(), Some("two"));
    assert_eq!(hub.try_take("other").as_deref(), Some("x"));
    drop(hub);
    let hub = store::open_hub(dir.path(), 10, config).expect("reopens");
    assert_eq!(hub.try_take("jobs").as_deref(), Some("three"));
    assert_eq!(hub.try_take("jobs").as_deref(), Some("four"));
    assert_eq!(hub.try_take("jobs"), None);
    assert_eq!(hub.try_take("other"), None, "taken exactly once");
}

#[test]
fn a_mailbox_ttl_counts_from_the_push_across_restarts() {
    let dir = TempDir::new("ttl");
    {
        let hub = store::open_hub(dir.path(), 10, HubConfig::default()).expect("opens");
        hub.push("k", "stale").expect("room");
    }
    thread::sleep(Duration::from_millis(120));
    let mut short = HubConfig::default();
    short.mailbox_ttl = Duration::from_millis(100);
    let hub = store::open_hub(dir.path(), 10, short).expect("reopens");
    assert_eq!(hub.mailbox_len("k"), 0, "expired while ssed was down");
    drop(hub);
    let hub = store::open_hub(dir.path(), 10, HubConfig::default()).expect("reopens");
    assert_eq!(hub.mailbox_len("k"), 0, "and removed from the store");
}

#[test]
fn a_store_opens_once_at_a_time() {
    let dir = TempDir::new("once");
    let first = DurableHistory::open(dir.path(), 10).expect("opens");
    match DurableHistory::open(dir.path(), 10) {
        Err(e @ StoreError::InUse { .. }) => {
            assert_eq!(e.path(), dir.path().join(store::DB_FILE));
            assert!(e.to_string().contains("in use"), "{e}");
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    drop(first);
    DurableHistory::open(dir.path(), 10).expect("free again");
}

#[test]
fn a_new_data_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("private");
    let data = dir.path().join("a").join("data");
    drop(DurableHistory::open(&data, 10).expect("opens"));
    let mode = std::fs::metadata(&data).expect("made").permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
}

#[test]
fn a_directory_that_cannot_be_made_is_named() {
    let dir = TempDir::new("notadir");
    let file = dir.path().join("file");
    std::fs::write(&file, "x").expect("write");
    let inside = file.join("data");
    match DurableHistory::open(&inside, 10) {
        Err(e @ StoreError::Dir { .. }) => assert_eq!(e.path(), inside),
        other => panic!("expected Dir, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// The daemon: kill -9 and restart on the same data_dir
// ---------------------------------------------------------------------------

#[test]
fn published_events_survive_kill_9_and_replay_without_reset() {
    let dir = TempDir::new("kill9");
    let data = dir.path().join("data"); // created by ssed
    let config = daemon_config(&data);
    let mut ssed = spawn(&dir, &config);
    let addr = ssed.listening();
    let published: Vec<EventId> = (0..6)
        .map(|i| publish(addr, "news", &format!("event {i}\nline two é")))
        .collect();
    ssed.kill_9();

    let ssed = spawn(&dir, &config);
    let addr = ssed.listening();
    let mut sub = Client::new(addr);
    let head = sub.get_stream(
        "/events/news",
        &[&format!("Last-Event-ID: {}", published[0])],
    );
    assert_eq!(head.status, 200);
    let replay = next_events(&mut sub, published.len() - 1);
    for ((id, event, data), (i, want)) in replay.iter().zip(published.iter().enumerate().skip(1)) {
        assert_eq!(event, &None, "no reset: {replay:?}");
        assert_eq!(id.as_deref(), Some(want.to_string().as_str()));
        assert_eq!(data, &format!("event {i}\nline two é"));
    }
    // New ids continue after every old one, and reach the resumed stream.
    let newest = publish(addr, "news", "after restart");
    assert!(
        published.iter().all(|old| newest > *old),
        "{newest} after {published:?}"
    );
    let live = next_events(&mut sub, 1);
    assert_eq!(live[0].0.as_deref(), Some(newest.to_string().as_str()));
    assert_eq!(live[0].2, "after restart");
}

#[test]
fn mailbox_messages_survive_kill_9_and_are_consumed_exactly_once() {
    let dir = TempDir::new("mailbox-kill9");
    let data = dir.path().join("data");
    let config = daemon_config(&data);
    let mut ssed = spawn(&dir, &config);
    let addr = ssed.listening();
    for m in ["first", "second", "third"] {
        let (status, text) = post(addr, "/keys/jobs", m);
        assert_eq!(status, 200, "{text}");
    }
    ssed.kill_9();

    let mut ssed = spawn(&dir, &config);
    let addr = ssed.listening();
    let (status, _) = post(addr, "/keys/jobs", "[DONE]");
    assert_eq!(status, 200);
    let mut consumer = Client::new(addr);
    assert_eq!(consumer.get_stream("/keys/jobs", &[]).status, 200);
    let got: Vec<String> = next_events(&mut consumer, 4)
        .into_iter()
        .map(|(_, _, data)| data)
        .collect();
    assert_eq!(got, ["first", "second", "third", "[DONE]"]);
    assert!(
        consumer.until_end(4).is_empty(),
        "the stream ends after [DONE]"
    );

    // Taken means gone, on disk too: after another kill -9 nothing is left.
    ssed.kill_9();
    let ssed = spawn(&dir, &config);
    let addr = ssed.listening();
    let (status, _) = post(addr, "/keys/jobs", "[DONE]");
    assert_eq!(status, 200);
    let mut consumer = Client::new(addr);
    assert_eq!(consumer.get_stream("/keys/jobs", &[]).status, 200);
    let got: Vec<String> = next_events(&mut consumer, 1)
        .into_iter()
        .map(|(_, _, data)| data)
        .collect();
    assert_eq!(got, ["[DONE]"], "nothing delivered twice");
    drop(ssed);
}

#[test]
fn a_second_daemon_on_the_same_data_dir_stops_with_a_message() {
    let dir = TempDir::new("twice");
    let data = dir.path().join("data");
    let config = daemon_config(&data);
    let first = spawn(&dir, &config);
    let addr = first.listening();
    let mut second = spawn(&dir, &config);
    let status = second.wait_exit(DEADLINE).expect("the second exits");
    assert_eq!(status.code(), Some(1));
    let stderr = second.stderr();
    let db = data.join(store::DB_FILE);
    assert!(
        stderr.contains(db.to_str().expect("utf-8")) && stderr.contains("in use"),
        "{stderr}"
    );
    // The first one is unharmed.
    publish(addr, "t", "still here");
}

#[test]
fn an_unusable_data_dir_stops_the_daemon_naming_it() {
    let dir = TempDir::new("baddir");
    let file = dir.path().join("file");
    std::fs::write(&file, "x").expect("write");
    let data = file.join("data");
    let mut ssed = spawn(&dir, &daemon_config(&data));
    let status = ssed.wait_exit(DEADLINE).expect("exits");
    assert_eq!(status.code(), Some(1));
    let stderr = ssed.stderr();
    assert!(stderr.contains(data.to_str().expect("utf-8")), "{stderr}");
}

/// The data of a subscription's replay after `after`, reset notices left
/// out.
fn replayed_data(sub: &mut ssed::Subscription) -> Vec<String> {
    sub.take_backlog()
        .iter()
        .map(|f| String::from_utf8_lossy(f.as_bytes()).into_owned())
        .filter(|f| !f.starts_with("event: reset"))
        .filter_map(|f| Some(f.split_once("data: ")?.1.trim().to_owned()))
        .collect()
}

#[test]
fn a_private_update_stays_private_across_a_restart() {
    let dir = TempDir::new("private");
    let first = {
        let hub = store::open_hub(dir.path(), 10, HubConfig::default()).expect("opens");
        let first = hub
            .publish("t", Event::new().data("public"))
            .expect("stored");
        hub.publish_private("t", Event::new().data("secret"))
            .expect("stored");
        hub.publish("t", Event::new().data("later"))
            .expect("stored");
        first
    };
    let hub = store::open_hub(dir.path(), 10, HubConfig::default()).expect("reopens");
    let before = EventId::new(first.id.millis() - 1, 0).to_string();
    let mut trusted = hub.subscribe(&["t"], Some(&before)).expect("valid");
    let mut public = hub.subscribe_public(&["t"], Some(&before)).expect("valid");
    assert_eq!(replayed_data(&mut trusted), ["public", "secret", "later"]);
    assert_eq!(replayed_data(&mut public), ["public", "later"]);
}

#[test]
fn a_store_of_layout_1_opens_with_its_events_public() {
    let dir = TempDir::new("layout1");
    {
        // The layout ssed wrote before private updates.
        let conn = rusqlite::Connection::open(dir.path().join(store::DB_FILE)).expect("creates");
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE events (
                 topic TEXT NOT NULL, ms INTEGER NOT NULL, seq INTEGER NOT NULL, frame BLOB NOT NULL,
                 PRIMARY KEY (topic, ms, seq)
             ) WITHOUT ROWID;
             CREATE TABLE topics (topic TEXT PRIMARY KEY, ms INTEGER NOT NULL, seq INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE mailbox (
                 seq INTEGER PRIMARY KEY, key TEXT NOT NULL, pushed_ms INTEGER NOT NULL, message TEXT NOT NULL
             );
             CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO meta (key, value) VALUES ('floor_ms', 1600000000000);
             INSERT INTO events VALUES ('t', 1700000000000, 1, CAST('id: 1700000000000-1
data: old

' AS BLOB));
             PRAGMA user_version = 1;",
        )
        .expect("layout 1");
    }
    let hub = store::open_hub(dir.path(), 10, HubConfig::default()).expect("migrates");
    hub.publish_private("t", Event::new().data("secret"))
        .expect("stored");
    let mut public = hub.subscribe_public(&["t"], Some("1")).expect("valid");
    assert_eq!(replayed_data(&mut public), ["old"]);
    drop((public, hub));
    let conn = rusqlite::Connection::open(dir.path().join(store::DB_FILE)).expect("opens");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("reads");
    assert_eq!(version, 2);
    let private: i64 = conn
        .query_row("SELECT sum(private) FROM events", [], |r| r.get(0))
        .expect("sums");
    assert_eq!(private, 1, "the new event marked, the old one not");
}
