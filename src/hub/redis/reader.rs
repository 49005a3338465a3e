//! The reader thread: one per node, blocking in `XREAD` on the topics
//! this node's subscribers follow and on the control stream, handing what
//! it reads to the node (not to the hub: it serves the node's subscribers
//! and waiting consumers, and holds the node weakly).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::hub::history::Retained;
use crate::hub::id::EventId;
use crate::hub::node::{Delivery, EVERY_TOPIC, Node};
use crate::hub::redis::pool::{TIMEOUT, lock};
use crate::hub::redis::resp::{Conn, RespError, Value};
use crate::hub::redis::{
    ALL_KEY, CTL_KEY, MARK_SELECTING, Redis, TOPIC_PREFIX, entry_frame, entry_id, entry_seq,
    entry_topics, topic_key,
};

/// An entry read: the event, whether it is one of an update's several
/// topics, and (from the stream of every update) the update's topics.
type Read = (Retained, bool, Option<Box<[Box<str>]>>);

/// How long one blocking `XREAD` waits (the reader checks whether its node
/// still exists between two).
const BLOCK: Duration = Duration::from_secs(2);
/// Most entries taken from one stream per `XREAD`.
const READ_COUNT: usize = 1000;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Starts the reader thread of `engine` for `node`.
pub(crate) fn start_reader(engine: Arc<Redis>, node: Weak<Node>) -> std::io::Result<()> {
    let e = Arc::clone(&engine);
    let handle = std::thread::Builder::new()
        .name("ssed-redis".into())
        .spawn(move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader(&e, &node)));
            if run.is_err() {
                e.connected.store(false, Ordering::Relaxed);
                log::error!("the Redis reader panicked; events from Redis stop on this node");
            }
        })?;
    let _ = engine.reader.set(handle.thread().clone());
    Ok(())
}

/// Sleeps `time` unless told to stop; false when told to stop.
fn pause(engine: &Redis, time: Duration) -> bool {
    let until = Instant::now() + time;
    while !engine.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::park_timeout(until - now);
    }
    false
}

fn reader(engine: &Redis, node: &Weak<Node>) {
    let url = engine.pool.url.clone();
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut ctl: Option<String> = None;
    let mut was_up = false;
    let mut stalled_since: Option<Instant> = None;
    // The entry number last read per followed topic.
    let mut seqs: HashMap<Box<str>, u64> = HashMap::new();
    // Whether this node has kept the selecting mark alive (see
    // `keep_selecting`), across reconnects.
    let mut selecting = Selecting::default();
    loop {
        if engine.stop.load(Ordering::Relaxed) || node.strong_count() == 0 {
            return;
        }
        let mut conn = match Conn::connect(&url, "ssed-reader", TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                engine.connected.store(false, Ordering::Relaxed);
                engine.failed("reader connect", &e);
                if !pause(engine, backoff.next_wait()) {
                    return;
                }
                continue;
            }
        };
        // The control stream is followed from its newest entry at the
        // first connect, and from where the reader was after a reconnect.
        if ctl.is_none() {
            match conn.command(&[b"XREVRANGE", CTL_KEY.as_bytes(), b"+", b"-", b"COUNT", b"1"]) {
                Ok(v) => {
                    let newest = v.items().and_then(|e| e.first()).and_then(|e| {
                        e.items()
                            .and_then(|p| p.first())
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    });
                    ctl = Some(newest.unwrap_or_else(|| "0-0".to_owned()));
                }
                Err(e) => {
                    engine.failed("reader start", &e);
                    if !pause(engine, backoff.next_wait()) {
                        return;
                    }
                    continue;
                }
            }
        }
        if was_up {
            engine.reconnects.fetch_add(1, Ordering::Relaxed);
            log::info!("redis {url}: reader connected again");
        } else {
            log::info!("redis {url}: reader connected");
        }
        was_up = true;
        engine.connected.store(true, Ordering::Relaxed);
        let connected_at = Instant::now();
        let error = read_loop(
            engine,
            node,
            &mut conn,
            &mut ctl,
            &mut stalled_since,
            &mut seqs,
            &mut selecting,
        );
        engine.connected.store(false, Ordering::Relaxed);
        let Some(e) = error else { return };
        engine.pool.clear_idle();
        engine.failed("reader", &e);
        if connected_at.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        if !pause(engine, backoff.next_wait()) {
            return;
        }
    }
}

