//! Messages delivered by the relay and not yet acknowledged by the
//! application. A message is known by its sender and id; duplicates are
//! dropped (the relay redelivers everything unacknowledged after a
//! reconnect), and two senders' messages that happen to share an id are
//! two messages.

use std::collections::{HashSet, VecDeque};
use std::sync::OnceLock;
use swb_wire::{Deliver, MessageId};

/// A message's identity: the id its sender gave it, and its sender — as a
/// 64-bit hash of the name under a key drawn once per process, so an
/// identity is 24 bytes, copied and compared without touching the name.
/// Two senders' names meet in it with probability 2⁻⁶⁴ per pair, and only
/// with the same id as well; no sender can aim at another's (the key is
/// secret and random). Hashed with a per-process random key too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Identity {
    pub(crate) id: MessageId,
    from: u64,
}

impl Identity {
    pub(crate) fn of(d: &Deliver) -> Self {
        static KEY: OnceLock<ahash::RandomState> = OnceLock::new();
        Self {
            id: d.id,
            from: KEY.get_or_init(ahash::RandomState::new).hash_one(&d.from),
        }
    }
}

type Set = HashSet<Identity, ahash::RandomState>;

/// Acknowledged identities are remembered, to recognise a late redelivery,
/// in two generations of this many: the newest between this many and
/// twice as many.
const ACKED_GENERATION: usize = 16 * 1024;

/// What [`Inbox::push`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// New message, queued.
    New,
    /// Already queued or leased.
    Duplicate,
    /// Already acknowledged: the ack was lost, acknowledge again.
    Reack,
}

#[derive(Debug, Default)]
pub(crate) struct Inbox {
    queue: VecDeque<Deliver>,
    /// Queued or leased to a control connection.
    known: Set,
    /// Acknowledged, newest generation; `acked_old` is the one before.
    acked: Set,
    acked_old: Set,
}

impl Inbox {
    pub(crate) fn push(&mut self, d: Deliver) -> Pushed {
        let who = Identity::of(&d);
        if self.acked.contains(&who) || self.acked_old.contains(&who) {
            return Pushed::Reack;
        }
        if !self.known.insert(who) {
            return Pushed::Duplicate;
        }
        self.queue.push_back(d);
        Pushed::New
    }

    /// Takes up to `max` messages; they stay known until acked or given back.
    #[cfg(test)]
    pub(crate) fn take(&mut self, max: usize) -> Vec<Deliver> {
        let mut v = Vec::new();
        self.take_into(&mut v, max);
        v
    }

    /// Moves up to `max` messages to the end of `into` (a reader's leased
    /// ones: no batch of its own in between); returns how many.
    pub(crate) fn take_into(&mut self, into: &mut Vec<Deliver>, max: usize) -> usize {
        let n = max.min(self.queue.len());
        into.extend(self.queue.drain(..n));
        n
    }

    /// Returns leased messages to the front, in their order.
    pub(crate) fn give_back(&mut self, msgs: Vec<Deliver>) {
        for d in msgs.into_iter().rev() {
            self.queue.push_front(d);
        }
    }

    /// Marks messages acknowledged.
    pub(crate) fn acked(&mut self, msgs: impl IntoIterator<Item = Identity>) {
        for who in msgs {
            self.known.remove(&who);
            if self.acked.len() >= ACKED_GENERATION {
                // The older generation goes; its table is reused.
                std::mem::swap(&mut self.acked, &mut self.acked_old);
                self.acked.clear();
            }
            self.acked.insert(who);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn d(n: u8) -> Deliver {
        Deliver {
            id: MessageId([n; 16]),
            from: "a".into(),
            body: Bytes::from_static(b"x"),
            sent_at_ms: 0,
        }
    }

    #[test]
    fn duplicates_are_dropped_and_acked_ids_reacked() {
        let mut i = Inbox::default();
        assert_eq!(i.push(d(1)), Pushed::New);
        assert_eq!(i.push(d(1)), Pushed::Duplicate);
        let taken = i.take(10);
        assert_eq!(i.push(d(1)), Pushed::Duplicate, "leased is still known");
        i.acked([Identity::of(&taken[0])]);
        assert_eq!(i.push(d(1)), Pushed::Reack);
    }

    #[test]
    fn another_senders_message_with_the_same_id_is_another_message() {
        let mut i = Inbox::default();
        let mut other = d(1);
        other.from = "b".into();
        assert_eq!(i.push(d(1)), Pushed::New);
        assert_eq!(i.push(other.clone()), Pushed::New);
        assert_eq!(i.len(), 2);
        i.acked([Identity::of(&d(1))]);
        assert_eq!(i.push(other), Pushed::Duplicate, "b's is still held");
    }

    #[test]
    fn acked_ids_are_remembered_for_at_least_a_generation() {
        let mut i = Inbox::default();
        let msg = |n: usize| Deliver {
            id: MessageId(u128::to_be_bytes(n as u128)),
            from: "a".into(),
            body: Bytes::new(),
            sent_at_ms: 0,
        };
        let ack = |i: &mut Inbox, r: std::ops::Range<usize>| {
            i.acked(r.map(|n| Identity::of(&msg(n))));
        };
        ack(&mut i, 0..ACKED_GENERATION);
        assert_eq!(i.push(msg(0)), Pushed::Reack);
        // A generation later the first is still there (in the old one)…
        ack(&mut i, ACKED_GENERATION..2 * ACKED_GENERATION);
        assert_eq!(i.push(msg(0)), Pushed::Reack);
        assert_eq!(i.push(msg(ACKED_GENERATION)), Pushed::Reack);
        // …and goes with the next; what is not remembered is new again.
        ack(&mut i, 2 * ACKED_GENERATION..2 * ACKED_GENERATION + 1);
        assert_eq!(i.push(msg(0)), Pushed::New);
        assert_eq!(i.push(msg(2 * ACKED_GENERATION - 1)), Pushed::Reack);
        assert!(i.acked.len() + i.acked_old.len() <= 2 * ACKED_GENERATION);
    }

    #[test]
    fn give_back_keeps_order() {
        let mut i = Inbox::default();
        for n in 1..=3 {
            i.push(d(n));
        }
        let t = i.take(2);
        i.give_back(t);
        let all: Vec<u8> = i.take(10).iter().map(|m| m.id.0[0]).collect();
        assert_eq!(all, vec![1, 2, 3]);
    }
}
