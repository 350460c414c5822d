//! Placement: the home relay of every `(namespace, name)`.
//!
//! # Choice: rendezvous (highest-random-weight) hashing
//!
//! Every relay `r` gets a score for every key `k`; the home is the relay
//! with the highest score. Compared with a ring of virtual nodes:
//!
//! - **Balance.** Each relay wins a key with probability exactly `1/N`; there
//!   are no arcs whose lengths vary. A 160-virtual-node ring has a largest
//!   share of ~1.3 × the mean at N = 1000; rendezvous stays within sampling
//!   noise of 1.0 (`swbd-bench ring` prints the figures).
//! - **Movement.** When a relay joins, the only keys that move are the ones
//!   it wins (about `1/(N+1)`), and they all move *to* it; when one leaves,
//!   only its own keys move. This is exact, not statistical, and the property
//!   tests check it.
//! - **Fallback order.** Sorting the scores gives every key a preference
//!   list: when its home dies, the next relay in the list takes over, which is
//!   what a daemon does to re-home without asking anyone.
//! - **Cost.** A lookup computes N scores: one 64×64→128 multiply per
//!   relay, four relays at a time, about 1 µs at N = 1000 and 0.12 µs at
//!   N = 100 on the 2.25 GHz EPYC of `docs/performance.md`. The relay asks
//!   it for every message it routes, so a ring of [`CACHE_MIN_RELAYS`] or
//!   more keeps the homes it found in a table: a recipient
//!   found before costs its key hash and a load, whatever N is (at
//!   N = 1000, 17–39 ns for 1 000–10 000 recipients and 118–223 ns for
//!   100 000, against 1.0–1.7 µs computed). The cache is exact (the home
//!   depends only on the 64-bit key hash, and the table keeps all 64 bits
//!   of it), so placement is the same with it or without.
//!
//! The hash functions here are part of the protocol: every relay and daemon
//! must compute the same home from the same relay set, across versions and
//! platforms, so they are spelled out instead of taken from `std` (whose
//! hashers are randomly keyed or unspecified).

pub mod grid;
pub use grid::Grid;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// 64-bit FNV-1a over `bytes`, continuing from `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The splitmix64 / murmur3 finaliser: a bijective avalanche of 64 bits.
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The stable 64-bit hash of a key: namespace and name, separated so that
/// `("ab", "c")` and `("a", "bc")` differ.
pub fn key_hash(namespace: &str, name: &str) -> u64 {
    let h = fnv1a(FNV_OFFSET, namespace.as_bytes());
    let h = fnv1a(h, &[0xff]);
    fmix64(fnv1a(h, name.as_bytes()))
}

/// The stable seed of a relay id.
pub fn relay_seed(id: &str) -> u64 {
    fmix64(fnv1a(fnv1a(FNV_OFFSET, b"relay\xff"), id.as_bytes()))
}

/// Score of relay `seed` for key hash `k`: one 64×64→128 multiply folded
/// (the "mum" mixer), cheap enough to do for every relay on every lookup.
#[inline(always)]
fn score(k: u64, seed: u64) -> u64 {
    score_with(k, seed, multiplier(seed))
}

/// The odd multiplier [`score`] uses for relay `seed`.
#[inline(always)]
fn multiplier(seed: u64) -> u64 {
    seed ^ 0x9e37_79b9_7f4a_7c15 | 1
}

/// [`score`] with the relay's multiplier computed once, ahead.
#[inline(always)]
fn score_with(k: u64, seed: u64, mult: u64) -> u64 {
    let p = u128::from(k ^ seed).wrapping_mul(u128::from(mult));
    (p as u64) ^ ((p >> 64) as u64)
}

/// Rings this large keep the homes they found; smaller ones
/// compute every lookup. At 32 relays a lookup by name computes in about
/// 60 ns and a cached one takes 16–50 ns; at 10, computing is as fast as
/// the cache (`swbd-bench ring` prints both).
pub const CACHE_MIN_RELAYS: usize = 32;

/// Low bits of a key hash that pick its set in [`Homes`]; an entry keeps
/// the other 48 and the home's index, so it names exactly one hash.
const SET_BITS: u32 = 16;
const SET_MASK: u64 = (1 << SET_BITS) - 1;
/// Entries per set: a hash may sit in any of its set's four.
const WAYS: usize = 4;

