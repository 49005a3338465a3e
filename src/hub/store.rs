//! Durable history and mailboxes (feature `durable`): an embedded SQLite
//! database in one directory, so retained events and waiting mailbox
//! messages survive a restart, a crash or `kill -9` of the process.
//!
//! [`open_hub`] is the whole story for most callers (the daemon's
//! `data_dir` uses it): a [`Hub`] whose [`History`] is a [`DurableHistory`]
//! and whose mailboxes are kept by its [`DurableMailboxes`].
//!
//! # What survives what
//!
//! The database is `DIR/ssed.sqlite3`, in WAL mode with `synchronous =
//! NORMAL`. Every publish (and every mailbox push and take) is one small
//! transaction, appended to the write-ahead log with `write(2)` before the
//! hub answers: once a publisher has its `200`, the kernel has the event,
//! and a crash or `kill -9` of ssed loses nothing. A power loss or a kernel
//! crash can roll back the last moments of writes (those the kernel had not
//! written back yet), never corrupt the file. Covering that too takes an
//! `fdatasync` per publish (`synchronous = FULL`), five times the cost or
//! more; the README has the measurements.
//!
//! One process at a time: the database is opened with an exclusive lock,
//! and a second ssed on the same directory stops with
//! [`StoreError::InUse`]. After a crash the next open replays the log.
//!
//! # Reads stay in memory
//!
//! [`DurableHistory`] keeps what it retains in a [`MemoryHistory`] too
//! (filled on open), so a resume never reads the disk. Only writes go to the
//! database, under the local engine's lock, in id order.
//!
//! # Tables
//!
//! - `events (topic, ms, seq, frame)`: the retained events, each as the
//!   frame subscribers receive; `history` per topic, plus fewer than 64
//!   already evicted from memory and deleted in batches (so most publishes
//!   write a single page), and trimmed away on the next open;
//! - `topics (topic, ms, seq)`: the newest id deleted from each topic, so
//!   a resume from before it gets `event: reset`;
//! - `mailbox (seq, key, pushed_ms, message)`: waiting mailbox messages;
//! - `meta (key, value)`: `floor_ms`, when the store was created; it knows
//!   every event published since, so an id after it needs no reset;
//!   `forgotten_ms` and `forgotten_seq`, the newest id deleted from a topic
//!   that has no event left (such a topic keeps no row in `topics`, so
//!   topics published once do not accumulate).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, ErrorCode, params};

use crate::error::Report;
use crate::event::EncodedEvent;
use crate::hub::history::{
    EveryPage, Evicted, History, MemoryHistory, Replay, Retained, StorageError,
};
use crate::hub::id::EventId;
use crate::hub::mailbox::{MailboxStore, StoredMessage};
use crate::hub::{Hub, HubConfig};

