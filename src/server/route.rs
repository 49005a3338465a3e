//! Routes: exact paths and `{param}` segments, stream or ordinary handlers.

use std::sync::Arc;

use crate::error::{Error, StreamError};
use crate::http::request::decode;
use crate::http::{Request, Response};
use crate::stream::Stream;

/// A stream handler: runs on the connection's own thread for as long as the
/// stream lives.
pub(crate) type StreamFn = dyn Fn(&Request, &mut Stream) -> Result<(), StreamError> + Send + Sync;
/// An ordinary handler: answers once.
pub(crate) type PlainFn = dyn Fn(&Request) -> Response + Send + Sync;

#[derive(Clone)]
pub(crate) enum Handler {
    Stream(Arc<StreamFn>),
    Plain(Arc<PlainFn>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

struct Route {
    method: String,
    segments: Vec<Segment>,
    handler: Handler,
}

/// What routing a request found.
pub(crate) enum Match {
    Handler(Handler, Vec<(String, String)>, bool),
    /// The path exists but not for this method; the value lists the methods
    /// for `Allow`.
    MethodNotAllowed(String),
    NotFound,
}

/// The routing table; built once, then shared read-only.
#[derive(Default)]
pub(crate) struct Router {
    routes: Vec<Route>,
    /// What answers a path no route has.
    fallback: Option<Handler>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.routes.iter().map(|r| (&r.method, &r.segments)))
            .finish()
    }
}

impl Router {
    pub(crate) fn add(
        &mut self,
        method: &str,
        pattern: &str,
        handler: Handler,
    ) -> Result<(), Error> {
        let segments = parse_pattern(pattern)?;
        let method = method.to_ascii_uppercase();
        if self
            .routes
            .iter()
            .any(|r| r.method == method && r.segments == segments)
        {
            return Err(Error::Route {
                pattern: pattern.to_owned(),
                reason: "route registered twice for the same method",
            });
        }
        self.routes.push(Route {
            method,
            segments,
            handler,
        });
        Ok(())
    }

    /// Sets the handler of paths no route has (any method).
    pub(crate) fn fallback(&mut self, handler: Handler) {
        self.fallback = Some(handler);
    }

    /// Finds the handler for `method` and `path`. `HEAD` falls back to an
    /// ordinary `GET` route (the third field of `Match::Handler` is then
    /// true: send the head only).
    pub(crate) fn find(&self, method: &str, path: &str) -> Match {
        let parts: Vec<&str> = path.split('/').skip(1).collect();
        let mut allowed: Vec<&str> = Vec::new();
        let mut head_fallback = None;
        for route in &self.routes {
            let Some(params) = match_segments(&route.segments, &parts) else {
                continue;
            };
            if route.method == method {
                return Match::Handler(route.handler.clone(), params, false);
            }
            if method == "HEAD"
                && route.method == "GET"
                && matches!(route.handler, Handler::Plain(_))
            {
                head_fallback.get_or_insert((route.handler.clone(), params));
            }
            if !allowed.contains(&route.method.as_str()) {
                allowed.push(&route.method);
            }
        }
        if let Some((handler, params)) = head_fallback {
            return Match::Handler(handler, params, true);
        }
        if allowed.is_empty() {
            match &self.fallback {
                Some(handler) => Match::Handler(handler.clone(), Vec::new(), method == "HEAD"),
                None => Match::NotFound,
            }
        } else {
            if allowed.contains(&"GET") && !allowed.contains(&"HEAD") {
                let plain_get = self.routes.iter().any(|r| {
                    r.method == "GET"
                        && matches!(r.handler, Handler::Plain(_))
                        && match_segments(&r.segments, &parts).is_some()
                });
                if plain_get {
                    allowed.push("HEAD");
                }
            }
            Match::MethodNotAllowed(allowed.join(", "))
        }
    }
}

