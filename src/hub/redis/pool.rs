//! The command connections a node keeps to Redis.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::hub::redis::resp::{Conn, RedisUrl, RespError};

/// Connect timeout, and the timeout of every ordinary command.
pub(super) const TIMEOUT: Duration = Duration::from_secs(2);
/// Most command connections a node opens.
pub(super) const POOL_MAX: usize = 16;
/// After a failed connect, commands fail at once for this long instead of
/// each waiting for its own connect.
const FAIL_FAST: Duration = Duration::from_millis(200);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every value behind these locks is replaced whole: a panic elsewhere
    // cannot leave one half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A command connection pool: up to [`POOL_MAX`] connections, idle ones
/// kept for the next command.
pub(super) struct Pool {
    pub(super) url: RedisUrl,
    idle: Mutex<Vec<Conn>>,
    open: Mutex<usize>,
    freed: Condvar,
    /// Until when commands fail at once, and why.
    down: Mutex<Option<(Instant, String)>>,
}

impl Pool {
    pub(super) fn new(url: RedisUrl) -> Self {
        Pool {
            url,
            idle: Mutex::new(Vec::new()),
            open: Mutex::new(0),
            freed: Condvar::new(),
            down: Mutex::new(None),
        }
    }

    /// An idle connection that is still alive, if any. One that Redis
    /// closed while it sat here (a restart, Redis's idle `timeout`) is
    /// dropped: a command sent on it could not tell whether it ran.
    fn idle_alive(&self) -> Option<Conn> {
        loop {
            let conn = lock(&self.idle).pop()?;
            if !conn.is_dead() {
                return Some(conn);
            }
            self.release();
        }
    }

    /// A connection: an idle one still alive, or a new one.
    pub(super) fn get(&self) -> Result<Conn, RespError> {
        if let Some(conn) = self.idle_alive() {
            return Ok(conn);
        }
        if let Some((until, why)) = lock(&self.down).as_ref()
            && Instant::now() < *until
        {
            return Err(RespError::Io(std::io::Error::other(why.clone())));
        }
        {
            let deadline = Instant::now() + TIMEOUT;
            let mut open = lock(&self.open);
            while *open >= POOL_MAX {
                let idle = lock(&self.idle).pop();
                if let Some(conn) = idle {
                    if !conn.is_dead() {
                        return Ok(conn);
                    }
                    *open = open.saturating_sub(1); // dropped: room for a new one
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(RespError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "all Redis connections are busy",
                    )));
                }
                open = self
                    .freed
                    .wait_timeout(open, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            *open += 1;
        }
        match Conn::connect(&self.url, "ssed", TIMEOUT) {
            Ok(conn) => {
                *lock(&self.down) = None;
                Ok(conn)
            }
            Err(e) => {
                // A refused connect fails at once anyway; one that timed out
                // (a host gone silent) should not make every request wait.
                if let RespError::Io(io) = &e
                    && matches!(
                        io.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    )
                {
                    *lock(&self.down) = Some((Instant::now() + FAIL_FAST, e.to_string()));
                }
                self.release();
                Err(e)
            }
        }
    }

    /// Closes every idle connection (Redis went away: they are most likely
    /// dead).
    pub(super) fn clear_idle(&self) {
        let idle = std::mem::take(&mut *lock(&self.idle));
        let mut open = lock(&self.open);
        *open = open.saturating_sub(idle.len());
        self.freed.notify_all();
    }

    pub(super) fn put(&self, conn: Conn) {
        lock(&self.idle).push(conn);
        // Under `open`, which a waiter holds from finding no idle
        // connection until it sleeps: the notice cannot fall in between.
        let _open = lock(&self.open);
        self.freed.notify_one();
    }

    /// One connection fewer (it broke, or never opened).
    pub(super) fn release(&self) {
        let mut open = lock(&self.open);
        *open = open.saturating_sub(1);
        self.freed.notify_one();
    }
}
