//! The [`Request`] a handler sees.

use std::net::{IpAddr, SocketAddr};

use super::forwarded::Origin;
use super::head::{BodyKind, Fields, Head};

/// Name of the query parameter an `EventSource` can use on its first
/// connection, when it cannot set headers, in place of `Last-Event-ID`.
pub(crate) const LAST_EVENT_ID_QUERY: &str = "lastEventId";

/// An HTTP request whose head is complete (and, on ordinary routes, whose
/// body has been read).
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Fields,
    params: Vec<(String, String)>,
    peer: SocketAddr,
    origin: Origin,
    minor: u8,
    body: Vec<u8>,
    pub(crate) body_kind: BodyKind,
}

impl Request {
    pub(crate) fn from_head(head: Head, peer: SocketAddr) -> Self {
        let (path, query) = match head.target.split_once('?') {
            Some((p, q)) => (p.to_owned(), parse_query(q)),
            None => (head.target, Vec::new()),
        };
        Request {
            method: head.method,
            path,
            query,
            headers: head.headers,
            params: Vec::new(),
            peer,
            origin: Origin {
                client: peer.ip().to_canonical(),
                https: false,
            },
            minor: head.minor,
            body: Vec::new(),
            body_kind: head.body,
        }
    }

    /// A request built by hand, for tests of handlers and for adapters.
    ///
    /// `target` is the path with an optional `?query`.
    pub fn new(method: &str, target: &str, peer: SocketAddr) -> Self {
        let head = Head {
            method: method.to_owned(),
            target: target.to_owned(),
            minor: 1,
            headers: Fields::default(),
            body: BodyKind::None,
        };
        Request::from_head(head, peer)
    }

    /// Adds a header (builder style, for requests built with [`Request::new`]).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push(name, value);
        self
    }

    /// Sets the body (builder style, for requests built with [`Request::new`]).
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The method, as sent (`GET`, `POST`, …).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The path, without the query string, as sent (not percent-decoded).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// A `{name}` segment of the matched route, percent-decoded.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of a query parameter, percent-decoded (`+` is a space).
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a query parameter, in order (`?topic=a&topic=b`).
    pub fn query_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.query
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All query parameters, decoded, in order.
    pub fn query_pairs(&self) -> &[(String, String)] {
        &self.query
    }

    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// All headers, in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + Clone {
        self.headers.iter()
    }

    /// The TCP peer's address: behind a proxy, the proxy's. See
    /// [`client_ip`](Request::client_ip) for the client's.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The client's address: the TCP peer's, or, when the peer is one of
    /// the server's [trusted proxies](crate::ServerBuilder::trusted_proxies),
    /// the address it forwarded the request for (`Forwarded`,
    /// `X-Forwarded-For`). Forwarded headers from anyone else are ignored.
    pub fn client_ip(&self) -> IpAddr {
        self.origin.client
    }

    /// `"https"` when the request came over TLS, or a trusted proxy says
    /// the client reached it over HTTPS (`Forwarded: proto=https`,
    /// `X-Forwarded-Proto: https`), else `"http"`.
    pub fn scheme(&self) -> &'static str {
        if self.origin.https { "https" } else { "http" }
    }

    /// Records that the request came over TLS.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn set_https(&mut self) {
        self.origin.https = true;
    }

    /// Sets what the trusted proxies said of the client.
    pub(crate) fn set_origin(&mut self, origin: Origin) {
        self.origin = origin;
    }

    /// Whether the request came as HTTP/1.0 (its streams are close-delimited).
    pub fn is_http10(&self) -> bool {
        self.minor == 0
    }

    /// The body (empty on stream routes, which do not read one).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as UTF-8.
    ///
    /// # Errors
    ///
    /// When the body is not valid UTF-8.
    pub fn body_str(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.body)
    }

    /// The id the client last saw: the `Last-Event-ID` header, or else the
    /// `lastEventId` query parameter (an `EventSource` cannot set headers on
    /// its first connection), or Mercure's `lastEventID` or `last_event_id`.
    /// An empty value counts as none.
    pub fn last_event_id(&self) -> Option<&str> {
        self.header("last-event-id")
            .filter(|id| !id.is_empty())
            .or_else(|| self.query(LAST_EVENT_ID_QUERY))
            // Mercure's spellings: draft-07's `lastEventID`, draft-08's
            // `last_event_id`.
            .or_else(|| self.query("lastEventID"))
            .or_else(|| self.query("last_event_id"))
            .filter(|id| !id.is_empty())
    }

    /// Whether the client wants the connection closed after this request.
    pub(crate) fn wants_close(&self) -> bool {
        let has = |token: &str| {
            self.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
                .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        };
        if self.minor == 0 {
            !has("keep-alive")
        } else {
            has("close")
        }
    }

    /// Whether the `Accept` header allows an event stream: absent, or listing
    /// `text/event-stream`, `text/*` or `*/*` with a non-zero quality.
    pub(crate) fn accepts_event_stream(&self) -> bool {
        self.accept_matches(|media| {
            media.eq_ignore_ascii_case("text/event-stream")
                || media.eq_ignore_ascii_case("text/*")
                || media == "*/*"
        })
        .unwrap_or(true)
    }

    /// Whether `Accept` names `text/event-stream` itself with a non-zero
    /// quality: the mark of an `EventSource` client.
    pub(crate) fn is_event_source(&self) -> bool {
        self.accept_matches(|media| media.eq_ignore_ascii_case("text/event-stream"))
            .unwrap_or(false)
    }

    /// Whether any `Accept` range matching `wanted` has a non-zero quality;
    /// `None` when there is no `Accept` header.
    fn accept_matches(&self, wanted: impl Fn(&str) -> bool) -> Option<bool> {
        let mut any_accept = false;
        for (_, value) in self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("accept"))
        {
            any_accept = true;
            for range in value.split(',') {
                let mut parts = range.split(';');
                let media = parts.next().unwrap_or("").trim();
                if !wanted(media) {
                    continue;
                }
                let q = parts
                    .filter_map(|p| {
                        let (k, v) = p.split_once('=')?;
                        k.trim().eq_ignore_ascii_case("q").then(|| v.trim())
                    })
                    .next();
                let zero = q.is_some_and(|q| q.parse::<f32>().map_or(true, |q| q <= 0.0));
                if !zero {
                    return Some(true);
                }
            }
        }
        any_accept.then_some(false)
    }

    pub(crate) fn set_params(&mut self, mut params: Vec<(String, String)>) {
        // Kept for the stream's life: no spare capacity.
        params.shrink_to_fit();
        self.params = params;
    }

    pub(crate) fn set_body(&mut self, body: Vec<u8>) {
        self.body = body;
    }

    pub(crate) fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

