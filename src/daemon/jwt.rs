//! JSON Web Tokens: compact JWS verified with a configured key, and the
//! grant their claims carry.
//!
//! - Keys come from configuration only (`jwt_secret` for HS256/384/512,
//!   `jwt_public_key` for ES256, RS256 or EdDSA); a key or key URL in the
//!   token's header (`jwk`, `jku`, `x5u`) is never used.
//! - `alg` must be on the allowlist (`jwt_algorithms`, by default what the
//!   configured keys verify) and fit the key: an HMAC token is checked only
//!   against the secret, an RSA one only against an RSA key. `none` is
//!   never accepted, nor a header with `crit`.
//! - `exp` and `nbf` are enforced when present; a token whose header `typ`
//!   is `at+jwt` (Mercure draft-08) must have `exp`, the configured `iss`
//!   and the configured audience in `aud`.
//! - The grant: Mercure draft-07's `mercure` claim (`publish`,
//!   `subscribe`: topic selectors), or in an `at+jwt` token draft-08's
//!   `authorization_details` of type `https://mercure.rocks/authorization-detail`.
//!
//! Every failure is one [`JwtError`]: callers answer `401` without saying
//! which check failed. Signatures are checked with ring's primitives (HMAC
//! compared in constant time).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{hmac, signature};
use serde_json::Value;

use super::der::{OID_EC, OID_P256, pem_block, read as der};
use crate::hub::grant::{Grant, MAX_SELECTORS, Selector, parse_selectors};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 8192;
/// The authorization detail type of Mercure draft-08.
const MERCURE_DETAIL: &str = "https://mercure.rocks/authorization-detail";

/// A signature algorithm ssed verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// HMAC with SHA-256, with `jwt_secret`.
    HS256,
    /// HMAC with SHA-384, with `jwt_secret`.
    HS384,
    /// HMAC with SHA-512, with `jwt_secret`.
    HS512,
    /// ECDSA on P-256 with SHA-256, with an EC `jwt_public_key`.
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, with an RSA `jwt_public_key`.
    RS256,
    /// Ed25519, with an Ed25519 `jwt_public_key`.
    EdDSA,
}

impl Alg {
    /// The algorithm of a JWS `alg` name.
    pub fn from_name(name: &str) -> Option<Alg> {
        Some(match name {
            "HS256" => Alg::HS256,
            "HS384" => Alg::HS384,
            "HS512" => Alg::HS512,
            "ES256" => Alg::ES256,
            "RS256" => Alg::RS256,
            "EdDSA" => Alg::EdDSA,
            _ => return None,
        })
    }

    /// Its JWS name.
    pub fn name(self) -> &'static str {
        match self {
            Alg::HS256 => "HS256",
            Alg::HS384 => "HS384",
            Alg::HS512 => "HS512",
            Alg::ES256 => "ES256",
            Alg::RS256 => "RS256",
            Alg::EdDSA => "EdDSA",
        }
    }
}

/// A public key read from PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// An RSA key (its PKCS#1 `RSAPublicKey` DER).
    Rsa(Vec<u8>),
    /// A P-256 key (its uncompressed point).
    P256(Vec<u8>),
    /// An Ed25519 key.
    Ed25519(Vec<u8>),
}

impl PublicKey {
    /// Reads a PEM public key: `PUBLIC KEY` (SubjectPublicKeyInfo) holding
    /// an RSA, P-256 or Ed25519 key, or `RSA PUBLIC KEY` (PKCS#1).
    ///
    /// # Errors
    ///
    /// What is wrong with it, in words.
    pub fn from_pem(pem: &str) -> Result<PublicKey, String> {
        let (label, der) = pem_block(pem)?;
        match label.as_str() {
            "RSA PUBLIC KEY" => Ok(PublicKey::Rsa(der)),
            "PUBLIC KEY" => spki(&der),
            other => Err(format!(
                "a PEM block of {other:?}: expected a PUBLIC KEY (RSA, P-256 or Ed25519)"
            )),
        }
    }

