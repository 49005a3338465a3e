//! PostgreSQL `LISTEN`/`NOTIFY` into hub topics (feature `postgres`).
//!
//! A [`Listener`] holds one connection to one database on one thread, the
//! same whether ten or ten thousand streams follow its topics: it runs
//! `LISTEN` on each channel and publishes every `NOTIFY` payload to the
//! channel's topic with [`Hub::publish`], so the event gets an id like any
//! other and `Last-Event-ID` replay covers it.
//!
//! The database may be down at start or go away later (a restart, a
//! failover, `pg_terminate_backend`): the listener then retries with capped,
//! jittered exponential backoff (100 ms doubling to 30 s), issues `LISTEN`
//! again on the new connection and logs each failure at `warn`, while the
//! server keeps serving. [`Listener::state`] says where it stands.
//!
//! Notifications sent while no connection is up are lost: PostgreSQL queues
//! them only for sessions that are listening. A client that needs every row
//! should read the table once it sees the stream (re)open.
//!
//! The connection is plain TCP or a Unix socket, without TLS: run it over
//! loopback, a Unix socket or a trusted network. Without TLS the server is
//! not authenticated either: whatever answers at the address may ask for
//! the password in clear (or as MD5) instead of SCRAM, and get it.
//!
//! # The client
//!
//! The connection is ssed's own: a small blocking client of the PostgreSQL
//! protocol (3.0) on the listener's thread, which does what `LISTEN` needs
//! and nothing else, rather than the `postgres` crate and the tokio runtime
//! under it (428 KiB more in the static binary: 4,701,480 bytes against
//! 4,263,208).
//!
//! - **Connection strings**: a URL (`postgres://` or `postgresql://`,
//!   percent-encoded parts, `[::1]` for IPv6, `host1:port1,host2:port2`,
//!   `%2Fvar%2Frun%2Fpostgresql` or `?host=/var/run/postgresql` for a Unix
//!   socket) or `key=value` pairs (`host=… port=… user=… password=…
//!   dbname=… application_name=… connect_timeout=…`, single quotes around a
//!   value with spaces). The keys are libpq's that the `postgres` crate
//!   took: also `options`, `hostaddr`, `tcp_user_timeout`, `keepalives`,
//!   `keepalives_idle`, `keepalives_interval`, `keepalives_retries`,
//!   `target_session_attrs`, `load_balance_hosts`, `sslmode`,
//!   `sslnegotiation`, `channel_binding`; another key is an error. Several
//!   hosts are tried in turn (each address of a name, too), and the error
//!   of the last one is reported. Without a user, the process's own user
//!   logs in, as with libpq.
//! - **TLS**: none. `sslmode` `disable`, `allow` and `prefer` (the
//!   default) connect in plain text, as before; `require`, `verify-ca`,
//!   `verify-full` and `channel_binding=require` are refused with the
//!   string (they could never connect).
//! - **Authentication**: `trust`, `password`, `md5` and `scram-sha-256`
//!   (without channel binding; the server's signature is checked). A
//!   non-ASCII password is used as its UTF-8 bytes, without SASLprep: give
//!   it in NFKC form. GSSAPI, SSPI, Kerberos and certificates are not done.
//! - **Timeouts**: `connect_timeout` (10 s unless set) bounds each address
//!   tried, TCP connect and handshake together; `TCP_USER_TIMEOUT` (30 s
//!   unless set) and keep-alives (on, 2 h idle unless set) guard the open
//!   connection, and an empty query checks it after 30 s without traffic.
//!   A handshake in progress notices [`Listener::stop`] within 250 ms (a
//!   name lookup or TCP connect does not: `stop` leaves them after 2 s).
//! - **Limits**: a message from the server over 1 MiB is refused from its
//!   header (a notification's payload is at most 8,000 bytes), and more
//!   than 1,000,000 SCRAM iterations are refused (PostgreSQL's default is
//!   4,096): a broken or hostile server costs a reconnect, not memory.
//!
//! ```no_run
//! use ssed::postgres::Listener;
//! use ssed::{Hub, ShutdownHandle};
//!
//! let hub = Hub::new(1000);
//! let shutdown = ShutdownHandle::new();
//! let listener = Listener::start(
//!     hub.clone(),
//!     "postgres://postgres@127.0.0.1/test",
//!     vec![("user_updates".into(), "user_updates".into())],
//!     shutdown.clone(),
//! );
//! // ... serve `hub` (`stream.follow(hub.subscribe(&["user_updates"], last_id)?)`) ...
//! println!("connected: {}", listener.state().connected);
//! listener.stop();
//! ```

