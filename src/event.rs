//! The [`Event`] builder and the frame encoder (pure, no I/O).
//!
//! The wire format follows the WHATWG HTML standard, "Server-sent events"
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html>):
//!
//! - data containing `\r\n`, `\r` or `\n` becomes one `data:` line per line
//!   (CRLF counts as one break); the client rebuilds the text with every
//!   line break as `\n` (the format carries breaks, not their kind);
//! - every field is written as `name: value`: the parser strips one space
//!   after the colon, so values that start with spaces survive;
//! - an event name or id that holds a line break (or an id that holds NUL)
//!   is refused with an [`EventError`], never written as a broken frame;
//! - `retry:` is written in whole milliseconds; zero writes nothing.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::error::EventError;

/// One server-sent event: any of a comment, an event name, an id, a
/// reconnection time and data.
///
/// Build it with chained setters, then send it with
/// [`Stream::send_event`](crate::Stream::send_event) or encode it with
/// [`Event::encode`].
///
/// # Examples
///
/// ```
/// use ssed::Event;
/// let frame = Event::new().event("update").id("7").data("a\nb").encode()?;
/// assert_eq!(frame, b"event: update\nid: 7\ndata: a\ndata: b\n\n");
/// # Ok::<(), ssed::EventError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    comment: Option<String>,
    event: Option<String>,
    id: Option<String>,
    retry: Option<Duration>,
    data: Option<String>,
}

impl Event {
    /// An empty event. Encoded as is, it is a lone blank line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the data, sent as one `data:` line per line of `data`.
    ///
    /// See [MDN: `MessageEvent.data`](https://developer.mozilla.org/en-US/docs/Web/API/MessageEvent/data).
    pub fn data(mut self, data: impl Into<String>) -> Self {
        self.data = Some(data.into());
        self
    }

    /// Sets the data to the JSON serialization of `value`.
    ///
    /// # Errors
    ///
    /// [`EventError::Json`] when `value` does not serialize (a map with
    /// non-string keys, a failing `Serialize` impl).
    pub fn json_data<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, EventError> {
        self.data = Some(serde_json::to_string(value)?);
        Ok(self)
    }

    /// Sets the event name (`event:`), which a browser dispatches to
    /// `addEventListener(name, …)` instead of `onmessage`.
    ///
    /// An empty name is the same as none (`message`). A name with a line
    /// break makes [`encode`](Event::encode) fail.
    pub fn event(mut self, name: impl Into<String>) -> Self {
        self.event = Some(name.into());
        self
    }

    /// Sets the event id (`id:`); the browser sends the last one back in
    /// `Last-Event-ID` when it reconnects.
    ///
    /// An empty id resets the client's last event id. An id with a line
    /// break or NUL makes [`encode`](Event::encode) fail.
    /// See [MDN: `EventSource.lastEventId`](https://developer.mozilla.org/en-US/docs/Web/API/EventSource).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the client's reconnection time (`retry:`), in whole milliseconds.
    /// A time under one millisecond writes nothing.
    pub fn retry(mut self, time: Duration) -> Self {
        self.retry = Some(time);
        self
    }

    /// Adds a comment (`: text`), ignored by clients; used for heartbeats.
    /// A comment with line breaks becomes one comment line per line.
    pub fn comment(mut self, text: impl Into<String>) -> Self {
        self.comment = Some(text.into());
        self
    }

    /// The event name, if set.
    pub fn event_name(&self) -> Option<&str> {
        self.event.as_deref()
    }

    /// The id, if set.
    pub fn event_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The data, if set.
    pub fn data_str(&self) -> Option<&str> {
        self.data.as_deref()
    }

    /// Checks the event name and id without encoding.
    ///
    /// # Errors
    ///
    /// [`EventError::EventName`] or [`EventError::Id`] as for
    /// [`encode`](Event::encode).
    pub fn validate(&self) -> Result<(), EventError> {
        if let Some(name) = &self.event
            && has_line_break(name)
        {
            return Err(EventError::EventName);
        }
        if let Some(id) = &self.id
            && (has_line_break(id) || id.contains('\0'))
        {
            return Err(EventError::Id);
        }
        Ok(())
    }

