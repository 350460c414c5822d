//! Watching the status board: a peer's newest value first, then every
//! published change. The board's channels keep each watched peer's last
//! few values ([`Recent`]), so a watcher that wakes after several changes
//! takes all of them and writes them at once; one that reads more slowly
//! than that skips the oldest (the next value comes `lagged`) and slows
//! nobody else.

use super::status::{Recent, Snapshot};
use super::Services;
use futures_util::{FutureExt, StreamExt};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamMap;

/// Bytes of `StatusUpdate` frames a watch stream writes at once at most.
const WRITE_BATCH: usize = 64 * 1024;

/// Times a watch stream with nothing more to write lets other tasks run
/// first, while each brings more changes (see [`pump`]). Measured with
/// `swbd-bench fanout` (2026-12-02, 100 watchers, single runs alternating):
/// 0 → 1 → 2 → 4 took same-relay deliveries from 0.88 M/s to 1.1, 1.24 and
/// 1.3 M/s, but 4 lowered the mesh hop's (1.3 → 1.2 M/s); yielding only
/// while a batch held fewer than 16 (or 8) changes measured lower than
/// always (1.06–1.13 M/s against 1.19–1.22).
const WATCH_YIELDS: usize = 2;

/// A watch of some peers' status: their newest values first, then every
/// published change, skipping what it already has. Dropping it ends the
/// subscription. It takes each peer's changes from the board's recent
/// values ([`super::status::RECENT_CHANGES`] at most): changes older than
/// those when it gets to read are skipped, and the next value comes with
/// `lagged`.
pub struct StatusWatcher {
    /// Values taken from the channels and not yet returned, with `lagged`.
    ready: VecDeque<(Arc<Snapshot>, bool)>,
    changes: StreamMap<usize, WatchStream<Recent>>,
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
    pub(crate) fn new(services: &Services, ns: &str, names: &[String]) -> Self {
        let mut board = services.registry().board();
        let mut ready = VecDeque::with_capacity(names.len());
        let mut changes = StreamMap::new();
        for (i, n) in names.iter().enumerate() {
            let mut rx = board.subscribe(ns, n);
            rx.borrow_and_update();
            // The newest value, even if its publication waits for the interval.
            ready.push_back((board.get(ns, n), false));
            changes.insert(i, WatchStream::from_changes(rx));
        }
        let last = ready.iter().map(|(s, _)| s.version).collect();
        Self {
            ready,
            changes,
            last,
        }
    }

    /// Queues the values of peer `i` newer than what it had.
    fn take(&mut self, i: usize, recent: &Recent) {
        let last = &mut self.last[i];
        let had = *last;
        let mut first = true;
        let ready = &mut self.ready;
        let newest = recent.newer_than(had, |s| {
            // Missed changes: the value it had is not the one before this.
            let lagged = first && s.prev_version > had;
            first = false;
            ready.push_back((s.clone(), lagged));
        });
        *last = had.max(newest);
    }

    /// The next value and whether changes were missed before it; `None`
    /// only if every channel closed (the relay is gone).
    pub async fn next(&mut self) -> Option<(Arc<Snapshot>, bool)> {
        loop {
            if let Some(v) = self.ready.pop_front() {
                return Some(v);
            }
            let (i, recent) = self.changes.next().await?;
            self.take(i, &recent);
        }
    }

    /// The next value if one is there without waiting.
    pub fn next_now(&mut self) -> Option<(Arc<Snapshot>, bool)> {
        loop {
            if let Some(v) = self.ready.pop_front() {
                return Some(v);
            }
            let (i, recent) = self.changes.next().now_or_never()??;
            self.take(i, &recent);
        }
    }
}

