//! A mailbox's messages by sequence number. Sequence numbers only grow,
//! so a message is appended at the back; acknowledgements remove messages
//! anywhere, mostly near the front. A ring of slots in sequence order does
//! both without the per-message node work of a `BTreeMap` (which was ~5 %
//! of `swbd-bench rate`): a removed message leaves a hole until the front
//! reaches it, and holes are swept out once they outnumber the messages
//! (past a few), so the ring stays within about twice what it holds.

use std::collections::VecDeque;

/// Values by increasing `u64` key, inserted in key order.
#[derive(Debug)]
pub(crate) struct SeqMap<V> {
    /// In increasing key order; `None` is a removed entry's hole. The
    /// front is never a hole.
    ring: VecDeque<(u64, Option<V>)>,
    live: usize,
}

impl<V> Default for SeqMap<V> {
    fn default() -> Self {
        Self {
            ring: VecDeque::new(),
            live: 0,
        }
    }
}

/// A ring this small keeps its holes (sweeping it saves nothing).
const SWEEP_FLOOR: usize = 32;

impl<V> SeqMap<V> {
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Adds `v` under `seq`, which must be above every key held (callers
    /// count up); returns it back if it is not above the last.
    pub(crate) fn push(&mut self, seq: u64, v: V) -> Result<(), V> {
        if self.ring.back().is_some_and(|(last, _)| *last >= seq) {
            return Err(v);
        }
        self.ring.push_back((seq, Some(v)));
        self.live += 1;
        Ok(())
    }

    /// Where `seq` is in the ring: right at `seq - front` while no sweep
    /// moved it, else found by bisection.
    fn index(&self, seq: u64) -> Option<usize> {
        let front = self.ring.front()?.0;
        let guess = usize::try_from(seq.checked_sub(front)?).ok()?;
        if self.ring.get(guess).is_some_and(|(s, _)| *s == seq) {
            return Some(guess);
        }
        self.ring.binary_search_by_key(&seq, |(s, _)| *s).ok()
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&V> {
        self.ring.get(self.index(seq)?)?.1.as_ref()
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut V> {
        let i = self.index(seq)?;
        self.ring.get_mut(i)?.1.as_mut()
    }

    pub(crate) fn remove(&mut self, seq: u64) -> Option<V> {
        let i = self.index(seq)?;
        let v = self.ring.get_mut(i)?.1.take()?;
        self.live -= 1;
        while self.ring.front().is_some_and(|(_, v)| v.is_none()) {
            self.ring.pop_front();
        }
        if self.live == 0 {
            // An emptied mailbox keeps no ring (it may have held thousands).
            self.ring = VecDeque::new();
        } else if self.ring.len() > SWEEP_FLOOR && self.ring.len() > 2 * self.live {
            self.ring.retain(|(_, v)| v.is_some());
            self.ring.shrink_to(2 * self.live);
        }
        Some(v)
    }

    /// The entry with the lowest key.
    pub(crate) fn first(&self) -> Option<(u64, &V)> {
        let (s, v) = self.ring.front()?;
        Some((*s, v.as_ref()?))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.ring
            .iter()
            .filter_map(|(s, v)| v.as_ref().map(|v| (*s, v)))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut V)> {
        self.ring
            .iter_mut()
            .filter_map(|(s, v)| v.as_mut().map(|v| (*s, v)))
    }

    /// Entries with keys from `start` on.
    pub(crate) fn iter_from(&mut self, start: u64) -> impl Iterator<Item = (u64, &mut V)> {
        let skip = self.ring.partition_point(|(s, _)| *s < start);
        self.ring
            .range_mut(skip..)
            .filter_map(|(s, v)| v.as_mut().map(|v| (*s, v)))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.iter_mut().map(|(_, v)| v)
    }

    /// Slots the ring holds, holes included (for tests of its bound).
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.ring.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        /// Removes the key this far into the held ones (modulo their count).
        Remove(usize),
        /// Removes a key never pushed or already removed.
        RemoveMissing(u64),
        Get(usize),
        From(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Push),
            3 => (0usize..64).prop_map(Op::Remove),
            1 => (0u64..400).prop_map(Op::RemoveMissing),
            1 => (0usize..64).prop_map(Op::Get),
            1 => (0u64..400).prop_map(Op::From),
        ]
    }

    proptest! {
        /// Every operation agrees with a `BTreeMap`, and the ring never
        /// holds more holes than entries (past a few).
        #[test]
        fn behaves_as_a_btreemap(ops in proptest::collection::vec(op(), 1..600)) {
            let (mut m, mut model) = (SeqMap::default(), BTreeMap::new());
            let mut next = 0u64;
            for op in ops {
                match op {
                    Op::Push => {
                        // Sequence numbers may skip (a refused send).
                        next += 1 + next % 3;
                        prop_assert!(m.push(next, next * 10).is_ok());
                        model.insert(next, next * 10);
                        prop_assert_eq!(m.push(next, 0), Err(0), "a key not above the last");
                    }
                    Op::Remove(i) if !model.is_empty() => {
                        let k = *model.keys().nth(i % model.len()).unwrap();
                        prop_assert_eq!(m.remove(k), model.remove(&k));
                    }
                    Op::Remove(_) => {}
                    Op::RemoveMissing(k) => {
                        prop_assert_eq!(m.remove(k), model.remove(&k));
                    }
                    Op::Get(i) if !model.is_empty() => {
                        let k = *model.keys().nth(i % model.len()).unwrap();
                        prop_assert_eq!(m.get(k), model.get(&k));
                        *m.get_mut(k).unwrap() += 1;
                        *model.get_mut(&k).unwrap() += 1;
                    }
                    Op::Get(_) => {}
                    Op::From(start) => {
                        let got: Vec<(u64, u64)> = m.iter_from(start).map(|(k, v)| (k, *v)).collect();
                        let want: Vec<(u64, u64)> = model.range(start..).map(|(k, v)| (*k, *v)).collect();
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(m.len(), model.len());
                prop_assert_eq!(m.is_empty(), model.is_empty());
                prop_assert_eq!(m.first(), model.first_key_value().map(|(k, v)| (*k, v)));
                let all: Vec<(u64, &u64)> = m.iter().collect();
                let want: Vec<(u64, &u64)> = model.iter().map(|(k, v)| (*k, v)).collect();
                prop_assert_eq!(all, want);
                let holes = m.slots() - m.len();
                prop_assert!(holes <= m.len().max(SWEEP_FLOOR), "{} holes for {}", holes, m.len());
            }
        }
    }

    #[test]
    fn a_message_stuck_at_the_front_does_not_grow_the_ring() {
        // The oldest is never acknowledged; a million after it are.
        let mut m = SeqMap::default();
        m.push(0, ()).unwrap();
        for seq in 1..1_000_000 {
            m.push(seq, ()).unwrap();
            m.remove(seq).unwrap();
        }
        assert_eq!(m.len(), 1);
        assert!(m.slots() <= SWEEP_FLOOR + 1, "{}", m.slots());
        assert_eq!(m.first(), Some((0, &())));
    }
}
