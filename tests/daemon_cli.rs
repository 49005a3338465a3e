#![cfg(feature = "daemon")]
//! The real `ssed` binary: arguments, config errors (exit status 2, naming
//! the key and the file), the environment, `RUST_LOG` and the log lines'
//! shape, and SIGTERM with open streams.
//!
//! Every child is killed by PID when its guard drops, its output is read by
//! threads, and every wait is bounded.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use support::process::Ssed;
use support::{connect, request, wait_until};

/// The longest any test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// A child process that cannot outlive its test
// ---------------------------------------------------------------------------

/// Runs `ssed args…` to its exit: status, stdout, stderr.
fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let mut ssed = Ssed::spawn(args, &[]);
    let status = ssed
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("ssed {args:?} did not exit; stderr: {}", ssed.stderr()));
    (status, ssed.stdout(), ssed.stderr())
}

/// A directory of its own for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ssed-cli-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0); // best effort
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

#[test]
fn help_prints_usage_and_exits_0() {
    for flag in ["--help", "-h"] {
        let (status, stdout, _) = run(&[flag]);
        assert_eq!(status.code(), Some(0), "{flag}");
        for want in [
            "USAGE",
            "--config",
            "--listen",
            "--version",
            "SSED_PUBLISH_TOKEN",
        ] {
            assert!(stdout.contains(want), "{flag}: no {want} in {stdout}");
        }
    }
}

#[test]
fn version_prints_name_and_version() {
    let (status, stdout, _) = run(&["--version"]);
    assert_eq!(status.code(), Some(0));
    assert_eq!(stdout.trim(), format!("ssed {}", env!("CARGO_PKG_VERSION")));
    assert_eq!(stdout.trim(), "ssed 0.1.0");
}

