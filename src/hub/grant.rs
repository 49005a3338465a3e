//! Grants: which topics (and mailbox keys) a client may subscribe to and
//! publish to, as lists of [`Selector`]s.
//!
//! Topics and keys share one namespace here: a subscribe grant that covers
//! `user:42:updates` opens the topic and consumes the mailbox of that name.
//! A selector is `*`, an exact topic, or a URI template (RFC 6570) that
//! matches every topic it could expand to (`user:{id}:updates`,
//! `https://example.com/books/{id}`), as Mercure uses them. A template is
//! compiled once into a small automaton (`nfa.rs`), matched in time linear
//! in the topic whatever the template.

use std::fmt;
use std::sync::Arc;

use crate::hub::nfa::{Ast, Class, Nfa, literal, value_char};
use crate::hub::urlpattern::UrlPattern;

/// Most bytes of one selector.
pub const MAX_SELECTOR_LEN: usize = 2048;
/// Most selectors in one list (a token's `subscribe` or `publish`, a
/// ticket's `subscribe`).
pub const MAX_SELECTORS: usize = 256;
/// Most expressions (`{…}`) in one URI template.
const MAX_EXPRESSIONS: usize = 32;

/// One topic selector.
#[derive(Clone)]
pub enum Selector {
    /// `*`: every topic.
    All,
    /// One topic, exactly.
    Exact(Box<str>),
    /// A URI template: every topic it could expand to. (Shared: a clone
    /// is a count, not a copy of the automaton, and takes no stack.)
    Template(Arc<Template>),
    /// A URL pattern (Mercure draft-08's `urlpattern` matcher type):
    /// every topic, read as a URL, that it matches. (Shared, as a
    /// template.)
    UrlPattern(Arc<UrlPattern>),
}

/// A compiled URI template.
#[derive(Clone)]
pub struct Template {
    text: Box<str>,
    nfa: Nfa,
}

/// Why a selector was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError(String);

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SelectorError {}

impl Selector {
    /// Parses a selector: `*`, a URI template (it has a `{`), or an exact
    /// topic.
    ///
    /// # Errors
    ///
    /// Empty, too long (over [`MAX_SELECTOR_LEN`] bytes), with a control
    /// character, or a malformed template (an unbalanced brace, a bad
    /// variable name, more than 32 expressions).
    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        let shown = || s.chars().take(64).collect::<String>();
        if s.is_empty() {
            return Err(SelectorError("an empty topic selector".into()));
        }
        if s.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError(format!(
                "topic selector {:?}… is over {MAX_SELECTOR_LEN} bytes",
                shown()
            )));
        }
        if s.chars().any(char::is_control) {
            return Err(SelectorError(format!(
                "topic selector {:?} holds a control character",
                shown()
            )));
        }
        if s == "*" {
            return Ok(Selector::All);
        }
        if s.contains(['{', '}']) {
            let nfa = compile(s).map_err(|why| {
                SelectorError(format!(
                    "topic selector {:?} is not a URI template: {why}",
                    shown()
                ))
            })?;
            return Ok(Selector::Template(Arc::new(Template {
                text: s.into(),
                nfa,
            })));
        }
        Ok(Selector::Exact(s.into()))
    }

    /// A selector of one topic exactly, braces and all (`*` still means
    /// every topic), as Mercure draft-08's `exact` matcher type reads.
    ///
    /// # Errors
    ///
    /// Empty, too long, or with a control character.
    pub fn exact(s: &str) -> Result<Selector, SelectorError> {
        if s.contains(['{', '}']) {
            // Checked as any selector would be, then kept as written.
            let plain = s.replace(['{', '}'], "_");
            Selector::parse(&plain)?;
            return Ok(Selector::Exact(s.into()));
        }
        Selector::parse(s)
    }

    /// A URL pattern (see [`UrlPattern`]); `*` still means every topic.
    ///
    /// # Errors
    ///
    /// Empty, too long, with a control character, or no URL pattern this
    /// hub matches (a regular-expression group, say).
    pub fn url_pattern(s: &str) -> Result<Selector, SelectorError> {
        let shown = || s.chars().take(64).collect::<String>();
        if s == "*" {
            return Ok(Selector::All);
        }
        // Checked as any selector would be (length, characters).
        Selector::parse(&s.replace(['{', '}'], "_"))?;
        UrlPattern::parse(s)
            .map(|p| Selector::UrlPattern(Arc::new(p)))
            .map_err(|why| {
                SelectorError(format!(
                    "topic selector {:?} is not a URL pattern: {why}",
                    shown()
                ))
            })
    }

    /// Whether `topic` is one this selector selects.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Selector::All => true,
            Selector::Exact(t) => **t == *topic,
            Selector::Template(t) => t.nfa.is_match(topic),
            Selector::UrlPattern(p) => p.matches(topic),
        }
    }

    /// About what this selector takes in memory, in bytes.
    fn footprint(&self) -> usize {
        64 + match self {
            Selector::All => 0,
            Selector::Exact(t) => t.len(),
            Selector::Template(t) => t.text.len() + t.nfa.footprint(),
            Selector::UrlPattern(p) => p.footprint(),
        }
    }

    /// The selector as written.
    pub fn as_str(&self) -> &str {
        match self {
            Selector::All => "*",
            Selector::Exact(t) => t,
            Selector::Template(t) => &t.text,
            Selector::UrlPattern(p) => p.as_str(),
        }
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.text)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({:?})", self.as_str())
    }
}

