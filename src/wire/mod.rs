//! [`Wire`]: a connection's transport, plain TCP or TLS over TCP, for
//! every layer that moves a connection's bytes (the acceptor, a
//! connection's thread, a stream, the waker threads writing for a
//! sleeping subscriber).
//!
//! A plain connection is its socket and nothing else: the TLS state is a
//! box that plain connections never allocate, so nothing on their path
//! grows. A TLS connection's bytes go through its session (`tls.rs`):
//! plaintext in, records out, under one lock held by whoever writes; a
//! stream's keeps only its sending keys (`sealed.rs`).
//! `certs.rs` holds the certificate and key a listener serves, re-read on
//! demand without dropping a connection.

#[cfg(feature = "tls")]
pub mod certs;
#[cfg(feature = "tls")]
mod sealed;
#[cfg(feature = "tls")]
pub(crate) mod tls;

use std::io::{self, Read};
use std::net::TcpStream;

use rustix::net::SendFlags;

/// A connection's transport: its socket, and its TLS session if it has
/// one.
pub(crate) struct Wire {
    tcp: TcpStream,
    #[cfg(feature = "tls")]
    tls: Option<Box<tls::Session>>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("tcp", &self.tcp)
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl Wire {
    /// A plain-text connection.
    pub(crate) fn plain(tcp: TcpStream) -> Self {
        Wire {
            tcp,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// A connection whose bytes go through `session`.
    #[cfg(feature = "tls")]
    pub(crate) fn tls(tcp: TcpStream, session: tls::Session) -> Self {
        Wire {
            tcp,
            tls: Some(Box::new(session)),
        }
    }

    /// The socket, for its options, the poller and shutdown. Bytes go
    /// through the `Wire`'s own methods, never straight to it.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether the connection speaks TLS.
    pub(crate) fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// The TLS session, if the connection has one.
    #[cfg(feature = "tls")]
    pub(crate) fn session(&self) -> Option<&tls::Session> {
        self.tls.as_deref()
    }

    /// Drops the TLS session: what follows goes out in plain text. For
    /// the one answer a client that spoke plain HTTP to a TLS port gets.
    #[cfg(feature = "tls")]
    pub(crate) fn into_plain(self) -> Self {
        Wire::plain(self.tcp)
    }

    /// Reads plaintext, after the TLS handshake's own traffic: without
    /// waiting on a non-blocking socket (`WouldBlock` when nothing more is
    /// there), else up to its read timeout. `Ok(0)` when the client
    /// closed.
    ///
    /// # Errors
    ///
    /// The socket's, or `InvalidData` for a TLS client that broke the
    /// protocol (see [`tls::is_plain_http`] for one that spoke plain
    /// HTTP).
    pub(crate) fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(s) = &self.tls {
            return s.read_now(&self.tcp, buf);
        }
        (&self.tcp).read(buf)
    }

    /// Sends what the socket's buffer takes now, never waiting (whatever
    /// the socket's blocking mode) nor raising `SIGPIPE`; `Ok(0)` when it
    /// takes nothing. Over TLS the count is of plaintext taken into the
    /// session: records of it may still wait (see
    /// [`flush_now`](Wire::flush_now)), and they go out before anything
    /// sent later.
    ///
    /// # Errors
    ///
    /// When the client is gone (reset, closed).
    pub(crate) fn send_now(&self, bytes: &[u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(s) = &self.tls {
            return s.send_now(&self.tcp, bytes);
        }
        send_now(&self.tcp, bytes)
    }

    /// Sends records the TLS session still holds, without waiting; true
    /// when none is left (always, in plain text).
    ///
    /// # Errors
    ///
    /// When the client is gone.
    pub(crate) fn flush_now(&self) -> io::Result<bool> {
        #[cfg(feature = "tls")]
        if let Some(s) = &self.tls {
            return s.flush_now(&self.tcp);
        }
        Ok(true)
    }

    /// Over TLS, sends the `close_notify` alert if the socket takes it now
    /// (the connection closes next); nothing in plain text.
    pub(crate) fn close_notify(&self) {
        #[cfg(feature = "tls")]
        if let Some(s) = &self.tls {
            s.close_now(&self.tcp);
        }
    }

    /// Whether bytes already given to this connection wait to go out
    /// (TLS records the socket did not take).
    pub(crate) fn has_unsent(&self) -> bool {
        #[cfg(feature = "tls")]
        if let Some(s) = &self.tls {
            return s.has_unsent();
        }
        false
    }
}

/// Sends what the socket's buffer takes now, never waiting (whatever the
/// socket's blocking mode) nor raising `SIGPIPE`; `Ok(0)` when it takes
/// nothing.
///
/// # Errors
///
/// When the client is gone (reset, closed).
pub(crate) fn send_now(conn: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match rustix::net::send(conn, bytes, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(n) => return Ok(n),
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => return Ok(0),
            Err(e) => return Err(e.into()),
        }
    }
}
