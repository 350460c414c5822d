//! Messages delivered by the relay and not yet acknowledged by the
//! application. A message is known by its sender and id; duplicates are
//! dropped (the relay redelivers everything unacknowledged after a
//! reconnect), and two senders' messages that happen to share an id are
//! two messages.

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use swb_wire::{Deliver, MessageId};

/// A message's identity: the id its sender gave it, and the sender. Equal
/// when both are (the id compared first); hashed by the id alone, which is
/// 16 random bytes, with a per-process random key — no sender can aim at
/// one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) id: MessageId,
    pub(crate) from: String,
}

impl Hash for Identity {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.id.hash(h);
    }
}

impl Identity {
    /// The identity of a message given up (no copy of its sender's name).
    pub(crate) fn of(d: Deliver) -> Self {
        Self {
            id: d.id,
            from: d.from,
        }
    }
}

fn identity(d: &Deliver) -> Identity {
    Identity {
        id: d.id,
        from: d.from.clone(),
    }
}

type Set = HashSet<Identity, ahash::RandomState>;

/// How many acknowledged ids are remembered to recognise a late redelivery.
const ACKED_MEMORY: usize = 16 * 1024;

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
    acked: Set,
    acked_order: VecDeque<Identity>,
}

impl Inbox {
    pub(crate) fn push(&mut self, d: Deliver) -> Pushed {
        let who = identity(&d);
        if self.acked.contains(&who) {
            return Pushed::Reack;
        }
        if !self.known.insert(who) {
            return Pushed::Duplicate;
        }
        self.queue.push_back(d);
        Pushed::New
    }

    /// Takes up to `max` messages; they stay known until acked or given back.
    pub(crate) fn take(&mut self, max: usize) -> Vec<Deliver> {
        let n = max.min(self.queue.len());
        self.queue.drain(..n).collect()
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
            if self.acked.insert(who.clone()) {
                self.acked_order.push_back(who);
            }
        }
        while self.acked_order.len() > ACKED_MEMORY {
            if let Some(old) = self.acked_order.pop_front() {
                self.acked.remove(&old);
            }
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
        i.acked([identity(&taken[0])]);
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
        i.acked([identity(&d(1))]);
        assert_eq!(i.push(other), Pushed::Duplicate, "b's is still held");
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
