//! The ACME protocol (RFC 8555), as much of it as obtaining a certificate
//! takes: the directory, nonces, requests signed as JWS with the account's
//! P-256 key (ES256), the account, an order, its authorizations answered
//! by `http-01` (RFC 8555 §8.3) or `tls-alpn-01` (RFC 8737), the
//! certificate request and the download.
//!
//! Errors the CA reports come back as problem documents (RFC 7807) and
//! are kept whole in [`AcmeError::Problem`]; a `badNonce` is retried with
//! the fresh nonce it carries, as §6.5 asks.

use std::fmt;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
};
use serde_json::{Value, json};

use super::https::{Https, Reply};
use super::{Challenge, Responders};
use crate::daemon::der::{self, OCTET_STRING, OID, OID_ECDSA_SHA256, SET, seq, tlv};

/// Tries of one request refused for a bad nonce.
const NONCE_TRIES: usize = 5;
/// How long an order may take, from its creation to the certificate.
const ORDER_DEADLINE: Duration = Duration::from_secs(300);

/// Why a certificate was not obtained.
#[derive(Debug)]
#[non_exhaustive]
pub enum AcmeError {
    /// The CA could not be reached, or spoke something other than HTTP.
    Transport(String),
    /// The CA refused a request with a problem document.
    Problem {
        /// What was asked for.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The problem's `type` (`urn:ietf:params:acme:error:…`).
        kind: String,
        /// Its `detail`, and the subproblems' when there are some.
        detail: String,
    },
    /// An answer that does not follow RFC 8555.
    Protocol(String),
    /// A validation failed, or an order went invalid or took too long.
    Order(String),
    /// A key or certificate could not be made (ring refused).
    Crypto(&'static str),
}

impl fmt::Display for AcmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcmeError::Transport(m) | AcmeError::Protocol(m) | AcmeError::Order(m) => {
                f.write_str(m)
            }
            AcmeError::Problem {
                url,
                status,
                kind,
                detail,
            } => write!(f, "{url}: {status} {kind}: {detail}"),
            AcmeError::Crypto(what) => write!(f, "cannot make {what}"),
        }
    }
}

impl std::error::Error for AcmeError {}

/// base64url without padding, as JWS and ACME write bytes.
fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A new P-256 private key, PKCS#8 (for the account or a certificate).
///
/// # Errors
///
/// When the system's random source fails.
pub(super) fn new_key() -> Result<Vec<u8>, AcmeError> {
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map(|doc| doc.as_ref().to_vec())
        .map_err(|_| AcmeError::Crypto("a P-256 key"))
}

/// The URLs of the directory the client uses.
#[derive(Debug)]
struct Directory {
    new_nonce: String,
    new_account: String,
    new_order: String,
}

