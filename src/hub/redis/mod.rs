//! Redis as the shared engine of several ssed nodes.
//!
//! A hub made with [`Hub::with_redis`] keeps no history of its own: every
//! node behind a load balancer publishes into, replays from and takes
//! mailbox messages out of the same Redis, so a client may reconnect to any
//! node.
//!
//! - **Topics** are Redis Streams, one per topic (key `ssed:t:{topic}`,
//!   the topic's bytes as they are: every command carries keys as
//!   binary-safe bulk strings, so an IRI's `/ : ? # { }`, spaces and quotes
//!   need no escaping), trimmed to the last `history` entries. A publish
//!   runs one script that picks the id, `XADD`s the frame and records the
//!   id as the newest (`ssed:last`): ids are Redis entry ids (`<unix-ms>-<seq>`), identical on
//!   every node and increasing across all topics, so `Last-Event-ID` means
//!   the same thing everywhere.
//! - **Delivery**: each node runs one reader thread that blocks in `XREAD`
//!   on the topics its subscribers follow (not one per subscriber) and fans
//!   each entry out to them. A publish returns once Redis has the event; its
//!   local subscribers get it from the reader like everyone else's.
//! - **Worker threads**, one per pooled connection, make the round trips a
//!   stream needs (subscribe, replay pages, mailbox takes): a stream's own
//!   thread keeps every stack page it touches, and a round trip goes deep.
//! - **Replay** reads the topics' streams after the asked id, with a reset
//!   notice when Redis has trimmed events the client may not have seen.
//! - **Mailboxes** are Redis lists (`ssed:k:{key}`): a push appends (refused
//!   past the capacity), a consumer takes with an atomic pop, so each message
//!   reaches exactly one consumer on whichever node. A write that fails puts
//!   the message back at the front. The list expires `mailbox_ttl` after the
//!   last push, and a message older than that is skipped when taken.
//!   Pushes are announced on a control stream (`ssed:ctl`) that every
//!   reader follows, so a consumer on another node wakes at once.
//! - **Redis down**: publishes and pushes fail ([`HubError::Storage`]: the
//!   daemon answers 503); open streams stay connected with heartbeats and
//!   resume where they were once the reader reconnects (capped exponential
//!   backoff); a new subscription that needs Redis fails and its client
//!   retries. [`Hub::redis_state`] says where the reader stands.
//!
//! - **Trimmed before read**: each event carries its topic's entry number;
//!   a reader that finds one skipped (it was disconnected, or fell behind,
//!   while Redis trimmed past it) closes that topic's subscribers as slow
//!   instead of skipping silently: they reconnect with `Last-Event-ID` and
//!   get the replay with its reset notice.
//!
//! Caveats: a message taken by a consumer whose node dies before writing it
//! is lost (at-most-once across a crash; a failed write is not a crash and
//! puts it back). A stream of several topics, one of them new to this node,
//! can see two events of different topics out of id order in a window of
//! one Redis round trip while events are published on both. Redis 6.2 or newer is needed; with 7.0 or newer the reset
//! notice is exact about trimming. The connection is plain TCP without TLS.
//!
//! - **Subscribers by selector** (`*`, URI templates, URL patterns): while
//!   some node has them (it keeps `ssed:selecting` alive), every publish
//!   also appends the update, with its topics, to one stream of every
//!   update (`ssed:all`, about 10,000 entries); the reader of such a node
//!   follows it and matches each selector once per topic. A mark found
//!   lapsed closes them as slow: updates may be missing. Their
//!   replay lists the topics Redis has had events of and reads the streams
//!   of those that match, as for any topic. Nodes older than this write no
//!   entry there: upgrade every node before subscribing by selector.
//!
//! Keys: `ssed:t:{topic}` (streams; they stay in Redis, each bounded by
//! `history`), `ssed:k:{key}` (lists, expiring), `ssed:ctl` (about 1000
//! entries), `ssed:all` (about 10,000 entries), `ssed:selecting` (expiring)
//! and `ssed:last`. Give ssed a database of its own (`/db` in the
//! URL) when Redis serves others too.
//!
//! ```no_run
//! use ssed::{Event, Hub, HubConfig, Server, StreamError};
//!
//! // The same on every node: they share topics, ids and mailboxes.
//! let hub = Hub::with_redis("redis://127.0.0.1:6379/0", 1000, HubConfig::default())?;
//! let subscribe = hub.clone();
//! let server = Server::builder()
//!     .listen("127.0.0.1:8080")
//!     .route("/events/{topic}", move |req, stream| {
//!         let topic = req.param("topic").unwrap_or_default();
//!         match subscribe.subscribe(&[topic], req.last_event_id()) {
//!             Ok(sub) => stream.follow(sub),
//!             Err(e) => Err(StreamError::other(e)),
//!         }
//!     })
//!     .build()?;
//! hub.publish("news", Event::new().data("hello from this node"))?;
//! server.run()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`HubError::Storage`]: crate::HubError::Storage
//! [`Hub::with_redis`]: crate::Hub::with_redis
//! [`Hub::redis_state`]: crate::Hub::redis_state

