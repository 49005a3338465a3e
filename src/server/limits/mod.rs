//! How many streams this machine can afford, and why.
//!
//! Every stream costs one file descriptor, one thread (four memory mappings:
//! stack, its guard, the signal stack and its guard) and some memory. The
//! default cap is the smallest of what each resource allows, so the server
//! answers `503` before the kernel starts refusing `accept`, `mmap` or
//! `clone`, or, in a memory cgroup (a container, a systemd unit with
//! `MemoryMax`), before the kernel's OOM killer ends the whole process and
//! every stream with it.
//!
//! The cap is computed once, at start; [`MemoryGuard`] then refuses new
//! streams while memory headroom is below a floor, for what grows after
//! start (socket buffers, retained events, another process in the same
//! cgroup).
//!
//! Within the cap, [`clients`] keeps one client from taking every slot
//! (`max_streams_per_client`), and [`rate`] one publisher from flooding
//! (`publish_rate`).

mod cgroup;
pub(crate) mod clients;
mod guard;
pub(crate) mod rate;

use std::fs;
use std::io;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

pub(crate) use guard::MemoryGuard;
pub use rate::{Rate, RateError, RateKey, RateLimiter};

/// Memory mappings one stream thread costs.
const MAPS_PER_THREAD: u64 = 4;
/// Mappings kept for the binary, its libraries, the heap and the allocator.
const MAPS_RESERVED: u64 = 1024;
/// Descriptors kept for the listener, the poller, logs, databases, pending
/// connections' burst.
const FDS_RESERVED: u64 = 64;
/// What an idle stream costs the memory it is charged to, kernel included,
/// rounded up. Measured inside a v1 memory cgroup (`bash
/// scripts/cgroup-memory.sh --streams 10000`: 2-core VM, kernel 6.18, idle
/// subscribers held from outside the cgroup): 35.2 KiB per stream with the
/// glibc release build, of which 24.3 KiB is kernel memory (the thread's
/// kernel stack, task state, the socket and its file) and the rest the
/// thread's stack pages and heap; about 30 with the static musl build
/// (5.6 KiB of RSS against 10.9). Outside a cgroup, `MemAvailable` drops
/// by 35-41 KiB per loopback stream, both ends included.
const STREAM_IDLE_COST: u64 = 36 * 1024;
/// Room per stream for data in flight: what one stream can pin of its own
/// while its client does not read, whatever the history holds (frames are
/// shared and written without a copy, a replay is read a page at a time,
/// one write stages at most 32 KiB). Measured on 2026-12-04 with clients
/// with a 4 KiB window resuming 300 events of 64 KB
/// (`scripts/stuck-readers.py`): 18.6-22.3 KiB of RSS per stuck stream
/// with the static build, 29-30 KiB with glibc (500 and 50 streams), of
/// which an idle stream holds 5.6 and 10.9; 19 KiB per stalled stream as a v1
/// cgroup counts it (`scripts/cgroup-memory.sh --stalled 500`). Besides,
/// the kernel keeps such a stream's send buffer (up to about 124 KiB with
/// the 64 KiB `SO_SNDBUF`: cgroup v2 charges it to the cgroup, v1 only
/// when `memory.kmem.tcp` is limited) and, once its thread writes, a 32
/// KiB page fragment: not every stream is stuck at once, and the quarter
/// of memory left out of the streams' share and the memory guard cover
/// those.
const STREAM_IN_FLIGHT: u64 = 40 * 1024;
/// Threads kept for everything else on the machine.
const THREADS_RESERVED: u64 = 1024;
/// Tasks kept for the server's own threads (acceptor, wakers, listeners)
/// within a cgroup's `pids.max`.
const CGROUP_TASKS_RESERVED: u64 = 16;

/// Where a memory figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemorySource {
    /// The machine's memory: `MemAvailable` and `MemTotal` of `/proc/meminfo`.
    Machine,
    /// A memory cgroup's limit (v1 `memory.limit_in_bytes`, v2
    /// `memory.max`) less its working set: the process's own cgroup or the
    /// ancestor with the least headroom.
    Cgroup,
}

impl MemorySource {
    /// The name [`Capacity::limited_by`] gives it: `"memory"` or
    /// `"cgroup memory"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemorySource::Machine => "memory",
            MemorySource::Cgroup => "cgroup memory",
        }
    }
}

