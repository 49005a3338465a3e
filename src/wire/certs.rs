//! The certificate and key a TLS listener serves (feature `tls`): read
//! from PEM files, and read again on demand or when the files change,
//! without dropping a connection.
//!
//! A connection takes the certificate in force when its handshake asks
//! for it; a reload swaps that for the connections after it. A file that
//! cannot be read, or a key that does not match its certificate, is an
//! error at start ([`Certificates::from_pem_files`]) and, on a reload,
//! leaves the certificate in force serving.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, version};

/// The certificate chain and private key a TLS listener serves, from two
/// PEM files; cheap to clone (clones share the files and what was read).
///
/// # Examples
///
/// ```no_run
/// let certs = ssed::tls::Certificates::from_pem_files("fullchain.pem", "key.pem")?;
/// let server = ssed::Server::builder().listen("0.0.0.0:443").tls(certs.clone()).build()?;
/// // later, on SIGHUP or a timer:
/// certs.reload_if_changed()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Certificates {
    inner: Arc<Inner>,
}

struct Inner {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    /// What handshakes get now; none yet while ACME obtains the first.
    current: RwLock<Option<Arc<CertifiedKey>>>,
    /// Whether ACME's `tls-alpn-01` challenges are answered (see
    /// [`Certificates::for_acme`]).
    acme: bool,
    /// The challenge certificates, by domain, while a validation runs.
    challenges: Mutex<Vec<(String, Arc<CertifiedKey>)>>,
    /// The files' modification times and sizes when last read.
    read: Mutex<[Option<(SystemTime, u64)>; 2]>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("cert", &self.inner.cert)
            .field("key", &self.inner.key)
            .finish_non_exhaustive()
    }
}

/// Certificates from the same two files are equal.
impl PartialEq for Certificates {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
            || (self.inner.cert == other.inner.cert && self.inner.key == other.inner.key)
    }
}

impl Eq for Certificates {}

/// The ALPN protocol of ACME's `tls-alpn-01` validations (RFC 8737).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Which of the two files an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Which {
    /// The certificate chain.
    Cert,
    /// The private key.
    Key,
}

/// Why a certificate or key cannot be served.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    Read {
        /// Which file.
        which: Which,
        /// Its path.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A file holds no usable PEM block of its kind, or a key rustls cannot
    /// sign with.
    Invalid {
        /// Which file.
        which: Which,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key is not the key of the chain's first certificate.
    Mismatch {
        /// The certificate chain's path.
        cert: PathBuf,
        /// The key's path.
        key: PathBuf,
    },
}

impl TlsError {
    /// Which file the error is about (the key's, for a mismatch).
    pub fn which(&self) -> Which {
        match self {
            TlsError::Read { which, .. } | TlsError::Invalid { which, .. } => *which,
            TlsError::Mismatch { .. } => Which::Key,
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, source, .. } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            TlsError::Invalid { path, reason, .. } => write!(f, "{}: {reason}", path.display()),
            TlsError::Mismatch { cert, key } => write!(
                f,
                "{} is not the key of the first certificate in {}",
                key.display(),
                cert.display()
            ),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Certificates {
    /// Reads a PEM certificate chain (the server's certificate first, then
    /// the intermediates) and its PEM private key (PKCS#8, PKCS#1 or SEC1:
    /// RSA, ECDSA P-256/P-384 or Ed25519).
    ///
    /// # Errors
    ///
    /// [`TlsError`] naming the file at fault: unreadable, no certificate
    /// or key in it, or a key that is not the certificate's.
    pub fn from_pem_files(
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Result<Self, TlsError> {
        let (cert, key) = (cert.into(), key.into());
        // ring, which the JWT code uses already, rather than aws-lc-rs (C
        // and cmake in the static build, and a larger binary). rustls
        // deprecates it for want of post-quantum key exchange; classical
        // X25519 and P-256 are what it offers.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = [stamp(&cert), stamp(&key)];
        let certified = load(&cert, &key, &provider)?;
        Ok(Certificates {
            inner: Arc::new(Inner {
                cert,
                key,
                provider,
                current: RwLock::new(Some(Arc::new(certified))),
                acme: false,
                challenges: Mutex::default(),
                read: Mutex::new(stamps),
            }),
        })
    }

    /// Certificates an ACME client keeps in `cert` and `key`: served from
    /// there when the files hold a usable pair now, and otherwise none
    /// until a [`reload`](Certificates::reload) reads one (handshakes are
    /// refused meanwhile). The listener also answers ACME's `tls-alpn-01`
    /// challenges (RFC 8737) with what
    /// [`answer_tls_alpn_01`](Certificates::answer_tls_alpn_01) sets, and
    /// so negotiates ALPN: `http/1.1`, or `acme-tls/1` for a validation.
    pub fn for_acme(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        let (cert, key) = (cert.into(), key.into());
        #[allow(deprecated)] // ring: see from_pem_files
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = [stamp(&cert), stamp(&key)];
        let certified = load(&cert, &key, &provider).ok().map(Arc::new);
        Certificates {
            inner: Arc::new(Inner {
                cert,
                key,
                provider,
                current: RwLock::new(certified),
                acme: true,
                challenges: Mutex::default(),
                read: Mutex::new(stamps),
            }),
        }
    }

    /// The first certificate of the chain served now (DER), if any.
    pub fn end_entity(&self) -> Option<CertificateDer<'static>> {
        let current = self.inner.current.read().unwrap_or_else(|p| p.into_inner());
        current.as_ref().and_then(|c| c.cert.first().cloned())
    }

    /// Serves `cert` (DER, self-signed with the `acmeIdentifier`
    /// extension) and its PKCS#8 `key` to a `tls-alpn-01` validation of
    /// `domain`, until [`forget_tls_alpn_01`](Certificates::forget_tls_alpn_01).
    /// Only on certificates made [`for_acme`](Certificates::for_acme).
    ///
    /// # Errors
    ///
    /// [`TlsError::Invalid`] when rustls cannot sign with `key`.
    pub fn answer_tls_alpn_01(
        &self,
        domain: &str,
        cert: Vec<u8>,
        key: Vec<u8>,
    ) -> Result<(), TlsError> {
        let signer = self
            .inner
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key.into()))
            .map_err(|e| TlsError::Invalid {
                which: Which::Key,
                path: PathBuf::from("<tls-alpn-01 challenge>"),
                reason: e.to_string(),
            })?;
        let certified = Arc::new(CertifiedKey::new(vec![cert.into()], signer));
        let mut challenges = self.challenges();
        challenges.retain(|(d, _)| !d.eq_ignore_ascii_case(domain));
        challenges.push((domain.to_ascii_lowercase(), certified));
        Ok(())
    }

