//! Held mail follows its names: when the ring moves a name to another
//! relay (one joined, or this one is stopping), its held messages are
//! forwarded — in calls of many, as sessions' sends are — and removed here
//! only once the new home accepted them.

use super::Mesh;
use crate::services::persist::Saved;
use std::collections::HashMap;
use swb_ring::Ring;
use swb_wire::{MeshForward, FORWARD_CALL_BYTES, MAX_FORWARDS_PER_CALL};
use tracing::debug;

/// Hands held mail to the relays that are its home on `ring` (this relay
/// is not, or no longer): each new home's messages in the order held, in
/// calls of up to [`MAX_FORWARDS_PER_CALL`] messages and
/// [`FORWARD_CALL_BYTES`] of bodies, one call at a time; a message is
/// removed here only once its new home accepted it. Returns (handed off,
/// kept).
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
    let mut by_home: HashMap<String, Vec<Saved>> = HashMap::new();
    for m in held {
        let Some(home) = ring.home(&m.ns, &m.to) else {
            continue;
        };
        if home != me {
            by_home.entry(home.to_string()).or_default().push(m);
        }
    }
    let (mut moved, mut kept) = (0, 0);
    for (home, msgs) in by_home {
        let mut call: Vec<Saved> = Vec::new();
        let mut bytes = 0;
        for m in msgs {
            if !call.is_empty()
                && (call.len() >= MAX_FORWARDS_PER_CALL
                    || bytes + m.body.len() > FORWARD_CALL_BYTES)
            {
                let (m, k) = hand(mesh, &home, std::mem::take(&mut call)).await;
                (moved, kept, bytes) = (moved + m, kept + k, 0);
            }
            bytes += m.body.len();
            call.push(m);
        }
        if !call.is_empty() {
            let (m, k) = hand(mesh, &home, call).await;
            (moved, kept) = (moved + m, kept + k);
        }
    }
    (moved, kept)
}

/// Handoff passes a leaving relay makes at most: the first moves the
/// mailbox, the next what landed while it ran (forwards taken as the
/// leaving went out), the last confirms.
const LEAVE_PASSES: usize = 3;

/// One call of [`handoff`]: (handed off, kept).
async fn hand(mesh: &Mesh, home: &str, call: Vec<Saved>) -> (usize, usize) {
    let mut held = Vec::with_capacity(call.len());
    let fs = call
        .into_iter()
        .map(|m| {
            let f = MeshForward {
                namespace: m.ns.to_string(),
                from: m.from.to_string(),
                to: m.to.to_string(),
                id: m.id,
                body: m.body,
                sent_at_ms: m.sent_at_ms,
                // Its last hop: the new home keeps it even if its ring has
                // not caught up with this one (it has not read that this
                // relay is leaving, say), and moves it when the rings
                // agree. Passed on, it would come back here, to a relay
                // that takes no more mail.
                hops: swb_wire::MAX_FORWARD_HOPS,
            };
            held.push((m.ns, m.to, m.id));
            f
        })
        .collect();
    let (mut moved, mut kept) = (0, 0);
    for ((ns, to, id), answer) in held.into_iter().zip(mesh.forward_batch(home, fs).await) {
        match answer {
            Ok(_) => {
                mesh.services.handed_off(&ns, &to, id);
                moved += 1;
            }
            Err(r) => {
                kept += 1;
                debug!(%ns, %to, %home, "handoff refused: {r}");
            }
        }
    }
    (moved, kept)
}

impl Mesh {
    /// This relay leaves the mesh: peers stop routing here, held mail
    /// goes to the relays that take over its names. Returns (moved, kept).
    ///
    /// From the announcement on, this relay refuses forwarded mail
    /// (`relay_unavailable`: the sender retries at the new home); a
    /// forward that was being taken as the announcement went out may land
    /// after the first pass exported the mailbox, so passes repeat until
    /// one finds nothing to move (at most [`LEAVE_PASSES`]).
    pub(crate) async fn leave(&self) -> (usize, usize) {
        self.announce_leaving();
        let ring = self.placement.live_now().ring.without(&self.me.id);
        let (mut moved, mut kept) = (0, 0);
        for pass in 0..LEAVE_PASSES {
            let (m, k) = handoff(self, &ring).await;
            moved += m;
            kept = k;
            if pass == 0 {
                self.take_late_forward();
            }
            if m == 0 {
                break;
            }
        }
        (moved, kept)
    }

    /// Takes the forward a test set to land after the first pass (see
    /// [`Mesh::late_forward`]), as `forward_in` takes one at its home.
    fn take_late_forward(&self) {
        let late = self
            .late_forward
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(f) = late else {
            return;
        };
        let Ok(to) = swb_wire::normalize_name(&f.to) else {
            return;
        };
        let now = tokio::time::Instant::now();
        let taken =
            self.services
                .enqueue(&f.namespace, &*f.from, &to, f.id, f.body, f.sent_at_ms, now);
        debug!(
            ok = taken.is_ok(),
            "a late forward landed after the first handoff pass"
        );
    }
}
