//! Connection strings, in the two forms libpq takes: a URL,
//! `postgres://user:password@host:port/dbname?key=value&…` (or
//! `postgresql://`), and `key=value` pairs separated by spaces,
//! `host=… port=… user=… password=… dbname=…`.
//!
//! The keys are libpq's that the `postgres` crate (which ssed used before
//! this client) took; any other is refused as unknown (libpq's
//! `sslrootcert` or `service` too, as before), so a typo does not go
//! unnoticed. URL parts are percent-decoded (the password to raw bytes, the
//! rest to UTF-8); a host that starts with `/` (`%2F` in the authority) is
//! the directory of a Unix socket. Several hosts may be given (`a,b:5433`
//! or `host=a,b port=5432,5433`); they are tried in turn. A URL's `host`
//! or `port` parameter replaces the authority's, as in libpq (the crate
//! added to it).
//!
//! There is no TLS here: `sslmode` `disable`, `allow` (which the crate
//! refused) and `prefer` (the default) connect in plain text, as the
//! `postgres` crate with `NoTls` did, while `require`, `verify-ca` and `verify-full`, and
//! `channel_binding=require`, are refused up front (with that crate they
//! failed at every connect). So is a string that names no host.
//!
//! Error messages name the option or the byte where parsing stopped, never
//! a value: the string may hold a password.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// The port when none is given.
pub(crate) const DEFAULT_PORT: u16 = 5432;
/// TCP keep-alive idle time unless `keepalives_idle` says otherwise (the
/// `postgres` crate's default).
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    /// A host name or an IP address, resolved at each connect.
    Tcp(String),
    /// The directory of the server's Unix socket (`{dir}/.s.PGSQL.{port}`).
    Unix(PathBuf),
}

/// What `target_session_attrs` asks of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionAttrs {
    /// Any server.
    Any,
    /// One that takes writes (`transaction_read_only` is `off`).
    ReadWrite,
    /// One that does not.
    ReadOnly,
}

/// A parsed connection string. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Config {
    /// The role; `None` means the operating system's user, as libpq does.
    pub user: Option<String>,
    /// Raw bytes: a percent-encoded URL password need not be UTF-8.
    pub password: Option<Vec<u8>>,
    /// The database; `None` lets the server use the user name.
    pub dbname: Option<String>,
    /// Command-line options for the server (`-c key=value`).
    pub options: Option<String>,
    /// Shown in `pg_stat_activity`.
    pub application_name: Option<String>,
    /// Tried in order (or shuffled, with `load_balance_hosts=random`).
    pub hosts: Vec<Host>,
    /// Numeric addresses that stand for the hosts of the same rank (or
    /// alone), so that no name is looked up.
    pub hostaddrs: Vec<IpAddr>,
    /// One for every host, or one for all; none means 5432.
    pub ports: Vec<u16>,
    /// Per address tried: the TCP connect and then the whole handshake.
    pub connect_timeout: Option<Duration>,
    /// `TCP_USER_TIMEOUT`: unacknowledged data fails the socket after it.
    pub tcp_user_timeout: Option<Duration>,
    /// TCP keep-alives (on unless `keepalives=0`).
    pub keepalives: bool,
    /// Idle time before the first keep-alive probe.
    pub keepalives_idle: Duration,
    /// Time between probes (the kernel's default when `None`).
    pub keepalives_interval: Option<Duration>,
    /// Probes before the connection is declared dead.
    pub keepalives_retries: Option<u32>,
    /// What the server must be.
    pub target_session_attrs: SessionAttrs,
    /// Hosts and addresses in random order rather than as given.
    pub load_balance_random: bool,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("target", &self.describe())
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("application_name", &self.application_name)
            .finish_non_exhaustive()
    }
}

/// Why a connection string was refused: `invalid connection string: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid connection string: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

fn invalid(option: &str) -> ConfigError {
    ConfigError(format!("invalid value for option `{option}`"))
}

