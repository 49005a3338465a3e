//! Bridges between the hub or the stream API and the outside: PostgreSQL
//! `LISTEN`/`NOTIFY` into hub topics (feature `postgres`), and a
//! [`Stream`](crate::Stream) over a `tiny_http` request (feature
//! `tiny-http`). They use the hub and the stream; nothing below uses them.

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "tiny-http")]
pub mod tiny_http;