/// Where this node's reader stands with the selecting mark.
#[derive(Default)]
struct Selecting {
    /// It has refreshed the mark since it began following every update.
    kept: bool,
    /// When it last did.
    at: Option<Instant>,
}

/// Keeps the mark that has publishes write the stream of every update
/// alive while this node follows it (`every`), once a second at most. A
/// mark found lapsed (Redis lost it, or this reader was away past its
/// lifetime) means updates may be missing from that stream: this node's
/// subscribers by selector are closed as slow, to resume from the topics'
/// own streams.
fn keep_selecting(
    conn: &mut Conn,
    node: &Weak<Node>,
    every: bool,
    selecting: &mut Selecting,
) -> Result<(), RespError> {
    if !every {
        *selecting = Selecting::default();
        return Ok(());
    }
    if selecting
        .at
        .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
    {
        return Ok(());
    }
    let held = !matches!(conn.command(&MARK_SELECTING)?, Value::Nil);
    if selecting.kept && !held {
        log::warn!(
            "redis: the selecting mark had lapsed; subscribers by selector reconnect to replay"
        );
        if let Some(node) = node.upgrade() {
            node.drop_subscribers(EVERY_TOPIC);
        }
    }
    selecting.kept = true;
    selecting.at = Some(Instant::now());
    Ok(())
}

