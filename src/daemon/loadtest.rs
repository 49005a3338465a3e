//! `ssed loadtest`: open many event streams against a URL, optionally
//! publish timed events into them, and report what the server held and how
//! fast it delivered.
//!
//! One thread drives every stream: the sockets are non-blocking and watched
//! with epoll, so holding 19,000 streams costs 19,000 descriptors and a few
//! hundred bytes each here, never a thread. Each stream keeps only a small
//! state machine: where it is in the chunked encoding and the first bytes of
//! the current SSE line (enough for the `{"t":...}` send time this tool puts
//! first in every event it publishes).
//!
//! The optional publisher is its own thread with one blocking keep-alive
//! HTTP/1.1 connection. Every event's body is `{"t":<unix nanos>,"seq":N}`;
//! a stream that receives it records `now - t` in a shared log-linear
//! histogram (0.8% precision), so memory does not grow with deliveries.
//!
//! Phases: ramp-up (connects paced at `--ramp`), a short settle so the
//! server's stream threads have subscribed, publishing, then the hold
//! (`--duration`; with a publisher it ends early once every expected
//! delivery arrived). Every phase is bounded, and Ctrl-C ends the run with a
//! report of what was measured so far.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::epoll;
use rustix::fd::OwnedFd;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use serde_json::{Value, json};

use super::config::parse_duration;

const USAGE: &str = "\
ssed loadtest - hold many event streams and measure delivery latency

USAGE:
    ssed loadtest --url http://HOST:PORT/events/TOPIC --connections N [OPTIONS]

OPTIONS:
    --url URL             the stream to open, N times (http:// only)
    -n, --connections N   streams to open
    --ramp R[/s]          connections opened per second (default 1000; 0 = unpaced)
    --duration D          how long to hold the streams after the ramp-up, or after
                          the last publish (default 10s); with a publisher the hold
                          ends as soon as every expected delivery has arrived
    --publish-url URL     publish timed events here (POST, keep-alive)
    --events M            events to publish (default 100)
    --rate R[/s]          events per second (default 10; 0 = as fast as the server answers)
    --json                print one JSON object instead of the table
    -h, --help            print this help

Progress goes to stderr once a second; the summary goes to stdout.
held: streams open with 200 at the end; refused: 503 (or ssed's overload = \"retry\"
answer); other: any other status; failed: no response (connect error, timeout);
dropped: closed by the server after 200. Deliveries expected = events published x
streams held when publishing began; latency = receive time - the send time each
event carries ({\"t\":<unix ns>,\"seq\":N}).

ENVIRONMENT:
    SSED_SUBSCRIBE_TOKEN   sent as a Bearer token when opening streams
    SSED_PUBLISH_TOKEN     sent as a Bearer token when publishing
";

/// Exit status for bad arguments.
const EXIT_USAGE: u8 = 2;
/// Time from starting a connect to a complete response head.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time one publish request may take (each read and write).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between the ramp-up and the first publish: a server answers the
/// stream's head before its thread subscribes to the topic.
const SETTLE: Duration = Duration::from_millis(300);
/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Bytes of each SSE line kept: the field name and the start of the value,
/// where the send time sits.
const LINE_KEEP: usize = 48;
/// What this tool's event bodies start with.
const SENT_PREFIX: &[u8] = b"{\"t\":";
/// Connects started per turn of the loop, so reading is never starved.
const CONNECT_BURST: u64 = 256;
/// Reads from one stream per readiness report (level-triggered: the rest
/// is reported again).
const READS_PER_WAKE: usize = 8;
/// Read buffer shared by every stream.
const SCRATCH: usize = 64 * 1024;
/// How often connect and head deadlines are checked.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Consecutive failed publishes after which the publisher gives up.
const MAX_PUBLISH_FAILURES: u64 = 10;
/// Descriptors kept for everything but the streams.
const FDS_RESERVED: u64 = 16;

/// Runs `ssed loadtest` with `args` (everything after `loadtest`) and
/// returns the process exit code: 0 after a report, 1 when the run could
/// not be made, 2 for bad arguments.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let options = match Options::parse(args) {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help) => {
            let _ = io::stdout().write_all(USAGE.as_bytes()); // nothing to do if stdout is gone
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = writeln!(
                io::stderr(),
                "ssed loadtest: {e}\nTry 'ssed loadtest --help'."
            ); // nothing to do if stderr is gone
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(&options) {
        Ok(report) => {
            let text = if options.json {
                let mut s = report.to_json().to_string();
                s.push('\n');
                s
            } else {
                report.table()
            };
            let mut out = io::stdout().lock();
            if out
                .write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(io::stderr(), "ssed loadtest: {e}"); // nothing else to do
            ExitCode::FAILURE
        }
    }
}

// ----- arguments ---------------------------------------------------------------

#[derive(Debug, Clone)]
struct Options {
    url: Target,
    connections: u64,
    /// Connects per second; 0 = unpaced.
    ramp: f64,
    duration: Duration,
    publish: Option<PublishOptions>,
    json: bool,
    subscribe_token: Option<String>,
}

#[derive(Debug, Clone)]
struct PublishOptions {
    url: Target,
    events: u64,
    /// Events per second; 0 = flat out.
    rate: f64,
    token: Option<String>,
}

enum Parsed {
    Run(Box<Options>),
    Help,
}

/// A bad command line, said in one line.
#[derive(Debug)]
struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<lexopt::Error> for UsageError {
    fn from(e: lexopt::Error) -> Self {
        UsageError(e.to_string())
    }
}

impl Options {
    fn parse(args: Vec<OsString>) -> Result<Parsed, UsageError> {
        use lexopt::prelude::*;
        let mut url = None;
        let mut connections = None;
        let mut ramp = 1000.0;
        let mut duration = Duration::from_secs(10);
        let mut publish_url = None;
        let mut events = None;
        let mut rate = None;
        let mut json = false;
        let mut parser = lexopt::Parser::from_args(args);
        while let Some(arg) = parser.next()? {
            match arg {
                Long("url") => url = Some(parser.value()?.string()?),
                Short('n') | Long("connections") => {
                    connections = Some(parse_count("--connections", &parser.value()?.string()?)?);
                }
                Long("ramp") => ramp = parse_rate("--ramp", &parser.value()?.string()?)?,
                Long("duration") => {
                    let v = parser.value()?.string()?;
                    duration =
                        parse_duration(&v).map_err(|e| UsageError(format!("--duration: {e}")))?;
                }
                Long("publish-url") => publish_url = Some(parser.value()?.string()?),
                Long("events") => {
                    events = Some(parse_count("--events", &parser.value()?.string()?)?)
                }
                Long("rate") => rate = Some(parse_rate("--rate", &parser.value()?.string()?)?),
                Long("json") => json = true,
                Short('h') | Long("help") => return Ok(Parsed::Help),
                _ => return Err(arg.unexpected().into()),
            }
        }
        let url = url.ok_or_else(|| {
            UsageError(
                "missing --url (the stream to open, e.g. http://127.0.0.1:8080/events/bench)"
                    .into(),
            )
        })?;
        let url = Target::parse(&url).map_err(|e| UsageError(format!("--url: {e}")))?;
        let connections = connections
            .ok_or_else(|| UsageError("missing --connections (how many streams to open)".into()))?;
        if connections == 0 {
            return Err(UsageError("--connections must be at least 1".into()));
        }
        let publish = match publish_url {
            Some(p) => Some(PublishOptions {
                url: Target::parse(&p).map_err(|e| UsageError(format!("--publish-url: {e}")))?,
                events: events.unwrap_or(100),
                rate: rate.unwrap_or(10.0),
                token: env_token("SSED_PUBLISH_TOKEN"),
            }),
            None => {
                if events.is_some() || rate.is_some() {
                    return Err(UsageError(
                        "--events and --rate need --publish-url (where to publish)".into(),
                    ));
                }
                None
            }
        };
        Ok(Parsed::Run(Box::new(Options {
            url,
            connections,
            ramp,
            duration,
            publish,
            json,
            subscribe_token: env_token("SSED_SUBSCRIBE_TOKEN"),
        })))
    }
}

fn env_token(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|t| !t.is_empty())
}

/// A whole number; `_` may group digits (`19_000`).
fn parse_count(flag: &str, s: &str) -> Result<u64, UsageError> {
    let digits: String = s.chars().filter(|&c| c != '_').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UsageError(format!("{flag}: {s:?} is not a whole number")));
    }
    digits
        .parse()
        .map_err(|_| UsageError(format!("{flag}: {s:?} is too large")))
}