/// The same kind of selector, written the same: an exact `u:{id}` (from a
/// draft-08 `exact` matcher) is not the template `u:{id}`.
impl PartialEq for Selector {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.as_str() == other.as_str()
    }
}

impl Eq for Selector {}

/// Parses a list of selectors.
///
/// # Errors
///
/// More than [`MAX_SELECTORS`], or one that does not parse.
pub fn parse_selectors<'a>(
    list: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Selector>, SelectorError> {
    let mut out = Vec::new();
    for s in list {
        if out.len() == MAX_SELECTORS {
            return Err(SelectorError(format!(
                "more than {MAX_SELECTORS} topic selectors"
            )));
        }
        out.push(Selector::parse(s)?);
    }
    Ok(out)
}

/// What a client may subscribe to and publish to. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    subscribe: Arc<[Selector]>,
    publish: Arc<[Selector]>,
}

impl Grant {
    /// A grant of these selectors.
    pub fn new(subscribe: Vec<Selector>, publish: Vec<Selector>) -> Grant {
        Grant {
            subscribe: subscribe.into(),
            publish: publish.into(),
        }
    }

    /// About what this grant's selectors take in memory, in bytes (a
    /// shared grant counts in full for each holder).
    pub fn footprint(&self) -> usize {
        self.subscribe
            .iter()
            .chain(self.publish.iter())
            .map(Selector::footprint)
            .sum()
    }

    /// Nothing at all.
    pub fn none() -> Grant {
        Grant::default()
    }

    /// Subscribe to everything (the subscribe token).
    pub fn subscribe_all() -> Grant {
        Grant::new(vec![Selector::All], Vec::new())
    }

    /// Publish to everything (the publish token, this machine).
    pub fn publish_all() -> Grant {
        Grant::new(Vec::new(), vec![Selector::All])
    }

    /// Whether this grant lets its holder subscribe to `topic` (or
    /// consume the mailbox `topic`).
    pub fn can_subscribe(&self, topic: &str) -> bool {
        self.subscribe.iter().any(|s| s.matches(topic))
    }

