//! The daemon's configuration: defaults, the TOML file, the environment.
//!
//! The file is parsed into a table and read key by key, so every error names
//! its key (and the file) rather than a position in a serde type.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

mod tls;

use super::jwt::{Alg, JwtVerifier, PublicKey};
use crate::{IpNet, IpNetError, Rate, RateError};

/// The smallest `max_retained_bytes` accepted (besides 0, derived): a
/// budget below it would drop history as soon as it was written.
pub const MIN_RETAINED_BYTES: u64 = 1024 * 1024;

/// Where the publish token may also come from.
pub const ENV_PUBLISH_TOKEN: &str = "SSED_PUBLISH_TOKEN";
/// Where the subscribe token may also come from.
pub const ENV_SUBSCRIBE_TOKEN: &str = "SSED_SUBSCRIBE_TOKEN";
/// Where the operators' token (`[auth] admin_token`) may also come from.
pub const ENV_ADMIN_TOKEN: &str = "SSED_ADMIN_TOKEN";
/// Environment variable that sets `[auth] jwt_secret`.
pub const ENV_JWT_SECRET: &str = "SSED_JWT_SECRET";
/// The default of `[auth] jwt_cookie`, Mercure's cookie name.
pub const DEFAULT_JWT_COOKIE: &str = "mercureAuthorization";

/// What a stream past the cap gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverloadMode {
    /// `503` with `Retry-After`.
    Reject,
    /// `EventSource` clients get `200`, a jittered `retry:` and a close.
    Retry,
}

/// One `[[postgres]]` table.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// The connection URL.
    pub url: String,
    /// Channels to `LISTEN` on.
    pub channels: Vec<String>,
    /// `topic`: the topic every channel publishes to; `None` publishes each
    /// channel to the topic of the same name.
    pub topic: Option<String>,
}

impl PostgresConfig {
    /// `(channel, topic)` pairs, as [`Listener::start`](crate::bridge::postgres::Listener::start) takes them.
    pub fn routes(&self) -> Vec<(String, String)> {
        self.channels
            .iter()
            .map(|c| (c.clone(), self.topic.clone().unwrap_or_else(|| c.clone())))
            .collect()
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: show only where it points.
        let url = self
            .url
            .parse::<crate::bridge::postgres::Config>()
            .map_or_else(
                |_| "<invalid>".to_owned(),
                |c| crate::bridge::postgres::describe(&c),
            );
        f.debug_struct("PostgresConfig")
            .field("url", &url)
            .field("channels", &self.channels)
            .field("topic", &self.topic)
            .finish()
    }
}

