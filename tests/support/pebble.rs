//! A local ACME CA for the tests: Let's Encrypt's test server `pebble`
//! (Debian package `pebble`), with `pebble-challtestsrv` as its DNS server
//! answering 127.0.0.1 for every name. Both started by PID on free ports
//! and killed when the [`Pebble`] drops. Without the package a test skips
//! after printing why, except under `CI=true`, where it fails.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::TempDir;
use super::netns::in_ci;
use super::tls::{Pki, TlsClient, client_config, https};

/// A running pebble and its DNS server.
pub struct Pebble {
    children: Vec<Child>,
    /// The directory URL, for `acme_directory`.
    pub directory: String,
    /// The PEM roots of its directory's TLS, for `acme_ca_roots`.
    pub ca_roots: PathBuf,
    /// Where its management interface listens (the issuing root).
    management: SocketAddr,
    pki: Pki,
    pub dir: TempDir,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP port free now on 127.0.0.1 (pebble must be told its ports).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

impl Pebble {
    /// Starts pebble validating `http-01` on `http_port` and `tls-alpn-01`
    /// on `tls_port` of 127.0.0.1; `None` (after printing why) when pebble
    /// is not installed, outside CI.
    pub fn start(test: &str, http_port: u16, tls_port: u16) -> Option<Pebble> {
        let installed = ["pebble", "pebble-challtestsrv"].iter().all(|b| {
            Command::new(b)
                .arg("-h")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        });
        if !installed {
            let why = "pebble is not installed (apt-get install pebble)";
            if in_ci() {
                panic!("{test}: {why} (CI=true: the ACME tests must run)");
            }
            eprintln!("skipping {test}: {why}");
            return None;
        }
        let pki = Pki::new("pebble-pki");
        let (cert, key) = pki.issue("pebble");
        let dir = TempDir::new("pebble");
        let (listen, management, dns) = (free_port(), free_port(), free_udp_port());
        let config = dir.path().join("pebble.json");
        let json = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": cert, "privateKey": key,
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        std::fs::write(&config, json.to_string()).expect("write pebble's config");
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("a log file");
        let dns_addr = format!("127.0.0.1:{dns}");
        let dns_management = free_port();
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args([
                "-dns01",
                &dns_addr,
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .stdout(log("dns.log"))
            .stderr(log("dns.err"))
            .spawn()
            .expect("start pebble-challtestsrv");
        let server = Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", &dns_addr])
            // Validate at once, not after a random sleep of up to 15 s. Its
            // default of refusing 5 % of nonces stays: the client must retry.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("start pebble");
        let pebble = Pebble {
            children: vec![challtestsrv, server],
            directory: format!("https://127.0.0.1:{listen}/dir"),
            ca_roots: pki.ca(),
            management: ([127, 0, 0, 1], management).into(),
            pki,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let up = |port| TcpStream::connect(("127.0.0.1", port)).is_ok();
        // The DNS server is up once its management port is.
        while !(up(listen) && up(management) && up(dns_management)) {
            assert!(
                Instant::now() < deadline,
                "pebble did not start: {}",
                pebble.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(pebble)
    }

    /// Stops pebble and its DNS server (their files stay until the drop).
    pub fn stop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill(); // ours, by PID
            let _ = c.wait();
        }
    }

    /// Pebble's log, for failure messages.
    pub fn log(&self) -> String {
        ["pebble.log", "pebble.err", "dns.err"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A client trusting only the root pebble issues under (it makes a new
    /// one each run).
    pub fn issued_trust(&self) -> Arc<ClientConfig> {
        let answer = https(
            self.management,
            &self.pki.client(),
            "GET",
            "/roots/0",
            &[],
            "",
        );
        let pem = answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .expect("pebble's root");
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.expect("a PEM root")).expect("a usable root");
        }
        client_config(roots)
    }
}

/// A handshake with `addr` asking for `name` and verifying against
/// `config`.
pub fn connect_as(
    addr: SocketAddr,
    name: &str,
    config: &Arc<ClientConfig>,
) -> std::io::Result<TlsClient> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    let name = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    let conn = ClientConnection::new(Arc::clone(config), name).map_err(std::io::Error::other)?;
    TlsClient::over(tcp, conn)
}

/// Waits up to `timeout` for `addr` to serve `name` a certificate that
/// `config` trusts; the connection that did.
pub fn served_within(
    addr: SocketAddr,
    name: &str,
    config: &Arc<ClientConfig>,
    timeout: Duration,
) -> Option<TlsClient> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(c) = connect_as(addr, name, config) {
            return Some(c);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