/// The database's file name inside the data directory.
pub const DB_FILE: &str = "ssed.sqlite3";
/// The layout this version writes, kept in SQLite's `user_version`: 2
/// marks private updates (`events.private`); a layout 1 file (from before
/// private updates) is brought up to 2 when opened.
const SCHEMA_VERSION: i64 = 2;
const SCHEMA: &str = "
    CREATE TABLE events (
        topic TEXT NOT NULL, ms INTEGER NOT NULL, seq INTEGER NOT NULL, frame BLOB NOT NULL,
        private INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (topic, ms, seq)
    ) WITHOUT ROWID;
    CREATE TABLE topics (
        topic TEXT PRIMARY KEY, ms INTEGER NOT NULL, seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE mailbox (
        seq INTEGER PRIMARY KEY, key TEXT NOT NULL, pushed_ms INTEGER NOT NULL, message TEXT NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
";
/// Rows a topic may keep in the database past `capacity` before they are
/// deleted, 64 at a time: most publishes then write one page (the new
/// row), not three (the new row, the oldest row's page, the topic's
/// eviction mark). What is served is trimmed exactly, in memory.
const TRIM_SLACK: usize = 64;
const INSERT_EVENT: &str =
    "INSERT INTO events (topic, ms, seq, frame, private) VALUES (?1, ?2, ?3, ?4, ?5)";
/// Layout 1 to 2: every event kept so far was public.
const MIGRATE_1_TO_2: &str = "ALTER TABLE events ADD COLUMN private INTEGER NOT NULL DEFAULT 0;";
/// Deletes a topic's events up to an id (inclusive).
const TRIM_EVENTS: &str = "DELETE FROM events WHERE topic = ?1 AND (ms, seq) <= (?2, ?3)";
const SET_EVICTED: &str = "INSERT INTO topics (topic, ms, seq) VALUES (?1, ?2, ?3) \
     ON CONFLICT (topic) DO UPDATE SET ms = excluded.ms, seq = excluded.seq";
/// A topic with no event left needs no mark of its own: `forgotten` in
/// `meta` covers it.
const DROP_MARK: &str = "DELETE FROM topics WHERE topic = ?1";
const SET_META: &str = "INSERT INTO meta (key, value) VALUES (?1, ?2) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// Why a store could not be opened.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The data directory does not exist and could not be created.
    Dir {
        /// The directory.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// Another process (another ssed) has the database open.
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The database was written by a newer ssed, in a layout this one does
    /// not know.
    Version {
        /// The database file.
        path: PathBuf,
        /// Its layout version.
        found: i64,
    },
    /// The database could not be opened, set up or read (not an SQLite
    /// file, no permission, a disk error).
    Database {
        /// The database file.
        path: PathBuf,
        /// What failed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// The directory or database file concerned.
    pub fn path(&self) -> &Path {
        match self {
            StoreError::Dir { path, .. }
            | StoreError::InUse { path }
            | StoreError::Version { path, .. }
            | StoreError::Database { path, .. } => path,
        }
    }

    fn database(path: &Path, e: rusqlite::Error) -> Self {
        if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) {
            return StoreError::InUse {
                path: path.to_owned(),
            };
        }
        StoreError::Database {
            path: path.to_owned(),
            source: Box::new(e),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Dir { path, .. } => {
                write!(f, "cannot create data directory {}", path.display())
            }
            StoreError::InUse { path } => write!(
                f,
                "store {} is in use by another process (another ssed on the same data_dir?)",
                path.display()
            ),
            StoreError::Version { path, found } => write!(
                f,
                "store {} has layout version {found}; this ssed knows up to {SCHEMA_VERSION}",
                path.display()
            ),
            StoreError::Database { path, .. } => {
                write!(f, "cannot open store {}", path.display())
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Dir { source, .. } => Some(source),
            StoreError::Database { source, .. } => Some(source.as_ref()),
            StoreError::InUse { .. } | StoreError::Version { .. } => None,
        }
    }
}

/// A [`Hub`] whose history (the last `history` events of each topic) and
/// mailboxes are kept in `dir`, created if missing: what was kept there is
/// retained and waiting again, and ids continue after the newest one ever
/// stored.
///
/// # Errors
///
/// See [`DurableHistory::open`].
///
/// # Examples
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("ssed-doc-{}", std::process::id()));
/// let hub = ssed::hub::store::open_hub(&dir, 1000, ssed::HubConfig::default())?;
/// let first = hub.publish("news", ssed::Event::new().data("kept"))?.id;
/// drop(hub);
///
/// let hub = ssed::hub::store::open_hub(&dir, 1000, ssed::HubConfig::default())?;
/// assert!(hub.publish("news", ssed::Event::new().data("next"))?.id > first);
/// # drop(hub);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open_hub(dir: &Path, history: usize, config: HubConfig) -> Result<Hub, StoreError> {
    let durable = DurableHistory::open(dir, history)?;
    let mailboxes = durable.mailboxes();
    let path = durable.db.path.to_path_buf();
    Hub::with_stores(Box::new(durable), Box::new(mailboxes), config).map_err(|e| {
        StoreError::Database {
            path,
            source: Box::new(e),
        }
    })
}

/// The connection, shared by the history and the mailboxes of one store.
#[derive(Clone)]
struct Db {
    conn: Arc<Mutex<Connection>>,
    path: Arc<Path>,
}

impl Db {
    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic inside a transaction drops it, which rolls it back: the
        // connection is consistent, keep using it.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A [`History`] kept in an SQLite database, with a copy in memory for
/// reads; see the [module docs](self).
pub struct DurableHistory {
    db: Db,
    capacity: usize,
    cache: MemoryHistory,
    last_id: Option<EventId>,
    /// Per topic: rows evicted from the cache but still in the database
    /// (fewer than [`TRIM_SLACK`]).
    untrimmed: HashMap<Box<str>, usize>,
}

impl fmt::Debug for DurableHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableHistory")
            .field("path", &self.db.path)
            .field("capacity", &self.capacity)
            .field("last_id", &self.last_id)
            .finish_non_exhaustive()
    }
}

