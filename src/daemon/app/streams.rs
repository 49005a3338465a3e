//! A stream's way in: `/events` and `/keys/{key}` as streams, from the
//! request to the first byte out. Each idle stream's thread keeps every
//! stack page this path touches, so the out-of-line and cold marks here
//! (and in `access`) are measured, not style: see `open_stream`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use super::access::{Admission, Credential, How, Target, local_host, proxied};
use super::operators::{consuming, following, name_subject};
use super::{App, MAX_TOPICS_PER_STREAM, bad_name};
use crate::daemon::auth::{self, Pass, SESSION_COOKIE};
use crate::hub::id::{TopicProblem, topic_problem};
use crate::hub::valid_name;
use crate::{Request, Response, Stream, StreamError};

/// Gives back the place a stream's handler took under
/// `max_streams_per_client` (see `App::count_named_client`) as the handler
/// returns, before the stream stops counting as open: whoever sees it
/// closed may open another at once. (The thread's end would give it back
/// too, a moment later.)
pub(super) fn with_held_released<T>(result: T) -> T {
    HELD.with(|h| h.borrow_mut().take());
    result
}

// Both boxed: every thread's thread-locals sit at the top of its stack
// mapping (musl), in the page a stream thread keeps resident; a few dozen
// bytes more there left some idle streams with a second stack page.
thread_local! {
    /// A stream thread's place under `max_streams_per_client`, when its
    /// handler counted it (see `App::count_named_client`); given back when
    /// the thread ends with its stream.
    static HELD: std::cell::RefCell<Option<Box<crate::server::limits::clients::ClientSlot>>> =
        const { std::cell::RefCell::new(None) };
}

/// Which updates an admitted stream may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Audience {
    /// Public updates only (an anonymous subscriber).
    Public,
    /// Private updates of its topics too (its grant covers them).
    Granted,
}

/// An admitted stream: the pass of the ticket it was opened with, for the
/// session it starts, and which updates it may receive.
struct Admitted {
    ticket: Option<Box<Pass>>,
    audience: Audience,
}

impl App {
    /// CORS and access for a new stream, decided from the handler's own
    /// frame (see `open_stream`): the credential, or the refusal to answer
    /// with. Boxed, so the handler's frame, under every idle stream, stays
    /// narrow.
    #[inline(never)]
    pub(super) fn admission(&self, req: &Request, target: Target<'_>) -> Box<Admission> {
        if let Err(refusal) = self.cors(req) {
            return Box::new(Err(refusal));
        }
        let refusal = match self.authorize_subscribe(req) {
            Ok(cred) => match self.refuse_target(req, &cred, target) {
                None => return Box::new(Ok(cred)),
                Some(refusal) => refusal,
            },
            Err(refusal) => refusal,
        };
        Box::new(Err(self.with_cors(req, refusal)))
    }

    /// Opens an admitted stream, or answers its refusal (false): the
    /// common opening of a subscriber stream (CORS, access, cookie, retry).
    /// The head goes out now, or with `later` it waits for the stream's
    /// first write (a followed subscription hands that to a waker thread).
    ///
    /// Stream threads keep every stack page they touch for the stream's
    /// life. So access is decided apart ([`admission`](App::admission),
    /// called by the handler itself, where the stack is shallow: verifying
    /// a credential and matching a grant are the deepest calls on a
    /// stream's way in), and the uncommon branches here and in `subscribe`
    /// (refusals, tickets, errors) live in functions of their own, kept out
    /// of line: their locals do not deepen the common path.
    pub(super) fn open_stream(
        &self,
        req: &Request,
        stream: &mut Stream,
        later: bool,
        admission: Box<Admission>,
    ) -> Result<Option<Audience>, StreamError> {
        let Some(admitted) = self.admit_stream(req, stream, admission)? else {
            return Ok(None);
        };
        if let Some(pass) = admitted.ticket {
            self.start_session(req, stream, pass)?;
        }
        if later {
            stream.retry_on_open(self.config.retry)?;
        } else if self.config.retry.is_zero() {
            stream.open()?;
        } else {
            stream.retry(self.config.retry)?;
        }
        Ok(Some(admitted.audience))
    }

