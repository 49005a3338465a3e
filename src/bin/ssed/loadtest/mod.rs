//! `ssed loadtest`: open many event streams against a URL, optionally
//! publish timed events into them, and report what the server held and how
//! fast it delivered.
//!
//! One thread drives every stream: the sockets are non-blocking and watched
//! with epoll, so holding 19,000 streams costs 19,000 descriptors and a few
//! hundred bytes each here, never a thread. Asked for more streams than its
//! descriptor limit allows, a run spreads them over worker processes, each
//! such a thread of its own. Each stream keeps only a small
//! state machine: where it is in the chunked encoding and the first bytes of
//! the current SSE line (enough for the `{"t":...}` send time this tool puts
//! first in every event it publishes).
//!
//! The optional publisher is its own thread with one blocking keep-alive
//! HTTP/1.1 connection. Either side speaks TLS (rustls) to an `https://`
//! URL. Every event's body is `{"t":<unix nanos>,"seq":N}`;
//! a stream that receives it records `now - t` in a shared log-linear
//! histogram (0.8% precision), so memory does not grow with deliveries.
//!
//! Phases: ramp-up (connects paced at `--ramp`), a short settle so the
//! server's stream threads have subscribed, publishing, then the hold
//! (`--duration`; with a publisher it ends early once every expected
//! delivery arrived). Every phase is bounded, and Ctrl-C ends the run with a
//! report of what was measured so far.
//!
//! How the parts fit, each using only those above it:
//!
//! - [`tls`]: `https://`: the client configuration (`--cacert` or
//!   `--insecure`), a stream's non-blocking TLS session, the publisher's
//!   blocking connection;
//! - [`args`]: the command line and its help text, parsed into [`Options`];
//! - [`host`]: this process's descriptor limit, Ctrl-C, CPU time and RSS;
//! - [`server_proc`]: what `--pid` shows of the server (RSS, memory headroom);
//! - [`histogram`]: the fixed-size latency histogram;
//! - [`decode`]: a held stream's body (chunked framing, event-stream lines,
//!   the send time in each event) tallied into counts and latency;
//! - [`streams`]: every subscriber connection on one epoll instance, from
//!   connect to response head to held stream;
//! - [`holder`]: what holds a plain run's streams, as the run sees it, and
//!   [`holder::Local`], this process's streams;
//! - [`worker`]: `--worker`, a process holding a share of the streams for
//!   a load tester past its descriptor limit, and the lines it speaks;
//! - [`pool`]: the load tester's side of its workers, a [`holder::Holder`];
//! - [`spread`]: where `--find-limit` holds a step's streams, this process
//!   or, past its descriptor limit, workers of the [`pool`];
//! - [`publisher`]: the thread that posts the timed events;
//! - [`html`]: the `--report` page, its charts drawn as inline SVG;
//! - [`timeline`]: a plain run once a second, and its `--report` page;
//! - [`report`]: what was measured, as the table or as JSON;
//! - [`find_limit`]: `--find-limit`, steps of streams up to the server's
//!   limit, with its own report;
//! - this file: [`main`], the entry point `src/bin/ssed/main.rs` calls, and
//!   the run, the loop that moves through the phases and turns the pollers.

mod args;
mod decode;
mod find_limit;
mod histogram;
mod holder;
mod host;
mod html;
mod pool;
mod publisher;
mod report;
mod server_proc;
mod spread;
mod streams;
mod timeline;
mod tls;
mod worker;

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use args::{Options, Parsed, USAGE};
use holder::{Held, Holder, Local};
use pool::Pool;
use publisher::{PublishOutcome, PublishProgress, publish};
use report::{PublishReport, Report};
use streams::{CONNECT_TIMEOUT, SWEEP_EVERY};
use timeline::Timeline;

