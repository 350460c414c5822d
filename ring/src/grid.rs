//! The diameter-2 link graph, for meshes too large for every relay to link
//! to every other (past `--full-mesh-max` relays).
//!
//! # Layout
//!
//! The relays of a [`Ring`] sit in `C = ⌈√N⌉` columns. Each relay picks
//! its column by rendezvous hashing, in a fixed order (by seed), taking the
//! best-scoring column that still has room for `⌈N/C⌉` relays — consistent
//! hashing with bounded loads — so columns differ in size by little and a
//! relay keeps its column while the set around it changes, unless `C`
//! itself steps. Within a column, relays are in rows by seed order.
//!
//! # Links
//!
//! A relay links to every relay of its column, and to one relay of every
//! other column: its *partner* there, the relay at the reflected row
//! `(own column + that column − own row) mod C`. Reflection pairs relays
//! up — a relay's partner has it as its partner back — so with equal
//! columns a relay has `(|own| − 1) + (C − 1) ≈ 2√N` links. A reflected
//! row past a column's height (columns have ⌈N/C⌉ or ⌊N/C⌋ relays, and
//! `C ≥` every height) is stood in for by a relay of that column chosen by
//! both ends, so the extra links spread. The modulus is `C`, not the
//! height: a column growing a row moves no other relay's partners.
//!
//! # Routes
//!
//! Any two relays in one column are linked. For `a` and `b` in different
//! columns there are two 2-hop paths through different relays:
//! `a → partner(a, col b) → b` (the partner shares `b`'s column) and
//! `a → partner(b, col a) → b` (that one shares `a`'s column). When both are
//! unusable, a relay of `a`'s column with a usable partner in `b`'s column
//! gives a 3-hop detour (`a → m → partner(m, col b) → b`).
//!
//! Why not a Slim Fly–like graph (about √N links instead of 2√N): those
//! exist only for particular sizes (N = 2q² for a prime power q) and
//! change shape wholesale as relays come and go; the grid works for any N,
//! moves few links per join, and gives two independent 2-hop paths per
//! pair, which is what detours need.

use crate::{fmix64, Ring};

/// The link graph and routes over one relay set. Relays are named by their
/// index in the ring's sorted ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid {
    col_of: Vec<u32>,
    row_of: Vec<u32>,
    /// Each column's relays, by row.
    cols: Vec<Vec<u32>>,
    /// The modulus of the row reflection: the number of columns, which
    /// is at least every column's height (N ≤ C²) and changes only when
    /// C does, so a column growing a row moves no other reflection.
    modulus: usize,
}

/// Score of column `c` for a relay with `seed`.
fn col_score(seed: u64, c: u32) -> u64 {
    crate::score(seed, fmix64(u64::from(c) ^ 0x636f_6c75_6d6e_0000))
}

