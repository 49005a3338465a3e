//! [`MemoryGuard`]: refuses new streams while memory headroom is low.
//!
//! The cap is computed once, at start, from the memory then available. What
//! the process (or its cgroup) uses can grow afterwards for reasons the cap
//! cannot see: socket buffers of clients that read slowly (cgroup v2
//! charges them to the cgroup), retained events and mailboxes, another
//! process in the same cgroup. Past a memory cgroup's limit the kernel
//! kills the whole process, every stream with it; so before a new stream is
//! admitted, the guard checks that headroom is above a floor, and the
//! stream gets the same answer as past the cap when it is not.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use super::{Capacity, MemoryInfo, MemorySource, cgroup, combine, machine_memory};
use crate::stats::Stats;

/// Readings are at most this often (milliseconds): a reading is a few small
/// file reads (`memory.stat` is the largest), and admissions can come
/// thousands a second.
const READ_INTERVAL_MS: u64 = 100;
/// The low-memory warning is logged at most this often (milliseconds).
const WARN_INTERVAL_MS: u64 = 10_000;
/// Smallest floor: room for a burst of admissions between two readings
/// (100 ms at 2,000 streams a second is 200 streams, 7 MiB idle) is
/// counted by the estimate below; this keeps the kernel's own slack (per-CPU
/// charge batches, slab it has not freed yet) and a few stalled streams'
/// buffers on top.
const FLOOR_MIN: u64 = 4 << 20;
/// Largest floor: on a big machine or cgroup, a sixteenth would keep
/// gigabytes idle; 64 MiB covers a second of admissions at 1,000 a second
/// at the full per-stream budget.
const FLOOR_MAX: u64 = 64 << 20;

/// The headroom below which new streams are refused: a sixteenth of the
/// limit (16 MiB of a 256 MiB cgroup), kept within 4 to 64 MiB. A fraction,
/// because what streams already open can still add without any new
/// admission (data in flight, send buffers, the hub's queues) grows with
/// how many a limit lets in.
pub(crate) fn floor_for(limit: u64) -> u64 {
    (limit / 16).clamp(FLOOR_MIN, FLOOR_MAX)
}

/// Answers "may another stream start?" from the memory headroom, reading
/// the memory cgroup's files (or `/proc/meminfo` when there is no cgroup
/// limit) at most once every 100 ms. Held in the server's shared state and
/// asked by the acceptor before each new stream.
pub(crate) struct MemoryGuard {
    read: Box<dyn Fn() -> Option<MemoryInfo> + Send + Sync>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last reading, plus one (0: none yet).
    read_at: AtomicU64,
    /// Headroom at the last reading, in bytes (`u64::MAX`: unknown).
    headroom: AtomicU64,
    /// The floor for the limit of the last reading, in bytes.
    floor: AtomicU64,
    /// Streams open at the last reading.
    open_at_read: AtomicU64,
    /// Whether the last reading came from a cgroup.
    cgroup: AtomicBool,
    /// Milliseconds since `epoch` of the last warning, plus one (0: none yet).
    warned_at: AtomicU64,
}