/// An account at one CA, and the requests signed with its key.
pub(super) struct Client {
    https: Https,
    directory: Directory,
    key: EcdsaKeyPair,
    jwk: Value,
    thumbprint: String,
    /// The account's URL, once registered.
    kid: Option<String>,
    nonce: Option<String>,
    rng: SystemRandom,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("directory", &self.directory)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Reads the directory at `url`; `account_key` is the account's
    /// PKCS#8 P-256 key.
    ///
    /// # Errors
    ///
    /// When the directory cannot be read or lacks a URL, or the key is
    /// not a P-256 key.
    pub(super) fn new(https: Https, url: &str, account_key: &[u8]) -> Result<Self, AcmeError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, account_key, &rng)
            .map_err(|_| AcmeError::Protocol("the account key is not a P-256 key".into()))?;
        let reply = https
            .request("GET", url, None)
            .map_err(AcmeError::Transport)?;
        if reply.status != 200 {
            return Err(AcmeError::Protocol(format!(
                "{url}: the directory answered {}",
                reply.status
            )));
        }
        let dir = json_of(&reply, url)?;
        let field = |name: &str| {
            dir.get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| AcmeError::Protocol(format!("{url}: the directory has no {name}")))
        };
        let directory = Directory {
            new_nonce: field("newNonce")?,
            new_account: field("newAccount")?,
            new_order: field("newOrder")?,
        };
        let point = key.public_key().as_ref();
        let (x, y) = (b64(&point[1..33]), b64(&point[33..65]));
        // RFC 7638: the required members, sorted, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let thumbprint = b64(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        ));
        Ok(Client {
            https,
            directory,
            key,
            jwk: json!({"crv": "P-256", "kty": "EC", "x": x, "y": y}),
            thumbprint,
            kid: None,
            nonce: None,
            rng,
        })
    }

    /// Registers the account, or finds it when the key has one already
    /// (agreeing to the CA's terms of service).
    ///
    /// # Errors
    ///
    /// When the CA refuses.
    pub(super) fn register(&mut self, email: Option<&str>) -> Result<(), AcmeError> {
        let mut payload = json!({"termsOfServiceAgreed": true});
        if let Some(email) = email {
            payload["contact"] = json!([format!("mailto:{email}")]);
        }
        let url = self.directory.new_account.clone();
        let reply = self.post(&url, Some(&payload))?;
        let kid = reply
            .header("location")
            .ok_or_else(|| AcmeError::Protocol(format!("{url}: no Location for the account")))?;
        self.kid = Some(kid.to_owned());
        Ok(())
    }

    /// Orders a certificate for `domains`, answers its challenges with
    /// `responders`, and returns the PEM chain issued for `cert_key`
    /// (PKCS#8).
    ///
    /// # Errors
    ///
    /// What the CA refused, a failed validation, or an order that took
    /// longer than five minutes.
    pub(super) fn obtain(
        &mut self,
        domains: &[String],
        cert_key: &[u8],
        responders: &Responders<'_>,
    ) -> Result<String, AcmeError> {
        let deadline = Instant::now() + ORDER_DEADLINE;
        let identifiers: Vec<Value> = domains
            .iter()
            .map(|d| json!({"type": "dns", "value": d}))
            .collect();
        let new_order = self.directory.new_order.clone();
        let reply = self.post(&new_order, Some(&json!({"identifiers": identifiers})))?;
        let order_url = reply
            .header("location")
            .ok_or_else(|| AcmeError::Protocol(format!("{new_order}: no Location for the order")))?
            .to_owned();
        let order = json_of(&reply, &new_order)?;
        for authz in strings(&order, "authorizations", &order_url)? {
            self.authorize(&authz, responders, deadline)?;
        }
        let order = self.poll(&order_url, deadline, |s| s != "pending")?;
        let finalize = text(&order, "finalize", &order_url)?;
        if status(&order) == "ready" {
            let csr = csr(domains, cert_key)?;
            self.post(&finalize, Some(&json!({"csr": b64(csr)})))?;
        }
        let order = self.poll(&order_url, deadline, |s| s != "processing" && s != "ready")?;
        if status(&order) != "valid" {
            return Err(AcmeError::Order(format!(
                "the order for {} ended {}{}",
                domains.join(", "),
                status(&order),
                problem_text(order.get("error"))
            )));
        }
        let cert_url = text(&order, "certificate", &order_url)?;
        let reply = self.post(&cert_url, None)?;
        String::from_utf8(reply.body)
            .ok()
            .filter(|pem| pem.contains("-----BEGIN CERTIFICATE-----"))
            .ok_or_else(|| AcmeError::Protocol(format!("{cert_url}: not a PEM certificate chain")))
    }

    /// Answers the authorization at `url` if it waits for an answer, and
    /// waits for its outcome.
    fn authorize(
        &mut self,
        url: &str,
        responders: &Responders<'_>,
        deadline: Instant,
    ) -> Result<(), AcmeError> {
        let authz = json_of(&self.post(url, None)?, url)?;
        match status(&authz) {
            "valid" => return Ok(()),
            "pending" => {}
            other => {
                return Err(AcmeError::Order(format!(
                    "{url}: the authorization is {other}"
                )));
            }
        }
        let domain = authz
            .pointer("/identifier/value")
            .and_then(Value::as_str)
            .ok_or_else(|| AcmeError::Protocol(format!("{url}: no identifier")))?
            .to_owned();
        let challenges = authz
            .get("challenges")
            .and_then(Value::as_array)
            .ok_or_else(|| AcmeError::Protocol(format!("{url}: no challenges")))?;
        let offered = |kind: Challenge| {
            challenges
                .iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some(kind.name()))
        };
        let (kind, challenge) = responders
            .kinds()
            .into_iter()
            .find_map(|k| offered(k).map(|c| (k, c)))
            .ok_or_else(|| {
                AcmeError::Order(format!(
                    "{url}: the CA offers none of the challenges ssed answers here ({})",
                    responders
                        .kinds()
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let token = text(challenge, "token", url)?;
        let challenge_url = text(challenge, "url", url)?;
        if token.is_empty()
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(AcmeError::Protocol(format!(
                "{url}: a token that is not base64url"
            )));
        }
        let key_authorization = format!("{token}.{}", self.thumbprint);
        match kind {
            Challenge::Http01 => responders.answer_http_01(&token, &key_authorization),
            Challenge::TlsAlpn01 => {
                let (cert, key) = alpn_challenge_certificate(&domain, &key_authorization)?;
                responders
                    .certs
                    .answer_tls_alpn_01(&domain, cert, key)
                    .map_err(|e| AcmeError::Protocol(e.to_string()))?;
            }
        }
        log::info!("ACME: answering {} for {domain}", kind.name());
        let outcome = self
            .post(&challenge_url, Some(&json!({})))
            .and_then(|_| self.poll(url, deadline, |s| s != "pending"));
        match kind {
            Challenge::Http01 => responders.forget_http_01(&token),
            Challenge::TlsAlpn01 => responders.certs.forget_tls_alpn_01(&domain),
        }
        let authz = outcome?;
        if status(&authz) == "valid" {
            return Ok(());
        }
        let why = authz
            .get("challenges")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find_map(|c| c.get("error")));
        Err(AcmeError::Order(format!(
            "{kind} validation of {domain} failed: {}{}",
            status(&authz),
            problem_text(why),
            kind = kind.name()
        )))
    }

    /// Asks for `url` (POST-as-GET) until `done` holds of its `status`,
    /// waiting as `Retry-After` says (between 0.5 and 10 s).
    fn poll(
        &mut self,
        url: &str,
        deadline: Instant,
        done: impl Fn(&str) -> bool,
    ) -> Result<Value, AcmeError> {
        let mut wait = Duration::from_millis(500);
        loop {
            let reply = self.post(url, None)?;
            let value = json_of(&reply, url)?;
            if done(status(&value)) {
                return Ok(value);
            }
            if Instant::now() + wait > deadline {
                return Err(AcmeError::Order(format!(
                    "{url}: still {} after {} s",
                    status(&value),
                    ORDER_DEADLINE.as_secs()
                )));
            }
            let asked = reply
                .header("retry-after")
                .and_then(|s| s.parse::<u64>().ok())
                .map(Duration::from_secs);
            thread::sleep(
                asked
                    .unwrap_or(wait)
                    .clamp(Duration::from_millis(500), Duration::from_secs(10)),
            );
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// POSTs `payload` (or nothing: POST-as-GET) signed as JWS, retrying a
    /// bad nonce.
    fn post(&mut self, url: &str, payload: Option<&Value>) -> Result<Reply, AcmeError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let body = self.sign(url, payload)?;
            let reply = self
                .https
                .request("POST", url, Some(&body))
                .map_err(AcmeError::Transport)?;
            self.nonce = reply.header("replay-nonce").map(str::to_owned);
            if reply.status < 300 {
                return Ok(reply);
            }
            let problem: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
            let kind = problem
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if kind == "urn:ietf:params:acme:error:badNonce" && tries < NONCE_TRIES {
                continue;
            }
            return Err(AcmeError::Problem {
                url: url.to_owned(),
                status: reply.status,
                kind,
                detail: problem_text(Some(&problem))
                    .trim_start_matches(": ")
                    .to_owned(),
            });
        }
    }

    /// A request body: JWS in the flattened JSON form (RFC 8555 §6.2).
    fn sign(&mut self, url: &str, payload: Option<&Value>) -> Result<Vec<u8>, AcmeError> {
        let nonce = match self.nonce.take() {
            Some(n) => n,
            None => self.fresh_nonce()?,
        };
        let mut protected = json!({"alg": "ES256", "nonce": nonce, "url": url});
        match &self.kid {
            Some(kid) => protected["kid"] = json!(kid),
            None => protected["jwk"] = self.jwk.clone(),
        }
        let protected = b64(protected.to_string());
        let payload = payload.map(|p| b64(p.to_string())).unwrap_or_default();
        let signature = self
            .key
            .sign(&self.rng, format!("{protected}.{payload}").as_bytes())
            .map_err(|_| AcmeError::Crypto("a JWS signature"))?;
        Ok(
            json!({"protected": protected, "payload": payload, "signature": b64(signature)})
                .to_string()
                .into_bytes(),
        )
    }

    /// A nonce from `newNonce`.
    fn fresh_nonce(&self) -> Result<String, AcmeError> {
        let url = &self.directory.new_nonce;
        let reply = self
            .https
            .request("GET", url, None)
            .map_err(AcmeError::Transport)?;
        reply
            .header("replay-nonce")
            .map(str::to_owned)
            .ok_or_else(|| AcmeError::Protocol(format!("{url}: no Replay-Nonce")))
    }
}

