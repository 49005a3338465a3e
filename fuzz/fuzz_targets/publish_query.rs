//! The daemon's publish path on arbitrary requests: head, route, query and
//! path decoding, body framing (length or chunked), then the publish and
//! push handlers over a fresh in-memory hub, all in-process
//! (`ssed::fuzzing::Offline`).
//!
//! The input's first byte sets the scene (bit 0: a publish token is
//! configured; bit 1: the peer is not loopback; bits 2-3: `max_body` of
//! 16, 64, 1024 or 65536); the rest is the request as sent.
//!
//! Checks: nothing panics; every answer is a status the contract names,
//! errors with a plain-text body; query pairs and the `{topic}`/`{key}`
//! segment decode as an independent decoder says; the body handed to the
//! handler is exactly what the framing says (a strict RFC 9112 chunked
//! decoder as the reference), and malformed or cut framing never reaches
//! a handler; publish and push answer what the contract says for the name,
//! the token, the peer, the body and `?event=`, and a `200` delivered
//! exactly that event to a subscriber (read back with the WHATWG parser of
//! the tests), while a refusal left the hub untouched.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use ssed::daemon::{Config, Daemon, auth};
use ssed::fuzzing::{BodyKind, Offline, Parse, Served, parse};
use ssed::hub::valid_name;
use ssed::{Hub, Request, Response, ShutdownHandle};

#[path = "../../tests/support/event_stream.rs"]
#[allow(dead_code)]
mod event_stream;

const TOKEN: &str = "fuzz-publish-token";
const MAX_BODY: [usize; 4] = [16, 64, 1024, 65536];
/// Longest chunk-size or trailer line the server reads (its limit; the
/// reference decoder does not judge longer ones).
const MAX_LINE: usize = 1024;
const MAX_TRAILERS: usize = 32;

fuzz_target!(|data: &[u8]| {
    let Some((&scene, request)) = data.split_first() else {
        return;
    };
    let mut config = Config::default();
    config.listen = "127.0.0.1:0".into();
    config.publish_token = (scene & 1 != 0).then(|| TOKEN.to_owned());
    config.max_body = MAX_BODY[usize::from(scene >> 2 & 3)];
    let peer: SocketAddr = if scene & 2 != 0 {
        ([192, 0, 2, 7], 40000).into() // documentation range: a value, never a target
    } else {
        ([127, 0, 0, 1], 40000).into()
    };
    let Daemon { server, hub, .. } =
        ssed::daemon::build(config.clone(), ShutdownHandle::new()).expect("builds on port 0");
    let offline = Offline::new(server).expect("a loopback connection");

    // What the request asks for, read before the server sees it.
    let Parse::Complete(head, len) = parse(request) else {
        assert!(!matches!(
            offline.serve(peer, request),
            Served::Answered(..)
        ));
        return;
    };
    let route = Route::of(&head.method, &head.target);
    let sub = match &route {
        Route::Publish(topic) if valid_name(topic) => Some(
            hub.subscribe(&[topic.as_str()], None)
                .expect("a valid name"),
        ),
        _ => None,
    };
    let body = reference_body(head.body, &request[len..]);

    let served = offline.serve(peer, request);
    let status = match &served {
        Served::Incomplete => None,
        Served::Refused(r) => {
            assert!(
                matches!(r.status(), 400 | 404 | 405 | 408 | 413 | 431 | 501 | 505),
                "refused with {}",
                r.status()
            );
            check_error_body(r);
            Some(r.status())
        }
        Served::Stream(req) => {
            check_decoding(req, &head.target);
            None
        }
        Served::Answered(req, r) => {
            check_decoding(req, &head.target);
            assert!(r.status() < 500, "{} answered {}", head.target, r.status());
            check_error_body(r);
            Some(r.status())
        }
    };

    // The body: only complete, well-framed bodies reach a handler.
    if matches!(route, Route::Publish(_) | Route::Push(_)) {
        match (&body, &served) {
            (Body::Complete(b), Served::Answered(req, _)) => assert_eq!(req.body(), &b[..]),
            (Body::Complete(b), other) if b.len() <= config.max_body => {
                panic!("a well-framed body of {} bytes gave {other:?}", b.len())
            }
            (Body::Complete(_), other) => assert_eq!(status, Some(413), "{other:?}"),
            (Body::Malformed | Body::Incomplete, Served::Answered(req, _)) => {
                panic!("{body:?} framing reached the handler as {:?}", req.body())
            }
            (Body::Incomplete, Served::Refused(r)) => assert!(
                matches!(r.status(), 408 | 413),
                "a cut body was refused with {}",
                r.status()
            ),
            _ => {}
        }
    }

    let published = hub.published();
    if let Served::Answered(req, r) = &served {
        match &route {
            Route::Publish(topic) => check_publish(&config, req, r, topic, sub.as_ref(), published),
            Route::Push(key) => check_push(&config, req, r, key, &hub),
            Route::Other => {}
        }
    }
    if status != Some(200) {
        assert_eq!(published, 0, "a refused request published");
        if let Route::Push(key) = &route {
            assert_eq!(hub.mailbox_len(key), 0, "a refused request pushed");
        }
    }
});