/// Exit status for bad arguments.
const EXIT_USAGE: u8 = 2;
/// Pause between the ramp-up and the first publish: a server answers the
/// stream's head before its thread subscribes to the topic.
const SETTLE: Duration = Duration::from_millis(300);
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Runs `ssed loadtest` with `args` (everything after `loadtest`) and
/// returns the process exit code: 0 after a report, 1 when the run could
/// not be made, 2 for bad arguments.
pub(crate) fn main(args: Vec<OsString>) -> ExitCode {
    let options = match Options::parse(args) {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help) => {
            let _ = io::stdout().write_all(USAGE.as_bytes()); // nothing to do if stdout is gone
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = writeln!(
                io::stderr(),
                "ssed loadtest: {e}\nTry 'ssed loadtest --help'."
            ); // nothing to do if stderr is gone
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if options.worker {
        return worker::main(&options);
    }
    if let Some(f) = &options.find_limit {
        return find_limit::main(&options, f);
    }
    match run(&options) {
        Ok(report) => {
            let printed = print_report(
                options.json,
                || report.to_json().to_string(),
                || report.table(),
            );
            let written = options
                .report
                .as_deref()
                .is_none_or(|path| html::write(path, &timeline::page(&report, html::now_utc())));
            if printed && written {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            let _ = writeln!(io::stderr(), "ssed loadtest: {e}"); // nothing else to do
            ExitCode::FAILURE
        }
    }
}

/// Why the run could not be made.
#[derive(Debug)]
enum RunError {
    Poller(io::Error),
    Thread(io::Error),
    Workers(pool::SpawnError),
    /// More workers than [`pool::MAX_WORKERS`] would be needed.
    TooFewDescriptors {
        fds: u64,
        streams: u64,
    },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Poller(e) => write!(f, "cannot poll sockets: {e}"),
            RunError::Thread(e) => write!(f, "cannot start the publisher thread: {e}"),
            RunError::Workers(e) => write!(f, "{e}"),
            RunError::TooFewDescriptors { fds, streams } => write!(
                f,
                "the client's descriptor limit ({fds}) is too low for {streams} streams, even \
                 over {} worker processes: raise `ulimit -n`",
                pool::MAX_WORKERS
            ),
        }
    }
}

impl std::error::Error for RunError {}

/// Where the run is; the instants are when the stage ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Ramp,
    Settle(Instant),
    Publish,
    Hold(Instant),
}

/// Runs the phases until the hold ends, the time limit passes or Ctrl-C,
/// in this process or, past its descriptor limit, over worker processes.
fn run(o: &Options) -> Result<Report, RunError> {
    let started = Instant::now();
    // Every phase is bounded; this is the backstop for all of them.
    let ramp_time = if o.ramp > 0.0 {
        Duration::from_secs_f64(o.connections as f64 / o.ramp)
    } else {
        Duration::ZERO
    };
    let publish_budget = o.publish.as_ref().map_or(Duration::ZERO, |p| {
        let paced = if p.rate > 0.0 {
            Duration::from_secs_f64(p.events as f64 / p.rate * 1.5)
        } else {
            Duration::ZERO
        };
        // Flat out: assume at least 1,000 publishes a second.
        paced + Duration::from_secs(30) + Duration::from_millis(p.events)
    });
    let budget = Budget {
        publish: publish_budget,
        deadline: started
            + ramp_time
            + CONNECT_TIMEOUT
            + SETTLE
            + publish_budget
            + o.duration
            + Duration::from_secs(10),
    };
    let fds = host::fd_limit();
    let per_process = fds.saturating_sub(host::FDS_RESERVED);
    if o.connections <= per_process {
        let local = Local::new(o).map_err(RunError::Poller)?;
        return drive(o, local, started, budget);
    }
    let workers = o.connections.div_ceil(per_process.max(1));
    if per_process == 0 || workers > pool::MAX_WORKERS {
        return Err(RunError::TooFewDescriptors {
            fds,
            streams: o.connections,
        });
    }
    let _ = writeln!(
        io::stderr(),
        "descriptor limit {fds}: {} streams over {workers} worker processes",
        o.connections
    ); // progress is best effort
    // A worker's own bound: the whole run's, and the time to report.
    let bound = budget.deadline.saturating_duration_since(started) + Duration::from_secs(15);
    let pool = Pool::spawn(o, workers, bound).map_err(RunError::Workers)?;
    drive(o, pool, started, budget)
}

/// The time the run's phases may take.
#[derive(Debug, Clone, Copy)]
struct Budget {
    publish: Duration,
    /// Past it the run ends, whatever stage it is in.
    deadline: Instant,
}