/// The JSON body of `reply`.
fn json_of(reply: &Reply, url: &str) -> Result<Value, AcmeError> {
    serde_json::from_slice(&reply.body)
        .map_err(|e| AcmeError::Protocol(format!("{url}: not JSON: {e}")))
}

/// An object's `status`, or "" without one.
fn status(v: &Value) -> &str {
    v.get("status").and_then(Value::as_str).unwrap_or_default()
}

/// A string member that must be there.
fn text(v: &Value, name: &str, url: &str) -> Result<String, AcmeError> {
    v.get(name)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| AcmeError::Protocol(format!("{url}: no {name}")))
}

/// A member that must be an array of strings.
fn strings(v: &Value, name: &str, url: &str) -> Result<Vec<String>, AcmeError> {
    v.get(name)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .ok_or_else(|| AcmeError::Protocol(format!("{url}: no {name}")))
}

/// ": detail (subproblem details)" of a problem document, or "".
fn problem_text(problem: Option<&Value>) -> String {
    let Some(p) = problem.filter(|p| p.is_object()) else {
        return String::new();
    };
    let mut out = String::from(": ");
    out.push_str(
        p.get("detail")
            .and_then(Value::as_str)
            .unwrap_or("no detail"),
    );
    if let Some(subs) = p.get("subproblems").and_then(Value::as_array) {
        for s in subs {
            if let Some(d) = s.get("detail").and_then(Value::as_str) {
                out.push_str("; ");
                out.push_str(d);
            }
        }
    }
    out
}

