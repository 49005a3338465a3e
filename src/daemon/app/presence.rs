//! Mercure's active subscriptions (`[mercure] subscriptions = true`): each
//! subscribe and unsubscribe on `GET /.well-known/mercure` publishes the
//! private subscription update drafts 07 and 08 define, and `GET
//! /.well-known/mercure/subscriptions[/…]` lists what is subscribed.
//!
//! The two drafts name a subscription differently: draft-07 by its topic
//! selector (`/.well-known/mercure/subscriptions/{topic}/{subscriber}`, a
//! JSON-LD `Subscription` with `topic`), draft-08 by its matcher
//! (`…/subscriptions/{match_type}/{match}/{subscriber}`, a JSON
//! `subscription` with `match_type` and `match`, sent as SSE event
//! `mercure`). A client speaks one of them, and shows it by the parameter
//! it subscribes with: a `topic=` subscription is announced as draft-07
//! says, a `match=`/`match_exact=`/`match_urlpattern=` one as draft-08
//! says, each exactly as its text requires, so a client of either draft
//! reads the updates of its own kind of subscribers unchanged (and a
//! grant on `/.well-known/mercure/subscriptions/*`-like patterns sees
//! both). The API answers each path in the form of the draft that path
//! belongs to: two segments after `subscriptions/` are draft-08's
//! `{match_type}/{match}` when the first is `exact` or `urlpattern`, else
//! draft-07's `{topic}/{subscriber}`.
//!
//! A subscriber is `urn:uuid:` and a random UUID, one per stream, kept
//! with its matchers and its token's payloads on the heap, beside the
//! stream's subscription in the registry (see [`Present`]): the API reads
//! this node's open streams. With Redis the updates reach every node, the
//! API lists this node's subscribers only.
//!
//! Nothing of it runs on a stream thread's deep frames: the updates are
//! made and published on a worker thread (`App::workers`).

use std::any::Any;
use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use serde_json::{Value, json};

use super::App;
use super::access::{Admission, How};
use crate::daemon::auth::random_secret;
use crate::daemon::jwt::Payloads;
use crate::http::request::push_encoded;
use crate::hub::fanout::SubscriberQueue;
use crate::hub::id::topic_problem;
use crate::stream::registry::Following;
use crate::{Event, Hub, Request, Response, Stream};

/// The subscriptions API's root, and the prefix of subscription topics.
pub(super) const SUBSCRIPTIONS_PATH: &str = "/.well-known/mercure/subscriptions";

/// Most subscriptions a collection lists (the drafts let a hub truncate),
/// and about the most bytes of them: a collection is built whole.
const MAX_LISTED: usize = 10_000;
const MAX_LISTED_BYTES: usize = 4 << 20;

thread_local! {
    /// The payloads of the credential a Mercure stream was admitted with,
    /// from its admission to [`App::following`] (see `keep_payloads`).
    static PAYLOADS: RefCell<Option<Arc<Payloads>>> = const { RefCell::new(None) };
}

/// How a subscription names what it follows: draft-07's `topic=`, or a
/// draft-08 matcher type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Topic,
    Exact,
    UrlPattern,
}

impl Kind {
    /// The kind of a subscriber's query parameter, if it names a matcher.
    fn of_param(name: &str) -> Option<Kind> {
        match name {
            "topic" => Some(Kind::Topic),
            "match" | "match_exact" => Some(Kind::Exact),
            "match_urlpattern" => Some(Kind::UrlPattern),
            _ => None,
        }
    }

    /// A draft-08 matcher type, by its canonical name.
    fn of_type(name: &str) -> Option<Kind> {
        match name {
            "exact" => Some(Kind::Exact),
            "urlpattern" => Some(Kind::UrlPattern),
            _ => None,
        }
    }

    /// Its draft-08 name; none for draft-07's topic.
    fn type_name(self) -> Option<&'static str> {
        match self {
            Kind::Topic => None,
            Kind::Exact => Some("exact"),
            Kind::UrlPattern => Some("urlpattern"),
        }
    }
}

/// Who a Mercure subscriber is, for its subscription updates and the API.
#[derive(Debug)]
struct Presence {
    /// `urn:uuid:…`.
    subscriber: Box<str>,
    /// Its matchers, as it gave them.
    matchers: Vec<(Kind, Box<str>)>,
    payloads: Option<Arc<Payloads>>,
    /// Set when its stream ended: the API leaves it out.
    gone: AtomicBool,
}

/// A Mercure subscriber's entry in the registry: its subscription (for the
/// operators' listing) and its presence.
pub(super) struct Present {
    queue: Arc<SubscriberQueue>,
    presence: Arc<Presence>,
}

