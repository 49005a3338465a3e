//! The Redis client's RESP2 reply reader on arbitrary bytes, as a broken or
//! hostile server might send them.
//!
//! The input is read as a connection reads pipelined replies: one reply
//! after another until the bytes end or one is refused (an error reply
//! leaves the connection in step, so reading goes on after it).
//!
//! Checks: it never panics; every reply it returns is exactly the bytes it
//! consumed, re-encoded by the encoder here (a null written either `$-1` or
//! `*-1`: both read as `Nil`), and within the bounds (`MAX_DEPTH` arrays
//! around any value, `MAX_ARRAY` elements, `MAX_BULK` bytes, lines under
//! `MAX_LINE`); and the verdict does not depend on how the bytes arrive:
//! read through a buffer of a few bytes it is the same, and a prefix of the
//! first reply only needs more bytes, or already gives the same verdict.
#![no_main]

use std::io::BufReader;

use libfuzzer_sys::fuzz_target;
use ssed::fuzzing::{
    MAX_ARRAY, MAX_BULK, MAX_DEPTH, MAX_LINE, Malformed, RespError, Value, read_reply,
};

fuzz_target!(|data: &[u8]| {
    let (first, used) = read(data);
    // A buffer smaller than most lines: every line and bulk string is
    // split across reads, as on a socket.
    let cap = 1 + data.len() % 8;
    assert_eq!(
        read_buffered(data, cap),
        (first.clone(), used),
        "buffer of {cap}"
    );
    for cut in cuts(data, used) {
        let (early, early_used) = read(&data[..cut]);
        match &first {
            Verdict::Value(_) | Verdict::Server(_) if cut < used => {
                assert_eq!(early, Verdict::NeedMore, "the first {cut} of {used} bytes");
            }
            Verdict::Value(_) | Verdict::Server(_) => {
                assert_eq!((&early, early_used), (&first, used), "{cut} bytes");
            }
            _ => assert!(
                early == Verdict::NeedMore || early == first,
                "the first {cut} bytes gave {early:?}, all of them {first:?}"
            ),
        }
    }

    let mut rest = data;
    loop {
        let before = rest;
        let verdict = verdict(read_reply(&mut rest));
        let consumed = &before[..before.len() - rest.len()];
        match verdict {
            Verdict::Value(v) => {
                check_bounds(&v, 0);
                assert_eq!(
                    strip(&v, consumed),
                    Some(&[][..]),
                    "{v:?} is not {:?}",
                    consumed.escape_ascii().to_string()
                );
            }
            // Alone, the message is the line; inside an array, the first
            // error of the array, all of it read.
            Verdict::Server(m) => match consumed.split_first() {
                Some((b'-', line)) => {
                    let line = line.strip_suffix(b"\r\n").expect("a line ends in CRLF");
                    assert_eq!(m, String::from_utf8_lossy(line));
                }
                other => assert_eq!(other.map(|(&kind, _)| kind), Some(b'*')),
            },
            Verdict::Malformed(m) => {
                assert!(!m.to_string().is_empty());
                break;
            }
            Verdict::NeedMore => break,
        }
        if rest.is_empty() {
            break;
        }
    }
});

/// What the reader made of some bytes.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Value(Value),
    Server(String),
    Malformed(Malformed),
    /// The bytes ended before the reply did.
    NeedMore,
}

fn verdict(r: Result<Value, RespError>) -> Verdict {
    match r {
        Ok(v) => Verdict::Value(v),
        Err(RespError::Server(m)) => Verdict::Server(m),
        Err(RespError::Malformed(m)) => Verdict::Malformed(m),
        Err(RespError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Verdict::NeedMore,
        Err(e) => panic!("bytes in memory gave {e:?}"),
    }
}

/// The first reply of `data` and the bytes it took.
fn read(data: &[u8]) -> (Verdict, usize) {
    let mut rest = data;
    let v = verdict(read_reply(&mut rest));
    (v, data.len() - rest.len())
}

/// The same through a `BufReader` of `cap` bytes.
fn read_buffered(data: &[u8], cap: usize) -> (Verdict, usize) {
    let mut reader = BufReader::with_capacity(cap, data);
    let v = verdict(read_reply(&mut reader));
    let left = reader.get_ref().len() + reader.buffer().len();
    (v, data.len() - left)
}

/// Where to cut the input: every byte of a short one, else a few places
/// and either side of the first reply's end.
fn cuts(data: &[u8], used: usize) -> Vec<usize> {
    if data.len() <= 64 {
        return (0..data.len()).collect();
    }
    let mut cuts: Vec<usize> = (1..4).map(|q| data.len() * q / 4).collect();
    cuts.extend([used.saturating_sub(1), used]);
    cuts
}

/// RESP2 as Redis writes it; a null as a null bulk string.
fn encode(v: &Value, out: &mut Vec<u8>) {
    let line = |out: &mut Vec<u8>, kind: char, text: &str| {
        out.extend_from_slice(format!("{kind}{text}\r\n").as_bytes());
    };
    match v {
        Value::Nil => out.extend_from_slice(b"$-1\r\n"),
        Value::Int(n) => line(out, ':', &n.to_string()),
        Value::Status(s) => line(out, '+', s),
        Value::Bulk(b) => {
            line(out, '$', &b.len().to_string());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Value::Array(items) => {
            line(out, '*', &items.len().to_string());
            for item in items {
                encode(item, out);
            }
        }
    }
}

/// What follows `v`, written as RESP2, at the start of `bytes` (`None` if
/// `bytes` does not start with it). A null may be written either way.
fn strip<'a>(v: &Value, bytes: &'a [u8]) -> Option<&'a [u8]> {
    match v {
        Value::Nil => bytes
            .strip_prefix(b"$-1\r\n")
            .or_else(|| bytes.strip_prefix(b"*-1\r\n")),
        Value::Array(items) => {
            let header = format!("*{}\r\n", items.len());
            let mut rest = bytes.strip_prefix(header.as_bytes())?;
            for item in items {
                rest = strip(item, rest)?;
            }
            Some(rest)
        }
        scalar => {
            let mut out = Vec::new();
            encode(scalar, &mut out);
            bytes.strip_prefix(&out[..])
        }
    }
}

/// `v`, found inside `depth` arrays, keeps the reader's bounds.
fn check_bounds(v: &Value, depth: usize) {
    assert!(depth <= MAX_DEPTH, "a value inside {depth} arrays");
    match v {
        Value::Array(items) => {
            assert!(items.len() <= MAX_ARRAY);
            for item in items {
                check_bounds(item, depth + 1);
            }
        }
        Value::Bulk(b) => assert!(b.len() <= MAX_BULK),
        Value::Status(s) => assert!(s.len() + 3 <= MAX_LINE && !s.contains('\n')),
        _ => {}
    }
}
