//! The wire format and the status codes, over real sockets: exact frame
//! bytes and chunk framing, stream headers, HTTP/1.0 streams, `Accept`
//! negotiation, every error answer the server gives, fragmented heads,
//! ordinary routes (params, bodies, `100 Continue`, keep-alive, pipelining,
//! `HEAD`), `Last-Event-ID` and per-channel counts.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use ssed::{Event, EventError, Response, StreamError};
use support::{Client, Head, connect, field, request, start};

/// The longest any test waits for the server to finish a response.
const DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Local helpers: raw bytes, strict chunk decoding
// ---------------------------------------------------------------------------

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until the server closes the connection, bounded by [`DEADLINE`].
fn read_to_eof(conn: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        assert!(
            Instant::now() < deadline,
            "connection not closed within {DEADLINE:?}; got {:?}",
            String::from_utf8_lossy(&out)
        );
        match conn.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "read failed ({e}) before EOF; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// Sends `raw` on a fresh connection and reads the whole answer to EOF.
fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut conn = connect(addr);
    conn.write_all(raw).expect("send request");
    read_to_eof(&mut conn)
}

/// Splits a raw response into its parsed head and the bytes after it.
fn split_head(raw: &[u8]) -> (Head, &[u8]) {
    let end = find(raw, b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(raw)));
    let text = std::str::from_utf8(&raw[..end]).expect("head is UTF-8");
    let mut lines = text.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().expect("version").to_owned();
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .map(|l| {
            l.split_once(':')
                .unwrap_or_else(|| panic!("bad header line {l:?}"))
        })
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let head = Head {
        version,
        status,
        headers,
    };
    (head, &raw[end + 4..])
}

/// Decodes a chunked body strictly: the payload of every chunk in order,
/// and whether it ended with the terminating chunk `0\r\n\r\n` (with
/// nothing after it). A body cut inside a chunk fails the test.
fn dechunk(mut body: &[u8]) -> (Vec<String>, bool) {
    let mut chunks = Vec::new();
    loop {
        if body.is_empty() {
            return (chunks, false);
        }
        let line_end = find(body, b"\r\n").unwrap_or_else(|| {
            panic!(
                "chunk size line not terminated: {:?}",
                String::from_utf8_lossy(body)
            )
        });
        let size_text = std::str::from_utf8(&body[..line_end]).expect("chunk size is ASCII");
        assert!(
            !size_text.is_empty() && size_text.bytes().all(|b| b.is_ascii_hexdigit()),
            "chunk size {size_text:?} is bare hex digits"
        );
        let size = usize::from_str_radix(size_text, 16).expect("chunk size is hex");
        let start = line_end + 2;
        if size == 0 {
            assert_eq!(
                &body[start..],
                b"\r\n",
                "the terminating chunk ends the body"
            );
            return (chunks, true);
        }
        assert!(
            body.len() >= start + size + 2,
            "chunk of {size} bytes cut short: {:?}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(
            &body[start + size..start + size + 2],
            b"\r\n",
            "CRLF after chunk data"
        );
        let data = String::from_utf8(body[start..start + size].to_vec()).expect("chunk is UTF-8");
        chunks.push(data);
        body = &body[start + size + 2..];
    }
}

/// `GET path` asking for an event stream, as raw bytes.
fn stream_request(path: &str, extra: &[&str]) -> Vec<u8> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n");
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// Asserts an error answer: its status, a plain-text body, and a closed
/// connection.
fn assert_error_answer(raw: &[u8], status: u16) {
    let (head, body) = split_head(raw);
    assert_eq!(
        head.status,
        status,
        "answer: {:?}",
        String::from_utf8_lossy(raw)
    );
    assert_eq!(head.version, "HTTP/1.1");
    let ct = head.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain"),
        "content type {ct:?} for {status}"
    );
    let len: usize = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("error answer has a Content-Length");
    assert_eq!(body.len(), len, "body is exactly Content-Length bytes");
    assert!(
        !body.trim_ascii().is_empty(),
        "error answer explains itself"
    );
    assert_eq!(head.header("connection"), Some("close"));
}

/// Checks `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
fn is_iso8601_utc(t: &str) -> bool {
    let b = t.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && t.ends_with('Z')
        && (b.len() == 20 || (b[19] == b'.' && digits(20..b.len() - 1)))
}

