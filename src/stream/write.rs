//! Putting frames on the wire: HTTP/1.1 chunk framing, and writes that
//! finish within a deadline without copying large frames.
//!
//! What one stream can pin in its own memory must not depend on what the
//! hub holds: a replay of a thousand 64 KB events written to a client that
//! does not read would otherwise sit in a copy for the whole write timeout.
//! So frames are written where they lie (they are shared, reference-counted
//! buffers) with vectored writes; only small frames and the chunk framing
//! are copied, into a staging buffer of at most [`STAGE_MAX`] bytes. A
//! write of any number of frames of any size allocates at most about 43
//! KiB of its own: the staging buffer and the lists of at most
//! [`MAX_SLICES`] slices (checked by a test below).

use std::cell::Cell;
use std::io::{self, IoSlice, Write};
use std::time::{Duration, Instant};

use crate::error::EndReason;
use crate::http::chunked::{CHUNK_FRAMING, frame_into};
use crate::wire::Wire;

/// Most bytes of small frames and chunk framing copied together before a
/// vectored write: room for a batch of queued frames of ordinary size in
/// one write (with 16 KiB, a batch of 256 frames of 100 bytes took two,
/// and under a flat-out publisher 100 subscribers fell behind and were
/// dropped as slow in 3 runs of 5 of `cargo bench --bench fanout --
/// --workloads b`).
pub(crate) const STAGE_MAX: usize = 32 * 1024;
/// Frames at least this long are written from where they lie instead of
/// being copied: below it a copy is cheaper than a slice of its own.
const BY_REFERENCE: usize = 512;
/// Most slices in one vectored write (Linux allows 1,024).
const MAX_SLICES: usize = 256;

/// Writes all of `bytes` to `conn` within `timeout`.
///
/// `SO_SNDTIMEO` bounds each `write()` call, not the whole operation, so it
/// is re-armed with the time left before every call after a partial write;
/// `armed` remembers the value in force to skip the syscall when unchanged.
/// Why a stream's connection failed, from the error a write (or the
/// socket's pending error) gave: a peer that vanished, which the kernel
/// gave up on (`TCP_USER_TIMEOUT`, or an unreachable route learned while
/// retransmitting, which the kernel reports in place of the timeout), is a
/// [`EndReason::WriteTimeout`]; a peer that closed or reset, a
/// [`EndReason::Client`].
pub(crate) fn failure_reason(e: &io::Error) -> EndReason {
    use io::ErrorKind as K;
    match e.kind() {
        K::TimedOut | K::HostUnreachable | K::NetworkUnreachable | K::NetworkDown => {
            EndReason::WriteTimeout
        }
        _ if e.raw_os_error() == Some(rustix::io::Errno::HOSTDOWN.raw_os_error()) => {
            EndReason::WriteTimeout
        }
        _ => EndReason::Client,
    }
}

pub(crate) fn write_all_timeout(
    conn: &Wire,
    bytes: &[u8],
    timeout: Duration,
    armed: &mut Option<Duration>,
) -> Result<(), EndReason> {
    let mut slices = [IoSlice::new(bytes)];
    Deadline::new(timeout).write_all(conn, &mut slices, armed)
}

/// One section of a vectored write: staged bytes, or a frame as it lies.
#[derive(Clone, Copy)]
enum Part<'a> {
    Staged(usize, usize),
    Frame(&'a [u8]),
}

/// Writes `head` (may be empty) then each of `frames`, framed as chunks
/// when `chunked`, to `conn` within `timeout` for the whole; returns the
/// bytes written. Large frames are not copied (see the module docs).
pub(crate) fn write_frames_timeout(
    conn: &Wire,
    head: &[u8],
    frames: &[&[u8]],
    chunked: bool,
    timeout: Duration,
    armed: &mut Option<Duration>,
) -> Result<u64, EndReason> {
    let deadline = Deadline::new(timeout);
    let mut total = 0u64;
    write_framed(head, frames, chunked, |slices| {
        total += slices.iter().map(|s| s.len() as u64).sum::<u64>();
        deadline.write_all(conn, slices, armed)
    })?;
    Ok(total)
}

/// [`write_frames_timeout`] for any writer (no deadline): each section in
/// order, then a flush.
pub(crate) fn write_frames_to(
    w: &mut dyn Write,
    head: &[u8],
    frames: &[&[u8]],
    chunked: bool,
) -> io::Result<u64> {
    let mut total = 0u64;
    write_framed(head, frames, chunked, |slices| {
        for s in slices.iter() {
            w.write_all(s)?;
            total += s.len() as u64;
        }
        Ok::<(), io::Error>(())
    })?;
    w.flush()?;
    Ok(total)
}

