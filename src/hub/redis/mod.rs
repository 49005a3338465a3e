//! Redis as the shared engine of several ssed nodes.
//!
//! A hub made with [`Hub::with_redis`] keeps no history of its own: every
//! node behind a load balancer publishes into, replays from and takes
//! mailbox messages out of the same Redis, so a client may reconnect to any
//! node.
//!
//! - **Topics** are Redis Streams, one per topic (key `ssed:t:{topic}`),
//!   trimmed to the last `history` entries. A publish runs one script that
//!   picks the id, `XADD`s the frame and records the id as the newest
//!   (`ssed:last`): ids are Redis entry ids (`<unix-ms>-<seq>`), identical on
//!   every node and increasing across all topics, so `Last-Event-ID` means
//!   the same thing everywhere.
//! - **Delivery**: each node runs one reader thread that blocks in `XREAD`
//!   on the topics its subscribers follow (not one per subscriber) and fans
//!   each entry out to them. A publish returns once Redis has the event; its
//!   local subscribers get it from the reader like everyone else's.
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
//! Keys: `ssed:t:{topic}` (streams; they stay in Redis, each bounded by
//! `history`), `ssed:k:{key}` (lists, expiring), `ssed:ctl` (about 1000
//! entries) and `ssed:last`. Give ssed a database of its own (`/db` in the
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

pub(crate) mod resp;
mod scripts;

use scripts::{PAGE, PUBLISH, PUSH, Script, TAKE, UNTAKE};

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::event::EncodedEvent;
use crate::hub::history::{Replay, Retained, StorageError};
use crate::hub::id::EventId;
use crate::hub::redis::resp::{Conn, RedisUrl, RespError, Value};
use crate::hub::{PAGE_BYTES, WeakHub};

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

/// Connect timeout, and the timeout of every ordinary command.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long one blocking `XREAD` waits (the reader checks whether its hub
/// still exists between two).
const BLOCK: Duration = Duration::from_secs(2);
/// Most entries taken from one stream per `XREAD`.
const READ_COUNT: usize = 1000;
/// Most command connections a node opens.
const POOL_MAX: usize = 16;
/// After a failed connect, commands fail at once for this long instead of
/// each waiting for its own connect.
const FAIL_FAST: Duration = Duration::from_millis(200);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every value behind these locks is replaced whole: a panic elsewhere
    // cannot leave one half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a node's Redis connection stands, as [`Hub::redis_state`]
/// reports it.
///
/// [`Hub::redis_state`]: crate::Hub::redis_state
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisState {
    /// Whether the reader is connected (events from other nodes flow).
    pub connected: bool,
    /// Times the reader connected again after losing its connection.
    pub reconnects: u64,
    /// Failed commands and connects (publishes, pushes, replays, reads).
    pub errors: u64,
    /// The most recent error, without the password.
    pub last_error: Option<String>,
}

/// A command connection pool: up to [`POOL_MAX`] connections, idle ones
/// kept for the next command.
struct Pool {
    url: RedisUrl,
    idle: Mutex<Vec<Conn>>,
    open: Mutex<usize>,
    freed: Condvar,
    /// Until when commands fail at once, and why.
    down: Mutex<Option<(Instant, String)>>,
}

impl Pool {
    /// An idle connection that is still alive, if any. One that Redis
    /// closed while it sat here (a restart, Redis's idle `timeout`) is
    /// dropped: a command sent on it could not tell whether it ran.
    fn idle_alive(&self) -> Option<Conn> {
        loop {
            let conn = lock(&self.idle).pop()?;
            if !conn.is_dead() {
                return Some(conn);
            }
            self.release();
        }
    }

    /// A connection: an idle one still alive, or a new one.
    fn get(&self) -> Result<Conn, RespError> {
        if let Some(conn) = self.idle_alive() {
            return Ok(conn);
        }
        if let Some((until, why)) = lock(&self.down).as_ref()
            && Instant::now() < *until
        {
            return Err(RespError::Io(std::io::Error::other(why.clone())));
        }
        {
            let deadline = Instant::now() + TIMEOUT;
            let mut open = lock(&self.open);
            while *open >= POOL_MAX {
                let idle = lock(&self.idle).pop();
                if let Some(conn) = idle {
                    if !conn.is_dead() {
                        return Ok(conn);
                    }
                    *open = open.saturating_sub(1); // dropped: room for a new one
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(RespError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "all Redis connections are busy",
                    )));
                }
                open = self
                    .freed
                    .wait_timeout(open, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            *open += 1;
        }
        match Conn::connect(&self.url, "ssed", TIMEOUT) {
            Ok(conn) => {
                *lock(&self.down) = None;
                Ok(conn)
            }
            Err(e) => {
                // A refused connect fails at once anyway; one that timed out
                // (a host gone silent) should not make every request wait.
                if let RespError::Io(io) = &e
                    && matches!(
                        io.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    )
                {
                    *lock(&self.down) = Some((Instant::now() + FAIL_FAST, e.to_string()));
                }
                self.release();
                Err(e)
            }
        }
    }

