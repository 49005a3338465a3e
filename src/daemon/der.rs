//! The little DER and PEM the daemon reads and writes by hand: public keys
//! in JWT configuration, and for ACME a certificate request, the
//! self-signed certificate of a `tls-alpn-01` challenge, and a
//! certificate's validity. Only definite lengths, as DER has.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Tag of a `SEQUENCE`.
pub(crate) const SEQUENCE: u8 = 0x30;
/// Tag of a `SET`.
pub(crate) const SET: u8 = 0x31;
/// Tag of an `OBJECT IDENTIFIER`.
pub(crate) const OID: u8 = 0x06;
/// Tag of a `BIT STRING`.
pub(crate) const BIT_STRING: u8 = 0x03;
/// Tag of an `OCTET STRING`.
pub(crate) const OCTET_STRING: u8 = 0x04;
/// Tag of an `INTEGER`.
pub(crate) const INTEGER: u8 = 0x02;
/// Tag of a `UTCTime`.
pub(crate) const UTC_TIME: u8 = 0x17;
/// Tag of a `GeneralizedTime`.
pub(crate) const GENERALIZED_TIME: u8 = 0x18;

/// `id-ecPublicKey`.
pub(crate) const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// `prime256v1` (P-256).
pub(crate) const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// `ecdsa-with-SHA256`.
pub(crate) const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];

/// Reads one DER element: (tag, contents, rest).
///
/// # Errors
///
/// On a truncated element or a length form DER does not use.
pub(crate) fn read(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let bad = || "malformed DER".to_string();
    let (&tag, rest) = input.split_first().ok_or_else(bad)?;
    let (&first, mut rest) = rest.split_first().ok_or_else(bad)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad());
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(bad());
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

/// Reads one element that must carry `tag`: (contents, rest).
///
/// # Errors
///
/// As [`read`], or when the tag differs.
pub(crate) fn expect(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), String> {
    match read(input)? {
        (t, contents, rest) if t == tag => Ok((contents, rest)),
        (t, ..) => Err(format!(
            "malformed DER: tag {t:#04x} where {tag:#04x} belongs"
        )),
    }
}

/// One element: `tag`, its length, `contents`.
pub(crate) fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.len() + 6);
    out.push(tag);
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// A `SEQUENCE` of the elements `parts`, already encoded.
pub(crate) fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(SEQUENCE, &parts.concat())
}

/// A positive `INTEGER` from big-endian bytes.
pub(crate) fn uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed = match bytes.iter().position(|b| *b != 0) {
        Some(i) => &bytes[i..],
        None => &[0][..],
    };
    if trimmed[0] & 0x80 != 0 {
        tlv(INTEGER, &[&[0], trimmed].concat())
    } else {
        tlv(INTEGER, trimmed)
    }
}

/// A `BIT STRING` with no unused bits.
pub(crate) fn bits(bytes: &[u8]) -> Vec<u8> {
    tlv(BIT_STRING, &[&[0], bytes].concat())
}

/// A name of one common name: `SEQUENCE { SET { SEQUENCE { cn, UTF8String } } }`.
pub(crate) fn common_name(cn: &str) -> Vec<u8> {
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    let attr = seq(&[&tlv(OID, OID_CN), &tlv(0x0c, cn.as_bytes())]);
    seq(&[&tlv(SET, &attr)])
}

/// A P-256 `SubjectPublicKeyInfo` of an uncompressed point.
pub(crate) fn p256_spki(point: &[u8]) -> Vec<u8> {
    seq(&[
        &seq(&[&tlv(OID, OID_EC), &tlv(OID, OID_P256)]),
        &bits(point),
    ])
}

/// The `subjectAltName` extension naming `domains` (dNSName each).
pub(crate) fn subject_alt_names(domains: &[String]) -> Vec<u8> {
    const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
    let names: Vec<u8> = domains
        .iter()
        .flat_map(|d| tlv(0x82, d.as_bytes()))
        .collect();
    seq(&[
        &tlv(OID, OID_SAN),
        &tlv(OCTET_STRING, &tlv(SEQUENCE, &names)),
    ])
}

/// Seconds since the Unix epoch of a `UTCTime` or `GeneralizedTime`
/// element's contents (`YYMMDDHHMMSSZ` or `YYYYMMDDHHMMSSZ`).
///
/// # Errors
///
/// On any other form.
pub(crate) fn time(tag: u8, contents: &[u8]) -> Result<i64, String> {
    let bad = || "malformed DER time".to_string();
    let text = std::str::from_utf8(contents).map_err(|_| bad())?;
    let digits = text.strip_suffix('Z').ok_or_else(bad)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let (year, rest) = match (tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy: i64 = digits[..2].parse().map_err(|_| bad())?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &digits[2..])
        }
        (GENERALIZED_TIME, 14) => (digits[..4].parse().map_err(|_| bad())?, &digits[4..]),
        _ => return Err(bad()),
    };
    let field = |i: usize| rest[i..i + 2].parse::<u32>().map_err(|_| bad());
    let (month, day) = (field(0)?, field(2)?);
    let (h, m, s) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return Err(bad());
    }
    let days = crate::time::days_from_civil(year, month, day);
    Ok(days * 86_400 + i64::from(h * 3600 + m * 60 + s))
}

