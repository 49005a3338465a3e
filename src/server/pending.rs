//! The connections the acceptor holds without a thread, and what each is
//! waiting for.
//!
//! A connection is here while its request head or an ordinary request's
//! body arrives, while it idles between keep-alive requests, while the rest
//! of a response a thread could not send at once goes out, and while an
//! answered connection lingers before it closes. Each state has one
//! deadline; the [`Table`] keeps them in slots indexed by the poller's
//! token and counts the bytes the waiting bodies hold, which the acceptor
//! keeps under one bound for all of them.
//!
//! Nothing here routes or spawns: the acceptor (`crate::server::acceptor`) decides
//! what a state change means. A connection thread (`crate::server::conn`) only
//! hands connections back, as [`Returned`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use rustix::event::epoll;
use rustix::fd::OwnedFd;

use crate::http::body::BodyDecoder;
use crate::http::response::BodyPieces;
use crate::stats::Stats;
use crate::wire::Wire;

/// A connection a thread hands back to the acceptor after a response.
#[derive(Debug)]
pub(crate) struct Returned {
    pub conn: Wire,
    pub peer: SocketAddr,
    /// The part of the response the thread could not send without waiting
    /// on the client; the acceptor sends it.
    pub unsent: Vec<u8>,
    /// The rest of a streamed body: the acceptor makes and sends its
    /// pieces as the client takes them.
    pub more: Option<BodyPieces>,
    /// Whether the connection closes once the response is out.
    pub close: bool,
    /// Bytes received past the last request: the start of the next one.
    pub leftover: Vec<u8>,
    /// When the thread let go: `unsent` must be out `write_timeout` later.
    pub at: Instant,
}

/// One waiting connection.
pub(crate) struct Pending<W> {
    pub conn: Wire,
    pub peer: SocketAddr,
    pub deadline: Instant,
    /// When the first byte of the current request arrived (or the
    /// connection was accepted); the request's deadline counts from it.
    pub started: Instant,
    pub phase: Phase<W>,
}

impl<W> Pending<W> {
    /// A connection taken in now with nothing read yet from it: due at
    /// once (to be answered and closed, or given a deadline of its own).
    pub(crate) fn fresh(conn: Wire, peer: SocketAddr) -> Self {
        let now = Instant::now();
        Pending {
            conn,
            peer,
            deadline: now,
            started: now,
            phase: Phase::Idle,
        }
    }
}

/// What a waiting connection waits for. `W` is what the acceptor keeps
/// about a request whose body is arriving.
pub(crate) enum Phase<W> {
    /// (The rest of) a request head; the bytes so far.
    Head(Vec<u8>),
    /// The next request on a keep-alive connection.
    Idle,
    /// The rest of an ordinary request's body.
    Body(Box<Waiting<W>>),
    /// The client to take the rest of a response.
    Write(Box<Outgoing>),
    /// The client to close, after an answer and a half-close; the bytes
    /// drained meanwhile.
    Linger(usize),
}

impl<W> Phase<W> {
    /// The readiness to watch for: reading, except while a response goes
    /// out. Not reading then is what keeps a client that pipelines
    /// requests without reading the answers from queueing more work.
    fn interest(&self) -> epoll::EventFlags {
        match self {
            Phase::Write(_) => epoll::EventFlags::OUT,
            _ => epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
        }
    }

    /// Bytes of memory a waiting body holds.
    fn body_bytes(&self) -> usize {
        match self {
            Phase::Body(w) => w.decoder.held(),
            _ => 0,
        }
    }
}

/// A request whose body is arriving.
pub(crate) struct Waiting<W> {
    pub decoder: BodyDecoder,
    pub job: W,
}

/// The rest of a response, and what follows it.
pub(crate) struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    /// The rest of a streamed body, made a piece at a time once `bytes`
    /// are out.
    more: Option<BodyPieces>,
    /// Whether the connection closes once `bytes` are out.
    pub close: bool,
    /// Bytes of the next request received before the response was done;
    /// read only once it is.
    pub leftover: Vec<u8>,
}

/// How far [`Outgoing::flush`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Everything is out.
    Done,
    /// The socket's send buffer is full: wait until it is writable.
    Blocked,
    /// As `Blocked`, after sending some: a streamed body's deadline counts
    /// from here.
    Progress,
    /// The client is gone.
    Gone,
}

impl Outgoing {
    pub(crate) fn new(
        bytes: Vec<u8>,
        more: Option<BodyPieces>,
        close: bool,
        leftover: Vec<u8>,
    ) -> Self {
        Outgoing {
            bytes,
            sent: 0,
            more,
            close,
            leftover,
        }
    }

