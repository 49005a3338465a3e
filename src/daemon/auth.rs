//! Tokens, single-use stream tickets and the session cookie a ticket sets.
//!
//! Tokens are compared in constant time and never logged. A ticket is a
//! random secret valid once, for 30 seconds, carrying the subscribe grant
//! it was issued with; the stream it opens sets a session cookie with the
//! same grant so the browser's own `EventSource` reconnects (which repeat
//! the spent ticket's URL) authenticate with the cookie instead.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::Request;
use crate::hub::grant::Grant;

/// How long a ticket is valid.
pub const TICKET_TTL: Duration = Duration::from_secs(30);
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "ssed_session";
/// Most tickets and sessions kept at once; past it the oldest go first.
const MAX_ENTRIES: usize = 100_000;
/// Most bytes of grants (their selectors) the tickets, or the sessions,
/// hold together; past it the oldest go first. A grant shared by many (the
/// subscribe token's `*`) is counted once per holder, as a few bytes.
const MAX_GRANT_BYTES: usize = 32 << 20;

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `Authorization: Bearer <token>` value, if any.
pub fn bearer(req: &Request) -> Option<&str> {
    let value = req.header("authorization")?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether the peer is on this machine.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// A value of a `Cookie` header.
// A plain loop: a stream's thread runs this on its way in, and the
// adapters' state (`flat_map` over `split`) took a frame of 256 bytes.
pub fn cookie<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    for (k, v) in req.headers() {
        if !k.eq_ignore_ascii_case("cookie") {
            continue;
        }
        for pair in v.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=')
                && k == name
            {
                return Some(v);
            }
        }
    }
    None
}

/// A random secret of 32 hex digits from the kernel's generator
/// (`getrandom(2)`, through ring: no file to open, whose path std copies
/// into a 384-byte buffer on the stack of the stream thread that starts a
/// session).
///
/// # Errors
///
/// When the kernel's generator cannot be read.
pub fn random_secret() -> std::io::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| std::io::Error::other("the kernel's random generator failed"))?;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    Ok(out)
}

/// What a ticket or a session carries: the grant it was issued with, and
/// when the credential it came from expires (a JWT's `exp`), if it does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// The subscribe grant.
    pub grant: Grant,
    /// The issuing credential's expiry: streams end then, sessions too.
    pub expires: Option<SystemTime>,
}

impl Pass {
    /// A pass of `grant` that does not expire by itself.
    pub fn of(grant: Grant) -> Pass {
        Pass {
            grant,
            expires: None,
        }
    }
}

/// Outstanding tickets and live sessions.
#[derive(Debug, Default)]
pub struct Tickets {
    tickets: Mutex<Secrets>,
    sessions: Mutex<Secrets>,
}

/// Secrets with an expiry, kept in the order they expire: every secret of
/// one kind lives equally long, so that is the order they were made in.
/// Expired ones go from the front, in time proportional to how many
/// expired, never a scan of all; when full, the one nearest its end goes.
#[derive(Debug, Default)]
struct Secrets {
    expiry: HashMap<String, (Instant, Pass)>,
    /// What the grants held take, by [`Grant::footprint`].
    bytes: usize,
    /// `(expires, secret)`, oldest first. A secret spent early stays here
    /// until its time comes or the bound pushes it out, so this holds at
    /// most twice `MAX_ENTRIES`.
    order: VecDeque<(Instant, String)>,
}

impl Secrets {
    /// Drops what expired by `now`, and past the bound the oldest, so one
    /// more fits.
    fn prune(&mut self, now: Instant) {
        while let Some((exp, _)) = self.order.front() {
            let full = self.expiry.len() >= MAX_ENTRIES
                || self.order.len() >= 2 * MAX_ENTRIES
                || self.bytes > MAX_GRANT_BYTES;
            if *exp > now && !full {
                break;
            }
            if let Some((exp, secret)) = self.order.pop_front()
                && self.expiry.get(&secret).is_some_and(|(e, _)| *e == exp)
            {
                self.remove(&secret);
            }
        }
    }

    fn insert(&mut self, secret: String, expires: Instant, pass: Pass, now: Instant) {
        self.bytes += pass.grant.footprint();
        self.prune(now);
        self.order.push_back((expires, secret.clone()));
        self.expiry.insert(secret, (expires, pass));
    }

    fn remove(&mut self, secret: &str) -> Option<(Instant, Pass)> {
        let removed = self.expiry.remove(secret);
        if let Some((_, p)) = &removed {
            self.bytes = self.bytes.saturating_sub(p.grant.footprint());
        }
        removed
    }

    fn get(&self, secret: &str) -> Option<&(Instant, Pass)> {
        self.expiry.get(secret)
    }
}

impl Tickets {
    /// Issues a ticket valid for [`TICKET_TTL`] (or until `pass` expires,
    /// if sooner), carrying `pass`.
    ///
    /// # Errors
    ///
    /// When no random secret can be made.
    pub fn issue(&self, pass: Pass) -> std::io::Result<String> {
        let ticket = random_secret()?;
        let now = Instant::now();
        let ttl = capped(TICKET_TTL, pass.expires);
        let mut t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        t.insert(ticket.clone(), now + ttl, pass, now);
        Ok(ticket)
    }

