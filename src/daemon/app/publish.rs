//! `POST /publish/{topic}` and `POST /keys/{key}`: the name, the
//! publisher's right and `publish_rate`, then into the hub.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use serde_json::json;

use super::{App, FRAME_SLACK, MAX_FRAME_PER_BODY, bad_name};
use crate::hub::valid_name;
use crate::server::limits::rate::retry_after_secs;
use crate::{Event, Request, Response};

impl App {
    pub(super) fn publish(&self, req: &Request) -> Response {
        let topic = req.param("topic").unwrap_or_default();
        let r = self.publish_inner(req, topic);
        self.with_cors(req, r)
    }

    /// What publishing and pushing both check first: the name, the origin,
    /// the publisher's right; then the body as text.
    fn publish_body<'r>(
        &self,
        req: &'r Request,
        what: &str,
        name: &str,
    ) -> Result<&'r str, Response> {
        if !valid_name(name) {
            return Err(bad_name(what, name));
        }
        self.cors(req)?;
        let publisher = self.authorize_publish(req, &[name])?;
        self.limit_publish_rate(req, publisher.as_deref())?;
        req.body_str()
            .map_err(|_| Response::text(400, "the body must be UTF-8 text"))
    }

    /// `publish_rate`: counts this publish against its publisher's
    /// allowance, `429` when spent. A publisher is the credential it
    /// authorized with (every holder of the publish token shares one
    /// allowance; a JWT's subject shares one whatever token it comes
    /// with), else its address.
    pub(super) fn limit_publish_rate(
        &self,
        req: &Request,
        publisher: Option<&str>,
    ) -> Result<(), Response> {
        let Some(limit) = &self.publish_limit else {
            return Ok(());
        };
        let key = match publisher {
            Some(credential) => limit.credential(credential),
            None => limit.address(req.client_ip()),
        };
        let Err(wait) = limit.check(key, Instant::now()) else {
            return Ok(());
        };
        self.stats.counters().rate_limited.fetch_add(1, Relaxed);
        log::debug!(
            "publish from {} refused: over publish_rate",
            req.client_ip()
        );
        Err(Response::text(
            429,
            format!(
                "publishing too fast: at most {} per publisher (publish_rate)",
                limit.rate()
            ),
        )
        .with_header("Retry-After", &retry_after_secs(wait).to_string()))
    }

    fn publish_inner(&self, req: &Request, topic: &str) -> Response {
        let body = match self.publish_body(req, "topic", topic) {
            Ok(body) => body,
            Err(r) => return r,
        };
        let mut event = Event::new().data(body);
        if let Some(name) = req.query("event") {
            if name.contains(['\r', '\n']) {
                return Response::text(400, "the event name cannot hold a line break");
            }
            event = event.event(name);
        }
        let private = match req.query("private") {
            None | Some("false" | "0") => false,
            Some("" | "true" | "1" | "on") => true,
            Some(other) => {
                let shown: String = other.chars().take(32).collect();
                return Response::text(
                    400,
                    format!("private={shown:?}: give private=true (or false)"),
                );
            }
        };
        let published = if private {
            self.hub.publish_private(topic, event)
        } else {
            self.hub.publish(topic, event)
        };
        match published {
            Ok(p) => Response::json(
                200,
                &json!({"id": p.id.to_string(), "topic": topic, "receivers": p.receivers}),
            ),
            Err(e) => publish_failed(&e),
        }
    }

    pub(super) fn push(&self, req: &Request) -> Response {
        let key = req.param("key").unwrap_or_default();
        let r = self.push_inner(req, key);
        self.with_cors(req, r)
    }

    fn push_inner(&self, req: &Request, key: &str) -> Response {
        let body = match self.publish_body(req, "key", key) {
            Ok(body) => body,
            Err(r) => return r,
        };
        match self.hub.push(key, body) {
            Ok(queued) => Response::json(200, &json!({"key": key, "queued": queued})),
            Err(crate::HubError::MailboxFull { .. }) => Response::text(
                429,
                format!("mailbox {key} is full: no consumer is taking its messages"),
            )
            .with_header("Retry-After", "1"),
            Err(crate::HubError::Storage(_)) => storage_unavailable("the message"),
            Err(crate::HubError::OverBudget { budget }) => Response::text(
                507,
                format!(
                    "mailboxes hold all the memory set aside for them (max_retained_bytes = \
                     {budget}): the message was not queued; retry once consumers catch up"
                ),
            )
            .with_header("Retry-After", "5"),
            Err(e) => Response::text(400, e.to_string()),
        }
    }
}

/// The answer when the store refused a write (logged where it failed):
/// nothing was kept or delivered, the client may retry.
fn storage_unavailable(what: &str) -> Response {
    Response::text(
        503,
        format!("storage unavailable: {what} was not stored; retry later"),
    )
    .with_header("Retry-After", "1")
}

/// The answer to a publish the hub refused.
pub(super) fn publish_failed(e: &crate::HubError) -> Response {
    match e {
        crate::HubError::Storage(_) => storage_unavailable("the event"),
        crate::HubError::TooLarge { size, max } => Response::text(
            413,
            format!(
                "the event would be {size} bytes as sent (a `data: ` line per line of the \
                 body, and its id); the limit is {max} ({MAX_FRAME_PER_BODY} x max_body + {FRAME_SLACK})"
            ),
        ),
        e => Response::text(400, e.to_string()),
    }
}
