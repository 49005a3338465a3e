//! A small blocking Redis client: RESP2 over one TCP connection.
//!
//! ssed needs a dozen commands (streams, lists, scripts), one blocking
//! reader and a few command connections; this is that much, with timeouts
//! on every read and write and bounds on every reply. It is written here
//! rather than taken from the `redis` crate because that crate's URL
//! handling pulls in `url` and the ICU tables behind `idna`: +560 KiB on
//! the static binary (measured: a probe calling one command is 1.90 MB
//! static with `redis` against 1.33 MB without), which would push ssed past
//! its 4 MiB budget.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Longest bulk string accepted in a reply (an event or message is far
/// smaller: the daemon's `max_body` bounds them).
const MAX_BULK: usize = 64 * 1024 * 1024;
/// Most elements in one reply array.
const MAX_ARRAY: usize = 1 << 20;
/// Deepest nesting of arrays in a reply (XREAD nests four).
const MAX_DEPTH: usize = 8;
/// Longest line (status, error, length) in a reply.
const MAX_LINE: usize = 64 * 1024;

/// A Redis server as a `redis://` URL names it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// `host:port` as given (a name is resolved at each connect).
    pub host: String,
    /// TCP port (default 6379).
    pub port: u16,
    /// ACL user name, if any.
    pub user: Option<String>,
    /// Password, if any (never shown by `Debug` or `Display`).
    pub password: Option<String>,
    /// Database number (default 0).
    pub db: u32,
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

impl fmt::Display for RedisUrl {
    /// The URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("redis://")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        } else if self.password.is_some() {
            f.write_str(":***@")?;
        }
        let bracket = self.host.contains(':');
        if bracket {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        write!(f, ":{}/{}", self.port, self.db)
    }
}

impl RedisUrl {
    /// Parses `redis://[[user]:password@]host[:port][/db]`.
    ///
    /// # Errors
    ///
    /// A message saying what is wrong (without the password).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| "a Redis URL starts with redis:// (TLS is not supported)".to_owned())?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((h, d)) => (h, d),
            None => (rest, ""),
        };
        let db = if db.is_empty() {
            0
        } else {
            db.parse::<u32>()
                .map_err(|_| format!("database {db:?} is not a number"))?
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| "unclosed [ in the host".to_owned())?;
            (h, p.strip_prefix(':').unwrap_or(""))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, p),
                None => (hostport, ""),
            }
        };
        if host.is_empty() {
            return Err("the URL names no host".to_owned());
        }
        let port = if port.is_empty() {
            6379
        } else {
            port.parse::<u16>()
                .map_err(|_| format!("port {port:?} is not a number"))?
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_owned()), Some(p.to_owned())),
                None => (Some(a.to_owned()), None),
            },
        };
        Ok(RedisUrl {
            host: host.to_owned(),
            port,
            user,
            password,
            db,
        })
    }

    fn addrs(&self) -> io::Result<Vec<SocketAddr>> {
        Ok((self.host.as_str(), self.port).to_socket_addrs()?.collect())
    }
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `$-1` or `*-1`.
    Nil,
    /// `:n`.
    Int(i64),
    /// `+text`.
    Status(String),
    /// `$n` bytes.
    Bulk(Vec<u8>),
    /// `*n` values.
    Array(Vec<Value>),
}

impl Value {
    /// The bytes of a bulk or status reply.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bulk(b) => Some(b),
            Value::Status(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// A bulk or status reply as text.
    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    /// The elements of an array reply (none for `Nil`).
    pub fn items(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            Value::Nil => Some(&[]),
            _ => None,
        }
    }
}

/// Why a command failed.
#[derive(Debug)]
pub enum RespError {
    /// The connection failed (connect, read, write, timeout).
    Io(io::Error),
    /// The server sent something that is not RESP, or too much of it.
    Protocol(String),
    /// The server answered with an error reply (the connection is fine).
    Server(String),
}

impl RespError {
    /// Whether the connection is still usable after this error.
    pub fn keeps_connection(&self) -> bool {
        matches!(self, RespError::Server(_))
    }
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::Io(e) => write!(f, "{e}"),
            RespError::Protocol(m) => write!(f, "protocol error: {m}"),
            RespError::Server(m) => write!(f, "server error: {m}"),
        }
    }
}

impl std::error::Error for RespError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RespError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for RespError {
    fn from(e: io::Error) -> Self {
        RespError::Io(e)
    }
}

fn protocol(m: impl Into<String>) -> RespError {
    RespError::Protocol(m.into())
}

/// One connection.
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<TcpStream>,
    out: Vec<u8>,
    timeout: Duration,
}