/// Reads and delivers until the connection fails (`Some(error)`) or the
/// reader must stop (`None`).
fn read_loop(
    engine: &Redis,
    node: &Weak<Node>,
    conn: &mut Conn,
    ctl: &mut Option<String>,
    stalled_since: &mut Option<Instant>,
    seqs: &mut HashMap<Box<str>, u64>,
    selecting: &mut Selecting,
) -> Option<RespError> {
    let block = BLOCK.as_millis().to_string();
    let count = READ_COUNT.to_string();
    loop {
        if engine.stop.load(Ordering::Relaxed) || node.strong_count() == 0 {
            return None;
        }
        let followed: Vec<(Box<str>, EventId)> = lock(&engine.wanted)
            .iter_mut()
            .map(|(t, f)| {
                if std::mem::take(&mut f.fresh) {
                    seqs.insert(t.clone(), f.seq); // (followed again:) a new start
                }
                (t.clone(), f.cursor)
            })
            .collect();
        let every = followed.iter().any(|(t, _)| &**t == EVERY_TOPIC);
        if let Err(e) = keep_selecting(conn, node, every, selecting) {
            return Some(e);
        }
        let keys: Vec<Vec<u8>> = followed.iter().map(|(t, _)| topic_key(t)).collect();
        let cursors: Vec<String> = followed.iter().map(|(_, c)| c.to_string()).collect();
        let ctl_cursor = ctl.clone().unwrap_or_else(|| "$".to_owned());
        let mut cmd: Vec<&[u8]> = vec![
            b"XREAD",
            b"COUNT",
            count.as_bytes(),
            b"BLOCK",
            block.as_bytes(),
            b"STREAMS",
            CTL_KEY.as_bytes(),
        ];
        cmd.extend(keys.iter().map(Vec::as_slice));
        cmd.push(ctl_cursor.as_bytes());
        cmd.extend(cursors.iter().map(String::as_bytes));
        let reply = conn.with_read_timeout(BLOCK + TIMEOUT, |c| c.command(&cmd));
        let reply = match reply {
            Ok(v) => {
                *stalled_since = None;
                v
            }
            Err(e @ RespError::Server(_)) => {
                // A key of the wrong type, say: keep the connection, tell
                // the operator, do not spin.
                if stalled_since.is_none_or(|s| s.elapsed() > Duration::from_secs(10)) {
                    engine.failed("reader XREAD", &e);
                    *stalled_since = Some(Instant::now());
                }
                if !pause(engine, Duration::from_secs(1)) {
                    return None;
                }
                continue;
            }
            Err(e) => return Some(e),
        };
        // The hub is gone: stop (`None`), like a stop request.
        let node = node.upgrade()?;
        let mut batch: Vec<Delivery> = Vec::new();
        let mut read: Vec<(Box<str>, EventId)> = Vec::new();
        let mut trimmed: Vec<Box<str>> = Vec::new();
        let mut bound: Option<EventId> = None;
        let mut mailboxes: Vec<String> = Vec::new();
        for stream in reply.items().unwrap_or_default() {
            let Some([key, entries]) = stream.items() else {
                continue;
            };
            let (Some(key), Some(entries)) = (key.as_str(), entries.items()) else {
                continue;
            };
            if key == CTL_KEY {
                for entry in entries {
                    let Some([id, fields]) = entry.items() else {
                        continue;
                    };
                    if let Some(id) = id.as_str() {
                        *ctl = Some(id.to_owned());
                    }
                    for pair in fields.items().unwrap_or_default().chunks(2) {
                        if let [name, value] = pair
                            && name.as_bytes() == Some(b"k")
                            && let Some(k) = value.as_str()
                        {
                            mailboxes.push(k.to_owned());
                        }
                    }
                }
                continue;
            }
            let every = key == ALL_KEY;
            let Some(topic) = key
                .strip_prefix(TOPIC_PREFIX)
                .or(every.then_some(EVERY_TOPIC))
            else {
                continue;
            };
            // How far this read went, counting entries that are not ssed's
            // frames (skipped, or the reader would read them forever).
            let Some(read_to) = entries.last().and_then(entry_id) else {
                continue;
            };
            let frames: Vec<Read> = entries
                .iter()
                .filter_map(|e| {
                    let (retained, several) = entry_frame(e)?;
                    // An entry of every update is nothing without its topics.
                    let topics = if every { Some(entry_topics(e)?) } else { None };
                    Some((retained, several, topics))
                })
                .collect();
            if frames.len() < entries.len() {
                engine.failed(
                    "reader",
                    &RespError::Protocol(format!(
                        "{} entries of {key:?} are not ssed events; skipped",
                        entries.len() - frames.len()
                    )),
                );
            }
            if entries.len() >= READ_COUNT {
                // Cut short: later entries of other topics wait until this
                // one has caught up, so delivery stays in id order; and
                // Redis may trim what this one has not read yet.
                bound = Some(bound.map_or(read_to, |b| b.min(read_to)));
            }
            let topic: Box<str> = topic.into();
            read.push((topic.clone(), read_to));
            // Entry numbers run 1, 2, 3 per topic: one skipped means Redis
            // trimmed events before this node read them (it was away, or
            // slow). Its subscribers cannot get them live: they are closed
            // as slow, reconnect with Last-Event-ID and get the replay with
            // its reset notice, and nothing of this topic after the gap is
            // delivered, so their last id stays before it.
            let mut gap = false;
            for n in entries.iter().filter_map(entry_seq) {
                // A smaller number: Redis lost its data (a restart without
                // persistence) and counts afresh; nothing to tell from it.
                if seqs.get(&topic).is_some_and(|prev| n > prev + 1) {
                    gap = true;
                }
                seqs.insert(topic.clone(), n);
            }
            if gap {
                log::warn!(
                    "redis: events of topic {topic:?} were trimmed before this node read them; its subscribers reconnect to replay"
                );
                trimmed.push(topic);
                continue;
            }
            batch.extend(frames.into_iter().map(|(e, several, topics)| Delivery {
                topic: topic.clone(),
                id: e.id,
                frame: e.frame,
                private: e.private,
                several,
                topics,
            }));
        }
        if let Some(b) = bound {
            batch.retain(|d| d.id <= b);
        }
        batch.sort_by_key(|d| d.id);
        {
            let mut wanted = lock(&engine.wanted);
            for (topic, read_to) in &read {
                if let Some(f) = wanted.get_mut(topic) {
                    f.cursor = f.cursor.max(bound.map_or(*read_to, |b| b.min(*read_to)));
                }
            }
        }
        for topic in &trimmed {
            node.drop_subscribers(topic);
        }
        if !batch.is_empty() {
            node.deliver(batch);
        }
        for key in mailboxes {
            node.mailboxes.notify(&key);
        }
        // Topics no subscriber here follows any more start afresh.
        if seqs.len() > followed.len() {
            seqs.retain(|t, _| followed.iter().any(|(f, _)| f == t));
        }
    }
}