impl DurableHistory {
    /// Opens (or creates) the store in `dir`, creating the directory if
    /// missing (mode 0700), and loads the last `capacity` events of every topic. If
    /// `capacity` is smaller than when they were stored, the older events
    /// are deleted now.
    ///
    /// # Errors
    ///
    /// [`StoreError::Dir`] when the directory cannot be created,
    /// [`StoreError::InUse`] when another process has the store open,
    /// [`StoreError::Version`] for a store of a newer ssed,
    /// [`StoreError::Database`] when the file is not a usable database.
    pub fn open(dir: &Path, capacity: usize) -> Result<DurableHistory, StoreError> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        // Event payloads and mailbox messages are the publishers' data: a
        // directory made here is the daemon user's alone.
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let err = |e| StoreError::database(&path, e);
        let mut conn = Connection::open(&path).map_err(err)?;
        setup(&mut conn, &path)?;
        let (cache, last_id, retained) = load(&mut conn, capacity).map_err(err)?;
        log::info!(
            "store {}: {retained} events retained, last id {}",
            path.display(),
            last_id.map_or_else(|| "none".to_owned(), |id| id.to_string()),
        );
        Ok(DurableHistory {
            db: Db {
                conn: Arc::new(Mutex::new(conn)),
                path: path.into(),
            },
            capacity,
            cache,
            last_id,
            untrimmed: HashMap::new(),
        })
    }

    /// The mailbox store of the same database, for [`Hub::with_stores`].
    pub fn mailboxes(&self) -> DurableMailboxes {
        DurableMailboxes {
            db: self.db.clone(),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.db.path
    }

    /// One transaction: the event (unless nothing is kept) and, with
    /// `trim`, the deletion of the topic's rows up to it and its eviction
    /// mark.
    fn write(&self, topic: &str, event: &Retained, trim: Option<EventId>) -> rusqlite::Result<()> {
        let mut conn = self.db.lock();
        let tx = conn.transaction()?;
        if self.capacity > 0 {
            let id = event.id;
            tx.prepare_cached(INSERT_EVENT)?.execute(params![
                topic,
                int(id.millis())?,
                int(id.seq())?,
                event.frame.as_bytes(),
                event.private
            ])?;
        }
        match trim {
            Some(ev) if self.capacity == 0 => set_forgotten(&tx, ev)?,
            Some(ev) => {
                let (ms, seq) = (int(ev.millis())?, int(ev.seq())?);
                tx.prepare_cached(TRIM_EVENTS)?
                    .execute(params![topic, ms, seq])?;
                tx.prepare_cached(SET_EVICTED)?
                    .execute(params![topic, ms, seq])?;
            }
            None => {}
        }
        tx.commit()
    }

    /// Deletes what the cache dropped to keep within the hub's budget: each
    /// topic's rows up to its newest dropped id, and the mark of a topic
    /// left with no event (`forgotten` covers it).
    fn write_drops(&self, dropped: &[Evicted]) -> rusqlite::Result<()> {
        let mut newest: HashMap<&str, (EventId, bool)> = HashMap::new();
        for e in dropped {
            // Drops come oldest first: the last one of a topic is its newest.
            newest.insert(&e.topic, (e.id, e.forgotten));
        }
        let mut conn = self.db.lock();
        let tx = conn.transaction()?;
        for (topic, (id, forgotten)) in &newest {
            let (ms, seq) = (int(id.millis())?, int(id.seq())?);
            tx.prepare_cached(TRIM_EVENTS)?
                .execute(params![topic, ms, seq])?;
            if *forgotten {
                tx.prepare_cached(DROP_MARK)?.execute(params![topic])?;
            } else {
                tx.prepare_cached(SET_EVICTED)?
                    .execute(params![topic, ms, seq])?;
            }
        }
        if let Some(f) = self.cache.forgotten() {
            set_forgotten(&tx, f)?;
        }
        tx.commit()
    }
}

