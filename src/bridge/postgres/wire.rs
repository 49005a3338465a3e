//! A blocking PostgreSQL connection speaking protocol 3.0, with what a
//! `LISTEN` connection needs and no more: the startup handshake, the
//! password methods (`trust`, `password`, `md5`, `scram-sha-256`), simple
//! queries, and the notifications the server sends between them.
//!
//! Every read waits with a socket timeout, so no call blocks past its
//! deadline, and a handshake or query also asks its `cancel` callback
//! every 250 ms. A message is checked against [`MAX_MESSAGE`] from its
//! header, before any of it is stored: a broken or hostile server cannot
//! make the client allocate more.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::auth::{self, SCRAM_SHA_256, Scram};
use super::config::{Config, Host, SessionAttrs, os_user};
use crate::backoff::Jitter;

/// Rows kept from one simple query: ssed's queries want one (a `SHOW`);
/// a server that sends more is broken or hostile.
const MAX_ROWS: usize = 16;
/// Notifications kept while an exchange is under way (a `LISTEN` batch, a
/// ping), before they are handed on: with [`MAX_NOTIFICATION`], a bound
/// (16 MiB) on what a server that sends them without end can make ssed
/// hold.
const MAX_QUEUED: usize = 1024;
/// The largest notification message taken: PostgreSQL's payloads are
/// under 8,000 bytes and channel names under 64.
const MAX_NOTIFICATION: usize = 16 * 1024;

/// Longest message body accepted from the server. A notification's payload
/// is under 8,000 bytes unless the server was built otherwise, and nothing
/// else this client asks for comes near.
pub(crate) const MAX_MESSAGE: usize = 1 << 20;
/// Protocol version 3.0, as the startup message gives it.
const PROTOCOL_3_0: i32 = 3 << 16;
/// How often a wait asks its `cancel` callback.
const SLICE: Duration = Duration::from_millis(250);
/// How long a write may block (messages are small: this is a dead peer).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing may take to send `Terminate`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What went wrong. `Display` never shows the password; as elsewhere in
/// ssed, it leaves the operating system's error to `source()` (print it
/// with [`Report`](crate::Report)).
#[derive(Debug)]
pub(crate) enum Error {
    /// Reaching the server failed (resolving, connecting, a socket option).
    Connect {
        /// The address, host or socket path tried.
        addr: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// Reading or writing an established connection failed.
    Io(io::Error),
    /// An `ErrorResponse`.
    Server(ServerError),
    /// The server sent something the protocol does not allow here.
    Protocol(String),
    /// Authentication cannot proceed on this side.
    Auth(String),
    /// Something this side refuses (no user, a server of the wrong kind).
    Local(String),
    /// The server closed the connection.
    Closed,
    /// No answer in time; says to what.
    TimedOut(&'static str),
    /// `cancel` asked to stop.
    Cancelled,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { addr, .. } => f.write_str(addr),
            Error::Io(_) => f.write_str("i/o error"),
            Error::Server(e) => write!(f, "{e}"),
            Error::Protocol(m) => write!(f, "protocol violation: {m}"),
            Error::Auth(m) => write!(f, "authentication: {m}"),
            Error::Local(m) => f.write_str(m),
            Error::Closed => f.write_str("connection closed by the server"),
            Error::TimedOut(what) => write!(f, "timed out {what}"),
            Error::Cancelled => f.write_str("stopped"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } | Error::Io(source) => Some(source),
            _ => None,
        }
    }
}

/// The fields of an `ErrorResponse` (or `NoticeResponse`) that say what
/// happened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerError {
    /// `ERROR`, `FATAL`, `PANIC` (or `WARNING`, `NOTICE`… for a notice).
    pub severity: String,
    /// The SQLSTATE code, such as `28P01` (wrong password) or `57P01`
    /// (terminated by an administrator).
    pub code: String,
    /// The primary message.
    pub message: String,
    /// More about it, if the server said.
    pub detail: Option<String>,
    /// What to do about it, if the server said.
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(detail) = &self.detail {
            write!(f, " DETAIL: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " HINT: {hint}")?;
        }
        Ok(())
    }
}

