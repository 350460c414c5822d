//! The write side of the control stream, shared by the connection actor and
//! the callers of `send`.
//!
//! A send whose caller finds the stream free, with none of the sends handed
//! to the actor still unwritten, is written by the caller itself: one task
//! hop fewer per message, and under load the writing is spread over the
//! callers instead of queued behind the actor's reading. The caller first
//! registers the send for the actor (in a list the actor takes before it
//! reads what the relay answered, so it knows the send before it can meet
//! its answer; registering wakes no one) and says on which connection it
//! wrote it; the actor keeps it until answered and writes it again on the
//! next connection if this one is lost, as it does any send.
//! Acknowledgements go the same way: written by the caller when the stream
//! is free, and registered for the actor, which marks them in the inbox. A
//! program that answers a message and then acknowledges it so writes both
//! before QUIC sends either: one packet, not two.
//! Everything else — resends, sends and acknowledgements that find the
//! stream busy — the actor writes, under the same lock.

use crate::dial::LinkError;
use crate::inbox::Identity;
use crate::session::{BatchItem, Cmd, Reqs, SendResult, Written};
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use swb_wire::{Frame, MessageId};
use tokio::sync::{mpsc, oneshot, Mutex, OwnedMutexGuard};
use tokio_util::task::TaskTracker;

/// The control stream of the connection being served.
struct Writer {
    /// Which connection (the actor numbers them).
    link: u64,
    send: quinn::SendStream,
    /// Where callers encode their sends: each frame is split off and handed
    /// to QUIC as a slice of this buffer, so a send costs no allocation of
    /// its own (one per [`ARENA`] bytes of frames). QUIC holds a frame until
    /// the relay acknowledges it, so a chunk lives while any frame in it is
    /// unacknowledged, and the last one for as long as the connection. A
    /// chunk grown past [`ARENA`] for a large batch is not written into
    /// again.
    arena: BytesMut,
}

/// The size of the chunks [`Writer::arena`] takes (a larger frame takes
/// what it needs).
const ARENA: usize = 16 * 1024;

/// Room left in the arena below which the next frame starts a new chunk.
const ARENA_MIN_ROOM: usize = 512;

/// Sends (or batches) callers wrote and the actor has not taken yet, at
/// most: past it a caller's send queues for the actor, whose channel makes
/// callers wait. The actor takes them all whenever the relay's answers
/// arrive, so the list is only this long while the relay answers nothing.
const REGISTERED_MAX: usize = 1024;

impl Writer {
    /// The arena, with a chunk to encode into.
    fn arena(&mut self) -> &mut BytesMut {
        if self.arena.capacity() < ARENA_MIN_ROOM {
            self.arena = BytesMut::with_capacity(ARENA);
        }
        &mut self.arena
    }
}

/// The daemon is stopping: nothing takes commands any more.
#[derive(Debug)]
pub(crate) struct Stopped;

/// See the module documentation.
#[derive(Default)]
pub(crate) struct Outbound {
    writer: Arc<Mutex<Option<Writer>>>,
    /// Request numbers, shared with the session core.
    reqs: Arc<Reqs>,
    /// Sends handed to the actor and not written yet. While any are, a
    /// caller's send queues behind them: one caller's sends stay in order.
    queued: AtomicUsize,
    /// Sends their callers wrote, for the actor to file (see the module
    /// documentation), in the order written.
    registered: std::sync::Mutex<Vec<Cmd>>,
}

impl Outbound {
    /// The request-number counter, for the session core.
    pub(crate) fn reqs(&self) -> Arc<Reqs> {
        self.reqs.clone()
    }

    /// Hands a send to the connection: written here if the stream is free
    /// (see the module documentation), else queued for the actor.
    pub(crate) async fn send(
        &self,
        cmd_tx: &mpsc::Sender<Cmd>,
        tasks: &TaskTracker,
        to: Arc<str>,
        id: MessageId,
        body: Bytes,
        reply: oneshot::Sender<SendResult>,
    ) -> Result<(), Stopped> {
        let cmd = Cmd::Send {
            to,
            id,
            body,
            reply,
            written: None,
        };
        self.hand(cmd_tx, tasks, cmd).await
    }

