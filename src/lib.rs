//! ssed: a blocking, thread-per-connection Server-Sent Events server for small hosts.

mod error;
mod event;

pub use error::{EndReason, Error, EventError, StreamError};
pub use event::{EncodedEvent, Event};