pub(crate) mod engine;
mod pool;
pub(crate) mod reader;
pub(crate) mod resp;
mod scripts;

use scripts::{PAGE, PUBLISH, PUSH, Script, TAKE, UNTAKE};

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::event::EncodedEvent;
use crate::hub::config::PAGE_BYTES;
pub use crate::hub::config::RedisState;
use crate::hub::history::{EveryPage, Replay, Retained, StorageError};
use crate::hub::id::EventId;
use crate::hub::node::{EVERY_TOPIC, Follower};
use crate::hub::redis::pool::{Pool, lock};
use crate::hub::redis::resp::{Conn, RedisUrl, RespError, Value};

/// Prefix of topic stream keys.
const TOPIC_PREFIX: &str = "ssed:t:";
/// Prefix of mailbox list keys.
const MAILBOX_PREFIX: &str = "ssed:k:";
/// The newest id issued.
const LAST_KEY: &str = "ssed:last";
/// Each topic's count of published events (a hash, field = stream key).
const SEQ_KEY: &str = "ssed:seq";
/// The control stream: mailbox pushes and reader wake-ups.
const CTL_KEY: &str = "ssed:ctl";
/// Entries the control stream keeps (approximately).
const CTL_LEN: &str = "1000";
/// Every update of every topic, with its topics: what readers of nodes
/// with subscribers by selector (`*`, URI templates) follow, and what
/// their replay reads.
const ALL_KEY: &str = "ssed:all";
/// The id after which [`ALL_KEY`] has every update: it is written only
/// while some node has subscribers by selector.
const SINCE_KEY: &str = "ssed:all:since";
/// Publisher-given ids, each to the first event id that carried it (a
/// hash), and their order (a sorted set, by time), to keep the newest
/// [`ALIASES_KEPT`].
const IDS_KEY: &str = "ssed:ids";
const IDS_ORDER_KEY: &str = "ssed:ids:order";
/// Publisher-given ids Redis keeps (about: trimmed 64 at a time) for
/// resumption.
pub(crate) const ALIASES_KEPT: &str = "10000";
/// Entries the stream of every update keeps (approximately): a reader
/// that falls this far behind closes its subscribers by selector as slow,
/// and they resume from the topics' streams.
const ALL_LEN: &str = "10000";
/// Exists while some node has subscribers by selector: only then does a
/// publish write the stream of every update. Set before such a node
/// reads where that stream stands, and kept alive by its reader.
const SELECTING_KEY: &str = "ssed:selecting";
/// Sets [`SELECTING_KEY`] for 600 s, answering what it held (nil: it had
/// lapsed, or was never set).
const MARK_SELECTING: [&[u8]; 6] = [
    b"SET",
    SELECTING_KEY.as_bytes(),
    b"1",
    b"EX",
    b"600",
    b"GET",
];

/// Where the reader is in a topic this node follows.
#[derive(Debug, Clone, Copy)]
struct Follow {
    /// The id read up to.
    cursor: EventId,
    /// The topic's count of events at `cursor` when it was followed.
    seq: u64,
    /// Newly followed: the reader has no entry number for it yet.
    fresh: bool,
}

/// A page read from a stream ([`Redis::read_stream`]).
struct StreamPage {
    /// Its entries, oldest first.
    entries: Vec<Value>,
    /// The oldest id the stream retains.
    first: Option<EventId>,
    /// Entries after the id asked may have been trimmed.
    gap: bool,
    /// The byte bound left entries out.
    cut: bool,
    /// The id the stream has every update after, if asked and set.
    since: Option<EventId>,
}

