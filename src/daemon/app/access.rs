//! Who may do what: the credential a request comes with (static tokens,
//! JWTs, tickets and their sessions), what its grant covers, CORS and the
//! origin checks for cookies and for publishing from this machine, and
//! `POST /tickets`.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;

use super::App;
use crate::daemon::auth::{self, Pass, SESSION_COOKIE, TICKET_TTL};
use crate::daemon::config::Config;
use crate::daemon::jwt::{Claims, JwtVerifier, Payloads, VerifierPool};
use crate::hub::grant::{Grant, Selector, parse_selectors};
use crate::{Request, Response};

/// The JWT a stream request will be authorized with, if any: the Bearer
/// token unless it is the subscribe token; else the JWT cookie, unless
/// `?token=`, a ticket or a session decides first.
pub(super) fn stream_jwt<'r>(req: &'r Request, config: &Config) -> Option<&'r str> {
    let token = match auth::bearer(req) {
        Some(given) => {
            let static_token = config
                .subscribe_token
                .as_deref()
                .is_some_and(|t| auth::constant_time_eq(t.as_bytes(), given.as_bytes()));
            (!static_token).then_some(given)
        }
        None if mercure_authorization(req).is_some() => mercure_authorization(req),
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

/// Whether `cred` covers every one of `topics` and `selectors` (a
/// Mercure subscription): `None` if so, else the refusal. Out of line, as
/// everything that is not a stream's common way in (see `open_stream`).
#[cold]
#[inline(never)]
fn refuse_selected(cred: &Credential, topics: &[&str], selectors: &[Selector]) -> Option<Response> {
    if let Some(t) = topics.iter().find(|t| !cred.grant.can_subscribe(t)) {
        return Some(App::forbidden("topic", t));
    }
    selectors
        .iter()
        .find(|s| !cred.grant.can_subscribe_by(s))
        .map(|s| App::forbidden("topic selector", s.as_str()))
}

/// A Mercure 0.x subscriber's JWT in the query (`?authorization=`), taken
/// on the Mercure endpoint only (draft-07, "Authorization"): a browser's
/// `EventSource` can send no header and a cross-site one no cookie.
pub(super) fn mercure_authorization(req: &Request) -> Option<&str> {
    if req.path() == super::mercure::MERCURE_PATH {
        req.query("authorization")
    } else {
        None
    }
}

// Both boxed: every thread's thread-locals sit at the top of its stack
// mapping (musl), in the page a stream thread keeps resident; a few dozen
// bytes more there left some idle streams with a second stack page.
thread_local! {
    /// A stream thread's JWT, verified ahead (see [`App::verify_ahead`]).
    #[allow(clippy::type_complexity)]
    static VERIFIED: std::cell::RefCell<Option<Box<(String, Result<Claims, crate::daemon::jwt::JwtError>)>>> =
        const { std::cell::RefCell::new(None) };
}

/// How a request proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum How {
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
pub(super) struct Credential {
    pub(super) how: How,
    pub(super) grant: Grant,
    /// When the credential expires (a JWT's `exp`): its stream ends then.
    pub(super) expires: Option<SystemTime>,
    /// Who it names (a JWT's `sub`): the client `max_streams_per_client`
    /// counts its streams against.
    pub(super) subject: Option<String>,
    /// What a JWT attaches to its subscriptions (Mercure's payloads).
    pub(super) payloads: Option<Arc<Payloads>>,
}

impl Credential {
    pub(super) fn new(how: How, grant: Grant) -> Credential {
        Credential {
            how,
            grant,
            expires: None,
            subject: None,
            payloads: None,
        }
    }

    pub(super) fn pass(how: How, pass: Pass) -> Credential {
        Credential {
            how,
            grant: pass.grant,
            expires: pass.expires,
            subject: None,
            payloads: None,
        }
    }

    pub(super) fn jwt(claims: Claims) -> Credential {
        Credential {
            how: How::Jwt,
            grant: claims.grant,
            expires: claims.expires,
            subject: claims.subject,
            payloads: claims.payloads,
        }
    }
}

/// What [`App::admission`] decided: the credential of an admitted stream,
/// or the refusal to answer.
pub(super) type Admission = Result<Credential, Response>;

/// What a stream is opened for: the grant must cover it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Target<'a> {
    Topics(&'a [&'a str]),
    /// A Mercure subscription: exact topics and selectors.
    Selected(&'a [&'a str], &'a [Selector]),
    Mailbox(&'a str),
}

