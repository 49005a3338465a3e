//! The daemon's routes: subscribe, publish, mailboxes, tickets, health,
//! metrics and the demo page, over a [`Hub`].

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::auth::{self, Pass, SESSION_COOKIE, TICKET_TTL, Tickets};
use super::config::{Config, OverloadMode};
use super::error::SetupError;
use super::jwt::{Claims, JwtVerifier, VerifierPool};
use crate::bridge::postgres::{Listener, ListenerState};
use crate::hub::grant::{Grant, Selector, parse_selectors};
use crate::hub::{MemoryHistory, valid_name};
use crate::server::limits::clients::ClientStreams;
use crate::server::limits::rate::{RateLimiter, retry_after_secs};
use crate::{
    Capacity, EndReason, Event, Hub, HubConfig, Overload, Request, Response, Server,
    ShutdownHandle, Stats, Stream, StreamError,
};

/// The demo page served at `/`.
pub const DEMO_PAGE: &str = include_str!("demo.html");
/// Gives back the place a stream's handler took under
/// `max_streams_per_client` (see `App::count_named_client`) as the handler
/// returns, before the stream stops counting as open: whoever sees it
/// closed may open another at once. (The thread's end would give it back
/// too, a moment later.)
fn with_held_released<T>(result: T) -> T {
    HELD.with(|h| h.borrow_mut().take());
    result
}

/// The JWT a stream request will be authorized with, if any: the Bearer
/// token unless it is the subscribe token; else the JWT cookie, unless
/// `?token=`, a ticket or a session decides first.
fn stream_jwt<'r>(req: &'r Request, config: &Config) -> Option<&'r str> {
    let token = match auth::bearer(req) {
        Some(given) => {
            let static_token = config
                .subscribe_token
                .as_deref()
                .is_some_and(|t| auth::constant_time_eq(t.as_bytes(), given.as_bytes()));
            (!static_token).then_some(given)
        }
        None if req.query("token").is_some()
            || req.query("ticket").is_some()
            || auth::cookie(req, SESSION_COOKIE).is_some() =>
        {
            None
        }
        None => auth::cookie(req, &config.jwt_cookie),
    };
    token.filter(|t| JwtVerifier::looks_like_jwt(t))
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
    /// A stream thread's JWT, verified ahead (see [`App::verify_ahead`]).
    #[allow(clippy::type_complexity)]
    static VERIFIED: std::cell::RefCell<Option<Box<(String, Result<Claims, super::jwt::JwtError>)>>> =
        const { std::cell::RefCell::new(None) };
}

/// Threads that verify the JWTs of new streams (see [`VerifierPool`]).
const JWT_THREADS: usize = 2;
/// Most topics one stream may follow.
pub const MAX_TOPICS_PER_STREAM: usize = 64;

/// Shared state of the routes.
struct App {
    config: Config,
    hub: Hub,
    stats: Stats,
    tickets: Tickets,
    started: Instant,
    capacity: OnceLock<Capacity>,
    /// The server's count of streams per client, for the streams whose
    /// client only the handler knows (a JWT's subject).
    clients: OnceLock<Arc<ClientStreams>>,
    /// `publish_rate`, per publisher credential else address.
    publish_limit: Option<RateLimiter>,
    /// Verifies JWTs, when `[auth]` has a JWT key.
    jwt: Option<VerifierPool>,
    /// One per `[[postgres]]` table, started once the server is bound; they
    /// stop when the routes (and so this state) are dropped, or at shutdown.
    postgres: OnceLock<Vec<Listener>>,
}

/// A built daemon: the server to run and the hub it serves.
#[derive(Debug)]
pub struct Daemon {
    /// The server, bound and ready to run.
    pub server: Server,
    /// The hub, to publish into from the embedding program.
    pub hub: Hub,
}

