//! What `--pid` lets the load tester see of the server (Linux `/proc` and
//! memory cgroups, v2 or v1): its resident memory, whether it is still
//! alive, and how much memory it has left before the kernel or its cgroup
//! runs out.
//!
//! The headroom is the smaller of the machine's `MemAvailable` and, for
//! every memory cgroup from the process's own up to the root that has a
//! limit, the limit less the usage: `memory.max - memory.current` (v2),
//! `memory.limit_in_bytes - memory.usage_in_bytes` (v1).

use std::fs;
use std::path::{Path, PathBuf};

/// Headroom below which the server is taken to be out of memory: 32 MiB.
pub(super) const MEMORY_FLOOR_KIB: u64 = 32 * 1024;

/// One look at the server.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Sample {
    pub(super) rss_kib: Option<u64>,
    /// Its threads (`Threads:` in `/proc/PID/status`).
    pub(super) threads: Option<u64>,
    /// Memory it could still take, in KiB; `None` when unknown.
    pub(super) headroom_kib: Option<u64>,
}

/// Looks at process `pid`; `None` once it is gone (or a zombie).
pub(super) fn sample(pid: u32) -> Option<Sample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let state = status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .map(str::trim);
    if state.is_some_and(|s| s.starts_with('Z') || s.starts_with('X')) {
        return None;
    }
    let rss_kib = kib_field(&status, "VmRSS:");
    let available = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| kib_field(&m, "MemAvailable:"));
    let cgroup = cgroup_dir(pid).and_then(|(dir, files)| cgroup_headroom_kib(&dir, files));
    let headroom_kib = match (available, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    };
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok());
    Some(Sample {
        rss_kib,
        threads,
        headroom_kib,
    })
}

/// A `NAME: N kB` line of a `/proc` file, in KiB.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// The files of a memory cgroup's limit and usage: v2's, or v1's.
type LimitFiles = (&'static str, &'static str);
const V2: LimitFiles = ("memory.max", "memory.current");
const V1: LimitFiles = ("memory.limit_in_bytes", "memory.usage_in_bytes");
/// A v1 limit at or above this is "no limit" (the kernel writes a page-
/// rounded `i64::MAX`).
const V1_UNLIMITED: u64 = 1 << 60;

/// The memory cgroup directory of `pid` and the files to read there: the
/// v1 memory controller's (`N:memory:PATH`, under /sys/fs/cgroup/memory),
/// else the v2 one (`0::PATH`).
fn cgroup_dir(pid: u32) -> Option<(PathBuf, LimitFiles)> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let root = Path::new("/sys/fs/cgroup");
    let v1 = text.lines().find_map(|l| {
        let (_, rest) = l.split_once(':')?;
        let (controllers, path) = rest.split_once(':')?;
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    });
    if let Some(path) = v1 {
        let dir = root
            .join("memory")
            .join(path.trim().trim_start_matches('/'));
        return Some((dir, V1));
    }
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some((root.join(path.trim().trim_start_matches('/')), V2))
}

/// The least limit less usage from `dir` up to the root, among the
/// cgroups that have a limit; `None` when none has.
fn cgroup_headroom_kib(dir: &Path, (limit_file, usage_file): LimitFiles) -> Option<u64> {
    let root = Path::new("/sys/fs/cgroup");
    let mut least: Option<u64> = None;
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| d.starts_with(root)) {
        let read = |f: &str| fs::read_to_string(d.join(f)).ok();
        let max = read(limit_file)
            .and_then(|m| m.trim().parse::<u64>().ok())
            .filter(|&m| m < V1_UNLIMITED);
        let current = read(usage_file).and_then(|c| c.trim().parse::<u64>().ok());
        if let (Some(max), Some(current)) = (max, current) {
            let left = max.saturating_sub(current) / 1024;
            least = Some(least.map_or(left, |l| l.min(left)));
        }
        at = d.parent();
    }
    least
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_seen() {
        let s = sample(std::process::id()).expect("alive");
        assert!(s.rss_kib.is_some_and(|r| r > 0), "{s:?}");
        assert!(s.threads.is_some_and(|t| t > 0), "{s:?}");
        assert!(s.headroom_kib.is_some_and(|h| h > 0), "{s:?}");
        assert!(sample(u32::MAX).is_none());
        assert_eq!(kib_field("VmRSS:\t  1234 kB\n", "VmRSS:"), Some(1234));
    }
}
