//! Where `--find-limit` holds its streams: in this process while a step
//! fits in its descriptor limit, past it in worker processes
//! ([`super::pool`]), as many as the step needs.
//!
//! The first step past the limit moves the streams: this process closes
//! its own and the workers open the step's count between them. From then
//! on the workers hold every step, the same ones from step to step: a step
//! up starts the streams it adds on the workers holding the fewest (adding
//! a worker when they are all full), a step down closes them on the
//! workers holding the most, so no stream is closed to be opened again and
//! the shares stay as even as they go.
//!
//! A step's latency is gathered from every holder with `step`, once before
//! it publishes (what came before is not the step's) and once after: the
//! workers' histograms merged bucket by bucket with this process's, so the
//! step's p50 and p99 are those of all its deliveries.

use std::io;
use std::time::Duration;

use super::args::Options;
use super::histogram::Histogram;
use super::holder::{Holder, Local};
use super::host;
use super::pool::{self, Pool, SpawnError};
use super::streams::Counts;
use super::worker::Command;

/// How long the workers have to answer `step`.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a step's opens start from on one worker.
#[derive(Debug, Clone, Copy)]
struct Opens {
    /// Its `open N` before the step.
    base: u64,
    /// Connects it starts in this step.
    need: u64,
}

/// The holders of a `--find-limit` run's streams.
pub(super) struct Spread {
    o: Options,
    local: Local,
    /// The workers, once a step did not fit in this process.
    pool: Option<Pool>,
    /// Streams one process may hold: its descriptor limit less those kept.
    per_process: u64,
    /// What a worker started now is bound to, until its next lease.
    lease: Duration,
    /// This process's and the workers' counts, added up (with workers).
    counts: Counts,
    /// The current step's opens: this process's attempts before it, or
    /// the workers'.
    local_base: u64,
    plan: Vec<Opens>,
    need: u64,
}

impl Spread {
    /// Streams held by this process to start with; `fds` is its
    /// descriptor limit.
    pub(super) fn new(o: &Options, fds: u64) -> io::Result<Spread> {
        Ok(Spread {
            o: o.clone(),
            local: Local::new(o)?,
            pool: None,
            per_process: fds.saturating_sub(host::FDS_RESERVED),
            lease: Duration::ZERO,
            counts: Counts::default(),
            local_base: 0,
            plan: Vec::new(),
            need: 0,
        })
    }

    /// Whether `target` streams can be held: in this process, or over at
    /// most [`pool::MAX_WORKERS`] workers.
    pub(super) fn fits(&self, target: u64) -> bool {
        self.per_process > 0 && Self::workers_for(target, self.per_process) <= pool::MAX_WORKERS
    }

    fn workers_for(target: u64, per_process: u64) -> u64 {
        target.div_ceil(per_process.max(1))
    }

    /// Worker processes started so far; 0 while this process holds all.
    pub(super) fn workers(&self) -> u64 {
        self.pool.as_ref().map_or(0, |p| p.len() as u64)
    }

    pub(super) fn counts(&self) -> &Counts {
        match self.pool {
            Some(_) => &self.counts,
            None => self.local.counts(),
        }
    }

    /// Connections connecting or waiting for their head.
    pub(super) fn in_flight(&self) -> u64 {
        self.local.in_flight() + self.pool.as_ref().map_or(0, Holder::in_flight)
    }

    /// Events received that carried a send time.
    pub(super) fn deliveries(&self) -> u64 {
        self.local.events().1 + self.pool.as_ref().map_or(0, |p| p.events().1)
    }

    /// A worker that ended when it should not have, said.
    pub(super) fn lost(&self) -> Option<String> {
        self.pool.as_ref().and_then(Pool::lost)
    }

