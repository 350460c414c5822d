//! Membership of a diameter-1 mesh as a pure state machine: events and
//! `now` in, the live set out. No sockets, no clock of its own, so every
//! rule is unit-tested with simulated time.
//!
//! - A relay is **live** while this relay has a link to it, the link was
//!   heard from within [`MESH_IDLE`] (links send a keep-alive frame every
//!   [`MESH_KEEPALIVE`]), and it did not announce that it is leaving.
//! - **Records** (id, addresses, certificate fingerprint, incarnation) are
//!   learned from links (authoritative: the relay itself, after proving the
//!   mesh key) and from gossip. Gossip carries only this relay and the
//!   relays it is linked to, so the record of a relay that died stops being
//!   repeated and ages out after [`RECORD_TTL`]. A gossiped record never
//!   replaces one of a newer incarnation (a relay that restarted is not
//!   undone by a record from before the restart).
//! - The lower id dials the higher: [`Membership::dial_targets`].

use crate::placement::LiveSet;
use std::collections::BTreeMap;
use std::time::Duration;
use swb_ring::Ring;
use swb_wire::RelayRecord;
use tokio::time::Instant;

/// A link silent this long is dead (and QUIC's idle timeout closes it).
pub const MESH_IDLE: Duration = Duration::from_secs(3);
/// How often a link sends a keep-alive frame.
pub(crate) const MESH_KEEPALIVE: Duration = Duration::from_millis(750);
/// A record neither linked nor gossiped for this long is forgotten.
pub(crate) const RECORD_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Known {
    record: RelayRecord,
    /// When it was last linked or gossiped.
    seen: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    heard: Instant,
    leaving: bool,
}

/// What this relay knows of the mesh.
#[derive(Debug, Clone)]
pub(crate) struct Membership {
    me: RelayRecord,
    known: BTreeMap<String, Known>,
    links: BTreeMap<String, Link>,
}

impl Membership {
    pub(crate) fn new(me: RelayRecord) -> Self {
        Self {
            me,
            known: BTreeMap::new(),
            links: BTreeMap::new(),
        }
    }

    /// Records from gossip or a welcome. New relays and newer incarnations
    /// are taken; stale ones ignored. Whether anything new was learned.
    pub(crate) fn merge(&mut self, records: &[RelayRecord], now: Instant) -> bool {
        let mut new = false;
        for r in records {
            if r.id == self.me.id || r.id.is_empty() {
                continue;
            }
            let full = self.known.len() >= swb_wire::MAX_RELAYS;
            match self.known.get_mut(&r.id) {
                Some(k) if k.record.incarnation > r.incarnation => {}
                Some(k) if k.record == *r => k.seen = now,
                Some(k) => {
                    *k = Known {
                        record: r.clone(),
                        seen: now,
                    };
                    new = true;
                }
                // A mesh of at most MAX_RELAYS: gossip past that (a
                // broken or hostile relay) is not remembered.
                None if full => {}
                None => {
                    self.known.insert(
                        r.id.clone(),
                        Known {
                            record: r.clone(),
                            seen: now,
                        },
                    );
                    new = true;
                }
            }
        }
        new
    }

    /// A link to `record`'s relay came up (it proved the mesh key; its
    /// record is authoritative).
    pub(crate) fn link_up(&mut self, record: &RelayRecord, now: Instant) {
        self.known.insert(
            record.id.clone(),
            Known {
                record: record.clone(),
                seen: now,
            },
        );
        self.links.insert(
            record.id.clone(),
            Link {
                heard: now,
                leaving: false,
            },
        );
    }

    /// The link to `id` ended.
    pub(crate) fn link_down(&mut self, id: &str, now: Instant) {
        if self.links.remove(id).is_some() {
            if let Some(k) = self.known.get_mut(id) {
                k.seen = now;
            }
        }
    }

    /// A frame arrived on the link to `id`.
    pub(crate) fn heard(&mut self, id: &str, now: Instant) {
        if let Some(l) = self.links.get_mut(id) {
            l.heard = now;
        }
    }

