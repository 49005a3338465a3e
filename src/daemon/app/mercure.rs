//! `POST /.well-known/mercure`: a Mercure publisher's update (drafts 07
//! and 08), so the publishers PHP frameworks ship (Symfony's Mercure
//! component, API Platform, Laravel broadcasters) publish into ssed
//! unchanged.
//!
//! The form's `topic` fields are the update's topics (the first its own,
//! the others alternates: one event, one id, see
//! [`Hub::publish_update`](crate::Hub::publish_update)); `data` its data,
//! `type` its SSE event name, `retry` its reconnection time, `private`
//! (any value) makes it a private update, `id` gives it the publisher's
//! own id (see [`Hub::publish_with_id`](crate::Hub::publish_with_id)). The
//! answer is `200`, `text/plain`, the event's id.
//!
//! `GET /.well-known/mercure` subscribes: to exact topics and to
//! selectors (`*`, URI templates) with draft-07's `topic=`, to exact
//! topics (or `*`) with draft-08's `match=`/`match_exact=`, to URL
//! patterns with `match_urlpattern=`; `lastEventID`
//! and `last_event_id` resume as `Last-Event-ID` does, `earliest` replays
//! everything retained. A credential must cover each topic and selector
//! (`403`), as on `/events`; an anonymous subscriber gets public updates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::access::Target;
use super::publish::publish_failed;
use super::streams::{Audience, bad_topic, subscribe_failed};
use super::{App, MAX_TOPICS_PER_STREAM};
use crate::http::request::parse_query;
use crate::hub::grant::SelectorError;
use crate::hub::id::topic_problem;
use crate::hub::{HubError, MAX_UPDATE_TOPICS, Privacy, Selector};
use crate::{Event, Request, Response, Stream, StreamError};

/// The path of the Mercure endpoint.
pub(super) const MERCURE_PATH: &str = "/.well-known/mercure";

/// A Mercure update, as its form gives it.
struct Form {
    topics: Vec<String>,
    data: Option<String>,
    event: Option<String>,
    retry: Option<Duration>,
    private: bool,
    /// The publisher's own id for it, if it gave one.
    id: Option<String>,
}

impl App {
    /// `POST /.well-known/mercure`.
    pub(super) fn mercure_publish(&self, req: &Request) -> Response {
        let r = self.mercure_publish_inner(req);
        self.with_cors(req, r)
    }

    fn mercure_publish_inner(&self, req: &Request) -> Response {
        if let Err(r) = self.cors(req) {
            return r;
        }
        let form = match read_form(req) {
            Ok(form) => form,
            Err(r) => return r,
        };
        let topics: Vec<&str> = form.topics.iter().map(String::as_str).collect();
        let publisher = match self.authorize_publish(req, &topics) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Err(r) = self.limit_publish_rate(req, publisher.as_deref()) {
            return r;
        }
        let mut event = Event::new().data(form.data.unwrap_or_default());
        if let Some(name) = form.event {
            event = event.event(name);
        }
        if let Some(retry) = form.retry {
            event = event.retry(retry);
        }
        let published = match &form.id {
            Some(id) => self.hub.publish_with_id(&topics, id, event, form.private),
            None => self.hub.publish_update(&topics, event, form.private),
        };
        match published {
            // The id alone, no final newline: publishers return the body
            // to their app as the update's id.
            Ok(p) => Response::new(200)
                .with_header("Content-Type", "text/plain; charset=utf-8")
                .with_body(form.id.unwrap_or_else(|| p.id.to_string())),
            Err(e) => publish_failed(&e),
        }
    }
}

/// The update's form, checked: `400` (or `415`) saying what is wrong.
fn read_form(req: &Request) -> Result<Form, Response> {
    if let Some(kind) = req.header("content-type") {
        let essence = kind.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(Response::text(
                415,
                "a Mercure update is a form: Content-Type: application/x-www-form-urlencoded",
            ));
        }
    }
    let body = req
        .body_str()
        .map_err(|_| Response::text(400, "the body must be UTF-8 text"))?;
    let mut form = Form {
        topics: Vec::new(),
        data: None,
        event: None,
        retry: None,
        private: false,
        id: None,
    };
    for (name, value) in parse_query(body) {
        match name.as_str() {
            "topic" => form.topics.push(value),
            "data" => form.data = Some(value),
            "type" if value.contains(['\r', '\n']) => {
                return Err(Response::text(400, "the type cannot hold a line break"));
            }
            "type" => form.event = Some(value),
            "retry" => {
                let ms = value
                    .parse::<u64>()
                    .map_err(|_| Response::text(400, "retry is a whole number of milliseconds"))?;
                form.retry = Some(Duration::from_millis(ms));
            }
            "private" => form.private = true,
            "id" => form.id = Some(value),
            _ => {} // other fields are no concern of the hub's
        }
    }
    if form.topics.is_empty() {
        return Err(Response::text(
            400,
            "a Mercure update needs a `topic` field",
        ));
    }
    if form.topics.len() > MAX_UPDATE_TOPICS {
        return Err(Response::text(
            400,
            format!("too many topics (at most {MAX_UPDATE_TOPICS} per update)"),
        ));
    }
    if let Some(r) = form
        .topics
        .iter()
        .find_map(|t| topic_problem(t).map(|why| bad_topic(t, why)))
    {
        return Err(r);
    }
    Ok(form)
}

