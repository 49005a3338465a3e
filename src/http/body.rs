//! An incremental request-body decoder: fed bytes as they arrive, it frames
//! a `Content-Length` or `chunked` body (RFC 9112 sections 6.2 and 7.1)
//! under a size bound, and says where the body ends.
//!
//! It does no I/O and keeps no deadline: the acceptor feeds it from
//! non-blocking reads under the request's deadline, a connection thread
//! runs it over bytes it already holds. The body grows as bytes arrive,
//! never by what `Content-Length` claims, so a client that announces 64 KiB
//! and sends one byte holds one byte of it.
//!
//! Chunked framing is read strictly: every size, data and trailer line ends
//! with CRLF. A proxy in front that accepts a bare LF (or a lone CR) where
//! this decoder would not, or the reverse, could be made to see a different
//! request boundary than ours: the root of request smuggling.

use super::head::BodyKind;

/// Longest chunk-size or trailer line accepted (CRLF not counted).
pub(crate) const MAX_LINE: usize = 1024;
/// Most trailer lines accepted after the last chunk.
pub(crate) const MAX_TRAILERS: usize = 32;

/// Why a body is refused; each maps to one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// `413`: over the size bound.
    TooLarge,
    /// `400`: bad chunked framing.
    Malformed(&'static str),
}

impl BodyError {
    /// The status and the plain-text message the client gets.
    pub(crate) fn status(self) -> (u16, &'static str) {
        match self {
            BodyError::TooLarge => (413, "request body too large"),
            BodyError::Malformed(why) => (400, why),
        }
    }
}

/// What feeding bytes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feed {
    /// The body goes on: feed more bytes.
    More,
    /// The body ended after this many of the bytes just fed; the rest
    /// belong to the next request.
    Done(usize),
}

const BARE_LF: &str = "chunked body lines must end with CRLF, not a bare LF";

/// Where in the framing the decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `Content-Length` bytes still due.
    Length(u64),
    /// In a chunk-size line: its value so far and the line's length.
    Size(SizeAt, u64, usize),
    /// Data bytes of the current chunk still due.
    Data(u64),
    /// After a chunk's data: its CRLF (`true` once the CR is in).
    DataEnd(bool),
    /// In the trailer section: lines seen, this line's length, CR seen.
    Trailer(usize, usize, bool),
    Done,
}

/// Where in a chunk-size line (`1a ; name=value CRLF`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeAt {
    /// Hex digits; the count so far is the line length.
    Digits,
    /// Whitespace after the digits.
    Space,
    /// A chunk extension, skipped.
    Extension,
    /// The CR is in; the LF must follow.
    Cr,
}

/// Decodes one request body from the bytes fed to it.
#[derive(Debug)]
pub(crate) struct BodyDecoder {
    body: Vec<u8>,
    /// The most the body may hold: the `Content-Length`, or the bound for
    /// a chunked body.
    limit: usize,
    state: State,
}

impl BodyDecoder {
    /// A decoder for a body framed as `kind`, refusing more than `max` bytes.
    ///
    /// # Errors
    ///
    /// [`BodyError::TooLarge`] when `Content-Length` is over `max`.
    pub(crate) fn new(kind: BodyKind, max: usize) -> Result<Self, BodyError> {
        let (limit, state) = match kind {
            BodyKind::None => (0, State::Done),
            BodyKind::Length(n) => match usize::try_from(n) {
                Ok(len) if len <= max => (len, State::Length(n)),
                _ => return Err(BodyError::TooLarge),
            },
            BodyKind::Chunked => (max, State::Size(SizeAt::Digits, 0, 0)),
        };
        Ok(BodyDecoder {
            body: Vec::new(),
            limit,
            state,
        })
    }

    /// Whether the whole body is in.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes of memory the body holds now (its capacity).
    pub(crate) fn held(&self) -> usize {
        self.body.capacity()
    }

