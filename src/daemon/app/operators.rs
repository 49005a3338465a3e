//! The operators' endpoints: `GET /streams` lists the open streams (who
//! holds them, what they follow, what they were sent), `DELETE
//! /streams/{id}` and `DELETE /streams?subject=S` or `?topic=T` end them
//! now (revocation). All of them, and the operators' pages to come, are
//! guarded by [`App::authorize_admin`].
//!
//! What a listing shows of a stream is what the registry keeps of it (see
//! `crate::stream::registry::Tracked`), on the heap: its peer, when it
//! opened, what was written to it, and what its handler added on its way
//! in, here: its JWT's subject (`admit_stream`) and what it follows (its
//! subscription's queue, or its mailbox key). Nothing of it lives on a
//! stream thread's stack.
//!
//! A listing is made a page of streams at a time, as the client takes it
//! (see [`Response::streamed`]): what it holds is the ids of the streams
//! open when it began (8 bytes each) and one piece of JSON (at most
//! [`PIECE_BYTES`] and a stream), and the registry's lock is held only to
//! copy a page of handles, never while anything is written. 15,000 idle
//! streams list in about 0.1 s (2.7 MB of JSON) with the server's RSS
//! unchanged, and a reader taking it slowly holds no thread.

use std::sync::Arc;

use serde_json::json;

use super::App;
use super::access::{local_host, proxied, same_origin};
use crate::Stream;
use crate::daemon::auth;
use crate::digits::push_decimal;
use crate::hub::fanout::SubscriberQueue;
use crate::hub::id::topic_problem;
use crate::stats::Tally;
use crate::stream::registry::{Following, Registry, Tracked};
use crate::{Request, Response};

/// Streams read from the registry at a time, for a listing's piece or a
/// revocation by filter: the lock is held while their handles are copied.
const PAGE: usize = 128;
/// A listing's piece stops taking streams past this size: a stream's
/// topics may fill most of its 8 KiB request head, so a page of such
/// streams would be a megabyte or more.
const PIECE_BYTES: usize = 32 * 1024;

/// What `?topic=` and `?subject=` ask for; both: streams that match both.
#[derive(Debug, Default)]
struct Filter {
    /// Streams following this topic, selector (as given) or mailbox key.
    topic: Option<String>,
    /// Streams whose client is this subject (a JWT's `sub`).
    subject: Option<String>,
}

impl Filter {
    /// The filter of `req`'s query: `400` for an unknown parameter, one
    /// given twice, or an empty or impossible value.
    fn of(req: &Request) -> Result<Filter, Response> {
        let mut f = Filter::default();
        for (name, value) in req.query_pairs() {
            let slot = match name.as_str() {
                "topic" => &mut f.topic,
                "subject" => &mut f.subject,
                other => {
                    let shown: String = other.chars().take(64).collect();
                    return Err(Response::text(
                        400,
                        format!("unknown parameter {shown:?}: use topic= or subject="),
                    ));
                }
            };
            if slot.is_some() {
                return Err(Response::text(400, format!("{name} given twice")));
            }
            if value.is_empty() {
                return Err(Response::text(400, format!("{name} is empty")));
            }
            *slot = Some(value.clone());
        }
        if let Some(t) = &f.topic
            && let Some(why) = topic_problem(t)
        {
            return Err(super::streams::bad_topic(t, why));
        }
        Ok(f)
    }

    fn is_empty(&self) -> bool {
        self.topic.is_none() && self.subject.is_none()
    }

    /// Whether `t` is a stream this filter selects.
    fn selects(&self, t: &Tracked) -> bool {
        if let Some(subject) = &self.subject
            && t.subject() != Some(subject.as_str())
        {
            return false;
        }
        match &self.topic {
            None => true,
            Some(topic) => t.follows().is_some_and(|f| {
                let mut found = false;
                f.each_topic(&mut |s| found |= s == topic);
                found
            }),
        }
    }

    /// The filter in words, for the log.
    fn describe(&self) -> String {
        match (&self.topic, &self.subject) {
            (Some(t), Some(s)) => format!("topic {t:?} and subject {s:?}"),
            (Some(t), None) => format!("topic {t:?}"),
            (None, Some(s)) => format!("subject {s:?}"),
            (None, None) => "nothing".to_owned(),
        }
    }
}

