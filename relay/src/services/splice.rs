//! Byte streams to peers attached here: opening a stream on a target's
//! connection (`StreamIncoming` → its `StreamReply`), counting open streams
//! against each peer's cap, and copying bytes between two QUIC streams.
//! The relay holds at most one batch of chunks per direction; QUIC flow
//! control is the backpressure end to end; FIN travels as FIN and a reset
//! as a reset with the same code.

use super::registry::SessionCtl;
use super::Services;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use swb_wire::{reset, Code, Frame, Refusal, StreamIncoming, StreamReply};
use tracing::debug;

pub(crate) use swb_quic::{read_header, write_frame};

/// Most chunks moved per wake-up and direction.
const BATCH: usize = 32;
/// How long a refusal may take to reach the caller before its stream goes.
pub(crate) const REFUSAL_LINGER: Duration = Duration::from_secs(2);

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
                        _ => quinn::VarInt::from_u32(reset::RELAY),
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
                let _ = to.reset(quinn::VarInt::from_u32(reset::RELAY));
                return n;
            }
        }
    }
}

/// Splices two stream pairs both ways until both directions ended; counts
/// the stream as open meanwhile. Returns the bytes moved each way.
pub(crate) async fn splice(
    services: &Services,
    a: (quinn::SendStream, quinn::RecvStream),
    b: (quinn::SendStream, quinn::RecvStream),
) -> (u64, u64) {
    let _open = crate::metrics::OpenStream::new(&services.metrics.streams_open);
    let bytes = &services.metrics.stream_bytes;
    tokio::join!(pipe(a.1, b.0, bytes), pipe(b.1, a.0, bytes))
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

/// Answers a stream request with a refusal (counted) and lets it reach
/// the caller before the stream goes away.
pub(crate) async fn refuse(mut send: quinn::SendStream, services: &Services, r: Refusal) {
    services.metrics.streams_refused.inc();
    debug!(code = %r.code, "stream refused: {}", r.message);
    let reply = Frame::StreamReply(StreamReply { refusal: Some(r) });
    if write_frame(&mut send, &reply).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(REFUSAL_LINGER, send.stopped()).await;
    }
}

/// A stream to a target, its answer, and the slot counting it against the
/// target's cap (none when the target is on another relay).
pub(crate) struct Opened {
    pub(crate) send: quinn::SendStream,
    pub(crate) recv: quinn::RecvStream,
    pub(crate) reply: StreamReply,
    pub(crate) _slot: Option<StreamSlot>,
    /// Whatever must live as long as the stream (the mesh link it
    /// crosses is kept up while it is).
    pub(crate) _hold: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Services {
    /// Opens a stream to `port` of `to`, attached here, for `from`.
    pub(crate) async fn open_local(
        &self,
        ns: &str,
        from: &str,
        to: &str,
        port: u16,
    ) -> Result<Opened, Refusal> {
        let setup = self.config.stream_answer_timeout;
        let cap = self.config.max_streams_per_peer;
        // Same namespace only: a peer of another namespace is exactly as
        // absent as a name nobody holds.
        let Some(target) = self.registry().session(ns, to) else {
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
            Ok(Ok((send, recv, reply))) => Ok(Opened {
                send,
                recv,
                reply,
                _slot: Some(slot),
                _hold: None,
            }),
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
}
