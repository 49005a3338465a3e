//! Running out of file descriptors never stops the server for good: the
//! `ssed` binary runs as a child process whose descriptor limit the test
//! lowers to 64, a flood of idle connections makes `accept` fail with
//! EMFILE, and the server must stay up, let a new client in while the flood
//! holds (by cutting the oldest waiting connection), and accept normally
//! once the flood is gone.
#![cfg(feature = "daemon")]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Resource, Rlimit, prlimit};
use support::process::Ssed;
use support::{Client, wait_until};

/// The child's descriptor limit during the test.
const FD_LIMIT: u64 = 64;
/// Idle connections opened against it: about three times what it can hold.
const FLOOD: usize = 200;
/// A flood only a little past what the child can hold (about 57 waiting
/// connections): some 20 connections queue in the backlog ahead of a new
/// client.
const SMALL_FLOOD: usize = 80;
const GET_ROOT: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// The `ssed` binary and its address; killed and reaped when dropped (also
/// when a test fails half-way).
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

    /// Sets the child's soft and hard descriptor limits.
    fn limit_fds(&self, n: u64) {
        let limit = Rlimit {
            current: Some(n),
            maximum: Some(n),
        };
        let pid = Pid::from_raw(self.proc.pid().cast_signed()).expect("a child's pid is not 0");
        prlimit(Some(pid), Resource::Nofile, limit).expect("prlimit on the child");
    }

    /// Descriptors the child holds now.
    fn fds(&self) -> usize {
        self.proc.fds()
    }

    fn is_alive(&mut self) -> bool {
        self.proc.is_running()
    }

    fn log_text(&self) -> String {
        self.proc.stderr()
    }

    fn logged(&self, needle: &str) -> bool {
        self.proc.logged(needle)
    }
}

/// One `GET /` on a fresh connection: the status, or why there was none by
/// `deadline`.
fn get_root(addr: SocketAddr, deadline: Instant) -> Result<u16, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("out of time".into());
    }
    let conn = TcpStream::connect_timeout(&addr, left).map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    let mut c = Client::from_conn(conn);
    c.conn
        .write_all(GET_ROOT)
        .map_err(|e| format!("send: {e}"))?;
    let head = c.try_head().map_err(|e| format!("head: {e}"))?;
    // Read the page to its end so the server's close is orderly.
    let mut rest = Vec::new();
    let _ = c.conn.read_to_end(&mut rest); // the status is what matters
    Ok(head.status)
}

/// `GET /` until one answers `200` or `budget` runs out; returns the time
/// it took. Each attempt waits on its connection for the rest of the budget:
/// while the server is out of descriptors a new connection queues in the
/// listen backlog, and giving up on it early would only rejoin the queue at
/// its back.
fn get_root_within(addr: SocketAddr, budget: Duration) -> Result<Duration, Vec<String>> {
    let start = Instant::now();
    let deadline = start + budget;
    let mut failures = Vec::new();
    // Bounded by the deadline; only a connection the server cut (EOF or
    // reset) is retried.
    for _ in 0..1_000 {
        match get_root(addr, deadline) {
            Ok(200) => return Ok(start.elapsed()),
            Ok(status) => failures.push(format!("status {status}")),
            Err(e) => failures.push(e),
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(failures)
}

/// Opens the flood and waits until the child is out of descriptors and
/// says so.
fn exhaust(daemon: &mut Daemon, flood: usize) -> Vec<TcpStream> {
    daemon.limit_fds(FD_LIMIT);
    let before = daemon.fds();
    // The kernel completes these handshakes from the listen backlog, so
    // every connect succeeds whether or not the server can accept it.
    let flood: Vec<TcpStream> = (0..flood)
        .map(|_| TcpStream::connect(daemon.addr).expect("connect to the backlog"))
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || daemon.logged("accept failed")),
        "the server never reported a failed accept; it holds {} descriptors; log:\n{}",
        daemon.fds(),
        daemon.log_text()
    );
    let during = daemon.fds();
    eprintln!(
        "child descriptors: {before} before the flood, {during} at EMFILE (limit {FD_LIMIT})"
    );
    assert!(
        during as u64 >= FD_LIMIT - 2,
        "expected the child at its limit, holds {during}"
    );
    assert!(
        daemon.is_alive(),
        "the server died at EMFILE; log:\n{}",
        daemon.log_text()
    );
    flood
}

#[test]
fn accepts_again_once_the_flood_is_gone() {
    let mut daemon = Daemon::start();
    let addr = daemon.addr;
    assert_eq!(
        get_root(addr, Instant::now() + Duration::from_secs(5)),
        Ok(200)
    );

    let flood = exhaust(&mut daemon, FLOOD);
    drop(flood);

    let took = get_root_within(addr, Duration::from_secs(5)).unwrap_or_else(|e| {
        panic!(
            "no 200 after the flood closed: {e:?}; log:\n{}",
            daemon.log_text()
        )
    });
    eprintln!("GET / answered {took:?} after the flood closed");
    assert!(daemon.is_alive());
    // And keeps accepting: a handful more in a row.
    for _ in 0..5 {
        assert_eq!(
            get_root(addr, Instant::now() + Duration::from_secs(2)),
            Ok(200)
        );
    }
    let fds = daemon.fds();
    eprintln!("child descriptors after recovery: {fds}");
}

#[test]
fn serves_a_new_client_while_the_flood_holds() {
    let mut daemon = Daemon::start();
    let addr = daemon.addr;
    let flood = exhaust(&mut daemon, SMALL_FLOOD);

    let took = get_root_within(addr, Duration::from_secs(5)).unwrap_or_else(|e| {
        panic!(
            "no 200 within 5 s while out of descriptors: {e:?}; child holds {} fds; log:\n{}",
            daemon.fds(),
            daemon.log_text()
        )
    });
    eprintln!("GET / answered {took:?} behind a flood of {SMALL_FLOOD}");
    assert!(daemon.is_alive());
    drop(flood);
}

/// The same behind the full flood: about 140 idle connections queue ahead
/// of the client. Each failed accept cuts the waiting connection nearest its
/// deadline and accepts again at once, so the client is in within moments
/// (before the fix it waited one 100 ms sweep per queued connection, ~14 s).
#[test]
fn serves_a_new_client_promptly_behind_a_large_flood() {
    let mut daemon = Daemon::start();
    let addr = daemon.addr;
    let flood = exhaust(&mut daemon, FLOOD);

    let took = get_root_within(addr, Duration::from_secs(3)).unwrap_or_else(|e| {
        panic!(
            "no 200 within 3 s while out of descriptors: {e:?}; child holds {} fds; log:\n{}",
            daemon.fds(),
            daemon.log_text()
        )
    });
    eprintln!("GET / answered {took:?} behind a flood of {FLOOD}");
    assert!(daemon.is_alive());
    drop(flood);
}
