//! Certificates from an ACME CA (RFC 8555) for `[tls] acme_domains`:
//! obtained at start when the cache has none, renewed in the background
//! two thirds into their life, with backoff after a failure, while the
//! certificate in force keeps serving.
//!
//! - Challenges: `http-01` on `redirect_http` when it is set (see
//!   [`redirect`](super::redirect)), else `tls-alpn-01` on the TLS listener
//!   itself ([`Certificates::for_acme`]); a CA that offers only the other
//!   one gets it when it can be answered.
//! - The cache (`acme_cache`): one directory per CA (named after the
//!   directory's host and port), holding `account.key` and, per set of
//!   domains, `NAME.crt` and `NAME.key` (see [`AcmeConfig::cert_path`]).
//!   Keys are written mode 0600, the directories 0700.
//! - Metrics: the served certificate's expiry
//!   (`ssed_tls_certificate_expiry_timestamp_seconds`, also for `cert`/`key`),
//!   renewal failures and certificates obtained ([`AcmeStatus`]).

mod client;
pub mod https;

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use client::AcmeError;

use crate::ShutdownHandle;
use crate::backoff::Backoff;
use crate::daemon::der;
use crate::tls::Certificates;

/// Shortest and longest wait after a failed attempt. Let's Encrypt allows
/// five failed validations per name an hour.
const RETRY_MIN: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(6 * 3600);
/// The longest single sleep before the renewal time is looked at again
/// (a certificate reloaded by hand, say).
const RECHECK: Duration = Duration::from_secs(3600);

/// `[tls] acme_*`: what to obtain, from where, kept where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// `acme_domains`: the names the certificate covers.
    pub domains: Vec<String>,
    /// `acme_email`: the account's contact, if any.
    pub email: Option<String>,
    /// `acme_directory`: the CA's directory URL (`https://`).
    pub directory: String,
    /// `acme_ca_roots`: extra PEM roots for the directory's TLS.
    pub ca_roots: Option<PathBuf>,
    /// `acme_cache`: where the account key and certificates are kept.
    pub cache: PathBuf,
}

impl AcmeConfig {
    /// The cache's directory for this CA: `acme_cache/HOST` or
    /// `acme_cache/HOST_PORT`.
    pub fn ca_dir(&self) -> PathBuf {
        let host = https::split_url(&self.directory)
            .map(|(h, p, _)| {
                if p == 443 {
                    h.to_owned()
                } else {
                    format!("{h}_{p}")
                }
            })
            .unwrap_or_else(|_| "ca".to_owned());
        let safe: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.cache.join(safe)
    }

    /// The certificate chain's file: `CA_DIR/DOMAIN.crt` for one domain;
    /// for several, the first and a hash of the whole list
    /// (`a.example+2-1f3a….crt`), so that another list is another file.
    pub fn cert_path(&self) -> PathBuf {
        self.ca_dir().join(format!("{}.crt", self.stem()))
    }

    /// The certificate's private key: beside [`cert_path`](Self::cert_path), `.key`.
    pub fn key_path(&self) -> PathBuf {
        self.ca_dir().join(format!("{}.key", self.stem()))
    }

    fn stem(&self) -> String {
        match self.domains.as_slice() {
            [one] => one.clone(),
            [first, rest @ ..] => {
                // FNV-1a: stable across builds, unlike std's hasher.
                let hash = self
                    .domains
                    .join(",")
                    .bytes()
                    .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                    });
                format!("{first}+{}-{hash:016x}", rest.len())
            }
            [] => "none".to_owned(),
        }
    }
}

/// A challenge kind ssed answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// A token served over plain HTTP on port 80 (`redirect_http`).
    Http01,
    /// A certificate served to ALPN `acme-tls/1` on the TLS port.
    TlsAlpn01,
}

impl Challenge {
    /// The name ACME gives it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Challenge::Http01 => "http-01",
            Challenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// The `http-01` answers being served now: token to key authorization.
#[derive(Debug, Default)]
pub struct Http01 {
    tokens: Mutex<Vec<(String, String)>>,
}

impl Http01 {
    /// The key authorization to serve at
    /// `/.well-known/acme-challenge/{token}`, while its validation runs.
    pub fn key_authorization(&self, token: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .iter()
            .find(|(t, _)| t == token)
            .map(|(_, k)| k.clone())
    }
}

/// Where the challenges of an order are answered.
pub(crate) struct Responders<'a> {
    /// The TLS listener's certificates (`tls-alpn-01`).
    pub certs: &'a Certificates,
    /// The plain listener's tokens (`http-01`), with `redirect_http`.
    pub http01: Option<&'a Http01>,
}

