//! This process's cgroups: where their files are, and what the memory and
//! pids controllers allow.
//!
//! A container or a systemd unit limits memory through a cgroup, and the
//! kernel's OOM killer acts at that limit, whatever the machine has free.
//! The limit may be set on the process's own cgroup or on any ancestor (a
//! slice), so every level from the process's cgroup up to the root of the
//! mount is read, and the one with the least headroom counts.
//!
//! Both versions are handled: v1, where each controller has a hierarchy of
//! its own (`4:memory:/path` in `/proc/self/cgroup`, a mount of type
//! `cgroup` with `memory` in its options), and v2, one hierarchy for all
//! (`0::/path`, a mount of type `cgroup2`). Within a cgroup namespace the
//! process sees its own cgroup as `/`; in a container without one, the
//! mount's root is the container's cgroup, so paths are taken relative to
//! the mount's root (the fourth field of `/proc/self/mountinfo`).
//!
//! Everything here takes file texts or directories, so the tests run on
//! directory trees that mimic each layout, without a real cgroup.

use std::fs;
use std::path::{Component, Path, PathBuf};

/// A v1 limit at or above this means "no limit": the kernel shows an
/// unlimited counter as its largest page count in bytes
/// (9223372036854771712 on x86-64).
const V1_UNLIMITED: u64 = 1 << 62;

/// Which cgroup interface a controller is mounted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// One hierarchy per controller: `memory.limit_in_bytes`, `pids.max`.
    V1,
    /// The unified hierarchy: `memory.max`, `pids.max`.
    V2,
}

/// One controller's hierarchy as this process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hierarchy {
    /// The interface its files follow.
    pub version: Version,
    /// This process's cgroup directory first, then each parent up to the
    /// root of the mount (ancestors above it are not visible).
    pub dirs: Vec<PathBuf>,
}

/// A memory limit and what its cgroup uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Memory {
    /// The limit in bytes.
    pub limit: u64,
    /// Usage less the inactive file pages (page cache the kernel drops
    /// before it ever kills), in bytes.
    pub working_set: u64,
    /// The cgroup that holds the limit.
    pub dir: PathBuf,
}

impl Memory {
    /// What the cgroup can still take before its limit.
    pub(crate) fn headroom(&self) -> u64 {
        self.limit.saturating_sub(self.working_set)
    }
}

/// A task limit (`pids.max`, systemd's `TasksMax`) and its cgroup's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pids {
    /// Most tasks (threads included) the cgroup may hold.
    pub max: u64,
    /// Tasks in it now.
    pub current: u64,
}

/// This process's hierarchy for `controller` (`"memory"`, `"pids"`), from
/// the live `/proc/self` files.
pub(crate) fn locate_self(controller: &str) -> Option<Hierarchy> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    locate(controller, &cgroups, &mounts)
}

/// Finds the directories of `controller`'s cgroup for a process whose
/// `/proc/PID/cgroup` is `proc_cgroup`, given `/proc/PID/mountinfo`.
///
/// A controller bound to a v1 hierarchy is looked up there; otherwise in
/// the v2 hierarchy (whose files tell whether the controller is enabled:
/// a level without them is skipped when reading). `None` when no mount
/// of the hierarchy holds the process's cgroup.
pub(crate) fn locate(controller: &str, proc_cgroup: &str, mountinfo: &str) -> Option<Hierarchy> {
    let mut v2_path = None;
    let mut v1_path = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2_path = Some(path);
        } else if controllers.split(',').any(|c| c == controller) {
            v1_path = Some(path);
        }
    }
    // A controller lives in one hierarchy only: a v1 line naming it means
    // the unified one (if mounted at all) does not have it.
    let (version, path) = match (v1_path, v2_path) {
        (Some(p), _) => (Version::V1, p),
        (None, Some(p)) => (Version::V2, p),
        (None, None) => return None,
    };
    for mount in mountinfo.lines().filter_map(Mount::parse) {
        let fits = match version {
            Version::V1 => {
                mount.fstype == "cgroup" && mount.options.split(',').any(|o| o == controller)
            }
            Version::V2 => mount.fstype == "cgroup2",
        };
        if !fits {
            continue;
        }
        let Some(relative) = relative_to(path, &mount.root) else {
            continue; // another mount of the hierarchy, rooted elsewhere
        };
        let top = PathBuf::from(mount.point);
        let mut dir = if relative.as_os_str().is_empty() {
            top.clone() // join would add a trailing slash
        } else {
            top.join(relative)
        };
        let mut dirs = vec![dir.clone()];
        while dir != top {
            if !dir.pop() {
                break;
            }
            dirs.push(dir.clone());
        }
        return Some(Hierarchy { version, dirs });
    }
    None
}

