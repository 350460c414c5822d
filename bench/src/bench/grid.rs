//! `swbd-bench grid`: the diameter-2 link graph ([`swb_ring::Grid`]),
//! simulated (no sockets, no time): links per relay, hops between random
//! pairs, what a join moves, and reachability with relays down.

use super::record;
use crate::Output;
use anyhow::Result;
use clap::Args;
use swb_ring::{Grid, Ring};

#[derive(Debug, Args)]
pub(crate) struct GridArgs {
    /// Mesh sizes to simulate (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub(crate) relays: Vec<usize>,
    /// Random relay pairs per figure.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) pairs: usize,
}

/// A small deterministic generator (the figures repeat run to run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> u32 {
        (self.next() % n as u64) as u32
    }
}

/// What a change of the relay set from `a` to `b` moves: relays that
/// changed column (of those in both), and links added or dropped per relay.
fn churn(a: &Ring, b: &Ring) -> (usize, f64) {
    let (ga, gb) = (Grid::new(a), Grid::new(b));
    // Names: links as sets of ids.
    let ids = |r: &Ring, g: &Grid, i: u32| -> std::collections::BTreeSet<String> {
        g.links(i)
            .into_iter()
            .map(|j| r.ids()[j as usize].clone())
            .collect()
    };
    let (mut moved, mut changed) = (0usize, 0usize);
    for (i, id) in a.ids().iter().enumerate() {
        let Ok(j) = b.ids().binary_search(id) else {
            continue;
        };
        let (i, j) = (i as u32, j as u32);
        if ga.position(i).0 != gb.position(j).0 {
            moved += 1;
        }
        changed += ids(a, &ga, i).symmetric_difference(&ids(b, &gb, j)).count();
    }
    (moved, changed as f64 / 2.0 / a.len().max(1) as f64)
}