use std::collections::HashMap;
use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

mod auth;
mod config;
mod md5;
mod wire;

pub(crate) use config::Config;
use wire::{Connection, Notification};

use crate::backoff::Backoff;
use crate::error::Report;
use crate::event::Event;
use crate::hub::Hub;
use crate::hub::id::valid_name;
use crate::shutdown::ShutdownHandle;

/// Longest channel name PostgreSQL keeps (`NAMEDATALEN - 1` bytes); a
/// longer one would be truncated by `LISTEN` and never match a `NOTIFY`.
pub const MAX_CHANNEL_LEN: usize = 63;
/// The `application_name` the listener's connection gets unless the URL
/// sets one, so operators can find it in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "ssed";

/// First delay before a retry.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between retries.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that stayed up this long resets the backoff; one that
/// drops sooner keeps growing it, so a flapping server is not hammered.
const STABLE: Duration = Duration::from_secs(10);
/// How long one wait for notifications lasts before the listener checks
/// whether it must stop.
const POLL: Duration = Duration::from_millis(250);
/// After this long without traffic the listener pings the server: a
/// connection cut without a FIN or RST (a dead host, a dropped NAT entry)
/// is otherwise only noticed by TCP keep-alives, after hours.
const IDLE_CHECK: Duration = Duration::from_secs(30);
/// How long that ping may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP user timeout unless the URL sets `tcp_user_timeout`: unacknowledged
/// data fails the socket after this, which bounds the client's close on a
/// dead connection.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Listener::stop`] waits for the thread; past it (the thread is
/// stuck in a connect or close it cannot interrupt) the thread is left to
/// finish on its own.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Whether `name` can be a channel: 1 to 63 bytes, no NUL.
///
/// The listener quotes channel names, so case and any other character are
/// kept exactly: `LISTEN "UserUpdates"` hears `pg_notify('UserUpdates', …)`
/// but not an unquoted `NOTIFY UserUpdates` (folded to `userupdates`).
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_CHANNEL_LEN && !name.contains('\0')
}

/// Quotes `name` as an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Where a [`Listener`] stands, as [`Listener::state`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerState {
    /// Whether a connection is up with `LISTEN` issued on every channel.
    pub connected: bool,
    /// Times the connection was made again after the first one was up
    /// (after a loss or a server restart).
    pub reconnects: u64,
    /// Notifications published to their topic.
    pub notifications: u64,
    /// The most recent error (connecting, listening or publishing), kept
    /// after a reconnect so it says why the last one happened. Never holds
    /// the password.
    pub last_error: Option<String>,
}

/// State shared by a [`Listener`] and its thread.
#[derive(Debug, Default)]
struct Shared {
    connected: AtomicBool,
    reconnects: AtomicU64,
    notifications: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn set_error(&self, error: String) {
        // A panic while holding this lock cannot leave a half-written
        // `Option<String>`: keep going with what is there.
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }
}

