//! The demo page in a real browser: starts the `ssed` binary, and has
//! `tests/browser/demo.mjs` (Node + playwright-core + headless Chromium)
//! open `GET /`, publish a message through the form and wait for it to be
//! listed with its event id.
//!
//! Prerequisites: `node`, Chromium at `/usr/bin/chromium` (or `$CHROMIUM`)
//! and `tests/browser/node_modules/playwright-core`; `bash
//! tests/browser/setup.sh` installs what is missing. Without them the test
//! says why and passes, except with `CI=true`, where it fails: CI must not
//! skip it silently.
//!
//! The screenshot of the last run is `target/tmp/browser-demo.png`.
//!
//! Also the status page (`tests/browser/status.mjs`): its charts follow
//! the server's figures while streams open, events flow and streams close.
//!
//! Also the `ssed loadtest --find-limit --report` page: `tests/browser/
//! report.mjs` opens it from its file:// URL and says what the browser
//! drew; every series must have one point per step (per step with a value,
//! for the latency), and the page must ask for nothing from elsewhere. A
//! plain run's page the same way, a point per second.
#![cfg(feature = "daemon")]

mod support;

use std::io::{BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};
use serde_json::Value;
use support::TempDir;
use support::process::{Ssed, spawn_config};

/// How long the Node script may run; it gives up by itself after ~20 s.
const BROWSER: Duration = Duration::from_secs(45);

#[test]
fn demo_page_publishes_and_lists_the_event() {
    let Some(chromium) = prerequisites() else {
        return;
    };
    let daemon = Daemon::start();
    let url = format!("http://{}/", daemon.addr);
    demo(&chromium, &daemon, &url, "browser-demo.png", "");
}

/// The same over HTTPS: the page, its `EventSource` and its publish, with
/// ssed terminating TLS; Chromium trusts the test's certificate alone (by
/// its key's hash).
#[test]
fn demo_page_works_over_https() {
    let Some(chromium) = prerequisites() else {
        return;
    };
    let pki = support::tls::Pki::new("browser-tls");
    let (cert, key) = pki.issue("localhost");
    let dir = TempDir::new("browser-tls-config");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\n[tls]\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let (proc, addr) = spawn_config(&dir, &toml);
    let daemon = Daemon { proc, addr };
    let url = format!("https://localhost:{}/", addr.port());
    let spki = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | base64",
            cert.display()
        ))
        .output()
        .expect("openssl");
    let spki = String::from_utf8(spki.stdout).expect("base64");
    let args = format!("--ignore-certificate-errors-spki-list={}", spki.trim());
    demo(&chromium, &daemon, &url, "browser-demo-https.png", &args);
}

/// Browser `EventSource`s on the Mercure endpoint (`tests/browser/
/// mercure.mjs`): by URI template, URL pattern, exact topic and `*`, each
/// receiving what matches (a custom id, an event type and two lines of
/// data intact), not the rest, and no private update (they are
/// anonymous); one opened with a JWT cookie granting the template gets
/// the private update too.
#[test]
fn mercure_event_sources_receive_what_their_selectors_match() {
    let Some(chromium) = prerequisites() else {
        return;
    };
    let dir = TempDir::new("browser-mercure-config");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\n[auth]\nanonymous = true\njwt_secret = \"{MERCURE_SECRET}\"\n"
    );
    let (proc, addr) = spawn_config(&dir, &toml);
    let daemon = Daemon { proc, addr };
    let url = format!("http://{addr}/");
    script(
        &chromium,
        &daemon,
        "mercure.mjs",
        &url,
        "browser-mercure.png",
        "",
    );
}