    /// The algorithm this key verifies.
    pub fn alg(&self) -> Alg {
        match self {
            PublicKey::Rsa(_) => Alg::RS256,
            PublicKey::P256(_) => Alg::ES256,
            PublicKey::Ed25519(_) => Alg::EdDSA,
        }
    }
}

/// A token that did not verify. Deliberately says nothing of why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtError;

impl std::fmt::Display for JwtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid token")
    }
}

impl std::error::Error for JwtError {}

/// What a verified token says.
#[derive(Debug, Clone)]
pub struct Claims {
    /// Its grant.
    pub grant: Grant,
    /// When it expires (`exp`).
    pub expires: Option<SystemTime>,
    /// Its subject (`sub`).
    pub subject: Option<String>,
    /// The payloads it attaches to its subscriptions (Mercure's active
    /// subscriptions show them), if any.
    pub payloads: Option<Arc<Payloads>>,
}

/// What a token attaches to its holder's subscriptions: draft-07's
/// `mercure.payload` (for every subscription), or draft-08's `payload` of
/// each `subscribe` authorization detail (for the subscriptions its
/// `topics` match, the first detail that matches winning).
#[derive(Debug, Default)]
pub struct Payloads(Vec<(Option<Vec<Selector>>, Value)>);

impl Payloads {
    /// The payload of the subscription by `matcher` (its topic, selector
    /// or pattern, as its subscriber gave it, matched as a topic).
    pub fn of(&self, matcher: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(topics, _)| {
                topics
                    .as_ref()
                    .is_none_or(|t| t.iter().any(|s| s.matches(matcher)))
            })
            .map(|(_, p)| p)
    }
}