/// A non-negative rate, optionally followed by `/s`: `1000`, `1000/s`, `2.5/s`.
fn parse_rate(flag: &str, s: &str) -> Result<f64, UsageError> {
    let bad = || UsageError(format!("{flag}: {s:?} is not a rate (e.g. 1000 or 1000/s)"));
    let number = s
        .trim()
        .strip_suffix("/s")
        .unwrap_or(s.trim())
        .replace('_', "");
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let r: f64 = number.parse().map_err(|_| bad())?;
    if r.is_finite() && r >= 0.0 {
        Ok(r)
    } else {
        Err(bad())
    }
}

/// An `http://` URL, resolved once.
#[derive(Debug, Clone)]
struct Target {
    /// As given, for the report.
    url: String,
    addr: SocketAddr,
    /// The `Host` header: the authority as given.
    host: String,
    /// Path and query.
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let rest = match url.strip_prefix("http://") {
            Some(r) => r,
            None if url.starts_with("https://") => {
                return Err(format!("{url}: https is not supported, use http://"));
            }
            None => return Err(format!("{url}: expected http://HOST:PORT/PATH")),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.is_empty() {
            return Err(format!("{url}: no host"));
        }
        // `[::1]:8080`, `host:8080`, `host` (port 80).
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => {
                let port: u16 = p.parse().map_err(|_| format!("{url}: bad port {p:?}"))?;
                (h, port)
            }
            _ => (authority, 80),
        };
        let host_only = host.trim_start_matches('[').trim_end_matches(']');
        let addr = (host_only, port)
            .to_socket_addrs()
            .map_err(|e| format!("{url}: cannot resolve {host_only}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: {host_only} has no address"))?;
        Ok(Target {
            url: url.to_owned(),
            addr,
            host: authority.to_owned(),
            path,
        })
    }
}

// ----- latency histogram ----------------------------------------------------------

/// Bits of sub-bucket precision: 128 buckets per power of two (0.8%).
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;

/// A log-linear histogram of nanoseconds: fixed size, whatever the count.
#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    max: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; Self::index(u64::MAX) + 1],
            count: 0,
            sum: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let shift = (63 - v.leading_zeros()) - SUB_BITS;
        (shift as u64 * SUB + (v >> shift)) as usize
    }

    /// The middle of bucket `i`.
    fn value_at(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let shift = i / SUB - 1;
        let mantissa = i - shift * SUB;
        (mantissa << shift) + (1 << shift) / 2
    }

    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.max = self.max.max(v);
    }

    /// The value below which a fraction `q` of the samples fall.
    fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::value_at(i).min(self.max));
            }
        }
        Some(self.max)
    }

    fn mean(&self) -> Option<u64> {
        (self.count > 0).then(|| (self.sum / u128::from(self.count)) as u64)
    }
}

// ----- stream decoding ------------------------------------------------------------

/// What the decoder found, shared by every stream.
#[derive(Debug)]
struct Tally {
    /// Receive time of the bytes being decoded, unix nanoseconds.
    now_ns: u64,
    /// SSE events with data.
    events: u64,
    /// Events carrying a send time.
    deliveries: u64,
    last_delivery_ns: u64,
    latency: Histogram,
}

impl Tally {
    fn new() -> Self {
        Tally {
            now_ns: 0,
            events: 0,
            deliveries: 0,
            last_delivery_ns: 0,
            latency: Histogram::new(),
        }
    }

    fn dispatch(&mut self, sent_ns: Option<u64>) {
        self.events += 1;
        if let Some(sent) = sent_ns {
            self.deliveries += 1;
            self.latency.record(self.now_ns.saturating_sub(sent));
            self.last_delivery_ns = self.last_delivery_ns.max(self.now_ns);
        }
    }
}

/// The event-stream parser of one stream: lines, fields, dispatch on a
/// blank line (WHATWG "Server-sent events", "Interpreting an event
/// stream"), keeping only the first [`LINE_KEEP`] bytes of a line.
#[derive(Debug, Clone)]
struct Sse {
    line: [u8; LINE_KEEP],
    len: u8,
    /// The last line ended in CR: a following LF belongs to it.
    after_cr: bool,
    has_data: bool,
    sent_ns: Option<u64>,
}

impl Sse {
    fn new() -> Self {
        Sse {
            line: [0; LINE_KEEP],
            len: 0,
            after_cr: false,
            has_data: false,
            sent_ns: None,
        }
    }

