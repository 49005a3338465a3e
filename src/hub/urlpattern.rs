//! URL patterns, as Mercure draft-08's `urlpattern` matcher type uses them
//! (the WHATWG URL Pattern Standard's pattern strings):
//! `https://example.com/books/:id`, `https://{*.}?example.com/*`,
//! `/books/:id{/reviews}?`.
//!
//! A pattern is split into its URL's components (protocol, hostname, port,
//! pathname, search, hash) and each is compiled into the selectors'
//! automaton (`nfa.rs`): matching takes time linear in the topic whatever
//! the pattern. That is draft-08's answer to crafted patterns
//! ("URL-Pattern Denial of Service"), and why the standard's
//! regular-expression groups (`(…)`) are refused instead of run.
//!
//! What is supported, per component: literal text (`\` escapes),
//! named groups (`:id`: one or more characters up to the component's
//! delimiter, `/` in a pathname, `.` in a hostname), the wildcard `*`,
//! groups `{…}`, and the modifiers `?`, `*`, `+` after a named group, a
//! wildcard or a group; in a pathname a `/` just before a modified group
//! belongs to it, as in the standard (`/books/:id?` matches `/books`).
//! Components the pattern does not give match anything when they come
//! after the last one it gives (`https://example.com/books/:id` takes any
//! search and hash), nothing but empty when they come before it (no port).
//! The protocol and hostname are compared without regard to case.
//!
//! A topic is read as a URL the simple way: `scheme://host[:port]/path?search#hash`
//! (the default port of http, https, ws and wss dropped, the host in lower
//! case, an empty path of those schemes read as `/`), `scheme:opaque…`,
//! or a path `/…` (matched by relative patterns only). Percent-encoding is
//! compared as written, not normalized. A topic that is none of these is
//! matched by no pattern.

use std::fmt;

use crate::hub::nfa::{Ast, Class, Nfa};

/// The components of a URL, in the order a URL writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Protocol,
    Hostname,
    Port,
    Pathname,
    Search,
    Hash,
}

const PARTS: [Part; 6] = [
    Part::Protocol,
    Part::Hostname,
    Part::Port,
    Part::Pathname,
    Part::Search,
    Part::Hash,
];

impl Part {
    fn index(self) -> usize {
        self as usize
    }

    /// The character a named group stops at.
    fn delimiter(self) -> Option<char> {
        match self {
            Part::Hostname => Some('.'),
            Part::Pathname => Some('/'),
            _ => None,
        }
    }
}

/// A compiled URL pattern.
#[derive(Clone)]
pub struct UrlPattern {
    text: Box<str>,
    /// Whether it names a scheme (else it matches paths `/…` only).
    absolute: bool,
    /// Each component's automaton; `None` where anything matches.
    parts: [Option<Nfa>; 6],
}

impl fmt::Debug for UrlPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UrlPattern({:?})", self.text)
    }
}