/// One set of [`Homes`]: four entries, half a cache line, aligned so a
/// lookup reads one line.
#[repr(align(32))]
#[derive(Default)]
struct Set([AtomicU64; WAYS]);

/// The homes a ring found, by key hash: an exact cache of
/// [`Ring::home_of_hash`], 2^16 sets of four entries (2 MiB, 262 144
/// homes), made on the first lookup of a ring of [`CACHE_MIN_RELAYS`] or
/// more (a daemon, which only ranks, never makes one). Four ways, not one:
/// direct-mapped (and with a quarter of the entries), 10 000 recipients
/// missed one lookup in ten, each a full computation.
///
/// An entry holds the hash's top 48 bits and one more than the home's
/// index (0: empty) in one `u64`, so a reader sees a whole entry or none:
/// no lock, and writers racing leave either's entry, both true. A ring's
/// relays past the 65 535th are not cached. A new live set is a new ring,
/// so entries never outlive the set they were computed in.
#[derive(Default)]
struct Homes(OnceLock<Box<[Set]>>);

impl Homes {
    fn table(&self) -> &[Set] {
        self.0.get_or_init(|| {
            std::iter::repeat_with(Set::default)
                .take(1 << SET_BITS)
                .collect()
        })
    }

    /// The cached index of the home of `k`, if there is one.
    #[inline]
    fn get(table: &[Set], k: u64) -> Option<usize> {
        let set = &table[(k & SET_MASK) as usize].0;
        for e in set {
            let e = e.load(Ordering::Relaxed);
            if (e ^ k) & !SET_MASK == 0 && e & SET_MASK != 0 {
                return Some((e & SET_MASK) as usize - 1);
            }
        }
        None
    }

    /// Keeps `i` as the home of `k`: in an empty way of its set if there
    /// is one, else over the way the hash's bits above the set's pick (at
    /// random, with no counter to write).
    #[inline]
    fn put(table: &[Set], k: u64, i: usize) {
        let Some(at) = u64::try_from(i + 1).ok().filter(|at| *at <= SET_MASK) else {
            return;
        };
        let set = &table[(k & SET_MASK) as usize].0;
        let way = set
            .iter()
            .position(|e| e.load(Ordering::Relaxed) == 0)
            .unwrap_or((k >> SET_BITS) as usize % WAYS);
        set[way].store(k & !SET_MASK | at, Ordering::Relaxed);
    }
}

/// A copy starts empty: the cache is a cost saver, not state.
impl Clone for Homes {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Rings are equal by their relays; what each has cached is no part of it.
impl PartialEq for Homes {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Homes {}

impl std::fmt::Debug for Homes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let made = self.0.get().is_some();
        f.debug_struct("Homes").field("made", &made).finish()
    }
}

/// A set of relays and the placement over it. Build one per relay set;
/// lookups are read-only (the home cache aside, which changes no answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    ids: Vec<String>,
    /// Each relay's seed and the multiplier of its score, side by side
    /// (one cache line holds four relays' pairs).
    seeds: Vec<(u64, u64)>,
    homes: Homes,
}

impl Ring {
    /// A ring over these relay ids (duplicates are ignored; order does not
    /// matter: the same set always gives the same placement).
    pub fn new<I, S>(ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut ids: Vec<String> = ids.into_iter().map(Into::into).collect();
        ids.sort();
        ids.dedup();
        let seeds = ids
            .iter()
            .map(|i| {
                let s = relay_seed(i);
                (s, multiplier(s))
            })
            .collect();
        Self {
            ids,
            seeds,
            homes: Homes::default(),
        }
    }

