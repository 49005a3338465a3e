//! The `ssed` daemon (feature `daemon`): configuration, the HTTP routes over
//! a [`Hub`](crate::Hub), authentication, metrics and the demo page.
//!
//! **Not a stable API.** It is public so the `ssed` binary, the tests and
//! the fuzz targets can build the daemon; embed the library instead
//! ([`Server`](crate::Server), [`Hub`](crate::Hub)), whose surface is kept.
//!
//! How the parts fit: [`config`] turns the TOML file, the environment and
//! the command line into a [`Config`]; [`app::build`] makes
//! a [`Server`](crate::Server) whose routes publish into and subscribe to a
//! hub, checking access with [`auth`] and [`jwt`]; `src/bin/ssed/main.rs` wires signals
//! and runs it. Library code never reaches in here.

pub mod acme;
pub mod app;
pub mod auth;
pub mod config;
mod der;
mod error;
pub mod jwt;
pub mod redirect;
pub mod reload;

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), as the daemon's `event: ping` says
/// the time; for the binary's load tester too.
pub use crate::time::iso8601;
/// `YYYY-MM-DDTHH:MM:SSZ` (UTC), as the binary's log lines begin.
pub use crate::time::write_iso8601_seconds;
pub use app::{Daemon, build};
pub use config::{Config, ConfigError};
pub use error::SetupError;