    /// Encodes the event as one frame, ending with the blank line that
    /// dispatches it.
    ///
    /// # Errors
    ///
    /// [`EventError::EventName`] when the name holds `\r` or `\n`;
    /// [`EventError::Id`] when the id holds `\r`, `\n` or NUL.
    pub fn encode(&self) -> Result<Vec<u8>, EventError> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the encoded frame to `out`; on error nothing is appended.
    ///
    /// # Errors
    ///
    /// As for [`encode`](Event::encode).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), EventError> {
        self.validate()?;
        self.write(out, self.id.as_deref());
        Ok(())
    }

    /// Writes the validated event with `id` as its id line; returns the
    /// offset where the id line starts (or would).
    fn write(&self, out: &mut Vec<u8>, id: Option<&str>) -> usize {
        if let Some(comment) = &self.comment {
            for line in split_lines(comment) {
                out.extend_from_slice(b": ");
                out.extend_from_slice(line.as_bytes());
                out.push(b'\n');
            }
        }
        if let Some(name) = &self.event
            && !name.is_empty()
        {
            field(out, b"event", name);
        }
        let at = out.len();
        if let Some(id) = id {
            field(out, b"id", id);
        }
        if let Some(retry) = self.retry {
            let ms = retry.as_millis();
            if ms > 0 {
                out.extend_from_slice(b"retry: ");
                crate::digits::push_decimal(out, ms);
                out.push(b'\n');
            }
        }
        if let Some(data) = &self.data {
            for line in split_lines(data) {
                field(out, b"data", line);
            }
        }
        out.push(b'\n');
        at
    }

    /// Encodes the event once into a cheaply clonable frame that can be
    /// handed to many streams (see
    /// [`Stream::send_encoded`](crate::Stream::send_encoded)).
    ///
    /// # Errors
    ///
    /// As for [`encode`](Event::encode).
    pub fn encode_shared(&self) -> Result<EncodedEvent, EventError> {
        Ok(EncodedEvent(Arc::from(self.encode()?)))
    }

    /// The frame without an id line, and the offset where an id line goes
    /// to make the frame [`encode`](Event::encode) would give with that id
    /// (a store that assigns ids keeps this form).
    pub(crate) fn encode_around_id(&self) -> Result<(Vec<u8>, usize), EventError> {
        self.validate()?;
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        let at = self.write(&mut out, None);
        Ok((out, at))
    }

    fn encoded_len_hint(&self) -> usize {
        let len = |s: &Option<String>| s.as_ref().map_or(0, |s| s.len() + 8);
        len(&self.comment) + len(&self.event) + len(&self.id) + len(&self.data) + 16
    }
}

/// A frame encoded once and shared by reference count.
///
/// Only [`Event::encode_shared`] makes one, so it always holds a complete,
/// valid frame.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedEvent(Arc<[u8]>);

impl EncodedEvent {
    /// The frame's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The value of the frame's `id:` line, if it has one (it comes
    /// before any `retry:` or `data:` line).
    pub(crate) fn id(&self) -> Option<&str> {
        for line in self.0.split(|b| *b == b'\n') {
            if let Some(id) = line.strip_prefix(b"id: ") {
                return std::str::from_utf8(id).ok();
            }
            if line.starts_with(b"retry:") || line.starts_with(b"data:") || line.is_empty() {
                return None;
            }
        }
        None
    }

    /// A frame assembled from stored parts by a store that only keeps
    /// what [`Event::encode_around_id`] made.
    pub(crate) fn from_parts(bytes: Vec<u8>) -> Self {
        EncodedEvent(Arc::from(bytes))
    }

    /// A frame read back from a durable store, which only ever holds what
    /// [`Event::encode_shared`] made; `None` unless it ends like a frame.
    #[cfg(feature = "durable")]
    pub(crate) fn from_stored(bytes: Vec<u8>) -> Option<Self> {
        bytes
            .ends_with(b"\n\n")
            .then(|| EncodedEvent(Arc::from(bytes)))
    }
}

