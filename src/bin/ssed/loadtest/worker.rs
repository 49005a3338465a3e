//! A worker process: `ssed loadtest --worker` holds a share of a run's
//! streams for a load tester whose own descriptor limit cannot take them
//! all (see [`super::pool`], the other end).
//!
//! The protocol is lines. The load tester writes `open N` on the worker's
//! stdin (start connects until N have been started in all, paced by the
//! load tester's ramp) and closes stdin to end the run. The worker writes
//! one JSON [`Message`] a line on stdout: a [`Message::Status`] every
//! [`STATUS_EVERY`], and a [`Message::Final`] (its counts and its whole
//! latency histogram) when it ends, before it exits.
//!
//! It ends on stdin's end (which is also the load tester's death: no
//! orphans), on a write to stdout that fails, or at `--duration`, the bound
//! the load tester gave it. Ctrl-C, which a terminal sends to the whole
//! process group, does not end it: the load tester ends it, and so gets its
//! final report.

use std::io::{self, BufRead, Read, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::args::Options;
use super::decode::Tally;
use super::holder::{Holder, Local};
use super::host;
use super::streams::Counts;

/// How often a worker says where it is.
pub(super) const STATUS_EVERY: Duration = Duration::from_millis(50);
/// Longest line either side accepts.
pub(super) const MAX_LINE: u64 = 1 << 20;

/// A line from a worker: `{"status": {…}}` or `{"final": {…}}` (tagged
/// outside: the histogram's 128-bit sum cannot pass through serde's
/// buffering of internally tagged enums).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Message {
    Status {
        counts: Counts,
        in_flight: u64,
        events: u64,
        deliveries: u64,
    },
    Final {
        counts: Counts,
        tally: Box<Tally>,
        cpu_ms: Option<u64>,
        peak_rss_kib: Option<u64>,
    },
}

/// A line to a worker.
pub(super) fn open_command(n: u64) -> String {
    format!("open {n}\n")
}

/// What the load tester asked for, read from stdin by its own thread.
enum Command {
    Open(u64),
    End,
}

fn read_commands(tx: mpsc::Sender<Command>) {
    for_each_line(io::stdin().lock(), |line| {
        let command = match line.trim().strip_prefix("open ").map(str::parse) {
            Some(Ok(n)) => Command::Open(n),
            _ => {
                log::warn!("worker: not a command: {:?}", line.trim());
                return true;
            }
        };
        tx.send(command).is_ok()
    });
    let _ = tx.send(Command::End); // the run may already be over
}

/// Calls `each` with every line of `r` (cut at [`MAX_LINE`] bytes) until
/// its end, an error, or `each` says false: both ends of the protocol.
pub(super) fn for_each_line(mut r: impl BufRead, mut each: impl FnMut(&str) -> bool) {
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut r).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !each(&line) {
            return;
        }
    }
}

/// Writes `m` as one line; false when stdout is gone.
fn send(m: &Message) -> bool {
    let Ok(mut line) = serde_json::to_string(m) else {
        return false;
    };
    line.push('\n');
    let mut out = io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

/// Runs a worker: 0 after its final report, 1 when it cannot run.
pub(super) fn main(o: &Options) -> ExitCode {
    let _ignored = host::interrupt_flag(); // the load tester ends us
    let fds = host::fd_limit();
    if o.connections > fds {
        log::warn!("worker: {} streams asked, {fds} descriptors", o.connections);
    }
    let mut local = match Local::new(&o.url, o.subscribe_token.as_deref(), &o.sources) {
        Ok(l) => l,
        Err(e) => {
            log::error!("worker: cannot poll sockets: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, commands) = mpsc::channel();
    if let Err(e) = thread::Builder::new()
        .name("commands".into())
        .spawn(move || read_commands(tx))
    {
        log::error!("worker: cannot start the command reader: {e}");
        return ExitCode::FAILURE;
    }
    let deadline = Instant::now() + o.duration;
    let mut target = 0u64;
    let mut last_status: Option<Instant> = None;
    'run: loop {
        loop {
            match commands.try_recv() {
                Ok(Command::Open(n)) => target = n.min(o.connections),
                Ok(Command::End) | Err(mpsc::TryRecvError::Disconnected) => break 'run,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        let now = Instant::now();
        if now >= deadline {
            log::warn!("worker: its time bound passed");
            break;
        }
        local.open_to(target);
        if last_status.is_none_or(|t| now.duration_since(t) >= STATUS_EVERY) {
            last_status = Some(now);
            let (events, deliveries) = local.events();
            let status = Message::Status {
                counts: local.counts().clone(),
                in_flight: local.in_flight(),
                events,
                deliveries,
            };
            if !send(&status) {
                break;
            }
        }
        let wait = if local.counts().attempted < target {
            Duration::ZERO
        } else {
            Duration::from_millis(10)
        };
        if let Err(e) = local.turn(wait) {
            log::error!("worker: cannot poll sockets: {e}");
            break;
        }
    }
    let held = local.finish();
    let done = send(&Message::Final {
        counts: held.counts,
        tally: Box::new(held.tally),
        cpu_ms: held.cpu.map(|d| d.as_millis() as u64),
        peak_rss_kib: held.peak_rss_kib,
    });
    if done {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
