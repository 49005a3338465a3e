//! The command line of `ssed loadtest`: its help text, the options it
//! parses into, and the `http://` targets those name, resolved once.

use std::ffi::OsString;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use ssed::daemon::config::parse_duration;

/// What `ssed loadtest --help` prints.
pub(super) const USAGE: &str = "\
ssed loadtest - hold many event streams and measure delivery latency

USAGE:
    ssed loadtest --url http://HOST:PORT/events/TOPIC --connections N [OPTIONS]

OPTIONS:
    --url URL             the stream to open, N times (http:// only)
    -n, --connections N   streams to open
    --ramp R[/s]          connections opened per second (default 1000; 0 = unpaced)
    --duration D          how long to hold the streams after the ramp-up, or after
                          the last publish (default 10s); with a publisher the hold
                          ends as soon as every expected delivery has arrived
    --publish-url URL     publish timed events here (POST, keep-alive)
    --events M            events to publish (default 100)
    --rate R[/s]          events per second (default 10; 0 = as fast as the server answers)
    --json                print one JSON object instead of the table
    -h, --help            print this help

Progress goes to stderr once a second; the summary goes to stdout.
held: streams open with 200 at the end; refused: 503 (or ssed's overload = \"retry\"
answer); other: any other status; failed: no response (connect error, timeout);
dropped: closed by the server after 200. Deliveries expected = events published x
streams held when publishing began; latency = receive time - the send time each
event carries ({\"t\":<unix ns>,\"seq\":N}).

ENVIRONMENT:
    SSED_SUBSCRIBE_TOKEN   sent as a Bearer token when opening streams
    SSED_PUBLISH_TOKEN     sent as a Bearer token when publishing
";

/// What a valid command line asks for.
#[derive(Debug, Clone)]
pub(super) struct Options {
    pub(super) url: Target,
    pub(super) connections: u64,
    /// Connects per second; 0 = unpaced.
    pub(super) ramp: f64,
    pub(super) duration: Duration,
    pub(super) publish: Option<PublishOptions>,
    pub(super) json: bool,
    pub(super) subscribe_token: Option<String>,
}

/// The publisher's part of the options: `--publish-url` and what goes with it.
#[derive(Debug, Clone)]
pub(super) struct PublishOptions {
    pub(super) url: Target,
    pub(super) events: u64,
    /// Events per second; 0 = flat out.
    pub(super) rate: f64,
    pub(super) token: Option<String>,
}

/// A parsed command line: a run, or a request for help.
pub(super) enum Parsed {
    Run(Box<Options>),
    Help,
}

/// A bad command line, said in one line.
#[derive(Debug)]
pub(super) struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<lexopt::Error> for UsageError {
    fn from(e: lexopt::Error) -> Self {
        UsageError(e.to_string())
    }
}

impl Options {
    pub(super) fn parse(args: Vec<OsString>) -> Result<Parsed, UsageError> {
        use lexopt::prelude::*;
        let mut url = None;
        let mut connections = None;
        let mut ramp = 1000.0;
        let mut duration = Duration::from_secs(10);
        let mut publish_url = None;
        let mut events = None;
        let mut rate = None;
        let mut json = false;
        let mut parser = lexopt::Parser::from_args(args);
        while let Some(arg) = parser.next()? {
            match arg {
                Long("url") => url = Some(parser.value()?.string()?),
                Short('n') | Long("connections") => {
                    connections = Some(parse_count("--connections", &parser.value()?.string()?)?);
                }
                Long("ramp") => ramp = parse_rate("--ramp", &parser.value()?.string()?)?,
                Long("duration") => {
                    let v = parser.value()?.string()?;
                    duration =
                        parse_duration(&v).map_err(|e| UsageError(format!("--duration: {e}")))?;
                }
                Long("publish-url") => publish_url = Some(parser.value()?.string()?),
                Long("events") => {
                    events = Some(parse_count("--events", &parser.value()?.string()?)?)
                }
                Long("rate") => rate = Some(parse_rate("--rate", &parser.value()?.string()?)?),
                Long("json") => json = true,
                Short('h') | Long("help") => return Ok(Parsed::Help),
                _ => return Err(arg.unexpected().into()),
            }
        }
        let url = url.ok_or_else(|| {
            UsageError(
                "missing --url (the stream to open, e.g. http://127.0.0.1:8080/events/bench)"
                    .into(),
            )
        })?;
        let url = Target::parse(&url).map_err(|e| UsageError(format!("--url: {e}")))?;
        let connections = connections
            .ok_or_else(|| UsageError("missing --connections (how many streams to open)".into()))?;
        if connections == 0 {
            return Err(UsageError("--connections must be at least 1".into()));
        }
        let publish = match publish_url {
            Some(p) => Some(PublishOptions {
                url: Target::parse(&p).map_err(|e| UsageError(format!("--publish-url: {e}")))?,
                events: events.unwrap_or(100),
                rate: rate.unwrap_or(10.0),
                token: env_token("SSED_PUBLISH_TOKEN"),
            }),
            None => {
                if events.is_some() || rate.is_some() {
                    return Err(UsageError(
                        "--events and --rate need --publish-url (where to publish)".into(),
                    ));
                }
                None
            }
        };
        Ok(Parsed::Run(Box::new(Options {
            url,
            connections,
            ramp,
            duration,
            publish,
            json,
            subscribe_token: env_token("SSED_SUBSCRIBE_TOKEN"),
        })))
    }
}

fn env_token(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|t| !t.is_empty())
}

/// A whole number; `_` may group digits (`19_000`).
fn parse_count(flag: &str, s: &str) -> Result<u64, UsageError> {
    let digits: String = s.chars().filter(|&c| c != '_').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UsageError(format!("{flag}: {s:?} is not a whole number")));
    }
    digits
        .parse()
        .map_err(|_| UsageError(format!("{flag}: {s:?} is too large")))
}