impl ServerError {
    /// Reads the fields: a type byte and a string each, then a zero.
    fn parse(body: &[u8]) -> ServerError {
        let mut e = ServerError::default();
        let mut localized_severity = String::new();
        let mut at = 0;
        while let Some(&kind) = body.get(at) {
            if kind == 0 {
                break;
            }
            at += 1;
            let Ok(value) = cstr(body, &mut at) else {
                break; // what came before is still worth reporting
            };
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                b'V' => e.severity = value, // not localized (9.6 and later)
                b'S' => localized_severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
        }
        if e.severity.is_empty() {
            e.severity = localized_severity;
        }
        e
    }
}

/// A `NOTIFY` the server passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Notification {
    /// The backend that sent it.
    pub pid: i32,
    /// The channel, exactly as the sender named it.
    pub channel: String,
    /// The payload (empty when none was given).
    pub payload: String,
}

/// Reads a zero-terminated string at `*at`, moving past it.
fn cstr<'a>(body: &'a [u8], at: &mut usize) -> Result<&'a [u8], Error> {
    let rest = body.get(*at..).unwrap_or_default();
    let len = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| Error::Protocol("a string without its terminating zero".to_owned()))?;
    *at += len + 1;
    Ok(&rest[..len])
}

/// Reads a big-endian `i32` at `*at`, moving past it.
fn int32(body: &[u8], at: &mut usize, what: &str) -> Result<i32, Error> {
    let bytes = body
        .get(*at..*at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .ok_or_else(|| Error::Protocol(format!("{what} is cut short")))?;
    *at += 4;
    Ok(i32::from_be_bytes(bytes))
}

/// A message type byte, as logs show it.
fn tag_name(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", char::from(tag))
    } else {
        format!("0x{tag:02x}")
    }
}

fn unexpected(tag: u8, when: &str) -> Error {
    Error::Protocol(format!("unexpected message {} {when}", tag_name(tag)))
}

fn parse_notification(body: &[u8]) -> Result<Notification, Error> {
    let mut at = 0;
    let pid = int32(body, &mut at, "a notification")?;
    let channel = String::from_utf8_lossy(cstr(body, &mut at)?).into_owned();
    let payload = String::from_utf8_lossy(cstr(body, &mut at)?).into_owned();
    Ok(Notification {
        pid,
        channel,
        payload,
    })
}

/// A `DataRow`: each column as text, `None` for NULL.
fn parse_row(body: &[u8]) -> Result<Vec<Option<String>>, Error> {
    let count = body
        .get(..2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| Error::Protocol("a row is cut short".to_owned()))?;
    let mut at = 2;
    let mut row = Vec::new();
    for _ in 0..count.max(0) {
        let len = int32(body, &mut at, "a row")?;
        if len < 0 {
            row.push(None);
            continue;
        }
        let end = at + len.unsigned_abs() as usize;
        let value = body
            .get(at..end)
            .ok_or_else(|| Error::Protocol("a row is cut short".to_owned()))?;
        row.push(Some(String::from_utf8_lossy(value).into_owned()));
        at = end;
    }
    Ok(row)
}

/// Appends a message: its type byte, its length, then what `body` writes.
fn message(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    out.push(tag);
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = i32::try_from(out.len() - start).unwrap_or(i32::MAX); // our messages are small
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// A TCP or Unix stream.
#[derive(Debug)]
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(d),
            Socket::Unix(s) => s.set_read_timeout(d),
        }
    }

    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_write_timeout(d),
            Socket::Unix(s) => s.set_write_timeout(d),
        }
    }

    fn shutdown(&self) {
        // Already closed by the peer, perhaps: nothing more to do then.
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(()) // unbuffered
    }
}

/// Where one attempt connects.
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// TCP options from the connection string: no Nagle delay (a query is one
/// small write), the user timeout and keep-alives.
fn tune(stream: &TcpStream, config: &Config) -> io::Result<()> {
    use rustix::net::sockopt;
    stream.set_nodelay(true)?;
    if let Some(t) = config.tcp_user_timeout {
        let ms = u32::try_from(t.as_millis()).unwrap_or(u32::MAX);
        sockopt::set_tcp_user_timeout(stream, ms)?;
    }
    if config.keepalives {
        sockopt::set_socket_keepalive(stream, true)?;
        // Linux takes whole seconds, at least one.
        let idle = config.keepalives_idle.max(Duration::from_secs(1));
        sockopt::set_tcp_keepidle(stream, idle)?;
        if let Some(interval) = config.keepalives_interval {
            sockopt::set_tcp_keepintvl(stream, interval.max(Duration::from_secs(1)))?;
        }
        if let Some(retries) = config.keepalives_retries {
            sockopt::set_tcp_keepcnt(stream, retries.max(1))?;
        }
    }
    Ok(())
}

