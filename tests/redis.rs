#![cfg(feature = "daemon")]
//! Several ssed nodes sharing one Redis (`[redis] url`): real `ssed`
//! processes on their own ports, a real Redis.
//!
//! Most tests use the machine's Redis on 127.0.0.1:6379 (every topic and key
//! name is unique to its test, so runs and tests never see each other's
//! data); the outage test starts a private `redis-server` on a free port so
//! it can stop and restart it by PID. Where Redis is unreachable (or
//! `redis-server` missing, for that one test) the tests pass after printing
//! why, unless `CI=true`, where they fail: CI must never skip them.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::process::Ssed;
use support::redis::{REDIS, command, pings, redis, skip};
use support::{Client, field, request, wait_until};

/// The longest any test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Redis, nodes and names
// ---------------------------------------------------------------------------

thread_local! {
    /// The names this thread's test made, whose keys it deletes at the end.
    static NAMES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A name no other test (or earlier run) uses.
fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!(
        "t_{what}_{}_{nanos}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    NAMES.with(|n| n.borrow_mut().push(name.clone()));
    name
}

/// Deletes from the machine's Redis, when the test ends (passed or not),
/// what its topics and mailboxes left there: each name's stream, list and
/// entry count. `ssed:last` and the control stream are shared by every
/// node and stay.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let names = NAMES.with(|n| std::mem::take(&mut *n.borrow_mut()));
        if names.is_empty() || !pings(REDIS) {
            return;
        }
        for name in names {
            let (stream, list) = (format!("ssed:t:{name}"), format!("ssed:k:{name}"));
            command(REDIS, &["DEL", &stream, &list]);
            command(REDIS, &["HDEL", "ssed:seq", &stream]);
        }
    }
}

/// A config file of its own, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let path = std::env::temp_dir().join(format!("ssed-{}.toml", unique("redis-config")));
        std::fs::write(&path, text).expect("write config");
        ConfigFile(path)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A node: `ssed` with `[redis] url` and `extra` top-level keys.
struct Node {
    proc: Ssed,
    addr: SocketAddr,
    _config: ConfigFile,
}

impl Node {
    fn start(redis: &str, extra: &str) -> Node {
        let config = ConfigFile::new(&format!(
            "heartbeat = \"1s\"\nmax_execution_time = \"0\"\n{extra}\n[redis]\nurl = \"redis://{redis}\"\n"
        ));
        let path = config.0.to_str().expect("utf-8 path").to_owned();
        let proc = Ssed::spawn(&["--config", &path, "--listen", "127.0.0.1:0"], &[]);
        let addr = proc.listening();
        let node = Node {
            proc,
            addr,
            _config: config,
        };
        assert!(
            wait_until(DEADLINE, || node.redis_connected()),
            "the node's reader never connected; stderr: {}",
            node.proc.stderr()
        );
        node
    }

