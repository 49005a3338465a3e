//! The daemon's config loader on arbitrary text.
//!
//! Checks: it never panics; a file it refuses as TOML is refused by the
//! TOML parser too; every other refusal names the file and a key that is
//! in the file (or a required key, said to be missing, of a table that
//! is); what it accepts has only keys that `config.example.toml` documents
//! and values within the ranges the server relies on, reads the same twice,
//! and never shows a token in its `Debug` output.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use ssed::daemon::{Config, ConfigError};
use toml::{Table, Value};

const FILE: &str = "fuzz.toml";

/// `(table, key)` for every key `config.example.toml` documents, set or
/// commented out; `table` is empty at the top level, and a table is itself
/// a top-level key.
static DOCUMENTED: LazyLock<Vec<(String, String)>> = LazyLock::new(|| {
    let mut table = String::new();
    let mut keys = Vec::new();
    for line in include_str!("../../config.example.toml").lines() {
        let line = line.strip_prefix("# ").unwrap_or(line);
        let name = line.trim_start_matches('[').trim_end_matches(']');
        if line.starts_with('[') {
            keys.push((String::new(), name.to_owned()));
            table = name.to_owned();
        } else if let Some((key, _)) = line.split_once(" =")
            && !key.is_empty()
            && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            keys.push((table.clone(), key.to_owned()));
        }
    }
    assert!(keys.len() > 20, "config.example.toml read as {keys:?}");
    keys
});

fn documented(table: &str, key: &str) -> bool {
    DOCUMENTED.iter().any(|(t, k)| t == table && k == key)
}

/// Every key of an accepted file, in tables and arrays of tables too, is
/// documented.
fn check_documented(file: &Table) {
    for (key, value) in file {
        assert!(documented("", key), "accepted undocumented key {key:?}");
        let tables: Vec<&Table> = match value {
            Value::Table(t) => vec![t],
            Value::Array(items) => items.iter().filter_map(Value::as_table).collect(),
            _ => Vec::new(),
        };
        for inner in tables.into_iter().flat_map(Table::keys) {
            assert!(
                documented(key, inner),
                "accepted undocumented {key}.{inner}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let table = text.parse::<Table>();
    match Config::from_toml(text, Some(Path::new(FILE))) {
        Ok(config) => {
            check_documented(&table.expect("accepted text is TOML"));
            check_ranges(&config);
            assert_eq!(Config::from_toml(text, None).ok(), Some(config.clone()));
            check_redacted(&config);
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("config file {FILE}: ")),
                "{shown}"
            );
            match e {
                ConfigError::Syntax { .. } => {
                    assert!(table.is_err(), "refused valid TOML: {shown}");
                }
                ConfigError::Key { path, key, message } => {
                    assert_eq!(path.as_deref(), Some(Path::new(FILE)));
                    assert!(shown.contains(&format!("key `{key}`: ")), "{shown}");
                    assert!(!message.is_empty());
                    let table = table.expect("a key error comes from valid TOML");
                    check_key_in_file(&table, &key, &message);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
});

/// One step of a key as an error names it: a name (bare or quoted as
/// TOML quotes it) or an array index.
enum Part {
    Name(String),
    Index(usize),
}

/// `postgres[0].url`, `auth."a.b"` → its parts.
fn key_parts(key: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut rest = key;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            rest = r;
        } else if let Some(r) = rest.strip_prefix('[') {
            let (index, r) = r.split_once(']').expect("closed index");
            parts.push(Part::Index(index.parse().expect("numeric index")));
            rest = r;
        } else if rest.starts_with('"') {
            let mut escaped = false;
            let end = rest
                .char_indices()
                .skip(1)
                .find(|&(_, c)| {
                    let closes = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    closes
                })
                .map(|(i, _)| i)
                .unwrap_or_else(|| panic!("unclosed quote in {key:?}"));
            let quoted = &rest[..=end];
            let decoded = format!("v = {quoted}").parse::<Table>();
            let name = decoded
                .ok()
                .and_then(|t| t.get("v").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| panic!("bad quoted part {quoted:?} in {key:?}"));
            parts.push(Part::Name(name));
            rest = &rest[end + 1..];
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            parts.push(Part::Name(rest[..end].to_owned()));
            rest = &rest[end..];
        }
    }
    parts
}

/// `key` is `name`, `table.name` or `postgres[i].name`, each name bare or
/// quoted: each part but a required one said to be missing is in the file.
fn check_key_in_file(table: &Table, key: &str, message: &str) {
    let parts = key_parts(key);
    let mut value: Option<&Value> = None;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let next = match (part, value) {
            (Part::Name(name), None) => table.get(name),
            (Part::Name(name), Some(v)) => v.as_table().and_then(|t| t.get(name)),
            (Part::Index(index), Some(v)) => v.as_array().and_then(|a| a.get(*index)),
            (Part::Index(_), None) => panic!("odd key {key:?}"),
        };
        match next {
            Some(v) => value = Some(v),
            None if last && i > 0 && message.starts_with("missing") => return,
            None => panic!("error names {key:?}, not in the file: {message}"),
        }
    }
}

fn check_ranges(c: &Config) {
    assert!(!c.request_timeout.is_zero() && !c.write_timeout.is_zero());
    assert!(!c.ticket_session.is_zero());
    assert!(c.stack_size >= ssed::MIN_STACK_SIZE, "{c:?}");
    assert!(c.max_body >= 1 && c.max_connections != Some(0));
    let (shortest, longest) = c.overload_retry;
    assert!(shortest <= longest && !longest.is_zero());
    assert!(c.listen.rsplit_once(':').is_some(), "listen {:?}", c.listen);
    for pg in &c.postgres {
        assert!(!pg.url.is_empty() && !pg.channels.is_empty());
        for (_, topic) in pg.routes() {
            assert!(ssed::hub::valid_name(&topic), "topic {topic:?}");
        }
    }
    let is_set = |t: &Option<String>| t.as_ref().is_none_or(|t| !t.is_empty());
    assert!(is_set(&c.publish_token) && is_set(&c.subscribe_token));
    assert!(c.redis_url.as_ref().is_none_or(|u| !u.is_empty()));
}

/// `Debug` is what reaches logs: it must not change with the tokens.
fn check_redacted(c: &Config) {
    let mut other = c.clone();
    let swap = |t: &mut Option<String>| {
        if let Some(t) = t {
            t.push_str("-other");
        }
    };
    swap(&mut other.publish_token);
    swap(&mut other.subscribe_token);
    assert_eq!(format!("{c:?}"), format!("{other:?}"));
}
