//! What `--pid` lets the load tester see of the server (Linux `/proc` and
//! cgroup v2): its resident memory, whether it is still alive, and how much
//! memory it has left before the kernel or its cgroup runs out.
//!
//! The headroom is the smaller of the machine's `MemAvailable` and, for
//! every memory cgroup from the process's own up to the root that has a
//! limit, `memory.max - memory.current`.

use std::fs;
use std::path::{Path, PathBuf};

/// Headroom below which the server is taken to be out of memory: 32 MiB.
pub(super) const MEMORY_FLOOR_KIB: u64 = 32 * 1024;

/// One look at the server.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Sample {
    pub(super) rss_kib: Option<u64>,
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
    let cgroup = cgroup_dir(pid).and_then(|dir| cgroup_headroom_kib(&dir));
    let headroom_kib = match (available, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    };
    Some(Sample {
        rss_kib,
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

/// The cgroup v2 directory of `pid` (the `0::PATH` line).
fn cgroup_dir(pid: u32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(Path::new("/sys/fs/cgroup").join(path.trim().trim_start_matches('/')))
}

/// The least `memory.max - memory.current` from `dir` up to the root,
/// among the cgroups that have a limit; `None` when none has.
fn cgroup_headroom_kib(dir: &Path) -> Option<u64> {
    let root = Path::new("/sys/fs/cgroup");
    let mut least: Option<u64> = None;
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| d.starts_with(root)) {
        let read = |f: &str| fs::read_to_string(d.join(f)).ok();
        let max = read("memory.max").and_then(|m| m.trim().parse::<u64>().ok());
        let current = read("memory.current").and_then(|c| c.trim().parse::<u64>().ok());
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
        assert!(s.headroom_kib.is_some_and(|h| h > 0), "{s:?}");
        assert!(sample(u32::MAX).is_none());
        assert_eq!(kib_field("VmRSS:\t  1234 kB\n", "VmRSS:"), Some(1234));
    }
}