    /// Bounds every worker (and those started later) to `bound` from now.
    pub(super) fn lease(&mut self, bound: Duration) {
        self.lease = bound;
        if let Some(pool) = &mut self.pool {
            let ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
            for i in 0..pool.len() {
                pool.tell(i, Command::Lease(ms)); // a gone worker is found by `lost`
            }
        }
    }

    /// Closes the streams held past `target`, or this process's own when
    /// `target` does not fit in it (the workers will open them); true when
    /// some were closed, for the server to notice.
    pub(super) fn close_to(&mut self, target: u64) -> bool {
        let held = self.local.counts().held;
        let Some(pool) = &mut self.pool else {
            let close = if target > self.per_process {
                held
            } else {
                held.saturating_sub(target)
            };
            return self.local.close_held(close) > 0;
        };
        let held: Vec<u64> = (0..pool.len()).map(|i| pool.held(i)).collect();
        let mut closed = false;
        for (i, (&h, want)) in held
            .iter()
            .zip(rebalance(&held, self.per_process, target))
            .enumerate()
        {
            if h > want {
                closed |= pool.tell(i, Command::Close(h - want));
            }
        }
        closed
    }

    /// Plans the step to `target` streams: starts the workers it needs
    /// when it does not fit in this process, and returns how many connects
    /// it starts.
    pub(super) fn plan(&mut self, target: u64) -> Result<u64, SpawnError> {
        self.local_base = self.local.counts().attempted;
        if self.pool.is_none() && target <= self.per_process {
            self.need = target.saturating_sub(self.local.counts().held);
            return Ok(self.need);
        }
        let pool = self.pool.get_or_insert_with(Pool::new);
        let wanted = Self::workers_for(target, self.per_process);
        while (pool.len() as u64) < wanted {
            pool.add(&self.o, self.per_process, self.lease)?;
        }
        let held: Vec<u64> = (0..pool.len()).map(|i| pool.held(i)).collect();
        self.plan = held
            .iter()
            .zip(rebalance(&held, self.per_process, target))
            .enumerate()
            .map(|(i, (&h, want))| Opens {
                base: pool.opened(i),
                need: want.saturating_sub(h),
            })
            .collect();
        self.need = self.plan.iter().map(|p| p.need).sum();
        self.add_up();
        Ok(self.need)
    }

    /// Starts the step's connects until `due` of them (at most what
    /// [`Self::plan`] returned) have been started, a burst at most per
    /// call; to the workers in proportion to their part of the step.
    pub(super) fn open_to(&mut self, due: u64) {
        let due = due.min(self.need);
        let Some(pool) = &mut self.pool else {
            self.local.open_to(self.local_base + due);
            return;
        };
        if !pool.open_round(due == self.need) {
            return;
        }
        for (i, p) in self.plan.iter().enumerate() {
            // Exactly its need once `due` is the whole step.
            let share =
                (u128::from(p.need) * u128::from(due) / u128::from(self.need.max(1))) as u64;
            let want = p.base + share;
            if want > pool.opened(i) {
                pool.tell(i, Command::Open(want)); // a gone worker is found by `lost`
            }
        }
    }

    /// Waits up to `wait` for the streams (or the workers' lines) and
    /// handles what came.
    pub(super) fn turn(&mut self, wait: Duration) -> io::Result<()> {
        let Some(pool) = &mut self.pool else {
            return self.local.turn(wait);
        };
        // Whatever this process still has in flight from before the move
        // ends here, without holding the workers' lines up.
        if self.local.in_flight() > 0 {
            self.local.turn(Duration::ZERO)?;
        }
        pool.wait(wait);
        self.add_up();
        Ok(())
    }

    fn add_up(&mut self) {
        if let Some(pool) = &self.pool {
            let mut counts = self.local.counts().clone();
            counts.add(pool.counts());
            self.counts = counts;
        }
    }

    /// Starts a step's measure: the latency so far is not the step's.
    pub(super) fn begin_step(&mut self) {
        self.local.take_latency();
        if let Some(pool) = &mut self.pool {
            pool.step(STEP_TIMEOUT);
            self.add_up();
        }
    }