/// Forwards PostgreSQL notifications into a [`Hub`]: one thread and one
/// connection per database. See the [module docs](self).
///
/// Dropping it (or [`stop`](Listener::stop)) stops the thread; so does the
/// [`ShutdownHandle`] it was started with.
pub struct Listener {
    shared: Arc<Shared>,
    target: String,
    /// Dropped to tell the thread to stop.
    stop: Option<Sender<()>>,
    /// Disconnects when the thread ends (its sender is dropped on return
    /// or unwind).
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("target", &self.target)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Starts listening on `url`'s database: for each `(channel, topic)`
    /// pair, every `NOTIFY` payload on `channel` is published to `topic` as
    /// the event data. A channel may feed several topics and several
    /// channels one topic.
    ///
    /// `url` is a `postgres://user:password@host:port/db?option=value` URL
    /// or a `host=… user=… dbname=…` string, as libpq takes (see [the
    /// client](self#the-client)). Unless it says otherwise, the connection
    /// gets `application_name=ssed`, a 10 s connect timeout and a 30 s TCP
    /// user timeout.
    ///
    /// Returns at once: the connection is made on the listener's thread,
    /// retried with backoff until it succeeds, `stop` is called or
    /// `shutdown` fires. A `url` that does not parse or cannot connect (no
    /// host, TLS required), or no usable channel,
    /// is logged at `error` and leaves the listener idle with
    /// [`ListenerState::last_error`] saying why; pairs with a channel that
    /// fails [`valid_channel`] or a topic that fails
    /// [`valid_name`] are left out the same way.
    pub fn start(
        hub: Hub,
        url: &str,
        channels: Vec<(String, String)>,
        shutdown: ShutdownHandle,
    ) -> Listener {
        let shared = Arc::new(Shared::default());
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
        let mut listener = Listener {
            shared: Arc::clone(&shared),
            target: String::from("<invalid connection string>"),
            stop: Some(stop),
            done,
            thread: None,
        };
        let mut config = match url.parse::<Config>() {
            Ok(c) => c,
            Err(e) => {
                // The parser's messages name the option, never its value.
                let error = e.to_string();
                log::error!("postgres: {error}");
                shared.set_error(error);
                return listener;
            }
        };
        listener.target = describe(&config);
        let target = listener.target.clone();
        config
            .application_name
            .get_or_insert_with(|| APPLICATION_NAME.to_owned());
        config.connect_timeout.get_or_insert(CONNECT_TIMEOUT);
        config.tcp_user_timeout.get_or_insert(TCP_USER_TIMEOUT);

        let mut routes: HashMap<String, Vec<String>> = HashMap::new();
        for (channel, topic) in channels {
            if !valid_channel(&channel) {
                let error = format!(
                    "channel {channel:?} left out: use 1 to {MAX_CHANNEL_LEN} bytes, no NUL"
                );
                log::error!("postgres {target}: {error}");
                shared.set_error(error);
            } else if !valid_name(&topic) {
                let error = format!(
                    "channel {channel:?} left out: invalid topic name {topic:?} \
                     (use 1 to 200 characters of A-Z a-z 0-9 _ . : -)"
                );
                log::error!("postgres {target}: {error}");
                shared.set_error(error);
            } else {
                let topics = routes.entry(channel).or_default();
                if !topics.contains(&topic) {
                    topics.push(topic);
                }
            }
        }
        if routes.is_empty() {
            let error = "no channel to listen on".to_owned();
            log::error!("postgres {target}: {error}");
            shared.set_error(error);
            return listener;
        }
        let mut names: Vec<&String> = routes.keys().collect();
        names.sort();
        let listen_sql = names.iter().fold(String::new(), |mut sql, name| {
            let _ = write!(sql, "LISTEN {};", quote_ident(name)); // writing to a String cannot fail
            sql
        });

        let worker = Worker {
            hub,
            config,
            routes,
            listen_sql,
            shared: Arc::clone(&shared),
            target: target.clone(),
            stop: stop_rx,
            shutdown,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
        };
        let spawned = thread::Builder::new()
            .name("ssed-postgres".into())
            .spawn(move || {
                let _done = done_tx; // dropped when the thread ends, even by a panic
                worker.run();
            });
        match spawned {
            Ok(handle) => listener.thread = Some(handle),
            Err(e) => {
                let error = format!("cannot start the listener thread: {e}");
                log::error!("postgres {target}: {error}");
                shared.set_error(error);
            }
        }
        listener
    }