/// The status page (`tests/browser/status.mjs`) on a phone's screen while
/// streams open, events are published and the streams close: every chart
/// draws the figures of the status event the page last got (as a stream
/// of the script's own got them), where its scale says; the charts move
/// with the load; the figures agree with `/metrics` and with the server's
/// `/proc` (threads, RSS); nothing is asked of elsewhere, and the page
/// fits the screen. Its screenshot at a desktop size,
/// `target/tmp/browser-status.png`, is the README's `docs/status.png`
/// (made smaller with `pngquant 64` and `optipng -o5`).
#[test]
fn status_page_charts_follow_the_servers_figures() {
    let Some(chromium) = prerequisites() else {
        return;
    };
    let dir = TempDir::new("browser-status");
    // A small cap, so the streams come near it and it is drawn.
    let (proc, addr) = spawn_config(&dir, "listen = \"127.0.0.1:0\"\nmax_connections = 40\n");
    let daemon = Daemon { proc, addr };
    let url = format!("http://{addr}/status");
    script(
        &chromium,
        &daemon,
        "status.mjs",
        &url,
        "browser-status.png",
        "",
    );
}

/// The browser test's JWT key (`tests/browser/mercure.mjs` signs with it).
const MERCURE_SECRET: &str = "browser-test-mercure-secret";

/// Runs `tests/browser/demo.mjs` on `url` and asserts it passed.
fn demo(chromium: &Path, daemon: &Daemon, url: &str, shot: &str, chromium_args: &str) {
    script(chromium, daemon, "demo.mjs", url, shot, chromium_args);
}

/// Runs `tests/browser/{name}` on `url` (it saves a screenshot as
/// `shot`) and asserts it passed.
fn script(
    chromium: &Path,
    daemon: &Daemon,
    name: &str,
    url: &str,
    shot: &str,
    chromium_args: &str,
) {
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join(shot);
    let _ = std::fs::remove_file(&screenshot);

    let mut node = Command::new("node");
    node.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg(format!("tests/browser/{name}"))
        .arg(url)
        .arg(&screenshot)
        .env("CHROMIUM", chromium)
        .env("MERCURE_JWT_SECRET", MERCURE_SECRET)
        .env("CHROMIUM_EXTRA_ARGS", chromium_args)
        .env("SSED_PID", daemon.proc.pid().to_string())
        .stdin(Stdio::null());
    let out = run_with_timeout(node, BROWSER);
    eprintln!("--- {name} output ---\n{}", out.text);
    eprintln!("screenshot: {}", screenshot.display());
    assert!(
        !out.timed_out,
        "{name} did not finish within {BROWSER:?}; stopped it\nssed log:\n{}",
        daemon.log()
    );
    match out.code {
        Some(0) => {}
        Some(code) => panic!(
            "{name} failed (exit {code}); see its output above\nssed log:\n{}",
            daemon.log()
        ),
        None => panic!("{name} was killed by a signal\nssed log:\n{}", daemon.log()),
    }
    assert!(
        screenshot.is_file(),
        "no screenshot at {}",
        screenshot.display()
    );
}

#[test]
fn loadtest_report_draws_a_point_per_step() {
    let Some(chromium) = prerequisites() else {
        return;
    };
    let dir = TempDir::new("browser-report");
    let (ssed, addr) = spawn_config(
        &dir,
        "listen = \"127.0.0.1:0\"\nmax_connections = 300\nheartbeat = \"0\"\n",
    );
    let url = format!("http://{addr}/events/t");
    let page = dir.path().join("r.html");
    let json_path = dir.path().join("out.json");
    let mut loadtest = reporting_loadtest(ssed.pid(), &page);
    loadtest
        .args(["--url", &url, "--find-limit", "--step-time", "200ms"])
        .args(["--events", "2", "--ramp", "0", "--json"])
        .stdout(std::fs::File::create(&json_path).expect("a file for stdout"));
    run_loadtest(loadtest);
    let out = std::fs::read_to_string(&json_path).expect("its output");
    let run: Value = serde_json::from_str(out.trim()).expect("JSON on stdout");
    let steps = run["steps"].as_array().expect("steps");

    let seen = browse_report(&chromium, &page, "browser-report.png");
    assert_eq!(seen["rows"].as_u64(), Some(steps.len() as u64), "{seen}");
    let charts = seen["charts"].as_array().expect("charts");
    assert_eq!(charts.len(), 4, "streams, latency, RSS, threads: {seen}");
    let with_value = |key: &str| steps.iter().filter(|s| !s[key].is_null()).count() as u64;
    let want = [
        ("asked", steps.len() as u64),
        ("held", steps.len() as u64),
        ("p50", with_value("p50_ms")),
        ("p99", with_value("p99_ms")),
        ("RSS", with_value("server_rss_kib")),
        ("threads", with_value("server_threads")),
    ];
    let lines = seen["polylines"].as_array().expect("polylines");
    assert_eq!(lines.len(), want.len(), "{seen}");
    for (series, points) in want {
        let line = lines
            .iter()
            .find(|l| l["series"] == series)
            .unwrap_or_else(|| panic!("no {series} polyline: {seen}"));
        assert_eq!(line["points"].as_u64(), Some(points), "{series}: {seen}");
    }
    // The streams, RSS and threads have a value at every step.
    assert_eq!(with_value("server_rss_kib"), steps.len() as u64, "{run}");
    assert!(steps.len() >= 3, "{run}");
}