/// Parses `a=1&b=x+y&c` into decoded pairs.
pub(crate) fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k, true), decode(v, true))
        })
        .collect()
}

/// Appends `s` percent-encoded: every byte but RFC 3986's unreserved
/// characters (so a `%` becomes `%25`), as an RFC 6570 simple expansion
/// does. The daemon's for paths and queries it writes.
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
pub(crate) fn push_encoded(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// Percent-decodes `s` (and `+` as space when `plus` is set). Invalid
/// escapes are kept as they are; invalid UTF-8 is replaced.
pub(crate) fn decode(s: &str, plus: bool) -> String {
    if !s.bytes().any(|b| b == b'%' || (plus && b == b'+')) {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: &str, headers: &[(&str, &str)]) -> Request {
        headers.iter().fold(
            Request::new("GET", target, ([127, 0, 0, 1], 1).into()),
            |r, (k, v)| r.with_header(k, v),
        )
    }

    #[test]
    fn decodes_queries() {
        let r = req("/e?topic=a&topic=b%2Fc&x=1+2&empty&lastEventId=9", &[]);
        assert_eq!(r.path(), "/e");
        assert_eq!(r.query_all("topic").collect::<Vec<_>>(), ["a", "b/c"]);
        assert_eq!(r.query("x"), Some("1 2"));
        assert_eq!(r.query("empty"), Some(""));
        assert_eq!(r.query("nope"), None);
        assert_eq!(r.last_event_id(), Some("9"));
        let cases = [
            ("%", "%"),
            ("%4", "%4"),
            ("%41", "A"),
            ("%zz", "%zz"),
            ("a%C3%A9", "aé"),
            ("%ff", "\u{fffd}"),
        ];
        for (raw, want) in cases {
            assert_eq!(decode(raw, false), want, "{raw}");
        }
    }

    #[test]
    fn last_event_id_prefers_header() {
        let r = req("/e?lastEventId=1", &[("Last-Event-ID", "2")]);
        assert_eq!(r.last_event_id(), Some("2"));
        let r = req("/e?lastEventId=", &[]);
        assert_eq!(r.last_event_id(), None);
    }

    #[test]
    fn accept_negotiation() {
        let table: &[(&[&str], bool)] = &[
            (&[], true),
            (&["text/event-stream"], true),
            (&["text/*"], true),
            (&["*/*"], true),
            (&["application/json"], false),
            (&["text/html"], false),
            (&["text/event-stream;q=0"], false),
            (&["text/event-stream; q=0.0"], false),
            (&["text/event-stream;q=0.5"], true),
            (&["application/json, */*;q=0.1"], true),
            (&["application/json", "text/event-stream"], true),
            (&["*/*;q=0, text/event-stream;q=0"], false),
            (&["text/event-stream;q=bogus"], false),
        ];
        for (accepts, want) in table {
            let headers: Vec<_> = accepts.iter().map(|a| ("Accept", *a)).collect();
            assert_eq!(
                req("/", &headers).accepts_event_stream(),
                *want,
                "{accepts:?}"
            );
        }
    }

    #[test]
    fn connection_semantics() {
        assert!(!req("/", &[]).wants_close());
        assert!(req("/", &[("Connection", "Close")]).wants_close());
        let mut r10 = req("/", &[]);
        r10.minor = 0;
        assert!(r10.wants_close());
        let mut r10 = req("/", &[("connection", "keep-alive")]);
        r10.minor = 0;
        assert!(!r10.wants_close());
    }
}