/// Frames `head` and `frames` into groups of slices (small frames and the
/// framing copied into a bounded staging buffer, large frames as they lie)
/// and hands each group to `write`, in order.
fn write_framed<E>(
    head: &[u8],
    frames: &[&[u8]],
    chunked: bool,
    mut write: impl FnMut(&mut [IoSlice<'_>]) -> Result<(), E>,
) -> Result<(), E> {
    let framing = if chunked { CHUNK_FRAMING } else { 0 };
    let payload: usize = frames.iter().map(|f| f.len() + framing).sum();
    let mut stage = Vec::with_capacity((head.len() + payload).min(STAGE_MAX + BY_REFERENCE));
    // Allocated only when a large frame comes.
    let mut parts: Vec<Part<'_>> = Vec::new();
    let mut staged_from = 0;
    stage.extend_from_slice(head);
    for frame in frames {
        if frame.len() < BY_REFERENCE {
            frame_into(&mut stage, frame, chunked);
        } else {
            if chunked {
                crate::digits::push_hex(&mut stage, frame.len());
                stage.extend_from_slice(b"\r\n");
            }
            parts.push(Part::Staged(staged_from, stage.len()));
            parts.push(Part::Frame(frame));
            staged_from = stage.len();
            if chunked {
                stage.extend_from_slice(b"\r\n"); // goes out with what follows
            }
        }
        if stage.len() >= STAGE_MAX || parts.len() + 3 > MAX_SLICES {
            parts.push(Part::Staged(staged_from, stage.len()));
            flush(&stage, &parts, &mut write)?;
            stage.clear();
            parts.clear();
            staged_from = 0;
        }
    }
    if parts.is_empty() {
        // The usual case: small frames only, one contiguous write.
        return if stage.is_empty() {
            Ok(())
        } else {
            write(&mut [IoSlice::new(&stage)])
        };
    }
    parts.push(Part::Staged(staged_from, stage.len()));
    flush(&stage, &parts, &mut write)
}

fn flush<E>(
    stage: &[u8],
    parts: &[Part<'_>],
    write: &mut impl FnMut(&mut [IoSlice<'_>]) -> Result<(), E>,
) -> Result<(), E> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .map(|p| match *p {
            Part::Staged(a, b) => &stage[a..b],
            Part::Frame(f) => f,
        })
        .filter(|s| !s.is_empty())
        .map(IoSlice::new)
        .collect();
    if slices.is_empty() {
        return Ok(());
    }
    write(&mut slices)
}

/// The end of a write that may take several calls.
struct Deadline {
    timeout: Duration,
    at: Instant,
    /// Whether a call was made: the first gets the whole timeout (the
    /// value `SO_SNDTIMEO` most likely holds already), later ones what is
    /// left of it.
    started: Cell<bool>,
}

impl Deadline {
    fn new(timeout: Duration) -> Self {
        Deadline {
            timeout,
            at: Instant::now() + timeout,
            started: Cell::new(false),
        }
    }

    fn left(&self) -> Duration {
        if self.started.replace(true) {
            self.at.saturating_duration_since(Instant::now())
        } else {
            self.timeout
        }
    }

    /// Writes every byte of `slices` before the deadline (over TLS, after
    /// the records a waker left unsent, and with every record out).
    fn write_all(
        &self,
        conn: &Wire,
        slices: &mut [IoSlice<'_>],
        armed: &mut Option<Duration>,
    ) -> Result<(), EndReason> {
        #[cfg(feature = "tls")]
        if let Some(session) = conn.session() {
            return self.write_all_tls(conn.tcp(), session, slices, armed);
        }
        self.write_all_plain(conn.tcp(), slices, armed)
    }

    /// Re-arms `SO_SNDTIMEO` with the time left; `WriteTimeout` when none
    /// is.
    fn arm(
        &self,
        conn: &std::net::TcpStream,
        armed: &mut Option<Duration>,
    ) -> Result<(), EndReason> {
        let left = self.left();
        if left.is_zero() {
            return Err(EndReason::WriteTimeout);
        }
        if *armed != Some(left) {
            conn.set_write_timeout(Some(left))
                .map_err(|_| EndReason::Client)?;
            *armed = Some(left);
        }
        Ok(())
    }

    #[cfg(feature = "tls")]
    fn write_all_tls(
        &self,
        conn: &std::net::TcpStream,
        session: &crate::wire::tls::Session,
        mut slices: &mut [IoSlice<'_>],
        armed: &mut Option<Duration>,
    ) -> Result<(), EndReason> {
        use crate::wire::tls::Records;
        let mut c = session.lock();
        let left = |s: &[IoSlice<'_>]| s.iter().map(|s| s.len()).sum::<usize>();
        loop {
            // Into the session as much as it takes (it bounds what it
            // holds), then out to the socket.
            while left(slices) > 0 {
                match c.take(slices) {
                    Ok(0) if c.wants_write() => break,
                    // Full, with nothing to send: cannot happen; never spin.
                    Ok(0) => return Err(EndReason::Client),
                    Ok(n) => IoSlice::advance_slices(&mut slices, n),
                    Err(_) => return Err(EndReason::Client),
                }
            }
            while c.wants_write() {
                self.arm(conn, armed)?;
                let mut socket = crate::wire::tls::SocketWriter {
                    tcp: conn,
                    flags: rustix::net::SendFlags::empty(),
                };
                match c.write_to(&mut socket) {
                    Ok(0) => return Err(EndReason::Client),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Err(EndReason::WriteTimeout);
                    }
                    Err(e) => return Err(failure_reason(&e)),
                }
            }
            if left(slices) == 0 {
                return Ok(());
            }
        }
    }

    fn write_all_plain(
        &self,
        conn: &std::net::TcpStream,
        mut slices: &mut [IoSlice<'_>],
        armed: &mut Option<Duration>,
    ) -> Result<(), EndReason> {
        while !slices.is_empty() {
            self.arm(conn, armed)?;
            match (&*conn).write_vectored(slices) {
                Ok(0) => return Err(EndReason::Client),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(EndReason::WriteTimeout);
                }
                Err(e) => return Err(failure_reason(&e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `write_framed` hands out, joined, and the largest group.
    fn framed(head: &[u8], frames: &[&[u8]], chunked: bool) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut groups = Vec::new();
        write_framed::<()>(head, frames, chunked, |slices| {
            groups.push(slices.len());
            for s in slices.iter() {
                out.extend_from_slice(s);
            }
            Ok(())
        })
        .expect("no error");
        (out, groups)
    }

    fn expected(head: &[u8], frames: &[&[u8]], chunked: bool) -> Vec<u8> {
        let mut out = head.to_vec();
        for f in frames {
            frame_into(&mut out, f, chunked);
        }
        out
    }

    #[test]
    fn frames_go_out_in_order_whatever_their_sizes() {
        let big = vec![b'x'; 70_000];
        let mid = vec![b'm'; BY_REFERENCE];
        let small = b"data: a\n\n".to_vec();
        let cases: Vec<Vec<&[u8]>> = vec![
            vec![],
            vec![&small],
            vec![&big],
            vec![&small, &big, &small, &mid, &big],
            std::iter::repeat_n(&small[..], 5_000).collect(),
            std::iter::repeat_n(&big[..], 300).collect(),
            std::iter::repeat_n(&mid[..], 600).collect(),
        ];
        for frames in &cases {
            for chunked in [true, false] {
                for head in [&b""[..], b"HTTP/1.1 200 OK\r\n\r\n"] {
                    let (out, groups) = framed(head, frames, chunked);
                    assert_eq!(
                        out,
                        expected(head, frames, chunked),
                        "{} frames",
                        frames.len()
                    );
                    assert!(groups.iter().all(|&g| g <= MAX_SLICES), "{groups:?}");
                }
            }
        }
    }

    /// The most memory one write of frames allocates, whatever the frames:
    /// the staging buffer (a small frame and a chunk header may pass
    /// [`STAGE_MAX`] by one frame) and the slice lists.
    const WRITE_MEMORY_BOUND: usize = STAGE_MAX
        + BY_REFERENCE
        + CHUNK_FRAMING
        + MAX_SLICES
            * (std::mem::size_of::<Part<'static>>() + std::mem::size_of::<IoSlice<'static>>());

    #[test]
    fn a_write_of_large_frames_allocates_a_bounded_amount() {
        // 300 frames of 64 KB: no group holds more than the bound of its
        // own (everything else is a slice of the frames).
        let big = vec![b'x'; 64_000];
        let frames: Vec<&[u8]> = std::iter::repeat_n(&big[..], 300).collect();
        let mut largest_own = 0;
        write_framed::<()>(b"", &frames, true, |slices| {
            let own: usize = slices
                .iter()
                .filter(|s| s.len() != big.len())
                .map(|s| s.len())
                .sum();
            largest_own = largest_own.max(own);
            Ok(())
        })
        .expect("no error");
        assert!(largest_own <= STAGE_MAX + BY_REFERENCE + CHUNK_FRAMING);
        const { assert!(WRITE_MEMORY_BOUND <= 43 * 1024) };
    }
}
