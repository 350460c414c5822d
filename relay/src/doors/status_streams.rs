//! The QUIC status door: `StatusWatch` (current values, then changes),
//! `SetStatus`, `PeersQuery` streams. A watch stream writes every change
//! queued when it gets to write in one write (see
//! [`crate::services::watch`]); a daemon that reads slowly skips the
//! oldest, slows nobody else, and costs bounded memory.

use crate::router::Router;
use crate::services::splice::{refuse, write_frame};
use crate::services::watch::{names, pump};
use swb_wire::{reset, Code, Frame, Refusal, StreamReply};
use tracing::debug;

pub(crate) async fn serve(
    router: &Router,
    ns: &str,
    me: &str,
    first: Frame,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let services = router.services();
    let ok = Frame::StreamReply(StreamReply { refusal: None });
    match first {
        Frame::SetStatus(change) => {
            match services.set_status_durable(ns, me, &change).await {
                Err(refusal) => return refuse(send, services, refusal).await,
                Ok(snap) => {
                    let update = Frame::StatusUpdate(snap.to_update(false));
                    if write_frame(&mut send, &ok).await.is_err()
                        || write_frame(&mut send, &update).await.is_err()
                    {
                        return;
                    }
                }
            }
            // A publisher stream: the daemon may send more changes on it,
            // without waiting, each answered in order with its value or a
            // refusal (one stream, so changes apply in the order they were
            // made). A daemon that sent one finishes its side.
            // Buffered: a daemon writes many changes at once.
            let mut changes = swb_quic::FrameStream::new(recv, swb_wire::MAX_STREAM_HEADER);
            loop {
                match changes.next().await {
                    Ok(Some(Frame::SetStatus(change))) => {
                        let written = match services.set_status_durable(ns, me, &change).await {
                            // The bytes watchers of this change are written too.
                            Ok(snap) => match snap.wire(false) {
                                Ok(b) => send.write_chunk(b).await.is_ok(),
                                Err(_) => false,
                            },
                            Err(refusal) => {
                                let answer = Frame::StreamReply(StreamReply {
                                    refusal: Some(refusal),
                                });
                                write_frame(&mut send, &answer).await.is_ok()
                            }
                        };
                        if !written {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Ok(Some(other)) => {
                        debug!(%me, "unexpected {:?} on a status publisher stream", other.frame_type());
                        let _ = send.reset(reset::RELAY.into());
                        return;
                    }
                    Err(_) => return,
                }
            }
            let _ = send.finish();
        }
        Frame::PeersQuery => {
            let known = router.peers(ns).await;
            let _ = write_frame(&mut send, &ok).await;
            for s in known {
                if write_frame(&mut send, &Frame::StatusUpdate(s.to_update(false)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = send.finish();
        }
        Frame::StatusWatch(w) => {
            let names = match names(&w.names) {
                Ok(n) if !n.is_empty() => n,
                Ok(_) => {
                    let r = Refusal::new(Code::BAD_NAME, "name at least one peer to watch");
                    return refuse(send, services, r).await;
                }
                Err(e) => {
                    return refuse(send, services, Refusal::new(Code::BAD_NAME, e.to_string()))
                        .await
                }
            };
            // Peers homed on other relays: fetch their current values, then
            // keep one upstream subscription per peer for every watcher here.
            router.prepare_watch(ns, &names, !w.once).await;
            let watcher = services.watcher(ns, &names);
            if write_frame(&mut send, &ok).await.is_err() {
                return;
            }
            pump(watcher, names.len(), !w.once, &mut send, &mut recv).await;
            let _ = send.finish();
            debug!(%me, "watch ended");
        }
        _ => {
            let _ = send.reset(reset::RELAY.into());
        }
    }
}
