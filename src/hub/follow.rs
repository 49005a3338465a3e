//! A [`Stream`] following a [`Subscription`] (the replay, then live frames,
//! most of them sent by the waker threads while the stream's thread sleeps)
//! or consuming a mailbox.

use std::sync::Arc;

use crate::error::{EndReason, Report, StreamError};
use crate::event::{EncodedEvent, Event};
use crate::hub::config::{BATCH, OPENING_MAX, PAGE_BYTES, REPLAY_RETRY};
use crate::hub::engine::Taken;
use crate::hub::fanout::{SubscriberQueue, Writer};
use crate::hub::history::StorageError;
use crate::hub::node::Node;
use crate::hub::{Hub, Subscription};
use crate::stream::Stream;

impl Stream {
    /// Streams a hub subscription: the replay backlog, then every live
    /// frame, all queued frames of a wake-up in one write. Runs until the
    /// stream ends.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the client leaves, the budget runs out,
    /// the server shuts down, or the hub drops the subscriber as
    /// [`EndReason::Slow`].
    // Out of line, as `Hub::subscribe` is: a stream thread keeps every
    // stack page it ever touched for the stream's life, and inlined into
    // the handler their locals would stack up in one deep frame.
    #[inline(never)]
    pub fn follow(&mut self, mut sub: Subscription) -> Result<(), StreamError> {
        let backlog = match sub.next_backlog(BATCH) {
            Ok(page) => page,
            Err(e) => return self.replay_failed(&e),
        };
        let queue = Arc::clone(&sub.queue);
        // An idle stream's thread sends nothing itself: its head, retry
        // and (short) replay, like its heartbeats and most events, are sent
        // by a waker thread (see `Stream::take_opening` for why).
        let opening = if sub.backlog_read() {
            self.take_opening(&backlog, OPENING_MAX)
        } else {
            None
        };
        if let Some((opening, frames)) = opening {
            drop(backlog);
            match self.direct_parts() {
                Some((conn, chunked, stats)) => {
                    queue.enable_direct(conn, chunked, stats, opening, frames);
                }
                // Not expected (the opening is only taken on a socket of
                // ours), but its bytes must not be lost.
                None => self.finish_partial(&opening)?,
            }
        } else {
            if !self.send_replay(&mut sub, backlog)? {
                return Ok(());
            }
            // Open now (a no-op if a frame or the handler already did), so
            // wakers can write frames while this thread sleeps.
            self.open()?;
            if let Some((conn, chunked, stats)) = self.direct_parts() {
                queue.enable_direct(conn, chunked, stats, Vec::new(), 0);
            }
        }
        let result = self.follow_queue(&sub.shared.node, &queue);
        // From here on only this thread writes (the final frame, the close).
        let carry = queue.disable_direct();
        if !carry.is_empty() || self.has_unsent() {
            // A waker began a frame after the last look, or was never given
            // the chance to send what was staged: finish it, or cut the
            // connection without another byte.
            let _ = self.finish_partial(&carry);
        }
        result
    }

    /// Writes the replay on this thread, `first` then a page at a time:
    /// frames are shared and written without a copy, so a client that
    /// stops reading pins one page of references, whatever the history.
    #[inline(never)]
    fn send_replay(
        &mut self,
        sub: &mut Subscription,
        first: Vec<EncodedEvent>,
    ) -> Result<bool, StreamError> {
        let mut page = first;
        while !page.is_empty() {
            self.send_encoded(&page)?;
            page = match sub.next_backlog(BATCH) {
                Ok(page) => page,
                Err(e) => {
                    self.replay_failed(&e)?;
                    return Ok(false);
                }
            };
        }
        Ok(true)
    }

    /// Ends a stream whose replay could not be read (Redis down): its
    /// client is told to come back soon, with the id it got to.
    #[cold]
    #[inline(never)]
    fn replay_failed(&mut self, e: &StorageError) -> Result<(), StreamError> {
        log::warn!("replay cut short: {}", Report(e));
        self.retry(REPLAY_RETRY)?;
        self.comment("storage unavailable; reconnect later")
    }