    fn feed(&mut self, mut data: &[u8], tally: &mut Tally) {
        while let Some((&first, rest)) = data.split_first() {
            if self.after_cr {
                self.after_cr = false;
                if first == b'\n' {
                    data = rest;
                    continue;
                }
            }
            match data.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.keep(&data[..end]);
                    self.after_cr = data[end] == b'\r';
                    self.end_line(tally);
                    data = &data[end + 1..];
                }
                None => {
                    self.keep(data);
                    return;
                }
            }
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        let len = usize::from(self.len);
        let take = bytes.len().min(LINE_KEEP - len);
        self.line[len..len + take].copy_from_slice(&bytes[..take]);
        self.len = (len + take) as u8;
    }

    fn end_line(&mut self, tally: &mut Tally) {
        let line = &self.line[..usize::from(self.len)];
        self.len = 0;
        if line.is_empty() {
            if self.has_data {
                tally.dispatch(self.sent_ns);
            }
            self.has_data = false;
            self.sent_ns = None;
            return;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return, // a comment
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        if name == b"data" {
            self.has_data = true;
            if self.sent_ns.is_none() {
                self.sent_ns = sent_time(value);
            }
        }
    }
}

/// The send time at the start of a `data:` value written by this tool.
fn sent_time(value: &[u8]) -> Option<u64> {
    let digits = value.strip_prefix(SENT_PREFIX)?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    if end == 0 || end > 19 {
        return None;
    }
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// Where a chunked body is (RFC 9112, section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size { n: u64, digits: u8 },
    Extension { n: u64 },
    SizeLf { n: u64 },
    Data { left: u64 },
    DataCr,
    DataLf,
}

/// The body of one held stream: chunked or close-delimited SSE.
#[derive(Debug, Clone)]
struct Body {
    /// None: close-delimited.
    chunk: Option<Chunk>,
    sse: Sse,
}

/// What feeding a body found.
#[derive(Debug, PartialEq, Eq)]
enum BodyEnd {
    /// The last chunk arrived: the server ended the stream.
    Finished,
    /// The framing is broken.
    Malformed,
}

impl Body {
    fn new(chunked: bool) -> Self {
        Body {
            chunk: chunked.then_some(Chunk::Size { n: 0, digits: 0 }),
            sse: Sse::new(),
        }
    }

    fn feed(&mut self, data: &[u8], tally: &mut Tally) -> Result<(), BodyEnd> {
        let Some(mut state) = self.chunk else {
            self.sse.feed(data, tally);
            return Ok(());
        };
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            state = match state {
                Chunk::Data { left } => {
                    let take = (data.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.sse.feed(&data[i..i + take], tally);
                    i += take;
                    let left = left - take as u64;
                    if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data { left }
                    }
                }
                Chunk::Size { n, digits } => {
                    i += 1;
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            if digits >= 15 {
                                return Err(BodyEnd::Malformed);
                            }
                            let d = (b as char).to_digit(16).map_or(0, u64::from);
                            Chunk::Size {
                                n: n * 16 + d,
                                digits: digits + 1,
                            }
                        }
                        _ if digits == 0 => return Err(BodyEnd::Malformed),
                        b';' | b' ' | b'\t' => Chunk::Extension { n },
                        b'\r' => Chunk::SizeLf { n },
                        b'\n' => Self::chunk_start(n)?,
                        _ => return Err(BodyEnd::Malformed),
                    }
                }
                Chunk::Extension { n } => {
                    i += 1;
                    match b {
                        b'\r' => Chunk::SizeLf { n },
                        b'\n' => Self::chunk_start(n)?,
                        _ => Chunk::Extension { n },
                    }
                }
                Chunk::SizeLf { n } => {
                    i += 1;
                    if b != b'\n' {
                        return Err(BodyEnd::Malformed);
                    }
                    Self::chunk_start(n)?
                }
                Chunk::DataCr => {
                    i += 1;
                    match b {
                        b'\r' => Chunk::DataLf,
                        b'\n' => Chunk::Size { n: 0, digits: 0 },
                        _ => return Err(BodyEnd::Malformed),
                    }
                }
                Chunk::DataLf => {
                    i += 1;
                    if b != b'\n' {
                        return Err(BodyEnd::Malformed);
                    }
                    Chunk::Size { n: 0, digits: 0 }
                }
            };
        }
        self.chunk = Some(state);
        Ok(())
    }

    fn chunk_start(n: u64) -> Result<Chunk, BodyEnd> {
        if n == 0 {
            Err(BodyEnd::Finished)
        } else {
            Ok(Chunk::Data { left: n })
        }
    }
}

// ----- the streams ----------------------------------------------------------------

#[derive(Debug)]
enum Phase {
    /// Connect in progress, or the request partly written.
    Connecting { sent: u32 },
    /// Waiting for the response head.
    Head { buf: Vec<u8> },
    /// A held stream.
    Streaming(Box<Body>),
}

#[derive(Debug)]
struct Conn {
    sock: TcpStream,
    started: Instant,
    phase: Phase,
}

/// How a response head was classified.
enum Answer {
    Held { chunked: bool },
    Refused,
    Other(u16),
}

/// Counts of what happened to the streams.
#[derive(Debug, Default, Clone)]
struct Counts {
    attempted: u64,
    /// Open streams that answered 200.
    held: u64,
    peak_held: u64,
    /// Every 200 seen.
    accepted: u64,
    refused: u64,
    other: u64,
    other_statuses: BTreeMap<u16, u64>,
    failed: u64,
    failures: BTreeMap<String, u64>,
    dropped: u64,
    malformed: u64,
}

struct Streams {
    epoll: OwnedFd,
    addr: SocketAddr,
    request: Vec<u8>,
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Slots closed during the current batch of readiness reports, freed
    /// after it so a stale report never reaches a new connection.
    closed: Vec<usize>,
    /// Connecting or waiting for a head.
    in_flight: u64,
    counts: Counts,
    tally: Tally,
}

impl Streams {
    fn new(target: &Target, token: Option<&str>) -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: ssed-loadtest/{}\r\n",
            target.path,
            target.host,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(t) = token {
            request.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        request.push_str("\r\n");
        Ok(Streams {
            epoll,
            addr: target.addr,
            request: request.into_bytes(),
            slots: Vec::new(),
            free: Vec::new(),
            closed: Vec::new(),
            in_flight: 0,
            counts: Counts::default(),
            tally: Tally::new(),
        })
    }

    fn fail(&mut self, reason: impl Into<String>) {
        self.counts.failed += 1;
        *self.counts.failures.entry(reason.into()).or_default() += 1;
    }

