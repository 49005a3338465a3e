//! The client side of PostgreSQL's password methods: `md5` and
//! SCRAM-SHA-256 (RFC 5802 with RFC 7677's hash, the server's default since
//! PostgreSQL 14), on ring's primitives. `password` (plain text) needs no
//! code of its own.
//!
//! SCRAM runs without channel binding (`n,,`: there is no TLS to bind to)
//! and checks the server's signature, so a server that does not know the
//! password cannot pass for one that does.
//!
//! SASLprep (RFC 4013) is not applied: a password in plain ASCII needs
//! none (SASLprep leaves printable ASCII as it is), and any other is used
//! as its UTF-8 bytes rather than normalized, which spares the Unicode
//! tables. PostgreSQL does the same with a password SASLprep rejects; a
//! non-ASCII password that SASLprep would change (NFKC: full-width
//! letters, ligatures, some spaces) fails to authenticate, and should be
//! given in its normalized form.

use std::num::NonZeroU32;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::{digest, hmac, pbkdf2};

use super::md5::{hex, md5};

/// The only SASL mechanism this client speaks.
pub(crate) const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// Most PBKDF2 iterations a server may ask for (about a second of CPU):
/// more is refused rather than spun on at every reconnect. PostgreSQL's
/// default is 4,096.
pub(crate) const MAX_ITERATIONS: u32 = 1_000_000;
/// Random bytes in the client nonce (base64: 24 printable characters).
const NONCE_BYTES: usize = 18;

/// The `md5` method's answer: `md5` and the hex MD5 of the hex MD5 of
/// password and user name, followed by the server's salt.
pub(crate) fn md5_password(user: &[u8], password: &[u8], salt: [u8; 4]) -> String {
    let inner = hex(&md5(&[password, user].concat()));
    format!("md5{}", hex(&md5(&[inner.as_bytes(), &salt].concat())))
}

/// A random client nonce, from the system's secure generator.
pub(crate) fn nonce() -> Result<String, String> {
    let mut bytes = [0u8; NONCE_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "no randomness for the SCRAM nonce".to_owned())?;
    Ok(STANDARD.encode(bytes))
}

/// One SCRAM-SHA-256 exchange, client side.
pub(crate) struct Scram {
    password: Vec<u8>,
    /// `n=user,r=nonce`.
    client_first_bare: String,
    client_nonce: String,
    /// What the server's final message must carry, once known.
    server_signature: Option<hmac::Tag>,
}

impl Scram {
    /// Starts an exchange. PostgreSQL takes the role from the startup
    /// message and ignores the SCRAM user name, which libpq sends empty:
    /// so does the listener (`user` is for the RFC's test vectors).
    pub(crate) fn new(user: &str, password: &[u8], client_nonce: String) -> Scram {
        Scram {
            password: password.to_vec(),
            client_first_bare: format!("n={user},r={client_nonce}"),
            client_nonce,
            server_signature: None,
        }
    }

    /// The client-first-message: no channel binding, no authzid.
    pub(crate) fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// The client-final-message answering `server_first`, with the proof.
    pub(crate) fn client_final(&mut self, server_first: &[u8]) -> Result<String, String> {
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| "the server's SCRAM message is not UTF-8".to_owned())?;
        let mut attrs = server_first.split(',');
        let mut attr = |name: char| {
            attrs
                .next()
                .and_then(|a| a.strip_prefix(name)?.strip_prefix('='))
                .ok_or_else(|| format!("the server's SCRAM message lacks `{name}=`"))
        };
        let nonce = attr('r')?;
        let salt = attr('s')?;
        let iterations = attr('i')?;
        if nonce.len() <= self.client_nonce.len()
            || !nonce.starts_with(&self.client_nonce)
            || !nonce.bytes().all(|b| b.is_ascii_graphic() && b != b',')
        {
            return Err("the server's SCRAM nonce does not extend ours".to_owned());
        }
        let salt = STANDARD
            .decode(salt)
            .map_err(|_| "the server's SCRAM salt is not base64".to_owned())?;
        let iterations = iterations
            .parse::<NonZeroU32>()
            .map_err(|_| "the server's SCRAM iteration count is not a number".to_owned())?;
        if iterations.get() > MAX_ITERATIONS {
            return Err(format!(
                "the server asks for {iterations} SCRAM iterations, more than the \
                 {MAX_ITERATIONS} this client allows"
            ));
        }