/// Memory this process may still use, and the limit that sets it.
///
/// See [`memory_info`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryInfo {
    /// Bytes available: the smaller of the machine's `MemAvailable` and
    /// what the memory cgroup's limit leaves above its working set (usage
    /// less inactive page cache, which the kernel reclaims before it
    /// kills).
    pub available: u64,
    /// The total of the source that sets `available`, in bytes: the
    /// cgroup's limit, or the machine's `MemTotal`.
    pub limit: u64,
    /// Which of the two sets `available`.
    pub source: MemorySource,
}

/// Reads how much memory this process may still use: the machine's
/// `MemAvailable`, or less when a memory cgroup (v1 or v2, the process's
/// own or an ancestor) leaves less below its limit.
///
/// For programs that derive a memory budget of their own (a cache, retained
/// events) and keep it out of the streams' share with
/// [`ServerBuilder::memory_reserve`](crate::ServerBuilder::memory_reserve).
/// `None` where neither `/proc/meminfo` nor a cgroup limit can be read
/// (not Linux).
///
/// # Examples
///
/// ```
/// if let Some(m) = ssed::memory_info() {
///     println!("{} MiB available ({:?})", m.available >> 20, m.source);
///     assert!(m.available <= m.limit);
/// }
/// ```
pub fn memory_info() -> Option<MemoryInfo> {
    let cgroup = cgroup::locate_self("memory").and_then(|h| cgroup::memory(&h));
    combine(machine_memory(), cgroup.as_ref())
}

/// What this process holds now: its resident memory and its threads, as
/// `/proc/self/status` says (the daemon's `/metrics` and status feed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
pub(crate) struct ProcessUsage {
    /// Resident memory (`VmRSS`), in bytes.
    pub(crate) rss_bytes: u64,
    /// Threads (`Threads`).
    pub(crate) threads: u64,
}

/// Reads [`ProcessUsage`]; `None` where `/proc/self/status` cannot be
/// read (not Linux).
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
pub(crate) fn process_usage() -> Option<ProcessUsage> {
    parse_status(&fs::read_to_string("/proc/self/status").ok()?)
}

/// `VmRSS` (in bytes) and `Threads` of a `/proc/PID/status` text.
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
fn parse_status(text: &str) -> Option<ProcessUsage> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let rss_kib: u64 = field("VmRSS")?.strip_suffix("kB")?.trim().parse().ok()?;
    Some(ProcessUsage {
        rss_bytes: rss_kib * 1024,
        threads: field("Threads")?.parse().ok()?,
    })
}

/// The stream cap this machine allows and the resource that sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capacity {
    /// The cap: the smallest of the limits below.
    pub max_streams: usize,
    /// Which resource sets it: `"file descriptors"`, `"memory maps"`,
    /// `"memory"` (the machine's), `"cgroup memory"`, `"threads"`, or
    /// `"configured"` when set by hand.
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
    /// The memory the memory term started from, and its source.
    pub memory: Option<MemoryInfo>,
    /// The memory cgroup's limit in bytes, when one is set (the limited
    /// cgroup with the least headroom), whether or not it sets the cap.
    pub cgroup_memory_limit: Option<u64>,
    /// That cgroup's working set at start, in bytes.
    pub cgroup_memory_used: Option<u64>,
    /// Bytes kept out of the streams' share
    /// ([`ServerBuilder::memory_reserve`](crate::ServerBuilder::memory_reserve)).
    pub memory_reserved: u64,
}

/// What [`derive`] works from: everything [`Capacity::detect_with`] reads.
struct Inputs {
    fd_limit: u64,
    max_map_count: Option<u64>,
    memory: Option<MemoryInfo>,
    cgroup_memory: Option<cgroup::Memory>,
    threads: Option<u64>,
    pending_reserve: u64,
    reserved_bytes: u64,
}

impl Capacity {
    /// Memory budgeted per stream by the memory term: what an idle stream
    /// costs as measured inside a memory cgroup (36 KiB, kernel included),
    /// plus 40 KiB, what one stream can pin of its own while its client does
    /// not read. Streams get three quarters of the available memory (after
    /// any reserve) at this much each: 10,347 per GiB.
    pub const MEMORY_PER_STREAM: u64 = STREAM_IDLE_COST + STREAM_IN_FLIGHT;

    /// Reads the machine's limits and derives the cap, keeping
    /// `pending_reserve` descriptors for connections still sending their head.
    ///
    /// The same as [`detect_with`](Capacity::detect_with) with no memory
    /// reserved.
    pub fn detect(pending_reserve: usize) -> Capacity {
        Capacity::detect_with(pending_reserve, 0)
    }