impl Conn {
    /// Connects within `timeout`, authenticates, selects the database and
    /// names the connection `name`;
    /// every later read and write times out after `timeout` too.
    ///
    /// # Errors
    ///
    /// When no address of the host accepts, or AUTH / SELECT fail.
    pub fn connect(url: &RedisUrl, name: &str, timeout: Duration) -> Result<Conn, RespError> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
        let mut stream = None;
        for addr in url.addrs()? {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = stream.ok_or(last)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut conn = Conn {
            reader: BufReader::with_capacity(16 * 1024, stream),
            out: Vec::with_capacity(1024),
            timeout,
        };
        if let Some(password) = &url.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &url.user {
                auth.push(user.as_bytes());
            }
            auth.push(password.as_bytes());
            conn.command(&auth)?;
        }
        if url.db != 0 {
            let db = url.db.to_string();
            conn.command(&[b"SELECT", db.as_bytes()])?;
        }
        // So operators can tell ssed's connections apart in CLIENT LIST.
        conn.command(&[b"CLIENT", b"SETNAME", name.as_bytes()])?;
        Ok(conn)
    }

    /// Sends one command and reads its reply.
    ///
    /// # Errors
    ///
    /// [`RespError::Server`] for an error reply, else a broken connection.
    pub fn command(&mut self, args: &[&[u8]]) -> Result<Value, RespError> {
        self.out.clear();
        encode(&mut self.out, args);
        self.reader.get_mut().write_all(&self.out)?;
        self.read_value(0)
    }

    /// Sends several commands at once, then reads their replies in order.
    ///
    /// # Errors
    ///
    /// A broken connection; error replies come back in the vector.
    pub fn pipeline(
        &mut self,
        commands: &[Vec<&[u8]>],
    ) -> Result<Vec<Result<Value, RespError>>, RespError> {
        self.out.clear();
        for c in commands {
            encode(&mut self.out, c);
        }
        self.reader.get_mut().write_all(&self.out)?;
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            match self.read_value(0) {
                Err(e) if !e.keeps_connection() => return Err(e),
                r => replies.push(r),
            }
        }
        Ok(replies)
    }

    /// Whether the server has closed this (idle) connection, or sent
    /// something nobody asked for: either way it must not be used.
    pub fn is_dead(&self) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let s = self.reader.get_ref();
        if s.set_nonblocking(true).is_err() {
            return true;
        }
        let mut byte = [0u8; 1];
        let dead = !matches!(s.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        s.set_nonblocking(false).is_err() || dead
    }

    /// Runs `f` with reads allowed to wait `timeout` (a blocking command),
    /// then restores the connection's timeout.
    ///
    /// # Errors
    ///
    /// Those of `f`, or failing to set the timeout.
    pub fn with_read_timeout<T>(
        &mut self,
        timeout: Duration,
        f: impl FnOnce(&mut Conn) -> Result<T, RespError>,
    ) -> Result<T, RespError> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let r = f(self);
        if r.as_ref().err().is_none_or(RespError::keeps_connection) {
            self.reader.get_ref().set_read_timeout(Some(self.timeout))?;
        }
        r
    }

    fn read_line(&mut self) -> Result<Vec<u8>, RespError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(RespError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        if !line.ends_with(b"\r\n") {
            return Err(protocol("a reply line without CRLF, or too long"));
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }

    fn read_value(&mut self, depth: usize) -> Result<Value, RespError> {
        if depth > MAX_DEPTH {
            return Err(protocol("reply nested too deep"));
        }
        let line = self.read_line()?;
        let (&kind, rest) = line
            .split_first()
            .ok_or_else(|| protocol("an empty reply line"))?;
        let text = || String::from_utf8_lossy(rest).into_owned();
        let number = || -> Result<i64, RespError> {
            std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| protocol(format!("bad number {:?}", text())))
        };
        match kind {
            b'+' => Ok(Value::Status(text())),
            b'-' => Err(RespError::Server(text())),
            b':' => Ok(Value::Int(number()?)),
            b'$' => {
                let n = number()?;
                if n < 0 {
                    return Ok(Value::Nil);
                }
                let n = usize::try_from(n).map_err(|_| protocol("bulk length"))?;
                if n > MAX_BULK {
                    return Err(protocol(format!("bulk string of {n} bytes")));
                }
                let mut buf = vec![0; n + 2];
                self.reader.read_exact(&mut buf)?;
                if !buf.ends_with(b"\r\n") {
                    return Err(protocol("bulk string without CRLF"));
                }
                buf.truncate(n);
                Ok(Value::Bulk(buf))
            }
            b'*' => {
                let n = number()?;
                if n < 0 {
                    return Ok(Value::Nil);
                }
                let n = usize::try_from(n).map_err(|_| protocol("array length"))?;
                if n > MAX_ARRAY {
                    return Err(protocol(format!("array of {n} elements")));
                }
                let mut items = Vec::with_capacity(n.min(1024));
                let mut error = None;
                for _ in 0..n {
                    match self.read_value(depth + 1) {
                        // An error inside an array (EXEC, a script's table)
                        // fails the whole reply, once all of it is read so
                        // the connection stays in step.
                        Err(RespError::Server(m)) => {
                            error.get_or_insert(m);
                        }
                        r => items.push(r?),
                    }
                }
                match error {
                    Some(m) => Err(RespError::Server(m)),
                    None => Ok(Value::Array(items)),
                }
            }
            other => Err(protocol(format!("unknown reply type {:?}", other as char))),
        }
    }
}

fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = RedisUrl::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("127.0.0.1", 6380, 2));
        assert_eq!(u.password, None);
        let u = RedisUrl::parse("redis://:s3cret@localhost").unwrap();
        assert_eq!(
            (u.user, u.password.as_deref(), u.port),
            (None, Some("s3cret"), 6379)
        );
        let u = RedisUrl::parse("redis://app:p@ss@[::1]:7000").unwrap();
        assert_eq!(u.user.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.host, "::1");
        assert_eq!(u.to_string(), "redis://app@[::1]:7000/0");
        let u = RedisUrl::parse("redis://:pw@h").unwrap();
        assert!(!format!("{u:?} {u}").contains("pw"));
        for bad in [
            "http://x",
            "rediss://x",
            "redis://",
            "redis://h:port",
            "redis://h/db",
            "redis://[::1",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn encodes_commands() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SET", b"k", b""]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }
}
