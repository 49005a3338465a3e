//! Worker processes: when a run asks for more streams than this process's
//! descriptor limit allows, it re-executes itself as `ssed loadtest
//! --worker` several times and spreads the streams over them (see
//! [`super::worker`] for the protocol). The [`Pool`] is their
//! [`Holder`]: it paces their connects with `open N` lines, adds up their
//! statuses as they come, and at the end merges their counts and latency
//! histograms, so the quantiles are those of the union of every sample.
//! `--find-limit` drives the workers one by one instead (see
//! [`super::spread`]), adding some as its steps grow, and gathers each
//! step's latency from them with `step`.
//!
//! Every worker ends when its stdin closes: at the end of the run, when
//! this process exits or dies. Each also has a time bound of its own, and
//! one that does not report within [`FINISH_TIMEOUT`] of the end is killed
//! by its PID.

use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::args::Options;
use super::decode::Tally;
use super::histogram::Histogram;
use super::holder::{Held, Holder};
use super::host;
use super::streams::Counts;
use super::worker::{Command as Line, Message, for_each_line};

/// Most worker processes one run starts.
pub(super) const MAX_WORKERS: u64 = 64;
/// How long the workers have to send their final reports.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two rounds of `open N` while the ramp goes on.
const OPEN_EVERY: Duration = Duration::from_millis(10);
/// Least wait of a turn: statuses come every few tens of milliseconds.
const MIN_WAIT: Duration = Duration::from_millis(2);

/// Why the workers could not be started.
#[derive(Debug)]
pub(super) struct SpawnError(String);

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpawnError {}

/// What a worker's reader thread passes on.
enum Event {
    Message(Box<Message>),
    Bad(String),
    Eof,
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Its share of the streams.
    share: u64,
    /// The last `open N` sent.
    opened: u64,
    counts: Counts,
    in_flight: u64,
    events: u64,
    deliveries: u64,
    last: Option<Final>,
    /// Its answer to the last `step`, until taken.
    step: Option<Box<Histogram>>,
    /// Its stdout ended.
    gone: bool,
}

/// A worker's final report.
struct Final {
    counts: Counts,
    tally: Box<Tally>,
    cpu_ms: Option<u64>,
    peak_rss_kib: Option<u64>,
}

/// The worker processes of one run.
pub(super) struct Pool {
    workers: Vec<Worker>,
    /// Kept to give workers added later their reader.
    tx: mpsc::Sender<(usize, Event)>,
    rx: mpsc::Receiver<(usize, Event)>,
    readers: Vec<thread::JoinHandle<()>>,
    counts: Counts,
    in_flight: u64,
    events: u64,
    deliveries: u64,
    last_open: Option<Instant>,
    ended: bool,
}

impl Drop for Pool {
    /// A run that failed half-way still ends its workers.
    fn drop(&mut self) {
        self.end();
    }
}

impl Pool {
    /// No workers yet.
    pub(super) fn new() -> Pool {
        let (tx, rx) = mpsc::channel();
        Pool {
            workers: Vec::new(),
            tx,
            rx,
            readers: Vec::new(),
            counts: Counts::default(),
            in_flight: 0,
            events: 0,
            deliveries: 0,
            last_open: None,
            ended: false,
        }
    }

    /// Starts `k` workers, sharing `o.connections` as evenly as they go,
    /// each bound to `bound` of running time.
    pub(super) fn spawn(o: &Options, k: u64, bound: Duration) -> Result<Pool, SpawnError> {
        let mut pool = Pool::new();
        for i in 0..k {
            let share = o.connections / k + u64::from(i < o.connections % k);
            pool.add(o, share, bound)?; // dropping the pool ends those started
        }
        Ok(pool)
    }

    /// Starts one more worker, holding at most `share` streams at once and
    /// bound to `bound` of running time.
    pub(super) fn add(
        &mut self,
        o: &Options,
        share: u64,
        bound: Duration,
    ) -> Result<(), SpawnError> {
        let n = self.workers.len() + 1;
        let exe = std::env::current_exe()
            .map_err(|e| SpawnError(format!("cannot find this program to start workers: {e}")))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("loadtest")
            .arg("--worker")
            .args(["--url", &o.url.url])
            .args(o.more_urls.iter().flat_map(|u| ["--url", u]))
            .args(["--connections", &share.to_string()])
            .args(["--duration", &format!("{}ms", bound.as_millis())]);
        if let Some(ca) = &o.cacert {
            cmd.arg("--cacert").arg(ca);
        }
        if o.insecure {
            cmd.arg("--insecure");
        }
        // The sources are one range, in order (`--source A-B`).
        if let (Some(first), Some(last)) = (o.sources.first(), o.sources.last()) {
            cmd.args(["--source", &format!("{first}-{last}")]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| SpawnError(format!("cannot start worker {n}: {e}")))?;
        let stdout = child.stdout.take();
        let tx = self.tx.clone();
        let index = self.workers.len();
        let reader = thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || read_worker(index, stdout, &tx));
        self.workers.push(Worker {
            stdin: child.stdin.take(),
            child,
            share,
            opened: 0,
            counts: Counts::default(),
            in_flight: 0,
            events: 0,
            deliveries: 0,
            last: None,
            step: None,
            gone: false,
        });
        match reader {
            Ok(r) => {
                self.readers.push(r);
                Ok(())
            }
            // Its stdout is dropped with the thread's closure: it ends on
            // its next status, or on its stdin's end with the pool.
            Err(e) => Err(SpawnError(format!("cannot read worker {n}: {e}"))),
        }
    }