    fn healthz(&self) -> serde_json::Value {
        let (head, body) = request(
            self.addr,
            "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(head.status, 200);
        serde_json::from_str(&body).expect("healthz is JSON")
    }

    fn redis_connected(&self) -> bool {
        self.healthz()["redis"]["connected"] == serde_json::json!(true)
    }

    /// POSTs `body` to `path`: the status and the body.
    fn post(&self, path: &str, body: &str) -> (u16, String) {
        let (head, text) = request(
            self.addr,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        (head.status, text)
    }

    /// Publishes and returns the event id.
    fn publish(&self, topic: &str, body: &str) -> String {
        let (status, text) = self.post(&format!("/publish/{topic}"), body);
        assert_eq!(
            status,
            200,
            "publish: {text}; stderr: {}",
            self.proc.stderr()
        );
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        v["id"].as_str().expect("an id").to_owned()
    }

    /// Opens an event stream at `path`, resuming after `last` if given.
    fn subscribe(&self, path: &str, last: Option<&str>) -> Client {
        let mut c = Client::new(self.addr);
        let header = last.map(|id| format!("Last-Event-ID: {id}"));
        let head = c.get_stream(path, &header.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(head.status, 200);
        c
    }
}

/// The next frame that carries data (skipping `retry:` and heartbeats).
fn next_event(c: &mut Client) -> String {
    c.frame_matching(100, |f| !field(f, "data").is_empty())
}

/// `(id, data)` of the next `n` events.
fn events(c: &mut Client, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|_| {
            let f = next_event(c);
            (field(&f, "id").concat(), field(&f, "data").join("\n"))
        })
        .collect()
}

fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("ms-seq");
    (ms.parse().expect("ms"), seq.parse().expect("seq"))
}

// ---------------------------------------------------------------------------
// Fan-out and replay across nodes
// ---------------------------------------------------------------------------

#[test]
fn an_event_published_on_one_node_reaches_subscribers_on_the_other() {
    let _cleanup = Cleanup;
    let Some(redis) = redis("an_event_published_on_one_node_reaches_subscribers_on_the_other")
    else {
        return;
    };
    let (a, b) = (Node::start(redis, ""), Node::start(redis, ""));
    let topic = unique("fan");
    // Resuming after a first event makes the test independent of when the
    // subscription lands: replay covers anything before, live the rest.
    let first = a.publish(&topic, "first");
    let mut on_b = b.subscribe(&format!("/events/{topic}"), Some(&first));
    let mut on_a = a.subscribe(&format!("/events/{topic}"), Some(&first));
    let mut sent = Vec::new();
    for i in 0..20 {
        let node = if i % 2 == 0 { &a } else { &b };
        let body = format!("line {i}\nsecond line ünïcode");
        sent.push((node.publish(&topic, &body), body));
    }
    let ids: Vec<(u64, u64)> = sent.iter().map(|(id, _)| id_key(id)).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert!(id_key(&first) < ids[0]);
    assert_eq!(events(&mut on_b, 20), sent, "node B");
    assert_eq!(events(&mut on_a, 20), sent, "node A");
}

#[test]
fn a_client_moves_to_another_node_and_resumes_exactly_once() {
    let _cleanup = Cleanup;
    let Some(redis) = redis("a_client_moves_to_another_node_and_resumes_exactly_once") else {
        return;
    };
    let (mut a, b) = (Node::start(redis, ""), Node::start(redis, ""));
    let topic = unique("move");
    let first = b.publish(&topic, "before");
    let mut client = a.subscribe(&format!("/events/{topic}"), Some(&first));
    let seen: Vec<String> = (0..5)
        .map(|i| b.publish(&topic, &format!("e{i}")))
        .collect();
    let got = events(&mut client, 5);
    assert_eq!(
        got.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        seen
    );
    let last = got.last().map(|(id, _)| id.clone()).expect("five events");
    // Node A dies with the client on it; events go on meanwhile.
    a.proc.kill_9();
    let mut missed = Vec::new();
    for i in 5..12 {
        let body = format!("e{i}");
        missed.push((b.publish(&topic, &body), body));
    }
    let mut client = b.subscribe(&format!("/events/{topic}"), Some(&last));
    // Exactly what was missed, no reset, nothing twice, then live again.
    let replayed: Vec<String> = (0..7).map(|_| next_event(&mut client)).collect();
    assert!(
        replayed.iter().all(|f| field(f, "event").is_empty()),
        "no reset: {replayed:?}"
    );
    let replayed: Vec<(String, String)> = replayed
        .iter()
        .map(|f| (field(f, "id").concat(), field(f, "data").concat()))
        .collect();
    assert_eq!(replayed, missed);
    let live = b.publish(&topic, "live");
    assert_eq!(events(&mut client, 1), vec![(live, "live".to_owned())]);
}

#[test]
fn resuming_while_publishers_run_has_no_gap_and_no_duplicate() {
    let _cleanup = Cleanup;
    let Some(redis) = redis("resuming_while_publishers_run_has_no_gap_and_no_duplicate") else {
        return;
    };
    let (a, b) = (Node::start(redis, ""), Node::start(redis, ""));
    let topic = unique("race");
    let first = a.publish(&topic, "start");
    const N: usize = 300;
    let publisher = {
        let (addr, topic) = (a.addr, topic.clone());
        thread::spawn(move || {
            let mut ids = Vec::with_capacity(N);
            for i in 0..N {
                let (head, text) = request(
                    addr,
                    &format!(
                        "POST /publish/{topic} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{i}",
                        i.to_string().len()
                    ),
                );
                assert_eq!(head.status, 200, "{text}");
                let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
                ids.push(v["id"].as_str().expect("id").to_owned());
            }
            ids
        })
    };
    // Subscribers join on B at different moments of the run, each resuming
    // from the first event: replay and live events must join seamlessly.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(b.subscribe(&format!("/events/{topic}"), Some(&first)));
        thread::sleep(Duration::from_millis(40));
    }
    let ids = publisher.join().expect("publisher");
    for (n, c) in clients.iter_mut().enumerate() {
        let got = events(c, N);
        let got_ids: Vec<String> = got.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(got_ids, ids, "subscriber {n}: every event once, in order");
        let data: Vec<String> = got.into_iter().map(|(_, d)| d).collect();
        let want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
        assert_eq!(data, want, "subscriber {n}");
    }
}