/// Records `id` as the newest deleted from a topic with no event left.
fn set_forgotten(tx: &rusqlite::Transaction<'_>, id: EventId) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(SET_META)?;
    stmt.execute(params!["forgotten_ms", int(id.millis())?])?;
    stmt.execute(params!["forgotten_seq", int(id.seq())?])?;
    Ok(())
}

impl History for DurableHistory {
    fn append(&mut self, topic: &str, event: Retained) -> Result<(), StorageError> {
        let evicted = self.cache.evicts(topic, event.id);
        let behind = self.untrimmed.get(topic).copied().unwrap_or(0);
        // With nothing kept, the mark is the only record of the id (and
        // of the last id, after a restart): always write it.
        let trim = evicted.filter(|_| self.capacity == 0 || behind + 1 >= TRIM_SLACK);
        if let Err(e) = self.write(topic, &event, trim) {
            log::error!(
                "cannot store an event of topic {topic:?} in {}: {}",
                self.db.path.display(),
                Report(&e)
            );
            return Err(StorageError::new(e));
        }
        match (evicted, trim) {
            (Some(_), Some(_)) => {
                self.untrimmed.remove(topic);
            }
            (Some(_), None) => match self.untrimmed.get_mut(topic) {
                Some(n) => *n += 1,
                None => {
                    self.untrimmed.insert(topic.into(), 1);
                }
            },
            (None, _) => {}
        }
        self.last_id = self.last_id.max(Some(event.id));
        self.cache.push(topic, event);
        Ok(())
    }

    fn since(&self, topic: &str, after: EventId) -> Replay {
        self.cache.since(topic, after)
    }

    fn page(&self, topic: &str, after: EventId, until: EventId, max: usize) -> Replay {
        self.cache.page(topic, after, until, max)
    }

    fn id_of(&self, alias: &str) -> Option<EventId> {
        self.cache.id_of(alias)
    }

    fn page_every(
        &self,
        after: EventId,
        until: EventId,
        max: usize,
        first: bool,
        wanted: &mut dyn FnMut(&str) -> Option<bool>,
    ) -> Option<EveryPage> {
        self.cache.page_every(after, until, max, first, wanted)
    }

    fn retained_bytes(&self) -> u64 {
        self.cache.retained_bytes()
    }

    fn shrink_to(&mut self, bytes: u64) -> Result<u64, StorageError> {
        let dropped = self.cache.shrink(bytes);
        if dropped.is_empty() {
            return Ok(0);
        }
        for e in &dropped {
            self.untrimmed.remove(&*e.topic);
        }
        // Memory is what the budget bounds: the cache has let them go. Rows
        // left on disk by a failed delete come back at the next start,
        // which drops them again.
        self.write_drops(&dropped).map_err(|e| {
            log::error!(
                "cannot delete events dropped for max_retained_bytes from {}: {}",
                self.db.path.display(),
                Report(&e)
            );
            StorageError::new(e)
        })?;
        Ok(dropped.len() as u64)
    }

    fn last_id(&self) -> Option<EventId> {
        self.last_id
    }
}