/// A push refused or failed.
pub(crate) enum PushError {
    Full,
    Storage(StorageError),
}

/// The Redis side of a hub.
pub(crate) struct Redis {
    pool: Pool,
    history: usize,
    /// Topics this node's subscribers follow, each with the id the reader
    /// has delivered up to.
    wanted: Mutex<HashMap<Box<str>, Follow>>,
    connected: AtomicBool,
    reconnects: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// When a failure was last logged, and how many were not since.
    logged: Mutex<(Option<Instant>, u64)>,
    stop: AtomicBool,
    publish: Script,
    push: Script,
    take: Script,
    untake: Script,
    page: Script,
    reader: OnceLock<std::thread::Thread>,
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.pool.url)
            .field("history", &self.history)
            .finish_non_exhaustive()
    }
}

fn storage(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StorageError {
    StorageError::new(e)
}

fn topic_key(topic: &str) -> Vec<u8> {
    if topic == EVERY_TOPIC {
        return ALL_KEY.as_bytes().to_vec();
    }
    [TOPIC_PREFIX.as_bytes(), topic.as_bytes()].concat()
}

fn mailbox_key(key: &str) -> Vec<u8> {
    [MAILBOX_PREFIX.as_bytes(), key.as_bytes()].concat()
}

fn parse_id(v: &Value) -> Option<EventId> {
    v.as_str()?.parse().ok()
}

impl Follower for Redis {
    fn unfollow(&self, topic: &str) {
        self.unwant(topic);
    }
}

impl Redis {
    pub(crate) fn new(url: RedisUrl, history: usize) -> Self {
        Redis {
            pool: Pool::new(url),
            history,
            wanted: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            logged: Mutex::new((None, 0)),
            stop: AtomicBool::new(false),
            publish: Script::new(PUBLISH),
            push: Script::new(PUSH),
            take: Script::new(TAKE),
            untake: Script::new(UNTAKE),
            page: Script::new(PAGE),
            reader: OnceLock::new(),
        }
    }

    pub(crate) fn state(&self) -> RedisState {
        RedisState {
            connected: self.connected.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            last_error: lock(&self.last_error).clone(),
        }
    }

    /// Counts and records a failure; logs it unless one was logged in the
    /// last second (an outage fails every publish and every waiting
    /// consumer's look: the log gets one line a second and a count).
    fn failed(&self, what: &str, e: &RespError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let message = format!("{what}: {e}");
        let now = Instant::now();
        let mut logged = lock(&self.logged);
        if logged
            .0
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            let more = std::mem::take(&mut logged.1);
            logged.0 = Some(now);
            drop(logged);
            if more > 0 {
                log::warn!(
                    "redis {}: {message} (and {more} more failures)",
                    self.pool.url
                );
            } else {
                log::warn!("redis {}: {message}", self.pool.url);
            }
        } else {
            logged.1 += 1;
        }
        *lock(&self.last_error) = Some(message);
    }

    /// Runs `f` on a pooled connection and returns the connection to the
    /// pool, unless it broke.
    fn on_pool<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, RespError>,
    ) -> Result<T, RespError> {
        let mut conn = self.pool.get()?;
        let r = f(&mut conn);
        match &r {
            Err(e) if !e.keeps_connection() => self.pool.release(),
            _ => self.pool.put(conn),
        }
        r
    }

    /// Runs `f` on a pooled connection; a connection that broke is
    /// dropped, errors are counted and logged.
    fn with_conn<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Conn) -> Result<T, RespError>,
    ) -> Result<T, StorageError> {
        self.on_pool(f).map_err(|e| {
            self.failed(what, &e);
            storage(format!("redis {what}: {e}"))
        })
    }

    /// [`Redis::with_conn`] for commands that are safe to run twice
    /// (reads, wake-ups): a pooled connection that broke under the command
    /// (Redis restarted, or killed the client, after the liveness check)
    /// gets one more try on another connection, so one dead socket does not
    /// fail a subscriber's replay. A timeout is not retried: it would only
    /// double the wait on a Redis gone silent.
    fn with_conn_retry<T>(
        &self,
        what: &str,
        f: impl Fn(&mut Conn) -> Result<T, RespError>,
    ) -> Result<T, StorageError> {
        match self.on_pool(&f) {
            Err(RespError::Io(e))
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                self.errors.fetch_add(1, Ordering::Relaxed);
                log::debug!("redis {what}: {e}; trying once more");
                self.with_conn(what, f)
            }
            other => other.map_err(|e| {
                self.failed(what, &e);
                storage(format!("redis {what}: {e}"))
            }),
        }
    }

    /// Appends a frame (encoded without its id line, which goes at
    /// `id_at`) to each of `topics`, under one id, marked `private` or
    /// not; returns the id Redis gave it.
    pub(crate) fn publish(
        &self,
        topics: &[&str],
        frame: &[u8],
        id_at: usize,
        private: bool,
        alias: Option<&str>,
    ) -> Result<EventId, StorageError> {
        let streams: Vec<Vec<u8>> = topics.iter().map(|t| topic_key(t)).collect();
        let mut keys: Vec<&[u8]> = vec![
            LAST_KEY.as_bytes(),
            SEQ_KEY.as_bytes(),
            ALL_KEY.as_bytes(),
            SELECTING_KEY.as_bytes(),
            SINCE_KEY.as_bytes(),
            IDS_KEY.as_bytes(),
            IDS_ORDER_KEY.as_bytes(),
        ];
        keys.extend(streams.iter().map(Vec::as_slice));
        let maxlen = self.history.max(1).to_string();
        let at = id_at.to_string();
        let private: &[u8] = if private { b"1" } else { b"0" };
        // Topics hold no control character: a line feed parts them.
        let names = topics.join("\n");
        let reply = self.with_conn("publish", |c| {
            self.publish.run(
                c,
                &keys,
                &[
                    maxlen.as_bytes(),
                    frame,
                    at.as_bytes(),
                    private,
                    names.as_bytes(),
                    ALL_LEN.as_bytes(),
                    alias.unwrap_or_default().as_bytes(),
                    ALIASES_KEPT.as_bytes(),
                ],
            )
        })?;
        parse_id(&reply).ok_or_else(|| storage(format!("redis publish: odd reply {reply:?}")))
    }

    /// The newest id issued in Redis (`0-0` before the first) and, read
    /// in the same instant, each of `topics`' count of published events:
    /// where the reader starts on a topic it did not follow yet.
    pub(crate) fn position<T: AsRef<str>>(
        &self,
        topics: &[T],
    ) -> Result<(EventId, Vec<u64>), StorageError> {
        let keys: Vec<Vec<u8>> = topics.iter().map(|t| topic_key(t.as_ref())).collect();
        let mut hmget: Vec<&[u8]> = vec![b"HMGET", SEQ_KEY.as_bytes()];
        hmget.extend(keys.iter().map(Vec::as_slice));
        let commands: Vec<Vec<&[u8]>> = vec![
            vec![b"MULTI"],
            vec![b"GET", LAST_KEY.as_bytes()],
            hmget,
            vec![b"EXEC"],
        ];
        let mut replies = self.with_conn_retry("read the last id", |c| c.pipeline(&commands))?;
        let exec = match replies.pop() {
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err(storage(format!("redis read the last id: {e}"))),
            None => return Err(storage("redis read the last id: no reply")),
        };
        let (Some(last), Some(seqs)) = (
            exec.items().and_then(|v| v.first()),
            exec.items().and_then(|v| v.get(1)).and_then(Value::items),
        ) else {
            return Err(storage(format!(
                "redis read the last id: odd reply {exec:?}"
            )));
        };
        let seqs = seqs
            .iter()
            .map(|v| v.as_str().and_then(|s| s.parse().ok()).unwrap_or(0))
            .collect();
        Ok((parse_id(last).unwrap_or(EventId::new(0, 0)), seqs))
    }

    /// Where a resume from the publisher-given id `alias` starts: the
    /// earliest event that carried it, if Redis still knows it (one of
    /// the newest [`ALIASES_KEPT`] such ids).
    pub(crate) fn id_of(&self, alias: &str) -> Result<Option<EventId>, StorageError> {
        let reply = self.with_conn_retry("find an id", |c| {
            c.command(&[b"HGET", IDS_KEY.as_bytes(), alias.as_bytes()])
        })?;
        Ok(parse_id(&reply))
    }

    /// Tells every node's publishes that a node has subscribers by
    /// selector (they then write the stream of every update), on `conn` or
    /// a pooled connection; whether the mark was there already (false: it
    /// had lapsed, or no node had set it).
    pub(crate) fn mark_selecting(&self) -> Result<bool, StorageError> {
        let reply = self.with_conn_retry("mark selecting", |c| c.command(&MARK_SELECTING))?;
        Ok(!matches!(reply, Value::Nil))
    }

    /// Makes the reader follow `topic` from `from`, where the topic had
    /// `seq` events, unless it already does; true when it was new (the
    /// reader must be woken).
    pub(crate) fn want(&self, topic: &str, from: EventId, seq: u64) -> bool {
        let mut wanted = lock(&self.wanted);
        if wanted.contains_key(topic) {
            return false;
        }
        wanted.insert(
            topic.into(),
            Follow {
                cursor: from,
                seq,
                fresh: true,
            },
        );
        true
    }

    /// The reader stops following `topic` (no subscriber here is left).
    pub(crate) fn unwant(&self, topic: &str) {
        lock(&self.wanted).remove(topic);
    }

    /// Wakes every node's reader (they re-read what to follow).
    pub(crate) fn wake_readers(&self) {
        let _ = self.with_conn_retry("wake the reader", |c| {
            c.command(&[
                b"XADD",
                CTL_KEY.as_bytes(),
                b"MAXLEN",
                b"~",
                CTL_LEN.as_bytes(),
                b"*",
                b"w",
                b"1",
            ])
        });
    }

    /// At most `count` retained events of `topic` with ids above `after`
    /// and at most `until`, oldest first, and past the first no more than
    /// [`PAGE_BYTES`] of frames (true beside it when that bound left some
    /// out); with whether events after `after`
    /// may be missing (Redis trimmed the stream past it) and the oldest id
    /// the topic retains. A stream replays a page at a time: what Redis
    /// returns is this stream's own copy, so a page is kept small.
    pub(crate) fn page(
        &self,
        topic: &str,
        after: EventId,
        until: EventId,
        count: usize,
    ) -> Result<(Replay, bool), StorageError> {
        let read = self.read_stream(&topic_key(topic), None, after, until, count)?;
        let page = Replay {
            events: read
                .entries
                .iter()
                .filter_map(entry_frame)
                .map(|(retained, _)| retained)
                .collect(),
            gap: read.gap,
            oldest: read.first,
        };
        Ok((page, read.cut))
    }

    /// A page of the replay of a subscription by selector, read from the
    /// stream of every update: up to `count` updates in `(after, until]`,
    /// those of topics `wanted` answers for (see
    /// [`History::page_every`](crate::hub::History::page_every)).
    pub(crate) fn page_every(
        &self,
        after: EventId,
        until: EventId,
        count: usize,
        first: bool,
        wanted: &mut dyn FnMut(&str) -> Option<bool>,
    ) -> Result<EveryPage, StorageError> {
        let read = self.read_stream(
            ALL_KEY.as_bytes(),
            Some(SINCE_KEY.as_bytes()),
            after,
            until,
            count,
        )?;
        // The stream has every update after `since` only: from before it
        // (or with none, since no publish has written it), what was
        // published after `after` may be missing. Told on the first page;
        // later, only of entries trimmed while the replay reads.
        let lost = first && read.since.is_none_or(|since| after < since);
        let mut page = EveryPage {
            events: Vec::new(),
            to: read.entries.last().and_then(entry_id).unwrap_or(after),
            gap: after < until && (lost || read.gap),
            oldest: read.first,
            done: !read.cut && read.entries.len() < count.max(1),
        };
        for entry in &read.entries {
            let (Some((mut retained, _)), Some(topics)) = (entry_frame(entry), entry_topics(entry))
            else {
                continue;
            };
            // Followed if any of its topics is; seen, when private, if
            // any of those lets it be.
            let Some(seen) = topics
                .iter()
                .filter_map(|t| wanted(t))
                .reduce(|a, b| a || b)
            else {
                continue;
            };
            retained.private &= !seen;
            page.events.push(retained);
        }
        Ok(page)
    }

    /// Reads a page of the stream `key` (see the `PAGE` script), and the
    /// id in `since_key`, if given.
    fn read_stream(
        &self,
        key: &[u8],
        since_key: Option<&[u8]>,
        after: EventId,
        until: EventId,
        count: usize,
    ) -> Result<StreamPage, StorageError> {
        let start = format!("({after}");
        let end = until.to_string();
        let count = count.max(1).to_string();
        let budget = PAGE_BYTES.to_string();
        let mut keys = vec![key, SEQ_KEY.as_bytes()];
        keys.extend(since_key);
        let reply = self.with_conn_retry("replay", |c| {
            self.page.run(
                c,
                &keys,
                &[
                    start.as_bytes(),
                    end.as_bytes(),
                    count.as_bytes(),
                    budget.as_bytes(),
                ],
            )
        })?;
        let Value::Array(mut parts) = reply else {
            return Err(storage(format!("redis replay: odd reply {reply:?}")));
        };
        let entries = match parts.get_mut(2).map(|e| std::mem::replace(e, Value::Nil)) {
            Some(Value::Array(entries)) => entries,
            _ => Vec::new(),
        };
        let [first, trimmed, _, newest, cut, since] = parts.as_slice() else {
            return Err(storage(format!("redis replay: odd reply {parts:?}")));
        };
        let first = parse_id(first);
        let trimmed = int(trimmed) == Some(1);
        // Trimmed entries are all older than the first one left: one of
        // them can be newer than `after` only if `after` is below the id
        // just before it. A trimmed stream with nothing left lost up to its
        // newest id; one whose key is gone (Redis evicted it), everything.
        let gap = trimmed
            && match (first, parse_id(newest)) {
                (Some(first), _) => after < first.pred(),
                (None, Some(newest)) => after < newest,
                (None, None) => true,
            };
        Ok(StreamPage {
            entries,
            first,
            gap,
            cut: int(cut) == Some(1),
            since: parse_id(since),
        })
    }

    /// Queues `text` in mailbox `key`; the mailbox's length after it.
    pub(crate) fn push(
        &self,
        key: &str,
        text: &str,
        capacity: usize,
        ttl: Duration,
    ) -> Result<usize, PushError> {
        let list = mailbox_key(key);
        let cap = capacity.to_string();
        let ttl = ttl.as_millis().clamp(1, i64::MAX as u128).to_string();
        let reply = self
            .with_conn("push", |c| {
                self.push.run(
                    c,
                    &[&list, CTL_KEY.as_bytes()],
                    &[
                        cap.as_bytes(),
                        text.as_bytes(),
                        ttl.as_bytes(),
                        key.as_bytes(),
                        CTL_LEN.as_bytes(),
                    ],
                )
            })
            .map_err(PushError::Storage)?;
        match reply {
            Value::Int(n) if n < 0 => Err(PushError::Full),
            Value::Int(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            other => Err(PushError::Storage(storage(format!(
                "redis push: odd reply {other:?}"
            )))),
        }
    }

    /// Takes the oldest live message of `key`, if any: its text, and the
    /// stored form that puts it back.
    pub(crate) fn take(
        &self,
        key: &str,
        ttl: Duration,
    ) -> Result<Option<(String, Vec<u8>)>, StorageError> {
        let list = mailbox_key(key);
        let ttl = ttl.as_millis().clamp(1, i64::MAX as u128).to_string();
        let reply = self.with_conn("take", |c| self.take.run(c, &[&list], &[ttl.as_bytes()]))?;
        let stored = match reply {
            Value::Bulk(b) => b,
            _ => return Ok(None),
        };
        let text = stored
            .iter()
            .position(|&b| b == b':')
            .and_then(|c| std::str::from_utf8(&stored[c + 1..]).ok())
            .map(str::to_owned);
        match text {
            Some(text) => Ok(Some((text, stored))),
            None => {
                log::warn!("mailbox {key:?}: skipped a malformed message in Redis");
                Ok(None)
            }
        }
    }

    /// Puts a taken message back at the front of its mailbox.
    pub(crate) fn untake(
        &self,
        key: &str,
        stored: &[u8],
        ttl: Duration,
    ) -> Result<(), StorageError> {
        let list = mailbox_key(key);
        let ttl = ttl.as_millis().clamp(1, i64::MAX as u128).to_string();
        self.with_conn("put a message back", |c| {
            self.untake.run(
                c,
                &[&list, CTL_KEY.as_bytes()],
                &[stored, ttl.as_bytes(), key.as_bytes(), CTL_LEN.as_bytes()],
            )
        })?;
        Ok(())
    }

    /// Messages waiting in `key` (0 when Redis cannot say).
    pub(crate) fn mailbox_len(&self, key: &str) -> usize {
        let list = mailbox_key(key);
        match self.with_conn_retry("count a mailbox", |c| c.command(&[b"LLEN", &list])) {
            Ok(Value::Int(n)) => usize::try_from(n).unwrap_or(0),
            _ => 0,
        }
    }

    /// Stops the reader (it exits after its current read).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.reader.get() {
            t.unpark();
        }
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// The id of a stream entry `[id, fields]`.
fn entry_id(entry: &Value) -> Option<EventId> {
    entry.items()?.first().and_then(parse_id)
}