    /// Starts one non-blocking connect.
    fn open(&mut self) {
        self.counts.attempted += 1;
        let family = if self.addr.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = match rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        ) {
            Ok(fd) => fd,
            Err(e) => return self.fail(format!("socket: {}", io::Error::from(e))),
        };
        match rustix::net::connect(&fd, &self.addr) {
            Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
            Err(e) => return self.fail(format!("connect: {}", io::Error::from(e))),
        }
        let sock = TcpStream::from(fd);
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        if let Err(e) = epoll::add(
            &self.epoll,
            &sock,
            epoll::EventData::new_u64(idx as u64),
            epoll::EventFlags::OUT,
        ) {
            self.free.push(idx);
            return self.fail(format!("epoll: {}", io::Error::from(e)));
        }
        self.slots[idx] = Some(Conn {
            sock,
            started: Instant::now(),
            phase: Phase::Connecting { sent: 0 },
        });
        self.in_flight += 1;
    }

    /// Closes slot `idx`; its descriptor leaves the poller as it closes.
    fn close(&mut self, idx: usize) -> Option<Conn> {
        let conn = self.slots.get_mut(idx)?.take()?;
        if !matches!(conn.phase, Phase::Streaming(_)) {
            self.in_flight -= 1;
        }
        self.closed.push(idx);
        Some(conn)
    }

    fn release_closed(&mut self) {
        self.free.append(&mut self.closed);
    }

    fn on_ready(&mut self, idx: usize, scratch: &mut [u8]) {
        let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        match conn.phase {
            Phase::Connecting { sent } => self.on_writable(idx, sent),
            Phase::Head { .. } | Phase::Streaming(_) => self.on_readable(idx, scratch),
        }
    }

    fn on_writable(&mut self, idx: usize, mut sent: u32) {
        let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        match conn.sock.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                self.close(idx);
                return self.fail(format!("connect: {e}"));
            }
        }
        while (sent as usize) < self.request.len() {
            match (&conn.sock).write(&self.request[sent as usize..]) {
                Ok(n) => sent += n as u32,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.phase = Phase::Connecting { sent };
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(idx);
                    return self.fail(format!("send request: {e}"));
                }
            }
        }
        conn.phase = Phase::Head { buf: Vec::new() };
        if let Err(e) = epoll::modify(
            &self.epoll,
            &conn.sock,
            epoll::EventData::new_u64(idx as u64),
            epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        ) {
            self.close(idx);
            self.fail(format!("epoll: {}", io::Error::from(e)));
        }
    }

    fn on_readable(&mut self, idx: usize, scratch: &mut [u8]) {
        for _ in 0..READS_PER_WAKE {
            let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
                return;
            };
            let n = match (&conn.sock).read(scratch) {
                Ok(0) => return self.on_closed(idx, None),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.on_closed(idx, Some(e)),
            };
            // A short read drained the socket: epoll is level-triggered and
            // reports it again when more arrives, so skip the read that
            // would only say EAGAIN (half the client's syscalls per event).
            let drained = n < scratch.len();
            let data = &scratch[..n];
            match &mut conn.phase {
                Phase::Streaming(body) => {
                    self.tally.now_ns = unix_ns();
                    if let Err(end) = body.feed(data, &mut self.tally) {
                        if end == BodyEnd::Malformed {
                            self.counts.malformed += 1;
                        }
                        return self.on_closed(idx, None);
                    }
                }
                Phase::Head { buf } => {
                    buf.extend_from_slice(data);
                    if !self.on_head(idx) {
                        return;
                    }
                }
                Phase::Connecting { .. } => return,
            }
            if drained {
                return;
            }
        }
    }

    /// Parses the head received so far; returns true while the stream is
    /// still open and streaming.
    fn on_head(&mut self, idx: usize) -> bool {
        let Some(conn) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return false;
        };
        let Phase::Head { buf } = &mut conn.phase else {
            return false;
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let (answer, len) = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => (classify(&response), len),
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return false,
            Ok(httparse::Status::Partial) => {
                self.close(idx);
                self.fail("response head too large");
                return false;
            }
            Err(e) => {
                self.close(idx);
                self.fail(format!("bad response head: {e}"));
                return false;
            }
        };
        match answer {
            Answer::Held { chunked } => {
                let rest = buf.split_off(len);
                let mut body = Box::new(Body::new(chunked));
                self.in_flight -= 1;
                self.counts.accepted += 1;
                self.counts.held += 1;
                self.counts.peak_held = self.counts.peak_held.max(self.counts.held);
                self.tally.now_ns = unix_ns();
                let fed = body.feed(&rest, &mut self.tally);
                conn.phase = Phase::Streaming(body);
                match fed {
                    Ok(()) => true,
                    Err(end) => {
                        if end == BodyEnd::Malformed {
                            self.counts.malformed += 1;
                        }
                        self.on_closed(idx, None);
                        false
                    }
                }
            }
            Answer::Refused => {
                self.close(idx);
                self.counts.refused += 1;
                false
            }
            Answer::Other(status) => {
                self.close(idx);
                self.counts.other += 1;
                *self.counts.other_statuses.entry(status).or_default() += 1;
                false
            }
        }
    }

    /// The server closed `idx` (or the connection failed).
    fn on_closed(&mut self, idx: usize, error: Option<io::Error>) {
        let Some(conn) = self.close(idx) else { return };
        match conn.phase {
            Phase::Streaming(_) => {
                self.counts.held -= 1;
                self.counts.dropped += 1;
            }
            Phase::Head { .. } | Phase::Connecting { .. } => match error {
                Some(e) => self.fail(format!("before a response: {e}")),
                None => self.fail("closed before a response"),
            },
        }
    }

    /// Fails connections whose connect or head took too long.
    fn sweep(&mut self, now: Instant) {
        if self.in_flight == 0 {
            return;
        }
        let late: Vec<(usize, bool)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                let waiting = !matches!(c.phase, Phase::Streaming(_));
                (waiting && now.duration_since(c.started) >= CONNECT_TIMEOUT)
                    .then_some((i, matches!(c.phase, Phase::Connecting { .. })))
            })
            .collect();
        for (idx, connecting) in late {
            self.close(idx);
            self.fail(if connecting {
                "connect timed out"
            } else {
                "response head timed out"
            });
        }
        self.release_closed();
    }

    /// Waits up to `timeout` for readiness and handles it.
    fn turn(
        &mut self,
        events: &mut Vec<epoll::Event>,
        scratch: &mut [u8],
        timeout: Duration,
    ) -> io::Result<()> {
        events.clear();
        let timeout = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(events),
            Some(&timeout),
        ) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            self.on_ready(ev.data.u64() as usize, scratch);
        }
        self.release_closed();
        Ok(())
    }
}

/// The first header `name` of a parsed response, as text.
fn header_value(response: &httparse::Response<'_, '_>, name: &str) -> Option<String> {
    response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
}