// ---------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------

#[test]
fn every_frame_kind_has_exact_bytes_one_chunk_each() {
    let server = start(ssed::Server::builder().route("/wire", |_req, stream| {
        stream.send("greet", &json!({"a": 1}))?;
        stream.send_event(
            &Event::new()
                .event("update")
                .id("7")
                .data("l1\r\nl2\rl3\nl4"),
        )?;
        stream.comment("hello")?;
        stream.retry(Duration::from_millis(1500))?;
        stream.retry(Duration::ZERO)?;
        stream.retry(Duration::from_micros(900))?;
        stream.ping()?;
        stream.done()
    }));
    let raw = exchange(server.local_addr(), &stream_request("/wire", &[]));
    let (head, body) = split_head(&raw);
    assert_eq!(head.version, "HTTP/1.1");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(head.header("cache-control"), Some("no-cache"));
    assert_eq!(head.header("x-accel-buffering"), Some("no"));
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    assert_eq!(head.header("content-length"), None);

    let (chunks, terminated) = dechunk(body);
    assert!(terminated, "done() ends the body with 0\\r\\n\\r\\n");
    assert_eq!(
        chunks.len(),
        6,
        "one chunk per frame, nothing for retry(0): {chunks:?}"
    );
    assert_eq!(chunks[0], "event: greet\ndata: {\"a\":1}\n\n");
    assert_eq!(
        chunks[1],
        "event: update\nid: 7\ndata: l1\ndata: l2\ndata: l3\ndata: l4\n\n"
    );
    assert_eq!(chunks[2], ": hello\n\n");
    assert_eq!(chunks[3], "retry: 1500\n\n");
    let ping = &chunks[4];
    let data = ping
        .strip_prefix("event: ping\ndata: ")
        .and_then(|rest| rest.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("ping frame {ping:?}"));
    let value: serde_json::Value = serde_json::from_str(data).expect("ping data is JSON");
    let time = value["time"]
        .as_str()
        .expect("ping data has a string \"time\"");
    assert!(is_iso8601_utc(time), "ping time {time:?} is ISO-8601 UTC");
    assert_eq!(chunks[5], "data: [DONE]\n\n");
    server.stop().expect("clean stop");
}

#[test]
fn http10_stream_is_close_delimited() {
    let server = start(ssed::Server::builder().route("/old", |_req, stream| {
        stream.send("a", &1)?;
        stream.comment("c")?;
        stream.done()
    }));
    let raw = exchange(
        server.local_addr(),
        b"GET /old HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n",
    );
    let (head, body) = split_head(&raw);
    assert_eq!(head.version, "HTTP/1.0");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(
        head.header("transfer-encoding"),
        None,
        "no chunking on HTTP/1.0"
    );
    assert_eq!(
        head.header("content-length"),
        None,
        "the body is close-delimited"
    );
    assert_eq!(
        std::str::from_utf8(body).expect("UTF-8 body"),
        "event: a\ndata: 1\n\n: c\n\ndata: [DONE]\n\n"
    );
    server.stop().expect("clean stop");
}

