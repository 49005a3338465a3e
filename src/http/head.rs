//! Request-head parsing with limits.

/// Largest request head accepted; past it the client gets `431`.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header lines accepted; past it the client gets `431`.
pub const MAX_HEADERS: usize = 64;

/// A complete, validated request head.
#[derive(Debug, Clone)]
pub struct Head {
    /// The method, as sent.
    pub method: String,
    /// The request target as sent (origin form: path and query).
    pub target: String,
    /// Minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Header names and values (trimmed), in the order received.
    pub headers: Fields,
    /// Body framing taken from the headers.
    pub body: BodyKind,
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Why a head was refused; each maps to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// `400`: not HTTP, or framing we cannot trust.
    Malformed(&'static str),
    /// `431`: head over [`MAX_HEAD`] or over [`MAX_HEADERS`] lines.
    TooLarge,
    /// `505`: not HTTP/1.0 or HTTP/1.1.
    Version,
    /// `501`: a transfer coding other than `chunked`.
    Coding,
}

impl HeadError {
    /// The status code the client gets.
    pub fn status(self) -> u16 {
        match self {
            HeadError::Malformed(_) => 400,
            HeadError::TooLarge => 431,
            HeadError::Version => 505,
            HeadError::Coding => 501,
        }
    }

    /// The plain-text body the client gets.
    pub fn message(self) -> &'static str {
        match self {
            HeadError::Malformed(why) => why,
            HeadError::TooLarge => "request head too large (limit: 8 KiB and 64 header lines)",
            HeadError::Version => "only HTTP/1.0 and HTTP/1.1 are supported",
            HeadError::Coding => "only the chunked transfer coding is supported",
        }
    }
}

/// Result of feeding the bytes received so far.
#[derive(Debug)]
pub enum Parse {
    /// More bytes are needed.
    Partial,
    /// A complete head of `len` bytes; what follows belongs to the body or
    /// to the next request.
    Complete(Head, usize),
    /// The head is refused.
    Error(HeadError),
}

/// Parses `buf` as the start of a request.
pub fn parse(buf: &[u8]) -> Parse {
    // Clients may send empty lines before a request (RFC 9112 section 2.2);
    // httparse skips them for us.
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HEAD {
                Parse::Error(HeadError::TooLarge)
            } else {
                Parse::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Parse::Error(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Parse::Error(HeadError::Version),
        Err(_) => return Parse::Error(HeadError::Malformed("malformed request head")),
    };
    if len > MAX_HEAD {
        return Parse::Error(HeadError::TooLarge);
    }
    // httparse takes a bare LF as a line end; a proxy in front may not, and
    // then the two disagree on where the head (and the request) ends.
    if has_bare_lf(&buf[..len]) {
        return Parse::Error(HeadError::Malformed(
            "request lines must end with CRLF, not a bare LF",
        ));
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parse::Error(HeadError::Malformed("malformed request line"));
    };
    if !target.starts_with('/') {
        return Parse::Error(HeadError::Malformed(
            "request target must be a path starting with /",
        ));
    }
    let text: usize = req
        .headers
        .iter()
        .map(|h| h.name.len() + h.value.len())
        .sum();
    let mut out = Fields::with_capacity(req.headers.len(), text);
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            return Parse::Error(HeadError::Malformed("header value is not UTF-8"));
        };
        out.push(h.name, value.trim());
    }
    if let Err(e) = check_host(&out, minor) {
        return Parse::Error(e);
    }
    match framing(&out, minor) {
        Ok(body) => Parse::Complete(
            Head {
                method: method.to_owned(),
                target: target.to_owned(),
                minor,
                headers: out,
                body,
            },
            len,
        ),
        Err(e) => Parse::Error(e),
    }
}

/// Header fields in one buffer: names and values side by side in `text`,
/// with `(name start, value start, value end)` offsets into it.
///
/// A stream's request lives as long as the stream, often hours; two heap
/// blocks per request instead of two per header keep what an idle stream
/// costs small (a browser sends a dozen headers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    text: String,
    spans: Vec<(u32, u32, u32)>,
}

impl Fields {
    /// Room for `fields` fields with `text` bytes of names and values.
    pub fn with_capacity(fields: usize, text: usize) -> Self {
        Fields {
            text: String::with_capacity(text),
            spans: Vec::with_capacity(fields),
        }
    }

    /// Appends a field. Heads are at most 8 KiB; a field past 4 GiB of
    /// text (only possible for requests built by hand) is dropped.
    pub fn push(&mut self, name: &str, value: &str) {
        let start = self.text.len();
        let (Ok(a), Ok(b), Ok(c)) = (
            u32::try_from(start),
            u32::try_from(start + name.len()),
            u32::try_from(start + name.len() + value.len()),
        ) else {
            return;
        };
        self.text.push_str(name);
        self.text.push_str(value);
        self.spans.push((a, b, c));
    }

    /// The fields, `(name, value)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + Clone + '_ {
        self.spans.iter().map(|&(a, b, c)| {
            let (a, b, c) = (a as usize, b as usize, c as usize);
            (&self.text[a..b], &self.text[b..c])
        })
    }
}

/// Whether a LF in `head` comes without the CR before it.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without `Host`, or any
/// request with two, is a `400`. Two would let whatever reads the first
/// (CORS, logs) and a proxy that reads the last disagree on the origin.
fn check_host(headers: &Fields, minor: u8) -> Result<(), HeadError> {
    let hosts = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("host"))
        .count();
    match hosts {
        0 if minor >= 1 => Err(HeadError::Malformed(
            "an HTTP/1.1 request needs a Host header",
        )),
        0 | 1 => Ok(()),
        _ => Err(HeadError::Malformed("more than one Host header")),
    }
}