/// The [`MailboxStore`] of a [`DurableHistory`]'s database.
pub struct DurableMailboxes {
    db: Db,
}

impl fmt::Debug for DurableMailboxes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableMailboxes")
            .field("path", &self.db.path)
            .finish()
    }
}

impl DurableMailboxes {
    fn logged<T>(&self, what: &str, r: rusqlite::Result<T>) -> Result<T, StorageError> {
        r.map_err(|e| {
            log::error!(
                "cannot {what} in {}: {}",
                self.db.path.display(),
                Report(&e)
            );
            StorageError::new(e)
        })
    }
}

impl MailboxStore for DurableMailboxes {
    fn load(&mut self) -> Result<Vec<StoredMessage>, StorageError> {
        let conn = self.db.lock();
        let read = || -> rusqlite::Result<Vec<StoredMessage>> {
            let mut stmt =
                conn.prepare("SELECT seq, key, pushed_ms, message FROM mailbox ORDER BY seq")?;
            let rows = stmt.query_map([], |row| {
                Ok(StoredMessage {
                    seq: uint(row.get(0)?, 0)?,
                    key: row.get(1)?,
                    pushed_ms: uint(row.get(2)?, 2)?,
                    text: row.get(3)?,
                })
            })?;
            rows.collect()
        };
        let r = read();
        drop(conn);
        self.logged("read mailboxes", r)
    }

    fn put(&mut self, m: &StoredMessage) -> Result<(), StorageError> {
        let r = (|| {
            self.db
                .lock()
                .prepare_cached(
                    "INSERT INTO mailbox (seq, key, pushed_ms, message) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![int(m.seq)?, m.key, int(m.pushed_ms)?, m.text])
        })();
        self.logged("store a mailbox message", r).map(drop)
    }

    fn remove(&mut self, seq: u64) -> Result<(), StorageError> {
        let r = (|| {
            self.db
                .lock()
                .prepare_cached("DELETE FROM mailbox WHERE seq = ?1")?
                .execute([int(seq)?])
        })();
        // The hub logs a failure, naming the mailbox.
        r.map(drop).map_err(StorageError::new)
    }

    fn remove_many(&mut self, seqs: &[u64]) -> Result<(), StorageError> {
        // One transaction: expiring a hundred thousand messages is one
        // commit, not a hundred thousand.
        let r = (|| {
            let mut conn = self.db.lock();
            let tx = conn.transaction()?;
            {
                let mut delete = tx.prepare_cached("DELETE FROM mailbox WHERE seq = ?1")?;
                for &seq in seqs {
                    delete.execute([int(seq)?])?;
                }
            }
            tx.commit()
        })();
        r.map_err(StorageError::new)
    }
}

/// Takes the exclusive lock, sets the journal up and creates or checks
/// the tables.
fn setup(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let err = |e| StoreError::database(path, e);
    // Another process holding the lock is an error to report now, not to
    // wait out (rusqlite waits 5 s by default).
    conn.busy_timeout(std::time::Duration::ZERO).map_err(err)?;
    // Exclusive before WAL: the WAL index then lives in this process's
    // memory (no `-shm` file), and the lock taken by the first write below
    // is held until the connection closes, keeping a second ssed out.
    conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
        .map_err(err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Database {
            path: path.to_owned(),
            source: format!("journal mode is {mode:?}, not WAL").into(),
        });
    }
    // NORMAL in WAL mode: a commit is a write(2) to the log, durable once
    // it returns against anything but a power loss or kernel crash; the
    // log is fsynced at each checkpoint. See the module docs.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(err)?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .map_err(err)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(err)?;
    match version {
        0 => {
            tx.execute_batch(SCHEMA).map_err(err)?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('floor_ms', ?1)",
                [int(now_ms()).map_err(err)?],
            )
            .map_err(err)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(err)?;
        }
        1 => {
            tx.execute_batch(MIGRATE_1_TO_2).map_err(err)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(err)?;
        }
        SCHEMA_VERSION => {}
        found => {
            return Err(StoreError::Version {
                path: path.to_owned(),
                found,
            });
        }
    }
    tx.commit().map_err(err)
}