#[test]
fn an_unknown_flag_exits_2_with_a_message() {
    let (status, stdout, stderr) = run(&["--bogus", "--listen", "127.0.0.1:0"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--bogus"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let (status, _, stderr) = run(&["--listen"]);
    assert_eq!(status.code(), Some(2), "a flag without its value: {stderr}");
    let (status, _, stderr) = run(&["--listen", "nowhere"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--listen"), "{stderr}");
}

// ---------------------------------------------------------------------------
// Config errors: exit 2, naming the key and the file
// ---------------------------------------------------------------------------

fn bad_config(name: &str, text: &str) -> (String, String) {
    let dir = TempDir::new(name);
    let path = dir.file("ssed.toml", text);
    let (status, _, stderr) = run(&["--config", path_str(&path), "--listen", "127.0.0.1:0"]);
    assert_eq!(status.code(), Some(2), "{text:?}: {stderr}");
    (stderr, path_str(&path).to_owned())
}

#[test]
fn a_bad_duration_names_the_key_and_the_file() {
    let (stderr, path) = bad_config("duration", "heartbeat = \"fast\"\n");
    assert!(stderr.contains("heartbeat"), "{stderr}");
    assert!(stderr.contains(&path), "{stderr}");
    assert!(stderr.contains("fast"), "{stderr}");
}

#[test]
fn an_unknown_key_is_named() {
    let (stderr, path) = bad_config("unknown", "heartbeet = \"1s\"\n");
    assert!(
        stderr.contains("heartbeet") && stderr.contains("unknown"),
        "{stderr}"
    );
    assert!(stderr.contains(&path), "{stderr}");
    let (stderr, _) = bad_config("unknown-auth", "[auth]\ntoken = \"x\"\n");
    assert!(stderr.contains("auth.token"), "{stderr}");
}

#[test]
fn a_wrong_type_is_named() {
    let (stderr, path) = bad_config("type", "max_connections = \"many\"\n");
    assert!(stderr.contains("max_connections"), "{stderr}");
    assert!(stderr.contains(&path), "{stderr}");
    let (stderr, _) = bad_config("syntax", "listen = \n");
    assert!(stderr.contains("TOML"), "{stderr}");
}

#[test]
fn a_missing_config_file_exits_2() {
    let dir = TempDir::new("missing");
    let path = dir.0.join("does-not-exist.toml");
    let (status, _, stderr) = run(&["--config", path_str(&path), "--listen", "127.0.0.1:0"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(path_str(&path)), "{stderr}");
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

#[test]
fn an_address_in_use_fails_with_a_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (status, _, stderr) = run(&["--listen", &addr]);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
}

#[test]
fn the_example_config_starts_and_sigterm_stops_it() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let mut ssed = Ssed::spawn(
        &["--config", path_str(&example), "--listen", "127.0.0.1:0"],
        &[],
    );
    let addr = ssed.listening();
    let (head, body) = request(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200, "{body}");
    assert!(body.contains("\"streams_open\":0"), "{body}");
    // The example's max_body (64 KiB) is in force, and loopback may publish.
    let (head, body) = request(
        addr,
        "POST /publish/t HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert_eq!(head.status, 200, "{body}");
    ssed.terminate();
    let status = ssed.wait_exit(DEADLINE).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", ssed.stderr());
}

#[test]
fn the_publish_token_comes_from_the_environment() {
    let mut ssed = Ssed::spawn(
        &["--listen", "127.0.0.1:0"],
        &[("SSED_PUBLISH_TOKEN", "env-token")],
    );
    let addr = ssed.listening();
    let publish = |auth: &str| {
        request(
            addr,
            &format!(
                "POST /publish/t HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}Content-Length: 1\r\n\r\nx"
            ),
        )
    };
    let (head, body) = publish("");
    assert_eq!(head.status, 401, "{body}");
    assert!(head.header("www-authenticate").is_some(), "{head:?}");
    assert_eq!(publish("Authorization: Bearer wrong\r\n").0.status, 401);
    let (head, body) = publish("Authorization: Bearer env-token\r\n");
    assert_eq!(head.status, 200, "{body}");
    assert!(!ssed.stderr().contains("env-token"), "the token was logged");
    ssed.terminate();
    assert_eq!(ssed.wait_exit(DEADLINE).and_then(|s| s.code()), Some(0));
}

// ---------------------------------------------------------------------------
// The log: RUST_LOG and the lines' shape
// ---------------------------------------------------------------------------

/// A log line's level, target and message, if `line` has the shape
/// env_logger gave it, which scripts and benches read:
/// `[YYYY-MM-DDTHH:MM:SSZ LEVEL target] message`, the level padded to five.
fn log_line(line: &str) -> Option<(&str, &str, &str)> {
    let (time, rest) = line.strip_prefix('[')?.split_at_checked(20)?;
    let form = "0000-00-00T00:00:00Z";
    let time_ok = time.bytes().zip(form.bytes()).all(|(c, f)| match f {
        b'0' => c.is_ascii_digit(),
        _ => c == f,
    });
    let (level, rest) = rest.strip_prefix(' ')?.split_at_checked(5)?;
    let level = level.trim_end();
    let levels = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];
    let (target, message) = rest.strip_prefix(' ')?.split_once("] ")?;
    (time_ok && levels.contains(&level)).then_some((level, target, message))
}

#[test]
fn rust_log_warn_hides_info_lines() {
    // No `listening on` line to read the address from: pick a free port.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut ssed = Ssed::spawn(&["--listen", &addr.to_string()], &[("RUST_LOG", "warn")]);
    assert!(
        wait_until(DEADLINE, || TcpStream::connect(addr).is_ok()),
        "not listening; stderr: {}",
        ssed.stderr()
    );
    let (head, body) = request(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200, "{body}");
    ssed.terminate();
    let status = ssed.wait_exit(DEADLINE).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", ssed.stderr());
    // Started, served, stopped: all at info, none of it shown.
    let err = ssed.stderr();
    assert!(
        !err.contains("INFO") && !err.contains("listening on"),
        "{err}"
    );
}

#[test]
fn rust_log_target_debug_shows_debug_lines() {
    let mut ssed = Ssed::spawn(&["--listen", "127.0.0.1:0"], &[("RUST_LOG", "ssed=debug")]);
    let addr = ssed.listening();
    let (head, body) = request(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200, "{body}");
    // One debug line per request, from the connection's module.
    let served = |err: &str| {
        err.lines()
            .filter_map(log_line)
            .any(|(level, target, message)| {
                (level, target) == ("DEBUG", "ssed::server::conn")
                    && message.ends_with("GET /healthz -> 200")
            })
    };
    assert!(
        wait_until(DEADLINE, || served(&ssed.stderr())),
        "no debug line for the request: {}",
        ssed.stderr()
    );
    ssed.terminate();
    assert_eq!(ssed.wait_exit(DEADLINE).and_then(|s| s.code()), Some(0));
    let err = ssed.stderr();
    let lines: Vec<_> = err.lines().map(log_line).collect();
    // Every line is a whole log line, nothing interleaved or cut, and
    // info is still shown.
    assert!(lines.iter().all(Option::is_some), "{err}");
    let listening = format!("listening on {addr} (");
    assert!(
        lines.iter().flatten().any(|&(level, target, message)| {
            (level, target) == ("INFO", "ssed::server") && message.starts_with(&listening)
        }),
        "{err}"
    );
    assert!(
        lines.contains(&Some(("INFO", "ssed", "signal received: shutting down"))),
        "{err}"
    );
}

/// An event stream's raw bytes.
struct Raw {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn open(addr: SocketAddr, path: &str) -> Raw {
        let mut conn = connect(addr);
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n")
                .as_bytes(),
        )
        .expect("send request");
        Raw {
            conn,
            buf: Vec::new(),
        }
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        match self.conn.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
            Err(e) => panic!(
                "read failed: {e}; have {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    fn read_until(&mut self, needle: &[u8]) {
        for _ in 0..1000 {
            if self.buf.windows(needle.len()).any(|w| w == needle) {
                return;
            }
            assert!(
                self.fill() > 0,
                "closed before {:?}",
                String::from_utf8_lossy(needle)
            );
        }
        panic!("{:?} never arrived", String::from_utf8_lossy(needle));
    }

    fn read_to_eof(&mut self) {
        for _ in 0..1000 {
            if self.fill() == 0 {
                return;
            }
        }
        panic!("the stream never ended");
    }

    fn text(&self) -> String {
        String::from_utf8(self.buf.clone()).expect("utf-8 stream")
    }
}

#[test]
fn sigterm_ends_open_streams_cleanly_and_exits_0() {
    let mut ssed = Ssed::spawn(&["--listen", "127.0.0.1:0"], &[]);
    let addr = ssed.listening();
    let mut streams: Vec<Raw> = ["/events/a", "/events/b", "/events?topic=a&topic=c"]
        .iter()
        .map(|path| Raw::open(addr, path))
        .collect();
    for s in &mut streams {
        s.read_until(b"retry: 3000\n\n\r\n");
        assert!(s.text().starts_with("HTTP/1.1 200 OK\r\n"), "{}", s.text());
    }
    let t = Instant::now();
    ssed.terminate();
    let status = ssed
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("still running 5 s after SIGTERM; stderr: {}", ssed.stderr()));
    assert_eq!(status.code(), Some(0), "{}", ssed.stderr());
    assert!(t.elapsed() < DEADLINE);
    // The last frame is the shutdown comment, then the terminating chunk:
    // a clean end, not a cut.
    let last = ": server shutting down\n\n";
    let tail = format!("{:X}\r\n{last}\r\n0\r\n\r\n", last.len());
    for s in &mut streams {
        s.read_to_eof();
        let text = s.text();
        assert!(
            text.ends_with(&tail),
            "stream did not end cleanly: {text:?}"
        );
    }
}
