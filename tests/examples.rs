//! Runs each example briefly, so the examples keep working and not only
//! compiling.
//!
//! Each test starts an example binary with `SSED_LISTEN=127.0.0.1:0`, reads
//! the one line it prints (`listening on http://ADDR`), speaks raw HTTP to
//! it and checks the first frames, then kills it. The binaries are built
//! first with `cargo build --examples` and this test's own features, so a
//! filtered run (`cargo test --test examples`, which builds no examples)
//! still runs fresh ones; a binary missing after that fails the test.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use support::{Client, field};

/// How long an example may take to print its address.
const STARTUP: Duration = Duration::from_secs(20);

/// The features this test binary was built with, to build the examples
/// with exactly the same (so the library is not rebuilt for them).
fn features() -> Vec<&'static str> {
    let mut on = Vec::new();
    if cfg!(feature = "daemon") {
        on.push("daemon");
    }
    if cfg!(feature = "tiny-http") {
        on.push("tiny-http");
    }
    on
}

/// The profile directory this test runs from (`target/debug`):
/// the test binary is `target/debug/deps/examples-HASH`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test binary");
    let deps = exe.parent().expect("the test binary is in a directory");
    deps.parent()
        .expect("the deps directory is in a profile directory")
        .to_path_buf()
}

/// Builds every example (once per test binary) with cargo, in the target
/// and profile directory this test runs from.
fn build_examples() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let profile_dir = profile_dir();
        let target_dir = profile_dir
            .parent()
            .expect("the profile directory is in a target directory");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--offline", "--examples", "--no-default-features"])
            .arg("--target-dir")
            .arg(target_dir);
        let features = features();
        if !features.is_empty() {
            cmd.arg("--features").arg(features.join(","));
        }
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.arg("--profile").arg(other);
            }
            None => return Err(format!("odd profile directory {}", profile_dir.display())),
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{cmd:?} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = built {
        panic!("building the examples: {e}");
    }
}

/// The path of an example binary, built and present.
fn example_binary(name: &str) -> PathBuf {
    build_examples();
    let path = profile_dir().join("examples").join(name);
    assert!(
        Path::new(&path).is_file(),
        "example binary {} missing after `cargo build --examples`",
        path.display()
    );
    path
}

/// A running example; killed when dropped, however the test ends.
struct Example {
    child: Child,
    lines: Receiver<String>,
    addr: SocketAddr,
}

