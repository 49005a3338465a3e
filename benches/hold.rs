//! What an idle stream costs: threads, memory and memory mappings per open
//! stream, measured from outside the server.
//!
//! ```text
//! cargo bench --bench hold -- [--streams N] [--stack BYTES] [--json]
//!                             [--batch N] [--settle SECS] [--time-limit SECS]
//!                             [--arena-max N] [--max-connections N] [--detail]
//!                             [--follow]
//! ```
//!
//! The benchmark starts itself a second time as the server (the environment
//! variable `SSED_HOLD_SERVER=1` selects that role), so what `/proc/PID`
//! says about the server process is the server's alone. The server has one
//! stream route, `/hold`, whose handler opens the stream and sleeps (no
//! execution-time budget, no heartbeat), and an ordinary `/stats` route.
//! With `--follow` the handler follows a hub subscription instead, as the
//! daemon's subscribers do: its head goes out from a waker thread, and the
//! stream's own thread never writes.
//!
//! The client (this process) reads the server's `VmRSS`, `Threads` and
//! mapping count and the machine's `/proc/meminfo`, opens N streams from one
//! thread, in batches so the accept backlog is never overrun, waits for the
//! server to settle, reads the same figures again and reports the
//! difference per held stream. `--json` prints one JSON object instead of
//! the table; `--detail` adds a breakdown of the server's mappings (thread
//! stacks, signal stacks, malloc arenas) read from `/proc/PID/smaps`;
//! `--arena-max N` runs the server with `MALLOC_ARENA_MAX=N` (glibc).
//!
//! Run by `cargo test --benches` (no `--bench` flag) it holds 100 streams,
//! as a quick check that it works. Linux only (it reads `/proc`); loopback
//! only. Every connect and read has a timeout, the run stops itself after
//! `--time-limit` (default 120 s), and the server is killed on the way out;
//! it also exits by itself once this process's end closes its stdin.

use std::collections::BTreeMap;
use std::error::Error;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Selects the server role of this executable.
const SERVER_ENV: &str = "SSED_HOLD_SERVER";
/// The stream request, as an `EventSource` would send it.
const REQUEST: &[u8] = b"GET /hold HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one response head to arrive.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the server to start and print its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest response head read.
const MAX_HEAD: usize = 16 * 1024;
/// Time kept after the ramp for settling and measuring.
const MEASURE_RESERVE: Duration = Duration::from_secs(15);
/// Size of a glibc malloc arena's reservation on 64-bit (`HEAP_MAX_SIZE`).
const ARENA_SIZE: u64 = 64 * 1024 * 1024;
/// The issue's target for server RSS per idle stream.
const RSS_TARGET_KIB: f64 = 10.0;

struct Options {
    streams: usize,
    stack: usize,
    json: bool,
    batch: usize,
    settle: Duration,
    time_limit: Duration,
    arena_max: Option<usize>,
    max_connections: Option<usize>,
    detail: bool,
    follow: bool,
}

