//! `ssed loadtest --find-limit`: raise the held streams in steps until the
//! server (or this client) cannot take more, and say what stopped it.
//!
//! The streams of one step stay open into the next: a step only opens the
//! difference (or closes streams, when bisection goes down). A step that
//! does not fit in this process's descriptor limit is held by worker
//! processes ([`super::spread`]). The counts go
//! up by doubling from the first step until a step fails, then bisect
//! between the largest count that held and the smallest that failed, until
//! the two are within 1% of each other (or 1 stream apart).
//!
//! A step holds when every stream opened answered 200 and none failed or was
//! dropped, every event published during it arrived with a p99 at most
//! `--max-p99`, and (with `--pid`) the server kept at least 32 MiB of memory
//! headroom. A step whose failures are this client's own (no source port,
//! address or descriptor left) ends the search without blaming the server;
//! a server that is gone, a worker process that ended, or a server that
//! answers with a status that is neither 200 nor a refusal ends it with an
//! error.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::args::{FindLimitOptions, Options, PublishOptions};
use super::host;
use super::html;
use super::pool::{MAX_WORKERS, SpawnError};
use super::publisher::{PublishOutcome, PublishProgress, publish};
use super::server_proc::{self, MEMORY_FLOOR_KIB};
use super::spread::Spread;
use super::streams::{CONNECT_TIMEOUT, Counts, SWEEP_EVERY};

