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
//!
//! [`read_reply`] parses one reply from any [`BufRead`]: [`Conn`] gives it
//! its socket, the tests and the `resp_reply` fuzz target give it bytes.
//! A server is trusted with nothing: a line, a bulk string, an array and the
//! nesting of arrays each have a bound ([`MAX_LINE`], [`MAX_BULK`],
//! [`MAX_ARRAY`], [`MAX_DEPTH`]); past a small first reservation, memory
//! grows with the bytes that arrive, not with a length the server
//! announces; and anything that is not RESP2 as Redis writes it is a
//! [`Malformed`] error.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Longest bulk string accepted in a reply (an event or message is far
/// smaller: the daemon's `max_body` bounds them).
pub const MAX_BULK: usize = 64 * 1024 * 1024;
/// Most elements in one reply array.
pub const MAX_ARRAY: usize = 1 << 20;
/// Most arrays around any value of a reply: a value inside more is refused
/// (XREAD's entry fields sit inside four).
pub const MAX_DEPTH: usize = 8;
/// Longest line (status, error, integer, length), its CRLF included.
pub const MAX_LINE: usize = 64 * 1024;
/// Bytes reserved for a bulk string before its data arrives: past this the
/// buffer grows as the data comes, so a length the server announces but
/// never sends costs no more.
const BULK_RESERVE: usize = 64 * 1024;
/// Elements reserved for an array before they arrive (the same reason).
const ARRAY_RESERVE: usize = 1024;

/// A Redis server as a `redis://` URL names it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct RedisUrl {
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
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
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
    /// The connection failed (connect, read, write, timeout). A reply cut
    /// short is [`io::ErrorKind::UnexpectedEof`].
    Io(io::Error),
    /// The server sent bytes that are not RESP2, or past a bound.
    Malformed(Malformed),
    /// The server sent a well-formed reply of a shape the command does not
    /// give.
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
            RespError::Malformed(m) => write!(f, "malformed reply: {m}"),
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

impl From<Malformed> for RespError {
    fn from(m: Malformed) -> Self {
        RespError::Malformed(m)
    }
}

/// What is wrong with the bytes of a reply. After any of these the
/// connection is out of step and must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Malformed {
    /// A line (status, error, integer or length) runs past [`MAX_LINE`]
    /// bytes without its LF.
    LineTooLong,
    /// A line ends in LF without CR before it.
    BareLf,
    /// A line has nothing before its CRLF, not even a type byte.
    EmptyLine,
    /// The type byte is none of RESP2's `+ - : $ *` (RESP3's `_ , # %`
    /// and others among them).
    UnknownType(u8),
    /// An integer or a length is not a decimal `i64` as Redis writes one:
    /// an optional `-`, then `0` alone or digits without a leading zero;
    /// no `+`, spaces, `-0` or overflow.
    BadNumber,
    /// A bulk or array length below -1 (-1 is the null).
    NegativeLength(i64),
    /// A bulk length over [`MAX_BULK`].
    BulkTooLong(i64),
    /// An array length over [`MAX_ARRAY`].
    ArrayTooLong(i64),
    /// A bulk string's data is not followed by CRLF.
    BulkWithoutCrlf,
    /// A value inside more than [`MAX_DEPTH`] arrays.
    TooDeep,
    /// A status reply is not UTF-8.
    StatusNotUtf8,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::LineTooLong => write!(f, "a line over {MAX_LINE} bytes"),
            Malformed::BareLf => f.write_str("a line ending in LF without CR"),
            Malformed::EmptyLine => f.write_str("an empty line"),
            Malformed::UnknownType(b) => write!(f, "unknown type byte '{}'", b.escape_ascii()),
            Malformed::BadNumber => f.write_str("a number that is not a decimal integer"),
            Malformed::NegativeLength(n) => write!(f, "length {n}"),
            Malformed::BulkTooLong(n) => {
                write!(f, "bulk string of {n} bytes (limit {MAX_BULK})")
            }
            Malformed::ArrayTooLong(n) => {
                write!(f, "array of {n} elements (limit {MAX_ARRAY})")
            }
            Malformed::BulkWithoutCrlf => f.write_str("bulk string without CRLF"),
            Malformed::TooDeep => write!(f, "arrays nested deeper than {MAX_DEPTH}"),
            Malformed::StatusNotUtf8 => f.write_str("a status line that is not UTF-8"),
        }
    }
}