/// Writes a watcher's values as `StatusUpdate` frames: the first `count`
/// (the current values) and, if `lasting`, every change until the other
/// side finishes or stops its half of the stream or a write fails. What is
/// there when it writes goes in one write (up to [`WRITE_BATCH`] bytes),
/// so QUIC packs many changes into a packet. The caller finishes `send`.
pub(crate) async fn pump(
    mut watcher: StatusWatcher,
    count: usize,
    lasting: bool,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) {
    let mut initial = count;
    let mut probe = [0u8; 1];
    // One write's changes. Several are copied into one buffer of their
    // exact size: one chunk for QUIC to keep and free, instead of a share
    // of every change's bytes (whose count every watcher's task writes).
    // One alone goes as its shared bytes: no copy per watcher of a peer
    // that changes now and then.
    let mut batch: Vec<(Arc<Snapshot>, bool)> = Vec::new();
    loop {
        tokio::select! {
            next = watcher.next() => {
                let Some(mut v) = next else { return };
                let mut len = 0;
                let mut yields = 0;
                loop {
                    let (snap, lagged) = v;
                    // Encoded once per change however many watch it.
                    let Ok(b) = snap.wire_ref(lagged) else { return };
                    len += b.len();
                    batch.push((snap, lagged));
                    initial = initial.saturating_sub(1);
                    if (!lasting && initial == 0) || len >= WRITE_BATCH {
                        break;
                    }
                    if let Some(n) = watcher.next_now() {
                        v = n;
                        continue;
                    }
                    // Nothing more yet. Past the current values, let what
                    // is already runnable (publishers' sessions, the
                    // mesh) go first, while that brings more: under load
                    // one write (one QUIC packet) then carries many
                    // changes instead of one each; idle, it costs one
                    // trip through the scheduler, not a timer's wait.
                    if initial > 0 || yields == WATCH_YIELDS {
                        break;
                    }
                    yields += 1;
                    tokio::task::yield_now().await;
                    match watcher.next_now() {
                        Some(n) => v = n,
                        None => break,
                    }
                }
                let Some(chunk) = one_chunk(&mut batch, len) else { return };
                if send.write_chunk(chunk).await.is_err() {
                    return;
                }
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

/// The encoded changes of `batch` (`len` bytes together) as one chunk,
/// emptying `batch`: a lone change's shared bytes, several copied into one
/// buffer of exactly their size. `None` if one cannot be encoded.
fn one_chunk(batch: &mut Vec<(Arc<Snapshot>, bool)>, len: usize) -> Option<bytes::Bytes> {
    if let [(snap, lagged)] = batch.as_slice() {
        let b = snap.wire(*lagged).ok();
        batch.clear();
        return b;
    }
    let mut out = Vec::with_capacity(len);
    for (snap, lagged) in batch.drain(..) {
        out.extend_from_slice(snap.wire_ref(lagged).ok()?);
    }
    Some(out.into())
}

/// A watched name that is not a peer name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {name:?}")]
pub struct BadName {
    /// The name as given.
    pub name: String,
    /// Why it is not a peer name.
    pub reason: String,
}

/// Normalises watched names, dropping repeats; the first bad one is the error.
pub(crate) fn names(raw: &[String]) -> Result<Vec<String>, BadName> {
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for n in raw {
        let norm = swb_wire::normalize_name(n).map_err(|e| BadName {
            name: n.clone(),
            reason: e.to_string(),
        })?;
        if !out.contains(&norm) {
            out.push(norm);
        }
    }
    Ok(out)
}

impl Services {
    /// A watcher of `names` (normalised) in `ns`.
    pub(crate) fn watcher(&self, ns: &str, names: &[String]) -> StatusWatcher {
        StatusWatcher::new(self, ns, names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::status::StatusBoard;
    use std::time::Duration;
    use swb_wire::SetStatus;
    use tokio::time::Instant;

    fn change(b: &mut StatusBoard, n: usize) -> Arc<Snapshot> {
        let set = SetStatus {
            set: vec![("n".into(), n.to_string())],
            clear: vec![],
            replace: false,
        };
        b.set_fields("ns", "a", &set, Instant::now()).unwrap()
    }

    #[test]
    fn a_watcher_takes_each_change_once_and_one_behind_gets_lagged() {
        let mut b = StatusBoard::new(Duration::from_secs(60), Duration::ZERO);
        let rx = b.subscribe("ns", "a");
        let mut w = StatusWatcher {
            ready: VecDeque::new(),
            changes: StreamMap::new(),
            last: vec![0],
        };
        let recent = rx.borrow().clone();
        let taken = |w: &mut StatusWatcher| -> Vec<(String, bool)> {
            w.take(0, &recent);
            w.ready
                .drain(..)
                .map(|(s, lagged)| (s.fields["n"].clone(), lagged))
                .collect()
        };
        for n in 1..=3 {
            change(&mut b, n);
        }
        let want: Vec<_> = (1..=3).map(|n| (n.to_string(), false)).collect();
        assert_eq!(taken(&mut w), want, "each change, in order");
        assert_eq!(taken(&mut w), [], "nothing twice");
        // Further behind than the values kept: the rest, the first lagged.
        let last = super::super::status::RECENT_CHANGES + 13;
        for n in 4..=last {
            change(&mut b, n);
        }
        let got = taken(&mut w);
        assert_eq!(got.len(), super::super::status::RECENT_CHANGES + 1);
        assert_eq!(
            got[0],
            (
                (last - super::super::status::RECENT_CHANGES).to_string(),
                true
            )
        );
        assert!(got[1..].iter().all(|(_, lagged)| !lagged));
        assert_eq!(got.last().unwrap().0, last.to_string());
        assert_eq!(w.last[0], b.get("ns", "a").version);
    }

    #[test]
    fn a_lone_change_goes_as_its_shared_bytes_several_as_one_exact_copy() {
        let mut b = StatusBoard::new(Duration::from_secs(60), Duration::ZERO);
        let one = change(&mut b, 1);
        let shared = one.wire(false).unwrap();
        let mut batch = vec![(one.clone(), false)];
        let chunk = one_chunk(&mut batch, shared.len()).unwrap();
        assert_eq!(chunk.as_ptr(), shared.as_ptr(), "no copy for one change");
        assert!(batch.is_empty());

        let (two, three) = (change(&mut b, 2), change(&mut b, 3));
        let parts = [
            one.wire(false).unwrap(),
            two.wire(true).unwrap(),
            three.wire(false).unwrap(),
        ];
        let len = parts.iter().map(|p| p.len()).sum();
        let mut batch = vec![(one, false), (two, true), (three, false)];
        let chunk = one_chunk(&mut batch, len).unwrap();
        assert_eq!(chunk, parts.concat(), "the frames in order, back to back");
        assert!(batch.is_empty());
        // The frames read back as the three changes, in order.
        let mut rest = &chunk[..];
        for want in ["1", "2", "3"] {
            match swb_wire::decode(rest).unwrap() {
                swb_wire::Decoded::Frame {
                    frame: swb_wire::Frame::StatusUpdate(u),
                    consumed,
                } => {
                    assert_eq!(u.fields, [("n".to_string(), want.to_string())].into());
                    rest = &rest[consumed..];
                }
                other => panic!("not a status update: {other:?}"),
            }
        }
        assert!(rest.is_empty());
    }
}
