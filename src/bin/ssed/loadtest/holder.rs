//! What holds a plain run's streams: this process ([`Local`], one epoll
//! instance) or, past its descriptor limit, worker processes
//! ([`super::pool::Pool`]). The run drives either through [`Holder`].

use std::io;
use std::time::{Duration, Instant};

use rustix::event::epoll;

use super::args::Options;
use super::decode::Tally;
use super::histogram::Histogram;
use super::host;
use super::streams::{Counts, SWEEP_EVERY, Streams};

/// Connects started per turn, so reading is never starved.
pub(super) const CONNECT_BURST: u64 = 256;
/// Read buffer shared by every stream.
const SCRATCH: usize = 64 * 1024;

/// What the streams' holder did, once it has ended.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) counts: Counts,
    pub(super) tally: Tally,
    /// Worker processes that held the streams; 0 for this process alone.
    pub(super) workers: u64,
    /// CPU time of this process and its workers.
    pub(super) cpu: Option<Duration>,
    /// Peak RSS of this process plus its workers' peaks.
    pub(super) peak_rss_kib: Option<u64>,
}

/// The run's view of whatever holds the streams.
pub(super) trait Holder {
    /// Starts connects until `due` have been started in all (a burst at
    /// most per call).
    fn open_to(&mut self, due: u64);
    /// What happened to the streams so far.
    fn counts(&self) -> &Counts;
    /// Connections connecting or waiting for their head.
    fn in_flight(&self) -> u64;
    /// Events received, and those that carried a send time.
    fn events(&self) -> (u64, u64);
    /// Waits up to `wait` for something to happen and handles it.
    fn turn(&mut self, wait: Duration) -> io::Result<()>;
    /// Closes every stream and says what was measured.
    fn finish(self) -> Held;
}

/// The streams held by this process.
pub(super) struct Local {
    streams: Streams,
    events: Vec<epoll::Event>,
    scratch: Vec<u8>,
    last_sweep: Instant,
}

impl Local {
    pub(super) fn new(o: &Options) -> io::Result<Self> {
        Ok(Local {
            streams: Streams::new(
                &o.url,
                &o.more_paths,
                o.subscribe_token.as_deref(),
                &o.sources,
            )?,
            events: Vec::with_capacity(1024),
            scratch: vec![0u8; SCRATCH],
            last_sweep: Instant::now(),
        })
    }

    /// Closes up to `n` held streams, the newest first; returns how many.
    pub(super) fn close_held(&mut self, n: u64) -> u64 {
        self.streams.close_held(n)
    }

    /// The latency of the deliveries so far, leaving an empty histogram to
    /// count the next ones.
    pub(super) fn take_latency(&mut self) -> Histogram {
        std::mem::replace(&mut self.streams.tally.latency, Histogram::new())
    }
}

impl Holder for Local {
    fn open_to(&mut self, due: u64) {
        let burst = due
            .saturating_sub(self.streams.counts.attempted)
            .min(CONNECT_BURST);
        for _ in 0..burst {
            self.streams.open();
        }
    }

    fn counts(&self) -> &Counts {
        &self.streams.counts
    }

    fn in_flight(&self) -> u64 {
        self.streams.in_flight
    }

    fn events(&self) -> (u64, u64) {
        (self.streams.tally.events, self.streams.tally.deliveries)
    }

    fn turn(&mut self, wait: Duration) -> io::Result<()> {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) >= SWEEP_EVERY {
            self.last_sweep = now;
            self.streams.sweep(now);
        }
        self.streams.turn(&mut self.events, &mut self.scratch, wait)
    }

    fn finish(self) -> Held {
        let Streams { counts, tally, .. } = self.streams;
        Held {
            counts,
            tally,
            workers: 0,
            cpu: host::own_cpu_time(),
            peak_rss_kib: host::own_peak_rss_kib(),
        }
    }
}