impl Following for Present {
    fn kind(&self) -> &'static str {
        self.queue.kind()
    }

    fn each_topic(&self, f: &mut dyn FnMut(&str)) {
        self.queue.each_topic(f);
    }

    fn queued(&self) -> usize {
        self.queue.queued()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The path of `segments` under [`SUBSCRIPTIONS_PATH`], each encoded.
fn path_of(segments: &[&str]) -> String {
    let mut out = String::from(SUBSCRIPTIONS_PATH);
    for s in segments {
        out.push('/');
        push_encoded(&mut out, s);
    }
    out
}

/// The topic (and id) of the subscription by `matcher` of `kind`.
fn topic_of(kind: Kind, matcher: &str, subscriber: &str) -> String {
    match kind.type_name() {
        None => path_of(&[matcher, subscriber]),
        Some(t) => path_of(&[t, matcher, subscriber]),
    }
}

impl Presence {
    /// The document of its subscription by `matcher`, as its draft defines
    /// it.
    fn document(&self, kind: Kind, matcher: &str, active: bool) -> Value {
        let id = topic_of(kind, matcher, &self.subscriber);
        let mut doc = match kind.type_name() {
            None => json!({
                "@context": "https://mercure.rocks/",
                "id": id,
                "type": "Subscription",
                "topic": matcher,
            }),
            Some(t) => json!({
                "id": id,
                "type": "subscription",
                "match_type": t,
                "match": matcher,
            }),
        };
        doc["subscriber"] = Value::from(&*self.subscriber);
        doc["active"] = Value::from(active);
        if let Some(p) = self.payloads.as_ref().and_then(|p| p.of(matcher)) {
            doc["payload"] = p.clone();
        }
        doc
    }

    /// Publishes its subscription updates (`active` or not), as private
    /// updates. On a worker thread.
    fn publish(&self, hub: &Hub, active: bool) {
        for (kind, matcher) in &self.matchers {
            let doc = self.document(*kind, matcher, active);
            let topic = doc["id"].as_str().unwrap_or_default().to_owned();
            let mut event = Event::new().data(doc.to_string());
            if *kind != Kind::Topic {
                // Draft-08's reserved type, which publishers cannot use.
                event = event.event("mercure");
            }
            if let Err(e) = hub.publish_update(&[topic.as_str()], event, true) {
                log::warn!(
                    "a subscription update to {topic:?} was not published: {}",
                    crate::Report(&e)
                );
            }
        }
    }
}

/// A random `urn:uuid:` (version 4).
fn new_subscriber() -> std::io::Result<Box<str>> {
    let hex = random_secret()?; // 32 hex digits
    let mut h: Vec<char> = hex.chars().collect();
    h[12] = '4';
    h[16] = ['8', '9', 'a', 'b'][h[16].to_digit(16).unwrap_or(0) as usize & 3];
    let s: String = h.into_iter().collect();
    let uuid = format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &s[..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..]
    );
    Ok(uuid.into())
}

/// Runs `job` on a worker, or logs why it was not.
fn on_worker(app: &App, job: impl FnOnce() + Send + 'static) {
    if let Err(e) = app.workers.run(job) {
        log::warn!(
            "subscription updates were not published: {}",
            crate::Report(&e)
        );
    }
}

impl App {
    /// Keeps the payloads of a Mercure stream's credential for
    /// [`following`](App::following), when active subscriptions are on.
    #[inline(never)]
    pub(super) fn keep_payloads(&self, admission: &Admission) {
        if !self.config.mercure_subscriptions {
            return;
        }
        let payloads = admission.as_ref().ok().and_then(|c| c.payloads.clone());
        PAYLOADS.with(|p| *p.borrow_mut() = payloads);
    }

    /// Forgets what [`keep_payloads`](App::keep_payloads) kept, for a
    /// stream that was refused.
    #[cold]
    pub(super) fn drop_payloads(&self) {
        if self.config.mercure_subscriptions {
            PAYLOADS.with(|p| p.borrow_mut().take());
        }
    }

    /// Tells the registry that `stream` follows `sub`; with active
    /// subscriptions, with who it is, and publishes its subscribe updates
    /// (on a worker).
    #[inline(never)]
    pub(super) fn following(&self, req: &Request, stream: &Stream, sub: &crate::Subscription) {
        let payloads = PAYLOADS.with(|p| p.borrow_mut().take());
        let Some(t) = stream
            .tracked()
            .filter(|_| self.config.mercure_subscriptions)
        else {
            super::operators::following(stream, sub);
            return;
        };
        let pairs = req.query_pairs().to_vec();
        let hub = self.hub.clone();
        let made = self.workers.run(move || {
            let subscriber = new_subscriber()?;
            let matchers = pairs
                .into_iter()
                .filter_map(|(k, v)| Some((Kind::of_param(&k)?, v.into_boxed_str())))
                .collect();
            let presence = Arc::new(Presence {
                subscriber,
                matchers,
                payloads,
                gone: AtomicBool::new(false),
            });
            presence.publish(&hub, true);
            Ok::<_, std::io::Error>(presence)
        });
        match made {
            Ok(Ok(presence)) => t.set_follows(Arc::new(Present {
                queue: Arc::clone(&sub.queue),
                presence,
            })),
            Ok(Err(e)) => {
                log::warn!("no subscriber id: {e}");
                super::operators::following(stream, sub);
            }
            Err(e) => {
                log::warn!("subscription updates not published: {}", crate::Report(&e));
                super::operators::following(stream, sub);
            }
        }
    }

