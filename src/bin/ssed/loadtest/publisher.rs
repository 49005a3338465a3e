//! The publisher: its own thread with one blocking keep-alive HTTP/1.1
//! connection, posting `{"t":<unix nanos>,"seq":N}` bodies at a paced rate
//! so that each stream that receives one can tell how late it came. To an
//! `https://` URL the connection speaks TLS (its handshake made by the
//! first request, within the same timeouts).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::args::PublishOptions;
use super::decode::unix_ns;
use super::streams::{MAX_HEAD, SWEEP_EVERY, header_value};
use super::tls::Blocking;

/// Time one publish request may take (each read and write).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Consecutive failed publishes after which the publisher gives up.
const MAX_PUBLISH_FAILURES: u64 = 10;

/// What the publisher thread shares with the main loop while it runs.
#[derive(Debug, Default)]
pub(super) struct PublishProgress {
    pub(super) published: AtomicU64,
    /// Unix nanoseconds of the first send; 0 before it.
    pub(super) first_send_ns: AtomicU64,
    pub(super) done: AtomicBool,
}

/// What the publisher did.
#[derive(Debug, Default, Clone)]
pub(super) struct PublishOutcome {
    pub(super) published: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    /// The first HTTP status a failed publish was answered with.
    pub(super) first_status: Option<u16>,
    pub(super) receivers_min: Option<u64>,
    pub(super) receivers_max: Option<u64>,
    pub(super) elapsed: Duration,
}

/// One keep-alive HTTP/1.1 connection for publishing.
struct Publisher {
    target: PublishOptions,
    conn: Option<Blocking>,
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
            self.conn = Some(Blocking::new(c, self.target.url.tls.as_ref())?);
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
        let Some(conn) = self.conn.as_mut() else {
            return Err(io::Error::from(io::ErrorKind::NotConnected).into());
        };
        conn.write_all(request)?;
        conn.flush()?;
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
pub(super) fn publish(
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
                if let (PublishError::Status(status, _), None) = (&e, out.first_status) {
                    out.first_status = Some(*status);
                }
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