/// A `UTCTime` (years 1950-2049) or else `GeneralizedTime` element for
/// `secs` since the Unix epoch, as RFC 5280 asks of certificate validity.
pub(crate) fn time_element(secs: i64) -> Vec<u8> {
    let (y, mo, d) = crate::time::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    let hms = format!("{:02}{:02}{:02}Z", rem / 3600, rem / 60 % 60, rem % 60);
    if (1950..2050).contains(&y) {
        tlv(
            UTC_TIME,
            format!("{:02}{mo:02}{d:02}{hms}", y % 100).as_bytes(),
        )
    } else {
        tlv(
            GENERALIZED_TIME,
            format!("{y:04}{mo:02}{d:02}{hms}").as_bytes(),
        )
    }
}

/// The validity of an X.509 certificate: (notBefore, notAfter), in
/// seconds since the Unix epoch.
///
/// # Errors
///
/// When `cert` is not a certificate as RFC 5280 lays one out.
pub(crate) fn validity(cert: &[u8]) -> Result<(i64, i64), String> {
    let (cert, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    // version [0] EXPLICIT, optional
    if rest.first() == Some(&0xa0) {
        rest = read(rest)?.2;
    }
    let (_, rest) = expect(rest, INTEGER)?; // serialNumber
    let (_, rest) = expect(rest, SEQUENCE)?; // signature
    let (_, rest) = expect(rest, SEQUENCE)?; // issuer
    let (validity, _) = expect(rest, SEQUENCE)?;
    let (t1, c1, rest) = read(validity)?;
    let (t2, c2, _) = read(rest)?;
    Ok((time(t1, c1)?, time(t2, c2)?))
}

/// The label and DER bytes of the first PEM block of `pem`.
///
/// # Errors
///
/// When it holds no whole block, or its body is not base64.
pub(crate) fn pem_block(pem: &str) -> Result<(String, Vec<u8>), String> {
    let begin = pem
        .find("-----BEGIN ")
        .ok_or("no PEM block (-----BEGIN ...-----)")?;
    let rest = &pem[begin + 11..];
    let (label, rest) = rest.split_once("-----").ok_or("a broken PEM header")?;
    let end_marker = format!("-----END {label}-----");
    let end = rest.find(&end_marker).ok_or("no PEM end line")?;
    let body: String = rest[..end].chars().filter(|c| !c.is_whitespace()).collect();
    let der = STANDARD
        .decode(body)
        .map_err(|e| format!("the PEM body is not base64: {e}"))?;
    Ok((label.to_owned(), der))
}

/// `der` as a PEM block labelled `label`, in lines of 64 characters.
pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_take_the_short_and_long_forms() {
        assert_eq!(tlv(0x04, &[1, 2]), [0x04, 2, 1, 2]);
        let long = tlv(0x04, &[0; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        let (tag, contents, rest) = read(&long).expect("reads back");
        assert_eq!((tag, contents.len(), rest.len()), (0x04, 300, 0));
        assert!(read(&long[..100]).is_err());
        assert!(read(&[0x04, 0x80]).is_err(), "indefinite length");
    }

    #[test]
    fn integers_stay_positive() {
        assert_eq!(uint(&[0x80]), [0x02, 2, 0, 0x80]);
        assert_eq!(uint(&[0, 0, 5]), [0x02, 1, 5]);
        assert_eq!(uint(&[0, 0]), [0x02, 1, 0]);
    }

    #[test]
    fn times_round_trip_in_both_forms() {
        for secs in [0, 951_782_400, 1_796_000_000, 2_556_143_999, 4_107_542_400] {
            let el = time_element(secs);
            let (tag, contents, _) = read(&el).expect("an element");
            assert_eq!(time(tag, contents), Ok(secs), "{secs}");
        }
        // 2000-02-29 (a leap day) and 2050, past UTCTime's range.
        assert_eq!(time_element(951_782_400)[2..], *b"000229000000Z");
        assert_eq!(time_element(2_556_144_000)[0], GENERALIZED_TIME);
        assert!(time(UTC_TIME, b"991332000000Z").is_err(), "month 13");
        assert!(time(UTC_TIME, b"9912310000Z").is_err());
    }

    #[test]
    fn pem_round_trips() {
        let text = pem("CERTIFICATE", &[7; 100]);
        assert!(text.lines().all(|l| l.len() <= 64));
        assert_eq!(
            pem_block(&text),
            Ok(("CERTIFICATE".to_owned(), vec![7; 100]))
        );
    }
}