/// The limited level of `h` with the least headroom: the limit the kernel
/// will enforce first. `None` when no visible level has a memory limit.
pub(crate) fn memory(h: &Hierarchy) -> Option<Memory> {
    h.dirs
        .iter()
        .filter_map(|dir| memory_at(h.version, dir))
        // The first (nearest) of equals wins: it is the one to name.
        .reduce(|best, m| {
            if m.headroom() < best.headroom() {
                m
            } else {
                best
            }
        })
}

/// The pids limit of `h` with the fewest tasks left, if any level has one.
pub(crate) fn pids(h: &Hierarchy) -> Option<Pids> {
    h.dirs
        .iter()
        .filter_map(|dir| {
            let max = parse_max(&read(dir, "pids.max")?)?;
            let current = read(dir, "pids.current")
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            Some(Pids { max, current })
        })
        .min_by_key(|p| p.max.saturating_sub(p.current))
}

fn memory_at(version: Version, dir: &Path) -> Option<Memory> {
    let (limit_file, usage_file, inactive_key) = match version {
        Version::V1 => (
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            // Of the whole subtree: the usage file counts it too.
            "total_inactive_file",
        ),
        Version::V2 => ("memory.max", "memory.current", "inactive_file"),
    };
    let limit = parse_max(&read(dir, limit_file)?)?;
    if limit >= V1_UNLIMITED {
        return None;
    }
    let usage: u64 = read(dir, usage_file)?.trim().parse().ok()?;
    let inactive = read(dir, "memory.stat")
        .and_then(|stat| stat_value(&stat, inactive_key))
        .unwrap_or(0);
    Some(Memory {
        limit,
        working_set: usage.saturating_sub(inactive),
        dir: dir.to_path_buf(),
    })
}

/// A limit file's value: a number of bytes (or tasks), or `max` for none.
fn parse_max(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        n => n.parse().ok(),
    }
}

/// The value of `key` in a `memory.stat` text (`key value` lines).
pub(crate) fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn read(dir: &Path, file: &str) -> Option<String> {
    fs::read_to_string(dir.join(file)).ok()
}

/// `path` relative to `root`, component by component (`/a` holds `/a/b`,
/// not `/ab`); `None` if it lies outside, or climbs out with `..` (a
/// process moved out of its cgroup namespace shows such paths).
fn relative_to<'a>(path: &'a str, root: &str) -> Option<&'a Path> {
    let relative = Path::new(path).strip_prefix(root).ok()?;
    relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then_some(relative)
}

/// The fields of a `/proc/PID/mountinfo` line that matter here.
struct Mount {
    root: String,
    point: String,
    fstype: String,
    options: String,
}