/// The topic's entry number `n` of a stream entry, if it has one.
fn entry_seq(entry: &Value) -> Option<u64> {
    let [_, fields] = entry.items()? else {
        return None;
    };
    fields
        .items()?
        .chunks(2)
        .find(|p| p.first().and_then(Value::as_bytes) == Some(b"n"))
        .and_then(|p| p.get(1)?.as_str()?.parse().ok())
}

/// The topics of an entry of the stream of every update (field `t`,
/// parted by line feeds).
fn entry_topics(entry: &Value) -> Option<Box<[Box<str>]>> {
    let [_, fields] = entry.items()? else {
        return None;
    };
    let names = fields
        .items()?
        .chunks(2)
        .find(|p| p.first().and_then(Value::as_bytes) == Some(b"t"))
        .and_then(|p| p.get(1)?.as_str())?;
    Some(names.split('\n').map(Box::from).collect())
}

/// `[id, [field, value, ...]]` as the frame a subscriber gets, whether it
/// is private (field `p`), and whether it is one of an update's several
/// topics (field `m`).
fn entry_frame(entry: &Value) -> Option<(Retained, bool)> {
    let [id, fields] = entry.items()? else {
        return None;
    };
    let id_text = id.as_str()?;
    let id: EventId = id_text.parse().ok()?;
    let (mut frame, mut at, mut private, mut several) = (None, None, false, false);
    let mut shown = id_text;
    for pair in fields.items()?.chunks(2) {
        let [name, value] = pair else { break };
        match name.as_bytes()? {
            b"f" => frame = value.as_bytes(),
            b"o" => at = value.as_str().and_then(|s| s.parse::<usize>().ok()),
            b"p" => private = value.as_bytes() == Some(b"1"),
            b"m" => several = value.as_bytes() == Some(b"1"),
            b"i" => shown = value.as_str()?,
            _ => {}
        }
    }
    let (frame, at) = (frame?, at?);
    if at > frame.len() || !frame.ends_with(b"\n\n") {
        return None;
    }
    let mut bytes = Vec::with_capacity(frame.len() + shown.len() + 5);
    bytes.extend_from_slice(&frame[..at]);
    bytes.extend_from_slice(b"id: ");
    bytes.extend_from_slice(shown.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(&frame[at..]);
    let retained = Retained {
        id,
        frame: EncodedEvent::from_parts(bytes),
        private,
    };
    Some((retained, several))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_get_their_id_where_the_encoder_puts_it() {
        let entry = Value::Array(vec![
            Value::Bulk(b"1700000000000-3".to_vec()),
            Value::Array(vec![
                Value::Bulk(b"f".to_vec()),
                Value::Bulk(b"event: x\ndata: hi\n\n".to_vec()),
                Value::Bulk(b"o".to_vec()),
                Value::Bulk(b"9".to_vec()),
            ]),
        ]);
        let (e, several) = entry_frame(&entry).unwrap();
        assert!(!several);
        assert_eq!(e.id, EventId::new(1_700_000_000_000, 3));
        assert_eq!(
            e.frame.as_bytes(),
            b"event: x\nid: 1700000000000-3\ndata: hi\n\n"
        );
        assert!(!e.private);
        let Value::Array(mut parts) = entry else {
            unreachable!()
        };
        if let Some(Value::Array(fields)) = parts.get_mut(1) {
            fields.extend([Value::Bulk(b"p".to_vec()), Value::Bulk(b"1".to_vec())]);
        }
        assert!(entry_frame(&Value::Array(parts)).unwrap().0.private);
        let bad = Value::Array(vec![
            Value::Bulk(b"1-1".to_vec()),
            Value::Array(vec![
                Value::Bulk(b"f".to_vec()),
                Value::Bulk(b"data: hi\n\n".to_vec()),
                Value::Bulk(b"o".to_vec()),
                Value::Bulk(b"99".to_vec()),
            ]),
        ]);
        assert!(entry_frame(&bad).is_none());
    }
}