impl std::fmt::Debug for MemoryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryGuard")
            .field("headroom", &self.headroom.load(Relaxed))
            .field("floor", &self.floor.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl MemoryGuard {
    /// A guard over this process's memory cgroup (located once, here) and
    /// the machine's memory.
    pub(crate) fn detect() -> MemoryGuard {
        let hierarchy = cgroup::locate_self("memory");
        MemoryGuard::with_reader(Box::new(move || {
            let cgroup = hierarchy.as_ref().and_then(cgroup::memory);
            combine(machine_memory(), cgroup.as_ref())
        }))
    }

    /// A guard over whatever `read` reports (tests give it figures).
    pub(crate) fn with_reader(read: Box<dyn Fn() -> Option<MemoryInfo> + Send + Sync>) -> Self {
        MemoryGuard {
            read,
            epoch: Instant::now(),
            read_at: AtomicU64::new(0),
            headroom: AtomicU64::new(u64::MAX),
            floor: AtomicU64::new(0),
            open_at_read: AtomicU64::new(0),
            cgroup: AtomicBool::new(false),
            warned_at: AtomicU64::new(0),
        }
    }

    /// Whether a new stream must be refused for want of memory, with
    /// `open` streams open now. Counts a refusal in `stats` and warns (at
    /// most every 10 s).
    pub(crate) fn refuses(&self, open: u64, stats: &Stats) -> bool {
        let Some((headroom, floor)) = self.low(open) else {
            return false;
        };
        stats.memory_refused();
        let now = self.now();
        let warned = self.warned_at.load(Relaxed);
        if (warned == 0 || now.saturating_sub(warned) >= WARN_INTERVAL_MS)
            && self
                .warned_at
                .compare_exchange(warned, now, Relaxed, Relaxed)
                .is_ok()
        {
            let source = if self.cgroup.load(Relaxed) {
                MemorySource::Cgroup
            } else {
                MemorySource::Machine
            };
            log::warn!(
                "memory low: about {} MiB left ({}), below the {} MiB floor: \
                 refusing new streams ({open} open)",
                headroom >> 20,
                source.as_str(),
                floor >> 20
            );
        }
        true
    }

    /// `Some((estimated headroom, floor))` when the headroom is below the
    /// floor.
    fn low(&self, open: u64) -> Option<(u64, u64)> {
        self.refresh(open);
        let headroom = self.headroom.load(Relaxed);
        if headroom == u64::MAX {
            return None; // nothing readable: only the cap applies
        }
        // Streams admitted since the reading are not in it yet: count each
        // at its full budget, so a burst between two readings cannot run
        // past the floor unseen.
        let admitted = open.saturating_sub(self.open_at_read.load(Relaxed));
        let estimate =
            headroom.saturating_sub(admitted.saturating_mul(Capacity::MEMORY_PER_STREAM));
        let floor = self.floor.load(Relaxed);
        (estimate < floor).then_some((estimate, floor))
    }

    /// Takes a new reading if the last one is 100 ms old. One caller takes
    /// it (the one that moves `read_at`); others meanwhile use the last one.
    /// No lock is held while the files are read.
    fn refresh(&self, open: u64) {
        let now = self.now();
        let last = self.read_at.load(Relaxed);
        if last != 0 && now.saturating_sub(last) < READ_INTERVAL_MS {
            return;
        }
        if self
            .read_at
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_err()
        {
            return;
        }
        match (self.read)() {
            Some(info) => {
                self.floor.store(floor_for(info.limit), Relaxed);
                self.cgroup
                    .store(info.source == MemorySource::Cgroup, Relaxed);
                self.open_at_read.store(open, Relaxed);
                self.headroom.store(info.available, Relaxed);
            }
            None => self.headroom.store(u64::MAX, Relaxed),
        }
    }

    /// Milliseconds since the guard was made, plus one, so 0 means "never".
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_floor_is_a_sixteenth_within_bounds() {
        assert_eq!(floor_for(256 * MIB), 16 * MIB);
        assert_eq!(floor_for(32 * MIB), 4 * MIB);
        assert_eq!(floor_for(0), 4 * MIB);
        assert_eq!(floor_for(24 << 30), 64 * MIB);
    }

    /// A guard whose readings come from `figures` (the last one repeats),
    /// and a count of readings taken.
    fn guard(figures: Vec<Option<u64>>) -> (MemoryGuard, Arc<Mutex<usize>>) {
        let reads = Arc::new(Mutex::new(0));
        let count = Arc::clone(&reads);
        let g = MemoryGuard::with_reader(Box::new(move || {
            let mut n = count.lock().expect("not poisoned");
            let available = figures[(*n).min(figures.len() - 1)];
            *n += 1;
            available.map(|available| MemoryInfo {
                available,
                limit: 256 * MIB,
                source: MemorySource::Cgroup,
            })
        }));
        (g, reads)
    }

    #[test]
    fn refuses_below_the_floor_and_reads_at_most_every_100_ms() {
        let stats = Stats::new();
        let (g, reads) = guard(vec![Some(100 * MIB), Some(10 * MIB), Some(100 * MIB)]);
        assert!(!g.refuses(0, &stats), "100 MiB left, floor 16");
        assert!(!g.refuses(0, &stats));
        assert_eq!(*reads.lock().expect("lock"), 1, "the answer is cached");
        std::thread::sleep(Duration::from_millis(110));
        assert!(g.refuses(0, &stats), "10 MiB left");
        assert!(g.refuses(0, &stats));
        assert_eq!(*reads.lock().expect("lock"), 2);
        assert_eq!(stats.snapshot().memory_rejected, 2);
        std::thread::sleep(Duration::from_millis(110));
        assert!(!g.refuses(0, &stats), "memory came back");
    }

    #[test]
    fn streams_admitted_since_the_reading_count_at_their_budget() {
        let stats = Stats::new();
        // 20 MiB left at the reading, floor 16: 4 MiB is 53 streams'
        // budget (76 KiB each).
        let (g, reads) = guard(vec![Some(20 * MIB)]);
        assert!(!g.refuses(1000, &stats));
        assert!(!g.refuses(1053, &stats));
        assert!(g.refuses(1054, &stats), "past the floor by the estimate");
        assert!(!g.refuses(900, &stats), "streams that closed give it back");
        assert_eq!(
            *reads.lock().expect("lock"),
            1,
            "no reading needed for that"
        );
    }

    #[test]
    fn unreadable_memory_refuses_nothing() {
        let stats = Stats::new();
        let (g, _) = guard(vec![None]);
        assert!(!g.refuses(1 << 40, &stats));
        assert_eq!(stats.snapshot().memory_rejected, 0);
    }

    #[test]
    fn detects_this_machine() {
        // No cgroup limit here, or a roomy one: nothing refused.
        let g = MemoryGuard::detect();
        let stats = Stats::new();
        if let Some(m) = super::super::memory_info()
            && m.available > 2 * floor_for(m.limit)
        {
            assert!(!g.refuses(0, &stats));
        }
    }
}