/// Pause between opening a step's streams and its first publish: a server
/// answers the head before its stream thread subscribes.
const SETTLE: Duration = Duration::from_millis(300);
/// Pause after closing streams, for the server to notice they are gone.
const RELEASE: Duration = Duration::from_millis(500);
/// Least time given to the last event's deliveries to arrive.
const MIN_GRACE: Duration = Duration::from_millis(500);
/// A worker's bound past what one step may take.
const LEASE_SLACK: Duration = Duration::from_secs(30);
/// Steps at most: doubling to 2^40 and bisecting back is far fewer.
const MAX_STEPS: usize = 80;
/// How often progress is printed within a step.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long the check that the server still listens may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the search and prints its report; 0 when a limit was found, 1
/// when the server could not be measured (gone, wrong URL) or on Ctrl-C.
/// With `--report`, the HTML page is written at the end, on a failed run
/// too (saying it is partial); failing to write it is a failure.
pub(super) fn main(o: &Options, f: &FindLimitOptions) -> ExitCode {
    let mut steps = Vec::new();
    let report = match search(o, f, &mut steps) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(io::stderr(), "ssed loadtest: {e}"); // nothing else to do
            let partial = LimitReport {
                url: o.url.url.clone(),
                limit: 0,
                stopped_by: e.to_string(),
                error: true,
                steps,
                max_p99: f.max_p99,
            };
            write_html(o, &partial);
            return ExitCode::FAILURE;
        }
    };
    let printed = super::print_report(o.json, || report.to_json().to_string(), || report.table());
    let written = write_html(o, &report);
    if !printed || !written {
        return ExitCode::FAILURE;
    }
    if report.error {
        let _ = writeln!(io::stderr(), "ssed loadtest: {}", report.stopped_by); // nothing else to do
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Writes `--report`, if asked for; false (after saying why) when it
/// cannot be written.
fn write_html(o: &Options, report: &LimitReport) -> bool {
    o.report
        .as_deref()
        .is_none_or(|path| html::write(path, &html::render(&report.html_page())))
}

/// Why the search could not be made at all.
#[derive(Debug)]
enum SearchError {
    Poller(io::Error),
    Thread(io::Error),
    Workers(SpawnError),
    NoPublishUrl,
}

impl fmt::Display for SearchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SearchError::NoPublishUrl => f.write_str("--find-limit needs a publish URL"),
            SearchError::Poller(e) => write!(f, "cannot poll sockets: {e}"),
            SearchError::Thread(e) => write!(f, "cannot start the publisher thread: {e}"),
            SearchError::Workers(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SearchError {}

/// What one step measured.
#[derive(Debug, Clone, Default)]
struct Step {
    streams: u64,
    held: u64,
    refused: u64,
    /// Connections that errored, were dropped, or had another status.
    failed: u64,
    client_failed: u64,
    /// TLS handshakes refused (`Counts::tls_rejected`).
    tls_rejected: u64,
    /// The first client-side failure, said.
    client_reason: Option<String>,
    /// The commonest failure of the step, said.
    failure: Option<String>,
    other_statuses: BTreeMap<u16, u64>,
    published: u64,
    publish: Option<PublishOutcome>,
    /// Deliveries that had not arrived when the step ended.
    missing: u64,
    p50_ns: Option<u64>,
    p99_ns: Option<u64>,
    server_rss_kib: Option<u64>,
    server_threads: Option<u64>,
    headroom_kib: Option<u64>,
    /// The server process is gone (`--pid`), or nothing listens any more.
    server_gone: bool,
    /// Worker processes holding the streams; 0 for this process alone.
    workers: u64,
    /// A worker process that ended during the step, said.
    worker_lost: Option<String>,
}

/// What a step says about the search.
enum Verdict {
    Held,
    /// The server cannot hold this many: look below.
    Over(String),
    /// The search cannot go on; `error` when nothing valid was measured.
    End {
        words: String,
        error: bool,
    },
}

/// The result of the search.
#[derive(Debug)]
struct LimitReport {
    url: String,
    limit: u64,
    stopped_by: String,
    /// The run ended on a problem, not a limit: exit non-zero.
    error: bool,
    steps: Vec<Step>,
    max_p99: Duration,
}

/// The run's moving parts.
struct Search<'a> {
    o: &'a Options,
    f: &'a FindLimitOptions,
    publish: PublishOptions,
    spread: Spread,
    /// This process's descriptor limit.
    fds: u64,
    stop: Arc<AtomicBool>,
    started: Instant,
    last_progress: Instant,
}

/// Runs the search; the steps measured go to `steps` as they end, so that
/// they are there for a partial report when the search fails.
fn search(
    o: &Options,
    f: &FindLimitOptions,
    steps: &mut Vec<Step>,
) -> Result<LimitReport, SearchError> {
    let fds = host::fd_limit();
    let stop = host::interrupt_flag();
    let publish = o.publish.clone().ok_or(SearchError::NoPublishUrl)?;
    let spread = Spread::new(o, fds).map_err(SearchError::Poller)?;
    let now = Instant::now();
    let mut s = Search {
        o,
        f,
        publish,
        spread,
        fds,
        stop,
        started: now,
        last_progress: now,
    };
    let mut low = 0u64;
    let mut high: Option<(u64, String)> = None;
    let mut next = f.start;
    let (stopped_by, error) = loop {
        if s.stop.load(Ordering::Relaxed) {
            break ("interrupted (Ctrl-C)".to_owned(), true);
        }
        if steps.len() >= MAX_STEPS {
            break (format!("the step limit ({MAX_STEPS} steps)"), false);
        }
        if !s.spread.fits(next) {
            break (
                format!(
                    "the client's descriptor limit ({fds}) before {} streams, even over \
                     {MAX_WORKERS} worker processes: raise `ulimit -n`",
                    thousands(next)
                ),
                false,
            );
        }
        let step = s.step(next)?;
        let verdict = judge(&step, &s, steps.is_empty());
        progress_line(&step, &verdict, s.f.max_p99);
        steps.push(step);
        match verdict {
            Verdict::Held => low = low.max(next),
            Verdict::Over(words) => high = Some((next, words)),
            Verdict::End { words, error } => break (words, error),
        }
        match next_count(low, high.as_ref().map(|h| h.0), f.max) {
            Some(n) => next = n,
            None => match &high {
                Some((_, words)) => break (words.clone(), false),
                None => {
                    break (
                        format!("--max reached ({} streams held)", thousands(low)),
                        false,
                    );
                }
            },
        }
    };
    Ok(LimitReport {
        url: o.url.url.clone(),
        limit: low,
        stopped_by,
        error,
        steps: std::mem::take(steps),
        max_p99: f.max_p99,
    })
}

/// The next step's count after `low` held and `high` (if any) failed:
/// double while nothing failed (up to `max`), then bisect; `None` once
/// `max` held or the two are within 1% of `low` (or 1 apart).
fn next_count(low: u64, high: Option<u64>, max: Option<u64>) -> Option<u64> {
    match high {
        None if Some(low) == max => None,
        None => Some(low.saturating_mul(2).min(max.unwrap_or(u64::MAX))),
        Some(h) if h.saturating_sub(low) <= (low / 100).max(1) => None,
        Some(h) => Some(low + (h - low) / 2),
    }
}

impl Search<'_> {
    /// Turns the poller for `d`, or until Ctrl-C.
    fn turn_for(&mut self, d: Duration) -> Result<(), SearchError> {
        let until = Instant::now() + d;
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= until {
                break;
            }
            self.turn(until.saturating_duration_since(now).min(SWEEP_EVERY))?;
        }
        Ok(())
    }

    /// One turn of the poller (or of the workers' lines).
    fn turn(&mut self, wait: Duration) -> Result<(), SearchError> {
        self.spread.turn(wait).map_err(SearchError::Poller)
    }

    fn progress(&mut self, target: u64, published: Option<u64>) {
        let now = Instant::now();
        if now.duration_since(self.last_progress) < PROGRESS_EVERY {
            return;
        }
        self.last_progress = now;
        let c = self.spread.counts();
        let mut line = format!(
            "[{:>6.1}s] step {}: held {}  refused {}  failed {}  dropped {}  connecting {}",
            (now - self.started).as_secs_f64(),
            thousands(target),
            c.held,
            c.refused,
            c.failed + c.other,
            c.dropped,
            self.spread.in_flight(),
        );
        if let Some(p) = published {
            line.push_str(&format!("  published {p}/{}", self.publish.events));
        }
        line.push('\n');
        let _ = io::stderr().write_all(line.as_bytes()); // progress is best effort
    }

    /// Brings the held streams to `target`, publishes, and measures.
    fn step(&mut self, target: u64) -> Result<Step, SearchError> {
        let _ = writeln!(
            io::stderr(),
            "[{:>6.1}s] step: {} streams",
            self.started.elapsed().as_secs_f64(),
            thousands(target)
        ); // progress is best effort
        self.spread.lease(self.step_bound(target));
        let before = self.spread.counts().clone();
        if self.spread.close_to(target) {
            self.turn_for(RELEASE)?;
        }
        self.open_up_to(target)?;
        let mut step = Step {
            streams: target,
            ..Step::default()
        };
        let trouble = {
            let c = self.spread.counts();
            c.refused > before.refused
                || c.failed > before.failed
                || c.other > before.other
                || c.dropped > before.dropped
        };
        let lost = self.spread.lost().is_some();
        if !trouble && !lost && self.spread.counts().held > 0 && !self.stop.load(Ordering::Relaxed)
        {
            self.turn_for(SETTLE)?;
            self.publish_and_measure(&mut step)?;
        }
        self.finish(&mut step, &before);
        Ok(step)
    }

    /// The longest a step to `target` streams may take: a worker's lease.
    fn step_bound(&self, target: u64) -> Duration {
        let ramp = if self.o.ramp > 0.0 {
            Duration::from_secs_f64(target as f64 / self.o.ramp)
        } else {
            Duration::ZERO
        };
        RELEASE
            + ramp
            + CONNECT_TIMEOUT
            + Duration::from_secs(1)
            + SETTLE
            + self.publish_budget()
            + self.grace()
            + LEASE_SLACK
    }

    /// How long a step's publisher may take.
    fn publish_budget(&self) -> Duration {
        self.f.step_time.mul_f64(1.5) + Duration::from_secs(10)
    }

    /// How long the last event's deliveries have to arrive.
    fn grace(&self) -> Duration {
        (self.f.max_p99 * 2).max(MIN_GRACE)
    }

    /// Opens streams until `target` are held or attempted, at `--ramp`,
    /// and waits for their answers (each bounded by the connect timeout).
    fn open_up_to(&mut self, target: u64) -> Result<(), SearchError> {
        let workers = self.spread.workers();
        let need = self.spread.plan(target).map_err(SearchError::Workers)?;
        if self.spread.workers() != workers {
            let _ = writeln!(
                io::stderr(),
                "descriptor limit {}: {} streams over {} worker processes",
                self.fds,
                thousands(target),
                self.spread.workers()
            ); // progress is best effort
        }
        let base = self.spread.counts().attempted;
        let ramp = self.o.ramp;
        let begun = Instant::now();
        let ramp_time = if ramp > 0.0 {
            Duration::from_secs_f64(need as f64 / ramp)
        } else {
            Duration::ZERO
        };
        let deadline = begun + ramp_time + CONNECT_TIMEOUT + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            let opened = self.spread.counts().attempted - base;
            if self.stop.load(Ordering::Relaxed)
                || now >= deadline
                || (opened >= need && self.spread.in_flight() == 0)
                || self.spread.lost().is_some()
            {
                return Ok(());
            }
            let due = if ramp > 0.0 {
                ((now - begun).as_secs_f64() * ramp).floor() as u64 + 1
            } else {
                need
            }
            .min(need);
            self.spread.open_to(due);
            let opened = self.spread.counts().attempted - base;
            let mut wait = SWEEP_EVERY;
            if opened < need {
                wait = if ramp > 0.0 {
                    let next = begun + Duration::from_secs_f64(opened as f64 / ramp);
                    wait.min(next.saturating_duration_since(now))
                } else {
                    Duration::ZERO
                };
            }
            self.progress(target, None);
            self.turn(wait)?;
        }
    }

    /// Publishes the step's events while turning the poller, then waits for
    /// their deliveries; deliveries still missing after the grace count as
    /// that late (a lower bound on their latency).
    fn publish_and_measure(&mut self, step: &mut Step) -> Result<(), SearchError> {
        let held_at_publish = self.spread.counts().held;
        self.spread.begin_step();
        let delivered_before = self.spread.deliveries();
        let progress = Arc::new(PublishProgress::default());
        let budget = self.publish_budget();
        let handle = {
            let (p, progress, stop) = (
                self.publish.clone(),
                Arc::clone(&progress),
                Arc::clone(&self.stop),
            );
            let deadline = Instant::now() + budget;
            thread::Builder::new()
                .name("publisher".into())
                .spawn(move || publish(p, &progress, &stop, deadline))
                .map_err(SearchError::Thread)?
        };
        while !progress.done.load(Ordering::Acquire) {
            let published = progress.published.load(Ordering::Relaxed);
            self.progress(step.streams, Some(published));
            self.turn(SWEEP_EVERY)?;
        }
        let grace = self.grace();
        let published = progress.published.load(Ordering::Relaxed);
        let expected = published * held_at_publish;
        let until = Instant::now() + grace;
        loop {
            let now = Instant::now();
            let delivered = self.spread.deliveries() - delivered_before;
            if delivered >= expected || now >= until || self.stop.load(Ordering::Relaxed) {
                break;
            }
            self.turn(until.saturating_duration_since(now).min(SWEEP_EVERY))?;
        }
        let outcome = match handle.join() {
            Ok(outcome) => outcome,
            Err(_) => {
                log::error!("the publisher thread panicked");
                PublishOutcome::default()
            }
        };
        // Every delivery the holders counted since the step began.
        let mut latency = self.spread.end_step();
        step.missing = expected.saturating_sub(latency.count);
        latency.record_n(grace.as_nanos() as u64, step.missing);
        step.p50_ns = latency.quantile(0.50);
        step.p99_ns = latency.quantile(0.99);
        step.published = outcome.published;
        step.publish = Some(outcome);
        Ok(())
    }

    /// Fills in the step's counts (since `before`) and the server's state.
    fn finish(&mut self, step: &mut Step, before: &Counts) {
        step.workers = self.spread.workers();
        step.worker_lost = self.spread.lost();
        let c = self.spread.counts();
        step.held = c.held;
        step.refused = c.refused - before.refused;
        step.client_failed = c.client_failed - before.client_failed;
        step.tls_rejected = c.tls_rejected - before.tls_rejected;
        step.failed =
            (c.failed - before.failed) + (c.other - before.other) + (c.dropped - before.dropped);
        let mut failures: Vec<(String, u64)> = c
            .failures
            .iter()
            .map(|(k, &n)| (k.clone(), n - before.failures.get(k).copied().unwrap_or(0)))
            .filter(|&(_, n)| n > 0)
            .collect();
        step.client_reason = failures
            .iter()
            .find(|(k, _)| k.starts_with("client: "))
            .map(|(k, _)| k.trim_start_matches("client: ").to_owned());
        if c.dropped > before.dropped {
            failures.push((
                "dropped by the server".to_owned(),
                c.dropped - before.dropped,
            ));
        }
        failures.sort_by_key(|f| std::cmp::Reverse(f.1));
        step.failure = failures.first().map(|(k, n)| format!("{n} x {k}"));
        for (status, &n) in &c.other_statuses {
            let n = n - before.other_statuses.get(status).copied().unwrap_or(0);
            if n > 0 {
                step.other_statuses.insert(*status, n);
            }
        }
        match self.o.pid {
            Some(pid) => match server_proc::sample(pid) {
                Some(s) => {
                    step.server_rss_kib = s.rss_kib;
                    step.server_threads = s.threads;
                    step.headroom_kib = s.headroom_kib;
                }
                None => step.server_gone = true,
            },
            None if step.failed > step.client_failed => {
                step.server_gone = refuses_connections(&self.o.url.addr);
            }
            None => {}
        }
    }
}

