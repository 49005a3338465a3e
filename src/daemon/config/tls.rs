//! The `[tls] table: the certificate and key `listen` serves HTTPS with,
//! or the ACME account that obtains them, and the plain-HTTP listener
//! beside it.

use std::path::{Path, PathBuf};

use toml::Table;

use super::{ConfigError, Reader};
use crate::daemon::acme::AcmeConfig;
use crate::tls::{Certificates, Which};

/// The default of `acme_directory` (Let's Encrypt's).
pub(crate) const ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// What `[tls]` sets.
#[derive(Debug, Default)]
pub(super) struct TlsTable {
    /// What `listen` serves: from `cert`/`key`, or the ACME cache's files.
    pub certs: Option<Certificates>,
    /// The ACME account and names, with `acme_domains`.
    pub acme: Option<AcmeConfig>,
    /// `redirect_http`.
    pub redirect_http: Option<String>,
}

/// Reads `[tls]`; with `cert` and `key` both set, reads and checks the
/// files now, so a bad one stops the start with its key named. `data_dir`
/// gives `acme_cache` its default.
pub(super) fn read(
    r: &Reader<'_>,
    t: &Table,
    data_dir: Option<&Path>,
) -> Result<TlsTable, ConfigError> {
    let (mut cert, mut key) = (String::new(), String::new());
    let mut domains = Vec::new();
    let (mut email, mut cache, mut roots) = (String::new(), String::new(), String::new());
    let mut directory = ACME_DIRECTORY.to_owned();
    let mut redirect = String::new();
    for (k, v) in t {
        let full = format!("tls.{k}");
        match k.as_str() {
            "cert" => cert = r.string(&full, v)?,
            "key" => key = r.string(&full, v)?,
            "acme_domains" => {
                domains = r.strings(&full, v)?;
                for d in &mut domains {
                    *d = d.to_ascii_lowercase();
                    check_domain(d).map_err(|m| r.err(&full, m))?;
                }
            }
            "acme_email" => {
                email = r.string(&full, v)?;
                let fine = email.split_once('@').is_some_and(|(a, b)| {
                    !a.is_empty() && !b.is_empty() && !email.contains(char::is_whitespace)
                });
                if !email.is_empty() && !fine {
                    return Err(r.err(&full, format!("{email:?} is not an email address")));
                }
            }
            "acme_directory" => {
                directory = r.string(&full, v)?;
                crate::daemon::acme::https::split_url(&directory).map_err(|m| {
                    r.err(
                        &full,
                        format!("{m} (RFC 8555 directories are https:// URLs)"),
                    )
                })?;
            }
            "acme_ca_roots" => roots = r.string(&full, v)?,
            "acme_cache" => cache = r.string(&full, v)?,
            "redirect_http" => {
                redirect = r.string(&full, v)?;
                if !redirect.is_empty() {
                    super::check_listen(&redirect).map_err(|m| r.err(&full, m))?;
                }
            }
            _ => return Err(r.unknown("tls.", k)),
        }
    }
    let mut out = TlsTable {
        redirect_http: (!redirect.is_empty()).then_some(redirect),
        ..TlsTable::default()
    };
    if domains.is_empty() {
        for (set, name) in [
            (!email.is_empty(), "tls.acme_email"),
            (!roots.is_empty(), "tls.acme_ca_roots"),
            (!cache.is_empty(), "tls.acme_cache"),
            (directory != ACME_DIRECTORY, "tls.acme_directory"),
        ] {
            if set {
                return Err(r.err(name, "set without acme_domains, which ACME needs"));
            }
        }
    } else {
        if !cert.is_empty() || !key.is_empty() {
            let at = if cert.is_empty() {
                "tls.key"
            } else {
                "tls.cert"
            };
            return Err(r.err(
                at,
                "set together with acme_domains: give a certificate and key, or names for ACME to obtain one for, not both",
            ));
        }
        let ca_roots = (!roots.is_empty()).then(|| PathBuf::from(&roots));
        // Read now, so a bad file stops the start with its key named.
        crate::daemon::acme::https::roots(ca_roots.as_deref())
            .map_err(|m| r.err("tls.acme_ca_roots", m))?;
        let cache = if cache.is_empty() {
            default_cache(data_dir).ok_or_else(|| {
                r.err(
                    "tls.acme_cache",
                    "not set, and there is no data_dir, STATE_DIRECTORY, XDG_STATE_HOME or HOME \
                     to keep the ACME account and certificates under",
                )
            })?
        } else {
            PathBuf::from(cache)
        };
        let acme = AcmeConfig {
            domains,
            email: (!email.is_empty()).then_some(email),
            directory,
            ca_roots,
            cache,
        };
        out.certs = Some(Certificates::for_acme(acme.cert_path(), acme.key_path()));
        out.acme = Some(acme);
        return Ok(out);
    }
    out.certs = match (cert.is_empty(), key.is_empty()) {
        (true, true) => None,
        (false, true) => {
            return Err(r.err("tls.key", "missing: `cert` is set, `key` must be too"));
        }
        (true, false) => {
            return Err(r.err("tls.cert", "missing: `key` is set, `cert` must be too"));
        }
        (false, false) => Some(
            Certificates::from_pem_files(Path::new(&cert), Path::new(&key)).map_err(|e| {
                let at = match e.which() {
                    Which::Cert => "tls.cert",
                    Which::Key => "tls.key",
                };
                r.err(at, e.to_string())
            })?,
        ),
    };
    Ok(out)
}

/// `acme_cache` when unset: `DATA_DIR/acme`, else under systemd's
/// `STATE_DIRECTORY`, `XDG_STATE_HOME/ssed` or `~/.local/state/ssed`.
fn default_cache(data_dir: Option<&Path>) -> Option<PathBuf> {
    if let Some(d) = data_dir {
        return Some(d.join("acme"));
    }
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(state) = var("STATE_DIRECTORY") {
        // systemd may list several, separated by colons: the first.
        let first = state
            .to_string_lossy()
            .split(':')
            .next()
            .map(PathBuf::from)?;
        return Some(first.join("acme"));
    }
    var("XDG_STATE_HOME")
        .map(|d| d.join("ssed"))
        .or_else(|| var("HOME").map(|h| h.join(".local/state/ssed")))
        .map(|d| d.join("acme"))
}

/// A DNS name an ACME CA can issue for by `http-01` or `tls-alpn-01`.
fn check_domain(d: &str) -> Result<(), String> {
    if d.starts_with("*.") {
        return Err(format!(
            "{d:?}: a wildcard name needs the dns-01 challenge, which ssed does not answer"
        ));
    }
    if d.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{d:?}: an IP address; ACME here issues for DNS names"
        ));
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if d.len() > 253 || !d.split('.').all(label_ok) {
        return Err(format!("{d:?} is not a DNS name"));
    }
    if !d.contains('.') {
        return Err(format!(
            "{d:?}: a name of one label (no CA issues for it); give the full name"
        ));
    }
    Ok(())
}