impl Responders<'_> {
    /// The kinds answered, preferred first: `http-01` when there is a
    /// plain listener (it needs neither SNI nor ALPN to reach ssed through
    /// whatever is in front), then `tls-alpn-01`.
    pub(crate) fn kinds(&self) -> Vec<Challenge> {
        match self.http01 {
            Some(_) => vec![Challenge::Http01, Challenge::TlsAlpn01],
            None => vec![Challenge::TlsAlpn01],
        }
    }

    pub(crate) fn answer_http_01(&self, token: &str, key_authorization: &str) {
        if let Some(h) = self.http01 {
            let mut tokens = h.tokens.lock().unwrap_or_else(|p| p.into_inner());
            tokens.retain(|(t, _)| t != token);
            tokens.push((token.to_owned(), key_authorization.to_owned()));
        }
    }

    pub(crate) fn forget_http_01(&self, token: &str) {
        if let Some(h) = self.http01 {
            let mut tokens = h.tokens.lock().unwrap_or_else(|p| p.into_inner());
            tokens.retain(|(t, _)| t != token);
        }
    }
}

/// What the renewal thread has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct AcmeStatus {
    /// Attempts to obtain a certificate that failed.
    pub failures: AtomicU64,
    /// Certificates obtained.
    pub obtained: AtomicU64,
}

/// The validity of the certificate `certs` serves now: (notBefore,
/// notAfter) in seconds since the Unix epoch.
pub fn served_validity(certs: &Certificates) -> Option<(i64, i64)> {
    der::validity(certs.end_entity()?.as_ref()).ok()
}

/// Starts the thread that obtains and renews the certificate of `config`
/// into `certs` (made by [`Certificates::for_acme`] on the config's cache
/// paths), answering `http-01` with `http01` when there is a plain
/// listener, until shutdown.
///
/// # Errors
///
/// When the cache directory cannot be made, or the thread cannot start.
pub fn start(
    config: AcmeConfig,
    certs: Certificates,
    http01: Option<Arc<Http01>>,
    shutdown: ShutdownHandle,
) -> io::Result<Arc<AcmeStatus>> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(config.ca_dir())?;
    if certs.end_entity().is_none()
        && config.cert_path().exists()
        && let Err(e) = certs.reload()
    {
        log::warn!("ACME: the cached certificate cannot be served ({e}); a new one is ordered");
    }
    let status = Arc::new(AcmeStatus::default());
    let shared = Arc::clone(&status);
    std::thread::Builder::new()
        .name("ssed-acme".into())
        .spawn(move || renew(&config, &certs, http01.as_deref(), &shared, &shutdown))?;
    Ok(status)
}

/// The renewal loop: sleeps until the served certificate is two thirds
/// through its life (or at once when none is served), then obtains a new
/// one, retrying with backoff.
fn renew(
    config: &AcmeConfig,
    certs: &Certificates,
    http01: Option<&Http01>,
    status: &AcmeStatus,
    shutdown: &ShutdownHandle,
) {
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    let names = config.domains.join(", ");
    loop {
        let wait = renewal_wait(certs);
        if !wait.is_zero() {
            if sleep(shutdown, wait.min(RECHECK)) {
                return;
            }
            continue;
        }
        let serving = served_validity(certs).is_some();
        log::info!(
            "ACME: {} a certificate for {names} from {}",
            if serving { "renewing" } else { "obtaining" },
            config.directory
        );
        match obtain(config, certs, http01) {
            Ok(not_after) => {
                status.obtained.fetch_add(1, Relaxed);
                log::info!(
                    "ACME: certificate for {names} obtained, valid until {}; serving it",
                    crate::time::iso8601(UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64))
                );
                if renewal_wait(certs).is_zero() {
                    // Due already (a clock far ahead, a CA issuing for
                    // hours): ordering again at once would burn the CA's
                    // limits, so wait as after a failure.
                    let wait = backoff.next_wait();
                    log::error!(
                        "ACME: the certificate obtained for {names} is already due for renewal \
                         (check the clock); next order in {} s",
                        wait.as_secs()
                    );
                    if sleep(shutdown, wait) {
                        return;
                    }
                } else {
                    backoff.reset();
                }
            }
            Err(e) => {
                status.failures.fetch_add(1, Relaxed);
                let wait = backoff.next_wait();
                log::error!(
                    "ACME: no certificate for {names}: {}; {}, next try in {} s",
                    crate::Report(&*e),
                    if serving {
                        "the current one keeps serving"
                    } else {
                        "HTTPS handshakes fail until one is obtained"
                    },
                    wait.as_secs()
                );
                if sleep(shutdown, wait) {
                    return;
                }
            }
        }
        if shutdown.is_shutdown() {
            return;
        }
    }
}

