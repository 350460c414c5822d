//! Placement: which relay is home of a peer, and which relays are live.
//! A leaf: it knows the ring and this relay's record, nothing of sockets,
//! doors or links. The mesh publishes the live set here; everyone else
//! reads it.

use std::collections::BTreeMap;
use std::sync::Arc;
use swb_ring::Ring;
use swb_wire::{RelayMap, RelayRecord};
use tokio::sync::watch;

/// The relays this relay can reach now (itself included) and the ring
/// over them.
#[derive(Debug, Clone)]
pub struct LiveSet {
    /// Placement over the live relays.
    pub ring: Ring,
    /// Their records, by id.
    pub relays: BTreeMap<String, RelayRecord>,
    /// The same records in the ring's order, shared: a route is an index
    /// and a count, not a map lookup and a copy of the record's strings.
    by_index: Vec<Arc<RelayRecord>>,
}

impl LiveSet {
    /// These relays and the ring over them.
    pub(crate) fn new(relays: BTreeMap<String, RelayRecord>) -> Self {
        let ring = Ring::new(relays.keys().cloned());
        // The ring's ids are the map's keys, sorted as the map sorts them.
        let by_index = relays.values().cloned().map(Arc::new).collect();
        Self {
            ring,
            relays,
            by_index,
        }
    }

    /// Just `me`.
    pub(crate) fn alone(me: &RelayRecord) -> Self {
        Self::new([(me.id.clone(), me.clone())].into())
    }
}

/// This relay's view of placement.
#[derive(Debug)]
pub(crate) struct Placement {
    me: RelayRecord,
    live: watch::Sender<Arc<LiveSet>>,
}

impl Placement {
    pub(crate) fn new(me: RelayRecord) -> Self {
        let live = watch::Sender::new(Arc::new(LiveSet::alone(&me)));
        Self { me, live }
    }

    /// This relay as daemons and other relays reach it.
    pub(crate) fn me(&self) -> &RelayRecord {
        &self.me
    }

    /// The live set now.
    pub(crate) fn live_now(&self) -> Arc<LiveSet> {
        self.live.borrow().clone()
    }

    /// Subscribes to live-set changes.
    pub(crate) fn live(&self) -> watch::Receiver<Arc<LiveSet>> {
        self.live.subscribe()
    }

    /// Installs a new live set; true if its ring differs from the last.
    pub(crate) fn publish(&self, live: LiveSet) -> bool {
        let changed = self.live.borrow().ring != live.ring;
        if changed {
            // The membership task zeroes the new ring's home cache, not
            // the first session to route by it.
            live.ring.make_cache();
            self.live.send_replace(Arc::new(live));
        }
        changed
    }

    /// The record of the home relay of `(ns, name)` if that is not this relay.
    pub(crate) fn home_elsewhere(&self, ns: &str, name: &str) -> Option<Arc<RelayRecord>> {
        self.home_elsewhere_in(&self.live.borrow(), ns, name)
    }

    /// [`Self::home_elsewhere`] in the live set `live` (one a caller
    /// holds: see [`Seen`]).
    pub(crate) fn home_elsewhere_in(
        &self,
        live: &LiveSet,
        ns: &str,
        name: &str,
    ) -> Option<Arc<RelayRecord>> {
        let home = live.by_index.get(live.ring.home_at(ns, name)?)?;
        (home.id != self.me.id).then(|| home.clone())
    }

    /// The live relays for daemons, in pages that each fit a frame.
    pub(crate) fn relay_map(&self) -> Vec<RelayMap> {
        let live = self.live.borrow();
        let relays: Vec<RelayRecord> = live.relays.values().cloned().collect();
        RelayMap::pages(&relays)
    }

    /// Ids of the live relays, sorted.
    pub(crate) fn live_ids(&self) -> Vec<String> {
        self.live.borrow().ring.ids().to_vec()
    }
}

/// The live set a session last saw, beside its receiver of changes: it
/// answers where a send goes while no newer set is published. Checking
/// that is a load of the watch's version; borrowing the watch takes its
/// lock, whose count every sending session on every core would write per
/// message.
#[derive(Debug)]
pub(crate) struct Seen(Arc<LiveSet>);

impl Seen {
    /// The set `rx` holds now (its version not marked seen: the owner's
    /// `changed()` still reports it).
    pub(crate) fn new(rx: &watch::Receiver<Arc<LiveSet>>) -> Self {
        Self(rx.borrow().clone())
    }

    /// Takes the set `rx` holds now; called once its `changed()` fired.
    pub(crate) fn refresh(&mut self, rx: &watch::Receiver<Arc<LiveSet>>) {
        self.0 = rx.borrow().clone();
    }

    /// The set to route by: this one, unless `rx` has a newer one not yet
    /// taken (then `None`: ask the placement).
    pub(crate) fn current(&self, rx: &watch::Receiver<Arc<LiveSet>>) -> Option<&LiveSet> {
        match rx.has_changed() {
            Ok(false) => Some(&self.0),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> RelayRecord {
        RelayRecord {
            id: id.into(),
            addrs: vec![format!("{id}.example:7000")],
            fingerprint: String::new(),
            incarnation: 1,
        }
    }

    fn set(ids: &[&str]) -> LiveSet {
        LiveSet::new(ids.iter().map(|id| (id.to_string(), record(id))).collect())
    }

    #[test]
    fn a_route_names_the_record_of_the_ring_home() {
        // Ids whose map order and insertion order differ, past the size
        // where the ring caches homes.
        let ids: Vec<String> = (0..40).map(|i| format!("r{}", 97 * i % 40)).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let p = Placement::new(record("r0"));
        p.publish(set(&refs));
        let live = p.live_now();
        let mut away = 0;
        for i in 0..500 {
            let n = format!("peer{i}");
            let home = live.ring.home("ns", &n).expect("a home");
            match p.home_elsewhere("ns", &n) {
                Some(r) => {
                    assert_eq!(r.id, home, "{n}");
                    assert_eq!(*r, live.relays[home]);
                    away += 1;
                }
                None => assert_eq!(home, "r0", "{n}"),
            }
        }
        assert!(away > 400, "only {away} of 500 homed elsewhere");
    }

    #[test]
    fn a_seen_live_set_routes_until_a_newer_one_is_published() {
        let p = Placement::new(record("a"));
        let mut rx = p.live();
        let mut seen = Seen::new(&rx);
        // Alone, every name is at home here.
        let names: Vec<String> = (0..64).map(|i| format!("peer{i}")).collect();
        let live = seen.current(&rx).expect("nothing newer yet");
        assert!(names
            .iter()
            .all(|n| p.home_elsewhere_in(live, "ns", n).is_none()));
        // A second relay: the seen set is stale at once, before the
        // session took it — routing must then ask the placement.
        assert!(p.publish(set(&["a", "b"])));
        assert!(seen.current(&rx).is_none(), "a stale set was used");
        let elsewhere: Vec<&String> = names
            .iter()
            .filter(|n| p.home_elsewhere("ns", n).is_some())
            .collect();
        assert!(!elsewhere.is_empty(), "b is home of none of 64 names");
        // Taken (as the session does once `changed()` fired): the seen set
        // answers as the placement does.
        rx.borrow_and_update();
        seen.refresh(&rx);
        let live = seen.current(&rx).expect("up to date");
        for n in &names {
            assert_eq!(
                p.home_elsewhere_in(live, "ns", n),
                p.home_elsewhere("ns", n),
                "{n}"
            );
        }
    }
}