    /// Closes every idle connection (Redis went away: they are most likely
    /// dead).
    fn clear_idle(&self) {
        let idle = std::mem::take(&mut *lock(&self.idle));
        let mut open = lock(&self.open);
        *open = open.saturating_sub(idle.len());
        self.freed.notify_all();
    }

    fn put(&self, conn: Conn) {
        lock(&self.idle).push(conn);
        // Under `open`, which a waiter holds from finding no idle
        // connection until it sleeps: the notice cannot fall in between.
        let _open = lock(&self.open);
        self.freed.notify_one();
    }

    /// One connection fewer (it broke, or never opened).
    fn release(&self) {
        let mut open = lock(&self.open);
        *open = open.saturating_sub(1);
        self.freed.notify_one();
    }
}

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

/// A taken mailbox message: its text and the stored form that puts it
/// back.
pub(crate) struct Taken {
    pub text: String,
    pub stored: Vec<u8>,
}

/// A push refused or failed.
pub(crate) enum PushError {
    Full,
    Storage(StorageError),
}

/// The Redis side of a hub.
pub(crate) struct Engine {
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

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("url", &self.pool.url)
            .field("history", &self.history)
            .finish_non_exhaustive()
    }
}

fn storage(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StorageError {
    StorageError::new(e)
}

fn topic_key(topic: &str) -> Vec<u8> {
    [TOPIC_PREFIX.as_bytes(), topic.as_bytes()].concat()
}

fn mailbox_key(key: &str) -> Vec<u8> {
    [MAILBOX_PREFIX.as_bytes(), key.as_bytes()].concat()
}

fn parse_id(v: &Value) -> Option<EventId> {
    v.as_str()?.parse().ok()
}

impl Engine {
    pub(crate) fn new(url: RedisUrl, history: usize) -> Self {
        Engine {
            pool: Pool {
                url,
                idle: Mutex::new(Vec::new()),
                open: Mutex::new(0),
                freed: Condvar::new(),
                down: Mutex::new(None),
            },
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

    /// [`Engine::with_conn`] for commands that are safe to run twice
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
    /// `id_at`) to `topic`; returns the id Redis gave it.
    pub(crate) fn publish(
        &self,
        topic: &str,
        frame: &[u8],
        id_at: usize,
    ) -> Result<EventId, StorageError> {
        let key = topic_key(topic);
        let maxlen = self.history.max(1).to_string();
        let at = id_at.to_string();
        let reply = self.with_conn("publish", |c| {
            self.publish.run(
                c,
                &[&key, LAST_KEY.as_bytes(), SEQ_KEY.as_bytes()],
                &[maxlen.as_bytes(), frame, at.as_bytes()],
            )
        })?;
        parse_id(&reply).ok_or_else(|| storage(format!("redis publish: odd reply {reply:?}")))
    }

    /// The newest id issued in Redis (`0-0` before the first).
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
        let key = topic_key(topic);
        let start = format!("({after}");
        let end = until.to_string();
        let count = count.max(1).to_string();
        let budget = PAGE_BYTES.to_string();
        let reply = self.with_conn_retry("replay", |c| {
            self.page.run(
                c,
                &[&key, SEQ_KEY.as_bytes()],
                &[
                    start.as_bytes(),
                    end.as_bytes(),
                    count.as_bytes(),
                    budget.as_bytes(),
                ],
            )
        })?;
        let [first, trimmed, entries, newest, cut] = reply.items().unwrap_or_default() else {
            return Err(storage(format!("redis replay: odd reply {reply:?}")));
        };
        let first = parse_id(first);
        let trimmed = int(trimmed) == Some(1);
        let events = entries
            .items()
            .unwrap_or_default()
            .iter()
            .filter_map(entry_frame)
            .map(|(id, frame)| Retained { id, frame })
            .collect();
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
        let page = Replay {
            events,
            gap,
            oldest: first,
        };
        Ok((page, int(cut) == Some(1)))
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

    /// Takes the oldest live message of `key`, if any.
    pub(crate) fn take(&self, key: &str, ttl: Duration) -> Result<Option<Taken>, StorageError> {
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
            Some(text) => Ok(Some(Taken { text, stored })),
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

/// `[id, [field, value, ...]]` as the frame a subscriber gets.
fn entry_frame(entry: &Value) -> Option<(EventId, EncodedEvent)> {
    let [id, fields] = entry.items()? else {
        return None;
    };
    let id_text = id.as_str()?;
    let id: EventId = id_text.parse().ok()?;
    let (mut frame, mut at) = (None, None);
    for pair in fields.items()?.chunks(2) {
        let [name, value] = pair else { break };
        match name.as_bytes()? {
            b"f" => frame = value.as_bytes(),
            b"o" => at = value.as_str().and_then(|s| s.parse::<usize>().ok()),
            _ => {}
        }
    }
    let (frame, at) = (frame?, at?);
    if at > frame.len() || !frame.ends_with(b"\n\n") {
        return None;
    }
    let mut bytes = Vec::with_capacity(frame.len() + id_text.len() + 5);
    bytes.extend_from_slice(&frame[..at]);
    bytes.extend_from_slice(b"id: ");
    bytes.extend_from_slice(id_text.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(&frame[at..]);
    Some((id, EncodedEvent::from_parts(bytes)))
}

/// Starts the reader thread of `engine` for `hub`.
pub(crate) fn start_reader(engine: Arc<Engine>, hub: WeakHub) -> std::io::Result<()> {
    let e = Arc::clone(&engine);
    let handle = std::thread::Builder::new()
        .name("ssed-redis".into())
        .spawn(move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader(&e, &hub)));
            if run.is_err() {
                e.connected.store(false, Ordering::Relaxed);
                log::error!("the Redis reader panicked; events from Redis stop on this node");
            }
        })?;
    let _ = engine.reader.set(handle.thread().clone());
    Ok(())
}

/// Sleeps `time` unless told to stop; false when told to stop.
fn pause(engine: &Engine, time: Duration) -> bool {
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

fn reader(engine: &Engine, hub: &WeakHub) {
    let url = engine.pool.url.clone();
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut ctl: Option<String> = None;
    let mut was_up = false;
    let mut stalled_since: Option<Instant> = None;
    // The entry number last read per followed topic.
    let mut seqs: HashMap<Box<str>, u64> = HashMap::new();
    loop {
        if engine.stop.load(Ordering::Relaxed) || !hub.alive() {
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
            hub,
            &mut conn,
            &mut ctl,
            &mut stalled_since,
            &mut seqs,
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

/// Reads and delivers until the connection fails (`Some(error)`) or the
/// reader must stop (`None`).
fn read_loop(
    engine: &Engine,
    hub: &WeakHub,
    conn: &mut Conn,
    ctl: &mut Option<String>,
    stalled_since: &mut Option<Instant>,
    seqs: &mut HashMap<Box<str>, u64>,
) -> Option<RespError> {
    let block = BLOCK.as_millis().to_string();
    let count = READ_COUNT.to_string();
    loop {
        if engine.stop.load(Ordering::Relaxed) || !hub.alive() {
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
        let hub = hub.upgrade()?;
        let mut batch: Vec<(Box<str>, EventId, EncodedEvent)> = Vec::new();
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
            let Some(topic) = key.strip_prefix(TOPIC_PREFIX) else {
                continue;
            };
            // How far this read went, counting entries that are not ssed's
            // frames (skipped, or the reader would read them forever).
            let Some(read_to) = entries.last().and_then(entry_id) else {
                continue;
            };
            let frames: Vec<(EventId, EncodedEvent)> =
                entries.iter().filter_map(entry_frame).collect();
            if frames.len() < entries.len() {
                engine.failed(
                    "reader",
                    &RespError::Protocol(format!(
                        "{} entries of {key} are not ssed events; skipped",
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
            batch.extend(frames.into_iter().map(|(id, f)| (topic.clone(), id, f)));
        }
        if let Some(b) = bound {
            batch.retain(|(_, id, _)| *id <= b);
        }
        batch.sort_by_key(|(_, id, _)| *id);
        {
            let mut wanted = lock(&engine.wanted);
            for (topic, read_to) in &read {
                if let Some(f) = wanted.get_mut(topic) {
                    f.cursor = f.cursor.max(bound.map_or(*read_to, |b| b.min(*read_to)));
                }
            }
        }
        for topic in &trimmed {
            hub.drop_subscribers(topic);
        }
        if !batch.is_empty() {
            hub.deliver_remote(batch);
        }
        for key in mailboxes {
            hub.notify_mailbox(&key);
        }
        // Topics no subscriber here follows any more start afresh.
        if seqs.len() > followed.len() {
            seqs.retain(|t, _| followed.iter().any(|(f, _)| f == t));
        }
    }
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
        let (id, frame) = entry_frame(&entry).unwrap();
        assert_eq!(id, EventId::new(1_700_000_000_000, 3));
        assert_eq!(
            frame.as_bytes(),
            b"event: x\nid: 1700000000000-3\ndata: hi\n\n"
        );
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