const USAGE: &str = "\
usage: cargo bench --bench hold -- [options]

  --streams N         streams to open (default 5000; 100 without --bench)
  --stack BYTES       server thread stack size (default 65536)
  --batch N           connections opened before their heads are read (default 256)
  --settle SECS       wait after the ramp before measuring (default 10; MemAvailable lags)
  --time-limit SECS   stop opening streams after this long (default 120)
  --arena-max N       run the server with MALLOC_ARENA_MAX=N (glibc)
  --max-connections N the server's stream cap (default: what this machine allows)
  --detail            break the server's mappings down (thread stacks, arenas, ...)
  --follow            the handler follows a hub subscription (as the daemon's do)
  --json              print one JSON object instead of the table
";

fn parse_options(args: &[String]) -> Result<Options, String> {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // then a short run is enough to show the benchmark works.
    let bench = args.iter().any(|a| a == "--bench");
    let mut o = Options {
        streams: if bench { 5000 } else { 100 },
        stack: 64 * 1024,
        json: false,
        batch: 256,
        // MemAvailable takes seconds to show what the streams took: with 2
        // s a glibc run read 54 KiB per stream where 10 s read 68.
        settle: Duration::from_secs(if bench { 10 } else { 1 }),
        time_limit: Duration::from_secs(120),
        arena_max: None,
        max_connections: None,
        detail: false,
        follow: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs {what}"))
        };
        let number = |s: String| -> Result<u64, String> {
            s.replace('_', "")
                .parse()
                .map_err(|_| format!("{name}: not a number: {s}"))
        };
        match name {
            "--bench" => {}
            "--json" => o.json = true,
            "--detail" => o.detail = true,
            "--follow" => o.follow = true,
            "--streams" => o.streams = number(value("a count")?)? as usize,
            "--stack" => o.stack = number(value("a size in bytes")?)? as usize,
            "--batch" => o.batch = (number(value("a count")?)? as usize).max(1),
            "--settle" => o.settle = Duration::from_secs(number(value("seconds")?)?),
            "--time-limit" => o.time_limit = Duration::from_secs(number(value("seconds")?)?.max(1)),
            "--arena-max" => o.arena_max = Some(number(value("a count")?)? as usize),
            "--max-connections" => o.max_connections = Some(number(value("a count")?)? as usize),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var_os(SERVER_ENV).is_some() {
        return match serve(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hold server: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match parse_options(&args) {
        Ok(o) => o,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("hold: {msg}");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hold: {e}");
            ExitCode::FAILURE
        }
    }
}

// ----- the server process ---------------------------------------------------

/// The server role: holds every `/hold` stream until its stdin closes (the
/// client process ended) or its own time limit passes.
fn serve(args: &[String]) -> Result<(), Box<dyn Error>> {
    let mut stack = 64 * 1024;
    let mut lifetime = Duration::from_secs(300);
    let mut cap = None;
    let mut follow = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = it.next().ok_or("missing value")?;
        match arg.as_str() {
            "--stack" => stack = value.parse()?,
            "--lifetime" => lifetime = Duration::from_secs(value.parse()?),
            "--max-connections" => cap = Some(value.parse()?),
            "--mode" => follow = value == "follow",
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let stats = ssed::Stats::new();
    let route_stats = stats.clone();
    let mut builder = ssed::Server::builder()
        .listen("127.0.0.1:0")
        .max_execution_time(Duration::ZERO)
        .stack_size(stack)
        .stats(stats);
    if let Some(n) = cap {
        builder = builder.max_connections(n);
    }
    // Two handlers, not one with a branch: a stream thread keeps every
    // stack page it touches, and a closure's frame is sized for its
    // deepest branch (here sleeping's channel wait).
    builder = if follow {
        let hub = ssed::Hub::new(0);
        builder.route("/hold", move |_req, stream| {
            let sub = hub
                .subscribe(&["hold"], None)
                .map_err(ssed::StreamError::other)?;
            stream.follow(sub)
        })
    } else {
        builder.route("/hold", |_req, stream| {
            stream.open()?;
            loop {
                stream.sleep(Duration::from_secs(3600))?;
            }
        })
    };
    let server = builder
        .get("/stats", move |_req| {
            let s = route_stats.snapshot();
            ssed::Response::json(
                200,
                &json!({
                    "streams_open": s.streams_open,
                    "streams_max": s.streams_max,
                    "streams_total": s.streams_total,
                    "rejected_total": s.rejected_total,
                    "pending": s.pending,
                    "accept_errors": s.accept_errors,
                    "handler_panics": s.handler_panics,
                }),
            )
        })
        .build()?;
    let capacity = server.capacity().clone();
    let running = server.spawn()?;
    println!(
        "addr={} cap={} limited_by={}",
        running.local_addr(),
        capacity.max_streams,
        capacity.limited_by.replace(' ', "_")
    );
    io::stdout().flush()?;

    let (eof_tx, eof_rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("hold-stdin".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut sink = [0u8; 64];
            while matches!(io::stdin().read(&mut sink), Ok(n) if n > 0) {}
            let _ = eof_tx.send(()); // the receiver may have timed out already
        })?;
    let _ = eof_rx.recv_timeout(lifetime); // EOF, or our own time is up
    // Exit without draining thousands of streams: the client is gone.
    std::process::exit(0);
}

/// The server child; killed (by PID) and reaped when dropped.
struct ServerProcess {
    child: Child,
    /// Held only to be closed: the server exits when its stdin does.
    _stdin: ChildStdin,
    pid: u32,
    addr: SocketAddr,
    cap: u64,
    limited_by: String,
}

impl ServerProcess {
    fn start(o: &Options) -> Result<ServerProcess, Box<dyn Error>> {
        let lifetime = o.time_limit + Duration::from_secs(120);
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.env(SERVER_ENV, "1")
            .args(["--stack", &o.stack.to_string()])
            .args(["--lifetime", &lifetime.as_secs().to_string()])
            .args(["--mode", if o.follow { "follow" } else { "sleep" }])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(n) = o.arena_max {
            cmd.env("MALLOC_ARENA_MAX", n.to_string());
        }
        if let Some(n) = o.max_connections {
            cmd.args(["--max-connections", &n.to_string()]);
        }
        let mut child = cmd.spawn()?;
        let pid = child.id();
        let (stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), Some(o)) => (i, o),
            _ => {
                let _ = child.kill(); // failing anyway
                let _ = child.wait();
                return Err("server child has no stdio pipes".into());
            }
        };
        // Build the guard first, so every early return below kills the child.
        let mut server = ServerProcess {
            child,
            _stdin: stdin,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            cap: 0,
            limited_by: String::new(),
        };
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = line_tx.send(line); // the receiver may have given up
        });
        let line = line_rx
            .recv_timeout(STARTUP_TIMEOUT)
            .map_err(|_| "server did not print its address in time")?;
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
        };
        server.addr = field("addr")
            .ok_or_else(|| format!("server exited or printed no address: {line:?}"))?
            .parse()?;
        server.cap = field("cap").and_then(|c| c.parse().ok()).unwrap_or(0);
        server.limited_by = field("limited_by").unwrap_or_default().replace('_', " ");
        Ok(server)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill(); // it may have exited already
        let _ = self.child.wait();
    }
}