/// Selectors compiled lately, by kind (0: draft-07's `topic`, 1: URL
/// patterns) and text: thousands of subscribers of one template compile
/// it once, and share it. Emptied when it holds [`COMPILED_KEPT`] of a
/// kind, so whatever subscribers ask keeps it bounded.
#[derive(Default)]
pub(super) struct Compiled(Mutex<[HashMap<Box<str>, Selector>; 2]>);

/// Most selectors [`Compiled`] keeps of one kind.
const COMPILED_KEPT: usize = 1024;

impl Compiled {
    /// The selector `text` of `kind`, from the cache or `parse`d (and kept
    /// if it is not an exact topic).
    fn get(
        &self,
        kind: usize,
        text: &str,
        parse: fn(&str) -> Result<Selector, SelectorError>,
    ) -> Result<Selector, SelectorError> {
        let mut maps = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = maps[kind].get(text) {
            return Ok(s.clone());
        }
        let selector = parse(text)?;
        if !matches!(selector, Selector::Exact(_)) {
            if maps[kind].len() >= COMPILED_KEPT {
                maps[kind].clear();
            }
            maps[kind].insert(text.into(), selector.clone());
        }
        Ok(selector)
    }
}

/// What a Mercure subscriber asks for: exact topics, and selectors
/// (`*`, URI templates, URL patterns) followed across every topic.
struct Wanted {
    topics: Vec<String>,
    selectors: Vec<Selector>,
}

/// A Mercure subscriber's topic matchers, read from its query's `pairs`,
/// or the `400` that says what is wrong with them: draft-07's `topic=` (an
/// exact topic, a URI template or `*`), draft-08's `match=` and
/// `match_exact=` (exact, `*` for every topic) and `match_urlpattern=` (a
/// URL pattern); any other `match_…` names no matcher type. Run on a worker
/// thread (see `App::wanted_elsewhere`).
fn wanted(pairs: &[(String, String)], compiled: &Compiled) -> Result<Box<Wanted>, Response> {
    let mut w = Box::new(Wanted {
        topics: Vec::new(),
        selectors: Vec::new(),
    });
    for (name, value) in pairs {
        let selector = match name.as_str() {
            "topic" => compiled.get(0, value, Selector::parse),
            "match" | "match_exact" => Selector::exact(value),
            "match_urlpattern" => compiled.get(1, value, Selector::url_pattern),
            m if m.starts_with("match_") => {
                let shown: String = m.chars().take(64).collect();
                return Err(Response::text(
                    400,
                    format!(
                        "unknown topic matcher type in `{shown}`: this hub knows `match`, \
                         `match_exact` and `match_urlpattern` (and draft-07's `topic`)"
                    ),
                ));
            }
            _ => continue,
        };
        let selector = selector.map_err(|e| Response::text(400, e.to_string()))?;
        if w.topics.len() + w.selectors.len() == MAX_TOPICS_PER_STREAM {
            return Err(Response::text(
                400,
                format!("too many topic matchers (at most {MAX_TOPICS_PER_STREAM} per stream)"),
            ));
        }
        match selector {
            Selector::Exact(_) => {
                if let Some(why) = topic_problem(value) {
                    return Err(bad_topic(value, why));
                }
                w.topics.push(value.clone());
            }
            other => w.selectors.push(other),
        }
    }
    if w.topics.is_empty() && w.selectors.is_empty() {
        return Err(Response::text(
            400,
            "name a topic: ?topic=<topic, URI template or *> (Mercure draft-07) or \
             ?match=<topic> (draft-08)",
        ));
    }
    Ok(w)
}