    /// Whether this grant lets its holder publish to `topic` (or push
    /// into the mailbox `topic`).
    pub fn can_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|s| s.matches(topic))
    }

    /// Whether this grant lets its holder subscribe by `selector`: to an
    /// exact topic it covers; by `*` or a URI template only when it holds
    /// `*` or that very selector (a template is not compared with another
    /// for the topics they share).
    pub fn can_subscribe_by(&self, selector: &Selector) -> bool {
        match selector {
            Selector::Exact(t) => self.can_subscribe(t),
            _ => self
                .subscribe
                .iter()
                .any(|s| matches!(s, Selector::All) || s == selector),
        }
    }

    /// The subscribe selectors.
    pub fn subscribe(&self) -> &[Selector] {
        &self.subscribe
    }

    /// The publish selectors.
    pub fn publish(&self) -> &[Selector] {
        &self.publish
    }

    /// A grant to subscribe to `wanted` only, if this grant holds them:
    /// with `*`, any list; otherwise each selector of `wanted` must be one
    /// this grant lists (as written). Publishing is not carried over.
    ///
    /// # Errors
    ///
    /// The first selector of `wanted` this grant does not hold.
    pub fn narrow_subscribe(&self, wanted: Vec<Selector>) -> Result<Grant, Selector> {
        let all = self.subscribe.iter().any(|s| matches!(s, Selector::All));
        if !all && let Some(missing) = wanted.iter().find(|w| !self.subscribe.contains(w)) {
            return Err(missing.clone());
        }
        Ok(Grant::new(wanted, Vec::new()))
    }
}

/// Which private updates a subscription may receive (see
/// [`Hub::subscribe_matching`](crate::Hub::subscribe_matching)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Privacy {
    /// None: public updates only (an anonymous subscriber).
    #[default]
    Public,
    /// Every private update of what it follows (a trusted subscriber).
    All,
    /// Private updates of the topics this grant lets its holder subscribe
    /// to: an update reaches it when the grant covers one of the update's
    /// topics.
    Granted(Grant),
}

impl Privacy {
    /// Whether a private update of `topic` may reach the subscription.
    pub fn allows(&self, topic: &str) -> bool {
        match self {
            Privacy::Public => false,
            Privacy::All => true,
            Privacy::Granted(g) => covers_any(g, &[topic]),
        }
    }

    /// Whether a private update of these topics may reach it: one of them
    /// is enough.
    pub fn allows_any(&self, topics: &[&str]) -> bool {
        match self {
            Privacy::Public => false,
            Privacy::All => true,
            Privacy::Granted(g) => covers_any(g, topics),
        }
    }
}

/// Whether `grant` lets its holder subscribe to one of `topics`. Out of
/// line: a subscribing stream thread keeps the stack pages it touches (see
/// `Stream::follow`), and matching is the deep part.
#[inline(never)]
pub(crate) fn covers_any(grant: &Grant, topics: &[&str]) -> bool {
    topics.iter().any(|t| grant.can_subscribe(t))
}

/// Compiles a URI template into an automaton that matches every string
/// the template can expand to (RFC 6570, levels 1 to 4: each expression
/// may also expand to nothing, as with undefined variables).
fn compile(template: &str) -> Result<Nfa, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    let mut expressions = 0;
    while !rest.is_empty() {
        let Some(open) = rest.find(['{', '}']) else {
            parts.push(literal(rest));
            break;
        };
        if rest.as_bytes()[open] == b'}' {
            return Err("a `}` without its `{`".into());
        }
        parts.push(literal(&rest[..open]));
        let after = &rest[open + 1..];
        let close = after
            .find(['{', '}'])
            .filter(|&i| after.as_bytes()[i] == b'}')
            .ok_or("a `{` without its `}`")?;
        expressions += 1;
        if expressions > MAX_EXPRESSIONS {
            return Err(format!("more than {MAX_EXPRESSIONS} expressions"));
        }
        parts.push(expression(&after[..close])?);
        rest = &after[close + 1..];
    }
    Ok(Nfa::compile(&Ast::Seq(parts)))
}

