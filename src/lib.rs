//! ssed is a blocking, thread-per-connection Server-Sent Events server for
//! small hosts.
//!
//! # Why blocking, and a thread per stream
//!
//! A handler is plain sequential code that runs on its connection's own OS
//! thread for as long as the stream lives, the way a PHP-FPM worker runs an
//! "event controller": it sends, sleeps, polls, waits on a channel, and every
//! send is written and flushed before it returns. There is no async runtime
//! and nothing to `.await`. What makes this affordable on a 512 MB VM:
//!
//! - each thread gets a small stack (64 KiB by default, 32 KiB at least);
//! - a connection holds no thread until its request is in (the acceptor
//!   reads heads, and the bodies of ordinary requests, on non-blocking
//!   sockets), and an ordinary request's thread never waits on its client
//!   (the acceptor sends what the client does not take at once), so idle,
//!   slow and non-reading clients cost a descriptor, not a thread;
//! - a hard cap on open streams ([`ServerBuilder::max_connections`], derived
//!   from the descriptor limit, `vm.max_map_count` and memory by default, a
//!   memory cgroup's limit included): past it, or while memory runs low, a
//!   client gets `503` with `Retry-After` before any thread is spent;
//! - a client that stops reading is dropped after the write timeout, and an
//!   idle stream ends when its execution-time budget runs out.
//!
//! Pick something else when you need far more concurrent streams than a
//! machine has threads to spare (tens of thousands per core): an async server
//! holds an idle stream in less memory. ssed is for the many programs that
//! want a few hundred to a few thousand streams with straight-line code.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//!
//! let server = ssed::Server::builder()
//!     .listen("127.0.0.1:0")           // port 0: any free port
//!     .max_connections(256)
//!     .max_execution_time(Duration::from_secs(30))
//!     .route("/message/fetch", |_req, stream| {
//!         for i in 1.. {
//!             stream.send("demo", &format!("Message n°{i}"))?; // event: demo, JSON data
//!             stream.sleep(Duration::from_secs(2))?;           // bounded by budget and shutdown
//!         }
//!         Ok(())
//!     })
//!     .get("/", |_req| ssed::Response::html("<p>hello</p>"))
//!     .build()?;
//! println!("listening on {}", server.local_addr());
//! let running = server.spawn()?; // or `server.run()?` to block this thread
//! running.stop()?;              // what Ctrl-C does in the `ssed` binary
//! # Ok::<(), ssed::Error>(())
//! ```
//!
//! # A tour of [`Stream`]
//!
//! - sending: [`send`](Stream::send) (a named event with JSON data),
//!   [`send_event`](Stream::send_event) (a full [`Event`]: name, id, data,
//!   retry, comment), [`comment`](Stream::comment), [`ping`](Stream::ping),
//!   [`retry`](Stream::retry), [`done`](Stream::done) (`data: [DONE]`, then
//!   the end), [`send_encoded`](Stream::send_encoded) (frames encoded once
//!   for many streams);
//! - per-channel counts: [`sent_count`](Stream::sent_count),
//!   [`has_sent`](Stream::has_sent), [`reset_count`](Stream::reset_count);
//! - waiting: [`sleep`](Stream::sleep), [`recv`](Stream::recv),
//!   [`poll`](Stream::poll) (call a function every interval, send each
//!   `Some`), [`forward`](Stream::forward) (relay a crossbeam channel); all
//!   send heartbeats if [`ServerBuilder::heartbeat`] is set;
//! - the connection: [`check_connection`](Stream::check_connection),
//!   [`extend_time`](Stream::extend_time), [`time_left`](Stream::time_left),
//!   [`last_event_id`](Stream::last_event_id);
//! - answering without a stream: [`no_content`](Stream::no_content) (`204`
//!   tells an `EventSource` to stop reconnecting), [`respond`](Stream::respond).
//!
//! # Shutdown
//!
//! [`ShutdownHandle::shutdown`] (from [`Server::shutdown_handle`]; the `ssed`
//! binary wires Ctrl-C and SIGTERM to it) stops the acceptor; every stream's
//! blocking call returns [`EndReason::Shutdown`], each open stream gets a
//! last frame (`: server shutting down`) and closes, and [`Server::run`]
//! returns once they are done or after the grace period
//! ([`ServerBuilder::grace_period`], 5 s), cutting the sockets still open.
//! A handler busy in its own code without calling the stream cannot be
//! interrupted: a thread can only be asked to stop.
//!
//! # Errors
//!
//! [`Error`] is a setup failure (bind, bad route). Handlers return
//! [`StreamError`], whose [`StreamError::Ended`] carries the [`EndReason`]
//! the stream ended for (client, write timeout, budget, shutdown, slow): the
//! same names as the `ssed_disconnects_total{reason}` metric. A panic in a
//! handler ends only its own connection: it is caught, logged at `error` and
//! counted ([`StatsSnapshot::handler_panics`]).
//!
//! # How the source is laid out
//!
//! Imports run one way, from the bottom up; no module uses one that uses it
//! back.
//!
//! | layer | where | what |
//! | --- | --- | --- |
//! | errors, events | `error.rs`, `event.rs`, `digits.rs`, `time.rs`, `stats.rs`, `shutdown.rs` | [`Error`], [`StreamError`], [`Event`] and its encoding, counters, the shutdown handle |
//! | transport | `wire/` | a connection's bytes, plain or TLS (`tls.rs` the session, `sealed.rs` a stream's sending keys, `certs.rs` the reloadable certificate) |
//! | HTTP | `http/` | request heads and bodies (with their limits), responses, chunked framing, forwarded headers (`forwarded.rs`: the client behind a trusted proxy) |
//! | streams | `stream/` | [`Stream`]: sending, waiting, the budget; `write.rs` is the write path (vectored, with a deadline), `registry.rs` the open streams shutdown reaches |
//! | server | `server/` | [`Server`] and [`ServerBuilder`]; `acceptor.rs` is the main loop (one thread, epoll: heads, bodies, answers without a thread), `conn.rs` a connection's thread, `pending.rs` what waits in the acceptor, `route.rs`, `limits/` (the cap, cgroups, the memory guard, streams per client, publish rate) |
//! | hub | `hub/` | [`Hub`] (`mod.rs`) over one engine interface (`engine.rs`) with two engines: `local.rs` (memory, or SQLite in `store.rs`, behind the [`hub::History`] and [`hub::MailboxStore`] traits) and `redis/` (pool, scripts, the reader thread, the worker threads that make a stream's round trips, RESP); `node.rs` each topic's subscribers and the lock that orders fan-out, `fanout.rs` their queues and the waker threads, `replay.rs` replay a page at a time, `mailbox.rs`, `follow.rs` (a [`Stream`] following a subscription) |
//! | bridges | `bridge/` | PostgreSQL `LISTEN`/`NOTIFY` into topics, the `tiny_http` adapter |
//! | daemon | `daemon/` | the `ssed` daemon's config, routes, auth, metrics and demo page (not a stable API) |
//! | binary | `bin/ssed/` | `main.rs` the CLI; `loadtest/` is `ssed loadtest`, a client that measures a server (arguments, histogram, stream decoding, streams, publisher, report) |
//!
//! # Features
//!
//! - `daemon` (default): the `ssed` binary and its dependencies (logger,
//!   signal handling). Embedders take the library alone with
//!   `default-features = false`.
//! - `tiny-http`: `ssed::tiny_http`, a [`Stream`] over a `tiny_http::Request`
//!   for apps already serving HTTP with tiny_http.
//! - `durable` (part of `daemon`): `ssed::hub::store`, history and mailboxes kept
//!   in an embedded SQLite database so they survive restarts.
//! - `postgres` (part of `daemon`): `ssed::postgres`, a listener that
//!   publishes PostgreSQL `NOTIFY` payloads into a [`Hub`]'s topics, over a
//!   blocking client of its own (SCRAM-SHA-256 on ring; no async runtime).
//! - `tls` (part of `daemon`): HTTPS on the listener,
//!   [`ServerBuilder::tls`] with [`tls::Certificates`] (rustls on ring),
//!   reloadable without dropping a connection.
//! - `fuzzing`: internals for the fuzz targets in `fuzz/`; not a stable API.
//!
//! Always there, with no dependency: [`Hub::with_redis`] (see [`hub::redis`]),
//! a hub whose topics, ids, history and mailboxes live in Redis, shared by
//! several nodes.