/// Every setting of the daemon.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// `listen`: address to listen on. Default `127.0.0.1:8080`.
    pub listen: String,
    /// `max_connections`: the stream cap; `None` derives it from the machine.
    pub max_connections: Option<usize>,
    /// `max_execution_time`: stream budget; zero is unlimited. Default 30 s.
    pub max_execution_time: Duration,
    /// `heartbeat`: keep-alive interval; zero is off. Default 15 s.
    pub heartbeat: Duration,
    /// `heartbeat_event`: `event: ping` instead of a comment. Default false.
    pub heartbeat_event: bool,
    /// `retry`: sent as `retry:` when a stream opens; zero sends none. Default 3 s.
    pub retry: Duration,
    /// `history`: events kept per topic. Default 1000.
    pub history: usize,
    /// `request_timeout`: time to receive a request head and body. Default 10 s.
    pub request_timeout: Duration,
    /// `write_timeout`: time one write may block. Default 10 s.
    pub write_timeout: Duration,
    /// `max_body`: bytes per published message. Default 65536.
    pub max_body: usize,
    /// `stack_size`: bytes of stack per connection thread. Default 65536.
    pub stack_size: usize,
    /// `cors_origins`: origins allowed to subscribe cross-origin; `*` for any.
    pub cors_origins: Vec<String>,
    /// `overload`: `"503"` or `"retry"`. Default `"503"`.
    pub overload: OverloadMode,
    /// `overload_retry`: range of the jittered `retry:`. Default 5 s to 15 s.
    pub overload_retry: (Duration, Duration),
    /// `ticket_session`: lifetime of a ticket's session cookie. Default 1 h.
    pub ticket_session: Duration,
    /// `data_dir`: where history and undelivered mailbox messages are kept
    /// (SQLite); `None` keeps them in memory.
    pub data_dir: Option<PathBuf>,
    /// `max_retained_bytes`: memory for retained events and mailbox
    /// messages together; `None` derives it from the machine's (or the
    /// cgroup's) memory.
    pub max_retained_bytes: Option<u64>,
    /// `allowed_hosts`: `Host` names besides IP literals and `localhost`
    /// that get the loopback privileges when no publish credential is set.
    pub allowed_hosts: Vec<String>,
    /// `max_streams_per_client`: streams one client (its address) may hold
    /// at once; 0 = no limit. Default 0.
    pub max_streams_per_client: usize,
    /// `publish_rate`: publishes (and mailbox pushes) per publisher
    /// credential, else per address; `None` = no limit. Default none.
    pub publish_rate: Option<Rate>,
    /// `trusted_proxies`: peers whose forwarded headers are believed for
    /// the client's address and scheme. Default none.
    pub trusted_proxies: Vec<IpNet>,
    /// `[auth] publish_token`, or `SSED_PUBLISH_TOKEN`.
    pub publish_token: Option<String>,
    /// `[auth] subscribe_token`, or `SSED_SUBSCRIBE_TOKEN`.
    pub subscribe_token: Option<String>,
    /// `[auth] admin_token`, or `SSED_ADMIN_TOKEN`: guards the operators'
    /// endpoints (`/streams`); none: this machine only.
    pub admin_token: Option<String>,
    /// `[auth] anonymous`: whether a subscriber with no credential may
    /// subscribe (to public updates of topics). `None`: yes unless a
    /// subscriber credential (subscribe token, JWT key) is configured.
    pub anonymous: Option<bool>,
    /// `[auth] jwt_secret`, or `SSED_JWT_SECRET`: the HMAC key of HS256,
    /// HS384 and HS512 tokens.
    pub jwt_secret: Option<String>,
    /// `[auth] jwt_public_key`: the PEM file of the key that verifies
    /// ES256, RS256 or EdDSA tokens, and the key read from it.
    pub jwt_public_key: Option<(PathBuf, PublicKey)>,
    /// `[auth] jwt_algorithms`: the algorithms accepted; empty: what the
    /// configured keys verify.
    pub jwt_algorithms: Vec<Alg>,
    /// `[auth] jwt_issuer`: the `iss` an `at+jwt` token must carry.
    pub jwt_issuer: Option<String>,
    /// `[auth] jwt_audience`: this hub's identifier, required in an
    /// `at+jwt` token's `aud`.
    pub jwt_audience: Option<String>,
    /// `[auth] jwt_cookie`: the cookie a browser's JWT comes in.
    pub jwt_cookie: String,
    /// `[redis] url`.
    pub redis_url: Option<String>,
    /// `[mercure] subscriptions`: Mercure's active subscriptions (the
    /// private subscription updates and the subscriptions API). Default
    /// false.
    pub mercure_subscriptions: bool,
    /// `[[postgres]]` tables.
    pub postgres: Vec<PostgresConfig>,
    /// `[tls] cert` and `key`, read, or the files ACME keeps them in:
    /// `listen` serves HTTPS only.
    pub tls: Option<crate::tls::Certificates>,
    /// `[tls] acme_*`: certificates obtained from an ACME CA.
    pub acme: Option<crate::daemon::acme::AcmeConfig>,
    /// `[tls] redirect_http`: a plain-HTTP listener that answers ACME
    /// `http-01` challenges and redirects the rest to HTTPS.
    pub redirect_http: Option<String>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens never reach a log line, not even a debug one.
        let redact = |t: &Option<String>| t.as_ref().map(|_| "<set>");
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .field("max_execution_time", &self.max_execution_time)
            .field("heartbeat", &self.heartbeat)
            .field("heartbeat_event", &self.heartbeat_event)
            .field("retry", &self.retry)
            .field("history", &self.history)
            .field("request_timeout", &self.request_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("max_body", &self.max_body)
            .field("stack_size", &self.stack_size)
            .field("cors_origins", &self.cors_origins)
            .field("overload", &self.overload)
            .field("overload_retry", &self.overload_retry)
            .field("ticket_session", &self.ticket_session)
            .field("data_dir", &self.data_dir)
            .field("max_retained_bytes", &self.max_retained_bytes)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("max_streams_per_client", &self.max_streams_per_client)
            .field("publish_rate", &self.publish_rate)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("publish_token", &redact(&self.publish_token))
            .field("subscribe_token", &redact(&self.subscribe_token))
            .field("admin_token", &redact(&self.admin_token))
            .field("anonymous", &self.anonymous)
            .field("jwt_secret", &redact(&self.jwt_secret))
            .field(
                "jwt_public_key",
                &self.jwt_public_key.as_ref().map(|(p, _)| p),
            )
            .field("jwt_algorithms", &self.jwt_algorithms)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_cookie", &self.jwt_cookie)
            .field("redis_url", &self.redis_url)
            .field("mercure_subscriptions", &self.mercure_subscriptions)
            .field("postgres", &self.postgres)
            .field("tls", &self.tls)
            .field("acme", &self.acme)
            .field("redirect_http", &self.redirect_http)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            max_connections: None,
            max_execution_time: Duration::from_secs(30),
            heartbeat: Duration::from_secs(15),
            heartbeat_event: false,
            retry: Duration::from_secs(3),
            history: 1000,
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_body: 65536,
            stack_size: 65536,
            cors_origins: Vec::new(),
            overload: OverloadMode::Reject,
            overload_retry: (Duration::from_secs(5), Duration::from_secs(15)),
            ticket_session: Duration::from_secs(3600),
            data_dir: None,
            max_retained_bytes: None,
            allowed_hosts: Vec::new(),
            max_streams_per_client: 0,
            publish_rate: None,
            trusted_proxies: Vec::new(),
            publish_token: None,
            subscribe_token: None,
            admin_token: None,
            anonymous: None,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_algorithms: Vec::new(),
            jwt_issuer: None,
            jwt_audience: None,
            jwt_cookie: DEFAULT_JWT_COOKIE.into(),
            redis_url: None,
            mercure_subscriptions: false,
            postgres: Vec::new(),
            tls: None,
            acme: None,
            redirect_http: None,
        }
    }
}

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key is unknown, has the wrong type, or a bad value.
    Key {
        /// The file, or `None` for a value from the command line.
        path: Option<PathBuf>,
        /// The key, dotted for tables (`auth.publish_token`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    fn key(path: Option<&Path>, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Key {
            path: path.map(Path::to_path_buf),
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, .. } => {
                write!(f, "cannot read config file {}", path.display())
            }
            ConfigError::Syntax { path, message } => {
                write!(
                    f,
                    "config file {}: invalid TOML: {}",
                    path.display(),
                    message.trim()
                )
            }
            ConfigError::Key {
                path: Some(path),
                key,
                message,
            } => write!(f, "config file {}: key `{key}`: {message}", path.display()),
            ConfigError::Key {
                path: None,
                key,
                message,
            } => write!(f, "{key}: {message}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Config {
    /// Reads `path` over the defaults.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file and, for a bad key or value, the key.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, Some(path))
    }

    /// Parses TOML text over the defaults; `path` names the source in errors.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] as for [`from_file`](Config::from_file).
    pub fn from_toml(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.map_or_else(|| PathBuf::from("<config>"), Path::to_path_buf),
                message: e.to_string(),
            })?;
        let mut c = Config::default();
        let r = Reader { path };
        let mut tls_table = None;
        for (key, value) in &table {
            match key.as_str() {
                "listen" => {
                    let s = r.string(key, value)?;
                    check_listen(&s).map_err(|m| ConfigError::key(path, key, m))?;
                    c.listen = s;
                }
                "max_connections" => {
                    let n = r.integer(key, value, 0, u32::MAX as i64)?;
                    c.max_connections = (n > 0).then_some(n as usize);
                }
                "max_execution_time" => c.max_execution_time = r.duration(key, value)?,
                "heartbeat" => c.heartbeat = r.duration(key, value)?,
                "heartbeat_event" => c.heartbeat_event = r.boolean(key, value)?,
                "retry" => c.retry = r.duration(key, value)?,
                "history" => c.history = r.integer(key, value, 0, 10_000_000)? as usize,
                "request_timeout" => c.request_timeout = r.nonzero_duration(key, value)?,
                "write_timeout" => c.write_timeout = r.nonzero_duration(key, value)?,
                "max_body" => c.max_body = r.integer(key, value, 1, 1 << 30)? as usize,
                "stack_size" => {
                    c.stack_size =
                        r.integer(key, value, crate::MIN_STACK_SIZE as i64, 1 << 30)? as usize;
                }
                "cors_origins" => c.cors_origins = r.strings(key, value)?,
                "overload" => {
                    c.overload = match r.string(key, value)?.as_str() {
                        "503" => OverloadMode::Reject,
                        "retry" => OverloadMode::Retry,
                        other => {
                            return Err(ConfigError::key(
                                path,
                                key,
                                format!("expected \"503\" or \"retry\", found {other:?}"),
                            ));
                        }
                    };
                }
                "overload_retry" => {
                    let items = r.strings(key, value)?;
                    let [min, max] = items.as_slice() else {
                        return Err(ConfigError::key(
                            path,
                            key,
                            "expected two durations, [\"5s\", \"15s\"]",
                        ));
                    };
                    let min = parse_duration(min).map_err(|m| ConfigError::key(path, key, m))?;
                    let max = parse_duration(max).map_err(|m| ConfigError::key(path, key, m))?;
                    if min > max || max.is_zero() {
                        return Err(ConfigError::key(
                            path,
                            key,
                            "expected [shortest, longest] with longest > 0",
                        ));
                    }
                    c.overload_retry = (min, max);
                }
                "ticket_session" => c.ticket_session = r.nonzero_duration(key, value)?,
                "data_dir" => {
                    let s = r.string(key, value)?;
                    c.data_dir = (!s.is_empty()).then(|| PathBuf::from(s));
                }
                "max_retained_bytes" => {
                    let n = r.integer(key, value, 0, i64::MAX)?;
                    if n > 0 && n < MIN_RETAINED_BYTES as i64 {
                        return Err(ConfigError::key(
                            path,
                            key,
                            format!(
                                "{n} bytes is too little to keep anything useful: use 0 (derived) \
                                 or at least {MIN_RETAINED_BYTES}"
                            ),
                        ));
                    }
                    c.max_retained_bytes = (n > 0).then_some(n as u64);
                }
                "allowed_hosts" => {
                    let hosts = r.strings(key, value)?;
                    if let Some(bad) = hosts.iter().find(|h| !valid_host_name(h)) {
                        return Err(ConfigError::key(
                            path,
                            key,
                            format!(
                                "{bad:?} is not a host name: list names as clients send them \
                                 in Host, without port or scheme (\"ssed.example.com\")"
                            ),
                        ));
                    }
                    c.allowed_hosts = hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect();
                }
                "max_streams_per_client" => {
                    c.max_streams_per_client = r.integer(key, value, 0, u32::MAX as i64)? as usize;
                }
                "publish_rate" => {
                    let s = r.string(key, value)?;
                    c.publish_rate =
                        if s.trim().is_empty() {
                            None
                        } else {
                            Some(s.parse().map_err(|e: RateError| {
                                ConfigError::key(path, key, e.to_string())
                            })?)
                        };
                }
                "trusted_proxies" => {
                    c.trusted_proxies = r
                        .strings(key, value)?
                        .iter()
                        .map(|s| s.parse())
                        .collect::<Result<_, IpNetError>>()
                        .map_err(|e| ConfigError::key(path, key, e.to_string()))?;
                }
                "auth" => {
                    let t = r.table(key, value)?;
                    for (k, v) in t {
                        let full = format!("auth.{k}");
                        let text = |r: &Reader<'_>| -> Result<Option<String>, ConfigError> {
                            let s = r.string(&full, v)?;
                            Ok((!s.is_empty()).then_some(s))
                        };
                        match k.as_str() {
                            "publish_token" => c.publish_token = text(&r)?,
                            "subscribe_token" => c.subscribe_token = text(&r)?,
                            "admin_token" => c.admin_token = text(&r)?,
                            "anonymous" => c.anonymous = Some(r.boolean(&full, v)?),
                            "jwt_secret" => c.jwt_secret = text(&r)?,
                            "jwt_public_key" => {
                                c.jwt_public_key = match text(&r)? {
                                    None => None,
                                    Some(p) => Some(
                                        read_public_key(Path::new(&p))
                                            .map_err(|m| ConfigError::key(path, &full, m))?,
                                    ),
                                };
                            }
                            "jwt_algorithms" => {
                                c.jwt_algorithms = r
                                    .strings(&full, v)?
                                    .iter()
                                    .map(|name| {
                                        Alg::from_name(name).ok_or_else(|| {
                                            ConfigError::key(
                                                path,
                                                &full,
                                                format!(
                                                    "unknown algorithm {name:?}: use HS256, \
                                                     HS384, HS512, ES256, RS256 or EdDSA"
                                                ),
                                            )
                                        })
                                    })
                                    .collect::<Result<_, _>>()?;
                            }
                            "jwt_issuer" => c.jwt_issuer = text(&r)?,
                            "jwt_audience" => c.jwt_audience = text(&r)?,
                            "jwt_cookie" => {
                                let name = r.string(&full, v)?;
                                if !valid_cookie_name(&name) {
                                    return Err(ConfigError::key(
                                        path,
                                        &full,
                                        format!("{name:?} is not a cookie name"),
                                    ));
                                }
                                c.jwt_cookie = name;
                            }
                            _ => return Err(r.unknown("auth.", k)),
                        }
                    }
                    c.check_jwt(false)
                        .map_err(|(key, m)| ConfigError::key(path, key, m))?;
                }
                // Read after the rest: `acme_cache` defaults under data_dir.
                "tls" => tls_table = Some(r.table(key, value)?),
                "redis" => {
                    let t = r.table(key, value)?;
                    for (k, v) in t {
                        let full = format!("redis.{k}");
                        match k.as_str() {
                            "url" => {
                                let url = r.string(&full, v)?;
                                if !url.is_empty() {
                                    crate::hub::redis::resp::RedisUrl::parse(&url)
                                        .map_err(|m| r.err(&full, m))?;
                                }
                                c.redis_url = (!url.is_empty()).then_some(url);
                            }
                            _ => return Err(r.unknown("redis.", k)),
                        }
                    }
                }
                "mercure" => {
                    for (k, v) in r.table(key, value)? {
                        match k.as_str() {
                            "subscriptions" => {
                                c.mercure_subscriptions = r.boolean("mercure.subscriptions", v)?;
                            }
                            _ => return Err(r.unknown("mercure.", k)),
                        }
                    }
                }
                "postgres" => {
                    let Value::Array(items) = value else {
                        return Err(ConfigError::key(
                            path,
                            key,
                            "expected an array of tables, [[postgres]]",
                        ));
                    };
                    for (i, item) in items.iter().enumerate() {
                        let at = format!("postgres[{i}]");
                        let t = r.table(&at, item)?;
                        let mut pg = PostgresConfig {
                            url: String::new(),
                            channels: Vec::new(),
                            topic: None,
                        };
                        for (k, v) in t {
                            let full = format!("{at}.{k}");
                            match k.as_str() {
                                "url" => pg.url = r.string(&full, v)?,
                                "channels" => pg.channels = r.strings(&full, v)?,
                                "topic" => {
                                    let topic = r.string(&full, v)?;
                                    if !crate::hub::valid_name(&topic) {
                                        return Err(r.err(&full, bad_topic(&topic)));
                                    }
                                    pg.topic = Some(topic);
                                }
                                _ => return Err(r.unknown(&format!("{at}."), k)),
                            }
                        }
                        check_postgres(&pg).map_err(|(k, m)| r.err(&format!("{at}.{k}"), m))?;
                        c.postgres.push(pg);
                    }
                }
                _ => return Err(r.unknown("", key)),
            }
        }
        if let Some(t) = tls_table {
            let t = tls::read(&r, t, c.data_dir.as_deref())?;
            if t.redirect_http.is_some() && t.certs.is_none() {
                return Err(r.err(
                    "tls.redirect_http",
                    "set without HTTPS: give cert and key, or acme_domains",
                ));
            }
            (c.tls, c.acme, c.redirect_http) = (t.certs, t.acme, t.redirect_http);
        }
        if c.redis_url.is_some() && c.data_dir.is_some() {
            return Err(r.err(
                "redis.url",
                "cannot be set together with data_dir: with Redis, history and mailboxes live in Redis",
            ));
        }
        Ok(c)
    }

    /// Takes the tokens from `SSED_PUBLISH_TOKEN` / `SSED_SUBSCRIBE_TOKEN`
    /// / `SSED_ADMIN_TOKEN` and the JWT secret from `SSED_JWT_SECRET` when they are set and not
    /// empty (they override the file).
    pub fn apply_env(&mut self) {
        self.apply_env_from(|k| std::env::var(k).ok());
    }

    /// Checks what can only be checked once the environment is in (a JWT
    /// secret may come from `SSED_JWT_SECRET`): that the listed JWT
    /// algorithms have a key. `path`: the file, for the message.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Key`] naming the `[auth]` key at fault.
    pub fn check(&self, path: Option<&Path>) -> Result<(), ConfigError> {
        self.check_jwt(true)
            .map_err(|(key, m)| ConfigError::key(path, key, m))?;
        if self.anonymous == Some(false) && !self.subscriber_credentials() {
            return Err(ConfigError::key(
                path,
                "auth.anonymous",
                "false with no subscriber credential (subscribe_token, jwt_secret, \
                 jwt_public_key) would refuse every subscriber",
            ));
        }
        Ok(())
    }

    /// The JWT verifier the `[auth]` keys make; `None` with no JWT key.
    ///
    /// # Errors
    ///
    /// The key at fault and why (algorithms no key verifies).
    pub fn jwt_verifier(&self) -> Result<Option<JwtVerifier>, (&'static str, String)> {
        self.jwt_verifier_for(self.jwt_algorithms.clone())
    }

    /// [`jwt_verifier`](Config::jwt_verifier) accepting `algorithms`.
    fn jwt_verifier_for(
        &self,
        algorithms: Vec<Alg>,
    ) -> Result<Option<JwtVerifier>, (&'static str, String)> {
        if self.jwt_secret.is_none() && self.jwt_public_key.is_none() {
            if !algorithms.is_empty() {
                return Err((
                    "auth.jwt_algorithms",
                    "no key to verify tokens with: set jwt_secret (or SSED_JWT_SECRET) or \
                     jwt_public_key"
                        .into(),
                ));
            }
            return Ok(None);
        }
        JwtVerifier::new(
            self.jwt_secret.as_ref().map(|s| s.as_bytes().to_vec()),
            self.jwt_public_key.as_ref().map(|(_, k)| k.clone()),
            algorithms,
            self.jwt_issuer.clone(),
            self.jwt_audience.clone(),
        )
        .map(Some)
        .map_err(|m| ("auth.jwt_algorithms", m))
    }

    /// `full`: the environment is in; before it, an HMAC algorithm may
    /// still get its secret from `SSED_JWT_SECRET`.
    fn check_jwt(&self, full: bool) -> Result<(), (&'static str, String)> {
        if full || self.jwt_secret.is_some() {
            return self.jwt_verifier().map(|_| ());
        }
        let without_hmac: Vec<Alg> = self
            .jwt_algorithms
            .iter()
            .copied()
            .filter(|a| !matches!(a, Alg::HS256 | Alg::HS384 | Alg::HS512))
            .collect();
        if without_hmac.is_empty() && !self.jwt_algorithms.is_empty() {
            return Ok(());
        }
        self.jwt_verifier_for(without_hmac).map(|_| ())
    }

    /// Whether a subscriber credential is configured (the subscribe
    /// token, a JWT key).
    pub fn subscriber_credentials(&self) -> bool {
        self.subscribe_token.is_some() || self.jwt_keys()
    }

    /// Whether a publisher credential is configured (the publish token, a
    /// JWT key): then this machine has no right to publish without one.
    pub fn publisher_credentials(&self) -> bool {
        self.publish_token.is_some() || self.jwt_keys()
    }

    /// Whether a JWT key is configured.
    pub fn jwt_keys(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_public_key.is_some()
    }

    /// Whether subscribers with no credential are let in (to public
    /// updates of topics): `anonymous`, by default true unless a
    /// subscriber credential is configured.
    pub fn anonymous_allowed(&self) -> bool {
        self.anonymous.unwrap_or(!self.subscriber_credentials())
    }

    /// [`apply_env`](Config::apply_env) with a custom lookup (for tests).
    pub fn apply_env_from(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(t) = get(ENV_PUBLISH_TOKEN).filter(|t| !t.is_empty()) {
            self.publish_token = Some(t);
        }
        if let Some(t) = get(ENV_SUBSCRIBE_TOKEN).filter(|t| !t.is_empty()) {
            self.subscribe_token = Some(t);
        }
        if let Some(t) = get(ENV_ADMIN_TOKEN).filter(|t| !t.is_empty()) {
            self.admin_token = Some(t);
        }
        if let Some(t) = get(ENV_JWT_SECRET).filter(|t| !t.is_empty()) {
            self.jwt_secret = Some(t);
        }
    }

    /// Overrides the listen address (from `--listen`).
    ///
    /// # Errors
    ///
    /// When the address is not `host:port`.
    pub fn set_listen(&mut self, addr: &str) -> Result<(), ConfigError> {
        check_listen(addr).map_err(|m| ConfigError::key(None, "--listen", m))?;
        self.listen = addr.to_owned();
        Ok(())
    }
}