// ----- reading /proc -----------------------------------------------------------

/// `Name: value [kB]` lines as numbers (kB values stay in KiB).
fn proc_fields(path: &str) -> io::Result<BTreeMap<String, u64>> {
    let text = fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let n = v.split_whitespace().next()?.parse().ok()?;
            Some((k.trim().to_owned(), n))
        })
        .collect())
}

/// What one reading of the server process and the machine says.
struct Reading {
    /// `/proc/PID/status`: `VmRSS`, `Threads`, ...
    status: BTreeMap<String, u64>,
    /// `/proc/PID/smaps_rollup` (empty if the kernel has none).
    rollup: BTreeMap<String, u64>,
    /// `/proc/meminfo`.
    meminfo: BTreeMap<String, u64>,
    /// Lines of `/proc/PID/maps`.
    maps: u64,
    /// This (client) process's `VmRSS`.
    client_rss: u64,
}

impl Reading {
    fn take(pid: u32) -> io::Result<Reading> {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?
            .lines()
            .count() as u64;
        Ok(Reading {
            status: proc_fields(&format!("/proc/{pid}/status"))?,
            rollup: proc_fields(&format!("/proc/{pid}/smaps_rollup")).unwrap_or_default(),
            meminfo: proc_fields("/proc/meminfo")?,
            maps,
            client_rss: proc_fields("/proc/self/status")?
                .get("VmRSS")
                .copied()
                .unwrap_or(0),
        })
    }

    fn status(&self, k: &str) -> u64 {
        self.status.get(k).copied().unwrap_or(0)
    }

    fn rollup(&self, k: &str) -> u64 {
        self.rollup.get(k).copied().unwrap_or(0)
    }

    fn mem(&self, k: &str) -> u64 {
        self.meminfo.get(k).copied().unwrap_or(0)
    }
}

// ----- opening streams -------------------------------------------------------------

/// What the ramp achieved.
struct Ramp {
    held: Vec<TcpStream>,
    refused: usize,
    failed: usize,
    errors: BTreeMap<String, usize>,
    elapsed: Duration,
    stopped: Option<&'static str>,
}

/// Connects and sends the stream request.
fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    (&s).write_all(REQUEST)?;
    Ok(s)
}

/// Reads one response head (and nothing past it that arrived with it) and
/// returns its status code and the head's bytes.
fn read_head(mut s: &TcpStream, timeout: Duration) -> io::Result<(u16, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::other("response head too large"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no response head in time",
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a head",
                ));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    let status = std::str::from_utf8(&buf[..end])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other("not an HTTP response"))?;
    Ok((status, buf))
}

