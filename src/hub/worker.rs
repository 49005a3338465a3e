//! Threads that do deep work on behalf of stream threads: Redis round
//! trips, and compiling a Mercure subscriber's selectors.
//!
//! A stream's thread keeps every stack page it ever touched for the
//! stream's whole life. A round trip to Redis goes deep (the pool, a
//! connect, the RESP reader's recursion): made on the stream's thread, it
//! left every idle Redis subscriber with a second stack page, 4 KiB more
//! than on the memory engine; compiling a URI template or URL pattern left
//! every idle subscriber by selector with one. So the stream's thread hands
//! the work to one of these threads and parks until the answer is in: what
//! it touches itself is a box, a channel send and a park.
//!
//! A job that waited longer than a command may take fails unrun, as a
//! command waiting for a pooled connection did on the stream's own
//! thread: an overloaded or silent Redis answers `busy` in seconds rather
//! than queueing streams for minutes.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::Instant;

use crossbeam_channel::Sender;

use crate::hub::history::StorageError;
use std::sync::MutexGuard;
use std::time::Duration;

/// Stack of a worker thread: a connect resolves a host name.
const STACK: usize = 256 * 1024;

/// A job and when it was queued; run with `true` when it waited too long
/// and must only answer that.
struct Job {
    queued: Instant,
    run: Box<dyn FnOnce(bool) + Send>,
}

/// A pool of worker threads; they end when it is dropped.
pub(crate) struct Workers {
    tx: Option<Sender<Job>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The answer is replaced whole: a panic elsewhere cannot leave it
    // half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a job gave no answer.
#[derive(Debug, Clone, Copy)]
enum Failed {
    Panicked,
    Busy,
    Dropped,
}

/// Where a worker leaves its answer for the thread that waits.
struct Reply<T> {
    value: Mutex<Option<Result<T, Failed>>>,
    waiter: Thread,
}

/// Answers a job's caller exactly once: with its result, or, if the job
/// is dropped unanswered (a worker thread that died), that it was.
struct Answer<T> {
    reply: Arc<Reply<T>>,
    sent: bool,
}

impl<T> Answer<T> {
    fn send(&mut self, value: Result<T, Failed>) {
        *lock(&self.reply.value) = Some(value);
        self.sent = true;
        self.reply.waiter.unpark();
    }
}

impl<T> Drop for Answer<T> {
    fn drop(&mut self) {
        if !self.sent {
            self.send(Err(Failed::Dropped));
        }
    }
}

impl Workers {
    /// Starts them now, from the thread that makes the hub: a stream's
    /// thread must not start threads (that takes several stack pages).
    /// `threads` of them, named `name` and a number (for Redis, as many as
    /// the pool has connections: more could only wait for one).
    /// A job that waited longer than `wait_max` fails unrun.
    pub(crate) fn started(name: &str, threads: usize, wait_max: Duration) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let mut started = 0;
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}{i}"))
                .stack_size(STACK)
                .spawn(move || {
                    for job in rx {
                        (job.run)(job.queued.elapsed() > wait_max);
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => log::warn!("cannot start a worker thread ({name}): {e}"),
            }
        }
        if started == 0 {
            log::warn!("no worker thread ({name}): stream threads do their own deep work");
        }
        Workers {
            tx: (started > 0).then_some(tx),
        }
    }

    /// Runs `f` on a worker and waits for its answer (on this thread when
    /// no worker runs).
    ///
    /// # Errors
    ///
    /// When the job waited longer than it may (the workers are
    /// overwhelmed: Redis is slow, say), or `f` panicked (the worker goes
    /// on).
    pub(crate) fn run<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        // Typed here, erased below: one copy of the waiting and answering
        // code in the binary, whatever the jobs.
        let out = self.run_any(Box::new(move || Box::new(f()) as Box<dyn Any + Send>))?;
        out.downcast::<T>()
            .map(|t| *t)
            .map_err(|_| StorageError::new("a worker answered with the wrong type"))
    }

    #[inline(never)]
    fn run_any(&self, f: AnyJob) -> Result<Box<dyn Any + Send>, StorageError> {
        let reply = Arc::new(Reply {
            value: Mutex::new(None),
            waiter: std::thread::current(),
        });
        let mut answer = Answer {
            reply: Arc::clone(&reply),
            sent: false,
        };
        let job = Job {
            queued: Instant::now(),
            run: Box::new(move |late| {
                if late {
                    answer.send(Err(Failed::Busy));
                    return;
                }
                let out = catch_unwind(AssertUnwindSafe(f)).map_err(|_| Failed::Panicked);
                answer.send(out);
            }),
        };
        match &self.tx {
            Some(tx) => {
                if let Err(e) = tx.send(job) {
                    let job = e.into_inner();
                    (job.run)(false);
                }
            }
            None => (job.run)(false),
        }
        loop {
            if let Some(out) = lock(&reply.value).take() {
                return out.map_err(|why| match why {
                    Failed::Busy => StorageError::new("all workers are busy"),
                    Failed::Panicked => {
                        log::error!("a worker's job panicked");
                        StorageError::new("a worker's job panicked")
                    }
                    Failed::Dropped => StorageError::new("a worker thread ended"),
                });
            }
            // Woken by the worker; any other wake-up looks again.
            std::thread::park();
        }
    }
}

/// A job as a worker runs it, its answer's type erased.
type AnyJob = Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>;
