//! Helpers shared by the integration tests: a server on `127.0.0.1:0` and a
//! raw HTTP/1.1 client over `TcpStream` with a timeout on every read.
//!
//! Every test binary includes this module with `mod support;`; not every
//! binary uses every helper.
#![allow(dead_code)]

#[cfg(feature = "daemon")]
pub mod loadtest;
#[cfg(feature = "daemon")]
pub mod netns;
#[cfg(feature = "daemon")]
pub mod pebble;
#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "daemon")]
pub mod process;
#[cfg(feature = "daemon")]
pub mod redis;
#[cfg(feature = "tls")]
pub mod tls;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A daemon running in this process; dropping it stops it.
#[cfg(feature = "daemon")]
pub struct InProcess {
    pub addr: SocketAddr,
    /// The hub it serves, to publish into as an embedding program would.
    pub hub: ssed::Hub,
    pub server: ssed::RunningServer,
}

/// The daemon in this process, built from `toml` (which names `listen`,
/// `127.0.0.1:0` say).
#[cfg(feature = "daemon")]
pub fn daemon(toml: &str) -> InProcess {
    let config = ssed::daemon::Config::from_toml(toml, None).expect("test config is valid");
    let built = ssed::daemon::build(config, ssed::ShutdownHandle::new()).expect("daemon builds");
    let server = built.server.spawn().expect("daemon starts");
    InProcess {
        addr: server.local_addr(),
        hub: built.hub,
        server,
    }
}

/// Percent-encodes all but the unreserved characters, as a browser's
/// `encodeURIComponent` would (and more): a query or form value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An HS256 JWT of `claims` with `header`, signed with `secret` (ring's
/// HMAC): what a backend would mint.
#[cfg(feature = "daemon")]
pub fn hs256(secret: &str, header: &serde_json::Value, claims: &serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let signing = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, signing.as_bytes());
    format!("{signing}.{}", b64(tag.as_ref()))
}

/// How long any single read may block before the test fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts `builder` on 127.0.0.1:0 in the background.
pub fn start(builder: ssed::ServerBuilder) -> ssed::RunningServer {
    builder
        .listen("127.0.0.1:0")
        .build()
        .expect("server builds")
        .spawn()
        .expect("server starts")
}

/// Connects with read and write timeouts set.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(READ_TIMEOUT))
        .expect("read timeout");
    s.set_write_timeout(Some(READ_TIMEOUT))
        .expect("write timeout");
    s
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct Head {
    pub version: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
}

/// A connection to `server` from the local address `from` (any of
/// 127/8 on loopback: a client with an address of its own).
pub fn connect_from(from: &str, server: SocketAddr) -> TcpStream {
    let from: std::net::IpAddr = from.parse().expect("an address");
    let fd = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .expect("socket");
    rustix::net::bind(&fd, &SocketAddr::new(from, 0)).expect("bind the client's address");
    rustix::net::connect(&fd, &server).expect("connect");
    let conn = TcpStream::from(fd);
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn
}

