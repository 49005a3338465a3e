//! The command line of `ssed loadtest`: its help text, the options it
//! parses into, and the `http://` or `https://` targets those name,
//! resolved once.

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use ssed::daemon::config::parse_duration;

use super::tls;

/// What `ssed loadtest --help` prints.
pub(super) const USAGE: &str = "\
ssed loadtest - hold many event streams and measure delivery latency

USAGE:
    ssed loadtest --url http://HOST:PORT/events/TOPIC --connections N [OPTIONS]
    ssed loadtest --url http://HOST:PORT/events/TOPIC --find-limit [OPTIONS]

OPTIONS:
    --url URL             the stream to open, N times (http:// or https://); given
                          more than once (the same server), the streams take the
                          URLs in turn
    -n, --connections N   streams to open
    --ramp R[/s]          connections opened per second (default 1000; 0 = unpaced)
    --duration D          how long to hold the streams after the ramp-up, or after
                          the last publish (default 10s); with a publisher the hold
                          ends as soon as every expected delivery has arrived
    --publish-url URL     publish timed events here (POST, keep-alive)
    --events M            events to publish (default 100)
    --rate R[/s]          events per second (default 10; 0 = as fast as the server answers)
    --source A[-B]        open the streams from these local IPv4 addresses, round-robin
                          (e.g. 127.0.0.2-127.0.0.5; each gives about 28,000 ports)
    --pid PID             the server's process: its RSS and threads in the report
    --report FILE.html    also write the run as one self-contained HTML page (charts
                          of streams, deliveries and, with --pid, the server's memory
                          and threads over time, and the delivery latency); with
                          --find-limit, per step; written on a failed run too
    --cacert FILE         https: trust the CA certificates of this PEM file (there
                          are no system roots)
    --insecure            https: accept any certificate, unverified: FOR TESTS ONLY
    --json                print one JSON object instead of the table
    -h, --help            print this help

More streams than this process's descriptor limit (`ulimit -n`, raised to its hard
limit first), in a run or in a --find-limit step, are spread over worker processes,
each running `ssed loadtest`; their counts and latency samples are added up (the
report's \"workers\").

FINDING THE LIMIT (--find-limit):
    --find-limit          raise the held streams in steps (doubling from --connections,
                          default 100, then bisecting to 1%) and publish --events
                          (default 5) timed events at each step; stop at the first
                          refusal, failure or drop, p99 over --max-p99, the server's
                          memory headroom under 32 MiB (--pid), or --max
    --max-p99 D           largest acceptable delivery p99 (default 250ms)
    --pid PID             also stop when the server's MemAvailable (or its memory
                          cgroup's limit - usage) < 32 MiB
    --max N               never hold more than N streams
    --step-time D         how long each step publishes for (default 3s)
    --publish-url URL     defaults to --url with /events/ replaced by /publish/

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
    /// Further `--url`s, of the same server: as given, and their paths.
    pub(super) more_urls: Vec<String>,
    pub(super) more_paths: Vec<String>,
    pub(super) connections: u64,
    /// Connects per second; 0 = unpaced.
    pub(super) ramp: f64,
    pub(super) duration: Duration,
    pub(super) publish: Option<PublishOptions>,
    pub(super) json: bool,
    pub(super) subscribe_token: Option<String>,
    /// Local addresses the streams are opened from, round-robin; empty =
    /// the kernel chooses.
    pub(super) sources: Vec<IpAddr>,
    pub(super) find_limit: Option<FindLimitOptions>,
    /// `--pid`: the server's process, looked at after each step or second.
    pub(super) pid: Option<u32>,
    /// `--report`: where to write the HTML page.
    pub(super) report: Option<PathBuf>,
    /// `--worker` (not in the help): hold streams for a load tester that
    /// started this process, speaking the protocol of `worker.rs`.
    pub(super) worker: bool,
    /// `--cacert`: the roots https targets are verified against.
    pub(super) cacert: Option<PathBuf>,
    /// `--insecure`: https targets are not verified.
    pub(super) insecure: bool,
}