/// Builds the daemon's server from `config`, obeying `shutdown`.
///
/// # Errors
///
/// When the listen address cannot be bound or resolved, or the store in
/// `data_dir` cannot be opened ([`SetupError::Store`]), or the Redis engine
/// cannot be set up ([`SetupError::Engine`]).
pub fn build(config: Config, shutdown: ShutdownHandle) -> Result<Daemon, SetupError> {
    // With a data_dir, history and mailboxes are kept on disk too, and what
    // was kept there is back; without, they live in memory only.
    // With Redis, history, ids and mailboxes live there, shared by every
    // node (config refuses it together with data_dir).
    let hub_config = hub_config(&config);
    // Memory the stream cap must leave alone.
    let reserve = hub_config.max_retained_bytes;
    let hub = match (&config.redis_url, &config.data_dir) {
        (Some(url), _) => {
            Hub::with_redis(url, config.history, hub_config).map_err(SetupError::Engine)?
        }
        (None, Some(dir)) => crate::hub::store::open_hub(dir, config.history, hub_config)?,
        (None, None) => Hub::with_history(Box::new(MemoryHistory::new(config.history)), hub_config),
    };
    let jwt = config
        .jwt_verifier()
        .map_err(|(key, message)| SetupError::Auth { key, message })?;
    let stats = Stats::new();
    let app = Arc::new(App {
        hub: hub.clone(),
        stats: stats.clone(),
        tickets: Tickets::default(),
        started: Instant::now(),
        capacity: OnceLock::new(),
        clients: OnceLock::new(),
        postgres: OnceLock::new(),
        publish_limit: config.publish_rate.map(RateLimiter::new),
        jwt: jwt.map(|v| VerifierPool::start(v, JWT_THREADS)),
        config,
    });
    let c = &app.config;
    let mut builder = Server::builder()
        .listen(c.listen.clone())
        .max_execution_time(c.max_execution_time)
        .heartbeat(c.heartbeat)
        .heartbeat_event(c.heartbeat_event)
        .request_timeout(c.request_timeout)
        .write_timeout(c.write_timeout)
        .max_body(c.max_body)
        .stack_size(c.stack_size)
        .memory_reserve(reserve)
        .max_streams_per_client(c.max_streams_per_client)
        .trusted_proxies(c.trusted_proxies.iter().copied())
        .stats(stats)
        .shutdown_handle(shutdown.clone());
    if let Some(n) = c.max_connections {
        builder = builder.max_connections(n);
    }
    if let Some(certs) = &c.tls {
        builder = builder.tls(certs.clone());
    }
    if c.overload == OverloadMode::Retry {
        builder = builder.overload(Overload::Retry {
            min: c.overload_retry.0,
            max: c.overload_retry.1,
        });
    }
    let a = |app: &Arc<App>| Arc::clone(app);
    let builder = builder
        .get("/", |_req| Response::html(DEMO_PAGE))
        // Browsers ask for it on every page; answer without a 404 in their console.
        .get("/favicon.ico", |_req| Response::no_content())
        .route("/events/{topic}", {
            let app = a(&app);
            move |req, stream| with_held_released(app.subscribe(req, stream))
        })
        .route("/events", {
            let app = a(&app);
            move |req, stream| with_held_released(app.subscribe(req, stream))
        })
        .post("/publish/{topic}", {
            let app = a(&app);
            move |req| app.publish(req)
        })
        .post("/keys/{key}", {
            let app = a(&app);
            move |req| app.push(req)
        })
        .route("/keys/{key}", {
            let app = a(&app);
            move |req, stream| with_held_released(app.consume(req, stream))
        })
        .post("/tickets", {
            let app = a(&app);
            move |req| app.ticket(req)
        })
        .get("/healthz", {
            let app = a(&app);
            move |_req| app.healthz()
        })
        .get("/metrics", {
            let app = a(&app);
            move |_req| app.metrics()
        });
    let builder = [
        "/events",
        "/events/{topic}",
        "/keys/{key}",
        "/publish/{topic}",
        "/tickets",
    ]
    .into_iter()
    .fold(builder, |b, path| {
        let app = a(&app);
        b.handle("OPTIONS", path, move |req| app.preflight(req))
    });
    let builder = if c.max_streams_per_client > 0 && app.jwt.is_some() {
        let config = app.config.clone();
        builder.client_named_by_handler(move |req| {
            stream_jwt(req, &config)
                .and_then(super::jwt::unverified_subject)
                .is_some()
        })
    } else {
        builder
    };
    let server = builder.build()?;
    let _ = app.capacity.set(server.capacity().clone()); // set once, right here
    let _ = app.clients.set(Arc::clone(&server.shared().clients));
    let listeners = app
        .config
        .postgres
        .iter()
        .map(|pg| Listener::start(hub.clone(), &pg.url, pg.routes(), shutdown.clone()))
        .collect();
    let _ = app.postgres.set(listeners); // set once, right here
    Ok(Daemon { server, hub })
}

/// The hub's settings from the daemon's: the retained budget (derived
/// from memory when not set, none with Redis) and the frame bound.
fn hub_config(config: &Config) -> HubConfig {
    // With Redis, events and mailboxes are kept there (its `maxmemory`
    // bounds them), not in this process.
    let max_retained_bytes = match (&config.redis_url, config.max_retained_bytes) {
        (Some(_), _) => 0,
        (None, Some(n)) => n,
        (None, None) => derived_retained_bytes(),
    };
    HubConfig {
        max_retained_bytes,
        max_frame: max_frame(config.max_body),
        ..HubConfig::default()
    }
}

/// How many times `max_body` an event's frame may be: room for a `data: `
/// per line of ordinary text, not for a body of line breaks (about seven
/// times its size).
pub const MAX_FRAME_PER_BODY: usize = 2;
/// Bytes an event's frame may have besides that: its id line, an event
/// name and the field names of a short body.
pub const FRAME_SLACK: usize = 256;

/// The largest frame a publish may make with `max_body`.
pub fn max_frame(max_body: usize) -> usize {
    max_body
        .saturating_mul(MAX_FRAME_PER_BODY)
        .saturating_add(FRAME_SLACK)
}

/// The retained budget when `max_retained_bytes` is not set: an eighth of
/// the memory available at start (the cgroup's, in one), at least
/// [`MIN_RETAINED_BYTES`](super::config::MIN_RETAINED_BYTES).
fn derived_retained_bytes() -> u64 {
    let available = crate::memory_info().map_or(512 * 1024 * 1024, |m| m.available);
    (available / 8).max(super::config::MIN_RETAINED_BYTES)
}

/// How a request proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// No credential (let in where `anonymous` allows).
    Anonymous,
    /// A static token.
    Token,
    /// A ticket, spent now: its stream sets the session cookie.
    Ticket,
    /// A ticket's session cookie.
    Session,
    /// A JWT.
    Jwt,
}

/// What a request's credential grants.
#[derive(Debug, Clone)]
struct Credential {
    how: How,
    grant: Grant,
    /// When the credential expires (a JWT's `exp`): its stream ends then.
    expires: Option<SystemTime>,
    /// Who it names (a JWT's `sub`): the client `max_streams_per_client`
    /// counts its streams against.
    subject: Option<String>,
}

impl Credential {
    fn new(how: How, grant: Grant) -> Credential {
        Credential {
            how,
            grant,
            expires: None,
            subject: None,
        }
    }

    fn pass(how: How, pass: Pass) -> Credential {
        Credential {
            how,
            grant: pass.grant,
            expires: pass.expires,
            subject: None,
        }
    }

    fn jwt(claims: Claims) -> Credential {
        Credential {
            how: How::Jwt,
            grant: claims.grant,
            expires: claims.expires,
            subject: claims.subject,
        }
    }
}

/// What a stream is opened for: the grant must cover it.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    Topics(&'a [&'a str]),
    Mailbox(&'a str),
}

impl App {
    // ----- access --------------------------------------------------------

    fn unauthorized(message: &str) -> Response {
        Response::text(401, message).with_header("WWW-Authenticate", "Bearer realm=\"ssed\"")
    }