/// A client connection that reads a response head, then either a sized
/// body or an event stream (chunked or close-delimited).
pub struct Client {
    pub conn: TcpStream,
    buf: Vec<u8>,
    /// Decoded stream body not yet consumed as frames.
    body: Vec<u8>,
    chunked: Option<bool>,
    /// True once the terminating chunk (or EOF) was seen.
    pub ended: bool,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Client::from_conn(connect(addr))
    }

    pub fn from_conn(conn: TcpStream) -> Self {
        Client {
            conn,
            buf: Vec::new(),
            body: Vec::new(),
            chunked: None,
            ended: false,
        }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, raw: &[u8]) -> &mut Self {
        self.conn.write_all(raw).expect("send request");
        self
    }

    /// Sends `GET path` for an event stream, with extra header lines.
    pub fn get_stream(&mut self, path: &str, extra: &[&str]) -> Head {
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n");
        for h in extra {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        self.send(req.as_bytes());
        self.head()
    }

    /// Reads more bytes into the buffer; Ok(0) at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = self.conn.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads a response head.
    pub fn head(&mut self) -> Head {
        self.try_head().expect("response head")
    }

    pub fn try_head(&mut self) -> io::Result<Head> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 4).collect();
                let text =
                    String::from_utf8(raw).map_err(|_| io::Error::other("head not utf-8"))?;
                let mut lines = text.split("\r\n");
                let status_line = lines.next().unwrap_or_default();
                let mut parts = status_line.splitn(3, ' ');
                let version = parts.next().unwrap_or_default().to_owned();
                let status = parts
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
                let headers = lines
                    .filter(|l| !l.is_empty())
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .collect::<Vec<_>>();
                let head = Head {
                    version,
                    status,
                    headers,
                };
                self.chunked = Some(head.is_chunked());
                return Ok(head);
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "eof before head",
                ));
            }
        }
    }

    /// Reads a `Content-Length` body after [`Client::head`].
    pub fn body(&mut self, head: &Head) -> Vec<u8> {
        let len: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while self.buf.len() < len {
            if self.fill().expect("body") == 0 {
                panic!("eof in body");
            }
        }
        self.buf.drain(..len).collect()
    }

    /// Reads a head and its sized body as text.
    pub fn response(&mut self) -> (Head, String) {
        let head = self.head();
        let body = self.body(&head);
        (head, String::from_utf8(body).expect("utf-8 body"))
    }

    /// Decodes more of the stream body; false at the end of the stream.
    fn pump(&mut self) -> io::Result<bool> {
        if self.ended {
            return Ok(false);
        }
        if self.chunked == Some(true) {
            loop {
                // Decode as many whole chunks as are buffered.
                if let Some(line_end) = find(&self.buf, b"\r\n") {
                    let size_text = std::str::from_utf8(&self.buf[..line_end])
                        .map_err(|_| io::Error::other("bad chunk size"))?;
                    let size = usize::from_str_radix(size_text.trim(), 16)
                        .map_err(|_| io::Error::other(format!("bad chunk size {size_text:?}")))?;
                    let total = line_end + 2 + size + 2;
                    if self.buf.len() >= total {
                        if &self.buf[total - 2..total] != b"\r\n" {
                            return Err(io::Error::other("chunk not followed by CRLF"));
                        }
                        let data: Vec<u8> = self.buf[line_end + 2..line_end + 2 + size].to_vec();
                        self.buf.drain(..total);
                        if size == 0 {
                            self.ended = true;
                            return Ok(false);
                        }
                        self.body.extend_from_slice(&data);
                        return Ok(true);
                    }
                }
                if self.fill()? == 0 {
                    self.ended = true;
                    return Ok(false);
                }
            }
        } else {
            if !self.buf.is_empty() {
                self.body.append(&mut self.buf);
                return Ok(true);
            }
            if self.fill()? == 0 {
                self.ended = true;
                return Ok(false);
            }
            self.body.append(&mut self.buf);
            Ok(true)
        }
    }

    /// The next raw frame (text up to and including the blank line), or
    /// None when the stream ends first.
    pub fn next_frame(&mut self) -> Option<String> {
        self.try_next_frame().expect("reading a frame")
    }

    pub fn try_next_frame(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = find(&self.body, b"\n\n") {
                let raw: Vec<u8> = self.body.drain(..end + 2).collect();
                return String::from_utf8(raw)
                    .map(Some)
                    .map_err(|_| io::Error::other("frame not utf-8"));
            }
            if !self.pump()? {
                return Ok(None);
            }
        }
    }

    /// Reads frames until one satisfies `pred` (bounded by `limit` frames).
    pub fn frame_matching(&mut self, limit: usize, pred: impl Fn(&str) -> bool) -> String {
        for _ in 0..limit {
            match self.next_frame() {
                Some(f) if pred(&f) => return f,
                Some(_) => {}
                None => panic!("stream ended before a matching frame"),
            }
        }
        panic!("no matching frame within {limit} frames")
    }

    /// Reads until the stream ends; returns the frames seen.
    pub fn until_end(&mut self, limit: usize) -> Vec<String> {
        let mut frames = Vec::new();
        for _ in 0..limit {
            match self.next_frame() {
                Some(f) => frames.push(f),
                None => return frames,
            }
        }
        panic!("stream did not end within {limit} frames")
    }

    /// Whether the peer has closed the connection (reads until EOF or a
    /// timeout, discarding data).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        while Instant::now() < deadline {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            self.conn
                .set_read_timeout(Some(left))
                .expect("read timeout");
            match self.conn.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
        false
    }
}

