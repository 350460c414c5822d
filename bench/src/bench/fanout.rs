//! `swbd-bench fanout`: status as the multicast primitive — one publisher's
//! status changes delivered to many watchers, on one relay and across a
//! mesh hop — against NATS core pub/sub 1 → N over TLS, in one run.
//!
//! The relays run with `status_interval` 0 (every change published at
//! once); with the default 50 ms a peer publishes at most 20 changes a
//! second by design, which measures the interval, not the fan-out. A
//! watcher more than the relay's recent values behind skips the oldest
//! (coalesced, `lagged`): deliveries count what watchers actually
//! received, and the share of changes coalesced away is printed beside
//! it. NATS delivers every
//! message to every subscriber. Watchers read through the daemon's Rust
//! API (`DaemonHandle::watch`), as the NATS subscribers read the wire; the
//! publisher uses control connections, as `swbd set-status` does. Then,
//! per path, changes one at a time to one watcher (latency percentiles),
//! beside NATS+TLS messages one at a time to one subscriber.

use super::{bench_daemon, median, nats_rate, record};
use crate::Output;
use anyhow::{ensure, Context, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use swb_daemon::Client;
use swb_relay::Identity;

#[derive(Debug, Clone, Copy, Args)]
pub(crate) struct FanoutArgs {
    /// Watchers of the publisher.
    #[arg(long, default_value_t = 100)]
    pub(crate) watchers: usize,
    /// Status changes published per run.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) updates: usize,
    /// Control connections the publisher's changes are spread over (each
    /// waits for its change's answer before the next, as `swbd
    /// set-status` does). Fewer leave the publisher's round trips, not
    /// the fan-out, setting the pace (NATS' publisher waits for nothing):
    /// with 32, no watch write could carry more than 32 changes.
    #[arg(long, default_value_t = 128)]
    pub(crate) publishers: usize,
    /// Runs per contender; median and min–max reported.
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Changes published one at a time to one watcher, per path, for the
    /// latency (publisher's `set-status` → the watcher has it); NATS+TLS
    /// the same with one message (publish → the subscriber has it).
    #[arg(long, default_value_t = 2_000)]
    pub(crate) one_at_a_time: usize,
}

/// One run's figures.
struct Run {
    /// Changes delivered to watchers per second (all watchers together).
    deliveries: f64,
    /// Changes published per second.
    published: f64,
    /// Share of (changes × watchers) that coalesced into newer values.
    coalesced: f64,
}

/// A name of the `bench` namespace homed on `home`, not in `taken`.
fn homed(ring: &swb_ring::Ring, home: &str, prefix: &str, taken: usize) -> Vec<String> {
    (0..100_000)
        .map(|i| format!("{prefix}{i}"))
        .filter(|n| ring.home("bench", n) == Some(home))
        .take(taken)
        .collect()
}

/// Publishes `a.updates` changes of `publisher` while `watchers` watch it;
/// ends when every watcher saw the run's last change.
async fn run_once(
    publisher: &swb_daemon::DaemonHandle,
    pub_name: &str,
    watchers: &[swb_daemon::DaemonHandle],
    a: &FanoutArgs,
    run: usize,
) -> Result<Run> {
    let got = Arc::new(AtomicUsize::new(0));
    let done_tag = format!("done-{run}");
    let mut readers = tokio::task::JoinSet::new();
    for w in watchers {
        let mut c = w
            .watch(vec![pub_name.to_string()], Duration::from_secs(10))
            .await?;
        // The current value first: taken before the clock starts.
        c.next().await?.context("watch ended")?;
        let (got, done_tag) = (got.clone(), done_tag.clone());
        readers.spawn(async move {
            loop {
                let u = c.next().await?.context("watch ended")?;
                if u.status.get("done").map(String::as_str) == Some(done_tag.as_str()) {
                    return anyhow::Ok(());
                }
                got.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..a.publishers.max(1) {
        let mut c = Client::connect(publisher.control_path()).await?;
        let (next, n) = (next.clone(), a.updates);
        writers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let set = BTreeMap::from([("n".to_string(), i.to_string())]);
                c.set_status(set, vec!["done".into()], Duration::from_secs(10))
                    .await?;
            }
        });
    }
    while let Some(r) = writers.join_next().await {
        r??;
    }
    let published = a.updates as f64 / t.elapsed().as_secs_f64();
    let mut c = Client::connect(publisher.control_path()).await?;
    c.set_status(
        BTreeMap::from([("done".to_string(), done_tag)]),
        Vec::new(),
        Duration::from_secs(10),
    )
    .await?;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(60), readers.join_next())
        .await
        .context("watchers stalled")?
    {
        r??;
    }
    let secs = t.elapsed().as_secs_f64();
    let delivered = got.load(Ordering::Relaxed);
    ensure!(delivered > 0, "no change reached a watcher");
    Ok(Run {
        deliveries: delivered as f64 / secs,
        published,
        coalesced: 1.0 - delivered as f64 / (a.updates * watchers.len()) as f64,
    })
}

/// One change at a time from `publisher` to `watcher`: how long from the
/// publisher's `set-status` (a control connection, as `swbd set-status`)
/// until the watcher (the Rust API) has the change.
async fn latency_once(
    publisher: &swb_daemon::DaemonHandle,
    pub_name: &str,
    watcher: &swb_daemon::DaemonHandle,
    n: usize,
) -> Result<Vec<Duration>> {
    let mut w = watcher
        .watch(vec![pub_name.to_string()], Duration::from_secs(10))
        .await?;
    w.next().await?.context("watch ended")?;
    let mut c = Client::connect(publisher.control_path()).await?;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let tag = format!("one-{i}");
        let set = BTreeMap::from([("n".to_string(), tag.clone())]);
        let t = Instant::now();
        let seen = async {
            loop {
                let u = w.next().await?.context("watch ended")?;
                if u.status.get("n") == Some(&tag) {
                    return anyhow::Ok(t.elapsed());
                }
            }
        };
        let (set, seen) =
            tokio::join!(c.set_status(set, Vec::new(), Duration::from_secs(10)), seen);
        set?;
        times.push(seen?);
    }
    Ok(times)
}

