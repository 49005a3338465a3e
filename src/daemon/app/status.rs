//! `GET /status`, a live page for people, and `GET /status/events`, the
//! stream of ssed's own figures that it draws: one `status` event a
//! second.
//!
//! A ticker thread reads the figures once a second (the counters `/metrics`
//! reads, and the process's RSS and threads) and publishes them into a hub
//! of the feed's own: one topic, one retained event. `/status/events`
//! streams follow it like any subscription, so they count against the cap
//! as every stream does, and their threads park while the hub's waker
//! threads write each event: a watcher's thread keeps the one stack page
//! of an idle subscriber. That hub is not the daemon's: its events are not
//! counted as published (`ssed_events_published_total` counts publishers'
//! events), no topic of the daemon's hub holds them, and no `/events` or
//! Mercure subscriber can reach them. What it writes are frames on event
//! streams all the same, counted in `ssed_frames_sent_total`.
//!
//! Nothing of it runs while nobody watches: the first watcher starts the
//! hub and the ticker (on a worker thread: a stream's thread starts no
//! thread, that takes several stack pages), and the ticker ends, and the
//! hub's threads with it, a few seconds after the last watcher left.
//!
//! Who may watch: [`App::authorize_status`].

use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::App;
use crate::daemon::auth;
use crate::hub::{HubError, MemoryHistory, StorageError};
use crate::server::limits::{ProcessUsage, process_usage};
use crate::{
    EndReason, Event, Hub, HubConfig, Request, Response, ShutdownHandle, StatsSnapshot, Stream,
    StreamError, Subscription,
};

/// The status page served at `/status`.
pub(super) const STATUS_PAGE: &str = include_str!("../status.html");

/// What the page may load and reach: itself, its inline script and style,
/// and its own origin's event stream; nothing from elsewhere.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The one topic of the feed's hub.
const TOPIC: &str = "status";
/// The event name of a status event.
const EVENT: &str = "status";
/// How often the figures go out.
const EVERY: Duration = Duration::from_secs(1);
/// Ticks with no watcher after which the ticker ends and its hub goes.
const IDLE_TICKS: u32 = 3;
/// Events a watcher may have waiting before it is dropped as slow: a
/// minute's worth.
const QUEUE: usize = 60;
/// The ticker's stack: it formats JSON and reads `/proc`, nothing deep.
const TICKER_STACK: usize = 128 * 1024;
/// How soon a watcher refused for want of a feed comes back.
const RETRY_AFTER: &str = "2";

/// The status feed: its hub while someone watches.
pub(super) struct Feed {
    /// The feed's hub while its ticker runs (the ticker holds a clone).
    running: Mutex<Option<Hub>>,
    /// The daemon's: the ticker ends at shutdown.
    shutdown: ShutdownHandle,
}

/// Why a watcher gets no feed.
#[derive(Debug)]
enum FeedError {
    /// The ticker thread could not start.
    Start(std::io::Error),
    /// The feed's hub refused the subscription.
    Hub(HubError),
    /// No worker thread took the job in time.
    Worker(StorageError),
}

impl fmt::Display for FeedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeedError::Start(e) => write!(f, "cannot start the status ticker: {e}"),
            FeedError::Hub(e) => write!(f, "the status feed refused a watcher: {e}"),
            FeedError::Worker(e) => write!(f, "no worker to start the status feed: {e}"),
        }
    }
}

impl std::error::Error for FeedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FeedError::Start(e) => Some(e),
            FeedError::Hub(e) => Some(e),
            FeedError::Worker(e) => Some(e),
        }
    }
}

impl Feed {
    /// A feed that has not started; it ends at `shutdown`.
    pub(super) fn new(shutdown: ShutdownHandle) -> Self {
        Feed {
            running: Mutex::new(None),
            shutdown,
        }
    }