fn classify(response: &httparse::Response<'_, '_>) -> Answer {
    let status = response.code.unwrap_or(0);
    let header = |name: &str| header_value(response, name).map(|v| v.to_ascii_lowercase());
    let event_stream = header("content-type").is_some_and(|t| t.starts_with("text/event-stream"));
    match status {
        // A sized event stream is ssed's `overload = "retry"` answer past
        // the cap: a `retry:` and a close, never a stream.
        200 if event_stream && header("content-length").is_some() => Answer::Refused,
        200 if event_stream => Answer::Held {
            chunked: header("transfer-encoding").is_some_and(|t| t.contains("chunked")),
        },
        503 => Answer::Refused,
        s => Answer::Other(s),
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

// ----- the publisher ------------------------------------------------------------

/// What the publisher thread shares with the main loop while it runs.
#[derive(Debug, Default)]
struct PublishProgress {
    published: AtomicU64,
    /// Unix nanoseconds of the first send; 0 before it.
    first_send_ns: AtomicU64,
    done: AtomicBool,
}

/// What the publisher did.
#[derive(Debug, Default, Clone)]
struct PublishOutcome {
    published: u64,
    errors: u64,
    first_error: Option<String>,
    receivers_min: Option<u64>,
    receivers_max: Option<u64>,
    elapsed: Duration,
}

/// One keep-alive HTTP/1.1 connection for publishing.
struct Publisher {
    target: PublishOptions,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

/// Why one publish failed.
#[derive(Debug)]
enum PublishError {
    Io(io::Error),
    Status(u16, String),
    Response(String),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Io(e) => write!(f, "{e}"),
            PublishError::Status(s, body) => write!(f, "HTTP {s}: {}", body.trim()),
            PublishError::Response(m) => write!(f, "bad response: {m}"),
        }
    }
}

impl From<io::Error> for PublishError {
    fn from(e: io::Error) -> Self {
        PublishError::Io(e)
    }
}

impl Publisher {
    fn connect(&mut self) -> io::Result<()> {
        if self.conn.is_none() {
            let c = TcpStream::connect_timeout(&self.target.url.addr, PUBLISH_TIMEOUT)?;
            c.set_read_timeout(Some(PUBLISH_TIMEOUT))?;
            c.set_write_timeout(Some(PUBLISH_TIMEOUT))?;
            let _ = c.set_nodelay(true); // an optimisation only
            self.buf.clear();
            self.conn = Some(c);
        }
        Ok(())
    }

    /// Posts `body`, retrying once on a fresh connection when a reused one
    /// turns out closed; returns the receivers the server reported.
    fn post(&mut self, body: &str) -> Result<Option<u64>, PublishError> {
        let reused = self.conn.is_some();
        match self.post_once(body) {
            // The server closed an idle keep-alive connection before
            // reading this request; anything else (a timeout) may have
            // published, and is not repeated.
            Err(PublishError::Io(e))
                if reused
                    && matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::BrokenPipe
                    ) =>
            {
                self.conn = None;
                self.post_once(body)
            }
            r => r,
        }
    }

    fn post_once(&mut self, body: &str) -> Result<Option<u64>, PublishError> {
        let mut request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.target.url.path,
            self.target.url.host,
            body.len()
        );
        if let Some(t) = &self.target.token {
            request.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        let result = self.exchange(request.as_bytes());
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    fn exchange(&mut self, request: &[u8]) -> Result<Option<u64>, PublishError> {
        self.connect()?;
        let Some(mut conn) = self.conn.as_ref() else {
            return Err(io::Error::from(io::ErrorKind::NotConnected).into());
        };
        conn.write_all(request)?;
        let mut scratch = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            let parsed = response
                .parse(&self.buf)
                .map_err(|e| PublishError::Response(e.to_string()))?;
            if let httparse::Status::Complete(head_len) = parsed {
                let status = response.code.unwrap_or(0);
                let header = |name: &str| header_value(&response, name);
                let close = response.version == Some(0)
                    || header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
                let length: usize = header("content-length")
                    .ok_or_else(|| PublishError::Response("no Content-Length".into()))?
                    .trim()
                    .parse()
                    .map_err(|_| PublishError::Response("bad Content-Length".into()))?;
                if length > MAX_HEAD {
                    return Err(PublishError::Response("body too large".into()));
                }
                while self.buf.len() < head_len + length {
                    let n = conn.read(&mut scratch)?;
                    if n == 0 {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                    }
                    self.buf.extend_from_slice(&scratch[..n]);
                }
                let body: Vec<u8> = self.buf.drain(..head_len + length).skip(head_len).collect();
                if close {
                    self.conn = None;
                }
                if !(200..300).contains(&status) {
                    return Err(PublishError::Status(
                        status,
                        String::from_utf8_lossy(&body).into_owned(),
                    ));
                }
                let receivers = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("receivers").and_then(Value::as_u64));
                return Ok(receivers);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(PublishError::Response("response head too large".into()));
            }
            let n = conn.read(&mut scratch)?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            self.buf.extend_from_slice(&scratch[..n]);
        }
    }
}

/// Publishes `o.events` timed events at `o.rate`, until `deadline` or
/// `stop`.
fn publish(
    o: PublishOptions,
    progress: &PublishProgress,
    stop: &AtomicBool,
    deadline: Instant,
) -> PublishOutcome {
    let started = Instant::now();
    let mut out = PublishOutcome::default();
    let mut failures_in_a_row = 0;
    let rate = o.rate;
    let mut publisher = Publisher {
        target: o.clone(),
        conn: None,
        buf: Vec::new(),
    };
    for seq in 0..o.events {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(seq as f64 / rate);
            while Instant::now() < due && !stop.load(Ordering::Relaxed) {
                thread::sleep(
                    due.saturating_duration_since(Instant::now())
                        .min(SWEEP_EVERY),
                );
            }
        }
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        let sent = unix_ns();
        if seq == 0 {
            progress.first_send_ns.store(sent, Ordering::Relaxed);
        }
        let body = format!("{{\"t\":{sent},\"seq\":{seq}}}");
        match publisher.post(&body) {
            Ok(receivers) => {
                failures_in_a_row = 0;
                out.published += 1;
                progress.published.store(out.published, Ordering::Relaxed);
                if let Some(r) = receivers {
                    out.receivers_min = Some(out.receivers_min.map_or(r, |m| m.min(r)));
                    out.receivers_max = Some(out.receivers_max.map_or(r, |m| m.max(r)));
                }
            }
            Err(e) => {
                out.errors += 1;
                failures_in_a_row += 1;
                if out.first_error.is_none() {
                    log::warn!("publish to {} failed: {e}", o.url.url);
                    out.first_error = Some(e.to_string());
                }
                if failures_in_a_row >= MAX_PUBLISH_FAILURES {
                    log::warn!("{failures_in_a_row} publishes failed in a row: publisher stops");
                    break;
                }
            }
        }
    }
    out.elapsed = started.elapsed();
    progress.done.store(true, Ordering::Release);
    out
}