#[test]
fn invalid_event_name_or_id_is_refused_and_nothing_is_written() {
    let (tx, rx) = crossbeam_channel::unbounded::<(&'static str, String)>();
    let server = start(ssed::Server::builder().route("/bad", move |_req, stream| {
        let report = |what: &'static str, r: Result<(), StreamError>| {
            let got = match r {
                Err(StreamError::Event(EventError::EventName)) => "EventName".to_owned(),
                Err(StreamError::Event(EventError::Id)) => "Id".to_owned(),
                Err(StreamError::Event(EventError::Channel)) => "Channel".to_owned(),
                other => format!("{other:?}"),
            };
            tx.send((what, got)).expect("test is listening");
        };
        report(
            "name LF",
            stream.send_event(&Event::new().event("a\nb").data("x")),
        );
        report(
            "name CR",
            stream.send_event(&Event::new().event("a\rb").data("x")),
        );
        report(
            "id LF",
            stream.send_event(&Event::new().id("1\n2").data("x")),
        );
        report(
            "id CR",
            stream.send_event(&Event::new().id("1\r2").data("x")),
        );
        report(
            "id NUL",
            stream.send_event(&Event::new().id("1\u{0}2").data("x")),
        );
        report("empty channel", stream.send("", &1));
        // Still usable, and none of the refused events was counted.
        stream.send_event(&Event::new().id("ok").data("fine"))?;
        let counts = format!(
            "{} {} {}",
            stream.sent_count("message"),
            stream.sent_count("a\nb"),
            stream.sent_count("a\rb")
        );
        stream.send_event(&Event::new().data(counts))?;
        Ok(())
    }));
    let raw = exchange(server.local_addr(), &stream_request("/bad", &[]));
    let (head, body) = split_head(&raw);
    assert_eq!(head.status, 200);
    let (chunks, terminated) = dechunk(body);
    assert!(terminated, "the handler returned Ok: clean end");
    assert_eq!(chunks, ["id: ok\ndata: fine\n\n", "data: 1 0 0\n\n"]);
    let reports: Vec<_> = rx.try_iter().collect();
    assert_eq!(
        reports,
        [
            ("name LF", "EventName".to_owned()),
            ("name CR", "EventName".to_owned()),
            ("id LF", "Id".to_owned()),
            ("id CR", "Id".to_owned()),
            ("id NUL", "Id".to_owned()),
            ("empty channel", "Channel".to_owned()),
        ]
    );
    server.stop().expect("clean stop");
}

/// `EventError::Channel` is documented as "a channel name passed to a
/// named send is empty or contains a line break".
#[test]
fn send_with_a_line_break_in_the_channel_is_a_channel_error() {
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    let server = start(ssed::Server::builder().route("/chan", move |_req, stream| {
        let r = stream.send("a\nb", &1);
        let got = match r {
            Err(StreamError::Event(EventError::Channel)) => "Channel".to_owned(),
            other => format!("{other:?}"),
        };
        tx.send(got).expect("test is listening");
        stream.send("ok", &1)
    }));
    let raw = exchange(server.local_addr(), &stream_request("/chan", &[]));
    let (_, body) = split_head(&raw);
    let (chunks, _) = dechunk(body);
    assert_eq!(
        chunks,
        ["event: ok\ndata: 1\n\n"],
        "nothing broken was written"
    );
    let got = rx.recv_timeout(DEADLINE).expect("handler reported");
    assert_eq!(got, "Channel");
    server.stop().expect("clean stop");
}

#[test]
fn send_encoded_writes_one_chunk_per_frame() {
    let server = start(ssed::Server::builder().route("/enc", |_req, stream| {
        let a = Event::new().event("a").data("1").encode_shared()?;
        let b = Event::new().id("2").data("two\nlines").encode_shared()?;
        stream.send_encoded(&[a, b])
    }));
    let raw = exchange(server.local_addr(), &stream_request("/enc", &[]));
    let (head, body) = split_head(&raw);
    assert_eq!(head.status, 200);
    assert_eq!(
        dechunk(body),
        (
            vec![
                "event: a\ndata: 1\n\n".to_owned(),
                "id: 2\ndata: two\ndata: lines\n\n".to_owned()
            ],
            true
        )
    );
    server.stop().expect("clean stop");
}

#[test]
fn headers_go_out_with_the_stream_head_and_not_after() {
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    let server = start(ssed::Server::builder().route("/hdr", move |_req, stream| {
        stream.header("Set-Cookie", "session=abc; HttpOnly")?;
        stream.header("X-Split", "a\r\nInjected: 1")?;
        let before = stream.is_open();
        stream.open()?;
        let after = stream.is_open();
        let late = stream.header("X-Late", "1");
        let respond = stream.respond(Response::text(401, "too late"));
        tx.send(format!("{before} {after} {late:?} {respond:?}"))
            .expect("test is listening");
        stream.send("x", &1)
    }));
    let raw = exchange(server.local_addr(), &stream_request("/hdr", &[]));
    let (head, body) = split_head(&raw);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("set-cookie"), Some("session=abc; HttpOnly"));
    assert_eq!(
        head.header("x-split"),
        Some("a  Injected: 1"),
        "no header injection"
    );
    assert_eq!(head.header("injected"), None);
    assert_eq!(head.header("x-late"), None);
    assert_eq!(
        dechunk(body),
        (vec!["event: x\ndata: 1\n\n".to_owned()], true)
    );
    assert_eq!(
        rx.recv_timeout(DEADLINE).expect("handler reported"),
        "false true Err(AlreadyOpen) Err(AlreadyOpen)"
    );
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// Stream status codes: 406, 204, respond()
// ---------------------------------------------------------------------------