/// A plain run's `--report` (no `--find-limit`): its streams, deliveries,
/// and the server's RSS and threads over time, a point per second.
#[test]
fn loadtest_plain_report_draws_a_point_per_second() {
    let Some(chromium) = prerequisites() else {
        return;
    };
    let dir = TempDir::new("browser-plain-report");
    let (ssed, addr) = spawn_config(&dir, "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\n");
    let page = dir.path().join("plain.html");
    let mut loadtest = reporting_loadtest(ssed.pid(), &page);
    loadtest
        .args(["--url", &format!("http://{addr}/events/p"), "-n", "30"])
        .args(["--ramp", "20/s", "--duration", "1s", "--events", "3"])
        .args(["--publish-url", &format!("http://{addr}/publish/p")])
        .stdout(Stdio::null());
    run_loadtest(loadtest);
    let seen = browse_report(&chromium, &page, "browser-plain-report.png");
    let rows = seen["rows"].as_u64().expect("rows");
    assert!(
        rows >= 3,
        "a sample at the start, each second, the end: {seen}"
    );
    let charts: Vec<&str> = seen["charts"]
        .as_array()
        .expect("charts")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(
        charts,
        [
            "chart-streams",
            "chart-deliveries",
            "chart-rss",
            "chart-threads"
        ],
        "{seen}"
    );
    let lines = seen["polylines"].as_array().expect("polylines");
    for series in ["asked", "held", "refused", "deliveries", "RSS", "threads"] {
        let line = lines
            .iter()
            .find(|l| l["series"] == series)
            .unwrap_or_else(|| panic!("no {series} polyline: {seen}"));
        assert_eq!(line["points"].as_u64(), Some(rows), "{series}: {seen}");
    }
}