    fn running(&self) -> MutexGuard<'_, Option<Hub>> {
        // Only ever replaced whole: a panic elsewhere leaves it consistent.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl App {
    /// Who may see `/status` and `/status/events`: whoever the operators'
    /// endpoints allow ([`authorize_admin`](App::authorize_admin): the
    /// admin token, or with none set this machine alone), the token also
    /// as `?token=`: the page hands the one in its own URL on to its
    /// `EventSource`, which cannot send headers.
    #[inline(never)]
    pub(super) fn authorize_status(&self, req: &Request) -> Result<(), Response> {
        // A browser cannot send a header with an `EventSource` (nor with
        // the page's own address typed in): the admin token may come as
        // `?token=` here, and only here.
        if let (Some(token), Some(given)) = (self.config.admin_token.as_deref(), req.query("token"))
            && auth::constant_time_eq(given.as_bytes(), token.as_bytes())
        {
            return Ok(());
        }
        self.authorize_admin(req)
    }

    /// `GET /status`.
    pub(super) fn status_page(&self, req: &Request) -> Response {
        if let Err(refusal) = self.authorize_status(req) {
            return refusal;
        }
        Response::html(STATUS_PAGE)
            .with_header("Cache-Control", "no-store")
            .with_header("Content-Security-Policy", PAGE_POLICY)
            // Its URL may hold the admin token (`?token=`): no link from it
            // passes that on.
            .with_header("Referrer-Policy", "no-referrer")
    }
}

/// `GET /status/events`: a stream of one `status` event a second, on the
/// stream's thread only what every idle subscriber does (a worker thread
/// joins it to the feed).
pub(super) fn events(
    app: &Arc<App>,
    req: &Request,
    stream: &mut Stream,
) -> Result<(), StreamError> {
    if let Err(refusal) = app.authorize_status(req) {
        return stream.respond(refusal);
    }
    let sub = match watch_elsewhere(app) {
        Ok(sub) => sub,
        Err(e) => return feed_failed(stream, &e),
    };
    // The head and the `retry:` go out from a waker thread, with the
    // first event (see `Stream::follow`).
    stream.retry_on_open(app.config.retry)?;
    stream.follow(sub)
}

/// Joins the feed, starting it if it is not running, on a worker thread.
#[inline(never)]
fn watch_elsewhere(app: &Arc<App>) -> Result<Subscription, FeedError> {
    let job = Arc::clone(app);
    app.workers
        .run(move || watch(&job))
        .unwrap_or_else(|e| Err(FeedError::Worker(e)))
}

/// Refuses a watcher that got no feed (`503`; nothing was sent yet).
#[cold]
#[inline(never)]
fn feed_failed(stream: &mut Stream, e: &FeedError) -> Result<(), StreamError> {
    log::warn!("{}", crate::Report(e));
    let busy =
        Response::text(503, format!("no status feed: {e}")).with_header("Retry-After", RETRY_AFTER);
    stream.respond(busy)
}

/// A subscription to the feed, started now (its hub and ticker) if it
/// was not running. Under the feed's lock, so the ticker cannot end
/// between the look and the subscription.
fn watch(app: &Arc<App>) -> Result<Subscription, FeedError> {
    let mut running = app.status.running();
    if let Some(hub) = running.as_ref() {
        return hub.subscribe(&[TOPIC], None).map_err(FeedError::Hub);
    }
    let config = HubConfig {
        queue: QUEUE,
        ..HubConfig::default()
    };
    let hub = Hub::with_history(Box::new(MemoryHistory::new(1)), config);
    let sub = hub.subscribe(&[TOPIC], None).map_err(FeedError::Hub)?;
    let ticker = Ticker {
        app: Arc::clone(app),
        hub: hub.clone(),
    };
    std::thread::Builder::new()
        .name("ssed-status".into())
        .stack_size(TICKER_STACK)
        .spawn(move || ticker.run())
        .map_err(FeedError::Start)?;
    log::debug!("status feed started");
    *running = Some(hub);
    Ok(sub)
}

/// Publishes the figures into the feed's hub once a second while anyone
/// watches.
struct Ticker {
    app: Arc<App>,
    hub: Hub,
}

/// The counters at one moment, to take rates from.
struct Sample {
    at: Instant,
    stats: StatsSnapshot,
    published: u64,
}