/// The keys and rules tokens are verified with.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtVerifier {
    secret: Option<Vec<u8>>,
    public: Option<PublicKey>,
    algorithms: Vec<Alg>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log line.
        f.debug_struct("JwtVerifier")
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("public", &self.public.as_ref().map(PublicKey::alg))
            .field("algorithms", &self.algorithms)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl JwtVerifier {
    /// A verifier for these keys; `algorithms` empty: every algorithm the
    /// keys can verify.
    ///
    /// # Errors
    ///
    /// No key, or an algorithm listed that no configured key verifies.
    pub fn new(
        secret: Option<Vec<u8>>,
        public: Option<PublicKey>,
        algorithms: Vec<Alg>,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Result<JwtVerifier, String> {
        if secret.is_none() && public.is_none() {
            return Err("no key: set jwt_secret or jwt_public_key".into());
        }
        let usable = |a: Alg| match a {
            Alg::HS256 | Alg::HS384 | Alg::HS512 => secret.is_some(),
            other => public.as_ref().is_some_and(|k| k.alg() == other),
        };
        let algorithms = if algorithms.is_empty() {
            let mut all = Vec::new();
            if secret.is_some() {
                all.extend([Alg::HS256, Alg::HS384, Alg::HS512]);
            }
            all.extend(public.as_ref().map(PublicKey::alg));
            all
        } else {
            if let Some(a) = algorithms.iter().find(|a| !usable(**a)) {
                return Err(format!(
                    "{} is listed but no configured key verifies it ({})",
                    a.name(),
                    match a {
                        Alg::HS256 | Alg::HS384 | Alg::HS512 => "set jwt_secret",
                        _ => "jwt_public_key holds another kind of key",
                    }
                ));
            }
            algorithms
        };
        Ok(JwtVerifier {
            secret,
            public,
            algorithms,
            issuer,
            audience,
        })
    }

    /// The algorithms accepted.
    pub fn algorithms(&self) -> &[Alg] {
        &self.algorithms
    }

    /// Whether `token` looks like a compact JWS (three base64url parts),
    /// before any check: what tells a JWT from a static token.
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    }

    /// Verifies `token` at time `now` and reads its grant.
    ///
    /// # Errors
    ///
    /// [`JwtError`] for anything wrong with it.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError);
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError);
        };
        let header: Value = decode_json(h64)?;
        let header = header.as_object().ok_or(JwtError)?;
        if header.contains_key("crit") {
            return Err(JwtError);
        }
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .and_then(Alg::from_name)
            .filter(|a| self.algorithms.contains(a))
            .ok_or(JwtError)?;
        let sig = URL_SAFE_NO_PAD.decode(s64).map_err(|_| JwtError)?;
        let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
        self.check_signature(alg, signed, &sig)?;
        let at_jwt = header.get("typ").and_then(Value::as_str).is_some_and(|t| {
            let t = t.trim();
            let t = t
                .get(..12)
                .filter(|p| p.eq_ignore_ascii_case("application/"))
                .map_or(t, |_| &t[12..]);
            t.eq_ignore_ascii_case("at+jwt")
        });
        let claims: Value = decode_json(p64)?;
        let claims = claims.as_object().ok_or(JwtError)?;
        let time = |name: &str| -> Result<Option<SystemTime>, JwtError> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => {
                    let secs = v.as_f64().filter(|s| s.is_finite() && *s >= 0.0);
                    let secs = secs.ok_or(JwtError)?;
                    Ok(UNIX_EPOCH.checked_add(Duration::from_secs_f64(secs.min(1e12))))
                }
            }
        };
        let expires = time("exp")?;
        if expires.is_some_and(|exp| now >= exp) || time("nbf")?.is_some_and(|nbf| now < nbf) {
            return Err(JwtError);
        }
        let grant = if at_jwt {
            let iss = claims.get("iss").and_then(Value::as_str);
            let aud_ok = |want: &str| match claims.get("aud") {
                Some(Value::String(a)) => a == want,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(want)),
                _ => false,
            };
            let ok = expires.is_some()
                && self.issuer.as_deref().is_some_and(|i| iss == Some(i))
                && self.audience.as_deref().is_some_and(aud_ok);
            if !ok {
                return Err(JwtError);
            }
            draft08_grant(claims.get("authorization_details"))?
        } else {
            draft07_grant(claims.get("mercure"))?
        };
        let payloads = payloads(claims, at_jwt);
        Ok(Claims {
            grant,
            expires,
            subject: claims.get("sub").and_then(Value::as_str).map(str::to_owned),
            payloads: (!payloads.0.is_empty()).then(|| Arc::new(payloads)),
        })
    }

    fn check_signature(&self, alg: Alg, signed: &[u8], sig: &[u8]) -> Result<(), JwtError> {
        let hmac_with = |a: hmac::Algorithm| {
            let secret = self.secret.as_deref().ok_or(JwtError)?;
            hmac::verify(&hmac::Key::new(a, secret), signed, sig).map_err(|_| JwtError)
        };
        let public_with = |a: &'static dyn signature::VerificationAlgorithm| {
            let key = match (&self.public, alg) {
                (Some(PublicKey::Rsa(k)), Alg::RS256)
                | (Some(PublicKey::P256(k)), Alg::ES256)
                | (Some(PublicKey::Ed25519(k)), Alg::EdDSA) => k,
                _ => return Err(JwtError),
            };
            signature::UnparsedPublicKey::new(a, key)
                .verify(signed, sig)
                .map_err(|_| JwtError)
        };
        match alg {
            Alg::HS256 => hmac_with(hmac::HMAC_SHA256),
            Alg::HS384 => hmac_with(hmac::HMAC_SHA384),
            Alg::HS512 => hmac_with(hmac::HMAC_SHA512),
            Alg::ES256 => public_with(&signature::ECDSA_P256_SHA256_FIXED),
            Alg::RS256 => public_with(&signature::RSA_PKCS1_2048_8192_SHA256),
            Alg::EdDSA => public_with(&signature::ED25519),
        }
    }
}