    /// What [`held`](Self::held) will be after feeding `incoming` more
    /// bytes, at most: a caller bounding the memory of many decoders makes
    /// room for it first.
    pub(crate) fn held_after(&self, incoming: usize) -> usize {
        if self.is_done() {
            return self.held();
        }
        let len = self.body.len();
        let needed = len + incoming.min(self.limit - len);
        if needed <= self.body.capacity() {
            return self.body.capacity();
        }
        // Double (for byte-at-a-time feeding to cost amortised O(1) per
        // byte), but never past what the body may hold.
        needed.max(self.body.capacity().saturating_mul(2).min(self.limit))
    }

    /// The body decoded so far (all of it once [`Feed::Done`]).
    pub(crate) fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// Feeds the next bytes received.
    ///
    /// # Errors
    ///
    /// [`BodyError::TooLarge`] once the body would pass its bound,
    /// [`BodyError::Malformed`] for bad chunked framing. The decoder is
    /// not to be fed again after either.
    pub(crate) fn feed(&mut self, input: &[u8]) -> Result<Feed, BodyError> {
        // Grow once, for everything this input can add: the body then
        // holds exactly what `held_after` promised.
        let target = self.held_after(input.len());
        self.body.reserve_exact(target - self.body.len());
        let mut i = 0;
        while i < input.len() {
            let rest = &input[i..];
            let b = rest[0];
            self.state = match self.state {
                State::Done => return Ok(Feed::Done(i)),
                State::Length(left) | State::Data(left) => {
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.body.extend_from_slice(&rest[..take]);
                    i += take;
                    let left = left - take as u64;
                    match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::DataEnd(false),
                        _ => State::Data(left),
                    }
                }
                State::Size(at, value, line) => {
                    i += 1;
                    self.size_byte(at, value, line, b)?
                }
                State::DataEnd(false) if b == b'\r' => {
                    i += 1;
                    State::DataEnd(true)
                }
                State::DataEnd(true) if b == b'\n' => {
                    i += 1;
                    State::Size(SizeAt::Digits, 0, 0)
                }
                State::DataEnd(_) => {
                    return Err(BodyError::Malformed("chunk data must be followed by CRLF"));
                }
                State::Trailer(lines, len, cr) => {
                    i += 1;
                    trailer_byte(lines, len, cr, b)?
                }
            };
        }
        Ok(if self.is_done() {
            Feed::Done(input.len())
        } else {
            Feed::More
        })
    }

    /// One byte of a chunk-size line.
    fn size_byte(&self, at: SizeAt, value: u64, line: usize, b: u8) -> Result<State, BodyError> {
        let bad_size = BodyError::Malformed("bad chunk size");
        if at == SizeAt::Cr {
            if b != b'\n' {
                return Err(BodyError::Malformed(
                    "bad chunk size line: a CR not followed by LF",
                ));
            }
            if value == 0 {
                return Ok(State::Trailer(0, 0, false));
            }
            // Past the bound already? Refuse before any of the data.
            let total = u64::try_from(self.body.len())
                .ok()
                .and_then(|len| len.checked_add(value));
            if total.is_none_or(|t| t > self.limit as u64) {
                return Err(BodyError::TooLarge);
            }
            return Ok(State::Data(value));
        }
        if line >= MAX_LINE && b != b'\r' {
            return Err(BodyError::Malformed("chunk-size line too long"));
        }
        let next = |at| Ok(State::Size(at, value, line + 1));
        // Hex digits only, then optional SP/HTAB before an extension
        // (RFC 9112 section 7.1): no sign, no other whitespace, which a
        // proxy in front may read differently.
        match (at, b) {
            (_, b'\n') => Err(BodyError::Malformed(BARE_LF)),
            (SizeAt::Digits, _) if b.is_ascii_hexdigit() => {
                let digit = u64::from(char::from(b).to_digit(16).unwrap_or(0));
                match value.checked_mul(16).and_then(|v| v.checked_add(digit)) {
                    Some(value) => Ok(State::Size(SizeAt::Digits, value, line + 1)),
                    None => Err(bad_size),
                }
            }
            // Only digits so far: `line` counts them; none is no size.
            (SizeAt::Digits, _) if line == 0 => Err(bad_size),
            (SizeAt::Digits | SizeAt::Space, b' ' | b'\t') => next(SizeAt::Space),
            (SizeAt::Digits | SizeAt::Space, b';') => next(SizeAt::Extension),
            (SizeAt::Digits | SizeAt::Space | SizeAt::Extension, b'\r') => {
                // The line length stays: a size line of digits only is
                // told from an empty one by it.
                Ok(State::Size(SizeAt::Cr, value, line))
            }
            (SizeAt::Extension, _) => next(SizeAt::Extension),
            _ => Err(bad_size),
        }
    }
}

