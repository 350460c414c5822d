//! `flood`: established peers under a handshake flood. Two daemons attached
//! to a relay (in its own process) do 256 B request → reply, one at a time,
//! while (a) nothing else happens, (b) another process opens new QUIC+TLS
//! connections to the relay as fast as it can (full handshakes, each closed
//! once done), (c) another process sends QUIC Initials that never complete
//! (prerecorded ClientHellos, each with a new connection id, from one
//! socket that answers nothing). Prints p50/p99 per phase, the flood's rate,
//! how long a new daemon took to attach during it, and whether an
//! established session dropped. Three relays, in the same run: as deployed
//! (per-address limits on; the flood comes from 16 addresses); without
//! per-address limits (an attacker with as many addresses as it likes);
//! and without per-address limits with handshakes on the runtime's workers
//! (`--handshake-threads 0`) instead of the low-priority handshake thread.

use super::{ours_latency, pct, record, spawn_self, Hist, RelayProc, RESPONDER};
use crate::Output;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use swb_daemon::Daemon;

#[derive(Debug, Args)]
pub(crate) struct FloodArgs {
    /// Request → reply round trips per measurement.
    #[arg(long, default_value_t = 2000)]
    pub(crate) samples: usize,
    /// Runs of every phase; medians and min–max are reported.
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Flood before measuring, so the relay is in its steady state (the
    /// per-address bursts, 500 connections and 1000 Initials, are spent).
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    pub(crate) warmup: Duration,
    /// Nice value of the flood generator: 0 competes with the relay for
    /// the CPU as an equal; 19 takes only what the relay leaves, as an
    /// attacker on another machine would.
    #[arg(long, default_value_t = 0)]
    pub(crate) attacker_nice: i32,
    /// Only the relay as deployed, not the two relays without limits it is
    /// compared with (the smoke run: an unoptimised relay without limits
    /// takes the 30 s attach timeout under a flood, and proves nothing more).
    #[arg(long)]
    pub(crate) deployed_only: bool,
}

/// `swbd-bench flood-gen`: floods a relay until killed; writes the count
/// of handshakes completed (or Initials sent) to `--stats` twice a second.
#[derive(Debug, Args)]
pub(crate) struct FloodGenArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    fingerprint: String,
    /// `handshakes` or `initials`.
    #[arg(long)]
    mode: String,
    #[arg(long)]
    stats: PathBuf,
    /// Nice value of the generator.
    #[arg(long, default_value_t = 0)]
    nice: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Quiet,
    Handshakes,
    Initials,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Quiet => "quiet",
            Phase::Handshakes => "handshakes",
            Phase::Initials => "initials",
        }
    }
}

/// One phase of one run.
#[derive(Debug, Clone, Copy)]
struct Figures {
    p50: f64,
    p99: f64,
    flood_per_sec: f64,
    attach_ms: f64,
}

/// The relays compared.
const SETUPS: [(&str, usize, bool); 3] = [
    ("as deployed", 1, true),
    ("no per-address limits", 1, false),
    ("no limits, no handshake thread", 0, false),
];