impl Mount {
    /// `36 25 0:32 /root /mount/point rw,nosuid shared:1 - cgroup cgroup rw,memory`:
    /// optional fields end at `-`, then the type, the source and the
    /// super-block options.
    fn parse(line: &str) -> Option<Mount> {
        let (left, right) = line.split_once(" - ")?;
        let mut left = left.split(' ');
        let root = unescape(left.nth(3)?);
        let point = unescape(left.next()?);
        let mut right = right.split(' ');
        let fstype = right.next()?.to_owned();
        let options = right.nth(1).unwrap_or_default().to_owned();
        Some(Mount {
            root,
            point,
            fstype,
            options,
        })
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`,
/// `\134` for a backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], code) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A directory tree under the system's temporary directory, removed
    /// when dropped.
    pub(crate) struct Tree(pub PathBuf);

    impl Tree {
        pub(crate) fn new(name: &str) -> Tree {
            let dir = std::env::temp_dir().join(format!(
                "ssed-cgroup-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&dir); // a previous run's leftovers
            fs::create_dir_all(&dir).expect("temp dir");
            Tree(dir)
        }

        /// Writes `files` (name, contents) into `dir` under the tree.
        pub(crate) fn set(&self, dir: &str, files: &[(&str, &str)]) {
            let dir = self.0.join(dir.trim_start_matches('/'));
            fs::create_dir_all(&dir).expect("dir");
            for (name, text) in files {
                fs::write(dir.join(name), text).expect("write");
            }
        }

        pub(crate) fn path(&self, dir: &str) -> PathBuf {
            self.0.join(dir.trim_start_matches('/'))
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0); // best effort
        }
    }

    const V1_MAX: &str = "9223372036854771712\n";

    /// A hybrid machine like this project's: v1 controllers, an empty
    /// unified mount.
    fn v1_mountinfo(base: &Path, memory_root: &str) -> String {
        let b = base.display();
        format!(
            "31 23 0:28 / {b} rw,relatime - tmpfs tmpfs rw,mode=755\n\
             32 31 0:29 / {b}/cpu rw,relatime - cgroup cgroup rw,cpu\n\
             35 31 0:32 {memory_root} {b}/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n\
             39 31 0:36 / {b}/pids rw,relatime - cgroup cgroup rw,pids\n\
             41 31 0:38 / {b}/unified rw,relatime - cgroup2 cgroup2 rw\n"
        )
    }

    const V1_CGROUP: &str = "9:name=systemd:/\n8:pids:/app/one\n4:memory:/app/one\n\
                             1:cpu,cpuacct:/\n0::/\n";

    #[test]
    fn locates_v1_and_v2_cgroups() {
        let base = Path::new("/sys/fs/cgroup");
        let h = locate("memory", V1_CGROUP, &v1_mountinfo(base, "/")).expect("v1 memory");
        assert_eq!(h.version, Version::V1);
        let dirs: Vec<_> = h.dirs.iter().map(|d| d.display().to_string()).collect();
        assert_eq!(
            dirs,
            [
                "/sys/fs/cgroup/memory/app/one",
                "/sys/fs/cgroup/memory/app",
                "/sys/fs/cgroup/memory"
            ]
        );
        let h = locate("pids", V1_CGROUP, &v1_mountinfo(base, "/")).expect("v1 pids");
        assert_eq!(h.dirs[0], Path::new("/sys/fs/cgroup/pids/app/one"));

        // A container without a cgroup namespace: the mount's root is its
        // own cgroup, so that is the mount point itself.
        let h = locate("memory", V1_CGROUP, &v1_mountinfo(base, "/app/one")).expect("bind");
        assert_eq!(h.dirs, [PathBuf::from("/sys/fs/cgroup/memory")]);
        // A mount rooted elsewhere does not hold the process's cgroup.
        assert_eq!(
            locate("memory", V1_CGROUP, &v1_mountinfo(base, "/ap")),
            None
        );

        // Pure v2, with an escaped space in the mount point.
        let v2 = "0::/system.slice/ssed.service\n";
        let mounts =
            "30 1 0:26 / /sys/fs/my\\040cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        let h = locate("memory", v2, mounts).expect("v2");
        assert_eq!(h.version, Version::V2);
        let dirs: Vec<_> = h.dirs.iter().map(|d| d.display().to_string()).collect();
        assert_eq!(
            dirs,
            [
                "/sys/fs/my cgroup/system.slice/ssed.service",
                "/sys/fs/my cgroup/system.slice",
                "/sys/fs/my cgroup"
            ]
        );
        // A cgroup namespace: the process sees its cgroup as the root.
        let h = locate("memory", "0::/\n", mounts).expect("namespace root");
        assert_eq!(h.dirs, [PathBuf::from("/sys/fs/my cgroup")]);
        // Outside the namespace's root: nothing to read.
        assert_eq!(locate("memory", "0::/../other\n", mounts), None);
        // No mount of the hierarchy, or no line for it.
        assert_eq!(locate("memory", v2, ""), None);
        assert_eq!(locate("memory", "", mounts), None);
    }

    #[test]
    fn reads_a_v1_memory_limit_and_working_set() {
        let t = Tree::new("v1");
        t.set(
            "memory",
            &[
                ("memory.limit_in_bytes", V1_MAX),
                ("memory.usage_in_bytes", "999999999\n"),
            ],
        );
        t.set(
            "memory/app",
            &[
                ("memory.limit_in_bytes", V1_MAX),
                ("memory.usage_in_bytes", "5000\n"),
            ],
        );
        t.set(
            "memory/app/one",
            &[
                ("memory.limit_in_bytes", "268435456\n"),
                ("memory.usage_in_bytes", "10485760\n"),
                (
                    "memory.stat",
                    "cache 4194304\ninactive_file 1\ntotal_inactive_file 2097152\ntotal_rss 1\n",
                ),
            ],
        );
        let h = locate("memory", V1_CGROUP, &v1_mountinfo(&t.0, "/")).expect("located");
        let m = memory(&h).expect("limited");
        assert_eq!(m.limit, 256 << 20);
        assert_eq!(m.working_set, 8 << 20, "usage less total_inactive_file");
        assert_eq!(m.dir, t.path("memory/app/one"));
        assert_eq!(m.headroom(), 248 << 20);
    }

    #[test]
    fn reads_a_v2_limit_at_the_namespace_root() {
        let t = Tree::new("v2ns");
        t.set(
            "",
            &[
                ("memory.max", "134217728\n"),
                ("memory.current", "4194304\n"),
                (
                    "memory.stat",
                    "anon 1\nfile 3\ninactive_file 1048576\nactive_file 5\n",
                ),
            ],
        );
        let mounts = format!("30 1 0:26 / {} rw - cgroup2 cgroup2 rw\n", t.0.display());
        let h = locate("memory", "0::/\n", &mounts).expect("located");
        let m = memory(&h).expect("limited");
        assert_eq!((m.limit, m.working_set), (128 << 20, 3 << 20));
    }

    #[test]
    fn the_limit_with_the_least_headroom_wins() {
        let t = Tree::new("nested");
        let mounts = format!("30 1 0:26 / {} rw - cgroup2 cgroup2 rw\n", t.0.display());
        let cg = "0::/slice/unit/leaf\n";
        // The root of a v2 hierarchy has no memory.max; the leaf has none
        // enabled; the unit is limited; the slice above it more tightly.
        t.set("", &[("memory.current", "1\n")]);
        t.set(
            "slice",
            &[
                ("memory.max", "104857600\n"),
                ("memory.current", "52428800\n"),
            ],
        );
        t.set(
            "slice/unit",
            &[
                ("memory.max", "209715200\n"),
                ("memory.current", "10485760\n"),
            ],
        );
        t.set("slice/unit/leaf", &[("cgroup.procs", "1\n")]);
        let h = locate("memory", cg, &mounts).expect("located");
        assert_eq!(h.dirs.len(), 4);
        let m = memory(&h).expect("limited");
        assert_eq!(
            m.dir,
            t.path("slice"),
            "50 MiB left there, 190 MiB in the unit"
        );
        assert_eq!(m.headroom(), 50 << 20);

        // Once the slice is unlimited, the unit's limit is the one.
        t.set("slice", &[("memory.max", "max\n")]);
        let m = memory(&h).expect("limited");
        assert_eq!((m.dir, m.limit), (t.path("slice/unit"), 200 << 20));

        // Equal headroom: the nearest is named.
        t.set(
            "slice/unit/leaf",
            &[("memory.max", "1000\n"), ("memory.current", "0\n")],
        );
        t.set(
            "slice/unit",
            &[("memory.max", "2000\n"), ("memory.current", "1000\n")],
        );
        assert_eq!(memory(&h).expect("limited").dir, t.path("slice/unit/leaf"));
    }

    #[test]
    fn unlimited_everywhere_is_no_limit() {
        let t = Tree::new("unlimited");
        t.set(
            "memory/app/one",
            &[
                ("memory.limit_in_bytes", V1_MAX),
                ("memory.usage_in_bytes", "1\n"),
            ],
        );
        t.set(
            "memory/app",
            // A limit set far above any machine's memory is still "none".
            &[
                ("memory.limit_in_bytes", "9223372036854775807\n"),
                ("memory.usage_in_bytes", "1\n"),
            ],
        );
        t.set(
            "pids/app/one",
            &[("pids.max", "max\n"), ("pids.current", "3\n")],
        );
        let mounts = v1_mountinfo(&t.0, "/");
        let h = locate("memory", V1_CGROUP, &mounts).expect("located");
        assert_eq!(memory(&h), None);
        let h = locate("pids", V1_CGROUP, &mounts).expect("located");
        assert_eq!(pids(&h), None);
        // Missing files (a controller not enabled there) count as no limit.
        let missing = Hierarchy {
            version: Version::V2,
            dirs: vec![t.path("nowhere")],
        };
        assert_eq!((memory(&missing), pids(&missing)), (None, None));
    }

    #[test]
    fn reads_pids_limits() {
        let t = Tree::new("pids");
        t.set(
            "pids/app/one",
            &[("pids.max", "max\n"), ("pids.current", "30\n")],
        );
        t.set(
            "pids/app",
            &[("pids.max", "4915\n"), ("pids.current", "4000\n")],
        );
        t.set("pids", &[("pids.current", "9999\n")]);
        let h = locate("pids", V1_CGROUP, &v1_mountinfo(&t.0, "/")).expect("located");
        assert_eq!(
            pids(&h),
            Some(Pids {
                max: 4915,
                current: 4000
            })
        );
    }

    #[test]
    fn parses_values() {
        assert_eq!(parse_max("max\n"), None);
        assert_eq!(parse_max("1048576\n"), Some(1 << 20));
        assert_eq!(parse_max("junk"), None);
        let stat = "inactive_anon 7\ninactive_file 42\ntotal_inactive_file 9\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(42));
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(9));
        assert_eq!(stat_value(stat, "active_file"), None);
        assert_eq!(unescape("a\\040b\\134c\\"), "a b\\c\\");
    }
}
