#![cfg(feature = "postgres")]
//! PostgreSQL LISTEN/NOTIFY into topics, against the machine's real
//! PostgreSQL at 127.0.0.1:5432 (trust auth, database `test`, user
//! `postgres`): rows inserted into a table whose trigger calls `pg_notify`
//! reach SSE subscribers in order with exact payloads, and the listener
//! survives `pg_terminate_backend` and a database that is down at start.
//!
//! Without a reachable PostgreSQL the tests that need it print why and
//! pass, unless `CI=true`, where they fail (CI must never skip them
//! silently). Every test uses its own channels and `application_name`, so
//! they run in parallel, and every wait is bounded.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client as PgClient, NoTls};
use ssed::postgres::Listener;
use ssed::{Hub, RunningServer, ShutdownHandle};
use support::{Client, field, wait_until};

/// The database the tests use.
const DATABASE: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The longest any test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(5);

/// The table the tests insert into: its trigger notifies the row's
/// `channel` with its `body`, so each test picks its own channel.
const SETUP: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(727375);
CREATE TABLE IF NOT EXISTS ssed_test_rows (
    id      bigserial PRIMARY KEY,
    channel text NOT NULL,
    body    text NOT NULL
);
CREATE OR REPLACE FUNCTION ssed_test_rows_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify(NEW.channel, NEW.body);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS ssed_test_rows_notify ON ssed_test_rows;
CREATE TRIGGER ssed_test_rows_notify AFTER INSERT ON ssed_test_rows
    FOR EACH ROW EXECUTE FUNCTION ssed_test_rows_notify();
COMMIT;
";

// ---------------------------------------------------------------------------
// The database
// ---------------------------------------------------------------------------

/// A connection to the test database with the table set up, or `None`
/// (after printing why) when PostgreSQL is unreachable outside CI.
fn database(test: &str) -> Option<PgClient> {
    static SET_UP: OnceLock<Result<(), String>> = OnceLock::new();
    let url = format!("{DATABASE}?connect_timeout=5&application_name=ssed-test-setup");
    let connected = PgClient::connect(&url, NoTls).map_err(|e| ssed::Report(&e).to_string());
    let set_up = SET_UP.get_or_init(|| match &connected {
        Ok(_) => PgClient::connect(&url, NoTls)
            .and_then(|mut c| c.batch_execute(SETUP))
            .map_err(|e| format!("setting up ssed_test_rows: {}", ssed::Report(&e))),
        Err(e) => Err(e.clone()),
    });
    let problem = match (&connected, set_up) {
        (Ok(_), Ok(())) => return connected.ok(),
        (Err(e), _) | (Ok(_), Err(e)) => e,
    };
    let reason = format!("PostgreSQL at {DATABASE} is not usable: {problem}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {reason} (CI=true: the PostgreSQL tests must run)");
    }
    eprintln!("skipping {test}: {reason}");
    None
}

/// A name no other test (or earlier run) uses.
fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "ssed_t_{what}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Inserts one row per body, each in its own transaction.
fn insert(db: &mut PgClient, channel: &str, bodies: &[&str]) {
    for body in bodies {
        db.execute(
            "INSERT INTO ssed_test_rows (channel, body) VALUES ($1, $2)",
            &[&channel, body],
        )
        .expect("insert a row");
    }
}

/// Removes a test's rows (the table is shared and kept).
fn clean(db: &mut PgClient, channel: &str) {
    db.execute("DELETE FROM ssed_test_rows WHERE channel = $1", &[&channel])
        .expect("delete the test's rows");
}

/// Terminates the backends of `application_name`; how many.
fn terminate(db: &mut PgClient, application_name: &str) -> i64 {
    let row = db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&application_name],
        )
        .expect("pg_terminate_backend");
    row.get(0)
}

// ---------------------------------------------------------------------------
// Servers and clients
// ---------------------------------------------------------------------------

/// A library server on 127.0.0.1:0 whose `/events/{topic}` follows `hub`.
fn serve(hub: &Hub) -> RunningServer {
    let hub = hub.clone();
    support::start(
        ssed::Server::builder().route("/events/{topic}", move |req, stream| {
            let topic = req.param("topic").unwrap_or_default();
            let sub = match hub.subscribe(&[topic], req.last_event_id()) {
                Ok(sub) => sub,
                Err(e) => return stream.respond(ssed::Response::text(400, e.to_string())),
            };
            stream.open()?;
            stream.follow(sub)
        }),
    )
}