    /// Number of relays.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the ring has no relay.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The relay ids, sorted.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Whether `id` is in the ring.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.binary_search_by(|i| i.as_str().cmp(id)).is_ok()
    }

    /// The index of the home of key hash `k`: the highest score, a tie
    /// (astronomically rare) to the smaller index, so the same set always
    /// gives the same home.
    ///
    /// Four lanes, each the best of every fourth relay, merged at the end:
    /// with one running best, every relay's compare waited for the one
    /// before it; this way four relays' multiplies overlap. With the
    /// multipliers computed ahead, on a slow day of the machine of
    /// `docs/performance.md`: N = 1000 1268 → about 1003 ns a lookup,
    /// N = 100 167 → 115 ns (`swbd-bench ring`; eight lanes were slower
    /// than four).
    #[inline]
    fn home_index(&self, k: u64) -> Option<usize> {
        let scored = |&(s, m): &(u64, u64)| score_with(k, s, m);
        let (head, body) = match self.seeds.split_at_checked(4) {
            Some(split) => split,
            // Fewer than four relays: the first highest.
            None => {
                let mut best: Option<(u64, usize)> = None;
                for (i, seed) in self.seeds.iter().enumerate() {
                    let s = scored(seed);
                    if best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, i));
                    }
                }
                return best.map(|(_, i)| i);
            }
        };
        let mut lanes = [0, 1, 2, 3].map(|l| (scored(&head[l]), l));
        let chunks = body.chunks_exact(4);
        let rest = chunks.remainder();
        for (c, q) in chunks.enumerate() {
            let at = 4 + 4 * c;
            for (l, lane) in lanes.iter_mut().enumerate() {
                let s = scored(&q[l]);
                // Within a lane indices only grow: strictly greater keeps
                // the smaller index on a tie.
                if s > lane.0 {
                    *lane = (s, at + l);
                }
            }
        }
        let (mut best, mut at) = lanes.into_iter().reduce(|b, c| {
            if c.0 > b.0 || (c.0 == b.0 && c.1 < b.1) {
                c
            } else {
                b
            }
        })?;
        // The last few come after every lane's: strictly greater again.
        for (i, seed) in (self.seeds.len() - rest.len()..).zip(rest) {
            let s = scored(seed);
            if s > best {
                (best, at) = (s, i);
            }
        }
        Some(at)
    }

    /// The home relay of `(namespace, name)`; `None` for an empty ring.
    pub fn home(&self, namespace: &str, name: &str) -> Option<&str> {
        self.home_at(namespace, name).map(|i| self.ids[i].as_str())
    }

    /// Makes the home cache now, if this ring keeps one, rather than on
    /// its first lookup: 2 MiB to zero, which the owner of a new live set
    /// can pay instead of the first message routed by it.
    pub fn make_cache(&self) {
        if self.ids.len() >= CACHE_MIN_RELAYS {
            self.homes.table();
        }
    }

    /// [`Self::home`] as its index in [`Self::ids`] (for a caller keeping
    /// something per relay beside the ring).
    pub fn home_at(&self, namespace: &str, name: &str) -> Option<usize> {
        // A lone relay is everyone's home: no key to hash (the message path
        // asks this for every send).
        if self.ids.len() == 1 {
            return Some(0);
        }
        self.home_index_cached(key_hash(namespace, name))
    }

    /// The home relay of a key hash from [`key_hash`]: from the cache when
    /// this ring keeps one and found `k` before.
    pub fn home_of_hash(&self, k: u64) -> Option<&str> {
        self.home_index_cached(k).map(|i| self.ids[i].as_str())
    }

    #[inline]
    fn home_index_cached(&self, k: u64) -> Option<usize> {
        if self.ids.len() < CACHE_MIN_RELAYS {
            return self.home_index(k);
        }
        let table = self.homes.table();
        match Homes::get(table, k) {
            Some(i) => Some(i),
            None => {
                let i = self.home_index(k)?;
                Homes::put(table, k, i);
                Some(i)
            }
        }
    }

    /// [`Self::home`] computed, never cached: the baseline the cache is
    /// measured against, and what it is checked to agree with.
    pub fn home_computed(&self, namespace: &str, name: &str) -> Option<&str> {
        self.home_index(key_hash(namespace, name))
            .map(|i| self.ids[i].as_str())
    }

    /// Every relay in order of preference for `(namespace, name)`: the home
    /// first, then whoever takes over if it is gone, and so on.
    pub fn ranked(&self, namespace: &str, name: &str) -> Vec<&str> {
        let k = key_hash(namespace, name);
        let mut v: Vec<(u64, usize)> = self
            .seeds
            .iter()
            .enumerate()
            .map(|(i, (s, m))| (score_with(k, *s, *m), i))
            .collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        v.into_iter().map(|(_, i)| self.ids[i].as_str()).collect()
    }

    /// The same ring with `id` added.
    pub fn with(&self, id: &str) -> Self {
        Self::new(self.ids.iter().map(String::as_str).chain([id]))
    }

    /// The same ring without `id`.
    pub fn without(&self, id: &str) -> Self {
        Self::new(self.ids.iter().map(String::as_str).filter(|i| *i != id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PINNED: [&str; 4] = ["relay-0", "relay-0", "relay-1", "relay-4"];

    fn ring(n: usize) -> Ring {
        Ring::new((0..n).map(|i| format!("relay-{i}")))
    }

    #[test]
    fn hashes_are_stable_across_builds() {
        // Part of the protocol: these numbers must never change.
        assert_eq!(key_hash("acme", "london"), key_hash("acme", "london"));
        assert_ne!(key_hash("ab", "c"), key_hash("a", "bc"));
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
    }

    #[test]
    fn placement_vectors_are_pinned() {
        // If this fails, homes moved between versions: a protocol change.
        let r = ring(5);
        let got: Vec<&str> = ["london", "laptop", "paris", "ci-17"]
            .iter()
            .map(|n| r.home("acme", n).unwrap())
            .collect();
        assert_eq!(key_hash("acme", "london"), 0x4551_2310_a5c9_5508);
        assert_eq!(got, PINNED);
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(Ring::new(Vec::<String>::new()).home("a", "b"), None);
        let r = Ring::new(["only"]);
        assert_eq!(r.home("a", "b"), Some("only"));
        assert_eq!(r.ranked("a", "b"), vec!["only"]);
    }

    #[test]
    fn balance_is_within_noise_at_ten_relays() {
        let r = ring(10);
        let mut counts = [0usize; 10];
        let n = 200_000;
        for i in 0..n {
            let h = r.home("ns", &format!("peer-{i}")).unwrap();
            counts[r.ids().iter().position(|x| x == h).unwrap()] += 1;
        }
        let mean = n as f64 / 10.0;
        let max = *counts.iter().max().unwrap() as f64;
        // Sampling noise alone is ~0.7% per relay here.
        assert!(max / mean < 1.03, "max/mean {}", max / mean);
    }

    #[test]
    fn a_joining_relay_takes_about_its_share() {
        let r = ring(20);
        let r2 = r.with("newcomer");
        let n = 100_000;
        let moved = (0..n)
            .filter(|i| {
                let k = format!("p{i}");
                r.home("ns", &k) != r2.home("ns", &k)
            })
            .count();
        let frac = moved as f64 / n as f64;
        let ideal = 1.0 / 21.0;
        assert!(frac <= 1.1 * ideal, "moved {frac}, ideal {ideal}");
        assert!(frac >= 0.9 * ideal, "moved {frac}, ideal {ideal}");
    }

    #[test]
    fn hashes_sharing_a_slot_keep_their_own_homes() {
        let r = ring(100);
        let base = key_hash("ns", "london");
        // Every hash differing from `base` in one bit above the set bits
        // lands in its set; asked in turn, each must get its own home.
        let twins: Vec<u64> = (SET_BITS..64).map(|b| base ^ (1 << b)).collect();
        let mut differ = 0;
        for _ in 0..3 {
            for k in std::iter::once(base).chain(twins.iter().copied()) {
                let want = r.home_index(k).map(|i| r.ids()[i].as_str());
                assert_eq!(r.home_of_hash(k), want, "hash {k:#x}");
                differ += usize::from(r.home_of_hash(k) != r.home_of_hash(base));
            }
        }
        // Without the tag check most of them would answer `base`'s home.
        assert!(differ > 3 * 40, "only {differ} twins homed apart from base");
    }

    #[test]
    fn a_home_index_past_the_set_bits_is_not_cached() {
        let h = Homes::default();
        let t = h.table();
        let k = 0xdead_beef_0000_0007;
        Homes::put(t, k, 65_534);
        assert_eq!(Homes::get(t, k), Some(65_534));
        // The same set and way (bits 16 and 17 equal), a different hash.
        let twin = k ^ (1 << 40);
        Homes::put(t, twin, 65_535);
        // Too large to keep: the way still holds the first entry, which
        // the second hash does not match.
        assert_eq!(Homes::get(t, twin), None);
        assert_eq!(Homes::get(t, k), Some(65_534));
        Homes::put(t, twin, 5);
        assert_eq!(Homes::get(t, twin), Some(5));
        assert_eq!(Homes::get(t, 0), None, "an empty set is no home");
    }

    #[test]
    fn a_set_keeps_hashes_in_different_ways() {
        let h = Homes::default();
        let t = h.table();
        // One set, four ways (bits 16-17), each its own hash.
        let ks: Vec<u64> = (0..4u64)
            .map(|w| 0x1234_0000_0000_0042 | w << SET_BITS)
            .collect();
        for (i, k) in ks.iter().enumerate() {
            Homes::put(t, *k, i);
        }
        for (i, k) in ks.iter().enumerate() {
            assert_eq!(Homes::get(t, *k), Some(i));
        }
    }

    #[test]
    fn only_rings_from_the_cache_size_up_make_a_cache() {
        let made = |r: &Ring| r.homes.0.get().is_some();
        let (small, large) = (ring(CACHE_MIN_RELAYS - 1), ring(CACHE_MIN_RELAYS));
        assert!(small.home("ns", "x").is_some() && !made(&small));
        small.make_cache();
        assert!(!made(&small));
        assert!(!made(&large));
        large.make_cache();
        assert!(made(&large));
        let fresh = ring(CACHE_MIN_RELAYS);
        assert!(fresh.home("ns", "x").is_some() && made(&fresh));
    }

    #[test]
    fn rings_compare_by_their_relays_not_their_caches() {
        let a = ring(40);
        let b = ring(40);
        assert!(a.home("ns", "x").is_some());
        assert_eq!(a, b);
        assert_eq!(a.clone().home("ns", "x"), a.home("ns", "x"));
        assert_ne!(a, ring(41));
    }

    /// The home as the placement defines it: the first relay with the
    /// highest score.
    fn first_highest(r: &Ring, k: u64) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for (i, (s, _)) in r.seeds.iter().enumerate() {
            let sc = score(k, *s);
            if best.is_none_or(|(b, _)| sc > b) {
                best = Some((sc, i));
            }
        }
        best.map(|(_, i)| i)
    }

    proptest! {
        #[test]
        fn the_lanes_find_the_first_highest_score(n in 0usize..40, k in any::<u64>()) {
            let r = ring(n);
            prop_assert_eq!(r.home_index(k), first_highest(&r, k));
        }

        /// Relays sharing a seed tie on every key: the smaller index wins,
        /// whichever lanes the tied relays fall in.
        #[test]
        fn ties_go_to_the_smaller_index(pool in proptest::collection::vec(0u8..3, 1..40), k in any::<u64>()) {
            let seeds: Vec<(u64, u64)> = pool
                .iter()
                .map(|v| {
                    let s = relay_seed(&format!("seed-{v}"));
                    (s, multiplier(s))
                })
                .collect();
            let ids = (0..seeds.len()).map(|i| format!("relay-{i:02}")).collect();
            let r = Ring { ids, seeds, homes: Homes::default() };
            prop_assert_eq!(r.home_index(k), first_highest(&r, k));
        }

        /// The cache gives every answer the computation gives, first
        /// asked and again.
        #[test]
        fn cached_homes_are_computed_homes(n in 30usize..120, keys in proptest::collection::vec(0u16..300, 1..400)) {
            let r = ring(n);
            for k in &keys {
                let name = format!("peer-{k}");
                prop_assert_eq!(r.home("ns", &name), r.home_computed("ns", &name));
            }
        }

        #[test]
        fn same_set_same_home_in_any_order(mut ids in proptest::collection::vec("[a-z0-9]{1,8}", 1..20), key in "[a-z]{1,10}") {
            let a = Ring::new(ids.clone());
            ids.reverse();
            let b = Ring::new(ids);
            prop_assert_eq!(a.home("ns", &key), b.home("ns", &key));
            prop_assert_eq!(a.ranked("ns", &key)[0], a.home("ns", &key).unwrap());
        }

        #[test]
        fn joins_move_keys_only_to_the_newcomer(n in 1usize..30, keys in proptest::collection::vec("[a-z0-9]{1,12}", 1..200)) {
            let r = ring(n);
            let joined = r.with("joiner");
            for k in &keys {
                let before = r.home("ns", k).unwrap();
                let after = joined.home("ns", k).unwrap();
                prop_assert!(before == after || after == "joiner");
            }
        }

        #[test]
        fn leaves_move_only_the_leavers_keys_to_their_next_choice(n in 2usize..30, gone in 0usize..30, keys in proptest::collection::vec("[a-z0-9]{1,12}", 1..200)) {
            let r = ring(n);
            let leaver = r.ids()[gone % n].clone();
            let left = r.without(&leaver);
            for k in &keys {
                let before = r.home("ns", k).unwrap();
                let after = left.home("ns", k).unwrap();
                if before == leaver {
                    prop_assert_eq!(after, r.ranked("ns", k)[1]);
                } else {
                    prop_assert_eq!(before, after);
                }
            }
        }
    }
}
