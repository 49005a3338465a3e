//! ISO-8601 timestamps without a date crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// Formats `t` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn iso8601(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (y, m, d, rem) = date_and_second(since.as_secs());
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Writes `t` as `YYYY-MM-DDTHH:MM:SSZ` (UTC, whole seconds; an instant
/// before 1970 as 1970-01-01T00:00:00Z), as the `ssed` binary's log lines
/// begin.
#[cfg(feature = "daemon")]
pub fn write_iso8601_seconds(out: &mut impl std::fmt::Write, t: SystemTime) -> std::fmt::Result {
    let (y, m, d, rem) = date_and_second(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Seconds since the Unix epoch as (year, month, day, second of the day).
fn date_and_second(secs: u64) -> (i64, u32, u32, u64) {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    (y, m, d, secs % 86_400)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day), proleptic Gregorian, to days since 1970-01-01
/// (Howard Hinnant's `days_from_civil`). For the daemon's DER times.
#[cfg_attr(not(feature = "daemon"), allow(dead_code))]
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_known_instants() {
        let at = |s: u64, ms: u64| iso8601(UNIX_EPOCH + Duration::from_millis(s * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_795_000_000, 999), "2026-11-18T11:06:40.999Z");
        assert_eq!(at(4_102_444_799, 0), "2099-12-31T23:59:59.000Z");
    }

    #[test]
    fn days_round_trip() {
        for days in [-719_468, -1, 0, 11_016, 47_540, 47_541, 146_097] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(days_from_civil(2100, 3, 1), 47_541);
    }

    /// The log lines' form, on the days a date algorithm gets wrong first:
    /// leap days (2000 is a leap year, divisible by 400; 2100 is not, by
    /// 100), the days around them, year ends.
    #[cfg(feature = "daemon")]
    #[test]
    fn writes_whole_seconds_on_known_dates() {
        let at = |s: u64| {
            let mut out = String::new();
            write_iso8601_seconds(&mut out, UNIX_EPOCH + Duration::from_millis(s * 1000 + 999))
                .expect("a String takes it");
            out
        };
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (68_169_599, "1972-02-28T23:59:59Z"),
            (68_169_600, "1972-02-29T00:00:00Z"),
            (68_256_000, "1972-03-01T00:00:00Z"),
            (946_684_799, "1999-12-31T23:59:59Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (951_868_800, "2000-03-01T00:00:00Z"),
            (1_709_164_800, "2024-02-29T00:00:00Z"),
            (1_795_000_000, "2026-11-18T11:06:40Z"),
            (1_796_534_029, "2026-12-06T05:13:49Z"),
            (4_107_542_399, "2100-02-28T23:59:59Z"),
            (4_107_542_400, "2100-03-01T00:00:00Z"),
            (4_133_980_799, "2100-12-31T23:59:59Z"),
            (13_574_563_200, "2400-02-29T00:00:00Z"),
        ] {
            assert_eq!(at(secs), want, "{secs}");
        }
        let mut before = String::new();
        write_iso8601_seconds(&mut before, UNIX_EPOCH - Duration::from_secs(1))
            .expect("a String takes it");
        assert_eq!(before, "1970-01-01T00:00:00Z");
    }
}