pub(crate) fn grid_bench(a: GridArgs, out: &Output) -> Result<()> {
    if !out.json {
        println!("diameter-2 relay mesh (grid), simulated; goals: links per relay <= 2 sqrt(N), all pairs <= 2 hops, 10 % down: 100 % of live pairs reachable");
    }
    for &n in &a.relays {
        let ring = Ring::new((0..n).map(|i| format!("relay-{i:05}")));
        let g = Grid::new(&ring);
        let links: Vec<Vec<u32>> = (0..n as u32).map(|i| g.links(i)).collect();
        let max = links.iter().map(Vec::len).max().unwrap_or(0);
        let mean = links.iter().map(Vec::len).sum::<usize>() as f64 / n as f64;
        let bound = 2.0 * (n as f64).sqrt();
        let mut rng = Rng(n as u64);
        // Hops with every relay up.
        let mut hist = [0usize; 5];
        for _ in 0..a.pairs {
            let (x, y) = (rng.below(n), rng.below(n));
            let h = g.route(x, y, |_, _| true).map_or(4, |p| p.len());
            hist[h.min(4)] += 1;
        }
        // A join (N - 1 -> N relays): relays that changed column, links
        // added or dropped per relay; and the same where the column count
        // steps (N = C^2 -> C^2 + 1).
        let before = Ring::new(ring.ids().iter().skip(1).cloned());
        let (moved, changed_per_relay) = churn(&before, &ring);
        let c = (n as f64).sqrt().ceil() as usize;
        let square = Ring::new((0..c * c).map(|i| format!("relay-{i:05}")));
        let (step_moved, step_changed) = churn(&square, &square.with("relay-joining"));
        // A join that opens a new row (C (C - 1) -> C (C - 1) + 1).
        let full = Ring::new((0..c * (c - 1)).map(|i| format!("relay-{i:05}")));
        let (row_moved, row_changed) = churn(&full, &full.with("relay-joining"));
        if out.json {
            println!(
                "{}",
                serde_json::json!({"bench": "grid", "relays": n, "columns": g.columns(),
                    "links_max": max, "links_mean": mean, "two_sqrt_n": bound,
                    "hops_all_up": {"0": hist[0], "1": hist[1], "2": hist[2], "3": hist[3], "none": hist[4]},
                    "join_moved_columns": moved, "join_links_changed_per_relay": changed_per_relay,
                    "step_join_moved_columns": step_moved, "step_join_links_changed_per_relay": step_changed,
                    "row_join_moved_columns": row_moved, "row_join_links_changed_per_relay": row_changed})
            );
        } else {
            println!(
                "  {n:>6} relays, {} columns: links per relay max {max} mean {mean:.1} (2 sqrt N = {bound:.0}); all up, {} random pairs: 0 hops {} · 1 hop {} · 2 hops {} · 3 hops {} · none {}",
                g.columns(), a.pairs, hist[0], hist[1], hist[2], hist[3], hist[4]
            );
            println!(
                "          one relay joins ({} -> {n}): {moved} relays change column, {changed_per_relay:.2} links change per relay (added or dropped); one that opens a row ({} -> {}): {row_moved}, {row_changed:.2}; where the columns step ({} -> {}): {step_moved}, {step_changed:.2}",
                n - 1, c * (c - 1), c * (c - 1) + 1, c * c, c * c + 1
            );
        }
        gossip_figures(&g, out);
        if n == 10_000 {
            record(
                "grid",
                "links per relay, max, at 10 000 relays (vs 2 sqrt N)",
                max as f64,
                bound,
                false,
                1.0,
            );
        }
        for pct in [1usize, 10, 20] {
            let mut down = vec![false; n];
            let mut rng = Rng(n as u64 * 31 + pct as u64);
            let mut k = 0;
            while k < n * pct / 100 {
                let i = rng.below(n) as usize;
                if !down[i] {
                    down[i] = true;
                    k += 1;
                }
            }
            // At once: the old grid with relays gone. Relays see two hops
            // (a neighbour's links); a three-hop detour exists for some
            // pairs but the relays only use it for a relay they still see.
            let up = |a: u32, b: u32| !down[a as usize] && !down[b as usize];
            let mut hist = [0usize; 5];
            let mut tried = 0;
            while tried < a.pairs {
                let (x, y) = (rng.below(n), rng.below(n));
                if down[x as usize] || down[y as usize] || x == y {
                    continue;
                }
                tried += 1;
                let h = g.route(x, y, up).map_or(4, |p| p.len());
                hist[h.min(4)] += 1;
            }
            let at_once = (hist[1] + hist[2]) as f64 / tried as f64;
            // Then: the grid over the live relays, links rewired.
            let live = Ring::new(
                ring.ids()
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !down[*i])
                    .map(|(_, id)| id.clone()),
            );
            let (_, rewired) = churn(&ring, &live);
            let lg = Grid::new(&live);
            let m = live.len();
            let mut after = [0usize; 5];
            for _ in 0..a.pairs {
                let (x, y) = (rng.below(m), rng.below(m));
                if x == y {
                    continue;
                }
                let h = lg.route(x, y, |_, _| true).map_or(4, |p| p.len());
                after[h.min(4)] += 1;
            }
            let reach = 1.0 - after[4] as f64 / after.iter().sum::<usize>().max(1) as f64;
            let within2 = (after[1] + after[2]) as f64 / after.iter().sum::<usize>().max(1) as f64;
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({"bench": "grid", "relays": n, "down_percent": pct,
                        "at_once_hops": {"1": hist[1], "2": hist[2], "3": hist[3], "none": hist[4]},
                        "at_once_within_two_hops": at_once, "rewired_links_per_relay": rewired,
                        "after_within_two_hops": within2, "reachable": reach})
                );
            } else {
                println!(
                    "          {pct:>2} % down at once: live pairs within 2 hops {:.2} % (3-hop detour {} · none {} of {tried}); after rewiring ({rewired:.1} links change per relay): within 2 hops {:.4} %, reachable {:.4} %",
                    at_once * 100.0, hist[3], hist[4], within2 * 100.0, reach * 100.0
                );
            }
            if n == 10_000 && pct == 10 {
                record(
                    "grid",
                    "live pairs reachable with 10 % down at 10 000 relays (after rewiring)",
                    reach,
                    1.0,
                    true,
                    1.0,
                );
            }
        }
    }
    Ok(())
}

