//! Decimal and hexadecimal numbers written into byte buffers without
//! `core::fmt`.
//!
//! `write!` into a `Vec` goes through `core::fmt::write`, whose frames take
//! about 1.5 KiB of stack. On a stream thread that depth matters: a stack
//! page touched once stays resident for as long as the stream lives, so one
//! formatted status line costs every idle stream a page (4 KiB). The
//! helpers here keep the frames that run on stream threads (status lines,
//! chunk sizes, `retry:` fields) shallow.

/// A number's digits, held on the stack.
pub(crate) struct Digits {
    buf: [u8; 39], // u128::MAX has 39 decimal digits
    at: usize,
}

impl Digits {
    /// `n` in decimal.
    pub(crate) fn decimal(n: u128) -> Self {
        Self::radix::<10>(n)
    }

    /// `n` in upper-case hexadecimal (an HTTP chunk size).
    pub(crate) fn hex(n: usize) -> Self {
        Self::radix::<16>(n as u128)
    }

    // The base is a constant so that hex digits (a chunk size per frame
    // written, on the fan-out path) are shifts, not divisions.
    fn radix<const BASE: u128>(mut n: u128) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        let mut d = Digits {
            buf: [0; 39],
            at: 39,
        };
        loop {
            d.at -= 1;
            d.buf[d.at] = DIGITS[(n % BASE) as usize];
            n /= BASE;
            if n == 0 {
                return d;
            }
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[self.at..]
    }
}

/// Appends `n` in decimal.
pub(crate) fn push_decimal(out: &mut Vec<u8>, n: u128) {
    out.extend_from_slice(Digits::decimal(n).as_bytes());
}

/// Appends `n` in upper-case hexadecimal.
pub(crate) fn push_hex(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(Digits::hex(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_matches_display() {
        for n in [0u128, 1, 9, 10, 99, 100, 12345, u64::MAX as u128, u128::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes(), "{n}");
        }
    }

    #[test]
    fn hex_matches_upper_hex() {
        for n in [0usize, 1, 9, 10, 15, 16, 255, 4096, 0xABCDEF, usize::MAX] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(out, format!("{n:X}").into_bytes(), "{n}");
        }
    }
}