/// Whether nothing listens at `addr` any more (a connect is refused).
fn refuses_connections(addr: &std::net::SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(addr, PROBE_TIMEOUT),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
    )
}

/// What `step` means for the search; `first` for the run's first step.
fn judge(step: &Step, s: &Search<'_>, first: bool) -> Verdict {
    let at = thousands(step.streams);
    if s.stop.load(Ordering::Relaxed) {
        return Verdict::End {
            words: "interrupted (Ctrl-C)".to_owned(),
            error: true,
        };
    }
    if step.server_gone {
        let why = step.failure.as_deref().unwrap_or("its process is gone");
        let words = if first && step.held == 0 {
            format!("nothing answers at {} ({why})", s.o.url.url)
        } else {
            format!("the server stopped answering at {at} streams ({why})")
        };
        return Verdict::End { words, error: true };
    }
    if let Some(lost) = &step.worker_lost {
        return Verdict::End {
            words: format!(
                "a worker process failed at {at} streams ({lost}); not the server's limit"
            ),
            error: true,
        };
    }
    if step.tls_rejected > 0 {
        let why = step.failure.as_deref().unwrap_or("unknown");
        return Verdict::End {
            words: format!(
                "TLS handshakes failed at {at} streams ({why}); not the server's limit: check \
                 --cacert (the CA that issued the server's certificate) or --insecure"
            ),
            error: true,
        };
    }
    if step.client_failed > 0 {
        let why = step.client_reason.as_deref().unwrap_or("unknown");
        let what = if why.starts_with("socket:") {
            "client ran out of descriptors"
        } else {
            "client ran out of source ports/addresses"
        };
        return Verdict::End {
            words: format!(
                "{what} at {at} streams ({} x {why}); not the server's limit: add --source \
                 addresses or run more clients",
                step.client_failed
            ),
            // Nothing measured at all: the client's setup is wrong.
            error: first,
        };
    }
    if let Some(n) = step.other_statuses.get(&429) {
        return Verdict::Over(format!(
            "the server's per-client limit (429) at {at} streams ({n} refused): spread them \
             with --source"
        ));
    }
    if let Some((status, n)) = step.other_statuses.iter().next() {
        return Verdict::End {
            words: format!(
                "the server answered {status} to {n} streams at {at}: is --url an event stream \
                 (and SSED_SUBSCRIBE_TOKEN set if it needs one)?"
            ),
            error: true,
        };
    }
    let publish = step.publish.as_ref();
    if let Some(status) = publish
        .and_then(|p| p.first_status)
        .filter(|s| (400..500).contains(s) && *s != 429)
    {
        return Verdict::End {
            words: format!(
                "publishing to {} answered {status}: check --publish-url (and \
                 SSED_PUBLISH_TOKEN)",
                s.publish.url.url
            ),
            error: true,
        };
    }
    if step.refused > 0 {
        return Verdict::Over(format!(
            "the server's refusals (503) at {at} streams ({} refused)",
            step.refused
        ));
    }
    if step.failed > 0 {
        let why = step.failure.as_deref().unwrap_or("unknown");
        return Verdict::Over(format!(
            "failures at {at} streams ({} failed or dropped; {why})",
            step.failed
        ));
    }
    if let Some(p) = publish.filter(|p| p.errors > 0) {
        let why = p.first_error.as_deref().unwrap_or("unknown");
        return Verdict::Over(format!(
            "publishing failed at {at} streams ({} errors; {why})",
            p.errors
        ));
    }
    if let Some(left) = step.headroom_kib.filter(|&h| h < MEMORY_FLOOR_KIB) {
        return Verdict::Over(format!(
            "the server's memory headroom at {at} streams ({:.1} MiB left, under {} MiB)",
            left as f64 / 1024.0,
            MEMORY_FLOOR_KIB / 1024
        ));
    }
    let max_p99 = s.f.max_p99.as_nanos() as u64;
    match step.p99_ns {
        Some(p99) if p99 > max_p99 => {
            let missing = if step.missing > 0 {
                format!("; {} deliveries missing", step.missing)
            } else {
                String::new()
            };
            return Verdict::Over(format!(
                "p99 {} over {} at {at} streams{missing}",
                human_ns(p99),
                human_ns(max_p99)
            ));
        }
        None if step.held > 0 => {
            return Verdict::Over(format!("no event was delivered at {at} streams"));
        }
        _ => {}
    }
    if step.held < step.streams {
        return Verdict::Over(format!(
            "only {} of {at} streams held",
            thousands(step.held)
        ));
    }
    Verdict::Held
}