#[test]
fn accept_negotiation_406_or_200() {
    let server = start(ssed::Server::builder().route("/s", |_req, stream| stream.send("x", &1)));
    let addr = server.local_addr();
    let ask = |accept: Option<&str>| {
        let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
        exchange(
            addr,
            format!("GET /s HTTP/1.1\r\nHost: t\r\n{accept}\r\n").as_bytes(),
        )
    };
    for refused in [
        "application/json",
        "text/event-stream;q=0",
        "text/html, application/*",
    ] {
        assert_error_answer(&ask(Some(refused)), 406);
    }
    for accepted in [
        Some("*/*"),
        Some("text/*"),
        None,
        Some("application/json, text/event-stream;q=0.5"),
    ] {
        let raw = ask(accepted);
        let (head, body) = split_head(&raw);
        assert_eq!(head.status, 200, "Accept {accepted:?}");
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        let (chunks, terminated) = dechunk(body);
        assert_eq!(chunks, ["event: x\ndata: 1\n\n"], "Accept {accepted:?}");
        assert!(terminated);
    }
    server.stop().expect("clean stop");
}

#[test]
fn no_content_answers_204_without_body_and_closes() {
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    let server = start(ssed::Server::builder().route("/stop", move |_req, stream| {
        stream.no_content()?;
        // After a non-streaming answer the stream is finished.
        let after = stream.send("x", &1);
        tx.send(format!("{after:?}")).expect("test is listening");
        Ok(())
    }));
    let raw = exchange(server.local_addr(), &stream_request("/stop", &[]));
    let (head, body) = split_head(&raw);
    assert!(
        raw.starts_with(b"HTTP/1.1 204 No Content\r\n"),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(head.status, 204);
    assert!(body.is_empty(), "204 has no body: {body:?}");
    assert_eq!(head.header("content-length"), None);
    assert_eq!(head.header("transfer-encoding"), None);
    assert_eq!(head.header("connection"), Some("close"));
    assert_eq!(
        rx.recv_timeout(DEADLINE).expect("handler reported"),
        "Err(Finished)"
    );
    server.stop().expect("clean stop");
}

#[test]
fn respond_answers_401_before_streaming() {
    let server = start(ssed::Server::builder().route("/private", |req, stream| {
        if req.header("authorization") != Some("Bearer good") {
            return stream.respond(
                Response::text(401, "missing or wrong token")
                    .with_header("WWW-Authenticate", "Bearer"),
            );
        }
        stream.send("secret", &42)
    }));
    let addr = server.local_addr();
    let raw = exchange(addr, &stream_request("/private", &[]));
    assert_error_answer(&raw, 401);
    let (head, body) = split_head(&raw);
    assert_eq!(head.header("www-authenticate"), Some("Bearer"));
    assert_eq!(body, b"missing or wrong token\n");

    let raw = exchange(
        addr,
        &stream_request("/private", &["Authorization: Bearer good"]),
    );
    let (head, body) = split_head(&raw);
    assert_eq!(head.status, 200);
    assert_eq!(
        dechunk(body),
        (vec!["event: secret\ndata: 42\n\n".to_owned()], true)
    );
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// Error answers of the acceptor and the body reader
// ---------------------------------------------------------------------------

#[test]
fn unknown_path_is_404() {
    let server = start(ssed::Server::builder().route("/s", |_req, stream| stream.send("x", &1)));
    let raw = exchange(server.local_addr(), &stream_request("/nope", &[]));
    assert_error_answer(&raw, 404);
    let raw = exchange(server.local_addr(), &stream_request("/s/extra", &[]));
    assert_error_answer(&raw, 404);
    server.stop().expect("clean stop");
}

#[test]
fn wrong_method_is_405_with_allow() {
    let server = start(
        ssed::Server::builder()
            .route("/s", |_req, stream| stream.send("x", &1))
            .get("/g", |_req| Response::text(200, "g"))
            .post("/p", |_req| Response::text(200, "p")),
    );
    let addr = server.local_addr();
    let raw = exchange(
        addr,
        b"POST /s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_error_answer(&raw, 405);
    assert_eq!(split_head(&raw).0.header("allow"), Some("GET"));

    let raw = exchange(addr, b"DELETE /g HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_error_answer(&raw, 405);
    assert_eq!(split_head(&raw).0.header("allow"), Some("GET, HEAD"));

    let raw = exchange(addr, b"GET /p HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_error_answer(&raw, 405);
    assert_eq!(split_head(&raw).0.header("allow"), Some("POST"));
    server.stop().expect("clean stop");
}

#[test]
fn oversized_head_and_too_many_headers_are_431() {
    let stats = ssed::Stats::new();
    let server = start(
        ssed::Server::builder()
            .stats(stats.clone())
            .route("/s", |_req, stream| stream.send("x", &1)),
    );
    let addr = server.local_addr();

    let big = format!(
        "GET /s HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    assert_error_answer(&exchange(addr, big.as_bytes()), 431);

    let mut many = String::from("GET /s HTTP/1.1\r\nHost: t\r\n");
    for i in 0..64 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_error_answer(&exchange(addr, many.as_bytes()), 431);

    // 64 header lines in all is still fine.
    let mut ok = String::from("GET /s HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n");
    for i in 0..62 {
        ok.push_str(&format!("X-H{i}: v\r\n"));
    }
    ok.push_str("\r\n");
    let raw = exchange(addr, ok.as_bytes());
    assert_eq!(split_head(&raw).0.status, 200);
    assert_eq!(stats.snapshot().bad_requests, 2);
    server.stop().expect("clean stop");
}

#[test]
fn malformed_heads_are_400_http2_is_505_unknown_coding_is_501() {
    let server = start(
        ssed::Server::builder()
            .route("/s", |_req, stream| stream.send("x", &1))
            .post("/p", |_req| Response::text(200, "p")),
    );
    let addr = server.local_addr();
    let cases: &[(&[u8], u16)] = &[
        (b"G\x01T /s HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"GET s HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (
            b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
        ),
        (b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 2, 3\r\n\r\nabc", 400),
        (
            b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET /s HTTP/2.0\r\n\r\n", 505),
    ];
    for (raw, status) in cases {
        assert_error_answer(&exchange(addr, raw), *status);
    }
    server.stop().expect("clean stop");
}

#[test]
fn body_over_max_body_is_413_by_length_and_chunked() {
    let server = start(ssed::Server::builder().max_body(16).post("/p", |req| {
        Response::text(200, format!("{} bytes", req.body().len()))
    }));
    let addr = server.local_addr();
    // Announced too large: refused from the head.
    let raw = exchange(
        addr,
        b"POST /p HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 17\r\n\r\n01234567890123456",
    );
    assert_error_answer(&raw, 413);
    // Chunked: refused once the chunks add up past the limit.
    let raw = exchange(
        addr,
        b"POST /p HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n9\r\n012345678\r\n0\r\n\r\n",
    );
    assert_error_answer(&raw, 413);
    // At the limit exactly: accepted, both ways.
    let (head, body) = request(
        addr,
        "POST /p HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 16\r\nConnection: close\r\n\r\n0123456789012345",
    );
    assert_eq!((head.status, body.as_str()), (200, "16 bytes\n"));
    let (head, body) = request(
        addr,
        "POST /p HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n8\r\n01234567\r\n8\r\n01234567\r\n0\r\n\r\n",
    );
    assert_eq!((head.status, body.as_str()), (200, "16 bytes\n"));
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// Fragmented requests
// ---------------------------------------------------------------------------

#[test]
fn head_sent_one_byte_at_a_time_is_served() {
    let server = start(ssed::Server::builder().route("/slow", |req, stream| {
        stream.send("hi", &req.header("x-who").unwrap_or("nobody"))
    }));
    let mut conn = connect(server.local_addr());
    let raw = stream_request("/slow", &["X-Who: trickler"]);
    let pause = Duration::from_millis(600) / raw.len() as u32;
    for byte in &raw {
        conn.write_all(std::slice::from_ref(byte))
            .expect("send one byte");
        std::thread::sleep(pause);
    }
    let answer = read_to_eof(&mut conn);
    let (head, body) = split_head(&answer);
    assert_eq!(head.status, 200);
    assert_eq!(
        dechunk(body),
        (vec!["event: hi\ndata: \"trickler\"\n\n".to_owned()], true)
    );
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// Ordinary routes
// ---------------------------------------------------------------------------

fn echo_server() -> ssed::RunningServer {
    start(
        ssed::Server::builder()
            .get("/users/{id}/posts/{post}", |req| {
                Response::json(
                    200,
                    &json!({"id": req.param("id"), "post": req.param("post"), "nope": req.param("nope")}),
                )
            })
            .get("/q", |req| {
                Response::json(
                    200,
                    &json!({
                        "tag": req.query_all("tag").collect::<Vec<_>>(),
                        "x": req.query("x"),
                        "first": req.query("tag"),
                        "missing": req.query("missing"),
                    }),
                )
            })
            .get("/hello", |req| Response::text(200, format!("hello {}", req.path())))
            .post("/echo", |req| {
                Response::text(200, req.body_str().unwrap_or("(not utf-8)").to_owned())
            }),
    )
}

#[test]
fn path_params_and_query_params_are_decoded() {
    let server = echo_server();
    let addr = server.local_addr();
    let (head, body) = request(
        addr,
        "GET /users/a%2Fb%20c/posts/7 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v, json!({"id": "a/b c", "post": "7", "nope": null}));

    let (head, body) = request(
        addr,
        "GET /q?tag=a%20b&x=%E2%9C%93&tag=c+d&tag= HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(
        v,
        json!({"tag": ["a b", "c d", ""], "x": "\u{2713}", "first": "a b", "missing": null})
    );
    server.stop().expect("clean stop");
}

#[test]
fn request_body_by_content_length_and_chunked() {
    let server = echo_server();
    let addr = server.local_addr();
    let (head, body) = request(
        addr,
        "POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world",
    );
    assert_eq!((head.status, body.as_str()), (200, "hello world\n"));
    let (head, body) = request(
        addr,
        "POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n1;ext=1\r\n \r\nA\r\nchunked!!!\r\n0\r\nX-Trailer: t\r\n\r\n",
    );
    assert_eq!((head.status, body.as_str()), (200, "hello chunked!!!\n"));
    server.stop().expect("clean stop");
}

/// Issue 6 (found by the `publish_query` fuzz target): a chunk size is hex
/// digits, then optional SP/HTAB before an extension. A `+` sign, a form
/// feed or a leading space used to pass (`from_str_radix` and `trim`), so a
/// proxy in front could frame the body differently from ssed.
#[test]
fn issue6_chunk_size_is_bare_hex_digits() {
    let server = echo_server();
    let addr = server.local_addr();
    let chunked = "POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    for size in ["2\x0c", "+2", " 2", "\t2", "2\x0b", "0x2", "2\r"] {
        let raw = format!("{chunked}{size}\r\nab\r\n0\r\n\r\n");
        let answer = exchange(addr, raw.as_bytes());
        assert_error_answer(&answer, 400);
        assert!(
            String::from_utf8_lossy(&answer).contains("bad chunk size"),
            "{size:?}"
        );
    }
    // Whitespace before an extension, upper-case hex: still a chunk.
    let (head, body) = request(
        addr,
        "POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         2 \t;ext\r\nab\r\nC\r\n0123456789ab\r\n0\r\n\r\n",
    );
    assert_eq!((head.status, body.as_str()), (200, "ab0123456789ab\n"));
    server.stop().expect("clean stop");
}

#[test]
fn expect_100_continue_gets_continue_before_the_answer() {
    let server = echo_server();
    let mut c = Client::new(server.local_addr());
    c.send(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    let interim = c.head();
    assert_eq!(
        (interim.version.as_str(), interim.status),
        ("HTTP/1.1", 100)
    );
    assert!(
        interim.headers.is_empty(),
        "100 Continue has no headers: {interim:?}"
    );
    c.send(b"howdy");
    let (head, body) = c.response();
    assert_eq!((head.status, body.as_str()), (200, "howdy\n"));
    server.stop().expect("clean stop");
}

#[test]
fn keep_alive_serves_two_requests_on_one_connection() {
    let server = echo_server();
    let mut c = Client::new(server.local_addr());
    c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n");
    let (head, body) = c.response();
    assert_eq!((head.status, body.as_str()), (200, "hello /hello\n"));
    assert_eq!(
        head.header("connection"),
        None,
        "HTTP/1.1 keeps the connection by default"
    );
    c.send(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc");
    let (head, body) = c.response();
    assert_eq!((head.status, body.as_str()), (200, "abc\n"));
    assert!(
        !c.closed_within(Duration::from_millis(100)),
        "still open after two requests"
    );
    server.stop().expect("clean stop");
}

#[test]
fn keep_alive_connection_can_then_open_a_stream() {
    let server = start(
        ssed::Server::builder()
            .get("/hello", |_req| Response::text(200, "hello"))
            .route("/s", |_req, stream| stream.send("x", &1)),
    );
    let mut c = Client::new(server.local_addr());
    c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n");
    let (head, body) = c.response();
    assert_eq!((head.status, body.as_str()), (200, "hello\n"));
    let head = c.get_stream("/s", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(c.until_end(5), ["event: x\ndata: 1\n\n"]);
    server.stop().expect("clean stop");
}

#[test]
fn http10_keep_alive_is_honoured() {
    let server = start(ssed::Server::builder().get("/hello", |_req| Response::text(200, "hello")));
    let mut c = Client::new(server.local_addr());
    for _ in 0..2 {
        c.send(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let (head, body) = c.response();
        assert_eq!(
            (head.version.as_str(), head.status, body.as_str()),
            ("HTTP/1.0", 200, "hello\n")
        );
        assert_eq!(head.header("connection"), Some("keep-alive"));
    }
    server.stop().expect("clean stop");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = echo_server();
    let mut c = Client::new(server.local_addr());
    c.send(
        b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nfirstGET /hello HTTP/1.1\r\nHost: t\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nchunk\r\n0\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nthird",
    );
    let (head, body) = c.response();
    assert_eq!((head.status, body.as_str()), (200, "first\n"));
    let (head, body) = c.response();
    assert_eq!((head.status, body.as_str()), (200, "hello /hello\n"));
    let (head, body) = c.response();
    assert_eq!((head.status, body.as_str()), (200, "chunk\n"));
    let (head, body) = c.response();
    assert_eq!((head.status, body.as_str()), (200, "third\n"));
    assert!(
        c.closed_within(Duration::from_secs(2)),
        "closed after Connection: close"
    );
    server.stop().expect("clean stop");
}

#[test]
fn connection_close_closes_after_the_response() {
    let server = echo_server();
    let mut c = Client::new(server.local_addr());
    c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let (head, body) = c.response();
    assert_eq!((head.status, body.as_str()), (200, "hello /hello\n"));
    assert_eq!(head.header("connection"), Some("close"));
    assert!(
        c.closed_within(Duration::from_secs(2)),
        "server closes after the response"
    );

    // HTTP/1.0 without keep-alive closes too.
    let mut c = Client::new(server.local_addr());
    c.send(b"GET /hello HTTP/1.0\r\n\r\n");
    let (head, body) = c.response();
    assert_eq!(
        (head.version.as_str(), head.status, body.as_str()),
        ("HTTP/1.0", 200, "hello /hello\n")
    );
    assert!(
        c.closed_within(Duration::from_secs(2)),
        "HTTP/1.0 closes by default"
    );
    server.stop().expect("clean stop");
}

#[test]
fn head_on_a_get_route_has_content_length_but_no_body() {
    let server = echo_server();
    let raw = exchange(
        server.local_addr(),
        b"HEAD /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let (head, body) = split_head(&raw);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some("13"),
        "length of \"hello /hello\\n\""
    );
    assert_eq!(
        head.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(
        body.is_empty(),
        "HEAD has no body: {:?}",
        String::from_utf8_lossy(body)
    );
    server.stop().expect("clean stop");
}

// ---------------------------------------------------------------------------
// Stream state seen by the handler
// ---------------------------------------------------------------------------

#[test]
fn last_event_id_from_header_or_query_header_wins() {
    let server = start(ssed::Server::builder().route("/resume", |req, stream| {
        let from_stream = stream.last_event_id().unwrap_or("none").to_owned();
        let from_req = req.last_event_id().unwrap_or("none").to_owned();
        stream.send("id", &[from_stream, from_req])
    }));
    let addr = server.local_addr();
    let cases: &[(&str, &[&str], &str)] = &[
        ("/resume", &["Last-Event-ID: 41"], "41"),
        ("/resume?lastEventId=17", &[], "17"),
        ("/resume?lastEventId=17", &["Last-Event-ID: 41"], "41"),
        ("/resume?lastEventId=a%20b", &[], "a b"),
        ("/resume", &[], "none"),
    ];
    for (path, extra, want) in cases {
        let raw = exchange(addr, &stream_request(path, extra));
        let (head, body) = split_head(&raw);
        assert_eq!(head.status, 200);
        let (chunks, _) = dechunk(body);
        assert_eq!(chunks.len(), 1, "{path} {extra:?}");
        let data = field(&chunks[0], "data");
        assert_eq!(
            data,
            [format!("[\"{want}\",\"{want}\"]")],
            "{path} {extra:?}"
        );
    }
    server.stop().expect("clean stop");
}

#[test]
fn per_channel_counts_follow_sends_and_resets() {
    let server = start(ssed::Server::builder().route("/counts", |_req, stream| {
        stream.send("a", &1)?;
        stream.send("a", &2)?;
        stream.send("b", &3)?;
        stream.send_event(&Event::new().data("plain"))?;
        stream.ping()?;
        stream.comment("not counted")?;
        let counts = json!({
            "a": stream.sent_count("a"),
            "b": stream.sent_count("b"),
            "message": stream.sent_count("message"),
            "ping": stream.sent_count("ping"),
            "z": stream.sent_count("z"),
            "has_a": stream.has_sent("a"),
            "has_z": stream.has_sent("z"),
        });
        stream.send("counts", &counts)?;
        stream.reset_count("a");
        let after_one = json!({
            "a": stream.sent_count("a"),
            "has_a": stream.has_sent("a"),
            "b": stream.sent_count("b"),
            "counts": stream.sent_count("counts"),
        });
        stream.send("after_one", &after_one)?;
        stream.reset_counts();
        let after_all = json!({
            "b": stream.sent_count("b"),
            "after_one": stream.sent_count("after_one"),
        });
        stream.send("after_all", &after_all)?;
        let last = stream.sent_count("after_all");
        stream.send("last", &last)
    }));
    let mut c = Client::new(server.local_addr());
    let head = c.get_stream("/counts", &[]);
    assert_eq!(head.status, 200);
    let frames = c.until_end(20);
    let data_of = |name: &str| -> serde_json::Value {
        let frame = frames
            .iter()
            .find(|f| field(f, "event") == [name])
            .unwrap_or_else(|| panic!("no {name} frame in {frames:?}"));
        serde_json::from_str(field(frame, "data")[0]).expect("JSON data")
    };
    assert_eq!(
        data_of("counts"),
        json!({"a": 2, "b": 1, "message": 1, "ping": 1, "z": 0, "has_a": true, "has_z": false})
    );
    assert_eq!(
        data_of("after_one"),
        json!({"a": 0, "has_a": false, "b": 1, "counts": 1})
    );
    assert_eq!(data_of("after_all"), json!({"b": 0, "after_one": 0}));
    assert_eq!(data_of("last"), json!(1));
    server.stop().expect("clean stop");
}

/// A stream route with a `{param}` sees it decoded, like an ordinary one.
#[test]
fn stream_route_params_are_decoded() {
    let server = start(
        ssed::Server::builder().route("/events/{topic}", |req, stream| {
            stream.send("topic", &req.param("topic"))
        }),
    );
    let raw = exchange(server.local_addr(), &stream_request("/events/a%3Ab", &[]));
    let (head, body) = split_head(&raw);
    assert_eq!(head.status, 200);
    assert_eq!(
        dechunk(body),
        (vec!["event: topic\ndata: \"a:b\"\n\n".to_owned()], true)
    );
    server.stop().expect("clean stop");
}