// ----- the run --------------------------------------------------------------------

/// Why the run could not be made.
#[derive(Debug)]
enum RunError {
    Poller(io::Error),
    Thread(io::Error),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Poller(e) => write!(f, "cannot poll sockets: {e}"),
            RunError::Thread(e) => write!(f, "cannot start the publisher thread: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Ramp,
    Settle(Instant),
    Publish,
    Hold(Instant),
}

/// Everything measured, ready to print.
#[derive(Debug)]
struct Report {
    url: String,
    connections: u64,
    ramp: f64,
    duration: Duration,
    counts: Counts,
    ramp_time: Option<Duration>,
    events_received: u64,
    publish: Option<PublishReport>,
    elapsed: Duration,
    client_cpu: Option<Duration>,
    client_peak_rss_kib: Option<u64>,
    stopped: Option<&'static str>,
}

#[derive(Debug)]
struct PublishReport {
    url: String,
    events: u64,
    rate: f64,
    outcome: PublishOutcome,
    /// Streams held when publishing began.
    streams: u64,
    deliveries: u64,
    first_publish_ns: u64,
    last_delivery_ns: u64,
    latency: Histogram,
}

impl PublishReport {
    fn expected(&self) -> u64 {
        self.outcome.published * self.streams
    }

    fn window(&self) -> Option<Duration> {
        (self.first_publish_ns > 0 && self.last_delivery_ns > self.first_publish_ns)
            .then(|| Duration::from_nanos(self.last_delivery_ns - self.first_publish_ns))
    }

    fn per_second(&self) -> Option<f64> {
        self.window()
            .map(|w| self.deliveries as f64 / w.as_secs_f64().max(1e-9))
    }
}

fn run(o: &Options) -> Result<Report, RunError> {
    let started = Instant::now();
    let fds = match crate::raise_fd_limit() {
        Ok(n) => n,
        Err(e) => {
            log::warn!("cannot raise the descriptor limit: {e}");
            rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(u64::MAX)
        }
    };
    if o.connections.saturating_add(FDS_RESERVED) > fds {
        log::warn!(
            "the descriptor limit is {fds}: at most about {} streams can be opened",
            fds.saturating_sub(FDS_RESERVED)
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        if let Err(e) = ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed)) {
            log::debug!("no Ctrl-C handler ({e}): an interrupt ends the run without a report");
        }
    }
    let mut streams =
        Streams::new(&o.url, o.subscribe_token.as_deref()).map_err(RunError::Poller)?;
    let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
    let mut scratch = vec![0u8; SCRATCH];

    // Every phase is bounded; this is the backstop for all of them.
    let ramp_time = if o.ramp > 0.0 {
        Duration::from_secs_f64(o.connections as f64 / o.ramp)
    } else {
        Duration::ZERO
    };
    let publish_budget = o.publish.as_ref().map_or(Duration::ZERO, |p| {
        let paced = if p.rate > 0.0 {
            Duration::from_secs_f64(p.events as f64 / p.rate * 1.5)
        } else {
            Duration::ZERO
        };
        // Flat out: assume at least 1,000 publishes a second.
        paced + Duration::from_secs(30) + Duration::from_millis(p.events)
    });
    let hard_deadline = started
        + ramp_time
        + CONNECT_TIMEOUT
        + SETTLE
        + publish_budget
        + o.duration
        + Duration::from_secs(10);

    let progress = Arc::new(PublishProgress::default());
    let mut publisher: Option<thread::JoinHandle<PublishOutcome>> = None;
    let mut held_at_publish = 0;
    let mut ramp_done: Option<Duration> = None;
    let mut stage = Stage::Ramp;
    let mut last_sweep = started;
    let mut last_progress = started;
    let mut stopped = None;
    loop {
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) {
            stopped = Some("interrupted");
            break;
        }
        if now >= hard_deadline {
            stopped = Some("time limit");
            break;
        }
        // Advance the stage.
        match stage {
            Stage::Ramp => {
                let due = if o.ramp > 0.0 {
                    ((now - started).as_secs_f64() * o.ramp).floor() as u64 + 1
                } else {
                    o.connections
                }
                .min(o.connections);
                let burst = due
                    .saturating_sub(streams.counts.attempted)
                    .min(CONNECT_BURST);
                for _ in 0..burst {
                    streams.open();
                }
                if streams.counts.attempted >= o.connections && streams.in_flight == 0 {
                    ramp_done = Some(now - started);
                    stage = match o.publish {
                        Some(_) => Stage::Settle(now + SETTLE),
                        None => Stage::Hold(now + o.duration),
                    };
                    continue;
                }
            }
            Stage::Settle(until) => {
                if now >= until {
                    let Some(p) = o.publish.clone() else {
                        stage = Stage::Hold(now + o.duration);
                        continue;
                    };
                    held_at_publish = streams.counts.held;
                    let (progress, stop) = (Arc::clone(&progress), Arc::clone(&stop));
                    let deadline = now + publish_budget;
                    let handle = thread::Builder::new()
                        .name("publisher".into())
                        .spawn(move || publish(p, &progress, &stop, deadline))
                        .map_err(RunError::Thread)?;
                    publisher = Some(handle);
                    stage = Stage::Publish;
                }
            }
            Stage::Publish => {
                if progress.done.load(Ordering::Acquire) {
                    stage = Stage::Hold(now + o.duration);
                    continue;
                }
            }
            Stage::Hold(until) => {
                let published = progress.published.load(Ordering::Relaxed);
                let all_delivered =
                    o.publish.is_some() && streams.tally.deliveries >= published * held_at_publish;
                let nothing_held = streams.counts.held == 0 && streams.in_flight == 0;
                if now >= until || all_delivered || nothing_held {
                    break;
                }
            }
        }
        if now.duration_since(last_progress) >= PROGRESS_EVERY {
            last_progress = now;
            print_progress(now - started, &streams, o, &progress);
        }
        if now.duration_since(last_sweep) >= SWEEP_EVERY {
            last_sweep = now;
            streams.sweep(now);
        }
        // Sleep until the next connect is due, or the next check.
        let mut wait = SWEEP_EVERY;
        if stage == Stage::Ramp && o.ramp > 0.0 && streams.counts.attempted < o.connections {
            let next = started + Duration::from_secs_f64(streams.counts.attempted as f64 / o.ramp);
            wait = wait.min(next.saturating_duration_since(now));
        } else if stage == Stage::Ramp && streams.counts.attempted < o.connections {
            wait = Duration::ZERO;
        }
        if let Stage::Settle(t) | Stage::Hold(t) = stage {
            wait = wait.min(t.saturating_duration_since(now));
        }
        streams
            .turn(&mut events, &mut scratch, wait)
            .map_err(RunError::Poller)?;
    }
    if stopped.is_some() {
        stop.store(true, Ordering::Relaxed); // the publisher stops too
    }
    let outcome = match publisher.map(thread::JoinHandle::join) {
        Some(Ok(outcome)) => Some(outcome),
        Some(Err(_)) => {
            log::error!("the publisher thread panicked");
            Some(PublishOutcome::default())
        }
        None => None,
    };
    let elapsed = started.elapsed();
    print_progress(elapsed, &streams, o, &progress);
    let Streams { counts, tally, .. } = streams;
    let publish = o.publish.as_ref().map(|p| PublishReport {
        url: p.url.url.clone(),
        events: p.events,
        rate: p.rate,
        outcome: outcome.unwrap_or_default(),
        streams: held_at_publish,
        deliveries: tally.deliveries,
        first_publish_ns: progress.first_send_ns.load(Ordering::Relaxed),
        last_delivery_ns: tally.last_delivery_ns,
        latency: tally.latency.clone(),
    });
    Ok(Report {
        url: o.url.url.clone(),
        connections: o.connections,
        ramp: o.ramp,
        duration: o.duration,
        counts,
        ramp_time: ramp_done,
        events_received: tally.events,
        publish,
        elapsed,
        client_cpu: own_cpu_time(),
        client_peak_rss_kib: own_peak_rss_kib(),
        stopped,
    })
}