/// Sends one request on a fresh connection and returns the response.
pub fn request(addr: SocketAddr, raw: &str) -> (Head, String) {
    let mut c = Client::new(addr);
    c.send(raw.as_bytes());
    c.response()
}

/// The text of one request that closes its connection: `method path`,
/// `Host: host`, the `extra` header lines, then `body`.
pub fn request_text(method: &str, path: &str, host: &str, extra: &[&str], body: &str) -> String {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    req
}

/// Publishes a 16 KiB event on `topic` every 5 ms until a stream of `srv`
/// ends with a write timeout or as slow (a client that stopped reading),
/// for at most 10 s; how many did.
pub fn publish_until_stalled(hub: &ssed::Hub, srv: &ssed::RunningServer, topic: &str) -> u64 {
    let big = "x".repeat(16 * 1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = hub.publish(topic, ssed::Event::new().data(big.as_str()));
        let s = srv.stats().snapshot();
        let ended =
            s.disconnects(ssed::EndReason::WriteTimeout) + s.disconnects(ssed::EndReason::Slow);
        if ended > 0 || Instant::now() > deadline {
            return ended;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// POSTs `body` to `path`; the status and the body of the answer.
pub fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let (head, text) = request(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    (head.status, text)
}

/// One field of a frame (`data`, `event`, `id`, …): every value in order.
pub fn field<'a>(frame: &'a str, name: &str) -> Vec<&'a str> {
    frame
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            (k == name).then(|| v.strip_prefix(' ').unwrap_or(v))
        })
        .collect()
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Threads of this process, from /proc/self/task.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Whether the server still holds `c` open: a non-blocking read finds
/// neither data, nor EOF, nor an error.
pub fn still_open(c: &TcpStream) -> bool {
    c.set_nonblocking(true).expect("non-blocking");
    let open =
        matches!((&*c).read(&mut [0u8; 64]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    c.set_nonblocking(false).expect("blocking");
    open
}

/// Reads `c` until the server closes it or `deadline` passes; returns what
/// was read, or `None` if the connection was still open at the deadline.
pub fn read_to_close(c: &TcpStream, deadline: Instant) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    // Bounded: each pass either reads bytes (at most a short answer) or ends.
    for _ in 0..64 {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        c.set_read_timeout(Some(left)).expect("read timeout");
        match (&*c).read(&mut chunk) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            // A reset also means the server let go of it.
            Err(_) => return Some(got),
        }
    }
    None
}

/// `GET /metrics` of a daemon: each series (labels included) and its value.
pub fn metrics(addr: SocketAddr) -> HashMap<String, u64> {
    let (head, body) = request(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200, "{body}");
    assert!(
        head.header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{head:?}"
    );
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad metric line {l:?}"));
            let v = v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (k.to_owned(), v)
        })
        .collect()
}

/// `streams_open` of a daemon's `/healthz`.
pub fn streams_open(addr: SocketAddr) -> u64 {
    let (head, body) = request(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v["streams_open"].as_u64().expect("streams_open")
}

/// A directory of its own for one test, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("ssed-test-{}-{nanos}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0); // best effort
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Runs the tests of one binary that take it one at a time: they count
/// threads, descriptors or memory, or hold thousands of sockets.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next one may still run.
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One series of a daemon's `/metrics` (labels included); fails the test
/// when it is missing.
pub fn metric(addr: SocketAddr, series: &str) -> u64 {
    let m = metrics(addr);
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in /metrics: {m:?}"))
}

/// A local address other than loopback that this test can listen on and
/// connect to (traffic to it never leaves the machine).
pub fn non_loopback_ip() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing: it only asks the routing table
    // which local address would be used.
    let probes = [
        "192.0.2.1:9",
        "10.255.255.254:9",
        "172.31.255.254:9",
        "192.168.255.254:9",
        "[2001:db8::1]:9",
        "[fd00::1]:9",
    ];
    probes.iter().find_map(|probe| {
        let target: std::net::SocketAddr = probe.parse().ok()?;
        let bind = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let s = std::net::UdpSocket::bind(bind).ok()?;
        s.connect(target).ok()?;
        let ip = s.local_addr().ok()?.ip();
        let usable = !ip.is_loopback()
            && !ip.is_unspecified()
            && std::net::TcpListener::bind((ip, 0)).is_ok();
        usable.then_some(ip)
    })
}
