//! Fan-out: how fast a published event reaches every subscriber of its
//! topic, and what the server spends per delivery.
//!
//! ```text
//! cargo bench --bench fanout -- [--workloads a,b,c] [--flat-events N] [--json]
//! cargo bench --bench fanout -- --workloads a,t
//! ```
//!
//! For each workload the benchmark starts the real daemon
//! (`CARGO_BIN_EXE_ssed`, built by cargo with the bench profile) on
//! `127.0.0.1:0` with a config file written to a temporary directory
//! (no heartbeat, no execution-time budget), reads the address from its log,
//! and runs `ssed loadtest ... --json` against it:
//!
//! - a: 1,000 subscribers, 50 events at 10/s: latency p50/p90/p99/max, and
//!   whether every delivery arrived;
//! - b: 100 subscribers, the publisher flat out (20,000 events): deliveries/s;
//! - c: 10,000 subscribers, 50 events at 10/s.
//! - d: as c, on the Mercure endpoint: half the subscribers name the topic
//!   (`?topic=fanout-d`), half a URI template that matches it
//!   (`?topic=fanout-{x}`): what selectors cost beside exact topics (the
//!   goal: p50/p99 and CPU per delivery within 1.5x of c's, same run).
//! - m: as a, on the Mercure endpoint (`?topic=fanout-m`);
//! - s: as m, with `[mercure] subscriptions = true`: each subscriber's
//!   arrival is published as a private subscription update (the goal:
//!   p99 and CPU per delivery within 10 % of m's, same run). Run them
//!   with `--workloads m,s`.
//! - t: as a, over HTTPS: the daemon has `[tls] cert` and `key` (a P-256
//!   certificate for `127.0.0.1` from a CA made with `openssl` in the
//!   temporary directory), and subscribers and publisher use
//!   `https://127.0.0.1:PORT/...` with `--cacert` (that CA): what TLS adds
//!   to a delivery (the waker threads seal a record per subscriber) beside
//!   a's plain text. Run them with `--workloads a,t`. A load tester
//!   that does not speak https (a build from before ACME) fails t, saying
//!   so, rather than skipping it.
//!
//! While the load test runs, a thread samples the server's CPU time
//! (utime + stime from `/proc/PID/stat`, in 1/100 s ticks) every 10 ms; the
//! CPU spent between the first publish and the last delivery, divided by
//! the deliveries, is the server's CPU per delivery. The load-test client
//! runs on the same machine and competes with the server for its cores.
//!
//! `SSED_BENCH_SERVER=PATH` runs another build as the server (the static
//! binary from `scripts/build-static.sh`, say); the load tester stays the
//! one cargo built.
//!
//! Each workload gets a fresh server, killed by PID when its guard drops.
//! Run by `cargo test --benches` (no `--bench` flag) it runs tiny versions
//! of a, b, d, s and t as a check that it works. Linux only (`/proc`);
//! loopback only; t needs the `openssl` command (3.0 or later).

use std::error::Error;
use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

mod common;
use common::{BIN, Guard, Pki, Server, TempDir, cpu_ticks, server_bin};

/// How often the server's CPU time is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// `USER_HZ`: the unit of utime and stime in `/proc/PID/stat` on Linux.
const TICKS_PER_SECOND: f64 = 100.0;
/// The server's configuration: streams live until the run ends, and only
/// published events are written.
const CONFIG: &str = "\
heartbeat = \"0\"
max_execution_time = \"0\"
history = 100
";

const USAGE: &str = "\
usage: cargo bench --bench fanout -- [options]

  --workloads LIST   which workloads to run, of a,b,c,d,m,s,t (default a,b,c,d);
                     t is a over HTTPS
  --flat-events N    events the flat-out publisher sends in b (default 20000)
  --json             print one JSON object instead of the table
";

/// One workload: a load-test command line and the issue's targets.
#[derive(Debug, Clone)]
struct Workload {
    key: &'static str,
    title: String,
    subscribers: u64,
    events: u64,
    /// Events per second; 0 = flat out.
    rate: u64,
    /// The issue's p99 target, if any.
    p99_target_ms: Option<f64>,
    /// The issue's deliveries/s target, if any.
    rate_target: Option<f64>,
    /// Stream paths (taken in turn) and the publish path, when not
    /// `/events/fanout-KEY` and `/publish/fanout-KEY`.
    paths: Option<(Vec<String>, String)>,
    /// Added to the server's configuration.
    config: &'static str,
    /// HTTPS: the server gets `[tls]`, the load tester `https://` URLs and
    /// `--cacert`.
    tls: bool,
}