    /// The latency of every delivery since [`Self::begin_step`], this
    /// process's and the workers' merged.
    pub(super) fn end_step(&mut self) -> Histogram {
        let mut latency = self.local.take_latency();
        if let Some(pool) = &mut self.pool {
            let (theirs, silent) = pool.step(STEP_TIMEOUT);
            if silent > 0 {
                log::warn!("{silent} workers did not say their latency");
            }
            latency.merge(&theirs);
            self.add_up();
        }
        latency
    }
}

/// Each holder's streams once the total of `held` is moved to `target`,
/// none past `cap`: a raise goes to those holding the fewest first, a cut
/// comes from those holding the most first.
fn rebalance(held: &[u64], cap: u64, target: u64) -> Vec<u64> {
    let total: u64 = held.iter().sum();
    if target >= total {
        return fill(held, cap, target - total);
    }
    let room: Vec<u64> = held.iter().map(|&h| cap.saturating_sub(h)).collect();
    fill(&room, cap, total - target)
        .into_iter()
        .map(|r| cap - r)
        .collect()
}

/// `counts` with `add` more between them, the lowest raised first, none
/// past `cap` (all at `cap` when `add` does not fit).
fn fill(counts: &[u64], cap: u64, add: u64) -> Vec<u64> {
    let counts: Vec<u64> = counts.iter().map(|&c| c.min(cap)).collect();
    let room = |level: u64| -> u64 { counts.iter().map(|&c| level.saturating_sub(c)).sum() };
    if room(cap) <= add {
        return vec![cap; counts.len()];
    }
    // The lowest level that takes `add`: everyone raised to one below it,
    // then one more each for the first of those still below it.
    let (mut low, mut high) = (0, cap);
    while low < high {
        let mid = low + (high - low) / 2;
        if room(mid) >= add {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    let below = low.saturating_sub(1);
    let mut left = add - room(below).min(add);
    counts
        .iter()
        .map(|&c| {
            let mut n = c.max(below);
            if c < low && left > 0 {
                n = low;
                left -= 1;
            }
            n
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raise_fills_the_emptiest_and_a_cut_empties_the_fullest() {
        // New workers take the raise; the full ones keep theirs.
        assert_eq!(rebalance(&[0, 0], 184, 200), vec![100, 100]);
        assert_eq!(rebalance(&[100, 100, 0], 184, 400), vec![134, 133, 133]);
        assert_eq!(rebalance(&[184, 184, 0], 184, 400), vec![184, 184, 32]);
        // A cut from the fullest, down to even, then evenly.
        assert_eq!(rebalance(&[134, 133, 133], 184, 300), vec![100, 100, 100]);
        assert_eq!(rebalance(&[150, 90, 10], 184, 200), vec![100, 90, 10]);
        assert_eq!(rebalance(&[150, 90, 10], 184, 100), vec![45, 45, 10]);
        // Unchanged, all gone, past every cap.
        assert_eq!(rebalance(&[7, 3], 184, 10), vec![7, 3]);
        assert_eq!(rebalance(&[7, 3], 184, 0), vec![0, 0]);
        assert_eq!(rebalance(&[7, 3], 10, 50), vec![10, 10]);
        assert_eq!(rebalance(&[], 10, 5), Vec::<u64>::new());
        for (held, target) in [
            (vec![5, 0, 9, 2], 40),
            (vec![5, 0, 9, 2], 3),
            (vec![184, 1], 185),
        ] {
            let after = rebalance(&held, 184, target);
            assert_eq!(after.iter().sum::<u64>(), target, "{held:?} -> {after:?}");
            let up = target >= held.iter().sum();
            for (a, h) in after.iter().zip(&held) {
                assert!(if up { a >= h } else { a <= h }, "{held:?} -> {after:?}");
            }
        }
    }
}