pub(crate) async fn flood_bench(a: FloodArgs, out: &Output) -> Result<()> {
    let phases = [Phase::Quiet, Phase::Handshakes, Phase::Initials];
    // setups × phases × runs
    let mut figs: Vec<Vec<Vec<Figures>>> = vec![vec![Vec::new(); phases.len()]; SETUPS.len()];
    let mut dropped = [0u64; SETUPS.len()];
    let setups = if a.deployed_only {
        &SETUPS[..1]
    } else {
        &SETUPS[..]
    };
    for run in 0..a.runs {
        for (si, (_, threads, deployed)) in setups.iter().enumerate() {
            let (f, d) = one_relay(&a, *threads, *deployed, &phases, run).await?;
            for (i, x) in f.into_iter().enumerate() {
                figs[si][i].push(x);
            }
            dropped[si] += d;
        }
    }
    let med = |v: &[f64]| super::median(v.to_vec());
    let range = super::min_max;
    if !out.json {
        println!(
            "flood: 256 B request -> reply between two daemons on a relay (own process), one at a time, {} samples; flood generator at nice {}; median of {} runs (min-max)",
            a.samples, a.attacker_nice, a.runs
        );
        println!(
            "{:<32} {:>10} {:>22} {:>22} {:>12} {:>10}",
            "relay", "phase", "p50 ms", "p99 ms", "flood /s", "attach ms"
        );
    }
    for (si, (label, _, _)) in setups.iter().enumerate() {
        let quiet_p99 = med(&figs[si][0].iter().map(|f| f.p99).collect::<Vec<_>>());
        for (i, phase) in phases.iter().enumerate() {
            let p50: Vec<f64> = figs[si][i].iter().map(|f| f.p50).collect();
            let p99: Vec<f64> = figs[si][i].iter().map(|f| f.p99).collect();
            let rate: Vec<f64> = figs[si][i].iter().map(|f| f.flood_per_sec).collect();
            let att: Vec<f64> = figs[si][i].iter().map(|f| f.attach_ms).collect();
            let (p50l, p50h) = range(&p50);
            let (p99l, p99h) = range(&p99);
            let (_, atth) = range(&att);
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({"bench": "flood", "relay": label, "phase": phase.label(),
                        "attacker_nice": a.attacker_nice,
                        "p50_ms": p50, "p99_ms": p99, "flood_per_sec": rate, "attach_ms": att,
                        "sessions_dropped": dropped[si]})
                );
            } else {
                println!(
                    "{:<32} {:>10} {:>7.3} ({:.3}-{:.3}) {:>7.3} ({:.3}-{:.3}) {:>12.0} {:>10.0}",
                    label,
                    phase.label(),
                    med(&p50),
                    p50l,
                    p50h,
                    med(&p99),
                    p99l,
                    p99h,
                    med(&rate),
                    atth
                );
            }
            if si < 2 && *phase != Phase::Quiet {
                record(
                    "flood",
                    &format!("{label}: p99 ms under {} flood (vs quiet)", phase.label()),
                    med(&p99),
                    quiet_p99,
                    false,
                    2.0,
                );
            }
        }
        if !out.json {
            println!(
                "{:<32} established sessions dropped: {}, slowest attach during a flood: {:.0} ms",
                label,
                dropped[si],
                figs[si][1..]
                    .iter()
                    .flatten()
                    .map(|f| f.attach_ms)
                    .fold(0.0, f64::max)
            );
        }
    }
    Ok(())
}

/// One relay process with `threads` handshake threads: every phase once.
/// Returns the figures and how often an established session dropped.
async fn one_relay(
    a: &FloodArgs,
    threads: usize,
    deployed_limits: bool,
    phases: &[Phase],
    run: usize,
) -> Result<(Vec<Figures>, u64)> {
    let threads_s = threads.to_string();
    let mut extra = vec!["--handshake-threads", &threads_s];
    if deployed_limits {
        extra.push("--deployed-limits");
    }
    let relay = RelayProc::start(&extra).await?;
    let (addr, fingerprint, tmp) = (relay.addr, relay.fingerprint.clone(), &relay.dir);
    let daemon = |name: &str| relay.daemon_config(name);
    let req = Daemon::spawn(daemon("requester")).await?;
    let resp = Daemon::spawn(daemon(RESPONDER)).await?;
    req.connected().await.map_err(anyhow::Error::msg)?;
    resp.connected().await.map_err(anyhow::Error::msg)?;
    let drops = Arc::new(AtomicU64::new(0));
    let mut watchers = Vec::new();
    for d in [&req, &resp] {
        let mut st = d.state();
        let drops = drops.clone();
        watchers.push(tokio::spawn(async move {
            let mut was = true;
            while st.changed().await.is_ok() {
                let now = matches!(
                    *st.borrow_and_update(),
                    swb_daemon::ConnState::Connected { .. }
                );
                if was && !now {
                    drops.fetch_add(1, Ordering::Relaxed);
                }
                was = now;
            }
        }));
    }
    let mut figs = Vec::new();
    for (i, phase) in phases.iter().enumerate() {
        let stats = tmp.path().join(format!("flood-{i}.count"));
        let flood = match phase {
            Phase::Quiet => None,
            p => {
                let addr_s = addr.to_string();
                let stats_s = stats.to_str().context("path")?.to_string();
                let nice_s = a.attacker_nice.to_string();
                let (child, (), _) = spawn_self(
                    &[
                        "flood-gen",
                        "--addr",
                        &addr_s,
                        "--fingerprint",
                        &fingerprint,
                        "--mode",
                        p.label(),
                        "--stats",
                        &stats_s,
                        "--nice",
                        &nice_s,
                    ],
                    |l| l.starts_with("flooding").then_some(()),
                )
                .await?;
                Some(child)
            }
        };
        let start_count = if flood.is_some() {
            tokio::time::sleep(a.warmup).await;
            read_count(&stats)
        } else {
            0
        };
        let t0 = Instant::now();
        // A new real daemon attaches while the flood runs.
        let t_attach = Instant::now();
        let newcomer = Daemon::spawn(daemon(&format!("new-{run}-{i}"))).await?;
        let attach_ms =
            match tokio::time::timeout(Duration::from_secs(30), newcomer.connected()).await {
                Ok(Ok(_)) => t_attach.elapsed().as_secs_f64() * 1e3,
                _ => f64::INFINITY,
            };
        newcomer.shutdown();
        let _ = newcomer.join().await;
        // A request the relay does not answer within the measurement's 30 s
        // (its sessions dropped under the flood, as a relay without limits
        // may) is this phase's result, p50 and p99 infinite: not the end of
        // the run.
        let times = match ours_latency(
            req.control_path(),
            resp.control_path().to_path_buf(),
            "requester",
            a.samples,
            256,
            1,
            false,
        )
        .await
        {
            Ok(times) => times,
            Err(e) => {
                eprintln!("flood: {} flood, run {run}: {e:#}", phase.label());
                Vec::new()
            }
        };
        let elapsed = t0.elapsed().as_secs_f64();
        let flood_per_sec = if flood.is_some() {
            read_count(&stats).saturating_sub(start_count) as f64 / elapsed
        } else {
            0.0
        };
        drop(flood);
        let (p50, p99) = if times.is_empty() {
            (f64::INFINITY, f64::INFINITY)
        } else {
            let h = Hist::of(&times)?;
            (pct(&h, 0.5), pct(&h, 0.99))
        };
        figs.push(Figures {
            p50,
            p99,
            flood_per_sec,
            attach_ms,
        });
    }
    for w in watchers {
        w.abort();
    }
    req.shutdown();
    resp.shutdown();
    let _ = req.join().await;
    let _ = resp.join().await;
    Ok((figs, drops.load(Ordering::Relaxed)))
}