impl Workload {
    /// The load tester's arguments; `cacert`: the CA to trust, for HTTPS.
    fn loadtest_args(&self, addr: SocketAddr, cacert: Option<&Path>) -> Vec<String> {
        let scheme = if cacert.is_some() { "https" } else { "http" };
        let topic = format!("fanout-{}", self.key);
        let ramp = if self.subscribers > 1000 { 4000 } else { 5000 };
        let (streams, publish) = self.paths.clone().unwrap_or_else(|| {
            (
                vec![format!("/events/{topic}")],
                format!("/publish/{topic}"),
            )
        });
        let mut args = vec!["loadtest".to_owned()];
        for path in streams {
            args.push("--url".to_owned());
            args.push(format!("{scheme}://{addr}{path}"));
        }
        args.extend([
            "--connections".to_owned(),
            self.subscribers.to_string(),
            "--ramp".to_owned(),
            format!("{ramp}/s"),
            "--publish-url".to_owned(),
            format!("{scheme}://{addr}{publish}"),
            "--events".to_owned(),
            self.events.to_string(),
            "--rate".to_owned(),
            self.rate.to_string(),
            "--duration".to_owned(),
            "10s".to_owned(),
            "--json".to_owned(),
        ]);
        if let Some(ca) = cacert {
            args.push("--cacert".to_owned());
            args.push(ca.to_string_lossy().into_owned());
        }
        args
    }
}

