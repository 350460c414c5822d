//! Byte streams between peers: the relay splices a caller's QUIC stream to
//! a stream it opens on the target's connection.
//!
//! Setup: caller → `StreamOpen{to, port}`; relay → target
//! `StreamIncoming{from, port}`; target → `StreamReply`; relay forwards the
//! reply to the caller. Only after an accepting reply do payload bytes flow.
//! Then one task per stream pair copies chunks both ways: QUIC flow control
//! is the backpressure (a slow reader stops the writer end to end), the
//! relay holds at most one chunk per direction, FIN travels as FIN
//! (half-close) and a reset as a reset with the same code.

use crate::registry::SessionCtl;
use crate::Shared;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use swb_wire::{Code, Frame, Refusal, StreamIncoming, StreamReply};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

/// Application error code for a stream reset by the relay itself.
pub(crate) const RESET_RELAY: u32 = 1;
/// Most chunks moved per wake-up and direction.
const BATCH: usize = 32;

pub(crate) use swb_quic::{read_frame, read_header, write_frame};

/// Copies one direction until FIN, reset or failure, propagating each.
/// Returns the bytes moved; counts them in `bytes` as they move.
pub(crate) async fn pipe(
    mut from: quinn::RecvStream,
    mut to: quinn::SendStream,
    bytes: &prometheus::IntCounter,
) -> u64 {
    let mut n = 0u64;
    // Chunks come as they arrived (often one packet each); moving a batch
    // per wake-up keeps the per-packet cost low. Zero-copy both ways.
    let mut bufs: [bytes::Bytes; BATCH] = std::array::from_fn(|_| bytes::Bytes::new());
    loop {
        match from.read_chunks(&mut bufs).await {
            Ok(Some(k)) => {
                let got = bufs[..k].iter().map(|b| b.len() as u64).sum::<u64>();
                n += got;
                bytes.inc_by(got);
                if let Err(e) = to.write_all_chunks(&mut bufs[..k]).await {
                    let code = match e {
                        quinn::WriteError::Stopped(c) => c,
                        _ => quinn::VarInt::from_u32(RESET_RELAY),
                    };
                    let _ = from.stop(code);
                    return n;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return n;
            }
            Err(quinn::ReadError::Reset(code)) => {
                let _ = to.reset(code);
                return n;
            }
            Err(_) => {
                let _ = to.reset(quinn::VarInt::from_u32(RESET_RELAY));
                return n;
            }
        }
    }
}

/// One open stream counted against a connection's cap; uncounted on drop.
pub(crate) struct StreamSlot(Arc<SessionCtl>);

impl StreamSlot {
    /// Takes a slot if fewer than `cap` streams are open on `ctl`.
    pub(crate) fn try_take(ctl: &Arc<SessionCtl>, cap: usize) -> Option<Self> {
        let c: &AtomicUsize = &ctl.streams;
        c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .ok()
        .map(|_| Self(ctl.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts the data streams a daemon opens, until `stop`. Owns every
/// stream task; they end with it (the connection is gone by then anyway).
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    ctl: Arc<SessionCtl>,
    ns: String,
    name: String,
    stop: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    let mut seq = 0u64;
    // The QUIC stream limit grows with use (see `INITIAL_STREAMS`).
    let ceiling = (shared.config.max_streams_per_peer + 16).min(u32::MAX as usize) as u32;
    let mut limit = crate::INITIAL_STREAMS;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let open_now = ctl.streams.load(Ordering::Relaxed) as u32 + tasks.len() as u32 + 2;
                    if open_now + 2 >= limit && limit < ceiling {
                        limit = (limit * 2).min(ceiling);
                        conn.set_max_concurrent_bi_streams(limit.into());
                    }
                    seq += 1;
                    let span = tracing::debug_span!("stream", n = seq);
                    tasks.spawn(
                        open(shared.clone(), ctl.clone(), ns.clone(), name.clone(), send, recv)
                            .instrument(span),
                    );
                }
                Err(_) => break,
            },
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

pub(crate) async fn refuse(
    mut send: quinn::SendStream,
    shared: &Shared,
    code: Code,
    message: String,
) {
    shared.metrics.streams_refused.inc();
    debug!(%code, "stream refused: {message}");
    let reply = Frame::StreamReply(StreamReply {
        refusal: Some(Refusal::new(code, message)),
    });
    if write_frame(&mut send, &reply).await.is_ok() {
        let _ = send.finish();
        // Let the reply reach the caller before the stream state goes away.
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
}

/// Opens a stream to `port` of `to`, attached here; returns the target's
/// stream, its answer, and the slot that counts it against `to`'s cap.
pub(crate) async fn open_local(
    shared: &Shared,
    ns: &str,
    from: &str,
    to: &str,
    port: u16,
) -> Result<
    (
        quinn::SendStream,
        quinn::RecvStream,
        StreamReply,
        Option<StreamSlot>,
    ),
    Refusal,
> {
    let setup = shared.config.stream_setup_timeout;
    let cap = shared.config.max_streams_per_peer;
    // Same namespace only: a peer of another namespace is exactly as
    // absent as a name nobody holds.
    let Some(target) = shared.registry().session(ns, to) else {
        let msg = format!("{to} is not attached to the relay (offline, or no such peer)");
        return Err(Refusal::new(Code::PEER_OFFLINE, msg));
    };
    let Some(slot) = StreamSlot::try_take(&target, cap) else {
        let msg = format!("{to} has {cap} streams open, the limit; try again later");
        return Err(Refusal::new(Code::TOO_MANY_STREAMS, msg));
    };
    let opened = tokio::time::timeout(setup, async {
        let (mut tsend, mut trecv) = target.conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(
            &mut tsend,
            &Frame::StreamIncoming(StreamIncoming {
                from: from.to_string(),
                port,
            }),
        )
        .await?;
        match read_header(&mut trecv).await.map_err(|e| e.to_string())? {
            Frame::StreamReply(r) => Ok((tsend, trecv, r)),
            other => Err(format!("target answered {:?}", other.frame_type())),
        }
    })
    .await;
    match opened {
        Ok(Ok((s, r, reply))) => Ok((s, r, reply, Some(slot))),
        Ok(Err(e)) => Err(Refusal::new(
            Code::PEER_OFFLINE,
            format!("{to} did not answer the stream request: {e}"),
        )),
        Err(_) => Err(Refusal::new(
            Code::TIMEOUT,
            format!("{to} did not answer the stream request within {setup:?}"),
        )),
    }
}

/// Handles one stream a daemon opened: find the target, ask it, splice.
async fn open(
    shared: Arc<Shared>,
    ctl: Arc<SessionCtl>,
    ns: String,
    name: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let setup = shared.config.stream_setup_timeout;
    let cap = shared.config.max_streams_per_peer;
    let req = match tokio::time::timeout(setup, read_header(&mut recv)).await {
        Ok(Ok(Frame::StreamOpen(o))) => o,
        Ok(Ok(f @ (Frame::StatusWatch(_) | Frame::SetStatus(_) | Frame::PeersQuery))) => {
            let Some(_slot) = StreamSlot::try_take(&ctl, cap) else {
                let msg = format!(
                    "this peer has {cap} streams open through the relay, the limit; close some first"
                );
                return refuse(send, &shared, Code::TOO_MANY_STREAMS, msg).await;
            };
            return crate::status_streams::serve(&shared, &ns, &name, f, send, recv).await;
        }
        Ok(Ok(other)) => {
            debug!("stream began with {:?}", other.frame_type());
            let _ = send.reset(quinn::VarInt::from_u32(RESET_RELAY));
            let _ = recv.stop(quinn::VarInt::from_u32(RESET_RELAY));
            return;
        }
        Ok(Err(e)) => {
            debug!("bad stream header: {e}");
            let _ = send.reset(quinn::VarInt::from_u32(RESET_RELAY));
            let _ = recv.stop(quinn::VarInt::from_u32(RESET_RELAY));
            return;
        }
        Err(_) => {
            let _ = send.reset(quinn::VarInt::from_u32(RESET_RELAY));
            let _ = recv.stop(quinn::VarInt::from_u32(RESET_RELAY));
            return;
        }
    };
    let Some(_caller_slot) = StreamSlot::try_take(&ctl, cap) else {
        let msg = format!(
            "this peer has {cap} streams open through the relay, the limit; close some first"
        );
        return refuse(send, &shared, Code::TOO_MANY_STREAMS, msg).await;
    };
    let to = match swb_wire::normalize_name(&req.to) {
        Ok(t) => t,
        Err(e) => return refuse(send, &shared, Code::BAD_NAME, format!("{e}: {:?}", req.to)).await,
    };
    let target = match crate::mesh::home_elsewhere(&shared, &ns, &to) {
        // Homed on another relay: one mesh hop.
        Some(home) => crate::mesh::open_stream(&shared, &home.id, &ns, &name, &to, req.port).await,
        None => open_local(&shared, &ns, &name, &to, req.port).await,
    };
    let (tsend, trecv, reply, _target_slot) = match target {
        Ok(x) => x,
        Err(r) => return refuse(send, &shared, r.code, r.message).await,
    };
    let accepted = reply.refusal.is_none();
    if let Err(e) = write_frame(&mut send, &Frame::StreamReply(reply)).await {
        debug!("caller went away during setup: {e}");
        return;
    }
    if !accepted {
        shared.metrics.streams_refused.inc();
        let _ = send.finish();
        return;
    }
    shared.metrics.streams_opened.inc();
    let _open = crate::metrics::OpenStream::new(&shared.metrics.streams_open);
    debug!(%to, port = req.port, "stream spliced");
    let bytes = &shared.metrics.stream_bytes;
    let (up, down) = tokio::join!(pipe(recv, tsend, bytes), pipe(trecv, send, bytes));
    debug!(up, down, "stream ended");
}