#![cfg_attr(
    not(test),
    warn(
        clippy::print_stdout,
        clippy::print_stderr,
        clippy::dbg_macro,
        clippy::todo,
        clippy::unwrap_used
    )
)]
#![deny(missing_docs)]
// Checked with `fuzzing` on (clippy --all-features): without it, what only
// the fuzz targets reach through `ssed::fuzzing` would read as unreachable.
#![cfg_attr(feature = "fuzzing", warn(unreachable_pub))]

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod backoff;
mod bridge;
#[cfg(feature = "daemon")]
pub mod daemon;
mod digits;
mod error;
mod event;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub mod hub;
mod server;
mod shutdown;
mod stats;
mod stream;
mod time;
mod wire;

#[cfg(feature = "postgres")]
pub use bridge::postgres;
#[cfg(feature = "tiny-http")]
pub use bridge::tiny_http;
#[cfg(feature = "tls")]
pub use wire::certs as tls;

pub use error::{EndReason, Error, EventError, Report, StreamError};
pub use event::{EncodedEvent, Event};
pub use http::{IpNet, IpNetError, Request, Response};
pub use hub::{EventId, Hub, HubConfig, HubError, Published, Subscription};
pub use server::limits::{
    Capacity, MemoryInfo, MemorySource, Rate, RateError, RateKey, RateLimiter, memory_info,
    raise_fd_limit,
};
pub use server::{MIN_STACK_SIZE, Overload, RunningServer, Server, ServerBuilder};
pub use shutdown::ShutdownHandle;
pub use stats::{Stats, StatsSnapshot};
pub use stream::{Stream, StreamOptions};