/// The daemon's ordinary routes this target models, with the `{topic}` or
/// `{key}` segment decoded independently of the server.
enum Route {
    Publish(String),
    Push(String),
    Other,
}

impl Route {
    fn of(method: &str, target: &str) -> Route {
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        let segment = |prefix: &str| {
            path.strip_prefix(prefix)
                .filter(|s| !s.is_empty() && !s.contains('/'))
                .map(|s| percent_decode(s, false))
        };
        if method != "POST" {
            return Route::Other;
        }
        if let Some(topic) = segment("/publish/") {
            Route::Publish(topic)
        } else if let Some(key) = segment("/keys/") {
            Route::Push(key)
        } else {
            Route::Other
        }
    }
}

/// A reference percent-decoder: `%` and two hex digits is a byte, any
/// other `%` stays, `+` is a space in queries, bytes that are not UTF-8
/// become U+FFFD.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        let hex = tail
            .get(..2)
            .filter(|h| b == b'%' && h.iter().all(u8::is_ascii_hexdigit));
        match hex {
            Some(h) => {
                let text = std::str::from_utf8(h).expect("hex digits are ASCII");
                out.push(u8::from_str_radix(text, 16).expect("two hex digits"));
                rest = &tail[2..];
            }
            None => {
                out.push(if plus_is_space && b == b'+' { b' ' } else { b });
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query pairs and route parameters are what the reference decoder
/// makes of the target.
fn check_decoding(req: &Request, target: &str) {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let want: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect();
    assert_eq!(req.query_pairs(), &want[..], "query of {target:?}");
    for name in ["topic", "key"] {
        if let Some(value) = req.param(name) {
            let raw = req.path().rsplit('/').next().expect("a segment");
            assert_eq!(
                value,
                percent_decode(raw, false),
                "{{{name}}} of {target:?}"
            );
        }
    }
}

fn check_error_body(r: &Response) {
    if r.status() >= 400 {
        assert!(!r.body().is_empty(), "{} with no body", r.status());
        let kind = r.header("content-type").unwrap_or_default();
        assert!(kind.starts_with("text/plain"), "{} as {kind:?}", r.status());
    }
}

/// The status the contract gives a publish or push to `name`, in the
/// order the checks apply; `None` when an `Origin` header makes it a CORS
/// question this target does not model.
fn expected_status(config: &Config, req: &Request, name: &str, event_ok: bool) -> Option<u16> {
    if req.header("origin").is_some() {
        return None;
    }
    Some(if !valid_name(name) {
        400
    } else if config.publish_token.is_some() && auth::bearer(req) != Some(TOKEN) {
        401
    } else if config.publish_token.is_none() && !tokenless_allowed(config, req)? {
        403
    } else if std::str::from_utf8(req.body()).is_err() || !event_ok {
        400
    } else {
        200
    })
}

/// Whether the daemon lets this request publish or push without a token,
/// judged apart from its code: only a direct connection from this machine
/// (no proxy's forwarding header) under a Host that names this machine (an
/// IPv4 address, `localhost`, a `.localhost` name or one of
/// `allowed_hosts`), so a page that reached the server under its own name
/// cannot. `None` for a Host too odd to judge here (brackets, characters a
/// host name does not have, a port that is not a number).
fn tokenless_allowed(config: &Config, req: &Request) -> Option<bool> {
    if !req.peer_addr().ip().is_loopback()
        || ["forwarded", "x-forwarded-for", "x-real-ip"]
            .iter()
            .any(|h| req.header(h).is_some())
    {
        return Some(false);
    }
    let Some(host) = req.header("host") else {
        return Some(true);
    };
    let host = host.trim().to_ascii_lowercase();
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host.as_str(), None),
    };
    let simple = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.is_none_or(|p| p.parse::<u16>().is_ok());
    if !simple {
        return None;
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Some(true);
    }
    let name = name.trim_end_matches('.');
    Some(
        name == "localhost"
            || name.ends_with(".localhost")
            || config.allowed_hosts.iter().any(|a| a == name),
    )
}

fn json(r: &Response) -> serde_json::Value {
    serde_json::from_slice(r.body()).expect("a 200 answers JSON")
}

fn check_publish(
    config: &Config,
    req: &Request,
    r: &Response,
    topic: &str,
    sub: Option<&ssed::Subscription>,
    published: u64,
) {
    let event = req.query("event");
    let event_ok = event.is_none_or(|e| !e.contains(['\r', '\n']));
    if let Some(want) = expected_status(config, req, topic, event_ok) {
        assert_eq!(r.status(), want, "{:?}", String::from_utf8_lossy(r.body()));
    }
    if r.status() != 200 {
        return;
    }
    assert_eq!(published, 1);
    let answer = json(r);
    assert_eq!(answer["topic"], topic);
    assert_eq!(answer["receivers"], 1);
    let id = answer["id"].as_str().expect("an id string");
    let frame = sub
        .and_then(ssed::Subscription::try_next)
        .expect("the subscriber got the event");
    let data = std::str::from_utf8(req.body()).expect("a 200 body is UTF-8");
    let event_type = match event {
        None | Some("") => "message",
        Some(name) => name,
    };
    assert_eq!(
        event_stream::events(frame.as_bytes()),
        [event_stream::Dispatched::new(
            event_type,
            &event_stream::received(data),
            id
        )]
    );
}

