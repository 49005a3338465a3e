//! `https://` for the load tester: the client configuration (`--cacert`
//! roots or `--insecure`), and one stream connection's TLS state driven by
//! the poll loop of `streams.rs` without ever blocking.
//!
//! There are no system roots: the load tester trusts the CA it is given,
//! or, with `--insecure` (for tests only), any certificate at all.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::ServerName;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::{ClientConfig, ClientConnection};

/// What an `https://` target connects with: the configuration and the
/// name to ask for (SNI) and verify.
#[derive(Debug, Clone)]
pub(super) struct Client {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Client {
    /// The client for `host` (a name or an IP literal, without brackets
    /// or port).
    pub(super) fn new(config: Arc<ClientConfig>, host: &str) -> Result<Client, String> {
        let name = match host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.to_owned())
                .map_err(|_| format!("{host:?} is not a valid TLS server name"))?,
        };
        Ok(Client { config, name })
    }

    /// A new connection, its handshake not begun.
    pub(super) fn connection(&self) -> Result<ClientConnection, rustls::Error> {
        ClientConnection::new(Arc::clone(&self.config), self.name.clone())
    }
}

/// The client configuration: trusting the PEM certificates of `cacert`,
/// or (with `insecure`) anything.
pub(super) fn config(cacert: Option<&Path>, insecure: bool) -> Result<Arc<ClientConfig>, String> {
    // ring, as the server uses (see src/wire/certs.rs for why).
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    // X25519 first, as browsers offer it (ring's list starts with P-384,
    // which made each handshake cost the server about a millisecond more).
    provider
        .kx_groups
        .sort_by_key(|g| g.name() != rustls::NamedGroup::X25519);
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let config = match cacert {
        Some(path) => {
            let roots =
                ssed::daemon::acme::https::pem_roots(path).map_err(|e| format!("--cacert: {e}"))?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None if insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth(),
        None => {
            return Err(
                "https:// needs --cacert FILE (the CA to trust) or --insecure (tests only)".into(),
            );
        }
    };
    Ok(Arc::new(config))
}

/// `--insecure`: any certificate for any name is accepted; only the
/// handshake's signatures are still checked to be well-formed and made by
/// the certificate's key.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What one pass over a non-blocking TLS stream gave.
pub(super) enum Got {
    /// Plain text bytes, at the start of the scratch buffer.
    Data(usize),
    /// Nothing more for now: the socket is drained.
    Idle,
    /// The server ended the connection (with or without close_notify).
    Closed,
}

/// One stream connection's TLS state, for a non-blocking socket.
#[derive(Debug)]
pub(super) struct Session {
    conn: ClientConnection,
    /// Whether the socket is watched for writability (records wait).
    pub(super) want_out: bool,
    /// The socket said end of file: what rustls holds is all there is.
    eof: bool,
}

impl Session {
    /// A session with `request` queued to go out once the handshake is done.
    pub(super) fn new(mut conn: ClientConnection, request: &[u8]) -> io::Result<Session> {
        conn.writer().write_all(request)?;
        Ok(Session {
            conn,
            want_out: false,
            eof: false,
        })
    }

    /// Whether the handshake is still going on.
    pub(super) fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Writes what records wait, until the socket takes no more; returns
    /// whether some still wait (the socket must be watched for writing).
    pub(super) fn flush(&mut self, sock: &TcpStream) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut &*sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Plain text into `buf`: what rustls already holds, else one read of
    /// the socket and its records processed (answering the handshake as it
    /// goes, through [`flush`](Session::flush)).
    pub(super) fn read(&mut self, sock: &TcpStream, buf: &mut [u8]) -> io::Result<Got> {
        loop {
            match self.buffered(buf)? {
                Got::Idle => {}
                got => return Ok(got),
            }
            match self.conn.read_tls(&mut &*sock) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Got::Idle),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // Tell the server why (best effort: the connection ends).
                let _ = self.flush(sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    /// Plain text rustls already holds, without reading the socket:
    /// [`Got::Idle`] when there is none.
    pub(super) fn buffered(&mut self, buf: &mut [u8]) -> io::Result<Got> {
        match self.conn.reader().read(buf) {
            Ok(0) => Ok(Got::Closed),
            Ok(n) => Ok(Got::Data(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.eof => Ok(Got::Closed),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Got::Idle),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Got::Closed),
            Err(e) => Err(e),
        }
    }
}

/// Whether `e` is rustls's own (as [`Session::read`] gives it): the
/// handshake or a record was refused, not the connection lost.
pub(super) fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|e| e.is::<rustls::Error>())
}

/// A blocking connection to publish over: plain or TLS.
#[derive(Debug)]
pub(super) enum Blocking {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<ClientConnection, TcpStream>>),
}

impl Blocking {
    /// `sock` as is, or wrapped in TLS for `client` (the handshake is made
    /// by the first write).
    pub(super) fn new(sock: TcpStream, client: Option<&Client>) -> io::Result<Blocking> {
        Ok(match client {
            None => Blocking::Plain(sock),
            Some(c) => {
                let conn = c.connection().map_err(io::Error::other)?;
                Blocking::Tls(Box::new(rustls::StreamOwned::new(conn, sock)))
            }
        })
    }
}

impl io::Read for Blocking {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Blocking::Plain(s) => s.read(buf),
            Blocking::Tls(s) => s.read(buf),
        }
    }
}

impl io::Write for Blocking {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Blocking::Plain(s) => s.write(buf),
            Blocking::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Blocking::Plain(s) => s.flush(),
            Blocking::Tls(s) => s.flush(),
        }
    }
}