/// What a `[[postgres]]` table must hold besides well-typed keys: a URL
/// that parses, at least one channel, and channels that are valid topic
/// names when no `topic` is given. `Err((key, message))`.
/// Reads the PEM public key file of `jwt_public_key`.
fn read_public_key(path: &Path) -> Result<(PathBuf, PublicKey), String> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = PublicKey::from_pem(&pem).map_err(|m| format!("{}: {m}", path.display()))?;
    Ok((path.to_path_buf(), key))
}

/// A cookie name (RFC 6265 token): printable ASCII but separators.
fn valid_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

fn check_postgres(pg: &PostgresConfig) -> Result<(), (&'static str, String)> {
    use crate::bridge::postgres::{MAX_CHANNEL_LEN, valid_channel};
    if pg.url.is_empty() {
        return Err(("url", "missing".to_owned()));
    }
    if let Err(e) = pg.url.parse::<crate::bridge::postgres::Config>() {
        // The parser's messages name the option, never its value.
        return Err(("url", e.to_string()));
    }
    if pg.channels.is_empty() {
        return Err(("channels", "missing: name at least one channel".to_owned()));
    }
    for channel in &pg.channels {
        if !valid_channel(channel) {
            return Err((
                "channels",
                format!("invalid channel {channel:?}: use 1 to {MAX_CHANNEL_LEN} bytes, no NUL"),
            ));
        }
        if pg.topic.is_none() && !crate::hub::valid_name(channel) {
            return Err((
                "channels",
                format!(
                    "channel {channel:?} is not a valid topic name: set `topic`, or {}",
                    bad_topic(channel)
                ),
            ));
        }
    }
    Ok(())
}

