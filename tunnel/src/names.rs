//! A small cache of name ↔ index answers, each held for a while: an index
//! can move when two relays that handed addresses out apart are
//! reconciled, so no answer is trusted for longer than its time to live.
//! Bounded: when full, expired entries are dropped, and if none has
//! expired the new answer is not remembered (it is asked for again).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Answers remembered for `ttl`, at most `cap` of them.
#[derive(Debug)]
pub struct TtlMap<K, V> {
    map: HashMap<K, (V, Instant)>,
    ttl: Duration,
    cap: usize,
}

impl<K: Hash + Eq, V> TtlMap<K, V> {
    /// An empty cache.
    pub fn new(ttl: Duration, cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            ttl,
            cap,
        }
    }

    /// The answer for `k`, if remembered less than the time to live ago.
    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_at(k, Instant::now())
    }

    /// Remembers `v` for `k` from now on (unless full of live answers).
    pub fn insert(&mut self, k: K, v: V) {
        self.insert_at(k, v, Instant::now())
    }

    /// Answers held, live or not yet dropped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn get_at<Q>(&self, k: &Q, now: Instant) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (v, at) = self.map.get(k)?;
        (now.saturating_duration_since(*at) < self.ttl).then_some(v)
    }

    fn insert_at(&mut self, k: K, v: V, now: Instant) {
        if self.map.len() >= self.cap && !self.map.contains_key(&k) {
            let ttl = self.ttl;
            self.map
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
        }
        if self.map.len() < self.cap || self.map.contains_key(&k) {
            self.map.insert(k, (v, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_holds_for_its_time_to_live_only() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(30);
        let mut m = TtlMap::new(ttl, 8);
        m.insert_at("london".to_string(), 7u32, t0);
        assert_eq!(
            m.get_at("london", t0 + ttl - Duration::from_millis(1)),
            Some(&7)
        );
        assert_eq!(m.get_at("london", t0 + ttl), None);
        // Answered again: live again, with the new value.
        m.insert_at("london".to_string(), 9, t0 + ttl);
        assert_eq!(m.get_at("london", t0 + ttl), Some(&9));
    }

    #[test]
    fn a_full_cache_drops_expired_answers_and_refuses_beyond_its_bound() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(30);
        let mut m = TtlMap::new(ttl, 2);
        m.insert_at(1u32, "a", t0);
        m.insert_at(2, "b", t0 + Duration::from_secs(20));
        // Full of live answers: the third is not remembered.
        m.insert_at(3, "c", t0 + Duration::from_secs(25));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get_at(&3, t0 + Duration::from_secs(25)), None);
        // A held key is refreshed even when full.
        m.insert_at(2, "B", t0 + Duration::from_secs(26));
        assert_eq!(m.get_at(&2, t0 + Duration::from_secs(26)), Some(&"B"));
        // Once the first has expired, it makes room.
        let later = t0 + Duration::from_secs(31);
        m.insert_at(3, "c", later);
        assert_eq!(m.len(), 2);
        assert_eq!(m.get_at(&1, later), None);
        assert_eq!(m.get_at(&3, later), Some(&"c"));
    }
}
