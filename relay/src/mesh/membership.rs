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
//! - Each relay also says which relays **it** hears (its gossip: itself
//!   and its live links, sent whenever that set changes). A relay not
//!   linked here, or whose link here is broken while others hear it, is
//!   live while a live neighbour claims it: reachable in two hops. With a
//!   full mesh that is a detour around one broken link; past
//!   `--full-mesh-max` relays (the grid of [`swb_ring::Grid`]) it is how
//!   a relay knows the ~N − 2√N relays it has no link to.
//! - The lower id dials the higher: [`Membership::dial_targets`] — every
//!   known relay up to `full_mesh_max` live relays, past that only the
//!   grid's links of this relay; links the grid no longer wants are
//!   [`Membership::surplus`].

use crate::placement::LiveSet;
use std::collections::BTreeMap;
use std::time::Duration;
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
    /// What each linked relay last said it hears (its gossip, whole).
    claims: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Live relays past which links follow the grid.
    full_mesh_max: usize,
    /// The ids of this relay's last gossip (see [`Membership::gossip_changed`]).
    last_gossip: Vec<String>,
}

impl Membership {
    pub(crate) fn new(me: RelayRecord, full_mesh_max: usize) -> Self {
        Self {
            me,
            known: BTreeMap::new(),
            links: BTreeMap::new(),
            claims: BTreeMap::new(),
            full_mesh_max,
            last_gossip: Vec::new(),
        }
    }

