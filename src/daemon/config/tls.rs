//! The `[tls]` table: the certificate and key `listen` serves HTTPS with.

use std::path::Path;

use toml::Table;

use super::{ConfigError, Reader};
use crate::tls::{Certificates, Which};

/// The default of `acme_directory` (Let's Encrypt's).
const ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Keys of the design's `[tls]` table not served yet (ACME, the http
/// redirect): accepted at their defaults, as `config.example.toml` lists
/// them, and refused by name otherwise, so a config that relies on one
/// does not start serving something else.
const NOT_YET: [&str; 6] = [
    "acme_domains",
    "acme_email",
    "acme_directory",
    "acme_ca_roots",
    "acme_cache",
    "redirect_http",
];

/// Reads `[tls]`; with `cert` and `key` both set, reads and checks the
/// files now, so a bad one stops the start with its key named.
pub(super) fn read(r: &Reader<'_>, t: &Table) -> Result<Option<Certificates>, ConfigError> {
    let (mut cert, mut key) = (String::new(), String::new());
    for (k, v) in t {
        let full = format!("tls.{k}");
        match k.as_str() {
            "cert" => cert = r.string(&full, v)?,
            "key" => key = r.string(&full, v)?,
            k if NOT_YET.contains(&k) => {
                let default = match k {
                    "acme_domains" => r.strings(&full, v)?.is_empty(),
                    "acme_directory" => r.string(&full, v)? == ACME_DIRECTORY,
                    _ => r.string(&full, v)?.is_empty(),
                };
                if default {
                    continue;
                }
                return Err(r.err(
                    &full,
                    "not yet supported: give a certificate and key with `cert` and `key` \
                     (ACME and the http redirect come in a later version)",
                ));
            }
            _ => return Err(r.unknown("tls.", k)),
        }
    }
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => Ok(None),
        (false, true) => Err(r.err("tls.key", "missing: `cert` is set, `key` must be too")),
        (true, false) => Err(r.err("tls.cert", "missing: `key` is set, `cert` must be too")),
        (false, false) => Certificates::from_pem_files(Path::new(&cert), Path::new(&key))
            .map(Some)
            .map_err(|e| {
                let at = match e.which() {
                    Which::Cert => "tls.cert",
                    Which::Key => "tls.key",
                };
                r.err(at, e.to_string())
            }),
    }
}