/// The pattern of one `{…}`: `(first item (sep item)*)?`, an item being a
/// value (its characters, and the commas that join a list) or, for the
/// named operators (`;`, `?`, `&`), `name(=value)?`.
fn expression(body: &str) -> Result<Ast, String> {
    let (op, vars) = match body.chars().next() {
        Some(c @ ('+' | '#' | '.' | '/' | ';' | '?' | '&')) => (Some(c), &body[1..]),
        Some('=' | ',' | '!' | '@' | '|') => {
            return Err(format!("`{{{body}}}` uses a reserved operator"));
        }
        _ => (None, body),
    };
    for var in vars.split(',') {
        check_varspec(var).map_err(|why| format!("`{{{body}}}`: {why}"))?;
    }
    let (first, sep, named, allow) = match op {
        None => (None, ',', false, Class::Unreserved),
        Some('+') => (None, ',', false, Class::Reserved),
        Some('#') => (Some('#'), ',', false, Class::Reserved),
        Some('.') => (Some('.'), '.', false, Class::Unreserved),
        Some('/') => (Some('/'), '/', false, Class::Unreserved),
        Some(';') => (Some(';'), ';', true, Class::Unreserved),
        Some('?') => (Some('?'), '&', true, Class::Unreserved),
        _ => (Some('&'), '&', true, Class::Unreserved),
    };
    let item = || {
        let value = Ast::Star(Box::new(Ast::Alt(vec![
            value_char(allow),
            Ast::Class(Class::Char(',')),
        ])));
        if named {
            Ast::Seq(vec![
                value_char(Class::Unreserved),
                Ast::Star(Box::new(value_char(Class::Unreserved))),
                Ast::Opt(Box::new(Ast::Seq(vec![
                    Ast::Class(Class::Char('=')),
                    value,
                ]))),
            ])
        } else {
            value
        }
    };
    let mut body = Vec::new();
    if let Some(first) = first {
        body.push(Ast::Class(Class::Char(first)));
    }
    body.push(item());
    body.push(Ast::Star(Box::new(Ast::Seq(vec![
        Ast::Class(Class::Char(sep)),
        item(),
    ]))));
    Ok(Ast::Opt(Box::new(Ast::Seq(body))))
}