/// Wire sizes of the mesh's membership news (postcard, with the frame
/// header): a delta that removes one relay id (~16 bytes), one that adds
/// one record (id, one address, `sha256:` fingerprint, incarnation), and
/// one record of a whole map.
const DELTA_REMOVE_BYTES: u64 = 26;
const DELTA_ADD_BYTES: u64 = 136;
const RECORD_BYTES: u64 = 128;
/// Link keep-alive: one QUIC packet with a PING every 750 ms (~60 bytes
/// with UDP/IP headers), each way.
const KEEPALIVE_BYTES_PER_SEC: f64 = 60.0 * 1000.0 / 750.0;
/// A link notices silence after this long (the mesh's idle timeout), plus
/// up to one keep-alive interval.
const DETECT_MS: u64 = 3000;
const KEEPALIVE_MS: u64 = 750;
/// One-way trips a new link takes before it carries news (QUIC + TLS
/// handshake, the mesh-key proofs both ways).
const LINK_SETUP_TRIPS: u64 = 5;

/// What one membership event cost and how long it took to settle.
struct Spread {
    /// Until every live relay's view is final (ms after the event).
    settled_ms: u64,
    /// Gossip bytes sent, all relays together.
    bytes: u64,
    /// Live relays whose final view is wrong.
    wrong: usize,
}

/// Neighbour sets, for intersections.
fn link_sets(g: &Grid) -> Vec<std::collections::HashSet<u32>> {
    (0..g.len() as u32)
        .map(|i| g.links(i).into_iter().collect())
        .collect()
}

/// The rules relays run (`relay/src/mesh/membership.rs`), on the grid:
/// a relay is live for `r` while `r`'s link to it is heard, or a live
/// neighbour of `r` says it hears it; a relay whose view of its own
/// links changes sends its neighbours the change (one id removed, or one
/// record added), nothing else is re-sent.
///
/// `victim` dies: each neighbour notices its silence, drops it and tells
/// its own neighbours; `r` knows once its own link and every neighbour
/// that heard the victim have told it.
fn death(
    g: &Grid,
    sets: &[std::collections::HashSet<u32>],
    victim: u32,
    lat_ms: u64,
    rng: &mut Rng,
) -> Spread {
    let n = g.len() as u32;
    let mut detect = std::collections::HashMap::new();
    let mut bytes = 0u64;
    for &nb in &sets[victim as usize] {
        detect.insert(nb, DETECT_MS + rng.next() % KEEPALIVE_MS);
        bytes += (sets[nb as usize].len() as u64 - 1) * DELTA_REMOVE_BYTES;
    }
    let mut settled = 0u64;
    for r in (0..n).filter(|&r| r != victim) {
        let own = detect.get(&r).copied().unwrap_or(0);
        let told = sets[r as usize]
            .iter()
            .filter_map(|nb| detect.get(nb).map(|t| t + lat_ms))
            .max()
            .unwrap_or(0);
        settled = settled.max(own.max(told));
    }
    Spread {
        settled_ms: settled,
        bytes,
        wrong: 0,
    }
}

/// The link between live `a` and `b` breaks: both drop the other from
/// what they hear and say so. A relay loses sight of `b` only if `a` was
/// its only neighbour hearing `b` (and it has no link to `b`); `a` itself
/// keeps `b` through a common neighbour (two hops) if it has one.
fn broken_link(
    g: &Grid,
    sets: &[std::collections::HashSet<u32>],
    a: u32,
    b: u32,
    lat_ms: u64,
) -> Spread {
    let n = g.len() as u32;
    let bytes = (sets[a as usize].len() as u64 - 1 + sets[b as usize].len() as u64 - 1)
        * DELTA_REMOVE_BYTES;
    let hears = |r: u32, x: u32, y: u32| {
        // r still sees y: linked (and not the broken pair), or a
        // neighbour other than x hears y.
        (r != x && sets[r as usize].contains(&y))
            || sets[r as usize]
                .iter()
                .any(|&nb| nb != x && nb != y && sets[nb as usize].contains(&y))
    };
    let mut wrong = 0;
    for r in 0..n {
        if r != b && !hears(r, a, b) {
            wrong += 1;
        }
        if r != a && !hears(r, b, a) {
            wrong += 1;
        }
    }
    Spread {
        settled_ms: DETECT_MS + KEEPALIVE_MS + lat_ms,
        bytes,
        wrong,
    }
}

