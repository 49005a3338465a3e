//! The real `ssed` binary as a child process that cannot outlive its test:
//! killed by PID when its guard drops, its output read by threads, every
//! wait bounded. Used by the test binaries that run the daemon itself.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rustix::process::{Pid, Signal, kill_process};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ssed");
/// How long [`Ssed::listening`] waits for the address.
const STARTUP: Duration = Duration::from_secs(5);

/// A running `ssed`; dropping it kills the process (by its PID) and reaps it.
pub struct Ssed {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    stderr_lines: Receiver<String>,
    readers: Vec<JoinHandle<()>>,
}

impl Drop for Ssed {
    fn drop(&mut self) {
        let _ = self.child.kill(); // may have exited already
        let _ = self.child.wait(); // reap it either way
    }
}

/// Copies a pipe into `all`, line by line, also sending each line to `lines`.
fn drain(
    pipe: impl Read + Send + 'static,
    all: Arc<Mutex<String>>,
    lines: Option<crossbeam_channel::Sender<String>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if let Ok(mut all) = all.lock() {
                all.push_str(&line);
                all.push('\n');
            }
            if let Some(tx) = &lines {
                let _ = tx.send(line); // the test may have stopped listening
            }
        }
    })
}

impl Ssed {
    /// Starts `ssed args…` with a clean environment for its own variables.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Ssed {
        Ssed::spawn_via(&[], args, env)
    }

    /// Starts `wrapper… BIN args…`: a command that prepares the process
    /// (a shell that moves itself into a cgroup) and then `exec`s the rest
    /// of its arguments, so the PID is ssed's own. An empty `wrapper` runs
    /// ssed directly.
    pub fn spawn_via(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Ssed {
        let mut cmd = match wrapper {
            [] => Command::new(BIN),
            [program, rest @ ..] => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(BIN);
                cmd
            }
        };
        cmd.args(args)
            .env_remove("SSED_PUBLISH_TOKEN")
            .env_remove("SSED_SUBSCRIBE_TOKEN")
            .env_remove("SSED_ADMIN_TOKEN")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("ssed starts");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, stderr_lines) = crossbeam_channel::unbounded();
        let readers = vec![
            drain(
                child.stdout.take().expect("piped"),
                Arc::clone(&stdout),
                None,
            ),
            drain(
                child.stderr.take().expect("piped"),
                Arc::clone(&stderr),
                Some(tx),
            ),
        ];
        Ssed {
            child,
            stdout,
            stderr,
            stderr_lines,
            readers,
        }
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The pipes close with the process: collect what is left.
                for r in self.readers.drain(..) {
                    let _ = r.join(); // a reader only ends at EOF
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().expect("reader alive").clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("reader alive").clone()
    }

    /// The address from the `listening on ADDR (...)` log line.
    pub fn listening(&self) -> SocketAddr {
        let deadline = Instant::now() + STARTUP;
        while let Ok(line) = self
            .stderr_lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if let Some((_, rest)) = line.split_once("listening on ") {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return addr
                    .parse()
                    .unwrap_or_else(|_| panic!("bad address in {line:?}"));
            }
        }
        panic!("no `listening on` line; stderr: {}", self.stderr());
    }

    /// Whether the child is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Threads of the child now.
    pub fn threads(&self) -> usize {
        threads_of(self.pid())
    }

    /// Descriptors the child holds now.
    pub fn fds(&self) -> usize {
        fds_of(self.pid())
    }

    /// A `kB` field of the child's /proc/PID/status (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        status_kib_of(self.pid(), field)
    }

    /// Whether the log (stderr) has a line containing `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.stderr().lines().any(|l| l.contains(needle))
    }

    pub fn terminate(&self) {
        kill_process(Pid::from_child(&self.child), Signal::TERM).expect("send SIGTERM");
    }

    /// SIGKILL: no shutdown, no flush, no destructor runs in the daemon.
    pub fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.wait_exit(STARTUP).expect("killed process exits");
    }
}

/// `ssed --config DIR/ssed.toml` with `toml` as the file, and the address
/// it listens on.
pub fn spawn_config(dir: &super::TempDir, toml: &str) -> (Ssed, SocketAddr) {
    let path = dir.path().join("ssed.toml");
    std::fs::write(&path, toml).expect("write config");
    let ssed = Ssed::spawn(&["--config", path.to_str().expect("utf-8 temp path")], &[]);
    let addr = ssed.listening();
    (ssed, addr)
}

/// Starts ssed on the config `toml` and asserts that it refuses it at
/// once: exit status 2, a message naming the file, `key` and `words`.
pub fn assert_config_refused(toml: &str, key: &str, words: &str) {
    let dir = super::TempDir::new("bad-config");
    let path = dir.path().join("ssed.toml");
    std::fs::write(&path, toml).expect("write config");
    let mut ssed = Ssed::spawn(&["--config", path.to_str().expect("utf-8")], &[]);
    let status = ssed
        .wait_exit(std::time::Duration::from_secs(10))
        .expect("exits at once");
    assert_eq!(status.code(), Some(2), "{toml}");
    let err = ssed.stderr();
    assert!(
        err.contains(&format!("key `{key}`")) && err.contains(words) && err.contains("ssed.toml"),
        "{toml}: {err}"
    );
}

/// Threads of process `pid`, from /proc/PID/task (0 once it is gone).
pub fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// Descriptors process `pid` holds, from /proc/PID/fd (0 once it is gone).
pub fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib_of(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix(field)?.strip_prefix(':')?;
            v.trim().strip_suffix("kB")?.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}
