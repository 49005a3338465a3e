//! This process's side of a run: its descriptor limit, Ctrl-C, and what
//! it spent (CPU time, peak RSS).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Descriptors a process keeps for everything but its streams.
pub(super) const FDS_RESERVED: u64 = 16;

/// Raises the descriptor limit as far as allowed and returns it.
pub(super) fn fd_limit() -> u64 {
    match ssed::raise_fd_limit() {
        Ok(n) => n,
        Err(e) => {
            log::warn!("cannot raise the descriptor limit: {e}");
            rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(u64::MAX)
        }
    }
}

/// A flag that Ctrl-C (SIGINT), SIGTERM and SIGHUP set, instead of ending
/// the process.
pub(super) fn interrupt_flag() -> Arc<AtomicBool> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&stop)) {
            log::debug!("no handler for signal {signal} ({e}): it ends the run without a report");
        }
    }
    stop
}

/// This process's peak resident memory, in KiB (Linux `/proc`).
pub(super) fn own_peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix("VmHWM:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// This process's user + system CPU time (Linux `/proc`; clock ticks of
/// 1/100 s, the `USER_HZ` Linux exports).
pub(super) fn own_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}