fn check_push(config: &Config, req: &Request, r: &Response, key: &str, hub: &Hub) {
    if let Some(want) = expected_status(config, req, key, true) {
        assert_eq!(r.status(), want, "{:?}", String::from_utf8_lossy(r.body()));
    }
    if r.status() == 200 {
        let answer = json(r);
        assert_eq!(answer["key"], key);
        assert_eq!(answer["queued"], 1);
        let body = std::str::from_utf8(req.body()).expect("a 200 body is UTF-8");
        assert_eq!(hub.try_take(key).as_deref(), Some(body));
    }
}

/// What the framing says the body is.
#[derive(Debug)]
enum Body {
    Complete(Vec<u8>),
    /// Cut short: the server must wait for more.
    Incomplete,
    /// Not valid framing: the server must refuse it.
    Malformed,
    /// Past the server's line limits: not judged here.
    Unchecked,
}

fn reference_body(kind: BodyKind, rest: &[u8]) -> Body {
    match kind {
        BodyKind::None => Body::Complete(Vec::new()),
        BodyKind::Length(n) => match usize::try_from(n) {
            Ok(n) if rest.len() >= n => Body::Complete(rest[..n].to_vec()),
            _ => Body::Incomplete,
        },
        BodyKind::Chunked => dechunk(rest),
    }
}

/// Splits off one line ending in CRLF (the CRLF dropped); `Err` with the
/// verdict when there is none yet. A bare LF, or a CR not followed by LF,
/// is malformed: a proxy in front may end the line elsewhere.
fn line(rest: &[u8]) -> Result<(&[u8], &[u8]), Body> {
    let lone_cr = |text: &[u8]| text.windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n');
    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
        // The server refuses a long line before its end arrives.
        return Err(if rest.len() >= MAX_LINE {
            Body::Unchecked
        } else if lone_cr(rest) {
            Body::Malformed
        } else {
            Body::Incomplete
        });
    };
    if end >= MAX_LINE {
        return Err(Body::Unchecked);
    }
    match rest[..end].strip_suffix(b"\r") {
        Some(text) if !text.contains(&b'\r') => Ok((text, &rest[end + 1..])),
        _ => Err(Body::Malformed),
    }
}

/// Whether `text` (a chunk-size line without its CRLF, or the start of
/// one) is or can still become a valid one: hex digits that fit a `usize`,
/// then only SP or HTAB before an optional `;` and extensions.
fn size_prefix_ok(text: &[u8]) -> bool {
    let size = text.split(|&b| b == b';').next().unwrap_or_default();
    let hex_end = size.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if hex_end == 0 {
        return text.is_empty();
    }
    let hex = std::str::from_utf8(&size[..hex_end]).expect("hex digits are ASCII");
    usize::from_str_radix(hex, 16).is_ok()
        && size[hex_end..].iter().all(|&b| b == b' ' || b == b'\t')
}

/// A strict chunked decoder after RFC 9112 section 7.1: `chunk-size` is
/// hex digits, optionally followed by whitespace (SP or HTAB) and
/// extensions after `;`; each chunk's data is followed by CRLF, and every
/// line ends with CRLF.
fn dechunk(mut rest: &[u8]) -> Body {
    let mut body = Vec::new();
    loop {
        let (size_line, after) = match line(rest) {
            Ok(split) => split,
            // The server refuses a size line as soon as what came of it
            // cannot start a valid one.
            Err(Body::Incomplete) if !size_prefix_ok(rest.strip_suffix(b"\r").unwrap_or(rest)) => {
                return Body::Malformed;
            }
            Err(verdict) => return verdict,
        };
        if size_line.is_empty() || !size_prefix_ok(size_line) {
            return Body::Malformed;
        }
        let size = size_line.split(|&b| b == b';').next().unwrap_or_default();
        let hex_end = size.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let text = std::str::from_utf8(&size[..hex_end]).expect("hex digits are ASCII");
        let Ok(size) = usize::from_str_radix(text, 16) else {
            return Body::Malformed;
        };
        rest = after;
        if size == 0 {
            for _ in 0..=MAX_TRAILERS {
                match line(rest) {
                    Err(verdict) => return verdict,
                    Ok(([], _)) => return Body::Complete(body),
                    Ok((_, after)) => rest = after,
                }
            }
            return Body::Unchecked;
        }
        if rest.len() < size {
            return Body::Incomplete;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size..];
        rest = match rest {
            [b'\r', b'\n', after @ ..] => after,
            [] | [b'\r'] => return Body::Incomplete,
            _ => return Body::Malformed,
        };
    }
}
