//! Status over QUIC streams: `StatusWatch` (current values, then changes),
//! `SetStatus`, `PeersQuery`. A watch stream writes only the newest value
//! of each peer when it gets to write (the watch channels coalesce), so a
//! daemon that reads slowly slows nobody else and costs no memory.

use crate::status::Snapshot;
use crate::streams::{refuse, write_frame, RESET_RELAY};
use crate::Shared;
use futures_util::StreamExt;
use std::sync::Arc;
use swb_wire::{Code, Frame, StreamReply};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamMap;
use tracing::debug;

/// A watch of some peers' status: their newest values first, then every
/// published change, skipping what it already has. Dropping it ends the
/// subscription. It holds one value per peer however slowly it is read:
/// changes it did not take in time coalesce into the newest, which then
/// comes with `lagged`.
pub struct StatusWatcher {
    first: std::collections::VecDeque<Arc<Snapshot>>,
    changes: StreamMap<usize, WatchStream<Arc<Snapshot>>>,
    last: Vec<u64>,
}

impl std::fmt::Debug for StatusWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWatcher")
            .field("peers", &self.last.len())
            .finish()
    }
}

impl StatusWatcher {
    /// Subscribes to `names` (already normalised) in `ns`.
    pub(crate) fn new(shared: &Shared, ns: &str, names: &[String]) -> Self {
        let mut reg = shared.registry();
        let mut first = std::collections::VecDeque::with_capacity(names.len());
        let mut changes = StreamMap::new();
        for (i, n) in names.iter().enumerate() {
            let mut rx = reg.status.subscribe(ns, n);
            rx.borrow_and_update();
            // The newest value, even if its publication waits for the interval.
            first.push_back(reg.status.get(ns, n));
            changes.insert(i, WatchStream::from_changes(rx));
        }
        let last = first.iter().map(|s| s.version).collect();
        Self {
            first,
            changes,
            last,
        }
    }

    /// The next value and whether changes were missed before it; `None`
    /// only if every channel closed (the relay is gone).
    pub async fn next(&mut self) -> Option<(Arc<Snapshot>, bool)> {
        if let Some(s) = self.first.pop_front() {
            return Some((s, false));
        }
        loop {
            let (i, snap) = self.changes.next().await?;
            if snap.version <= self.last[i] {
                continue; // already had it: the first value was the newest
            }
            let lagged = snap.prev_version > self.last[i];
            self.last[i] = snap.version;
            return Some((snap, lagged));
        }
    }
}

/// Writes a watcher's values as `StatusUpdate` frames: the first `count`
/// (the current values) and, if `lasting`, every change until the other
/// side finishes or stops its half of the stream or a write fails. The
/// caller finishes `send`.
pub(crate) async fn pump(
    mut watcher: StatusWatcher,
    count: usize,
    lasting: bool,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) {
    let mut initial = count;
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            next = watcher.next() => {
                let Some((snap, lagged)) = next else { return };
                if write_frame(send, &Frame::StatusUpdate(snap.to_update(lagged))).await.is_err() {
                    return;
                }
                initial = initial.saturating_sub(1);
                if !lasting && initial == 0 {
                    return;
                }
            }
            r = recv.read(&mut probe), if lasting => {
                if !matches!(r, Ok(Some(_))) {
                    return;
                }
            }
        }
    }
}

/// Normalises watched names; the first bad one is the error.
pub(crate) fn names(raw: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for n in raw {
        let n = swb_wire::normalize_name(n).map_err(|e| format!("{e}: {n:?}"))?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

pub(crate) async fn serve(
    shared: &Arc<Shared>,
    ns: &str,
    me: &str,
    first: Frame,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    match first {
        Frame::SetStatus(change) => {
            let r =
                shared
                    .registry()
                    .status
                    .set_fields(ns, me, &change, tokio::time::Instant::now());
            match r {
                Err(refusal) => refuse(send, shared, refusal.code, refusal.message).await,
                Ok(snap) => {
                    let _ = write_frame(
                        &mut send,
                        &Frame::StreamReply(StreamReply { refusal: None }),
                    )
                    .await;
                    let _ =
                        write_frame(&mut send, &Frame::StatusUpdate(snap.to_update(false))).await;
                    let _ = send.finish();
                }
            }
        }
        Frame::PeersQuery => {
            let known = crate::mesh::known_everywhere(shared, ns).await;
            let _ = write_frame(
                &mut send,
                &Frame::StreamReply(StreamReply { refusal: None }),
            )
            .await;
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
                    return refuse(
                        send,
                        shared,
                        Code::BAD_NAME,
                        "name at least one peer to watch".into(),
                    )
                    .await
                }
                Err(e) => return refuse(send, shared, Code::BAD_NAME, e).await,
            };
            // Peers homed on other relays: fetch their current values, then
            // keep one upstream subscription per peer for every watcher here.
            crate::mesh::prepare_watch(shared, ns, &names, !w.once).await;
            let watcher = StatusWatcher::new(shared, ns, &names);
            if write_frame(
                &mut send,
                &Frame::StreamReply(StreamReply { refusal: None }),
            )
            .await
            .is_err()
            {
                return;
            }
            pump(watcher, names.len(), !w.once, &mut send, &mut recv).await;
            let _ = send.finish();
            debug!(%me, "watch ended");
        }
        _ => {
            let _ = send.reset(quinn::VarInt::from_u32(RESET_RELAY));
        }
    }
}
