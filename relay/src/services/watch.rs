//! Watching the status board: a peer's newest value first, then every
//! published change. The board's watch channels coalesce, so a watcher
//! that reads slowly slows nobody else and costs no memory.

use super::status::Snapshot;
use super::Services;
use futures_util::StreamExt;
use std::sync::Arc;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamMap;

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
    pub(crate) fn new(services: &Services, ns: &str, names: &[String]) -> Self {
        let mut reg = services.registry();
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
                // Encoded once per change however many watch it.
                let Ok(b) = snap.wire(lagged) else { return };
                if send.write_chunk(b).await.is_err() {
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
