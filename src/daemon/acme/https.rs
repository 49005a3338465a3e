//! The HTTPS client ACME talks through: one blocking request per
//! connection (`Connection: close`), over rustls on ring, verified against
//! the system's roots and `acme_ca_roots`. An ACME order is a few dozen
//! requests, minutes apart at most; nothing here is on a stream's path.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Connect timeout, per address tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout on the socket.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read: a directory, an order or a certificate chain
/// is a few KiB.
const MAX_REPLY: u64 = 1 << 20;

/// Where the system keeps its PEM bundle of trusted roots, on the common
/// distributions (Debian and Ubuntu, Fedora and RHEL, Alpine, openSUSE).
/// `SSL_CERT_FILE` names another.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// An answer.
#[derive(Debug)]
pub(super) struct Reply {
    /// The status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body, chunked framing removed.
    pub body: Vec<u8>,
}

impl Reply {
    /// The first header named `name` (lower case).
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Requests over HTTPS.
#[derive(Debug, Clone)]
pub(super) struct Https {
    config: Arc<ClientConfig>,
}

/// The roots a client trusts: the PEM certificates of `extra` (a file),
/// and the system's bundle when one is found. Fails when neither gives a
/// root.
///
/// # Errors
///
/// What is wrong with `extra`, or that no root was found at all.
pub fn roots(extra: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = match extra {
        Some(path) => pem_roots(path)?,
        None => RootCertStore::empty(),
    };
    let env = std::env::var_os("SSL_CERT_FILE");
    let system = env
        .iter()
        .map(Path::new)
        .chain(SYSTEM_BUNDLES.iter().map(Path::new))
        .find_map(|p| std::fs::read(p).ok());
    if let Some(pem) = system {
        // A bundle's odd certificate (an old v1 root, say) is skipped, as
        // TLS libraries do.
        let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
        let _ = roots.add_parsable_certificates(certs);
    }
    if roots.is_empty() {
        return Err(
            "no trusted roots: the system has no CA bundle (install ca-certificates, \
             or set SSL_CERT_FILE) and none were given"
                .into(),
        );
    }
    Ok(roots)
}

/// The PEM certificates of the file at `path`, as roots to trust.
///
/// # Errors
///
/// An unreadable file, a broken PEM block, a certificate webpki cannot
/// use as a root, or no certificate at all; each naming the file.
pub fn pem_roots(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{shown}: not a PEM certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("{shown}: an unusable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{shown}: no CERTIFICATE block in it"));
    }
    Ok(roots)
}

impl Https {
    /// A client trusting `roots`.
    ///
    /// # Errors
    ///
    /// rustls's, for a configuration it cannot build.
    pub(super) fn new(roots: RootCertStore) -> Result<Self, String> {
        // ring, as the server uses (see src/wire/certs.rs for why).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Https {
            config: Arc::new(config),
        })
    }

    /// Sends one request to `url` (`https://` only) and reads the whole
    /// answer. `body` goes with `Content-Type: application/jose+json`.
    ///
    /// # Errors
    ///
    /// A bad URL, a failed connect or handshake, a broken or oversized
    /// answer.
    pub(super) fn request(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, String> {
        let (host, port, path) = split_url(url)?;
        let name = match host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.to_owned())
                .map_err(|_| format!("{url}: {host:?} is not a valid server name"))?,
        };
        let tcp = connect(host, port).map_err(|e| format!("{url}: connect: {e}"))?;
        let conn = ClientConnection::new(Arc::clone(&self.config), name)
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        let mut tls = StreamOwned::new(conn, tcp);
        let authority = if port == 443 {
            bracketed(host)
        } else {
            format!("{}:{port}", bracketed(host))
        };
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ssed/{}\r\n\
             Accept: application/json, application/pem-certificate-chain\r\nConnection: close\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(body) = body {
            head.push_str(&format!(
                "Content-Type: application/jose+json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.unwrap_or_default());
        tls.write_all(&out)
            .and_then(|()| tls.flush())
            .map_err(|e| format!("{url}: {e}"))?;
        let mut raw = Vec::new();
        match Read::by_ref(&mut tls)
            .take(MAX_REPLY + 1)
            .read_to_end(&mut raw)
        {
            Ok(_) => {}
            // A server that closes without close_notify: what came is judged
            // by its framing below.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(format!("{url}: {e}")),
        }
        if raw.len() as u64 > MAX_REPLY {
            return Err(format!("{url}: an answer over {MAX_REPLY} bytes"));
        }
        parse_reply(&raw).map_err(|e| format!("{url}: {e}"))
    }
}

/// `host` as it goes in a `Host` header: an IPv6 address in brackets.
fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// (host, port, path and query) of an `https://` URL.
pub(crate) fn split_url(url: &str) -> Result<(&str, u16, &str), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url}: not an https:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(format!("{url}: user information in the URL"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url}: an unclosed [ in the host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => 443,
        Some(p) => p
            .parse()
            .map_err(|_| format!("{url}: {p:?} is not a port"))?,
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok((host, port, path))
}

/// A connected socket to `host:port`, trying each address in turn.
fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(tcp) => {
                tcp.set_read_timeout(Some(IO_TIMEOUT))?;
                tcp.set_write_timeout(Some(IO_TIMEOUT))?;
                return Ok(tcp);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Parses a whole HTTP/1.1 answer.
fn parse_reply(raw: &[u8]) -> Result<Reply, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let end = match parsed.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the answer ended in its head".into()),
        Err(e) => return Err(format!("a malformed answer: {e}")),
    };
    let status = parsed.code.unwrap_or_default();
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_owned(),
            )
        })
        .collect();
    let rest = &raw[end..];
    let find = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let body = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        unchunk(rest)?
    } else if let Some(len) = find("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("a bad Content-Length {len:?}"))?;
        rest.get(..len)
            .ok_or("the answer ended in its body")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// The body of a chunked answer.
fn unchunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a broken chunk")?;
        let size = std::str::from_utf8(&rest[..line_end]).map_err(|_| "a broken chunk")?;
        let size = size.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| "a broken chunk size")?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or("the answer ended in a chunk")?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("the answer ended in a chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_path() {
        assert_eq!(
            split_url("https://acme.example/dir?x=1"),
            Ok(("acme.example", 443, "/dir?x=1"))
        );
        assert_eq!(
            split_url("https://127.0.0.1:14000"),
            Ok(("127.0.0.1", 14000, "/"))
        );
        assert_eq!(split_url("https://[::1]:8443/d"), Ok(("::1", 8443, "/d")));
        assert!(split_url("http://acme.example/").is_err());
        assert!(split_url("https://u:p@acme.example/").is_err());
        assert!(split_url("https://acme.example:x/").is_err());
        assert!(split_url("https:///dir").is_err());
    }

    #[test]
    fn answers_parse_by_length_chunks_or_close() {
        let r = parse_reply(
            b"HTTP/1.1 201 Created\r\nLocation: /o/1\r\nContent-Length: 2\r\n\r\n{}junk",
        )
        .expect("parses");
        assert_eq!(
            (r.status, r.header("location"), &r.body[..]),
            (201, Some("/o/1"), &b"{}"[..])
        );
        let r = parse_reply(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .expect("parses");
        assert_eq!(r.body, b"abcde");
        let r = parse_reply(b"HTTP/1.1 200 OK\r\n\r\nto the end").expect("parses");
        assert_eq!(r.body, b"to the end");
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(
            parse_reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
        assert!(parse_reply(b"HTTP/1.1 200").is_err());
    }
}
