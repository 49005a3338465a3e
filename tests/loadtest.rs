#![cfg(feature = "daemon")]
//! `ssed loadtest` run for real: the binary against a real `ssed` on
//! `127.0.0.1:0`, with small numbers.
//!
//! Every child is killed by PID when its guard drops, its output is read by
//! threads, and every wait is bounded.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::TempDir;
use support::loadtest::{BIN, loadtest_limited, read_all, spawn_loadtest, wait_within};
use support::process::{Ssed, spawn_config};

/// The longest any one child may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// A running server; dropping it kills the process by its PID and removes
/// its config.
struct Server {
    /// Held for its guard: dropping it kills the server.
    _proc: Ssed,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Server {
    /// Starts `ssed` with `config` (TOML) on 127.0.0.1:0.
    fn start(name: &str, config: &str) -> Server {
        let dir = std::env::temp_dir().join(format!("ssed-loadtest-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("ssed.toml");
        std::fs::write(&path, config).expect("config written");
        let path = path.to_str().expect("a UTF-8 temp path");
        let proc = Ssed::spawn(&["--config", path, "--listen", "127.0.0.1:0"], &[]);
        let addr = proc.listening();
        Server {
            _proc: proc,
            addr,
            dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir); // best effort; `_proc` kills the child
    }
}

/// Runs `ssed loadtest args…`, killing it past the deadline.
fn loadtest(args: &[&str]) -> (ExitStatus, String, String) {
    loadtest_within(args, DEADLINE)
}

/// Runs `ssed loadtest args…`, killing it past `deadline`.
fn loadtest_within(args: &[&str], deadline: Duration) -> (ExitStatus, String, String) {
    loadtest_limited(args, None, deadline)
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

const CONFIG: &str = "heartbeat = \"0\"\nmax_execution_time = \"0\"\nhistory = 100\n";

#[test]
fn fifty_streams_receive_every_event() {
    let server = Server::start("fanout", CONFIG);
    let (status, out, err) = loadtest(&[
        "--url",
        &server.url("/events/lt"),
        "--connections",
        "50",
        "--ramp",
        "5000/s",
        "--publish-url",
        &server.url("/publish/lt"),
        "--events",
        "20",
        "--rate",
        "100",
        "--duration",
        "3s",
        "--json",
    ]);
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    assert_eq!(r["held"], 50, "{r}");
    assert_eq!(r["refused"], 0, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["dropped"], 0, "{r}");
    assert_eq!(r["published"], 20, "{r}");
    assert_eq!(r["expected_deliveries"], 1000, "{r}");
    assert_eq!(r["deliveries"], 1000, "{r}");
    for q in ["p50", "p90", "p99", "max"] {
        let v = r["latency_ms"][q].as_f64().unwrap_or(-1.0);
        assert!((0.0..1000.0).contains(&v), "latency {q}: {r}");
    }
    assert!(
        r["deliveries_per_s"].as_f64().is_some_and(|v| v > 0.0),
        "{r}"
    );
    // Live progress went to stderr.
    assert!(err.contains("held 50"), "{err}");
}

#[test]
fn past_the_cap_streams_are_refused() {
    let server = Server::start("cap", &format!("{CONFIG}max_connections = 10\n"));
    let (status, out, err) = loadtest(&[
        "--url",
        &server.url("/events/capped"),
        "--connections",
        "20",
        "--ramp",
        "5000/s",
        "--duration",
        "0",
        "--json",
    ]);
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    assert_eq!(r["held"], 10, "{r}");
    assert_eq!(r["refused"], 10, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["latency_ms"], Value::Null, "{r}");
}

#[test]
fn a_retry_answer_past_the_cap_counts_as_refused() {
    let config = format!("{CONFIG}max_connections = 5\noverload = \"retry\"\n");
    let server = Server::start("retry", &config);
    let (status, out, err) = loadtest(&[
        "--url",
        &server.url("/events/retry"),
        "-n",
        "8",
        "--duration",
        "0",
        "--json",
    ]);
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    assert_eq!(
        (r["held"].as_u64(), r["refused"].as_u64()),
        (Some(5), Some(3)),
        "{r}"
    );
    assert_eq!(r["dropped"], 0, "{r}");
}

#[test]
fn the_table_is_the_default_output() {
    let server = Server::start("table", CONFIG);
    let (status, out, err) = loadtest(&[
        "--url",
        &server.url("/events/table"),
        "-n",
        "3",
        "--duration",
        "0",
    ]);
    assert!(status.success(), "{status}: {err}");
    assert!(out.contains("3 held"), "{out}");
    assert!(out.contains("0 refused (503)"), "{out}");
}

#[test]
fn streams_take_several_urls_in_turn() {
    let server = Server::start("urls", CONFIG);
    let run = |urls: &[String]| {
        let mut args: Vec<&str> = Vec::new();
        for u in urls {
            args.extend(["--url", u]);
        }
        let publish = server.url("/publish/lt");
        args.extend([
            "--connections",
            "10",
            "--publish-url",
            &publish,
            "--events",
            "5",
            "--rate",
            "100",
            "--duration",
            "1s",
            "--json",
        ]);
        let (status, out, err) = loadtest(&args);
        (status, json(&out), err)
    };
    // Half the streams follow a topic no one publishes to.
    let (_, r, err) = run(&[server.url("/events/lt"), server.url("/events/none")]);
    assert_eq!(r["held"], 10, "{r} {err}");
    assert_eq!(r["deliveries"], 25, "5 streams x 5 events: {r}");
    // A Mercure subscriber of the topic and one of a template matching it.
    let (status, r, err) = run(&[
        server.url("/.well-known/mercure?topic=lt"),
        server.url("/.well-known/mercure?topic=l%7Bx%7D"),
    ]);
    assert!(status.success(), "{status}: {err}");
    assert_eq!(r["held"], 10, "{r}");
    assert_eq!(r["deliveries"], 50, "{r}");
    let (status, _, err) = loadtest(&[
        "--url",
        &server.url("/events/a"),
        "--url",
        "http://127.0.0.1:1/events/b",
        "-n",
        "2",
    ]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("same server"), "{err}");
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "missing --url"),
        (&["--connections", "5"], "missing --url"),
        (
            &[
                "--url",
                "http://127.0.0.1:1/events/a",
                "--connections",
                "lots",
            ],
            "not a whole number",
        ),
        (
            &[
                "--url",
                "http://127.0.0.1:1/events/a",
                "-n",
                "5",
                "--frobnicate",
            ],
            "--frobnicate",
        ),
        (
            &[
                "--url",
                "http://127.0.0.1:1/events/a",
                "-n",
                "5",
                "--rate",
                "fast",
            ],
            "not a rate",
        ),
        (&["--url", "ftp://127.0.0.1/x", "-n", "5"], "http://"),
        (
            &[
                "--url",
                "http://127.0.0.1:1/events/a",
                "-n",
                "5",
                "--source",
                "127.0.0.5-127.0.0.2",
            ],
            "--source",
        ),
        (
            &[
                "--url",
                "http://127.0.0.1:1/events/a",
                "--find-limit",
                "--source",
                "127.0.0.two",
            ],
            "--source",
        ),
        (
            &[
                "--url",
                "http://127.0.0.1:1/events/a",
                "-n",
                "5",
                "--source",
                "::1",
            ],
            "--source",
        ),
        (
            &[
                "--url",
                "http://127.0.0.1:1/events/a",
                "-n",
                "5",
                "--max-p99",
                "1s",
            ],
            "need --find-limit",
        ),
    ];
    for (args, want) in cases {
        let (status, out, err) = loadtest(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err:?} lacks {want:?}");
        assert!(err.contains("ssed loadtest --help"), "{err}");
        assert!(out.is_empty(), "{out}");
    }
    let (status, out, _) = loadtest(&["--help"]);
    assert!(status.success());
    assert!(out.contains("--connections"), "{out}");
}

/// The cap's refusals stop `--find-limit`: doubling from 100 to 400, then
/// bisecting down to 1% of the count that held, which holds all 300.
#[test]
fn find_limit_stops_at_the_servers_cap() {
    let dir = TempDir::new("find-limit");
    let (ssed, addr) = spawn_config(
        &dir,
        "listen = \"127.0.0.1:0\"\nmax_connections = 300\nheartbeat = \"0\"\n",
    );
    let pid = ssed.pid().to_string();
    let url = format!("http://{addr}/events/t");
    let (status, out, err) = loadtest_within(
        &[
            "--url",
            &url,
            "--find-limit",
            "--step-time",
            "300ms",
            "--events",
            "3",
            "--ramp",
            "0",
            "--pid",
            &pid,
            "--json",
        ],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    let limit = r["limit"].as_u64().unwrap_or(0);
    assert!((250..=300).contains(&limit), "{r}");
    let stopped_by = r["stopped_by"].as_str().unwrap_or("");
    assert!(stopped_by.contains("refusals (503)"), "{r}");
    let steps = r["steps"].as_array().expect("steps");
    let counts: Vec<u64> = steps.iter().filter_map(|s| s["streams"].as_u64()).collect();
    assert_eq!(&counts[..3], &[100, 200, 400], "{r}");
    for step in steps {
        for key in ["held", "refused", "failed", "p50_ms", "p99_ms"] {
            assert!(step.get(key).is_some(), "{key}: {step}");
        }
        assert!(
            step["server_rss_kib"].as_u64().is_some_and(|k| k > 0),
            "{step}"
        );
        let streams = step["streams"].as_u64().unwrap_or(0);
        if streams <= limit {
            assert_eq!(step["held"].as_u64(), Some(streams), "{step}");
            assert!(step["p99_ms"].as_f64().is_some(), "{step}");
        } else {
            assert!(step["refused"].as_u64().is_some_and(|n| n > 0), "{step}");
        }
    }
    assert!(err.contains("step 400"), "progress on stderr: {err}");
}

/// A listener that records the peer address of every connection, answers
/// an event-stream head and holds the connection until dropped.
struct PeerRecorder {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<IpAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PeerRecorder {
    fn start() -> PeerRecorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("address");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peers, stop) = (Arc::clone(&peers), Arc::clone(&stop));
            thread::spawn(move || {
                let mut held: Vec<TcpStream> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, peer)) => {
                            peers.lock().expect("peers").push(peer.ip());
                            let _ = conn.set_nonblocking(false); // the head is small
                            let _ = conn.write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n",
                            ); // a failed write shows as a failed stream
                            held.push(conn);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        PeerRecorder {
            addr,
            peers,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PeerRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join(); // a panicked recorder already failed its test
        }
    }
}

#[test]
fn source_spreads_streams_over_the_addresses() {
    let recorder = PeerRecorder::start();
    let url = format!("http://{}/events/src", recorder.addr);
    let (status, out, err) = loadtest(&[
        "--url",
        &url,
        "-n",
        "12",
        "--source",
        "127.0.0.2-127.0.0.5",
        "--ramp",
        "0",
        "--duration",
        "0",
        "--json",
    ]);
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    assert_eq!(r["held"], 12, "{r}");
    let peers = recorder.peers.lock().expect("peers").clone();
    assert_eq!(peers.len(), 12, "{peers:?}");
    let seen: BTreeSet<IpAddr> = peers.iter().copied().collect();
    let want: BTreeSet<IpAddr> = (2..=5).map(|i| IpAddr::from([127, 0, 0, i])).collect();
    assert_eq!(seen, want, "{peers:?}");
    // Round-robin: three each.
    for a in &want {
        assert_eq!(peers.iter().filter(|p| *p == a).count(), 3, "{peers:?}");
    }
}

#[test]
fn find_limit_with_nothing_listening_fails_clearly() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{port}/events/t");
    let (status, out, err) = loadtest(&["--url", &url, "--find-limit", "--json"]);
    assert_eq!(status.code(), Some(1), "{status}: {err}");
    assert!(
        err.contains("nothing answers at") && err.contains("refused"),
        "{err}"
    );
    // The partial report still comes.
    let r = json(&out);
    assert_eq!(r["limit"], 0, "{r}");
    assert!(
        r["stopped_by"]
            .as_str()
            .is_some_and(|s| s.contains("nothing answers")),
        "{r}"
    );
}

#[test]
fn find_limit_against_a_404_fails_clearly() {
    let server = Server::start("find-404", CONFIG);
    let page = server.dir.join("partial.html");
    let (status, out, err) = loadtest(&[
        "--url",
        &server.url("/nowhere/t"),
        "--publish-url",
        &server.url("/publish/t"),
        "--find-limit",
        "--connections",
        "5",
        "--report",
        page.to_str().expect("a UTF-8 temp path"),
    ]);
    assert_eq!(status.code(), Some(1), "{status}: {err}");
    assert!(err.contains("answered 404"), "{err}");
    assert!(out.contains("limit       0 streams"), "{out}");
    // The page is written all the same, and says it is partial.
    let html = std::fs::read_to_string(&page).expect("the partial report was written");
    assert!(html.contains("Partial report"), "{html}");
    assert!(html.contains("answered 404"), "{html}");
    assert_eq!(html.matches("<tr data-streams=\"5\">").count(), 1, "{html}");
}

/// `--report` writes one self-contained page: charts as inline SVG, no
/// script or resource from elsewhere, and a table row per step, in the
/// order of the JSON steps.
#[test]
fn find_limit_writes_an_html_report() {
    let dir = TempDir::new("find-limit-report");
    let (ssed, addr) = spawn_config(
        &dir,
        "listen = \"127.0.0.1:0\"\nmax_connections = 300\nheartbeat = \"0\"\n",
    );
    let pid = ssed.pid().to_string();
    let url = format!("http://{addr}/events/t");
    let page = dir.path().join("r.html");
    let page_arg = page.to_str().expect("a UTF-8 temp path");
    let (status, out, err) = loadtest_within(
        &[
            "--url",
            &url,
            "--find-limit",
            "--step-time",
            "200ms",
            "--events",
            "2",
            "--ramp",
            "0",
            "--pid",
            &pid,
            "--json",
            "--report",
            page_arg,
        ],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    let html = std::fs::read_to_string(&page).expect("the report was written");
    assert!(html.contains("<svg"), "{html}");
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("Partial report"), "{html}");
    let without_url = html.replace(&url, "");
    assert!(
        !without_url.contains("http://") && !without_url.contains("https://"),
        "a reference to elsewhere: {html}"
    );
    for chart in [
        "chart-streams",
        "chart-latency",
        "chart-rss",
        "chart-threads",
    ] {
        assert!(html.contains(chart), "{chart}: {html}");
    }
    let steps = r["steps"].as_array().expect("steps");
    let rows: Vec<u64> = html
        .split("<tr data-streams=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next()?.parse().ok())
        .collect();
    let counts: Vec<u64> = steps.iter().filter_map(|s| s["streams"].as_u64()).collect();
    assert_eq!(rows, counts, "{html}");
    for step in steps {
        assert!(
            step["server_threads"].as_u64().is_some_and(|t| t > 0),
            "{step}"
        );
    }
    let limit = r["limit"].as_u64().unwrap_or(0);
    assert!(html.contains(&format!("{limit} streams held")), "{html}");
}

/// The PIDs of running `ssed loadtest --worker` processes whose command
/// line names `url`.
fn workers_for(url: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let has = |a: &str| args.contains(&a.as_bytes());
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        (has("--worker") && has(url) && !zombie).then_some(pid)
    })
    .collect()
}