/// A non-negative rate, optionally followed by `/s`: `1000`, `1000/s`, `2.5/s`.
fn parse_rate(flag: &str, s: &str) -> Result<f64, UsageError> {
    let bad = || UsageError(format!("{flag}: {s:?} is not a rate (e.g. 1000 or 1000/s)"));
    let number = s
        .trim()
        .strip_suffix("/s")
        .unwrap_or(s.trim())
        .replace('_', "");
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    let r: f64 = number.parse().map_err(|_| bad())?;
    if r.is_finite() && r >= 0.0 {
        Ok(r)
    } else {
        Err(bad())
    }
}

/// An `http://` URL, resolved once.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// As given, for the report.
    pub(super) url: String,
    pub(super) addr: SocketAddr,
    /// The `Host` header: the authority as given.
    pub(super) host: String,
    /// Path and query.
    pub(super) path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let rest = match url.strip_prefix("http://") {
            Some(r) => r,
            None if url.starts_with("https://") => {
                return Err(format!("{url}: https is not supported, use http://"));
            }
            None => return Err(format!("{url}: expected http://HOST:PORT/PATH")),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.is_empty() {
            return Err(format!("{url}: no host"));
        }
        // `[::1]:8080`, `host:8080`, `host` (port 80).
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => {
                let port: u16 = p.parse().map_err(|_| format!("{url}: bad port {p:?}"))?;
                (h, port)
            }
            _ => (authority, 80),
        };
        let host_only = host.trim_start_matches('[').trim_end_matches(']');
        let addr = (host_only, port)
            .to_socket_addrs()
            .map_err(|e| format!("{url}: cannot resolve {host_only}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: {host_only} has no address"))?;
        Ok(Target {
            url: url.to_owned(),
            addr,
            host: authority.to_owned(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn parse(list: &[&str]) -> Result<Options, String> {
        match Options::parse(args(list)) {
            Ok(Parsed::Run(o)) => Ok(*o),
            Ok(Parsed::Help) => Err("help".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn options() {
        let o = parse(&[
            "--url",
            "http://127.0.0.1:8080/events/a?x=1",
            "--connections",
            "19_000",
            "--ramp",
            "2000/s",
            "--duration",
            "5s",
            "--publish-url=http://127.0.0.1:8080/publish/a",
            "--events",
            "50",
            "--rate",
            "0",
            "--json",
        ])
        .expect("valid");
        assert_eq!(o.connections, 19_000);
        assert_eq!(o.ramp, 2000.0);
        assert_eq!(o.duration, Duration::from_secs(5));
        assert_eq!(o.url.path, "/events/a?x=1");
        assert_eq!(o.url.host, "127.0.0.1:8080");
        let p = o.publish.expect("publisher");
        assert_eq!((p.events, p.rate), (50, 0.0));
        assert!(o.json);
    }

    #[test]
    fn bad_options() {
        let url = "http://127.0.0.1:1/events/a";
        let table: &[(&[&str], &str)] = &[
            (&["--connections", "5"], "missing --url"),
            (&["--url", url], "missing --connections"),
            (&["--url", url, "-n", "five"], "not a whole number"),
            (&["--url", url, "-n", "5", "--ramp", "-3"], "not a rate"),
            (&["--url", url, "-n", "5", "--bogus"], "--bogus"),
            (
                &["--url", url, "-n", "5", "--duration", "5"],
                "invalid duration",
            ),
            (
                &["--url", url, "-n", "5", "--events", "5"],
                "need --publish-url",
            ),
            (&["--url", "https://x/events/a", "-n", "5"], "https"),
            (&["--url", "http://127.0.0.1:99999/", "-n", "5"], "bad port"),
            (&["--url", url, "-n", "0"], "at least 1"),
        ];
        for (list, want) in table {
            let err = parse(list).expect_err("invalid");
            assert!(err.contains(want), "{list:?}: {err:?} lacks {want:?}");
        }
    }
}