impl fmt::Debug for EncodedEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EncodedEvent")
            .field(&String::from_utf8_lossy(&self.0))
            .finish()
    }
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &str) {
    out.extend_from_slice(name);
    if value.is_empty() {
        out.extend_from_slice(b":\n");
    } else {
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
}

fn has_line_break(s: &str) -> bool {
    s.bytes().any(|b| b == b'\n' || b == b'\r')
}

/// Splits on `\r\n`, `\r` and `\n`, as the event stream parser does. A
/// trailing break yields a trailing empty line, so the text survives exactly.
fn split_lines(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.find(['\r', '\n']) {
            Some(i) => {
                let skip = if s[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&s[i + skip..]);
                Some(&s[..i])
            }
            None => {
                rest = None;
                Some(s)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(e: Event) -> String {
        String::from_utf8(e.encode().expect("valid event")).expect("utf-8")
    }

    #[test]
    fn encodes_fields_in_order() {
        let cases: &[(Event, &str)] = &[
            (Event::new().data("hi"), "data: hi\n\n"),
            (Event::new(), "\n"),
            (Event::new().data(""), "data:\n\n"),
            (Event::new().data("a\nb"), "data: a\ndata: b\n\n"),
            (Event::new().data("a\r\nb"), "data: a\ndata: b\n\n"),
            (Event::new().data("a\rb"), "data: a\ndata: b\n\n"),
            (Event::new().data("a\n\rb"), "data: a\ndata:\ndata: b\n\n"),
            (Event::new().data("a\n"), "data: a\ndata:\n\n"),
            (Event::new().data("  lead"), "data:   lead\n\n"),
            (Event::new().event("x").data("1"), "event: x\ndata: 1\n\n"),
            (Event::new().event("").data("1"), "data: 1\n\n"),
            (Event::new().id(""), "id:\n\n"),
            (Event::new().id("1-2"), "id: 1-2\n\n"),
            (
                Event::new().retry(Duration::from_secs(10)),
                "retry: 10000\n\n",
            ),
            (Event::new().retry(Duration::ZERO), "\n"),
            (Event::new().retry(Duration::from_micros(900)), "\n"),
            (Event::new().comment("hb"), ": hb\n\n"),
            (Event::new().comment("a\nb"), ": a\n: b\n\n"),
            (
                Event::new()
                    .comment("c")
                    .event("e")
                    .id("i")
                    .retry(Duration::from_millis(5))
                    .data("d"),
                ": c\nevent: e\nid: i\nretry: 5\ndata: d\n\n",
            ),
        ];
        for (event, want) in cases {
            assert_eq!(enc(event.clone()), *want, "{event:?}");
        }
    }

    #[test]
    fn refuses_broken_names_and_ids() {
        let bad = [
            (Event::new().event("a\nb"), "name"),
            (Event::new().event("a\r"), "name"),
            (Event::new().id("1\n"), "id"),
            (Event::new().id("\r1"), "id"),
            (Event::new().id("1\0"), "id"),
        ];
        for (event, what) in bad {
            let mut out = b"keep".to_vec();
            let err = event.encode_into(&mut out).expect_err(what);
            assert_eq!(out, b"keep", "nothing appended on error");
            match (what, err) {
                ("name", EventError::EventName) | ("id", EventError::Id) => {}
                (w, e) => panic!("{w}: unexpected {e:?}"),
            }
        }
        // NUL is only special in ids.
        assert!(Event::new().event("a\0b").encode().is_ok());
    }

    #[test]
    fn json_data_is_one_line() {
        let e = Event::new()
            .json_data(&serde_json::json!({"text": "a\nb"}))
            .expect("serializes");
        assert_eq!(enc(e), "data: {\"text\":\"a\\nb\"}\n\n");
    }

    #[test]
    fn shared_frames_share_bytes() {
        let a = Event::new().data("x").encode_shared().expect("valid");
        let b = a.clone();
        assert!(std::ptr::eq(a.as_bytes(), b.as_bytes()));
        assert_eq!(a.as_bytes(), b"data: x\n\n");
    }
}