    /// Where the listener stands now.
    pub fn state(&self) -> ListenerState {
        let s = &self.shared;
        ListenerState {
            connected: s.connected.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            notifications: s.notifications.load(Ordering::Relaxed),
            last_error: s
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// The database, as logs show it: `postgres://user@host:port/db`,
    /// without the password.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Stops the thread and closes the connection, waiting up to 2 s; a
    /// thread stuck in a connect it cannot interrupt is left to end on its
    /// own. Dropping the listener does the same.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        drop(self.stop.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        match self.done.recv_timeout(STOP_WAIT) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                log::warn!(
                    "postgres {}: listener still busy after {STOP_WAIT:?}; leaving it to finish",
                    self.target
                );
            }
            // Disconnected: the thread has returned (nothing is ever sent).
            _ => {
                if thread.join().is_err() {
                    log::error!("postgres {}: listener thread panicked", self.target);
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.halt();
    }
}

/// `postgres://user@host:port/db` from a parsed config: what logs and
/// errors may show (no password, no other option).
pub(crate) fn describe(config: &Config) -> String {
    config.describe()
}

/// Why a connection ended.
enum Ended {
    /// `stop`, drop or shutdown.
    Stopped,
    /// Lost; the message says how.
    Lost(String),
}

/// The listener's thread.
struct Worker {
    hub: Hub,
    config: Config,
    /// Channel to the topics its payloads go to.
    routes: HashMap<String, Vec<String>>,
    listen_sql: String,
    shared: Arc<Shared>,
    target: String,
    stop: Receiver<()>,
    shutdown: ShutdownHandle,
    backoff: Backoff,
}

impl Worker {
    fn run(mut self) {
        let mut was_up = false;
        loop {
            if self.stopping() {
                return;
            }
            match self.connect() {
                Ok(mut conn) => {
                    let since = Instant::now();
                    if was_up {
                        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        log::info!("postgres {}: reconnected, listening again", self.target);
                    } else {
                        log::info!(
                            "postgres {}: listening on {} channel(s)",
                            self.target,
                            self.routes.len()
                        );
                    }
                    was_up = true;
                    self.shared.connected.store(true, Ordering::Relaxed);
                    let ended = self.listen(&mut conn);
                    self.shared.connected.store(false, Ordering::Relaxed);
                    match ended {
                        Ended::Stopped => {
                            // Closing sends Terminate (waiting at most 1 s
                            // for the socket to take it) and closes.
                            drop(conn);
                            return;
                        }
                        Ended::Lost(error) => {
                            if since.elapsed() >= STABLE {
                                self.backoff.reset();
                            }
                            let wait = self.backoff.next_wait();
                            log::warn!(
                                "postgres {}: connection lost ({error}); reconnecting in {wait:?}",
                                self.target
                            );
                            self.shared.set_error(error);
                            drop(conn);
                            if !self.sleep(wait) {
                                return;
                            }
                        }
                    }
                }
                // Interrupted by `stop` or shutdown: no failure to report.
                Err(_) if self.stopping() => return,
                Err(error) => {
                    let wait = self.backoff.next_wait();
                    log::warn!("postgres {}: {error}; retrying in {wait:?}", self.target);
                    self.shared.set_error(error);
                    if !self.sleep(wait) {
                        return;
                    }
                }
            }
        }
    }

    /// Connects and issues `LISTEN` on every channel.
    fn connect(&self) -> Result<Connection, String> {
        let cancel = || self.stopping();
        let mut conn = Connection::connect(&self.config, &cancel)
            .map_err(|e| format!("cannot connect: {}", Report(&e)))?;
        log::debug!(
            "postgres {}: connected, server process {}",
            self.target,
            conn.backend_pid()
        );
        conn.simple_query(&self.listen_sql, CHECK_TIMEOUT, &cancel)
            .map_err(|e| format!("LISTEN failed: {}", Report(&e)))?;
        Ok(conn)
    }

