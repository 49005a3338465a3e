//! Property tests: every frame the [`ssed::Event`] encoder writes round-trips
//! through a parser that follows the WHATWG HTML "event stream
//! interpretation" algorithm
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>).
//!
//! The parser (in `support/event_stream.rs`, shared with the fuzz target
//! `event_roundtrip`) is written from the spec text, step by step, and is
//! checked here against the spec's own examples before it is trusted to
//! judge the encoder.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use ssed::{Event, EventError};

#[path = "support/event_stream.rs"]
mod event_stream;

use event_stream::{
    Dispatched, Parsed, Spec, events, id_is_valid, model, name_is_valid, parse, received,
};

// ---------------------------------------------------------------------------
// The parser against the spec's examples
// ---------------------------------------------------------------------------

#[test]
fn spec_example_stock_ticker() {
    assert_eq!(
        events(b"data: YHOO\ndata: +2\ndata: 10\n\n"),
        [Dispatched::new("message", "YHOO\n+2\n10", "")]
    );
    // "once followed by a blank line": without one nothing fires.
    assert_eq!(events(b"data: YHOO\ndata: +2\ndata: 10\n"), []);
}

#[test]
fn spec_example_four_blocks() {
    let stream = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n";
    let parsed = parse(stream);
    assert_eq!(
        parsed.events,
        [
            Dispatched::new("message", "first event", "1"),
            Dispatched::new("message", "second event", ""),
            Dispatched::new("message", " third event", ""),
        ]
    );
    assert_eq!(parsed.last_event_id, "");
}

#[test]
fn spec_example_empty_and_newline_data() {
    // "The first block fires events with the data set to the empty string
    // [...] The middle block fires an event with the data set to a single
    // newline character. The last block is discarded because it is not
    // followed by a blank line."
    assert_eq!(
        events(b"data\n\ndata\ndata\n\ndata:"),
        [
            Dispatched::new("message", "", ""),
            Dispatched::new("message", "\n", ""),
        ]
    );
    // "... as would the last block if it was followed by a blank line".
    assert_eq!(events(b"data:\n\n"), [Dispatched::new("message", "", "")]);
}

#[test]
fn spec_example_space_after_colon() {
    assert_eq!(
        events(b"data:test\n\ndata: test\n\n"),
        [
            Dispatched::new("message", "test", ""),
            Dispatched::new("message", "test", ""),
        ]
    );
}

#[test]
fn parser_line_endings_and_bom() {
    // CRLF, lone CR and lone LF all end a line; "\n\r\n" is two line ends.
    assert_eq!(
        events(b"data: a\r\ndata: b\rdata: c\n\r\n"),
        [Dispatched::new("message", "a\nb\nc", "")]
    );
    // One leading BOM is stripped, a second one is part of the field name.
    assert_eq!(
        events("\u{FEFF}data: x\n\n".as_bytes()),
        [Dispatched::new("message", "x", "")]
    );
    assert_eq!(events("\u{FEFF}\u{FEFF}data: x\n\n".as_bytes()), []);
    // A BOM elsewhere is data.
    assert_eq!(
        events("data: \u{FEFF}\n\n".as_bytes()),
        [Dispatched::new("message", "\u{FEFF}", "")]
    );
    // Invalid UTF-8 decodes to U+FFFD.
    assert_eq!(
        events(b"data: \xFF\n\n"),
        [Dispatched::new("message", "\u{FFFD}", "")]
    );
}

#[test]
fn parser_fields() {
    // The event type applies to one event, and an empty-data dispatch resets it.
    assert_eq!(
        events(b"event: a\ndata: 1\n\ndata: 2\n\nevent: b\n\ndata: 3\n\n"),
        [
            Dispatched::new("a", "1", ""),
            Dispatched::new("message", "2", ""),
            Dispatched::new("message", "3", ""),
        ]
    );
    // Only one leading space is removed; no colon means an empty value.
    assert_eq!(
        events(b"event:  sp\ndata\ndata:  x:y\n\n"),
        [Dispatched::new(" sp", "\n x:y", "")]
    );
    // An empty event name means "message".
    assert_eq!(
        events(b"event\ndata: x\n\n"),
        [Dispatched::new("message", "x", "")]
    );
    // Field names are case-sensitive; unknown fields are ignored.
    assert_eq!(events(b"Data: x\nDATA: y\nfoo: z\n\n"), []);
    // An id with NUL is ignored; an id persists across events and is set
    // even by a block that dispatches nothing.
    let parsed = parse(b"id: 1\n\nid: a\0b\ndata: z\n\nid: 2\n\n");
    assert_eq!(parsed.events, [Dispatched::new("message", "z", "1")]);
    assert_eq!(parsed.last_event_id, "2");
    // A terminated id line counts even without a blank line; an
    // unterminated one is never a line at all.
    assert_eq!(parse(b"id: 7\n").last_event_id, "7");
    assert_eq!(parse(b"id: 7").last_event_id, "");
    assert_eq!(events(b"data: x"), []);
    assert_eq!(events(b"data: x\n"), []);
}