/// What `--find-limit` asks for.
#[derive(Debug, Clone)]
pub(super) struct FindLimitOptions {
    /// The first step's streams.
    pub(super) start: u64,
    pub(super) max: Option<u64>,
    pub(super) max_p99: Duration,
    pub(super) step_time: Duration,
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
        let mut urls: Vec<String> = Vec::new();
        let mut connections = None;
        let mut ramp = 1000.0;
        let mut duration = Duration::from_secs(10);
        let mut publish_url = None;
        let mut events = None;
        let mut rate = None;
        let mut json = false;
        let mut source = None;
        let mut find_limit = false;
        let mut max_p99 = None;
        let mut pid = None;
        let mut max = None;
        let mut step_time = None;
        let mut report: Option<PathBuf> = None;
        let mut worker = false;
        let mut cacert: Option<PathBuf> = None;
        let mut insecure = false;
        let mut parser = lexopt::Parser::from_args(args);
        while let Some(arg) = parser.next()? {
            match arg {
                Long("url") => urls.push(parser.value()?.string()?),
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
                Long("source") => source = Some(parse_source(&parser.value()?.string()?)?),
                Long("find-limit") => find_limit = true,
                Long("worker") => worker = true,
                Long("cacert") => cacert = Some(parser.value()?.into()),
                Long("insecure") => insecure = true,
                Long("max-p99") => {
                    max_p99 = Some(parse_duration_flag(
                        "--max-p99",
                        &parser.value()?.string()?,
                    )?)
                }
                Long("step-time") => {
                    step_time = Some(parse_duration_flag(
                        "--step-time",
                        &parser.value()?.string()?,
                    )?)
                }
                Long("pid") => {
                    let v = parser.value()?.string()?;
                    let n = parse_count("--pid", &v)?;
                    pid =
                        Some(u32::try_from(n).ok().filter(|&p| p > 0).ok_or_else(|| {
                            UsageError(format!("--pid: {v:?} is not a process id"))
                        })?);
                }
                Long("report") => report = Some(parser.value()?.into()),
                Long("max") => max = Some(parse_count("--max", &parser.value()?.string()?)?),
                Short('h') | Long("help") => return Ok(Parsed::Help),
                _ => return Err(arg.unexpected().into()),
            }
        }
        let mut urls = urls.into_iter();
        let url = urls.next().ok_or_else(|| {
            UsageError(
                "missing --url (the stream to open, e.g. http://127.0.0.1:8080/events/bench)"
                    .into(),
            )
        })?;
        let mut url = Target::parse(&url).map_err(|e| UsageError(format!("--url: {e}")))?;
        let more_urls: Vec<String> = urls.collect();
        let mut more_paths = Vec::with_capacity(more_urls.len());
        for more in &more_urls {
            let t = Target::parse(more).map_err(|e| UsageError(format!("--url: {e}")))?;
            if t.addr != url.addr || t.https != url.https || t.host != url.host {
                return Err(UsageError(format!(
                    "--url {more}: every --url names the same server as the first ({})",
                    url.url
                )));
            }
            more_paths.push(t.path);
        }
        if report.as_ref().is_some_and(|r| r.as_os_str().is_empty()) {
            return Err(UsageError("--report: no file name".into()));
        }
        if !find_limit && (max_p99.is_some() || max.is_some() || step_time.is_some()) {
            return Err(UsageError(
                "--max-p99, --max and --step-time need --find-limit".into(),
            ));
        }
        if worker && (find_limit || publish_url.is_some() || report.is_some() || json) {
            return Err(UsageError(
                "--worker is for the load tester's own worker processes".into(),
            ));
        }
        let connections = match (connections, find_limit) {
            (Some(n), _) => n,
            (None, true) => DEFAULT_FIRST_STEP,
            (None, false) => {
                return Err(UsageError(
                    "missing --connections (how many streams to open)".into(),
                ));
            }
        };
        if connections == 0 {
            return Err(UsageError("--connections must be at least 1".into()));
        }
        let sources = match source {
            Some(range) if !url.addr.is_ipv4() => {
                return Err(UsageError(format!(
                    "--source: {range} is IPv4, but --url is {}",
                    url.addr
                )));
            }
            Some(range) => range.addresses(),
            None => Vec::new(),
        };
        let find = if find_limit {
            if max == Some(0) {
                return Err(UsageError("--max must be at least 1".into()));
            }
            let step_time = step_time.unwrap_or(DEFAULT_STEP_TIME);
            if step_time.is_zero() {
                return Err(UsageError("--step-time must be more than 0".into()));
            }
            Some(FindLimitOptions {
                start: max.map_or(connections, |m| connections.min(m)),
                max,
                max_p99: max_p99.unwrap_or(DEFAULT_MAX_P99),
                step_time,
            })
        } else {
            None
        };
        // --find-limit always publishes: to --publish-url, or next to --url.
        let publish_url = match (publish_url, &find) {
            (Some(p), _) => Some(p),
            (None, Some(_)) => Some(publish_url_for(&url).ok_or_else(|| {
                UsageError(format!(
                    "--find-limit: cannot guess where to publish for {} (no /events/ in \
                     its path): give --publish-url",
                    url.url
                ))
            })?),
            (None, None) => None,
        };
        let publish = match publish_url {
            Some(p) => {
                let events = events.unwrap_or(if find.is_some() { 5 } else { 100 });
                if find.is_some() && rate.is_some() {
                    return Err(UsageError(
                        "--rate does not apply to --find-limit: the events are spread over --step-time"
                            .into(),
                    ));
                }
                if find.is_some() && events == 0 {
                    return Err(UsageError(
                        "--find-limit needs --events of at least 1".into(),
                    ));
                }
                let rate = match &find {
                    // Spread over the step.
                    Some(f) => events as f64 / f.step_time.as_secs_f64(),
                    None => rate.unwrap_or(10.0),
                };
                Some(PublishOptions {
                    url: Target::parse(&p)
                        .map_err(|e| UsageError(format!("--publish-url: {e}")))?,
                    events,
                    rate,
                    token: env_token("SSED_PUBLISH_TOKEN"),
                })
            }
            None => {
                if events.is_some() || rate.is_some() {
                    return Err(UsageError(
                        "--events and --rate need --publish-url (where to publish)".into(),
                    ));
                }
                None
            }
        };
        let mut publish = publish;
        let mut https: Vec<(&str, &mut Target)> = vec![("--url", &mut url)];
        if let Some(p) = publish.as_mut() {
            https.push(("--publish-url", &mut p.url));
        }
        https.retain(|(_, t)| t.https);
        if cacert.is_some() && insecure {
            return Err(UsageError(
                "--cacert and --insecure: give one (verify against a CA, or not at all)".into(),
            ));
        }
        if https.is_empty() && (cacert.is_some() || insecure) {
            return Err(UsageError(
                "--cacert and --insecure are for https:// URLs".into(),
            ));
        }
        if let Some((flag, t)) = https.first() {
            let config = tls::config(cacert.as_deref(), insecure)
                .map_err(|e| UsageError(format!("{flag} {}: {e}", t.url)))?;
            for (flag, t) in https {
                t.tls = Some(
                    tls::Client::new(std::sync::Arc::clone(&config), &t.name)
                        .map_err(|e| UsageError(format!("{flag}: {e}")))?,
                );
            }
        }
        Ok(Parsed::Run(Box::new(Options {
            url,
            more_urls,
            more_paths,
            connections,
            ramp,
            duration,
            publish,
            json,
            subscribe_token: env_token("SSED_SUBSCRIBE_TOKEN"),
            sources,
            find_limit: find,
            pid,
            report,
            worker,
            cacert,
            insecure,
        })))
    }
}