    /// `id` announced it is stopping: out of the live set while its link
    /// stays up for the mail handoff.
    pub(crate) fn leaving(&mut self, id: &str) {
        if let Some(l) = self.links.get_mut(id) {
            l.leaving = true;
        }
    }

    /// Forgets records that were neither linked nor gossiped for
    /// [`RECORD_TTL`]; their ids.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<String> {
        let gone: Vec<String> = self
            .known
            .iter()
            .filter(|(id, k)| {
                !self.links.contains_key(*id) && now.saturating_duration_since(k.seen) > RECORD_TTL
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.known.remove(id);
        }
        gone
    }

    fn is_live(&self, id: &str, now: Instant) -> bool {
        self.links
            .get(id)
            .is_some_and(|l| !l.leaving && now.saturating_duration_since(l.heard) <= MESH_IDLE)
    }

    /// This relay and every relay live now, with the ring over them.
    pub(crate) fn live(&self, now: Instant) -> LiveSet {
        let mut relays: BTreeMap<String, RelayRecord> = BTreeMap::new();
        relays.insert(self.me.id.clone(), self.me.clone());
        for (id, k) in &self.known {
            if self.is_live(id, now) {
                relays.insert(id.clone(), k.record.clone());
            }
        }
        LiveSet {
            ring: Ring::new(relays.keys().cloned()),
            relays,
        }
    }

    /// What this relay gossips: itself and the relays it is linked to.
    pub(crate) fn gossip(&self) -> Vec<RelayRecord> {
        let mut v = vec![self.me.clone()];
        v.extend(
            self.links
                .keys()
                .filter_map(|id| self.known.get(id).map(|k| k.record.clone())),
        );
        v
    }

    /// Known relays this relay should dial: not linked, and of a higher id
    /// (the lower id dials, so each pair has one link).
    pub(crate) fn dial_targets(&self) -> Vec<RelayRecord> {
        self.known
            .values()
            .filter(|k| self.me.id < k.record.id && !self.links.contains_key(&k.record.id))
            .map(|k| k.record.clone())
            .collect()
    }