/// Opens an SSE stream on `path` and waits until `hub` counts it on
/// `topic` (a stream subscribes before its head, but check anyway).
fn subscribe(addr: SocketAddr, path: &str, hub: &Hub, topic: &str, extra: &[&str]) -> Client {
    let before = hub.subscribers(topic);
    let mut c = Client::new(addr);
    let head = c.get_stream(path, extra);
    assert_eq!(head.status, 200, "{path}");
    assert!(
        wait_until(DEADLINE, || hub.subscribers(topic) > before),
        "{path} never subscribed"
    );
    c
}

/// The next event frame (skipping comments): its id and its data lines
/// joined with `\n`, as `EventSource` joins them.
fn next_event(c: &mut Client) -> (String, String) {
    for _ in 0..100 {
        let frame = c.next_frame().expect("the stream ended");
        let data = field(&frame, "data");
        if data.is_empty() {
            continue;
        }
        let id = field(&frame, "id").first().map(|s| s.to_string());
        return (id.expect("an id"), data.join("\n"));
    }
    panic!("no event within 100 frames")
}

/// `<ms>-<seq>` as a pair that orders like the ids.
#[cfg(feature = "daemon")]
fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("id is <ms>-<seq>");
    (
        ms.parse().expect("ms digits"),
        seq.parse().expect("seq digits"),
    )
}

/// Starts a listener and waits until it has issued `LISTEN`.
fn listen(hub: &Hub, url: &str, routes: &[(&str, &str)]) -> Listener {
    let listener = Listener::start(
        hub.clone(),
        url,
        routes
            .iter()
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .collect(),
        ShutdownHandle::new(),
    );
    assert!(
        wait_until(DEADLINE, || listener.state().connected),
        "listener never connected: {:?}",
        listener.state()
    );
    listener
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

#[cfg(feature = "daemon")]
mod daemon {
    use super::*;
    use serde_json::Value;

    /// A daemon on 127.0.0.1:0 with `toml` over the defaults, and its hub.
    pub fn start(toml: &str) -> (RunningServer, Hub) {
        let d = support::daemon(&format!("listen = \"127.0.0.1:0\"\n{toml}"));
        (d.server, d.hub)
    }

    pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let (head, body) = support::request(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
        );
        (head.status, body)
    }

    pub fn healthz(addr: SocketAddr) -> Value {
        let (status, body) = get(addr, "/healthz");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("healthz is JSON")
    }

    /// The value of one series of `/metrics`.
    pub fn metric(addr: SocketAddr, series: &str) -> Option<u64> {
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }
}