#[test]
fn parser_retry() {
    assert_eq!(parse(b"retry: 1500\n").reconnection_time, Some(1500));
    assert_eq!(parse(b"retry:0\n\n").reconnection_time, Some(0));
    for bad in [
        &b"retry: 15x\n"[..],
        b"retry: -1\n",
        b"retry:  5\n",
        b"retry: 1.5\n",
        b"retry\n",
        b"retry: 5",
    ] {
        assert_eq!(parse(bad).reconnection_time, None, "{bad:?}");
    }
    // A later valid value wins, an invalid one leaves the last value.
    assert_eq!(
        parse(b"retry: 1\nretry: 2\nretry: x\n").reconnection_time,
        Some(2)
    );
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Picks from `specials` (each with weight 1), then lowercase ASCII (weight
/// `ascii`), then any char (weight `other`). One flat draw per char keeps the
/// strategy cheap in unoptimized test builds.
fn weighted_char(specials: &'static [char], ascii: u32, other: u32) -> impl Strategy<Value = char> {
    let n = u32::try_from(specials.len()).expect("few specials");
    (0..n + ascii + other, any::<char>()).prop_map(move |(k, c)| {
        if k < n {
            specials[k as usize]
        } else if k < n + ascii {
            char::from(b'a' + u8::try_from((k - n) % 26).expect("< 26"))
        } else {
            c
        }
    })
}

/// Characters biased toward what breaks SSE framing.
fn tricky_char() -> impl Strategy<Value = char> {
    const SPECIALS: &[char] = &[
        '\r', '\r', '\r', '\n', '\n', '\n', ' ', ' ', ':', ':', '\0', 'é', '😀', '\u{FEFF}',
        '\u{2028}',
    ];
    weighted_char(SPECIALS, 5, 4)
}

fn tricky_string(max_len: usize) -> impl Strategy<Value = String> {
    vec(tricky_char(), 0..max_len).prop_map(String::from_iter)
}

/// Characters for names and ids: line breaks and NUL are rarer, so that most
/// cases are valid and still a good share are refused.
fn label_char() -> impl Strategy<Value = char> {
    const SPECIALS: &[char] = &['\r', '\n', '\0', ' ', ' ', ':', ':', 'é', '😀'];
    weighted_char(SPECIALS, 40, 4)
}

fn label() -> impl Strategy<Value = String> {
    vec(label_char(), 0..8).prop_map(String::from_iter)
}

/// Ids that are always valid, for seeding a previous last event ID.
fn clean_id() -> impl Strategy<Value = String> {
    "[a-z0-9 :-]{0,8}"
}

/// Reconnection times: zero, sub-millisecond, whole and fractional ms.
fn retry_time() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        (0u64..1_000_000).prop_map(Duration::from_nanos),
        (1u64..1_000_000_000).prop_map(Duration::from_millis),
        (0u64..1_000_000_000_000_000).prop_map(Duration::from_nanos),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        proptest::option::weighted(0.3, tricky_string(16)),
        proptest::option::of(label()),
        proptest::option::of(label()),
        proptest::option::weighted(0.3, retry_time()),
        proptest::option::weighted(0.8, tricky_string(24)),
    )
        .prop_map(|(comment, name, id, retry, data)| Spec {
            comment,
            name,
            id,
            retry,
            data,
        })
}

fn encode_ok(e: &Event) -> Vec<u8> {
    e.encode().expect("the test only encodes valid events here")
}

/// A finite JSON number that survives a text round trip exactly without
/// serde_json's `float_roundtrip` feature: integers, and floats with a short
/// exact decimal form.
fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i32>().prop_map(|k| {
            let f = f64::from(k) / 16.0;
            Value::Number(Number::from_f64(f).expect("finite"))
        }),
    ]
}

