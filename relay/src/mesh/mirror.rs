//! Status of peers homed elsewhere: before a watch starts here, their
//! current values are fetched into the board; while anyone here watches
//! one, a single upstream subscription per peer keeps the board's copy
//! current (fan-out at the edge) and follows the peer when its home moves.

use super::calls_out::STATUS_FETCH_TIMEOUT;
use super::links::read_frame;
use super::Mesh;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use swb_wire::{Frame, MeshStatusQuery};
use tracing::debug;

/// How often a mirror checks that someone here still watches its peer.
const MIRROR_CHECK: Duration = Duration::from_secs(1);
/// Pause before a mirror retries a failed subscription.
const MIRROR_RETRY: Duration = Duration::from_millis(500);

impl Mesh {
    /// Before watching `names` in `ns` here: fetch the current values of
    /// those homed on other relays into the board, and (for a lasting
    /// watch) start one upstream subscription per such peer unless one runs.
    pub(crate) async fn prepare_watch(self: &Arc<Self>, ns: &str, names: &[String], lasting: bool) {
        let mut by_home: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for n in names {
            if let Some(h) = self.placement.home_elsewhere(ns, n) {
                by_home.entry(h.id.clone()).or_default().push(n.clone());
            }
        }
        for (home, names) in by_home {
            let q = MeshStatusQuery {
                namespace: ns.to_string(),
                names: names.clone(),
                watch: false,
            };
            let fetch = async {
                let (_s, mut r, _using) = self.status_query(&home, q).await?;
                while let Some(f) = read_frame(&mut r).await? {
                    if let Frame::StatusUpdate(u) = f {
                        self.services.registry().board().mirror_update(
                            ns,
                            &u,
                            tokio::time::Instant::now(),
                        );
                    }
                }
                Ok::<_, super::CallError>(())
            };
            match tokio::time::timeout(STATUS_FETCH_TIMEOUT, fetch).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%home, "status fetch failed: {e}"),
                Err(_) => debug!(%home, "status fetch timed out"),
            }
            if lasting {
                for n in names {
                    let key = (ns.to_string(), n.clone());
                    let mut m = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
                    if m.0.insert(key.clone()) {
                        m.1.spawn(self.tasks.track_future(mirror(self.clone(), key)));
                    }
                }
            }
        }
    }
}

/// Keeps the board's copy of a peer homed elsewhere up to date while
/// anyone here watches it; follows the peer when its home moves.
async fn mirror(mesh: Arc<Mesh>, key: (String, String)) {
    let (ns, name) = (key.0.as_str(), key.1.as_str());
    let mut live = mesh.placement.live();
    // The first check comes after the watcher that asked had time to subscribe.
    let mut check =
        tokio::time::interval_at(tokio::time::Instant::now() + MIRROR_CHECK, MIRROR_CHECK);
    // Ends when the peer is homed here (the board is authoritative then),
    // nobody watches it any more, or the relay stops.
    'outer: while let Some(home) = mesh.placement.home_elsewhere(ns, name) {
        let q = MeshStatusQuery {
            namespace: ns.to_string(),
            names: vec![name.to_string()],
            watch: true,
        };
        let Ok((_send, recv, _using)) = mesh.status_query(&home.id, q).await else {
            tokio::time::sleep(MIRROR_RETRY).await;
            if !mesh.services.registry().board().watched(ns, name) {
                break;
            }
            continue;
        };
        // Buffered: the home relay writes many changes at once.
        let mut recv = swb_quic::FrameStream::new(recv, swb_wire::MAX_STREAM_HEADER);
        loop {
            tokio::select! {
                f = recv.next() => match f {
                    Ok(Some(Frame::StatusUpdate(u))) => {
                        mesh.services.registry().board().mirror_update(ns, &u, tokio::time::Instant::now());
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => continue 'outer,
                },
                r = live.changed() => {
                    if r.is_err() {
                        break 'outer;
                    }
                    continue 'outer; // the home may have moved
                }
                _ = check.tick() => {
                    if !mesh.services.registry().board().watched(ns, name) {
                        break 'outer;
                    }
                }
            }
        }
    }
    mesh.mirrors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0
        .remove(&key);
}