/// The first step of `--find-limit` without `--connections`.
const DEFAULT_FIRST_STEP: u64 = 100;
/// `--max-p99` when not given.
const DEFAULT_MAX_P99: Duration = Duration::from_millis(250);
/// `--step-time` when not given.
const DEFAULT_STEP_TIME: Duration = Duration::from_secs(3);
/// Most addresses one `--source` range may name.
const MAX_SOURCES: u32 = 65_536;

/// `http://host/events/x` -> `http://host/publish/x`: ssed's own layout.
fn publish_url_for(url: &Target) -> Option<String> {
    let i = url.url.find("/events/")?;
    Some(format!(
        "{}/publish/{}",
        &url.url[..i],
        &url.url[i + "/events/".len()..]
    ))
}

fn parse_duration_flag(flag: &str, s: &str) -> Result<Duration, UsageError> {
    parse_duration(s).map_err(|e| UsageError(format!("{flag}: {e}")))
}

/// An inclusive range of IPv4 addresses from `--source`.
#[derive(Debug, Clone, Copy)]
pub(super) struct SourceRange {
    first: Ipv4Addr,
    last: Ipv4Addr,
}

impl fmt::Display for SourceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl SourceRange {
    fn addresses(self) -> Vec<IpAddr> {
        (u32::from(self.first)..=u32::from(self.last))
            .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
            .collect()
    }
}

