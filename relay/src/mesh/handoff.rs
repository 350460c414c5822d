//! Held mail follows its names: when the ring moves a name to another
//! relay (one joined, or this one is stopping), its held messages are
//! forwarded one by one and removed here only once the new home accepted
//! them.

use super::Mesh;
use swb_ring::Ring;
use swb_wire::MeshForward;
use tracing::debug;

/// Hands held mail to the relays that are its home on `ring` (this relay
/// is not, or no longer): forwarded one by one, removed here only once the
/// new home accepted it. Returns (handed off, kept).
pub(crate) async fn handoff(mesh: &Mesh, ring: &Ring) -> (usize, usize) {
    let me = mesh.me.id.clone();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let held = mesh
        .services
        .registry()
        .export(tokio::time::Instant::now(), wall);
    let (mut moved, mut kept) = (0, 0);
    for m in held {
        let Some(home) = ring.home(&m.ns, &m.to).map(str::to_string) else {
            continue;
        };
        if home == me {
            continue;
        }
        let (ns, to, id) = (m.ns.clone(), m.to.clone(), m.id);
        let f = MeshForward {
            namespace: m.ns.to_string(),
            from: m.from.to_string(),
            to: m.to.to_string(),
            id: m.id,
            body: m.body,
            sent_at_ms: m.sent_at_ms,
            hops: 0,
        };
        match mesh.forward(&home, f).await {
            Ok(Ok(_)) => {
                mesh.services.handed_off(&ns, &to, id);
                moved += 1;
            }
            Ok(Err(r)) => {
                kept += 1;
                debug!(%ns, %to, %home, "handoff refused: {r}");
            }
            Err(e) => {
                kept += 1;
                debug!(%ns, %to, %home, "handoff failed: {e}");
            }
        }
    }
    (moved, kept)
}

impl Mesh {
    /// This relay leaves the mesh: peers stop routing here, held mail
    /// goes to the relays that take over its names. Returns (moved, kept).
    pub(crate) async fn leave(&self) -> (usize, usize) {
        self.announce_leaving();
        let ring = self.placement.live_now().ring.without(&self.me.id);
        handoff(self, &ring).await
    }
}
