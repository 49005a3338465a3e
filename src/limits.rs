//! How many streams this machine can afford, and why.
//!
//! Every stream costs one file descriptor, one thread (four memory mappings:
//! stack, its guard, the signal stack and its guard) and some memory. The
//! default cap is the smallest of what each resource allows, so the server
//! answers `503` before the kernel starts refusing `accept`, `mmap` or
//! `clone`.

use std::fs;
use std::io;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Memory mappings one stream thread costs.
const MAPS_PER_THREAD: u64 = 4;
/// Mappings kept for the binary, its libraries, the heap and the allocator.
const MAPS_RESERVED: u64 = 1024;
/// Descriptors kept for the listener, the poller, logs, databases, pending
/// connections' burst.
const FDS_RESERVED: u64 = 64;
/// Memory budgeted per stream when deriving the cap from available memory:
/// touched stack pages, kernel socket state and buffers, allocator slack.
const MEMORY_PER_STREAM: u64 = 64 * 1024;
/// Threads kept for everything else on the machine.
const THREADS_RESERVED: u64 = 1024;

/// The stream cap this machine allows and the resource that sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capacity {
    /// The cap: the smallest of the limits below.
    pub max_streams: usize,
    /// Which resource sets it: `"file descriptors"`, `"memory maps"`,
    /// `"memory"`, `"threads"`, or `"configured"` when set by hand.
    pub limited_by: &'static str,
    /// The soft `RLIMIT_NOFILE` in force.
    pub fd_limit: u64,
    /// Streams the descriptor limit allows (after the pending reserve).
    pub by_fds: u64,
    /// Streams `vm.max_map_count` allows, if readable.
    pub by_maps: Option<u64>,
    /// Streams available memory allows, if readable.
    pub by_memory: Option<u64>,
    /// Streams the thread/pid limits allow, if readable.
    pub by_threads: Option<u64>,
}

impl Capacity {
    /// Reads the machine's limits and derives the cap, keeping
    /// `pending_reserve` descriptors for connections still sending their head.
    pub fn detect(pending_reserve: usize) -> Capacity {
        let fd_limit = fd_limit();
        let reserve = FDS_RESERVED + (pending_reserve as u64).min(fd_limit / 4);
        let by_fds = fd_limit.saturating_sub(reserve).max(1);
        let by_maps = read_u64("/proc/sys/vm/max_map_count")
            .map(|m| m.saturating_sub(MAPS_RESERVED) / MAPS_PER_THREAD);
        let by_memory = memory_available().map(|m| m / 4 * 3 / MEMORY_PER_STREAM);
        let by_threads = thread_limit();
        let mut best = (by_fds, "file descriptors");
        for (limit, name) in [
            (by_maps, "memory maps"),
            (by_memory, "memory"),
            (by_threads, "threads"),
        ] {
            if let Some(l) = limit
                && l < best.0
            {
                best = (l, name);
            }
        }
        Capacity {
            max_streams: usize::try_from(best.0.max(1)).unwrap_or(usize::MAX),
            limited_by: best.1,
            fd_limit,
            by_fds,
            by_maps,
            by_memory,
            by_threads,
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new
/// soft limit.
///
/// # Errors
///
/// When the kernel refuses the change.
pub fn raise_fd_limit() -> io::Result<u64> {
    let current = getrlimit(Resource::Nofile);
    let Some(hard) = current.maximum else {
        // No hard limit: leave the soft one, it is what the admin chose.
        return Ok(current.current.unwrap_or(u64::MAX));
    };
    if current.current == Some(hard) {
        return Ok(hard);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )?;
    Ok(hard)
}

fn fd_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn read_u64(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Available memory: the smaller of the machine's `MemAvailable` and what
/// the cgroup (v2) still allows.
pub(crate) fn memory_available() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let machine = meminfo.lines().find_map(|l| {
        let kb = l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?;
        kb.trim().parse::<u64>().ok().map(|k| k * 1024)
    })?;
    let cgroup = read_u64("/sys/fs/cgroup/memory.max").map(|max| {
        let used = read_u64("/sys/fs/cgroup/memory.current").unwrap_or(0);
        max.saturating_sub(used)
    });
    Some(cgroup.map_or(machine, |c| c.min(machine)))
}

fn thread_limit() -> Option<u64> {
    let mut limit: Option<u64> = None;
    let mut take = |v: Option<u64>| {
        if let Some(v) = v {
            limit = Some(limit.map_or(v, |l| l.min(v)));
        }
    };
    take(read_u64("/proc/sys/kernel/threads-max").map(|t| t.saturating_sub(THREADS_RESERVED)));
    take(read_u64("/proc/sys/kernel/pid_max").map(|t| t.saturating_sub(THREADS_RESERVED)));
    take(read_u64("/sys/fs/cgroup/pids.max").map(|max| {
        let used = read_u64("/sys/fs/cgroup/pids.current").unwrap_or(0);
        max.saturating_sub(used).saturating_sub(16)
    }));
    limit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_a_cap() {
        let c = Capacity::detect(4096);
        assert!(c.max_streams >= 1);
        assert!(c.by_fds < c.fd_limit);
        let smallest = [Some(c.by_fds), c.by_maps, c.by_memory, c.by_threads]
            .into_iter()
            .flatten()
            .min()
            .expect("fd limit is always known");
        assert_eq!(c.max_streams as u64, smallest.max(1));
    }
}
