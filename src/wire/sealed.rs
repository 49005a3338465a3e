//! A TLS stream's sending side once its request is in: the traffic secrets
//! taken out of rustls (its API for kernel TLS) and records sealed here
//! with ring, so an idle TLS stream keeps one AEAD key and a sequence
//! number instead of rustls's whole connection. That connection, with its
//! 4 KiB receive buffer that nothing can shrink, cost an idle stream 8.2
//! KiB of RSS (3,000 streams, static binary); see `docs/operations.md`.
//!
//! Only sending is kept: a stream's client sends nothing after its request
//! (its leaving is seen by the poller as for plain text), so nothing is
//! decrypted. The record formats are RFC 8446 section 5.2 (TLS 1.3) and
//! RFC 5288 / RFC 7905 (TLS 1.2 AES-GCM and ChaCha20-Poly1305), with the
//! nonces rustls uses, so the client's sequence continues unbroken.

use std::io::{self, IoSlice};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion, ServerConnection};

/// Most plaintext in one record (RFC 8446 section 5.1).
const MAX_FRAGMENT: usize = 16 * 1024;
/// A record's header: type, legacy version, length.
const HEADER: usize = 5;
/// `application_data`.
const APPLICATION_DATA: u8 = 0x17;
/// `alert`.
const ALERT: u8 = 0x15;
/// TLS 1.2 AES-GCM sends the last 8 bytes of each nonce.
const EXPLICIT_NONCE: usize = 8;

/// How records are put together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// TLS 1.3: the type inside the encryption, the header as AAD.
    Tls13,
    /// TLS 1.2 AES-GCM: an explicit nonce before the ciphertext.
    Tls12Gcm,
    /// TLS 1.2 ChaCha20-Poly1305: no explicit nonce.
    Tls12Chacha,
}

/// The sending half of a TLS connection, after its handshake.
pub(crate) struct Sealer {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    format: Format,
    /// Sealed records the socket has not taken yet; freed once it has, so
    /// an idle stream holds none.
    out: Vec<u8>,
    /// Bytes of `out` already sent.
    sent: usize,
}

impl Sealer {
    /// Takes the sending secrets out of `conn`, whose handshake is over
    /// and which has nothing left to send.
    ///
    /// # Errors
    ///
    /// rustls's, when it cannot give the secrets (secret extraction off,
    /// an unknown cipher suite).
    pub(crate) fn from_session(conn: ServerConnection) -> Result<Self, rustls::Error> {
        let tls13 = conn.protocol_version() == Some(ProtocolVersion::TLSv1_3);
        let secrets = conn.dangerous_extract_secrets()?;
        let (seq, traffic) = secrets.tx;
        let unusable = |_| rustls::Error::General("unusable traffic key".into());
        let gcm = if tls13 {
            Format::Tls13
        } else {
            Format::Tls12Gcm
        };
        let (alg, key, iv, format) = match traffic {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv, gcm),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv, gcm),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                let format = if tls13 {
                    Format::Tls13
                } else {
                    Format::Tls12Chacha
                };
                (&aead::CHACHA20_POLY1305, key, iv, format)
            }
            _ => return Err(rustls::Error::General("unknown traffic secret".into())),
        };
        let key = LessSafeKey::new(UnboundKey::new(alg, key.as_ref()).map_err(unusable)?);
        let iv: [u8; aead::NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| rustls::Error::General("unusable traffic iv".into()))?;
        Ok(Sealer {
            key,
            iv,
            seq,
            format,
            out: Vec::new(),
            sent: 0,
        })
    }

    /// Seals all of `slices` as application data, in records of at most
    /// [`MAX_FRAGMENT`] bytes; the bytes taken.
    pub(crate) fn take(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut taken = 0;
        for s in slices {
            for fragment in s.chunks(MAX_FRAGMENT) {
                self.seal(APPLICATION_DATA, fragment)?;
                taken += fragment.len();
            }
        }
        Ok(taken)
    }

    /// Seals a `close_notify` alert.
    pub(crate) fn close_notify(&mut self) {
        let _ = self.seal(ALERT, &[1, 0]); // warning, close_notify; closing anyway
    }

    /// Whether sealed records wait for the socket.
    pub(crate) fn wants_write(&self) -> bool {
        self.sent < self.out.len()
    }

    /// Sends what it can of the waiting records to `w`.
    ///
    /// # Errors
    ///
    /// `w`'s.
    pub(crate) fn write_to(&mut self, w: &mut dyn io::Write) -> io::Result<usize> {
        let n = w.write(&self.out[self.sent..])?;
        self.sent += n;
        if self.sent == self.out.len() {
            self.out = Vec::new();
            self.sent = 0;
        }
        Ok(n)
    }

    /// Appends one record of type `typ` carrying `plain`.
    fn seal(&mut self, typ: u8, plain: &[u8]) -> io::Result<()> {
        let tag = self.key.algorithm().tag_len();
        let seq = self.seq;
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        let (outer, inner_len, explicit) = match self.format {
            Format::Tls13 => (APPLICATION_DATA, plain.len() + 1, 0),
            Format::Tls12Gcm => (typ, plain.len(), EXPLICIT_NONCE),
            Format::Tls12Chacha => (typ, plain.len(), 0),
        };
        let len = explicit + inner_len + tag;
        let header = [outer, 3, 3, (len >> 8) as u8, len as u8];
        let at = self.out.len();
        self.out.reserve(HEADER + len);
        self.out.extend_from_slice(&header);
        self.out
            .extend_from_slice(&nonce[aead::NONCE_LEN - explicit..]);
        let body = self.out.len();
        self.out.extend_from_slice(plain);
        let aad: [u8; 13];
        let aad = match self.format {
            Format::Tls13 => {
                self.out.push(typ);
                &header[..]
            }
            Format::Tls12Gcm | Format::Tls12Chacha => {
                aad = tls12_aad(seq, typ, plain.len());
                &aad[..]
            }
        };
        let sealed = self.key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut self.out[body..],
        );
        match sealed {
            Ok(t) => self.out.extend_from_slice(t.as_ref()),
            Err(_) => {
                self.out.truncate(at);
                return Err(io::Error::other("TLS record sealing failed"));
            }
        }
        self.seq += 1;
        Ok(())
    }
}

/// TLS 1.2's additional data: sequence number, type, version, length.
fn tls12_aad(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9] = 3;
    aad[10] = 3;
    aad[11] = (len >> 8) as u8;
    aad[12] = len as u8;
    aad
}