impl App {
    /// `GET /.well-known/mercure`: a Mercure subscriber, of exact topics
    /// and of selectors, resuming as the draft it speaks asks; the answer
    /// carries the cursor it resumed from (`Last-Event-ID` for draft-07,
    /// `Mercure-Last-Event-ID` for draft-08).
    pub(super) fn mercure_subscribe(
        &self,
        req: &Request,
        stream: &mut Stream,
    ) -> Result<(), StreamError> {
        let w = match self.wanted_elsewhere(req) {
            Ok(w) => w,
            Err(refusal) => return stream.respond(refusal),
        };
        let topics: Vec<&str> = w.topics.iter().map(String::as_str).collect();
        self.verify_ahead(req);
        let admission = self.admission(req, Target::Selected(&topics, &w.selectors));
        self.keep_payloads(&admission);
        let Some(audience) = self.open_stream(req, stream, true, admission)? else {
            self.drop_payloads();
            return Ok(());
        };
        // A credential covers all it subscribes to (or it was refused).
        let privacy = match audience {
            Audience::Granted => Privacy::All,
            Audience::Public => Privacy::Public,
        };
        let asked = req.last_event_id();
        let subscribed = if w.selectors.is_empty() {
            self.hub.subscribe_matching(&topics, &[], &privacy, asked)
        } else {
            drop(topics);
            self.subscribe_elsewhere(w, privacy, asked)
        };
        let sub = match subscribed {
            Ok(sub) => sub,
            Err(e @ HubError::Selectors { .. }) => return too_many_selectors(stream, &e),
            Err(e) => return subscribe_failed(stream, &e),
        };
        cursor_headers(stream, &sub, asked)?;
        self.following(req, stream, &sub);
        let followed = stream.follow(sub);
        if self.config.mercure_subscriptions {
            self.unfollowed(stream);
        }
        followed
    }

    /// Subscribes by selectors on a worker thread: joining a selector's
    /// group, and a replay that looks through history for the topics it
    /// matches, go deeper than a stream's thread should (see
    /// `wanted_elsewhere`).
    #[cold]
    #[inline(never)]
    #[allow(
        clippy::boxed_local,
        reason = "boxed on purpose: the caller's frame, under every idle stream, stays narrow"
    )]
    fn subscribe_elsewhere(
        &self,
        w: Box<Wanted>,
        privacy: Privacy,
        asked: Option<&str>,
    ) -> Result<crate::Subscription, HubError> {
        // One box: the job the worker gets is a pointer, not a frame's worth
        // of values put together on this thread's stack.
        let state = Box::new((self.hub.clone(), w, privacy, asked.map(str::to_owned)));
        let job = move || {
            let (hub, w, privacy, asked) = *state;
            let topics: Vec<&str> = w.topics.iter().map(String::as_str).collect();
            hub.subscribe_matching(&topics, &w.selectors, &privacy, asked.as_deref())
        };
        self.workers
            .run(job)
            .unwrap_or_else(|e| Err(HubError::Storage(e)))
    }

    /// The subscriber's matchers, parsed and compiled on a worker thread:
    /// compiling a URI template or URL pattern goes deep, and a stream's
    /// thread keeps every stack page it touches. `503` when the workers
    /// are overwhelmed.
    #[inline(never)]
    fn wanted_elsewhere(&self, req: &Request) -> Result<Box<Wanted>, Response> {
        let pairs = req.query_pairs().to_vec();
        let compiled = Arc::clone(&self.compiled);
        match self.workers.run(move || wanted(&pairs, &compiled)) {
            Ok(parsed) => parsed,
            Err(e) => {
                log::warn!(
                    "a Mercure subscription was not parsed: {}",
                    crate::Report(&e)
                );
                Err(Response::text(503, "busy: try again").with_header("Retry-After", "1"))
            }
        }
    }
}

/// Refuses a subscription by selector past what the hub follows: `503`
/// (nothing is sent yet: the head waits for the first write).
#[cold]
#[inline(never)]
fn too_many_selectors(stream: &mut Stream, e: &HubError) -> Result<(), StreamError> {
    let busy = Response::text(503, e.to_string()).with_header("Retry-After", "5");
    stream.respond(busy)
}

/// The `Last-Event-ID` (draft-07) and `Mercure-Last-Event-ID` (draft-08)
/// headers: where the subscription starts (see [`Subscription::cursor`]).
/// Out of line: not everything a Mercure stream does on its way in needs
/// to weigh on its thread's stack.
#[inline(never)]
fn cursor_headers(
    stream: &mut Stream,
    sub: &crate::Subscription,
    asked: Option<&str>,
) -> Result<(), StreamError> {
    let cursor = sub.cursor(asked);
    stream.header("Last-Event-ID", &cursor)?;
    stream.header("Mercure-Last-Event-ID", &cursor)
}