/// Refusal of a setting that needs TLS.
fn needs_tls(setting: &str) -> ConfigError {
    ConfigError(format!(
        "{setting} needs TLS, which ssed's PostgreSQL client does not do: \
         connect over loopback, a Unix socket or a trusted network"
    ))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            user: None,
            password: None,
            dbname: None,
            options: None,
            application_name: None,
            hosts: Vec::new(),
            hostaddrs: Vec::new(),
            ports: Vec::new(),
            connect_timeout: None,
            tcp_user_timeout: None,
            keepalives: true,
            keepalives_idle: DEFAULT_KEEPALIVES_IDLE,
            keepalives_interval: None,
            keepalives_retries: None,
            target_session_attrs: SessionAttrs::Any,
            load_balance_random: false,
        }
    }
}

impl FromStr for Config {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Config, ConfigError> {
        let mut parsed = Parsed::default();
        match ["postgres://", "postgresql://"]
            .iter()
            .find_map(|p| s.strip_prefix(p))
        {
            Some(rest) => parse_url(rest, &mut parsed)?,
            None => parse_pairs(s, &mut parsed)?,
        }
        parsed.finish()
    }
}

impl Config {
    /// `postgres://user@host:port,host2:port/db`: what logs and errors may
    /// show (no password, no other option).
    pub(crate) fn describe(&self) -> String {
        let mut out = String::from("postgres://");
        if let Some(user) = &self.user {
            out.push_str(user);
            out.push('@');
        }
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    Host::Tcp(name) if name.contains(':') => format!("[{name}]"),
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                };
                // One port applies to every host; otherwise one per host.
                match self.ports.get(i).or(self.ports.first()) {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                }
            })
            .collect();
        if hosts.is_empty() {
            let addrs: Vec<String> = self.hostaddrs.iter().map(ToString::to_string).collect();
            out.push_str(&addrs.join(","));
        } else {
            out.push_str(&hosts.join(","));
        }
        if let Some(db) = &self.dbname {
            out.push('/');
            out.push_str(db);
        }
        out
    }

    /// How many hosts there are to try (hosts, or addresses alone).
    pub(crate) fn host_count(&self) -> usize {
        self.hosts.len().max(self.hostaddrs.len())
    }

    /// The port of host number `i`.
    pub(crate) fn port(&self, i: usize) -> u16 {
        self.ports
            .get(i)
            .or(self.ports.first())
            .copied()
            .unwrap_or(DEFAULT_PORT)
    }
}

/// TLS settings, checked once the whole string is read.
#[derive(Default)]
struct Parsed {
    config: Config,
    sslmode: Option<String>,
    channel_binding_required: bool,
}

impl Parsed {
    /// Sets `key` to `value` (already unquoted or percent-decoded).
    fn param(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let c = &mut self.config;
        match key {
            "user" => c.user = Some(value.to_owned()),
            "password" => c.password = Some(value.as_bytes().to_vec()),
            "dbname" => c.dbname = Some(value.to_owned()),
            "options" => c.options = Some(value.to_owned()),
            "application_name" => c.application_name = Some(value.to_owned()),
            "sslmode" => match value {
                "disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full" => {
                    self.sslmode = Some(value.to_owned());
                }
                _ => return Err(invalid(key)),
            },
            // How TLS would be negotiated: moot without TLS.
            "sslnegotiation" => {
                if !matches!(value, "postgres" | "direct") {
                    return Err(invalid(key));
                }
            }
            "channel_binding" => match value {
                "disable" | "prefer" => self.channel_binding_required = false,
                "require" => self.channel_binding_required = true,
                _ => return Err(invalid(key)),
            },
            "host" => {
                for host in value.split(',') {
                    c.hosts.push(host_of(host.as_bytes())?);
                }
            }
            "hostaddr" => {
                for addr in value.split(',') {
                    c.hostaddrs
                        .push(addr.trim().parse().map_err(|_| invalid(key))?);
                }
            }
            "port" => {
                for port in value.split(',') {
                    c.ports.push(if port.is_empty() {
                        DEFAULT_PORT
                    } else {
                        port.parse().map_err(|_| invalid(key))?
                    });
                }
            }
            "connect_timeout" => c.connect_timeout = seconds(key, value)?,
            "tcp_user_timeout" => c.tcp_user_timeout = seconds(key, value)?,
            "keepalives" => c.keepalives = value.parse::<u64>().map_err(|_| invalid(key))? != 0,
            "keepalives_idle" => {
                if let Some(idle) = seconds(key, value)? {
                    c.keepalives_idle = idle;
                }
            }
            "keepalives_interval" => {
                if let Some(interval) = seconds(key, value)? {
                    c.keepalives_interval = Some(interval);
                }
            }
            "keepalives_retries" => {
                c.keepalives_retries = Some(value.parse().map_err(|_| invalid(key))?);
            }
            "target_session_attrs" => {
                c.target_session_attrs = match value {
                    "any" => SessionAttrs::Any,
                    "read-write" => SessionAttrs::ReadWrite,
                    "read-only" => SessionAttrs::ReadOnly,
                    _ => return Err(invalid(key)),
                };
            }
            "load_balance_hosts" => {
                c.load_balance_random = match value {
                    "disable" => false,
                    "random" => true,
                    _ => return Err(invalid(key)),
                };
            }
            _ => return Err(ConfigError(format!("unknown option `{key}`"))),
        }
        Ok(())
    }

