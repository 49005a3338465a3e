//! `[tls] redirect_http`: a plain-HTTP listener beside the TLS one. It
//! answers ACME `http-01` challenges at `/.well-known/acme-challenge/`
//! while a validation runs, and sends every other request to the same
//! host and path over HTTPS (`308 Permanent Redirect`, which keeps the
//! method). It is a [`Server`] like the main one, so slow or hostile
//! clients meet the same deadlines and caps, and it holds no stream.

use std::sync::Arc;

use super::acme::Http01;
use crate::http::request::push_encoded;
use crate::{Request, Response, Server};

/// The redirect listener on `addr`, sending clients to `https_port`. It
/// has a shutdown handle of its own (a handle serves one server): stop it
/// with its [`Server::shutdown_handle`] once the main server stops.
///
/// # Errors
///
/// When `addr` cannot be bound.
pub fn build(
    addr: &str,
    https_port: u16,
    http01: Arc<Http01>,
    request_timeout: std::time::Duration,
) -> Result<Server, crate::Error> {
    Server::builder()
        .listen(addr)
        .request_timeout(request_timeout)
        // Every request is answered at once; a few hundred at a time is
        // plenty for redirects.
        .max_connections(256)
        .get("/.well-known/acme-challenge/{token}", move |req| {
            let token = req.param("token").unwrap_or_default();
            match http01.key_authorization(token) {
                Some(answer) => Response::new(200)
                    .with_header("Content-Type", "application/octet-stream")
                    .with_body(answer),
                None => Response::text(404, "no such ACME challenge"),
            }
        })
        .fallback(move |req| redirect(req, https_port))
        .build()
}

/// `308` to `https://HOST[:PORT]/path?query`, or `400` without a usable
/// `Host`.
fn redirect(req: &Request, https_port: u16) -> Response {
    let Some(host) = req.header("host").and_then(host_of) else {
        return Response::text(400, "a Host header naming this server is needed");
    };
    let mut location = if https_port == 443 {
        format!("https://{host}")
    } else {
        format!("https://{host}:{https_port}")
    };
    location.push_str(req.path());
    for (i, (k, v)) in req.query_pairs().iter().enumerate() {
        location.push(if i == 0 { '?' } else { '&' });
        push_encoded(&mut location, k);
        location.push('=');
        push_encoded(&mut location, v);
    }
    Response::text(308, format!("moved to {location}\n")).with_header("Location", &location)
}

/// The host of a `Host` header without its port, if it is a name or an
/// address (anything else could smuggle bytes into `Location`).
fn host_of(header: &str) -> Option<&str> {
    let host = if header.starts_with('[') {
        &header[..=header.find(']')?]
    } else {
        header.split(':').next()?
    };
    let fine = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':');
    (!host.is_empty() && host.bytes().all(fine)).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(target: &str, host: Option<&str>) -> Request {
        let req = Request::new("GET", target, ([127, 0, 0, 1], 1).into());
        match host {
            Some(h) => req.with_header("Host", h),
            None => req,
        }
    }

    #[test]
    fn requests_go_to_the_same_host_over_https() {
        let r = redirect(&get("/events?topic=a%20b&x=1", Some("example.com")), 443);
        assert_eq!(r.status(), 308);
        assert_eq!(
            r.header("Location"),
            Some("https://example.com/events?topic=a%20b&x=1")
        );
        let r = redirect(&get("/", Some("example.com:80")), 8443);
        assert_eq!(r.header("Location"), Some("https://example.com:8443/"));
        let r = redirect(&get("/", Some("[::1]:80")), 443);
        assert_eq!(r.header("Location"), Some("https://[::1]/"));
    }

    #[test]
    fn a_missing_or_strange_host_is_refused() {
        assert_eq!(redirect(&get("/", None), 443).status(), 400);
        assert_eq!(redirect(&get("/", Some("a b")), 443).status(), 400);
        assert_eq!(redirect(&get("/", Some("evil/x")), 443).status(), 400);
        assert_eq!(redirect(&get("/", Some("")), 443).status(), 400);
    }
}