fn json_map() -> impl Strategy<Value = Map<String, Value>> {
    let value = prop_oneof![tricky_string(16).prop_map(Value::String), json_number()];
    vec((tricky_string(12), value), 0..8).prop_map(|pairs| pairs.into_iter().collect())
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    // No failure persistence: an integration test has no lib.rs next to it
    // for proptest's regression files.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// One event: refused exactly when the name or id would break the frame;
    /// otherwise it parses back to what was set (data exactly, up to the
    /// CR/CRLF -> LF normalization no SSE stream can avoid).
    #[test]
    fn single_event_round_trips(
        data in proptest::option::weighted(0.85, tricky_string(32)),
        name in proptest::option::of(label()),
        id in proptest::option::of(label()),
        prev_id in clean_id(),
        prefix in vec(any::<u8>(), 0..4),
    ) {
        let spec = Spec { comment: None, name, id, retry: None, data };
        let event = spec.event();
        let name_ok = name_is_valid(spec.name.as_deref());
        let id_ok = id_is_valid(spec.id.as_deref());

        let mut out = prefix.clone();
        let appended = event.encode_into(&mut out);
        match event.encode() {
            Err(err) => {
                prop_assert!(!(name_ok && id_ok), "refused a valid event: {err:?}");
                prop_assert!(
                    (!name_ok && matches!(err, EventError::EventName))
                        || (!id_ok && matches!(err, EventError::Id)),
                    "wrong error {err:?} for {spec:?}"
                );
                prop_assert!(appended.is_err(), "encode_into accepted what encode refused");
                prop_assert_eq!(out, prefix, "encode_into appended on error");
            }
            Ok(frame) => {
                prop_assert!(name_ok && id_ok, "accepted an invalid event: {:?}", spec);
                prop_assert!(appended.is_ok(), "encode_into refused what encode accepted");
                prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
                prop_assert_eq!(&out[prefix.len()..], &frame[..]);

                // After a stream that set a previous id (hand-written, not encoded).
                let mut stream = format!("id: {prev_id}\n\n").into_bytes();
                stream.extend_from_slice(&frame);
                let parsed = parse(&stream);
                let last_id = spec.id.clone().unwrap_or(prev_id);
                let want: Vec<Dispatched> = spec
                    .data
                    .iter()
                    .map(|d| Dispatched {
                        event_type: spec.event_type(),
                        data: received(d),
                        last_event_id: last_id.clone(),
                    })
                    .collect();
                prop_assert_eq!(&parsed.events, &want, "frame {:?}", String::from_utf8_lossy(&frame));
                prop_assert_eq!(&parsed.last_event_id, &last_id);
                prop_assert_eq!(parsed.reconnection_time, None);

                // On its own (the stream's first bytes, where a BOM is stripped).
                let alone = parse(&frame);
                prop_assert_eq!(alone.events.len(), want.len());
                if let (Some(got), Some(data)) = (alone.events.first(), &spec.data) {
                    prop_assert_eq!(&got.data, &received(data));
                    prop_assert_eq!(&got.last_event_id, spec.id.as_deref().unwrap_or(""));
                }
            }
        }
    }

    /// A run of events (some refused, some with comments, retries, ids)
    /// written into one buffer parses back into the same sequence, with ids
    /// persisting per spec.
    #[test]
    fn event_sequences_round_trip(specs in vec(spec(), 0..8)) {
        let mut stream = Vec::new();
        let mut concatenated = Vec::new();
        for s in &specs {
            let before = stream.len();
            let res = s.event().encode_into(&mut stream);
            prop_assert_eq!(res.is_ok(), s.is_valid(), "{:?}", s);
            if s.is_valid() {
                concatenated.extend_from_slice(&encode_ok(&s.event()));
            } else {
                prop_assert_eq!(stream.len(), before, "appended on error");
            }
        }
        prop_assert_eq!(&stream, &concatenated);
        prop_assert_eq!(parse(&stream), model(&specs));
    }

    /// retry: whole milliseconds; zero and under 1 ms write no retry line.
    #[test]
    fn retry_round_trips(ms in 1u64..1_000_000_000, sub_ms_nanos in 0u64..1_000_000) {
        let frame = encode_ok(&Event::new().retry(Duration::from_millis(ms)));
        prop_assert_eq!(parse(&frame).reconnection_time, Some(ms));
        prop_assert!(parse(&frame).events.is_empty());

        // Fractions of a millisecond are dropped, not rounded up.
        let time = Duration::from_millis(ms) + Duration::from_nanos(sub_ms_nanos);
        prop_assert_eq!(parse(&encode_ok(&Event::new().retry(time))).reconnection_time, Some(ms));

        // Under one millisecond: no retry line at all.
        let short = Duration::from_nanos(sub_ms_nanos);
        prop_assert_eq!(encode_ok(&Event::new().retry(short)), b"\n".to_vec());
        prop_assert_eq!(
            encode_ok(&Event::new().retry(short).data("x")),
            encode_ok(&Event::new().data("x"))
        );
        let after = [encode_ok(&Event::new().retry(Duration::from_millis(ms))), encode_ok(&Event::new().retry(short))].concat();
        prop_assert_eq!(parse(&after).reconnection_time, Some(ms), "a zero retry must not reset it");
    }

    /// A comment never dispatches and never changes what follows.
    #[test]
    fn comments_are_invisible(comment in tricky_string(40), next in spec()) {
        let alone = encode_ok(&Event::new().comment(comment.as_str()));
        prop_assert_eq!(parse(&alone), Parsed::default());
        // Every line of the frame but the final blank one is a comment line.
        let text = String::from_utf8(alone.clone()).expect("frames are UTF-8");
        let body = text.strip_suffix('\n').expect("ends with a blank line");
        for line in body.split_terminator('\n') {
            prop_assert!(line.starts_with(':'), "not a comment line: {line:?}");
        }

        prop_assume!(next.is_valid());
        let plain = Spec { comment: None, ..next.clone() };
        let reference = parse(&encode_ok(&plain.event()));

        let before = [alone, encode_ok(&plain.event())].concat();
        prop_assert_eq!(&parse(&before), &reference);

        let inline = Spec { comment: Some(comment), ..plain };
        prop_assert_eq!(&parse(&encode_ok(&inline.event())), &reference);
    }

    /// json_data of a string/number map parses back to the same JSON value,
    /// on a single data line.
    #[test]
    fn json_data_round_trips(map in json_map(), strings in proptest::collection::btree_map(tricky_string(8), tricky_string(16), 0..6)) {
        let value = Value::Object(map);
        let frame = encode_ok(&Event::new().json_data(&value).expect("string keys serialize"));
        let got = events(&frame);
        prop_assert_eq!(got.len(), 1);
        let data = &got[0].data;
        prop_assert!(!data.contains(['\r', '\n']), "JSON spans lines: {data:?}");
        let back: Value = serde_json::from_str(data).expect("data is the JSON text");
        prop_assert_eq!(back, value);

        let frame = encode_ok(&Event::new().json_data(&strings).expect("string keys serialize"));
        let got = events(&frame);
        prop_assert_eq!(got.len(), 1);
        let back: BTreeMap<String, String> = serde_json::from_str(&got[0].data).expect("data is the JSON text");
        prop_assert_eq!(back, strings);
    }

    /// An empty id resets the last event ID to "" for later events too.
    #[test]
    fn empty_id_resets_last_event_id(prev in label(), a in tricky_string(8), b in tricky_string(8)) {
        prop_assume!(id_is_valid(Some(&prev)));
        let stream = [
            encode_ok(&Event::new().id(prev.as_str()).data(a.as_str())),
            encode_ok(&Event::new().id("").data(b.as_str())),
            encode_ok(&Event::new().data("after")),
        ]
        .concat();
        let parsed = parse(&stream);
        let ids: Vec<&str> = parsed.events.iter().map(|e| e.last_event_id.as_str()).collect();
        prop_assert_eq!(ids, [prev.as_str(), "", ""]);
        prop_assert_eq!(parsed.last_event_id, "");

        // An id-only frame (nothing dispatched) resets it as well.
        let stream = [
            encode_ok(&Event::new().id(prev.as_str())),
            encode_ok(&Event::new().id("")),
        ]
        .concat();
        let parsed = parse(&stream);
        prop_assert!(parsed.events.is_empty());
        prop_assert_eq!(parsed.last_event_id, "");
    }
}

#[test]
fn json_data_refuses_non_string_keys() {
    let mut map = BTreeMap::new();
    map.insert((1, 2), "v");
    match Event::new().json_data(&map) {
        Err(EventError::Json(_)) => {}
        other => panic!("expected a JSON error, got {other:?}"),
    }
}
