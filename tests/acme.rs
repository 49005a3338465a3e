//! ACME (`[tls] acme_domains`) against a real local CA, pebble: a
//! certificate obtained by `tls-alpn-01` on the TLS listener and by
//! `http-01` on `redirect_http`, served to clients that trust pebble's
//! root, kept in the cache and served from it after a restart, renewed
//! ahead of expiry while the old one serves, and kept serving when
//! renewal fails. Pebble runs by PID on free ports (`support::pebble`);
//! names resolve to 127.0.0.1 through its DNS test server.
#![cfg(feature = "daemon")]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::TempDir;
use support::pebble::{Pebble, connect_as, free_port, served_within};
use support::process::{Ssed, assert_config_refused};
use support::tls::{Pki, cert_der};

/// Long enough for an order against pebble (it validates at once here).
const OBTAIN: Duration = Duration::from_secs(30);

/// Starts ssed on `toml` (in `dir`) listening on `port`.
fn ssed(dir: &TempDir, toml: &str) -> Ssed {
    let path = dir.path().join("ssed.toml");
    std::fs::write(&path, toml).expect("write config");
    Ssed::spawn(&["--config", path.to_str().expect("utf-8 path")], &[])
}

fn config(
    port: u16,
    domain: &str,
    directory: &str,
    roots: &std::path::Path,
    cache: &std::path::Path,
) -> String {
    format!(
        "listen = \"127.0.0.1:{port}\"\n[tls]\nacme_domains = [\"{domain}\"]\n\
         acme_directory = \"{directory}\"\nacme_ca_roots = \"{}\"\nacme_cache = \"{}\"\n",
        roots.display(),
        cache.display()
    )
}

/// The cache's files for `domain` from the CA at `directory`'s port.
fn cached(
    cache: &std::path::Path,
    directory: &str,
    domain: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let port = directory
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .expect("a port in the directory URL");
    let dir = cache.join(format!("127.0.0.1_{port}"));
    (
        dir.join(format!("{domain}.crt")),
        dir.join(format!("{domain}.key")),
    )
}