        let mut salted = [0u8; digest::SHA256_OUTPUT_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            &self.password,
            &mut salted,
        );
        let salted = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&salted, b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());

        // `biws` is base64("n,,"): the GS2 header, no channel binding.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(client_signature.as_ref())
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac::sign(&salted, b"Server Key");
        self.server_signature = Some(hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            auth_message.as_bytes(),
        ));
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)))
    }

    /// Checks the server-final-message: the server proves it knew the
    /// password too.
    pub(crate) fn verify_server_final(&self, server_final: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(server_final)
            .map_err(|_| "the server's final SCRAM message is not UTF-8".to_owned())?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(format!("the server refused the SCRAM exchange: {error}"));
        }
        let expected = self
            .server_signature
            .as_ref()
            .ok_or_else(|| "the server ended the SCRAM exchange early".to_owned())?;
        let signature = text
            .split(',')
            .next()
            .and_then(|v| v.strip_prefix("v="))
            .and_then(|v| STANDARD.decode(v).ok())
            .ok_or_else(|| "the server's final SCRAM message has no signature".to_owned())?;
        let differs = signature.len() != expected.as_ref().len()
            || signature
                .iter()
                .zip(expected.as_ref())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                != 0;
        if differs {
            return Err(
                "the server's SCRAM signature is wrong: it does not know the password".to_owned(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677, section 3.
    #[test]
    fn rfc_7677_exchange() {
        let mut scram = Scram::new("user", b"pencil", "rOprNGfwEbeRWgbNEkqO".to_owned());
        assert_eq!(scram.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let client_final = scram
            .client_final(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                  s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            )
            .expect("a valid server-first");
        assert_eq!(
            client_final,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        scram
            .verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .expect("the RFC's server signature");
        let wrong = scram
            .verify_server_final(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .expect_err("one bit off");
        assert!(wrong.contains("does not know the password"), "{wrong}");
    }

    /// An exchange psql had with PostgreSQL (empty SCRAM user name, as
    /// PostgreSQL clients send it), recorded in postgres-protocol's tests.
    #[test]
    fn psql_exchange() {
        let mut scram = Scram::new("", b"foobar", "9IZ2O01zb9IgiIZ1WJ/zgpJB".to_owned());
        assert_eq!(scram.client_first(), "n,,n=,r=9IZ2O01zb9IgiIZ1WJ/zgpJB");
        let client_final = scram
            .client_final(
                b"r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,s=fs3IXBy7U7+IvVjZ,i=4096",
            )
            .expect("a valid server-first");
        assert_eq!(
            client_final,
            "c=biws,r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,\
             p=AmNKosjJzS31NTlQYNs5BTeQjdHdk7lOflDo5re2an8="
        );
        scram
            .verify_server_final(b"v=U+ppxD5XUKtradnv8e2MkeupiA8FU87Sg8CXzXHDAzw=")
            .expect("psql's server signature");
    }

    #[test]
    fn bad_server_first_messages() {
        let table: [(&[u8], &str); 8] = [
            (b"s=QSXCR+Q6sek8bf92,i=4096", "lacks `r=`"),
            (b"r=abcdefXYZ,i=4096", "lacks `s=`"),
            (b"r=abcdefXYZ,s=QSXCR+Q6sek8bf92", "lacks `i=`"),
            (
                b"r=zzzzzzXYZ,s=QSXCR+Q6sek8bf92,i=4096",
                "does not extend ours",
            ),
            (
                b"r=abcdef,s=QSXCR+Q6sek8bf92,i=4096",
                "does not extend ours",
            ),
            (b"r=abcdefXYZ,s=***,i=4096", "not base64"),
            (b"r=abcdefXYZ,s=QSXCR+Q6sek8bf92,i=0", "not a number"),
            (b"r=abcdefXYZ,s=QSXCR+Q6sek8bf92,i=4294967295", "more than"),
        ];
        for (message, want) in table {
            let mut scram = Scram::new("", b"pw", "abcdef".to_owned());
            let got = scram.client_final(message).expect_err("refused");
            assert!(
                got.contains(want),
                "{:?}: {got}",
                String::from_utf8_lossy(message)
            );
        }
        let scram = Scram::new("", b"pw", "abcdef".to_owned());
        let got = scram
            .verify_server_final(b"e=invalid-proof")
            .expect_err("an error");
        assert!(got.contains("invalid-proof"), "{got}");
        let got = scram.verify_server_final(b"v=AAAA").expect_err("too early");
        assert!(got.contains("early"), "{got}");
    }

    #[test]
    fn nonces_are_random_and_printable() {
        let a = nonce().expect("a nonce");
        let b = nonce().expect("a nonce");
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_graphic() && c != b','));
    }

    #[test]
    fn md5_answers() {
        // postgres-protocol's vector, and PostgreSQL's own `md5()` on the
        // stored hash: SELECT 'md5' || md5(md5('secret' || 'alice') || 'salt').
        assert_eq!(
            md5_password(b"md5_user", b"password", [0x2a, 0x3d, 0x8f, 0xe0]),
            "md562af4dd09bbb41884907a838a3233294"
        );
        assert_eq!(
            md5_password(b"alice", b"secret", *b"salt"),
            "md5986e2194384c07f4fd1df4b1351b3e68"
        );
    }
}
