//! The binary's logger: `RUST_LOG` filtering and env_logger's line shape,
//! in place of env_logger, which took 20 KiB of the static binary
//! (4,701,480 bytes with it, 4,681,000 with this).
//!
//! A line is `[2026-12-06T05:13:49Z INFO  ssed::server] message` on stderr:
//! the time in UTC to the second, the level padded to five, the target.
//! Tests, benches and scripts find the daemon's address in such a line
//! (`listening on ADDR (...)`). A message's own line breaks are followed
//! by four spaces, as env_logger indents them. No colour.
//!
//! `RUST_LOG` is read as env_logger read it: a comma list of `level`,
//! `target` or `target=level` (levels `off`, `error`, `warn`, `info`,
//! `debug`, `trace`, in any case; a bare target means `trace`), optionally
//! followed by `/text` to keep only messages containing `text`. A record
//! takes the level of the longest target that its own begins with (a plain
//! string prefix), or the bare level; with neither it is not logged. A
//! spec with no valid directive logs errors only; an unset (or not UTF-8)
//! `RUST_LOG` means `info`. A bad directive is reported on stderr and
//! skipped, in env_logger's words.
//!
//! A line is formatted into one `String` and written with one `write_all`
//! under stderr's lock, so lines from different threads never interleave,
//! and a failed write (a closed stderr) is ignored: logging never panics
//! and never stops the server. The stack it takes is a few small frames
//! (stream threads have small stacks).

use std::fmt::{self, Write as _};
use std::io::{self, Write as _};
use std::time::SystemTime;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Installs the logger, its filter from `RUST_LOG` or else `default`.
pub fn init(default: &str) {
    let spec = std::env::var("RUST_LOG");
    let (filter, errors) = Filter::parse(spec.as_deref().unwrap_or(default));
    for e in errors {
        let _ = writeln!(io::stderr(), "warning: {e}, ignoring it"); // nothing to do if stderr is gone
    }
    let max = filter.max_level();
    // Only this function sets a logger, once.
    if log::set_logger(Box::leak(Box::new(Logger { filter }))).is_ok() {
        log::set_max_level(max);
    }
}

/// Writes the records its filter lets through to stderr.
#[derive(Debug)]
struct Logger {
    filter: Filter,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.enabled(metadata.level(), metadata.target())
    }

    fn log(&self, record: &Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        let mut line = String::with_capacity(128);
        if format_line(&mut line, SystemTime::now(), record).is_ok() {
            let _ = io::stderr().lock().write_all(line.as_bytes()); // a closed stderr: nothing to do
        }
    }

    fn flush(&self) {
        let _ = io::stderr().flush(); // unbuffered; nothing to do if it fails
    }
}

/// `[TIME LEVEL TARGET] message\n`, as env_logger's default format.
fn format_line(out: &mut String, now: SystemTime, record: &Record<'_>) -> fmt::Result {
    out.push('[');
    ssed::daemon::write_iso8601_seconds(out, now)?;
    out.push(' ');
    out.push_str(match record.level() {
        Level::Error => "ERROR",
        Level::Warn => "WARN ",
        Level::Info => "INFO ",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    });
    if !record.target().is_empty() {
        out.push(' ');
        out.push_str(record.target());
    }
    out.push_str("] ");
    write!(Indented(out), "{}", record.args())?;
    out.push('\n');
    Ok(())
}

/// Follows each line break of what is written with four spaces.
struct Indented<'a>(&'a mut String);

impl fmt::Write for Indented<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut lines = s.split('\n');
        if let Some(first) = lines.next() {
            self.0.push_str(first);
        }
        for line in lines {
            self.0.push_str("\n    ");
            self.0.push_str(line);
        }
        Ok(())
    }
}

/// What `RUST_LOG` lets through.
#[derive(Debug, PartialEq)]
struct Filter {
    /// Shortest target first (the bare level's, `None`, before any), so
    /// the last that matches is the longest.
    directives: Vec<Directive>,
    /// `/text`: only messages that contain it.
    text: Option<String>,
}

/// One `target=level` (or bare level: no target) of the spec.
#[derive(Debug, PartialEq)]
struct Directive {
    target: Option<String>,
    level: LevelFilter,
}

