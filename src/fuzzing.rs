//! Internals for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`).
//!
//! Not a stable API: it exposes the request-head parser and the Redis
//! client's RESP2 reply reader ([`read_reply`], over any `BufRead`) as they
//! are, and [`Offline`], which takes a request from raw bytes to a
//! handler's [`Response`] the way the accept loop does, minus the socket,
//! so a fuzzer can drive the daemon's publish path millions of times
//! without threads or timing.

use std::io;
use std::net::SocketAddr;

pub use crate::http::head::{BodyKind, Head, HeadError, MAX_HEAD, MAX_HEADERS, Parse, parse};
pub use crate::hub::redis::resp::{
    MAX_ARRAY, MAX_BULK, MAX_DEPTH, MAX_LINE, Malformed, RespError, Value, read_reply,
};

use crate::http::body;
use crate::server::route::{Handler, Match};
use crate::{Request, Response, Server};

/// What [`Offline::serve`] made of a request.
#[derive(Debug)]
pub enum Served {
    /// The head or the body is cut short: the server would wait for more
    /// bytes, then time out or see the client go.
    Incomplete,
    /// Answered before any handler ran: a refused head or body (status
    /// and message as the server sends them), no route (`404`), a wrong
    /// method (`405`).
    Refused(Response),
    /// A stream route matched; its handler needs a connection and is not
    /// run here.
    Stream(Request),
    /// An ordinary route's handler answered the request.
    Answered(Request, Response),
}

/// A built [`Server`] whose ordinary routes answer raw request bytes
/// in-process: head parsing, routing, body decoding under `max_body`, then
/// the handler, as on a connection whose client sent those bytes and
/// stopped.
#[derive(Debug)]
pub struct Offline {
    server: Server,
}

impl Offline {
    /// Wraps a built (never run) server.
    ///
    /// # Errors
    ///
    /// None today: the body decoder needs no socket any more. The `Result`
    /// stays so the fuzz targets need not change with it.
    pub fn new(server: Server) -> io::Result<Self> {
        Ok(Offline { server })
    }

    /// Serves one request from `bytes`, as sent by `peer`; bytes past the
    /// request are ignored.
    pub fn serve(&self, peer: SocketAddr, bytes: &[u8]) -> Served {
        let shared = self.server.shared();
        let (head, len) = match parse(bytes) {
            Parse::Partial => return Served::Incomplete,
            Parse::Error(e) => return Served::Refused(Response::text(e.status(), e.message())),
            Parse::Complete(head, len) => (head, len),
        };
        let mut req = Request::from_head(head, peer);
        let (handler, params) = match shared.router.find(req.method(), req.path()) {
            Match::NotFound => return Served::Refused(Response::text(404, "no route")),
            Match::MethodNotAllowed(allow) => return Served::Refused(Response::text(405, allow)),
            Match::Handler(Handler::Stream(_), params, _) => {
                req.set_params(params);
                return Served::Stream(req);
            }
            Match::Handler(Handler::Plain(handler), params, _) => (handler, params),
        };
        req.set_params(params);
        match body::decode(req.body_kind, shared.config.max_body, &bytes[len..]) {
            Ok(Some((body, _))) => req.set_body(body),
            Ok(None) => return Served::Incomplete,
            Err(e) => {
                let (status, message) = e.status();
                return Served::Refused(Response::text(status, message));
            }
        }
        let response = handler(&req);
        Served::Answered(req, response)
    }
}
