//! `ssed loadtest`: open many event streams against a URL, optionally
//! publish timed events into them, and report what the server held and how
//! fast it delivered.
//!
//! One thread drives every stream: the sockets are non-blocking and watched
//! with epoll, so holding 19,000 streams costs 19,000 descriptors and a few
//! hundred bytes each here, never a thread. Each stream keeps only a small
//! state machine: where it is in the chunked encoding and the first bytes of
//! the current SSE line (enough for the `{"t":...}` send time this tool puts
//! first in every event it publishes).
//!
//! The optional publisher is its own thread with one blocking keep-alive
//! HTTP/1.1 connection. Every event's body is `{"t":<unix nanos>,"seq":N}`;
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
//! - [`args`]: the command line and its help text, parsed into [`Options`];
//! - [`host`]: this process's descriptor limit and Ctrl-C;
//! - [`server_proc`]: what `--pid` shows of the server (RSS, memory headroom);
//! - [`histogram`]: the fixed-size latency histogram;
//! - [`decode`]: a held stream's body (chunked framing, event-stream lines,
//!   the send time in each event) tallied into counts and latency;
//! - [`streams`]: every subscriber connection on one epoll instance, from
//!   connect to response head to held stream;
//! - [`publisher`]: the thread that posts the timed events;
//! - [`report`]: what was measured, as the table or as JSON;
//! - [`html`]: the `--report` page, its charts drawn as inline SVG;
//! - [`find_limit`]: `--find-limit`, steps of streams up to the server's
//!   limit, with its own report;
//! - this file: [`main`], the entry point `src/bin/ssed/main.rs` calls, and
//!   the run, the loop that moves through the phases and turns the pollers.

mod args;
mod decode;
mod find_limit;
mod histogram;
mod host;
mod html;
mod publisher;
mod report;
mod server_proc;
mod streams;

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::epoll;

use args::{Options, Parsed, USAGE};
use publisher::{PublishOutcome, PublishProgress, publish};
use report::{PublishReport, Report};
use streams::{CONNECT_TIMEOUT, SWEEP_EVERY, Streams};

/// Exit status for bad arguments.
const EXIT_USAGE: u8 = 2;
/// Pause between the ramp-up and the first publish: a server answers the
/// stream's head before its thread subscribes to the topic.
const SETTLE: Duration = Duration::from_millis(300);
/// Connects started per turn of the loop, so reading is never starved.
const CONNECT_BURST: u64 = 256;
/// Read buffer shared by every stream.
const SCRATCH: usize = 64 * 1024;
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Descriptors kept for everything but the streams.
const FDS_RESERVED: u64 = 16;

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
            if printed {
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
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Poller(e) => write!(f, "cannot poll sockets: {e}"),
            RunError::Thread(e) => write!(f, "cannot start the publisher thread: {e}"),
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

/// Runs the phases until the hold ends, the time limit passes or Ctrl-C.
fn run(o: &Options) -> Result<Report, RunError> {
    let started = Instant::now();
    let fds = host::fd_limit();
    if o.connections.saturating_add(FDS_RESERVED) > fds {
        log::warn!(
            "the descriptor limit is {fds}: at most about {} streams can be opened",
            fds.saturating_sub(FDS_RESERVED)
        );
    }
    let stop = host::interrupt_flag();
    let mut streams =
        Streams::new(&o.url, o.subscribe_token.as_deref(), &o.sources).map_err(RunError::Poller)?;
    let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
    let mut scratch = vec![0u8; SCRATCH];

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
    let hard_deadline = started
        + ramp_time
        + CONNECT_TIMEOUT
        + SETTLE
        + publish_budget
        + o.duration
        + Duration::from_secs(10);

    let progress = Arc::new(PublishProgress::default());
    let mut publisher: Option<thread::JoinHandle<PublishOutcome>> = None;
    let mut held_at_publish = 0;
    let mut ramp_done: Option<Duration> = None;
    let mut stage = Stage::Ramp;
    let mut last_sweep = started;
    let mut last_progress = started;
    let mut stopped = None;
    loop {
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) {
            stopped = Some("interrupted");
            break;
        }
        if now >= hard_deadline {
            stopped = Some("time limit");
            break;
        }
        // Advance the stage.
        match stage {
            Stage::Ramp => {
                let due = if o.ramp > 0.0 {
                    ((now - started).as_secs_f64() * o.ramp).floor() as u64 + 1
                } else {
                    o.connections
                }
                .min(o.connections);
                let burst = due
                    .saturating_sub(streams.counts.attempted)
                    .min(CONNECT_BURST);
                for _ in 0..burst {
                    streams.open();
                }
                if streams.counts.attempted >= o.connections && streams.in_flight == 0 {
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
                    held_at_publish = streams.counts.held;
                    let (progress, stop) = (Arc::clone(&progress), Arc::clone(&stop));
                    let deadline = now + publish_budget;
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
                    o.publish.is_some() && streams.tally.deliveries >= published * held_at_publish;
                let nothing_held = streams.counts.held == 0 && streams.in_flight == 0;
                if now >= until || all_delivered || nothing_held {
                    break;
                }
            }
        }
        if now.duration_since(last_progress) >= PROGRESS_EVERY {
            last_progress = now;
            print_progress(now - started, &streams, o, &progress);
        }
        if now.duration_since(last_sweep) >= SWEEP_EVERY {
            last_sweep = now;
            streams.sweep(now);
        }
        // Sleep until the next connect is due, or the next check.
        let mut wait = SWEEP_EVERY;
        if stage == Stage::Ramp && o.ramp > 0.0 && streams.counts.attempted < o.connections {
            let next = started + Duration::from_secs_f64(streams.counts.attempted as f64 / o.ramp);
            wait = wait.min(next.saturating_duration_since(now));
        } else if stage == Stage::Ramp && streams.counts.attempted < o.connections {
            wait = Duration::ZERO;
        }
        if let Stage::Settle(t) | Stage::Hold(t) = stage {
            wait = wait.min(t.saturating_duration_since(now));
        }
        streams
            .turn(&mut events, &mut scratch, wait)
            .map_err(RunError::Poller)?;
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
    print_progress(elapsed, &streams, o, &progress);
    let Streams { counts, tally, .. } = streams;
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
        client_cpu: own_cpu_time(),
        client_peak_rss_kib: own_peak_rss_kib(),
        stopped,
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

fn print_progress(t: Duration, s: &Streams, o: &Options, p: &PublishProgress) {
    let c = &s.counts;
    let mut line = format!(
        "[{:>6.1}s] held {}  refused {}  other {}  failed {}  dropped {}  connecting {}  events {}",
        t.as_secs_f64(),
        c.held,
        c.refused,
        c.other,
        c.failed,
        c.dropped,
        s.in_flight + o.connections.saturating_sub(c.attempted),
        s.tally.events,
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

/// This process's peak resident memory, in KiB (Linux `/proc`).
fn own_peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix("VmHWM:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// This process's user + system CPU time (Linux `/proc`; clock ticks of
/// 1/100 s, the `USER_HZ` Linux exports).
fn own_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}