/// Where a verifier thread leaves its answer, and the thread to wake.
#[derive(Debug)]
struct Reply {
    answer: Mutex<Option<Result<Claims, JwtError>>>,
    asker: std::thread::Thread,
}

/// A request to a verifier thread: the token, the time, where to answer.
type Job = (String, SystemTime, Arc<Reply>);

/// The verifier threads' queue.
#[derive(Debug, Default)]
struct Queue {
    jobs: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

/// Most tokens waiting for a verifier; past it a stream verifies its own.
const MAX_WAITING: usize = 1024;

/// Verifies tokens for stream threads on threads of its own.
///
/// A stream thread keeps every stack page it touches for as long as the
/// stream lives: verifying a token there (JSON parsing, the signature)
/// leaves an idle JWT stream with two resident stack pages instead of one
/// (measured on the static build: three pages, 13.8 KiB per stream, where an
/// anonymous one has one, 5.7 KiB). Here the stream thread queues the token
/// under a mutex and parks, as it does anyway while idle; a verifier thread
/// leaves the answer in a slot and unparks it, called early on the stream's
/// thread (`App::verify_ahead`). Ordinary requests, whose threads end at
/// once, verify in place. The threads end when the pool is dropped.
#[derive(Debug)]
pub struct VerifierPool {
    verifier: Arc<JwtVerifier>,
    queue: Option<Arc<Queue>>,
}

impl VerifierPool {
    /// Starts `threads` verifier threads; with none started, tokens are
    /// verified in the caller's thread.
    pub fn start(verifier: JwtVerifier, threads: usize) -> VerifierPool {
        let verifier = Arc::new(verifier);
        let queue = Arc::new(Queue::default());
        let mut started = 0;
        for _ in 0..threads {
            let (v, q) = (Arc::clone(&verifier), Arc::clone(&queue));
            let spawned = std::thread::Builder::new()
                .name("ssed-jwt".into())
                .spawn(move || verify_jobs(&v, &q));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => log::warn!("cannot start a JWT verifier thread: {e}"),
            }
        }
        VerifierPool {
            verifier,
            queue: (started > 0).then_some(queue),
        }
    }

    /// Verifies in place (for a thread that ends soon).
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, JwtError> {
        self.verifier.verify(token, now)
    }

    /// Verifies on a verifier thread (for a stream thread), or in place
    /// when there is none or too many tokens wait.
    #[inline(never)]
    pub fn verify_elsewhere(&self, token: &str, now: SystemTime) -> Result<Claims, JwtError> {
        let Some(queue) = &self.queue else {
            return self.verify(token, now);
        };
        let reply = Arc::new(Reply {
            answer: Mutex::new(None),
            asker: std::thread::current(),
        });
        {
            let mut jobs = queue.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            if jobs.1 || jobs.0.len() >= MAX_WAITING {
                drop(jobs);
                return self.verify(token, now);
            }
            jobs.0
                .push_back((token.to_owned(), now, Arc::clone(&reply)));
        }
        queue.ready.notify_one();
        loop {
            if let Some(answer) = reply
                .answer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                return answer;
            }
            // Woken by the verifier (or spuriously: look again).
            std::thread::park();
        }
    }
}

impl Drop for VerifierPool {
    fn drop(&mut self) {
        if let Some(q) = &self.queue {
            q.jobs.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
            q.ready.notify_all();
        }
    }
}

/// A verifier thread: answers queued tokens until the pool is dropped.
fn verify_jobs(verifier: &JwtVerifier, queue: &Queue) {
    loop {
        let job = {
            let mut jobs = queue.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(job) = jobs.0.pop_front() {
                    break Some(job);
                }
                if jobs.1 {
                    break None;
                }
                jobs = queue
                    .ready
                    .wait(jobs)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let Some((token, now, reply)) = job else {
            return;
        };
        // A panic here must still answer: the asker parks until it does.
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            verifier.verify(&token, now)
        }))
        .unwrap_or(Err(JwtError));
        *reply.answer.lock().unwrap_or_else(PoisonError::into_inner) = Some(answer);
        reply.asker.unpark();
    }
}