    /// Spends a ticket: its pass, once, if it exists and has not expired.
    pub fn redeem(&self, ticket: &str) -> Option<Pass> {
        let mut t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        t.remove(ticket)
            .filter(|(exp, _)| Instant::now() < *exp)
            .map(|(_, p)| p)
    }

    /// Opens a session valid for `ttl`; returns its secret.
    ///
    /// # Errors
    ///
    /// When no random secret can be made.
    /// A session lives `ttl`, or until its pass expires if sooner.
    pub fn open_session(&self, ttl: Duration, pass: Pass) -> std::io::Result<String> {
        let secret = random_secret()?;
        let now = Instant::now();
        let ttl = capped(ttl, pass.expires);
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.insert(secret.clone(), now + ttl, pass, now);
        Ok(secret)
    }

    /// A live session's pass.
    pub fn session(&self, secret: &str) -> Option<Pass> {
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.get(secret)
            .filter(|(exp, _)| Instant::now() < *exp)
            .map(|(_, p)| p.clone())
    }
}

/// `ttl`, or less if `expires` comes sooner.
fn capped(ttl: Duration, expires: Option<SystemTime>) -> Duration {
    match expires {
        Some(exp) => ttl.min(exp.duration_since(SystemTime::now()).unwrap_or_default()),
        None => ttl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_secrets() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn reads_credentials() {
        let peer = ([127, 0, 0, 1], 1).into();
        let r = Request::new("GET", "/", peer)
            .with_header("Authorization", "Bearer  s3cret ")
            .with_header("Cookie", "a=1; ssed_session=xyz; b=2");
        assert_eq!(bearer(&r), Some("s3cret"));
        assert_eq!(cookie(&r, SESSION_COOKIE), Some("xyz"));
        assert_eq!(cookie(&r, "c"), None);
        let r = Request::new("GET", "/", peer).with_header("Authorization", "Basic abc");
        assert_eq!(bearer(&r), None);
    }

    #[test]
    fn loopback() {
        assert!(is_loopback("127.0.0.2".parse().expect("ip")));
        assert!(is_loopback("::1".parse().expect("ip")));
        assert!(is_loopback("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!is_loopback("10.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn tickets_are_single_use() {
        let t = Tickets::default();
        let a = t.issue(Pass::of(Grant::subscribe_all())).expect("urandom");
        assert_eq!(a.len(), 32);
        assert_eq!(t.redeem(&a), Some(Pass::of(Grant::subscribe_all())));
        assert!(t.redeem(&a).is_none(), "single use");
        assert!(t.redeem("unknown").is_none());
        let s = t
            .open_session(Duration::from_secs(60), Pass::of(Grant::subscribe_all()))
            .expect("urandom");
        assert!(t.session(&s).is_some());
        assert!(t.session("nope").is_none());
        let expired = t
            .open_session(Duration::ZERO, Pass::default())
            .expect("urandom");
        assert!(t.session(&expired).is_none());
        // A pass that expires ends its session with it.
        let short = Pass {
            grant: Grant::subscribe_all(),
            expires: Some(SystemTime::now()),
        };
        let s = t
            .open_session(Duration::from_secs(60), short)
            .expect("urandom");
        assert!(t.session(&s).is_none());
    }

    #[test]
    fn a_full_store_lets_the_oldest_go_without_scanning() {
        let mut s = Secrets::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(30);
        for i in 0..MAX_ENTRIES + 10 {
            s.insert(format!("s{i}"), now + ttl, Pass::default(), now);
        }
        assert_eq!(s.expiry.len(), MAX_ENTRIES);
        assert!(
            s.get("s0").is_none() && s.get("s9").is_none(),
            "the oldest went"
        );
        assert!(s.get(&format!("s{}", MAX_ENTRIES + 9)).is_some());
        // Spent secrets do not pile up in the order either.
        for i in 0..3 * MAX_ENTRIES {
            let secret = format!("spent{i}");
            s.insert(secret.clone(), now + ttl, Pass::default(), now);
            s.remove(&secret);
        }
        assert!(s.order.len() <= 2 * MAX_ENTRIES, "{}", s.order.len());
        // Expired ones go as time passes.
        let later = now + ttl + Duration::from_secs(1);
        s.insert("new".into(), later + ttl, Pass::default(), later);
        assert_eq!(s.expiry.len(), 1);
    }

    #[test]
    fn large_grants_are_bounded_in_bytes() {
        use crate::hub::grant::Selector;
        let mut s = Secrets::default();
        let now = Instant::now();
        let big: Vec<Selector> = (0..100)
            .map(|i| Selector::parse(&format!("{i:0>2000}")).expect("selector"))
            .collect();
        let grant = Grant::new(big, Vec::new());
        let each = grant.footprint();
        assert!(each >= 200_000, "{each}");
        for i in 0..400 {
            s.insert(
                format!("s{i}"),
                now + Duration::from_secs(30),
                Pass::of(grant.clone()),
                now,
            );
        }
        assert!(s.bytes <= MAX_GRANT_BYTES + each, "{}", s.bytes);
        assert!(s.get("s0").is_none(), "the oldest went");
        assert!(s.get("s399").is_some());
    }
}