    /// How many workers were started.
    pub(super) fn len(&self) -> usize {
        self.workers.len()
    }

    /// Worker `i`'s streams held, as it said last.
    pub(super) fn held(&self, i: usize) -> u64 {
        self.workers.get(i).map_or(0, |w| w.counts.held)
    }

    /// The last `open N` sent to worker `i`.
    pub(super) fn opened(&self, i: usize) -> u64 {
        self.workers.get(i).map_or(0, |w| w.opened)
    }

    /// The first worker whose output has ended, said; a worker ends only
    /// when told to, so this one failed.
    pub(super) fn lost(&self) -> Option<String> {
        let (i, w) = self.workers.iter().enumerate().find(|(_, w)| w.gone)?;
        Some(format!("worker {} (pid {}) ended", i + 1, w.child.id()))
    }

    /// Whether a round of `open N` may go now: at most one every
    /// [`OPEN_EVERY`] while a ramp goes on, so the lines stay few, and
    /// always the one that completes it (`last`).
    pub(super) fn open_round(&mut self, last: bool) -> bool {
        let now = Instant::now();
        if !last
            && self
                .last_open
                .is_some_and(|t| now.duration_since(t) < OPEN_EVERY)
        {
            return false;
        }
        self.last_open = Some(now);
        true
    }

    /// Sends `command` to worker `i`; false when it is gone.
    pub(super) fn tell(&mut self, i: usize, command: Line) -> bool {
        let Some(w) = self.workers.get_mut(i) else {
            return false;
        };
        let Some(stdin) = w.stdin.as_mut() else {
            return false;
        };
        if let Err(e) = stdin.write_all(command.line().as_bytes()) {
            log::warn!("worker {} (pid {}) is gone: {e}", i + 1, w.child.id());
            w.stdin = None;
            return false;
        }
        if let Line::Open(n) = command {
            w.opened = n;
        }
        true
    }