    /// Stops answering `tls-alpn-01` validations of `domain`.
    pub fn forget_tls_alpn_01(&self, domain: &str) {
        self.challenges()
            .retain(|(d, _)| !d.eq_ignore_ascii_case(domain));
    }

    /// The challenge certificates being served.
    fn challenges(&self) -> std::sync::MutexGuard<'_, Vec<(String, Arc<CertifiedKey>)>> {
        self.inner
            .challenges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The certificate chain's file.
    pub fn cert_path(&self) -> &Path {
        &self.inner.cert
    }

    /// The private key's file.
    pub fn key_path(&self) -> &Path {
        &self.inner.key
    }

    /// Reads both files again; new handshakes get what they hold, open
    /// connections keep theirs.
    ///
    /// # Errors
    ///
    /// As [`from_pem_files`](Certificates::from_pem_files); the
    /// certificate in force then stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let inner = &*self.inner;
        let stamps = [stamp(&inner.cert), stamp(&inner.key)];
        // Noted even when the files are bad: they are not read again
        // until they change again.
        *inner.read.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        let certified = load(&inner.cert, &inner.key, &inner.provider)?;
        *inner.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(certified));
        Ok(())
    }

    /// [`reload`](Certificates::reload)s if either file's modification
    /// time or size changed since it was last read (two `stat` calls when
    /// nothing did); true when it reloaded.
    ///
    /// # Errors
    ///
    /// As [`reload`](Certificates::reload).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let inner = &*self.inner;
        let now = [stamp(&inner.cert), stamp(&inner.key)];
        if *inner.read.lock().unwrap_or_else(|p| p.into_inner()) == now {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// The rustls configuration of a listener serving these certificates:
    /// TLS 1.3 and 1.2, on ring.
    pub(crate) fn server_config(&self) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.inner.provider))
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(Arc::clone(&self.inner))));
        // A stream keeps its sending keys alone (see `sealed.rs`).
        config.enable_secret_extraction = true;
        if self.inner.acme {
            config.alpn_protocols = vec![b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
        }
        Ok(Arc::new(config))
    }
}

/// Hands every handshake the certificate in force.
struct Resolver(Arc<Inner>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let inner = &*self.0;
        // A validation offers `acme-tls/1` alone (RFC 8737 §3); a client
        // that also offers `http/1.1` gets the served certificate.
        let validation = hello.alpn().is_some_and(|offered| {
            let offered: Vec<&[u8]> = offered.collect();
            offered == [ACME_TLS_ALPN]
        });
        if inner.acme && validation {
            // A validation: its challenge certificate or nothing.
            let name = hello.server_name()?;
            let challenges = inner.challenges.lock().unwrap_or_else(|p| p.into_inner());
            return challenges
                .iter()
                .find(|(d, _)| d.eq_ignore_ascii_case(name))
                .map(|(_, c)| Arc::clone(c));
        }
        inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A file's modification time and size; `None` when it cannot be read.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reads and checks a chain and its key.
fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let read = |which, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            which,
            path: path.to_owned(),
            source,
        })
    };
    let invalid = |which, path: &Path, reason: String| TlsError::Invalid {
        which,
        path: path.to_owned(),
        reason,
    };
    let pem = read(Which::Cert, cert)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            invalid(
                Which::Cert,
                cert,
                format!("not a PEM certificate chain: {e}"),
            )
        })?;
    if chain.is_empty() {
        return Err(invalid(
            Which::Cert,
            cert,
            "no CERTIFICATE block in it".into(),
        ));
    }
    let pem = read(Which::Key, key)?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let reason = match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY block in it".into(),
            e => format!("not a PEM private key: {e}"),
        };
        invalid(Which::Key, key, reason)
    })?;
    let signer = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| invalid(Which::Key, key, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::Mismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            })
        }
        Err(rustls::Error::InconsistentKeys(_)) => Ok(certified), // cannot tell: served as is
        Err(e) => Err(invalid(
            Which::Cert,
            cert,
            format!("its first certificate does not parse: {e}"),
        )),
    }
}