fn open_streams(addr: SocketAddr, n: usize, batch: usize, deadline: Instant) -> Ramp {
    let start = Instant::now();
    let mut ramp = Ramp {
        held: Vec::with_capacity(n),
        refused: 0,
        failed: 0,
        errors: BTreeMap::new(),
        elapsed: Duration::ZERO,
        stopped: None,
    };
    let note = |errors: &mut BTreeMap<String, usize>, e: String| *errors.entry(e).or_default() += 1;
    let mut attempted = 0;
    while attempted < n {
        if Instant::now() >= deadline {
            ramp.stopped = Some("time limit");
            break;
        }
        let size = batch.min(n - attempted);
        attempted += size;
        // Connect a whole batch first: the kernel completes the handshakes
        // into the listen backlog (4096) while the acceptor catches up.
        let mut wave = Vec::with_capacity(size);
        let mut batch_failed = 0;
        for _ in 0..size {
            match connect(addr) {
                Ok(s) => wave.push(s),
                Err(e) => {
                    batch_failed += 1;
                    note(&mut ramp.errors, format!("connect: {e}"));
                }
            }
        }
        for s in wave {
            match read_head(&s, HEAD_TIMEOUT) {
                Ok((200, _)) => ramp.held.push(s),
                Ok((503, _)) => ramp.refused += 1,
                Ok((status, _)) => {
                    batch_failed += 1;
                    note(&mut ramp.errors, format!("status {status}"));
                }
                Err(e) => {
                    batch_failed += 1;
                    note(&mut ramp.errors, format!("head: {e}"));
                }
            }
        }
        ramp.failed += batch_failed;
        if batch_failed == size {
            ramp.stopped = Some("a whole batch failed");
            break;
        }
    }
    ramp.elapsed = start.elapsed();
    ramp
}

/// The server's own counters, from its `/stats` route.
fn server_stats(addr: SocketAddr) -> Result<Value, Box<dyn Error>> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    (&s).write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let (status, mut buf) = read_head(&s, HEAD_TIMEOUT)?;
    if status != 200 {
        return Err(format!("/stats answered {status}").into());
    }
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || buf.len() > 1 << 20 {
            return Err("/stats body not received in time".into());
        }
        s.set_read_timeout(Some(left))?;
        match (&s).read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let body_at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |i| i + 4);
    Ok(serde_json::from_slice(&buf[body_at..])?)
}

// ----- mappings breakdown --------------------------------------------------------------

/// One line of `/proc/PID/smaps` and its `Rss`.
struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    path: String,
    rss: u64,
}

impl Mapping {
    fn size(&self) -> u64 {
        self.end - self.start
    }

    fn anon(&self) -> bool {
        self.path.is_empty()
    }
}

fn read_smaps(pid: u32) -> io::Result<Vec<Mapping>> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let Some(first) = parts.next() else { continue };
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            else {
                continue;
            };
            let perms = parts.next().unwrap_or_default().to_owned();
            let path = parts.nth(3).unwrap_or_default().to_owned();
            maps.push(Mapping {
                start,
                end,
                perms,
                path,
                rss: 0,
            });
        } else if first == "Rss:" {
            let kb = parts.next().and_then(|v| v.parse().ok());
            if let Some(m) = maps.last_mut() {
                m.rss = kb.unwrap_or(0);
            }
        }
    }
    maps.sort_by_key(|m| m.start);
    Ok(maps)
}

/// Groups of similar mappings: count, total size and resident KiB.
#[derive(Default)]
struct Group {
    count: u64,
    size_kib: u64,
    rss_kib: u64,
    /// Resident KiB of each mapping, for the spread.
    rss_each: Vec<u64>,
}

impl Group {
    fn add(&mut self, m: &Mapping) {
        self.count += 1;
        self.size_kib += m.size() / 1024;
        self.rss_kib += m.rss;
        self.rss_each.push(m.rss);
    }

    fn spread(&self) -> (u64, u64, u64) {
        let mut v = self.rss_each.clone();
        v.sort_unstable();
        match (v.first(), v.get(v.len() / 2), v.last()) {
            (Some(&a), Some(&b), Some(&c)) => (a, b, c),
            _ => (0, 0, 0),
        }
    }
}