/// A PKCS#10 certificate request for `domains` (the first as common name
/// when it fits), signed with `key` (PKCS#8 P-256).
fn csr(domains: &[String], key: &[u8]) -> Result<Vec<u8>, AcmeError> {
    /// `extensionRequest` (PKCS#9).
    const OID_EXTENSION_REQUEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e];
    let rng = SystemRandom::new();
    let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key, &rng)
        .map_err(|_| AcmeError::Crypto("a certificate request (the key is not P-256)"))?;
    let subject = match domains.first() {
        Some(d) if d.len() <= 64 => der::common_name(d),
        _ => seq(&[]),
    };
    let extensions = seq(&[&der::subject_alt_names(domains)]);
    let request = seq(&[&tlv(OID, OID_EXTENSION_REQUEST), &tlv(SET, &extensions)]);
    let info = seq(&[
        &der::uint(&[0]),
        &subject,
        &der::p256_spki(signer.public_key().as_ref()),
        &tlv(0xa0, &request),
    ]);
    let signature = signer
        .sign(&rng, &info)
        .map_err(|_| AcmeError::Crypto("a certificate request"))?;
    Ok(seq(&[
        &info,
        &seq(&[&tlv(OID, OID_ECDSA_SHA256)]),
        &der::bits(signature.as_ref()),
    ]))
}

