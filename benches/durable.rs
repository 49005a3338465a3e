//! Durable history: what the store's write costs per publish, and what it
//! does to the daemon at 1,000 publishes/s.
//!
//! ```text
//! cargo bench --bench durable
//! ```
//!
//! 1. The store alone: a [`Hub`] with `history = 1000` over ten topics,
//!    already full (so every publish also trims), publishes 20,000 events
//!    of 200 bytes, in memory and then with `ssed::hub::store` in a temporary
//!    directory; the time of each `publish` call, which for the durable hub
//!    includes its SQLite transaction (WAL, `synchronous = NORMAL`).
//! 2. The daemon: the real `ssed` (`CARGO_BIN_EXE_ssed`) started without
//!    and with `data_dir`, and `ssed loadtest` publishing 5,000 events at
//!    1,000/s to 1 and to 100 subscribers: publish-to-receive latency, and
//!    the server's CPU time (utime + stime from `/proc/PID/stat`, 1/100 s
//!    ticks) over the run divided by the events. The load tester shares the
//!    machine.
//!
//! Run by `cargo test --benches` (no `--bench` flag) it runs tiny versions
//! as a check that it works. Linux only (`/proc`); loopback only.

use std::error::Error;
use std::fs;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use ssed::{Event, Hub, HubConfig};

mod common;
use common::{BIN, Server, TempDir, cpu_ticks};

const HISTORY: usize = 1000;
const TOPICS: usize = 10;

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let full = std::env::args().any(|a| a == "--bench");
    match run(full) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("durable: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(full: bool) -> Result<(), Box<dyn Error>> {
    let (events, fill) = if full {
        (20_000, HISTORY * TOPICS)
    } else {
        (500, 100)
    };
    println!(
        "the store alone: {events} publishes of 200 B over {TOPICS} topics, history {HISTORY}, every topic full"
    );
    println!(
        "{:<10} {:>12} {:>8} {:>8} {:>8}",
        "history", "µs/publish", "p50", "p99", "max"
    );
    let dir = TempDir::new("lib")?;
    for durable in [false, true] {
        let hub = if durable {
            ssed::hub::store::open_hub(&dir.0, HISTORY, HubConfig::default())?
        } else {
            Hub::new(HISTORY)
        };
        let mut times = publish_timed(&hub, fill, events)?;
        let mean = times.iter().sum::<Duration>() / times.len() as u32;
        times.sort();
        let q = |f: f64| times[((times.len() - 1) as f64 * f) as usize];
        println!(
            "{:<10} {:>12.1} {:>8.1} {:>8.1} {:>8.0}",
            if durable { "durable" } else { "memory" },
            us(mean),
            us(q(0.5)),
            us(q(0.99)),
            us(q(1.0)),
        );
    }

    let (events, rate) = if full { (5_000, 1_000) } else { (200, 1_000) };
    println!();
    println!(
        "the daemon: {events} events at {rate}/s (ssed loadtest), server CPU and delivery latency"
    );
    println!(
        "{:<12} {:<10} {:>16} {:>9} {:>9} {:>10}",
        "subscribers", "history", "CPU µs/publish", "p50 ms", "p99 ms", "delivered"
    );
    for subscribers in [1u64, 100] {
        for durable in [false, true] {
            let r = daemon_run(durable, subscribers, events, rate)?;
            println!(
                "{:<12} {:<10} {:>16.0} {:>9.3} {:>9.3} {:>10}",
                subscribers,
                if durable { "durable" } else { "memory" },
                r.cpu_us_per_publish,
                r.p50_ms,
                r.p99_ms,
                format!("{}/{}", r.delivered, r.expected),
            );
        }
    }
    Ok(())
}

/// Fills every topic with `fill` events, then times `n` publishes.
fn publish_timed(hub: &Hub, fill: usize, n: usize) -> Result<Vec<Duration>, Box<dyn Error>> {
    let data = "x".repeat(200);
    let topics: Vec<String> = (0..TOPICS).map(|i| format!("topic{i}")).collect();
    for i in 0..fill {
        hub.publish(&topics[i % TOPICS], Event::new().data(data.as_str()))?;
    }
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let event = Event::new().data(data.as_str());
        let t = Instant::now();
        hub.publish(&topics[i % TOPICS], event)?;
        times.push(t.elapsed());
    }
    Ok(times)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct DaemonRun {
    cpu_us_per_publish: f64,
    p50_ms: f64,
    p99_ms: f64,
    delivered: u64,
    expected: u64,
}

fn daemon_run(
    durable: bool,
    subscribers: u64,
    events: u64,
    rate: u64,
) -> Result<DaemonRun, Box<dyn Error>> {
    let dir = TempDir::new("daemon")?;
    let mut config =
        format!("heartbeat = \"0\"\nmax_execution_time = \"0\"\nhistory = {HISTORY}\n");
    if durable {
        let data = dir.0.join("data");
        config.push_str(&format!("data_dir = {:?}\n", data.to_str().ok_or("path")?));
    }
    let path = dir.0.join("ssed.toml");
    fs::write(&path, config)?;
    let server = Server::start(&path)?;
    let (addr, pid) = (server.addr, server.pid());
    let before = cpu_ticks(pid).ok_or("no /proc stat for the server")?;
    let out = Command::new(BIN)
        .args([
            "loadtest",
            "--url",
            &format!("http://{addr}/events/t"),
            "--connections",
            &subscribers.to_string(),
            "--publish-url",
            &format!("http://{addr}/publish/t"),
            "--events",
            &events.to_string(),
            "--rate",
            &rate.to_string(),
            "--duration",
            "5s",
            "--json",
        ])
        .env_remove("SSED_PUBLISH_TOKEN")
        .env_remove("SSED_SUBSCRIBE_TOKEN")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    let after = cpu_ticks(pid).ok_or("no /proc stat for the server")?;
    drop(server);
    let json: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("loadtest printed no JSON ({e}); status {}", out.status))?;
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    Ok(DaemonRun {
        cpu_us_per_publish: (after - before) as f64 * 10_000.0 / events as f64,
        p50_ms: num(&json["latency_ms"]["p50"]),
        p99_ms: num(&json["latency_ms"]["p99"]),
        delivered: json["deliveries"].as_u64().unwrap_or(0),
        expected: json["expected_deliveries"].as_u64().unwrap_or(0),
    })
}
