//! Reading a request body under a deadline and a size bound.
//!
//! The deadline is the request's (`request_timeout` from the first byte of
//! the head): `SO_RCVTIMEO` is re-armed with the time left before every
//! `read`, so a client trickling one byte at a time cannot stretch it.

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::Instant;

use super::head::BodyKind;

/// Why a body could not be read; each maps to one answer.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// `413`: over the limit.
    TooLarge,
    /// `400`: bad chunked framing.
    Malformed(&'static str),
    /// `408`: the deadline passed.
    Timeout,
    /// The client went away; nothing to answer.
    Closed,
}

impl BodyError {
    pub(crate) fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            BodyError::TooLarge => Some((413, "request body too large")),
            BodyError::Malformed(why) => Some((400, why)),
            BodyError::Timeout => Some((408, "request body not received in time")),
            BodyError::Closed => None,
        }
    }
}

/// A reader over the connection that starts with bytes already received
/// and enforces the deadline.
pub(crate) struct BodyReader<'a> {
    conn: &'a TcpStream,
    buffered: Vec<u8>,
    pos: usize,
    deadline: Instant,
}

impl<'a> BodyReader<'a> {
    pub(crate) fn new(conn: &'a TcpStream, buffered: Vec<u8>, deadline: Instant) -> Self {
        BodyReader {
            conn,
            buffered,
            pos: 0,
            deadline,
        }
    }

    /// Bytes received beyond the body (a pipelined next request).
    pub(crate) fn into_leftover(mut self) -> Vec<u8> {
        self.buffered.drain(..self.pos);
        self.buffered
    }

    fn fill(&mut self) -> Result<(), BodyError> {
        if self.pos < self.buffered.len() {
            return Ok(());
        }
        self.buffered.clear();
        self.pos = 0;
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(BodyError::Timeout);
        }
        self.conn
            .set_read_timeout(Some(left))
            .map_err(|_| BodyError::Closed)?;
        let mut chunk = [0u8; 4096];
        loop {
            match (&*self.conn).read(&mut chunk) {
                Ok(0) => return Err(BodyError::Closed),
                Ok(n) => {
                    self.buffered.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(BodyError::Timeout);
                }
                Err(_) => return Err(BodyError::Closed),
            }
        }
    }

    fn take(&mut self, max: usize) -> Result<&[u8], BodyError> {
        self.fill()?;
        let end = self.buffered.len().min(self.pos + max);
        let out = &self.buffered[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, BodyError> {
        Ok(self.take(1)?[0])
    }

    fn line(&mut self, limit: usize) -> Result<Vec<u8>, BodyError> {
        let mut line = Vec::new();
        loop {
            match self.byte()? {
                b'\n' => {
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    return Ok(line);
                }
                b => {
                    if line.len() >= limit {
                        return Err(BodyError::Malformed("chunk line too long"));
                    }
                    line.push(b);
                }
            }
        }
    }

    /// Reads the whole body, refusing more than `max` bytes.
    pub(crate) fn read_body(&mut self, kind: BodyKind, max: usize) -> Result<Vec<u8>, BodyError> {
        match kind {
            BodyKind::None => Ok(Vec::new()),
            BodyKind::Length(n) => {
                let n = usize::try_from(n).map_err(|_| BodyError::TooLarge)?;
                if n > max {
                    return Err(BodyError::TooLarge);
                }
                let mut body = Vec::with_capacity(n);
                while body.len() < n {
                    let part = self.take(n - body.len())?;
                    body.extend_from_slice(part);
                }
                Ok(body)
            }
            BodyKind::Chunked => self.read_chunked(max),
        }
    }

    fn read_chunked(&mut self, max: usize) -> Result<Vec<u8>, BodyError> {
        let mut body = Vec::new();
        loop {
            let line = self.line(1024)?;
            let size_text = line.split(|&b| b == b';').next().unwrap_or(&[]);
            // Hex digits only, then optional SP/HTAB before an extension
            // (RFC 9112 section 7.1). `from_str_radix` alone would take a
            // `+` sign, and `trim` other whitespace (form feed, leading
            // space), framing a proxy in front may read differently.
            let hex_len = size_text
                .iter()
                .take_while(|b| b.is_ascii_hexdigit())
                .count();
            let (hex, space) = size_text.split_at(hex_len);
            if hex.is_empty() || !space.iter().all(|&b| b == b' ' || b == b'\t') {
                return Err(BodyError::Malformed("bad chunk size"));
            }
            let size = std::str::from_utf8(hex)
                .ok()
                .and_then(|hex| usize::from_str_radix(hex, 16).ok())
                .ok_or(BodyError::Malformed("bad chunk size"))?;
            if size == 0 {
                // Trailer section: lines until an empty one; ignored.
                let mut trailers = 0;
                while !self.line(1024)?.is_empty() {
                    trailers += 1;
                    if trailers > 32 {
                        return Err(BodyError::Malformed("too many trailer lines"));
                    }
                }
                return Ok(body);
            }
            if body.len().saturating_add(size) > max {
                return Err(BodyError::TooLarge);
            }
            let mut left = size;
            while left > 0 {
                let part = self.take(left)?;
                left -= part.len();
                body.extend_from_slice(part);
            }
            if !self.line(1)?.is_empty() {
                return Err(BodyError::Malformed("chunk not followed by CRLF"));
            }
        }
    }
}