fn bad_topic(name: &str) -> String {
    format!(
        "invalid topic name {name:?}: use 1 to {} characters of A-Z a-z 0-9 _ . : -",
        crate::hub::id::MAX_NAME_LEN
    )
}

/// Whether `name` can be a `Host` name: letters, digits, `-` and `.`, at
/// most 253 characters, no port.
fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn check_listen(addr: &str) -> Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "expected host:port, e.g. \"127.0.0.1:8080\", found {addr:?}"
        )),
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"` or `"0"`.
///
/// # Errors
///
/// A message saying what a duration looks like.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration {s:?}: use a number with a unit (\"250ms\", \"30s\", \"5m\", \"1h\") or \"0\""
        )
    };
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    Ok(d)
}

struct Reader<'a> {
    path: Option<&'a Path>,
}

impl Reader<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::key(self.path, key, message)
    }

    /// An unknown `key` of the table named by `prefix` (`""`, `"auth."`):
    /// the key is named as TOML writes it, quoted unless it is a bare key,
    /// so a dot or space in it cannot be read as a table path.
    fn unknown(&self, prefix: &str, key: &str) -> ConfigError {
        let bare = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let mut named = prefix.to_owned();
        if bare {
            named.push_str(key);
        } else {
            named.push('"');
            for c in key.chars() {
                match c {
                    '"' | '\\' => {
                        named.push('\\');
                        named.push(c);
                    }
                    c if c.is_control() => named.push_str(&format!("\\u{:04X}", u32::from(c))),
                    c => named.push(c),
                }
            }
            named.push('"');
        }
        self.err(
            &named,
            "unknown key (see config.example.toml for every key)",
        )
    }

    fn type_err(&self, key: &str, want: &str, found: &Value) -> ConfigError {
        let shown = match found {
            Value::String(s) => format!(" {s:?}"),
            Value::Integer(n) => format!(" {n}"),
            Value::Float(f) => format!(" {f}"),
            Value::Boolean(b) => format!(" {b}"),
            _ => String::new(),
        };
        self.err(
            key,
            format!("expected {want}, found {}{shown}", found.type_str()),
        )
    }

    fn string(&self, key: &str, v: &Value) -> Result<String, ConfigError> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.type_err(key, "a string", v))
    }

    fn boolean(&self, key: &str, v: &Value) -> Result<bool, ConfigError> {
        v.as_bool()
            .ok_or_else(|| self.type_err(key, "true or false", v))
    }

    fn integer(&self, key: &str, v: &Value, min: i64, max: i64) -> Result<i64, ConfigError> {
        let n = v
            .as_integer()
            .ok_or_else(|| self.type_err(key, "an integer", v))?;
        if n < min || n > max {
            return Err(self.err(key, format!("{n} is out of range ({min} to {max})")));
        }
        Ok(n)
    }

    fn duration(&self, key: &str, v: &Value) -> Result<Duration, ConfigError> {
        match v {
            Value::String(s) => parse_duration(s).map_err(|m| self.err(key, m)),
            Value::Integer(0) => Ok(Duration::ZERO),
            other => Err(self.type_err(key, "a duration string like \"30s\"", other)),
        }
    }

    fn nonzero_duration(&self, key: &str, v: &Value) -> Result<Duration, ConfigError> {
        let d = self.duration(key, v)?;
        if d.is_zero() {
            return Err(self.err(key, "must be greater than zero"));
        }
        Ok(d)
    }

    fn strings(&self, key: &str, v: &Value) -> Result<Vec<String>, ConfigError> {
        let Value::Array(items) = v else {
            return Err(self.type_err(key, "an array of strings", v));
        };
        items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.type_err(key, "an array of strings", i))
            })
            .collect()
    }

    fn table<'v>(&self, key: &str, v: &'v Value) -> Result<&'v Table, ConfigError> {
        v.as_table().ok_or_else(|| self.type_err(key, "a table", v))
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod example_file;
