//! `ssed loadtest` run as a user runs it: the binary with arguments,
//! optionally under a lower descriptor limit, killed past a deadline.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The `ssed` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ssed");

/// `ssed loadtest args…` started, with its descriptor limit (soft and
/// hard) set to `nofile` if given.
pub fn spawn_loadtest(args: &[&str], nofile: Option<u64>) -> std::process::Child {
    // `ulimit -n` in a shell that then becomes the load tester (`exec`):
    // the PID is the load tester's.
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("bash");
            c.args(["-c", "ulimit -n \"$0\" && exec \"$@\"", &n.to_string(), BIN]);
            c
        }
        None => Command::new(BIN),
    };
    cmd.arg("loadtest")
        .args(args)
        .env_remove("SSED_PUBLISH_TOKEN")
        .env_remove("SSED_SUBSCRIBE_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssed loadtest starts")
}

/// Runs `ssed loadtest args…` with its descriptor limit at `nofile` (if
/// given), killing it past `deadline`.
pub fn loadtest_limited(
    args: &[&str],
    nofile: Option<u64>,
    deadline: Duration,
) -> (ExitStatus, String, String) {
    let mut child = spawn_loadtest(args, nofile);
    let out = read_all(child.stdout.take());
    let err = read_all(child.stderr.take());
    let status = wait_within(&mut child, Instant::now() + deadline);
    (
        status,
        out.join().expect("stdout reader"),
        err.join().expect("stderr reader"),
    )
}

/// Reads all of `pipe` on a thread of its own.
pub fn read_all(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut text); // what arrived is what we check
        }
        text
    })
}

/// Waits for `child` to exit; past `until` kills it and fails the test.
pub fn wait_within(child: &mut std::process::Child, until: Instant) -> ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > until {
            let _ = child.kill(); // it overran: the panic reports it
            let _ = child.wait();
            panic!("ssed loadtest did not finish in time");
        }
        thread::sleep(Duration::from_millis(10));
    }
}
