//! HTTPS for the tests: a throwaway CA and leaf certificates made with the
//! `openssl` command (CI has it), and a rustls client that trusts that CA
//! only, with a timeout on every read.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::{READ_TIMEOUT, TempDir};

/// A CA made for one test, and the leaves it issues (for `localhost` and
/// `127.0.0.1`).
pub struct Pki {
    pub dir: TempDir,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl command (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A new CA (P-256) in a directory of its own.
    pub fn new(name: &str) -> Pki {
        let pki = Pki {
            dir: TempDir::new(name),
        };
        let (ca_key, ca) = (pki.file("ca.key"), pki.file("ca.pem"));
        pki.new_key(
            &ca_key,
            &[
                "-x509",
                "-out",
                &ca,
                "-days",
                "2",
                "-subj",
                "/CN=ssed test CA",
            ],
        );
        std::fs::write(
            pki.file("leaf.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write the extensions");
        pki
    }

    /// Issues a leaf named `name` (its CN): `name.pem` and `name.key`.
    pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key, csr) = (
            self.file(&format!("{name}.pem")),
            self.file(&format!("{name}.key")),
            self.file(&format!("{name}.csr")),
        );
        self.new_key(
            &key,
            &["-new", "-out", &csr, "-subj", &format!("/CN={name}")],
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.file("ca.pem"),
            "-CAkey",
            &self.file("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &self.file("leaf.ext"),
            "-out",
            &cert,
        ]);
        (cert.into(), key.into())
    }

    /// Issues a leaf for the DNS name `dns`, valid from `start` to `end`
    /// (`YYYYMMDDHHMMSSZ`, either may be past): `dns.pem` and `dns.key`.
    pub fn issue_dated(&self, dns: &str, start: &str, end: &str) -> (PathBuf, PathBuf) {
        let dir = self.dir.path().display().to_string();
        std::fs::write(self.file("index.txt"), "").expect("write the CA's index");
        std::fs::write(self.file("serial"), "1000\n").expect("write the CA's serial");
        std::fs::write(
            self.file("ca.cnf"),
            format!(
                "[ca]\ndefault_ca = d\n[d]\ndatabase = {dir}/index.txt\nnew_certs_dir = {dir}\n\
                 serial = {dir}/serial\ndefault_md = sha256\npolicy = p\nunique_subject = no\n\
                 [p]\ncommonName = supplied\n"
            ),
        )
        .expect("write the CA's config");
        std::fs::write(
            self.file("dated.ext"),
            format!("subjectAltName=DNS:{dns}\n"),
        )
        .expect("write the extensions");
        let (cert, key, csr) = (
            self.file(&format!("{dns}.pem")),
            self.file(&format!("{dns}.key")),
            self.file(&format!("{dns}.csr")),
        );
        self.new_key(
            &key,
            &["-new", "-out", &csr, "-subj", &format!("/CN={dns}")],
        );
        openssl(&[
            "ca",
            "-batch",
            "-notext",
            "-config",
            &self.file("ca.cnf"),
            "-cert",
            &self.file("ca.pem"),
            "-keyfile",
            &self.file("ca.key"),
            "-in",
            &csr,
            "-out",
            &cert,
            "-startdate",
            start,
            "-enddate",
            end,
            "-extfile",
            &self.file("dated.ext"),
        ]);
        (cert.into(), key.into())
    }

    /// `openssl req` making a new P-256 key in `key`, with `rest`.
    fn new_key(&self, key: &str, rest: &[&str]) {
        let mut args = vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key,
        ];
        args.extend_from_slice(rest);
        openssl(&args);
    }

    /// A file of this PKI's directory.
    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    /// The CA's certificate file.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A client configuration that trusts this CA only.
    pub fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.ca()).expect("read the CA") {
            roots
                .add(cert.expect("a CA certificate"))
                .expect("a usable CA");
        }
        client_config(roots)
    }
}

/// A rustls client configuration trusting `roots`, on ring as the server
/// uses (see src/wire/certs.rs for why).
pub fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The DER of the first certificate of a PEM file.
pub fn cert_der(path: &std::path::Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path)
        .expect("a PEM certificate")
        .to_vec()
}

/// An HTTPS connection with its handshake done.
pub struct TlsClient {
    pub tls: StreamOwned<ClientConnection, TcpStream>,
    /// Everything read so far, as text (lossy).
    pub text: String,
}

impl TlsClient {
    /// Connects to `addr` as `localhost` and completes the handshake.
    pub fn connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> io::Result<TlsClient> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(READ_TIMEOUT))?;
        tcp.set_write_timeout(Some(READ_TIMEOUT))?;
        TlsClient::over(
            tcp,
            ClientConnection::new(Arc::clone(config), localhost()).map_err(io::Error::other)?,
        )
    }

    /// Finishes the handshake of `conn` over `tcp` (which may have
    /// carried part of it already).
    pub fn over(tcp: TcpStream, conn: ClientConnection) -> io::Result<TlsClient> {
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(TlsClient {
            tls,
            text: String::new(),
        })
    }

    /// The certificate the server presented.
    pub fn peer_cert(&self) -> Vec<u8> {
        self.tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .expect("a server certificate")
            .to_vec()
    }

    pub fn send(&mut self, raw: &str) {
        self.tls.write_all(raw.as_bytes()).expect("send over TLS");
        self.tls.flush().expect("flush");
    }

    /// Reads until the text read so far contains `needle` (true) or
    /// `timeout` passes or the connection ends (false).
    pub fn read_until(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.text.contains(needle) {
            if self.read_more(deadline) != Some(true) {
                return false;
            }
        }
        true
    }

    /// Whether the server ends the connection within `timeout` (reading
    /// what comes meanwhile into `text`).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_more(deadline) {
                Some(true) => {}
                Some(false) => return true,
                None => return false,
            }
        }
    }

    /// Reads once into `text`, waiting until `deadline` at most: true when
    /// bytes came, false at the end of the connection (or an error), `None`
    /// when the deadline passed.
    fn read_more(&mut self, deadline: Instant) -> Option<bool> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.tls.sock.set_read_timeout(Some(left)).expect("timeout");
            return match self.tls.read(&mut chunk) {
                Ok(0) => Some(false),
                Ok(n) => {
                    self.text.push_str(&String::from_utf8_lossy(&chunk[..n]));
                    Some(true)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    None
                }
                Err(_) => Some(false),
            };
        }
    }
}

pub fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("a name")
}

/// One request on a new HTTPS connection (`Connection: close`): the whole
/// answer, head and body.
pub fn https(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    extra: &[&str],
    body: &str,
) -> String {
    let mut c = TlsClient::connect(addr, config).expect("an HTTPS connection");
    let req = super::request_text(method, path, "localhost", extra, body);
    c.send(&req);
    let _ = c.closed_within(READ_TIMEOUT);
    c.text
}