/// Sorts the server's mappings into kinds: glibc malloc arenas (64 MiB
/// aligned reservations), guarded anonymous regions by size (thread stacks,
/// signal stacks: a `---p` page right below a `rw-p` region), the main heap,
/// file mappings and the rest.
fn classify(maps: &[Mapping]) -> BTreeMap<String, Group> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut skip_next_guard = false;
    for (i, m) in maps.iter().enumerate() {
        let prev = i.checked_sub(1).map(|p| &maps[p]);
        let next = maps.get(i + 1);
        let kind = if !m.anon() {
            if m.path.starts_with('[') {
                m.path.clone()
            } else {
                "file-backed".to_owned()
            }
        } else if m.start % ARENA_SIZE == 0
            && m.perms.starts_with("rw")
            && (m.size() == ARENA_SIZE
                || next.is_some_and(|n| {
                    n.anon()
                        && n.start == m.end
                        && n.perms.starts_with("---")
                        && m.size() + n.size() == ARENA_SIZE
                }))
        {
            skip_next_guard = m.size() != ARENA_SIZE;
            "malloc arena (rw part)".to_owned()
        } else if std::mem::take(&mut skip_next_guard) && m.perms.starts_with("---") {
            "malloc arena (reserved, ---p)".to_owned()
        } else if m.perms.starts_with("rw")
            && prev.is_some_and(|p| p.anon() && p.end == m.start && p.perms.starts_with("---"))
        {
            format!("guarded rw-p {} KiB (stack-like)", m.size() / 1024)
        } else if m.perms.starts_with("---") && m.size() <= 64 * 1024 {
            format!("guard ---p {} KiB", m.size() / 1024)
        } else {
            format!("other anon {}", m.perms)
        };
        groups.entry(kind).or_default().add(m);
    }
    groups
}

// ----- the run -----------------------------------------------------------------------------

fn run(o: &Options) -> Result<(), Box<dyn Error>> {
    let started = Instant::now();
    // A last resort: whatever hangs, the run ends (the server follows when
    // our end of its stdin closes).
    let hard_limit = o.time_limit + MEASURE_RESERVE + Duration::from_secs(60);
    std::thread::spawn(move || {
        std::thread::sleep(hard_limit);
        eprintln!("hold: still running after {hard_limit:?}; giving up");
        std::process::exit(3);
    });
    let fd_limit = ssed::raise_fd_limit()?;
    if (o.streams as u64) + 64 > fd_limit {
        eprintln!(
            "hold: warning: {} streams need as many descriptors here; the limit is {fd_limit}",
            o.streams
        );
    }

    let server = ServerProcess::start(o)?;
    std::thread::sleep(Duration::from_millis(200));
    let before = Reading::take(server.pid)?;

    let ramp_deadline = started
        + o.time_limit
            .saturating_sub(o.settle + MEASURE_RESERVE)
            .max(Duration::from_secs(1));
    let ramp = open_streams(server.addr, o.streams, o.batch, ramp_deadline);
    std::thread::sleep(o.settle);
    let after = Reading::take(server.pid)?;
    // After the readings: `/stats` runs on a short-lived thread of its own.
    let stats = server_stats(server.addr).unwrap_or_else(|e| json!({ "error": e.to_string() }));
    let detail = if o.detail {
        Some(read_smaps(server.pid)?)
    } else {
        None
    };

    let report = Report {
        o,
        server: &server,
        fd_limit,
        ramp: &ramp,
        before: &before,
        after: &after,
        stats,
    };
    let text = if o.json {
        let mut v = report.json();
        if let (Some(maps), Value::Object(obj)) = (&detail, &mut v) {
            obj.insert("mappings".into(), detail_json(maps));
        }
        format!("{v}\n")
    } else {
        let mut t = report.table();
        if let Some(maps) = &detail {
            t.push_str(&detail_table(maps, ramp.held.len()));
        }
        t
    };
    // A closed stdout (`| head`) is not a failure of the benchmark.
    let _ = io::stdout().lock().write_all(text.as_bytes());
    drop(ramp); // close the client sockets before the server goes
    drop(server);
    Ok(())
}

struct Report<'a> {
    o: &'a Options,
    server: &'a ServerProcess,
    fd_limit: u64,
    ramp: &'a Ramp,
    before: &'a Reading,
    after: &'a Reading,
    stats: Value,
}