impl Sample {
    fn take(app: &App) -> Sample {
        Sample {
            at: Instant::now(),
            stats: app.stats.snapshot(),
            published: app.hub.published(),
        }
    }
}

impl Ticker {
    fn run(self) {
        let mut last = Sample::take(&self.app);
        let mut next = last.at + EVERY;
        let mut idle = 0;
        loop {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let now = Instant::now();
            next += EVERY;
            if next <= now {
                // Fell behind (the machine slept): keep the beat from now.
                next = now + EVERY;
            }
            let shutdown = self.app.status.shutdown.is_shutdown();
            let watchers = self.hub.subscribers(TOPIC);
            if watchers == 0 || shutdown {
                idle += 1;
                if (idle >= IDLE_TICKS || shutdown) && self.stop(shutdown) {
                    log::debug!("status feed stopped");
                    return;
                }
            } else {
                idle = 0;
            }
            let sample = Sample::take(&self.app);
            if watchers > 0 {
                let figures = Figures::at(&self.app, &last, &sample, watchers);
                let event = Event::new().event(EVENT).data(figures.to_json());
                if let Err(e) = self.hub.publish(TOPIC, event) {
                    log::warn!("status feed: {}", crate::Report(&e));
                }
            }
            last = sample;
        }
    }

    /// Ends the feed, unless a watcher joined meanwhile (it subscribed
    /// under the same lock): true when it ended.
    fn stop(&self, shutdown: bool) -> bool {
        let mut running = self.app.status.running();
        if !shutdown && self.hub.subscribers(TOPIC) > 0 {
            return false;
        }
        *running = None;
        true
    }
}

/// A JSON object of one value per [`EndReason`], named as `/metrics`
/// names them.
fn by_reason<T: fmt::Display>(out: &mut String, value: impl Fn(EndReason) -> T) {
    for (i, reason) in EndReason::ALL.into_iter().enumerate() {
        let sep = if i == 0 { '{' } else { ',' };
        let _ = write!(out, "{sep}\"{}\":{}", reason.reason(), value(reason));
    }
    out.push('}');
}