struct Options {
    bench: bool,
    workloads: Vec<String>,
    flat_events: u64,
    json: bool,
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // then tiny workloads are enough to show the benchmark works.
    let bench = args.iter().any(|a| a == "--bench");
    let mut o = Options {
        bench,
        workloads: if bench {
            vec!["a".into(), "b".into(), "c".into(), "d".into()]
        } else {
            vec!["a".into(), "b".into(), "d".into(), "s".into(), "t".into()]
        },
        flat_events: if bench { 20_000 } else { 500 },
        json: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name {
            "--bench" => {}
            "--json" => o.json = true,
            "--workloads" => {
                o.workloads = value()?.split(',').map(|s| s.trim().to_owned()).collect();
                if let Some(bad) = o
                    .workloads
                    .iter()
                    .find(|w| !["a", "b", "c", "d", "m", "s", "t"].contains(&w.as_str()))
                {
                    return Err(format!("unknown workload {bad:?} (a, b, c, d, m, s or t)"));
                }
            }
            "--flat-events" => {
                let v = value()?;
                o.flat_events = v
                    .replace('_', "")
                    .parse()
                    .map_err(|_| format!("--flat-events: not a number: {v}"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// A workload of `subs` Mercure subscribers of one topic, the server's
/// configuration with `config`.
fn mercure(key: &'static str, subs: u64, events: u64, rate: u64, config: &'static str) -> Workload {
    let with = if config.is_empty() {
        ""
    } else {
        ", active subscriptions"
    };
    Workload {
        key,
        title: format!("{key}: {subs} Mercure, {events} events at {rate}/s{with}"),
        subscribers: subs,
        events,
        rate,
        p99_target_ms: None,
        rate_target: None,
        paths: Some((
            vec![format!("/.well-known/mercure?topic=fanout-{key}")],
            format!("/publish/fanout-{key}"),
        )),
        config,
        tls: false,
    }
}

fn workloads(o: &Options) -> Vec<Workload> {
    let (a_subs, a_events, a_rate, c_subs) = if o.bench {
        (1000, 50, 10, 10_000)
    } else {
        (20, 10, 100, 200)
    };
    let all = [
        Workload {
            key: "a",
            title: format!("a: {a_subs} subscribers, {a_events} events at {a_rate}/s"),
            subscribers: a_subs,
            events: a_events,
            rate: a_rate,
            p99_target_ms: o.bench.then_some(15.0),
            rate_target: None,
            paths: None,
            config: "",
            tls: false,
        },
        Workload {
            key: "b",
            title: format!(
                "b: {} subscribers, {} events flat out",
                if o.bench { 100 } else { 10 },
                o.flat_events
            ),
            subscribers: if o.bench { 100 } else { 10 },
            events: o.flat_events,
            rate: 0,
            p99_target_ms: None,
            rate_target: o.bench.then_some(450_000.0),
            paths: None,
            config: "",
            tls: false,
        },
        Workload {
            key: "c",
            title: format!("c: {c_subs} subscribers, {a_events} events at {a_rate}/s"),
            subscribers: c_subs,
            events: a_events,
            rate: a_rate,
            p99_target_ms: o.bench.then_some(190.0),
            rate_target: None,
            paths: None,
            config: "",
            tls: false,
        },
        Workload {
            key: "d",
            title: format!("d: {c_subs} Mercure, half by template"),
            subscribers: c_subs,
            events: a_events,
            rate: a_rate,
            p99_target_ms: None,
            rate_target: None,
            paths: Some((
                vec![
                    "/.well-known/mercure?topic=fanout-d".to_owned(),
                    "/.well-known/mercure?topic=fanout-%7Bx%7D".to_owned(),
                ],
                "/publish/fanout-d".to_owned(),
            )),
            config: "",
            tls: false,
        },
        mercure("m", a_subs, a_events, a_rate, ""),
        mercure(
            "s",
            a_subs,
            a_events,
            a_rate,
            "[mercure]\nsubscriptions = true\n",
        ),
        Workload {
            key: "t",
            title: format!("t: {a_subs} over HTTPS, {a_events} events at {a_rate}/s"),
            subscribers: a_subs,
            events: a_events,
            rate: a_rate,
            p99_target_ms: None,
            rate_target: None,
            paths: None,
            config: "",
            tls: true,
        },
    ];
    all.into_iter()
        .filter(|w| o.workloads.iter().any(|k| k == w.key))
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_options(&args) {
        Ok(o) => o,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("fanout: {msg}");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: {e}");
            ExitCode::FAILURE
        }
    }
}

// ----- the server ---------------------------------------------------------------

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Samples a process's CPU time until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(u64, u64)>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(t) = cpu_ticks(pid) {
                    samples.push((unix_ns(), t));
                }
                thread::sleep(SAMPLE_EVERY);
            }
            samples
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// CPU ticks at `t` (unix ns), interpolated between samples.
fn ticks_at(samples: &[(u64, u64)], t: u64) -> Option<f64> {
    let after = samples.iter().position(|&(at, _)| at >= t)?;
    if after == 0 {
        return Some(samples[0].1 as f64);
    }
    let (t0, c0) = samples[after - 1];
    let (t1, c1) = samples[after];
    let f = (t - t0) as f64 / (t1 - t0).max(1) as f64;
    Some(c0 as f64 + f * (c1 as f64 - c0 as f64))
}

// ----- a run ------------------------------------------------------------------------

struct Outcome {
    workload: Workload,
    report: Value,
    server_command: String,
    loadtest_command: String,
    /// Server CPU seconds between the first publish and the last delivery.
    window_cpu: Option<f64>,
    /// Server CPU seconds over the whole load test (ramp-up included).
    total_cpu: Option<f64>,
}

impl Outcome {
    fn deliveries(&self) -> u64 {
        self.report["deliveries"].as_u64().unwrap_or(0)
    }

    fn us_per_delivery(&self) -> Option<f64> {
        let d = self.deliveries();
        (d > 0).then(|| self.window_cpu.map(|c| c * 1e6 / d as f64))?
    }

    fn latency(&self, q: &str) -> Option<f64> {
        self.report["latency_ms"][q].as_f64()
    }
}

fn run_workload(w: &Workload) -> Result<Outcome, Box<dyn Error>> {
    let dir = TempDir::new(w.key)?;
    let pki = w.tls.then(|| Pki::new(&dir.0)).transpose()?;
    let mut toml = format!("{CONFIG}{}", w.config);
    if let Some(pki) = &pki {
        let (cert, key) = (pki.cert.to_string_lossy(), pki.key.to_string_lossy());
        toml.push_str(&format!("[tls]\ncert = {cert:?}\nkey = {key:?}\n"));
    }
    let config = dir.0.join("ssed.toml");
    fs::write(&config, &toml)?;
    let server = Server::start(&config)?;
    let pid = server.pid();
    let args = w.loadtest_args(server.addr, pki.as_ref().map(|p| p.ca.as_path()));
    // What the commands show: the files of the temporary directory by name.
    let in_dir = format!("{}/", dir.0.display());
    eprintln!("fanout: {} ...", w.title);
    let sampler = Sampler::start(pid);
    let before = cpu_ticks(pid);
    let mut loadtest = Guard(
        Command::new(BIN)
            .args(&args)
            .env_remove("SSED_PUBLISH_TOKEN")
            .env_remove("SSED_SUBSCRIBE_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let mut stdout = loadtest.0.stdout.take().ok_or("no stdout pipe")?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s); // what arrived is what gets parsed
        s
    });
    // The load test bounds itself; this is the backstop.
    let limit = Duration::from_secs(60) + Duration::from_millis(w.subscribers) * 2;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = loadtest.0.try_wait()? {
            break s;
        }
        if started.elapsed() > limit {
            return Err(format!("{}: the load test did not finish in {limit:?}", w.title).into());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let after = cpu_ticks(pid);
    let mut samples = sampler.finish();
    // The last sample may predate the last delivery by up to a period.
    if let Some(t) = after {
        samples.push((unix_ns(), t));
    }
    let out = reader.join().map_err(|_| "stdout reader panicked")?;
    if !status.success() {
        let hint = if w.tls {
            " (HTTPS: does this ssed loadtest speak https?)"
        } else {
            ""
        };
        return Err(format!("{}: ssed loadtest failed ({status}){hint}", w.title).into());
    }
    let report: Value = serde_json::from_str(out.trim())
        .map_err(|e| format!("{}: the load test printed no JSON ({e}): {out}", w.title))?;
    let first = report["first_publish_unix_ns"].as_u64().unwrap_or(0);
    let last = report["last_delivery_unix_ns"].as_u64().unwrap_or(0);
    let window_cpu = match (ticks_at(&samples, first), ticks_at(&samples, last)) {
        (Some(a), Some(b)) if first > 0 && last > first => Some((b - a) / TICKS_PER_SECOND),
        _ => None,
    };
    let total_cpu = match (before, after) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / TICKS_PER_SECOND),
        _ => None,
    };
    drop(server); // killed by PID here, before the next workload starts
    Ok(Outcome {
        workload: w.clone(),
        report,
        server_command: format!(
            "ssed --config ssed.toml --listen 127.0.0.1:0  (ssed.toml: {})",
            toml.trim().replace('\n', ", ").replace(&in_dir, "")
        ),
        loadtest_command: format!("ssed {}", args.join(" ")).replace(&in_dir, ""),
        window_cpu,
        total_cpu,
    })
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews
/// every figure here.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "?".to_owned(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn run(o: &Options) -> Result<(), Box<dyn Error>> {
    let load_before = load_average();
    let mut outcomes = Vec::new();
    for w in workloads(o) {
        outcomes.push(run_workload(&w)?);
    }
    if o.json {
        let list: Vec<Value> = outcomes
            .iter()
            .map(|r| {
                json!({
                    "workload": r.workload.title,
                    "command": r.loadtest_command,
                    "server": r.server_command,
                    "server_cpu_window_s": r.window_cpu,
                    "server_cpu_total_s": r.total_cpu,
                    "server_cpu_us_per_delivery": r.us_per_delivery(),
                    "loadtest": r.report,
                })
            })
            .collect();
        println!(
            "{}",
            json!({"date": utc_now(), "cpus": cpus(), "load_average_before": load_before, "version": env!("CARGO_PKG_VERSION"), "server_bin": server_bin().to_string_lossy(), "workloads": list})
        );
        return Ok(());
    }
    print_table(&outcomes, &load_before);
    Ok(())
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

fn print_table(outcomes: &[Outcome], load_before: &str) {
    println!(
        "\nssed {} fan-out benchmark, {}, {} CPUs, load average before the run {}; \
         server and load-test client on the same machine",
        env!("CARGO_PKG_VERSION"),
        utc_now(),
        cpus(),
        load_before,
    );
    println!("server binary: {}", server_bin().to_string_lossy());
    println!(
        "\n{:<42} {:>6} {:>17} {:>7} {:>7} {:>7} {:>7} {:>12} {:>10}",
        "workload",
        "held",
        "delivered",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "deliveries/s",
        "srv µs/dlv"
    );
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    for r in outcomes {
        let rep = &r.report;
        println!(
            "{:<42} {:>6} {:>17} {:>7} {:>7} {:>7} {:>7} {:>12} {:>10}",
            r.workload.title,
            rep["held"].as_u64().unwrap_or(0),
            format!(
                "{}/{}",
                r.deliveries(),
                rep["expected_deliveries"].as_u64().unwrap_or(0)
            ),
            opt(r.latency("p50"), 2),
            opt(r.latency("p90"), 2),
            opt(r.latency("p99"), 2),
            opt(r.latency("max"), 2),
            opt(rep["deliveries_per_s"].as_f64(), 0),
            opt(r.us_per_delivery(), 2),
        );
    }
    println!("\ntargets (issue 5):");
    for r in outcomes {
        if let Some(t) = r.workload.p99_target_ms {
            let got = r.latency("p99");
            println!(
                "  {:<44} p99 {} ms, target <= {t} ms: {}",
                r.workload.title,
                opt(got, 2),
                verdict(got.is_some_and(|g| g <= t))
            );
        }
        if let Some(t) = r.workload.rate_target {
            let got = r.report["deliveries_per_s"].as_f64();
            println!(
                "  {:<44} {} deliveries/s, target >= {t:.0}: {}",
                r.workload.title,
                opt(got, 0),
                verdict(got.is_some_and(|g| g >= t))
            );
        }
        let all = r.deliveries() == r.report["expected_deliveries"].as_u64().unwrap_or(u64::MAX);
        println!(
            "  {:<44} every delivery arrived: {}; dropped streams {}; server CPU {} µs/delivery (target <= 2.0), {} s in the publish window, {} s in all; load-test client CPU {} s",
            r.workload.title,
            verdict(all),
            r.report["dropped"].as_u64().unwrap_or(0),
            opt(r.us_per_delivery(), 2),
            opt(r.window_cpu, 2),
            opt(r.total_cpu, 2),
            opt(r.report["client_cpu_s"].as_f64(), 2),
        );
    }
    let pairs = [
        ("c", "d", "selectors (issue 13)", " (goal: each <= 1.5x)"),
        (
            "m",
            "s",
            "active subscriptions",
            " (goal: p99 and CPU <= 1.10x)",
        ),
        ("a", "t", "HTTPS", ""),
    ];
    for (base, other, what, goal) in pairs {
        let find = |key: &str| outcomes.iter().find(|r| r.workload.key == key);
        let (Some(b), Some(o)) = (find(base), find(other)) else {
            continue;
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.2}x", b / a),
            _ => "-".to_owned(),
        };
        let p50 = ratio(b.latency("p50"), o.latency("p50"));
        let p99 = ratio(b.latency("p99"), o.latency("p99"));
        let cpu = ratio(b.us_per_delivery(), o.us_per_delivery());
        println!(
            "\n{what}: {other} beside {base}: p50 {p50}, p99 {p99}, server CPU per delivery {cpu}{goal}"
        );
    }
    println!(
        "\ncommands (ADDR: the server's address, logged at start-up; files in its temporary directory by name):"
    );
    let mut servers: Vec<&str> = Vec::new();
    for r in outcomes {
        if !servers.contains(&r.server_command.as_str()) {
            servers.push(&r.server_command);
            println!("  server:  {}", r.server_command);
        }
    }
    for r in outcomes {
        let addr = r.report["url"]
            .as_str()
            .and_then(|u| u.split_once("://"))
            .and_then(|(_, u)| u.split('/').next())
            .unwrap_or("ADDR");
        println!("  {}", r.loadtest_command.replace(addr, "ADDR"));
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02} {h:02}:{m:02} UTC")
}