    /// Asks every worker for its latency since the last `step` and waits
    /// (at most `timeout`) for their answers; returns them merged, and how
    /// many workers did not answer.
    pub(super) fn step(&mut self, timeout: Duration) -> (Histogram, usize) {
        let mut asked = Vec::new();
        for i in 0..self.workers.len() {
            self.workers[i].step = None;
            if self.tell(i, Line::Step) {
                asked.push(i);
            }
        }
        let until = Instant::now() + timeout;
        let waiting = |p: &Pool| {
            asked
                .iter()
                .any(|&i| p.workers[i].step.is_none() && !p.workers[i].gone)
        };
        while waiting(self) {
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((i, e)) => self.handle(i, e),
                Err(_) => break,
            }
        }
        let mut merged = Histogram::new();
        let mut silent = self.workers.len() - asked.len();
        for (i, w) in self.workers.iter_mut().enumerate() {
            match w.step.take() {
                Some(h) if merged.merge(&h) => {}
                Some(_) => log::warn!("worker {}: its latency histogram is not ours", i + 1),
                None if asked.contains(&i) => silent += 1,
                None => {}
            }
        }
        (merged, silent)
    }

    /// Waits up to `wait` (at least [`MIN_WAIT`]) for the workers' lines
    /// and takes in every one that has come.
    pub(super) fn wait(&mut self, wait: Duration) {
        if let Ok((i, e)) = self.rx.recv_timeout(wait.max(MIN_WAIT)) {
            self.handle(i, e);
            while let Ok((i, e)) = self.rx.try_recv() {
                self.handle(i, e);
            }
        }
    }

    fn handle(&mut self, index: usize, event: Event) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        match event {
            Event::Message(m) => match *m {
                Message::Status {
                    counts,
                    in_flight,
                    events,
                    deliveries,
                } => {
                    (w.counts, w.in_flight, w.events, w.deliveries) =
                        (counts, in_flight, events, deliveries);
                }
                Message::Step { latency } => w.step = Some(latency),
                Message::Final {
                    counts,
                    tally,
                    cpu_ms,
                    peak_rss_kib,
                } => {
                    (w.counts, w.in_flight) = (counts.clone(), 0);
                    (w.events, w.deliveries) = (tally.events, tally.deliveries);
                    w.last = Some(Final {
                        counts,
                        tally,
                        cpu_ms,
                        peak_rss_kib,
                    });
                }
            },
            Event::Bad(line) => log::warn!("worker {}: not a report: {line:?}", index + 1),
            Event::Eof => {
                w.gone = true;
                w.in_flight = 0;
                if w.last.is_none() {
                    log::warn!(
                        "worker {} (pid {}) ended without its report",
                        index + 1,
                        w.child.id()
                    );
                }
            }
        }
        self.add_up();
    }

    fn add_up(&mut self) {
        let mut counts = Counts::default();
        let (mut in_flight, mut events, mut deliveries) = (0, 0, 0);
        for w in &self.workers {
            counts.add(&w.counts);
            in_flight += w.in_flight;
            events += w.events;
            deliveries += w.deliveries;
        }
        (self.counts, self.in_flight, self.events, self.deliveries) =
            (counts, in_flight, events, deliveries);
    }

    /// Closes every worker's stdin, waits for their final reports (at most
    /// [`FINISH_TIMEOUT`]), then kills by PID any still running and reaps
    /// them all.
    fn end(&mut self) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        for w in &mut self.workers {
            w.stdin = None;
        }
        let until = Instant::now() + FINISH_TIMEOUT;
        while self.workers.iter().any(|w| !w.gone) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.rx.recv_timeout(left) {
                Ok((i, e)) => self.handle(i, e),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            if !w.gone {
                log::warn!(
                    "worker {} (pid {}) did not end: killed",
                    i + 1,
                    w.child.id()
                );
                let _ = w.child.kill(); // our own child, by its PID; it may just have exited
            }
            if let Err(e) = w.child.wait() {
                log::warn!("worker {}: {e}", i + 1);
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join(); // its pipe is closed now
        }
    }
}

/// Passes on every line of a worker's stdout, then its end.
fn read_worker(index: usize, stdout: Option<impl Read>, tx: &mpsc::Sender<(usize, Event)>) {
    if let Some(out) = stdout {
        for_each_line(BufReader::new(out), |line| {
            let event = match serde_json::from_str::<Message>(line) {
                Ok(m) => Event::Message(Box::new(m)),
                Err(_) => Event::Bad(line.trim().chars().take(200).collect()),
            };
            tx.send((index, event)).is_ok()
        });
    }
    let _ = tx.send((index, Event::Eof)); // the pool may be gone already
}

impl Holder for Pool {
    /// Shares `due` among the workers as their shares were made: worker
    /// `i` of `k` starts its `due / k`, plus one for the first `due % k`.
    fn open_to(&mut self, due: u64) {
        let total: u64 = self.workers.iter().map(|w| w.share).sum();
        let due = due.min(total);
        if !self.open_round(due == total) {
            return;
        }
        let k = self.workers.len() as u64;
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            let want = (due / k + u64::from((i as u64) < due % k)).min(w.share);
            if want > w.opened {
                self.tell(i, Line::Open(want));
            }
        }
    }

    fn counts(&self) -> &Counts {
        &self.counts
    }

    fn in_flight(&self) -> u64 {
        self.in_flight
    }

    fn events(&self) -> (u64, u64) {
        (self.events, self.deliveries)
    }

    fn turn(&mut self, wait: Duration) -> io::Result<()> {
        self.wait(wait);
        if self.workers.iter().all(|w| w.gone) {
            return Err(io::Error::other("every worker is gone"));
        }
        Ok(())
    }

    fn finish(mut self) -> Held {
        self.end();
        let mut counts = Counts::default();
        let mut tally = Tally::new();
        let mut cpu = host::own_cpu_time();
        let mut rss = host::own_peak_rss_kib();
        for (i, w) in self.workers.iter().enumerate() {
            match &w.last {
                Some(f) => {
                    counts.add(&f.counts);
                    if !tally.merge(&f.tally) {
                        log::warn!("worker {}: its latency histogram is not ours", i + 1);
                    }
                    cpu = cpu
                        .zip(f.cpu_ms)
                        .map(|(c, ms)| c + Duration::from_millis(ms));
                    rss = rss.zip(f.peak_rss_kib).map(|(a, b)| a + b);
                }
                // What it said last; its latency is lost.
                None => counts.add(&w.counts),
            }
        }
        Held {
            counts,
            tally,
            workers: self.workers.len() as u64,
            cpu,
            peak_rss_kib: rss,
        }
    }
}
