//! A worker process: `ssed loadtest --worker` holds a share of a run's
//! streams for a load tester whose own descriptor limit cannot take them
//! all (see [`super::pool`], the other end).
//!
//! The protocol is lines. The load tester writes [`Command`]s on the
//! worker's stdin and closes stdin to end the run:
//!
//! - `open N`: start connects until N have been started in all (paced by
//!   the load tester's ramp), never holding more than `--connections` open
//!   at once (its share of descriptors);
//! - `close N`: close N held streams, the newest first (`--find-limit`
//!   going down);
//! - `step`: answer with a [`Message::Step`], the latency of the
//!   deliveries since the last `step` (`--find-limit` measures each step
//!   apart: one `step` before it publishes, one after);
//! - `lease MS`: end MS milliseconds from now, not at the bound it had
//!   (`--find-limit` gives each step its own bound).
//!
//! The worker writes one JSON [`Message`] a line on stdout: a
//! [`Message::Status`] every [`STATUS_EVERY`], a [`Message::Step`] for each
//! `step`, and a [`Message::Final`] (its counts and its whole latency
//! histogram) when it ends, before it exits.
//!
//! It ends on stdin's end (which is also the load tester's death: no
//! orphans), on a write to stdout that fails, or at `--duration` (or its
//! last lease), the bound the load tester gave it. Ctrl-C, which a terminal
//! sends to the whole process group, does not end it: the load tester ends
//! it, and so gets its final report.

use std::io::{self, BufRead, Read, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::args::Options;
use super::decode::Tally;
use super::histogram::Histogram;
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
    /// The deliveries since the last `step`: their latency.
    Step { latency: Box<Histogram> },
    Final {
        counts: Counts,
        tally: Box<Tally>,
        cpu_ms: Option<u64>,
        peak_rss_kib: Option<u64>,
    },
}

/// A line to a worker: what the load tester asks of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    /// Start connects until this many have been started in all.
    Open(u64),
    /// Close this many held streams.
    Close(u64),
    /// Say the latency since the last `step`.
    Step,
    /// End this many milliseconds from now.
    Lease(u64),
}

impl Command {
    /// The command as the line that carries it.
    pub(super) fn line(self) -> String {
        match self {
            Command::Open(n) => format!("open {n}\n"),
            Command::Close(n) => format!("close {n}\n"),
            Command::Step => "step\n".to_owned(),
            Command::Lease(ms) => format!("lease {ms}\n"),
        }
    }

    /// A line read back; `None` when it is not a command.
    fn parse(line: &str) -> Option<Command> {
        let line = line.trim();
        if line == "step" {
            return Some(Command::Step);
        }
        let (word, n) = line.split_once(' ')?;
        let n = n.parse().ok()?;
        match word {
            "open" => Some(Command::Open(n)),
            "close" => Some(Command::Close(n)),
            "lease" => Some(Command::Lease(n)),
            _ => None,
        }
    }
}

/// Passes on the load tester's commands, read from stdin by their own
/// thread; `None` once stdin has ended.
fn read_commands(tx: mpsc::Sender<Option<Command>>) {
    for_each_line(io::stdin().lock(), |line| match Command::parse(line) {
        Some(command) => tx.send(Some(command)).is_ok(),
        None => {
            log::warn!("worker: not a command: {:?}", line.trim());
            true
        }
    });
    let _ = tx.send(None); // the run may already be over
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
    let mut local = match Local::new(o) {
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
    let mut deadline = Instant::now() + o.duration;
    let mut target = 0u64;
    // The latency already said in `step` answers, for the final report.
    let mut said = Histogram::new();
    let mut last_status: Option<Instant> = None;
    'run: loop {
        loop {
            match commands.try_recv() {
                Ok(Some(Command::Open(n))) => target = n,
                Ok(Some(Command::Close(n))) => {
                    local.close_held(n);
                }
                Ok(Some(Command::Step)) => {
                    let latency = local.take_latency();
                    said.merge(&latency);
                    if !send(&Message::Step {
                        latency: Box::new(latency),
                    }) {
                        break 'run;
                    }
                }
                Ok(Some(Command::Lease(ms))) => {
                    deadline = Instant::now() + Duration::from_millis(ms);
                }
                Ok(None) | Err(mpsc::TryRecvError::Disconnected) => break 'run,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        let now = Instant::now();
        if now >= deadline {
            log::warn!("worker: its time bound passed");
            break;
        }
        // Never more open at once than its share of descriptors: what is
        // asked past it is dropped, said, not kept for later.
        let open = local.counts().held + local.in_flight();
        let room = o.connections.saturating_sub(open);
        let attempted = local.counts().attempted;
        if target > attempted.saturating_add(room) {
            log::warn!(
                "worker: asked for {} more streams, room for {room}",
                target - attempted
            );
            target = attempted + room;
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
    let mut held = local.finish();
    held.tally.latency.merge(&said);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_read_back_as_written() {
        for c in [
            Command::Open(300),
            Command::Close(7),
            Command::Step,
            Command::Lease(45_000),
        ] {
            assert_eq!(Command::parse(&c.line()), Some(c), "{c:?}");
        }
        assert_eq!(Command::parse("open 3\r\n"), Some(Command::Open(3)));
        for bad in [
            "",
            "open",
            "open -1",
            "open x",
            "close 1 2",
            "steps",
            "hold 3",
        ] {
            assert_eq!(Command::parse(bad), None, "{bad:?}");
        }
    }
}