/// `ssed loadtest --pid PID --report PAGE`, without tokens, stdin or
/// stderr; the caller adds the rest.
fn reporting_loadtest(pid: u32, page: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ssed"));
    cmd.arg("loadtest")
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--report")
        .arg(page)
        .env_remove("SSED_PUBLISH_TOKEN")
        .env_remove("SSED_SUBSCRIBE_TOKEN")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Runs `cmd` to success within 60 s (killed by its guard past that).
fn run_loadtest(mut cmd: Command) {
    let mut child = Guard(cmd.spawn().expect("ssed loadtest starts"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        match child.0.try_wait().expect("wait") {
            Some(status) => break status,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            None => panic!("ssed loadtest did not finish within 60 s"),
        }
    };
    assert!(status.success(), "ssed loadtest: {status}");
}

/// Opens a `--report` page with `tests/browser/report.mjs`, checks what
/// every report must be (nothing asked of elsewhere, no error, charts drawn
/// at a size, readable on a phone) and returns what the browser saw.
fn browse_report(chromium: &Path, page: &Path, screenshot: &str) -> Value {
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join(screenshot);
    let mut node = Command::new("node");
    node.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("tests/browser/report.mjs")
        .arg(page)
        .arg(&screenshot)
        .env("CHROMIUM", chromium)
        .stdin(Stdio::null());
    let out = run_with_timeout(node, BROWSER);
    eprintln!("--- report.mjs output ---\n{}", out.text);
    assert!(
        !out.timed_out,
        "report.mjs did not finish within {BROWSER:?}"
    );
    assert_eq!(out.code, Some(0), "report.mjs failed; see its output above");
    let seen: Value = out
        .text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|j| serde_json::from_str(j).ok())
        .expect("a RESULT line");
    assert_eq!(seen["requests"], Value::Array(Vec::new()), "{seen}");
    assert_eq!(seen["pageErrors"], Value::Array(Vec::new()), "{seen}");
    for chart in seen["charts"].as_array().expect("charts") {
        assert!(
            chart["width"].as_f64().is_some_and(|w| w > 100.0),
            "{chart}"
        );
        assert!(
            chart["height"].as_f64().is_some_and(|h| h > 50.0),
            "{chart}"
        );
    }
    // Readable on a phone: nothing wider than its 390 px viewport.
    assert!(
        seen["scrollWidth"].as_u64().is_some_and(|w| w <= 390),
        "{seen}"
    );
    seen
}

/// The browser to use when every prerequisite is there; otherwise `None`
/// after saying why, or a panic under `CI=true`.
fn prerequisites() -> Option<PathBuf> {
    let chromium = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    let playwright = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser/node_modules/playwright-core/package.json");
    let node = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let setup = "run `bash tests/browser/setup.sh`";
    let missing = if !node.is_ok_and(|s| s.success()) {
        Some(
            "`node` is not on PATH or does not run; install Node.js 20 or later, then ".to_owned()
                + setup,
        )
    } else if !chromium.is_file() {
        Some(format!("no browser at {}; {setup}", chromium.display()))
    } else if !playwright.is_file() {
        Some(format!(
            "playwright-core is not installed in tests/browser/node_modules; {setup}"
        ))
    } else {
        None
    };
    let Some(missing) = missing else {
        return Some(chromium);
    };
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        !ci,
        "browser test prerequisite missing under CI=true: {missing}"
    );
    eprintln!("skipping: {missing}");
    None
}

/// The `ssed` binary on an ephemeral port; killed when dropped.
struct Daemon {
    proc: Ssed,
    addr: SocketAddr,
}

impl Daemon {
    fn start() -> Daemon {
        let proc = Ssed::spawn(&["--listen", "127.0.0.1:0"], &[]);
        let addr = proc.listening();
        Daemon { proc, addr }
    }

    fn log(&self) -> String {
        self.proc.stderr()
    }
}

/// A child process that is stopped when dropped: SIGTERM first, so that
/// Playwright in Node closes the browser it launched and removes its
/// temporary profile (Chromium runs in a process group of its own), then
/// SIGKILL after 5 s.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            if let Some(pid) = Pid::from_raw(self.0.id().cast_signed()) {
                let _ = kill_process(pid, Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

struct Output {
    /// The exit code; `None` when killed by a signal.
    code: Option<i32>,
    /// Whether it ran past the limit (and was stopped).
    timed_out: bool,
    /// stdout and stderr, interleaved as written.
    text: String,
}

/// Runs `cmd` with stdout and stderr captured (one pipe, so their lines
/// stay in order), stopping it after `limit`.
fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let (reader, writer) = std::io::pipe().expect("a pipe");
    cmd.stdout(writer.try_clone().expect("a pipe"))
        .stderr(writer);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    drop(cmd); // its ends of the pipe, so the reader sees EOF when the child exits
    let mut guard = Guard(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = BufReader::new(reader).read_to_end(&mut bytes);
        let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    let deadline = Instant::now() + limit;
    let (code, timed_out) = loop {
        match guard.0.try_wait() {
            Ok(Some(status)) => break (status.code(), false),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => break (None, true),
            Err(e) => panic!("waiting for {shown}: {e}"),
        }
    };
    drop(guard); // stops it if still running
    // Bounded: a leftover grandchild could hold the pipe open.
    let text = rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| "(output not available: the pipe stayed open)".to_owned());
    Output {
        code,
        timed_out,
        text,
    }
}