    fn invalid_token() -> Response {
        Response::text(401, "invalid token").with_header(
            "WWW-Authenticate",
            "Bearer realm=\"ssed\", error=\"invalid_token\"",
        )
    }

    fn forbidden(what: &str, name: &str) -> Response {
        let shown: String = name.chars().take(64).collect();
        Response::text(
            403,
            format!("your credential does not cover {what} {shown:?}"),
        )
        .with_header(
            "WWW-Authenticate",
            "Bearer realm=\"ssed\", error=\"insufficient_scope\"",
        )
    }

    fn token_matches(configured: &str, given: Option<&str>) -> bool {
        given.is_some_and(|g| auth::constant_time_eq(g.as_bytes(), configured.as_bytes()))
    }

    /// Verifies `token` as a JWT, when JWT keys are configured and it
    /// looks like one; `None` when it is not a JWT to us. A stream's
    /// thread finds the answer [verified ahead](App::verify_ahead).
    fn jwt(&self, token: &str) -> Option<Result<Claims, Response>> {
        let pool = self.jwt.as_ref()?;
        JwtVerifier::looks_like_jwt(token).then(|| {
            let ahead = VERIFIED.with(|v| v.borrow_mut().take()).map(|b| *b);
            match ahead {
                Some((t, verified)) if t == token => verified,
                _ => pool.verify(token, SystemTime::now()),
            }
            .map_err(|_| Self::invalid_token())
        })
    }

    /// The JWT of the `jwt_cookie` cookie, if one came and keys are set.
    fn jwt_cookie(&self, req: &Request) -> Option<Result<Claims, Response>> {
        self.jwt.as_ref()?;
        let token = auth::cookie(req, &self.config.jwt_cookie)?;
        self.jwt(token).or_else(|| Some(Err(Self::invalid_token())))
    }

    /// On a stream's thread, before anything else: verifies the JWT the
    /// request will be authorized with, if any, on a verifier thread, and
    /// leaves the answer for [`jwt`](App::jwt). Called where the stack is
    /// still shallow: waiting for the answer deeper down (where access is
    /// checked) took a second stack page, which stays resident for the
    /// stream's life.
    #[inline(never)]
    fn verify_ahead(&self, req: &Request) {
        let Some(pool) = &self.jwt else { return };
        let Some(token) = stream_jwt(req, &self.config) else {
            return;
        };
        let verified = pool.verify_elsewhere(token, SystemTime::now());
        VERIFIED.with(|v| *v.borrow_mut() = Some(Box::new((token.to_owned(), verified))));
    }

    /// Who a new stream's client is, and whether its grant covers
    /// `target`.
    #[inline(never)]
    fn admit_credential(&self, req: &Request, target: Target<'_>) -> Result<Credential, Response> {
        let cred = self.authorize_subscribe(req)?;
        match self.refuse_target(req, &cred, target) {
            Some(refusal) => Err(refusal),
            None => Ok(cred),
        }
    }

    #[cold]
    fn needs_credential() -> Response {
        Self::unauthorized(
            "subscribing needs a credential: the subscribe token (Bearer or ?token=), a ticket \
             (?ticket=) or a JWT (Bearer or cookie)",
        )
    }

    /// Who a subscriber is: a Bearer token (the subscribe token, a JWT),
    /// `?token=`, a ticket, its session cookie, a JWT cookie, or nobody
    /// (where `anonymous` lets it in).
    fn authorize_subscribe(&self, req: &Request) -> Result<Credential, Response> {
        let token = self.config.subscribe_token.as_deref();
        let credentials = self.config.subscriber_credentials();
        if let Some(given) = auth::bearer(req).filter(|_| credentials) {
            if token.is_some_and(|t| Self::token_matches(t, Some(given))) {
                return Ok(Credential::new(How::Token, Grant::subscribe_all()));
            }
            return match self.jwt(given) {
                Some(claims) => claims.map(Credential::jwt),
                None => Err(Self::unauthorized("wrong subscribe token")),
            };
        }
        if let Some(given) = req.query("token").filter(|_| credentials) {
            if token.is_some_and(|t| Self::token_matches(t, Some(given))) {
                return Ok(Credential::new(How::Token, Grant::subscribe_all()));
            }
            return Err(Self::unauthorized("wrong subscribe token"));
        }
        let session = || auth::cookie(req, SESSION_COOKIE).and_then(|s| self.tickets.session(s));
        if let Some(ticket) = req.query("ticket").filter(|_| credentials) {
            if let Some(pass) = self.tickets.redeem(ticket) {
                return Ok(Credential::pass(How::Ticket, pass));
            }
            // A spent ticket may still come with a live session cookie
            // (the browser reconnecting with the same URL).
            if let Some(pass) = session() {
                return Ok(Credential::pass(How::Session, pass));
            }
            return Err(Self::unauthorized(
                "ticket invalid, spent or expired: get a new one with POST /tickets",
            ));
        }
        if let Some(pass) = session() {
            return Ok(Credential::pass(How::Session, pass));
        }
        if let Some(claims) = self.jwt_cookie(req) {
            if !self.cookie_origin_allowed(req) {
                return Err(Self::cookie_from_elsewhere(req));
            }
            return claims.map(Credential::jwt);
        }
        if self.config.anonymous_allowed() {
            return Ok(Credential::new(How::Anonymous, Grant::none()));
        }
        Err(Self::needs_credential())
    }