    /// Relays remembered (for the fuzz checks).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn known_len(&self) -> usize {
        self.known.len()
    }

    /// Whether a link to `id` is up.
    pub(crate) fn linked(&self, id: &str) -> bool {
        self.links.contains_key(id)
    }

    /// Links up now.
    #[cfg(test)]
    pub(crate) fn links(&self) -> usize {
        self.links.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, incarnation: u64) -> RelayRecord {
        RelayRecord {
            id: id.into(),
            addrs: vec![format!("{id}.example:7443")],
            fingerprint: format!("sha256:{id}{incarnation}"),
            incarnation,
        }
    }

    fn ids(m: &Membership, now: Instant) -> Vec<String> {
        m.live(now).ring.ids().to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn gossip_past_max_relays_is_not_remembered() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("me", 1));
        let many: Vec<RelayRecord> = (0..swb_wire::MAX_RELAYS + 100)
            .map(|i| rec(&format!("r{i:05}"), 1))
            .collect();
        assert!(m.merge(&many, t0));
        assert_eq!(m.known.len(), swb_wire::MAX_RELAYS);
        // Known relays still update; a new one still does not fit.
        assert!(m.merge(&[rec("r00000", 2)], t0));
        assert!(!m.merge(&[rec("zzz", 1)], t0));
        assert!(!m.known.contains_key("zzz"));
        assert!(m.gossip().len() <= swb_wire::MAX_RELAYS + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn join_by_gossip_then_link_then_leave() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("b", 1));
        assert_eq!(ids(&m, t0), ["b"]);
        // Learned by gossip: known and to be dialled only by the lower id.
        assert!(m.merge(&[rec("c", 1), rec("a", 1)], t0));
        assert_eq!(ids(&m, t0), ["b"], "known is not live");
        let dial: Vec<String> = m.dial_targets().into_iter().map(|r| r.id).collect();
        assert_eq!(dial, ["c"], "b dials c, a dials b");
        assert!(!m.merge(&[rec("c", 1)], t0), "nothing new");
        m.link_up(&rec("c", 1), t0);
        m.link_up(&rec("a", 1), t0);
        assert_eq!(ids(&m, t0), ["a", "b", "c"]);
        assert!(m.dial_targets().is_empty());
        let gossip: Vec<String> = m.gossip().into_iter().map(|r| r.id).collect();
        assert_eq!(gossip, ["b", "a", "c"]);
        // A graceful leave: out at once, the link stays for the handoff.
        m.leaving("c");
        assert_eq!(ids(&m, t0), ["a", "b"]);
        assert!(m.linked("c"));
        m.link_down("c", t0);
        assert_eq!(m.links(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_link_is_dead_after_the_idle_time_and_alive_when_heard_again() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("a", 1));
        m.link_up(&rec("b", 1), t0);
        m.link_up(&rec("c", 1), t0);
        // b keeps talking, c goes silent.
        let mut t = t0;
        while t < t0 + MESH_IDLE {
            t += MESH_KEEPALIVE;
            m.heard("b", t);
        }
        assert_eq!(
            ids(&m, t0 + MESH_IDLE),
            ["a", "b", "c"],
            "c within the idle time"
        );
        let later = t0 + MESH_IDLE + Duration::from_millis(1);
        assert_eq!(ids(&m, later), ["a", "b"], "c dead after it");
        m.heard("c", later);
        assert_eq!(ids(&m, later), ["a", "b", "c"], "c back once heard");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_link_ends_in_the_state_of_its_last_event() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("a", 1));
        let mut t = t0;
        for round in 0..50 {
            t += Duration::from_millis(10);
            m.link_up(&rec("b", 1), t);
            assert_eq!(ids(&m, t), ["a", "b"], "up, round {round}");
            t += Duration::from_millis(10);
            m.link_down("b", t);
            assert_eq!(ids(&m, t), ["a"], "down, round {round}");
        }
        // Its record is kept for a redial, and only dialled once.
        assert_eq!(m.dial_targets().len(), 1);
        m.link_up(&rec("b", 1), t);
        assert_eq!(ids(&m, t), ["a", "b"]);
        assert_eq!(m.links(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_gossip_cannot_undo_a_restart() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("a", 1));
        m.link_up(&rec("b", 1), t0);
        // b restarts with a new certificate (a new incarnation).
        m.link_down("b", t0);
        m.link_up(&rec("b", 2), t0);
        // Another relay still gossips b's old record.
        assert!(!m.merge(&[rec("b", 1)], t0));
        let live = m.live(t0);
        assert_eq!(live.relays["b"], rec("b", 2));
        // A newer record from gossip is taken.
        assert!(m.merge(&[rec("b", 3)], t0));
        assert_eq!(m.live(t0).relays["b"].incarnation, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn records_nobody_gossips_age_out_linked_ones_never() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("a", 1));
        m.merge(&[rec("dead", 1), rec("z", 1)], t0);
        m.link_up(&rec("b", 1), t0);
        // z is still gossiped now and then; dead is not.
        m.merge(&[rec("z", 1)], t0 + RECORD_TTL / 2);
        assert!(m.expire(t0 + RECORD_TTL).is_empty());
        let gone = m.expire(t0 + RECORD_TTL + Duration::from_secs(1));
        assert_eq!(gone, ["dead"]);
        assert!(m.dial_targets().iter().all(|r| r.id != "dead"));
        // A linked relay is never forgotten, however long ago its record came.
        assert!(m.expire(t0 + RECORD_TTL * 10).iter().all(|id| id != "b"));
        assert!(m.linked("b"));
        // A link that goes down starts its record's clock then.
        let t = t0 + RECORD_TTL * 10;
        m.link_down("b", t);
        assert!(m.expire(t + RECORD_TTL / 2).iter().all(|id| id != "b"));
        assert!(m.expire(t + RECORD_TTL * 2).contains(&"b".to_string()));
    }
}
