//! `shards`: relay throughput with 1 and 2 shards (QUIC endpoints sharing
//! the relay's UDP port, `swbd relay --shards`). A relay in its own process;
//! in this process, `pairs` pairs of daemons, each sender pipelining 128 B
//! messages (Rust API, `window` unanswered) to its own receiver. The figure
//! is deliveries per second over all pairs. Relays with 1 and 2 shards
//! alternate, `runs` each; medians and min–max. Both as deployed (mail in
//! the store, `sync`) and with mail in memory. The relay's CPU time per
//! delivery is read from `/proc`, the store writer thread's apart: one
//! writer serves every shard, so its CPU per delivery bounds a durable
//! relay's rate whatever the number of cores.

use super::{
    cpu_us_per, median, min_max, proc_cpu_ticks, receive_rust, record, submit_windowed,
    thread_cpu_ticks, RelayProc,
};
use crate::Output;
use anyhow::{Context, Result};
use clap::Args;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use swb_daemon::Daemon;

#[derive(Debug, Args)]
pub(crate) struct ShardsArgs {
    /// Pairs of daemons (each its own QUIC connection, so the kernel
    /// spreads them over the shards' sockets).
    #[arg(long, default_value_t = 8)]
    pub(crate) pairs: usize,
    /// Messages per pair per run.
    #[arg(long, default_value_t = 40_000)]
    pub(crate) messages: usize,
    /// Sends each sender keeps unanswered.
    #[arg(long, default_value_t = 256)]
    pub(crate) window: usize,
    /// Runs per shard count (alternating).
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Deliveries per second over all pairs.
    rate: f64,
    /// The relay process's CPU per delivery (µs).
    relay_us: f64,
    /// Of which the store writer thread's (µs).
    store_us: f64,
}

/// Name of the relay's store writer thread.
const STORE_THREAD: &str = "swb-store";

/// CPU ticks of the store writer thread(s) of `pid`, by thread id.
fn store_ticks(pid: u32) -> Result<Vec<(u32, u64)>> {
    Ok(thread_cpu_ticks(pid)?
        .into_iter()
        .filter(|(_, name, _)| name == STORE_THREAD)
        .map(|(tid, _, t)| (tid, t))
        .collect())
}

/// One relay process with `shards` shards (mail in memory if
/// `memory_mail`).
async fn one_run(a: &ShardsArgs, shards: usize, memory_mail: bool) -> Result<Run> {
    let shards_s = shards.to_string();
    let mut args = vec!["--shards", shards_s.as_str(), "--deep-mailboxes"];
    if memory_mail {
        args.push("--memory-mail");
    }
    let relay = RelayProc::start(&args).await?;
    let mut daemons = Vec::new();
    for i in 0..a.pairs {
        for side in ["s", "r"] {
            let d = Daemon::spawn(relay.daemon_config(&format!("{side}{i}"))).await?;
            d.connected().await.map_err(anyhow::Error::msg)?;
            daemons.push(d);
        }
    }
    let total = a.pairs * a.messages;
    let got = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let finished = done.notified();
    tokio::pin!(finished);
    finished.as_mut().enable();
    let mut readers = tokio::task::JoinSet::new();
    for d in daemons.iter().skip(1).step_by(2) {
        let (got, done) = (got.clone(), done.clone());
        readers.spawn(receive_rust(d.receiver(), move |k| {
            if got.fetch_add(k, Ordering::Relaxed) + k >= total {
                done.notify_one();
            }
        }));
    }
    let body = bytes::Bytes::from(vec![0x42u8; 128]);
    let (cpu0, store0) = (proc_cpu_ticks(relay.pid)?, store_ticks(relay.pid)?);
    let t = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for (i, d) in daemons.iter().step_by(2).enumerate() {
        let (to, body) = (std::sync::Arc::<str>::from(format!("r{i}")), body.clone());
        let mut left = a.messages;
        writers.spawn(submit_windowed(d.sender(), a.window, move || {
            left = left.checked_sub(1)?;
            Some((to.clone(), body.clone()))
        }));
    }
    while let Some(r) = writers.join_next().await {
        r??;
    }
    tokio::time::timeout(Duration::from_secs(120), finished)
        .await
        .context("not all delivered")?;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    let relay_ticks = proc_cpu_ticks(relay.pid)?.saturating_sub(cpu0);
    let store_ticks: u64 = store_ticks(relay.pid)?
        .into_iter()
        .map(|(tid, t)| {
            let before = store0.iter().find(|(t0, _)| *t0 == tid).map_or(0, |x| x.1);
            t.saturating_sub(before)
        })
        .sum();
    readers.abort_all();
    for d in daemons {
        d.shutdown();
    }
    Ok(Run {
        rate,
        relay_us: cpu_us_per(relay_ticks, total),
        store_us: cpu_us_per(store_ticks, total),
    })
}