/// `A` or `A-B`: IPv4 addresses, `A <= B`, at most [`MAX_SOURCES`].
fn parse_source(s: &str) -> Result<SourceRange, UsageError> {
    let bad = |why: &str| UsageError(format!("--source: {s:?} {why}"));
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let parse = |x: &str| {
        x.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| bad("is not an IPv4 address or range (e.g. 127.0.0.2-127.0.0.5)"))
    };
    let (first, last) = (parse(a)?, parse(b)?);
    if first > last {
        return Err(bad("runs backwards: give the lower address first"));
    }
    if first.is_unspecified() || first.is_broadcast() || last.is_broadcast() {
        return Err(bad("is not a local source address"));
    }
    if u32::from(last) - u32::from(first) >= MAX_SOURCES {
        return Err(bad(&format!("has more than {MAX_SOURCES} addresses")));
    }
    Ok(SourceRange { first, last })
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

/// An `http://` or `https://` URL, resolved once.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// As given, for the report.
    pub(super) url: String,
    pub(super) addr: SocketAddr,
    /// `https://`.
    pub(super) https: bool,
    /// The host, without brackets or port: the TLS server name.
    name: String,
    /// How to speak TLS to an `https://` target (set once the options
    /// are known).
    pub(super) tls: Option<tls::Client>,
    /// The `Host` header: the authority as given.
    pub(super) host: String,
    /// Path and query.
    pub(super) path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let (rest, https) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(r), _) => (r, false),
            (_, Some(r)) => (r, true),
            _ => {
                return Err(format!(
                    "{url}: expected http://HOST:PORT/PATH or https://…"
                ));
            }
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
            _ => (authority, if https { 443 } else { 80 }),
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
            https,
            name: host_only.to_owned(),
            tls: None,
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
    fn https_options() {
        let o = parse(&[
            "--url",
            "https://127.0.0.1/events/a",
            "-n",
            "1",
            "--publish-url",
            "http://127.0.0.1:8080/publish/a",
            "--insecure",
        ])
        .expect("valid");
        assert_eq!(o.url.addr.port(), 443);
        assert!(o.url.https && o.url.tls.is_some() && o.insecure);
        let p = o.publish.expect("a publisher");
        assert!(!p.url.https && p.url.tls.is_none());
        let o = parse(&[
            "--url",
            "https://[::1]:8443/events/a",
            "--find-limit",
            "--insecure",
        ])
        .expect("valid");
        let p = o.publish.expect("a publisher");
        assert_eq!(p.url.url, "https://[::1]:8443/publish/a");
        assert!(p.url.tls.is_some());
    }

    #[test]
    fn find_limit_options() {
        let o = parse(&[
            "--url",
            "http://127.0.0.1:8080/events/a",
            "--find-limit",
            "--source",
            "127.0.0.2-127.0.0.5",
            "--max",
            "50",
            "--max-p99",
            "100ms",
            "--step-time",
            "500ms",
            "--pid",
            "42",
            "--report",
            "r.html",
        ])
        .expect("valid");
        let f = o.find_limit.expect("find-limit");
        assert_eq!((f.start, f.max, o.pid), (50, Some(50), Some(42)));
        assert_eq!(f.max_p99, Duration::from_millis(100));
        assert_eq!(o.report, Some(PathBuf::from("r.html")));
        let want: Vec<IpAddr> = (2..=5).map(|i| IpAddr::from([127, 0, 0, i])).collect();
        assert_eq!(o.sources, want);
        let p = o.publish.expect("a publisher");
        assert_eq!(p.url.url, "http://127.0.0.1:8080/publish/a");
        assert_eq!((p.events, p.rate), (5, 10.0));
        let o = parse(&["--url", "http://127.0.0.1:1/events/a", "--find-limit"]).expect("valid");
        assert_eq!(o.find_limit.expect("find-limit").start, 100);
        let o = parse(&[
            "--url",
            "http://127.0.0.1:1/e",
            "-n",
            "1",
            "--source",
            "127.0.0.9",
        ])
        .expect("valid");
        assert_eq!(o.sources, vec![IpAddr::from([127, 0, 0, 9])]);
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
            (
                &[
                    "--url",
                    "https://127.0.0.1:1/e",
                    "-n",
                    "5",
                    "--insecure",
                    "--cacert",
                    "x",
                ],
                "give one",
            ),
            (&["--url", url, "-n", "5", "--insecure"], "for https://"),
            (&["--url", "ftp://x/", "-n", "5"], "expected http://"),
            (&["--url", "http://127.0.0.1:99999/", "-n", "5"], "bad port"),
            (&["--url", url, "-n", "0"], "at least 1"),
            (
                &["--url", url, "-n", "5", "--source", "127.0.0.5-127.0.0.2"],
                "--source",
            ),
            (
                &["--url", url, "-n", "5", "--source", "localhost"],
                "--source",
            ),
            (
                &["--url", url, "-n", "5", "--source", "127.0.0.2-"],
                "--source",
            ),
            (
                &["--url", url, "-n", "5", "--source", "10.0.0.0-10.2.0.0"],
                "--source",
            ),
            (&["--url", url, "--max", "5"], "need --find-limit"),
            (&["--url", url, "-n", "5", "--worker", "--json"], "--worker"),
            (&["--url", url, "--find-limit", "--report", ""], "--report"),
            (&["--url", url, "-n", "5", "--report", ""], "--report"),
            (&["--url", url, "--find-limit", "--max", "0"], "--max"),
            (&["--url", url, "--find-limit", "--pid", "x"], "--pid"),
            (&["--url", url, "--find-limit", "--rate", "5"], "--rate"),
            (
                &["--url", url, "--find-limit", "--step-time", "0"],
                "--step-time",
            ),
            (
                &["--url", "http://127.0.0.1:1/sse", "--find-limit"],
                "--publish-url",
            ),
        ];
        let check = |list: &[&str], want: &str| {
            let err = parse(list).expect_err("invalid");
            assert!(err.contains(want), "{list:?}: {err:?} lacks {want:?}");
        };
        for (list, want) in table {
            check(list, want);
        }
        {
            check(
                &["--url", "https://127.0.0.1:1/events/a", "-n", "5"],
                "--cacert FILE",
            );
            check(
                &[
                    "--url",
                    "https://127.0.0.1:1/e",
                    "-n",
                    "5",
                    "--cacert",
                    "/nonexistent/ca.pem",
                ],
                "/nonexistent/ca.pem",
            );
        }
    }
}