    /// Publishes notifications until the connection is lost or the
    /// listener must stop.
    fn listen(&self, conn: &mut Connection) -> Ended {
        let mut last_traffic = Instant::now();
        loop {
            if self.stopping() {
                return Ended::Stopped;
            }
            match conn.next_notification(POLL) {
                Ok(Some(n)) => {
                    last_traffic = Instant::now();
                    self.publish(&n);
                }
                Ok(None) => {}
                Err(e) => return Ended::Lost(Report(&e).to_string()),
            }
            if last_traffic.elapsed() >= IDLE_CHECK {
                if let Err(e) = conn.ping(CHECK_TIMEOUT, &|| self.stopping()) {
                    if self.stopping() {
                        return Ended::Stopped;
                    }
                    return Ended::Lost(format!("health check failed: {}", Report(&e)));
                }
                last_traffic = Instant::now();
            }
        }
    }

    fn publish(&self, n: &Notification) {
        let Some(topics) = self.routes.get(&n.channel) else {
            log::debug!(
                "postgres {}: notification on unexpected channel {:?}",
                self.target,
                n.channel
            );
            return;
        };
        for topic in topics {
            match self.hub.publish(topic, Event::new().data(&n.payload)) {
                Ok(published) => {
                    self.shared.notifications.fetch_add(1, Ordering::Relaxed);
                    log::trace!(
                        "postgres {}: {} (from process {}) -> {topic} as {}: {:?}",
                        self.target,
                        n.channel,
                        n.pid,
                        published.id,
                        n.payload
                    );
                }
                Err(e) => {
                    let error = format!("cannot publish to {topic}: {}", Report(&e));
                    log::warn!("postgres {}: {error}", self.target);
                    self.shared.set_error(error);
                }
            }
        }
    }

    /// Whether `stop`, drop or shutdown asked the thread to end.
    fn stopping(&self) -> bool {
        self.shutdown.is_shutdown()
            || matches!(self.stop.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Sleeps `d`; false if asked to stop meanwhile.
    fn sleep(&self, d: Duration) -> bool {
        // Nothing is ever sent on either channel: they only disconnect.
        crossbeam_channel::select! {
            recv(self.stop) -> _ => false,
            recv(self.shutdown.receiver()) -> _ => false,
            default(d) => !self.stopping(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        let table = [
            ("user_updates", "\"user_updates\""),
            ("UserUpdates", "\"UserUpdates\""),
            ("a\"b", "\"a\"\"b\""),
            ("x\"; DROP TABLE t; --", "\"x\"\"; DROP TABLE t; --\""),
        ];
        for (name, quoted) in table {
            assert_eq!(quote_ident(name), quoted, "{name:?}");
        }
    }

    #[test]
    fn channel_names() {
        assert!(valid_channel("user_updates"));
        assert!(valid_channel("with space and \"quote\""));
        assert!(valid_channel(&"a".repeat(MAX_CHANNEL_LEN)));
        assert!(!valid_channel(&"a".repeat(MAX_CHANNEL_LEN + 1)));
        assert!(!valid_channel(""));
        assert!(!valid_channel("nul\0"));
    }

    #[test]
    fn a_bad_url_leaves_an_idle_listener_that_says_why() {
        let l = Listener::start(
            Hub::new(0),
            "postgres://u:s3cret@host:notaport/db",
            vec![("c".into(), "c".into())],
            ShutdownHandle::new(),
        );
        let state = l.state();
        assert!(!state.connected);
        let error = state.last_error.expect("an error");
        assert!(error.starts_with("invalid connection string"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
        l.stop();
    }

    #[test]
    fn no_usable_channel_is_an_error() {
        let l = Listener::start(
            Hub::new(0),
            "postgres://postgres@127.0.0.1:1/test",
            vec![
                ("ok".into(), "bad topic".into()),
                (String::new(), "t".into()),
            ],
            ShutdownHandle::new(),
        );
        assert_eq!(
            l.state().last_error.as_deref(),
            Some("no channel to listen on")
        );
    }
}