    /// Refuses what can never connect.
    fn finish(self) -> Result<Config, ConfigError> {
        let c = self.config;
        if let Some(mode @ ("require" | "verify-ca" | "verify-full")) = self.sslmode.as_deref() {
            return Err(needs_tls(&format!("sslmode={mode}")));
        }
        if self.channel_binding_required {
            return Err(needs_tls("channel_binding=require"));
        }
        if c.hosts.is_empty() && c.hostaddrs.is_empty() {
            return Err(ConfigError(
                "no host: name one (a Unix socket's directory such as \
                 /var/run/postgresql, or a TCP host)"
                    .to_owned(),
            ));
        }
        if !c.hosts.is_empty() && !c.hostaddrs.is_empty() && c.hosts.len() != c.hostaddrs.len() {
            return Err(ConfigError(format!(
                "number of hosts ({}) is different from number of hostaddrs ({})",
                c.hosts.len(),
                c.hostaddrs.len()
            )));
        }
        if c.ports.len() > 1 && c.ports.len() != c.host_count() {
            return Err(ConfigError(format!(
                "{} ports for {} hosts: give one port, or one per host",
                c.ports.len(),
                c.host_count()
            )));
        }
        Ok(c)
    }
}

/// A whole number of seconds; zero or less means "not set", as in libpq.
fn seconds(key: &str, value: &str) -> Result<Option<Duration>, ConfigError> {
    let n = value.trim().parse::<i64>().map_err(|_| invalid(key))?;
    Ok((n > 0).then(|| Duration::from_secs(n.unsigned_abs())))
}

/// A host as given: a Unix socket directory when it starts with `/`.
fn host_of(bytes: &[u8]) -> Result<Host, ConfigError> {
    if bytes.first() == Some(&b'/') {
        use std::os::unix::ffi::OsStrExt as _;
        return Ok(Host::Unix(PathBuf::from(std::ffi::OsStr::from_bytes(
            bytes,
        ))));
    }
    let name = std::str::from_utf8(bytes).map_err(|_| invalid("host"))?;
    if name.is_empty() {
        return Err(invalid("host"));
    }
    Ok(Host::Tcp(name.to_owned()))
}

// ---------------------------------------------------------------------------
// URLs
// ---------------------------------------------------------------------------