fn parse_pattern(pattern: &str) -> Result<Vec<Segment>, Error> {
    let bad = |reason| Error::Route {
        pattern: pattern.to_owned(),
        reason,
    };
    let Some(rest) = pattern.strip_prefix('/') else {
        return Err(bad("a route must start with /"));
    };
    let mut segments = Vec::new();
    for part in rest.split('/') {
        if let Some(inner) = part.strip_prefix('{') {
            let Some(name) = inner.strip_suffix('}') else {
                return Err(bad("unclosed {param}"));
            };
            if name.is_empty() || name.contains(['{', '}']) {
                return Err(bad("a {param} needs a name"));
            }
            if segments
                .iter()
                .any(|s| matches!(s, Segment::Param(n) if n == name))
            {
                return Err(bad("a {param} name is used twice"));
            }
            segments.push(Segment::Param(name.to_owned()));
        } else if part.contains(['{', '}']) {
            return Err(bad("a {param} must be a whole segment"));
        } else {
            segments.push(Segment::Literal(part.to_owned()));
        }
    }
    Ok(segments)
}

fn match_segments(segments: &[Segment], parts: &[&str]) -> Option<Vec<(String, String)>> {
    if segments.len() != parts.len() {
        return None;
    }
    let mut params = Vec::new();
    for (segment, part) in segments.iter().zip(parts) {
        match segment {
            Segment::Literal(l) if l == part => {}
            Segment::Literal(_) => return None,
            Segment::Param(_) if part.is_empty() => return None,
            Segment::Param(name) => params.push((name.clone(), decode(part, false))),
        }
    }
    Some(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> Handler {
        Handler::Plain(Arc::new(|_: &Request| Response::new(200)))
    }

    fn stream() -> Handler {
        Handler::Stream(Arc::new(|_: &Request, _: &mut Stream| Ok(())))
    }

    fn router() -> Router {
        let mut r = Router::default();
        r.add("GET", "/", plain()).expect("valid");
        r.add("GET", "/events/{topic}", stream()).expect("valid");
        r.add("POST", "/publish/{topic}", plain()).expect("valid");
        r.add("GET", "/keys/{key}", stream()).expect("valid");
        r.add("POST", "/keys/{key}", plain()).expect("valid");
        r
    }

    #[test]
    fn matches_routes() {
        let r = router();
        let table: &[(&str, &str, &str)] = &[
            ("GET", "/", "plain"),
            ("HEAD", "/", "head"),
            ("GET", "/events/a%2Fb", "stream topic=a/b"),
            ("POST", "/publish/x", "plain topic=x"),
            ("POST", "/keys/k", "plain key=k"),
            ("GET", "/keys/k", "stream key=k"),
            ("GET", "/events/", "404"),
            ("GET", "/events", "404"),
            ("GET", "/events/a/b", "404"),
            ("GET", "/nope", "404"),
            ("DELETE", "/keys/k", "405 GET, POST"),
            ("GET", "/publish/x", "405 POST"),
            ("POST", "/", "405 GET, HEAD"),
            ("HEAD", "/events/a", "405 GET"),
        ];
        for (method, path, want) in table {
            let got = match r.find(method, path) {
                Match::Handler(h, params, head) => {
                    let kind = match (h, head) {
                        (_, true) => "head",
                        (Handler::Plain(_), false) => "plain",
                        (Handler::Stream(_), false) => "stream",
                    };
                    let p: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    [kind.to_owned()]
                        .into_iter()
                        .chain(p)
                        .collect::<Vec<_>>()
                        .join(" ")
                }
                Match::MethodNotAllowed(allow) => format!("405 {allow}"),
                Match::NotFound => "404".to_owned(),
            };
            assert_eq!(&got, want, "{method} {path}");
        }
    }

    #[test]
    fn refuses_bad_patterns() {
        for p in ["", "x", "/{", "/{}", "/a{b}", "/{a}/{a}"] {
            assert!(Router::default().add("GET", p, plain()).is_err(), "{p}");
        }
        let mut r = router();
        assert!(r.add("GET", "/", plain()).is_err(), "duplicate");
    }
}