    /// Hands sends answered together to the connection, as [`Self::send`]
    /// does one: in one command and, written here, in one write.
    pub(crate) async fn send_batch(
        &self,
        cmd_tx: &mpsc::Sender<Cmd>,
        tasks: &TaskTracker,
        items: Vec<BatchItem>,
        reply: oneshot::Sender<Vec<SendResult>>,
    ) -> Result<(), Stopped> {
        let cmd = Cmd::SendBatch {
            items,
            reply,
            written: None,
        };
        self.hand(cmd_tx, tasks, cmd).await
    }

    /// Hands acknowledgements to the connection: written here if the
    /// stream is free (see the module documentation), else queued for the
    /// actor. Either way the actor marks them in the inbox.
    pub(crate) async fn ack(
        &self,
        cmd_tx: &mpsc::Sender<Cmd>,
        tasks: &TaskTracker,
        acked: Vec<Identity>,
    ) -> Result<(), Stopped> {
        let mut cmd = Cmd::AckWritten(acked);
        if let Some(guard) = self.free() {
            match self.write_own(guard, tasks, cmd) {
                Ok(()) => return Ok(()),
                Err(back) => cmd = back,
            }
        }
        let cmd = match cmd {
            Cmd::AckWritten(acked) => Cmd::Ack(acked),
            other => other,
        };
        cmd_tx.send(cmd).await.map_err(|_| Stopped)
    }

    async fn hand(
        &self,
        cmd_tx: &mpsc::Sender<Cmd>,
        tasks: &TaskTracker,
        mut cmd: Cmd,
    ) -> Result<(), Stopped> {
        if let Some(guard) = self.free() {
            match self.write_own(guard, tasks, cmd) {
                Ok(()) => return Ok(()),
                Err(back) => cmd = back,
            }
        }
        // Reserve first: counted as queued only once it surely is (a caller
        // that goes away while waiting for room leaves no count behind).
        let permit = cmd_tx.reserve().await.map_err(|_| Stopped)?;
        self.queued.fetch_add(1, Ordering::AcqRel);
        permit.send(cmd);
        Ok(())
    }

    /// The stream, if a connection is served, no other writer holds it and
    /// no queued send waits to be written before this one.
    fn free(&self) -> Option<OwnedMutexGuard<Option<Writer>>> {
        let guard = self.writer.clone().try_lock_owned().ok()?;
        (guard.is_some() && self.queued.load(Ordering::Acquire) == 0).then_some(guard)
    }

    /// Registers `cmd` (a send, a batch or acknowledgements) for the actor
    /// and writes its frames; gives it back (unregistered, unwritten) if
    /// [`REGISTERED_MAX`] are registered already.
    fn write_own(
        &self,
        mut guard: OwnedMutexGuard<Option<Writer>>,
        tasks: &TaskTracker,
        mut cmd: Cmd,
    ) -> Result<(), Cmd> {
        let Some(w) = guard.as_mut() else {
            return Err(cmd);
        };
        let buf = w.arena();
        let (encoded, written) = match &mut cmd {
            Cmd::Send {
                to,
                id,
                body,
                written,
                ..
            } => {
                let req = self.reqs.next();
                let encoded = swb_wire::encode_send(buf, req, *id, to, body);
                (encoded.map(|_| req), written)
            }
            Cmd::SendBatch { items, written, .. } => {
                let first = self.reqs.take(items.len());
                let encoded = (items.iter().zip(first..)).try_for_each(|(i, req)| {
                    swb_wire::encode_send(buf, req, i.id, &i.to, &i.body).map(|_| ())
                });
                (encoded.map(|()| first), written)
            }
            Cmd::AckWritten(acked) => {
                let encoded = acked.chunks(swb_wire::MAX_ACK_IDS).try_for_each(|c| {
                    Frame::Ack(swb_wire::Ack {
                        ids: c.iter().map(|a| a.id).collect(),
                    })
                    .encode(buf)
                });
                if encoded.is_err() {
                    buf.clear();
                    return Err(cmd);
                }
                let frames = buf.split().freeze();
                // As for a large batch below: a grown arena is not kept.
                if buf.capacity() > ARENA {
                    *buf = BytesMut::new();
                }
                return self.register_and_write(guard, tasks, frames, cmd);
            }
            _ => return Err(cmd),
        };
        let Ok(req) = encoded else {
            // Whatever part of the batch was encoded is not sent.
            buf.clear();
            // Cannot happen for sends `submit` checked (size, name). If it
            // did, the actor's path takes them as it took every send before
            // this path existed (its write fails and ends the connection).
            // The numbers taken here are simply never used.
            return Err(cmd);
        };
        // The frames, as one slice of the arena (its exact size): no copy.
        let frames = buf.split().freeze();
        // An arena grown for a large batch is not kept for the next sends:
        // its memory goes once QUIC is done with these frames.
        if buf.capacity() > ARENA {
            *buf = BytesMut::new();
        }
        *written = Some(Written { req, link: w.link });
        self.register_and_write(guard, tasks, frames, cmd)
    }

