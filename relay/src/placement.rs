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
}

impl LiveSet {
    /// Just `me`.
    pub(crate) fn alone(me: &RelayRecord) -> Self {
        Self {
            ring: Ring::new([me.id.clone()]),
            relays: [(me.id.clone(), me.clone())].into(),
        }
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
            self.live.send_replace(Arc::new(live));
        }
        changed
    }

    /// The record of the home relay of `(ns, name)` if that is not this relay.
    pub(crate) fn home_elsewhere(&self, ns: &str, name: &str) -> Option<RelayRecord> {
        let live = self.live.borrow();
        let home = live.ring.home(ns, name)?;
        if home == self.me.id {
            return None;
        }
        live.relays.get(home).cloned()
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