/// `joiner` (in `g`) links to its grid neighbours; each tells its other
/// neighbours (one record added) and sends the joiner its whole map; the
/// joiner tells its links about each new one as it comes up. `r` knows
/// of the joiner once a neighbour linked to it told `r`.
fn join(g: &Grid, sets: &[std::collections::HashSet<u32>], joiner: u32, lat_ms: u64) -> Spread {
    let n = g.len() as u32;
    let up = LINK_SETUP_TRIPS * lat_ms;
    let mine = &sets[joiner as usize];
    let mut bytes = 0u64;
    for &nb in mine {
        let theirs = sets[nb as usize].len() as u64;
        bytes += (theirs - 1) * DELTA_ADD_BYTES + theirs * RECORD_BYTES;
    }
    let k = mine.len() as u64;
    bytes += k * k / 2 * DELTA_ADD_BYTES;
    let (mut settled, mut wrong) = (0u64, 0usize);
    for r in (0..n).filter(|&r| r != joiner) {
        let t = if mine.contains(&r) {
            Some(up)
        } else if sets[r as usize].iter().any(|nb| mine.contains(nb)) {
            Some(up + lat_ms)
        } else {
            None
        };
        match t {
            Some(t) => settled = settled.max(t),
            None => wrong += 1,
        }
    }
    Spread {
        settled_ms: settled,
        bytes,
        wrong,
    }
}

/// Membership over the grid, simulated with the relays' rules: a relay
/// dying, one link breaking between two live relays, a relay joining.
pub(crate) fn gossip_figures(g: &Grid, out: &Output) {
    let n = g.len();
    let sets = link_sets(g);
    let mut rng = Rng(7 + n as u64);
    let victim = rng.below(n);
    let links_mean = sets.iter().map(|s| s.len()).sum::<usize>() as f64 / n as f64;
    let per_relay = |s: &Spread| s.bytes as f64 / n as f64;
    for lat in [1u64, 20] {
        let died = death(g, &sets, victim, lat, &mut rng);
        let nbs: Vec<u32> = sets[victim as usize].iter().copied().collect();
        let one = nbs[rng.below(nbs.len()) as usize];
        let broke = broken_link(g, &sets, victim, one, lat);
        let joined = join(g, &sets, rng.below(n), lat);
        if out.json {
            println!(
                "{}",
                serde_json::json!({"bench": "grid_gossip", "relays": n, "hop_ms": lat,
                    "death_settled_ms": died.settled_ms, "death_bytes_per_relay": per_relay(&died),
                    "broken_link_settled_ms": broke.settled_ms, "broken_link_bytes_per_relay": per_relay(&broke), "broken_link_lost_sight": broke.wrong,
                    "join_settled_ms": joined.settled_ms, "join_bytes_per_relay": per_relay(&joined), "join_unaware": joined.wrong,
                    "keepalive_bytes_per_relay_per_sec": links_mean * KEEPALIVE_BYTES_PER_SEC})
            );
        } else {
            println!(
                "          membership, {lat} ms per hop: a relay dies -> all {} live relays know within {:.2} s ({:.0} B of gossip per relay); one link breaks between live relays -> settled within {:.2} s ({:.1} B per relay, {} relays lose sight of either end); a relay joins -> all know within {} ms ({:.0} B per relay, {} unaware)",
                n - 1,
                died.settled_ms as f64 / 1000.0,
                per_relay(&died),
                broke.settled_ms as f64 / 1000.0,
                per_relay(&broke),
                broke.wrong,
                joined.settled_ms,
                per_relay(&joined),
                joined.wrong
            );
        }
    }
    if !out.json {
        let died = death(g, &sets, victim, 1, &mut Rng(1));
        println!(
            "          steady state: no gossip; link keep-alives {:.1} KB/s per relay ({links_mean:.0} links); with every relay restarting once a day: {:.2} B/s of gossip per relay (a death and a join each)",
            links_mean * KEEPALIVE_BYTES_PER_SEC / 1000.0,
            n as f64 / 86_400.0 * (per_relay(&died) + per_relay(&join(g, &sets, victim, 1)))
        );
    }
}
