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

/// `key` is `name`, `table.name` or `postgres[i].name`: each part but a
/// required one said to be missing is in the file.
fn check_key_in_file(table: &Table, key: &str, message: &str) {
    let root_end = key.find(['.', '[']).unwrap_or(key.len());
    let (root, rest) = key.split_at(root_end);
    let value = table
        .get(root)
        .unwrap_or_else(|| panic!("error names {key:?}, not in the file"));
    let (value, rest) = match rest.strip_prefix('[') {
        Some(indexed) => {
            let (index, rest) = indexed.split_once(']').expect("closed index");
            let index: usize = index.parse().expect("numeric index");
            let item = value
                .as_array()
                .and_then(|a| a.get(index))
                .unwrap_or_else(|| panic!("error names {key:?}, no such item"));
            (item, rest)
        }
        None => (value, rest),
    };
    if let Some(name) = rest.strip_prefix('.') {
        let present = value.as_table().is_some_and(|t| t.contains_key(name));
        assert!(
            present || message.starts_with("missing"),
            "error names {key:?}, not in the file: {message}"
        );
    } else {
        assert!(rest.is_empty(), "odd key {key:?}");
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