    /// Whether `cred` may open a stream of `target`: `None` if so, else
    /// the refusal. Anonymous subscribers follow any topic (its public
    /// updates); a mailbox always needs a grant covering its key, except
    /// from this machine when no subscriber credential is configured.
    fn refuse_target(
        &self,
        req: &Request,
        cred: &Credential,
        target: Target<'_>,
    ) -> Option<Response> {
        match (cred.how, target) {
            (How::Anonymous, Target::Topics(_)) => None,
            (How::Anonymous, Target::Mailbox(_))
                if !self.config.subscriber_credentials()
                    && auth::is_loopback(req.peer_addr().ip())
                    && !proxied(req) =>
            {
                None
            }
            (How::Anonymous, Target::Mailbox(key)) => Some(Self::unauthorized(&format!(
                "consuming mailbox {key:?} needs a credential whose subscribe grant covers it \
                 (a scoped ticket from POST /tickets, a JWT, the subscribe token)"
            ))),
            (_, Target::Topics(topics)) => topics
                .iter()
                .find(|t| !cred.grant.can_subscribe(t))
                .map(|t| Self::forbidden("topic", t)),
            (_, Target::Mailbox(key)) => {
                (!cred.grant.can_subscribe(key)).then(|| Self::forbidden("mailbox", key))
            }
        }
    }

    /// Whether this request may publish to (or push into) `name`. `Ok`
    /// carries the credential publishes are counted against for
    /// `publish_rate` (`None`: this machine, counted by address).
    fn authorize_publish(&self, req: &Request, name: &str) -> Result<Option<String>, Response> {
        let token = self.config.publish_token.as_deref();
        let bearer = auth::bearer(req);
        if let Some(given) = bearer {
            if token.is_some_and(|t| Self::token_matches(t, Some(given))) {
                return Ok(Some(format!("token:{given}")));
            }
            if let Some(claims) = self.jwt(given) {
                let claims = claims?;
                if !claims.grant.can_publish(name) {
                    return Err(Self::forbidden("topic", name));
                }
                return Ok(Some(publisher_key(claims.subject.as_deref(), given)));
            }
        }
        // A browser publishing with its JWT cookie, from a page of this
        // origin or one listed by name: with `cors_origins = ["*"]` any
        // site's page could otherwise publish with the user's cookie.
        if bearer.is_none()
            && let Some(claims) = self.jwt_cookie(req)
        {
            if !self.cookie_origin_allowed(req) {
                return Err(Self::cookie_from_elsewhere(req));
            }
            let claims = claims?;
            if !claims.grant.can_publish(name) {
                return Err(Self::forbidden("topic", name));
            }
            let token = auth::cookie(req, &self.config.jwt_cookie).unwrap_or_default();
            return Ok(Some(publisher_key(claims.subject.as_deref(), token)));
        }
        if self.config.publisher_credentials() {
            return Err(match bearer {
                Some(_) => Self::unauthorized("wrong publish token"),
                None => Self::unauthorized(
                    "publishing needs Authorization: Bearer <publish_token or a JWT>",
                ),
            });
        }
        self.authorize_this_machine(req).map(|()| None)
    }