/// Works out the body framing, refusing ambiguous framing (the root of
/// request smuggling) rather than guessing.
fn framing(headers: &Fields, minor: u8) -> Result<BodyKind, HeadError> {
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for (name, value) in headers.iter() {
        if name.eq_ignore_ascii_case("content-length") {
            for part in value.split(',') {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HeadError::Malformed("invalid Content-Length"));
                }
                let n: u64 = part
                    .parse()
                    .map_err(|_| HeadError::Malformed("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Malformed("conflicting Content-Length headers"));
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if minor == 0 {
                return Err(HeadError::Malformed(
                    "Transfer-Encoding is not allowed in HTTP/1.0",
                ));
            }
            for coding in value.split(',') {
                let coding = coding.trim_matches([' ', '\t']);
                if coding.is_empty() {
                    // RFC 9110 5.6.1: empty list elements are ignored.
                    continue;
                }
                if coding.eq_ignore_ascii_case("chunked") {
                    if chunked {
                        return Err(HeadError::Malformed("chunked applied twice"));
                    }
                    chunked = true;
                } else {
                    // `chunked` must be the last coding; anything else we
                    // cannot decode.
                    return Err(HeadError::Coding);
                }
            }
        }
    }
    match (length, chunked) {
        (Some(_), true) => Err(HeadError::Malformed(
            "both Content-Length and Transfer-Encoding",
        )),
        (Some(0) | None, false) => Ok(BodyKind::None),
        (Some(n), false) => Ok(BodyKind::Length(n)),
        (None, true) => Ok(BodyKind::Chunked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(raw: &str) -> (Head, usize) {
        match parse(raw.as_bytes()) {
            Parse::Complete(h, n) => (h, n),
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn error(raw: &[u8]) -> HeadError {
        match parse(raw) {
            Parse::Error(e) => e,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn parses_heads() {
        let (h, n) = complete(
            "GET /events/a?x=1 HTTP/1.1\r\nHost: a\r\nAccept:  text/event-stream \r\n\r\nrest",
        );
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/events/a?x=1");
        assert_eq!(h.minor, 1);
        assert_eq!(
            h.headers.iter().nth(1),
            Some(("Accept", "text/event-stream"))
        );
        assert_eq!(h.body, BodyKind::None);
        assert_eq!(
            n,
            "GET /events/a?x=1 HTTP/1.1\r\nHost: a\r\nAccept:  text/event-stream \r\n\r\n".len()
        );

        let (h, _) = complete("POST /p HTTP/1.0\r\nContent-Length: 5\r\n\r\n");
        assert_eq!((h.minor, h.body), (0, BodyKind::Length(5)));
        let (h, _) = complete("POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.body, BodyKind::Chunked);
        for te in ["chunked,", ", chunked", " ,chunked , ", "chunked,\t,"] {
            let (h, _) = complete(&format!(
                "POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n"
            ));
            assert_eq!(h.body, BodyKind::Chunked, "{te:?}");
        }
        let (h, _) = complete("POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 7, 7\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(7));
        let (h, _) = complete("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(h.target, "/");
    }

    #[test]
    fn partial_until_blank_line() {
        for raw in [
            "",
            "GET",
            "GET / HTTP/1.1\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n",
        ] {
            assert!(matches!(parse(raw.as_bytes()), Parse::Partial), "{raw:?}");
        }
    }

    #[test]
    fn refuses_bad_heads() {
        let table: &[(&[u8], u16)] = &[
            (b"GET / HTTP/2.0\r\n\r\n", 505),
            (b"GET / FTP/1.1\r\n\r\n", 505),
            (b"G\x01T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET http://x/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                501,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: \xff\r\n\r\n", 400),
        ];
        for (raw, status) in table {
            assert_eq!(
                error(raw).status(),
                *status,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn host_and_line_ends() {
        let table: &[(&[u8], Option<&str>)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
            (b"GET / HTTP/1.1\r\nhOST:\r\n\r\n", None),
            (b"GET / HTTP/1.0\r\n\r\n", None),
            (b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", None),
            (
                b"GET / HTTP/1.1\r\n\r\n",
                Some("an HTTP/1.1 request needs a Host header"),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
                Some("more than one Host header"),
            ),
            (
                b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
                Some("more than one Host header"),
            ),
            (
                b"GET / HTTP/1.1\nHost: a\n\n",
                Some("request lines must end with CRLF, not a bare LF"),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\n\r\n",
                Some("request lines must end with CRLF, not a bare LF"),
            ),
            (
                b"GET / HTTP/1.0\r\n\n",
                Some("request lines must end with CRLF, not a bare LF"),
            ),
            (
                b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
                Some("request lines must end with CRLF, not a bare LF"),
            ),
        ];
        for (raw, want) in table {
            let shown = String::from_utf8_lossy(raw);
            match (parse(raw), want) {
                (Parse::Complete(..), None) => {}
                (Parse::Error(e), Some(msg)) => {
                    assert_eq!((e.status(), e.message()), (400, *msg), "{shown:?}");
                }
                (got, _) => panic!("{shown:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn enforces_limits() {
        let mut big = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(error(&big), HeadError::TooLarge);

        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("X{i}: y\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(error(many.as_bytes()), HeadError::TooLarge);
    }
}