#[test]
fn several_topics_interleave_in_id_order() {
    let _cleanup = Cleanup;
    let Some(redis) = redis("several_topics_interleave_in_id_order") else {
        return;
    };
    let (a, b) = (Node::start(redis, ""), Node::start(redis, ""));
    let (t1, t2) = (unique("x"), unique("y"));
    let first = a.publish(&t1, "start");
    let mut c = b.subscribe(&format!("/events?topic={t1}&topic={t2}"), Some(&first));
    let mut sent = Vec::new();
    for i in 0..10 {
        let (topic, node) = if i % 3 == 0 { (&t2, &b) } else { (&t1, &a) };
        let body = format!("{topic} {i}");
        sent.push((node.publish(topic, &body), body));
    }
    assert_eq!(events(&mut c, 10), sent);
}

#[test]
fn replay_past_what_redis_keeps_starts_with_a_reset() {
    let _cleanup = Cleanup;
    let Some(redis) = redis("replay_past_what_redis_keeps_starts_with_a_reset") else {
        return;
    };
    let a = Node::start(redis, "history = 3");
    let topic = unique("trim");
    let ids: Vec<String> = (0..6).map(|i| a.publish(&topic, &format!("{i}"))).collect();
    let mut c = a.subscribe(&format!("/events/{topic}"), Some(&ids[0]));
    let reset = next_event(&mut c);
    assert_eq!(field(&reset, "event"), ["reset"]);
    let data: serde_json::Value = serde_json::from_str(&field(&reset, "data").concat()).unwrap();
    assert_eq!(data["lastEventId"], serde_json::json!(ids[0]));
    assert_eq!(data["oldest"], serde_json::json!(ids[3]));
    let got: Vec<String> = events(&mut c, 3).into_iter().map(|(id, _)| id).collect();
    assert_eq!(got, ids[3..]);
    // An id Redis never issued: a reset, then all that is kept.
    let mut c = a.subscribe(&format!("/events/{topic}"), Some("not-an-id"));
    assert_eq!(field(&next_event(&mut c), "event"), ["reset"]);
    let got: Vec<String> = events(&mut c, 3).into_iter().map(|(id, _)| id).collect();
    assert_eq!(got, ids[3..]);
    // Within what is kept: no reset.
    let mut c = a.subscribe(&format!("/events/{topic}"), Some(&ids[4]));
    let f = next_event(&mut c);
    assert!(field(&f, "event").is_empty(), "{f}");
    assert_eq!(field(&f, "id"), [ids[5].as_str()]);
}

