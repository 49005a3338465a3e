//! `POST /.well-known/mercure`: a Mercure publisher's update (drafts 07
//! and 08), so the publishers PHP frameworks ship (Symfony's Mercure
//! component, API Platform, Laravel broadcasters) publish into ssed
//! unchanged.
//!
//! The form's `topic` fields are the update's topics (the first its own,
//! the others alternates: one event, one id, see
//! [`Hub::publish_update`](crate::Hub::publish_update)); `data` its data,
//! `type` its SSE event name, `retry` its reconnection time, `private`
//! (any value) makes it a private update. The answer is `200`,
//! `text/plain`, the event's id. A publisher-given `id` is refused for now
//! (ssed assigns ids).
//!
//! `GET /.well-known/mercure?topic=…` subscribes as `/events?topic=` does
//! (the same handler), to exact topics: URI-template and `*` selectors and
//! draft-08's `match*` parameters are refused (`400`) until selector
//! subscriptions are built; `lastEventID` and `last_event_id` resume as
//! `Last-Event-ID` does.

use std::time::Duration;

use super::App;
use super::publish::publish_failed;
use super::streams::bad_topic;
use crate::http::request::parse_query;
use crate::hub::MAX_UPDATE_TOPICS;
use crate::hub::id::topic_problem;
use crate::{Event, Request, Response};

/// The path of the Mercure endpoint.
pub(super) const MERCURE_PATH: &str = "/.well-known/mercure";

/// A Mercure update, as its form gives it.
struct Form {
    topics: Vec<String>,
    data: Option<String>,
    event: Option<String>,
    retry: Option<Duration>,
    private: bool,
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
        match self.hub.publish_update(&topics, event, form.private) {
            // The id alone, no final newline: publishers return the body
            // to their app as the update's id.
            Ok(p) => Response::new(200)
                .with_header("Content-Type", "text/plain; charset=utf-8")
                .with_body(p.id.to_string()),
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
            "id" => {
                return Err(Response::text(
                    400,
                    "a publisher-given id is not supported yet: leave `id` out and ssed \
                     assigns one (the answer's body)",
                ));
            }
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

/// What a Mercure subscription asks for that is not built yet, refused
/// with `400` saying so: a selector (`*`, a URI template) where an exact
/// topic is expected, and draft-08's `match*` parameters.
#[cold]
#[inline(never)]
pub(super) fn refuse_subscription(req: &Request, topics: &[&str]) -> Option<Response> {
    if let Some((name, _)) = req
        .query_pairs()
        .iter()
        .find(|(k, _)| k.starts_with("match"))
    {
        return Some(Response::text(
            400,
            format!("`{name}` is not supported yet: subscribe to exact topics with `topic=`"),
        ));
    }
    topics
        .iter()
        .find(|t| **t == "*" || t.contains(['{', '}']))
        .map(|t| {
            let shown: String = t.chars().take(64).collect();
            Response::text(
                400,
                format!(
                    "topic {shown:?} is a selector: subscribing with `*` or a URI template is \
                     not supported yet; subscribe to exact topics"
                ),
            )
        })
}
