//! The QUIC data-stream door: streams a daemon opens on its connection.
//! A data stream opens with `StreamOpen{to, port}`; the router finds the
//! target (attached here, or across one mesh hop) and the relay splices the
//! two streams once the target accepted (`StreamReply`). Status streams
//! (`StatusWatch`, `SetStatus`, `PeersQuery`) go to the status door.

use crate::router::Router;
use crate::services::registry::SessionCtl;
use crate::services::splice::{read_header, refuse, splice, write_frame, StreamSlot};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use swb_wire::{reset, Code, Frame, Refusal};
use tokio::task::JoinSet;
use tracing::{debug, Instrument};

/// The data streams a daemon opens on its connection, accepted by its
/// session loop (no task of their own while the session idles). Owns
/// every stream task; they end with it (the connection is gone by then).
pub(crate) struct Streams {
    /// Made by the first stream (a `JoinSet` allocates when made; an idle
    /// session has none).
    tasks: Option<JoinSet<()>>,
    seq: u64,
    /// The QUIC stream limit of the moment: it grows with use (see
    /// `INITIAL_STREAMS`) up to `ceiling`.
    limit: u32,
    ceiling: u32,
}

impl Streams {
    pub(crate) fn new(router: &Router) -> Self {
        Self {
            tasks: None,
            seq: 0,
            limit: crate::INITIAL_STREAMS,
            ceiling: (router.config().max_streams_per_peer + 16).min(u32::MAX as usize) as u32,
        }
    }

    /// Serves a stream the daemon opened, raising the stream limit first
    /// if the peer is near it.
    pub(crate) fn opened(
        &mut self,
        router: &Arc<Router>,
        ctl: &Arc<SessionCtl>,
        (ns, name): (&str, &str),
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let tasks = self.tasks.get_or_insert_with(JoinSet::new);
        let open_now = ctl.streams.load(Ordering::Relaxed) as u32 + tasks.len() as u32 + 2;
        if open_now + 2 >= self.limit && self.limit < self.ceiling {
            self.limit = (self.limit * 2).min(self.ceiling);
            ctl.conn.set_max_concurrent_bi_streams(self.limit.into());
        }
        self.seq += 1;
        let span = tracing::debug_span!("stream", n = self.seq);
        tasks.spawn(
            router.tasks().track_future(
                open(
                    router.clone(),
                    ctl.clone(),
                    ns.to_string(),
                    name.to_string(),
                    send,
                    recv,
                )
                .instrument(span),
            ),
        );
    }

    /// Waits for a stream task to end (never, while there is none).
    pub(crate) async fn reap(&mut self) {
        let Some(tasks) = self.tasks.as_mut() else {
            return std::future::pending().await;
        };
        match tasks.join_next().await {
            Some(_) if tasks.is_empty() => self.tasks = None,
            Some(_) => {}
            None => std::future::pending().await,
        }
    }
}

/// Handles one stream a daemon opened: find the target, ask it, splice.
async fn open(
    router: Arc<Router>,
    ctl: Arc<SessionCtl>,
    ns: String,
    name: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let services = router.services();
    let setup = router.config().stream_setup_timeout;
    let cap = router.config().max_streams_per_peer;
    let too_many = || {
        Refusal::new(
            Code::TOO_MANY_STREAMS,
            format!(
                "this peer has {cap} streams open through the relay, the limit; close some first"
            ),
        )
    };
    let req = match tokio::time::timeout(setup, read_header(&mut recv)).await {
        Ok(Ok(Frame::StreamOpen(o))) => o,
        Ok(Ok(f @ (Frame::StatusWatch(_) | Frame::SetStatus(_) | Frame::PeersQuery))) => {
            let Some(_slot) = StreamSlot::try_take(&ctl, cap) else {
                return refuse(send, services, too_many()).await;
            };
            return super::status_streams::serve(&router, &ns, &name, f, send, recv).await;
        }
        other => {
            match other {
                Ok(Ok(f)) => debug!("stream began with {:?}", f.frame_type()),
                Ok(Err(e)) => debug!("bad stream header: {e}"),
                Err(_) => debug!("no stream header in time"),
            }
            let _ = send.reset(reset::RELAY.into());
            let _ = recv.stop(reset::RELAY.into());
            return;
        }
    };
    let Some(_caller_slot) = StreamSlot::try_take(&ctl, cap) else {
        return refuse(send, services, too_many()).await;
    };
    let to = match swb_wire::normalize_name(&req.to) {
        Ok(t) => t,
        Err(e) => {
            let r = Refusal::new(Code::BAD_NAME, format!("{e}: {:?}", req.to));
            return refuse(send, services, r).await;
        }
    };
    let target = match router.open_stream(&ns, &name, &to, req.port).await {
        Ok(t) => t,
        Err(r) => return refuse(send, services, r).await,
    };
    let accepted = target.reply.refusal.is_none();
    if let Err(e) = write_frame(&mut send, &Frame::StreamReply(target.reply.clone())).await {
        debug!("caller went away during setup: {e}");
        return;
    }
    if !accepted {
        services.metrics.streams_refused.inc();
        let _ = send.finish();
        return;
    }
    services.metrics.streams_opened.inc();
    debug!(%to, port = req.port, "stream spliced");
    let _target_slot = target._slot;
    let (up, down) = splice(services, (send, recv), (target.send, target.recv)).await;
    debug!(up, down, "stream ended");
}