    /// Sets the headers an admitted stream's admission calls for, and
    /// answers a refused one (`None`). An admitted stream opened with a
    /// ticket comes with its pass, for the session it starts (opened by
    /// the caller: a frame less under that deep call).
    #[inline(never)]
    #[allow(
        clippy::boxed_local,
        reason = "boxed on purpose: the caller's frame, under every idle stream, stays narrow"
    )]
    fn admit_stream(
        &self,
        req: &Request,
        stream: &mut Stream,
        admission: Box<Admission>,
    ) -> Result<Option<Admitted>, StreamError> {
        let cred = match *admission {
            Ok(cred) => cred,
            Err(r) => {
                stream.respond(r)?;
                return Ok(None);
            }
        };
        // The acceptor left a stream authorized by a JWT with a subject to
        // be counted here (see `build`): the same token, so the same
        // subject, read without verifying there and verified here.
        let named_later = self.config.max_streams_per_client > 0
            && cred.how == How::Jwt
            && cred.subject.is_some();
        if named_later && !self.count_named_client(&cred) {
            stream.respond(self.with_cors(req, self.too_many_streams(&cred)))?;
            return Ok(None);
        }
        if let Some(exp) = cred.expires {
            end_with_token(stream, exp);
        }
        if let Some(subject) = &cred.subject {
            name_subject(stream, subject);
        }
        // Admitted, so CORS allowed the origin: the same answer again.
        for (k, v) in &self.cors(req).unwrap_or_default() {
            stream.header(k, v)?;
        }
        // A credential covers every topic it opens (or it was refused):
        // its stream may receive their private updates. An anonymous one
        // gets public updates only.
        let audience = if cred.how == How::Anonymous {
            Audience::Public
        } else {
            Audience::Granted
        };
        let ticket = (cred.how == How::Ticket).then(|| {
            Box::new(Pass {
                grant: cred.grant,
                expires: cred.expires,
            })
        });
        Ok(Some(Admitted { ticket, audience }))
    }

    /// Opens the session a ticket's stream starts, with its cookie. Out
    /// of line, as everything uncommon on a stream's way in: see
    /// `open_stream`.
    #[cold]
    #[inline(never)]
    #[allow(
        clippy::boxed_local,
        reason = "boxed on purpose: the caller's frame, under every idle stream, stays narrow"
    )]
    fn start_session(
        &self,
        req: &Request,
        stream: &mut Stream,
        pass: Box<Pass>,
    ) -> Result<(), StreamError> {
        match self.tickets.open_session(self.config.ticket_session, *pass) {
            Ok(secret) => {
                // `Secure` when the client is on https (as a trusted proxy
                // says): the browser then never sends the cookie over
                // plain http.
                let secure = if req.scheme() == "https" {
                    "; Secure"
                } else {
                    ""
                };
                // Put together without `format!`: `core::fmt` takes more
                // stack than a stream's way in may keep (see `crate::digits`).
                let max_age =
                    crate::digits::Digits::decimal(self.config.ticket_session.as_secs().into());
                let mut cookie = String::with_capacity(128);
                for part in [
                    SESSION_COOKIE,
                    "=",
                    &secret,
                    "; Max-Age=",
                    std::str::from_utf8(max_age.as_bytes()).unwrap_or("0"),
                    "; Path=/; HttpOnly; SameSite=Strict",
                    secure,
                ] {
                    cookie.push_str(part);
                }
                stream.header("Set-Cookie", &cookie)?;
            }
            Err(e) => log::warn!("cannot open a session for a ticket: {e}"),
        }
        Ok(())
    }

    pub(super) fn subscribe(&self, req: &Request, stream: &mut Stream) -> Result<(), StreamError> {
        let topics: Vec<&str> = match req.param("topic") {
            Some(t) => vec![t],
            None => req.query_all("topic").collect(),
        };
        if refused_topics(req, stream, &topics)? {
            return Ok(());
        }
        self.verify_ahead(req);
        let admission = self.admission(req, Target::Topics(&topics));
        let Some(audience) = self.open_stream(req, stream, true, admission)? else {
            return Ok(());
        };
        // Subscribe once admitted (a refused client never holds a queue in
        // the hub) and before the head goes out: a client that has the head
        // gets every event published after it.
        let subscribed = match audience {
            Audience::Granted => self.hub.subscribe(&topics, req.last_event_id()),
            Audience::Public => self.hub.subscribe_public(&topics, req.last_event_id()),
        };
        let sub = match subscribed {
            Ok(sub) => sub,
            Err(e) => return subscribe_failed(stream, &e),
        };
        drop(topics);
        following(stream, &sub);
        stream.follow(sub)
    }

    pub(super) fn consume(&self, req: &Request, stream: &mut Stream) -> Result<(), StreamError> {
        let key = req.param("key").unwrap_or_default();
        if !valid_name(key) {
            return stream.respond(bad_name("key", key));
        }
        if let Some(refusal) = self.refuse_rebound_consumer(req) {
            return stream.respond(refusal);
        }
        self.verify_ahead(req);
        let admission = self.admission(req, Target::Mailbox(key));
        // Said before the head goes out: a client that has it is listed
        // with its key. (A refused one is, too, for the moment it lasts.)
        consuming(stream, key);
        if self.open_stream(req, stream, false, admission)?.is_none() {
            return Ok(());
        }
        stream.consume(&self.hub, key)
    }

    /// Counts a stream the acceptor did not count, against its JWT's
    /// subject, and holds the place for as long as this thread (the
    /// stream's) lives. False: the subject holds `max_streams_per_client`
    /// streams already.
    #[cold]
    #[inline(never)]
    fn count_named_client(&self, cred: &Credential) -> bool {
        let (Some(clients), Some(sub)) = (self.clients.get(), &cred.subject) else {
            return true;
        };
        // Not `format!`: see `start_session`.
        let slot = clients.acquire_named(&["sub:", sub].concat());
        match slot {
            Some(slot) => {
                HELD.with(|h| *h.borrow_mut() = slot.map(Box::new));
                true
            }
            None => {
                self.stats.counters().client_limited.fetch_add(1, Relaxed);
                false
            }
        }
    }

    #[cold]
    fn too_many_streams(&self, cred: &Credential) -> Response {
        let who = cred.subject.as_deref().unwrap_or("this client");
        Response::text(
            429,
            format!(
                "too many streams for {who}: at most {} at once per client; close one first",
                self.config.max_streams_per_client
            ),
        )
        .with_header("Retry-After", "5")
    }

    /// With no subscriber credential configured, consuming a mailbox
    /// (which takes its messages) from this machine needs what publishing
    /// does: a direct connection under a Host no web page can take over. A
    /// page that reached the daemon under its own name (DNS rebinding)
    /// would otherwise take a local program's messages.
    #[cold]
    #[inline(never)]
    fn refuse_rebound_consumer(&self, req: &Request) -> Option<Response> {
        let rebound = !self.config.subscriber_credentials()
            && auth::is_loopback(req.peer_addr().ip())
            && !proxied(req)
            && !local_host(req.header("host"), &self.config.allowed_hosts);
        rebound.then(|| {
            Response::text(
                403,
                format!(
                    "consuming a mailbox with Host {:?} is refused: with no subscriber credential set, \
                     a request from this machine may consume only under an IP address, \
                     localhost or a name listed in allowed_hosts",
                    req.header("host").unwrap_or_default()
                ),
            )
        })
    }
}

