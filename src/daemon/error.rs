//! Why the daemon could not be set up.

use std::fmt;

/// A set-up failure of the daemon: its server, its durable store or its
/// hub's engine. The library's own [`Error`](crate::Error) knows only the
/// server's.
#[derive(Debug)]
#[non_exhaustive]
pub enum SetupError {
    /// The server could not be set up (address, bind, routes, poller).
    Server(crate::Error),
    /// The durable store (`data_dir`) could not be opened.
    Store(crate::hub::store::StoreError),
    /// The hub's engine could not be set up (a Redis URL that does not
    /// parse, a reader thread that cannot start).
    Engine(crate::HubError),
    /// The ACME cache directory (`[tls] acme_cache`) could not be made,
    /// or the renewal thread could not start.
    Acme {
        /// The directory.
        cache: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The `[auth]` keys do not fit together (a JWT algorithm no key
    /// verifies).
    Auth {
        /// The key at fault, dotted (`auth.jwt_algorithms`).
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The server's own words: its error is the whole story.
            SetupError::Server(e) => fmt::Display::fmt(e, f),
            SetupError::Store(_) => f.write_str("durable store unavailable"),
            SetupError::Engine(_) => f.write_str("event engine unavailable"),
            SetupError::Auth { key, message } => write!(f, "key `{key}`: {message}"),
            SetupError::Acme { cache, .. } => write!(
                f,
                "key `tls.acme_cache`: cannot use {} for the ACME account and certificates",
                cache.display()
            ),
        }
    }
}

impl std::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SetupError::Server(e) => e.source(),
            SetupError::Store(e) => Some(e),
            SetupError::Engine(e) => Some(e),
            SetupError::Auth { .. } => None,
            SetupError::Acme { source, .. } => Some(source),
        }
    }
}

impl From<crate::Error> for SetupError {
    fn from(e: crate::Error) -> Self {
        SetupError::Server(e)
    }
}

impl From<crate::hub::store::StoreError> for SetupError {
    fn from(e: crate::hub::store::StoreError) -> Self {
        SetupError::Store(e)
    }
}
