//! Re-reading the TLS certificate and key while the daemon runs: on
//! SIGHUP (the binary's signal thread calls [`reload`]) and when either
//! file changes ([`watch`] looks every few seconds). Open connections keep
//! the certificate they were served; a bad new file is logged and the one
//! in force keeps serving.

use std::time::Duration;

use crate::ShutdownHandle;
use crate::tls::Certificates;

/// How often [`watch`] looks at the files: two `stat` calls.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Re-reads the certificate and key now, logging the outcome.
pub fn reload(certs: &Certificates) {
    match certs.reload() {
        Ok(()) => log::info!(
            "TLS certificate reloaded from {}",
            certs.cert_path().display()
        ),
        Err(e) => log::error!("TLS certificate not reloaded, the current one stays: {e}"),
    }
}

/// Starts a thread that re-reads the certificate and key whenever either
/// file's modification time or size changes, until shutdown.
///
/// # Errors
///
/// When the thread cannot be started.
pub fn watch(certs: Certificates, shutdown: ShutdownHandle) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ssed-tls-watch".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            while !shutdown.is_shutdown() {
                std::thread::sleep(WATCH_EVERY);
                match certs.reload_if_changed() {
                    Ok(true) => log::info!(
                        "TLS certificate reloaded from {} (the files changed)",
                        certs.cert_path().display()
                    ),
                    Ok(false) => {}
                    Err(e) => {
                        log::error!("TLS certificate not reloaded, the current one stays: {e}");
                    }
                }
            }
        })?;
    Ok(())
}