/// `[user[:password]@][host[:port][,…]][/dbname][?key=value&…]`, after the
/// scheme. The credentials end at the last `@` before any `?` (no host
/// holds one), so a password may hold an unencoded `/` or `@`, and no part
/// of it is ever read as a host (which errors and logs would show).
fn parse_url(s: &str, p: &mut Parsed) -> Result<(), ConfigError> {
    let query_at = s.find('?').unwrap_or(s.len());
    let s = match s[..query_at].rfind('@') {
        Some(at) => {
            let creds = &s[..at];
            let (user, password) = match creds.split_once(':') {
                Some((u, pw)) => (u, Some(pw)),
                None => (creds, None),
            };
            let user = decode_utf8(user, "user")?;
            // An empty user name is no user name: the default applies.
            if !user.is_empty() {
                p.config.user = Some(user);
            }
            if let Some(pw) = password {
                p.config.password = Some(percent_decode(pw));
            }
            &s[at + 1..]
        }
        None => s,
    };

    let end = s.find(['/', '?']).unwrap_or(s.len());
    let (authority, s) = s.split_at(end);
    if !authority.is_empty() {
        for chunk in authority.split(',') {
            let (host, port) = match chunk.strip_prefix('[') {
                Some(v6) => {
                    let (host, rest) = v6.split_once(']').ok_or_else(|| invalid("host"))?;
                    let port = match rest {
                        "" => None,
                        _ => Some(rest.strip_prefix(':').ok_or_else(|| invalid("host"))?),
                    };
                    (host, port)
                }
                None => match chunk.split_once(':') {
                    Some((h, port)) => (h, Some(port)),
                    None => (chunk, None),
                },
            };
            p.config.hosts.push(host_of(&percent_decode(host))?);
            let port = decode_utf8(port.unwrap_or(""), "port")?;
            p.param("port", &port)?;
        }
    }

    let s = match s.strip_prefix('/') {
        Some(path) => {
            let end = path.find('?').unwrap_or(path.len());
            if end > 0 {
                p.config.dbname = Some(decode_utf8(&path[..end], "dbname")?);
            }
            &path[end..]
        }
        None => s,
    };

    let Some(query) = s.strip_prefix('?') else {
        return Ok(());
    };
    // As in libpq, `host` and `port` parameters replace what the authority
    // gave (the `postgres` crate added to it: `h/db?port=5433` then had two
    // ports for one host, and failed at every connect).
    let (mut hosts_replaced, mut ports_replaced) = (false, false);
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| ConfigError("unterminated parameter".to_owned()))?;
        let key = decode_utf8(key, "key")?;
        if key == "host" && !std::mem::replace(&mut hosts_replaced, true) {
            p.config.hosts.clear();
        }
        if key == "port" && !std::mem::replace(&mut ports_replaced, true) {
            p.config.ports.clear();
        }
        if key == "password" {
            p.config.password = Some(percent_decode(value));
        } else {
            let value = decode_utf8(value, &key)?;
            p.param(&key, &value)?;
        }
    }
    Ok(())
}

/// Percent-decodes `s` to bytes; a `%` not followed by two hex digits stays.
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            )
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Percent-decodes `s` to UTF-8 text, naming `what` if it is not.
fn decode_utf8(s: &str, what: &str) -> Result<String, ConfigError> {
    String::from_utf8(percent_decode(s))
        .map_err(|_| ConfigError(format!("invalid UTF-8 in the percent-encoded {what}")))
}

// ---------------------------------------------------------------------------
// key=value pairs
// ---------------------------------------------------------------------------

/// `key=value key2='quoted value'…`: whitespace around `=` is allowed, a
/// value with spaces (or an empty one) goes in single quotes, and `\`
/// escapes the next character in either kind of value.
fn parse_pairs(s: &str, p: &mut Parsed) -> Result<(), ConfigError> {
    let mut it = s.char_indices().peekable();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut it);
        let Some(&(start, _)) = it.peek() else {
            return Ok(());
        };
        let mut end = s.len();
        while let Some(&(i, c)) = it.peek() {
            if c.is_whitespace() || c == '=' {
                end = i;
                break;
            }
            it.next();
        }
        let key = &s[start..end];
        skip_ws(&mut it);
        // What came before is no key without its `=`, and may be a
        // password pasted alone: say where, not what.
        match it.next() {
            Some((_, '=')) => {}
            Some((i, _)) => return Err(ConfigError(format!("expected `=` at byte {i}"))),
            None => {
                return Err(ConfigError(format!(
                    "expected `=` after the word at byte {start}"
                )));
            }
        }
        skip_ws(&mut it);
        let quoted = it.next_if(|&(_, c)| c == '\'').is_some();
        let mut value = String::new();
        let mut closed = false;
        while let Some(&(_, c)) = it.peek() {
            if quoted && c == '\'' {
                it.next();
                closed = true;
                break;
            }
            if !quoted && c.is_whitespace() {
                break;
            }
            it.next();
            if c == '\\' {
                if let Some((_, escaped)) = it.next() {
                    value.push(escaped);
                }
            } else {
                value.push(c);
            }
        }
        if quoted && !closed {
            return Err(ConfigError(format!("unterminated quoted value of `{key}`")));
        }
        if !quoted && value.is_empty() {
            return Err(ConfigError(format!(
                "`{key}` has no value (write an empty one as '')"
            )));
        }
        p.param(key, &value)?;
    }
}