impl std::error::Error for Malformed {}

/// Reads one reply from `reader`, leaving it at the start of the next.
///
/// An error reply (`-`) is [`RespError::Server`]; one inside an array
/// fails the whole array, once all of it is read, so a connection stays in
/// step. A null (`$-1` or `*-1`) is [`Value::Nil`].
///
/// # Errors
///
/// [`RespError::Server`] for an error reply, [`RespError::Malformed`] for
/// bytes that are not RESP2 or past a bound, and [`RespError::Io`] when
/// `reader` fails or ends before the reply does
/// ([`io::ErrorKind::UnexpectedEof`]: with bytes in memory, more are
/// needed).
pub fn read_reply<R: BufRead + ?Sized>(reader: &mut R) -> Result<Value, RespError> {
    read_value(reader, 0)
}

/// One line without its CRLF.
fn read_line<R: BufRead + ?Sized>(reader: &mut R) -> Result<Vec<u8>, RespError> {
    let mut line = Vec::new();
    // `take`: a server that never sends LF costs MAX_LINE bytes, not more.
    (&mut *reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() == MAX_LINE {
            Malformed::LineTooLong.into()
        } else {
            RespError::Io(io::ErrorKind::UnexpectedEof.into())
        });
    }
    if !line.ends_with(b"\r\n") {
        return Err(Malformed::BareLf.into());
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

/// An integer as Redis writes one (its `string2ll` accepts nothing else):
/// `0`, or an optional `-` and digits without a leading zero.
fn parse_int(text: &[u8]) -> Result<i64, Malformed> {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    let canonical = match digits {
        [] => false,
        [b'0'] => digits.len() == text.len(),
        [first, ..] => *first != b'0' && digits.iter().all(u8::is_ascii_digit),
    };
    if !canonical {
        return Err(Malformed::BadNumber);
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Malformed::BadNumber)
}

/// A bulk or array length: `None` for the null (-1), else at most `max`.
fn parse_len(
    text: &[u8],
    max: usize,
    too_long: fn(i64) -> Malformed,
) -> Result<Option<usize>, Malformed> {
    match parse_int(text)? {
        -1 => Ok(None),
        n if n < 0 => Err(Malformed::NegativeLength(n)),
        n => match usize::try_from(n) {
            Ok(len) if len <= max => Ok(Some(len)),
            _ => Err(too_long(n)),
        },
    }
}

fn read_value<R: BufRead + ?Sized>(reader: &mut R, depth: usize) -> Result<Value, RespError> {
    if depth > MAX_DEPTH {
        return Err(Malformed::TooDeep.into());
    }
    let line = read_line(reader)?;
    let (&kind, rest) = line.split_first().ok_or(Malformed::EmptyLine)?;
    match kind {
        b'+' => std::str::from_utf8(rest)
            .map(|s| Value::Status(s.to_owned()))
            .map_err(|_| Malformed::StatusNotUtf8.into()),
        b'-' => Err(RespError::Server(
            String::from_utf8_lossy(rest).into_owned(),
        )),
        b':' => Ok(Value::Int(parse_int(rest)?)),
        b'$' => {
            let Some(n) = parse_len(rest, MAX_BULK, Malformed::BulkTooLong)? else {
                return Ok(Value::Nil);
            };
            let mut data = Vec::with_capacity(n.min(BULK_RESERVE));
            // `n` is at most MAX_BULK: the cast is lossless.
            let got = (&mut *reader).take(n as u64).read_to_end(&mut data)?;
            if got < n {
                return Err(RespError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            let mut crlf = [0; 2];
            reader.read_exact(&mut crlf)?;
            if crlf != *b"\r\n" {
                return Err(Malformed::BulkWithoutCrlf.into());
            }
            Ok(Value::Bulk(data))
        }
        b'*' => {
            let Some(n) = parse_len(rest, MAX_ARRAY, Malformed::ArrayTooLong)? else {
                return Ok(Value::Nil);
            };
            let mut items = Vec::with_capacity(n.min(ARRAY_RESERVE));
            let mut error = None;
            for _ in 0..n {
                match read_value(reader, depth + 1) {
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
        other => Err(Malformed::UnknownType(other).into()),
    }
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Conn {
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
    pub(crate) fn connect(
        url: &RedisUrl,
        name: &str,
        timeout: Duration,
    ) -> Result<Conn, RespError> {
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
    pub(crate) fn command(&mut self, args: &[&[u8]]) -> Result<Value, RespError> {
        self.out.clear();
        encode(&mut self.out, args);
        self.reader.get_mut().write_all(&self.out)?;
        read_reply(&mut self.reader)
    }

    /// Sends several commands at once, then reads their replies in order.
    ///
    /// # Errors
    ///
    /// A broken connection; error replies come back in the vector.
    pub(crate) fn pipeline(
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
            match read_reply(&mut self.reader) {
                Err(e) if !e.keeps_connection() => return Err(e),
                r => replies.push(r),
            }
        }
        Ok(replies)
    }

    /// Whether the server has closed this (idle) connection, or sent
    /// something nobody asked for: either way it must not be used.
    pub(crate) fn is_dead(&self) -> bool {
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
    pub(crate) fn with_read_timeout<T>(
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

    /// What the reader made of some bytes, comparable in a table.
    #[derive(Debug, PartialEq)]
    enum Read {
        Value(Value),
        Server(String),
        Malformed(Malformed),
        /// The bytes ended before the reply: more are needed.
        NeedMore,
    }

    fn outcome(r: Result<Value, RespError>) -> Read {
        match r {
            Ok(v) => Read::Value(v),
            Err(RespError::Server(m)) => Read::Server(m),
            Err(RespError::Malformed(m)) => Read::Malformed(m),
            Err(RespError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Read::NeedMore,
            Err(e) => panic!("no other error from bytes in memory: {e:?}"),
        }
    }

    /// Reads one reply from `bytes`: what came of it and how many bytes it
    /// took. The same bytes read through a one-byte buffer (every line and
    /// bulk string split across reads) must give the same.
    fn read(bytes: &[u8]) -> (Read, usize) {
        let mut rest = bytes;
        let got = outcome(read_reply(&mut rest));
        let mut tiny = BufReader::with_capacity(1, bytes);
        assert_eq!(
            outcome(read_reply(&mut tiny)),
            got,
            "{} a byte at a time",
            shown(bytes)
        );
        (got, bytes.len() - rest.len())
    }

    /// `bytes` for a failure message, long ones cut.
    fn shown(bytes: &[u8]) -> String {
        let text = bytes[..bytes.len().min(80)].escape_ascii().to_string();
        if bytes.len() > 80 {
            format!("{text}... ({} bytes)", bytes.len())
        } else {
            text
        }
    }

    fn bulk(b: &[u8]) -> Value {
        Value::Bulk(b.to_vec())
    }

    fn status(s: &str) -> Value {
        Value::Status(s.to_owned())
    }

    /// Complete replies and what they read as.
    fn valid() -> Vec<(Vec<u8>, Value)> {
        use Value::{Array, Int, Nil};
        let mut table: Vec<(Vec<u8>, Value)> = [
            (&b"+OK\r\n"[..], status("OK")),
            (b"+\r\n", status("")),
            (b"+caf\xc3\xa9 \t\r\n", status("café \t")),
            (b":0\r\n", Int(0)),
            (b":42\r\n", Int(42)),
            (b":-7\r\n", Int(-7)),
            (b":9223372036854775807\r\n", Int(i64::MAX)),
            (b":-9223372036854775808\r\n", Int(i64::MIN)),
            (b"$0\r\n\r\n", bulk(b"")),
            (b"$5\r\nhello\r\n", bulk(b"hello")),
            // The length, not a CRLF, ends the data.
            (b"$4\r\na\r\nb\r\n", bulk(b"a\r\nb")),
            (b"$4\r\n\0\xff\n\r\r\n", bulk(b"\0\xff\n\r")),
            (b"$-1\r\n", Nil),
            (b"*-1\r\n", Nil),
            (b"*0\r\n", Array(vec![])),
            (
                b"*4\r\n+OK\r\n:1\r\n$1\r\nx\r\n$-1\r\n",
                Array(vec![status("OK"), Int(1), bulk(b"x"), Nil]),
            ),
            (
                b"*3\r\n*1\r\n*0\r\n*-1\r\n*2\r\n:1\r\n:2\r\n",
                Array(vec![
                    Array(vec![Array(vec![])]),
                    Nil,
                    Array(vec![Int(1), Int(2)]),
                ]),
            ),
            // XREAD: streams, [key, entries], entries, [id, fields].
            (
                b"*1\r\n*2\r\n$9\r\nssed:t:ab\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nf\r\n$2\r\nhi\r\n",
                Array(vec![Array(vec![
                    bulk(b"ssed:t:ab"),
                    Array(vec![Array(vec![
                        bulk(b"1-1"),
                        Array(vec![bulk(b"f"), bulk(b"hi")]),
                    ])]),
                ])]),
            ),
        ]
        .into_iter()
        .map(|(b, v)| (b.to_vec(), v))
        .collect();
        // A value inside MAX_DEPTH arrays; an empty array is a value too.
        for (leaf, mut v) in [(&b":7\r\n"[..], Int(7)), (b"*0\r\n", Array(vec![]))] {
            let mut bytes = b"*1\r\n".repeat(MAX_DEPTH);
            bytes.extend_from_slice(leaf);
            for _ in 0..MAX_DEPTH {
                v = Array(vec![v]);
            }
            table.push((bytes, v));
        }
        // The longest line, its CRLF included.
        let text = "a".repeat(MAX_LINE - 3);
        table.push((format!("+{text}\r\n").into_bytes(), status(&text)));
        table
    }

    #[test]
    fn reads_valid_replies() {
        for (bytes, want) in valid() {
            let shown = shown(&bytes);
            assert_eq!(
                read(&bytes),
                (Read::Value(want.clone()), bytes.len()),
                "{shown}"
            );
            // Pipelined: the reader stops where the reply ends.
            let mut two = bytes.clone();
            two.extend_from_slice(b"+next\r\n");
            let mut rest = &two[..];
            assert_eq!(outcome(read_reply(&mut rest)), Read::Value(want), "{shown}");
            assert_eq!(outcome(read_reply(&mut rest)), Read::Value(status("next")));
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn truncated_replies_need_more() {
        let mut replies: Vec<Vec<u8>> = valid()
            .into_iter()
            .filter(|(b, _)| b.len() < 1024)
            .map(|(b, _)| b)
            .collect();
        replies.push(b"-ERR wrong type\r\n".to_vec());
        replies.push(b"*2\r\n-ERR a\r\n$2\r\nxy\r\n".to_vec());
        for bytes in replies {
            for cut in 0..bytes.len() {
                let prefix = &bytes[..cut];
                assert_eq!(read(prefix).0, Read::NeedMore, "{}", shown(prefix));
            }
        }
    }

    #[test]
    fn refuses_malformed_replies() {
        use Malformed::*;
        let mut table: Vec<(Vec<u8>, Read)> = [
            (&b""[..], Read::NeedMore),
            (b"\r\n", Read::Malformed(EmptyLine)),
            (b"?\r\n", Read::Malformed(UnknownType(b'?'))),
            (b"OK\r\n", Read::Malformed(UnknownType(b'O'))),
            (b"\xff\r\n", Read::Malformed(UnknownType(0xff))),
            // RESP3: null, double, map.
            (b"_\r\n", Read::Malformed(UnknownType(b'_'))),
            (b",1.5\r\n", Read::Malformed(UnknownType(b','))),
            (b"%1\r\n+a\r\n+b\r\n", Read::Malformed(UnknownType(b'%'))),
            (b"\n", Read::Malformed(BareLf)),
            (b"+OK\n", Read::Malformed(BareLf)),
            (b":1\n", Read::Malformed(BareLf)),
            (b"$1\n", Read::Malformed(BareLf)),
            (b"*1\r\n+OK\n", Read::Malformed(BareLf)),
            (b"+OK", Read::NeedMore),
            (b"+OK\r", Read::NeedMore),
            (b"+\xff\r\n", Read::Malformed(StatusNotUtf8)),
            (b"$-2\r\n", Read::Malformed(NegativeLength(-2))),
            (b"*-2\r\n", Read::Malformed(NegativeLength(-2))),
            (
                b"$-9223372036854775808\r\n",
                Read::Malformed(NegativeLength(i64::MIN)),
            ),
            // At a bound: accepted, then the data is missing.
            (b"$67108864\r\n", Read::NeedMore),
            (b"*1048576\r\n", Read::NeedMore),
            (b"$67108865\r\n", Read::Malformed(BulkTooLong(67108865))),
            (
                b"$9223372036854775807\r\n",
                Read::Malformed(BulkTooLong(i64::MAX)),
            ),
            (b"*1048577\r\n", Read::Malformed(ArrayTooLong(1048577))),
            (b"$1\r\nab\r\n", Read::Malformed(BulkWithoutCrlf)),
            (b"$1\r\na\n\r", Read::Malformed(BulkWithoutCrlf)),
            (b"$0\r\nxx", Read::Malformed(BulkWithoutCrlf)),
            (b"$2\r\nab\n\n", Read::Malformed(BulkWithoutCrlf)),
            (b"$2\r\nab\r", Read::NeedMore),
            // Error replies, alone and inside arrays: read to the end.
            (
                b"-ERR wrong type\r\n",
                Read::Server("ERR wrong type".into()),
            ),
            (b"-\r\n", Read::Server("".into())),
            (b"-\xff\r\n", Read::Server("\u{fffd}".into())),
            (b"*3\r\n:1\r\n-E1\r\n-E2\r\n", Read::Server("E1".into())),
            (b"*2\r\n*1\r\n-E\r\n:1\r\n", Read::Server("E".into())),
            // ...but bytes that are not RESP after one end the connection.
            (b"*2\r\n-E\r\n?\r\n", Read::Malformed(UnknownType(b'?'))),
        ]
        .into_iter()
        .map(|(b, r)| (b.to_vec(), r))
        .collect();
        // Integers and lengths as Redis writes them, nothing else.
        for bad in [
            &b""[..],
            b"-",
            b"+1",
            b" 1",
            b"1 ",
            b"01",
            b"00",
            b"-0",
            b"-01",
            b"1.0",
            b"0x1",
            b"1e3",
            b"1_000",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"99999999999999999999999",
            "\u{661}".as_bytes(), // ARABIC-INDIC DIGIT ONE
        ] {
            for kind in [b':', b'$', b'*'] {
                let mut bytes = vec![kind];
                bytes.extend_from_slice(bad);
                bytes.extend_from_slice(b"\r\n");
                table.push((bytes, Read::Malformed(BadNumber)));
            }
        }
        // Lines past MAX_LINE, whatever their type: refused before their
        // end, and one that never ends costs MAX_LINE bytes.
        for kind in [b'+', b'-', b':', b'$', b'*'] {
            let mut bytes = vec![kind];
            bytes.resize(MAX_LINE - 1, b'1');
            bytes.extend_from_slice(b"\r\n"); // one byte over
            table.push((bytes, Read::Malformed(LineTooLong)));
            let mut endless = vec![kind];
            endless.resize(3 * MAX_LINE, b'1');
            table.push((endless, Read::Malformed(LineTooLong)));
        }
        // A value inside one array too many, and a server nesting without
        // end: refused at the bound, not at the stack's.
        let mut deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        deep.extend_from_slice(b":1\r\n");
        table.push((deep, Read::Malformed(TooDeep)));
        table.push((b"*1\r\n".repeat(100_000), Read::Malformed(TooDeep)));
        table.push((b"*2\r\n".repeat(100_000), Read::Malformed(TooDeep)));

        for (bytes, want) in table {
            let shown = shown(&bytes);
            let (got, used) = read(&bytes);
            if let Read::Server(_) = want {
                assert_eq!(used, bytes.len(), "{shown}: read to its end");
            }
            if let Read::Malformed(m) = &got {
                let text = RespError::from(*m).to_string();
                assert!(!text.ends_with('.') && text.starts_with("malformed reply: "));
            }
            assert_eq!(got, want, "{shown}");
        }
    }

    #[test]
    fn errors_end_the_connection_but_error_replies() {
        let malformed = RespError::from(Malformed::TooDeep);
        let cut = RespError::Io(io::ErrorKind::UnexpectedEof.into());
        assert!(!malformed.keeps_connection() && !cut.keeps_connection());
        assert!(RespError::Server("ERR".into()).keeps_connection());
    }

    #[test]
    fn encodes_commands() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SET", b"k", b""]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }
}
