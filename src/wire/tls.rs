//! A TLS connection's session: rustls's state for one connection, behind
//! one lock, driven over a socket that may be blocking or not.
//!
//! The acceptor drives the handshake and reads the request head on a
//! non-blocking socket, as it reads a plain head: no thread waits on a
//! client's handshake. A stream's connection is then [sealed](Session::seal):
//! only its sending side is kept (`sealed.rs`). After that whoever writes
//! takes the lock: the stream's thread (blocking, within its write
//! timeout) or a waker thread writing for a sleeping subscriber (never
//! waiting: what the socket does not take stays queued in the session, and
//! goes out before any later byte).

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::net::SendFlags;
use rustls::{ServerConfig, ServerConnection};

use super::certs::ACME_TLS_ALPN;
use super::sealed::Sealer;

/// One connection's TLS state.
pub(crate) struct Session {
    conn: Mutex<State>,
    /// Whether a byte came from the client yet (its first tells a TLS
    /// hello from a plain HTTP request).
    heard: AtomicBool,
}

/// The error [`Session::read_now`] gives for a client that spoke plain
/// HTTP to a TLS port: it deserves an answer it can read.
#[derive(Debug)]
struct PlainHttp;

impl std::fmt::Display for PlainHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a plain HTTP request on a TLS port")
    }
}

impl std::error::Error for PlainHttp {}

/// Whether `e` is [`Session::read_now`]'s report of a client that sent a
/// plain HTTP request instead of a TLS hello.
pub(crate) fn is_plain_http(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|e| e.is::<PlainHttp>())
}

/// The first byte of a TLS record carrying a handshake message.
const HANDSHAKE_RECORD: u8 = 0x16;

impl Session {
    /// A session for a new connection.
    ///
    /// # Errors
    ///
    /// rustls's, for a configuration it cannot serve with.
    pub(crate) fn new(config: &Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Session {
            conn: Mutex::new(State::Full(Box::new(ServerConnection::new(Arc::clone(
                config,
            ))?))),
            heard: AtomicBool::new(false),
        })
    }

    /// The session, to write through it. A thread that panicked holding it
    /// left at worst a record half queued; the connection fails on its
    /// next write.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps only the sending side (see `sealed.rs`): for a stream, whose
    /// client sends nothing more, once its request is in and nothing waits
    /// to go out. Left whole if rustls cannot give its secrets (or records
    /// still wait): it keeps working, at its cost in memory.
    pub(crate) fn seal(&self) {
        let mut state = self.lock();
        let full = match &*state {
            State::Full(c) if !c.is_handshaking() && !c.wants_write() => {
                std::mem::replace(&mut *state, State::Closed)
            }
            _ => return,
        };
        let State::Full(c) = full else { return };
        *state = match Sealer::from_session(*c) {
            Ok(sealer) => State::Sealed(Box::new(sealer)),
            Err(e) => {
                log::warn!("cannot keep a TLS stream's keys alone: {e}; closing it");
                State::Closed
            }
        };
    }

    /// Reads plaintext (see [`Wire::read_now`](super::Wire::read_now)),
    /// doing the handshake's reads and writes on the way.
    pub(crate) fn read_now(&self, tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        let mut state = self.lock();
        let State::Full(c) = &mut *state else {
            // Sealed: a stream's client has nothing more to say.
            return Err(io::ErrorKind::Unsupported.into());
        };
        loop {
            match c.reader().read(buf) {
                Ok(n) => return Ok(n), // 0: the client said close_notify
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if !self.heard.load(Relaxed) {
                refuse_plain_http(tcp)?;
            }
            let n = c.read_tls(&mut SocketReader(tcp))?;
            if n == 0 {
                return Ok(0);
            }
            self.heard.store(true, Relaxed);
            if let Err(e) = c.process_new_packets() {
                // The alert rustls queued, if the socket takes it.
                let _ = flush(&mut **c, tcp, SendFlags::DONTWAIT);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            flush(&mut **c, tcp, SendFlags::DONTWAIT)?;
            if !c.is_handshaking() && c.alpn_protocol() == Some(ACME_TLS_ALPN) {
                // An ACME validation has seen the challenge certificate:
                // no request follows, so the connection ends here.
                c.send_close_notify();
                let _ = flush(&mut **c, tcp, SendFlags::DONTWAIT);
                return Ok(0);
            }
        }
    }

    /// Takes `bytes` into the session and sends what the socket takes now
    /// (see [`Wire::send_now`](super::Wire::send_now)); `Ok(0)` while
    /// earlier records still wait.
    pub(crate) fn send_now(&self, tcp: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
        let mut c = self.lock();
        if !flush(&mut *c, tcp, SendFlags::DONTWAIT)? {
            return Ok(0);
        }
        let n = c.take(&[IoSlice::new(bytes)])?;
        flush(&mut *c, tcp, SendFlags::DONTWAIT)?;
        Ok(n)
    }

    /// Sends the records the session holds, without waiting; true when
    /// none is left.
    pub(crate) fn flush_now(&self, tcp: &TcpStream) -> io::Result<bool> {
        flush(&mut *self.lock(), tcp, SendFlags::DONTWAIT)
    }

    /// Whether records wait to go out.
    pub(crate) fn has_unsent(&self) -> bool {
        self.lock().wants_write()
    }

    /// Queues the `close_notify` alert and sends it if the socket takes it
    /// now: a clean end that a client can tell from a cut connection.
    pub(crate) fn close_now(&self, tcp: &TcpStream) {
        let mut c = self.lock();
        c.close_notify();
        let _ = flush(&mut *c, tcp, SendFlags::DONTWAIT); // closing anyway
    }
}

/// Fails with [`PlainHttp`] when what the client sent first is not a TLS
/// record but looks like the start of an HTTP request line (a method's
/// capital letter). Looks without taking the byte.
fn refuse_plain_http(tcp: &TcpStream) -> io::Result<()> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first) {
        Ok(1) if first[0] != HANDSHAKE_RECORD && first[0].is_ascii_uppercase() => {
            Err(io::Error::new(io::ErrorKind::InvalidData, PlainHttp))
        }
        _ => Ok(()), // rustls reads and judges it
    }
}