/// The `sub` a token's payload claims, read WITHOUT verifying anything:
/// only to decide who a stream counts as before its token is verified
/// (`max_streams_per_client`); a forged token is refused right after.
pub fn unverified_subject(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let claims = decode_json(payload).ok()?;
    claims.get("sub")?.as_str().map(str::to_owned)
}

fn decode_json(part: &str) -> Result<Value, JwtError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| JwtError)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError)
}

/// The payloads of a verified token's `claims` (see [`Payloads`]); its
/// grant parsed already, so the details are well formed.
fn payloads(claims: &serde_json::Map<String, Value>, at_jwt: bool) -> Payloads {
    let mut found = Vec::new();
    if !at_jwt {
        if let Some(p) = claims.get("mercure").and_then(|m| m.get("payload")) {
            found.push((None, p.clone()));
        }
        return Payloads(found);
    }
    let details = claims
        .get("authorization_details")
        .and_then(Value::as_array);
    for d in details.into_iter().flatten() {
        let subscribes = d.get("type").and_then(Value::as_str) == Some(MERCURE_DETAIL)
            && d.get("actions")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|a| a == "subscribe"));
        let (true, Some(p)) = (subscribes, d.get("payload")) else {
            continue;
        };
        let topics = d
            .get("topics")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        let selectors = topics
            .filter_map(|t| {
                let m = t.get("match").and_then(Value::as_str)?;
                match t.get("match_type").and_then(Value::as_str) {
                    Some("urlpattern") => Selector::url_pattern(m).ok(),
                    _ if m == "*" => Some(Selector::All),
                    _ => Selector::exact(m).ok(),
                }
            })
            .collect();
        found.push((Some(selectors), p.clone()));
    }
    Payloads(found)
}

/// Draft-07: `{"mercure": {"publish": [...], "subscribe": [...]}}`. No
/// claim, or no list: nothing granted.
fn draft07_grant(claim: Option<&Value>) -> Result<Grant, JwtError> {
    let Some(claim) = claim else {
        return Ok(Grant::none());
    };
    let claim = claim.as_object().ok_or(JwtError)?;
    let list = |name: &str| -> Result<Vec<Selector>, JwtError> {
        match claim.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                let strs: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                parse_selectors(strs.ok_or(JwtError)?).map_err(|_| JwtError)
            }
            Some(_) => Err(JwtError),
        }
    };
    Ok(Grant::new(list("subscribe")?, list("publish")?))
}