impl Report<'_> {
    fn held(&self) -> u64 {
        self.ramp.held.len() as u64
    }

    /// `after - before` per held stream.
    fn per_stream(&self, before: u64, after: u64) -> f64 {
        (after as f64 - before as f64) / self.held().max(1) as f64
    }

    fn threads_added(&self) -> i64 {
        self.after.status("Threads") as i64 - self.before.status("Threads") as i64
    }

    fn rss_per_stream(&self) -> f64 {
        self.per_stream(self.before.status("VmRSS"), self.after.status("VmRSS"))
    }

    /// `MemAvailable` is the one that shrinks: before minus after.
    fn mem_available_per_stream(&self) -> f64 {
        self.per_stream(
            self.after.mem("MemAvailable"),
            self.before.mem("MemAvailable"),
        )
    }

    fn meminfo_per_stream(&self, k: &str) -> f64 {
        self.per_stream(self.before.mem(k), self.after.mem(k))
    }

    /// The issue's targets, met or not. The RSS target is judged only from
    /// 1000 streams up: below that, fixed costs (allocator arenas, the
    /// acceptor's buffers) dominate the average.
    fn verdicts(&self) -> Vec<(&'static str, bool, String)> {
        let extra = self.threads_added() - self.held() as i64;
        let mut v = vec![(
            "one thread per stream",
            (0..=4).contains(&extra),
            format!("{extra:+} threads besides one per stream"),
        )];
        if self.held() >= 1000 {
            v.push((
                "RSS per stream <= 10 KiB (RSS_TARGET_KIB)",
                self.rss_per_stream() <= RSS_TARGET_KIB,
                format!("{:.2} KiB", self.rss_per_stream()),
            ));
        }
        v.push((
            "every stream held",
            self.held() == self.o.streams as u64,
            format!("{} of {}", self.held(), self.o.streams),
        ));
        v
    }

    fn json(&self) -> Value {
        let (b, a) = (self.before, self.after);
        let pair = |x: u64, y: u64| json!({ "before": x, "after": y });
        json!({
            "streams_requested": self.o.streams,
            "handler": if self.o.follow { "follow" } else { "sleep" },
            "streams_held": self.held(),
            "refused_503": self.ramp.refused,
            "failed": self.ramp.failed,
            "errors": self.ramp.errors,
            "stopped": self.ramp.stopped,
            "ramp_secs": self.ramp.elapsed.as_secs_f64(),
            "optimized": !cfg!(debug_assertions),
            "stack_size": self.o.stack,
            "malloc_arena_max": self.o.arena_max,
            "server_cap": self.server.cap,
            "server_cap_limited_by": self.server.limited_by,
            "client_fd_limit": self.fd_limit,
            "server_stats": self.stats,
            "threads": pair(b.status("Threads"), a.status("Threads")),
            "threads_added": self.threads_added(),
            "threads_besides_one_per_stream": self.threads_added() - self.held() as i64,
            "vm_rss_kib": pair(b.status("VmRSS"), a.status("VmRSS")),
            "rss_per_stream_kib": self.rss_per_stream(),
            "anonymous_per_stream_kib": self.per_stream(b.rollup("Anonymous"), a.rollup("Anonymous")),
            "vm_size_per_stream_kib": self.per_stream(b.status("VmSize"), a.status("VmSize")),
            "maps": pair(b.maps, a.maps),
            "maps_per_stream": self.per_stream(b.maps, a.maps),
            "mem_available_kib": pair(b.mem("MemAvailable"), a.mem("MemAvailable")),
            "system_memory_per_stream_kib": self.mem_available_per_stream(),
            "kernel_stack_per_stream_kib": self.meminfo_per_stream("KernelStack"),
            "slab_per_stream_kib": self.meminfo_per_stream("Slab"),
            "page_tables_per_stream_kib": self.meminfo_per_stream("PageTables"),
            "client_rss_per_stream_kib": self.per_stream(b.client_rss, a.client_rss),
            "targets": self.verdicts().iter().map(|(name, ok, got)| {
                json!({ "target": name, "met": ok, "measured": got })
            }).collect::<Vec<_>>(),
        })
    }

    fn table(&self) -> String {
        let (b, a) = (self.before, self.after);
        let o = self.o;
        let arena = o
            .arena_max
            .map_or("glibc default".to_owned(), |n| n.to_string());
        let mut out = format!(
            "ssed hold: {} streams requested, handler {}, stack {} KiB, MALLOC_ARENA_MAX {arena}\n\
             server cap {} (set by {}); client descriptor limit {}\n\n",
            o.streams,
            if o.follow {
                "follows a hub subscription"
            } else {
                "opens and sleeps"
            },
            o.stack / 1024,
            self.server.cap,
            self.server.limited_by,
            self.fd_limit
        );
        let mut row = |name: &str, value: String| out.push_str(&format!("  {name:<34} {value}\n"));
        row("streams held", self.held().to_string());
        row("refused (503)", self.ramp.refused.to_string());
        row("failed", self.ramp.failed.to_string());
        for (e, n) in &self.ramp.errors {
            row("", format!("{n} x {e}"));
        }
        if let Some(why) = self.ramp.stopped {
            row("ramp stopped early", why.to_owned());
        }
        row(
            "ramp",
            format!(
                "{:.2} s ({:.0} streams/s)",
                self.ramp.elapsed.as_secs_f64(),
                self.held() as f64 / self.ramp.elapsed.as_secs_f64().max(1e-9)
            ),
        );
        let open = self
            .stats
            .get("streams_open")
            .map_or("?".to_owned(), Value::to_string);
        row("server streams_open (/stats)", open);
        row(
            "threads before / after",
            format!(
                "{} / {} ({:+}; {:+} besides one per stream)",
                b.status("Threads"),
                a.status("Threads"),
                self.threads_added(),
                self.threads_added() - self.held() as i64
            ),
        );
        row(
            "VmRSS before / after",
            format!("{} / {} KiB", b.status("VmRSS"), a.status("VmRSS")),
        );
        row(
            "server RSS per stream",
            format!("{:.2} KiB", self.rss_per_stream()),
        );
        if !a.rollup.is_empty() {
            row(
                "  of which anonymous",
                format!(
                    "{:.2} KiB",
                    self.per_stream(b.rollup("Anonymous"), a.rollup("Anonymous"))
                ),
            );
        }
        row(
            "server VmSize per stream",
            format!(
                "{:.2} KiB",
                self.per_stream(b.status("VmSize"), a.status("VmSize"))
            ),
        );
        row(
            "mappings before / after",
            format!("{} / {}", b.maps, a.maps),
        );
        row(
            "mappings per stream",
            format!("{:.3}", self.per_stream(b.maps, a.maps)),
        );
        row(
            "MemAvailable before / after",
            format!("{} / {} KiB", b.mem("MemAvailable"), a.mem("MemAvailable")),
        );
        row(
            "system memory per stream",
            format!(
                "{:.2} KiB (MemAvailable drop; both socket ends)",
                self.mem_available_per_stream()
            ),
        );
        row(
            "  kernel stacks per stream",
            format!("{:.2} KiB", self.meminfo_per_stream("KernelStack")),
        );
        row(
            "  slab per stream",
            format!("{:.2} KiB", self.meminfo_per_stream("Slab")),
        );
        row(
            "  page tables per stream",
            format!("{:.2} KiB", self.meminfo_per_stream("PageTables")),
        );
        row(
            "  client RSS per stream",
            format!("{:.2} KiB", self.per_stream(b.client_rss, a.client_rss)),
        );
        out.push('\n');
        if cfg!(debug_assertions) {
            out.push_str(
                "  (an unoptimized build: run `cargo bench --bench hold` for real figures)\n",
            );
        }
        for (name, ok, got) in self.verdicts() {
            out.push_str(&format!(
                "  [{}] {name}: {got}\n",
                if ok { "ok" } else { "MISSED" }
            ));
        }
        out
    }
}