/// An open, authenticated connection, ready for queries.
#[derive(Debug)]
pub(crate) struct Connection {
    socket: Socket,
    /// Bytes read and not yet taken as messages.
    buf: Vec<u8>,
    /// The socket's read timeout now, to set it only when it changes.
    read_timeout: Option<Duration>,
    /// Notifications that arrived while waiting for something else.
    queued: VecDeque<Notification>,
    /// The server process serving this connection.
    backend_pid: i32,
    /// Whether the handshake is done, so closing says `Terminate`.
    ready: bool,
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.ready {
            // Best effort: the server ends the session either way.
            let _ = self.socket.set_write_timeout(Some(CLOSE_TIMEOUT));
            let _ = self.socket.write_all(b"X\0\0\0\x04");
        }
        self.socket.shutdown();
    }
}

impl Connection {
    /// Connects to the first host (in order, or shuffled with
    /// `load_balance_hosts=random`) and address that completes the
    /// handshake, as libpq does. `connect_timeout` bounds each address:
    /// the TCP connect, then the handshake. The error is the last one.
    ///
    /// `cancel` is asked before each address and every 250 ms of the
    /// handshake; a name lookup or a TCP connect in progress is not
    /// interrupted (the connect ends within `connect_timeout`).
    pub(crate) fn connect(config: &Config, cancel: &dyn Fn() -> bool) -> Result<Connection, Error> {
        let user = match &config.user {
            Some(user) => user.clone(),
            None => os_user().ok_or_else(|| {
                Error::Local(
                    "the connection string names no user, and this process's user \
                     is not in /etc/passwd"
                        .to_owned(),
                )
            })?,
        };
        let mut jitter = config.load_balance_random.then(Jitter::new);
        let mut order: Vec<usize> = (0..config.host_count()).collect();
        if let Some(j) = &mut jitter {
            j.shuffle(&mut order);
        }
        let mut last = None;
        for i in order {
            let port = config.port(i);
            let mut targets = match (config.hostaddrs.get(i), config.hosts.get(i)) {
                (Some(ip), _) => vec![Target::Tcp(SocketAddr::new(*ip, port))],
                (None, Some(Host::Unix(dir))) => {
                    vec![Target::Unix(dir.join(format!(".s.PGSQL.{port}")))]
                }
                (None, Some(Host::Tcp(name))) => {
                    let resolved = (name.as_str(), port).to_socket_addrs().and_then(|addrs| {
                        let addrs: Vec<Target> = addrs.map(Target::Tcp).collect();
                        if addrs.is_empty() {
                            Err(io::Error::new(
                                io::ErrorKind::NotFound,
                                "the host has no address",
                            ))
                        } else {
                            Ok(addrs)
                        }
                    });
                    match resolved {
                        Ok(addrs) => addrs,
                        Err(source) => {
                            last = Some(Error::Connect {
                                addr: format!("{name}:{port}"),
                                source,
                            });
                            continue;
                        }
                    }
                }
                (None, None) => continue, // the config has as many of one as of the other
            };
            if let Some(j) = &mut jitter {
                j.shuffle(&mut targets);
            }
            for target in &targets {
                if cancel() {
                    return Err(Error::Cancelled);
                }
                match Connection::attempt(target, config, &user, cancel) {
                    Ok(conn) => return Ok(conn),
                    Err(Error::Cancelled) => return Err(Error::Cancelled),
                    Err(e) => last = Some(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Local("no host to connect to".to_owned())))
    }

    /// One address: connect, start up, authenticate, wait for the server
    /// to be ready, check `target_session_attrs`.
    fn attempt(
        target: &Target,
        config: &Config,
        user: &str,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Connection, Error> {
        let deadline = config.connect_timeout.map(|t| Instant::now() + t);
        let socket = match target {
            Target::Tcp(addr) => {
                let connected = match config.connect_timeout {
                    Some(t) => TcpStream::connect_timeout(addr, t),
                    None => TcpStream::connect(addr),
                };
                let fail = |source| Error::Connect {
                    addr: addr.to_string(),
                    source,
                };
                let stream = connected.map_err(fail)?;
                tune(&stream, config).map_err(fail)?;
                Socket::Tcp(stream)
            }
            Target::Unix(path) => {
                Socket::Unix(UnixStream::connect(path).map_err(|source| Error::Connect {
                    addr: path.display().to_string(),
                    source,
                })?)
            }
        };
        socket
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(Error::Io)?;
        let mut conn = Connection {
            socket,
            buf: Vec::with_capacity(8192),
            read_timeout: None,
            queued: VecDeque::new(),
            backend_pid: 0,
            ready: false,
        };
        conn.startup(config, user)?;
        conn.authenticate(config, user, deadline, cancel)?;
        conn.await_ready(deadline, cancel)?;
        conn.ready = true;
        conn.check_session(config.target_session_attrs, deadline, cancel)?;
        Ok(conn)
    }

    /// The server process of this connection (`pg_backend_pid()`).
    pub(crate) fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.socket.write_all(bytes).map_err(Error::Io)
    }

    /// The `StartupMessage`: protocol 3.0, the role, the database and the
    /// settings, with `client_encoding` UTF8 so payloads arrive as UTF-8.
    fn startup(&mut self, config: &Config, user: &str) -> Result<(), Error> {
        let params = [
            ("user", Some(user)),
            ("database", config.dbname.as_deref()),
            ("options", config.options.as_deref()),
            ("application_name", config.application_name.as_deref()),
            ("client_encoding", Some("UTF8")),
        ];
        let mut out = vec![0; 4];
        out.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        for (key, value) in params {
            let Some(value) = value else { continue };
            if value.contains('\0') {
                return Err(Error::Local(format!("the {key} holds a NUL character")));
            }
            for s in [key, value] {
                out.extend_from_slice(s.as_bytes());
                out.push(0);
            }
        }
        out.push(0);
        let len = i32::try_from(out.len())
            .map_err(|_| Error::Local("the startup parameters are too long".to_owned()))?;
        out[..4].copy_from_slice(&len.to_be_bytes());
        self.send(&out)
    }

    /// Answers the server's authentication requests until it says
    /// `AuthenticationOk`.
    fn authenticate(
        &mut self,
        config: &Config,
        user: &str,
        deadline: Option<Instant>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(), Error> {
        loop {
            let (tag, body) = self.reply(deadline, cancel, "during the handshake")?;
            match tag {
                b'R' => {}
                b'E' => return Err(Error::Server(ServerError::parse(&body))),
                // The server's answer to a newer minor version or unknown
                // `_pq_` options: neither is asked for; 3.0 is what it speaks.
                b'v' => continue,
                _ => return Err(unexpected(tag, "during authentication")),
            }
            let mut at = 0;
            match int32(&body, &mut at, "an authentication request")? {
                0 => return Ok(()),
                3 => {
                    let password = password(config)?.to_vec();
                    self.password_message(&password)?;
                }
                5 => {
                    let salt = body
                        .get(4..8)
                        .and_then(|s| <[u8; 4]>::try_from(s).ok())
                        .ok_or_else(|| Error::Protocol("an MD5 request without salt".to_owned()))?;
                    let answer = auth::md5_password(user.as_bytes(), password(config)?, salt);
                    self.password_message(answer.as_bytes())?;
                }
                10 => self.scram(config, &body[4..], deadline, cancel)?,
                code => {
                    let method = match code {
                        2 => "Kerberos V5",
                        6 => "SCM credentials",
                        7 | 8 => "GSSAPI",
                        9 => "SSPI",
                        _ => "an unknown method",
                    };
                    return Err(Error::Auth(format!(
                        "the server asks for {method} (request {code}); this client does \
                         password, md5 and scram-sha-256"
                    )));
                }
            }
        }
    }

    fn password_message(&mut self, password: &[u8]) -> Result<(), Error> {
        if password.contains(&0) {
            return Err(Error::Auth(
                "the password holds a NUL byte, which the protocol cannot carry".to_owned(),
            ));
        }
        let mut out = Vec::new();
        message(&mut out, b'p', |b| {
            b.extend_from_slice(password);
            b.push(0);
        });
        self.send(&out)
    }

    /// The SCRAM-SHA-256 exchange, from the server's list of mechanisms to
    /// its verified signature.
    fn scram(
        &mut self,
        config: &Config,
        mechanisms: &[u8],
        deadline: Option<Instant>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(), Error> {
        let offered: Vec<String> = mechanisms
            .split(|&b| b == 0)
            .take_while(|m| !m.is_empty())
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect();
        if !offered.iter().any(|m| m == SCRAM_SHA_256) {
            return Err(Error::Auth(format!(
                "the server offers SASL mechanisms {offered:?}, not {SCRAM_SHA_256} \
                 (SCRAM-SHA-256-PLUS needs TLS)"
            )));
        }
        let mut scram = Scram::new("", password(config)?, auth::nonce().map_err(Error::Auth)?);
        let first = scram.client_first();
        let mut out = Vec::new();
        message(&mut out, b'p', |b| {
            b.extend_from_slice(SCRAM_SHA_256.as_bytes());
            b.push(0);
            let len = i32::try_from(first.len()).unwrap_or(i32::MAX); // 40-odd bytes
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(first.as_bytes());
        });
        self.send(&out)?;

        let server_first = self.sasl_reply(11, deadline, cancel)?;
        let last = scram.client_final(&server_first).map_err(Error::Auth)?;
        out.clear();
        message(&mut out, b'p', |b| b.extend_from_slice(last.as_bytes()));
        self.send(&out)?;

        let server_final = self.sasl_reply(12, deadline, cancel)?;
        scram
            .verify_server_final(&server_final)
            .map_err(Error::Auth)
    }

    /// The data of the next SASL message, which must be request `code`
    /// (11: continue, 12: final).
    fn sasl_reply(
        &mut self,
        code: i32,
        deadline: Option<Instant>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Vec<u8>, Error> {
        let (tag, mut body) = self.reply(deadline, cancel, "during the handshake")?;
        match tag {
            b'R' => {}
            b'E' => return Err(Error::Server(ServerError::parse(&body))),
            _ => return Err(unexpected(tag, "during SCRAM authentication")),
        }
        let got = int32(&body, &mut 0, "a SASL message")?;
        if got != code {
            return Err(Error::Protocol(format!(
                "authentication request {got} in the middle of SCRAM (expected {code})"
            )));
        }
        body.drain(..4);
        Ok(body)
    }

    /// After `AuthenticationOk`: the backend's key, then `ReadyForQuery`.
    fn await_ready(
        &mut self,
        deadline: Option<Instant>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(), Error> {
        loop {
            let (tag, body) = self.reply(deadline, cancel, "during the handshake")?;
            match tag {
                b'K' => self.backend_pid = int32(&body, &mut 0, "the backend key")?,
                b'Z' => return Ok(()),
                b'E' => return Err(Error::Server(ServerError::parse(&body))),
                b'v' => {}
                _ => return Err(unexpected(tag, "at the end of the handshake")),
            }
        }
    }

    /// `target_session_attrs`: whether the server takes writes.
    fn check_session(
        &mut self,
        want: SessionAttrs,
        deadline: Option<Instant>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(), Error> {
        if want == SessionAttrs::Any {
            return Ok(());
        }
        let rows = self.query_until("SHOW transaction_read_only", deadline, cancel)?;
        let read_only = rows
            .first()
            .and_then(|r| r.first())
            .and_then(Option::as_deref);
        match (want, read_only) {
            (SessionAttrs::ReadWrite, Some("on")) => Err(Error::Local(
                "the server is read-only (target_session_attrs=read-write)".to_owned(),
            )),
            (SessionAttrs::ReadOnly, Some("off")) => Err(Error::Local(
                "the server takes writes (target_session_attrs=read-only)".to_owned(),
            )),
            _ => Ok(()),
        }
    }

    /// Runs `sql` (one or more statements) with the simple query protocol
    /// and returns the rows, each column as text. An error in a statement
    /// is returned once the server is ready again, so the connection stays
    /// usable.
    pub(crate) fn simple_query(
        &mut self,
        sql: &str,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Vec<Vec<Option<String>>>, Error> {
        self.query_until(sql, Some(Instant::now() + timeout), cancel)
    }

    /// Checks that the server answers within `timeout`: an empty query.
    /// Notifications that arrive meanwhile are kept for
    /// [`next_notification`](Self::next_notification).
    pub(crate) fn ping(
        &mut self,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(), Error> {
        self.simple_query("", timeout, cancel).map(drop)
    }

    fn query_until(
        &mut self,
        sql: &str,
        deadline: Option<Instant>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Vec<Vec<Option<String>>>, Error> {
        if sql.contains('\0') {
            return Err(Error::Local("the query holds a NUL character".to_owned()));
        }
        let mut out = Vec::new();
        message(&mut out, b'Q', |b| {
            b.extend_from_slice(sql.as_bytes());
            b.push(0);
        });
        self.send(&out)?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let (tag, body) = self.reply(deadline, cancel, "waiting for a query's answer")?;
            match tag {
                b'T' | b'C' | b'I' => {} // row description, command or empty query done
                b'D' if rows.len() >= MAX_ROWS => {
                    return Err(Error::Protocol(format!(
                        "more than {MAX_ROWS} rows for a query that wants one"
                    )));
                }
                b'D' => rows.push(parse_row(&body)?),
                b'E' => {
                    failed.get_or_insert(ServerError::parse(&body));
                }
                b'Z' => {
                    return match failed {
                        Some(e) => Err(Error::Server(e)),
                        None => Ok(rows),
                    };
                }
                _ => return Err(unexpected(tag, "in a query's answer")),
            }
        }
    }

    /// The next notification, waiting up to `timeout`: `Ok(None)` if none
    /// came. An error means the connection is lost (an `ErrorResponse`
    /// outside a query is the server's last word: `FATAL`).
    pub(crate) fn next_notification(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Notification>, Error> {
        if let Some(n) = self.queued.pop_front() {
            return Ok(Some(n));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let Some((tag, body)) = self.read_message(Some(deadline), &|| false)? else {
                return Ok(None);
            };
            match tag {
                b'A' => return parse_notification(&body).map(Some),
                b'N' => notice(&body),
                b'S' => {}
                b'E' => return Err(Error::Server(ServerError::parse(&body))),
                _ => return Err(unexpected(tag, "between queries")),
            }
        }
    }

    /// The next message that answers something, within `deadline`:
    /// notices are logged, parameter changes let pass, notifications kept.
    fn reply(
        &mut self,
        deadline: Option<Instant>,
        cancel: &dyn Fn() -> bool,
        what: &'static str,
    ) -> Result<(u8, Vec<u8>), Error> {
        loop {
            let (tag, body) = self
                .read_message(deadline, cancel)?
                .ok_or(Error::TimedOut(what))?;
            match tag {
                b'A' if body.len() > MAX_NOTIFICATION => {
                    return Err(Error::Protocol(format!(
                        "a notification of {} bytes (PostgreSQL's are under 8,100)",
                        body.len()
                    )));
                }
                b'A' if self.queued.len() >= MAX_QUEUED => {
                    return Err(Error::Protocol(format!(
                        "more than {MAX_QUEUED} notifications in the middle of an exchange"
                    )));
                }
                b'A' => {
                    let n = parse_notification(&body)?;
                    self.queued.push_back(n);
                }
                b'N' => notice(&body),
                b'S' => {}
                _ => return Ok((tag, body)),
            }
        }
    }

    /// The next message, or `None` once `deadline` has passed; `cancel`
    /// is asked between reads.
    fn read_message(
        &mut self,
        deadline: Option<Instant>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Option<(u8, Vec<u8>)>, Error> {
        loop {
            if let Some(message) = self.take_message()? {
                return Ok(Some(message));
            }
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    left.min(SLICE)
                }
                None => SLICE,
            };
            if cancel() {
                return Err(Error::Cancelled);
            }
            // A zero timeout means none to the socket: wait at least 1 ms.
            let wait = Some(wait.max(Duration::from_millis(1)));
            if self.read_timeout != wait {
                self.socket.set_read_timeout(wait).map_err(Error::Io)?;
                self.read_timeout = wait;
            }
            let mut chunk = [0u8; 8192];
            match self.socket.read(&mut chunk) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }

    /// A whole message from the buffer, if there is one. The length is
    /// checked as soon as the header is in.
    fn take_message(&mut self) -> Result<Option<(u8, Vec<u8>)>, Error> {
        let Some(header) = self.buf.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let body_len = usize::try_from(len)
            .ok()
            .and_then(|len| len.checked_sub(4))
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "message {} gives its length as {len}",
                    tag_name(tag)
                ))
            })?;
        if body_len > MAX_MESSAGE {
            return Err(Error::Protocol(format!(
                "message {} of {body_len} bytes, more than the {MAX_MESSAGE} this client accepts",
                tag_name(tag)
            )));
        }
        if self.buf.len() < 5 + body_len {
            return Ok(None);
        }
        let body = self.buf[5..5 + body_len].to_vec();
        self.buf.drain(..5 + body_len);
        Ok(Some((tag, body)))
    }
}

/// The password the server asks for, or why there is none.
fn password(config: &Config) -> Result<&[u8], Error> {
    config.password.as_deref().ok_or_else(|| {
        Error::Auth("the server asks for a password and the connection string has none".to_owned())
    })
}

/// A `NoticeResponse`: logged, as nothing waits for it.
fn notice(body: &[u8]) {
    log::debug!("postgres: server notice: {}", ServerError::parse(body));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, value) in fields {
            body.push(*kind);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn server_errors_read_and_show() {
        let e = ServerError::parse(&error_body(&[
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "password authentication failed for user \"x\""),
            (b'R', "auth_failed"),
        ]));
        assert_eq!(
            e.to_string(),
            "FATAL: password authentication failed for user \"x\" (SQLSTATE 28P01)"
        );
        // Localized severity only (before 9.6), detail and hint.
        let e = ServerError::parse(&error_body(&[
            (b'S', "ERREUR"),
            (b'C', "42601"),
            (b'M', "m"),
            (b'D', "d"),
            (b'H', "h"),
        ]));
        assert_eq!(
            e.to_string(),
            "ERREUR: m (SQLSTATE 42601) DETAIL: d HINT: h"
        );
        // Cut short: what came before is kept.
        let e = ServerError::parse(b"Mpartial\0Cabc");
        assert_eq!(e.message, "partial");
    }

    #[test]
    fn notifications_and_rows_parse() {
        let mut body = 42i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"Chan \"x\"\0line 1\nGr\xc3\xbc\xc3\x9fe\0");
        let n = parse_notification(&body).expect("valid");
        assert_eq!(n.pid, 42);
        assert_eq!(n.channel, "Chan \"x\"");
        assert_eq!(n.payload, "line 1\nGrüße");
        assert!(parse_notification(&body[..6]).is_err());
        assert!(parse_notification(&body[..body.len() - 1]).is_err());

        let mut row = 2i16.to_be_bytes().to_vec();
        row.extend_from_slice(&2i32.to_be_bytes());
        row.extend_from_slice(b"on");
        row.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            parse_row(&row).expect("valid"),
            [Some("on".to_owned()), None]
        );
        assert!(parse_row(&row[..7]).is_err());
    }

    #[test]
    fn messages_are_framed() {
        let mut out = Vec::new();
        message(&mut out, b'Q', |b| b.extend_from_slice(b"LISTEN \"a\"\0"));
        assert_eq!(out, b"Q\0\0\0\x0fLISTEN \"a\"\0");
    }

    /// A connection over one end of a socket pair; the other end plays
    /// the server.
    fn pair() -> (Connection, UnixStream) {
        let (client, server) = UnixStream::pair().expect("a socket pair");
        let conn = Connection {
            socket: Socket::Unix(client),
            buf: Vec::new(),
            read_timeout: None,
            queued: VecDeque::new(),
            backend_pid: 0,
            ready: false,
        };
        (conn, server)
    }

    fn backend(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        message(&mut out, tag, |b| b.extend_from_slice(body));
        out
    }

    #[test]
    fn a_huge_length_is_refused_from_the_header() {
        let (mut conn, mut server) = pair();
        // 2 GiB announced, 16 bytes sent.
        server
            .write_all(b"A\x7f\xff\xff\xffsixteen bytes...")
            .expect("write");
        let started = Instant::now();
        let e = conn
            .next_notification(Duration::from_secs(5))
            .expect_err("refused");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "no wait for the rest"
        );
        assert!(e.to_string().contains("more than the 1048576"), "{e}");
        assert!(conn.buf.capacity() <= 64 * 1024, "{}", conn.buf.capacity());

        // The largest accepted message passes, split across reads.
        let (mut conn, mut server) = pair();
        let mut body = 1i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"c\0");
        body.resize(MAX_MESSAGE - 1, b'x');
        body.push(0);
        let frame = backend(b'A', &body);
        let writer = std::thread::spawn(move || server.write_all(&frame));
        let n = conn
            .next_notification(Duration::from_secs(5))
            .expect("read")
            .expect("a notification");
        assert_eq!(n.payload.len(), MAX_MESSAGE - 7);
        writer.join().expect("writer").expect("write");
    }

    #[test]
    fn notifications_during_a_ping_wait_their_turn() {
        let (mut conn, mut server) = pair();
        let server = std::thread::spawn(move || {
            let mut query = [0u8; 6];
            server.read_exact(&mut query).expect("the ping");
            assert_eq!(&query, b"Q\0\0\0\x05\0", "an empty query");
            let mut answer = Vec::new();
            for payload in [&b"one\0"[..], b"two\0"] {
                let mut body = 7i32.to_be_bytes().to_vec();
                body.extend_from_slice(b"chan\0");
                body.extend_from_slice(payload);
                answer.extend(backend(b'A', &body));
            }
            answer.extend(backend(b'N', b"SNOTICE\0Mhello\0\0"));
            answer.extend(backend(b'S', b"TimeZone\0UTC\0"));
            answer.extend(backend(b'I', b""));
            answer.extend(backend(b'Z', b"I"));
            server.write_all(&answer).expect("answer");
            server
        });
        conn.ping(Duration::from_secs(5), &|| false).expect("pong");
        let got: Vec<String> = (0..2)
            .map(|_| {
                conn.next_notification(Duration::from_millis(10))
                    .expect("no error")
                    .expect("queued")
                    .payload
            })
            .collect();
        assert_eq!(got, ["one", "two"]);
        assert_eq!(
            conn.next_notification(Duration::from_millis(10))
                .expect("no error"),
            None
        );

        // A FATAL between queries ends the connection; so does EOF.
        let mut server = server.join().expect("server");
        server
            .write_all(&backend(b'E', b"SFATAL\0C57P01\0Mbye\0\0"))
            .expect("write");
        let e = conn
            .next_notification(Duration::from_secs(1))
            .expect_err("fatal");
        assert_eq!(e.to_string(), "FATAL: bye (SQLSTATE 57P01)");
        drop(server);
        let e = conn
            .next_notification(Duration::from_secs(1))
            .expect_err("closed");
        assert!(matches!(e, Error::Closed), "{e}");
    }

    #[test]
    fn a_query_error_waits_for_ready_and_cancel_stops_a_wait() {
        let (mut conn, mut server) = pair();
        let mut answer = backend(b'E', b"SERROR\0C42601\0Msyntax\0\0");
        answer.extend(backend(b'Z', b"I"));
        server.write_all(&answer).expect("write");
        let e = conn
            .simple_query("LISTEN", Duration::from_secs(1), &|| false)
            .expect_err("an error");
        assert_eq!(e.to_string(), "ERROR: syntax (SQLSTATE 42601)");
        assert!(conn.buf.is_empty(), "ReadyForQuery was read too");

        let started = Instant::now();
        let e = conn
            .simple_query("LISTEN", Duration::from_secs(10), &|| {
                started.elapsed() > Duration::from_millis(300)
            })
            .expect_err("cancelled");
        assert!(matches!(e, Error::Cancelled), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));

        let e = conn
            .simple_query("LISTEN", Duration::from_millis(100), &|| false)
            .expect_err("timed out");
        assert_eq!(e.to_string(), "timed out waiting for a query's answer");
    }

    #[test]
    fn tags_show_readably() {
        assert_eq!(tag_name(b'A'), "'A'");
        assert_eq!(tag_name(0), "0x00");
    }
}
