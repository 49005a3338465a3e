//! A reference event-stream parser and a model of what it should make of
//! [`ssed::Event`] frames.
//!
//! The parser follows the WHATWG HTML "event stream interpretation"
//! algorithm
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>),
//! step by step. It is test code, not library code: `tests/event_props.rs`
//! checks it against the spec's own examples and then uses it to judge the
//! encoder, and the fuzz target `fuzz/fuzz_targets/event_roundtrip.rs` uses
//! it the same way; both include this file with `#[path]`.

use std::time::Duration;

use ssed::Event;

// ---------------------------------------------------------------------------
// The reference parser
// ---------------------------------------------------------------------------

/// One event a browser would dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    pub event_type: String,
    pub data: String,
    pub last_event_id: String,
}

impl Dispatched {
    pub fn new(event_type: &str, data: &str, last_event_id: &str) -> Self {
        Self {
            event_type: event_type.to_owned(),
            data: data.to_owned(),
            last_event_id: last_event_id.to_owned(),
        }
    }
}

/// What a whole stream leaves behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub events: Vec<Dispatched>,
    /// The event stream's reconnection time, if a `retry` field set it.
    pub reconnection_time: Option<u64>,
    /// The last event ID buffer at the end of the stream.
    pub last_event_id: String,
}

/// The per-stream state of the spec: the three buffers plus the results.
#[derive(Default)]
struct Interpreter {
    data: String,
    event_type: String,
    out: Parsed,
}

impl Interpreter {
    /// "Lines must be processed, in the order they are received, as follows".
    fn line(&mut self, line: &str) {
        if line.is_empty() {
            // "If the line is empty (a blank line): Dispatch the event".
            self.dispatch();
        } else if line.starts_with(':') {
            // "If the line starts with a U+003A COLON character (:): Ignore the line."
        } else if let Some((field, value)) = line.split_once(':') {
            // Field is everything before the first colon, value everything
            // after it, minus one leading U+0020 SPACE.
            let value = value.strip_prefix(' ').unwrap_or(value);
            self.field(field, value);
        } else {
            // No colon: the whole line is the field name, the value is empty.
            self.field(line, "");
        }
    }

    /// "The steps to process the field". Names compare literally.
    fn field(&mut self, name: &str, value: &str) {
        match name {
            "event" => value.clone_into(&mut self.event_type),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            // "If the field value does not contain U+0000 NULL, then set the
            // last event ID buffer to the field value. Otherwise, ignore the
            // field."
            "id" if !value.contains('\0') => value.clone_into(&mut self.out.last_event_id),
            // "If the field value consists of only ASCII digits", set the
            // reconnection time; otherwise ignore the field. An empty value
            // is ignored, as browsers do (the encoder never writes one).
            // Values beyond u64 saturate; the tests stay far below.
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.out.reconnection_time = Some(value.parse().unwrap_or(u64::MAX));
            }
            // Other fields, and refused id and retry values, are ignored.
            _ => {}
        }
    }

    /// "Dispatch the event", the web-browser steps in order.
    fn dispatch(&mut self) {
        // 1. The last event ID string becomes the last event ID buffer: the
        //    buffer is never reset, so it is read directly below.
        // 2. Empty data buffer: reset data and event type, dispatch nothing.
        if self.data.is_empty() {
            self.data.clear();
            self.event_type.clear();
            return;
        }
        // 3. Remove one trailing LF.
        if self.data.ends_with('\n') {
            self.data.pop();
        }
        // 5./6. Type "message" unless the event type buffer is non-empty.
        let event_type = if self.event_type.is_empty() {
            "message".to_owned()
        } else {
            std::mem::take(&mut self.event_type)
        };
        self.out.events.push(Dispatched {
            event_type,
            data: std::mem::take(&mut self.data),
            last_event_id: self.out.last_event_id.clone(),
        });
        // 7. Both buffers end up empty (taken above).
        self.event_type.clear();
    }
}

/// Interprets a complete byte stream.
pub fn parse(bytes: &[u8]) -> Parsed {
    // "UTF-8 decode": strip one leading BOM, replace invalid sequences with
    // U+FFFD (Rust's lossy decoding follows the same replacement practice).
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = String::from_utf8_lossy(bytes);

    let mut it = Interpreter::default();
    let mut rest: &str = &text;
    // A line ends with CRLF, a lone LF, or a lone CR.
    while let Some(i) = rest.find(['\r', '\n']) {
        let line = &rest[..i];
        let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
        rest = &rest[i + skip..];
        it.line(line);
    }
    // Whatever is left is an unterminated line: at the end of the stream
    // "any pending data must be discarded", and so is any incomplete event
    // still in the data and event type buffers.
    it.out
}

/// The events a whole byte stream dispatches.
pub fn events(bytes: &[u8]) -> Vec<Dispatched> {
    parse(bytes).events
}

// ---------------------------------------------------------------------------
// The model: what a conforming client sees for a run of events
// ---------------------------------------------------------------------------

/// Whether the encoder must accept this event name: no line break.
pub fn name_is_valid(name: Option<&str>) -> bool {
    name.is_none_or(|n| !n.contains(['\r', '\n']))
}

/// Whether the encoder must accept this id: no line break, no NUL.
pub fn id_is_valid(id: Option<&str>) -> bool {
    id.is_none_or(|i| !i.contains(['\r', '\n', '\0']))
}

/// Whole milliseconds the encoder should write, if any, saturating at
/// `u64::MAX` as [`parse`] does.
pub fn retry_ms(time: Duration) -> Option<u64> {
    let ms = u64::try_from(time.as_millis()).unwrap_or(u64::MAX);
    (ms > 0).then_some(ms)
}

/// Every field an event can have, so a model can predict the parse.
#[derive(Debug, Clone)]
pub struct Spec {
    pub comment: Option<String>,
    pub name: Option<String>,
    pub id: Option<String>,
    pub retry: Option<Duration>,
    pub data: Option<String>,
}

impl Spec {
    pub fn event(&self) -> Event {
        let mut e = Event::new();
        if let Some(c) = &self.comment {
            e = e.comment(c.as_str());
        }
        if let Some(n) = &self.name {
            e = e.event(n.as_str());
        }
        if let Some(i) = &self.id {
            e = e.id(i.as_str());
        }
        if let Some(r) = self.retry {
            e = e.retry(r);
        }
        if let Some(d) = &self.data {
            e = e.data(d.as_str());
        }
        e
    }

    pub fn is_valid(&self) -> bool {
        name_is_valid(self.name.as_deref()) && id_is_valid(self.id.as_deref())
    }

    pub fn event_type(&self) -> String {
        match self.name.as_deref() {
            None | Some("") => "message".to_owned(),
            Some(n) => n.to_owned(),
        }
    }
}

/// What a spec-conforming client sees after `specs`, skipping refused ones.
pub fn model(specs: &[Spec]) -> Parsed {
    let mut out = Parsed::default();
    for s in specs.iter().filter(|s| s.is_valid()) {
        if let Some(id) = &s.id {
            out.last_event_id.clone_from(id);
        }
        if let Some(ms) = s.retry.and_then(retry_ms) {
            out.reconnection_time = Some(ms);
        }
        if let Some(data) = &s.data {
            out.events.push(Dispatched {
                event_type: s.event_type(),
                data: received(data),
                last_event_id: out.last_event_id.clone(),
            });
        }
    }
    out
}

/// What a client gets back for `data`: SSE carries line breaks, not which
/// break was used, so CRLF, lone CR and lone LF all arrive as LF.
pub fn received(data: &str) -> String {
    data.replace("\r\n", "\n").replace('\r', "\n")
}
