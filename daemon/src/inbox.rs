//! Messages delivered by the relay and not yet acknowledged by the
//! application. Drops duplicates by id: the relay redelivers everything
//! unacknowledged after a reconnect.

use std::collections::{HashSet, VecDeque};
use swb_wire::{Deliver, MessageId};

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
    known: HashSet<MessageId>,
    acked: HashSet<MessageId>,
    acked_order: VecDeque<MessageId>,
}

impl Inbox {
    pub(crate) fn push(&mut self, d: Deliver) -> Pushed {
        if self.acked.contains(&d.id) {
            return Pushed::Reack;
        }
        if !self.known.insert(d.id) {
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

    /// Marks ids acknowledged.
    pub(crate) fn acked(&mut self, ids: &[MessageId]) {
        for id in ids {
            self.known.remove(id);
            if self.acked.insert(*id) {
                self.acked_order.push_back(*id);
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
        i.acked(&[taken[0].id]);
        assert_eq!(i.push(d(1)), Pushed::Reack);
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