/// Sends one command to the Redis at `addr` and returns the raw reply.
/// User plus system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_entry_that_is_not_an_event_is_skipped_not_read_forever() {
    let _cleanup = Cleanup;
    let Some(redis) = redis("an_entry_that_is_not_an_event_is_skipped_not_read_forever") else {
        return;
    };
    let a = Node::start(redis, "");
    let topic = unique("foreign");
    let first = a.publish(&topic, "first");
    let mut c = a.subscribe(&format!("/events/{topic}"), Some(&first));
    // Someone else writes into ssed's stream: not a frame ssed made.
    let reply = command(
        redis,
        &["XADD", &format!("ssed:t:{topic}"), "*", "data", "hi"],
    );
    assert!(reply.starts_with('$'), "{reply}");
    let before = cpu_ticks(a.proc.pid());
    thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(a.proc.pid()) - before;
    assert!(
        spent < 20,
        "the reader must not spin on it: {spent} ticks in 1 s"
    );
    let next = a.publish(&topic, "after");
    assert_eq!(events(&mut c, 1), vec![(next, "after".to_owned())]);
    let stderr = a.proc.stderr();
    assert!(stderr.contains("not ssed events"), "{stderr}");
}

// ---------------------------------------------------------------------------
// Mailboxes
// ---------------------------------------------------------------------------