fn print_progress(t: Duration, s: &Streams, o: &Options, p: &PublishProgress) {
    let c = &s.counts;
    let mut line = format!(
        "[{:>6.1}s] held {}  refused {}  other {}  failed {}  dropped {}  connecting {}  events {}",
        t.as_secs_f64(),
        c.held,
        c.refused,
        c.other,
        c.failed,
        c.dropped,
        s.in_flight + o.connections.saturating_sub(c.attempted),
        s.tally.events,
    );
    if let Some(publish) = &o.publish {
        line.push_str(&format!(
            "  published {}/{}",
            p.published.load(Ordering::Relaxed),
            publish.events
        ));
    }
    line.push('\n');
    let _ = io::stderr().write_all(line.as_bytes()); // progress is best effort
}

/// This process's peak resident memory, in KiB (Linux `/proc`).
fn own_peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix("VmHWM:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// This process's user + system CPU time (Linux `/proc`; clock ticks of
/// 1/100 s, the `USER_HZ` Linux exports).
fn own_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

// ----- the report -----------------------------------------------------------------

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e6 * 1000.0).round() / 1000.0
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

impl Report {
    fn to_json(&self) -> Value {
        let c = &self.counts;
        let statuses: serde_json::Map<String, Value> = c
            .other_statuses
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let mut v = json!({
            "url": self.url,
            "connections": self.connections,
            "ramp_per_s": self.ramp,
            "duration_s": secs(self.duration),
            "held": c.held,
            "peak_held": c.peak_held,
            "accepted": c.accepted,
            "refused": c.refused,
            "other": c.other,
            "other_statuses": statuses,
            "failed": c.failed,
            "failures": c.failures,
            "dropped": c.dropped,
            "malformed": c.malformed,
            "ramp_s": self.ramp_time.map(secs),
            "events_received": self.events_received,
            "elapsed_s": secs(self.elapsed),
            "client_cpu_s": self.client_cpu.map(secs),
            "client_peak_rss_kib": self.client_peak_rss_kib,
            "stopped": self.stopped,
            "publish_url": null,
            "latency_ms": null,
        });
        if let (Some(p), Some(obj)) = (&self.publish, v.as_object_mut()) {
            let h = &p.latency;
            let q = |x: f64| h.quantile(x).map(ms);
            let fields = json!({
                "publish_url": p.url,
                "events": p.events,
                "rate_per_s": p.rate,
                "published": p.outcome.published,
                "publish_errors": p.outcome.errors,
                "publish_error": p.outcome.first_error,
                "publish_s": secs(p.outcome.elapsed),
                "receivers_min": p.outcome.receivers_min,
                "receivers_max": p.outcome.receivers_max,
                "streams_publishing": p.streams,
                "expected_deliveries": p.expected(),
                "deliveries": p.deliveries,
                "deliveries_per_s": p.per_second().map(f64::round),
                "window_s": p.window().map(secs),
                "first_publish_unix_ns": p.first_publish_ns,
                "last_delivery_unix_ns": p.last_delivery_ns,
                "latency_ms": if h.count == 0 { Value::Null } else { json!({
                    "p50": q(0.50),
                    "p90": q(0.90),
                    "p99": q(0.99),
                    "max": ms(h.max),
                    "mean": h.mean().map(ms),
                })},
            });
            if let Value::Object(fields) = fields {
                obj.extend(fields);
            }
        }
        v
    }

