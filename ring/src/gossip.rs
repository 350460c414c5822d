//! Membership for a mesh where relays are not all linked (the grid):
//! SWIM-style states spread by flooding over the links, as a pure state
//! machine (events and `now` in, updates to send out).
//!
//! - A relay watches only its own links. One that goes silent is
//!   *suspected*; the suspicion floods over every link (each relay passes a
//!   new update on to its links once, so it reaches all in at most the
//!   graph's diameter of hops).
//! - A relay that hears itself suspected *refutes*: it raises its
//!   incarnation and floods `Alive` — a relay cut off from one neighbour is
//!   not taken for dead by everyone else.
//! - A suspicion not refuted within [`SUSPECT_TIMEOUT`] becomes `Dead`.
//! - Updates order by (incarnation, state): a higher incarnation wins; at the
//!   same one `Dead` beats `Suspect` beats `Alive`. So a restarted relay
//!   (new incarnation) is never undone by news from before, and stale news
//!   never resurrects a dead one.
//!
//! Steady state sends nothing here (the links' keep-alives are the
//! heartbeat); an event costs each relay one update per link, so gossip
//! load grows with a relay's links, not with N².

use std::collections::HashMap;

/// A suspected relay that has not refuted within this long is dead (ms).
pub const SUSPECT_TIMEOUT_MS: u64 = 1500;

/// What one relay believes about another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// Alive.
    Alive,
    /// A neighbour lost its link to it; it has [`SUSPECT_TIMEOUT_MS`] to
    /// refute.
    Suspect,
    /// Gone (until it comes back with a higher incarnation).
    Dead,
}

/// News about relay `relay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Update {
    /// The relay the news is about.
    pub relay: u32,
    /// Its incarnation the news is of.
    pub incarnation: u64,
    /// What it says.
    pub state: State,
}

impl Update {
    /// Whether this news replaces `old` about the same relay.
    pub fn supersedes(&self, old: &Update) -> bool {
        (self.incarnation, self.state) > (old.incarnation, old.state)
    }
}

#[derive(Debug, Clone, Copy)]
struct Belief {
    update: Update,
    /// When a suspicion began (ms), to time it out.
    since: u64,
}

/// One relay's membership view.
#[derive(Debug, Clone)]
pub struct Node {
    me: u32,
    incarnation: u64,
    view: HashMap<u32, Belief>,
}

impl Node {
    /// Relay `me` at `incarnation` (its start time, say), knowing nothing.
    pub fn new(me: u32, incarnation: u64) -> Self {
        Self {
            me,
            incarnation,
            view: HashMap::new(),
        }
    }

    /// This relay's own news, for a relay it just linked to.
    pub fn own(&self) -> Update {
        Update {
            relay: self.me,
            incarnation: self.incarnation,
            state: State::Alive,
        }
    }

    /// What this relay believes about `relay`.
    pub fn state_of(&self, relay: u32) -> Option<State> {
        if relay == self.me {
            return Some(State::Alive);
        }
        self.view.get(&relay).map(|b| b.update.state)
    }

    /// Relays believed alive or suspected (still routed to), this one
    /// included.
    pub fn live(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.me).chain(
            self.view
                .iter()
                .filter(|(_, b)| b.update.state != State::Dead)
                .map(|(r, _)| *r),
        )
    }

    /// Takes news from a link; what to pass on to every link (the news
    /// itself when it was new, or this relay's refutation).
    pub fn apply(&mut self, u: Update, now_ms: u64) -> Option<Update> {
        if u.relay == self.me {
            // About me: anything but a current Alive is refuted.
            if u.state != State::Alive && u.incarnation >= self.incarnation {
                self.incarnation = u.incarnation + 1;
                return Some(self.own());
            }
            return None;
        }
        match self.view.get(&u.relay) {
            Some(b) if !u.supersedes(&b.update) => None,
            _ => {
                self.view.insert(
                    u.relay,
                    Belief {
                        update: u,
                        since: now_ms,
                    },
                );
                Some(u)
            }
        }
    }

    /// The link to `relay` went silent: suspect it (news to flood), unless
    /// it is already suspected or dead.
    pub fn link_lost(&mut self, relay: u32, now_ms: u64) -> Option<Update> {
        let incarnation = match self.view.get(&relay) {
            Some(b) if b.update.state != State::Alive => return None,
            Some(b) => b.update.incarnation,
            None => 0,
        };
        self.apply(
            Update {
                relay,
                incarnation,
                state: State::Suspect,
            },
            now_ms,
        )
    }

    /// Suspicions past [`SUSPECT_TIMEOUT_MS`] become deaths: news to flood.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Update> {
        let mut out = Vec::new();
        for b in self.view.values_mut() {
            if b.update.state == State::Suspect && now_ms >= b.since + SUSPECT_TIMEOUT_MS {
                b.update.state = State::Dead;
                b.since = now_ms;
                out.push(b.update);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(relay: u32, incarnation: u64, state: State) -> Update {
        Update {
            relay,
            incarnation,
            state,
        }
    }

    #[test]
    fn news_orders_by_incarnation_then_state() {
        assert!(u(1, 1, State::Suspect).supersedes(&u(1, 1, State::Alive)));
        assert!(u(1, 1, State::Dead).supersedes(&u(1, 1, State::Suspect)));
        assert!(u(1, 2, State::Alive).supersedes(&u(1, 1, State::Dead)));
        assert!(!u(1, 1, State::Alive).supersedes(&u(1, 1, State::Suspect)));
        assert!(!u(1, 0, State::Dead).supersedes(&u(1, 1, State::Alive)));
    }

    #[test]
    fn a_lost_link_is_suspected_then_dead_unless_refuted() {
        let mut a = Node::new(0, 5);
        assert_eq!(
            a.apply(u(1, 3, State::Alive), 0),
            Some(u(1, 3, State::Alive))
        );
        // Old news changes nothing and is not passed on.
        assert_eq!(a.apply(u(1, 2, State::Alive), 0), None);
        let s = a.link_lost(1, 100).expect("suspect");
        assert_eq!(s, u(1, 3, State::Suspect));
        assert_eq!(a.link_lost(1, 200), None, "already suspected");
        assert!(a.tick(100 + SUSPECT_TIMEOUT_MS - 1).is_empty());
        assert_eq!(a.live().count(), 2, "a suspect is still routed to");
        assert_eq!(a.tick(100 + SUSPECT_TIMEOUT_MS), vec![u(1, 3, State::Dead)]);
        assert_eq!(a.live().collect::<Vec<_>>(), vec![0]);
        // It comes back restarted: a higher incarnation.
        assert!(a.apply(u(1, 4, State::Alive), 5000).is_some());
        assert_eq!(a.state_of(1), Some(State::Alive));

        // Refuted in time: the suspicion is overtaken.
        let mut b = Node::new(0, 5);
        b.apply(u(2, 1, State::Alive), 0);
        b.link_lost(2, 0);
        let mut c = Node::new(2, 1);
        let refute = c.apply(u(2, 1, State::Suspect), 10).expect("refutes");
        assert_eq!(refute, u(2, 2, State::Alive));
        assert!(b.apply(refute, 20).is_some());
        assert!(b.tick(10_000).is_empty());
        assert_eq!(b.state_of(2), Some(State::Alive));
    }
}