    /// With no publisher credential configured, this machine may publish:
    /// a direct loopback connection under a Host no web page can take
    /// over, from no page of another origin.
    fn authorize_this_machine(&self, req: &Request) -> Result<(), Response> {
        let direct = auth::is_loopback(req.peer_addr().ip()) && !proxied(req);
        // A reverse proxy on this machine connects from loopback on
        // behalf of anyone: a request it forwarded is not "this machine"
        // publishing. Nor is a page in a browser here that reached us
        // under its own name (DNS rebinding): the Host it sends is that
        // name.
        if direct && local_host(req.header("host"), &self.config.allowed_hosts) {
            // A page of another origin in a browser here is not this
            // machine either, unless cors_origins names it: `*` lets any
            // page subscribe, not publish with this machine's right. (A
            // direct request's scheme is its connection's: https over
            // ssed's TLS.)
            return match req.header("origin") {
                Some(origin)
                    if !same_origin(origin, req.header("host"), req.scheme())
                        && !self.cors_lists(origin) =>
                {
                    Err(Response::text(
                        403,
                        format!(
                            "publishing from a page of {origin} is refused: with no publish \
                             credential set, only this machine's own pages, or origins listed \
                             by name in cors_origins, may publish"
                        ),
                    ))
                }
                _ => Ok(()),
            };
        }
        Err(Response::text(
            403,
            if direct {
                format!(
                    "publishing with Host {:?} is refused: with no publish credential set, a \
                     request from this machine may publish only under an IP address, \
                     localhost or a name listed in allowed_hosts (a web page that reached \
                     this server under its own name must not)",
                    req.header("host").unwrap_or_default()
                )
            } else if proxied(req) {
                "publishing through a proxy is refused: with no publish credential set, only \
                 a direct connection from this machine may publish"
                    .to_owned()
            } else {
                format!(
                    "publishing from {} is refused: with no publish credential set, only this \
                     machine may publish",
                    req.peer_addr().ip()
                )
            },
        ))
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
        let slot = clients.acquire_named(&format!("sub:{sub}"));
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

    /// Whether a credential in a cookie may be used by this request: no
    /// page (no `Origin`), a page of this origin, or one listed by name in
    /// `cors_origins`, never merely by `*`.
    fn cookie_origin_allowed(&self, req: &Request) -> bool {
        req.header("origin").is_none_or(|origin| {
            same_origin(origin, req.header("host"), req.scheme()) || self.cors_lists(origin)
        })
    }

    #[cold]
    fn cookie_from_elsewhere(req: &Request) -> Response {
        Response::text(
            403,
            format!(
                "the JWT cookie is not accepted from a page of {}: list that origin by name in \
                 cors_origins",
                req.header("origin").unwrap_or_default()
            ),
        )
    }

    /// Whether `origin` is listed by name in `cors_origins` (not by `*`).
    fn cors_lists(&self, origin: &str) -> bool {
        self.config
            .cors_origins
            .iter()
            .any(|o| o.trim_end_matches('/') == origin)
    }

    /// CORS headers for an allowed cross-origin request; `Err(403)` for a
    /// cross-origin request from an origin not listed. Out of line: a
    /// stream's thread calls it on its way in (see `open_stream`).
    #[inline(never)]
    fn cors(&self, req: &Request) -> Result<Vec<(&'static str, String)>, Response> {
        let Some(origin) = req.header("origin") else {
            return Ok(Vec::new());
        };
        if same_origin(origin, req.header("host"), req.scheme()) {
            return Ok(Vec::new());
        }
        let allowed = self
            .config
            .cors_origins
            .iter()
            .any(|o| o == "*" || o.trim_end_matches('/') == origin);
        if !allowed {
            return Err(Response::text(
                403,
                format!("origin {origin} is not allowed (cors_origins)"),
            ));
        }
        // Credentials (the ticket cookie) need the exact origin, not `*`.
        Ok(vec![
            ("Access-Control-Allow-Origin", origin.to_owned()),
            ("Access-Control-Allow-Credentials", "true".to_owned()),
            ("Vary", "Origin".to_owned()),
        ])
    }

    fn with_cors(&self, req: &Request, r: Response) -> Response {
        match self.cors(req) {
            Ok(headers) => headers.iter().fold(r, |r, (k, v)| r.with_header(k, v)),
            Err(_) => r,
        }
    }

    fn preflight(&self, req: &Request) -> Response {
        match self.cors(req) {
            Ok(headers) => headers.iter().fold(
                Response::no_content()
                    .with_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
                    .with_header(
                        "Access-Control-Allow-Headers",
                        "Authorization, Content-Type, Last-Event-ID",
                    )
                    .with_header("Access-Control-Max-Age", "600"),
                |r, (k, v)| r.with_header(k, v),
            ),
            Err(r) => r,
        }
    }

    // ----- streams ---------------------------------------------------------

    /// Common opening of a subscriber stream: CORS, access, cookie, retry.
    /// The head goes out now, or with `later` it waits for the stream's
    /// first write (a followed subscription hands that to a waker thread).
    ///
    /// Stream threads keep every stack page they touch for the stream's
    /// life, so the uncommon branches here and in `subscribe` (refusals,
    /// tickets, errors) live in functions of their own, kept out of line:
    /// their locals do not deepen the common path.
    fn open_stream(
        &self,
        req: &Request,
        stream: &mut Stream,
        later: bool,
        target: Target<'_>,
    ) -> Result<bool, StreamError> {
        if !self.admit_stream(req, stream, target)? {
            return Ok(false);
        }
        if later {
            stream.retry_on_open(self.config.retry)?;
        } else if self.config.retry.is_zero() {
            stream.open()?;
        } else {
            stream.retry(self.config.retry)?;
        }
        Ok(true)
    }

    /// CORS and access for a new stream: sets the headers they call for
    /// and answers a refused one (false).
    #[inline(never)]
    fn admit_stream(
        &self,
        req: &Request,
        stream: &mut Stream,
        target: Target<'_>,
    ) -> Result<bool, StreamError> {
        let cors = match self.cors(req) {
            Ok(h) => h,
            Err(r) => {
                stream.respond(r)?;
                return Ok(false);
            }
        };
        let cred = match self.admit_credential(req, target) {
            Ok(a) => a,
            Err(r) => {
                stream.respond(self.with_cors(req, r))?;
                return Ok(false);
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
            return Ok(false);
        }
        if let Some(exp) = cred.expires {
            end_with_token(stream, exp);
        }
        for (k, v) in &cors {
            stream.header(k, v)?;
        }
        if cred.how == How::Ticket {
            let pass = Pass {
                grant: cred.grant,
                expires: cred.expires,
            };
            self.start_session(req, stream, pass)?;
        }
        Ok(true)
    }

    /// Opens the session a ticket's stream starts, with its cookie. Out
    /// of line, as everything uncommon on a stream's way in: see
    /// `open_stream`.
    #[cold]
    #[inline(never)]
    fn start_session(
        &self,
        req: &Request,
        stream: &mut Stream,
        pass: Pass,
    ) -> Result<(), StreamError> {
        match self.tickets.open_session(self.config.ticket_session, pass) {
            Ok(secret) => {
                // `Secure` when the client is on https (as a trusted proxy
                // says): the browser then never sends the cookie over
                // plain http.
                let secure = if req.scheme() == "https" {
                    "; Secure"
                } else {
                    ""
                };
                let cookie = format!(
                    "{SESSION_COOKIE}={secret}; Max-Age={}; Path=/; HttpOnly; \
                     SameSite=Strict{secure}",
                    self.config.ticket_session.as_secs()
                );
                stream.header("Set-Cookie", &cookie)?;
            }
            Err(e) => log::warn!("cannot open a session for a ticket: {e}"),
        }
        Ok(())
    }

    fn subscribe(&self, req: &Request, stream: &mut Stream) -> Result<(), StreamError> {
        let topics: Vec<&str> = match req.param("topic") {
            Some(t) => vec![t],
            None => req.query_all("topic").collect(),
        };
        if let Some(refusal) = refuse_topics(&topics) {
            return stream.respond(refusal);
        }
        self.verify_ahead(req);
        if !self.open_stream(req, stream, true, Target::Topics(&topics))? {
            return Ok(());
        }
        // Subscribe once admitted (a refused client never holds a queue in
        // the hub) and before the head goes out: a client that has the head
        // gets every event published after it.
        let sub = match self.hub.subscribe(&topics, req.last_event_id()) {
            Ok(sub) => sub,
            Err(e) => return subscribe_failed(stream, &e),
        };
        drop(topics);
        stream.follow(sub)
    }

    fn consume(&self, req: &Request, stream: &mut Stream) -> Result<(), StreamError> {
        let key = req.param("key").unwrap_or_default();
        if !valid_name(key) {
            return stream.respond(bad_name("key", key));
        }
        if let Some(refusal) = self.refuse_rebound_consumer(req) {
            return stream.respond(refusal);
        }
        self.verify_ahead(req);
        if !self.open_stream(req, stream, false, Target::Mailbox(key))? {
            return Ok(());
        }
        stream.consume(&self.hub, key)
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

    // ----- ordinary requests -------------------------------------------------

    fn publish(&self, req: &Request) -> Response {
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
        let publisher = self.authorize_publish(req, name)?;
        self.limit_publish_rate(req, publisher.as_deref())?;
        req.body_str()
            .map_err(|_| Response::text(400, "the body must be UTF-8 text"))
    }

    /// `publish_rate`: counts this publish against its publisher's
    /// allowance, `429` when spent. A publisher is the credential it
    /// authorized with (every holder of the publish token shares one
    /// allowance; a JWT's subject shares one whatever token it comes
    /// with), else its address.
    fn limit_publish_rate(&self, req: &Request, publisher: Option<&str>) -> Result<(), Response> {
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
        match self.hub.publish(topic, event) {
            Ok(p) => Response::json(
                200,
                &json!({"id": p.id.to_string(), "topic": topic, "receivers": p.receivers}),
            ),
            Err(crate::HubError::Storage(_)) => storage_unavailable("the event"),
            Err(crate::HubError::TooLarge { size, max }) => Response::text(
                413,
                format!(
                    "the event would be {size} bytes as sent (a `data: ` line per line of the \
                     body, and its id); the limit is {max} ({MAX_FRAME_PER_BODY} x max_body + {FRAME_SLACK})"
                ),
            ),
            Err(e) => Response::text(400, e.to_string()),
        }
    }

    fn push(&self, req: &Request) -> Response {
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

    fn ticket(&self, req: &Request) -> Response {
        let r = self.ticket_inner(req);
        self.with_cors(req, r)
    }

    fn ticket_inner(&self, req: &Request) -> Response {
        if let Err(r) = self.cors(req) {
            return r;
        }
        if !self.config.subscriber_credentials() {
            return Response::text(
                404,
                "no subscriber credential is set (subscribe_token, a JWT key): subscribing is \
                 open and needs no ticket",
            );
        }
        // The caller's own subscribe grant: the subscribe token's `*`, or
        // a JWT's.
        let token = self.config.subscribe_token.as_deref();
        let mut expires = None;
        let grant = match auth::bearer(req) {
            Some(given) if token.is_some_and(|t| Self::token_matches(t, Some(given))) => {
                Grant::subscribe_all()
            }
            Some(given) => match self.jwt(given) {
                Some(Ok(claims)) => {
                    // The ticket, and the session it starts, end with the
                    // token.
                    expires = claims.expires;
                    Grant::new(claims.grant.subscribe().to_vec(), Vec::new())
                }
                Some(Err(r)) => return r,
                None => return Self::unauthorized("wrong subscribe token"),
            },
            None => {
                return Self::unauthorized(
                    "tickets need Authorization: Bearer <subscribe_token or a JWT>",
                );
            }
        };
        // `{"subscribe": [selectors]}` narrows it.
        let grant = match ticket_selectors(req.body()) {
            Ok(None) => grant,
            Ok(Some(wanted)) => match grant.narrow_subscribe(wanted) {
                Ok(narrow) => narrow,
                Err(missing) => return Self::forbidden("selector", missing.as_str()),
            },
            Err(r) => return r,
        };
        let subscribe: Vec<&str> = grant.subscribe().iter().map(Selector::as_str).collect();
        let body = json!({
            "expires_in": TICKET_TTL.as_secs(),
            "subscribe": subscribe,
        });
        match self.tickets.issue(Pass { grant, expires }) {
            Ok(ticket) => {
                let mut body = body;
                body["ticket"] = json!(ticket);
                Response::json(200, &body).with_header("Cache-Control", "no-store")
            }
            Err(e) => {
                log::error!("cannot issue a ticket: {e}");
                Response::text(500, "cannot issue a ticket")
            }
        }
    }

    fn healthz(&self) -> Response {
        let s = self.stats.snapshot();
        let limited_by = self.capacity.get().map_or("unknown", |c| c.limited_by);
        let mut body = json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "streams_open": s.streams_open,
            "max_connections": s.streams_max,
            "limited_by": limited_by,
            "uptime_seconds": self.started.elapsed().as_secs(),
        });
        let usage = self.hub.usage();
        body["retained_bytes"] = json!(usage.history_bytes + usage.mailbox_bytes);
        body["max_retained_bytes"] = json!(usage.max_retained_bytes);
        // A database that is down degrades one source of events, not the
        // server: `status` stays "ok". Errors stay in the log, since this
        // page needs no token.
        if let Some(redis) = self.hub.redis_state() {
            // Without Redis a node can neither publish nor replay.
            if !redis.connected {
                body["status"] = json!("degraded");
            }
            body["redis"] = json!({
                "connected": redis.connected,
                "reconnects": redis.reconnects,
                "errors": redis.errors,
            });
        }
        let listeners = self.postgres();
        if !listeners.is_empty() {
            body["postgres"] = listeners
                .iter()
                .map(|l| {
                    let st = l.state();
                    json!({
                        "connected": st.connected,
                        "reconnects": st.reconnects,
                        "notifications": st.notifications,
                    })
                })
                .collect();
        }
        Response::json(200, &body).with_header("Cache-Control", "no-store")
    }

    fn postgres(&self) -> &[Listener] {
        self.postgres.get().map_or(&[], Vec::as_slice)
    }

    fn metrics(&self) -> Response {
        let s = self.stats.snapshot();
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        metric(
            "ssed_connections_open",
            "gauge",
            "Streams open now.",
            s.streams_open,
        );
        metric(
            "ssed_connections_max",
            "gauge",
            "The stream cap.",
            s.streams_max,
        );
        metric(
            "ssed_stream_thread_writes_total",
            "counter",
            "Writes by streams' own threads; idle streams' sends go out from waker threads.",
            s.thread_writes,
        );
        metric(
            "ssed_connections_rejected_total",
            "counter",
            "Streams and requests refused at a cap.",
            s.rejected_total,
        );
        metric(
            "ssed_events_published_total",
            "counter",
            "Events published.",
            self.hub.published(),
        );
        metric(
            "ssed_frames_sent_total",
            "counter",
            "Event-stream frames written.",
            s.frames_sent,
        );
        metric(
            "ssed_bytes_sent_total",
            "counter",
            "Bytes written on event streams.",
            s.bytes_sent,
        );
        let usage = self.hub.usage();
        metric(
            "ssed_retained_bytes",
            "gauge",
            "Memory held by retained events and waiting mailbox messages, in bytes.",
            usage.history_bytes + usage.mailbox_bytes,
        );
        metric(
            "ssed_retained_bytes_max",
            "gauge",
            "The retained budget (max_retained_bytes), in bytes.",
            usage.max_retained_bytes,
        );
        metric(
            "ssed_retained_evictions_total",
            "counter",
            "Retained events dropped, oldest first, to keep within max_retained_bytes.",
            usage.events_evicted,
        );
        metric(
            "ssed_retained_refusals_total",
            "counter",
            "Mailbox pushes refused (507) because mailboxes held the whole budget.",
            usage.pushes_refused,
        );
        metric(
            "ssed_requests_total",
            "counter",
            "Ordinary requests handled.",
            s.requests_total,
        );
        metric(
            "ssed_request_timeouts_total",
            "counter",
            "Connections cut for not sending their request head or body within request_timeout.",
            s.head_timeouts,
        );
        metric(
            "ssed_request_bodies_cut_total",
            "counter",
            "Connections cut while sending a body, to keep the bodies still arriving within their bound.",
            s.bodies_evicted,
        );
        metric(
            "ssed_pending_connections",
            "gauge",
            "Connections waiting for their request head.",
            s.pending,
        );
        metric(
            "ssed_handler_panics_total",
            "counter",
            "Handler panics caught.",
            s.handler_panics,
        );
        metric(
            "ssed_accept_errors_total",
            "counter",
            "Failed accept calls.",
            s.accept_errors,
        );
        metric(
            "ssed_uptime_seconds",
            "gauge",
            "Seconds since start.",
            self.started.elapsed().as_secs(),
        );
        if let Some(redis) = self.hub.redis_state() {
            metric(
                "ssed_redis_connected",
                "gauge",
                "1 when this node's Redis reader is connected, else 0.",
                u64::from(redis.connected),
            );
            metric(
                "ssed_redis_reconnects_total",
                "counter",
                "Times the Redis reader connected again after a loss.",
                redis.reconnects,
            );
            metric(
                "ssed_redis_errors_total",
                "counter",
                "Failed Redis commands and connects.",
                redis.errors,
            );
        }
        out.push_str("# HELP ssed_disconnects_total Streams ended early, by reason.\n");
        out.push_str("# TYPE ssed_disconnects_total counter\n");
        for reason in EndReason::ALL {
            let _ = writeln!(
                out,
                "ssed_disconnects_total{{reason=\"{}\"}} {}",
                reason.reason(),
                s.disconnects(reason)
            );
        }
        let _ = write!(
            out,
            "# HELP ssed_client_limited_total Requests refused with 429 by a per-client limit: \
             streams past max_streams_per_client, publishes past publish_rate.\n\
             # TYPE ssed_client_limited_total counter\n\
             ssed_client_limited_total{{limit=\"streams\"}} {}\n\
             ssed_client_limited_total{{limit=\"publish_rate\"}} {}\n",
            s.client_limited, s.rate_limited
        );
        let states: Vec<ListenerState> = self.postgres().iter().map(Listener::state).collect();
        if !states.is_empty() {
            let mut series =
                |name: &str, kind: &str, help: &str, value: fn(&ListenerState) -> u64| {
                    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
                    for (db, st) in states.iter().enumerate() {
                        let _ = writeln!(out, "{name}{{db=\"{db}\"}} {}", value(st));
                    }
                };
            series(
                "ssed_postgres_connected",
                "gauge",
                "1 when the LISTEN connection of [[postgres]] table number db is up, else 0.",
                |st| u64::from(st.connected),
            );
            series(
                "ssed_postgres_notifications_total",
                "counter",
                "NOTIFY payloads published to their topic.",
                |st| st.notifications,
            );
            series(
                "ssed_postgres_reconnects_total",
                "counter",
                "Times the LISTEN connection was made again after a loss.",
                |st| st.reconnects,
            );
        }
        // Memory: refusals below the cap, and what is left now (read at
        // scrape time, as the guard reads it).
        let _ = write!(
            out,
            "# HELP ssed_connections_rejected_memory_total Streams refused below the cap \
             because memory headroom was below the floor.\n\
             # TYPE ssed_connections_rejected_memory_total counter\n\
             ssed_connections_rejected_memory_total {}\n",
            s.memory_rejected
        );
        if let Some(m) = crate::memory_info() {
            let _ = write!(
                out,
                "# HELP ssed_memory_available_bytes Memory left: the smaller of MemAvailable \
                 and the memory cgroup's limit less its working set.\n\
                 # TYPE ssed_memory_available_bytes gauge\n\
                 ssed_memory_available_bytes {}\n",
                m.available
            );
        }
        Response::new(200)
            .with_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            .with_body(out)
    }
}

/// The answer when the store refused a write (logged where it failed):
/// nothing was kept or delivered, the client may retry.
/// How soon a stream refused for want of storage (Redis down) asks its
/// client to come back.
const STORAGE_RETRY: Duration = Duration::from_secs(2);

/// Who a JWT publisher is counted as for `publish_rate`: its subject, or
/// its token. Prefixed by kind, so that no subject names the publish token.
fn publisher_key(subject: Option<&str>, token: &str) -> String {
    match subject {
        Some(sub) => format!("sub:{sub}"),
        None => format!("jwt:{token}"),
    }
}

/// Ends `stream` when its token expires, at `exp`.
#[inline(never)]
fn end_with_token(stream: &mut Stream, exp: SystemTime) {
    let left = exp.duration_since(SystemTime::now()).unwrap_or_default();
    stream.end_at(Instant::now() + left);
}

/// The selectors of a ticket request's body, `{"subscribe": [...]}`;
/// `None` for an empty body (the caller's whole grant).
fn ticket_selectors(body: &[u8]) -> Result<Option<Vec<Selector>>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wanted {
        #[serde(default)]
        subscribe: Option<Vec<String>>,
    }
    let wanted: Wanted = serde_json::from_slice(body).map_err(|e| {
        Response::text(
            400,
            format!("the body must be {{\"subscribe\": [topic selectors]}}: {e}"),
        )
    })?;
    let Some(wanted) = wanted.subscribe else {
        return Ok(None); // `{}`: the whole grant
    };
    let selectors = parse_selectors(wanted.iter().map(String::as_str))
        .map_err(|e| Response::text(400, e.to_string()))?;
    Ok(Some(selectors))
}

fn storage_unavailable(what: &str) -> Response {
    Response::text(
        503,
        format!("storage unavailable: {what} was not stored; retry later"),
    )
    .with_header("Retry-After", "1")
}

/// Whether a proxy forwarded `req`: it carries a header only proxies add.
/// Whoever sent it, trusted or not: a request a proxy forwarded is never
/// "this machine", and a client that adds such a header itself only loses
/// by it.
fn proxied(req: &Request) -> bool {
    [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "via",
    ]
    .iter()
    .any(|h| req.header(h).is_some())
}

fn bad_name(what: &str, name: &str) -> Response {
    let shown: String = name.chars().take(64).collect();
    Response::text(
        400,
        format!("invalid {what} name {shown:?}: use 1 to 200 characters of A-Z a-z 0-9 _ . : -"),
    )
}

/// Splits `host[:port]` (a `Host` value, an origin's authority) into its
/// host, lowercase (an IPv6 literal keeps its brackets), and its port,
/// `default` when it has none; `None` when it does not parse.
fn authority(a: &str, default: u16) -> Option<(String, u16)> {
    let (host, port) = match a.strip_prefix('[') {
        Some(rest) => {
            let (inner, after) = rest.split_once(']')?;
            let port = match after {
                "" => default,
                p => p.strip_prefix(':')?.parse().ok()?,
            };
            (format!("[{inner}]"), port)
        }
        None => match a.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().ok()?),
            None => (a.to_owned(), default),
        },
    };
    (!host.is_empty() && host != "[]").then(|| (host.to_ascii_lowercase(), port))
}

