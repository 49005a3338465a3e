//! The request-head parser on arbitrary bytes.
//!
//! Checks: it never panics; it never waits past the 8 KiB limit nor accepts
//! a head over it or over 64 headers; an accepted head is what the bytes
//! say (CRLF line ends only, an origin-form target, HTTP/1.0 or 1.1, one
//! Host and none missing on HTTP/1.1, header values with no line break to
//! reflect into a response) with unambiguous body framing; and the
//! verdict does not depend on how the bytes were split across reads (the
//! acceptor re-parses everything received so far after every read).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssed::fuzzing::{BodyKind, Head, MAX_HEAD, MAX_HEADERS, Parse, parse};

fuzz_target!(|data: &[u8]| {
    let verdict = parse(data);
    match &verdict {
        Parse::Partial => assert!(
            data.len() < MAX_HEAD,
            "still waiting after {} bytes",
            data.len()
        ),
        Parse::Error(e) => {
            assert!(matches!(e.status(), 400 | 431 | 501 | 505), "{e:?}");
            assert!(!e.message().is_empty());
        }
        Parse::Complete(head, len) => check_head(data, head, *len),
    }
    for cut in cuts(data, &verdict) {
        check_prefix(&data[..cut], &verdict);
    }
});

fn check_head(data: &[u8], head: &Head, len: usize) {
    assert!(len <= data.len() && len <= MAX_HEAD, "head of {len} bytes");
    assert!(head.headers.iter().count() <= MAX_HEADERS);
    // The head ends with an empty line, and every line with CRLF: a bare
    // LF is where a proxy in front may see a different head.
    let raw = &data[..len];
    assert!(raw.ends_with(b"\r\n\r\n"), "no empty line ends {raw:?}");
    for (i, &b) in raw.iter().enumerate() {
        assert!(b != b'\n' || raw[..i].ends_with(b"\r"), "bare LF in {raw:?}");
    }

    assert!(head.minor <= 1);
    assert!(head.target.starts_with('/'), "target {:?}", head.target);
    assert!(!head.method.is_empty());
    assert!(
        head.method.bytes().all(|b| b.is_ascii_graphic()),
        "method {:?}",
        head.method
    );
    for text in [&head.method, &head.target] {
        assert!(contains(raw, text.as_bytes()), "{text:?} not in the head");
    }
    for (name, value) in head.headers.iter() {
        assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':'));
        assert!(
            !value.contains(['\r', '\n', '\0']),
            "header value {value:?}"
        );
        assert_eq!(value.trim(), value, "header values are trimmed");
    }
    check_framing(head);
    // RFC 9112 section 3.2: one Host, required on HTTP/1.1.
    let hosts = head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
        .count();
    assert!(hosts <= 1, "{hosts} Host headers: {head:?}");
    assert!(hosts == 1 || head.minor == 0, "HTTP/1.1 without Host: {head:?}");
}

/// The framing the parser chose is the only reading of the headers: a
/// length that every `Content-Length` agrees on, or `chunked` last with no
/// `Content-Length` beside it, never both.
fn check_framing(head: &Head) {
    let named = |n: &'static str| {
        head.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v)
    };
    let lengths: Vec<&str> = named("content-length")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let codings: Vec<&str> = named("transfer-encoding")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    match head.body {
        BodyKind::Chunked => {
            assert!(lengths.is_empty(), "chunked and Content-Length: {head:?}");
            assert_eq!(head.minor, 1, "chunked in HTTP/1.0: {head:?}");
            assert!(
                codings
                    .last()
                    .is_some_and(|c| c.eq_ignore_ascii_case("chunked"))
            );
        }
        BodyKind::Length(n) => {
            assert!(n > 0);
            assert!(codings.is_empty(), "a length and codings: {head:?}");
            for l in &lengths {
                assert!(l.bytes().all(|b| b.is_ascii_digit()), "length {l:?}");
                assert_eq!(l.parse::<u64>().ok(), Some(n), "{head:?}");
            }
        }
        BodyKind::None => {
            assert!(codings.is_empty(), "codings without a body: {head:?}");
            assert!(lengths.iter().all(|l| l.parse::<u64>().ok() == Some(0)));
        }
    }
}

/// Where to cut the input to replay it as an earlier read: every byte for
/// short inputs, else a few places, and just before the end of an
/// accepted head.
fn cuts(data: &[u8], verdict: &Parse) -> Vec<usize> {
    if data.len() <= 64 {
        return (0..data.len()).collect();
    }
    let mut cuts: Vec<usize> = (1..4).map(|q| data.len() * q / 4).collect();
    if let Parse::Complete(_, len) = verdict {
        cuts.extend([len - 1, *len]);
    }
    cuts
}

/// A prefix of `data` (an earlier read) may only wait for more bytes or
/// give the final verdict already: a refusal stays a refusal, a complete
/// head is the same head.
fn check_prefix(prefix: &[u8], full: &Parse) {
    match (parse(prefix), full) {
        (Parse::Partial, _) => {}
        (Parse::Error(_), Parse::Error(_)) => {}
        (Parse::Complete(a, alen), Parse::Complete(b, blen)) => {
            assert_eq!(alen, *blen);
            assert_eq!(format!("{a:?}"), format!("{b:?}"));
        }
        (early, _) => panic!(
            "the first {} bytes gave {early:?}, all of them {full:?}",
            prefix.len()
        ),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