impl Example {
    /// Starts example `name` on a free port with extra environment `env`,
    /// and waits for its address.
    fn start(name: &str, env: &[(&str, &str)]) -> Example {
        let mut child = Command::new(example_binary(name))
            .env("SSED_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start example {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        // A thread, so the wait for the first line can time out; it ends at
        // the child's EOF.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut example = Example {
            child,
            lines,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let first = match example.lines.recv_timeout(STARTUP) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("example {name} printed nothing in {STARTUP:?}")
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = example.child.wait();
                panic!("example {name} exited before printing its address: {status:?}")
            }
        };
        let addr = first
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("example {name}: unexpected first line {first:?}"));
        example.addr = addr;
        example
    }

    fn client(&self) -> Client {
        Client::new(self.addr)
    }

    /// Kills the example and checks it printed nothing after its address.
    fn stop(mut self) {
        self.kill();
        // The reader thread ends at the child's EOF, closing the channel.
        match self.lines.recv_timeout(Duration::from_secs(5)) {
            Ok(line) => panic!("example printed a second line: {line:?}"),
            Err(RecvTimeoutError::Disconnected) => {}
            Err(RecvTimeoutError::Timeout) => panic!("example's stdout did not close"),
        }
    }

    fn kill(&mut self) {
        // Already exited is fine: either way it is gone once `wait` returns.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Checks that `/` serves a page that subscribes with an `EventSource`.
fn serves_page(example: &Example) {
    let mut c = example.client();
    c.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    let (head, body) = c.response();
    assert_eq!(head.status, 200);
    assert!(
        head.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{head:?}"
    );
    assert!(body.contains("new EventSource(\"/events\")"), "{body}");
}

#[test]
fn messages_sends_demo_messages() {
    let example = Example::start("messages", &[]);
    let mut c = example.client();
    let head = c.get_stream("/events", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    let frame = c.next_frame().expect("a first message");
    assert_eq!(field(&frame, "event"), ["demo"]);
    assert_eq!(field(&frame, "data"), ["\"Message n°1\""]);
    serves_page(&example);
    example.stop();
}

#[test]
fn heartbeat_polls_the_load_at_once() {
    let example = Example::start("heartbeat", &[]);
    let mut c = example.client();
    assert_eq!(c.get_stream("/events", &[]).status, 200);
    // `poll` calls its function before it first sleeps: no five-second wait.
    let frame = c.next_frame().expect("a first sample");
    assert_eq!(field(&frame, "event"), ["load"]);
    let data = field(&frame, "data");
    let sample: serde_json::Value = serde_json::from_str(data[0]).expect("JSON data");
    for key in ["load1", "load5", "load15"] {
        assert!(sample[key].is_f64(), "{key} in {sample}");
    }
    serves_page(&example);
    example.stop();
}

#[test]
fn clock_ticks_ten_times_then_ends() {
    let example = Example::start("clock", &[("CLOCK_INTERVAL_MS", "20")]);
    let mut c = example.client();
    assert_eq!(c.get_stream("/events", &[]).status, 200);
    let frames = c.until_end(20);
    assert!(c.ended);
    assert_eq!(frames.len(), 12, "{frames:#?}");
    assert_eq!(field(&frames[0], "retry"), ["10000"]);
    for (i, frame) in frames[1..11].iter().enumerate() {
        assert_eq!(field(frame, "event"), ["time"], "{frame}");
        let tick: serde_json::Value = serde_json::from_str(field(frame, "data")[0]).expect("JSON");
        assert_eq!(tick["tick"], i + 1, "{tick}");
        assert!(tick["unix"].is_u64() && tick["utc"].is_string(), "{tick}");
    }
    assert_eq!(field(&frames[11], "event"), Vec::<&str>::new());
    assert_eq!(field(&frames[11], "data"), ["[DONE]"]);
    serves_page(&example);
    example.stop();
}

#[test]
fn clock_rejects_a_bad_interval() {
    let status = Command::new(example_binary("clock"))
        .env("SSED_LISTEN", "127.0.0.1:0")
        .env("CLOCK_INTERVAL_MS", "soon")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the clock example");
    assert!(!status.success());
}

#[test]
fn ticks_resume_after_last_event_id() {
    let example = Example::start("ticks", &[]);

    let mut c = example.client();
    assert_eq!(c.get_stream("/events", &["Last-Event-ID: 41"]).status, 200);
    assert_eq!(field(&c.next_frame().expect("retry"), "retry"), ["2000"]);
    let tick = c.next_frame().expect("a tick");
    assert_eq!(field(&tick, "id"), ["42"]);
    assert_eq!(field(&tick, "event"), ["tick"]);
    assert_eq!(field(&tick, "data"), ["tick 42"]);

    // A first connection starts at 1; `lastEventId` stands in for the
    // header; an id the handler did not hand out restarts the count.
    for (path, header, first) in [
        ("/events", None, "1"),
        ("/events?lastEventId=9", None, "10"),
        ("/events", Some("Last-Event-ID: x"), "1"),
    ] {
        let mut c = example.client();
        let extra: Vec<&str> = header.into_iter().collect();
        assert_eq!(c.get_stream(path, &extra).status, 200);
        let tick = c.frame_matching(3, |f| !field(f, "id").is_empty());
        assert_eq!(field(&tick, "id"), [first], "{path} {header:?}");
    }
    serves_page(&example);
    example.stop();
}

#[cfg(feature = "tiny-http")]
#[test]
fn tiny_http_app_streams_through_the_adapter() {
    let example = Example::start("tiny_http_app", &[]);

    let mut c = example.client();
    let head = c.get_stream("/events", &["Last-Event-ID: 41"]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert!(head.is_chunked());
    assert_eq!(field(&c.next_frame().expect("retry"), "retry"), ["2000"]);
    let tick = c.next_frame().expect("a tick");
    assert_eq!(field(&tick, "id"), ["42"]);
    assert_eq!(field(&tick, "event"), ["tick"]);

    let (head, body) = support::request(
        example.addr,
        "GET /events HTTP/1.1\r\nHost: test\r\nAccept: application/json\r\n\r\n",
    );
    assert_eq!(head.status, 406);
    assert!(body.contains("text/event-stream"), "{body}");

    let (head, _) = support::request(example.addr, "GET /nope HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(head.status, 404);
    serves_page(&example);
    example.stop();
}