/// How long until the served certificate is two thirds through its
/// life; zero when it is, or when none is served.
fn renewal_wait(certs: &Certificates) -> Duration {
    match served_validity(certs) {
        Some((not_before, not_after)) => {
            let renew_at = not_before + (not_after - not_before) * 2 / 3;
            Duration::from_secs(renew_at.saturating_sub(unix_now()).max(0) as u64)
        }
        None => Duration::ZERO,
    }
}

/// Sleeps `d`, or less when shutdown comes; true at shutdown.
fn sleep(shutdown: &ShutdownHandle, d: Duration) -> bool {
    let _ = shutdown.receiver().recv_timeout(d);
    shutdown.is_shutdown()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// One attempt: the account, an order, the files, the reload. Returns the
/// new certificate's notAfter.
fn obtain(
    config: &AcmeConfig,
    certs: &Certificates,
    http01: Option<&Http01>,
) -> Result<i64, Box<dyn std::error::Error + Send + Sync>> {
    let dir = config.ca_dir();
    let account_path = dir.join("account.key");
    let account_key = match fs::read_to_string(&account_path) {
        Ok(pem) => {
            der::pem_block(&pem)
                .map_err(|e| format!("{}: {e}", account_path.display()))?
                .1
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = client::new_key()?;
            write_private(&account_path, &der::pem("PRIVATE KEY", &key))
                .and_then(|tmp| fs::rename(tmp, &account_path))
                .map_err(|e| format!("{}: {e}", account_path.display()))?;
            log::info!("ACME: new account key in {}", account_path.display());
            key
        }
        Err(e) => return Err(format!("{}: {e}", account_path.display()).into()),
    };
    let roots = https::roots(config.ca_roots.as_deref())?;
    let mut acme = client::Client::new(https::Https::new(roots)?, &config.directory, &account_key)?;
    acme.register(config.email.as_deref())?;
    let cert_key = client::new_key()?;
    let responders = Responders { certs, http01 };
    let chain = acme.obtain(&config.domains, &cert_key, &responders)?;
    let (key_path, cert_path) = (config.key_path(), config.cert_path());
    // Both written whole before either replaces its file, so a failure
    // leaves the old pair (or, between the two renames, at worst a pair
    // that does not load: the next start then orders anew).
    let key_tmp = write_private(&key_path, &der::pem("PRIVATE KEY", &cert_key))
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    let cert_tmp =
        write_private(&cert_path, &chain).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    fs::rename(&key_tmp, &key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    fs::rename(&cert_tmp, &cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    if let Ok(d) = fs::File::open(config.ca_dir()) {
        let _ = d.sync_all(); // the renames, on the way to disk
    }
    certs.reload()?;
    served_validity(certs)
        .map(|(_, not_after)| not_after)
        .ok_or_else(|| "the certificate obtained does not parse".into())
}

/// Writes `text`, synced, to a new file beside `path` (`path.tmp`, mode
/// 0600 from its creation) and returns that file's path, for the caller
/// to rename over `path`.
fn write_private(path: &Path, text: &str) -> io::Result<PathBuf> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A stale one (an attempt cut short) may have other permissions.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(domains: &[&str], directory: &str) -> AcmeConfig {
        AcmeConfig {
            domains: domains.iter().map(|d| (*d).to_owned()).collect(),
            email: None,
            directory: directory.into(),
            ca_roots: None,
            cache: PathBuf::from("/c"),
        }
    }

    #[test]
    fn the_cache_keeps_each_ca_and_each_list_apart() {
        let le = config(
            &["a.example"],
            "https://acme-v02.api.letsencrypt.org/directory",
        );
        assert_eq!(
            le.cert_path(),
            Path::new("/c/acme-v02.api.letsencrypt.org/a.example.crt")
        );
        let test = config(&["a.example"], "https://127.0.0.1:14000/dir");
        assert_eq!(
            test.key_path(),
            Path::new("/c/127.0.0.1_14000/a.example.key")
        );
        let two = config(&["a.example", "b.example"], "https://[::1]/dir");
        let other = config(&["a.example", "c.example"], "https://[::1]/dir");
        let name = two.cert_path();
        assert!(name.starts_with("/c/__1"), "{name:?}");
        assert!(name.to_string_lossy().contains("a.example+1-"), "{name:?}");
        assert_ne!(name, other.cert_path());
    }
}
