//! Stream decoding: the chunked framing of a held stream's body, the
//! event-stream lines inside it, and the send time that this tool's events
//! carry first in their data (`{"t":<unix ns>,...}`), turned into latency.
//!
//! Each stream keeps only a small state machine ([`Body`]): where it is in
//! the chunked encoding and the first [`LINE_KEEP`] bytes of the current
//! line; what it finds goes into one [`Tally`] shared by every stream.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::histogram::Histogram;

/// Bytes of each SSE line kept: the field name and the start of the value,
/// where the send time sits.
const LINE_KEEP: usize = 48;
/// What this tool's event bodies start with.
const SENT_PREFIX: &[u8] = b"{\"t\":";

/// What the decoder found, shared by every stream; a worker process sends
/// its own as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Tally {
    /// Receive time of the bytes being decoded, unix nanoseconds.
    pub(super) now_ns: u64,
    /// SSE events with data.
    pub(super) events: u64,
    /// Events carrying a send time.
    pub(super) deliveries: u64,
    pub(super) last_delivery_ns: u64,
    pub(super) latency: Histogram,
}

impl Tally {
    pub(super) fn new() -> Self {
        Tally {
            now_ns: 0,
            events: 0,
            deliveries: 0,
            last_delivery_ns: 0,
            latency: Histogram::new(),
        }
    }

    /// Adds what another process's streams found; false when its
    /// histogram is not one of ours (and then nothing is added).
    pub(super) fn merge(&mut self, other: &Tally) -> bool {
        if !self.latency.merge(&other.latency) {
            return false;
        }
        self.events += other.events;
        self.deliveries += other.deliveries;
        self.last_delivery_ns = self.last_delivery_ns.max(other.last_delivery_ns);
        true
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
pub(super) struct Body {
    /// None: close-delimited.
    chunk: Option<Chunk>,
    sse: Sse,
}

/// What feeding a body found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BodyEnd {
    /// The last chunk arrived: the server ended the stream.
    Finished,
    /// The framing is broken.
    Malformed,
}

impl Body {
    pub(super) fn new(chunked: bool) -> Self {
        Body {
            chunk: chunked.then_some(Chunk::Size { n: 0, digits: 0 }),
            sse: Sse::new(),
        }
    }

    pub(super) fn feed(&mut self, data: &[u8], tally: &mut Tally) -> Result<(), BodyEnd> {
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

/// The clock of send and receive times: unix nanoseconds.
pub(super) fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

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