#[cfg(feature = "daemon")]
#[test]
fn inserted_rows_reach_a_daemon_subscriber_in_order_and_replay() {
    let Some(mut db) = database("inserted_rows_reach_a_daemon_subscriber_in_order_and_replay")
    else {
        return;
    };
    let channel = unique("order");
    let (server, hub) = daemon::start(&format!(
        "[[postgres]]\nurl = \"{DATABASE}?application_name={channel}\"\nchannels = [\"{channel}\"]\n"
    ));
    let addr = server.local_addr();
    assert!(
        wait_until(
            DEADLINE,
            || daemon::healthz(addr)["postgres"][0]["connected"] == true
        ),
        "the daemon's listener never connected: {}",
        daemon::healthz(addr)
    );
    let mut c = subscribe(addr, &format!("/events/{channel}"), &hub, &channel, &[]);

    // Ten rows one by one, then ten in one transaction (delivered at
    // commit, in insertion order).
    let bodies: Vec<String> = (1..=20).map(|i| format!("row {i}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    insert(&mut db, &channel, &refs[..10]);
    let mut tx = db.transaction().expect("begin");
    for body in &refs[10..] {
        tx.execute(
            "INSERT INTO ssed_test_rows (channel, body) VALUES ($1, $2)",
            &[&channel, body],
        )
        .expect("insert");
    }
    tx.commit().expect("commit");

    let events: Vec<(String, String)> = (0..20).map(|_| next_event(&mut c)).collect();
    let data: Vec<&str> = events.iter().map(|(_, d)| d.as_str()).collect();
    assert_eq!(data, refs, "rows arrive in order, once each");
    let ids: Vec<(u64, u64)> = events.iter().map(|(id, _)| parse_id(id)).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    // Counted just after the publish the subscriber may already have seen.
    assert!(wait_until(DEADLINE, || daemon::healthz(addr)["postgres"]
        [0]["notifications"]
        == 20));
    let health = daemon::healthz(addr);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["postgres"][0]["reconnects"], 0, "{health}");
    assert_eq!(
        daemon::metric(addr, "ssed_postgres_connected{db=\"0\"}"),
        Some(1)
    );
    assert_eq!(
        daemon::metric(addr, "ssed_postgres_notifications_total{db=\"0\"}"),
        Some(20)
    );
    assert_eq!(
        daemon::metric(addr, "ssed_postgres_reconnects_total{db=\"0\"}"),
        Some(0)
    );

    // The events have hub ids: a client that saw row 12 gets 13..20 back.
    let last_seen = format!("Last-Event-ID: {}", events[11].0);
    let mut again = subscribe(
        addr,
        &format!("/events/{channel}"),
        &hub,
        &channel,
        &[&last_seen],
    );
    let replayed: Vec<String> = (0..8).map(|_| next_event(&mut again).1).collect();
    assert_eq!(replayed, refs[12..], "replay after Last-Event-ID");

    drop(c);
    drop(again);
    server.stop().expect("daemon stops");
    clean(&mut db, &channel);
}

#[test]
fn multiline_unicode_payloads_survive_exactly() {
    let Some(mut db) = database("multiline_unicode_payloads_survive_exactly") else {
        return;
    };
    // A channel that is no topic name (space, quotes, capitals) mapped to a
    // topic: the listener must quote it exactly.
    let topic = unique("exact");
    let channel = format!("Chan \"{}\"", &topic[7..]);
    let hub = Hub::new(100);
    let server = serve(&hub);
    let listener = listen(
        &hub,
        &format!("{DATABASE}?application_name={topic}"),
        &[(&channel, &topic)],
    );
    let mut c = subscribe(
        server.local_addr(),
        &format!("/events/{topic}"),
        &hub,
        &topic,
        &[],
    );

    let payloads = [
        "first line\nsecond line\n\nfourth, after an empty one",
        "Grüße, 日本語, emoji 🚀, RTL עברית, combining e\u{301}",
        "  leading and trailing spaces  ",
        ": not a comment\ndata: not a field\nid: 99",
        "{\"json\": \"with \\\"quotes\\\"\"}",
    ];
    insert(&mut db, &channel, &payloads);
    for want in payloads {
        let (_, got) = next_event(&mut c);
        assert_eq!(got, want);
    }
    // Counted just after the publish the subscriber may already have seen.
    assert!(wait_until(DEADLINE, || listener.state().notifications
        == payloads.len() as u64));

    drop(c);
    listener.stop();
    server.stop().expect("server stops");
    clean(&mut db, &channel);
}

#[test]
fn the_listener_survives_pg_terminate_backend() {
    let Some(mut db) = database("the_listener_survives_pg_terminate_backend") else {
        return;
    };
    let channel = unique("terminate");
    let hub = Hub::new(100);
    let server = serve(&hub);
    let listener = listen(
        &hub,
        &format!("{DATABASE}?application_name={channel}"),
        &[(&channel, &channel)],
    );
    let mut c = subscribe(
        server.local_addr(),
        &format!("/events/{channel}"),
        &hub,
        &channel,
        &[],
    );
    insert(&mut db, &channel, &["before"]);
    assert_eq!(next_event(&mut c).1, "before");

    for round in 1..=2u64 {
        assert_eq!(terminate(&mut db, &channel), 1, "one listener connection");
        assert!(
            wait_until(DEADLINE, || {
                let s = listener.state();
                s.connected && s.reconnects == round
            }),
            "no reconnect {round}: {:?}",
            listener.state()
        );
        let error = listener.state().last_error.unwrap_or_default();
        assert!(error.contains("terminating connection"), "{error}");
        // The stream stayed open throughout; later rows arrive.
        let body = format!("after {round}");
        insert(&mut db, &channel, &[&body]);
        assert_eq!(next_event(&mut c).1, body);
    }
    assert!(wait_until(DEADLINE, || listener.state().notifications == 3));

    drop(c);
    listener.stop();
    server.stop().expect("server stops");
    clean(&mut db, &channel);
}

/// Accepts one connection on `listener` and forwards it to PostgreSQL (a
/// stand-in for a database that comes up late); the threads end when
/// either side closes.
fn proxy(listener: TcpListener) {
    thread::spawn(move || {
        let Ok((client, _)) = listener.accept() else {
            return;
        };
        drop(listener); // one connection is all the test needs
        let Ok(upstream) = TcpStream::connect("127.0.0.1:5432") else {
            return;
        };
        let pipe = |mut from: TcpStream, mut to: TcpStream| {
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Both); // the other side may be gone
            })
        };
        if let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) {
            let a = pipe(client, u2);
            let b = pipe(upstream, c2);
            let _ = (a.join(), b.join()); // a panic in a pipe is the test's failure to see elsewhere
        }
    });
}

