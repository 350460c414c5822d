//! `shards`: relay throughput with 1 and 2 shards (QUIC endpoints sharing
//! the relay's UDP port, `swbd relay --shards`). A relay in its own process;
//! in this process, `pairs` pairs of daemons, each sender pipelining 128 B
//! messages (Rust API, `window` unanswered) to its own receiver. The figure
//! is deliveries per second over all pairs. Relays with 1 and 2 shards
//! alternate, `runs` each; medians and min–max.

use super::{median, min_max, receive_rust, record, submit_windowed, RelayProc};
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

/// One relay process with `shards` shards; deliveries per second.
async fn one_run(a: &ShardsArgs, shards: usize) -> Result<f64> {
    let shards_s = shards.to_string();
    let relay = RelayProc::start(&["--shards", &shards_s]).await?;
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
    readers.abort_all();
    for d in daemons {
        d.shutdown();
    }
    Ok(rate)
}

pub(crate) async fn shards_bench(a: ShardsArgs, out: &Output) -> Result<()> {
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..a.runs.max(1) {
        one.push(one_run(&a, 1).await?);
        two.push(one_run(&a, 2).await?);
    }
    let (m1, m2) = (median(one.clone()), median(two.clone()));
    let ((lo1, hi1), (lo2, hi2)) = (min_max(&one), min_max(&two));
    let ratio = m2 / m1;
    record(
        "shards",
        "deliveries/s with 2 shards (vs 1 shard)",
        m2,
        m1,
        true,
        1.6,
    );
    if out.json {
        println!(
            "{}",
            serde_json::json!({"bench": "shards", "pairs": a.pairs, "messages_per_pair": a.messages,
                "one_shard_per_sec": one, "two_shards_per_sec": two, "ratio_of_medians": ratio})
        );
    } else {
        println!(
            "shards: {} pairs of daemons, 128 B messages, {} unanswered per sender, relay in its own process; {} runs each, alternating",
            a.pairs,
            a.window,
            a.runs.max(1)
        );
        println!("  1 shard   {m1:>9.0}/s  ({lo1:.0}–{hi1:.0})");
        println!("  2 shards  {m2:>9.0}/s  ({lo2:.0}–{hi2:.0})");
        println!("  ratio {ratio:.2} (goal >= 1.6)");
    }
    Ok(())
}
