//! The [`Response`] of ordinary routes, and the heads the server writes.

use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::digits::push_decimal;
use crate::http::chunked::chunk_into;

/// Headers every event stream is sent with. `nosniff`: a stream carries
/// what publishers sent, which no browser may take for a page or script.
pub(crate) const STREAM_HEADERS: &str = "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nX-Content-Type-Options: nosniff\r\n";

/// The whole head of an HTTP/1.1 event stream with no extra headers.
pub(crate) const STREAM_HEAD_11: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nX-Content-Type-Options: nosniff\r\nTransfer-Encoding: chunked\r\n\r\n";
/// The whole head of an HTTP/1.0 event stream with no extra headers.
pub(crate) const STREAM_HEAD_10: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n";

/// A complete answer to an ordinary (non-streaming) request.
///
/// # Examples
///
/// ```
/// use ssed::Response;
/// let r = Response::text(404, "no such topic").with_header("X-Why", "demo");
/// assert_eq!(r.status(), 404);
/// assert_eq!(r.body(), b"no such topic\n");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

/// A response's body: held whole, or made as the client takes it (see
/// [`Response::streamed`]). One enum, not a second field: a `Response`
/// stays three words and a status wide, as the refusals a stream's
/// handler holds on its way in are (its thread keeps every stack page it
/// touches).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    Whole(Vec<u8>),
    Streamed(BodySource),
}

/// What makes a streamed body: appends the next piece to the buffer it is
/// given and says whether there was one (false: the body is complete).
type NextPiece = dyn FnMut(&mut Vec<u8>) -> bool + Send;

/// The maker of a streamed body, shared (so a `Response` stays `Clone`
/// and `Sync`); two are equal when they are the same maker.
#[derive(Clone)]
pub(crate) struct BodySource(Arc<Mutex<Box<NextPiece>>>);

impl PartialEq for BodySource {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for BodySource {}

impl std::fmt::Debug for BodySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BodySource")
    }
}

/// A streamed body on its way out: its pieces, framed for the connection
/// (a chunk each on HTTP/1.1, then the last chunk; bare on HTTP/1.0,
/// whose connection closes after it).
#[derive(Debug)]
pub(crate) struct BodyPieces {
    source: BodySource,
    chunked: bool,
    piece: Vec<u8>,
    done: bool,
}

impl BodyPieces {
    /// Appends the next piece, framed, to `out`; false when the body is
    /// complete and nothing was added.
    pub(crate) fn next_into(&mut self, out: &mut Vec<u8>) -> bool {
        if self.done {
            return false;
        }
        loop {
            self.piece.clear();
            // A maker that panicked left at worst a piece half made: the
            // answer it was is cut short, nothing else.
            let more = {
                let mut maker = self.source.0.lock().unwrap_or_else(PoisonError::into_inner);
                maker(&mut self.piece)
            };
            if !more {
                self.done = true;
                if self.chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                    return true;
                }
                return false;
            }
            if !self.piece.is_empty() {
                break;
            }
        }
        if self.chunked {
            chunk_into(out, &self.piece);
        } else {
            out.extend_from_slice(&self.piece);
        }
        if self.piece.capacity() > MAX_KEPT_PIECE {
            self.piece = Vec::new(); // do not keep one large piece's buffer
        }
        true
    }
}

/// The buffer of a streamed body's pieces is kept between pieces up to
/// this size.
const MAX_KEPT_PIECE: usize = 64 * 1024;