impl App {
    pub(super) fn unauthorized(message: &str) -> Response {
        Response::text(401, message).with_header("WWW-Authenticate", "Bearer realm=\"ssed\"")
    }

    fn invalid_token() -> Response {
        Response::text(401, "invalid token").with_header(
            "WWW-Authenticate",
            "Bearer realm=\"ssed\", error=\"invalid_token\"",
        )
    }

    pub(super) fn forbidden(what: &str, name: &str) -> Response {
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
            let ahead = VERIFIED.with(|v| v.borrow_mut().take());
            match ahead {
                Some(verified) if verified.0 == token => verified.1,
                _ => verify_now(pool, token),
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
    pub(super) fn verify_ahead(&self, req: &Request) {
        let Some(pool) = &self.jwt else { return };
        let Some(token) = stream_jwt(req, &self.config) else {
            return;
        };
        let verified = pool.verify_elsewhere(token, SystemTime::now());
        VERIFIED.with(|v| *v.borrow_mut() = Some(Box::new((token.to_owned(), verified))));
    }

    #[cold]
    #[inline(never)]
    fn mailbox_needs_credential(key: &str) -> Response {
        Self::unauthorized(&format!(
            "consuming mailbox {key:?} needs a credential whose subscribe grant covers it \
             (a scoped ticket from POST /tickets, a JWT, the subscribe token)"
        ))
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
    #[inline(never)]
    pub(super) fn authorize_subscribe(&self, req: &Request) -> Result<Credential, Response> {
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
        if let Some(given) = mercure_authorization(req).filter(|_| self.jwt.is_some()) {
            return self.query_jwt(given);
        }
        if let Some(given) = req.query("token").filter(|_| credentials) {
            if token.is_some_and(|t| Self::token_matches(t, Some(given))) {
                return Ok(Credential::new(How::Token, Grant::subscribe_all()));
            }
            return Err(Self::unauthorized("wrong subscribe token"));
        }
        let session = auth::cookie(req, SESSION_COOKIE);
        if let Some(ticket) = req.query("ticket").filter(|_| credentials) {
            return self.ticket_credential(ticket, session);
        }
        if let Some(pass) = session.and_then(|s| self.tickets.session(s)) {
            return Ok(Credential::pass(How::Session, pass));
        }
        // The JWT cookie, read here and not through `jwt_cookie`: a frame
        // less under the stream's deepest call on its way in.
        if self.jwt.is_some()
            && let Some(token) = auth::cookie(req, &self.config.jwt_cookie)
        {
            if !self.cookie_origin_allowed(req) {
                return Err(Self::cookie_from_elsewhere(req));
            }
            return match self.jwt(token) {
                Some(claims) => claims.map(Credential::jwt),
                None => Err(Self::invalid_token()),
            };
        }
        if self.config.anonymous_allowed() {
            return Ok(Credential::new(How::Anonymous, Grant::none()));
        }
        Err(Self::needs_credential())
    }

    /// The credential of a JWT given as `?authorization=`. Out of line (see
    /// `open_stream`).
    #[cold]
    #[inline(never)]
    fn query_jwt(&self, token: &str) -> Result<Credential, Response> {
        match self.jwt(token) {
            Some(claims) => claims.map(Credential::jwt),
            None => Err(Self::invalid_token()),
        }
    }

    /// A ticket's credential: the ticket's pass, once; a spent ticket may
    /// still come with a live session cookie (the browser reconnecting
    /// with the same URL). Out of line, as everything that is not a
    /// stream's common way in (see `open_stream`).
    #[inline(never)]
    fn ticket_credential(
        &self,
        ticket: &str,
        session: Option<&str>,
    ) -> Result<Credential, Response> {
        if let Some(pass) = self.tickets.redeem(ticket) {
            return Ok(Credential::pass(How::Ticket, pass));
        }
        match session.and_then(|s| self.tickets.session(s)) {
            Some(pass) => Ok(Credential::pass(How::Session, pass)),
            None => Err(Self::unauthorized(
                "ticket invalid, spent or expired: get a new one with POST /tickets",
            )),
        }
    }

    /// Whether `cred` may open a stream of `target`: `None` if so, else
    /// the refusal. Anonymous subscribers follow any topic (its public
    /// updates); a mailbox always needs a grant covering its key, except
    /// from this machine when no subscriber credential is configured.
    #[inline(never)]
    pub(super) fn refuse_target(
        &self,
        req: &Request,
        cred: &Credential,
        target: Target<'_>,
    ) -> Option<Response> {
        match (cred.how, target) {
            (How::Anonymous, Target::Topics(_) | Target::Selected(..)) => None,
            (How::Anonymous, Target::Mailbox(_))
                if !self.config.subscriber_credentials()
                    && auth::is_loopback(req.peer_addr().ip())
                    && !proxied(req) =>
            {
                None
            }
            (How::Anonymous, Target::Mailbox(key)) => Some(Self::mailbox_needs_credential(key)),
            (_, Target::Topics(topics)) => topics
                .iter()
                .find(|t| !cred.grant.can_subscribe(t))
                .map(|t| Self::forbidden("topic", t)),
            (_, Target::Selected(topics, selectors)) => refuse_selected(cred, topics, selectors),
            (_, Target::Mailbox(key)) => {
                (!cred.grant.can_subscribe(key)).then(|| Self::forbidden("mailbox", key))
            }
        }
    }

    /// Whether this request may publish to (or push into) every one of
    /// `names` (an update's topics, a mailbox key). `Ok` carries the
    /// credential publishes are counted against for
    /// `publish_rate` (`None`: this machine, counted by address).
    pub(super) fn authorize_publish(
        &self,
        req: &Request,
        names: &[&str],
    ) -> Result<Option<String>, Response> {
        // The first name the grant does not cover, refused.
        let refuse = |grant: &Grant| {
            names
                .iter()
                .find(|n| !grant.can_publish(n))
                .map(|n| Self::forbidden("topic", n))
        };
        let token = self.config.publish_token.as_deref();
        let bearer = auth::bearer(req);
        if let Some(given) = bearer {
            if token.is_some_and(|t| Self::token_matches(t, Some(given))) {
                return Ok(Some(format!("token:{given}")));
            }
            if let Some(claims) = self.jwt(given) {
                let claims = claims?;
                if let Some(refusal) = refuse(&claims.grant) {
                    return Err(refusal);
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
            if let Some(refusal) = refuse(&claims.grant) {
                return Err(refusal);
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
    pub(super) fn cors(&self, req: &Request) -> Result<Vec<(&'static str, String)>, Response> {
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

    pub(super) fn with_cors(&self, req: &Request, r: Response) -> Response {
        match self.cors(req) {
            Ok(headers) => headers.iter().fold(r, |r, (k, v)| r.with_header(k, v)),
            Err(_) => r,
        }
    }

    pub(super) fn preflight(&self, req: &Request) -> Response {
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

    pub(super) fn ticket(&self, req: &Request) -> Response {
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
}

/// Who a JWT publisher is counted as for `publish_rate`: its subject, or
/// its token. Prefixed by kind, so that no subject names the publish token.
fn publisher_key(subject: Option<&str>, token: &str) -> String {
    match subject {
        Some(sub) => format!("sub:{sub}"),
        None => format!("jwt:{token}"),
    }
}

/// Verifies `token` on this thread's behalf, waiting for the answer: for a
/// JWT not [verified ahead](App::verify_ahead). Out of line: waiting on a
/// verifier thread takes more stack than a stream's way in may keep.
#[cold]
#[inline(never)]
fn verify_now(pool: &VerifierPool, token: &str) -> Result<Claims, crate::daemon::jwt::JwtError> {
    pool.verify(token, SystemTime::now())
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

/// Whether a proxy forwarded `req`: it carries a header only proxies add.
/// Whoever sent it, trusted or not: a request a proxy forwarded is never
/// "this machine", and a client that adds such a header itself only loses
/// by it.
pub(super) fn proxied(req: &Request) -> bool {
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
pub(super) fn same_origin(origin: &str, host: Option<&str>, scheme: &str) -> bool {
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
pub(super) fn local_host(host: Option<&str>, allowed: &[String]) -> bool {
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
}