/// A stream as `GET /streams` shows it, appended to `out` as a JSON
/// object: `id`, `peer`, `client`, `subject`, `kind`, `topics`, `opened`,
/// `frames`, `bytes`, `queued`. Written out by hand rather than through a
/// `Serialize` type or a `Value`: a few pushes take less of the static
/// binary, whose size has a budget.
fn write_listed(out: &mut Vec<u8>, t: &Tracked) {
    // Strings through serde_json, for its escaping; numbers as digits.
    fn string(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => {
                let _ = serde_json::to_writer(&mut *out, s); // to a Vec: cannot fail
            }
            None => out.extend_from_slice(b"null"),
        }
    }
    fn number(out: &mut Vec<u8>, name: &[u8], n: u64) {
        out.extend_from_slice(name);
        push_decimal(out, n.into());
    }
    let follows = t.follows();
    number(out, b"{\"id\":", t.id());
    out.extend_from_slice(b",\"peer\":");
    string(out, Some(&t.peer().to_string()));
    out.extend_from_slice(b",\"client\":");
    string(out, Some(&t.client().to_string()));
    out.extend_from_slice(b",\"subject\":");
    string(out, t.subject());
    out.extend_from_slice(b",\"kind\":");
    string(out, follows.map(Following::kind));
    out.extend_from_slice(b",\"topics\":[");
    if let Some(f) = follows {
        let mut first = true;
        f.each_topic(&mut |topic| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            string(out, Some(topic));
        });
    }
    out.extend_from_slice(b"],\"opened\":");
    string(out, Some(&crate::time::iso8601(t.opened())));
    let tally = t.tally();
    number(out, b",\"frames\":", tally.map_or(0, Tally::frames));
    number(out, b",\"bytes\":", tally.map_or(0, Tally::bytes));
    let queued = follows.map_or(0, Following::queued);
    number(out, b",\"queued\":", queued as u64);
    out.push(b'}');
}

/// A listing on its way out: the ids of the streams open when it began,
/// and how far it got through them.
struct Listing {
    registry: Arc<Registry>,
    filter: Filter,
    ids: Vec<u64>,
    /// The index in `ids` to go on from.
    at: usize,
    /// Where it is in the array: `[` not yet sent, streams going out
    /// (with whether one did: the next needs a comma), or `]` sent.
    state: ListingState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListingState {
    Start,
    Streams { any: bool },
    Done,
}

impl Listing {
    /// Appends the next piece of the listing to `out`: false once all of
    /// it went out. A piece holds the streams of one page of ids, or as
    /// many as [`PIECE_BYTES`] allow; it may hold none (none of the page
    /// was selected).
    fn next_piece(&mut self, out: &mut Vec<u8>) -> bool {
        let mut any = match self.state {
            ListingState::Done => return false,
            ListingState::Start => {
                out.push(b'[');
                false
            }
            ListingState::Streams { any } => any,
        };
        let page = &self.ids[self.at..];
        let page = &page[..page.len().min(PAGE)];
        if page.is_empty() {
            out.extend_from_slice(b"]\n");
            self.state = ListingState::Done;
            return true;
        }
        self.at += page.len();
        for t in self.registry.page(page) {
            if out.len() >= PIECE_BYTES {
                // The rest of the page in the next piece: from this one.
                let left = page
                    .iter()
                    .position(|&id| id == t.id())
                    .unwrap_or(page.len());
                self.at -= page.len() - left;
                break;
            }
            if t.is_ending() || !self.filter.selects(&t) {
                continue;
            }
            if any {
                out.push(b',');
            }
            any = true;
            write_listed(out, &t);
        }
        self.state = ListingState::Streams { any };
        true
    }
}

/// What a Mercure or `/events` subscriber follows: its subscription's
/// queue knows its topics, its selectors and what waits in it.
impl Following for SubscriberQueue {
    fn kind(&self) -> &'static str {
        "subscriber"
    }

    fn each_topic(&self, f: &mut dyn FnMut(&str)) {
        self.topics.iter().for_each(|t| f(t));
        self.selectors().iter().for_each(|s| f(s.as_str()));
    }