fn detail_table(maps: &[Mapping], held: usize) -> String {
    let mut out = format!(
        "\nserver mappings by kind ({} in all, {held} streams held):\n  {:<38} {:>7} {:>11} {:>10}  Rss per mapping min/median/max\n",
        maps.len(),
        "kind",
        "count",
        "size KiB",
        "Rss KiB"
    );
    let groups = classify(maps);
    let mut rows: Vec<_> = groups.iter().collect();
    rows.sort_by_key(|(_, g)| std::cmp::Reverse((g.rss_kib, g.count)));
    for (kind, g) in rows {
        let (lo, mid, hi) = g.spread();
        out.push_str(&format!(
            "  {kind:<38} {:>7} {:>11} {:>10}  {lo}/{mid}/{hi}\n",
            g.count, g.size_kib, g.rss_kib
        ));
    }
    out
}

fn detail_json(maps: &[Mapping]) -> Value {
    let groups = classify(maps);
    Value::Object(
        groups
            .into_iter()
            .map(|(kind, g)| {
                let (lo, mid, hi) = g.spread();
                let v = json!({
                    "count": g.count,
                    "size_kib": g.size_kib,
                    "rss_kib": g.rss_kib,
                    "rss_min_kib": lo,
                    "rss_median_kib": mid,
                    "rss_max_kib": hi,
                });
                (kind, v)
            })
            .collect(),
    )
}