/// The PIDs of `n` workers for `url`, once that many run (or what runs
/// after [`DEADLINE`]).
fn wait_for_workers(url: &str, n: usize) -> Vec<u32> {
    let started = Instant::now();
    while workers_for(url).len() < n && started.elapsed() < DEADLINE {
        thread::sleep(Duration::from_millis(20));
    }
    workers_for(url)
}

/// Past its descriptor limit (200 here) the load tester spreads 300
/// streams over worker processes: every stream held, every delivery
/// counted, the latency over all of them, and no worker left after.
#[test]
fn past_the_descriptor_limit_workers_hold_the_streams() {
    let server = Server::start("workers", CONFIG);
    let url = server.url("/events/workers");
    let (status, out, err) = loadtest_limited(
        &[
            "--url",
            &url,
            "--connections",
            "300",
            "--ramp",
            "0",
            "--publish-url",
            &server.url("/publish/workers"),
            "--events",
            "10",
            "--rate",
            "100",
            "--duration",
            "3s",
            "--json",
        ],
        Some(200),
        Duration::from_secs(30),
    );
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    assert_eq!(r["workers"], 2, "{r}");
    assert!(
        err.contains("descriptor limit 200: 300 streams over 2 worker processes"),
        "{err}"
    );
    assert_eq!(r["held"], 300, "{r}");
    assert_eq!(
        (r["refused"].as_u64(), r["failed"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    assert_eq!(r["published"], 10, "{r}");
    assert_eq!(r["expected_deliveries"], 3000, "{r}");
    assert_eq!(r["deliveries"], 3000, "{r}");
    // The quantiles come from the workers' histograms merged.
    let p50 = r["latency_ms"]["p50"].as_f64().unwrap_or(-1.0);
    let p99 = r["latency_ms"]["p99"].as_f64().unwrap_or(-1.0);
    assert!(0.0 < p50 && p50 <= p99 && p99 < 1000.0, "{r}");
    assert!(!err.contains("WARN"), "{err}");
    assert!(workers_for(&url).is_empty(), "workers left running");
}

/// A worker ends when the load tester that started it dies, even by
/// SIGKILL: its stdin closes.
#[test]
fn workers_end_with_the_load_tester() {
    let server = Server::start("orphans", CONFIG);
    let url = server.url("/events/orphans");
    let args = [
        "--url",
        url.as_str(),
        "--connections",
        "300",
        "--ramp",
        "0",
        "--duration",
        "60s",
    ];
    let mut child = spawn_loadtest(&args, Some(200));
    let workers = wait_for_workers(&url, 2);
    let _ = child.kill(); // SIGKILL: no chance to end them itself
    let _ = child.wait();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let ended = Instant::now();
    while !workers_for(&url).is_empty() && ended.elapsed() < DEADLINE {
        thread::sleep(Duration::from_millis(20));
    }
    let left = workers_for(&url);
    for pid in &left {
        // Do not leave them to the next test: these are our grandchildren.
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    assert!(left.is_empty(), "orphaned workers {left:?}");
    assert!(
        ended.elapsed() < Duration::from_secs(2),
        "{:?}",
        ended.elapsed()
    );
}

/// A plain run's `--report`: one self-contained page, the streams, the
/// deliveries and (with `--pid`) the server's RSS and threads over time,
/// the run's delivery latency among its facts.
#[test]
fn a_plain_run_writes_an_html_report() {
    let dir = TempDir::new("plain-report");
    let (ssed, addr) = spawn_config(&dir, &format!("listen = \"127.0.0.1:0\"\n{CONFIG}"));
    let url = format!("http://{addr}/events/plain");
    let page = dir.path().join("plain.html");
    let (status, out, err) = loadtest(&[
        "--url",
        &url,
        "-n",
        "40",
        "--ramp",
        "40/s",
        "--publish-url",
        &format!("http://{addr}/publish/plain"),
        "--events",
        "5",
        "--rate",
        "50",
        "--duration",
        "2s",
        "--pid",
        &ssed.pid().to_string(),
        "--report",
        page.to_str().expect("a UTF-8 temp path"),
        "--json",
    ]);
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    assert_eq!(r["held"], 40, "{r}");
    let html = std::fs::read_to_string(&page).expect("the report was written");
    assert!(html.contains("<title>ssed loadtest</title>"), "{html}");
    assert!(!html.contains("<script"), "{html}");
    let without_url = html
        .replace(&url, "")
        .replace(&format!("http://{addr}/publish/plain"), "");
    assert!(
        !without_url.contains("http"),
        "a reference to elsewhere: {html}"
    );
    for chart in [
        "chart-streams",
        "chart-deliveries",
        "chart-rss",
        "chart-threads",
    ] {
        assert!(html.contains(chart), "{chart}: {html}");
    }
    // A sample at the start, once a second through the 1 s ramp, and at the end.
    let times: Vec<f64> = html
        .split("<tr data-t=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next()?.parse().ok())
        .collect();
    assert!(times.len() >= 3, "{times:?}");
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let held_line = html
        .split("<polyline data-series=\"held\"")
        .nth(1)
        .and_then(|p| p.split("points=\"").nth(1))
        .and_then(|p| p.split('"').next())
        .expect("the held line");
    assert_eq!(held_line.split_whitespace().count(), times.len(), "{html}");
    let p99 = r["latency_ms"]["p99"].as_f64().expect("a p99");
    assert!(
        html.contains(&format!("p99 {p99:.3} ms")),
        "p99 {p99}: {html}"
    );
    assert!(html.contains("200 of 200 expected"), "{html}");
}

/// A server killed between two steps of `--find-limit`: the run says so
/// (not "a limit"), exits 1, and still prints the steps it measured.
#[test]
fn find_limit_with_a_server_that_dies_fails_clearly() {
    let dir = TempDir::new("find-limit-dies");
    let (mut ssed, addr) = spawn_config(&dir, "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\n");
    let url = format!("http://{addr}/events/t");
    let page = dir.path().join("dies.html");
    let args = [
        "--url",
        url.as_str(),
        "--find-limit",
        "--step-time",
        "300ms",
        "--events",
        "2",
        "--ramp",
        "0",
        "--pid",
        &ssed.pid().to_string(),
        "--report",
        page.to_str().expect("a UTF-8 temp path"),
        "--json",
    ];
    let mut child = spawn_loadtest(&args, None);
    let out = read_all(child.stdout.take());
    // Kill the server as the second step (200 streams) begins.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    let err = thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let Ok(line) = line else { break };
            if line.contains("step: 200 streams") {
                let _ = tx.send(()); // the test may be past waiting
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let second_step = rx.recv_timeout(Duration::from_secs(20));
    ssed.kill_9();
    let status = wait_within(&mut child, Instant::now() + Duration::from_secs(30));
    let (out, err) = (out.join().expect("stdout"), err.join().expect("stderr"));
    assert!(second_step.is_ok(), "no second step: {err}");
    assert_eq!(status.code(), Some(1), "{status}: {err}");
    assert!(
        err.contains("the server stopped answering at 200 streams"),
        "{err}"
    );
    let r = json(&out);
    assert_eq!(r["limit"], 100, "{r}");
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{r}");
    assert_eq!(steps[0]["held"], 100, "{r}");
    let html = std::fs::read_to_string(&page).expect("the partial report was written");
    assert!(html.contains("Partial report"), "{html}");
}

/// Streams the client cannot open (a source address that is not this
/// machine's) are named as the client's own failure, not the server's limit.
#[test]
fn find_limit_names_the_clients_own_failures() {
    let server = Server::start("client-fails", CONFIG);
    let (status, out, err) = loadtest(&[
        "--url",
        &server.url("/events/t"),
        "--find-limit",
        "--connections",
        "5",
        "--source",
        "192.0.2.1",
        "--json",
    ]);
    assert_eq!(status.code(), Some(1), "{status}: {err}");
    let r = json(&out);
    let stopped_by = r["stopped_by"].as_str().unwrap_or("");
    assert!(
        stopped_by.contains("client ran out of source ports/addresses")
            && stopped_by.contains("not the server's limit")
            && stopped_by.contains("bind 192.0.2.1"),
        "{r}"
    );
    assert_eq!(r["limit"], 0, "{r}");
}

/// Past its descriptor limit (200 here) `--find-limit` holds its steps in
/// worker processes: the search goes on to the server's cap of 300, not
/// to the client's limit, each step's latency gathered from the workers.
#[test]
fn find_limit_past_the_descriptor_limit_uses_workers() {
    let dir = TempDir::new("find-limit-workers");
    let (ssed, addr) = spawn_config(
        &dir,
        "listen = \"127.0.0.1:0\"\nmax_connections = 300\nheartbeat = \"0\"\n",
    );
    let url = format!("http://{addr}/events/t");
    let (status, out, err) = loadtest_limited(
        &[
            "--url",
            &url,
            "--find-limit",
            "--step-time",
            "300ms",
            "--events",
            "3",
            "--ramp",
            "0",
            "--pid",
            &ssed.pid().to_string(),
            "--json",
        ],
        Some(200),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    let limit = r["limit"].as_u64().unwrap_or(0);
    assert!((250..=300).contains(&limit), "{r}");
    let stopped_by = r["stopped_by"].as_str().unwrap_or("");
    assert!(stopped_by.contains("refusals (503)"), "{r}");
    assert!(r["workers"].as_u64().is_some_and(|n| n >= 2), "{r}");
    assert!(
        err.contains("descriptor limit 200: 200 streams over 2 worker processes"),
        "{err}"
    );
    let steps = r["steps"].as_array().expect("steps");
    let counts: Vec<u64> = steps.iter().filter_map(|s| s["streams"].as_u64()).collect();
    assert_eq!(&counts[..3], &[100, 200, 400], "{r}");
    // The first step fits in this process; the others are the workers'.
    assert_eq!(steps[0]["workers"], 0, "{r}");
    for step in steps {
        let streams = step["streams"].as_u64().unwrap_or(0);
        if streams > 184 {
            assert!(step["workers"].as_u64().is_some_and(|n| n >= 2), "{step}");
        }
        if streams <= limit {
            assert_eq!(step["held"].as_u64(), Some(streams), "{step}");
            let p99 = step["p99_ms"].as_f64().unwrap_or(-1.0);
            assert!(0.0 < p99 && p99 < 250.0, "{step}");
        } else {
            assert!(step["refused"].as_u64().is_some_and(|n| n > 0), "{step}");
        }
    }
    assert!(!err.contains("WARN"), "{err}");
    assert!(workers_for(&url).is_empty(), "workers left running");
}

/// A worker killed during `--find-limit` ends the search as the client's
/// failure (exit 1, a partial report), not as the server's limit, and the
/// other workers end with it.
#[test]
fn find_limit_says_when_a_worker_dies() {
    let server = Server::start("worker-dies", CONFIG);
    let url = server.url("/events/dies");
    let args = [
        "--url",
        url.as_str(),
        "--find-limit",
        "--connections",
        "300",
        "--step-time",
        "3s",
        "--events",
        "30",
        "--ramp",
        "0",
        "--json",
    ];
    let mut child = spawn_loadtest(&args, Some(200));
    let (out, err) = (read_all(child.stdout.take()), read_all(child.stderr.take()));
    let started = Instant::now();
    let workers = wait_for_workers(&url, 2);
    assert_eq!(workers.len(), 2, "{workers:?}");
    // Mid-step: its 150 streams held, publishing.
    thread::sleep(Duration::from_millis(800));
    let killed = Command::new("kill")
        .args(["-9", &workers[0].to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = wait_within(&mut child, started + Duration::from_secs(30));
    let (out, err) = (out.join().expect("stdout"), err.join().expect("stderr"));
    assert_eq!(status.code(), Some(1), "{status}: {err}");
    let r = json(&out);
    let stopped_by = r["stopped_by"].as_str().unwrap_or("");
    assert!(
        stopped_by.contains("a worker process failed at 300 streams")
            && stopped_by.contains(&format!("pid {}", workers[0]))
            && stopped_by.contains("not the server's limit"),
        "{r}"
    );
    assert_eq!(r["limit"], 0, "{r}");
    assert!(workers_for(&url).is_empty(), "workers left running");
}

/// The worker's side of the protocol, spoken by hand: `open` (never past
/// its share), `close`, `step` (the latency since the last one) and
/// `lease` (a new bound, which ends it with its final report).
#[test]
fn a_worker_opens_closes_measures_and_ends_on_its_lease() {
    use std::io::{BufRead, BufReader};
    let server = Server::start("worker-protocol", CONFIG);
    let url = server.url("/events/protocol");
    let mut worker = Command::new(BIN)
        .args(["loadtest", "--worker", "--url", &url])
        .args(["--connections", "5", "--duration", "30s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("a worker starts");
    let mut stdin = worker.stdin.take().expect("stdin");
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let stdout = worker.stdout.take().expect("stdout");
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(json(&line)).is_err() {
                break;
            }
        }
    });
    // The first message matching `want`, within the deadline.
    let next = |want: &dyn Fn(&Value) -> bool| -> Value {
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let m = rx.recv_timeout(left).expect("the worker answers in time");
            if want(&m) {
                return m;
            }
        }
    };
    let held = |n: u64| move |m: &Value| m["status"]["counts"]["held"] == n;
    stdin.write_all(b"open 3\n").expect("open");
    next(&held(3));
    stdin.write_all(b"close 2\n").expect("close");
    next(&held(1));
    // Ten more asked, room for four: held at its share of five.
    stdin.write_all(b"open 13\n").expect("open");
    let m = next(&held(5));
    assert_eq!(m["status"]["counts"]["attempted"], 7, "{m}");
    // One event, published with this tool's send time, measured by `step`.
    let sent = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let mut publish = TcpStream::connect(server.addr).expect("connect to publish");
    let body = format!("{{\"t\":{sent},\"seq\":0}}");
    write!(
        publish,
        "POST /publish/protocol HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.addr,
        body.len()
    )
    .expect("publish");
    let mut answer = String::new();
    let _ = publish.read_to_string(&mut answer); // checked below
    assert!(answer.starts_with("HTTP/1.1 2"), "{answer}");
    next(&|m: &Value| m["status"]["deliveries"] == 5);
    stdin.write_all(b"step\n").expect("step");
    let step = next(&|m: &Value| m.get("step").is_some());
    assert_eq!(step["step"]["latency"]["count"], 5, "{step}");
    stdin.write_all(b"step\n").expect("step");
    let step = next(&|m: &Value| m.get("step").is_some());
    assert_eq!(step["step"]["latency"]["count"], 0, "{step}");
    // A lease of 100 ms: it ends, its final report holding every delivery.
    let leased = Instant::now();
    stdin.write_all(b"lease 100\n").expect("lease");
    let last = next(&|m: &Value| m.get("final").is_some());
    assert_eq!(last["final"]["tally"]["latency"]["count"], 5, "{last}");
    let status = loop {
        if let Some(s) = worker.try_wait().expect("wait") {
            break s;
        }
        assert!(leased.elapsed() < DEADLINE, "the worker outlived its lease");
        thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    assert!(
        leased.elapsed() < Duration::from_secs(2),
        "{:?}",
        leased.elapsed()
    );
}