impl Grid {
    /// The grid over the relays of `ring`.
    pub fn new(ring: &Ring) -> Self {
        let n = ring.len();
        if n == 0 {
            return Self {
                col_of: Vec::new(),
                row_of: Vec::new(),
                cols: Vec::new(),
                modulus: 1,
            };
        }
        let c = (n as f64).sqrt().ceil() as usize;
        // Column sizes: `rem` columns of q + 1, the rest q — every column
        // as full as the others, but for one slot.
        let (q, rem) = (n / c, n % c);
        // Placement order: by seed (the index breaks the astronomically
        // rare tie).
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (ring.seeds[i].0, i));
        let mut cols: Vec<Vec<u32>> = vec![Vec::with_capacity(q + 1); c];
        let mut col_of = vec![0u32; n];
        let mut big = 0usize;
        let mut prefs: Vec<(u64, u32)> = Vec::with_capacity(c);
        for &i in &order {
            let seed = ring.seeds[i].0;
            prefs.clear();
            prefs.extend((0..c as u32).map(|k| (col_score(seed, k), k)));
            prefs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            // Room: below q, or at q while fewer than `rem` columns grew
            // to q + 1. The quotas add up to n: some column has room.
            let room = |len: usize| len < q || (len == q && big < rem);
            if let Some(&(_, k)) = prefs.iter().find(|(_, k)| room(cols[*k as usize].len())) {
                let col = &mut cols[k as usize];
                if col.len() == q {
                    big += 1;
                }
                col.push(i as u32);
                col_of[i] = k;
            }
        }
        // Rows: seed order within each column (the push order already).
        let mut row_of = vec![0u32; n];
        for col in &cols {
            for (r, &i) in col.iter().enumerate() {
                row_of[i as usize] = r as u32;
            }
        }
        let modulus = cols.len().max(1);
        Self {
            col_of,
            row_of,
            cols,
            modulus,
        }
    }

    /// The slot (row) of `i`'s partner in column `c`: a reflection,
    /// `(own column + c − own row) mod C`, so that `i`'s partner there has
    /// `i` as its partner back (one link, not two). A slot at or past the
    /// column's height is empty.
    fn slot(&self, i: u32, c: u32) -> usize {
        let (k, r) = (
            self.col_of[i as usize] as usize,
            self.row_of[i as usize] as usize,
        );
        (k + c as usize + self.modulus - r % self.modulus) % self.modulus
    }

    /// Who in column `c` stands in for an empty slot, for the relay at row
    /// `r` of column `k`: spread over the column by both.
    fn stand_in(&self, k: u32, r: usize, c: u32) -> usize {
        (k as usize + c as usize + r) % self.cols[c as usize].len()
    }

    /// Number of relays.
    pub fn len(&self) -> usize {
        self.col_of.len()
    }

    /// Whether there is no relay.
    pub fn is_empty(&self) -> bool {
        self.col_of.is_empty()
    }

    /// Number of columns.
    pub fn columns(&self) -> usize {
        self.cols.len()
    }

    /// The column and row of relay `i`.
    pub fn position(&self, i: u32) -> (u32, u32) {
        (self.col_of[i as usize], self.row_of[i as usize])
    }

    /// The relays of column `c`, by row.
    pub fn column(&self, c: u32) -> &[u32] {
        &self.cols[c as usize]
    }

    /// `i`'s partner in column `c` (another column than its own): the
    /// relay at the reflected row ([`Grid::slot`]), or where that slot is
    /// empty, a stand-in spread over the column.
    pub fn partner(&self, i: u32, c: u32) -> u32 {
        let there = &self.cols[c as usize];
        let s = self.slot(i, c);
        if s < there.len() {
            there[s]
        } else {
            let (k, r) = (self.col_of[i as usize], self.row_of[i as usize] as usize);
            there[self.stand_in(k, r, c)]
        }
    }

    /// Whether `a` and `b` are linked.
    pub fn linked(&self, a: u32, b: u32) -> bool {
        if a == b {
            return false;
        }
        let (ca, cb) = (self.col_of[a as usize], self.col_of[b as usize]);
        ca == cb || self.partner(a, cb) == b || self.partner(b, ca) == a
    }

    /// Every relay `i` is linked to, sorted.
    pub fn links(&self, i: u32) -> Vec<u32> {
        let k = self.col_of[i as usize];
        let r = self.row_of[i as usize] as usize;
        let mut v: Vec<u32> = self.cols[k as usize]
            .iter()
            .copied()
            .filter(|&j| j != i)
            .collect();
        for (c, col) in self.cols.iter().enumerate() {
            let c = c as u32;
            if c == k {
                continue;
            }
            // Its partner there…
            v.push(self.partner(i, c));
            // …the relay there whose reflected slot here is `i`'s row
            // (that same partner, unless `i`'s slot there is empty)…
            let m = self.modulus;
            let back = (k as usize + c as usize + m - r) % m;
            if let Some(&j) = col.get(back) {
                v.push(j);
            }
            // …and those there whose slot here is empty and who have `i`
            // as their stand-in.
            let own = self.cols[k as usize].len();
            for empty in own..m {
                let rj = (k as usize + c as usize + m - empty) % m;
                if rj < col.len() && self.stand_in(c, rj, k) == r {
                    v.push(col[rj]);
                }
            }
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// A path from `from` to `to` over links `usable` allows (both ends
    /// alive, the link up): the relays after `from`, `to` last; empty when
    /// `from == to`. Prefers the direct link, then the two 2-hop paths of
    /// the grid, then any 2-hop path, then a 3-hop detour. `None`: no path
    /// of at most 3 hops.
    pub fn route(&self, from: u32, to: u32, usable: impl Fn(u32, u32) -> bool) -> Option<Vec<u32>> {
        if from == to {
            return Some(Vec::new());
        }
        if self.linked(from, to) && usable(from, to) {
            return Some(vec![to]);
        }
        let (cf, ct) = (self.col_of[from as usize], self.col_of[to as usize]);
        let via = |m: u32| m != from && m != to && usable(from, m) && usable(m, to);
        if cf != ct {
            for m in [self.partner(from, ct), self.partner(to, cf)] {
                if via(m) {
                    return Some(vec![m, to]);
                }
            }
        }
        let mine = self.links(from);
        if let Some(&m) = mine.iter().find(|&&m| self.linked(m, to) && via(m)) {
            return Some(vec![m, to]);
        }
        // Three hops: a neighbour, then one of its neighbours linked to `to`.
        for &m in &mine {
            if m == to || !usable(from, m) {
                continue;
            }
            let cm = self.col_of[m as usize];
            // The likeliest: m's partner in to's column, or (same column
            // as to) m's column mates.
            let q = if cm != ct { self.partner(m, ct) } else { to };
            if q != from && q != m && q != to && usable(m, q) && usable(q, to) {
                return Some(vec![m, q, to]);
            }
        }
        for &m in &mine {
            if m == to || !usable(from, m) {
                continue;
            }
            for q in self.links(m) {
                if q != from && q != to && self.linked(q, to) && usable(m, q) && usable(q, to) {
                    return Some(vec![m, q, to]);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(n: usize) -> (Ring, Grid) {
        let r = Ring::new((0..n).map(|i| format!("relay-{i:05}")));
        let g = Grid::new(&r);
        (r, g)
    }

    #[test]
    fn columns_are_balanced_and_every_relay_placed_once() {
        for n in [1usize, 2, 3, 9, 10, 50, 101, 1000] {
            let (_, g) = grid(n);
            let c = (n as f64).sqrt().ceil() as usize;
            assert_eq!(g.columns(), c, "n={n}");
            let cap = n.div_ceil(c);
            let mut seen = vec![false; n];
            for k in 0..c as u32 {
                assert!(g.column(k).len() <= cap, "n={n} column {k}");
                for &i in g.column(k) {
                    assert!(!seen[i as usize]);
                    seen[i as usize] = true;
                }
            }
            assert!(seen.iter().all(|s| *s), "n={n}");
        }
    }

    #[test]
    fn links_are_symmetric_and_about_two_root_n() {
        for n in [9usize, 10, 37, 100, 400] {
            let (_, g) = grid(n);
            let bound = 2.0 * (n as f64).sqrt() + 2.0;
            for i in 0..n as u32 {
                let l = g.links(i);
                assert!(
                    (l.len() as f64) <= bound,
                    "n={n}: {i} has {} links",
                    l.len()
                );
                for &j in &l {
                    assert!(g.linked(i, j) && g.linked(j, i), "n={n}: {i}-{j}");
                    assert!(g.links(j).contains(&i), "n={n}: {j} lacks {i}");
                }
                for j in 0..n as u32 {
                    assert_eq!(g.linked(i, j), l.contains(&j), "n={n}: {i}-{j}");
                }
            }
        }
    }

    #[test]
    fn every_pair_is_within_two_hops_with_all_up_and_two_disjoint_ways_across_columns() {
        for n in [4usize, 9, 10, 30, 101] {
            let (_, g) = grid(n);
            for a in 0..n as u32 {
                for b in 0..n as u32 {
                    let p = g.route(a, b, |_, _| true).expect("route");
                    assert!(p.len() <= 2, "n={n} {a}->{b}: {p:?}");
                    let mut at = a;
                    for &h in &p {
                        assert!(g.linked(at, h), "n={n} {a}->{b}: {at}-{h} not linked");
                        at = h;
                    }
                    let (ca, cb) = (g.position(a).0, g.position(b).0);
                    if ca != cb && !g.linked(a, b) {
                        // Kill the first intermediate: the other way works.
                        let first = p[0];
                        let q = g
                            .route(a, b, |x, y| x != first && y != first)
                            .expect("detour");
                        assert_eq!(q.len(), 2, "n={n} {a}->{b} without {first}: {q:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_join_moves_few_relays_between_columns() {
        let (r, g) = grid(100);
        let joined = Grid::new(&r.with("relay-newcomer"));
        let r2 = r.with("relay-newcomer");
        let moved = r
            .ids()
            .iter()
            .enumerate()
            .filter(|(i, id)| {
                let j = r2.ids().iter().position(|x| x == *id).unwrap_or(0) as u32;
                g.position(*i as u32).0 != joined.position(j).0
            })
            .count();
        assert!(moved <= 10, "{moved} of 100 relays changed column");
    }
}