    fn follow_queue(
        &mut self,
        node: &Node,
        queue: &Arc<SubscriberQueue>,
    ) -> Result<(), StreamError> {
        let mut batch = Vec::new();
        loop {
            // Held while draining and writing, so a waker never writes in
            // between: frames leave in queue order.
            let mut writer = queue.writer();
            match self.follow_step(queue, writer.as_deref_mut(), &mut batch) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    // Still holding the writer: no waker may add frames
                    // after a write that failed halfway.
                    if let Some(w) = writer.as_mut() {
                        w.stop();
                    }
                    return Err(e);
                }
            }
            let staged = writer.as_deref().is_some_and(Writer::has_staged);
            drop(writer);
            // Staged bytes (the opening, a heartbeat) are handed over just
            // before parking, with the writer free for the waker.
            if staged && !node.wakers.hand_off(Arc::clone(queue)) {
                self.send_staged(queue)?;
            }
            if queue.prepare_park() {
                self.park();
                queue.unparked();
            }
        }
    }

    /// Sends what was staged for a waker on this thread (no waker runs).
    #[cold]
    #[inline(never)]
    fn send_staged(&mut self, queue: &SubscriberQueue) -> Result<(), StreamError> {
        // Held across the write, as in `follow_queue`: no waker may write
        // in between, nor after a write that failed halfway.
        let Some(mut w) = queue.writer() else {
            return Ok(());
        };
        let result = self.write_staged(queue, &mut w);
        if result.is_err() {
            w.stop();
        }
        result
    }

    /// Writes, on this thread, what was staged for a waker and not yet
    /// sent (the caller holds the writer).
    fn write_staged(&mut self, queue: &SubscriberQueue, w: &mut Writer) -> Result<(), StreamError> {
        let Some(stats) = queue.direct_stats() else {
            return Ok(());
        };
        let bytes = w.take_staged(stats);
        if bytes.is_empty() {
            return Ok(());
        }
        self.finish_partial(&bytes)
    }

    /// One look at the queue, holding the writer: true when frames went
    /// out (look again), false when there is nothing more to do (park).
    fn follow_step(
        &mut self,
        queue: &SubscriberQueue,
        mut writer: Option<&mut Writer>,
        batch: &mut Vec<EncodedEvent>,
    ) -> Result<bool, StreamError> {
        if let Some(w) = writer.as_deref_mut()
            && (!w.carry.is_empty() || self.has_unsent())
        {
            // The rest of a frame a waker began: it goes out first, even
            // when the stream is ending, or the frame would be cut.
            let carry = std::mem::take(&mut w.carry);
            self.finish_partial(&carry)?;
        }
        if let Some(at) = queue.take_sent_at() {
            self.note_sent(at);
        }
        self.check_alive()?;
        // Bounded by bytes too: a write to a client that does not read
        // holds these frames until it gives up.
        queue.drain_into(batch, BATCH, PAGE_BYTES);
        if !batch.is_empty() {
            if let Some(w) = writer.as_deref_mut() {
                // Bytes staged for a waker that has not sent them yet go
                // before the frames.
                self.write_staged(queue, w)?;
            }
            self.send_encoded(batch)?;
            batch.clear();
            if batch.capacity() > 64 {
                *batch = Vec::new(); // do not hold a burst's buffer while idle
            }
            return Ok(true);
        }
        if queue.is_closed() {
            let reason = if queue.is_slow() {
                EndReason::Slow
            } else {
                EndReason::Shutdown
            };
            return Err(self.end_with(reason));
        }
        // A heartbeat that is due goes out under the same hold: staged for
        // a waker when one may write, so this thread never sends while idle.
        if let Some(w) = writer
            && w.can_hand_off()
        {
            w.stage_with(|out| self.stage_heartbeat(out))?;
            return Ok(false);
        }
        self.on_timer()?;
        Ok(false)
    }

    /// Consumes the mailbox `key`: each message is sent once as `data:`
    /// and removed; the message `[DONE]` is sent, then the stream ends.
    /// A message whose write fails goes back to the front of the mailbox
    /// for the next consumer.
    ///
    /// # Errors
    ///
    /// [`StreamError::Ended`] when the stream ends first.
    pub fn consume(&mut self, hub: &Hub, key: &str) -> Result<(), StreamError> {
        let (node, engine) = (&*hub.0.node, &*hub.0.engine);
        let wake = node.mailboxes.wait_handle(key);
        let poll = engine.mailbox_poll();
        let result = (|| loop {
            // A consumer whose client already left must not take a message:
            // a write to a socket the peer closed usually still succeeds.
            // Looked at before each message, so a client that closes
            // mid-mailbox loses only what was already on its way to it
            // (docs/operations.md has the bound).
            while let Some(Taken { text, receipt }) = {
                self.check_connection()?;
                engine.take(node, key)
            } {
                let done = text == crate::stream::DONE;
                let sent = if done {
                    self.done()
                } else {
                    self.send_event(&Event::new().data(text.as_str()))
                };
                match sent {
                    Ok(()) => {
                        // Out of a local store only once written: a crash
                        // before this delivers it again rather than lose
                        // it. (Redis popped it when it was taken: at most
                        // once across a crash.)
                        engine.delivered(node, key, receipt);
                        if done {
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        engine.put_back(node, key, Taken { text, receipt });
                        return Err(e);
                    }
                }
            }
            match poll {
                None => {
                    if self.recv(&wake)?.is_none() {
                        return Ok(());
                    }
                }
                // Woken when a push is announced; announcements missed
                // while the engine's reader reconnects are caught by
                // looking now and then.
                Some(every) => {
                    self.recv_within(&wake, every)?;
                }
            }
        })();
        node.mailboxes.leave(key);
        result
    }
}