/// One byte of the trailer section: lines until an empty one, ignored.
fn trailer_byte(lines: usize, len: usize, cr: bool, b: u8) -> Result<State, BodyError> {
    match (cr, b) {
        (true, b'\n') if len == 0 => Ok(State::Done),
        (true, b'\n') if lines >= MAX_TRAILERS => {
            Err(BodyError::Malformed("too many trailer lines"))
        }
        (true, b'\n') => Ok(State::Trailer(lines + 1, 0, false)),
        (true, _) => Err(BodyError::Malformed(
            "chunked trailer lines must end with CRLF, not a bare CR",
        )),
        (false, b'\r') => Ok(State::Trailer(lines, len, true)),
        (false, b'\n') => Err(BodyError::Malformed(BARE_LF)),
        (false, _) if len >= MAX_LINE => Err(BodyError::Malformed("trailer line too long")),
        (false, _) => Ok(State::Trailer(lines, len + 1, false)),
    }
}

/// Decodes a body from bytes already received: `Some((body, used))` when
/// the whole body is among them (`used` bytes of them, the rest being the
/// next request's), `None` when more bytes are needed.
///
/// # Errors
///
/// As [`BodyDecoder::new`] and [`BodyDecoder::feed`].
pub(crate) fn decode(
    kind: BodyKind,
    max: usize,
    bytes: &[u8],
) -> Result<Option<(Vec<u8>, usize)>, BodyError> {
    let mut decoder = BodyDecoder::new(kind, max)?;
    Ok(match decoder.feed(bytes)? {
        Feed::Done(used) => Some((decoder.into_body(), used)),
        Feed::More => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a run of the decoder made of some bytes.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Body(Vec<u8>, usize),
        More,
        Err(u16),
    }

    fn whole(kind: BodyKind, max: usize, bytes: &[u8]) -> Got {
        match decode(kind, max, bytes) {
            Ok(Some((body, used))) => Got::Body(body, used),
            Ok(None) => Got::More,
            Err(e) => Got::Err(e.status().0),
        }
    }

    /// The same bytes fed one at a time: `used` counts from the start.
    fn bytewise(kind: BodyKind, max: usize, bytes: &[u8]) -> Got {
        let mut d = match BodyDecoder::new(kind, max) {
            Ok(d) => d,
            Err(e) => return Got::Err(e.status().0),
        };
        if d.is_done() {
            return Got::Body(Vec::new(), 0);
        }
        for (i, b) in bytes.iter().enumerate() {
            let before = d.held_after(1);
            match d.feed(std::slice::from_ref(b)) {
                Ok(Feed::Done(n)) => {
                    assert!(d.held() <= before);
                    return Got::Body(d.into_body(), i + n);
                }
                Ok(Feed::More) => assert!(d.held() <= before),
                Err(e) => return Got::Err(e.status().0),
            }
        }
        Got::More
    }

    const C: BodyKind = BodyKind::Chunked;

    fn body(b: &str, used: usize) -> Got {
        Got::Body(b.as_bytes().to_vec(), used)
    }

    /// What the table expects: the body and the bytes left after it.
    enum Want {
        Done(&'static str, &'static str),
        More,
        Err(u16),
    }
    use Want::{Done, More};

    #[test]
    fn decodes_table() {
        let table: &[(BodyKind, usize, &str, Want)] = &[
            (BodyKind::None, 10, "next", Done("", "next")),
            (BodyKind::Length(5), 10, "hello", Done("hello", "")),
            (
                BodyKind::Length(5),
                10,
                "helloGET /",
                Done("hello", "GET /"),
            ),
            (BodyKind::Length(5), 10, "hel", More),
            (BodyKind::Length(11), 10, "", Want::Err(413)),
            (
                BodyKind::Length(10),
                10,
                "0123456789",
                Done("0123456789", ""),
            ),
            (C, 100, "5\r\nhello\r\n0\r\n\r\n", Done("hello", "")),
            (C, 100, "5\r\nhello\r\n0\r\n\r\nGET", Done("hello", "GET")),
            (
                C,
                100,
                "3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
                Done("hello", ""),
            ),
            (
                C,
                100,
                "A\r\n0123456789\r\n0\r\n\r\n",
                Done("0123456789", ""),
            ),
            (
                C,
                100,
                "a\r\n0123456789\r\n0\r\n\r\n",
                Done("0123456789", ""),
            ),
            (C, 100, "005\r\nhello\r\n0\r\n\r\n", Done("hello", "")),
            // Extensions, whitespace before them, trailers: read, ignored.
            (C, 100, "5;a=b\r\nhello\r\n0;x\r\n\r\n", Done("hello", "")),
            (
                C,
                100,
                "5 \t;a=\"b\"\r\nhello\r\n0\r\n\r\n",
                Done("hello", ""),
            ),
            (C, 100, "5 \r\nhello\r\n0\r\n\r\n", Done("hello", "")),
            (
                C,
                100,
                "5\r\nhello\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\n",
                Done("hello", ""),
            ),
            (C, 100, "0\r\n\r\n", Done("", "")),
            (C, 100, "5\r\nhel", More),
            (C, 100, "5\r\nhello\r", More),
            (C, 100, "5\r\nhello\r\n0\r\n", More),
            (C, 100, "5\r\nhello\r\n0\r\nX: 1\r\n", More),
            // Over the bound: by a chunk's size, before its data comes.
            (C, 4, "5\r\n", Want::Err(413)),
            (C, 5, "3\r\nhel\r\n3\r\n", Want::Err(413)),
            (C, 5, "5\r\nhello\r\n0\r\n\r\n", Done("hello", "")),
            (C, 100, "fffffffffffffffff\r\n", Want::Err(400)),
            (C, 100, "ffffffffffffffff\r\n", Want::Err(413)),
            // Bad sizes (RFC 9112 7.1: hex digits, then SP/HTAB, `;`).
            (C, 100, "\r\n", Want::Err(400)),
            (C, 100, ";x\r\n", Want::Err(400)),
            (C, 100, " 5\r\n", Want::Err(400)),
            (C, 100, "+5\r\n", Want::Err(400)),
            (C, 100, "0x5\r\n", Want::Err(400)),
            (C, 100, "5 x\r\n", Want::Err(400)),
            (C, 100, "5\x0c\r\n", Want::Err(400)),
            (C, 100, "g\r\n", Want::Err(400)),
            // Strict line ends: bare LF and lone CR are refused anywhere.
            (C, 100, "5\nhello\r\n0\r\n\r\n", Want::Err(400)),
            (C, 100, "5;ext\nhello\r\n0\r\n\r\n", Want::Err(400)),
            (C, 100, "5\r\nhello\n0\r\n\r\n", Want::Err(400)),
            (C, 100, "5\r\nhello\r\n0\n\r\n", Want::Err(400)),
            (C, 100, "5\r\nhello\r\n0\r\n\n", Want::Err(400)),
            (C, 100, "5\r\nhello\r\n0\r\nX: 1\n\r\n", Want::Err(400)),
            (C, 100, "5\rx\nhello\r\n0\r\n\r\n", Want::Err(400)),
            (C, 100, "5;a\rb\r\nhello\r\n0\r\n\r\n", Want::Err(400)),
            (C, 100, "5\r\nhello\r\n0\r\nX: \r1\r\n\r\n", Want::Err(400)),
            (C, 100, "5\r\nhelloXY0\r\n\r\n", Want::Err(400)),
            (C, 100, "5\r\nhello\rX", Want::Err(400)),
        ];
        for (kind, max, input, want) in table {
            let want = match want {
                Done(body, rest) => Got::Body(body.as_bytes().to_vec(), input.len() - rest.len()),
                More => Got::More,
                Want::Err(status) => Got::Err(*status),
            };
            let bytes = input.as_bytes();
            assert_eq!(whole(*kind, *max, bytes), want, "{input:?} at once");
            assert_eq!(bytewise(*kind, *max, bytes), want, "{input:?} byte by byte");
        }
    }

    #[test]
    fn bounds_lines_and_trailers() {
        let long_ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(MAX_LINE - 2));
        assert_eq!(
            whole(C, 100, long_ext.as_bytes()),
            body("hello", long_ext.len())
        );
        let too_long = format!("5;{}\r\n", "e".repeat(MAX_LINE - 1));
        assert_eq!(whole(C, 100, too_long.as_bytes()), Got::Err(400));
        let zeros = format!("{}5\r\n", "0".repeat(MAX_LINE));
        assert_eq!(whole(C, 100, zeros.as_bytes()), Got::Err(400));

        let trailer = |n: usize, len: usize| {
            let line = format!("X: {}\r\n", "t".repeat(len - 3));
            format!("0\r\n{}\r\n", line.repeat(n))
        };
        let ok = trailer(MAX_TRAILERS, MAX_LINE);
        assert_eq!(whole(C, 100, ok.as_bytes()), body("", ok.len()));
        assert_eq!(
            whole(C, 100, trailer(MAX_TRAILERS + 1, 4).as_bytes()),
            Got::Err(400)
        );
        assert_eq!(
            whole(C, 100, trailer(1, MAX_LINE + 1).as_bytes()),
            Got::Err(400)
        );
    }

    #[test]
    fn grows_with_what_arrives() {
        // A client announcing the most and sending one byte holds one byte.
        let mut d = BodyDecoder::new(BodyKind::Length(65536), 65536).expect("within the bound");
        assert_eq!(d.held(), 0);
        assert_eq!(d.feed(b"A"), Ok(Feed::More));
        assert!(d.held() < 16, "held {}", d.held());
        // Byte by byte it doubles, and never past the length.
        for _ in 1..65536 {
            assert!(d.held_after(1) >= d.held());
            let _ = d.feed(b"A");
        }
        assert!(d.is_done());
        assert_eq!(d.held(), 65536);

        // A chunked body never holds more than its bound.
        let mut d = BodyDecoder::new(C, 1000).expect("chunked");
        assert_eq!(d.feed(b"3e8\r\n"), Ok(Feed::More));
        assert_eq!(d.held_after(100_000), 1000);
        let data = vec![b'x'; 1000];
        assert_eq!(d.feed(&data), Ok(Feed::More));
        assert_eq!(d.held(), 1000);
        assert_eq!(d.feed(b"\r\n0\r\n\r\nrest"), Ok(Feed::Done(7)));
        assert_eq!(d.into_body(), data);
    }

    #[test]
    fn every_split_gives_the_same_body() {
        let raw = b"4;x=y\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nT: v\r\n\r\nGET";
        let want = body("Wikipedia in\r\n\r\nchunks.", raw.len() - 3);
        for cut in 0..=raw.len() {
            let mut d = BodyDecoder::new(C, 1000).expect("chunked");
            let got = match d.feed(&raw[..cut]) {
                Ok(Feed::Done(n)) => Got::Body(d.into_body(), n),
                Ok(Feed::More) => match d.feed(&raw[cut..]) {
                    Ok(Feed::Done(n)) => Got::Body(d.into_body(), cut + n),
                    other => panic!("cut at {cut}: {other:?}"),
                },
                Err(e) => panic!("cut at {cut}: {e:?}"),
            };
            assert_eq!(got, want, "cut at {cut}");
        }
    }
}