impl Filter {
    /// Parses a spec; with it, the bad parts, each in env_logger's words
    /// (the caller adds ", ignoring it").
    fn parse(spec: &str) -> (Filter, Vec<String>) {
        let mut errors = Vec::new();
        let mut directives: Vec<Directive> = Vec::new();
        let mut parts = spec.split('/');
        let list = parts.next().unwrap_or_default();
        let text = parts.next().map(str::to_owned);
        if parts.next().is_some() {
            errors.push(format!("invalid logging spec '{spec}' (too many '/'s)"));
            return (Filter::new(Vec::new(), None), errors);
        }
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let mut parts = item.split('=');
            let (target, level) = match (parts.next(), parts.next().map(str::trim), parts.next()) {
                (Some(only), None, None) => match only.parse() {
                    Ok(level) => (None, level),
                    Err(_) => (Some(only), LevelFilter::max()),
                },
                (Some(target), Some(""), None) => (Some(target), LevelFilter::max()),
                (Some(target), Some(level), None) => match level.parse() {
                    Ok(level) => (Some(target), level),
                    Err(_) => {
                        errors.push(format!("invalid logging spec '{level}'"));
                        continue;
                    }
                },
                _ => {
                    errors.push(format!("invalid logging spec '{item}'"));
                    continue;
                }
            };
            let target = target.map(str::to_owned);
            // A target named again: the later level wins.
            match directives.iter_mut().find(|d| d.target == target) {
                Some(d) => d.level = level,
                None => directives.push(Directive { target, level }),
            }
        }
        (Filter::new(directives, text), errors)
    }

    /// Sorts `directives`; none at all means errors only.
    fn new(mut directives: Vec<Directive>, text: Option<String>) -> Filter {
        if directives.is_empty() {
            directives.push(Directive {
                target: None,
                level: LevelFilter::Error,
            });
        }
        directives.sort_by_key(|d| d.target.as_ref().map_or(0, String::len));
        Filter { directives, text }
    }

    /// The most verbose level any directive lets through.
    fn max_level(&self) -> LevelFilter {
        self.directives
            .iter()
            .map(|d| d.level)
            .max()
            .unwrap_or(LevelFilter::Off)
    }

    /// Whether a record at `level` from `target` is logged (before `/text`).
    fn enabled(&self, level: Level, target: &str) -> bool {
        self.directives
            .iter()
            .rev()
            .find(|d| d.target.as_deref().is_none_or(|t| target.starts_with(t)))
            .is_some_and(|d| level <= d.level)
    }

    /// Whether `record` is logged.
    fn matches(&self, record: &Record<'_>) -> bool {
        self.enabled(record.level(), record.target())
            && self
                .text
                .as_ref()
                .is_none_or(|text| record.args().to_string().contains(text.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn filter(spec: &str) -> Filter {
        let (filter, errors) = Filter::parse(spec);
        assert_eq!(errors, Vec::<String>::new(), "{spec}");
        filter
    }

    /// The most verbose level `filter` lets through for `target`.
    fn level_of(filter: &Filter, target: &str) -> LevelFilter {
        [
            Level::Trace,
            Level::Debug,
            Level::Info,
            Level::Warn,
            Level::Error,
        ]
        .into_iter()
        .find(|&l| filter.enabled(l, target))
        .map_or(LevelFilter::Off, |l| l.to_level_filter())
    }

    #[test]
    fn a_bare_level_applies_to_every_target() {
        for (spec, want) in [
            ("info", LevelFilter::Info),
            ("debug", LevelFilter::Debug),
            ("DEBUG", LevelFilter::Debug),
            ("Warn", LevelFilter::Warn),
            ("trace", LevelFilter::Trace),
            ("error", LevelFilter::Error),
            ("off", LevelFilter::Off),
            ("OFF", LevelFilter::Off),
            (" info ", LevelFilter::Info),
        ] {
            let f = filter(spec);
            for target in ["ssed", "ssed::server", "rustls::client", ""] {
                assert_eq!(level_of(&f, target), want, "{spec} {target}");
            }
            assert_eq!(f.max_level(), want, "{spec}");
        }
    }

    #[test]
    fn a_target_level_applies_to_targets_it_begins() {
        let f = filter("ssed=debug");
        assert_eq!(level_of(&f, "ssed"), LevelFilter::Debug);
        assert_eq!(level_of(&f, "ssed::daemon::app"), LevelFilter::Debug);
        // No bare level: other targets are not logged at all.
        assert_eq!(level_of(&f, "rustls"), LevelFilter::Off);
        assert_eq!(f.max_level(), LevelFilter::Debug);
        // A bare target means every level.
        assert_eq!(level_of(&filter("ssed"), "ssed::hub"), LevelFilter::Trace);
        assert_eq!(level_of(&filter("ssed="), "ssed::hub"), LevelFilter::Trace);
    }

    #[test]
    fn the_longest_matching_target_wins() {
        let f = filter("warn,ssed::hub=trace");
        assert_eq!(level_of(&f, "ssed::hub"), LevelFilter::Trace);
        assert_eq!(level_of(&f, "ssed::hub::node"), LevelFilter::Trace);
        assert_eq!(level_of(&f, "ssed::server"), LevelFilter::Warn);
        assert_eq!(level_of(&f, "ssed"), LevelFilter::Warn);
        assert_eq!(f.max_level(), LevelFilter::Trace);
        // Order in the list does not matter, length does.
        let f = filter("ssed::hub=error, ssed=debug ,info");
        assert_eq!(level_of(&f, "ssed::hub::fanout"), LevelFilter::Error);
        assert_eq!(level_of(&f, "ssed::server"), LevelFilter::Debug);
        assert_eq!(level_of(&f, "postgres"), LevelFilter::Info);
        // `off` for one target silences it alone.
        let f = filter("info,ssed::server=off");
        assert_eq!(level_of(&f, "ssed::server::acceptor"), LevelFilter::Off);
        assert_eq!(level_of(&f, "ssed::hub"), LevelFilter::Info);
        // A plain string prefix, as env_logger matches.
        assert_eq!(
            level_of(&filter("info,ssed::hu=trace"), "ssed::hub"),
            LevelFilter::Trace
        );
    }

    #[test]
    fn a_target_named_twice_takes_the_later_level() {
        let f = filter("ssed=info,ssed=trace");
        assert_eq!(f.directives.len(), 1);
        assert_eq!(level_of(&f, "ssed"), LevelFilter::Trace);
        let f = filter("debug,warn");
        assert_eq!(level_of(&f, "ssed"), LevelFilter::Warn);
    }

    #[test]
    fn nothing_valid_means_errors_only() {
        for spec in ["", " , ", "ssed=loud", "a=b=c"] {
            let (f, _) = Filter::parse(spec);
            assert_eq!(level_of(&f, "ssed"), LevelFilter::Error, "{spec:?}");
            assert_eq!(f.max_level(), LevelFilter::Error, "{spec:?}");
        }
    }

    #[test]
    fn bad_directives_are_reported_and_skipped() {
        let (f, errors) = Filter::parse("ssed=loud,a=b=c,info");
        assert_eq!(
            errors,
            [
                "invalid logging spec 'loud'",
                "invalid logging spec 'a=b=c'"
            ]
        );
        assert_eq!(level_of(&f, "ssed"), LevelFilter::Info);
        let (f, errors) = Filter::parse("debug/a/b");
        assert_eq!(errors, ["invalid logging spec 'debug/a/b' (too many '/'s)"]);
        assert_eq!(level_of(&f, "ssed"), LevelFilter::Error);
    }

    fn record<'a>(level: Level, target: &'a str, args: fmt::Arguments<'a>) -> log::Record<'a> {
        Record::builder()
            .level(level)
            .target(target)
            .args(args)
            .build()
    }

    #[test]
    fn text_after_a_slash_keeps_only_messages_containing_it() {
        let f = filter("info/listening");
        assert!(f.matches(&record(
            Level::Info,
            "ssed::server",
            format_args!("listening on {}", "127.0.0.1:8080")
        )));
        assert!(!f.matches(&record(
            Level::Info,
            "ssed::server",
            format_args!("stopped")
        )));
        assert!(!f.matches(&record(
            Level::Debug,
            "ssed::server",
            format_args!("listening")
        )));
    }

    fn line(level: Level, target: &str, args: fmt::Arguments<'_>) -> String {
        let mut out = String::new();
        let at = UNIX_EPOCH + Duration::from_secs(1_796_534_029);
        format_line(&mut out, at, &record(level, target, args)).expect("formats");
        out
    }

    #[test]
    fn lines_have_env_loggers_shape() {
        let addr = "127.0.0.1:8080";
        assert_eq!(
            line(
                Level::Info,
                "ssed::server",
                format_args!("listening on {addr} (cap 10)")
            ),
            "[2026-12-06T05:13:49Z INFO  ssed::server] listening on 127.0.0.1:8080 (cap 10)\n"
        );
        for (level, shown) in [
            (Level::Error, "ERROR"),
            (Level::Warn, "WARN "),
            (Level::Debug, "DEBUG"),
            (Level::Trace, "TRACE"),
        ] {
            assert_eq!(
                line(level, "ssed", format_args!("m")),
                format!("[2026-12-06T05:13:49Z {shown} ssed] m\n")
            );
        }
        // No target, no space before the bracket's end.
        assert_eq!(
            line(Level::Info, "", format_args!("m")),
            "[2026-12-06T05:13:49Z INFO ] m\n"
        );
        // A message's line breaks: the next lines indented by four.
        assert_eq!(
            line(
                Level::Error,
                "ssed",
                format_args!("{}\n{}", "first\nsecond", "third")
            ),
            "[2026-12-06T05:13:49Z ERROR ssed] first\n    second\n    third\n"
        );
    }

    /// A stream thread logs with the smallest stack the server allows, and
    /// a message long enough to grow the buffer.
    #[test]
    fn a_line_fits_a_stream_threads_smallest_stack() {
        let long = "x".repeat(4096);
        let out = std::thread::Builder::new()
            .stack_size(ssed::MIN_STACK_SIZE)
            .spawn(move || {
                line(
                    Level::Debug,
                    "ssed::server::conn",
                    format_args!("{long} {}", 7),
                )
            })
            .expect("spawn")
            .join()
            .expect("no overflow");
        assert!(out.ends_with(" 7\n"), "{out}");
    }
}
