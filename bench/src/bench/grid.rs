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
            let reach = 1.0 - hist[4] as f64 / tried as f64;
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({"bench": "grid", "relays": n, "down_percent": pct,
                        "hops": {"1": hist[1], "2": hist[2], "3": hist[3], "none": hist[4]}, "reachable": reach})
                );
            } else {
                println!(
                    "          {pct:>2} % down: live pairs reachable {:.4} % — 1 hop {} · 2 hops {} · 3 hops {} · none {}",
                    reach * 100.0, hist[1], hist[2], hist[3], hist[4]
                );
            }
            if n == 10_000 && pct == 10 {
                record(
                    "grid",
                    "live pairs reachable with 10 % down at 10 000 relays",
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

/// Bytes one membership update takes on a link: a relay id (~16 bytes),
/// incarnation (8), state (1), framing (~7).
const UPDATE_BYTES: u64 = 32;
/// Link keep-alive: one QUIC packet with a PING every 750 ms (~60 bytes
/// with UDP/IP headers), each way.
const KEEPALIVE_BYTES_PER_SEC: f64 = 60.0 * 1000.0 / 750.0;
/// A link notices silence after this long (the mesh's idle timeout), plus
/// up to one keep-alive interval.
const DETECT_MS: u64 = 3000;
const KEEPALIVE_MS: u64 = 750;

/// What one membership event cost and how long it took to reach everyone.
struct Spread {
    /// Until every live relay holds the final news (ms after the event).
    converged_ms: u64,
    /// Updates sent, all relays together.
    messages: u64,
    /// Live relays that ended with the wrong belief (must be 0).
    wrong: usize,
}

enum Ev {
    Deliver {
        to: u32,
        u: swb_ring::gossip::Update,
    },
    Lost {
        at: u32,
        peer: u32,
    },
    Tick {
        at: u32,
    },
}

/// Simulated time's events, earliest first (ties in the order pushed).
#[derive(Default)]
struct Queue {
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u64)>>,
    evs: Vec<Option<Ev>>,
}

impl Queue {
    fn push(&mut self, t: u64, e: Ev) {
        self.heap
            .push(std::cmp::Reverse((t, self.evs.len() as u64)));
        self.evs.push(Some(e));
    }

    fn pop(&mut self) -> Option<(u64, Ev)> {
        let std::cmp::Reverse((t, i)) = self.heap.pop()?;
        self.evs[i as usize].take().map(|e| (t, e))
    }
}

/// Floods over `g`'s links with `lat_ms` per hop: the relays in `lose`
/// lose their link to `victim` (at detection times from `rng`); `dead`:
/// whether the victim is really gone (else it refutes). Views start with
/// everyone alive at incarnation 0.
fn spread(g: &Grid, victim: u32, lose: &[u32], dead: bool, lat_ms: u64, rng: &mut Rng) -> Spread {
    use swb_ring::gossip::{Node, State};
    let n = g.len();
    let mut nodes: Vec<Node> = (0..n as u32).map(|i| Node::new(i, 0)).collect();
    let links: Vec<Vec<u32>> = (0..n as u32).map(|i| g.links(i)).collect();
    let mut q = Queue::default();
    for &a in lose {
        let t = DETECT_MS + rng.next() % KEEPALIVE_MS;
        q.push(
            t,
            Ev::Lost {
                at: a,
                peer: victim,
            },
        );
    }
    // Links that are down: all of the victim's when it died, else only
    // the ones `lose` lost.
    let cut = |a: u32, b: u32| {
        let other = match (a == victim, b == victim) {
            (true, _) => b,
            (_, true) => a,
            _ => return false,
        };
        dead || lose.contains(&other)
    };
    let (messages, last) = flood(&mut nodes, &links, &mut q, cut, lat_ms);
    let want = if dead { State::Dead } else { State::Alive };
    let wrong = (0..n as u32)
        .filter(|&i| {
            i != victim && nodes[i as usize].state_of(victim).unwrap_or(State::Alive) != want
        })
        .count();
    Spread {
        converged_ms: last,
        messages,
        wrong,
    }
}

/// Runs the queue's events to the end: news applied, passed on over
/// every link `cut` leaves up, `lat_ms` per hop; suspicions timed out.
/// The updates sent, and when the last news was taken.
fn flood(
    nodes: &mut [swb_ring::gossip::Node],
    links: &[Vec<u32>],
    q: &mut Queue,
    cut: impl Fn(u32, u32) -> bool,
    lat_ms: u64,
) -> (u64, u64) {
    use swb_ring::gossip::{State, SUSPECT_TIMEOUT_MS};
    let (mut messages, mut last) = (0u64, 0u64);
    while let Some((t, e)) = q.pop() {
        let (at, out) = match e {
            Ev::Lost { at, peer } => (
                at,
                nodes[at as usize]
                    .link_lost(peer, t)
                    .into_iter()
                    .collect::<Vec<_>>(),
            ),
            Ev::Deliver { to, u } => (to, nodes[to as usize].apply(u, t).into_iter().collect()),
            Ev::Tick { at } => (at, nodes[at as usize].tick(t)),
        };
        if !out.is_empty() {
            last = last.max(t);
        }
        for u in out {
            if u.state == State::Suspect {
                // Whoever passes a suspicion on times it out too.
                q.push(t + SUSPECT_TIMEOUT_MS, Ev::Tick { at });
            }
            for &l in &links[at as usize] {
                if cut(at, l) {
                    continue;
                }
                messages += 1;
                q.push(t + lat_ms, Ev::Deliver { to: l, u });
            }
        }
    }
    (messages, last)
}

/// A relay joins `g` (which has it): its links hear of it as they link
/// (one hop's time) and the news floods.
fn join(g: &Grid, joiner: u32, lat_ms: u64) -> Spread {
    use swb_ring::gossip::{Node, State};
    let n = g.len();
    let mut nodes: Vec<Node> = (0..n as u32)
        .map(|i| Node::new(i, u64::from(i == joiner)))
        .collect();
    let links: Vec<Vec<u32>> = (0..n as u32).map(|i| g.links(i)).collect();
    let mut q = Queue::default();
    let hello = nodes[joiner as usize].own();
    for &l in &links[joiner as usize] {
        q.push(lat_ms, Ev::Deliver { to: l, u: hello });
    }
    let (messages, last) = flood(&mut nodes, &links, &mut q, |_, _| false, lat_ms);
    let wrong = (0..n as u32)
        .filter(|&i| i != joiner && nodes[i as usize].state_of(joiner) != Some(State::Alive))
        .count();
    Spread {
        converged_ms: last,
        messages: messages + links[joiner as usize].len() as u64,
        wrong,
    }
}

/// Membership over the grid, simulated: a relay dying, and one link
/// breaking between two live relays (a false suspicion, refuted).
pub(crate) fn gossip_figures(g: &Grid, out: &Output) {
    let n = g.len();
    let mut rng = Rng(7 + n as u64);
    let victim = rng.below(n);
    let neighbours = g.links(victim);
    let links_mean = (0..n as u32).map(|i| g.links(i).len()).sum::<usize>() as f64 / n as f64;
    for lat in [1u64, 20] {
        let died = spread(g, victim, &neighbours, true, lat, &mut rng);
        let one = neighbours[rng.below(neighbours.len()) as usize];
        let refuted = spread(g, victim, &[one], false, lat, &mut rng);
        let joined = join(g, rng.below(n), lat);
        let per_relay = |s: &Spread| s.messages as f64 * UPDATE_BYTES as f64 / n as f64;
        if out.json {
            println!(
                "{}",
                serde_json::json!({"bench": "grid_gossip", "relays": n, "hop_ms": lat,
                    "death_converged_ms": died.converged_ms, "death_bytes_per_relay": per_relay(&died), "death_wrong": died.wrong,
                    "false_suspicion_settled_ms": refuted.converged_ms, "false_suspicion_bytes_per_relay": per_relay(&refuted), "false_suspicion_wrong": refuted.wrong,
                    "join_converged_ms": joined.converged_ms, "join_bytes_per_relay": per_relay(&joined), "join_wrong": joined.wrong,
                    "keepalive_bytes_per_relay_per_sec": links_mean * KEEPALIVE_BYTES_PER_SEC})
            );
        } else {
            println!(
                "          membership, {lat} ms per hop: a relay dies -> all {} live relays know within {:.2} s of the death ({:.0} B of gossip per relay, {} wrong); one link breaks between live relays -> refuted, settled within {:.2} s ({:.0} B per relay, {} wrong); a relay joins -> all know within {} ms ({:.0} B per relay, {} wrong)",
                n - 1,
                died.converged_ms as f64 / 1000.0,
                per_relay(&died),
                died.wrong,
                refuted.converged_ms as f64 / 1000.0,
                per_relay(&refuted),
                refuted.wrong,
                joined.converged_ms,
                per_relay(&joined),
                joined.wrong
            );
        }
    }
    if !out.json {
        println!(
            "          steady state: no gossip; link keep-alives {:.1} KB/s per relay ({links_mean:.0} links); with every relay restarting once a day: {:.2} B/s of gossip per relay",
            links_mean * KEEPALIVE_BYTES_PER_SEC / 1000.0,
            // Two events (dead, alive again) per relay per day, each
            // costing about one update per link per relay.
            2.0 * n as f64 / 86_400.0 * links_mean * UPDATE_BYTES as f64
        );
    }
}