    /// `stream`'s subscription ended: publishes its unsubscribe updates
    /// (on a worker), if it was announced.
    #[cold]
    #[inline(never)]
    pub(super) fn unfollowed(&self, stream: &Stream) {
        let presence = stream
            .tracked()
            .and_then(|t| t.follows())
            .and_then(|f| f.as_any().downcast_ref::<Present>())
            .map(|p| Arc::clone(&p.presence));
        let Some(presence) = presence else { return };
        presence.gone.store(true, Relaxed);
        let hub = self.hub.clone();
        on_worker(self, move || presence.publish(&hub, false));
    }

    /// `GET /.well-known/mercure/subscriptions[/{topic}[/{subscriber}]]`
    /// (draft-07) and `…/subscriptions/{match_type}/{match}[/{subscriber}]`
    /// (draft-08): the collection, or the one subscription, of this node's
    /// subscribers that the path names; for a credential whose subscribe
    /// grant covers the path.
    pub(super) fn subscriptions(&self, req: &Request) -> Response {
        let r = self.subscriptions_inner(req);
        self.with_cors(req, r)
    }

    fn subscriptions_inner(&self, req: &Request) -> Response {
        let segments: Vec<&str> = ["a", "b", "c"].iter().map_while(|n| req.param(n)).collect();
        if let Some((s, why)) = segments
            .iter()
            .find_map(|s| topic_problem(s).map(|why| (s, why)))
        {
            return super::streams::bad_topic(s, why);
        }
        // Which subscriptions the path names: draft-08's form has a matcher
        // type first.
        let (draft08, kind, matcher, subscriber) = match segments[..] {
            [] => (false, None, None, None),
            [t] => (false, Some(Kind::Topic), Some(t), None),
            [t, m] if Kind::of_type(t).is_some() => (true, Kind::of_type(t), Some(m), None),
            [t, s] => (false, Some(Kind::Topic), Some(t), Some(s)),
            [t, m, s] => match Kind::of_type(t) {
                Some(k) => (true, Some(k), Some(m), Some(s)),
                None => return Response::text(404, "no such matcher type: exact, urlpattern"),
            },
            _ => return Response::text(404, "no such subscription"),
        };
        let id = path_of(&segments);
        if let Err(r) = self.cors(req) {
            return r;
        }
        match self.authorize_subscribe(req) {
            Ok(c) if c.how == How::Anonymous => {
                return Self::unauthorized("the subscriptions API needs a credential");
            }
            Ok(c) if !c.grant.can_subscribe(&id) => return Self::forbidden("topic", &id),
            Ok(_) => {}
            Err(r) => return r,
        }
        let Some(registry) = self.registry.get() else {
            return Response::text(503, "the server is not running yet");
        };
        let mut found = Vec::new();
        let mut bytes = 0;
        'all: for page in registry.ids().chunks(128) {
            for t in registry.page(page) {
                let Some(p) = t
                    .follows()
                    .and_then(|f| f.as_any().downcast_ref::<Present>())
                    .map(|p| &p.presence)
                else {
                    continue;
                };
                if t.is_ending() || p.gone.load(Relaxed) {
                    continue;
                }
                if subscriber.is_some_and(|s| s != &*p.subscriber) {
                    continue;
                }
                for (k, m) in &p.matchers {
                    if kind.is_none_or(|want| want == *k) && matcher.is_none_or(|want| want == &**m)
                    {
                        let doc = p.document(*k, m, true);
                        // The matcher is in it twice (once encoded), and
                        // the payload once.
                        bytes += 3 * m.len()
                            + doc.get("payload").map_or(0, |v| v.to_string().len())
                            + 256;
                        found.push(doc);
                        if found.len() == MAX_LISTED || bytes > MAX_LISTED_BYTES {
                            break 'all;
                        }
                    }
                }
            }
        }
        let last = self.hub.last_id();
        let last = if last <= crate::hub::id::EventId::floor_of(0) {
            "earliest".to_owned()
        } else {
            last.to_string()
        };
        let doc = if subscriber.is_some() {
            let Some(mut doc) = found.pop() else {
                return Response::text(404, "no such subscription");
            };
            if !draft08 {
                doc["lastEventID"] = Value::from(last.as_str());
            }
            doc
        } else if draft08 {
            json!({"id": id, "type": "subscriptions", "subscriptions": found})
        } else {
            json!({
                "@context": "https://mercure.rocks/",
                "id": id,
                "type": "Subscriptions",
                "lastEventID": last,
                "subscriptions": found,
            })
        };
        let kind = if draft08 {
            "application/json"
        } else {
            "application/ld+json"
        };
        Response::new(200)
            .with_header("Content-Type", kind)
            .with_body(doc.to_string())
            .with_header(
                "Link",
                &format!(
                    "<{}>; rel=\"mercure\"; last-event-id=\"{last}\"; type=\"mercure\"; \
                     content-type=\"application/json\"",
                    super::mercure::MERCURE_PATH
                ),
            )
            .with_header("Cache-Control", "no-store")
    }
}