#[test]
fn mailbox_messages_reach_exactly_one_consumer_across_nodes() {
    let _cleanup = Cleanup;
    let Some(redis) = redis("mailbox_messages_reach_exactly_one_consumer_across_nodes") else {
        return;
    };
    let (a, b) = (Node::start(redis, ""), Node::start(redis, ""));
    let key = unique("jobs");
    let path = format!("/keys/{key}");
    // Two consumers on each node, all waiting before anything is pushed.
    let consumers: Vec<_> = (0..4)
        .map(|i| {
            let node = if i % 2 == 0 { &a } else { &b };
            let mut c = node.subscribe(&path, None);
            thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    let f = c.frame_matching(1000, |f| !field(f, "data").is_empty());
                    let data = field(&f, "data").concat();
                    if data == "[DONE]" {
                        assert!(c.until_end(10).is_empty(), "nothing after [DONE]");
                        return got;
                    }
                    got.push(data.parse::<usize>().expect("a number"));
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    const N: usize = 200;
    for i in 0..N {
        let node = if i % 2 == 0 { &a } else { &b };
        let (status, text) = node.post(&path, &i.to_string());
        assert_eq!(status, 200, "{text}");
    }
    for _ in 0..4 {
        assert_eq!(a.post(&path, "[DONE]").0, 200);
    }
    let mut all = Vec::new();
    for c in consumers {
        let got = c.join().expect("consumer");
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "each consumer sees FIFO order"
        );
        all.extend(got);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (0..N).collect::<Vec<_>>(),
        "every message exactly once"
    );
    let (status, text) = a.post(&path, "late");
    assert_eq!(
        (status, text.contains("\"queued\":1")),
        (200, true),
        "{text}"
    );
}

#[test]
fn a_full_mailbox_refuses_pushes_on_every_node() {
    let _cleanup = Cleanup;
    let Some(redis) = redis("a_full_mailbox_refuses_pushes_on_every_node") else {
        return;
    };
    let (a, b) = (Node::start(redis, ""), Node::start(redis, ""));
    let key = unique("full");
    let path = format!("/keys/{key}");
    for i in 0..1000 {
        let node = if i % 2 == 0 { &a } else { &b };
        assert_eq!(node.post(&path, "x").0, 200, "push {i}");
    }
    for node in [&a, &b] {
        let (status, text) = node.post(&path, "one too many");
        assert_eq!(status, 429, "{text}");
        assert!(text.contains("full"), "{text}");
    }
    // One taken on B frees one place for A.
    let mut c = b.subscribe(&path, None);
    assert_eq!(field(&next_event(&mut c), "data"), ["x"]);
    drop(c);
    assert!(wait_until(DEADLINE, || a.post(&path, "fits").0 == 200));
}

// ---------------------------------------------------------------------------
// Redis going away
// ---------------------------------------------------------------------------

/// A private `redis-server` on a free port, killed by PID on drop.
struct PrivateRedis {
    child: Option<Child>,
    port: u16,
}

impl PrivateRedis {
    /// `None` (after printing why) where `redis-server` cannot be run.
    fn start(test: &str) -> Option<PrivateRedis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut r = PrivateRedis { child: None, port };
        if let Err(e) = r.run() {
            skip(test, &format!("cannot run redis-server: {e}"));
            return None;
        }
        Some(r)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn run(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        self.child = Some(child);
        if wait_until(DEADLINE, || pings(&self.addr())) {
            Ok(())
        } else {
            self.stop();
            Err(format!("it did not answer on {}", self.addr()))
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn while_redis_is_down_publishes_get_503_and_streams_wait_for_it() {
    let _cleanup = Cleanup;
    let test = "while_redis_is_down_publishes_get_503_and_streams_wait_for_it";
    let Some(mut redis) = PrivateRedis::start(test) else {
        return;
    };
    let a = Node::start(&redis.addr(), "");
    let topic = unique("outage");
    let key = unique("outage_box");
    let first = a.publish(&topic, "before");
    let mut sub = a.subscribe(&format!("/events/{topic}"), Some(&first));
    let mut consumer = a.subscribe(&format!("/keys/{key}"), None);
    let e1 = a.publish(&topic, "one");
    assert_eq!(events(&mut sub, 1)[0].0, e1);

    redis.stop();
    assert!(wait_until(DEADLINE, || !a.redis_connected()));
    let health = a.healthz();
    assert_eq!(health["status"], serde_json::json!("degraded"), "{health}");
    let (status, text) = a.post(&format!("/publish/{topic}"), "lost?");
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("not stored"), "{text}");
    let (status, text) = a.post(&format!("/keys/{key}"), "lost?");
    assert_eq!(status, 503, "{text}");
    // A new subscriber is told to come back; the open streams stay, with
    // heartbeats (every second here).
    let mut late = Client::new(a.addr);
    let head = late.get_stream(&format!("/events/{topic}"), &["Last-Event-ID: 1-0"]);
    assert_eq!(head.status, 200);
    let frames = late.until_end(10);
    assert!(
        frames.iter().any(|f| f.contains("storage unavailable")),
        "{frames:?}"
    );
    let start = Instant::now();
    let beat = sub.next_frame().expect("the stream stays open");
    assert!(beat.starts_with(':'), "a heartbeat: {beat:?}");
    assert!(start.elapsed() < Duration::from_secs(3));

    // Redis comes back (empty: it keeps nothing on disk).
    redis.run().expect("redis-server restarts");
    assert!(wait_until(DEADLINE, || a.redis_connected()));
    assert_eq!(a.healthz()["status"], serde_json::json!("ok"));
    assert!(a.healthz()["redis"]["reconnects"].as_u64() >= Some(1));
    let e2 = a.publish(&topic, "two");
    assert!(
        id_key(&e2) > id_key(&e1),
        "ids keep increasing: {e1} then {e2}"
    );
    assert_eq!(events(&mut sub, 1), vec![(e2.clone(), "two".to_owned())]);
    assert_eq!(a.post(&format!("/keys/{key}"), "after").0, 200);
    assert_eq!(field(&next_event(&mut consumer), "data"), ["after"]);
    // A quick bounce, with no command in between: the first publish after
    // it must not fail on a pooled connection that died with the old Redis.
    redis.stop();
    redis.run().expect("redis-server restarts");
    let e3 = a.publish(&topic, "three");
    assert!(wait_until(DEADLINE, || a.redis_connected()));
    assert!(id_key(&e3) > id_key(&e2));
    let metrics = request(
        a.addr,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .1;
    assert!(metrics.contains("ssed_redis_connected 1"), "{metrics}");
    assert!(
        !metrics.contains("ssed_redis_errors_total 0\n"),
        "{metrics}"
    );
}

#[test]
fn events_trimmed_while_a_reader_was_away_end_its_streams_for_replay() {
    let _cleanup = Cleanup;
    let test = "events_trimmed_while_a_reader_was_away_end_its_streams_for_replay";
    let Some(redis) = PrivateRedis::start(test) else {
        return;
    };
    let (a, b) = (
        Node::start(&redis.addr(), "history = 3"),
        Node::start(&redis.addr(), "history = 3"),
    );
    let topic = unique("away");
    let first = a.publish(&topic, "first");
    let mut c = a.subscribe(&format!("/events/{topic}"), Some(&first));
    // The stream is live (its replay done, A's reader following the topic)
    // before the connections are cut: a replay cut in the middle ends the
    // stream with `retry:`, which is not what this test is about.
    let ready = a.publish(&topic, "ready");
    assert_eq!(events(&mut c, 1), vec![(ready, "ready".to_owned())]);
    // Cut the readers' connections and publish past `history` before A's
    // reconnects (its backoff is about 100 ms). A race with that backoff
    // can let A read everything in time; then the events simply arrive and
    // the test tries again.
    let mut published = Vec::new();
    let mut ended = false;
    for _ in 0..5 {
        command(&redis.addr(), &["CLIENT", "KILL", "TYPE", "normal"]);
        for i in 0..10 {
            published.push(b.publish(&topic, &format!("{i}")));
        }
        // Either the stream ends (slow), or every event arrives; never a
        // stream that stays open, heartbeats only, with events missing.
        let mut got = 0;
        let deadline = Instant::now() + DEADLINE;
        while got < 10 {
            assert!(
                Instant::now() < deadline,
                "{got} of 10 events arrived and the stream stayed open: a silent gap"
            );
            match c.try_next_frame() {
                Ok(Some(f)) if !field(&f, "data").is_empty() => got += 1,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            break;
        }
    }
    assert!(
        ended,
        "a reader that came back after a trim must not skip events silently"
    );
    let metrics = request(
        a.addr,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .1;
    assert!(
        metrics.contains("ssed_disconnects_total{reason=\"slow\"} 1"),
        "{metrics}"
    );
    // The client comes back with its last id and learns what it missed.
    let mut c = a.subscribe(&format!("/events/{topic}"), Some(&first));
    let reset = next_event(&mut c);
    assert_eq!(field(&reset, "event"), ["reset"], "{reset}");
    let last = published.last().cloned().unwrap();
    let got: Vec<String> = events(&mut c, 3).into_iter().map(|(id, _)| id).collect();
    assert_eq!(got.last(), Some(&last));
}

#[test]
fn a_node_starts_while_redis_is_down_and_serves_once_it_is_up() {
    let _cleanup = Cleanup;
    let test = "a_node_starts_while_redis_is_down_and_serves_once_it_is_up";
    let Some(mut redis) = PrivateRedis::start(test) else {
        return;
    };
    redis.stop();
    let config = ConfigFile::new(&format!("[redis]\nurl = \"redis://{}\"\n", redis.addr()));
    let path = config.0.to_str().expect("utf-8").to_owned();
    let proc = Ssed::spawn(&["--config", &path, "--listen", "127.0.0.1:0"], &[]);
    let addr = proc.listening();
    let (head, body) = request(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    assert!(body.contains("\"connected\":false"), "{body}");
    redis.run().expect("redis-server starts");
    assert!(wait_until(DEADLINE, || {
        request(
            addr,
            "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .1
        .contains("\"connected\":true")
    }));
    let (head, body) = request(
        addr,
        "POST /publish/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert_eq!(head.status, 200, "{body}");
    let stderr = proc.stderr();
    assert!(
        stderr.contains("reader connect"),
        "the outage is logged: {stderr}"
    );
}

#[test]
fn subscribers_resuming_a_large_history_and_not_reading_pin_a_page_each() {
    let _cleanup = Cleanup;
    let Some(redis) = redis("large replay") else {
        return;
    };
    let topic = unique("big");
    let node = Node::start(redis, "retry = \"0\"\nwrite_timeout = \"20s\"");
    // Small events first: a page of them must not let the next pages,
    // of large ones, grow past the byte bound.
    node.publish(&topic, "s1");
    node.publish(&topic, "s2");
    let body = "x".repeat(64_000);
    for _ in 0..300 {
        node.publish(&topic, &body);
    }
    // A reader gets the whole replay, intact and in order.
    let mut reader = node.subscribe(&format!("/events/{topic}"), Some("junk"));
    let reset = next_event(&mut reader);
    assert_eq!(field(&reset, "event"), ["reset"]);
    for small in ["s1", "s2"] {
        assert_eq!(field(&next_event(&mut reader), "data"), [small]);
    }
    let mut last = (0, 0);
    for i in 0..300 {
        let f = next_event(&mut reader);
        assert_eq!(field(&f, "data"), [body.as_str()], "event {i}");
        let id = id_key(&field(&f, "id").concat());
        assert!(id > last, "in order, once");
        last = id;
    }
    drop(reader);
    let pid = node.proc.pid();
    let before = support::process::status_kib_of(pid, "VmRSS");
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
    // Clients with a small window that never read: each holds the page it
    // is being written, not a copy of the 19 MB history.
    let stuck: Vec<TcpStream> = (0..20)
        .map(|_| {
            let fd = rustix::net::socket(
                rustix::net::AddressFamily::INET,
                rustix::net::SocketType::STREAM,
                None,
            )
            .expect("socket");
            rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 4096).expect("SO_RCVBUF");
            rustix::net::connect(&fd, &rustix::net::SocketAddrAny::from(node.addr))
                .expect("connect");
            let mut c = TcpStream::from(fd);
            c.write_all(
                format!(
                    "GET /events/{topic} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nLast-Event-ID: junk\r\n\r\n"
                )
                .as_bytes(),
            )
            .expect("send request");
            c
        })
        .collect();
    assert!(
        wait_until(DEADLINE, || node.healthz()["streams_open"].as_u64()
            >= Some(20)),
        "the stuck streams open"
    );
    thread::sleep(Duration::from_secs(2)); // every write blocks on its client
    let grew = support::process::status_kib_of(pid, "VmHWM").saturating_sub(before);
    assert!(
        grew <= 20 * 512 + 8 * 1024,
        "20 stuck subscribers grew the node by {grew} KiB"
    );
    eprintln!("20 non-reading subscribers resuming 300 x 64 KB from Redis: +{grew} KiB");
    drop(stuck);
}

/// This process's threads whose name starts `ssed-redis` (the reader and
/// the workers of every Redis hub in it).
fn redis_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.starts_with("ssed-redis"))
        .count()
}

#[test]
fn dropping_a_redis_hub_ends_its_reader_and_worker_threads() {
    let Some(addr) = redis("dropping_a_redis_hub_ends_its_reader_and_worker_threads") else {
        return;
    };
    let _cleanup = Cleanup;
    // The only in-process Redis hub of this test binary: the other tests
    // run `ssed` processes.
    let before = redis_threads();
    let hub = ssed::Hub::with_redis(&format!("redis://{addr}"), 10, ssed::HubConfig::default())
        .expect("a Redis hub");
    let topic = unique("drop");
    // Made on a worker thread, with its replay read there too.
    let mut sub = hub.subscribe(&[&topic], Some("0-0")).expect("subscribe");
    assert!(sub.take_backlog().is_empty(), "nothing published yet");
    let published = hub
        .publish(&topic, ssed::Event::new().data("x"))
        .expect("publish");
    let frame = sub.next_timeout(DEADLINE).expect("the reader delivers it");
    assert!(
        String::from_utf8_lossy(frame.as_bytes()).contains(&published.id.to_string()),
        "the frame carries its id"
    );
    // A thread takes its name once it runs: under load, a moment later
    // than it was spawned.
    assert!(
        wait_until(DEADLINE, || redis_threads() == before + 17),
        "the reader and 16 workers: {} Redis threads besides the {before} before",
        redis_threads().saturating_sub(before)
    );
    drop(sub);
    drop(hub);
    assert!(
        wait_until(DEADLINE, || redis_threads() == before),
        "{} Redis threads left after the hub was dropped",
        redis_threads().saturating_sub(before)
    );
}