    fn queued(&self) -> usize {
        self.len()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// What a mailbox consumer follows: its key.
struct Consuming(Box<str>);

impl Following for Consuming {
    fn kind(&self) -> &'static str {
        "mailbox"
    }

    fn each_topic(&self, f: &mut dyn FnMut(&str)) {
        f(&self.0);
    }

    fn queued(&self) -> usize {
        0
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Tells the registry that `stream` follows `sub`, for the listing. Out
/// of line, as everything on a stream's way in that is not its own
/// business (see `open_stream`).
#[inline(never)]
pub(super) fn following(stream: &Stream, sub: &crate::Subscription) {
    if let Some(t) = stream.tracked() {
        t.set_follows(Arc::clone(&sub.queue) as Arc<dyn Following>);
    }
}

/// Tells the registry that `stream` consumes the mailbox `key`.
#[inline(never)]
pub(super) fn consuming(stream: &Stream, key: &str) {
    if let Some(t) = stream.tracked() {
        t.set_follows(Arc::new(Consuming(key.into())));
    }
}

/// Tells the registry whom `stream`'s client is (its JWT's subject).
#[cold]
#[inline(never)]
pub(super) fn name_subject(stream: &Stream, subject: &str) {
    if let Some(t) = stream.tracked() {
        t.set_subject(subject);
    }
}

impl App {
    /// Whether `req` may use the operators' endpoints: with
    /// `[auth] admin_token` set, it must carry it as a Bearer token (`401`
    /// without it or with another, as a wrong publish token is answered);
    /// with none set, it must come from this machine as a publisher does
    /// with no publish credential: a direct loopback connection (no
    /// proxy's header) under a Host no web page can take over, from no
    /// page of another origin (`403` otherwise).
    pub(super) fn authorize_admin(&self, req: &Request) -> Result<(), Response> {
        let given = auth::bearer(req);
        if let Some(token) = self.config.admin_token.as_deref() {
            return match given {
                Some(g) if auth::constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
                Some(_) => Err(Response::text(401, "wrong admin token").with_header(
                    "WWW-Authenticate",
                    "Bearer realm=\"ssed\", error=\"invalid_token\"",
                )),
                None => Err(Self::unauthorized(
                    "send Authorization: Bearer <admin_token>",
                )),
            };
        }
        let host = req.header("host");
        let this_machine = auth::is_loopback(req.peer_addr().ip())
            && !proxied(req)
            && local_host(host, &self.config.allowed_hosts)
            && req
                .header("origin")
                .is_none_or(|o| same_origin(o, host, req.scheme()));
        if this_machine {
            return Ok(());
        }
        Err(Response::text(
            403,
            "with no admin_token set, only this machine may use this: a direct connection \
             (no proxy) under an IP address, localhost or a name in allowed_hosts, from no \
             page of another origin",
        ))
    }

    /// The registry of open streams (set once the server is built).
    fn registry(&self) -> Result<&Arc<Registry>, Response> {
        self.registry
            .get()
            .ok_or_else(|| Response::text(503, "the server is not running yet"))
    }

    /// `GET /streams[?topic=T][&subject=S]`: a JSON array, one object per
    /// open stream (those ending already left out), in no particular
    /// order (sorting the ids would cost the binary about 3 KiB; `opened`
    /// gives the order).
    pub(super) fn list_streams(&self, req: &Request) -> Response {
        let listing = self.authorize_admin(req).and_then(|()| {
            let filter = Filter::of(req)?;
            let registry = Arc::clone(self.registry()?);
            Ok(Listing {
                ids: registry.ids(),
                registry,
                filter,
                at: 0,
                state: ListingState::Start,
            })
        });
        match listing {
            Ok(mut listing) => {
                Response::streamed(200, "application/json", move |out| listing.next_piece(out))
                    .with_header("Cache-Control", "no-store")
            }
            Err(refusal) => refusal,
        }
    }

    /// `DELETE /streams/{id}`: ends that stream now; `404` when no such
    /// stream is open (or it is ending already).
    pub(super) fn end_stream_by_id(&self, req: &Request) -> Response {
        let ended = self.authorize_admin(req).and_then(|()| {
            if !req.query_pairs().is_empty() {
                return Err(Response::text(
                    400,
                    "DELETE /streams/{id} takes no parameter",
                ));
            }
            let given = req.param("id").unwrap_or_default();
            let registry = self.registry()?;
            match given.parse::<u64>() {
                Ok(id) if registry.revoke(id) => Ok(id),
                _ => {
                    let shown: String = given.chars().take(64).collect();
                    Err(Response::text(
                        404,
                        format!("no open stream has id {shown:?}"),
                    ))
                }
            }
        });
        match ended {
            Ok(id) => {
                log::info!("an operator ended stream {id}");
                ended_answer(1)
            }
            Err(refusal) => refusal,
        }
    }

    /// `DELETE /streams?subject=S`, `?topic=T` (or both: streams that
    /// match both): ends those streams now.
    pub(super) fn end_streams(&self, req: &Request) -> Response {
        let found = self.authorize_admin(req).and_then(|()| {
            let filter = Filter::of(req)?;
            if filter.is_empty() {
                return Err(Response::text(
                    400,
                    "say which streams to end: ?subject=S or ?topic=T",
                ));
            }
            Ok((Arc::clone(self.registry()?), filter))
        });
        let (registry, filter) = match found {
            Ok(found) => found,
            Err(refusal) => return refusal,
        };
        let mut ended = 0;
        for page in registry.ids().chunks(PAGE) {
            ended += registry
                .page(page)
                .iter()
                .filter(|t| filter.selects(t) && registry.revoke(t.id()))
                .count();
        }
        log::info!(
            "an operator ended {ended} stream(s) selected by {}",
            filter.describe()
        );
        ended_answer(ended)
    }
}

fn ended_answer(ended: usize) -> Response {
    Response::json(200, &json!({ "ended": ended })).with_header("Cache-Control", "no-store")
}