    /// Reads the machine's limits and derives the cap, keeping
    /// `pending_reserve` descriptors for connections still sending their
    /// head and `reserved_bytes` of memory out of the streams' share.
    ///
    /// The memory term is three quarters of the available memory less the
    /// reserve, at [`MEMORY_PER_STREAM`](Capacity::MEMORY_PER_STREAM) per
    /// stream; available memory is the smaller of the machine's
    /// `MemAvailable` and what the memory cgroup's limit leaves (see
    /// [`memory_info`]). The thread term also obeys the pids cgroup's
    /// `pids.max`.
    pub fn detect_with(pending_reserve: usize, reserved_bytes: u64) -> Capacity {
        let cgroup_memory = cgroup::locate_self("memory").and_then(|h| cgroup::memory(&h));
        let memory = combine(machine_memory(), cgroup_memory.as_ref());
        let pids = cgroup::locate_self("pids").and_then(|h| cgroup::pids(&h));
        derive(Inputs {
            fd_limit: fd_limit(),
            max_map_count: read_u64("/proc/sys/vm/max_map_count"),
            memory,
            cgroup_memory,
            threads: thread_limit(pids),
            pending_reserve: pending_reserve as u64,
            reserved_bytes,
        })
    }
}

fn derive(i: Inputs) -> Capacity {
    let reserve = FDS_RESERVED + i.pending_reserve.min(i.fd_limit / 4);
    let by_fds = i.fd_limit.saturating_sub(reserve).max(1);
    let by_maps = i
        .max_map_count
        .map(|m| m.saturating_sub(MAPS_RESERVED) / MAPS_PER_THREAD);
    let by_memory = i.memory.map(|m| {
        m.available.saturating_sub(i.reserved_bytes) / 4 * 3 / Capacity::MEMORY_PER_STREAM
    });
    let memory_name = i.memory.map_or("memory", |m| m.source.as_str());
    let mut best = (by_fds, "file descriptors");
    for (limit, name) in [
        (by_maps, "memory maps"),
        (by_memory, memory_name),
        (i.threads, "threads"),
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
        fd_limit: i.fd_limit,
        by_fds,
        by_maps,
        by_memory,
        by_threads: i.threads,
        memory: i.memory,
        cgroup_memory_limit: i.cgroup_memory.as_ref().map(|c| c.limit),
        cgroup_memory_used: i.cgroup_memory.as_ref().map(|c| c.working_set),
        memory_reserved: i.reserved_bytes,
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

/// The machine's memory from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Machine {
    total: u64,
    available: u64,
}

fn machine_memory() -> Option<Machine> {
    parse_meminfo(&fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemTotal` and `MemAvailable` (kernels since 3.14), in bytes.
fn parse_meminfo(text: &str) -> Option<Machine> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let kb = l.strip_prefix(name)?.strip_prefix(':')?;
            kb.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some(Machine {
        total: field("MemTotal")? * 1024,
        available: field("MemAvailable")? * 1024,
    })
}

/// The smaller of what the machine and the cgroup leave, and which it is.
fn combine(machine: Option<Machine>, cgroup: Option<&cgroup::Memory>) -> Option<MemoryInfo> {
    let from_cgroup = cgroup.map(|c| MemoryInfo {
        available: c.headroom(),
        limit: c.limit,
        source: MemorySource::Cgroup,
    });
    let from_machine = machine.map(|m| MemoryInfo {
        available: m.available,
        limit: m.total,
        source: MemorySource::Machine,
    });
    match (from_machine, from_cgroup) {
        // A cgroup limit above what the machine has free does not bind.
        (Some(m), Some(c)) => Some(if c.available < m.available { c } else { m }),
        (m, c) => m.or(c),
    }
}

fn thread_limit(pids: Option<cgroup::Pids>) -> Option<u64> {
    [
        read_u64("/proc/sys/kernel/threads-max").map(|t| t.saturating_sub(THREADS_RESERVED)),
        read_u64("/proc/sys/kernel/pid_max").map(|t| t.saturating_sub(THREADS_RESERVED)),
        pids.map(|p| {
            p.max
                .saturating_sub(p.current)
                .saturating_sub(CGROUP_TASKS_RESERVED)
        }),
    ]
    .into_iter()
    .flatten()
    .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_threads() {
        let status = "Name:\tssed\nVmHWM:\t  9000 kB\nVmRSS:\t    8192 kB\nThreads:\t7\n";
        assert_eq!(
            parse_status(status),
            Some(ProcessUsage {
                rss_bytes: 8192 * 1024,
                threads: 7
            })
        );
        assert_eq!(parse_status("VmRSS:\t1 kB\n"), None, "no Threads line");
        let own = process_usage().expect("Linux /proc");
        assert!(own.rss_bytes > 0 && own.threads >= 1, "{own:?}");
    }

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
        let with_reserve = Capacity::detect_with(4096, 1 << 40);
        assert_eq!(with_reserve.memory_reserved, 1 << 40);
        if with_reserve.memory.is_some() {
            assert_eq!(
                with_reserve.by_memory,
                Some(0),
                "a reserve beyond memory leaves none"
            );
        }
    }

    const MIB: u64 = 1 << 20;

    fn inputs(memory: Option<MemoryInfo>, cgroup_memory: Option<cgroup::Memory>) -> Inputs {
        Inputs {
            fd_limit: 20_000,
            max_map_count: Some(65_530),
            memory,
            cgroup_memory,
            threads: Some(190_000),
            pending_reserve: 4096,
            reserved_bytes: 0,
        }
    }

    #[test]
    fn a_cgroup_limit_below_free_memory_sets_the_cap() {
        // The finding: a 256 MiB container on a machine with 22 GiB free.
        let machine = Machine {
            total: 24 << 30,
            available: 22 << 30,
        };
        let cg = cgroup::Memory {
            limit: 256 * MIB,
            working_set: 2 * MIB,
            dir: "/sys/fs/cgroup/memory/docker/abc".into(),
        };
        let memory = combine(Some(machine), Some(&cg));
        assert_eq!(
            memory,
            Some(MemoryInfo {
                available: 254 * MIB,
                limit: 256 * MIB,
                source: MemorySource::Cgroup
            })
        );
        let c = derive(inputs(memory, Some(cg.clone())));
        assert_eq!(c.limited_by, "cgroup memory");
        // 254 MiB * 3/4 / 76 KiB.
        assert_eq!(c.max_streams, 2566);
        assert_eq!(c.by_memory, Some(2566));
        assert_eq!(c.by_fds, 15_840);
        assert_eq!(
            (c.cgroup_memory_limit, c.cgroup_memory_used),
            (Some(256 * MIB), Some(2 * MIB))
        );
        // At the cap, idle streams take 2566 * 36 KiB = 90 MiB of the 256.
        assert!(c.max_streams as u64 * STREAM_IDLE_COST < cg.limit / 2);

        // A reserve comes out before the streams' share.
        let mut i = inputs(memory, Some(cg.clone()));
        i.reserved_bytes = 54 * MIB;
        assert_eq!(derive(i).max_streams, 2021); // 200 MiB * 3/4 / 76 KiB

        // A machine with less free than the cgroup allows: the machine's
        // memory sets it, and the cgroup's limit is still shown.
        let tight = Machine {
            total: 512 * MIB,
            available: 100 * MIB,
        };
        let memory = combine(Some(tight), Some(&cg));
        assert_eq!(memory.map(|m| m.source), Some(MemorySource::Machine));
        let c = derive(inputs(memory, Some(cg)));
        assert_eq!((c.limited_by, c.max_streams), ("memory", 1010)); // 100 MiB * 3/4 / 76 KiB
        assert_eq!(c.cgroup_memory_limit, Some(256 * MIB));
    }

    #[test]
    fn without_a_cgroup_the_machine_sets_the_memory_term() {
        let machine = Machine {
            total: 24 << 30,
            available: 22 << 30,
        };
        let memory = combine(Some(machine), None);
        let c = derive(inputs(memory, None));
        assert_eq!(
            c.by_memory,
            Some((22u64 << 30) / 4 * 3 / Capacity::MEMORY_PER_STREAM)
        );
        assert_eq!((c.limited_by, c.max_streams), ("file descriptors", 15_840));
        assert_eq!(c.cgroup_memory_limit, None);
        let c = derive(inputs(None, None));
        assert_eq!((c.by_memory, c.memory), (None, None));
        // A cgroup alone (no /proc/meminfo): its figure.
        let cg = cgroup::Memory {
            limit: 64 * MIB,
            working_set: 80 * MIB,
            dir: "/".into(),
        };
        let memory = combine(None, Some(&cg));
        assert_eq!(memory.map(|m| m.available), Some(0), "over its limit");
        let c = derive(inputs(memory, Some(cg)));
        assert_eq!((c.limited_by, c.max_streams), ("cgroup memory", 1));
    }

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       24579124 kB\nMemFree:        23000000 kB\n\
                    MemAvailable:   22987532 kB\nBuffers:            1234 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some(Machine {
                total: 24_579_124 * 1024,
                available: 22_987_532 * 1024
            })
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\nMemFree: 1 kB\n"), None);
        assert_eq!(MemorySource::Cgroup.as_str(), "cgroup memory");
    }
}
