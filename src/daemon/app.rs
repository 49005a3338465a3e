//! The daemon's routes: subscribe, publish, mailboxes, tickets, health,
//! metrics, the status page and the demo page, over a [`Hub`].
//!
//! Here the shared state (`App`) and the wiring of the routes; the
//! handlers, as `impl App` blocks, in the modules below: who may do what
//! (`access`), a stream's way in (`streams`), publishing and pushing
//! (`publish`), `/healthz` and `/metrics` (`metrics`), the operators'
//! `/streams` (`operators`), `/status` and its feed of figures,
//! `/status/events` (`status`).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::acme::{self, AcmeStatus, Http01};
use super::auth::Tickets;
use super::config::{Config, OverloadMode};
use super::error::SetupError;
use super::jwt::VerifierPool;
use crate::bridge::postgres::Listener;
use crate::hub::MemoryHistory;
use crate::hub::worker::Workers;
use crate::server::limits::clients::ClientStreams;
use crate::server::limits::rate::RateLimiter;
use crate::stream::registry::Registry;
use crate::{Capacity, Hub, HubConfig, Overload, Response, Server, ShutdownHandle, Stats};

use access::stream_jwt;
use streams::with_held_released;

mod access;
mod mercure;
mod metrics;
mod operators;
mod presence;
mod publish;
mod status;
mod streams;

/// The demo page served at `/`.
pub const DEMO_PAGE: &str = include_str!("demo.html");

/// Threads that verify the JWTs of new streams (see [`VerifierPool`]).
const JWT_THREADS: usize = 2;
/// Threads that compile Mercure subscribers' selectors (a job is short:
/// two keep a burst of subscribers from waiting on one another).
const WORK_THREADS: usize = 2;
/// A selector job that waited longer is refused (`503`): the workers are
/// overwhelmed.
const WORK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
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
    /// The server's open streams, for the operators' endpoints.
    registry: OnceLock<Arc<Registry>>,
    /// `publish_rate`, per publisher credential else address.
    publish_limit: Option<RateLimiter>,
    /// Verifies JWTs, when `[auth]` has a JWT key.
    jwt: Option<VerifierPool>,
    /// Compile Mercure subscribers' selectors for their stream threads
    /// (see `mercure_subscribe`).
    workers: Workers,
    /// Selectors compiled lately, shared by their subscribers.
    compiled: Arc<mercure::Compiled>,
    /// One per `[[postgres]]` table, started once the server is bound; they
    /// stop when the routes (and so this state) are dropped, or at shutdown.
    postgres: OnceLock<Vec<Listener>>,
    /// The feed of `/status/events`, running while someone watches.
    status: status::Feed,
    /// What the ACME renewal thread has done, with `acme_domains`.
    acme: OnceLock<Arc<AcmeStatus>>,
}

/// A built daemon: the server to run and the hub it serves.
#[derive(Debug)]
pub struct Daemon {
    /// The server, bound and ready to run.
    pub server: Server,
    /// The hub, to publish into from the embedding program.
    pub hub: Hub,
    /// The plain-HTTP listener of `[tls] redirect_http`, bound and ready
    /// to run beside [`server`](Daemon::server) (on a thread of its own).
    pub redirect: Option<Server>,
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
        registry: OnceLock::new(),
        postgres: OnceLock::new(),
        publish_limit: config.publish_rate.map(RateLimiter::new),
        jwt: jwt.map(|v| VerifierPool::start(v, JWT_THREADS)),
        workers: Workers::started("ssed-work", WORK_THREADS, WORK_WAIT),
        compiled: Arc::default(),
        status: status::Feed::new(shutdown.clone()),
        acme: OnceLock::new(),
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
        .route(mercure::MERCURE_PATH, {
            let app = a(&app);
            move |req, stream| with_held_released(app.mercure_subscribe(req, stream))
        })
        .post("/publish/{topic}", {
            let app = a(&app);
            move |req| app.publish(req)
        })
        .post(mercure::MERCURE_PATH, {
            let app = a(&app);
            move |req| app.mercure_publish(req)
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
        })
        .get("/streams", {
            let app = a(&app);
            move |req| app.list_streams(req)
        })
        .handle("DELETE", "/streams", {
            let app = a(&app);
            move |req| app.end_streams(req)
        })
        .handle("DELETE", "/streams/{id}", {
            let app = a(&app);
            move |req| app.end_stream_by_id(req)
        })
        .get("/status", {
            let app = a(&app);
            move |req| app.status_page(req)
        })
        .route("/status/events", {
            let app = a(&app);
            move |req, stream| with_held_released(status::events(&app, req, stream))
        });
    let builder = [
        "/events",
        "/events/{topic}",
        "/keys/{key}",
        "/publish/{topic}",
        mercure::MERCURE_PATH,
        "/tickets",
    ]
    .into_iter()
    .fold(builder, |b, path| {
        let app = a(&app);
        b.handle("OPTIONS", path, move |req| app.preflight(req))
    });
    let builder = if c.mercure_subscriptions {
        let root = presence::SUBSCRIPTIONS_PATH;
        [
            root.to_owned(),
            format!("{root}/{{a}}"),
            format!("{root}/{{a}}/{{b}}"),
            format!("{root}/{{a}}/{{b}}/{{c}}"),
        ]
        .into_iter()
        .fold(builder, |b, path| {
            let app = a(&app);
            b.get(&path, move |req| app.subscriptions(req))
        })
    } else {
        builder
    };
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
    let _ = app.registry.set(Arc::clone(&server.shared().registry));
    let listeners = app
        .config
        .postgres
        .iter()
        .map(|pg| Listener::start(hub.clone(), &pg.url, pg.routes(), shutdown.clone()))
        .collect();
    let _ = app.postgres.set(listeners); // set once, right here
    let (redirect, http01) = match &c.redirect_http {
        Some(addr) => {
            let http01 = Arc::new(Http01::default());
            let server = super::redirect::build(
                addr,
                server.local_addr().port(),
                Arc::clone(&http01),
                c.request_timeout,
            )?;
            (Some(server), Some(http01))
        }
        None => (None, None),
    };
    if let (Some(acme), Some(certs)) = (&c.acme, &c.tls) {
        let status = acme::start(acme.clone(), certs.clone(), http01, shutdown.clone()).map_err(
            |source| SetupError::Acme {
                cache: acme.ca_dir(),
                source,
            },
        )?;
        let _ = app.acme.set(status); // set once, right here
    }
    Ok(Daemon {
        server,
        hub,
        redirect,
    })
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

fn bad_name(what: &str, name: &str) -> Response {
    let shown: String = name.chars().take(64).collect();
    Response::text(
        400,
        format!("invalid {what} name {shown:?}: use 1 to 200 characters of A-Z a-z 0-9 _ . : -"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_page_uses_the_contract() {
        assert!(DEMO_PAGE.contains("new EventSource(\"/events/demo\")"));
        assert!(DEMO_PAGE.contains("\"/publish/demo\""));
        assert!(!DEMO_PAGE.contains("http://"), "no external assets");
        assert!(!DEMO_PAGE.contains("https://"), "no external assets");
        assert!(
            DEMO_PAGE.contains("href=\"/status\""),
            "links to the status page"
        );
    }
}
