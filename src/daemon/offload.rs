//! Work a stream's thread hands to other threads and waits for, parked.
//!
//! A stream thread keeps every stack page it touches for as long as the
//! stream lives. Checking a credential touches more than the first page:
//! verifying a JWT (JSON, the signature) or matching topics against URI
//! templates left every idle stream so opened with two resident stack
//! pages instead of one (measured on the static build: 9.8 against 5.7 KiB
//! per stream). Handed here, that work runs on a few long-lived threads;
//! the stream thread queues it under a mutex and parks, as it does anyway
//! while idle, and the worker leaves the answer in a slot and unparks it.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::Thread;

/// Most jobs waiting; past it the caller runs its own.
const MAX_WAITING: usize = 1024;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    /// The jobs, and whether the pool is gone.
    jobs: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

/// Where a job's answer goes, and who waits for it.
struct Slot<R> {
    answer: Mutex<Option<std::thread::Result<R>>>,
    asker: Thread,
}

/// A few worker threads that run jobs for stream threads. The threads end
/// when the pool is dropped.
pub(crate) struct Offload {
    queue: Option<Arc<Queue>>,
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload")
            .field("workers", &self.queue.is_some())
            .finish()
    }
}

impl Offload {
    /// Starts `threads` workers named `name`; with none started, jobs run
    /// in the caller's thread.
    pub(crate) fn start(name: &str, threads: usize) -> Offload {
        let queue = Arc::new(Queue::default());
        let mut started = 0;
        for _ in 0..threads {
            let q = Arc::clone(&queue);
            match std::thread::Builder::new()
                .name(name.into())
                .spawn(move || work(&q))
            {
                Ok(_) => started += 1,
                Err(e) => log::warn!("cannot start a {name} thread: {e}"),
            }
        }
        Offload {
            queue: (started > 0).then_some(queue),
        }
    }

    /// Runs `f` on a worker and returns its answer; the caller parks
    /// meanwhile. A panic in `f` resumes in the caller.
    #[inline(never)]
    pub(crate) fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let Some(queue) = &self.queue else {
            return f();
        };
        let slot = Arc::new(Slot {
            answer: Mutex::new(None),
            asker: std::thread::current(),
        });
        let theirs = Arc::clone(&slot);
        let job: Job = Box::new(move || {
            let answer = catch_unwind(AssertUnwindSafe(f));
            *theirs.answer.lock().unwrap_or_else(PoisonError::into_inner) = Some(answer);
            theirs.asker.unpark();
        });
        let refused = {
            let mut jobs = queue.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            if jobs.1 || jobs.0.len() >= MAX_WAITING {
                Some(job)
            } else {
                jobs.0.push_back(job);
                None
            }
        };
        match refused {
            // A storm: every worker busy and the queue full. Run it here.
            Some(job) => job(),
            None => queue.ready.notify_one(),
        }
        loop {
            let answer = slot
                .answer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            match answer {
                Some(Ok(r)) => return r,
                Some(Err(panic)) => resume_unwind(panic),
                // Woken by the worker, or spuriously: look again.
                None => std::thread::park(),
            }
        }
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        if let Some(q) = &self.queue {
            q.jobs.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
            q.ready.notify_all();
        }
    }
}

/// A worker: runs queued jobs until the pool is dropped.
fn work(queue: &Queue) {
    loop {
        let job = {
            let mut jobs = queue.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(job) = jobs.0.pop_front() {
                    break job;
                }
                if jobs.1 {
                    return;
                }
                jobs = queue
                    .ready
                    .wait(jobs)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_elsewhere_and_answer() {
        let pool = Offload::start("test-offload", 2);
        let me = std::thread::current().id();
        let (answer, ran_on) = pool.run(move || (21 * 2, std::thread::current().id()));
        assert_eq!(answer, 42);
        assert_ne!(ran_on, me);
        let many: Vec<u32> = (0..100).map(|i| pool.run(move || i + 1)).collect();
        assert_eq!(many.iter().sum::<u32>(), 5050);
    }

    #[test]
    fn a_panicking_job_panics_its_caller_not_the_worker() {
        let pool = Offload::start("test-offload", 1);
        let caught = catch_unwind(AssertUnwindSafe(|| pool.run(|| panic!("boom"))));
        assert!(caught.is_err());
        assert_eq!(pool.run(|| 7), 7, "the worker lives on");
    }

    #[test]
    fn without_workers_jobs_run_in_place() {
        let pool = Offload { queue: None };
        let me = std::thread::current().id();
        assert_eq!(pool.run(move || std::thread::current().id()), me);
    }
}
