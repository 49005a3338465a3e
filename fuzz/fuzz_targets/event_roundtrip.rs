//! The event encoder, round-tripped through the WHATWG event-stream parser
//! of the tests (`tests/support/event_stream.rs`).
//!
//! The input is a run of events, one per `0xFE`-separated part; each part
//! is `0xFF`-separated fields whose first byte names the field and whose
//! rest is its value (lossy UTF-8, so any text): `c` comment, `e` event
//! name, `i` id, `d` data, `r` retry (`<n>ns`, `<n>ms`, `<n>s`, or `<n>`
//! milliseconds). `0xFE` and `0xFF` never occur in UTF-8, so values
//! can hold anything, line breaks and NUL included.
//!
//! Checks, per event: the builder refuses exactly the names and ids that
//! would break the frame, with the right error, and then writes nothing;
//! a frame it accepts is UTF-8 with no CR, ends with its only blank line,
//! and parses back to the same event type, data (line breaks as LF), id and
//! retry; the data sent as JSON (`json_data`) is one data line holding its
//! JSON text. Over the run: the frames written into one buffer parse back
//! to what a conforming client sees for the same events.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ssed::{Event, EventError};

#[path = "../../tests/support/event_stream.rs"]
#[allow(dead_code)]
mod event_stream;

use event_stream::{Spec, id_is_valid, model, name_is_valid, parse};

fuzz_target!(|data: &[u8]| {
    let specs: Vec<Spec> = data.split(|&b| b == 0xFE).map(spec).collect();
    let mut stream = Vec::new();
    for s in &specs {
        check_event(s);
        let before = stream.len();
        if s.event().encode_into(&mut stream).is_err() {
            assert_eq!(stream.len(), before, "appended on error");
        }
    }
    assert_eq!(parse(&stream), model(&specs), "stream {stream:?}");
    // The parser itself takes any bytes.
    let _ = parse(data);
});

fn spec(part: &[u8]) -> Spec {
    let mut s = Spec {
        comment: None,
        name: None,
        id: None,
        retry: None,
        data: None,
    };
    for field in part.split(|&b| b == 0xFF) {
        let Some((&key, value)) = field.split_first() else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match key {
            b'c' => s.comment = Some(value),
            b'e' => s.name = Some(value),
            b'i' => s.id = Some(value),
            b'd' => s.data = Some(value),
            b'r' => s.retry = retry(&value).or(s.retry),
            _ => {}
        }
    }
    s
}

fn retry(value: &str) -> Option<Duration> {
    let digits = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let n: u64 = value[..digits].parse().ok()?;
    match &value[digits..] {
        "ns" => Some(Duration::from_nanos(n)),
        "" | "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        _ => None,
    }
}

fn check_event(s: &Spec) {
    let event = s.event();
    let name_ok = name_is_valid(s.name.as_deref());
    let id_ok = id_is_valid(s.id.as_deref());
    let mut out = b"before".to_vec();
    let appended = event.encode_into(&mut out);
    match event.encode() {
        Err(e) => {
            match e {
                EventError::EventName => assert!(!name_ok, "refused name {:?}", s.name),
                EventError::Id => assert!(name_ok && !id_ok, "refused id {:?}", s.id),
                other => panic!("unexpected {other:?} for {s:?}"),
            }
            assert!(event.validate().is_err() && event.encode_shared().is_err());
            assert!(appended.is_err());
            assert_eq!(out, b"before", "appended on error");
        }
        Ok(frame) => {
            assert!(name_ok && id_ok, "accepted {s:?}");
            assert!(appended.is_ok() && event.validate().is_ok());
            assert_eq!(&out[6..], &frame[..]);
            let shared = event.encode_shared().expect("encode accepted it");
            assert_eq!(shared.as_bytes(), &frame[..]);
            check_frame(s, &frame);
        }
    }
    if let Some(data) = &s.data {
        let frame = Event::new()
            .json_data(data)
            .and_then(|e| e.encode())
            .expect("a string serializes");
        let got = parse(&frame).events;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, serde_json::to_string(data).expect("a string"));
    }
}

fn check_frame(s: &Spec, frame: &[u8]) {
    let text = std::str::from_utf8(frame).expect("frames are UTF-8");
    assert!(!text.contains('\r'), "CR in {text:?}");
    let body = text.strip_suffix('\n').expect("a frame ends with LF");
    let lines: Vec<&str> = body.split('\n').collect();
    let (last, rest) = lines.split_last().expect("split yields a line");
    assert!(last.is_empty(), "no blank line ends {text:?}");
    assert!(
        rest.iter().all(|l| !l.is_empty()),
        "early blank line in {text:?}"
    );
    // Alone, the frame is what a client sees for this one event.
    assert_eq!(
        parse(frame),
        model(std::slice::from_ref(s)),
        "frame {text:?}"
    );
}