    /// Sends as much as the socket takes without waiting (over TLS, the
    /// records too), making a streamed body's pieces as they go.
    pub(crate) fn flush(&mut self, conn: &Wire) -> Flush {
        // Only a streamed body's deadline moves: a response held whole
        // must be out within the write timeout of its hand-back.
        let mut progress = false;
        let blocked = |progress: bool, more: &Option<BodyPieces>| {
            if progress && more.is_some() {
                Flush::Progress
            } else {
                Flush::Blocked
            }
        };
        loop {
            while self.sent < self.bytes.len() {
                match conn.send_now(&self.bytes[self.sent..]) {
                    Ok(0) => return blocked(progress, &self.more),
                    Ok(n) => {
                        self.sent += n;
                        progress = true;
                    }
                    Err(_) => return Flush::Gone,
                }
            }
            match conn.flush_now() {
                Ok(true) => {}
                Ok(false) => return blocked(progress, &self.more),
                Err(_) => return Flush::Gone,
            }
            let Some(pieces) = &mut self.more else {
                return Flush::Done;
            };
            self.bytes.clear();
            self.sent = 0;
            if !pieces.next_into(&mut self.bytes) {
                self.more = None;
                self.bytes = Vec::new();
                return Flush::Done;
            }
        }
    }
}

/// The waiting connections, registered with the poller under their slot
/// index.
pub(crate) struct Table<W> {
    epoll: OwnedFd,
    slots: Vec<Option<Pending<W>>>,
    free: Vec<usize>,
    live: usize,
    /// The sum of the waiting bodies' [`BodyDecoder::held`].
    body_bytes: usize,
    /// Publishes `live` as [`StatsSnapshot::pending`](crate::StatsSnapshot::pending).
    stats: Stats,
}

impl<W> Table<W> {
    pub(crate) fn new(epoll: OwnedFd, stats: Stats) -> Self {
        Table {
            epoll,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            body_bytes: 0,
            stats,
        }
    }

    /// The poller the connections (and the acceptor's own sources) are
    /// registered with.
    pub(crate) fn poller(&self) -> &OwnedFd {
        &self.epoll
    }

    /// Connections waiting now.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Bytes the waiting bodies hold.
    pub(crate) fn body_bytes(&self) -> usize {
        self.body_bytes
    }

    /// Registers `p`; its slot, or `None` when the poller refuses it (then
    /// `p` is dropped, which closes it).
    pub(crate) fn insert(&mut self, p: Pending<W>) -> Option<usize> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        if let Err(e) = epoll::add(
            &self.epoll,
            p.conn.tcp(),
            epoll::EventData::new_u64(idx as u64),
            p.phase.interest(),
        ) {
            log::warn!("cannot watch a connection from {}: {e}", p.peer);
            self.free.push(idx);
            return None;
        }
        self.body_bytes += p.phase.body_bytes();
        self.slots[idx] = Some(p);
        self.live += 1;
        self.publish();
        Some(idx)
    }

    /// Takes `idx` out of the table and the poller.
    pub(crate) fn remove(&mut self, idx: usize) -> Option<Pending<W>> {
        let p = self.slots.get_mut(idx)?.take()?;
        let _ = epoll::delete(&self.epoll, p.conn.tcp()); // closing removes it anyway
        self.free.push(idx);
        self.live -= 1;
        self.body_bytes -= p.phase.body_bytes();
        self.publish();
        Some(p)
    }

    /// Has the poller report `idx` writable, and not readable, while
    /// `out` (TLS records of a handshake wait for room in the socket: a
    /// client that sends without reading must not keep the acceptor
    /// spinning on its readable socket); else as its phase says.
    pub(crate) fn watch_writable(&self, idx: usize, out: bool) {
        let Some(p) = self.get(idx) else { return };
        let flags = if out {
            epoll::EventFlags::OUT | epoll::EventFlags::RDHUP
        } else {
            p.phase.interest()
        };
        let data = epoll::EventData::new_u64(idx as u64);
        if let Err(e) = epoll::modify(&self.epoll, p.conn.tcp(), data, flags) {
            log::debug!("cannot rewatch a connection from {}: {e}", p.peer);
        }
    }

    pub(crate) fn get(&self, idx: usize) -> Option<&Pending<W>> {
        self.slots.get(idx)?.as_ref()
    }

    /// The connection in `idx`, to read or advance. A change of the body
    /// it holds must be reported with [`body_resized`](Self::body_resized).
    pub(crate) fn get_mut(&mut self, idx: usize) -> Option<&mut Pending<W>> {
        self.slots.get_mut(idx)?.as_mut()
    }

    /// Records that a waiting body went from holding `before` bytes to
    /// holding `after`.
    pub(crate) fn body_resized(&mut self, before: usize, after: usize) {
        self.body_bytes = self.body_bytes - before + after;
    }

    /// The connection nearest its deadline among those `which` selects.
    pub(crate) fn nearest(&self, which: impl Fn(&Pending<W>) -> bool) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().filter(|p| which(p)).map(|p| (i, p.deadline)))
            .min_by_key(|&(_, d)| d)
            .map(|(i, _)| i)
    }

    /// The slots whose deadline has passed at `now`.
    pub(crate) fn expired(&self, now: Instant) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().filter(|p| now >= p.deadline).map(|_| i))
            .collect()
    }

    /// Every occupied slot.
    pub(crate) fn occupied(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .collect()
    }

    fn publish(&self) {
        self.stats
            .counters()
            .pending
            .store(self.live as u64, Relaxed);
    }
}