    /// `id`'s whole gossip arrived on its link: the relays it hears. Its
    /// records are merged; whether anything new was learned.
    pub(crate) fn claimed(&mut self, id: &str, records: &[RelayRecord], now: Instant) -> bool {
        let new = self.merge(records, now);
        if self.links.contains_key(id) {
            let heard = records
                .iter()
                .filter(|r| r.id != id && r.id != self.me.id && !r.id.is_empty())
                .map(|r| r.id.clone())
                .take(swb_wire::MAX_RELAYS)
                .collect();
            self.claims.insert(id.to_string(), heard);
        }
        new
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
        // A new link starts with the relay's whole gossip.
        self.claims.remove(&record.id);
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

    /// What `id` hears changed (a delta after its whole gossip): records
    /// merged; whether anything new was learned.
    pub(crate) fn claims_changed(
        &mut self,
        id: &str,
        add: &[RelayRecord],
        remove: &[String],
        now: Instant,
    ) -> bool {
        let new = self.merge(add, now);
        if let Some(heard) = self.claims.get_mut(id) {
            for r in remove {
                heard.remove(r);
            }
            // Bounded like the records: at most MAX_RELAYS per neighbour.
            let room = swb_wire::MAX_RELAYS.saturating_sub(heard.len());
            heard.extend(
                add.iter()
                    .filter(|r| r.id != id && r.id != self.me.id && !r.id.is_empty())
                    .map(|r| r.id.clone())
                    .take(room),
            );
        }
        new
    }

    /// The link to `id` ended.
    pub(crate) fn link_down(&mut self, id: &str, now: Instant) {
        self.claims.remove(id);
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
        self.claims.remove(id);
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

    /// Linked, heard within [`MESH_IDLE`], and not leaving.
    pub(crate) fn is_live(&self, id: &str, now: Instant) -> bool {
        self.links
            .get(id)
            .is_some_and(|l| !l.leaving && now.saturating_duration_since(l.heard) <= MESH_IDLE)
    }

    /// This relay and every relay live now, with the ring over them: the
    /// live links, and the relays a live neighbour hears (unless they told
    /// this relay they are leaving).
    pub(crate) fn live(&self, now: Instant) -> LiveSet {
        let mut heard: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
        for (n, ids) in &self.claims {
            if self.is_live(n, now) {
                heard.extend(ids.iter().map(String::as_str));
            }
        }
        let mut relays: BTreeMap<String, RelayRecord> = BTreeMap::new();
        relays.insert(self.me.id.clone(), self.me.clone());
        for (id, k) in &self.known {
            let claimed =
                heard.contains(id.as_str()) && !self.links.get(id).is_some_and(|l| l.leaving);
            if claimed || self.is_live(id, now) {
                relays.insert(id.clone(), k.record.clone());
            }
        }
        LiveSet::new(relays)
    }

    /// A live neighbour that hears `to`, for a two-hop path when this
    /// relay has no live link to it (`None` when none does). Among
    /// several, the same one each time (the first by id), so one sender's
    /// calls keep one path while it works.
    pub(crate) fn via(&self, to: &str, now: Instant) -> Option<String> {
        self.claims
            .iter()
            .find(|(n, heard)| n.as_str() != to && heard.contains(to) && self.is_live(n, now))
            .map(|(n, _)| n.clone())
    }

    /// What this relay gossips: itself and the relays it hears now (live
    /// links, not leaving).
    pub(crate) fn gossip(&self, now: Instant) -> Vec<RelayRecord> {
        let mut v = vec![self.me.clone()];
        v.extend(
            self.links
                .keys()
                .filter(|id| self.is_live(id, now))
                .filter_map(|id| self.known.get(id).map(|k| k.record.clone())),
        );
        v
    }

    /// Whether this relay's gossip differs from the last time this was
    /// asked (then it is sent again).
    pub(crate) fn gossip_changed(&mut self, now: Instant) -> bool {
        let ids: Vec<String> = self.gossip(now).into_iter().map(|r| r.id).collect();
        if ids == self.last_gossip {
            return false;
        }
        self.last_gossip = ids;
        true
    }

    /// The relays this relay should be linked to now: every known relay
    /// while at most `full_mesh_max` are live, else its grid links over
    /// the live set. `None`: every known relay (a full mesh).
    fn wanted(&self, now: Instant) -> Option<std::collections::BTreeSet<String>> {
        let live = self.live(now);
        if live.ring.len() <= self.full_mesh_max {
            return None;
        }
        let ids = live.ring.ids();
        let grid = swb_ring::Grid::new(&live.ring);
        let me = ids.iter().position(|id| *id == self.me.id)?;
        Some(
            grid.links(me as u32)
                .into_iter()
                .filter_map(|i| ids.get(i as usize).cloned())
                .collect(),
        )
    }

    /// Known relays this relay should dial: wanted, not linked, and of a
    /// higher id (the lower id dials, so each pair has one link).
    pub(crate) fn dial_targets(&self, now: Instant) -> Vec<RelayRecord> {
        let wanted = self.wanted(now);
        self.known
            .values()
            .filter(|k| self.me.id < k.record.id && !self.links.contains_key(&k.record.id))
            .filter(|k| wanted.as_ref().is_none_or(|w| w.contains(&k.record.id)))
            .map(|k| k.record.clone())
            .collect()
    }

    /// Linked relays the grid does not want now (none with a full mesh):
    /// closed once idle for a while, so a mesh that grows past
    /// `full_mesh_max` thins to the grid without cutting a stream.
    pub(crate) fn surplus(&self, now: Instant) -> Vec<String> {
        match self.wanted(now) {
            None => Vec::new(),
            Some(w) => self
                .links
                .keys()
                .filter(|id| !w.contains(*id))
                .cloned()
                .collect(),
        }
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
        let mut m = Membership::new(rec("me", 1), 1000);
        let many: Vec<RelayRecord> = (0..swb_wire::MAX_RELAYS + 100)
            .map(|i| rec(&format!("r{i:05}"), 1))
            .collect();
        assert!(m.merge(&many, t0));
        assert_eq!(m.known.len(), swb_wire::MAX_RELAYS);
        // Known relays still update; a new one still does not fit.
        assert!(m.merge(&[rec("r00000", 2)], t0));
        assert!(!m.merge(&[rec("zzz", 1)], t0));
        assert!(!m.known.contains_key("zzz"));
        assert!(m.gossip(t0).len() <= swb_wire::MAX_RELAYS + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn join_by_gossip_then_link_then_leave() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("b", 1), 1000);
        assert_eq!(ids(&m, t0), ["b"]);
        // Learned by gossip: known and to be dialled only by the lower id.
        assert!(m.merge(&[rec("c", 1), rec("a", 1)], t0));
        assert_eq!(ids(&m, t0), ["b"], "known is not live");
        let dial: Vec<String> = m.dial_targets(t0).into_iter().map(|r| r.id).collect();
        assert_eq!(dial, ["c"], "b dials c, a dials b");
        assert!(!m.merge(&[rec("c", 1)], t0), "nothing new");
        m.link_up(&rec("c", 1), t0);
        m.link_up(&rec("a", 1), t0);
        assert_eq!(ids(&m, t0), ["a", "b", "c"]);
        assert!(m.dial_targets(t0).is_empty());
        let gossip: Vec<String> = m.gossip(t0).into_iter().map(|r| r.id).collect();
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
        let mut m = Membership::new(rec("a", 1), 1000);
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
        let mut m = Membership::new(rec("a", 1), 1000);
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
        assert_eq!(m.dial_targets(t0).len(), 1);
        m.link_up(&rec("b", 1), t);
        assert_eq!(ids(&m, t), ["a", "b"]);
        assert_eq!(m.links(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_gossip_cannot_undo_a_restart() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("a", 1), 1000);
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
        let mut m = Membership::new(rec("a", 1), 1000);
        m.merge(&[rec("dead", 1), rec("z", 1)], t0);
        m.link_up(&rec("b", 1), t0);
        // z is still gossiped now and then; dead is not.
        m.merge(&[rec("z", 1)], t0 + RECORD_TTL / 2);
        assert!(m.expire(t0 + RECORD_TTL).is_empty());
        let gone = m.expire(t0 + RECORD_TTL + Duration::from_secs(1));
        assert_eq!(gone, ["dead"]);
        assert!(m.dial_targets(t0).iter().all(|r| r.id != "dead"));
        // A linked relay is never forgotten, however long ago its record came.
        assert!(m.expire(t0 + RECORD_TTL * 10).iter().all(|id| id != "b"));
        assert!(m.linked("b"));
        // A link that goes down starts its record's clock then.
        let t = t0 + RECORD_TTL * 10;
        m.link_down("b", t);
        assert!(m.expire(t + RECORD_TTL / 2).iter().all(|id| id != "b"));
        assert!(m.expire(t + RECORD_TTL * 2).contains(&"b".to_string()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_a_neighbour_hears_is_live_through_it_until_the_neighbour_is_not() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("a", 1), 1000);
        m.link_up(&rec("b", 1), t0);
        // b hears c; a has no link to c.
        m.claimed("b", &[rec("b", 1), rec("c", 1), rec("a", 1)], t0);
        assert_eq!(ids(&m, t0), ["a", "b", "c"]);
        assert_eq!(m.via("c", t0).as_deref(), Some("b"));
        assert_eq!(m.via("b", t0), None, "b is reached on its own link");
        // b stops hearing c: c is gone.
        m.claimed("b", &[rec("b", 1)], t0);
        assert_eq!(ids(&m, t0), ["a", "b"]);
        assert_eq!(m.via("c", t0), None);
        // b hears c again, then b's link goes silent: c goes with it.
        m.claimed("b", &[rec("b", 1), rec("c", 1)], t0);
        let later = t0 + MESH_IDLE + Duration::from_millis(1);
        assert_eq!(ids(&m, later), ["a"]);
        assert_eq!(m.via("c", later), None);
        // A relay that told us it is leaving is not live through others.
        m.heard("b", later);
        m.link_up(&rec("c", 1), later);
        m.leaving("c");
        assert_eq!(ids(&m, later), ["a", "b"]);
        // Claims of a relay whose link went down are dropped.
        m.link_down("b", later);
        assert!(m.claims.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn gossip_lists_only_live_links_and_says_when_it_changed() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("a", 1), 1000);
        m.link_up(&rec("b", 1), t0);
        m.link_up(&rec("c", 1), t0);
        assert!(m.gossip_changed(t0));
        assert!(!m.gossip_changed(t0), "asked again: no change");
        let later = t0 + MESH_IDLE + Duration::from_millis(1);
        m.heard("b", later);
        let g: Vec<String> = m.gossip(later).into_iter().map(|r| r.id).collect();
        assert_eq!(g, ["a", "b"], "silent c is not claimed");
        assert!(m.gossip_changed(later));
    }

    #[tokio::test(start_paused = true)]
    async fn past_full_mesh_max_a_relay_dials_only_its_grid_links() {
        let t0 = Instant::now();
        let all: Vec<RelayRecord> = (0..9).map(|i| rec(&format!("r{i}"), 1)).collect();
        let ring = swb_ring::Ring::new(all.iter().map(|r| r.id.clone()));
        let grid = swb_ring::Grid::new(&ring);
        for me in 0..9u32 {
            let mut m = Membership::new(all[me as usize].clone(), 4);
            // Linked to one relay that hears every other.
            let hub = if me == 0 { 1 } else { 0 };
            m.link_up(&all[hub], t0);
            m.claimed(&all[hub].id, &all, t0);
            assert_eq!(m.live(t0).ring.len(), 9);
            let want: std::collections::BTreeSet<String> = grid
                .links(me)
                .into_iter()
                .map(|i| all[i as usize].id.clone())
                .collect();
            let dial: std::collections::BTreeSet<String> =
                m.dial_targets(t0).into_iter().map(|r| r.id).collect();
            let higher: std::collections::BTreeSet<String> = want
                .iter()
                .filter(|id| id.as_str() > all[me as usize].id.as_str() && **id != all[hub].id)
                .cloned()
                .collect();
            assert_eq!(dial, higher, "relay {me}: the grid's links of a higher id");
            assert!(want.len() <= 2 * 3, "relay {me}: {want:?}");
            // The hub is surplus unless the grid wants it.
            assert_eq!(
                m.surplus(t0).contains(&all[hub].id),
                !want.contains(&all[hub].id)
            );
        }
        // At most full_mesh_max live: everyone is dialled, nothing surplus.
        let mut m = Membership::new(all[0].clone(), 9);
        m.link_up(&all[1], t0);
        m.claimed(&all[1].id, &all, t0);
        assert_eq!(m.dial_targets(t0).len(), 7);
        assert!(m.surplus(t0).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_neighbours_changes_apply_on_top_of_its_whole_gossip() {
        let t0 = Instant::now();
        let mut m = Membership::new(rec("a", 1), 1000);
        m.link_up(&rec("b", 1), t0);
        // A delta before any whole map changes nothing it hears.
        m.claims_changed("b", &[rec("c", 1)], &[], t0);
        assert_eq!(ids(&m, t0), ["a", "b"]);
        m.claimed("b", &[rec("b", 1), rec("c", 1)], t0);
        assert_eq!(ids(&m, t0), ["a", "b", "c"]);
        assert!(m.claims_changed("b", &[rec("d", 1)], &["c".into()], t0));
        assert_eq!(ids(&m, t0), ["a", "b", "d"]);
        assert!(
            !m.claims_changed("b", &[], &["d".into()], t0),
            "nothing new"
        );
        assert_eq!(ids(&m, t0), ["a", "b"]);
    }
}