/// Whether `origin` (`scheme://host[:port]`) is the origin a request with
/// this `Host` reached us at over `scheme`: same scheme, host and port.
fn same_origin(origin: &str, host: Option<&str>, scheme: &str) -> bool {
    let Some(host) = host else { return false };
    let Some(rest) = origin
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
    else {
        return false;
    };
    let default = if scheme == "https" { 443 } else { 80 };
    match (authority(rest, default), authority(host.trim(), default)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Whether a request with this `Host` addressed this machine by a name no
/// web page can take over: an IP literal, `localhost` (or a name under
/// it, which browsers resolve to loopback themselves), or one of
/// `allowed`. A missing `Host` (HTTP/1.0) comes from no browser.
fn local_host(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(host) = host else { return true };
    let Some((name, _)) = authority(host.trim(), 0) else {
        return false;
    };
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = name.trim_end_matches('.');
    name == "localhost" || name.ends_with(".localhost") || allowed.iter().any(|a| a == name)
}

/// Why a stream's topic list is refused, if it is (400).
#[inline(never)]
fn refuse_topics(topics: &[&str]) -> Option<Response> {
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
    topics
        .iter()
        .find(|t| !valid_name(t))
        .map(|bad| bad_name("topic", bad))
}

/// Ends a stream whose subscription failed (storage down). The head is
/// out, so no 503: an EventSource is told to come back soon (with its
/// Last-Event-ID).
#[cold]
#[inline(never)]
fn subscribe_failed(stream: &mut Stream, e: &crate::HubError) -> Result<(), StreamError> {
    log::warn!("subscribe failed: {}", crate::Report(e));
    stream.retry(STORAGE_RETRY)?;
    stream.comment("storage unavailable; reconnect later")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_compares_scheme_host_and_port() {
        let http = |o: &str, h: Option<&str>| same_origin(o, h, "http");
        assert!(http("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(http("http://example.com", Some("example.com:80")));
        assert!(http("http://example.com:80", Some("Example.com")));
        assert!(http("http://[::1]:8080", Some("[::1]:8080")));
        assert!(same_origin(
            "https://example.com",
            Some("example.com:443"),
            "https"
        ));
        assert!(
            !http("https://example.com", Some("example.com")),
            "an https page is another origin than this plain-http server"
        );
        assert!(!http("https://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(!http("http://evil.com", Some("example.com")));
        assert!(!http("http://127.0.0.1:9", Some("127.0.0.1:8080")));
        assert!(!http("null", Some("example.com")));
        assert!(!http("http://a", None));
        assert!(!http("http://a:x", Some("a:x")));
    }

    #[test]
    fn only_names_no_page_can_take_over_are_local() {
        let allowed = vec!["ssed.internal".to_owned()];
        for local in [
            None,
            Some("127.0.0.1:8080"),
            Some("127.0.0.1"),
            Some("[::1]:8080"),
            Some("10.1.2.3:80"),
            Some("localhost:8080"),
            Some("LOCALHOST"),
            Some("localhost."),
            Some("app.localhost:3000"),
            Some("ssed.internal:8080"),
        ] {
            assert!(local_host(local, &allowed), "{local:?}");
        }
        for foreign in [
            Some("rebind.attacker.example:8080"),
            Some("localhost.attacker.example"),
            Some("ssed.internal.evil"),
            Some(""),
            Some("[::1"),
        ] {
            assert!(!local_host(foreign, &allowed), "{foreign:?}");
        }
    }

    #[test]
    fn demo_page_uses_the_contract() {
        assert!(DEMO_PAGE.contains("new EventSource(\"/events/demo\")"));
        assert!(DEMO_PAGE.contains("\"/publish/demo\""));
        assert!(!DEMO_PAGE.contains("http://"), "no external assets");
        assert!(!DEMO_PAGE.contains("https://"), "no external assets");
    }
}