/// A metric's value from `/metrics` over `client`'s connection.
fn metric(
    addr: SocketAddr,
    domain: &str,
    trust: &Arc<rustls::ClientConfig>,
    name: &str,
) -> Option<u64> {
    let mut c = connect_as(addr, domain, trust).expect("an HTTPS connection");
    c.send(&support::request_text("GET", "/metrics", domain, &[], ""));
    c.closed_within(Duration::from_secs(5));
    c.text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Asserts that `/metrics` gives the served certificate's expiry, and that
/// it is a pebble one (valid for years), not one near its end.
fn assert_served_for_long(addr: SocketAddr, domain: &str, trust: &Arc<rustls::ClientConfig>) {
    let expiry = metric(
        addr,
        domain,
        trust,
        "ssed_tls_certificate_expiry_timestamp_seconds",
    )
    .expect("the expiry metric");
    assert!(expiry > now() + 30 * 86_400, "{expiry}");
}

/// `secs` since the epoch as openssl's `YYYYMMDDHHMMSSZ`.
fn openssl_time(secs: u64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y%m%d%H%M%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[test]
fn tls_alpn_01_gets_a_certificate_that_serves_events_and_survives_a_restart() {
    let port = free_port();
    let Some(mut pebble) = Pebble::start("tls_alpn_01", free_port(), port) else {
        return;
    };
    let dir = TempDir::new("acme-alpn");
    let cache = dir.path().join("cache");
    let domain = "alpn.ssed.test";
    // From this machine under its name, as a page of it would.
    let toml = format!("allowed_hosts = [\"{domain}\"]\n")
        + &config(port, domain, &pebble.directory, &pebble.ca_roots, &cache);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let trust = pebble.issued_trust();
    let mut server = ssed(&dir, &toml);
    let Some(mut stream) = served_within(addr, domain, &trust, OBTAIN) else {
        panic!(
            "no certificate from pebble within {OBTAIN:?}\nssed: {}\npebble: {}",
            server.stderr(),
            pebble.log()
        );
    };
    assert!(
        server.logged("answering tls-alpn-01 for alpn.ssed.test"),
        "{}",
        server.stderr()
    );
    // Events flow over it.
    stream.send(&support::request_text(
        "GET",
        "/events/acme",
        domain,
        &["Accept: text/event-stream"],
        "",
    ));
    assert!(
        stream.read_until("\r\n\r\n", Duration::from_secs(5)),
        "{}",
        stream.text
    );
    let mut publisher = connect_as(addr, domain, &trust).expect("a second connection");
    publisher.send(&support::request_text(
        "POST",
        "/publish/acme",
        domain,
        &[],
        "over acme",
    ));
    publisher.closed_within(Duration::from_secs(5));
    assert!(
        publisher.text.starts_with("HTTP/1.1 20"),
        "{}",
        publisher.text
    );
    assert!(
        stream.read_until("data: over acme", Duration::from_secs(5)),
        "{}",
        stream.text
    );
    // Metrics: the expiry of what is served (pebble issues for years), one obtained.
    assert_served_for_long(addr, domain, &trust);
    assert_eq!(
        metric(
            addr,
            domain,
            &trust,
            "ssed_acme_certificates_obtained_total"
        ),
        Some(1)
    );
    assert_eq!(
        metric(addr, domain, &trust, "ssed_acme_renewal_failures_total"),
        Some(0)
    );
    // The cache: the account key and the certificate's, private.
    let (crt, key) = cached(&cache, &pebble.directory, domain);
    let account = crt.with_file_name("account.key");
    use std::os::unix::fs::PermissionsExt;
    for f in [&crt, &key, &account] {
        let mode = std::fs::metadata(f)
            .expect("a cached file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", f.display());
    }
    let served = stream.peer_cert();
    assert_eq!(served, cert_der(&crt));
    // A validation handshake (ALPN acme-tls/1) with no challenge pending
    // gets no certificate at all, and the server goes on.
    let mut validator = (*trust).clone();
    validator.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    assert!(connect_as(addr, domain, &Arc::new(validator)).is_err());
    // A client offering it beside http/1.1 is no validation: it is served.
    let mut both = (*trust).clone();
    both.alpn_protocols = vec![b"http/1.1".to_vec(), b"acme-tls/1".to_vec()];
    let c = connect_as(addr, domain, &Arc::new(both)).expect("served as usual");
    assert_eq!(c.tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert!(connect_as(addr, domain, &trust).is_ok());
    server.terminate();
    server
        .wait_exit(Duration::from_secs(10))
        .expect("stops on SIGTERM");
    pebble.stop(); // the CA is gone: the restart must use the cache
    let mut server = ssed(&dir, &toml);
    let again = served_within(addr, domain, &trust, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the cached certificate is not served: {}", server.stderr()));
    assert_eq!(
        again.peer_cert(),
        served,
        "the same certificate, from the cache"
    );
    assert!(!server.logged("ACME: obtaining"), "{}", server.stderr());
    assert!(server.is_running());
}

#[test]
fn http_01_on_redirect_http_and_everything_else_redirected() {
    let (port, http) = (free_port(), free_port());
    // tls-alpn-01 would reach a closed port: http-01 must be what works.
    let Some(pebble) = Pebble::start("http_01", http, free_port()) else {
        return;
    };
    let dir = TempDir::new("acme-http");
    let domain = "http.ssed.test";
    let toml = config(
        port,
        domain,
        &pebble.directory,
        &pebble.ca_roots,
        &dir.path().join("c"),
    ) + &format!("redirect_http = \"127.0.0.1:{http}\"\n");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let server = ssed(&dir, &toml);
    let trust = pebble.issued_trust();
    let mut c = served_within(addr, domain, &trust, OBTAIN).unwrap_or_else(|| {
        panic!(
            "no certificate: {}\npebble: {}",
            server.stderr(),
            pebble.log()
        )
    });
    assert!(
        server.logged("answering http-01 for http.ssed.test"),
        "{}",
        server.stderr()
    );
    c.send(&support::request_text("GET", "/healthz", domain, &[], ""));
    c.closed_within(Duration::from_secs(5));
    assert!(c.text.contains("\"status\":\"ok\""), "{}", c.text);
    // The plain port redirects, keeping path and query.
    let plain: SocketAddr = ([127, 0, 0, 1], http).into();
    let answer = support::Client::new(plain)
        .send(
            support::request_text("GET", "/events?topic=a%20b", "http.ssed.test:80", &[], "")
                .as_bytes(),
        )
        .head();
    assert_eq!(answer.status, 308, "{answer:?}");
    assert_eq!(
        answer.header("location"),
        Some(format!("https://http.ssed.test:{port}/events?topic=a%20b").as_str())
    );
    // No challenge pending now: a token gets 404, not a redirect.
    let answer = support::Client::new(plain)
        .send(
            support::request_text("GET", "/.well-known/acme-challenge/abc", "x", &[], "")
                .as_bytes(),
        )
        .head();
    assert_eq!(answer.status, 404);
    // No Host: 400.
    let answer = support::Client::new(plain)
        .send(b"GET / HTTP/1.0\r\n\r\n")
        .head();
    assert_eq!(answer.status, 400);
}

#[test]
fn a_certificate_near_expiry_keeps_serving_and_is_renewed() {
    let port = free_port();
    let Some(pebble) = Pebble::start("renewal", free_port(), port) else {
        return;
    };
    let dir = TempDir::new("acme-renew");
    let cache = dir.path().join("cache");
    let domain = "renew.ssed.test";
    // Ten days old, two to go: past two thirds of its life.
    let pki = Pki::new("acme-old");
    let (old_crt, old_key) = pki.issue_dated(
        domain,
        &openssl_time(now() - 10 * 86_400),
        &openssl_time(now() + 2 * 86_400),
    );
    let (crt, key) = cached(&cache, &pebble.directory, domain);
    std::fs::create_dir_all(crt.parent().expect("a parent")).expect("the cache");
    std::fs::copy(&old_crt, &crt).expect("seed the certificate");
    std::fs::copy(&old_key, &key).expect("seed the key");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let server = ssed(
        &dir,
        &config(port, domain, &pebble.directory, &pebble.ca_roots, &cache),
    );
    let trust = pebble.issued_trust();
    let renewed = served_within(addr, domain, &trust, OBTAIN)
        .unwrap_or_else(|| panic!("not renewed: {}\npebble: {}", server.stderr(), pebble.log()));
    assert_ne!(renewed.peer_cert(), cert_der(&old_crt));
    assert!(
        server.logged("ACME: renewing a certificate for renew.ssed.test"),
        "{}",
        server.stderr()
    );
    assert_served_for_long(addr, domain, &trust);
}

#[test]
fn a_failed_renewal_keeps_the_current_certificate_serving() {
    // No CA at all: the directory's port is closed.
    let dir = TempDir::new("acme-fail");
    let pki = Pki::new("acme-fail-pki");
    let domain = "fail.ssed.test";
    let (old_crt, old_key) = pki.issue_dated(
        domain,
        &openssl_time(now() - 10 * 86_400),
        &openssl_time(now() + 2 * 86_400),
    );
    let directory = format!("https://127.0.0.1:{}/dir", free_port());
    let cache = dir.path().join("cache");
    let (crt, key) = cached(&cache, &directory, domain);
    std::fs::create_dir_all(crt.parent().expect("a parent")).expect("the cache");
    std::fs::copy(&old_crt, &crt).expect("seed the certificate");
    std::fs::copy(&old_key, &key).expect("seed the key");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let server = ssed(&dir, &config(port, domain, &directory, &pki.ca(), &cache));
    let trust = pki.client();
    let c = served_within(addr, domain, &trust, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the current certificate is not served: {}", server.stderr()));
    assert_eq!(c.peer_cert(), cert_der(&old_crt));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !server.logged("the current one keeps serving") {
        assert!(std::time::Instant::now() < deadline, "{}", server.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        metric(addr, domain, &trust, "ssed_acme_renewal_failures_total"),
        Some(1)
    );
    assert_eq!(
        metric(
            addr,
            domain,
            &trust,
            "ssed_acme_certificates_obtained_total"
        ),
        Some(0)
    );
    // Still the old certificate, and the server answers.
    let c = connect_as(addr, domain, &trust).expect("still served");
    assert_eq!(c.peer_cert(), cert_der(&old_crt));
}

#[test]
fn no_certificate_yet_refuses_handshakes_and_keeps_serving() {
    let dir = TempDir::new("acme-none");
    let pki = Pki::new("acme-none-pki");
    let directory = format!("https://127.0.0.1:{}/dir", free_port());
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut server = ssed(
        &dir,
        &config(
            port,
            "none.ssed.test",
            &directory,
            &pki.ca(),
            &dir.path().join("c"),
        ),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !server.logged("HTTPS handshakes fail until one is obtained") {
        assert!(std::time::Instant::now() < deadline, "{}", server.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..3 {
        assert!(connect_as(addr, "none.ssed.test", &pki.client()).is_err());
    }
    // A plain request to the TLS port gets its plain-text answer.
    let answer = support::Client::new(addr)
        .send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .head();
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(server.is_running());
}

#[test]
fn bad_acme_settings_are_refused_by_key() {
    let pki = Pki::new("acme-config");
    let (cert, key) = pki.issue("x");
    let ok =
        "acme_directory = \"https://127.0.0.1:1/dir\"\nacme_cache = \"/tmp/ssed-acme-never\"\n";
    let cases = [
        (
            format!(
                "acme_domains = [\"a.example\"]\ncert = \"{}\"\nkey = \"{}\"\n{ok}",
                cert.display(),
                key.display()
            ),
            "tls.cert",
            "not both",
        ),
        (
            format!("acme_domains = [\"*.example\"]\n{ok}"),
            "tls.acme_domains",
            "dns-01",
        ),
        (
            format!("acme_domains = [\"a b\"]\n{ok}"),
            "tls.acme_domains",
            "not a DNS name",
        ),
        (
            format!("acme_domains = [\"10.0.0.1\"]\n{ok}"),
            "tls.acme_domains",
            "IP address",
        ),
        (
            format!("acme_domains = [\"account\"]\n{ok}"),
            "tls.acme_domains",
            "one label",
        ),
        (
            "acme_domains = [\"a.example\"]\nacme_directory = \"http://ca/dir\"\n".into(),
            "tls.acme_directory",
            "https://",
        ),
        (
            format!("acme_domains = [\"a.example\"]\nacme_ca_roots = \"/nonexistent.pem\"\n{ok}"),
            "tls.acme_ca_roots",
            "/nonexistent.pem",
        ),
        (
            "acme_email = \"x@y\"\n".into(),
            "tls.acme_email",
            "without acme_domains",
        ),
        (
            format!("acme_domains = [\"a.example\"]\nacme_email = \"nobody\"\n{ok}"),
            "tls.acme_email",
            "not an email",
        ),
        (
            "redirect_http = \"127.0.0.1:0\"\n".into(),
            "tls.redirect_http",
            "without HTTPS",
        ),
    ];
    for (tls, key, words) in cases {
        assert_config_refused(&format!("[tls]\n{tls}"), key, words);
    }
}