/// Sends queued records until none is left (true) or the socket takes no
/// more (false; only with `DONTWAIT`, or when a blocking socket's send
/// timeout passes: then `WouldBlock`).
///
/// # Errors
///
/// When the client is gone; `WouldBlock` from a blocking socket whose send
/// timeout passed.
pub(crate) fn flush(c: &mut dyn Records, tcp: &TcpStream, flags: SendFlags) -> io::Result<bool> {
    let mut w = SocketWriter { tcp, flags };
    while c.wants_write() {
        match c.write_to(&mut w) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock && flags.contains(SendFlags::DONTWAIT) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A TLS connection's state.
pub(crate) enum State {
    /// rustls's whole connection: the handshake, the request, plain
    /// requests.
    Full(Box<ServerConnection>),
    /// A stream's sending side alone.
    Sealed(Box<Sealer>),
    /// Nothing more goes out (sealing failed).
    Closed,
}

/// Where plaintext becomes records and records go out, whatever holds the
/// keys.
pub(crate) trait Records {
    /// Takes plaintext from the front of `slices`; the bytes taken (0 when
    /// records wait and no more fit).
    ///
    /// # Errors
    ///
    /// When nothing more can be sent on this connection.
    fn take(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Whether records wait to go out.
    fn wants_write(&self) -> bool;
    /// Sends waiting records to `w`; the bytes it took.
    ///
    /// # Errors
    ///
    /// `w`'s.
    fn write_to(&mut self, w: &mut dyn Write) -> io::Result<usize>;
    /// Queues the `close_notify` alert.
    fn close_notify(&mut self);
}

impl Records for State {
    fn take(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            State::Full(c) => c.writer().write_vectored(slices),
            State::Sealed(s) => s.take(slices),
            State::Closed => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn wants_write(&self) -> bool {
        match self {
            State::Full(c) => c.wants_write(),
            State::Sealed(s) => s.wants_write(),
            State::Closed => false,
        }
    }

    fn write_to(&mut self, w: &mut dyn Write) -> io::Result<usize> {
        match self {
            State::Full(c) => c.write_tls(w),
            State::Sealed(s) => s.write_to(w),
            State::Closed => Ok(0),
        }
    }

    fn close_notify(&mut self) {
        match self {
            State::Full(c) => c.send_close_notify(),
            State::Sealed(s) => s.close_notify(),
            State::Closed => {}
        }
    }
}

impl Records for ServerConnection {
    fn take(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        self.writer().write_vectored(slices)
    }

    fn wants_write(&self) -> bool {
        let common: &rustls::CommonState = self;
        common.wants_write()
    }

    fn write_to(&mut self, w: &mut dyn Write) -> io::Result<usize> {
        self.write_tls(w)
    }

    fn close_notify(&mut self) {
        self.send_close_notify();
    }
}

/// Reads a socket for rustls.
struct SocketReader<'a>(&'a TcpStream);

impl Read for SocketReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

/// Writes records to a socket without raising `SIGPIPE`; with `DONTWAIT`
/// never waiting (`WouldBlock` when the socket takes nothing), else
/// within the socket's send timeout.
pub(crate) struct SocketWriter<'a> {
    /// The socket.
    pub tcp: &'a TcpStream,
    /// `NOSIGNAL` is added.
    pub flags: SendFlags,
}

impl Write for SocketWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let flags = self.flags | SendFlags::NOSIGNAL;
        let mut control = rustix::net::SendAncillaryBuffer::default();
        rustix::net::sendmsg(self.tcp, bufs, &mut control, flags).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