/// Medians (and the rates' min–max) of one shard count's runs.
struct Summary {
    rate: f64,
    range: (f64, f64),
    relay_us: f64,
    store_us: f64,
}

impl Summary {
    fn of(runs: &[Run]) -> Self {
        let rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
        Self {
            range: min_max(&rates),
            rate: median(rates),
            relay_us: median(runs.iter().map(|r| r.relay_us).collect()),
            store_us: median(runs.iter().map(|r| r.store_us).collect()),
        }
    }
}

pub(crate) async fn shards_bench(a: ShardsArgs, out: &Output) -> Result<()> {
    if !out.json {
        println!(
            "shards: {} pairs of daemons, 128 B messages, {} unanswered per sender, relay in its own process; {} runs each, alternating",
            a.pairs,
            a.window,
            a.runs.max(1)
        );
    }
    for (memory_mail, mode, goal_name) in [
        (
            false,
            "mail in the store (sync, as deployed)",
            "deliveries/s with 2 shards (vs 1 shard)",
        ),
        (
            true,
            "mail in memory",
            "deliveries/s with 2 shards (vs 1 shard), mail in memory",
        ),
    ] {
        let (mut one, mut two) = (Vec::new(), Vec::new());
        for _ in 0..a.runs.max(1) {
            one.push(one_run(&a, 1, memory_mail).await?);
            two.push(one_run(&a, 2, memory_mail).await?);
        }
        let (s1, s2) = (Summary::of(&one), Summary::of(&two));
        let ratio = s2.rate / s1.rate;
        record("shards", goal_name, s2.rate, s1.rate, true, 1.6);
        // One store writer serves every shard: at one core's worth of its
        // CPU per delivery, a durable relay goes no faster on more cores.
        let store_us = if memory_mail {
            None
        } else {
            Some(s1.store_us.max(s2.store_us))
        };
        let ceiling = store_us.filter(|u| *u > 0.0).map(|u| 1e6 / u);
        if out.json {
            let rates = |v: &[Run]| v.iter().map(|r| r.rate).collect::<Vec<_>>();
            println!(
                "{}",
                serde_json::json!({"bench": "shards", "memory_mail": memory_mail, "pairs": a.pairs,
                    "messages_per_pair": a.messages,
                    "one_shard_per_sec": rates(&one), "two_shards_per_sec": rates(&two),
                    "ratio_of_medians": ratio,
                    "relay_cpu_us_per_delivery": [s1.relay_us, s2.relay_us],
                    "store_thread_cpu_us_per_delivery": [s1.store_us, s2.store_us],
                    "store_thread_ceiling_per_sec": ceiling})
            );
            continue;
        }
        println!("  {mode}:");
        for (label, s) in [("1 shard ", &s1), ("2 shards", &s2)] {
            let store = if memory_mail {
                String::new()
            } else {
                format!(
                    ", of which the store writer {:.2} µs ({:.0} %)",
                    s.store_us,
                    100.0 * s.store_us / s.relay_us.max(f64::MIN_POSITIVE)
                )
            };
            println!(
                "    {label}  {:>9.0}/s  ({:.0}–{:.0})   relay CPU {:.2} µs per delivery{store}",
                s.rate, s.range.0, s.range.1, s.relay_us
            );
        }
        println!("    ratio {ratio:.2} (goal >= 1.6)");
        if let Some(c) = ceiling {
            println!(
                "    one store writer serves every shard: at most ~{c:.0} deliveries/s on any number of cores (1 / its CPU per delivery)"
            );
        }
    }
    Ok(())
}
