//! Threads that make Redis round trips on behalf of stream threads.
//!
//! A stream's thread keeps every stack page it ever touched for the
//! stream's whole life. A round trip to Redis goes deep (the pool, a
//! connect, the RESP reader's recursion): made on the stream's thread, it
//! left every idle Redis subscriber with a second stack page, 4 KiB more
//! than on the memory engine. So the stream's thread hands the work to one
//! of these threads and parks until the answer is in: what it touches
//! itself is a box, a channel send and a park.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::thread::Thread;

use crossbeam_channel::Sender;

use crate::hub::history::StorageError;
use crate::hub::redis::pool::{POOL_MAX, lock};

/// Stack of a worker thread: a connect resolves a host name.
const STACK: usize = 256 * 1024;

type Job = Box<dyn FnOnce() + Send>;

/// The worker threads of one Redis engine; they end when it is dropped.
pub(crate) struct Workers {
    tx: Option<Sender<Job>>,
}

/// Where a worker leaves its answer for the thread that waits.
struct Reply<T> {
    value: Mutex<Option<Option<T>>>,
    waiter: Thread,
}

impl Workers {
    /// Starts them now, from the thread that makes the hub: a stream's
    /// thread must not start threads (that takes several stack pages).
    /// As many as the pool has connections: more could only wait for one.
    pub(crate) fn started() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let mut started = 0;
        for i in 0..POOL_MAX {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ssed-redis-{i}"))
                .stack_size(STACK)
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => log::warn!("cannot start a Redis worker thread: {e}"),
            }
        }
        if started == 0 {
            log::warn!("no Redis worker thread: stream threads make their own round trips");
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
    /// When `f` panicked (the worker goes on).
    pub(crate) fn run<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let reply = Arc::new(Reply {
            value: Mutex::new(None),
            waiter: std::thread::current(),
        });
        let answer = Arc::clone(&reply);
        let job: Job = Box::new(move || {
            let out = catch_unwind(AssertUnwindSafe(f)).ok();
            if out.is_none() {
                log::error!("a Redis command panicked");
            }
            *lock(&answer.value) = Some(out);
            answer.waiter.unpark();
        });
        match &self.tx {
            Some(tx) => {
                if let Err(e) = tx.send(job) {
                    (e.into_inner())();
                }
            }
            None => job(),
        }
        loop {
            if let Some(out) = lock(&reply.value).take() {
                return out.ok_or_else(|| StorageError::new("a Redis command panicked"));
            }
            // Woken by the worker; any other wake-up looks again.
            std::thread::park();
        }
    }
}