/// A variable name with an optional `:N` prefix or `*` explode modifier.
fn check_varspec(var: &str) -> Result<(), String> {
    let name = match var.split_once(':') {
        Some((name, len)) => {
            let ok = !len.is_empty()
                && len.len() <= 4
                && len.bytes().all(|b| b.is_ascii_digit())
                && !len.starts_with('0');
            if !ok {
                return Err(format!("bad prefix length in {var:?}"));
            }
            name
        }
        None => var.strip_suffix('*').unwrap_or(var),
    };
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'%');
    if valid {
        Ok(())
    } else {
        Err(format!("bad variable name {var:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::nfa::SMALL;

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn exact_and_all() {
        assert!(sel("*").matches("anything at all"));
        assert!(sel("user:42:updates").matches("user:42:updates"));
        assert!(!sel("user:42:updates").matches("user:43:updates"));
        assert!(!sel("user:42:updates").matches("user:42:updates2"));
        assert!(matches!(sel("*"), Selector::All));
    }

    #[test]
    fn templates_match_what_they_could_expand_to() {
        let t = sel("user:{id}:updates");
        assert!(t.matches("user:42:updates"));
        assert!(t.matches("user:abc-DEF_9.~:updates"));
        assert!(!t.matches("user:42:other"));
        // A simple value cannot hold a reserved character: one user's
        // template does not reach into another namespace.
        assert!(!t.matches("user:42:x:updates"));
        assert!(!t.matches("user:4/2:updates"));
        assert!(t.matches("user:4%2F2:updates"));
        let books = sel("https://example.com/books/{id}");
        assert!(books.matches("https://example.com/books/1"));
        assert!(!books.matches("https://example.com/books/1/reviews"));
        assert!(!books.matches("https://example.com/authors/1"));
        // Reserved expansion crosses slashes.
        assert!(sel("https://example.com/{+path}").matches("https://example.com/a/b?c=d"));
        // Query expansion, as Mercure's draft-07 example uses it.
        let q = sel("https://example.com/users/foo/{?topic}");
        assert!(
            q.matches("https://example.com/users/foo/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1")
        );
        assert!(q.matches("https://example.com/users/foo/"));
        assert!(!q.matches("https://example.com/users/bar/?topic=x"));
        // Path segments, labels, fragments, several variables.
        assert!(sel("/api{/v,id}").matches("/api/v1/42"));
        assert!(sel("x{.ext}").matches("x.json"));
        assert!(sel("page{#frag}").matches("page#a/b"));
        assert!(sel("{a}-{b}").matches("1-2"));
        // Regular-expression characters in literals are literals.
        assert!(sel("a.b{x}").matches("a.bc"));
        assert!(!sel("a.b{x}").matches("aXbc"));
    }

    #[test]
    fn malformed_selectors_are_refused() {
        for bad in [
            "",
            "{",
            "}",
            "a{b",
            "a}b{c}",
            "{}",
            "{a,}",
            "{=x}",
            "{a:0}",
            "{a:12345}",
            "{.a.}",
            "{a b}",
            "line\nbreak",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(MAX_SELECTOR_LEN + 1);
        assert!(Selector::parse(&long).is_err());
        let many = "{a}".repeat(MAX_EXPRESSIONS + 1);
        assert!(Selector::parse(&many).is_err());
        let list: Vec<String> = (0..=MAX_SELECTORS).map(|i| format!("t{i}")).collect();
        assert!(parse_selectors(list.iter().map(String::as_str)).is_err());
    }

    #[test]
    fn small_and_large_programs_match_alike() {
        // Over `SMALL` instructions (a long literal part) the general path
        // runs; both must agree.
        let long = format!("{}{{id}}:x", "p".repeat(SMALL));
        let large = sel(&long);
        let Selector::Template(t) = &large else {
            panic!("a template")
        };
        assert!(t.nfa.closures.is_none());
        assert!(large.matches(&format!("{}42:x", "p".repeat(SMALL))));
        assert!(!large.matches(&format!("{}4/2:x", "p".repeat(SMALL))));
        let Selector::Template(t) = sel("user:{id}:updates") else {
            panic!("a template")
        };
        assert!(t.nfa.closures.is_some());
    }

    #[test]
    fn matching_stays_linear_on_hostile_templates() {
        // A template of many adjacent expressions against a long topic that
        // almost matches: a backtracking matcher would take exponential time.
        let t = sel(&format!("{}!", "{a}".repeat(MAX_EXPRESSIONS)));
        let topic = "a".repeat(MAX_SELECTOR_LEN);
        let started = std::time::Instant::now();
        assert!(!t.matches(&topic));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn grants_cover_and_narrow() {
        let g = Grant::new(
            vec![sel("user:42:updates"), sel("news:{id}")],
            vec![sel("user:42:in")],
        );
        assert!(g.can_subscribe("user:42:updates"));
        assert!(g.can_subscribe("news:1"));
        assert!(!g.can_subscribe("user:43:updates"));
        assert!(g.can_publish("user:42:in"));
        assert!(!g.can_publish("user:42:updates"));
        let narrow = g.narrow_subscribe(vec![sel("user:42:updates")]).unwrap();
        assert!(narrow.can_subscribe("user:42:updates"));
        assert!(!narrow.can_subscribe("news:1"));
        assert!(!narrow.can_publish("user:42:in"));
        // Only selectors held, as written: a template does not grant what
        // it could match as a selector of its own.
        assert_eq!(
            g.narrow_subscribe(vec![sel("news:1")]).unwrap_err(),
            sel("news:1")
        );
        let all = Grant::subscribe_all();
        assert!(all.narrow_subscribe(vec![sel("anything:{x}")]).is_ok());
        // An exact selector written like a template does not let a ticket
        // narrow to the template: that would widen it.
        let exact = Grant::new(vec![Selector::exact("u:{id}").unwrap()], Vec::new());
        assert!(exact.narrow_subscribe(vec![sel("u:{id}")]).is_err());
        assert!(
            exact
                .narrow_subscribe(vec![Selector::exact("u:{id}").unwrap()])
                .is_ok()
        );
        assert!(!Grant::none().can_subscribe("x"));
        assert!(Grant::publish_all().can_publish("x"));
    }
}