/// Reads the retained events into a cache, trimming each topic to
/// `capacity` (in the database too), and finds the newest id ever stored;
/// also returns how many events it retains.
fn load(
    conn: &mut Connection,
    capacity: usize,
) -> rusqlite::Result<(MemoryHistory, Option<EventId>, usize)> {
    let floor_ms: i64 =
        conn.query_row("SELECT value FROM meta WHERE key = 'floor_ms'", [], |r| {
            r.get(0)
        })?;
    let mut cache = MemoryHistory::with_floor(capacity, EventId::floor_of(uint(floor_ms, 0)?));
    let mut last_id: Option<EventId> = None;
    let meta = |key: &str| -> rusqlite::Result<Option<u64>> {
        match conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, i64>(0)
        }) {
            Ok(v) => uint(v, 0).map(Some),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
            Err(e) => Err(e),
        }
    };
    if let (Some(ms), Some(seq)) = (meta("forgotten_ms")?, meta("forgotten_seq")?) {
        let id = EventId::new(ms, seq);
        cache.note_forgotten(id);
        last_id = Some(id);
    }
    let id_at = |row: &rusqlite::Row<'_>, i: usize| -> rusqlite::Result<EventId> {
        Ok(EventId::new(
            uint(row.get(i)?, i)?,
            uint(row.get(i + 1)?, i + 1)?,
        ))
    };
    {
        let mut stmt = conn.prepare("SELECT topic, ms, seq FROM topics")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (topic, id): (String, EventId) = (row.get(0)?, id_at(row, 1)?);
            cache.note_evicted(&topic, id);
            last_id = last_id.max(Some(id));
        }
    }
    // The newest id each topic loses now because `capacity` shrank.
    let mut trims: Vec<(String, EventId)> = Vec::new();
    let mut retained = 0usize;
    {
        let mut stmt = conn
            .prepare("SELECT topic, ms, seq, frame, private FROM events ORDER BY topic, ms, seq")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (topic, id): (String, EventId) = (row.get(0)?, id_at(row, 1)?);
            last_id = last_id.max(Some(id));
            let Some(frame) = EncodedEvent::from_stored(row.get(3)?) else {
                log::warn!("store: skipping event {id} of topic {topic:?}: not a frame");
                continue;
            };
            retained += 1;
            if let Some(ev) = cache.evicts(&topic, id) {
                retained -= 1; // one out for one in (or this one, if none is kept)
                match trims.last_mut() {
                    Some((t, newest)) if *t == topic => *newest = ev,
                    _ => trims.push((topic.clone(), ev)),
                }
            }
            let private = row.get(4)?;
            cache.push(&topic, Retained { id, frame, private });
        }
    }
    // Topics with a mark and no event (all deleted, or `capacity` 0) are
    // forgotten: `forgotten` covers them, their rows go.
    let empty = cache.forget_empty();
    if !trims.is_empty() || !empty.is_empty() {
        let tx = conn.transaction()?;
        for (topic, ev) in &trims {
            let (ms, seq) = (int(ev.millis())?, int(ev.seq())?);
            tx.execute(TRIM_EVENTS, params![topic, ms, seq])?;
            tx.execute(SET_EVICTED, params![topic, ms, seq])?;
        }
        for topic in &empty {
            tx.execute(DROP_MARK, params![&**topic])?;
        }
        if let Some(f) = cache.forgotten() {
            set_forgotten(&tx, f)?;
        }
        tx.commit()?;
    }
    Ok((cache, last_id, retained))
}

/// A `u64` as SQLite's signed integer (ids and times stay far below 2^63).
fn int(v: u64) -> rusqlite::Result<i64> {
    i64::try_from(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Column `i`'s signed integer as a `u64`.
fn uint(v: i64, i: usize) -> rusqlite::Result<u64> {
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