    /// Registers `cmd` for the actor and writes its `frames`; gives it back
    /// (unregistered, unwritten) if [`REGISTERED_MAX`] are registered
    /// already.
    fn register_and_write(
        &self,
        mut guard: OwnedMutexGuard<Option<Writer>>,
        tasks: &TaskTracker,
        frames: Bytes,
        mut cmd: Cmd,
    ) -> Result<(), Cmd> {
        let Some(w) = guard.as_mut() else {
            return Err(cmd);
        };
        // Registered before written: the actor learns of a send before
        // the relay's answer can reach it.
        {
            let mut registered = self.registered();
            if registered.len() >= REGISTERED_MAX {
                drop(registered);
                if let Cmd::Send { written, .. } | Cmd::SendBatch { written, .. } = &mut cmd {
                    *written = None;
                }
                return Err(cmd);
            }
            registered.push(cmd);
        }
        let mut rest = [frames];
        // Most writes complete at once; the rest is finished by a task (a
        // caller that goes away must not leave half a frame on the stream).
        match w.send.write_chunks(&mut rest).now_or_never() {
            Some(Ok(_)) if rest[0].is_empty() => return Ok(()),
            Some(Ok(_)) | None => {}
            // The connection is gone: the actor notices, and writes a
            // send again on the next one (acknowledgements go again when
            // the relay delivers their messages again).
            Some(Err(_)) => return Ok(()),
        }
        tasks.spawn(async move {
            if let Some(w) = guard.as_mut() {
                // An error means the connection is gone (as above).
                let _ = w.send.write_all_chunks(&mut rest).await;
            }
        });
        Ok(())
    }

    /// The actor starts serving connection `link`: its stream becomes the
    /// one written to, beginning with `first`.
    pub(crate) async fn install(
        &self,
        link: u64,
        send: quinn::SendStream,
        first: &[Frame],
    ) -> Result<(), LinkError> {
        let mut w = self.writer.lock().await;
        let w = w.insert(Writer {
            link,
            send,
            arena: BytesMut::new(),
        });
        write_frames(&mut w.send, first).await
    }

    /// Writes the actor's frames to the connection being served.
    pub(crate) async fn write(&self, frames: &[Frame]) -> Result<(), LinkError> {
        match self.writer.lock().await.as_mut() {
            Some(w) => write_frames(&mut w.send, frames).await,
            None => Err(LinkError::Lost("no connection to write to".into())),
        }
    }

    /// The connection is no longer served: sends queue for the actor.
    pub(crate) async fn remove(&self) {
        self.writer.lock().await.take();
    }

    fn registered(&self) -> std::sync::MutexGuard<'_, Vec<Cmd>> {
        self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the sends callers registered since the last call into `into`
    /// (empty; its room is kept for the next registrations).
    pub(crate) fn take_registered(&self, into: &mut Vec<Cmd>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut *self.registered(), into);
    }

    /// Sends callers registered that the actor has not taken yet.
    pub(crate) fn registered_len(&self) -> usize {
        self.registered().len()
    }

    /// `n` sends the actor took from the queue were written (or dropped).
    pub(crate) fn written(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

async fn write_frames(send: &mut quinn::SendStream, frames: &[Frame]) -> Result<(), LinkError> {
    if frames.is_empty() {
        return Ok(());
    }
    let mut b = BytesMut::new();
    for f in frames {
        f.encode(&mut b)?;
    }
    send.write_chunk(swb_quic::outgoing(b))
        .await
        .map_err(|e| LinkError::Lost(e.to_string()))
}