/// Moves `holder`'s streams through the phases.
fn drive<H: Holder>(
    o: &Options,
    mut holder: H,
    started: Instant,
    budget: Budget,
) -> Result<Report, RunError> {
    let stop = host::interrupt_flag();
    let progress = Arc::new(PublishProgress::default());
    let mut timeline = Timeline::new(o.pid);
    timeline.sample(Duration::ZERO, &holder);
    let mut publisher: Option<thread::JoinHandle<PublishOutcome>> = None;
    let mut held_at_publish = 0;
    let mut ramp_done: Option<Duration> = None;
    let mut stage = Stage::Ramp;
    let mut last_progress = started;
    let mut stopped = None;
    loop {
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) {
            stopped = Some("interrupted");
            break;
        }
        if now >= budget.deadline {
            stopped = Some("time limit");
            break;
        }
        let attempted = holder.counts().attempted;
        // Advance the stage.
        match stage {
            Stage::Ramp => {
                let due = if o.ramp > 0.0 {
                    ((now - started).as_secs_f64() * o.ramp).floor() as u64 + 1
                } else {
                    o.connections
                }
                .min(o.connections);
                holder.open_to(due);
                if attempted >= o.connections && holder.in_flight() == 0 {
                    ramp_done = Some(now - started);
                    stage = match o.publish {
                        Some(_) => Stage::Settle(now + SETTLE),
                        None => Stage::Hold(now + o.duration),
                    };
                    continue;
                }
            }
            Stage::Settle(until) => {
                if now >= until {
                    let Some(p) = o.publish.clone() else {
                        stage = Stage::Hold(now + o.duration);
                        continue;
                    };
                    held_at_publish = holder.counts().held;
                    let (progress, stop) = (Arc::clone(&progress), Arc::clone(&stop));
                    let deadline = now + budget.publish;
                    let handle = thread::Builder::new()
                        .name("publisher".into())
                        .spawn(move || publish(p, &progress, &stop, deadline))
                        .map_err(RunError::Thread)?;
                    publisher = Some(handle);
                    stage = Stage::Publish;
                }
            }
            Stage::Publish => {
                if progress.done.load(Ordering::Acquire) {
                    stage = Stage::Hold(now + o.duration);
                    continue;
                }
            }
            Stage::Hold(until) => {
                let published = progress.published.load(Ordering::Relaxed);
                let all_delivered =
                    o.publish.is_some() && holder.events().1 >= published * held_at_publish;
                let nothing_held = holder.counts().held == 0 && holder.in_flight() == 0;
                if now >= until || all_delivered || nothing_held {
                    break;
                }
            }
        }
        if now.duration_since(last_progress) >= PROGRESS_EVERY {
            last_progress = now;
            print_progress(now - started, &holder, o, &progress);
            timeline.sample(now - started, &holder);
        }
        // Sleep until the next connect is due, or the next check.
        let mut wait = SWEEP_EVERY;
        if stage == Stage::Ramp && o.ramp > 0.0 && attempted < o.connections {
            let next = started + Duration::from_secs_f64(attempted as f64 / o.ramp);
            wait = wait.min(next.saturating_duration_since(now));
        } else if stage == Stage::Ramp && attempted < o.connections {
            wait = Duration::ZERO;
        }
        if let Stage::Settle(t) | Stage::Hold(t) = stage {
            wait = wait.min(t.saturating_duration_since(now));
        }
        holder.turn(wait).map_err(RunError::Poller)?;
    }
    if stopped.is_some() {
        stop.store(true, Ordering::Relaxed); // the publisher stops too
    }
    let outcome = match publisher.map(thread::JoinHandle::join) {
        Some(Ok(outcome)) => Some(outcome),
        Some(Err(_)) => {
            log::error!("the publisher thread panicked");
            Some(PublishOutcome::default())
        }
        None => None,
    };
    let elapsed = started.elapsed();
    print_progress(elapsed, &holder, o, &progress);
    timeline.sample(elapsed, &holder);
    let Held {
        counts,
        tally,
        workers,
        cpu,
        peak_rss_kib,
    } = holder.finish();
    let publish = o.publish.as_ref().map(|p| PublishReport {
        url: p.url.url.clone(),
        events: p.events,
        rate: p.rate,
        outcome: outcome.unwrap_or_default(),
        streams: held_at_publish,
        deliveries: tally.deliveries,
        first_publish_ns: progress.first_send_ns.load(Ordering::Relaxed),
        last_delivery_ns: tally.last_delivery_ns,
        latency: tally.latency.clone(),
    });
    Ok(Report {
        url: o.url.url.clone(),
        connections: o.connections,
        ramp: o.ramp,
        duration: o.duration,
        counts,
        ramp_time: ramp_done,
        events_received: tally.events,
        publish,
        elapsed,
        client_cpu: cpu,
        client_peak_rss_kib: peak_rss_kib,
        workers,
        stopped,
        timeline,
    })
}

/// Prints a report on stdout, as one JSON line or as a table; false when
/// stdout cannot take it.
pub(super) fn print_report(
    json: bool,
    to_json: impl FnOnce() -> String,
    table: impl FnOnce() -> String,
) -> bool {
    let text = if json {
        let mut s = to_json();
        s.push('\n');
        s
    } else {
        table()
    };
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

fn print_progress(t: Duration, h: &impl Holder, o: &Options, p: &PublishProgress) {
    let c = h.counts();
    let mut line = format!(
        "[{:>6.1}s] held {}  refused {}  other {}  failed {}  dropped {}  connecting {}  events {}",
        t.as_secs_f64(),
        c.held,
        c.refused,
        c.other,
        c.failed,
        c.dropped,
        h.in_flight() + o.connections.saturating_sub(c.attempted),
        h.events().0,
    );
    if let Some(publish) = &o.publish {
        line.push_str(&format!(
            "  published {}/{}",
            p.published.load(Ordering::Relaxed),
            publish.events
        ));
    }
    line.push('\n');
    let _ = io::stderr().write_all(line.as_bytes()); // progress is best effort
}