// ---------------------------------------------------------------------------
// The default user
// ---------------------------------------------------------------------------

/// The name of the operating system user this process runs as (its
/// effective uid, looked up in `/etc/passwd`): the role libpq and the
/// `postgres` crate log in as when the string names none.
pub(crate) fn os_user() -> Option<String> {
    let uid = rustix::process::geteuid().as_raw().to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)? == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Config {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn error(s: &str) -> String {
        match s.parse::<Config>() {
            Ok(c) => panic!("{s:?} should not parse: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn tcp(name: &str) -> Host {
        Host::Tcp(name.to_owned())
    }

    #[test]
    fn an_unencoded_at_sign_stays_in_the_password() {
        let c = parse("postgres://app:p@ss@db.example/prod");
        assert_eq!(c.password.as_deref(), Some(&b"p@ss"[..]));
        assert_eq!(c.hosts, [tcp("db.example")]);
        assert!(!c.describe().contains("ss@"), "{}", c.describe());
    }

    #[test]
    fn urls() {
        let c = parse(
            "postgres://app:s3cret@db.example:5433/prod?application_name=x&connect_timeout=3",
        );
        assert_eq!(c.user.as_deref(), Some("app"));
        assert_eq!(c.password.as_deref(), Some(&b"s3cret"[..]));
        assert_eq!(c.hosts, [tcp("db.example")]);
        assert_eq!(c.ports, [5433]);
        assert_eq!(c.dbname.as_deref(), Some("prod"));
        assert_eq!(c.application_name.as_deref(), Some("x"));
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(3)));

        // Every part is optional but a host; the port defaults per host.
        let c = parse("postgresql://localhost");
        assert_eq!((c.user, c.password, c.dbname), (None, None, None));
        assert_eq!(c.hosts, [tcp("localhost")]);
        assert_eq!(c.ports, [5432]);

        // IPv6 in brackets, several hosts, ports per host.
        let c = parse("postgres://u@[::1]:6000,10.0.0.2,[fe80::1%25eth0]/db");
        assert_eq!(c.hosts, [tcp("::1"), tcp("10.0.0.2"), tcp("fe80::1%eth0")]);
        assert_eq!(c.ports, [6000, 5432, 5432]);
        assert_eq!(c.port(1), 5432);

        // A Unix socket directory, in the authority or as a parameter.
        let c = parse("postgres://u@%2Fvar%2Frun%2Fpostgresql/db");
        assert_eq!(c.hosts, [Host::Unix("/var/run/postgresql".into())]);
        let c = parse("postgresql:///mydb?user=me&host=/var/run/postgresql&port=5433");
        assert_eq!(c.hosts, [Host::Unix("/var/run/postgresql".into())]);
        assert_eq!(c.ports, [5433]);
        assert_eq!(c.user.as_deref(), Some("me"));
        assert_eq!(c.dbname.as_deref(), Some("mydb"));

        // Parameters replace the authority's host and port, as in libpq.
        let c = parse("postgres://u@a/db?port=5433");
        assert_eq!((c.hosts, c.ports), (vec![tcp("a")], vec![5433]));
        let c = parse("postgres://u@a:1,b:2/db?host=/tmp,c&port=3");
        assert_eq!(c.hosts, [Host::Unix("/tmp".into()), tcp("c")]);
        assert_eq!(c.ports, [3]);
    }

    #[test]
    fn url_credentials_are_percent_decoded() {
        let c = parse("postgres://us%40er:p%40ss%3Aw%2Fo%20rd%25@h/d%20b");
        assert_eq!(c.user.as_deref(), Some("us@er"));
        assert_eq!(c.password.as_deref(), Some(&b"p@ss:w/o rd%"[..]));
        assert_eq!(c.dbname.as_deref(), Some("d b"));
        // Not UTF-8: a password is bytes.
        let c = parse("postgres://u:%FF%00x@h");
        assert_eq!(c.password.as_deref(), Some(&b"\xff\0x"[..]));
        // A bad escape stays as it is; an unencoded `/` in a password works.
        let c = parse("postgres://u:a%zz/b@h/db");
        assert_eq!(c.password.as_deref(), Some(&b"a%zz/b"[..]));
        assert_eq!(c.hosts, [tcp("h")]);
        // An `@` in a parameter is no credential.
        let c = parse("postgres://h/db?application_name=a@b");
        assert_eq!(c.user, None);
        assert_eq!(c.application_name.as_deref(), Some("a@b"));
        // Password as a parameter, percent-decoded to bytes.
        let c = parse("postgres://u@h?password=%C3%A9t%C3%A9");
        assert_eq!(c.password.as_deref(), Some("été".as_bytes()));
        // An empty user name means the default.
        assert_eq!(parse("postgres://:pw@h").user, None);
    }

    #[test]
    fn key_value_pairs() {
        let c = parse(
            "host=127.0.0.1 port=5433 user=postgres password='with spaces \\' and quote' \
             dbname = test application_name=ssed-x connect_timeout=7 keepalives=0 \
             tcp_user_timeout=0 sslmode=disable",
        );
        assert_eq!(c.hosts, [tcp("127.0.0.1")]);
        assert_eq!(c.ports, [5433]);
        assert_eq!(c.user.as_deref(), Some("postgres"));
        assert_eq!(c.password.as_deref(), Some(&b"with spaces ' and quote"[..]));
        assert_eq!(c.dbname.as_deref(), Some("test"));
        assert_eq!(c.application_name.as_deref(), Some("ssed-x"));
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(7)));
        assert_eq!(c.tcp_user_timeout, None, "0 is unset");
        assert!(!c.keepalives);

        let c = parse("host=/var/run/postgresql,db2 port=5432,5433 password='' user=a\\ b");
        assert_eq!(
            c.hosts,
            [Host::Unix("/var/run/postgresql".into()), tcp("db2")]
        );
        assert_eq!(c.ports, [5432, 5433]);
        assert_eq!(c.password.as_deref(), Some(&b""[..]));
        assert_eq!(c.user.as_deref(), Some("a b"));

        let c = parse(
            "hostaddr=127.0.0.1,::1 port=1 target_session_attrs=read-write \
             load_balance_hosts=random keepalives_idle=60 keepalives_interval=5 \
             keepalives_retries=3 options='-c search_path=x' sslmode=prefer channel_binding=prefer",
        );
        assert_eq!(c.hosts, []);
        assert_eq!(
            c.hostaddrs,
            [
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(c.target_session_attrs, SessionAttrs::ReadWrite);
        assert!(c.load_balance_random);
        assert_eq!(c.keepalives_idle, Duration::from_secs(60));
        assert_eq!(c.keepalives_interval, Some(Duration::from_secs(5)));
        assert_eq!(c.keepalives_retries, Some(3));
        assert_eq!(c.options.as_deref(), Some("-c search_path=x"));
        assert_eq!(c.describe(), "postgres://127.0.0.1,::1");
    }

    #[test]
    fn invalid_strings_say_why_without_values() {
        let table = [
            ("postgres://u@h:port/db", "invalid value for option `port`"),
            (
                "postgres://u:s3cret@h:70000/db",
                "invalid value for option `port`",
            ),
            ("postgres://u@[::1/db", "invalid value for option `host`"),
            ("postgres://u@[::1]x/db", "invalid value for option `host`"),
            ("postgres://u@a,,b/db", "invalid value for option `host`"),
            ("postgres://u@h/db?s3cret", "unterminated parameter"),
            ("postgres://u@h/db?foo=s3cret", "unknown option `foo`"),
            (
                "postgres://u@h/db?sslmode=s3cret",
                "invalid value for option `sslmode`",
            ),
            (
                "postgres://u@h/db?sslmode=require",
                "sslmode=require needs TLS",
            ),
            (
                "host=h sslmode=verify-full",
                "sslmode=verify-full needs TLS",
            ),
            (
                "host=h channel_binding=require",
                "channel_binding=require needs TLS",
            ),
            ("postgres://u:s3cret@/db", "no host"),
            ("user=u password=s3cret", "no host"),
            ("", "no host"),
            ("host=h password s3cret", "expected `=` at byte 16"),
            ("host=h password=", "`password` has no value"),
            ("host=h password", "expected `=` after the word at byte 7"),
            (
                "host=h password='s3cret",
                "unterminated quoted value of `password`",
            ),
            (
                "host=h hostaddr=s3cret",
                "invalid value for option `hostaddr`",
            ),
            ("host=a,b hostaddr=127.0.0.1", "number of hosts (2)"),
            ("host=a,b,c port=1,2", "2 ports for 3 hosts"),
            (
                "host=h connect_timeout=soon",
                "invalid value for option `connect_timeout`",
            ),
            (
                "host=h target_session_attrs=primary",
                "`target_session_attrs`",
            ),
            (
                "postgres://%FF@h",
                "invalid UTF-8 in the percent-encoded user",
            ),
            ("s3cret", "expected `=` after the word at byte 0"),
        ];
        for (s, want) in table {
            let got = error(s);
            assert!(
                got.starts_with("invalid connection string: "),
                "{s:?}: {got}"
            );
            assert!(got.contains(want), "{s:?}: {got}");
            assert!(!got.contains("s3cret"), "{s:?}: {got}");
        }
    }

    #[test]
    fn plain_sslmodes_connect_in_plain_text() {
        for mode in ["disable", "allow", "prefer"] {
            parse(&format!(
                "postgres://u@h/db?sslmode={mode}&sslnegotiation=postgres"
            ));
        }
    }

    #[test]
    fn descriptions_hide_the_password() {
        let table = [
            (
                "postgres://app:s3cret@db.example:5433/prod?sslmode=disable",
                "postgres://app@db.example:5433/prod",
            ),
            (
                "host=127.0.0.1 user=postgres password=s3cret dbname=test",
                "postgres://postgres@127.0.0.1/test",
            ),
            (
                "postgres://u:s3cret@a,b:5432/db",
                "postgres://u@a:5432,b:5432/db",
            ),
            (
                "postgres://u:s3cret@%2Fvar%2Frun%2Fpostgresql/db",
                "postgres://u@/var/run/postgresql:5432/db",
            ),
            ("postgres://u:s3cret@[::1]:7/db", "postgres://u@[::1]:7/db"),
            ("host=a,b port=1,2", "postgres://a:1,b:2"),
        ];
        for (url, want) in table {
            let c = parse(url);
            assert_eq!(c.describe(), want, "{url}");
            let debug = format!("{c:?}");
            assert!(!debug.contains("s3cret"), "{debug}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Whatever the string, parsing returns.
        #[test]
        fn any_string_parses_or_says_why(s in "\\PC{0,120}") {
            let _ = s.parse::<Config>();
            let _ = format!("postgres://{s}").parse::<Config>();
        }

        /// Any password bytes survive percent-encoding, and never show.
        #[test]
        fn any_password_round_trips(password in proptest::collection::vec(0u8..=255, 1..40)) {
            let encoded: String = password.iter().map(|b| format!("%{b:02X}")).collect();
            let c = parse(&format!("postgres://u:{encoded}@h/db"));
            proptest::prop_assert_eq!(c.password.as_deref(), Some(&password[..]));
            let shown = format!("{} {c:?}", c.describe());
            proptest::prop_assert!(!shown.contains(&encoded), "{}", shown);
        }
    }

    #[test]
    fn the_os_user_is_found() {
        // Whatever this runs as has a passwd entry on the test machines.
        let user = os_user().expect("the current user in /etc/passwd");
        assert!(!user.is_empty());
    }
}