/// How soon a stream refused for want of storage (Redis down) asks its
/// client to come back.
const STORAGE_RETRY: Duration = Duration::from_secs(2);

/// Ends `stream` when its token expires, at `exp`.
#[inline(never)]
fn end_with_token(stream: &mut Stream, exp: SystemTime) {
    let left = exp.duration_since(SystemTime::now()).unwrap_or_default();
    stream.end_at(Instant::now() + left);
}

/// Answers the refusal of a stream's topic list, if it is refused (true).
/// The refusal lives in this frame, not in the handler's, which every idle
/// stream keeps (see `open_stream`).
#[inline(never)]
fn refused_topics(
    req: &Request,
    stream: &mut Stream,
    topics: &[&str],
) -> Result<bool, StreamError> {
    match refuse_topics(req, topics) {
        Some(refusal) => stream.respond(refusal).map(|()| true),
        None => Ok(false),
    }
}

/// Why a stream's topic list is refused, if it is (400). A topic in the
/// path (`/events/{topic}`) is a name; one in the query (`?topic=`) any
/// topic, an IRI say.
#[inline(never)]
fn refuse_topics(req: &Request, topics: &[&str]) -> Option<Response> {
    if topics.is_empty() {
        return Some(Response::text(
            400,
            "name a topic: /events/{topic} or /events?topic=a&topic=b",
        ));
    }
    if topics.len() > MAX_TOPICS_PER_STREAM {
        return Some(Response::text(
            400,
            format!("too many topics (at most {MAX_TOPICS_PER_STREAM} per stream)"),
        ));
    }
    if req.param("topic").is_some() {
        return topics
            .iter()
            .find(|t| !valid_name(t))
            .map(|bad| bad_path_topic(bad));
    }
    topics
        .iter()
        .find_map(|t| topic_problem(t).map(|why| bad_topic(t, why)))
}

/// The refusal of a topic in the path that is no name.
#[cold]
#[inline(never)]
fn bad_path_topic(topic: &str) -> Response {
    let shown: String = topic.chars().take(64).collect();
    Response::text(
        400,
        format!(
            "invalid topic name {shown:?} in the path: use 1 to 200 characters of \
             A-Z a-z 0-9 _ . : -, or name the topic in the query, \
             /events?topic=<percent-encoded topic>, where it may be any IRI"
        ),
    )
}

/// The refusal of a topic in the query that is no topic.
#[cold]
#[inline(never)]
pub(super) fn bad_topic(topic: &str, why: TopicProblem) -> Response {
    let shown: String = topic.chars().take(64).collect();
    Response::text(400, format!("invalid topic {shown:?}: {why}"))
}

/// Ends a stream whose subscription failed (storage down). The head is
/// out, so no 503: an EventSource is told to come back soon (with its
/// Last-Event-ID).
#[cold]
#[inline(never)]
pub(super) fn subscribe_failed(
    stream: &mut Stream,
    e: &crate::HubError,
) -> Result<(), StreamError> {
    log::warn!("subscribe failed: {}", crate::Report(e));
    stream.retry(STORAGE_RETRY)?;
    stream.comment("storage unavailable; reconnect later")
}
