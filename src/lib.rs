//! ssed: a blocking, thread-per-connection Server-Sent Events server for
//! small hosts.

mod acceptor;
mod conn;
mod error;
mod event;
mod http;
mod limits;
mod route;
mod server;
mod shutdown;
mod stats;
mod stream;
mod time;

pub use error::{EndReason, Error, EventError, StreamError};
pub use event::{EncodedEvent, Event};
pub use http::{Request, Response};
pub use limits::{Capacity, raise_fd_limit};
pub use server::{MIN_STACK_SIZE, Overload, RunningServer, Server, ServerBuilder};
pub use shutdown::ShutdownHandle;
pub use stats::{Stats, StatsSnapshot};
pub use stream::Stream;