fn progress_line(step: &Step, verdict: &Verdict, max_p99: Duration) {
    let ms = |v: Option<u64>| v.map_or("-".to_owned(), human_ns);
    let outcome = match verdict {
        Verdict::Held => format!("held (p99 at most {})", human_ns(max_p99.as_nanos() as u64)),
        Verdict::Over(w) => format!("over: {w}"),
        Verdict::End { words, .. } => format!("end: {words}"),
    };
    let _ = writeln!(
        io::stderr(),
        "step {}: held {}  refused {}  failed {}  p50 {}  p99 {}  -> {outcome}",
        thousands(step.streams),
        step.held,
        step.refused,
        step.failed,
        ms(step.p50_ns),
        ms(step.p99_ns),
    ); // progress is best effort
}

/// `24000` as `24,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Nanoseconds said for people: `1.2 s`, `250 ms`, `0.84 ms`.
fn human_ns(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// Nanoseconds as milliseconds, to the microsecond.
fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e3).round() / 1e3
}

impl LimitReport {
    /// The most worker processes a step used; 0 when this process held
    /// every step.
    fn workers(&self) -> u64 {
        self.steps.iter().map(|s| s.workers).max().unwrap_or(0)
    }

    fn to_json(&self) -> Value {
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| {
                json!({
                    "streams": s.streams,
                    "held": s.held,
                    "refused": s.refused,
                    "failed": s.failed,
                    "p50_ms": s.p50_ns.map(ms),
                    "p99_ms": s.p99_ns.map(ms),
                    "server_rss_kib": s.server_rss_kib,
                    "server_threads": s.server_threads,
                    "workers": s.workers,
                })
            })
            .collect();
        json!({
            "limit": self.limit,
            "stopped_by": self.stopped_by,
            "workers": self.workers(),
            "steps": steps,
        })
    }

    /// What `--report` shows.
    fn html_page(&self) -> html::Page {
        html::Page {
            url: self.url.clone(),
            date: html::now_utc(),
            limit: self.limit,
            stopped_by: self.stopped_by.clone(),
            max_p99_ms: ms(self.max_p99.as_nanos() as u64),
            partial: self.error.then(|| self.stopped_by.clone()),
            steps: self
                .steps
                .iter()
                .map(|s| html::Row {
                    streams: s.streams,
                    held: s.held,
                    refused: s.refused,
                    failed: s.failed,
                    p50_ms: s.p50_ns.map(ms),
                    p99_ms: s.p99_ns.map(ms),
                    rss_kib: s.server_rss_kib,
                    threads: s.server_threads,
                })
                .collect(),
        }
    }

    fn table(&self) -> String {
        let mut out = String::from("ssed loadtest --find-limit\n");
        out.push_str(&format!("  url         {}\n", self.url));
        out.push_str(&format!(
            "  limit       {} streams held (p99 at most {})\n",
            thousands(self.limit),
            human_ns(self.max_p99.as_nanos() as u64)
        ));
        out.push_str(&format!("  stopped by  {}\n", self.stopped_by));
        if self.workers() > 0 {
            out.push_str(&format!(
                "  workers     {} processes (past this one's descriptor limit)\n",
                self.workers()
            ));
        }
        out.push_str("  steps\n");
        out.push_str(&format!(
            "    {:>9}  {:>9}  {:>8}  {:>8}  {:>10}  {:>10}  {:>12}\n",
            "streams", "held", "refused", "failed", "p50", "p99", "server RSS"
        ));
        for s in &self.steps {
            let q = |v: Option<u64>| v.map_or("-".to_owned(), human_ns);
            let rss = s
                .server_rss_kib
                .map_or("-".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
            out.push_str(&format!(
                "    {:>9}  {:>9}  {:>8}  {:>8}  {:>10}  {:>10}  {:>12}\n",
                thousands(s.streams),
                thousands(s.held),
                s.refused,
                s.failed,
                q(s.p50_ns),
                q(s.p99_ns),
                rss
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_then_bisecting() {
        assert_eq!(next_count(100, None, None), Some(200));
        assert_eq!(next_count(200, None, Some(300)), Some(300));
        assert_eq!(next_count(300, None, Some(300)), None);
        // Bisecting: 200 held, 400 failed.
        assert_eq!(next_count(200, Some(400), None), Some(300));
        assert_eq!(next_count(300, Some(303), None), None);
        assert_eq!(next_count(300, Some(304), None), Some(302));
        assert_eq!(next_count(0, Some(1), None), None);
        assert_eq!(next_count(0, Some(100), None), Some(50));
        // A server that holds exactly 300, from a first step of 100.
        let (mut low, mut high, mut next) = (0, None, Some(100));
        let mut steps = 0;
        while let Some(n) = next {
            if n <= 300 {
                low = n;
            } else {
                high = Some(n);
            }
            steps += 1;
            next = next_count(low, high, None);
        }
        assert_eq!((low, high, steps), (300, Some(303), 9));
    }

    #[test]
    fn numbers_for_people() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(3200), "3,200");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(human_ns(1_200_000_000), "1.2 s");
        assert_eq!(human_ns(250_000_000), "250 ms");
        assert_eq!(human_ns(840_000), "0.84 ms");
        assert_eq!(ms(1_234_567), 1.235);
    }
}