/// Draft-08: `authorization_details` of the Mercure type, each with
/// `actions` and `topics` (`{"match", "match_type"}`). Any detail that
/// does not parse, or a matcher type not supported, rejects the token:
/// no partial grants.
fn draft08_grant(details: Option<&Value>) -> Result<Grant, JwtError> {
    let Some(details) = details else {
        return Ok(Grant::none());
    };
    let details = details.as_array().ok_or(JwtError)?;
    if details.len() > MAX_SELECTORS {
        return Err(JwtError);
    }
    let (mut subscribe, mut publish) = (Vec::new(), Vec::new());
    for d in details {
        let d = d.as_object().ok_or(JwtError)?;
        if d.get("type").and_then(Value::as_str) != Some(MERCURE_DETAIL) {
            // Another API's detail: not ours to read.
            continue;
        }
        let actions = d.get("actions").and_then(Value::as_array).ok_or(JwtError)?;
        let topics = d.get("topics").and_then(Value::as_array).ok_or(JwtError)?;
        if actions.is_empty() || topics.is_empty() {
            return Err(JwtError);
        }
        let mut selectors = Vec::new();
        for t in topics {
            let t = t.as_object().ok_or(JwtError)?;
            let m = t.get("match").and_then(Value::as_str).ok_or(JwtError)?;
            let selector = match t.get("match_type").map(Value::as_str) {
                None | Some(Some("exact")) => Selector::exact(m).map_err(|_| JwtError)?,
                Some(Some("urlpattern")) => Selector::url_pattern(m).map_err(|_| JwtError)?,
                // `*` matches every topic whatever the matcher type.
                Some(Some(_)) if m == "*" => Selector::All,
                // A matcher type this hub does not know: a grant that
                // cannot be evaluated rejects the token.
                _ => return Err(JwtError),
            };
            selectors.push(selector);
        }
        for a in actions {
            match a.as_str().ok_or(JwtError)? {
                "subscribe" => subscribe.extend(selectors.iter().cloned()),
                "publish" => publish.extend(selectors.iter().cloned()),
                _ => {} // an action of a later specification: grants nothing here
            }
        }
        if subscribe.len() > MAX_SELECTORS || publish.len() > MAX_SELECTORS {
            return Err(JwtError);
        }
    }
    Ok(Grant::new(subscribe, publish))
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// A SubjectPublicKeyInfo: `SEQUENCE { SEQUENCE { OID, params }, BIT STRING }`.
fn spki(input: &[u8]) -> Result<PublicKey, String> {
    let (tag, info, _) = der(input)?;
    let (alg_tag, alg, rest) = der(info)?;
    let (bits_tag, bits, _) = der(rest)?;
    if tag != 0x30 || alg_tag != 0x30 || bits_tag != 0x03 {
        return Err("not a SubjectPublicKeyInfo".into());
    }
    let (oid_tag, oid, params) = der(alg)?;
    if oid_tag != 0x06 {
        return Err("not a SubjectPublicKeyInfo".into());
    }
    let key = match bits.split_first() {
        Some((0, key)) => key.to_vec(),
        _ => return Err("a malformed key bit string".into()),
    };
    match oid {
        OID_RSA => Ok(PublicKey::Rsa(key)),
        OID_ED25519 if key.len() == 32 => Ok(PublicKey::Ed25519(key)),
        OID_EC => match der(params) {
            Ok((0x06, OID_P256, _)) if key.len() == 65 && key[0] == 4 => Ok(PublicKey::P256(key)),
            _ => Err("an EC key on a curve other than P-256 (ES256 needs P-256)".into()),
        },
        _ => Err("a key of an unsupported kind: use RSA, P-256 or Ed25519".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
        let signing = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, secret),
            signing.as_bytes(),
        );
        format!("{signing}.{}", b64(tag.as_ref()))
    }

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(
            Some(b"secret".to_vec()),
            None,
            Vec::new(),
            Some("https://issuer.example".into()),
            Some("https://hub.example/.well-known/mercure".into()),
        )
        .unwrap()
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn a_draft_07_token_grants_its_selectors() {
        let t = hs256(
            b"secret",
            &serde_json::json!({"alg": "HS256", "typ": "JWT"}),
            &serde_json::json!({"mercure": {"subscribe": ["user:42:{x}", "news"], "publish": ["*"]},
                                "sub": "42", "exp": 1_800_000_060}),
        );
        let c = verifier().verify(&t, now()).unwrap();
        assert!(c.grant.can_subscribe("user:42:updates"));
        assert!(!c.grant.can_subscribe("user:43:updates"));
        assert!(c.grant.can_publish("anything"));
        assert_eq!(c.subject.as_deref(), Some("42"));
        assert_eq!(
            c.expires,
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_060))
        );
    }

    #[test]
    fn a_draft_08_token_needs_its_issuer_audience_and_expiry() {
        let header = serde_json::json!({"alg": "HS256", "typ": "at+jwt"});
        let detail = serde_json::json!([{
            "type": MERCURE_DETAIL,
            "actions": ["subscribe", "later-action"],
            "topics": [{"match": "https://example.com/books/1"}, {"match": "u:{id}", "match_type": "exact"}],
        }]);
        let good = serde_json::json!({
            "iss": "https://issuer.example", "aud": ["x", "https://hub.example/.well-known/mercure"],
            "exp": 1_800_000_060, "sub": "s", "authorization_details": detail,
        });
        let c = verifier()
            .verify(&hs256(b"secret", &header, &good), now())
            .unwrap();
        assert!(c.grant.can_subscribe("https://example.com/books/1"));
        // `exact` is exact, braces and all.
        assert!(c.grant.can_subscribe("u:{id}"));
        assert!(!c.grant.can_subscribe("u:1"));
        assert!(!c.grant.can_publish("https://example.com/books/1"));
        for (field, value) in [
            ("iss", serde_json::json!("https://other.example")),
            ("aud", serde_json::json!("https://other.example")),
            ("exp", Value::Null),
        ] {
            let mut bad = good.clone();
            if value.is_null() {
                bad.as_object_mut().unwrap().remove(field);
            } else {
                bad[field] = value;
            }
            assert_eq!(
                verifier()
                    .verify(&hs256(b"secret", &header, &bad), now())
                    .unwrap_err(),
                JwtError,
                "{field}"
            );
        }
        // A matcher type not supported rejects the whole token.
        let mut pattern = good.clone();
        pattern["authorization_details"][0]["topics"][1]["match_type"] = "regex".into();
        assert!(
            verifier()
                .verify(&hs256(b"secret", &header, &pattern), now())
                .is_err()
        );
    }

    #[test]
    fn bad_tokens_are_refused() {
        let header = serde_json::json!({"alg": "HS256"});
        let claims = serde_json::json!({"mercure": {"subscribe": ["*"]}, "exp": 1_800_000_060});
        let good = hs256(b"secret", &header, &claims);
        let v = verifier();
        assert!(v.verify(&good, now()).is_ok());
        // Wrong key, expired, not yet valid, tampered.
        assert!(v.verify(&hs256(b"other", &header, &claims), now()).is_err());
        assert!(v.verify(&good, now() + Duration::from_secs(60)).is_err());
        let nbf = serde_json::json!({"nbf": 1_800_000_100});
        assert!(v.verify(&hs256(b"secret", &header, &nbf), now()).is_err());
        let (signing, _) = good.rsplit_once('.').unwrap();
        let forged_claims = b64(br#"{"mercure":{"subscribe":["*"],"publish":["*"]}}"#);
        let (h, _) = signing.split_once('.').unwrap();
        let tampered = format!("{h}.{forged_claims}.{}", good.rsplit_once('.').unwrap().1);
        assert!(v.verify(&tampered, now()).is_err());
        // `none`, an algorithm off the list, a key in the header, `crit`.
        let none = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(br#"{}"#));
        assert!(v.verify(&none, now()).is_err());
        for h in [
            serde_json::json!({"alg": "RS256"}),
            serde_json::json!({"alg": "HS256", "crit": ["exp"]}),
        ] {
            assert!(
                v.verify(&hs256(b"secret", &h, &claims), now()).is_err(),
                "{h}"
            );
        }
        let only_384 =
            JwtVerifier::new(Some(b"secret".to_vec()), None, vec![Alg::HS384], None, None).unwrap();
        assert!(only_384.verify(&good, now()).is_err());
        // Garbage, oversized, bad selectors, wrong claim types.
        for junk in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.??.**",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(v.verify(junk, now()).is_err(), "{junk:.20}");
        }
        for c in [
            serde_json::json!({"mercure": {"subscribe": ["{"]}}),
            serde_json::json!({"mercure": {"subscribe": "*"}}),
            serde_json::json!({"mercure": {"subscribe": [1]}}),
            serde_json::json!({"exp": "soon"}),
        ] {
            assert!(
                v.verify(&hs256(b"secret", &header, &c), now()).is_err(),
                "{c}"
            );
        }
        // No mercure claim: valid, grants nothing.
        let empty = v
            .verify(&hs256(b"secret", &header, &serde_json::json!({})), now())
            .unwrap();
        assert!(!empty.grant.can_subscribe("x") && !empty.grant.can_publish("x"));
    }

    #[test]
    fn config_refuses_algorithms_without_a_key() {
        assert!(JwtVerifier::new(None, None, Vec::new(), None, None).is_err());
        let e =
            JwtVerifier::new(Some(b"s".to_vec()), None, vec![Alg::RS256], None, None).unwrap_err();
        assert!(e.contains("RS256"), "{e}");
        let v = JwtVerifier::new(Some(b"s".to_vec()), None, Vec::new(), None, None).unwrap();
        assert_eq!(v.algorithms(), [Alg::HS256, Alg::HS384, Alg::HS512]);
    }

    #[test]
    fn looks_like_jwt_tells_tokens_apart() {
        assert!(JwtVerifier::looks_like_jwt("aaa.bbb.ccc"));
        assert!(!JwtVerifier::looks_like_jwt("a-static-token"));
        assert!(!JwtVerifier::looks_like_jwt("a.b"));
        assert!(!JwtVerifier::looks_like_jwt("a b.c.d"));
    }

    /// Signs `claims` with a key pair made here, verifies with its public
    /// half read from PEM.
    fn public_key_round_trip(
        alg: Alg,
        spki_prefix: &[u8],
        public: &[u8],
        sign: impl Fn(&[u8]) -> Vec<u8>,
    ) {
        let mut spki = spki_prefix.to_vec();
        spki.extend_from_slice(public);
        let pem = crate::daemon::der::pem("PUBLIC KEY", &spki);
        let key = PublicKey::from_pem(&pem).unwrap();
        assert_eq!(key.alg(), alg);
        let v = JwtVerifier::new(None, Some(key), Vec::new(), None, None).unwrap();
        assert_eq!(v.algorithms(), [alg]);
        let signing = format!(
            "{}.{}",
            b64(format!(r#"{{"alg":"{}"}}"#, alg.name()).as_bytes()),
            b64(br#"{"mercure":{"subscribe":["t"]}}"#)
        );
        let token = format!("{signing}.{}", b64(&sign(signing.as_bytes())));
        let c = v.verify(&token, now()).unwrap();
        assert!(c.grant.can_subscribe("t"));
        // The same token signed as HMAC with the public key as secret (the
        // classic confusion) is refused: HS256 is not on this list.
        let confused = hs256(
            &spki,
            &serde_json::json!({"alg": "HS256"}),
            &serde_json::json!({}),
        );
        assert!(v.verify(&confused, now()).is_err());
        let mut bad = token.into_bytes();
        let last = bad.len() - 2;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        assert!(v.verify(std::str::from_utf8(&bad).unwrap(), now()).is_err());
    }

    #[test]
    fn ed25519_and_p256_tokens_verify_with_their_public_keys() {
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        public_key_round_trip(
            Alg::EdDSA,
            &[
                0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
            ],
            ed.public_key().as_ref(),
            |m| ed.sign(m).as_ref().to_vec(),
        );
        let fixed = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(fixed, &rng).unwrap();
        let ec = signature::EcdsaKeyPair::from_pkcs8(fixed, pkcs8.as_ref(), &rng).unwrap();
        public_key_round_trip(
            Alg::ES256,
            &[
                0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
                0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
            ],
            ec.public_key().as_ref(),
            |m| ec.sign(&rng, m).unwrap().as_ref().to_vec(),
        );
    }

    #[test]
    fn pem_keys_of_each_kind_parse_and_others_are_refused() {
        // Ed25519, from RFC 8410's example.
        let ed = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        assert!(matches!(PublicKey::from_pem(ed), Ok(PublicKey::Ed25519(k)) if k.len() == 32));
        for bad in [
            "",
            "-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----",
            "-----BEGIN PRIVATE KEY-----\nMCowBQYDK2VwAyEA\n-----END PRIVATE KEY-----",
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----",
        ] {
            assert!(PublicKey::from_pem(bad).is_err(), "{bad}");
        }
    }
}