/// The self-signed certificate and PKCS#8 key that answer a `tls-alpn-01`
/// challenge for `domain` (RFC 8737 §3): `domain` its only name, and the
/// critical `acmeIdentifier` extension holding the SHA-256 of the key
/// authorization.
pub(super) fn alpn_challenge_certificate(
    domain: &str,
    key_authorization: &str,
) -> Result<(Vec<u8>, Vec<u8>), AcmeError> {
    /// `id-pe-acmeIdentifier`, 1.3.6.1.5.5.7.1.31.
    const OID_ACME_IDENTIFIER: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| AcmeError::Crypto("a challenge key"))?;
    let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key.as_ref(), &rng)
        .map_err(|_| AcmeError::Crypto("a challenge key"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
    let acme_identifier = seq(&[
        &tlv(OID, OID_ACME_IDENTIFIER),
        &tlv(0x01, &[0xff]), // critical
        &tlv(OCTET_STRING, &tlv(OCTET_STRING, digest.as_ref())),
    ]);
    let mut serial = [0u8; 16];
    rng.fill(&mut serial)
        .map_err(|_| AcmeError::Crypto("a serial number"))?;
    serial[0] &= 0x7f;
    serial[0] |= 0x01; // positive and never zero
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let name = der::common_name("ssed tls-alpn-01 challenge");
    let algorithm = seq(&[&tlv(OID, OID_ECDSA_SHA256)]);
    let tbs = seq(&[
        &tlv(0xa0, &der::uint(&[2])), // v3
        &der::uint(&serial),
        &algorithm,
        &name,
        &seq(&[
            &der::time_element(now - 86_400),
            &der::time_element(now + 7 * 86_400),
        ]),
        &name,
        &der::p256_spki(signer.public_key().as_ref()),
        &tlv(
            0xa3,
            &seq(&[
                &der::subject_alt_names(&[domain.to_owned()]),
                &acme_identifier,
            ]),
        ),
    ]);
    let signature = signer
        .sign(&rng, &tbs)
        .map_err(|_| AcmeError::Crypto("a challenge certificate"))?;
    let cert = seq(&[&tbs, &algorithm, &der::bits(signature.as_ref())]);
    Ok((cert, key.as_ref().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_challenge_certificate_carries_its_digest_and_validity() {
        let (cert, key) = alpn_challenge_certificate("a.example", "token.thumb").expect("made");
        let (not_before, not_after) = der::validity(&cert).expect("a certificate");
        assert_eq!(not_after - not_before, 8 * 86_400);
        let digest = ring::digest::digest(&ring::digest::SHA256, b"token.thumb");
        let wanted = tlv(OCTET_STRING, digest.as_ref());
        assert!(cert.windows(wanted.len()).any(|w| w == wanted));
        assert!(cert.windows(9).any(|w| w == b"a.example"));
        // rustls takes the key for a handshake.
        let certs = crate::tls::Certificates::for_acme("/nonexistent/c", "/nonexistent/k");
        certs
            .answer_tls_alpn_01("a.example", cert, key)
            .expect("a usable key");
        assert!(certs.end_entity().is_none(), "no certificate served yet");
    }

    #[test]
    fn a_request_names_every_domain() {
        let key = new_key().expect("a key");
        let domains = ["a.example".to_owned(), "b.example".to_owned()];
        let request = csr(&domains, &key).expect("made");
        let (body, rest) = der::expect(&request, der::SEQUENCE).expect("a SEQUENCE");
        assert!(rest.is_empty());
        let (info, _) = der::expect(body, der::SEQUENCE).expect("the request info");
        for d in &domains {
            assert!(info.windows(d.len()).any(|w| w == d.as_bytes()), "{d}");
        }
        assert!(csr(&domains, b"not a key").is_err());
    }

    #[test]
    fn problems_read_with_their_subproblems() {
        let p = json!({"type": "x", "detail": "two failed",
            "subproblems": [{"detail": "a: refused"}, {"detail": "b: timeout"}]});
        assert_eq!(
            problem_text(Some(&p)),
            ": two failed; a: refused; b: timeout"
        );
        assert_eq!(problem_text(None), "");
        assert_eq!(problem_text(Some(&Value::Null)), "");
    }
}