/// One message at a time, NATS publisher → one subscriber (TLS).
async fn nats_latency(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    n: usize,
) -> Result<Vec<Duration>> {
    let (mut stx, mut srx) = crate::nats::subscribed(addr, Some(tls.clone()), "one").await?;
    let (mut tx, _rx) = crate::nats::connect(addr, Some(tls)).await?;
    let body = vec![0x42u8; 32];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        tx.publish("one", None, &body);
        tx.flush().await?;
        tokio::time::timeout(Duration::from_secs(10), srx.next())
            .await
            .context("NATS delivery stalled")??;
        times.push(t.elapsed());
        if srx.pings > 0 {
            srx.pings = 0;
            stx.pong();
            stx.flush().await?;
        }
    }
    Ok(times)
}

/// Median, min and max of `v`.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let (lo, hi) = super::min_max(v);
    (median(v.to_vec()), lo, hi)
}

pub(crate) async fn fanout_bench(a: FanoutArgs, out: &Output) -> Result<()> {
    // Two relays of a mesh, publishing every status change at once.
    let (relays, key) = super::mesh_relays(&["r1", "r2"], swb_relay::mesh::FULL_MESH_MAX, |rc| {
        rc.connections_per_ip = None;
        rc.initials.per_ip = None;
        rc.status_interval = Duration::ZERO;
    })
    .await?;
    let ring = swb_ring::Ring::new(["r1", "r2"]);
    let dir = tempfile::tempdir()?;
    let pub_name = homed(&ring, "r1", "pub", 1)
        .pop()
        .context("a name homed on r1")?;
    let publisher = bench_daemon(&relays[0], &key, &pub_name, dir.path(), Vec::new()).await?;
    // Watchers on the publisher's relay, and on the other one (a mesh hop).
    let mut groups = Vec::new();
    for (home, label) in [("r1", "same relay"), ("r2", "across a mesh hop")] {
        let mut ws = Vec::new();
        for n in homed(&ring, home, &format!("w{home}-"), a.watchers) {
            ws.push(bench_daemon(&relays[0], &key, &n, dir.path(), Vec::new()).await?);
        }
        groups.push((label, ws));
    }
    // NATS over TLS, same machine, same run.
    let tls_dir = tempfile::tempdir()?;
    let identity = Identity::dev_in_dir(&tls_dir.path().join("tls"), &[])?;
    let nats = crate::nats::start_server(Some((
        &tls_dir.path().join("tls").join("relay.crt"),
        &tls_dir.path().join("tls").join("relay.key"),
    )))
    .await?;
    let tls = Arc::new(swb_daemon::Trust::Fingerprint(identity.fingerprint()).rustls_config(&[])?);
    if !out.json {
        println!(
            "status fan-out: 1 publisher ({} control connections), {} changes per run, {} watchers; {} runs; vs NATS+TLS pub/sub 1 -> {}",
            a.publishers, a.updates, a.watchers, a.runs, a.watchers
        );
    }
    // Warm-up: every watch path once.
    let warm = FanoutArgs { updates: 200, ..a };
    for (i, (_, ws)) in groups.iter().enumerate() {
        run_once(&publisher, &pub_name, ws, &warm, 1000 + i).await?;
    }
    // Contenders take turns within each run, so a slow spell of the
    // machine falls on all of them.
    let mut runs: Vec<Vec<Run>> = groups.iter().map(|_| Vec::new()).collect();
    let mut nt = Vec::new();
    // How far apart the two CPUs were around each run (see `cores`).
    let mut apart = Vec::new();
    for r in 0..a.runs.max(1) {
        let before = super::cores::measure().await;
        for (i, (_, ws)) in groups.iter().enumerate() {
            runs[i].push(run_once(&publisher, &pub_name, ws, &a, r * 10 + i).await?);
        }
        nt.push(
            nats_rate(&nats, Some(tls.clone()), a.watchers, a.updates * a.watchers)
                .await?
                .rate,
        );
        apart.push((before, super::cores::measure().await));
    }
    // One change at a time: latency per path, and NATS's.
    let mut lat: Vec<(String, Vec<Duration>)> = Vec::new();
    if a.one_at_a_time > 0 {
        for (label, ws) in &groups {
            let w = ws.first().context("a watcher")?;
            lat.push((
                format!("status, {label}"),
                latency_once(&publisher, &pub_name, w, a.one_at_a_time).await?,
            ));
        }
        lat.push((
            "NATS+TLS pub/sub".to_string(),
            nats_latency(nats.addr, tls.clone(), a.one_at_a_time).await?,
        ));
    }
    let (nm, nl, nh) = spread(&nt);
    if out.json {
        println!(
            "{}",
            serde_json::json!({"bench": "fanout",
                "cross_core_round_trip_ns_runs": super::cores::json(&apart)})
        );
    } else {
        println!("{}", super::cores::line(&apart));
        println!(
            "  NATS+TLS 1 -> {}: {nm:>10.0} deliveries/s ({nl:.0}–{nh:.0}; by run {})",
            a.watchers,
            super::by_run(&nt, 0)
        );
    }
    for ((label, _), rs) in groups.iter().zip(&runs) {
        let d: Vec<f64> = rs.iter().map(|r| r.deliveries).collect();
        let p: Vec<f64> = rs.iter().map(|r| r.published).collect();
        let c: Vec<f64> = rs.iter().map(|r| r.coalesced * 100.0).collect();
        let ((dm, dl, dh), (pm, _, _), (cm, cl, ch)) = (spread(&d), spread(&p), spread(&c));
        record(
            "fanout",
            &format!(
                "status deliveries/s 1 -> {}, {label} (vs NATS+TLS pub/sub)",
                a.watchers
            ),
            dm,
            nm,
            true,
            0.6,
        );
        if out.json {
            println!(
                "{}",
                serde_json::json!({"bench": "fanout", "path": label, "watchers": a.watchers,
                    "deliveries_per_sec": d, "published_per_sec": p, "coalesced_pct": c,
                    "nats_tls_per_sec": nt})
            );
        } else {
            println!(
                "  status, {label:<17}: {dm:>10.0} deliveries/s ({dl:.0}–{dh:.0}; by run {}), ratio vs NATS+TLS {:.2} (goal >= 0.6); {pm:.0} changes/s published, {cm:.1} % coalesced ({cl:.1}–{ch:.1})",
                super::by_run(&d, 0),
                dm / nm
            );
        }
    }
    if let Some((_, nats_times)) = lat.last() {
        let nats_h = super::Hist::of(nats_times)?;
        let (np50, np99) = (super::pct(&nats_h, 0.5), super::pct(&nats_h, 0.99));
        for (label, times) in &lat {
            let h = super::Hist::of(times)?;
            let (p50, p99) = (super::pct(&h, 0.5), super::pct(&h, 0.99));
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({"bench": "fanout", "one_at_a_time": label,
                        "n": times.len(), "p50_ms": p50, "p99_ms": p99})
                );
            } else {
                println!(
                    "  one at a time, {label:<27}: p50 {p50:.3} ms, p99 {p99:.3} ms ({:.2} / {:.2} of NATS+TLS's)",
                    p50 / np50,
                    p99 / np99
                );
            }
        }
    }
    drop(groups);
    drop(publisher);
    for r in relays {
        r.shutdown();
        r.join().await;
    }
    Ok(())
}