fn read_count(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The flood generator (its own process, so it competes with the relay for
/// the CPU as an outside attacker does, not inside the relay's runtime).
pub(crate) async fn flood_gen_main(a: FloodGenArgs) -> Result<()> {
    if a.nice > 0 {
        rustix::process::setpriority_process(None, a.nice)?;
    }
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let stats = a.stats.clone();
    let writer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = std::fs::write(&stats, c.load(Ordering::Relaxed).to_string());
        }
    });
    match a.mode.as_str() {
        "handshakes" => handshakes(&a, count).await?,
        "initials" => initials(&a, count).await?,
        m => bail!("unknown flood mode {m}"),
    }
    writer.abort();
    Ok(())
}

/// Full handshakes, as many as 64 at once from 16 source addresses, each
/// connection closed once established.
async fn handshakes(a: &FloodGenArgs, count: Arc<AtomicU64>) -> Result<()> {
    let cfg = super::client_config(&a.fingerprint)?;
    let eps = super::client_endpoints(16)?;
    println!("flooding");
    let mut set = tokio::task::JoinSet::new();
    for i in 0..64 {
        let ep = eps[i % eps.len()].clone();
        let cfg = cfg.clone();
        let addr = a.addr;
        let count = count.clone();
        set.spawn(async move {
            loop {
                if let Ok(c) = ep.connect_with(cfg.clone(), addr, "localhost") {
                    if let Ok(conn) = c.await {
                        conn.close(0u32.into(), b"");
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    Ok(())
}

/// Initials that never complete: ClientHellos recorded from real quinn
/// clients aimed at a socket of ours, then sent to the relay in a loop from
/// one socket that never answers.
async fn initials(a: &FloodGenArgs, count: Arc<AtomicU64>) -> Result<()> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let cfg = super::client_config(&a.fingerprint)?;
    let ep = super::client_endpoints(1)?.remove(0);
    let mut recorded = Vec::new();
    let mut buf = vec![0u8; 2048];
    const PACKETS: usize = 8_000;
    while recorded.len() < PACKETS {
        let mut pending = Vec::new();
        for _ in 0..64 {
            pending.push(ep.connect_with(cfg.clone(), sink_addr, "localhost")?);
        }
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_millis(100), sink.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => recorded.push(buf[..n].to_vec()),
                _ => break,
            }
        }
        drop(pending);
    }
    drop(ep);
    let sock = tokio::net::UdpSocket::bind("127.0.0.3:0").await?;
    println!("flooding");
    loop {
        for p in &recorded {
            if sock.send_to(p, a.addr).await.is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
