//! Topic selectors and JWTs on arbitrary input: both come from clients
//! (a ticket request's body, a token's claims, the token itself).
//!
//! Input: `selector\ntopic\nrest`. Checks: parsing and matching never
//! panic; an exact selector matches its own name and nothing else; a
//! template matches what it becomes with every expression expanded to
//! nothing (RFC 6570: undefined variables); a `*` matches anything; the
//! selector taken as a URL pattern parses and matches without panicking,
//! and is kept as written; and the whole input, taken as a token or a PEM
//! key, never panics and is never a valid token (it is not signed with the
//! fuzzer's secret).
#![no_main]

use std::sync::LazyLock;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use ssed::daemon::jwt::{JwtVerifier, PublicKey};
use ssed::hub::grant::Selector;

static VERIFIER: LazyLock<JwtVerifier> = LazyLock::new(|| {
    JwtVerifier::new(
        Some(b"fuzzer's secret, never in the input".to_vec()),
        None,
        Vec::new(),
        Some("https://issuer.example".into()),
        Some("https://hub.example".into()),
    )
    .expect("a verifier")
});

/// The template with every `{...}` removed.
fn expanded_empty(template: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in template.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let selector = parts.next().unwrap_or_default();
    let topic = parts.next().unwrap_or_default();
    if let Ok(s) = Selector::parse(selector) {
        let matched = s.matches(topic);
        match &s {
            Selector::All => assert!(matched),
            Selector::Exact(name) => assert_eq!(matched, **name == *topic),
            Selector::Template(_) => {
                let empty = expanded_empty(selector);
                assert!(s.matches(&empty), "{selector:?} does not match {empty:?}");
            }
            Selector::UrlPattern(_) => panic!("{selector:?}: parse made a URL pattern"),
        }
        assert_eq!(s.as_str(), selector);
    }
    if let Ok(p) = Selector::url_pattern(selector) {
        let _ = p.matches(topic);
        assert_eq!(p.as_str(), selector);
    }
    assert!(VERIFIER.verify(text, SystemTime::now()).is_err());
    let _ = PublicKey::from_pem(text);
});