/// Rounded to hundredths: per-second rates read as people read them.
fn hundredths(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One status event's figures.
struct Figures {
    time: String,
    uptime_seconds: u64,
    limited_by: &'static str,
    stats: StatsSnapshot,
    published_total: u64,
    published_per_second: f64,
    delivered_per_second: f64,
    disconnects_per_second: [f64; EndReason::ALL.len()],
    process: Option<ProcessUsage>,
    watchers: usize,
}

impl Figures {
    /// The figures at `now`, with rates per second since `last`.
    fn at(app: &App, last: &Sample, now: &Sample, watchers: usize) -> Figures {
        let seconds = now.at.duration_since(last.at).as_secs_f64().max(0.001);
        let rate = |now: u64, then: u64| hundredths(now.saturating_sub(then) as f64 / seconds);
        let (s, was) = (&now.stats, &last.stats);
        Figures {
            time: crate::time::iso8601(SystemTime::now()),
            uptime_seconds: app.started.elapsed().as_secs(),
            limited_by: app.capacity.get().map_or("unknown", |c| c.limited_by),
            published_total: now.published,
            published_per_second: rate(now.published, last.published),
            delivered_per_second: rate(s.frames_sent, was.frames_sent),
            disconnects_per_second: std::array::from_fn(|i| {
                rate(s.disconnects[i], was.disconnects[i])
            }),
            stats: now.stats.clone(),
            process: process_usage(),
            watchers,
        }
    }

    /// As JSON, written out here: every value is a number, or text that
    /// needs no escaping (a time, the name of a resource), and the
    /// `serde_json::Value` a `json!` builds cost the static binary more
    /// than this.
    fn to_json(&self) -> String {
        let s = &self.stats;
        let mut out = String::with_capacity(768);
        let _ = write!(
            out,
            "{{\"time\":\"{}\",\"uptime_seconds\":{},\"streams_open\":{},\"max_connections\":{},\
             \"limited_by\":\"{}\",\"rejected_total\":{},\"published_total\":{},\
             \"published_per_second\":{},\"delivered_total\":{},\"delivered_per_second\":{},\
             \"bytes_sent_total\":{},\"disconnects\":",
            self.time,
            self.uptime_seconds,
            s.streams_open,
            s.streams_max,
            self.limited_by,
            s.rejected_total,
            self.published_total,
            self.published_per_second,
            s.frames_sent,
            self.delivered_per_second,
            s.bytes_sent,
        );
        by_reason(&mut out, |r| s.disconnects(r));
        out.push_str(",\"disconnects_per_second\":");
        by_reason(&mut out, |r| self.disconnects_per_second[r.index()]);
        match self.process {
            Some(p) => {
                let _ = write!(
                    out,
                    ",\"rss_bytes\":{},\"threads\":{}",
                    p.rss_bytes, p.threads
                );
            }
            None => out.push_str(",\"rss_bytes\":null,\"threads\":null"),
        }
        let _ = write!(out, ",\"watchers\":{}}}", self.watchers);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_asks_for_nothing_from_elsewhere() {
        // The one URL in it names SVG's namespace; nothing is fetched there.
        let without_ns = STATUS_PAGE.replace("\"http://www.w3.org/2000/svg\"", "");
        for external in [
            "://", "@import", "url(", " src=", "<link", "<iframe", "<img",
        ] {
            assert!(
                !without_ns.contains(external),
                "{external} in the status page"
            );
        }
        for (i, _) in STATUS_PAGE.match_indices("href=\"") {
            let target = &STATUS_PAGE[i + 6..];
            let target = &target[..target.find('"').unwrap_or(0)];
            assert!(!target.contains(':'), "href {target:?} leaves the server");
        }
        // The feed is its sibling, and a token in the page's URL goes on.
        assert!(STATUS_PAGE.contains("\"status/events\""));
        assert!(STATUS_PAGE.contains("new URLSearchParams(location.search).get(\"token\")"));
    }

    #[test]
    fn the_figures_are_json() {
        let mut disconnects = [0; EndReason::ALL.len()];
        disconnects[EndReason::Slow.index()] = 2;
        let stats = StatsSnapshot {
            streams_open: 3,
            disconnects,
            ..StatsSnapshot::default()
        };
        let mut figures = Figures {
            time: crate::time::iso8601(SystemTime::UNIX_EPOCH),
            uptime_seconds: 5,
            limited_by: "file descriptors",
            stats,
            published_total: 7,
            published_per_second: 0.67,
            delivered_per_second: 1000.0,
            disconnects_per_second: [0.0, 0.0, 0.0, 0.0, 1.5, 0.0, 0.0],
            process: Some(ProcessUsage {
                rss_bytes: 4096,
                threads: 9,
            }),
            watchers: 1,
        };
        let v: serde_json::Value = serde_json::from_str(&figures.to_json()).expect("JSON");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["streams_open"], 3);
        assert_eq!(v["limited_by"], "file descriptors");
        assert_eq!(v["published_per_second"], 0.67);
        assert_eq!(v["delivered_per_second"], 1000.0);
        assert_eq!(v["disconnects"]["slow"], 2);
        assert_eq!(v["disconnects"]["client"], 0);
        assert_eq!(v["disconnects_per_second"]["slow"], 1.5);
        assert_eq!(
            v["disconnects_per_second"].as_object().map(|m| m.len()),
            Some(EndReason::ALL.len())
        );
        assert_eq!(v["rss_bytes"], 4096);
        assert_eq!(v["threads"], 9);
        assert_eq!(v["watchers"], 1);
        figures.process = None;
        let v: serde_json::Value = serde_json::from_str(&figures.to_json()).expect("JSON");
        assert!(v["rss_bytes"].is_null() && v["threads"].is_null(), "{v}");
    }

    #[test]
    fn rates_read_as_hundredths() {
        assert!((hundredths(2.0 / 3.0) - 0.67).abs() < 1e-9);
        assert!((hundredths(1000.0) - 1000.0).abs() < 1e-9);
    }
}