impl Response {
    /// An empty response with this status.
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Whole(Vec::new()),
        }
    }

    /// A `status` answer of `content_type` whose body is made piece by
    /// piece as the client takes it: `next` appends the next piece to the
    /// buffer it is given and returns whether there was one (false: the
    /// body is complete). Chunked on HTTP/1.1, close-delimited on 1.0.
    ///
    /// For an answer too large to hold at once (an operator's listing of
    /// every stream): what is held is one piece. `next` runs on the
    /// connection's thread while the client keeps up, and on the
    /// acceptor's once it does not (no thread waits on a client for an
    /// ordinary answer), so it must not block, and a piece should take
    /// well under a millisecond to make.
    // Only the daemon lists and ends streams.
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    pub(crate) fn streamed(
        status: u16,
        content_type: &str,
        next: impl FnMut(&mut Vec<u8>) -> bool + Send + 'static,
    ) -> Self {
        let mut r = Response::new(status).with_header("Content-Type", content_type);
        r.body = Body::Streamed(BodySource(Arc::new(Mutex::new(Box::new(next)))));
        r
    }

    /// Whether the body is made as the client takes it (see
    /// [`streamed`](Response::streamed)): the connection then closes after
    /// it on HTTP/1.0, where the body's end is the connection's.
    pub(crate) fn is_streamed(&self) -> bool {
        matches!(self.body, Body::Streamed(_))
    }

    /// The pieces of a streamed body, framed for HTTP/1.`minor`; `None`
    /// for a body held whole.
    pub(crate) fn pieces(&self, minor: u8) -> Option<BodyPieces> {
        let Body::Streamed(source) = &self.body else {
            return None;
        };
        Some(BodyPieces {
            source: source.clone(),
            chunked: minor == 1,
            piece: Vec::new(),
            done: false,
        })
    }

    /// A plain-text response (`text/plain; charset=utf-8`); a final newline
    /// is added when missing, so `curl` output stays readable.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        let mut body = body.into();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        Response::new(status)
            .with_header("Content-Type", "text/plain; charset=utf-8")
            .with_body(body)
    }

    /// A JSON response. A value that fails to serialize gives a plain-text
    /// `500` instead.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response::new(status)
                .with_header("Content-Type", "application/json")
                .with_body(body),
            Err(e) => {
                log::error!("response does not serialize to JSON: {e}");
                Response::text(500, "response does not serialize")
            }
        }
    }

    /// A `200` HTML page (`text/html; charset=utf-8`).
    pub fn html(body: impl Into<String>) -> Self {
        Response::new(200)
            .with_header("Content-Type", "text/html; charset=utf-8")
            .with_body(body.into())
    }

    /// `204 No Content`: for an `EventSource`, "stop reconnecting".
    pub fn no_content() -> Self {
        Response::new(204)
    }

    /// Adds a header. Line breaks in the name or value are replaced by
    /// spaces, so a header can never split the response.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((clean(name), clean(value)));
        self
    }

    /// Replaces the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Body::Whole(body.into());
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body (empty for a body made as the client takes it).
    pub fn body(&self) -> &[u8] {
        match &self.body {
            Body::Whole(bytes) => bytes,
            Body::Streamed(_) => &[],
        }
    }

    /// Serializes the response. `head_only` leaves the body out (for `HEAD`);
    /// `close` announces that the connection closes after it. Of a
    /// [streamed](Response::streamed) body, only the head: its pieces come
    /// from [`pieces`](Response::pieces).
    pub(crate) fn encode(&self, minor: u8, head_only: bool, close: bool) -> Vec<u8> {
        let body = self.body();
        let mut out = Vec::with_capacity(128 + body.len());
        status_line(&mut out, minor, self.status);
        for (k, v) in &self.headers {
            if k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("connection") {
                continue; // ours, computed below
            }
            header_line(&mut out, k, v);
        }
        // Error answers echo what the client sent (a topic, an origin):
        // no browser may sniff any answer into a page.
        if self.header("x-content-type-options").is_none() {
            out.extend_from_slice(b"X-Content-Type-Options: nosniff\r\n");
        }
        // 1xx, 204 and 304 have no body and no Content-Length (RFC 9110 8.6).
        let bodyless = self.status < 200 || self.status == 204 || self.status == 304;
        if self.is_streamed() {
            if minor == 1 {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
            }
        } else if !bodyless {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(&mut out, body.len() as u128);
            out.extend_from_slice(b"\r\n");
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if minor == 0 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only && !bodyless {
            out.extend_from_slice(body);
        }
        out
    }
}

/// Writes `HTTP/1.x NNN Reason\r\n`.
/// Written without `core::fmt`, as is the rest of a stream's head: see
/// [`crate::digits`].
pub(crate) fn status_line(out: &mut Vec<u8>, minor: u8, status: u16) {
    out.extend_from_slice(b"HTTP/1.");
    push_decimal(out, u128::from(minor));
    out.push(b' ');
    push_decimal(out, u128::from(status));
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes `name: value\r\n`.
fn header_line(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The head of an event stream: chunked on HTTP/1.1, close-delimited on 1.0.
pub(crate) fn stream_head(minor: u8, extra: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    status_line(&mut out, minor, 200);
    out.extend_from_slice(STREAM_HEADERS.as_bytes());
    for (k, v) in extra {
        header_line(&mut out, k, v);
    }
    if minor == 0 {
        out.extend_from_slice(b"Connection: close\r\n\r\n");
    } else {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
    }
    out
}

/// The reason phrase of the status codes ssed uses.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        507 => "Insufficient Storage",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn clean(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).expect("ascii")
    }

    #[test]
    fn encodes_responses() {
        let r = Response::text(404, "nope").with_header("X-A", "b\r\nInjected: 1");
        assert_eq!(
            text(r.encode(1, false, false)),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nX-A: b  Injected: 1\r\nX-Content-Type-Options: nosniff\r\nContent-Length: 5\r\n\r\nnope\n"
        );
        assert_eq!(
            text(Response::no_content().encode(1, false, true)),
            "HTTP/1.1 204 No Content\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            text(Response::html("<p>").encode(0, true, false)),
            "HTTP/1.0 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn a_response_is_no_wider_for_its_streamed_body() {
        // Stream handlers hold refusals on their way in: see `Body`.
        assert_eq!(
            std::mem::size_of::<Response>(),
            std::mem::size_of::<(u16, Vec<(String, String)>, Vec<u8>)>()
        );
    }

    #[test]
    fn streamed_bodies_go_out_a_piece_at_a_time() {
        let mut left = vec![b"[1".to_vec(), Vec::new(), b",2]".to_vec()];
        left.reverse();
        let r = Response::streamed(200, "application/json", move |out| {
            left.pop().map(|p| out.extend_from_slice(&p)).is_some()
        });
        let head = text(r.encode(1, false, false));
        assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
        assert!(!head.contains("Content-Length"), "{head}");
        let mut pieces = r.pieces(1).expect("streamed");
        let mut out = Vec::new();
        while pieces.next_into(&mut out) {}
        assert_eq!(text(out), "2\r\n[1\r\n3\r\n,2]\r\n0\r\n\r\n");
        assert!(!pieces.next_into(&mut Vec::new()), "done stays done");
        assert!(Response::text(200, "x").pieces(1).is_none());
    }

    #[test]
    fn stream_heads() {
        let h = text(stream_head(1, &[("Set-Cookie".into(), "a=b".into())]));
        assert!(h.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"));
        assert!(h.ends_with("Set-Cookie: a=b\r\nTransfer-Encoding: chunked\r\n\r\n"));
        let h = text(stream_head(0, &[]));
        assert!(h.ends_with("nosniff\r\nConnection: close\r\n\r\n"));
        assert_eq!(stream_head(0, &[]), STREAM_HEAD_10);
        assert_eq!(stream_head(1, &[]), STREAM_HEAD_11);
    }
}