#[test]
fn a_database_that_comes_up_late_is_picked_up() {
    let Some(mut db) = database("a_database_that_comes_up_late_is_picked_up") else {
        return;
    };
    // A free port with nothing on it: connections are refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let channel = unique("late");
    let hub = Hub::new(100);
    let listener = Listener::start(
        hub.clone(),
        &format!("postgres://postgres@127.0.0.1:{port}/test?application_name={channel}"),
        vec![(channel.clone(), channel.clone())],
        ShutdownHandle::new(),
    );
    let sub = hub.subscribe(&[&channel], None).expect("subscribe");
    assert!(
        wait_until(DEADLINE, || listener.state().last_error.is_some()),
        "no error while the database is down"
    );
    assert!(!listener.state().connected);
    thread::sleep(Duration::from_millis(300)); // a few refused attempts

    // The database "comes up" on that port.
    let Ok(up) = TcpListener::bind(("127.0.0.1", port)) else {
        eprintln!("skipping the rest: port {port} was taken meanwhile");
        return;
    };
    proxy(up);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || listener.state().connected),
        "never connected once the database came up: {:?}",
        listener.state()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "backoff after ~1 s of failures stays short: {:?}",
        started.elapsed()
    );
    assert_eq!(listener.state().reconnects, 0, "a first connection");
    insert(&mut db, &channel, &["late but here"]);
    let frame = sub.next_timeout(DEADLINE).expect("the row arrives");
    let text = String::from_utf8_lossy(frame.as_bytes()).into_owned();
    assert_eq!(field(&text, "data"), ["late but here"]);

    listener.stop();
    clean(&mut db, &channel);
}

#[test]
fn a_database_down_at_start_leaves_an_idle_listener_that_says_why() {
    // Port 1: nothing listens, the connection is refused at once. Needs no
    // database, so it runs everywhere.
    let hub = Hub::new(10);
    let shutdown = ShutdownHandle::new();
    let listener = Listener::start(
        hub,
        "postgres://postgres:s3cret@127.0.0.1:1/test",
        vec![("down".into(), "down".into())],
        shutdown.clone(),
    );
    assert!(
        wait_until(DEADLINE, || listener.state().last_error.is_some()),
        "no error reported"
    );
    let state = listener.state();
    assert!(!state.connected);
    assert_eq!(state.reconnects, 0);
    let error = state.last_error.unwrap_or_default();
    assert!(error.contains("cannot connect"), "{error}");
    assert!(!error.contains("s3cret"), "{error}");
    assert_eq!(listener.target(), "postgres://postgres@127.0.0.1:1/test");

    // Shutdown ends the retry loop promptly, even mid-backoff.
    shutdown.shutdown();
    let started = Instant::now();
    listener.stop();
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[cfg(feature = "daemon")]
#[test]
fn a_daemon_whose_database_is_down_keeps_serving() {
    // Needs no database: the point is that it is not there.
    let (server, hub) = daemon::start(
        "[[postgres]]\nurl = \"postgres://postgres@127.0.0.1:1/test\"\nchannels = [\"a\", \"b\"]\n\
         [[postgres]]\nurl = \"postgres://postgres@127.0.0.1:1/other\"\nchannels = [\"c\"]\ntopic = \"t\"\n",
    );
    let addr = server.local_addr();
    let health = daemon::healthz(addr);
    assert_eq!(health["status"], "ok", "{health}");
    let dbs = health["postgres"].as_array().expect("a postgres array");
    assert_eq!(dbs.len(), 2, "{health}");
    for db in dbs {
        assert_eq!(db["connected"], false, "{health}");
        assert_eq!(db["notifications"], 0, "{health}");
        assert!(db.get("last_error").is_none(), "errors stay in the log");
    }
    assert_eq!(
        daemon::metric(addr, "ssed_postgres_connected{db=\"1\"}"),
        Some(0)
    );

    // Publishing and subscribing work as ever.
    let mut c = subscribe(addr, "/events/a", &hub, "a", &[]);
    let (head, _) = support::request(
        addr,
        "POST /publish/a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    );
    assert_eq!(head.status, 200);
    assert_eq!(next_event(&mut c).1, "hi");

    drop(c);
    let started = Instant::now();
    server.stop().expect("daemon stops");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the listeners do not hold the shutdown up"
    );
}

#[cfg(feature = "daemon")]
#[test]
fn a_daemon_without_postgres_shows_none() {
    let (server, _hub) = daemon::start("");
    let addr = server.local_addr();
    assert!(daemon::healthz(addr).get("postgres").is_none());
    assert_eq!(
        daemon::metric(addr, "ssed_postgres_connected{db=\"0\"}"),
        None
    );
}

#[test]
fn listener_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Listener>();
    assert_send_sync::<ssed::postgres::ListenerState>();
}
