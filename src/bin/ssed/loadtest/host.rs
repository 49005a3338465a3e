//! This process's side of a run: its descriptor limit and Ctrl-C.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// A flag that Ctrl-C sets.
pub(super) fn interrupt_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)) {
        log::debug!("no Ctrl-C handler ({e}): an interrupt ends the run without a report");
    }
    stop
}
