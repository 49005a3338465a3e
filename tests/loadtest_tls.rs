#![cfg(feature = "daemon")]
//! `ssed loadtest` against `https://`: the binary against a real `ssed`
//! serving a throwaway certificate (`support/tls.rs`), streams and the
//! publisher over TLS, verified against `--cacert` or not at all
//! (`--insecure`), and a wrong CA reported as TLS failures, not as the
//! server's limit.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::thread;
use std::time::Duration;

use serde_json::Value;
use support::TempDir;
use support::process::{Ssed, spawn_config};
use support::tls::Pki;

/// An HTTPS `ssed` with a leaf for `localhost` and `127.0.0.1` from `pki`.
fn server(pki: &Pki, dir: &TempDir) -> (Ssed, SocketAddr) {
    let (cert, key) = pki.issue("localhost");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\nmax_execution_time = \"0\"\nhistory = 100\n\
         [tls]\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    spawn_config(dir, &toml)
}

/// Runs `ssed loadtest args…` with its descriptor limit at `nofile` (if
/// given), killed past `deadline`: exit status, stdout, stderr.
fn loadtest(
    args: &[&str],
    nofile: Option<u64>,
    deadline: Duration,
) -> (ExitStatus, String, String) {
    support::loadtest::loadtest_limited(args, nofile, deadline)
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The arguments of a run of `n` streams on `addr` over https, 5 events
/// published over https, with `trust` (`--cacert FILE` or `--insecure`).
fn run_args(addr: SocketAddr, n: u64, trust: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--url",
        &format!("https://{addr}/events/x"),
        "--connections",
        &n.to_string(),
        "--ramp",
        "0",
        "--publish-url",
        &format!("https://{addr}/publish/x"),
        "--events",
        "5",
        "--rate",
        "50",
        "--duration",
        "3s",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(trust.iter().map(|s| s.to_string()));
    args
}

/// Asserts a run held all `n` streams and every delivery of its 5 events.
fn assert_all_delivered(r: &Value, n: u64) {
    assert_eq!(r["held"], n, "{r}");
    assert_eq!(r["refused"], 0, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["dropped"], 0, "{r}");
    assert_eq!(r["published"], 5, "{r}");
    assert_eq!(r["expected_deliveries"], 5 * n, "{r}");
    assert_eq!(r["deliveries"], 5 * n, "{r}");
    let p99 = r["latency_ms"]["p99"].as_f64().unwrap_or(-1.0);
    assert!((0.0..1000.0).contains(&p99), "{r}");
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn fifty_https_streams_verified_by_cacert_receive_every_event() {
    let pki = Pki::new("lt-tls-cacert");
    let dir = TempDir::new("lt-tls-cacert-config");
    let (_ssed, addr) = server(&pki, &dir);
    let ca = pki.ca().display().to_string();
    let args = run_args(addr, 50, &["--cacert", &ca]);
    let (status, out, err) = loadtest(&strs(&args), None, Duration::from_secs(20));
    assert!(status.success(), "{status}: {err}");
    assert_all_delivered(&json(&out), 50);
    assert!(!err.contains("WARN"), "{err}");
}

#[test]
fn insecure_accepts_the_certificate_unverified() {
    let pki = Pki::new("lt-tls-insecure");
    let dir = TempDir::new("lt-tls-insecure-config");
    let (_ssed, addr) = server(&pki, &dir);
    let args = run_args(addr, 50, &["--insecure"]);
    let (status, out, err) = loadtest(&strs(&args), None, Duration::from_secs(20));
    assert!(status.success(), "{status}: {err}");
    assert_all_delivered(&json(&out), 50);
}

#[test]
fn https_without_cacert_or_insecure_is_refused_at_start() {
    // Nothing needs to listen: the command line is refused first.
    let args = run_args("127.0.0.1:9".parse().expect("an address"), 5, &[]);
    let (status, out, err) = loadtest(&strs(&args), None, Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{out}{err}");
    assert!(
        err.contains("--cacert") && err.contains("--insecure"),
        "{err}"
    );
    let missing = Path::new("/nonexistent/ssed-ca.pem").display().to_string();
    let args = run_args(
        "127.0.0.1:9".parse().expect("an address"),
        5,
        &["--cacert", &missing],
    );
    let (status, _, err) = loadtest(&strs(&args), None, Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&missing), "{err}");
}

#[test]
fn a_wrong_ca_fails_the_handshakes_and_says_so() {
    let pki = Pki::new("lt-tls-wrong-ca");
    let other = Pki::new("lt-tls-other-ca");
    let dir = TempDir::new("lt-tls-wrong-ca-config");
    let (_ssed, addr) = server(&pki, &dir);
    let ca = other.ca().display().to_string();
    let args = run_args(addr, 20, &["--cacert", &ca]);
    let (status, out, err) = loadtest(&strs(&args), None, Duration::from_secs(20));
    // The run is made and reported; every stream failed its handshake (the
    // two CAs share a name, so rustls finds the signature bad rather than
    // the issuer unknown), none counted as refused by the server.
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    assert_eq!(r["held"], 0, "{r}");
    assert_eq!(r["refused"], 0, "{r}");
    assert_eq!(r["failed"], 20, "{r}");
    let failures = r["failures"].as_object().expect("failures by reason");
    assert!(
        failures
            .keys()
            .all(|k| k.contains("TLS handshake") && k.contains("certificate")),
        "{r}"
    );
    // The publisher's failure says so too.
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn workers_past_the_descriptor_limit_speak_tls_too() {
    let pki = Pki::new("lt-tls-workers");
    let dir = TempDir::new("lt-tls-workers-config");
    let (_ssed, addr) = server(&pki, &dir);
    let ca = pki.ca().display().to_string();
    let args = run_args(addr, 150, &["--cacert", &ca]);
    let (status, out, err) = loadtest(&strs(&args), Some(100), Duration::from_secs(30));
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    assert_eq!(r["workers"], 2, "{r}");
    assert_all_delivered(&r, 150);
}

#[test]
fn find_limit_with_a_wrong_ca_stops_without_calling_it_the_limit() {
    let pki = Pki::new("lt-tls-find-wrong-ca");
    let other = Pki::new("lt-tls-find-other-ca");
    let dir = TempDir::new("lt-tls-find-wrong-ca-config");
    let (_ssed, addr) = server(&pki, &dir);
    let url = format!("https://{addr}/events/x");
    let ca = other.ca().display().to_string();
    let (status, out, err) = loadtest(
        &[
            "--url",
            &url,
            "--find-limit",
            "--connections",
            "10",
            "--step-time",
            "500ms",
            "--cacert",
            &ca,
            "--json",
        ],
        None,
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(1), "{status}: {err}");
    assert!(
        err.contains("TLS handshakes failed at 10 streams")
            && err.contains("not the server's limit"),
        "{err}"
    );
    let r = json(&out);
    assert_eq!(r["limit"], 0, "{r}");
}

/// A server that takes the connection and never answers the hello: the
/// handshake runs into the connect deadline (10 s) and is named.
#[test]
fn a_handshake_never_answered_times_out_as_such() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
    let addr = listener.local_addr().expect("its address");
    let silent = thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().take(3) {
            held.push(c); // kept open, unanswered, until the test ends
        }
        thread::sleep(Duration::from_secs(15));
    });
    let url = format!("https://{addr}/events/x");
    let (status, out, err) = loadtest(
        &[
            "--url",
            &url,
            "-n",
            "3",
            "--insecure",
            "--duration",
            "1s",
            "--json",
        ],
        None,
        Duration::from_secs(25),
    );
    assert!(status.success(), "{status}: {err}");
    let r = json(&out);
    assert_eq!(r["held"], 0, "{r}");
    assert_eq!(r["failed"], 3, "{r}");
    assert_eq!(r["failures"]["TLS handshake timed out"], 3, "{r}");
    drop(silent); // detached: it ends by itself
}