    fn table(&self) -> String {
        let c = &self.counts;
        let mut rows: Vec<(&str, String)> = vec![
            ("url", self.url.clone()),
            (
                "streams",
                format!(
                    "{} asked, {} held (peak {}), {} refused (503), {} other, {} failed, {} dropped",
                    self.connections, c.held, c.peak_held, c.refused, c.other, c.failed, c.dropped
                ),
            ),
        ];
        if !c.other_statuses.is_empty() {
            let list: Vec<String> = c
                .other_statuses
                .iter()
                .map(|(s, n)| format!("{n} x {s}"))
                .collect();
            rows.push(("other statuses", list.join(", ")));
        }
        for (reason, n) in &c.failures {
            rows.push(("failed", format!("{n} x {reason}")));
        }
        if c.malformed > 0 {
            rows.push((
                "malformed",
                format!("{} streams with broken framing", c.malformed),
            ));
        }
        let ramp = if self.ramp > 0.0 {
            format!("{}/s", self.ramp)
        } else {
            "unpaced".to_owned()
        };
        rows.push((
            "ramp-up",
            match self.ramp_time {
                Some(t) => format!("{:.2} s ({ramp})", t.as_secs_f64()),
                None => format!("not finished ({ramp})"),
            },
        ));
        rows.push(("events received", self.events_received.to_string()));
        if let Some(p) = &self.publish {
            let rate = if p.rate > 0.0 {
                format!("{}/s", p.rate)
            } else {
                "flat out".to_owned()
            };
            rows.push((
                "published",
                format!(
                    "{} of {} at {rate} in {:.2} s, {} errors",
                    p.outcome.published,
                    p.events,
                    p.outcome.elapsed.as_secs_f64(),
                    p.outcome.errors
                ),
            ));
            if let Some(e) = &p.outcome.first_error {
                rows.push(("publish error", e.clone()));
            }
            let expected = p.expected();
            let share = if expected > 0 {
                format!(" ({:.1}%)", p.deliveries as f64 * 100.0 / expected as f64)
            } else {
                String::new()
            };
            rows.push((
                "deliveries",
                format!(
                    "{} of {expected} expected{share} ({} streams x {} events)",
                    p.deliveries, p.streams, p.outcome.published
                ),
            ));
            if let (Some(rate), Some(w)) = (p.per_second(), p.window()) {
                rows.push((
                    "deliveries/s",
                    format!(
                        "{rate:.0} (first publish to last delivery: {:.3} s)",
                        w.as_secs_f64()
                    ),
                ));
            }
            let h = &p.latency;
            let q = |x: f64| {
                h.quantile(x)
                    .map_or("-".to_owned(), |v| format!("{:.3}", ms(v)))
            };
            rows.push((
                "latency ms",
                format!(
                    "p50 {}  p90 {}  p99 {}  max {:.3}",
                    q(0.50),
                    q(0.90),
                    q(0.99),
                    ms(h.max)
                ),
            ));
        }
        rows.push(("elapsed", format!("{:.2} s", self.elapsed.as_secs_f64())));
        if let Some(cpu) = self.client_cpu {
            rows.push(("client CPU", format!("{:.2} s", cpu.as_secs_f64())));
        }
        if let Some(kib) = self.client_peak_rss_kib {
            rows.push(("client peak RSS", format!("{kib} KiB")));
        }
        if let Some(why) = self.stopped {
            rows.push(("stopped", format!("early ({why})")));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::from("ssed loadtest\n");
        for (k, v) in rows {
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn parse(list: &[&str]) -> Result<Options, String> {
        match Options::parse(args(list)) {
            Ok(Parsed::Run(o)) => Ok(*o),
            Ok(Parsed::Help) => Err("help".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn options() {
        let o = parse(&[
            "--url",
            "http://127.0.0.1:8080/events/a?x=1",
            "--connections",
            "19_000",
            "--ramp",
            "2000/s",
            "--duration",
            "5s",
            "--publish-url=http://127.0.0.1:8080/publish/a",
            "--events",
            "50",
            "--rate",
            "0",
            "--json",
        ])
        .expect("valid");
        assert_eq!(o.connections, 19_000);
        assert_eq!(o.ramp, 2000.0);
        assert_eq!(o.duration, Duration::from_secs(5));
        assert_eq!(o.url.path, "/events/a?x=1");
        assert_eq!(o.url.host, "127.0.0.1:8080");
        let p = o.publish.expect("publisher");
        assert_eq!((p.events, p.rate), (50, 0.0));
        assert!(o.json);
    }

    #[test]
    fn bad_options() {
        let url = "http://127.0.0.1:1/events/a";
        let table: &[(&[&str], &str)] = &[
            (&["--connections", "5"], "missing --url"),
            (&["--url", url], "missing --connections"),
            (&["--url", url, "-n", "five"], "not a whole number"),
            (&["--url", url, "-n", "5", "--ramp", "-3"], "not a rate"),
            (&["--url", url, "-n", "5", "--bogus"], "--bogus"),
            (
                &["--url", url, "-n", "5", "--duration", "5"],
                "invalid duration",
            ),
            (
                &["--url", url, "-n", "5", "--events", "5"],
                "need --publish-url",
            ),
            (&["--url", "https://x/events/a", "-n", "5"], "https"),
            (&["--url", "http://127.0.0.1:99999/", "-n", "5"], "bad port"),
            (&["--url", url, "-n", "0"], "at least 1"),
        ];
        for (list, want) in table {
            let err = parse(list).expect_err("invalid");
            assert!(err.contains(want), "{list:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn histogram_quantiles_within_a_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [
            (0.5, 50_000_000.0),
            (0.9, 90_000_000.0),
            (0.99, 99_000_000.0),
        ] {
            let got = h.quantile(q).expect("samples") as f64;
            assert!((got - want).abs() / want < 0.01, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.max, 100_000_000);
        assert_eq!(Histogram::index(5), 5);
        for v in [0, 1, 127, 128, 255, 256, 1000, 123_456_789, u64::MAX / 3] {
            let back = Histogram::value_at(Histogram::index(v));
            assert!(
                back.abs_diff(v) as f64 <= v as f64 / 100.0 + 1.0,
                "{v} -> {back}"
            );
        }
    }

    fn decode(chunked: bool, parts: &[&[u8]]) -> (Tally, Result<(), BodyEnd>) {
        let mut body = Body::new(chunked);
        let mut tally = Tally::new();
        tally.now_ns = 5_000;
        let mut result = Ok(());
        for p in parts {
            result = body.feed(p, &mut tally);
            if result.is_err() {
                break;
            }
        }
        (tally, result)
    }

    #[test]
    fn decodes_chunked_frames_split_anywhere() {
        let frames = b"retry: 3000\n\n: hi\n\nid: 1\ndata: {\"t\":1000,\"seq\":0}\n\nid: 2\r\ndata: {\"t\":2000,\"seq\":1}\r\n\r\ndata: plain\n\n";
        let mut wire = Vec::new();
        for part in frames.chunks(7) {
            wire.extend_from_slice(format!("{:x};ext=1\r\n", part.len()).as_bytes());
            wire.extend_from_slice(part);
            wire.extend_from_slice(b"\r\n");
        }
        for split in 1..wire.len() {
            let (tally, result) = decode(true, &[&wire[..split], &wire[split..]]);
            assert_eq!(result, Ok(()));
            assert_eq!(tally.events, 3, "split at {split}");
            assert_eq!(tally.deliveries, 2);
            assert_eq!(tally.latency.max, 4_000);
        }
        let mut ended = wire.clone();
        ended.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(decode(true, &[&ended]).1, Err(BodyEnd::Finished));
        assert_eq!(decode(true, &[b"zz\r\n"]).1, Err(BodyEnd::Malformed));
        assert_eq!(decode(true, &[b"3\r\nabcX"]).1, Err(BodyEnd::Malformed));
        let (tally, result) = decode(false, &[&frames[..]]);
        assert_eq!((tally.events, result), (3, Ok(())));
    }

    #[test]
    fn long_lines_are_cut_not_kept() {
        let long = format!(
            "data: {{\"t\":1000,\"pad\":\"{}\"}}\n\n",
            "x".repeat(10_000)
        );
        let (tally, _) = decode(false, &[long.as_bytes()]);
        assert_eq!((tally.events, tally.deliveries), (1, 1));
        assert_eq!(sent_time(b"{\"t\":12x"), Some(12));
        assert_eq!(sent_time(b"{\"t\":x"), None);
        assert_eq!(sent_time(b"{\"t\":99999999999999999999"), None);
    }
}
