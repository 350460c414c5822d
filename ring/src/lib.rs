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
//!   N = 100 on the 2.25 GHz EPYC of `docs/performance.md`; it needs no
//!   memory beyond a seed and a multiplier per relay.
//!
//! The hash functions here are part of the protocol: every relay and daemon
//! must compute the same home from the same relay set, across versions and
//! platforms, so they are spelled out instead of taken from `std` (whose
//! hashers are randomly keyed or unspecified).

pub mod grid;
pub use grid::Grid;

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

/// A set of relays and the placement over it. Build one per relay set;
/// lookups are read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    ids: Vec<String>,
    /// Each relay's seed and the multiplier of its score, side by side
    /// (one cache line holds four relays' pairs).
    seeds: Vec<(u64, u64)>,
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
        Self { ids, seeds }
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
        // A lone relay is everyone's home: no key to hash (the message path
        // asks this for every send).
        if let [only] = &self.ids[..] {
            return Some(only);
        }
        self.home_of_hash(key_hash(namespace, name))
    }

    /// The home relay of a key hash from [`key_hash`].
    pub fn home_of_hash(&self, k: u64) -> Option<&str> {
        self.home_index(k).map(|i| self.ids[i].as_str())
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
            let r = Ring { ids, seeds };
            prop_assert_eq!(r.home_index(k), first_highest(&r, k));
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