impl UrlPattern {
    /// Compiles `pattern`.
    ///
    /// # Errors
    ///
    /// Why it is no pattern this hub matches: not absolute and not a path,
    /// user information, a regular-expression group, unbalanced or nested
    /// braces, a bad group name.
    pub fn parse(pattern: &str) -> Result<UrlPattern, String> {
        let given = split_pattern(pattern)?;
        let absolute = given[Part::Protocol.index()].is_some();
        let last = PARTS
            .iter()
            .rposition(|p| given[p.index()].is_some())
            .unwrap_or(0);
        let mut parts: [Option<Nfa>; 6] = Default::default();
        for part in PARTS {
            let text = match &given[part.index()] {
                Some(t) => t.clone(),
                // Before the last component given (and the port of a
                // hostname given): empty; after: anything.
                None if absolute && (part.index() < last || part == Part::Port) => String::new(),
                None => "*".to_owned(),
            };
            if text == "*" {
                continue;
            }
            let text = match part {
                Part::Protocol | Part::Hostname => text.to_lowercase(),
                _ => text,
            };
            let ast = compile_part(&text, part)?;
            parts[part.index()] = Some(Nfa::compile(&ast));
        }
        Ok(UrlPattern {
            text: pattern.into(),
            absolute,
            parts,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `topic`, read as a URL, matches every component. Out of
    /// line: grants are matched on a stream's way in, whose stack pages
    /// stay resident (see `Stream::follow`), and this one's locals are not
    /// small.
    #[inline(never)]
    pub fn matches(&self, topic: &str) -> bool {
        // Schemes and hosts have no case: a topic that writes them in
        // capitals is compared in lower case (a copy, for these only).
        let lowered;
        let topic = match lower_authority(topic) {
            Some(l) => {
                lowered = l;
                &lowered
            }
            None => topic,
        };
        let Some(url) = split_topic(topic) else {
            return false;
        };
        if url.absolute != self.absolute {
            return false;
        }
        PARTS.iter().all(|p| match &self.parts[p.index()] {
            None => true,
            Some(nfa) => nfa.is_match(url.parts[p.index()]),
        })
    }

    /// About what it takes in memory, in bytes.
    pub(crate) fn footprint(&self) -> usize {
        self.text.len()
            + self
                .parts
                .iter()
                .flatten()
                .map(Nfa::footprint)
                .sum::<usize>()
    }
}

/// Index of the first of `stops` in `s` outside braces and not escaped;
/// a `?` just after a named group, a `*` or a `}` is its modifier, not a
/// stop.
fn find_outside(s: &str, stops: &[char]) -> Option<usize> {
    let mut depth = 0usize;
    let mut escaped = false;
    // Just after what a modifier may follow; in a group's name.
    let (mut modifiable, mut in_name) = (false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            modifiable = false;
            continue;
        }
        let name_char = c.is_alphanumeric() || c == '_' || c == '$';
        if in_name && name_char {
            continue;
        }
        in_name = false;
        let was_modifiable = std::mem::replace(&mut modifiable, false);
        match c {
            '\\' => escaped = true,
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                modifiable = depth == 0;
            }
            '?' if was_modifiable => {}
            c if depth == 0 && stops.contains(&c) => return Some(i),
            ':' => {
                in_name = true;
                modifiable = true;
            }
            '*' => modifiable = true,
            _ => {}
        }
    }
    None
}

/// A pattern's components as written (`None`: not given).
fn split_pattern(pattern: &str) -> Result<[Option<String>; 6], String> {
    let mut given: [Option<String>; 6] = Default::default();
    let set = |given: &mut [Option<String>; 6], part: Part, text: &str| {
        given[part.index()] = Some(text.to_owned());
    };
    let rest = if pattern.starts_with('/') {
        pattern
    } else {
        let colon = find_outside(pattern, &[':', '/', '?', '#'])
            .filter(|&i| pattern[i..].starts_with(':') && i > 0)
            .ok_or("a URL pattern names a scheme (`https://…`) or starts with `/`")?;
        set(&mut given, Part::Protocol, &pattern[..colon]);
        let after = &pattern[colon + 1..];
        match after.strip_prefix("//") {
            Some(authority) => {
                let end = find_outside(authority, &['/', '?', '#']).unwrap_or(authority.len());
                let (host_port, rest) = authority.split_at(end);
                if find_outside(host_port, &['@']).is_some() {
                    return Err("user information in a URL pattern is not supported".into());
                }
                let (host, port) = split_port(host_port);
                set(&mut given, Part::Hostname, host);
                if let Some(port) = port {
                    set(&mut given, Part::Port, port);
                }
                if rest.is_empty() {
                    return Ok(given);
                }
                rest
            }
            None => {
                // An opaque path (`urn:…`).
                let end = find_outside(after, &['?', '#']).unwrap_or(after.len());
                set(&mut given, Part::Pathname, &after[..end]);
                &after[end..]
            }
        }
    };
    let end = find_outside(rest, &['?', '#']).unwrap_or(rest.len());
    if end > 0 {
        set(&mut given, Part::Pathname, &rest[..end]);
    }
    let mut rest = &rest[end..];
    if let Some(search) = rest.strip_prefix('?') {
        let end = find_outside(search, &['#']).unwrap_or(search.len());
        set(&mut given, Part::Search, &search[..end]);
        rest = &search[end..];
    }
    if let Some(hash) = rest.strip_prefix('#') {
        set(&mut given, Part::Hash, hash);
    }
    Ok(given)
}

/// A pattern's host and port: the port follows the last `:` outside
/// braces that is not a named group's (a digit or `*` follows it).
fn split_port(host_port: &str) -> (&str, Option<&str>) {
    let mut at = None;
    let mut search = 0;
    while let Some(i) = find_outside(&host_port[search..], &[':']) {
        let i = search + i;
        let next = host_port[i + 1..].chars().next();
        if next.is_none_or(|c| c.is_ascii_digit() || c == '*') {
            at = Some(i);
        }
        search = i + 1;
    }
    match at {
        Some(i) => (&host_port[..i], Some(&host_port[i + 1..])),
        None => (host_port, None),
    }
}

/// Compiles one component's pattern.
fn compile_part(text: &str, part: Part) -> Result<Ast, String> {
    let mut units: Vec<Ast> = Vec::new();
    let mut chars = text.chars().peekable();
    let segment = || match part.delimiter() {
        Some(d) => Ast::Class(Class::Not(d)),
        None => Ast::Class(Class::Any),
    };
    while let Some(c) = chars.next() {
        let unit = match c {
            '\\' => {
                let escaped = chars.next().ok_or("a `\\` at the end of a URL pattern")?;
                units.push(Ast::Class(Class::Char(escaped)));
                continue;
            }
            '(' => {
                return Err(
                    "regular-expression groups `(…)` in URL patterns are not supported: \
                     use named groups (`:id`), `*` and `{…}`"
                        .into(),
                );
            }
            ')' => return Err("a `)` without its `(`".into()),
            '}' => return Err("a `}` without its `{`".into()),
            ':' => {
                let mut name = String::new();
                while let Some(&n) = chars.peek() {
                    let ok = if name.is_empty() {
                        n.is_alphabetic() || n == '_' || n == '$'
                    } else {
                        n.is_alphanumeric() || n == '_' || n == '$'
                    };
                    if !ok {
                        break;
                    }
                    name.push(n);
                    chars.next();
                }
                if name.is_empty() {
                    // A colon that names nothing is a colon.
                    units.push(Ast::Class(Class::Char(':')));
                    continue;
                }
                Ast::Seq(vec![segment(), Ast::Star(Box::new(segment()))])
            }
            '*' => Ast::Star(Box::new(Ast::Class(Class::Any))),
            '{' => {
                let mut inner = String::new();
                let mut closed = false;
                let mut escaped = false;
                for g in chars.by_ref() {
                    if escaped {
                        inner.push(g);
                        escaped = false;
                        continue;
                    }
                    match g {
                        '\\' => {
                            inner.push(g);
                            escaped = true;
                        }
                        '{' => return Err("groups `{…}` cannot nest in a URL pattern".into()),
                        '}' => {
                            closed = true;
                            break;
                        }
                        _ => inner.push(g),
                    }
                }
                if !closed {
                    return Err("a `{` without its `}`".into());
                }
                compile_part(&inner, part)?
            }
            c => {
                units.push(Ast::Class(Class::Char(c)));
                continue;
            }
        };
        let modifier = chars.next_if(|m| matches!(m, '?' | '*' | '+'));
        let Some(modifier) = modifier else {
            units.push(unit);
            continue;
        };
        // In a pathname, the `/` before a modified group is part of it.
        let unit = match (part, units.last()) {
            (Part::Pathname, Some(Ast::Class(Class::Char('/')))) if c != '{' => {
                units.pop();
                Ast::Seq(vec![Ast::Class(Class::Char('/')), unit])
            }
            _ => unit,
        };
        units.push(match modifier {
            '?' => Ast::Opt(Box::new(unit)),
            '*' => Ast::Star(Box::new(unit)),
            _ => Ast::Seq(vec![unit.clone(), Ast::Star(Box::new(unit))]),
        });
    }
    Ok(Ast::Seq(units))
}

/// `topic` with its scheme and authority in lower case, when they hold a
/// capital (else `None`: it is compared as it is).
fn lower_authority(topic: &str) -> Option<String> {
    let colon = topic.find(':')?;
    let end = match topic[colon + 1..].strip_prefix("//") {
        Some(authority) => colon + 3 + authority.find(['/', '?', '#']).unwrap_or(authority.len()),
        None => colon,
    };
    let head = &topic[..end];
    if !head.bytes().any(|b| b.is_ascii_uppercase()) || head.starts_with('/') {
        return None;
    }
    Some(head.to_ascii_lowercase() + &topic[end..])
}

/// A topic read as a URL.
struct TopicUrl<'t> {
    absolute: bool,
    parts: [&'t str; 6],
}

/// Reads `topic` as a URL, or `None` when it is no URL a pattern matches.
fn split_topic(topic: &str) -> Option<TopicUrl<'_>> {
    let mut parts: [&str; 6] = [""; 6];
    let (absolute, rest) = if topic.starts_with('/') {
        (false, topic)
    } else {
        let colon = topic.find(':')?;
        let scheme = &topic[..colon];
        let valid = scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid {
            return None;
        }
        parts[Part::Protocol.index()] = scheme;
        let after = &topic[colon + 1..];
        match after.strip_prefix("//") {
            Some(authority) => {
                let end = authority.find(['/', '?', '#']).unwrap_or(authority.len());
                let (host_port, rest) = authority.split_at(end);
                let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
                let (host, port) = match host_port.rfind(':') {
                    Some(i)
                        if !host_port[i + 1..].is_empty()
                            && host_port[i + 1..].bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        (&host_port[..i], &host_port[i + 1..])
                    }
                    Some(i) if i + 1 == host_port.len() => (&host_port[..i], ""),
                    _ => (host_port, ""),
                };
                parts[Part::Hostname.index()] = host;
                let default = match scheme {
                    "http" | "ws" => Some("80"),
                    "https" | "wss" => Some("443"),
                    _ => None,
                };
                parts[Part::Port.index()] = if Some(port) == default { "" } else { port };
                let special = matches!(scheme, "http" | "https" | "ws" | "wss" | "ftp" | "file");
                if special && !rest.starts_with('/') {
                    parts[Part::Pathname.index()] = "/";
                }
                (true, rest)
            }
            None => (true, after),
        }
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    if end > 0 {
        parts[Part::Pathname.index()] = &rest[..end];
    }
    let mut rest = &rest[end..];
    if let Some(search) = rest.strip_prefix('?') {
        let end = search.find('#').unwrap_or(search.len());
        parts[Part::Search.index()] = &search[..end];
        rest = &search[end..];
    }
    if let Some(hash) = rest.strip_prefix('#') {
        parts[Part::Hash.index()] = hash;
    }
    Some(TopicUrl { absolute, parts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(p: &str) -> UrlPattern {
        UrlPattern::parse(p).unwrap_or_else(|e| panic!("{p:?}: {e}"))
    }

    #[test]
    fn named_groups_match_one_segment() {
        let p = pat("https://example.com/books/:id");
        assert!(p.matches("https://example.com/books/1"));
        assert!(
            p.matches("https://example.com/books/1?x=2#top"),
            "any search and hash"
        );
        assert!(
            p.matches("https://EXAMPLE.com/books/1"),
            "hosts have no case"
        );
        assert!(!p.matches("https://example.com/BOOKS/1"), "paths do");
        assert!(!p.matches("https://example.com/books/1/reviews"));
        assert!(!p.matches("https://example.com/books/"));
        assert!(!p.matches("https://example.org/books/1"));
        assert!(!p.matches("http://example.com/books/1"));
        assert!(!p.matches("https://example.com:8443/books/1"), "no port");
        assert!(
            p.matches("https://example.com:443/books/1"),
            "the default port"
        );
        assert!(!p.matches("/books/1"), "a path is no absolute URL");
        assert!(!p.matches("books/1"));
    }

    #[test]
    fn wildcards_groups_and_modifiers() {
        assert!(pat("https://example.com/*").matches("https://example.com/a/b/c?d"));
        let opt = pat("https://example.com/books/:id?");
        assert!(opt.matches("https://example.com/books"));
        assert!(opt.matches("https://example.com/books/7"));
        let many = pat("https://example.com/files/:path+");
        assert!(many.matches("https://example.com/files/a/b/c"));
        assert!(!many.matches("https://example.com/files"));
        let group = pat("https://example.com/books/:id{/reviews}?");
        assert!(group.matches("https://example.com/books/1"));
        assert!(group.matches("https://example.com/books/1/reviews"));
        assert!(!group.matches("https://example.com/books/1/other"));
        let scheme = pat("http{s}?://example.com/*");
        assert!(scheme.matches("http://example.com/x"));
        assert!(scheme.matches("https://example.com/x"));
        let sub = pat("https://{*.}?example.com/*");
        assert!(sub.matches("https://api.example.com/x"));
        assert!(sub.matches("https://example.com/x"));
        let host = pat("https://:tenant.example.com/*");
        assert!(host.matches("https://acme.example.com/x"));
        assert!(!host.matches("https://a.b.example.com/x"));
        assert!(pat("https://example.com:8443/*").matches("https://example.com:8443/a"));
        let search = pat("https://example.com/search?q=:term");
        assert!(search.matches("https://example.com/search?q=rust"));
        assert!(!search.matches("https://example.com/search?p=rust"));
        assert!(pat("https://example.com/a\\:b").matches("https://example.com/a:b"));
        assert!(pat("urn:*").matches("urn:isbn:123"));
    }

    #[test]
    fn relative_patterns_match_paths() {
        let p = pat("/.well-known/mercure/subscriptions/:topic/:subscriber");
        assert!(p.matches("/.well-known/mercure/subscriptions/a/b"));
        assert!(!p.matches("/.well-known/mercure/subscriptions/a"));
        assert!(!p.matches("https://example.com/.well-known/mercure/subscriptions/a/b"));
    }

    #[test]
    fn what_is_not_supported_is_refused() {
        for bad in [
            "https://example.com/books/(\\d+)",
            "https://user:pw@example.com/*",
            "books/:id",
            "https://example.com/{a{b}}",
            "https://example.com/{a",
            "https://example.com/a}",
            "https://example.com/\\",
        ] {
            assert!(UrlPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching_stays_linear_on_hostile_patterns() {
        let p = pat(&format!("https://example.com/{}!", "*".repeat(500)));
        let topic = format!("https://example.com/{}", "a".repeat(1000));
        let started = std::time::Instant::now();
        assert!(!p.matches(&topic));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
