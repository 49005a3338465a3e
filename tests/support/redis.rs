//! The machine's Redis (127.0.0.1:6379) for the tests that use it: whether
//! it answers, a command sent over RESP, and the rule for its absence: a
//! test passes after printing why, except under `CI=true`, where it fails
//! (CI must never skip them).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::netns::in_ci;

/// The machine's Redis.
pub const REDIS: &str = "127.0.0.1:6379";

/// Skips (after printing why) or, under CI, fails.
pub fn skip(test: &str, reason: &str) {
    if in_ci() {
        panic!("{test}: {reason} (CI=true: the Redis tests must run)");
    }
    eprintln!("skipping {test}: {reason}");
}

/// Whether a Redis answers PING at `addr`.
pub fn pings(addr: &str) -> bool {
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("+PONG")
}

/// The machine's Redis, or `None` after printing why not.
pub fn redis(test: &str) -> Option<&'static str> {
    if pings(REDIS) {
        Some(REDIS)
    } else {
        skip(test, &format!("no Redis answers at {REDIS}"));
        None
    }
}

/// Sends one command (its arguments as bulk strings, so any bytes) and
/// returns the start of the reply as text.
pub fn command(addr: &str, args: &[&str]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to Redis");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(cmd.as_bytes()).unwrap();
    let mut reply = [0u8; 4096];
    let n = s.read(&mut reply).unwrap_or(0);
    String::from_utf8_lossy(&reply[..n]).into_owned()
}

/// A prefix for topic names that no other test (or earlier run) on the
/// machine's Redis uses.
pub fn unique_run(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{tag}_{}_{nanos}_", std::process::id())
}

/// Deletes, when dropped (the test passed or not), what its topics left in
/// Redis: each one's stream and entry count. The shared keys (`ssed:last`,
/// the control stream, the stream of every update, the selecting mark,
/// which expires) are bounded and stay.
pub struct TopicCleanup {
    pub redis: &'static str,
    pub topics: Vec<String>,
}

impl Drop for TopicCleanup {
    fn drop(&mut self) {
        for t in &self.topics {
            let stream = format!("ssed:t:{t}");
            command(self.redis, &["DEL", &stream]);
            command(self.redis, &["HDEL", "ssed:seq", &stream]);
        }
    }
}
