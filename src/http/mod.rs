//! The HTTP/1.1 layer: just enough HTTP for an event stream server.
//!
//! - [`head`] parses a request head with hard limits (8 KiB, 64 headers) and
//!   validates what the rest of the server relies on (version, framing);
//! - [`request`] is the public [`Request`] a handler sees, built from a head;
//! - [`response`] is the public [`Response`] of ordinary routes and the
//!   status lines and headers the server writes itself;
//! - [`forwarded`] reads the client's address and scheme from the headers
//!   a trusted proxy adds;
//! - [`body`] decodes a request body (length or chunked) incrementally,
//!   under a size bound.
//!
//! The acceptor (`crate::server`) feeds bytes to [`head::parse`] and to a
//! body decoder without a thread; a connection thread only ever sees
//! complete requests.

pub(crate) mod body;
pub(crate) mod chunked;
pub(crate) mod forwarded;
pub(crate) mod head;
pub(crate) mod request;
pub(crate) mod response;

pub use forwarded::{IpNet, IpNetError};
pub use request::Request;
pub use response::Response;
